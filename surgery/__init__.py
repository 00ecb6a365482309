"""layer-surgery: rewrite transformer checkpoints into new physical models.

The stages, in the order a plan flows through them:

* :mod:`surgery.plan` — :class:`Plan` (which source layers, in which order) and :class:`Recipe`;
* :mod:`surgery.source` — a MODEL argument as a local safetensors directory;
* :mod:`surgery.architecture` — the layer stack and the config, derived from the model itself;
* :mod:`surgery.engine` — executes any plan, streaming tensors;
* :mod:`surgery.widen` — parallel groups merged into wide blocks;
* :mod:`exporters.safetensors` — writes the shards.

Importing this package imports nothing but the standard library and :mod:`surgery.version` (the
version string, a module without imports): every public name is loaded from its module on first use
(PEP 562), so ``import surgery.errors`` or ``import exporters.staging`` never pulls in the API, and
``surgery --help`` never pulls in torch. Type checkers read the
``TYPE_CHECKING`` imports below and see the real types.

Example:
    >>> import surgery
    >>> result = surgery.prune(None, "out/smol-19", drop="10-20")  # doctest: +SKIP
"""

import importlib
import importlib.util
import sys
import types
from typing import TYPE_CHECKING

from surgery.version import __version__ as __version__  # the one version string, on the ground floor

if TYPE_CHECKING:
    from exporters.hub import PushResult, push
    from exporters.onnx import OnnxExportResult, export_onnx, validate_onnx
    from exporters.onnx_runtime import Generation, generate
    from surgery.analyze import AnalysisReport, analyze
    from surgery.api import (
        HealOptions,
        ModelInfo,
        Options,
        apply,
        heal,
        inspect,
        parallel,
        prune,
        reorder,
        repeat,
        update_code,
        validate,
    )
    from surgery.engine import SurgeryResult
    from surgery.errors import SurgeryError
    from surgery.healing import HealReport
    from surgery.loading import MeasureOptions
    from surgery.plan import Plan, Recipe, WriteOptions
    from surgery.report import ValidationReport
    from surgery.sweep import SweepReport, sweep
    from surgery.view import plan_view

__all__ = [
    "ModelInfo", "Options", "Plan", "Recipe", "SurgeryError", "SurgeryResult", "WriteOptions",
    "apply", "inspect", "parallel", "prune", "reorder", "repeat", "update_code",
    "HealOptions", "HealReport", "heal",
    "PushResult", "push",
    "Generation", "OnnxExportResult", "export_onnx", "generate", "validate_onnx",
    "AnalysisReport", "MeasureOptions", "SweepReport", "ValidationReport", "analyze", "plan_view", "sweep", "validate",
]

# Where each public name lives: the one table __getattr__ reads (tests/test_imports.py checks it
# against __all__ and the TYPE_CHECKING imports above).
_EXPORTS: dict[str, str] = {
    **dict.fromkeys(("HealOptions", "ModelInfo", "Options", "apply", "heal", "inspect", "parallel", "prune", "reorder",
                     "repeat", "update_code", "validate"), "surgery.api"),
    "HealReport": "surgery.healing",
    **dict.fromkeys(("Plan", "Recipe", "WriteOptions"), "surgery.plan"),
    "SurgeryError": "surgery.errors",
    "SurgeryResult": "surgery.engine",
    "MeasureOptions": "surgery.loading",
    "ValidationReport": "surgery.report",
    **dict.fromkeys(("AnalysisReport", "analyze"), "surgery.analyze"),
    **dict.fromkeys(("SweepReport", "sweep"), "surgery.sweep"),
    "plan_view": "surgery.view",  # imports torch
    **dict.fromkeys(("PushResult", "push"), "exporters.hub"),
    **dict.fromkeys(("OnnxExportResult", "export_onnx", "validate_onnx"), "exporters.onnx"),
    **dict.fromkeys(("Generation", "generate"), "exporters.onnx_runtime"),
}

# Names that are both a submodule and a public function: ``surgery.validate`` is the function
# (:func:`surgery.api.validate`, which records into the card; the module holds the measuring one).
_FUNCTION_OVER_MODULE = frozenset(
    name for name in _EXPORTS if importlib.util.find_spec(f"{__name__}.{name}") is not None
)


def __getattr__(name: str) -> object:
    """A public name, imported from its module on first use (and kept); any other submodule by name."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        # ``import surgery; surgery.plan.parse_ranges`` worked while this package imported everything.
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """This package's module type: the import system binds every submodule it loads as an attribute of
    its package, which would turn ``surgery.validate`` into the module once anything imported
    ``surgery.validate``; the public function keeps the name instead (as when this package imported
    everything eagerly). ``sys.modules["surgery.validate"]`` is the module, as always."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _FUNCTION_OVER_MODULE and isinstance(value, types.ModuleType):
            value = getattr(importlib.import_module(_EXPORTS[name]), name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
