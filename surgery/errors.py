"""Every error `surgery` raises on purpose.

Each class subclasses the builtin it refines (so `except ValueError` still works in a
pipeline) and :class:`SurgeryError`, which carries a ``hint``: the one-line fix that the CLI
prints after the message. Anything that is not a ``SurgeryError`` is a bug in this tool and is
shown with its traceback.
"""

from __future__ import annotations

import errno
import shutil
from contextlib import suppress
from pathlib import Path


class SurgeryError(Exception):
    """Base of all errors raised on purpose; ``hint`` says how to fix the input."""

    hint: str | None = None

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        if hint is not None:
            self.hint = hint

    def one_line(self) -> str:
        """The message and the hint on one line, as the CLI prints them."""
        text = " ".join(str(self).split())
        return f"{text} ({self.hint})" if self.hint else text


class PlanError(SurgeryError, ValueError):
    """A layer plan that cannot be applied to this model."""


class RangeSyntaxError(PlanError):
    """A layer range that does not parse, such as ``10-``, ``20-10`` or ``a-b``."""

    def __init__(self, text: str, reason: str) -> None:
        self.text = text
        self.reason = reason
        super().__init__(
            f"malformed layer range {text!r}: {reason}",
            hint="write 0-based inclusive ranges such as '10-20' or '3,7,10-12'",
        )


class LayerIndexError(PlanError, IndexError):
    """A layer index outside ``0 .. num_layers - 1``."""

    def __init__(self, index: int, num_layers: int) -> None:
        self.index = index
        self.num_layers = num_layers
        super().__init__(
            f"layer {index} is out of range: the model has {num_layers} layers (0-{num_layers - 1})"
        )


class EmptyPlanError(PlanError):
    """A plan that leaves no layer at all."""

    def __init__(self, what: str) -> None:
        super().__init__(f"{what} leaves no layers", hint="keep at least one layer")


class RecipeError(SurgeryError, ValueError):
    """A recipe file that is missing, malformed or made for another model."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"recipe {path}: {reason}")


class ModelNotFoundError(SurgeryError, FileNotFoundError):
    """The MODEL argument names no local checkpoint and no Hub repository."""

    def __init__(self, source: str, reason: str) -> None:
        self.source = source
        super().__init__(f"model {source!r}: {reason}")


class CheckpointError(SurgeryError, OSError):
    """A checkpoint whose files are missing, corrupt or inconsistent with its config."""

    def __init__(self, path: str, reason: str, *, hint: str | None = None) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}", hint=hint)


class PickleRefusedError(SurgeryError, PermissionError):
    """A pickle checkpoint (``.bin``/``.pt``), refused because unpickling can run code."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(
            f"{path} holds pickle weights, which can run code when loaded; refused",
            hint="pass --allow-pickle (allow_pickle=True) to load them with torch weights_only=True",
        )


class UnsupportedArchitectureError(SurgeryError, NotImplementedError):
    """A model whose layer stack cannot be found, or whose config cannot follow a plan."""

    def __init__(self, model_type: str, reason: str, *, hint: str | None = None) -> None:
        self.model_type = model_type
        self.reason = reason
        super().__init__(f"architecture {model_type!r}: {reason}", hint=hint)


class OutputExistsError(SurgeryError, FileExistsError):
    """The output directory exists and ``force`` was not given."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(f"output {path} already exists", hint="choose a new path or pass --force to replace it")


class OptionError(SurgeryError, ValueError):
    """An option value that is not allowed, such as an unknown dtype or a bad shard size."""


class ParallelGroupError(PlanError):
    """A parallel group that cannot be part of a plan: one layer, overlapping, past the end, loop < 1."""

    def __init__(self, group: str, reason: str, *, hint: str | None = None) -> None:
        self.group = group
        self.reason = reason
        super().__init__(
            f"parallel group {group}: {reason}",
            hint=hint or "write groups of two or more consecutive layers, e.g. --groups 10-13,14-17 (0-based, inclusive)",
        )


class ParallelMergeError(UnsupportedArchitectureError):
    """A model whose layers cannot be merged exactly into one wide block (see ``surgery.widen``)."""

    def __init__(self, model_type: str, reason: str, *, group: str | None = None, hint: str | None = None) -> None:
        self.group = group
        where = f"cannot merge {group} into one wide block: " if group else "cannot merge layers into a wide block: "
        super().__init__(model_type, where + reason, hint=hint)


class DataError(SurgeryError, ValueError):
    """A text set that cannot be measured on: unreadable, empty, too short, or malformed JSON lines."""

    def __init__(self, source: str, reason: str, *, hint: str | None = None) -> None:
        self.source = source
        self.reason = reason
        super().__init__(f"text {source}: {reason}", hint=hint)


class TokenizerMismatchError(SurgeryError, ValueError):
    """Two models that do not share a tokenizer and vocabulary, so their predictions cannot be compared."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(
            f"ORIGINAL and NEW cannot be compared: {reason}",
            hint="compare a model with a checkpoint this tool wrote from it, which keeps its tokenizer",
        )


# -- the Hub (issue #5): push, model card, Hub sources -------------------------------------------


class RepoIdError(SurgeryError, ValueError):
    """A Hub repository id that the Hub would refuse, such as ``a//b`` or ``-name``."""

    def __init__(self, repo_id: str, reason: str) -> None:
        self.repo_id = repo_id
        self.reason = reason
        super().__init__(
            f"invalid Hub repo id {repo_id!r}: {reason}",
            hint="write NAME or NAMESPACE/NAME with letters, digits, '-', '_' and '.'",
        )


class NotAModelDirectoryError(SurgeryError, FileNotFoundError):
    """The directory to push is not a model directory (no config.json or no safetensors weights)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path} is not a model directory: {reason}", hint="push the OUT directory a surgery wrote")


class NotWideBlockError(SurgeryError, ValueError):
    """A directory that is not a wide-block output of this tool (``surgery update-code`` needs one)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(
            f"{path} is not a wide-block output of layer-surgery: {reason}",
            hint="update-code re-ships the modelling code of outputs written by `surgery parallel`",
        )


class ModelCardError(SurgeryError, ValueError):
    """A model card (README.md) that is missing or does not parse, or a validation report of the wrong shape."""

    def __init__(self, path: str, reason: str, *, hint: str | None = None) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"model card {path}: {reason}", hint=hint)


class UnvalidatedOutputError(SurgeryError, ValueError):
    """An output that push refuses to publish: its card records no validation, a missed gate, or other weights."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(
            f"{path} is not published: {reason}",
            hint="run 'surgery validate ORIGINAL OUT' (or add --validate to the writing command) first; "
            "--allow-unvalidated (allow_unvalidated=True) publishes it anyway",
        )


class HubAuthError(SurgeryError, PermissionError):
    """The Hub needs a token that is missing, or refused the one given (never shown in the message)."""

    def __init__(self, repo_id: str, reason: str, *, status: int | None = None, hint: str | None = None) -> None:
        self.repo_id = repo_id
        self.reason = reason
        self.status = status
        super().__init__(f"Hub repo {repo_id}: {reason}", hint=hint)


class MissingTokenError(HubAuthError):
    """No token in ``--token``/``token=``, ``HF_TOKEN`` or the stored login, and the operation needs one."""

    def __init__(self, repo_id: str, what: str = "pushing") -> None:
        super().__init__(
            repo_id, f"{what} needs a Hugging Face token and none was found",
            hint="set HF_TOKEN, run 'hf auth login', or pass --token",
        )


class RejectedTokenError(HubAuthError):
    """The Hub answered 401/403: the token is invalid, or lacks write access to the namespace."""

    def __init__(self, repo_id: str, status: int, reason: str) -> None:
        super().__init__(
            repo_id, reason, status=status,
            hint="check the token (a write token for this namespace) in HF_TOKEN, 'hf auth login' or --token",
        )


class HubRevisionError(SurgeryError, LookupError):
    """A branch or revision that does not exist in the Hub repository."""

    def __init__(self, repo_id: str, revision: str) -> None:
        self.repo_id = repo_id
        self.revision = revision
        super().__init__(
            f"Hub repo {repo_id} has no revision {revision!r}",
            hint="push to an existing branch, or create it first (hf repo branch create)",
        )


class HubPushError(SurgeryError, ConnectionError):
    """A push that the Hub or the network stopped; nothing was committed, and re-running resumes it."""

    def __init__(self, repo_id: str, reason: str) -> None:
        self.repo_id = repo_id
        self.reason = reason
        super().__init__(
            f"push to {repo_id} failed: {reason}; nothing was committed",
            hint="run the same push again: files that already arrived are not sent twice",
        )


class OnnxExportError(SurgeryError, RuntimeError):
    """A model that ``torch.onnx`` cannot trace, lower or save (``stage`` says which step failed)."""

    def __init__(self, model_type: str, stage: str, reason: str) -> None:
        self.model_type = model_type
        self.stage = stage
        self.reason = reason
        super().__init__(
            f"cannot export architecture {model_type!r} to ONNX ({stage} failed): {reason}",
            hint="nothing was written; run with --debug for the traceback",
        )


class OnnxOpsetError(OptionError):
    """An ONNX opset outside what the exporter supports."""

    def __init__(self, opset: int, minimum: int, maximum: int) -> None:
        self.opset = opset
        self.minimum = minimum
        self.maximum = maximum
        reason = "too old" if opset < minimum else "newer than the installed torch.onnx and onnx support"
        super().__init__(f"opset {opset} is {reason}", hint=f"choose an opset from {minimum} to {maximum}")


class OnnxValidationError(SurgeryError, RuntimeError):
    """ONNX Runtime disagrees with PyTorch beyond the stated bound; nothing was written."""

    def __init__(self, check: str, max_abs_diff: float | None, tolerance: float | None, provider: str, detail: str = "") -> None:
        self.check = check
        self.max_abs_diff = max_abs_diff
        self.tolerance = tolerance
        self.provider = provider
        numbers = f": max |diff| {max_abs_diff:.3g} > {tolerance:.3g}" if max_abs_diff is not None and tolerance is not None else ""
        super().__init__(
            f"ONNX validation failed on {provider}, {check}{numbers} {detail}".rstrip(),
            hint="nothing was written; --no-validate writes the graph anyway",
        )


class CudaUnavailableError(SurgeryError, RuntimeError):
    """CUDA was asked for, but ONNX Runtime cannot run on it here (``reason`` names what is missing)."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"CUDA requested but unavailable: {reason}", hint="or run with --device cpu")


# -- your files (issue #12): the output directory is never mixed up with anything else ----------


class OutputBusyError(SurgeryError, BlockingIOError):
    """Another run is writing the same output directory now (its lock beside OUT is held)."""

    def __init__(self, path: str, lock: str) -> None:
        self.path = path
        self.lock = lock
        super().__init__(
            f"output {path} is being written by another run (lock {lock} is held)",
            hint="wait for it to finish, or choose another output directory",
        )


class OutOfSpaceError(SurgeryError, OSError):
    """The disk filled while an output was being written (the OS's "No space left on device"); the
    partial output was removed. ``errno`` stays ``ENOSPC``, so ``except OSError`` still sees it."""

    def __init__(self, path: str, device_path: str, free: int | None, *,
                 hint: str = "free space there, or choose an output directory on another file system") -> None:
        self.path = path
        self.device_path = device_path
        self.free = free
        now = "" if free is None else f" ({free / 1e9:.1f} GB free there now)" if free >= 1e9 else f" ({free / 1e6:.1f} MB free there now)"
        super().__init__(
            f"no space left on the file system of {device_path} while writing {path}{now}; nothing was written",
            hint=hint,
        )
        self.errno = errno.ENOSPC

    @classmethod
    def measured(cls, path: str, device_path: Path, **kwargs: str) -> OutOfSpaceError:
        """The error with the free space of ``device_path``'s file system measured now.

        Args:
            path: what was being written (the output, or the cache entry).
            device_path: a path on the file system that filled; measured at its nearest existing ancestor.
            **kwargs: ``hint``, to replace the default fix.

        Returns:
            The error, ``free`` None if the file system's usage cannot be read.

        Example:
            >>> OutOfSpaceError.measured("out/x", Path("/")).errno
            28
        """
        free = None
        existing = next((p for p in (device_path, *device_path.parents) if p.exists()), None)
        if existing is not None:
            with suppress(OSError):
                free = shutil.disk_usage(existing).free
        return cls(path, str(device_path), free, **kwargs)


def is_disk_full(exc: BaseException) -> bool:
    """Whether ``exc`` is the OS's "No space left on device", not yet explained by an :class:`OutOfSpaceError`.

    Args:
        exc: any exception.

    Returns:
        True for an ``OSError`` with errno ENOSPC, and for the same error as a Rust library reports it
        (safetensors' ``SafetensorError`` says "... (os error 28)", and is no ``OSError``).

    Example:
        >>> is_disk_full(OSError(28, "No space left on device")), is_disk_full(OSError(5, "I/O error"))
        (True, False)
    """
    if isinstance(exc, SurgeryError):
        return False
    if isinstance(exc, OSError):
        return exc.errno == errno.ENOSPC
    return f"(os error {errno.ENOSPC})" in str(exc)


class OutputChangedError(SurgeryError, FileExistsError):
    """Something appeared at, or replaced, the output path while this run was writing; it was left alone."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(
            f"output {path} {reason} while this run was writing; it was left untouched and nothing was written",
            hint="run again once nothing else writes there, or choose another output directory",
        )


class OutputNotOursError(OutputExistsError):
    """``force`` was given, but the directory at the output path is not one this tool wrote (nor empty)."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        SurgeryError.__init__(
            self,
            f"output {path} was not written by layer-surgery ({reason}); --force replaces only an empty "
            "directory or an earlier output of this tool",
            hint="choose another output directory, or empty or remove this one yourself",
        )
