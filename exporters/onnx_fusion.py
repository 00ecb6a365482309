"""Fuse a traced decoder graph into ONNX Runtime's kernels: fewer, bigger nodes for the same arithmetic.

A traced decoder layer is ~70 small nodes (RMSNorm as Pow/ReduceMean/Sqrt, rotary as Slice/Neg/Concat,
attention with the grouped key/value heads expanded); a decode step of batch 1 spends a sizeable share of its
time in the executor between them. This pass rewrites each layer into ONNX Runtime's contrib operators, as
onnxruntime-genai's model builder writes them, keeping what surgery's graph promises (a left-padded batch,
``position_ids`` as an input, the cache layout ``[batch, kv_heads, length, head_dim]``):

* ``SimplifiedLayerNormalization`` / ``SkipSimplifiedLayerNormalization`` for RMSNorm and the residual add
  before it (onnxscript's fusions);
* the rotary embedding of queries and keys from a cos/sin cache that is the model's own rotary module
  evaluated at every position (so any rope scaling it applies is in the cache): inside
  ``GroupQueryAttention`` (``do_rotary``) when the head size is a multiple of 16, with the layer's Q, K and V
  projections packed into one MatMul as the builder writes them; else two ``RotaryEmbedding`` reading
  ``position_ids``. Inside, the kernel turns each token at its cache slot rather than its position; a
  left-padded row's slots are its positions plus the padding, and rotary attention depends only on the
  distance between query and key, so the logits are the same (``position_ids`` then goes unread);
* ``GroupQueryAttention`` for attention: the new keys/values are appended to the past inside the kernel,
  the grouped heads are never expanded, and the model's own additive mask (causal and padding) is its
  ``attention_bias``, so a left-padded batch stays exact. ``seqlens_k`` is the whole length for every row
  and ``total_sequence_length`` the attention mask's length: with onnxruntime-genai's share buffer the
  kernel then writes the new keys into the buffer in place.

A wide block's attention (K branches as one call over K·H heads, ``surgery parallel``) matches too: it is one
``GroupQueryAttention`` over K·H heads, whose grouping is the branches'. The rewrite applies only where the
whole layer matches; anything else keeps its traced form, and the export's parity check against PyTorch judges
the result as it judges any graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

_FUSION_DOMAIN = "ai.onnxruntime._fusion"  # onnxscript's intermediate (not executable) fused ops
MIN_ROTARY_POSITIONS = 4096  # the cos/sin cache's least length (positions), whatever the config says
# ONNX Runtime's GroupQueryAttention rotates inside (do_rotary) only heads whose size is a multiple of 16.
ROTARY_INSIDE_HEAD_MULTIPLE = 16
_LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")
_FUSED_OPS = ("SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "RotaryEmbedding",
              "GroupQueryAttention", "QuickGelu")


@dataclass(frozen=True)
class FusionReport:
    """What the pass did: fused operator counts, and why attention was left unfused (empty when fused)."""

    counts: dict[str, int]
    reason: str
    rotary_inside: int = 0  # GroupQueryAttention kernels that apply the rotary themselves (at cache slots)
    packed_qkv: int = 0  # of those, how many read one packed [q | k | v] projection

    @property
    def attention_fused(self) -> bool:
        return self.counts.get("GroupQueryAttention", 0) > 0 and not self.reason

    def format(self) -> str:
        """One line for the export's summary."""
        if not self.counts:
            return f"fused operators: none ({self.reason})"
        fused = ", ".join(f"{count} {op}" for op, count in sorted(self.counts.items()))
        inside = (f"; rotary inside attention in {self.rotary_inside}, packed QKV in {self.packed_qkv}"
                  if self.rotary_inside else "")
        return f"fused operators: {fused}{inside}" + (f" (attention left unfused: {self.reason})" if self.reason else "")

    def to_dict(self) -> dict[str, Any]:
        return {"operators": dict(sorted(self.counts.items())), "attention_fused": self.attention_fused,
                "rotary_inside_attention": self.rotary_inside, "packed_qkv": self.packed_qkv, "reason": self.reason}


def rotary_cache(model: Any, head_dim: int) -> tuple[np.ndarray, np.ndarray] | None:
    """``(cos, sin)`` of shape ``[positions, head_dim / 2]`` from the model's single rotary module, or None.

    The module is run at positions ``0 .. positions - 1``, ``positions`` being ``max_position_embeddings`` and
    at least ``MIN_ROTARY_POSITIONS`` (ONNX Runtime's ``RotaryEmbedding`` refuses a position past its cache, while
    ``transformers`` computes any). None when there is not exactly one module named ``rotary_emb`` or it holds one
    table per layer type (its ``rope_type`` a dict), when its frequencies depend on the sequence's length
    (``dynamic``, ``longrope``: one cache cannot hold them), or when its halves differ (not ``cat(freqs, freqs)``) or it does not cover ``head_dim``.

    Args:
        model: A ``transformers`` decoder (the module tree is searched for ``rotary_emb``).
        head_dim: The attention head size the cache must cover.

    Returns:
        ``(cos, sin)`` as float32 arrays ``[positions, head_dim // 2]``, or None (attention is then left unfused).

    Example:
        >>> import transformers
        >>> config = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
        ...                                   intermediate_size=96, num_hidden_layers=1, vocab_size=64)
        >>> cos, sin = rotary_cache(transformers.LlamaForCausalLM(config), head_dim=16)
        >>> cos.shape
        (4096, 8)
    """
    import torch

    rotaries = [module for name, module in model.named_modules() if name.endswith("rotary_emb")]
    if len(rotaries) != 1:
        return None
    rope_type = getattr(rotaries[0], "rope_type", "default")
    # A dict is one table per layer type (Gemma 3's local and global rotary in one module): several tables.
    if isinstance(rope_type, dict) or rope_type in _LENGTH_DEPENDENT_ROPE:
        return None
    config = model.config.get_text_config()
    positions = max(int(getattr(config, "max_position_embeddings", 0) or 0), MIN_ROTARY_POSITIONS)
    probe = torch.zeros(1, 1, head_dim, dtype=torch.float32)
    with torch.no_grad():
        try:
            cos, sin = rotaries[0](probe, torch.arange(positions)[None])
        except (TypeError, ValueError, RuntimeError, AttributeError, KeyError):
            # a signature or buffers this probe does not know (transformers 5.0's Gemma 3 wants a layer type)
            return None
    cos, sin = cos[0].float().numpy(), sin[0].float().numpy()
    half = head_dim // 2
    if cos.shape != (positions, head_dim) or not (np.array_equal(cos[:, :half], cos[:, half:])
                                                   and np.array_equal(sin[:, :half], sin[:, half:])):
        return None
    return np.ascontiguousarray(cos[:, :half]), np.ascontiguousarray(sin[:, :half])


def _rule_classes() -> tuple[Any, Any]:
    from onnxscript.rewriter import _ir_utils, pattern

    class GroupQueryAttentionWithBias(pattern.RewriteRuleClassBase):
        """Rotary + past concat + grouped-head expansion + SDPA of one layer -> RotaryEmbedding x2 + GQA."""

        def __init__(self, cos: Any, sin: Any, position_ids: Any, seqlens_k: Any, total_length: Any,
                     sources: tuple[Any, Any]) -> None:
            super().__init__("GroupQueryAttentionWithBias", remove_nodes=False)
            self.cos_cache, self.sin_cache = cos, sin
            self.cos_source, self.sin_source = sources
            self.position_ids, self.seqlens_k, self.total_length = position_ids, seqlens_k, total_length

        def pattern(self, op: Any, query_BSD: Any, key_BSDkv: Any, value_BSDkv: Any, past_key: Any,
                    past_value: Any, cos: Any, sin: Any, mask: Any, attention_shape: Any) -> Any:
            query_BSHDh = op.Reshape(query_BSD, pattern.ANY_VALUE, _outputs=["query_BSHDh"])
            key_BSHkvDh = op.Reshape(key_BSDkv, pattern.ANY_VALUE, _outputs=["key_BSHkvDh"])
            # Qwen 3 and its kin normalise each head's query and key (RMSNorm over head_dim) before the rotary.
            query_normed = op.SimplifiedLayerNormalization(query_BSHDh, pattern.ANY_VALUE, axis=-1,
                                                           _outputs=["query_normed"])
            key_normed = op.SimplifiedLayerNormalization(key_BSHkvDh, pattern.ANY_VALUE, axis=-1, _outputs=["key_normed"])
            query = op.Transpose(pattern.OrValue([query_BSHDh, query_normed]), perm=[0, 2, 1, 3])
            key = op.Transpose(pattern.OrValue([key_BSHkvDh, key_normed]), perm=[0, 2, 1, 3])
            value = op.Transpose(op.Reshape(value_BSDkv, pattern.ANY_VALUE), perm=[0, 2, 1, 3])
            query_rope = op.RotaryEmbedding(query, cos, sin, _domain=_FUSION_DOMAIN, _outputs=["query_rope"])
            key_rope = op.RotaryEmbedding(key, cos, sin, _domain=_FUSION_DOMAIN, _outputs=["key_rope"])
            present_key = op.Concat(past_key, key_rope, axis=-2)
            present_value = op.Concat(past_value, value, axis=-2)
            key_all = op.Reshape(op.Expand(op.Unsqueeze(present_key, [2]), pattern.ANY_VALUE), pattern.ANY_VALUE)
            value_all = op.Reshape(op.Expand(op.Unsqueeze(present_value, [2]), pattern.ANY_VALUE), pattern.ANY_VALUE)
            attention = op.SDPA(query_rope, key_all, value_all, mask, key_format="BHSd", _domain=_FUSION_DOMAIN,
                                _outputs=["attention"])
            attention_BSD = op.Reshape(op.Transpose(attention, perm=[0, 2, 1, 3]), attention_shape,
                                       _outputs=["attention_BSD"])
            return attention_BSD, present_key, present_value

        # onnxscript binds the pattern's named values to check()'s parameters by name (its own rules do the same).
        def check(  # type: ignore[override]
                self, context: Any, query_BSD: Any, key_BSDkv: Any, value_BSDkv: Any, query_BSHDh: Any,
                key_BSHkvDh: Any, cos: Any, sin: Any, mask: Any, query_rope: Any, key_rope: Any, attention: Any,
                attention_BSD: Any, past_key: Any, **_: Any) -> Any:
            result = pattern.MatchResult()
            if cos is not self.cos_source or sin is not self.sin_source:
                return result.fail("rotary cos/sin other than the model's single rotary module's", [cos, sin])
            for rope in (query_rope, key_rope):
                if rope.producer().attributes.get_int("interleaved", 0) != 0:
                    return result.fail("interleaved rotary", rope)
            heads, kv_heads = _ir_utils.get_dim(query_BSHDh, 2), _ir_utils.get_dim(key_BSHkvDh, 2)
            head_dim = _ir_utils.get_dim(query_BSHDh, 3)
            if not (isinstance(heads, int) and isinstance(kv_heads, int) and isinstance(head_dim, int)) \
                    or heads % kv_heads:
                return result.fail("head counts not static", [query_BSHDh, key_BSHkvDh])
            # GroupQueryAttention reads [batch, sequence, heads * head_dim]: the traced inputs must be exactly that.
            for value, width in ((query_BSD, heads), (key_BSDkv, kv_heads), (value_BSDkv, kv_heads)):
                if value.shape is None or len(value.shape) != 3 or _ir_utils.get_dim(value, 2) != width * head_dim:
                    return result.fail("not [batch, sequence, heads * head_dim]", value)
            # Its output [batch, sequence, heads * head_dim] is the traced [batch, sequence, heads, head_dim] in the
            # same order, so any reshape of the latter is the same reshape of the former: a wide block's
            # (batch * sequence, branches, heads_per_branch * head_dim) is rewritten with its own shape.
            self._reshape_back = attention_BSD.shape is None or len(attention_BSD.shape) != 3 \
                or _ir_utils.get_dim(attention_BSD, 2) != heads * head_dim
            if mask is None or mask.dtype != self.cos_cache.dtype:
                return result.fail("no additive mask of the graph's float type", mask)
            if not past_key.is_graph_input():
                return result.fail("past key is not a graph input", past_key)
            self._heads, self._kv_heads, self._head_dim = heads, kv_heads, head_dim
            self._scale = attention.producer().attributes.get_float("scale", None)
            return True

        def rewrite(self, op: Any, query_BSD: Any, key_BSDkv: Any, value_BSDkv: Any, past_key: Any,
                    past_value: Any, mask: Any, query_BSHDh: Any, key_BSHkvDh: Any, attention_shape: Any,
                    query_normed: Any = None, key_normed: Any = None, **_: Any) -> Any:
            attention, present_key, present_value = self._attention(
                op, query_BSD, key_BSDkv, value_BSDkv, past_key, past_value, mask, query_BSHDh, key_BSHkvDh,
                query_normed, key_normed)
            if self._reshape_back:
                attention = op.Reshape(attention, attention_shape)
            return attention, present_key, present_value

        def _attention(self, op: Any, query_BSD: Any, key_BSDkv: Any, value_BSDkv: Any, past_key: Any,
                       past_value: Any, mask: Any, query_BSHDh: Any, key_BSHkvDh: Any, query_normed: Any,
                       key_normed: Any) -> Any:
            attributes: dict[str, Any] = {"num_heads": self._heads, "kv_num_heads": self._kv_heads}
            if self._scale is not None:
                attributes["scale"] = self._scale
            if query_normed is None and key_normed is None and self._head_dim % ROTARY_INSIDE_HEAD_MULTIPLE == 0:
                # Rotary inside the kernel, at each token's cache slot (see the module's docstring).
                return op.GroupQueryAttention(query_BSD, key_BSDkv, value_BSDkv, past_key, past_value, self.seqlens_k,
                                              self.total_length, self.cos_cache, self.sin_cache, None, mask,
                                              **attributes, do_rotary=1, rotary_interleaved=0,
                                              _domain="com.microsoft", _outputs=3)
            flat = op.Constant(value_ints=[0, 0, -1])
            if query_normed is not None:  # the per-head norm, then back to [batch, sequence, heads * head_dim]
                query_BSD = op.Reshape(_renormed(op, query_BSHDh, query_normed), flat)
            if key_normed is not None:
                key_BSDkv = op.Reshape(_renormed(op, key_BSHkvDh, key_normed), flat)
            query = op.RotaryEmbedding(query_BSD, self.position_ids, self.cos_cache, self.sin_cache,
                                       num_heads=self._heads, interleaved=0, _domain="com.microsoft")
            key = op.RotaryEmbedding(key_BSDkv, self.position_ids, self.cos_cache, self.sin_cache,
                                     num_heads=self._kv_heads, interleaved=0, _domain="com.microsoft")
            return op.GroupQueryAttention(query, key, value_BSDkv, past_key, past_value, self.seqlens_k,
                                          self.total_length, None, None, None, mask, **attributes,
                                          _domain="com.microsoft", _outputs=3)

    def _renormed(op: Any, value: Any, normed: Any) -> Any:
        node = normed.producer()
        return op.SimplifiedLayerNormalization(value, node.inputs[1], **node.attributes)

    class SiLU(pattern.RewriteRuleClassBase):
        """``x * Sigmoid(x)`` -> ``QuickGelu(x, alpha=1)`` (ONNX Runtime's one-kernel SiLU, as the builder writes)."""

        def pattern(self, op: Any, x: Any) -> Any:
            return op.Mul(x, op.Sigmoid(x))

        def rewrite(self, op: Any, x: Any) -> Any:
            return op.QuickGelu(x, alpha=1.0, _domain="com.microsoft")

    return GroupQueryAttentionWithBias, SiLU


def _projection(value: Any) -> tuple[Any, Any, np.ndarray, np.ndarray | None] | None:
    """``value = x @ W (+ b)`` with constant ``W`` (2-D) and ``b`` (1-D), read only by its one consumer:
    ``(x, W's value, W, b)``, else None."""
    if value is None or len(value.uses()) != 1 or value.is_graph_output():
        return None
    node, bias = value.producer(), None
    if node is not None and node.op_type == "Add" and node.domain == "":
        constants = [v for v in node.inputs if v is not None and v.const_value is not None]
        if len(constants) != 1 or len(constants[0].const_value.shape) != 1:
            return None
        bias = constants[0].const_value.numpy()
        (value,) = [v for v in node.inputs if v is not constants[0]]
        if value is None or len(value.uses()) != 1:
            return None
        node = value.producer()
    if node is None or node.op_type != "MatMul" or node.domain != "":
        return None
    weight = node.inputs[1]
    if weight is None or weight.const_value is None or len(weight.const_value.shape) != 2:
        return None
    return node.inputs[0], weight, weight.const_value.numpy(), bias


def register_constant(graph: Any, name: str, array: np.ndarray) -> Any:
    """A new initializer ``name`` holding ``array``, registered in ``graph`` (an ``onnx_ir.Graph``).

    Args:
        graph: The graph to add it to.
        name: Its name, not yet taken in ``graph``.
        array: Its value; the initializer takes its dtype and shape.

    Returns:
        The initializer's ``onnx_ir.Value``, to use as a node input.

    Raises:
        ValueError: ``name`` is already an initializer of ``graph`` (onnx_ir refuses it).

    Example:
        >>> import numpy as np, onnx_ir
        >>> graph = onnx_ir.Graph([], [], nodes=[])
        >>> register_constant(graph, "one", np.array([1], dtype=np.int64)).name
        'one'
    """
    import onnx_ir as ir

    value = ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.from_numpy(array.dtype)),
                     const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _pack_qkv(graph: Any) -> int:
    """Give each ``GroupQueryAttention`` that rotates inside one packed ``[q | k | v]`` projection (a single
    MatMul, and one bias Add when the model has biases), as the reference builder writes it; returns how many.

    Only where the three projections are constant MatMuls of the same activation; the kernel splits the packed
    input itself (``key`` and ``value`` left empty)."""
    import onnx_ir as ir

    taken = {value.name for value in graph.initializers.values()}
    packed = 0
    for node in list(graph):
        if node.op_type != "GroupQueryAttention" or node.attributes.get_int("do_rotary", 0) != 1:
            continue
        split = node.inputs[0].producer() if node.inputs[0] is not None else None
        if split is not None and split.op_type == "Split" and split.domain == "" and list(split.outputs) == list(node.inputs[:3]) \
                and split.attributes.get_int("axis", 0) in (-1, 2) and all(len(v.uses()) == 1 for v in split.outputs):
            # Already one projection, split in three (a wide block's qkv_proj): the kernel takes it whole.
            qkv = split.inputs[0]
        else:
            parts = [_projection(value) for value in node.inputs[:3]]
            if any(part is None for part in parts) or len({part[0] for part in parts if part}) != 1:
                continue
            projections = [part for part in parts if part is not None]
            biases = [part[3] for part in projections]
            if any(bias is None for bias in biases) and not all(bias is None for bias in biases):
                continue
            name = projections[0][1].name or f"gqa.{packed}.weight"
            name = name.replace("q_proj", "qkv_proj") if "q_proj" in name else f"{name}.qkv"
            while name in taken:
                name += "_"
            taken.add(name)
            weight = register_constant(graph, name, np.concatenate([part[2] for part in projections], axis=1))
            added = [ir.node("MatMul", [projections[0][0], weight], name=f"{name}.matmul")]
            if biases[0] is not None:
                bias = register_constant(graph, f"{name}.bias", np.concatenate([b for b in biases if b is not None]))
                added.append(ir.node("Add", [added[0].outputs[0], bias], name=f"{name}.add"))
            graph.insert_before(node, added)
            qkv = added[-1].outputs[0]
        node.replace_input_with(0, qkv)
        node.replace_input_with(1, None)
        node.replace_input_with(2, None)
        packed += 1
    return packed


def _drop_unread_norm_outputs(graph: Any) -> None:
    """Turn off the normalizations' unread optional outputs (``mean``, ``inv_std_var``; the last one's skip sum), as
    the reference builder writes them: ONNX Runtime computes and allocates every output a node names, read or not
    (measured on pruned SmolLM2: 0.54 against 0.34 ms per decode step for the 38 SkipSimplifiedLayerNormalization).
    (onnx_ir's RemoveUnusedNodesPass does this only for standard ONNX operators, by their schemas; these two are
    ONNX Runtime's.)"""
    outputs = frozenset(graph.outputs)
    for node in graph:
        if node.op_type not in ("SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization") \
                or node.domain not in ("", "com.microsoft"):
            continue
        for index in range(1, len(node.outputs)):  # mean, inv_std_var (and the skip sum): all optional
            if node.outputs[index].name and not node.outputs[index].uses() \
                    and node.outputs[index] not in outputs:
                node.outputs[index].name = ""
        kept = len(node.outputs)
        while kept > 1 and not node.outputs[kept - 1].name and not node.outputs[kept - 1].uses():
            kept -= 1
        node.resize_outputs(kept)


def fuse_decoder(model: Any, cache: tuple[np.ndarray, np.ndarray] | None, dtype: str = "fp32") -> FusionReport:
    """Rewrite the decoder graph ``model`` (an ``onnx_ir.Model``, traced by surgery) in place.

    Args:
        model: The traced graph, with inputs ``input_ids``, ``attention_mask``, ``position_ids`` and the past.
        cache: :func:`rotary_cache` of the model, or None (attention and rotary are then left unfused).
        dtype: the graph's float type, ``fp32`` or ``fp16`` (the cos/sin cache is written in it).

    Returns:
        A :class:`FusionReport`: the fused operators' counts, and why attention was left unfused (empty if it was not).

    Raises:
        ValueError: onnxscript's intermediate operators were left in the graph (a fusion half-applied); the
            caller turns it into ``OnnxExportError`` naming ``--no-fuse``.

    Example:
        >>> import onnx_ir  # doctest: +SKIP
        >>> model = onnx_ir.load("traced/model.onnx")  # doctest: +SKIP
        >>> fuse_decoder(model, cache=None).format()  # doctest: +SKIP
        'fused operators: 12 SkipSimplifiedLayerNormalization, ... (attention left unfused: no single rotary ...)'
    """
    import onnx_ir as ir
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import optimize
    from onnxscript.rewriter import pattern
    from onnxscript.rewriter.ort_fusions import _core
    from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
    from onnxscript.rewriter.ort_fusions.rotary_embedding import fuse_rotary_embedding
    from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa
    from onnxscript.rewriter.ort_fusions.sdpa_via_mha import replace_sdpa_by_mha
    from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

    graph = model.graph
    packed = rotary_inside = 0
    _core._pre_optimize(model)
    fuse_rms_normalization(model)
    fuse_skip_rms_normalization(model)
    reason = ""
    if cache is None:
        reason = ("no single rotary module with a fixed cos/sin table (none, several, or frequencies that depend "
                  "on the sequence length)")
    else:
        fuse_rotary_embedding(model)
        common.CommonSubexpressionEliminationPass()(model)
        fuse_sdpa(model, apply_shape_inference=True)
        ropes = [node for node in graph if node.op_type == "RotaryEmbedding" and node.domain == _FUSION_DOMAIN]
        sources = {(node.inputs[1], node.inputs[2]) for node in ropes}
        if len(sources) != 1:
            reason = f"{len(sources)} rotary cos/sin sources in the graph (expected 1)"
        else:
            inputs = {value.name: value for value in graph.inputs}

            float_type = np.float16 if dtype == "fp16" else np.float32
            cos_cache = register_constant(graph, "rotary.cos_cache", cache[0].astype(float_type))
            sin_cache = register_constant(graph, "rotary.sin_cache", cache[1].astype(float_type))
            total64 = ir.node("Shape", [inputs["attention_mask"]], {"start": 1, "end": 2}, name="gqa.total_length64")
            batch = ir.node("Shape", [inputs["attention_mask"]], {"start": 0, "end": 1}, name="gqa.batch")
            total32 = ir.node("Cast", [total64.outputs[0]], {"to": ir.DataType.INT32}, name="gqa.total_length32")
            one = register_constant(graph, "gqa.one", np.array([1], dtype=np.int32))
            last = ir.node("Sub", [total32.outputs[0], one], name="gqa.last_index")
            seqlens = ir.node("Expand", [last.outputs[0], batch.outputs[0]], name="gqa.seqlens_k")
            total = ir.node("Squeeze", [total32.outputs[0]], name="gqa.total_sequence_length")
            graph.extend([total64, batch, total32, last, seqlens, total])
            rule = _rule_classes()[0].rule(cos_cache, sin_cache, inputs["position_ids"], seqlens.outputs[0],
                                      total.outputs[0], next(iter(sources)))
            count = pattern.RewriteRuleSet([rule]).apply_to_model(model)
            if count != len(ropes) // 2:
                reason = f"{count} of {len(ropes) // 2} attention layers matched the pattern"
            graph.sort()
            packed = _pack_qkv(graph)
            rotary_inside = sum(1 for node in graph if node.op_type == "GroupQueryAttention"
                                and node.attributes.get_int("do_rotary", 0) == 1)
    if any(node.domain == _FUSION_DOMAIN and node.op_type == "SDPA" for node in graph):
        replace_sdpa_by_mha(model)  # attention the rule did not take: ONNX Runtime's MultiHeadAttention, as onnxscript does
    pattern.RewriteRuleSet([_rule_classes()[1].rule()]).apply_to_model(model)
    optimize(model)  # inlines the fused functions no rule consumed, drops what the rewrite left unused
    common.RemoveUnusedNodesPass()(model)
    _drop_unread_norm_outputs(graph)
    left = sorted({node.op_type for node in graph if node.domain == _FUSION_DOMAIN})
    if left:
        raise ValueError(f"onnxscript's intermediate operators {', '.join(left)} were left in the graph")
    counts: dict[str, int] = {}
    for node in graph:
        if node.op_type in _FUSED_OPS:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return FusionReport(counts, reason, rotary_inside, packed)
