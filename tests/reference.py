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
from transformers.cache_utils import Cache

from surgery.compat import CACHE_NAMES, output_cache, with_cache


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
    follow_positions(ref, list(layers))
    return ref.eval()


def follow_positions(model: Any, sources: Sequence[int]) -> None:
    """Make every per-layer config list of ``model`` follow the new positions (``sources[j]`` at position j)."""
    config: Any = model.config.get_text_config()
    n = config.num_hidden_layers
    for key, value in list(vars(config).items()):
        if isinstance(value, list) and len(value) == n and key != "architectures":
            setattr(config, key, [value[i] for i in sources])
    config.num_hidden_layers = len(sources)


class ParallelReference(torch.nn.Module):
    """The reference of one parallel group: the K original layers run on the same input, averaged.

    ``mlp_input="exact"`` is the definition, ``h' = (1/K) * sum_k L_k(h)``, calling each original
    layer whole. ``"shared"`` is the approximation, built from the layers' own submodules (pre-norm
    decoders): ``u = h + (1/K) * sum_k attn_k(norm_k(h))``, ``h' = u + (1/K) * sum_k mlp_k(norm'_k(u))``.
    """

    def __init__(self, layers: Sequence[torch.nn.Module], mlp_input: str = "exact") -> None:
        super().__init__()
        self.branches = torch.nn.ModuleList(layers)
        self.mlp_input = mlp_input
        self.attention_type = getattr(layers[0], "attention_type", None)

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if any(kwargs.get(name) is not None for name in CACHE_NAMES) or any(isinstance(a, Cache) for a in args):
            raise NotImplementedError("the parallel reference runs without a KV cache (use_cache=False)")
        k = len(self.branches)
        if self.mlp_input == "exact":
            outs = [layer(hidden_states, *args, **kwargs) for layer in self.branches]
            if isinstance(outs[0], tuple):  # GPT-2 style blocks return (hidden, ...)
                return (sum(out[0] for out in outs) / k, *outs[0][1:])
            return sum(outs) / k
        branches: list[Any] = list(self.branches)
        attn = sum(layer.self_attn(layer.input_layernorm(hidden_states), **kwargs)[0] for layer in branches) / k
        mixed = hidden_states + attn
        return mixed + sum(layer.mlp(layer.post_attention_layernorm(mixed)) for layer in branches) / k


def parallel_reference_model(model: torch.nn.Module, plan: Any) -> Any:
    """A deep copy of ``model`` running ``plan`` (a :class:`surgery.plan.Plan`, groups allowed) in memory.

    Plain steps are copies of the original layers; a group ``[i-j]xR`` is a
    :class:`ParallelReference` over copies of layers i..j, applied R times (one module object,
    weights shared). Per-layer config lists follow the positions. Run it with ``use_cache=False``.
    """
    from surgery.plan import ParallelGroup

    ref = copy.deepcopy(model)
    parent, attr = layer_stack(ref)
    original = getattr(parent, attr)
    blocks: list[torch.nn.Module] = []
    sources: list[int] = []
    for step in plan.layers:
        if isinstance(step, ParallelGroup):
            group = ParallelReference([copy.deepcopy(original[i]) for i in step.layers], step.mlp_input)
            blocks.extend([group] * step.loop)
            sources.extend([step.layers[0]] * step.loop)
        else:
            blocks.append(copy.deepcopy(original[step]))
            sources.append(step)
    setattr(parent, attr, torch.nn.ModuleList(blocks))
    follow_positions(ref, sources)
    return ref.eval()


def cached_logits(model: Any, ids: torch.Tensor, prefix: int) -> torch.Tensor:
    """Logits of ``ids`` computed as a prefill of ``prefix`` tokens, then one token at a time with the KV cache.

    Every cache test compares this with one uncached forward over the same ids.
    """
    with torch.no_grad():
        step = model(input_ids=ids[:, :prefix], use_cache=True)
        pieces, cache = [step.logits], output_cache(step)
        for t in range(prefix, ids.shape[1]):
            step = model(**with_cache(model, cache, input_ids=ids[:, t : t + 1], use_cache=True))
            pieces.append(step.logits)
            cache = output_cache(step)
    return torch.cat(pieces, dim=1)
