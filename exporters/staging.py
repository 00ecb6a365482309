"""Write into a temporary directory beside the output and rename it into place when complete.

An interrupted or failed run therefore never leaves a half-written output: either the old state
(no OUT, or the previous OUT when ``force`` replaces it) or the complete new one. Beyond that:

* **One writer per OUT.** A lock file beside OUT (``.OUT.surgery.lock`` in its parent, never
  inside it) is held while writing, and removed when done; a second run to the same OUT fails with
  :class:`~surgery.errors.OutputBusyError` instead of waiting or mixing files.
* **What appears meanwhile is left alone.** OUT's identity (device and inode) is recorded when the
  run starts (:func:`check_output`). The new directory is renamed into place only if nothing is
  at OUT (an atomic no-replace rename on Linux) or, with ``force``, only if OUT is still the very
  directory that was there at the start (swapped atomically). Otherwise the run fails with
  :class:`~surgery.errors.OutputChangedError` and touches nothing there.
* **``force`` replaces only what this tool wrote**: an empty directory, a checkpoint holding this
  tool's recipe file, or an ONNX export holding this tool's report beside its graph
  (:func:`why_not_replaceable`). Any other directory is refused with
  :class:`~surgery.errors.OutputNotOursError`, checked at the start and again just before the swap.
* **Debris of killed runs is removed only when provably stale.** The staging directory is
  ``.OUT.partial-PID-RANDOM`` and holds a marker file of this tool naming its pid and host; the
  next run to the same OUT removes it only while holding OUT's lock, with the marker present and
  the owner pid dead on this host. Anything else is never removed.
* **OUT never overlaps what must not change**: the current directory, or the source model.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from surgery.errors import (
    OptionError,
    OutOfSpaceError,
    OutputBusyError,
    OutputChangedError,
    OutputExistsError,
    OutputNotOursError,
    is_disk_full,
)
from surgery.plan import RECIPE_FILENAME

MARKER_FILENAME = ".surgery-staging"
MARKER_TOOL = "layer-surgery"
CONTENT_DIRNAME = "out"
PREVIOUS_DIRNAME = "old"
# What an ONNX export directory of this tool holds (exporters.onnx REPORT_FILENAME, written last, and
# exporters.onnx_session ONNX_FILENAME); spelled out here because exporters.onnx imports this module.
ONNX_REPORT_FILENAME = "onnx-export.json"
ONNX_GRAPH_FILENAME = "model.onnx"

_Identity = tuple[int, int]
# OUT's identity when check_output ran (the start of the run), by absolute path; None: OUT did not exist.
_started: dict[str, _Identity | None] = {}


def lock_path(out: Path) -> Path:
    """The lock file of an output directory: ``.NAME.surgery.lock`` beside it (in its parent).

    Example:
        >>> lock_path(Path("models/small")).as_posix()
        'models/.small.surgery.lock'
    """
    return out.parent / f".{out.name}.surgery.lock"


def _key(out: Path) -> str:
    return os.path.abspath(out)


def _identity(path: Path) -> _Identity | None:
    """``(device, inode)`` of ``path`` itself (a symlink is not followed), or None when nothing is there."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None
    return info.st_dev, info.st_ino


def check_output(out: Path, *, force: bool, protected: tuple[Path, ...] = ()) -> None:
    """Refuse an output that exists (unless ``force``), that another run is writing, or that
    overlaps a path that must not change; record what is at ``out`` now, as the start of the run.

    Args:
        out: the output directory.
        force: replace an existing directory.
        protected: paths that must never be written into or replaced (the source model).

    Raises:
        OutputExistsError: ``out`` exists and ``force`` is False, or it is not a directory.
        OptionError: ``out`` is, contains or lies inside a protected path, or is or contains the
            current directory.
        OutputBusyError: another run holds the lock of ``out``.
    """
    _check(out, force=force, protected=protected)
    if out.parent.is_dir():
        with _locked(out):  # fail fast when another run writes here, and clear debris of killed runs
            _remove_stale(out)
    _started[_key(out)] = _identity(out)


def _check(out: Path, *, force: bool, protected: tuple[Path, ...] = ()) -> None:
    resolved = out.resolve()
    for path in protected:
        source = path.resolve()
        if resolved == source or source in resolved.parents or resolved in source.parents:
            raise OptionError(f"output {out} overlaps the source model {path}; the source is never modified")
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise OptionError(f"output {out} is or contains the current directory; choose a new directory")
    if out.exists() or out.is_symlink():
        if not force or not out.is_dir():
            raise OutputExistsError(str(out))
        _check_replaceable(out)


def why_not_replaceable(out: Path) -> str | None:
    """Why ``force`` may not replace the directory ``out``, or None when it may (an output of this tool).

    It may when ``out`` is a real directory (not a symlink) that is empty, or that holds, as regular
    files, this tool's recipe (``surgery-recipe.yaml``, written into every checkpoint) or an ONNX
    export's report next to its graph (``onnx-export.json`` and ``model.onnx``).

    Example:
        >>> import tempfile, pathlib
        >>> why_not_replaceable(pathlib.Path(tempfile.mkdtemp())) is None  # empty: may be replaced
        True
    """
    try:
        if stat.S_ISLNK(os.lstat(out).st_mode):
            return "it is a symlink"
        with os.scandir(out) as found:
            entries = list(found)
        names = {entry.name for entry in entries if entry.is_file(follow_symlinks=False)}
    except OSError as exc:
        return f"it cannot be examined ({exc.strerror})"
    if not entries or RECIPE_FILENAME in names or {ONNX_REPORT_FILENAME, ONNX_GRAPH_FILENAME} <= names:
        return None
    return f"it is not empty and holds neither {RECIPE_FILENAME} nor an ONNX export's {ONNX_REPORT_FILENAME}"


def _check_replaceable(out: Path) -> None:
    """Refuse to replace a directory this tool did not write (see :func:`why_not_replaceable`)."""
    reason = why_not_replaceable(out)
    if reason is not None:
        raise OutputNotOursError(str(out), reason)


def _hostname() -> str:
    """This host's name, as ``socket.gethostname()`` gives it (without importing socket: 3 ms of start-up)."""
    if hasattr(os, "uname"):
        return os.uname().nodename
    import socket  # pragma: no cover - Windows

    return socket.gethostname()  # pragma: no cover


@contextmanager
def _locked(out: Path) -> Iterator[None]:
    """Hold the lock of ``out`` (never waiting: a held lock is another run writing the same OUT)."""
    path = lock_path(out)
    if os.name != "posix":  # pragma: no cover - exercised on Windows only
        with _filelock(out, path):
            yield
        return
    # POSIX: flock(2) directly, the very lock filelock's UnixFileLock takes (so the two exclude each
    # other), without importing filelock (10 ms of the start-up of every write, issue 13).
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputBusyError(str(out), str(path)) from None
        if os.fstat(fd).st_nlink == 0:  # its holder removed it as we opened it: that run was still writing
            raise OutputBusyError(str(out), str(path))
        try:
            yield
        finally:
            # Removed while still held: a run that opened it meanwhile sees it unlinked (st_nlink 0)
            # and does not count it as acquired, so no two runs ever hold it at once.
            with suppress(OSError):
                path.unlink()
    finally:
        os.close(fd)  # closing releases the flock


@contextmanager
def _filelock(out: Path, path: Path) -> Iterator[None]:
    """:func:`_locked` where flock(2) does not exist, through filelock."""
    from filelock import FileLock, Timeout

    lock = FileLock(str(path), timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise OutputBusyError(str(out), str(path)) from None
    try:
        yield
    finally:
        with suppress(OSError):
            path.unlink()
        lock.release()


@contextmanager
def staged_output(out: Path, *, force: bool) -> Iterator[Path]:
    """Yield a fresh temporary directory next to ``out``; on success it becomes ``out``.

    Args:
        out: the final directory.
        force: replace ``out`` if it exists, and only if it is still the directory that was there
            when :func:`check_output` ran (else when this function was entered).

    Raises:
        OutputExistsError, OptionError, OutputBusyError: as for :func:`check_output`.
        OutputChangedError: something appeared at ``out``, or replaced it, while the run was writing.
        OutOfSpaceError: the disk filled while writing (the partial output is removed first).

    Example:
        >>> import tempfile, pathlib
        >>> out = pathlib.Path(tempfile.mkdtemp()) / "result"
        >>> with staged_output(out, force=False) as tmp:
        ...     _ = (tmp / "a.txt").write_text("done")
        >>> (out / "a.txt").read_text()
        'done'
    """
    _check(out, force=force)
    start = _started.pop(_key(out)) if _key(out) in _started else _identity(out)
    with _full_disk_explained(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        with _locked(out):
            _remove_stale(out)
            work = _make_workdir(out)
            try:
                content = work / CONTENT_DIRNAME
                content.mkdir()
                yield content
                _publish(content, out, start)
            finally:
                shutil.rmtree(work, ignore_errors=True)


@contextmanager
def _full_disk_explained(out: Path) -> Iterator[None]:
    """The OS's bare "No space left on device" (as an ``OSError``, or as safetensors' Rust error says it)
    becomes one line that names the output, the file system and its free space now that the partial
    output is gone."""
    try:
        yield
    except Exception as exc:
        if not is_disk_full(exc):
            raise
        filename = getattr(exc, "filename", None)
        named = Path(os.fsdecode(filename)) if isinstance(filename, str | bytes | os.PathLike) else None
        # A file of this run's own (in the work directory beside OUT) is named by OUT's parent; any other by itself.
        device = out.parent if named is None or named.is_relative_to(out.parent) else named
        raise OutOfSpaceError.measured(str(out), device) from exc


def _make_workdir(out: Path) -> Path:
    """``.NAME.partial-PID-RANDOM`` beside ``out``, with this tool's marker naming its owner."""
    work = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-{os.getpid()}-"))
    marker = {"tool": MARKER_TOOL, "pid": os.getpid(), "host": _hostname(), "out": out.name, "created": time.time()}
    (work / MARKER_FILENAME).write_text(json.dumps(marker) + "\n")
    return work


def _publish(content: Path, out: Path, start: _Identity | None) -> None:
    """Move ``content`` to ``out``: into a free place, or swapped with the directory that was at
    ``out`` when the run started (``start``); anything else there stays untouched."""
    now = _identity(out)
    if start is None or now is None:
        if now is not None:
            raise OutputChangedError(str(out), "appeared")
        _rename_noreplace(content, out)
        return
    if now != start:
        raise OutputChangedError(str(out), "was replaced by another directory")
    _check_replaceable(out)  # still an output of this tool (or empty) right before it is replaced
    if _renameat2(content, out, _RENAME_EXCHANGE):  # atomic swap: OUT is never missing
        if _identity(content) != start:  # swapped for something else in between: swap back
            try:
                _renameat2(content, out, _RENAME_EXCHANGE)
            except OSError:
                _keep(content, out)
                raise
            raise OutputChangedError(str(out), "was replaced by another directory")
        return
    previous = content.parent / PREVIOUS_DIRNAME  # no atomic swap here: move the old one aside first
    os.rename(out, previous)
    try:
        if _identity(previous) != start:
            raise OutputChangedError(str(out), "was replaced by another directory")
        _rename_noreplace(content, out)
    except BaseException:
        try:
            _rename_noreplace(previous, out)
        except (OSError, OutputChangedError):  # OUT is occupied again: keep what was moved, never delete it
            _keep(previous, out)
        raise


def _keep(moved: Path, out: Path) -> None:
    """Move a directory that was at ``out`` out of the work directory (which is removed) into
    ``.NAME.kept-...`` beside it, which carries no marker and is never removed by this tool."""
    keep = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.kept-"))
    os.rename(moved, keep / out.name)
    sys.stderr.write(f"surgery: warning: the directory that was at {out} is kept in {keep / out.name}\n")


_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2
_UNSUPPORTED = {errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP}


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux ``renameat2``; False when this system or file system does not offer it (OSError otherwise)."""
    if not sys.platform.startswith("linux"):
        return False
    function = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if function is None:
        return False
    if function(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    code = ctypes.get_errno()
    if code in _UNSUPPORTED:
        return False
    raise OSError(code, os.strerror(code), str(src), None, str(dst))


def _rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst`` unless something is at ``dst`` (then OutputChangedError, nothing moved)."""
    try:
        if _renameat2(src, dst, _RENAME_NOREPLACE):
            return
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise OutputChangedError(str(dst), "appeared") from None
        raise
    if os.path.lexists(dst):  # no atomic no-replace rename on this system: check, then rename
        raise OutputChangedError(str(dst), "appeared")
    os.rename(src, dst)


def _remove_stale(out: Path) -> None:
    """Remove staging directories of runs to ``out`` that were killed; call only with OUT's lock held.

    A directory is removed only if its name is ``.NAME.partial-PID-...``, it is a real directory,
    it holds this tool's marker naming the same pid, this host and this OUT, and that pid is dead.
    A previous OUT that a killed run had moved aside (no atomic swap) is put back first when OUT is free.
    """
    prefix = f".{out.name}.partial-"
    try:
        entries = list(os.scandir(out.parent))
    except OSError:
        return
    for entry in entries:
        if not entry.name.startswith(prefix) or not entry.is_dir(follow_symlinks=False):
            continue
        pid_text = entry.name[len(prefix):].split("-", 1)[0]
        if not pid_text.isdigit():
            continue
        work = Path(entry.path)
        marker = _read_marker(work / MARKER_FILENAME)
        if marker is None or marker.get("tool") != MARKER_TOOL or marker.get("pid") != int(pid_text):
            continue
        if marker.get("host") != _hostname() or marker.get("out") != out.name:
            continue
        if _alive(int(pid_text)):
            continue
        previous = work / PREVIOUS_DIRNAME
        if previous.is_dir() and not previous.is_symlink() and not os.path.lexists(out):
            with suppress(OSError, OutputChangedError):
                _rename_noreplace(previous, out)
        if os.path.lexists(previous):  # could not be put back: keep it, and the marker goes so it stays
            (work / MARKER_FILENAME).unlink(missing_ok=True)
            continue
        shutil.rmtree(work, ignore_errors=True)


def _read_marker(path: Path) -> dict[str, object] | None:
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _alive(pid: int) -> bool:
    """Whether a process with this pid exists (ours counts; an unknown answer counts as alive)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    return True
