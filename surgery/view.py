"""Run a plan over one loaded model in memory: no checkpoint written, no weight copied.

A *plan view* swaps the model's layer stack (the ``nn.ModuleList`` that
:func:`surgery.architecture.detect` finds) for a list of the *same* block objects in plan order,
and makes the config describe the new stack (layer count, per-layer lists such as
``layer_types``), exactly as the streaming engine rewrites ``config.json``. A layer that the plan
repeats is one module object at several positions: its weights are shared, but each position
must write its own KV-cache slot, so every position is wrapped in a :class:`PlanStep` that sets
the ``layer_idx`` of the block's attention modules to the position just before calling it.

A parallel group ``[i-j]xR`` (Sun et al. 2024, "Transformer Layers as Painters") takes R positions,
each a :class:`ParallelStep` that calls the K original blocks on the same input and averages
their outputs, ``h' = (1/K) * sum_k L_k(h)``: the definition, as the independent reference in the
tests (``tests/reference.py``, which checks both this view and the wide-block checkpoints of
:mod:`surgery.widen`) computes it too. Each branch of each application writes its
own KV-cache slot: branch 0 the position's slot, the others slots after the last position, which
the step adds to a ``DynamicCache`` when it first runs.

Leaving the :func:`plan_view` context restores the stack, the config and every ``layer_idx``, so
one loaded model serves any number of plans (:mod:`surgery.sweep`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from surgery.architecture import Architecture, _find_stack, layer_fields
from surgery.errors import ParallelGroupError, PlanError
from surgery.plan import ParallelGroup, Plan

# Multimodal and encoder-decoder configs keep the language model's settings in one of these
# sub-configs (transformers' get_text_config returns text_config, decoder, generator or text_encoder).
_TEXT_CONFIG_KEYS = ("text_config", "language_config", "llm_config", "decoder", "generator", "text_encoder")


class _ViewStep(torch.nn.Module):
    """A position of a plan view. Attribute lookups it does not answer go to its (first) source
    block, so code that reads ``layers[i].self_attn`` or ``.attention_type`` keeps working."""

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules") or {}
            if "block" in modules:
                return getattr(modules["block"], name)
            if "branches" in modules:
                return getattr(modules["branches"][0], name)
            raise


class PlanStep(_ViewStep):
    """One position of a plan view: a source block, run as the layer at ``position``.

    The block is the original module object (shared with every other position that runs the same
    source layer). Attribute lookups that the wrapper does not answer go to the block, so code
    that reads ``layers[i].self_attn`` keeps working under a view.

    Attributes:
        block: the source layer module.
        position: the index of this layer in the view; the KV cache slot it writes.
        source_index: the block's index in the source model.
    """

    block: torch.nn.Module
    position: int
    source_index: int

    def __init__(self, block: torch.nn.Module, position: int, source_index: int) -> None:
        super().__init__()
        self.block = block
        self.position = position
        self.source_index = source_index
        self._indexed = _indexed_modules(block)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        _point_at(self._indexed, self.position)
        return self.block(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"position={self.position}, source={self.source_index}"


def _indexed_modules(block: torch.nn.Module) -> list[torch.nn.Module]:
    """The block's modules that address the KV cache by their ``layer_idx`` (attention, mostly)."""
    return [m for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)]


def _point_at(modules: list[torch.nn.Module], slot: int) -> None:
    for module in modules:
        setattr(module, "layer_idx", slot)  # noqa: B010 (Module types its attributes as tensors)


class ParallelStep(_ViewStep):
    """One application of a parallel group in a plan view: K source blocks on one input, averaged.

    ``mlp_input="exact"`` computes the definition, ``h' = (1/K) * sum_k L_k(h)``, by calling each
    original block whole (for post-norm encoders such as BERT that is the average of the blocks'
    normalised outputs). ``"shared"`` is the approximation of the "layer parallelism" line of work,
    built from the blocks' own submodules (pre-norm decoders): ``u = h + (1/K) * sum_k attn_k(norm_k(h))``,
    ``h' = u + (1/K) * sum_k mlp_k(norm'_k(u))``.

    Attributes:
        branches: the K source blocks (the original module objects).
        group: the plan's group.
        position: the position of this application in the view.
        slots: the KV-cache slot of each branch: ``position`` for the first, slots after the
            view's last position for the others.
        attention_type: the branches' common attention type (the mask the model passes in).
    """

    def __init__(
        self,
        blocks: torch.nn.ModuleList,
        group: ParallelGroup,
        position: int,
        slots: list[int],
        cache_growth: _CacheGrowth,
    ) -> None:
        super().__init__()
        self.branches = torch.nn.ModuleList(blocks[i] for i in group.layers)
        self.group = group
        self.position = position
        self.slots = slots
        self.attention_type = getattr(blocks[group.layers[0]], "attention_type", None)
        self._indexed = [_indexed_modules(block) for block in self.branches]
        self._cache_growth = cache_growth
        if group.mlp_input == "shared":
            missing = [
                name
                for name in ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
                if not hasattr(self.branches[0], name)
            ]
            if missing or hasattr(self.branches[0], "pre_feedforward_layernorm"):
                raise ParallelGroupError(
                    str(group),
                    "the shared MLP input is defined for pre-norm decoder layers (input norm, attention, "
                    "post-attention norm, MLP) without per-branch output norms, and these layers are not",
                    hint="use the exact form (drop ':shared' / --mlp-input shared)",
                )

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self._cache_growth.grow(_cache_argument(args, kwargs), max(self.slots))
        branches: list[Any] = list(self.branches)
        k = len(branches)
        if self.group.mlp_input == "shared":
            attn: Any = 0
            for block, indexed, slot in zip(branches, self._indexed, self.slots, strict=True):
                _point_at(indexed, slot)
                attn = attn + block.self_attn(block.input_layernorm(hidden_states), *args, **kwargs)[0]
            mixed = hidden_states + attn / k
            mlp: Any = 0
            for block in branches:
                mlp = mlp + block.mlp(block.post_attention_layernorm(mixed))
            return mixed + mlp / k
        total: Any = 0
        first: Any = None
        for block, indexed, slot in zip(branches, self._indexed, self.slots, strict=True):
            _point_at(indexed, slot)
            out = block(hidden_states, *args, **kwargs)
            first = out if first is None else first
            total = total + (out[0] if isinstance(out, tuple) else out)
        if isinstance(first, tuple):  # layers that also return attention weights: keep the first branch's
            return (total / k, *first[1:])
        return total / k

    def extra_repr(self) -> str:
        return f"position={self.position}, group={self.group}, slots={self.slots}"


def _cache_argument(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The KV cache a layer was called with, whatever the architecture names it (past_key_values, layer_past)."""
    from transformers.cache_utils import Cache

    return next((value for value in (*kwargs.values(), *args) if isinstance(value, Cache)), None)


class _CacheGrowth:
    """Adds the branch slots of parallel groups to a ``DynamicCache`` that the model built for its positions.

    The model sizes its cache from ``num_hidden_layers`` (the view's positions); the extra slots,
    one per further branch of each group application, follow them. Each is made like the cache
    layer of its group's position (a sliding-window layer keeps a sliding cache of the same window).

    Attributes:
        twin: for every slot, the position whose cache layer it copies the kind of.
    """

    def __init__(self, twin: list[int]) -> None:
        self.twin = twin

    def grow(self, cache: Any, last_slot: int) -> None:
        if cache is None:
            return
        inner = getattr(cache, "self_attention_cache", cache)  # encoder-decoder caches wrap one
        layers = getattr(inner, "layers", None)
        if layers is None or len(layers) > last_slot or getattr(inner, "layer_class_to_replicate", None) is not None:
            return  # a cache that grows on its own, or already has the slots
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        if any(type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer) for layer in layers):
            raise PlanError(
                f"a plan view with parallel groups needs a DynamicCache, got {type(inner).__name__}",
                hint="generate with the default cache (no cache_implementation), or write the plan and load the checkpoint",
            )
        for slot in range(len(layers), last_slot + 1):
            model = layers[self.twin[slot]]
            if isinstance(model, DynamicSlidingWindowLayer):
                layers.append(DynamicSlidingWindowLayer(sliding_window=model.sliding_window))
            else:
                layers.append(DynamicLayer())


def step_module(blocks: torch.nn.ModuleList, step: object, position: int) -> torch.nn.Module:
    """The module that runs one plain step of a plan at ``position`` of the view.

    Args:
        blocks: the source model's layer stack.
        step: the plan's entry for this position: a source layer index.
        position: the position in the view.

    Returns:
        A :class:`PlanStep` over ``blocks[step]``.

    Raises:
        PlanError: a step that is not a single layer (parallel groups are built by :func:`plan_view`).

    Example:
        >>> import torch
        >>> step_module(torch.nn.ModuleList([torch.nn.Identity()]), 0, 3).position
        3
    """
    if isinstance(step, bool) or not isinstance(step, int):
        raise PlanError(f"step {step} of the plan is not a single layer", hint="build parallel groups with plan_view")
    return PlanStep(blocks[step], position, step)


def _view_stack(
    original: torch.nn.ModuleList, plan: Plan, per_layer: dict[str, Any]
) -> tuple[torch.nn.ModuleList, list[int]]:
    """The view's layer list and, per position, the source layer whose per-layer settings it takes."""
    positions = plan.positions()
    twin = [position for position, _ in positions]  # slot -> the position whose cache layer it mirrors
    modules: list[torch.nn.Module] = []
    sources: list[int] = []
    growth = _CacheGrowth(twin)
    for position, step in positions:
        if not isinstance(step, ParallelGroup):
            modules.append(step_module(original, step, position))
            sources.append(step)
            continue
        for field, values in per_layer.items():
            differing = {repr(values[i]) for i in step.layers}
            if len(differing) > 1:
                raise ParallelGroupError(
                    str(step),
                    f"its layers differ in the per-layer setting {field} ({', '.join(sorted(differing))}); "
                    "one model call passes one mask and one setting per position",
                    hint="group layers of the same kind",
                )
        slots = [position, *range(len(twin), len(twin) + len(step) - 1)]
        twin.extend([position] * (len(step) - 1))
        modules.append(ParallelStep(original, step, position, slots, growth))
        sources.append(step.layers[0])
    return torch.nn.ModuleList(modules), sources


def text_config_of(model: Any) -> Any:
    """The config object that holds the layer stack's settings (the text config of multimodal models)."""
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def live_architecture(model: Any) -> Architecture:
    """The :class:`~surgery.architecture.Architecture` of a model already loaded in memory.

    The same facts :func:`surgery.architecture.detect` derives from a checkpoint directory, taken
    from the live module tree and config (the layer prefix is the module path).

    Args:
        model: a ``transformers`` model.

    Returns:
        The architecture; its ``check_plan`` refuses plans this model cannot run.

    Raises:
        UnsupportedArchitectureError: no layer stack of ``num_hidden_layers`` identical blocks.
        PlanError: the model is already inside a :func:`plan_view`.

    Example:
        >>> live_architecture(model).module_path  # doctest: +SKIP
        'model.layers'
    """
    config = model.config
    text_config = text_config_of(model)
    num_layers = int(text_config.num_hidden_layers)
    module_path = _find_stack(model, num_layers)
    stack = model.get_submodule(module_path)
    if isinstance(stack[0], _ViewStep):
        raise PlanError("this model is already running a plan view; leave it before entering another")
    scope: tuple[str, ...] = ()
    if text_config is not config:
        scope = next(((k,) for k in _TEXT_CONFIG_KEYS if getattr(config, k, None) is text_config), ())
    per_layer, index_lists = layer_fields(text_config.to_dict(), num_layers)
    model_type = str(getattr(text_config, "model_type", None) or getattr(config, "model_type", "unknown"))
    return Architecture(
        model_type=model_type,
        class_name=type(model).__name__,
        num_layers=num_layers,
        layer_prefix=module_path,
        module_path=module_path,
        count_key="num_hidden_layers",
        config_scope=scope,
        per_layer=per_layer,
        index_lists=index_lists,
        config=config.to_dict(),
    )


@contextmanager
def plan_view(model: Any, plan: Plan) -> Iterator[Any]:
    """Run ``plan`` on ``model`` in memory: inside the context, ``model`` *is* the planned model.

    Its logits equal those of the checkpoint the API writes for the same plan
    (:func:`surgery.engine.execute`, or :func:`surgery.widen.execute_parallel` for parallel
    groups); cached generation equals uncached generation, repeated layers included. No tensor
    is copied: the view holds the original block objects.

    Args:
        model: a loaded ``transformers`` model (any device placement, ``device_map`` included).
        plan: the plan; it must be made for this model's layer count.

    Returns:
        A context manager yielding ``model`` itself, rearranged; on exit (also on error) the
        layer stack, the config and the attention modules' ``layer_idx`` are restored.

    Raises:
        PlanError: the plan was made for another layer count, or the model is already in a view.
        UnsupportedArchitectureError: no layer stack, or a plan that moves a positional behaviour.

    Example:
        >>> with plan_view(model, Plan.drop("10-20", 30)) as pruned:  # doctest: +SKIP
        ...     logits = pruned(input_ids).logits
    """
    arch = live_architecture(model)
    arch.check_plan(plan)
    parent_path, _, attribute = arch.module_path.rpartition(".")
    parent = model.get_submodule(parent_path)
    original: torch.nn.ModuleList = getattr(parent, attribute)
    text_config = text_config_of(model)
    view, sources = _view_stack(original, plan, arch.per_layer)

    # Everything the view changes, saved as the objects themselves so that exit restores identity.
    saved_fields = {f: getattr(text_config, f) for f in (*arch.per_layer, *arch.index_lists) if hasattr(text_config, f)}
    saved_count = text_config.num_hidden_layers
    saved_indices = [(m, m.layer_idx) for m in original.modules() if isinstance(getattr(m, "layer_idx", None), int)]

    try:
        setattr(parent, attribute, view)
        text_config.num_hidden_layers = len(plan)
        for field, values in arch.per_layer.items():
            if field in saved_fields:
                setattr(text_config, field, [values[i] for i in sources])
        for field, indices in arch.index_lists.items():
            if field in saved_fields:
                setattr(text_config, field, [j for j, i in enumerate(sources) if i in set(indices)])
        yield model
    finally:
        setattr(parent, attribute, original)
        text_config.num_hidden_layers = saved_count
        for field, value in saved_fields.items():
            setattr(text_config, field, value)
        for module, index in saved_indices:
            setattr(module, "layer_idx", index)  # noqa: B010 (Module types its attributes as tensors)
