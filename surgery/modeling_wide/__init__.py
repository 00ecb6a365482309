"""The modelling code of a parallel-merged checkpoint: copied into the output directory (``auto_map``).

:mod:`surgery.widen` writes ``configuration_surgery_parallel.py`` and
``modeling_surgery_parallel.py`` into every model directory it makes, with the line
``BASE_MODEL_TYPE = "..."`` set to the source architecture. The files need only ``torch`` and
``transformers`` (not layer-surgery) and derive every class from the base architecture's own.

Code that ships inside checkpoints outlives the tool that wrote it, so every output records which
revision of these files it carries and the ``transformers`` range that revision was tested with
(``surgery_code_revision`` and ``surgery_tested_transformers`` in its ``config.json``);
:func:`code_status` compares an output's files with the ones this installation ships, and
``surgery update-code OUT`` (:func:`surgery.api.update_code`) re-ships them without touching weights.

This module imports neither torch nor transformers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from surgery.checkpoint import open_regular, read_json_object

TEMPLATE_DIR = Path(__file__).parent
SHIPPED_FILES = ("configuration_surgery_parallel.py", "modeling_surgery_parallel.py")
BASE_LINE = 'BASE_MODEL_TYPE = "llama"'

# Bump whenever the shipped files change what they compute or how they are called.
# 1: layer-surgery up to 0.1.0 (takes the KV cache only as ``past_key_values``);
# 2: takes the cache under the name the base decoder layer's signature uses (transformers 5.24 ``cache``).
CODE_REVISION = 2
# The transformers releases this revision was tested with: pyproject's range, run by .ci/compat
# on its oldest and newest release (tests/test_compat.py keeps the two equal).
TESTED_TRANSFORMERS = ">=5.0,<5.25"

REVISION_KEY = "surgery_code_revision"
TESTED_KEY = "surgery_tested_transformers"
BASE_KEY = "surgery_base_model_type"


def render(base_model_type: str) -> dict[str, str]:
    """The text of each shipped file, bound to ``base_model_type``.

    Args:
        base_model_type: the source architecture's ``model_type``, e.g. ``llama``.

    Returns:
        ``{file name: text}`` for :data:`SHIPPED_FILES`.

    Raises:
        ValueError: the installed template lost its ``BASE_MODEL_TYPE`` line (a modified installation).

    Example:
        >>> 'BASE_MODEL_TYPE = "qwen2"' in render("qwen2")["configuration_surgery_parallel.py"]
        True
    """
    texts = {}
    for name in SHIPPED_FILES:
        text = (TEMPLATE_DIR / name).read_text(encoding="utf-8")
        if name.startswith("configuration_"):
            if text.count(BASE_LINE) != 1:
                raise ValueError(f"the shipped modelling template {name} lost its line {BASE_LINE!r}")
            text = text.replace(BASE_LINE, f"BASE_MODEL_TYPE = {json.dumps(base_model_type)}")
        texts[name] = text
    return texts


def shipped_code_line(config: dict[str, object]) -> str | None:
    """The card's sentence on the shipped code's revision and tested transformers range (wide-block outputs).

    ``surgery update-code`` rewrites this sentence when it re-ships the code, so its shape is fixed.
    """
    if not isinstance(config.get(TESTED_KEY), str):
        return None
    return (f"Shipped modelling code: layer-surgery revision {config.get(REVISION_KEY, 1)}, tested with "
            f"transformers {config[TESTED_KEY]}. If a later transformers breaks it, `surgery update-code DIR` "
            "re-ships the current code without touching the weights.")


@dataclass(frozen=True)
class CodeStatus:
    """How a wide-block output's shipped code compares with what this installation ships.

    Attributes:
        revision: the revision the output records (1 for outputs written before revisions were recorded).
        tested_transformers: the transformers range the output's code was tested with, when recorded.
        current: the output's files are exactly the ones this installation would ship.
        missing: shipped files that are not in the output.
    """

    revision: int
    tested_transformers: str | None
    current: bool
    missing: tuple[str, ...] = ()

    def describe(self) -> str:
        """One line for ``inspect``: revision, tested range, and whether it is current."""
        tested = f", tested with transformers {self.tested_transformers}" if self.tested_transformers else ""
        state = "current" if self.current else f"differs from this layer-surgery's revision {CODE_REVISION}"
        return f"shipped modelling code: revision {self.revision}{tested} ({state})"

    def warning(self, directory: Path | str) -> str | None:
        """The warning to print when the output's code is not current, else None."""
        if self.current:
            return None
        what = f"is missing {', '.join(self.missing)}" if self.missing else (
            f"is revision {self.revision}, older than this layer-surgery's revision {CODE_REVISION}"
            if self.revision < CODE_REVISION else "differs from the code this layer-surgery ships"
        )
        return (
            f"the modelling code shipped in {directory} {what}; it may compute wrong results with the installed "
            f"transformers (run: surgery update-code {directory})"
        )


def _regular_text(path: Path) -> str | None:
    """A shipped file's text, or None when it is not a regular file (a FIFO is not waited on) or unreadable."""
    try:
        handle, _ = open_regular(path)
        with handle:
            return handle.read().decode("utf-8", errors="replace")
    except OSError:
        return None


def code_status(directory: Path, config: dict[str, object] | None = None) -> CodeStatus | None:
    """Compare a wide-block output's shipped files with the ones this installation ships.

    Reads files as data: runs no code from ``directory``.

    Args:
        directory: a model directory.
        config: its parsed ``config.json`` (read from ``directory`` when not given).

    Returns:
        A :class:`CodeStatus`, or None when the directory is not a wide-block output.

    Example:
        >>> code_status(Path("out/smol-par"))  # doctest: +SKIP
        CodeStatus(revision=2, tested_transformers='>=5.0,<5.25', current=True, missing=())
    """
    if config is None:
        try:  # the checked reader: a FIFO or device named config.json is refused, never waited on
            config = read_json_object(directory / "config.json", "config")
        except OSError:  # CheckpointError included: not a readable config, so not a wide-block output
            return None
    base = config.get(BASE_KEY)
    if not isinstance(base, str):
        return None
    revision = config.get(REVISION_KEY, 1)
    tested = config.get(TESTED_KEY)
    expected = render(base)
    missing = tuple(name for name in expected if not (directory / name).is_file())
    current = not missing and all(_regular_text(directory / name) == text for name, text in expected.items())
    return CodeStatus(
        revision=revision if isinstance(revision, int) and not isinstance(revision, bool) else 1,
        tested_transformers=tested if isinstance(tested, str) else None,
        current=current,
        missing=missing,
    )
