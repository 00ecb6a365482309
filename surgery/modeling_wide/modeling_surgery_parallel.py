"""A parallel-merged model written by layer-surgery: groups of layers merged into wide blocks.

Load it with ``AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)``. This file needs
only ``torch`` and ``transformers``: every class derives from the base architecture's own
(``BASE_MODEL_TYPE`` in the configuration file), and plain layers *are* the base decoder layers.

A parallel group of K layers ``L_k(h) = h + f_k(h)`` computes ``h' = (1/K) * sum_k L_k(h)`` in one
wide block (pre-norm decoders: ``u_k = h + attn_k(h)``, ``f_k(h) = attn_k(h) + mlp_k(u_k)``):

* attention: one RMS normalisation of ``h`` (each branch's norm weight is folded into the columns
  of its Q/K/V rows), one fused projection ``qkv_proj`` for the Q, K and V of all K·H heads
  (``[q_1..q_K | k_1..k_K | v_1..v_K]``, so query head ``k·H + j`` reads KV head
  ``k·H_kv + j // (H / H_kv)``: the grouped-query mapping is kept per branch), per-head q/k norms
  per branch where the base has them, one attention call over K·H heads and one KV-cache entry of
  K·H_kv heads;
* ``mlp_input = "exact"``: the output projection is batched per branch (``o_proj.weight`` is
  ``(K, hidden, H·d)``) because each branch's MLP needs its own ``u_k``; each ``u_k`` is
  normalised, the K MLPs run as one batched matmul per projection (``gate_up_proj.weight`` is
  ``(K, 2I, hidden)`` with the post-attention norm weights folded in), and ``down_proj`` is one
  matmul over the concatenated branches ``(hidden, K·I)`` with the 1/K average built in;
* ``mlp_input = "shared"`` (an approximation, not equal to the averaged layers): every MLP sees
  ``u = h + (1/K) * sum_k attn_k(h)``, so ``o_proj`` is one ``(hidden, K·H·d)`` matmul with the
  1/K built in and the MLP is one layer of width K·I;
* sandwich-norm layers (Gemma 2/3: a norm on each branch's attention output and on its MLP output
  before the residual add) keep those norms per branch, ``(K, hidden)`` weights applied to the
  per-branch outputs, so the down projection is batched per branch too, ``(K, hidden, I)``, and
  the average is taken after the norms (exact mode only).

A group looped r times is one block object, stored once, applied at r consecutive positions,
each with its own KV-cache slot (``num_hidden_layers`` counts applications).
"""

import importlib
import inspect
from typing import Any

import torch
from torch import nn
from transformers import initialization as init
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

from .configuration_surgery_parallel import BASE_MODEL_TYPE, ParallelConfig

_base: Any = importlib.import_module(ParallelConfig.__mro__[1].__module__.replace(".configuration_", ".modeling_"))
BaseModel: Any = getattr(_base, str(MODEL_MAPPING_NAMES[BASE_MODEL_TYPE]))
BaseForCausalLM: Any = getattr(_base, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[BASE_MODEL_TYPE])
# The base model records its hidden states on its decoder layer class: that is the layer to derive from.
_recorded: Any = (getattr(BaseModel, "_can_record_outputs", None) or {}).get("hidden_states")
BaseDecoderLayer: Any = (
    _recorded if isinstance(_recorded, type) else getattr(_base, BaseModel.__name__[: -len("Model")] + "DecoderLayer")
)
# transformers renamed the KV-cache argument of model and layer forwards (``past_key_values`` -> ``cache``
# in 5.24). The base model passes its layers the name its own decoder layer takes, so that signature
# decides which name a wide block reads; the other name is still accepted (a caller on the old
# convention, such as a deprecation shim), and both at once is an error.
CACHE_ARGUMENT: str = "cache" if "cache" in inspect.signature(BaseDecoderLayer.forward).parameters else "past_key_values"
_CACHE_NAMES = (CACHE_ARGUMENT, "past_key_values" if CACHE_ARGUMENT == "cache" else "cache")
apply_rotary_pos_emb: Any = _base.apply_rotary_pos_emb
eager_attention_forward: Any = _base.eager_attention_forward


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS normalisation over the last dimension, without a weight, computed in fp32 as the base does."""
    dtype = x.dtype
    x = x.to(torch.float32)
    return (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)


def attention_function(implementation: Any) -> Any:
    """The attention kernel for ``config._attn_implementation``, looked up as the installed transformers does.

    ``AttentionInterface.get_interface`` (later 5.x) falls back to eager for unknown names; before it,
    the base layers used eager for ``"eager"`` and indexed the registry otherwise.
    """
    if hasattr(ALL_ATTENTION_FUNCTIONS, "get_interface"):
        return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager_attention_forward)
    if implementation in (None, "eager"):
        return eager_attention_forward
    return ALL_ATTENTION_FUNCTIONS[implementation]


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Take the KV cache out of a layer's keyword arguments, under whichever name the caller used."""
    given = [name for name in _CACHE_NAMES if kwargs.get(name) is not None]
    if len(given) > 1:
        raise TypeError(f"a wide block got the KV cache twice, as {given[0]!r} and {given[1]!r}")
    found = [kwargs.pop(name, None) for name in _CACHE_NAMES]
    return next((cache for cache in found if cache is not None), None)


def _eps(norm: Any) -> float:
    eps: Any = getattr(norm, "variance_epsilon", None)
    return float(eps if eps is not None else getattr(norm, "eps", 1e-6))


def norm_offset(norm: Any) -> float:
    """The base norm's weight convention: 0 when it scales by ``w`` (Llama), 1 by ``1 + w`` (Gemma).

    Found by running a small instance of the base norm class with a zero weight on a vector of ones.
    """
    with torch.device("cpu"), torch.no_grad():
        probe = type(norm)(4, eps=_eps(norm))
        probe.weight.zero_()
        return float(round(float(probe(torch.ones(1, 4))[0, 0])))


class StackedLinear(nn.Module):
    """K independent linear maps applied as one batched matmul: ``(K, N, in) -> (K, N, out)``."""

    def __init__(self, width: int, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(width, out_features, in_features))
        self.bias = nn.Parameter(torch.empty(width, out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bias is None:
            return torch.bmm(x, self.weight.transpose(1, 2))
        return torch.baddbmm(self.bias.unsqueeze(1), x, self.weight.transpose(1, 2))


class BranchNorm(nn.Module):
    """An RMS norm with one weight per branch, computed as the base norm computes it.

    ``heads=True``: per-head q/k norms on ``(B, T, K·H, d)`` (Qwen 3, Gemma 3); ``heads=False``:
    per-branch output norms on ``(K, N, hidden)`` (Gemma's sandwich norms).
    """

    def __init__(self, width: int, dim: int, eps: float, offset: float, heads: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.full((width, dim), 1.0 - offset))
        self.variance_epsilon = eps
        self.offset = offset
        self.heads = heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width, dim = self.weight.shape
        shape = x.shape
        dtype = x.dtype
        if self.heads:
            x = x.view(*shape[:-2], width, shape[-2] // width, dim)
            weight = self.weight[:, None, :]
        else:
            weight = self.weight[:, None, :] if x.dim() == 3 else self.weight
        normed = x.to(torch.float32)
        normed = normed * torch.rsqrt(normed.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        if self.offset:  # Gemma: (x̂ * (1 + w)) in fp32, then cast
            return (normed * (self.offset + weight.float())).to(dtype).view(shape)
        return (weight * normed.to(dtype)).view(shape)  # Llama family: w * x̂ in the input dtype


def _prototype(config: Any, layer_idx: int) -> Any:
    """The base decoder layer at ``layer_idx``, built on the meta device: its shapes, biases and settings."""
    with torch.device("meta"):
        return BaseDecoderLayer(config, layer_idx)


class ParallelAttention(nn.Module):
    """The attention of K layers as one call over K·H heads (see the module docstring)."""

    def __init__(self, config: Any, width: int, shared: bool, prototype: Any, layer_idx: int) -> None:
        super().__init__()
        attn = prototype.self_attn
        self.config = config
        self.layer_idx = layer_idx
        self.width = width
        self.shared = shared
        self.head_dim = attn.head_dim
        self.num_heads = attn.q_proj.out_features // attn.head_dim
        self.num_kv_heads = attn.k_proj.out_features // attn.head_dim
        self.num_key_value_groups = attn.num_key_value_groups
        self.scaling = attn.scaling
        self.attention_dropout = attn.attention_dropout
        self.is_causal = True
        if hasattr(attn, "sliding_window"):
            self.sliding_window = attn.sliding_window
        else:
            self.sliding_window = getattr(config, "sliding_window", None) if BASE_MODEL_TYPE == "mistral" else None
        hidden = attn.q_proj.in_features
        self.q_size = width * self.num_heads * self.head_dim
        self.kv_size = width * self.num_kv_heads * self.head_dim
        self.qkv_proj = nn.Linear(hidden, self.q_size + 2 * self.kv_size, bias=attn.q_proj.bias is not None)
        per_branch = self.num_heads * self.head_dim
        o_bias = attn.o_proj.bias is not None
        self.o_proj: nn.Module = (
            nn.Linear(width * per_branch, hidden, bias=o_bias) if shared else StackedLinear(width, per_branch, hidden, o_bias)
        )
        self.softcap = getattr(attn, "attn_logit_softcapping", None) if BASE_MODEL_TYPE == "gemma2" else None
        self.q_norm = self.k_norm = None
        if hasattr(attn, "q_norm"):
            offset = norm_offset(attn.q_norm)
            self.q_norm = BranchNorm(width, self.head_dim, _eps(attn.q_norm), offset, heads=True)
            self.k_norm = BranchNorm(width, self.head_dim, _eps(attn.k_norm), offset, heads=True)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache: Any = None,
        cache_slot: int | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of all K branches on the normalised input.

        Returns:
            ``(out, weights)``: ``out`` is ``(K, B·T, hidden)`` per branch (exact), or
            ``(B, T, hidden)`` averaged over the branches (shared).
        """
        batch, length, hidden = hidden_states.shape
        qkv = self.qkv_proj(hidden_states)
        query, key, value = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        query = query.view(batch, length, -1, self.head_dim)
        key = key.view(batch, length, -1, self.head_dim)
        value = value.view(batch, length, -1, self.head_dim)
        if self.q_norm is not None and self.k_norm is not None:
            query, key = self.q_norm(query), self.k_norm(key)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx if cache_slot is None else cache_slot)
        attention_interface = attention_function(self.config._attn_implementation)
        extra: dict[str, Any] = {"sliding_window": self.sliding_window} if self.sliding_window is not None else {}
        if self.softcap is not None:
            extra["softcap"] = self.softcap
        output, weights = attention_interface(
            self, query, key, value, attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling, **extra, **kwargs,
        )
        if self.shared:
            return self.o_proj(output.reshape(batch, length, -1).contiguous()), weights
        per_branch = output.reshape(batch * length, self.width, -1).transpose(0, 1)
        return self.o_proj(per_branch), weights


class ParallelMLP(nn.Module):
    """The MLPs of K layers: batched per branch (exact) or one layer of width K·I (shared).

    ``per_branch_out``: the down projection is batched too and returns each branch's output
    ``(K, N, hidden)`` (for per-branch output norms); otherwise it is one matmul over the
    concatenated branches with the 1/K average built in.
    """

    def __init__(self, width: int, shared: bool, prototype: Any, per_branch_out: bool = False) -> None:
        super().__init__()
        mlp = prototype.mlp
        hidden, inter = mlp.gate_proj.in_features, mlp.gate_proj.out_features
        self.width = width
        self.shared = shared
        self.per_branch_out = per_branch_out
        bias = mlp.gate_proj.bias is not None
        self.gate_up_proj: nn.Module = (
            nn.Linear(hidden, 2 * width * inter, bias=bias) if shared else StackedLinear(width, hidden, 2 * inter, bias)
        )
        down_bias = mlp.down_proj.bias is not None
        self.down_proj: nn.Module = (
            StackedLinear(width, inter, hidden, down_bias) if per_branch_out else nn.Linear(width * inter, hidden, bias=down_bias)
        )
        self.act_fn = mlp.act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(K, N, hidden) -> (N, hidden)`` (exact; 1/K included), ``-> (K, N, hidden)`` (per-branch
        outputs), or ``(B, T, hidden) -> (B, T, hidden)`` (shared; 1/K included)."""
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        hidden = self.act_fn(gate) * up
        if self.per_branch_out:
            return self.down_proj(hidden)
        if not self.shared:
            hidden = hidden.transpose(0, 1).reshape(x.shape[1], -1)
        return self.down_proj(hidden)


class ParallelBlock(nn.Module):
    """K consecutive layers merged into one wide block: ``h' = (1/K) * sum_k L_k(h)`` (exact), or the shared approximation."""

    def __init__(self, config: Any, width: int, mlp_input: str, layer_idx: int) -> None:
        super().__init__()
        if mlp_input not in ("exact", "shared"):
            raise ValueError(f"mlp_input must be 'exact' or 'shared', got {mlp_input!r}")
        prototype = _prototype(config, layer_idx)
        self.width = width
        self.mlp_input = mlp_input
        self.layer_idx = layer_idx
        self.attention_type = getattr(prototype, "attention_type", None)
        # Sandwich norms (Gemma): post_attention_layernorm normalises the attention *output*,
        # pre_feedforward_layernorm is the MLP's input norm, post_feedforward_layernorm its output norm.
        self.sandwich = hasattr(prototype, "pre_feedforward_layernorm") and hasattr(prototype, "post_feedforward_layernorm")
        if self.sandwich and mlp_input == "shared":
            raise ValueError("mlp_input 'shared' is not defined for layers with per-branch output norms")
        self.input_eps = _eps(prototype.input_layernorm)
        mlp_norm = prototype.pre_feedforward_layernorm if self.sandwich else prototype.post_attention_layernorm
        self.post_attention_eps = _eps(mlp_norm)
        shared = mlp_input == "shared"
        self.self_attn = ParallelAttention(config, width, shared, prototype, layer_idx)
        self.mlp = ParallelMLP(width, shared, prototype, per_branch_out=self.sandwich)
        if self.sandwich:
            hidden = prototype.input_layernorm.weight.shape[0]
            offset = norm_offset(prototype.post_attention_layernorm)
            self.post_attention_layernorm = BranchNorm(
                width, hidden, _eps(prototype.post_attention_layernorm), offset, heads=False
            )
            self.post_feedforward_layernorm = BranchNorm(
                width, hidden, _eps(prototype.post_feedforward_layernorm), offset, heads=False
            )

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache_slot: int | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        """One application of the block; the KV cache comes in ``kwargs`` as ``cache`` or ``past_key_values``."""
        if position_embeddings is None:
            raise TypeError("a wide block needs the model's rotary position embeddings (position_embeddings)")
        cache = pop_cache(kwargs)
        attn, _ = self.self_attn(
            rms_normalize(hidden_states, self.input_eps), position_embeddings, attention_mask,
            cache=cache, cache_slot=cache_slot, **kwargs,
        )
        if self.mlp_input == "shared":
            mixed = hidden_states + attn
            return mixed + self.mlp(rms_normalize(mixed, self.post_attention_eps))
        batch, length, hidden = hidden_states.shape
        flat = hidden_states.reshape(batch * length, hidden)
        if self.sandwich:
            branches = flat.unsqueeze(0) + self.post_attention_layernorm(attn)  # u_k, (K, N, hidden)
            mlp = self.post_feedforward_layernorm(self.mlp(rms_normalize(branches, self.post_attention_eps)))
            return (branches + mlp).mean(0).view(batch, length, hidden)
        branches = flat.unsqueeze(0) + attn  # u_k = h + attn_k(h), (K, N, hidden)
        out = flat + attn.mean(0) + self.mlp(rms_normalize(branches, self.post_attention_eps))
        return out.view(batch, length, hidden)


class ParallelLoop(nn.Module):
    """A further application of a looped block: the same module and weights, its own KV-cache slot."""

    def __init__(self, block: ParallelBlock, position: int) -> None:
        super().__init__()
        self.position = position
        self.attention_type = block.attention_type
        self._block = (block,)  # a tuple, so the weights are not registered (stored) a second time

    def forward(self, hidden_states: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        kwargs.pop("cache_slot", None)
        return self._block[0](hidden_states, cache_slot=self.position, **kwargs)

    def extra_repr(self) -> str:
        return f"position={self.position}, applies the block at position {self._block[0].layer_idx}"


def build_layers(config: Any) -> nn.ModuleList:
    """The layer list of ``config.surgery_steps``: base decoder layers, wide blocks and their loop positions."""
    steps = getattr(config, "surgery_steps", None)
    if not steps:
        raise ValueError("this config has no 'surgery_steps'; it was not written by layer-surgery's parallel verb")
    layers: list[nn.Module] = []
    for step in steps:
        sources, loop = list(step["sources"]), int(step.get("loop", 1))
        position = len(layers)
        if len(sources) == 1 and loop == 1:
            layers.append(BaseDecoderLayer(config, position))
            continue
        block = ParallelBlock(config, len(sources), str(step.get("mlp_input", "exact")), position)
        layers.append(block)
        layers.extend(ParallelLoop(block, position + i) for i in range(1, loop))
    if len(layers) != config.num_hidden_layers:
        raise ValueError(
            f"surgery_steps apply {len(layers)} layers but num_hidden_layers is {config.num_hidden_layers}"
        )
    return nn.ModuleList(layers)


def _with(recorders: Any, extra: type) -> list[Any]:
    return [*(recorders if isinstance(recorders, list) else [recorders] if recorders else []), extra]


_BASE_RECORD: dict[str, Any] = dict(getattr(BaseModel, "_can_record_outputs", None) or {})


class _ParallelInit:
    """Weight initialisation for the wide modules (used by ``from_config``; loading overwrites it)."""

    config: Any

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, StackedLinear):
            init.normal_(module.weight, mean=0.0, std=getattr(self.config, "initializer_range", 0.02))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, BranchNorm):
            init.constant_(module.weight, 1.0 - module.offset)
        else:
            super()._init_weights(module)  # type: ignore[misc]


class ParallelModel(_ParallelInit, BaseModel):
    """The base model with its layer list built from the plan (plain layers, wide blocks, loop positions)."""

    config_class = ParallelConfig
    _no_split_modules = [*(getattr(BaseModel, "_no_split_modules", None) or []), "ParallelBlock"]
    _can_record_outputs = {
        **_BASE_RECORD,
        "hidden_states": _with(_BASE_RECORD.get("hidden_states"), ParallelBlock),
        "attentions": _with(_BASE_RECORD.get("attentions"), ParallelAttention),
    }

    def __init__(self, config: ParallelConfig) -> None:
        super().__init__(config)
        self.layers = build_layers(config)
        self.post_init()


class ParallelForCausalLM(_ParallelInit, BaseForCausalLM):
    """The base causal LM over :class:`ParallelModel`; ``generate`` and the KV cache work as usual."""

    config_class = ParallelConfig
    _no_split_modules = ParallelModel._no_split_modules

    def __init__(self, config: ParallelConfig) -> None:
        # The base class's __init__ without building a base model that would be replaced at once.
        super(BaseForCausalLM, self).__init__(config)
        self.model = ParallelModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


__all__ = ["ParallelConfig", "ParallelForCausalLM", "ParallelModel"]
