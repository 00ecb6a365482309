"""Parallel groups as a physical model: K consecutive layers merged into one wide block.

A plan step :class:`~surgery.plan.ParallelGroup` ``[i-j]`` runs layers i..j on the same input and
averages their outputs, ``h' = (1/K) * sum_k L_k(h)``; ``[i-j]xR`` applies that block R times in
a row. This module makes such a plan a checkpoint:

* :func:`check_mergeable` decides, per architecture family, whether a group can be merged
  exactly, and refuses with the reason otherwise;
* :func:`plan_parallel_tensors` maps source tensors to the wide layout (fused Q/K/V of all
  K·H heads with each branch's input-norm weight folded into its columns, per-branch output
  projections, batched MLPs with the post-attention norm weights folded in, the concatenated
  down projection with the 1/K average built in), each wide tensor computed when the writer
  reaches it from the K source tensors it needs, read one at a time;
* :func:`execute_parallel` writes the shards, a config that records the plan, and the modelling
  code (:mod:`surgery.modeling_wide`) with ``auto_map``, so that
  ``AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)`` loads and generates.

What merges, per family (see :data:`FAMILIES`): Llama, Mistral and Qwen 2 exactly; Qwen 3 exactly
with its per-head q/k norms kept per branch; Gemma 2 and Gemma 3 exactly with their q/k norms and
per-branch output ("sandwich") norms kept per branch. A group must not mix sliding-window and
full-attention layers (Qwen 2/3, Gemma: refused, the error names the two layers). Encoders such
as BERT (post-norm), mixtures of experts, multimodal wrappers and every other family are refused
with the reason.

The shipped checkpoint's tensor layout for a group at position p (``{prefix}.{p}.``):

=============================  ==============================  ==============================
tensor                         ``mlp_input="exact"``           ``mlp_input="shared"``
=============================  ==============================  ==============================
``self_attn.qkv_proj.weight``  ``(K·(H+2H_kv)·d, D)``          same
``self_attn.o_proj.weight``    ``(K, D, H·d)`` per branch      ``(D, K·H·d)`` × 1/K
``mlp.gate_up_proj.weight``    ``(K, 2I, D)``                  ``(2·K·I, D)``
``mlp.down_proj.weight``       ``(D, K·I)`` × 1/K              same
=============================  ==============================  ==============================

plus the biases where the base has them and ``self_attn.{q,k}_norm.weight`` ``(K, d)`` (Qwen 3,
Gemma). Sandwich-norm layers (Gemma) keep ``post_attention_layernorm.weight`` and
``post_feedforward_layernorm.weight`` as ``(K, D)`` and store ``mlp.down_proj.weight`` per branch,
``(K, D, I)``, since each branch's MLP output is normalised before the average. Every input norm
weight (``input_layernorm``; ``post_attention_layernorm`` in Llama, ``pre_feedforward_layernorm``
in Gemma, whose norms scale by ``1 + w``) is folded into the columns of the projection it feeds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporters.safetensors import ComputedSource, OutputTensor, output_dtype
from surgery.architecture import Architecture
from surgery.checkpoint import TensorEntry
from surgery.engine import (
    _TORCH_DTYPE_NAMES,
    CardWriter,
    Rewrite,
    SurgeryResult,
    _count,
    _human,
    run_rewrite,
)
from surgery.errors import CheckpointError, NotWideBlockError, ParallelMergeError, PlanError
from surgery.modeling_wide import (
    BASE_KEY,
    CODE_REVISION,
    REVISION_KEY,
    SHIPPED_FILES,
    TESTED_KEY,
    TESTED_TRANSFORMERS,
    code_status,
    render,
    shipped_code_line,
)
from surgery.plan import ParallelGroup, Plan, Recipe
from surgery.source import Source

MODEL_TYPE = "surgery_parallel"
AUTO_MAP = {
    "AutoConfig": "configuration_surgery_parallel.ParallelConfig",
    "AutoModel": "modeling_surgery_parallel.ParallelModel",
    "AutoModelForCausalLM": "modeling_surgery_parallel.ParallelForCausalLM",
}
LOAD_HINT = "AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)"

# Families merged exactly: pre-norm decoders with RMSNorm, rotary attention and a gated MLP.
FAMILIES: dict[str, str] = {
    "llama": "exact (norm weights folded into the fused projections)",
    "mistral": "exact (norm weights folded into the fused projections)",
    "qwen2": "exact (Q/K/V biases concatenated); a group must not mix sliding and full attention layers",
    "qwen3": "exact, per-head q/k norms kept per branch; a group must not mix sliding and full attention layers",
    "gemma2": "exact (mlp-input exact only), q/k and output norms kept per branch; a group must not mix "
    "sliding and global layers",
    "gemma3_text": "exact (mlp-input exact only), q/k and output norms kept per branch; a group must not mix "
    "sliding and global layers",
}
# Norms that scale by (offset + w): the offset, where it is not 0.
NORM_OFFSET: dict[str, float] = {"gemma2": 1.0, "gemma3_text": 1.0}
# Families refused with a specific reason (everything else not in FAMILIES gets the generic one).
REFUSED: dict[str, str] = {
    "bert": "BERT is a post-norm encoder: each layer ends in its own LayerNorm, so the parallel average is over "
    "normalised outputs and there is no causal LM to ship; the wide block is implemented for pre-norm decoders",
}
_MOE_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")

_REQUIRED = (
    "input_layernorm.weight", "post_attention_layernorm.weight",
    "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
    "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
)
_OPTIONAL = (
    "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias", "self_attn.o_proj.bias",
    "mlp.gate_proj.bias", "mlp.up_proj.bias", "mlp.down_proj.bias",
    "self_attn.q_norm.weight", "self_attn.k_norm.weight",
    "pre_feedforward_layernorm.weight", "post_feedforward_layernorm.weight",
)
_IGNORED = ("self_attn.rotary_emb.inv_freq",)  # a buffer some old checkpoints saved; recomputed on load


@dataclass(frozen=True)
class ParallelResult(SurgeryResult):
    """What a plan with parallel groups produced; :meth:`summary` shows the wide blocks."""

    def summary(self) -> str:
        """The steps, the wide blocks and the sizes, as the CLI prints them."""
        plan = self.recipe.plan
        arch = self.architecture
        cfg = _scoped(arch.config, arch.config_scope)
        heads, kv_heads = int(cfg.get("num_attention_heads") or 0), int(cfg.get("num_key_value_heads") or 0)
        inter = cfg.get("intermediate_size")
        lines = [
            f"{arch.class_name}: {arch.num_layers} layers -> depth {len(plan)} ({', '.join(plan.operations)}), "
            f"{len(plan.layers)} blocks stored",
            f"plan: {plan}",
            "position <- source",
        ]
        for position, step in plan.positions():
            if not isinstance(step, ParallelGroup):
                lines.append(f"{position:>3} <- {step}")
                continue
            first = next(p for p, s in plan.positions() if s is step)
            k = len(step)
            if position == first:
                lines.append(
                    f"{position:>3} <- {step}  wide block: {k} layers in parallel, {k * heads} heads "
                    f"({k * kv_heads} KV), MLP {k}x{inter}, mlp-input {step.mlp_input}"
                )
            else:
                lines.append(f"{position:>3} <- {step}  loop {position - first + 1} of {step.loop} (same weights)")
        if any(g.mlp_input == "shared" for g in plan.groups):
            lines.append(
                "note: mlp-input shared is an APPROXIMATION: every branch's MLP sees h + mean_k attn_k(h); "
                "it does not equal running the layers in parallel (validate it before use)"
            )
        dtype = self.recipe.options.dtype or "as source"
        lines.append(
            f"parameters: {_count(self.source_params)} -> {self.output_params:,}; "
            f"output: {_human(self.total_bytes)} in {len(self.shards)} shard(s), dtype {dtype}"
        )
        if self.out is None:
            lines.append("nothing written")
        else:
            verb = "would write" if self.dry_run else "wrote"
            lines.append(f"{verb} {self.out}; load with {LOAD_HINT.replace('OUT', repr(str(self.out)))}")
        return "\n".join(lines)


def _scoped(config: dict[str, Any], scope: tuple[str, ...]) -> dict[str, Any]:
    for key in scope:
        config = config[key]
    return config


def _layer_suffix(architecture: Architecture, name: str) -> str:
    return name[len(architecture.layer_prefix) + 1 :].split(".", 1)[1]


def check_mergeable(architecture: Architecture, plan: Plan, tensor_names: list[str] | None = None) -> None:
    """Refuse a plan whose groups this architecture cannot merge exactly into wide blocks.

    Args:
        architecture: the source's layer stack (from :func:`surgery.architecture.detect`).
        plan: a plan with parallel groups.
        tensor_names: the checkpoint's tensor names; when given, each group layer's tensors are
            checked against the wide block's layout.

    Raises:
        PlanError: the plan was made for another layer count.
        ParallelMergeError: the family is not supported (the message says why), a group mixes
            layers that behave differently (``layer_types``: sliding-window and full attention),
            or a group layer holds a tensor the wide block does not know.

    Example:
        >>> check_mergeable(detect(d, names), Plan.parallel("10-11", 1, 30))  # doctest: +SKIP
    """
    if plan.num_source_layers != architecture.num_layers:
        raise PlanError(
            f"the plan was made for a model with {plan.num_source_layers} layers, "
            f"but this model has {architecture.num_layers}"
        )
    model_type = architecture.model_type
    cfg = _scoped(architecture.config, architecture.config_scope)
    moe = [k for k in _MOE_KEYS if isinstance(cfg.get(k), int) and cfg[k] > 0]
    if moe:
        raise ParallelMergeError(
            model_type, f"it is a mixture of experts ({moe[0]}={cfg[moe[0]]}): each branch routes tokens to its own "
            "experts, which is not one batched MLP; refused rather than approximated",
        )
    if model_type not in FAMILIES:
        reason = REFUSED.get(model_type) or (
            f"wide blocks are implemented for {', '.join(sorted(FAMILIES))} (pre-norm decoders with RMSNorm, "
            "rotary attention and a gated MLP), not for this family"
        )
        raise ParallelMergeError(model_type, reason, hint="use surgery prune/repeat for this model, or a supported family")
    if architecture.config_scope:
        raise ParallelMergeError(model_type, "the layer stack sits inside a multimodal config; only text-only models are merged")
    if architecture.index_lists:
        raise ParallelMergeError(model_type, f"per-layer index lists ({', '.join(architecture.index_lists)}) are not supported")
    for group in plan.groups:
        for field, values in architecture.per_layer.items():
            kinds = {values[i] for i in group.layers}
            if len(kinds) > 1:
                first = group.layers[0]
                other = next(i for i in group.layers if values[i] != values[first])
                raise ParallelMergeError(
                    model_type,
                    f"layers {first} and {other} differ in {field} ({values[first]!r} vs {values[other]!r}); "
                    "one wide block runs one kind of layer",
                    group=str(group),
                    hint="choose groups whose layers are all of one kind (e.g. all sliding-window or all full attention)",
                )
    if tensor_names is not None:
        _check_group_tensors(architecture, plan, tensor_names)


def _check_group_tensors(architecture: Architecture, plan: Plan, tensor_names: list[str]) -> None:
    suffixes: dict[int, set[str]] = {}
    for name in tensor_names:
        layer = architecture.layer_of(name)
        if layer is not None:
            suffixes.setdefault(layer, set()).add(_layer_suffix(architecture, name))
    for group in plan.groups:
        first = suffixes.get(group.layers[0], set()) - set(_IGNORED)
        for index in group.layers:
            have = suffixes.get(index, set()) - set(_IGNORED)
            missing = [s for s in _REQUIRED if s not in have]
            unknown = sorted(have - set(_REQUIRED) - set(_OPTIONAL))
            if missing or unknown:
                what = f"has no {missing[0]}" if missing else f"holds {unknown[0]}, which the wide block does not know"
                raise ParallelMergeError(architecture.model_type, f"layer {index} {what}", group=str(group))
            if have != first:
                raise ParallelMergeError(
                    architecture.model_type,
                    f"layers {group.layers[0]} and {index} hold different tensors ({sorted(have ^ first)[0]})",
                    group=str(group),
                )
        qkv_bias = {f"self_attn.{p}_proj.bias" in first for p in "qkv"}
        if len(qkv_bias) > 1 or (("self_attn.q_norm.weight" in first) != ("self_attn.k_norm.weight" in first)):
            raise ParallelMergeError(architecture.model_type, "Q, K and V must all have biases or none, and q/k norms come in pairs", group=str(group))
        sandwich = {"pre_feedforward_layernorm.weight" in first, "post_feedforward_layernorm.weight" in first}
        if len(sandwich) > 1:
            raise ParallelMergeError(architecture.model_type, "pre- and post-feedforward norms come in pairs", group=str(group))
        if True in sandwich and group.mlp_input == "shared":
            raise ParallelMergeError(
                architecture.model_type,
                "mlp-input shared is not defined for layers that normalise each branch's outputs (sandwich norms)",
                group=str(group), hint="use --mlp-input exact (the default) for this family",
            )


# -- weight fusion -----------------------------------------------------------------------------


def _read(entry: TensorEntry) -> Any:
    """One source tensor, read from its byte range, as fp32."""
    import torch

    dtypes = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
    if entry.dtype not in dtypes:
        raise CheckpointError(str(entry.file), f"tensor {entry.name} has dtype {entry.dtype}, not a float type")
    with entry.file.open("rb") as handle:
        raw = bytearray(os.pread(handle.fileno(), entry.nbytes, entry.start))
    if len(raw) != entry.nbytes:
        raise CheckpointError(str(entry.file), f"ended inside tensor {entry.name}")
    return torch.frombuffer(raw, dtype=dtypes[entry.dtype]).reshape(entry.shape).to(torch.float32)


def fuse_group(
    group: ParallelGroup, branches: list[dict[str, TensorEntry]], norm_offset: float = 0.0
) -> list[tuple[str, ComputedSource]]:
    """The wide block's tensors for one group: ``(suffix, computed source)`` in write order.

    Every computed tensor reads the source tensors it needs (one at a time, as fp32) when the
    writer reaches it; norm weights are folded into projection columns, the 1/K average into
    the output and down projections.

    Args:
        group: the parallel group (K = ``len(group)`` branches, ``group.mlp_input``).
        branches: for each layer of the group, its tensors by suffix (``self_attn.q_proj.weight`` ...).
        norm_offset: 1 for norms that scale by ``1 + w`` (Gemma), 0 for ``w``.

    Returns:
        The wide tensors, named by suffix under the block's layer prefix.

    Raises:
        ParallelMergeError: the branches' shapes disagree.

    Example:
        >>> [suffix for suffix, _ in fuse_group(group, branches)][:2]  # doctest: +SKIP
        ['self_attn.qkv_proj.weight', 'self_attn.o_proj.weight']
    """
    import torch

    k = len(branches)
    first = branches[0]
    for index, branch in zip(group.layers, branches, strict=True):
        for suffix, entry in first.items():
            if branch[suffix].shape != entry.shape:
                raise ParallelMergeError(
                    "unknown", f"{suffix} of layer {index} has shape {branch[suffix].shape}, not {entry.shape}",
                    group=str(group),
                )
    q_out, hidden = first["self_attn.q_proj.weight"].shape
    kv_out = first["self_attn.k_proj.weight"].shape[0]
    inter = first["mlp.gate_proj.weight"].shape[0]
    shared = group.mlp_input == "shared"
    sandwich = "post_feedforward_layernorm.weight" in first
    mlp_norm = "pre_feedforward_layernorm.weight" if sandwich else "post_attention_layernorm.weight"

    def each(suffix: str) -> list[Any]:
        return [_read(branch[suffix]) for branch in branches]

    def scales(suffix: str) -> list[Any]:  # what a norm multiplies by: w, or 1 + w
        return [w + norm_offset for w in each(suffix)] if norm_offset else each(suffix)

    def qkv_weight() -> Any:
        norms = scales("input_layernorm.weight")
        parts = []
        for proj in ("q", "k", "v"):
            parts += [w * n[None, :] for w, n in zip(each(f"self_attn.{proj}_proj.weight"), norms, strict=True)]
        return torch.cat(parts, dim=0)

    def qkv_bias() -> Any:
        return torch.cat([b for proj in ("q", "k", "v") for b in each(f"self_attn.{proj}_proj.bias")], dim=0)

    def o_weight() -> Any:
        weights = each("self_attn.o_proj.weight")
        return torch.cat(weights, dim=1) / k if shared else torch.stack(weights)

    def averaged_or_stacked(suffix: str) -> Callable[[], Any]:
        return lambda: torch.stack(each(suffix)).mean(0) if shared else torch.stack(each(suffix))

    def gate_up_weight() -> Any:
        norms = scales(mlp_norm)
        gates = [w * n[None, :] for w, n in zip(each("mlp.gate_proj.weight"), norms, strict=True)]
        ups = [w * n[None, :] for w, n in zip(each("mlp.up_proj.weight"), norms, strict=True)]
        if shared:
            return torch.cat(gates + ups, dim=0)
        return torch.stack([torch.cat(pair, dim=0) for pair in zip(gates, ups, strict=True)])

    def gate_up_bias() -> Any:
        gates, ups = each("mlp.gate_proj.bias"), each("mlp.up_proj.bias")
        if shared:
            return torch.cat(gates + ups, dim=0)
        return torch.stack([torch.cat(pair, dim=0) for pair in zip(gates, ups, strict=True)])

    def down_weight() -> Any:
        if sandwich:
            return torch.stack(each("mlp.down_proj.weight"))
        return torch.cat(each("mlp.down_proj.weight"), dim=1) / k

    def down_bias() -> Any:
        return torch.stack(each("mlp.down_proj.bias")) if sandwich else torch.stack(each("mlp.down_proj.bias")).mean(0)

    def stacked(suffix: str) -> Callable[[], Any]:
        return lambda: torch.stack(each(suffix))

    out: list[tuple[str, ComputedSource]] = []

    def add(suffix: str, shape: tuple[int, ...], compute: Callable[[], Any], what: str) -> None:
        out.append((suffix, ComputedSource(shape, compute, f"{what} of layers {group.layers[0]}-{group.layers[-1]}")))

    add("self_attn.qkv_proj.weight", (k * (q_out + 2 * kv_out), hidden), qkv_weight, "fused Q/K/V, input norms folded")
    if "self_attn.q_proj.bias" in first:
        add("self_attn.qkv_proj.bias", (k * (q_out + 2 * kv_out),), qkv_bias, "fused Q/K/V biases")
    if "self_attn.q_norm.weight" in first:
        head_dim = first["self_attn.q_norm.weight"].shape[0]
        add("self_attn.q_norm.weight", (k, head_dim), stacked("self_attn.q_norm.weight"), "per-branch q norms")
        add("self_attn.k_norm.weight", (k, head_dim), stacked("self_attn.k_norm.weight"), "per-branch k norms")
    add("self_attn.o_proj.weight", (hidden, k * q_out) if shared else (k, hidden, q_out), o_weight, "output projections")
    if "self_attn.o_proj.bias" in first:
        add("self_attn.o_proj.bias", (hidden,) if shared else (k, hidden), averaged_or_stacked("self_attn.o_proj.bias"),
            "output projection biases")
    add("mlp.gate_up_proj.weight", (2 * k * inter, hidden) if shared else (k, 2 * inter, hidden), gate_up_weight,
        "gate/up projections, post-attention norms folded")
    if "mlp.gate_proj.bias" in first:
        add("mlp.gate_up_proj.bias", (2 * k * inter,) if shared else (k, 2 * inter), gate_up_bias, "gate/up biases")
    if sandwich:
        add("post_attention_layernorm.weight", (k, hidden), stacked("post_attention_layernorm.weight"),
            "per-branch attention output norms")
        add("mlp.down_proj.weight", (k, hidden, inter), down_weight, "per-branch down projections")
        if "mlp.down_proj.bias" in first:
            add("mlp.down_proj.bias", (k, hidden), down_bias, "per-branch down projection biases")
        add("post_feedforward_layernorm.weight", (k, hidden), stacked("post_feedforward_layernorm.weight"),
            "per-branch MLP output norms")
        return out
    add("mlp.down_proj.weight", (hidden, k * inter), down_weight, "down projections, 1/K average")
    if "mlp.down_proj.bias" in first:
        add("mlp.down_proj.bias", (hidden,), down_bias, "down projection biases, averaged")
    return out


def plan_parallel_tensors(
    tensors: dict[str, TensorEntry], architecture: Architecture, recipe: Recipe
) -> list[OutputTensor]:
    """Every output tensor in write order: leading non-layer tensors, the plan's steps, the rest.

    A plain layer's tensors are copied (renamed to its position); a group's are computed by
    :func:`fuse_group` and stored once, under the position of its first application.

    Args:
        tensors: the source tensors that the plan needs.
        architecture: the source's layer stack.
        recipe: the plan (with groups) and the dtype cast.

    Returns:
        The output tensors.

    Example:
        >>> plan_parallel_tensors(tensors, arch, Recipe(Plan.parallel("10-11", 1, 30)))  # doctest: +SKIP
    """
    ordered = sorted(tensors.values(), key=lambda e: (e.file.name, e.start))
    by_layer: dict[int, list[TensorEntry]] = {}
    leading: list[TensorEntry] = []
    trailing: list[TensorEntry] = []
    for entry in ordered:
        layer = architecture.layer_of(entry.name)
        if layer is not None:
            by_layer.setdefault(layer, []).append(entry)
        else:
            (trailing if by_layer else leading).append(entry)
    cast = recipe.options.dtype
    result = [OutputTensor(e.name, e, output_dtype(e.dtype, cast)) for e in leading]
    position = 0
    for step in recipe.plan.layers:
        if not isinstance(step, ParallelGroup):
            result.extend(
                OutputTensor(architecture.rename(e.name, position), e, output_dtype(e.dtype, cast))
                for e in by_layer.get(step, [])
            )
            position += 1
            continue
        branches = [
            {_layer_suffix(architecture, e.name): e for e in by_layer.get(i, []) if _layer_suffix(architecture, e.name) not in _IGNORED}
            for i in step.layers
        ]
        dtype = output_dtype(branches[0]["self_attn.q_proj.weight"].dtype, cast)
        for suffix, computed in fuse_group(step, branches, NORM_OFFSET.get(architecture.model_type, 0.0)):
            result.append(OutputTensor(f"{architecture.layer_prefix}.{position}.{suffix}", computed, dtype))
        position += step.loop
    result.extend(OutputTensor(e.name, e, output_dtype(e.dtype, cast)) for e in trailing)
    return result


def parallel_config(raw: dict[str, Any], architecture: Architecture, recipe: Recipe) -> dict[str, Any]:
    """The output ``config.json``: the source's, with the layer plan, per-application lists and ``auto_map``.

    Args:
        raw: the source ``config.json`` (not modified).
        architecture: the source's layer stack.
        recipe: the plan and the dtype cast.

    Returns:
        A new dict: ``model_type`` ``surgery_parallel``, ``architectures`` ``ParallelForCausalLM``,
        ``num_hidden_layers`` = depth (applications), ``surgery_plan``, ``surgery_steps``,
        ``surgery_base_model_type``.

    Example:
        >>> parallel_config(raw, arch, Recipe(Plan.parallel("10-11", 1, 30)))["num_hidden_layers"]  # doctest: +SKIP
        29
    """
    plan = recipe.plan
    new = json.loads(json.dumps(raw))
    new[architecture.count_key] = len(plan)
    for field, values in architecture.per_layer.items():
        new[field] = [values[s.layers[0] if isinstance(s, ParallelGroup) else s] for _, s in plan.positions()]
    new["model_type"] = MODEL_TYPE
    new["architectures"] = ["ParallelForCausalLM"]
    new["auto_map"] = dict(AUTO_MAP)
    new[BASE_KEY] = architecture.model_type
    new[REVISION_KEY] = CODE_REVISION
    new[TESTED_KEY] = TESTED_TRANSFORMERS
    new["surgery_plan"] = str(plan)
    new["surgery_steps"] = [
        {"sources": list(s.layers), "loop": s.loop, "mlp_input": s.mlp_input} if isinstance(s, ParallelGroup) else {"sources": [s]}
        for s in plan.layers
    ]
    if recipe.options.dtype is not None:
        # every dtype key stated follows the cast, as in surgery.engine.layer_config
        for key in [k for k in ("dtype", "torch_dtype") if k in new] or ["dtype"]:
            new[key] = _TORCH_DTYPE_NAMES[recipe.options.dtype]
    return new


def ship_modeling_code(directory: Path, base_model_type: str) -> list[Path]:
    """Copy the modelling code into a model directory, bound to ``base_model_type``.

    Args:
        directory: the (staging) output directory.
        base_model_type: the source architecture's ``model_type``, e.g. ``llama``.

    Returns:
        The files written.

    Example:
        >>> [p.name for p in ship_modeling_code(tmp, "llama")]  # doctest: +SKIP
        ['configuration_surgery_parallel.py', 'modeling_surgery_parallel.py']
    """
    try:
        texts = render(base_model_type)
    except ValueError as exc:
        raise ParallelMergeError(
            base_model_type, str(exc), hint="reinstall layer-surgery (its package files were modified)"
        ) from None
    written = []
    for name, text in texts.items():
        (directory / name).write_text(text, encoding="utf-8")
        written.append(directory / name)
    return written


def execute_parallel(
    source: Source,
    out: Path | None,
    recipe: Recipe,
    *,
    card: CardWriter,
    force: bool = False,
    dry_run: bool = False,
    quiet: bool = False,
    trust_remote_code: bool = False,
) -> ParallelResult:
    """Apply a recipe with parallel groups: write the wide-block checkpoint into ``out``.

    :mod:`surgery.api` writes every plan with groups through this function (and every other plan
    through :func:`surgery.engine.execute`, which refuses groups); the options mean the same.

    Args:
        source: from :func:`surgery.source.open_source`.
        out: the output directory; it must not exist unless ``force``.
        recipe: a plan with parallel groups, and the write options.
        card: writes the model card (see :func:`surgery.engine.execute`).
        force: replace an existing ``out``.
        dry_run: check and size everything, write nothing.
        quiet: no progress bar.
        trust_remote_code: allow a source whose code ships in its repository.

    Returns:
        The :class:`ParallelResult`.

    Raises:
        PlanError: the plan does not fit this model (wrong layer count, bad groups).
        ParallelMergeError: this architecture, or a group of it, cannot be merged exactly.
        CheckpointError: missing or corrupt weights.
        OutputExistsError: ``out`` exists and ``force`` is False.

    Example:
        >>> from surgery.source import open_source  # doctest: +SKIP
        >>> from exporters.card import write_card  # doctest: +SKIP
        >>> execute_parallel(open_source(None), Path("out"), Recipe(Plan.parallel("10-13", 3, 30)), card=write_card)  # doctest: +SKIP
    """
    return run_rewrite(
        WIDE_REWRITE, source, out, recipe, card=card, force=force, dry_run=dry_run, quiet=quiet,
        trust_remote_code=trust_remote_code,
    )


# Plans with parallel groups: the engine's orchestration, with the wide blocks' checks, tensors and config.
WIDE_REWRITE: Rewrite[ParallelResult] = Rewrite(
    result_type=ParallelResult,
    check=check_mergeable,
    to_outputs=plan_parallel_tensors,
    new_config=parallel_config,
    before_files=lambda staging, architecture, _recipe: ship_modeling_code(staging, architecture.model_type),
    skip_files=frozenset(SHIPPED_FILES),
    # The wide block's config is built from the config after its class's derivations (head_dim ...).
    with_transformers=True,
)


@dataclass(frozen=True)
class CodeUpdate:
    """What :func:`update_modeling_code` did to a wide-block output.

    Attributes:
        directory: the output.
        old_revision: the revision its code had.
        new_revision: the revision it has now (this installation's).
        rewritten: the files replaced (empty when the output was already current).
    """

    directory: Path
    old_revision: int
    new_revision: int
    rewritten: tuple[str, ...]

    def summary(self) -> str:
        """The line ``surgery update-code`` prints."""
        if not self.rewritten:
            return f"{self.directory}: shipped modelling code is already current (revision {self.new_revision})"
        return (f"{self.directory}: shipped modelling code revision {self.old_revision} -> {self.new_revision} "
                f"(rewrote {', '.join(self.rewritten)}; weights untouched)")


def _replace_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file in the same directory and an atomic rename."""
    temporary = path.with_name(f".{path.name}.surgery-{os.getpid()}.tmp")
    try:
        with temporary.open("w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def update_modeling_code(directory: Path) -> CodeUpdate:
    """Re-ship this installation's modelling code into a wide-block output; weights are not touched.

    Rewrites the shipped ``.py`` files, the revision and tested range in ``config.json``, and the
    card's sentence about them, each through a temporary file and an atomic rename.

    Args:
        directory: a model directory written by ``surgery parallel``.

    Returns:
        The :class:`CodeUpdate`.

    Raises:
        NotWideBlockError: ``directory`` has no config.json, or it is not a wide-block output.

    Example:
        >>> print(update_modeling_code(Path("out/smol-par")).summary())  # doctest: +SKIP
        out/smol-par: shipped modelling code revision 1 -> 2 (rewrote ...; weights untouched)
    """

    config_path = directory / "config.json"
    if not config_path.is_file():
        raise NotWideBlockError(str(directory), "it has no config.json")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise NotWideBlockError(str(directory), f"config.json is not valid JSON ({exc})") from None
    status = code_status(directory, config) if isinstance(config, dict) else None
    if status is None:
        raise NotWideBlockError(str(directory), f"config.json has no string {BASE_KEY!r}")
    base = config[BASE_KEY]
    up_to_date = (status.current and config.get(REVISION_KEY) == CODE_REVISION
                  and config.get(TESTED_KEY) == TESTED_TRANSFORMERS)
    if up_to_date:
        return CodeUpdate(directory, status.revision, CODE_REVISION, ())
    try:
        texts = render(base)
    except ValueError as exc:
        raise ParallelMergeError(base, str(exc), hint="reinstall layer-surgery (its package files were modified)") from None
    rewritten = []
    for name, text in texts.items():
        _replace_text(directory / name, text)
        rewritten.append(name)
    old_line = shipped_code_line(config)
    config[REVISION_KEY] = CODE_REVISION
    config[TESTED_KEY] = TESTED_TRANSFORMERS
    _replace_text(config_path, json.dumps(config, indent=2) + "\n")
    rewritten.append("config.json")
    card = directory / "README.md"
    new_line = shipped_code_line(config)
    if card.is_file() and new_line:
        text = card.read_text(encoding="utf-8")
        if old_line and old_line in text:
            _replace_text(card, text.replace(old_line, new_line))
            rewritten.append("README.md")
    return CodeUpdate(directory, status.revision, CODE_REVISION, tuple(rewritten))
