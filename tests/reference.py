"""The reference every rewrite is tested against: the original model's own layer modules, run in
the plan's order in memory.

It is written independently of the engine (no tensor renaming, no config file rewriting):
the layer list is replaced by copies of the original blocks, each told its new position
(``layer_idx``, used by the KV cache), and per-layer config lists follow their layers.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch


def layer_stack(model: torch.nn.Module) -> tuple[torch.nn.Module, str]:
    """(parent module, attribute name) of the largest ModuleList of num_hidden_layers blocks."""
    n = model.config.get_text_config().num_hidden_layers
    best = None
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, path)
    assert best is not None, "no layer stack"
    parent_path, _, attr = best[1].rpartition(".")
    return model.get_submodule(parent_path), attr


def reference_model(model: torch.nn.Module, layers: Sequence[int]) -> Any:
    """A deep copy of ``model`` whose layer stack is ``[original[i] for i in layers]``."""
    ref = copy.deepcopy(model)
    parent, attr = layer_stack(ref)
    original = getattr(parent, attr)
    blocks = torch.nn.ModuleList(copy.deepcopy(original[i]) for i in layers)
    for position, block in enumerate(blocks):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = position
    setattr(parent, attr, blocks)
    config = ref.config.get_text_config()
    n = config.num_hidden_layers
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == n and key != "architectures":
            setattr(config, key, [value[i] for i in layers])
    config.num_hidden_layers = len(layers)
    return ref.eval()
