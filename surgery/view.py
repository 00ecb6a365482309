"""Run a plan over one loaded model in memory: no checkpoint written, no weight copied.

A *plan view* swaps the model's layer stack (the ``nn.ModuleList`` that
:func:`surgery.architecture.detect` finds) for a list of the *same* block objects in plan order,
and makes the config describe the new stack (layer count, per-layer lists such as
``layer_types``), exactly as the streaming engine rewrites ``config.json``. A layer that the plan
repeats is one module object at several positions: its weights are shared, but each position
must write its own KV-cache slot, so every position is wrapped in a :class:`PlanStep` that sets
the ``layer_idx`` of the block's attention modules to the position just before calling it.

Leaving the :func:`plan_view` context restores the stack, the config and every ``layer_idx``, so
one loaded model serves any number of plans (:mod:`surgery.sweep`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from surgery.architecture import Architecture, _find_stack, layer_fields
from surgery.errors import PlanError
from surgery.plan import Plan

# Multimodal configs keep the language model's settings in one of these sub-configs.
_TEXT_CONFIG_KEYS = ("text_config", "language_config", "llm_config")


class PlanStep(torch.nn.Module):
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
        # The block's modules that address the KV cache by their layer_idx (attention, mostly).
        self._indexed = [m for m in block.modules() if isinstance(getattr(m, "layer_idx", None), int)]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        for module in self._indexed:
            setattr(module, "layer_idx", self.position)  # noqa: B010 (Module types its attributes as tensors)
        return self.block(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            modules = self.__dict__.get("_modules")
            if not modules or "block" not in modules:
                raise
            return getattr(modules["block"], name)

    def extra_repr(self) -> str:
        return f"position={self.position}, source={self.source_index}"


def step_module(blocks: torch.nn.ModuleList, step: object, position: int) -> torch.nn.Module:
    """The module that runs one step of a plan at ``position`` of the view.

    This is the one place that knows what a plan step is: a source layer index becomes a
    :class:`PlanStep`. A parallel group (layers run on the same input and averaged) needs its
    own module type, with one KV-cache slot per branch, and is refused until it has one.

    Args:
        blocks: the source model's layer stack.
        step: the plan's entry for this position.
        position: the position in the view.

    Returns:
        A :class:`PlanStep` over ``blocks[step]``.

    Raises:
        PlanError: a step that is not a single layer (a parallel group).

    Example:
        >>> import torch
        >>> step_module(torch.nn.ModuleList([torch.nn.Identity()]), 0, 3).position
        3
    """
    if isinstance(step, bool) or not isinstance(step, int):
        raise PlanError(
            f"step {step} of the plan is a parallel group, which runs only in a written checkpoint for now",
            hint="write it with 'surgery apply' and validate the checkpoint: surgery validate ORIGINAL NEW",
        )
    return PlanStep(blocks[step], position, step)


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
    if isinstance(stack[0], PlanStep):
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

    Its logits equal those of the checkpoint :func:`surgery.engine.execute` writes for the same
    plan; cached generation equals uncached generation, repeated layers included. No tensor is
    copied: the view holds the original block objects.

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
    view = torch.nn.ModuleList(step_module(original, step, position) for position, step in enumerate(plan.layers))
    # step_module accepted every step, so each is a source layer index.
    sources = [step for step in plan.layers if isinstance(step, int)]
    text_config = text_config_of(model)

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
