"""Every error `surgery` raises on purpose.

Each class subclasses the builtin it refines (so `except ValueError` still works in a
pipeline) and :class:`SurgeryError`, which carries a ``hint``: the one-line fix that the CLI
prints after the message. Anything that is not a ``SurgeryError`` is a bug in this tool and is
shown with its traceback.
"""

from __future__ import annotations


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
