"""layer-surgery: rewrite transformer checkpoints into new physical models.

The stages, in the order a plan flows through them:

* :mod:`surgery.plan` — :class:`Plan` (which source layers, in which order) and :class:`Recipe`;
* :mod:`surgery.source` — a MODEL argument as a local safetensors directory;
* :mod:`surgery.architecture` — the layer stack and the config, derived from the model itself;
* :mod:`surgery.engine` — executes any plan, streaming tensors;
* :mod:`exporters.safetensors` — writes the shards.

Example:
    >>> import surgery
    >>> result = surgery.prune(None, "out/smol-19", drop="10-20")  # doctest: +SKIP
"""

from surgery.api import ModelInfo, Options, apply, inspect, prune, reorder, repeat
from surgery.engine import SurgeryResult
from surgery.errors import SurgeryError
from surgery.plan import Plan, Recipe, WriteOptions

__all__ = [
    "ModelInfo", "Options", "Plan", "Recipe", "SurgeryError", "SurgeryResult", "WriteOptions",
    "apply", "inspect", "prune", "reorder", "repeat",
]
__version__ = "0.1.0"
