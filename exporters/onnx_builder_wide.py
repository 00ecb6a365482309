"""The builder's fused graph for wide-block checkpoints (``surgery parallel``): onnxruntime-genai's model builder,
subclassed so that each wide layer is emitted in fused form.

Base families (:data:`WIDE_BASE_TYPES`): Llama, Mistral and Qwen 2. The builder class subclassed is the one its
``create_model`` instantiates for the base architecture (``LlamaModel``, ``MistralModel``, ``QwenModel``: read
from its source, :func:`builder_class`), so the standard layers are exactly the builder's own (``LlamaModel`` adds
only Llama 3's rotary rescaling; ``MistralModel`` and ``QwenModel`` are the builder's base ``Model``). The families
differ in their configs, which the builder and this module both read:

* biases: Qwen 2's q/k/v biases are stored in the wide layout as ``qkv_proj.bias``, packed
  ``[q_1..q_K | k_1..k_K | v_1..v_K]`` like the weight (:mod:`surgery.widen`), and added after the packed MatMul;
  output and MLP biases likewise, where the base has them;
* sliding windows: a layer is local when the config's ``layer_types`` says ``sliding_attention`` (Qwen 2 with
  ``use_sliding_window``, one entry per application in a wide checkpoint) or, with no ``layer_types`` and a
  ``sliding_window`` set (Mistral), every layer is, as in transformers (the builder's own ``MistralModel`` would
  write no window at all); a local layer's ``GroupQueryAttention``, wide or not, gets ``local_window_size``.
  The builder's windowed (ring) KV cache is turned off (``windowed_kv_cache=false``): every layer keeps a
  full-length cache (the window is the operator's mask), which surgery's runner and onnxruntime-genai serve.

A wide block of K layers, H query heads, H_kv KV heads of size d, hidden size D and MLP width I (the checkpoint
layout of :mod:`surgery.widen`: every norm weight folded into the projection it feeds, ``qkv_proj`` laid out
``[q_1..q_K | k_1..k_K | v_1..v_K]``) becomes:

* the input norm: ``(Skip)SimplifiedLayerNormalization`` with a weight of ones (the branches' weights are folded),
  carrying the residual as the builder's layers do;
* one packed QKV ``MatMul`` and ONE ``GroupQueryAttention`` with ``num_heads`` K·H and ``kv_num_heads`` K·H_kv,
  rotary inside from the builder's cos/sin caches: query head ``k·H + j`` reads KV head ``k·H_kv + j // (H/H_kv)``,
  which is GroupQueryAttention's own grouping, so every branch attends to its own keys; the layer's cache has
  K·H_kv heads (its graph input and output say so);
* ``--mlp-input exact``: the K output projections as one batched ``MatMul`` on the ``(K, H·d, D)`` stacked weight,
  ``u_k = h + attn_k`` and its norm in one ``SkipSimplifiedLayerNormalization`` over ``(K, N, D)`` (the residual
  ``h`` broadcast as its ``(N, D)`` skip), gate and up as batched ``MatMul`` s on ``(K, D, I)``, SiLU, and the down
  projection over the concatenated branches, ``(K·I, D)`` with the 1/K average built in; the new residual is
  ``mean_k u_k`` and the MLP sum is the next norm's skip input: ``h' = h + (1/K)·Σ_k [attn_k(h) + mlp_k(u_k)]``;
* ``--mlp-input shared``: one output projection ``(K·H·d, D)`` (1/K built in), one
  ``SkipSimplifiedLayerNormalization``, gate/up/down of width K·I: a standard layer with K·H heads.

A looped block (``[i-j]xR``) is emitted once per application (its own cache), its weights stored once.
Refused (:func:`wide_problem`): other base families, Qwen 3 (per-head q/k norms kept per branch) and Gemma 2/3
(those and per-branch output norms, ``1 + w`` norms, soft-capping) among them, and activations other than SiLU.
"""

from __future__ import annotations

import os
import types
from pathlib import Path
from typing import Any

from surgery.modeling_wide import BASE_KEY

# Base families whose wide layers are written fused; the builder's class for each: create_model's for its architecture.
WIDE_BASE_TYPES = ("llama", "mistral", "qwen2")
# Families surgery parallel merges whose wide layers need more than this module writes.
_NOT_FUSED = {
    "qwen3": "its per-head q/k norms, kept per branch in the wide block, are not written",
    "gemma2": "its per-branch output norms, 1 + w norms and attention soft-capping are not written",
    "gemma3_text": "its per-head q/k norms and per-branch output norms (1 + w norms) are not written",
}
_WIDE_CLASSES = ("ParallelBlock", "ParallelLoop")  # surgery.modeling_wide's layer classes


def wide_problem(config: dict[str, Any]) -> str | None:
    """Why the builder cannot write this wide-block checkpoint's fused graph, or None.

    Args:
        config: the checkpoint's ``config.json`` (``model_type`` ``surgery_parallel``).

    Returns:
        A one-line reason, or None.

    Example:
        >>> wide_problem({"surgery_base_model_type": "phi3"})
        'the fused wide block is implemented for llama, mistral and qwen2 checkpoints, not phi3'
        >>> wide_problem({"surgery_base_model_type": "mistral", "hidden_act": "silu"}) is None
        True
    """
    base = config.get(BASE_KEY)
    if base not in WIDE_BASE_TYPES:
        why = f": {_NOT_FUSED[base]}" if base in _NOT_FUSED else ""
        return f"the fused wide block is implemented for llama, mistral and qwen2 checkpoints, not {base}{why}"
    act = config.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        return f"the fused wide block writes a SiLU MLP, not {act}"
    return None


def wide_base_architecture(config: dict[str, Any]) -> str:
    """The causal-LM class name of a wide-block checkpoint's base family (``LlamaForCausalLM``, ``Qwen2ForCausalLM``),
    from transformers.

    Example:
        >>> wide_base_architecture({"surgery_base_model_type": "llama"})
        'LlamaForCausalLM'
    """
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return str(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config[BASE_KEY]])


def wide_steps(config: dict[str, Any]) -> list[tuple[int, int, str]]:
    """``(position, K, mlp_input)`` of every wide-layer application in a wide-block config.

    Example:
        >>> wide_steps({"surgery_steps": [{"sources": [0]}, {"sources": [1, 2], "loop": 2}]})
        [(1, 2, 'exact'), (2, 2, 'exact')]
    """
    out = []
    position = 0
    for step in config.get("surgery_steps") or []:
        sources, loop = list(step["sources"]), int(step.get("loop", 1))
        if len(sources) == 1 and loop == 1:
            position += 1
            continue
        for _ in range(loop):
            out.append((position, len(sources), str(step.get("mlp_input", "exact"))))
            position += 1
    return out


def wide_model_class(base: type) -> type:
    """A subclass of the builder's model class (``LlamaModel``, ``MistralModel``, ``QwenModel``: :func:`builder_class`)
    that writes wide layers fused."""

    class WideModel(base):
        num_attn_heads: int  # the builder's attributes this class reads and swaps
        num_kv_heads: int
        window_size: Any
        def __init__(self, config: Any, io_dtype: Any, onnx_dtype: Any, ep: str, cache_dir: str,
                     extra_options: dict[str, Any], base_architecture: str = "LlamaForCausalLM") -> None:
            wide = {position: (k, mode) for position, k, mode in wide_steps(config.to_dict())}
            self.wide_layers = wide  # read by make_key_value_cache_shape, which __init__ already calls
            super().__init__(config, io_dtype, onnx_dtype, ep, cache_dir, extra_options)
            self.model_type = base_architecture  # genai_config's model.type and the weights' auto class
            self._wide_written: set[str] = set()
            if getattr(config, "layer_types", None) is None and isinstance(self.window_size, int) and self.window_size > 0:
                # a window and no per-layer types (Mistral): transformers applies the window in every layer
                self.layer_types = ["sliding_attention"] * self.num_layers
            if self.attention_attrs["op_type"] != "GroupQueryAttention" or not self.attention_attrs["use_rope_in_attn"]:
                raise NotImplementedError(
                    f"the fused wide block needs GroupQueryAttention with rotary inside (execution provider {ep})")

        # -- per-layer shapes and traversal --------------------------------------------------------------------

        def make_key_value_cache_shape(self, layer_id: int, shape: list[Any]) -> list[Any]:
            shape = super().make_key_value_cache_shape(layer_id, shape)
            if layer_id in getattr(self, "wide_layers", {}):
                shape = list(shape)
                shape[1] = self.wide_layers[layer_id][0] * self.num_kv_heads
            return shape

        def is_layer(self, module: Any) -> bool:
            return bool(super().is_layer(module) or type(module).__name__ in _WIDE_CLASSES)

        def has_lm_head(self, module: Any) -> bool:  # a wide block's own Linear can have the vocabulary's width
            head = self.weights.get_output_embeddings() if hasattr(self.weights, "get_output_embeddings") else None
            return bool(super().has_lm_head(module) and (head is None or module is head))

        def make_layer(self, layer_id: int, layer: Any) -> None:
            if type(layer).__name__ not in _WIDE_CLASSES:
                super().make_layer(layer_id, layer)
                return
            block = layer._block[0] if type(layer).__name__ == "ParallelLoop" else layer
            k, mode = self.wide_layers[layer_id]
            if block.width != k or block.mlp_input != mode:
                raise ValueError(f"layer {layer_id}: the model's wide block ({block.width}, {block.mlp_input}) "
                                 f"is not the config's ({k}, {mode})")
            self.make_wide_layer(layer_id, block)
            self.layernorm_attrs["first_layernorm"] = False
            if layer_id == self.num_layers - 1:
                self.layernorm_attrs["last_layernorm"] = True

        # -- helpers -------------------------------------------------------------------------------------------

        def _weight(self, tensor: Any, name: str) -> str:
            """An initializer, written once (a looped block's applications share it)."""
            if name not in self._wide_written:
                self.make_initializer(tensor.detach().contiguous(), name, to=self.io_dtype)
                self._wide_written.add(name)
            return name

        def _node(self, op: str, inputs: list[str], name: str, shape: list[Any], domain: str = "", outputs: int = 1,
                  **attrs: Any) -> str:
            out = f"{name}/output_0"
            names = [out] if outputs == 1 else [out] + [""] * (outputs - 2) + [f"{name}/output_{outputs - 1}"]
            self.make_node(op, inputs=inputs, outputs=names, name=name, domain=domain, **attrs)
            self.make_value(out, self.io_dtype, shape=shape)
            if outputs > 1:
                self.make_value(names[-1], self.io_dtype, shape=shape)
            return out

        def _linear(self, x: str, weight: Any, bias: Any, name: str, wname: str, shape: list[Any],
                    stacked: bool = False) -> str:
            """``x @ W^T (+ b)``; ``stacked``: W is ``(K, out, in)`` and x ``(K, N, in)``, batched per branch."""
            w = self._weight(weight.transpose(-1, -2), f"{wname}.weight")
            out = self._node("MatMul", [x, w], f"{name}/MatMul", shape)
            if bias is not None:
                b = self._weight(bias[:, None, :] if stacked else bias, f"{wname}.bias")
                out = self._node("Add", [out, b], f"{name}/Add", shape)
            return out

        # -- the wide layer ------------------------------------------------------------------------------------

        def make_wide_layer(self, layer_id: int, block: Any) -> None:
            import onnx_ir
            import torch

            attn, mlp = block.self_attn, block.mlp
            k, heads, kv_heads, d = block.width, attn.num_heads, attn.num_kv_heads, attn.head_dim
            hidden = self.hidden_size
            inter = mlp.gate_up_proj.weight.shape[-2] // (2 if block.mlp_input == "exact" else 2 * k)
            base = f"/model/layers.{layer_id}"
            stored = f"model.layers.{block.layer_idx}.wide"  # weights named by the stored block: loops share them
            bsd = self.make_hidden_state_shape()

            # input norm (weights folded into qkv_proj): the residual h comes out of it as the builder's layers do
            ones = types.SimpleNamespace(weight=torch.ones(hidden))
            self.make_layernorm(layer_id, ones, skip=not self.layernorm_attrs["first_layernorm"],
                                simple=self.layernorm_attrs["simple"], location="input")
            x, h = self.layernorm_attrs["output_0"], self.layernorm_attrs["root_input"]

            # one packed QKV MatMul, one GroupQueryAttention over K·H heads (K·H_kv KV heads), rotary inside
            qkv = self._linear(x, attn.qkv_proj.weight, attn.qkv_proj.bias, f"{base}/attn/qkv_proj", f"{stored}.qkv_proj",
                               self.make_hidden_state_shape(last_dim=attn.qkv_proj.weight.shape[0]))
            cos, sin = self.make_attention_qk_rope(layer_id)
            past_k, past_v, present_k, present_v = self.make_key_value_cache_names(layer_id)
            saved = self.num_attn_heads, self.num_kv_heads, self.window_size
            self.num_attn_heads, self.num_kv_heads = k * heads, k * kv_heads
            self.window_size = saved[2] if self.is_local(layer_id) else -1
            try:
                gqa = f"{base}/attn/GroupQueryAttention"
                self.make_attention_op(gqa, layer_id=layer_id, root_input=x, q_path=qkv, k_path="", v_path="",
                                       past_k=past_k, past_v=past_v, present_k=present_k, present_v=present_v,
                                       cos_cache=cos, sin_cache=sin)
            finally:
                self.num_attn_heads, self.num_kv_heads, self.window_size = saved
            heads_out = f"{gqa}/output_0"
            ones_name = self._weight(torch.ones(hidden), "model.wide.ones")
            eps = self.layernorm_attrs["epsilon"]

            if block.mlp_input == "shared":
                # a standard layer with K·H heads and MLP width K·I (1/K built into o_proj and down_proj)
                o = self._linear(heads_out, attn.o_proj.weight, attn.o_proj.bias, f"{base}/attn/o_proj",
                                 f"{stored}.o_proj", bsd)
                norm = self._node("SkipSimplifiedLayerNormalization", [h, o, ones_name],
                                  f"{base}/post_attention_layernorm/SkipLayerNorm", bsd, "com.microsoft", 4, epsilon=eps)
                mixed = f"{base}/post_attention_layernorm/SkipLayerNorm/output_3"
                gate_up, gate_up_bias = mlp.gate_up_proj.weight, mlp.gate_up_proj.bias
                wide_i = k * inter
                split = [(gate_up[:wide_i], None if gate_up_bias is None else gate_up_bias[:wide_i]),
                         (gate_up[wide_i:], None if gate_up_bias is None else gate_up_bias[wide_i:])]
                act = self._mlp(norm, split, mlp.down_proj, base, stored, self.make_hidden_state_shape(last_dim=wide_i),
                                stacked=False)
                self.layernorm_attrs["root_input"] = mixed
                self.layernorm_attrs["skip_input"] = self._linear(act, mlp.down_proj.weight, mlp.down_proj.bias,
                                                                  f"{base}/mlp/down_proj", f"{stored}.down_proj", bsd)
                return

            # exact: per-branch output projections, batched on the stacked (K, D, H·d) weight
            flat = self._node("Reshape", [heads_out, f"/model/constants/INT64/[-1, {k}, {heads * d}]"],
                              f"{base}/wide/heads/Reshape", ["num_tokens", k, heads * d])
            branches = self._node("Transpose", [flat], f"{base}/wide/heads/Transpose", [k, "num_tokens", heads * d],
                                  perm=[1, 0, 2])
            o = self._linear(branches, attn.o_proj.weight, attn.o_proj.bias, f"{base}/attn/o_proj", f"{stored}.o_proj",
                             [k, "num_tokens", hidden], stacked=True)
            h_flat = self._node("Reshape", [h, f"/model/constants/INT64/[-1, {hidden}]"], f"{base}/wide/residual/Reshape",
                                ["num_tokens", hidden])
            # u_k = h + attn_k and its RMS norm (the post-attention norm weights are folded into gate_up_proj)
            norm = self._node("SkipSimplifiedLayerNormalization", [o, h_flat, ones_name],
                              f"{base}/post_attention_layernorm/SkipLayerNorm", [k, "num_tokens", hidden],
                              "com.microsoft", 4, epsilon=eps)
            u = f"{base}/post_attention_layernorm/SkipLayerNorm/output_3"
            gate_up, gate_up_bias = mlp.gate_up_proj.weight, mlp.gate_up_proj.bias  # (K, 2I, D), (K, 2I)
            split = [(gate_up[:, :inter], None if gate_up_bias is None else gate_up_bias[:, :inter]),
                     (gate_up[:, inter:], None if gate_up_bias is None else gate_up_bias[:, inter:])]
            act = self._mlp(norm, split, mlp.down_proj, base, stored, [k, "num_tokens", inter], stacked=True)
            # the down projection over the concatenated branches, (K·I, D) with 1/K built in, as the checkpoint has it
            act_t = self._node("Transpose", [act], f"{base}/wide/mlp/Transpose", ["num_tokens", k, inter], perm=[1, 0, 2])
            act_flat = self._node("Reshape", [act_t, f"/model/constants/INT64/[-1, {k * inter}]"],
                                  f"{base}/wide/mlp/Reshape", ["num_tokens", k * inter])
            down = self._linear(act_flat, mlp.down_proj.weight, mlp.down_proj.bias, f"{base}/mlp/down_proj",
                                f"{stored}.down_proj", ["num_tokens", hidden])
            mean_u = self._node("ReduceMean", [u, "/model/constants/INT64/[0]"], f"{base}/wide/residual/ReduceMean",
                                ["num_tokens", hidden], keepdims=0)
            shape = f"{base}/wide/residual/Shape/output_0"
            self.make_node("Shape", inputs=[h], outputs=[shape], name=f"{base}/wide/residual/Shape")
            self.make_value(shape, onnx_ir.DataType.INT64, shape=[3])
            self.layernorm_attrs["root_input"] = self._node("Reshape", [mean_u, shape], f"{base}/wide/residual/Unflatten", bsd)
            self.layernorm_attrs["skip_input"] = self._node("Reshape", [down, shape], f"{base}/wide/mlp/Unflatten", bsd)

        def _mlp(self, x: str, gate_up: list[tuple[Any, Any]], down: Any, base: str, stored: str, shape: list[Any],
                 stacked: bool) -> str:
            """SiLU(gate) * up, batched per branch when ``stacked``."""
            (gw, gb), (uw, ub) = gate_up
            gate = self._linear(x, gw, gb, f"{base}/mlp/gate_proj", f"{stored}.gate_proj", shape, stacked=stacked)
            up = self._linear(x, uw, ub, f"{base}/mlp/up_proj", f"{stored}.up_proj", shape, stacked=stacked)
            sig = self._node("Sigmoid", [gate], f"{base}/mlp/act_fn/Sigmoid", shape)
            act = self._node("Mul", [gate, sig], f"{base}/mlp/act_fn/Mul", shape)
            return self._node("Mul", [act, up], f"{base}/mlp/Mul", shape)

    return WideModel


def builder_class(builder: Any, architecture: str) -> type:
    """The builder's model class that its ``create_model`` instantiates for ``architecture``, read from its source.

    Example:
        >>> from onnxruntime_genai.models import builder  # doctest: +SKIP
        >>> builder_class(builder, "Qwen2ForCausalLM").__name__  # doctest: +SKIP
        'QwenModel'
    """
    import inspect
    import re

    source = inspect.getsource(builder.create_model)
    found = re.search(rf'config\.architectures\[0\] == "{re.escape(architecture)}":\s*\n\s*onnx_model = (\w+)\(', source)
    if found is None:
        raise NotImplementedError(f"the builder's create_model has no plain model class for {architecture}")
    return getattr(builder, found.group(1))


def run_wide_builder(builder: Any, model_dir: Path, output_dir: Path, cache_dir: Path, *, execution_provider: str,
                     extra: list[str], base_architecture: str) -> None:
    """What the builder's ``create_model`` does, with the wide subclass of its class for ``base_architecture``
    (``windowed_kv_cache=false``: every layer's cache full-length, sliding windows as ``local_window_size``).

    ``genai_config.json`` is the builder's (``past_present_share_buffer`` true, ``num_key_value_heads`` H_kv):
    onnxruntime-genai 0.18 sizes each layer's cache, the share buffer included, from the graph's per-layer head
    axis, so the wide layers get their K·H_kv heads (tested with the share buffer on and off).
    """
    os.makedirs(output_dir, exist_ok=True)
    os.makedirs(cache_dir, exist_ok=True)
    options = builder.parse_extra_options(None, str(model_dir), str(output_dir), "fp32", execution_provider,
                                          str(cache_dir), [*extra, "windowed_kv_cache=false"])
    precision = "fp32"
    effective = options.pop("_effective_builder_config", None)
    if effective is not None:
        options, precision = effective.extra_options, effective.precision
    details = options.pop("hf_details")
    config, extra_kwargs, hf_name = details["hf_config"], details["extra_kwargs"], details["hf_name"]
    io_dtype = builder.set_io_dtype(precision, execution_provider, options)
    onnx_dtype = builder.set_onnx_dtype(precision, options)
    wide_class = wide_model_class(builder_class(builder, base_architecture))
    model = wide_class(config, io_dtype, onnx_dtype, execution_provider, str(cache_dir), options,
                       base_architecture=base_architecture)
    model.make_model(str(model_dir))
    model.save_model(str(output_dir))
    model.make_genai_config(config, extra_kwargs, str(output_dir))
    model.save_processing(hf_name, extra_kwargs, str(output_dir))
