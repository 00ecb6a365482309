"""Configuration of a parallel-merged model written by layer-surgery (``surgery parallel``).

It is the base architecture's own config class plus the layer plan. ``num_hidden_layers`` counts
layer *applications* (a group looped three times counts three: one KV-cache slot each), and
per-layer lists such as ``layer_types`` have one entry per application. The plan itself:

* ``surgery_plan``: the plan in layer-surgery's range syntax, e.g. ``0-9,[10-13]x3,14-29``
  (source layer indices; ``[a-b]`` a parallel group, ``xR`` looped, ``:shared`` the approximation);
* ``surgery_steps``: the same plan as a list, one entry per step: ``{"sources": [10, 11, 12, 13],
  "loop": 3, "mlp_input": "exact"}`` for a group, ``{"sources": [4]}`` for a plain layer;
* ``surgery_base_model_type``: the architecture the blocks derive from (also in ``BASE_MODEL_TYPE``).
"""

from typing import Any

from transformers.models.auto.configuration_auto import CONFIG_MAPPING

# The architecture this model derives from; layer-surgery rewrites this line when it ships the file.
BASE_MODEL_TYPE = "llama"

_BaseConfig: Any = CONFIG_MAPPING[BASE_MODEL_TYPE]


class ParallelConfig(_BaseConfig):
    """The base architecture's config with ``surgery_plan``, ``surgery_steps`` and ``surgery_base_model_type``."""

    model_type = "surgery_parallel"
