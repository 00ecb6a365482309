"""Write into a temporary directory beside the output and rename it into place when complete.

An interrupted or failed run therefore never leaves a half-written output: either the old state
(no OUT, or the previous OUT when ``force`` replaces it) or the complete new one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from surgery.errors import OptionError, OutputExistsError


def check_output(out: Path, *, force: bool, protected: tuple[Path, ...] = ()) -> None:
    """Refuse an output that exists (unless ``force``) or that would overwrite a protected path.

    Args:
        out: the output directory.
        force: replace an existing directory.
        protected: paths that must never be written into or replaced (the source model).

    Raises:
        OutputExistsError: ``out`` exists and ``force`` is False, or it is a file.
        OptionError: ``out`` is, contains or lies inside a protected path.
    """
    resolved = out.resolve()
    for path in protected:
        source = path.resolve()
        if resolved == source or source in resolved.parents or resolved in source.parents:
            raise OptionError(f"output {out} overlaps the source model {path}; the source is never modified")
    if out.exists() or out.is_symlink():
        if not force or not out.is_dir():
            raise OutputExistsError(str(out))


@contextmanager
def staged_output(out: Path, *, force: bool) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``out``; on success it becomes ``out``.

    Args:
        out: the final directory.
        force: replace ``out`` if it exists (the old one is removed only after the new one is in place).

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "result"
        >>> with staged_output(out, force=False) as tmp:
        ...     _ = (tmp / "a.txt").write_text("done")
        >>> (out / "a.txt").read_text()
        'done'
    """
    check_output(out, force=force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))
    try:
        yield staging
        os.chmod(staging, 0o755)  # mkdtemp makes 0700; an output directory is an ordinary one
        if out.exists():
            retired = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.replaced-"))
            out.rename(retired / out.name)
            staging.rename(out)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
