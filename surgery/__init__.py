"""layer-surgery: rewrite transformer checkpoints into new physical models.

The stages, in the order a plan flows through them:

* :mod:`surgery.plan` — :class:`Plan` (which source layers, in which order) and :class:`Recipe`;
* :mod:`surgery.source` — a MODEL argument as a local safetensors directory;
* :mod:`surgery.architecture` — the layer stack and the config, derived from the model itself;
* :mod:`surgery.engine` — executes any plan, streaming tensors;
* :mod:`surgery.widen` — parallel groups merged into wide blocks;
* :mod:`exporters.safetensors` — writes the shards.

Example:
    >>> import surgery
    >>> result = surgery.prune(None, "out/smol-19", drop="10-20")  # doctest: +SKIP
"""

from typing import Any

from surgery.analyze import AnalysisReport, analyze
from surgery.api import ModelInfo, Options, apply, inspect, parallel, prune, reorder, repeat, update_code
from surgery.engine import SurgeryResult
from surgery.errors import SurgeryError
from surgery.plan import Plan, Recipe, WriteOptions
from surgery.sweep import SweepReport, sweep
from surgery.validate import MeasureOptions, ValidationReport, validate

__all__ = [
    "ModelInfo", "Options", "Plan", "Recipe", "SurgeryError", "SurgeryResult", "WriteOptions",
    "apply", "inspect", "parallel", "prune", "reorder", "repeat", "update_code",
    "PushResult", "push",
    "Generation", "OnnxExportResult", "export_onnx", "generate", "validate_onnx",
    "AnalysisReport", "MeasureOptions", "SweepReport", "ValidationReport", "analyze", "plan_view", "sweep", "validate",
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """``surgery.push`` and ``surgery.PushResult`` live in :mod:`exporters.hub`, which imports this
    package: they are loaded on first use, so that importing either side first works."""
    if name in ("push", "PushResult"):
        from exporters import hub

        return getattr(hub, name)
    if name in ("export_onnx", "validate_onnx", "OnnxExportResult"):  # ONNX export: loaded on first use
        from exporters import onnx

        return getattr(onnx, name)
    if name in ("generate", "Generation"):  # the ONNX Runtime runner: loaded on first use
        from exporters import onnx_runtime

        return getattr(onnx_runtime, name)
    if name == "plan_view":  # surgery.view imports torch: loaded on first use
        from surgery.view import plan_view

        return plan_view
    raise AttributeError(f"module 'surgery' has no attribute {name!r}")
