"""Surgery's graph rewritten into ONNX Runtime's fused operators (exporters/onnx_fusion.py).

Each export here runs the full validation against PyTorch (prefill, decode step, left-padded batch prefill
and step, 16 greedy tokens against ``transformers`` generate) under the fp32 bound 2e-5 x max(1, max |logit|):
the fused graph is held to what the traced graph is held to. The tests below check what the fusion did
(which layers became which kernels) and that the traced graph and the fused one agree with each other.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch

from exporters.onnx import OnnxExportResult, export_onnx
from exporters.onnx_fusion import MIN_ROTARY_POSITIONS, rotary_cache
from exporters.onnx_runtime import OnnxCausalLM
from surgery.cli import main
from surgery.errors import OptionError

NUM_LAYERS = 6


def _op_types(directory: Path) -> Counter[str]:
    return Counter(node.op_type for node in onnx.load(str(directory / "model.onnx"), load_external_data=False).graph.node)


def _graph_and_read_names(directory: Path) -> tuple[onnx.GraphProto, set[str]]:
    """The export's graph (no weights) and every name a node or the graph's outputs read."""
    graph = onnx.load(str(directory / "model.onnx"), load_external_data=False).graph
    return graph, {name for node in graph.node for name in node.input} | {output.name for output in graph.output}


@pytest.fixture(scope="module")
def exports(tiny_model: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., OnnxExportResult]:
    """``exports("llama", fuse=False, share_buffer=True)`` -> a validated fp32 export, once per module."""
    root = tmp_path_factory.mktemp("onnx-fusion")
    done: dict[tuple[Any, ...], OnnxExportResult] = {}

    def make(name: str, **options: Any) -> OnnxExportResult:
        key = (name, *sorted(options.items()))
        if key not in done:
            out = root / "-".join([name, *(f"{k}={v}" for k, v in sorted(options.items()))])
            done[key] = export_onnx(tiny_model(name), out, quiet=True, **options)
            report = done[key].validation
            assert report is not None and report.passed, report.format() if report else "no report"
        return done[key]

    return make


@pytest.mark.parametrize("name", ["llama", "qwen3", "mistral"])
def test_every_layer_becomes_fused_kernels(exports: Callable[..., OnnxExportResult], name: str) -> None:
    """Llama, Qwen 3 (per-head query/key norm kept as its own kernel) and Mistral: each layer's attention is one
    GroupQueryAttention over the grouped heads, its rotary two RotaryEmbedding, its norms fused; the decomposed
    pieces (Pow/ReduceMean RMSNorm, Neg/Concat rotary, the heads' Expand, Softmax) are gone."""
    result = exports(name)
    assert result.fusion is not None and result.fusion.attention_fused and result.fusion.reason == ""
    ops = _op_types(result.out)
    assert ops["GroupQueryAttention"] == NUM_LAYERS and ops["RotaryEmbedding"] == 2 * NUM_LAYERS
    # layer 0's input norm has no residual before it; every other norm (the final one too) adds one first
    assert ops["SkipSimplifiedLayerNormalization"] == 2 * NUM_LAYERS
    assert ops["QuickGelu"] == NUM_LAYERS  # SiLU in one kernel
    for decomposed in ("Pow", "ReduceMean", "Neg", "Softmax", "Sigmoid", "MultiHeadAttention"):
        assert ops[decomposed] == 0, decomposed
    assert ops["SimplifiedLayerNormalization"] == 1 + (2 * NUM_LAYERS if name == "qwen3" else 0)  # + q_norm, k_norm
    # The norms' mean and inv_std_var outputs, read by nobody, are not named (ONNX Runtime would compute them).
    graph, read = _graph_and_read_names(result.out)
    norms = [node for node in graph.node if node.op_type.endswith("SimplifiedLayerNormalization")]
    assert all(output == "" for node in norms for output in node.output[1:3])
    assert all(output in read for node in norms for output in node.output if output)
    saved = json.loads((result.out / "onnx-export.json").read_text())
    assert saved["fusion"]["attention_fused"] and saved["fusion"]["operators"]["GroupQueryAttention"] == NUM_LAYERS


@pytest.mark.parametrize("name", ["llama-h16", "qwen2-h16"])
def test_heads_of_16_rotate_inside_attention_from_one_packed_projection(
        exports: Callable[..., OnnxExportResult], name: str) -> None:
    """Heads of 16 (SmolLM2's are 64): each layer is one packed [q | k | v] MatMul (plus its bias Add for Qwen 2)
    feeding one GroupQueryAttention that applies the rotary itself, as the reference builder's graph; no
    RotaryEmbedding kernel is left, the three projections' MatMuls are one, and the graph says so in its metadata."""
    result = exports(name)
    fusion = result.fusion
    assert fusion is not None and fusion.attention_fused
    assert fusion.rotary_inside == fusion.packed_qkv == NUM_LAYERS
    graph = onnx.load(str(result.out / "model.onnx")).graph
    ops = Counter(node.op_type for node in graph.node)
    assert ops["GroupQueryAttention"] == NUM_LAYERS and ops["RotaryEmbedding"] == 0
    assert ops["MatMul"] == 5 * NUM_LAYERS + 1  # qkv, o, gate, up, down per layer, and the head
    producers = {out: node for node in graph.node for out in node.output}
    weights = {init.name: init.dims for init in graph.initializer}
    for node in (n for n in graph.node if n.op_type == "GroupQueryAttention"):
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        assert attributes["do_rotary"] == 1 and node.input[1] == node.input[2] == ""  # key, value packed in query
        heads, kv_heads = attributes["num_heads"], attributes["kv_num_heads"]
        projection = producers[node.input[0]]
        if name.startswith("qwen2"):  # q/k/v biases, packed as the weights
            assert projection.op_type == "Add"
            projection = next(producers[i] for i in projection.input if i in producers)
        assert projection.op_type == "MatMul" and list(weights[projection.input[1]]) == [64, (heads + 2 * kv_heads) * 16]
    meta = {p.key: p.value for p in onnx.load(str(result.out / "model.onnx"), load_external_data=False).metadata_props}
    assert meta["surgery.rotary"] == "cache_slots"
    saved = json.loads((result.out / "onnx-export.json").read_text())["fusion"]
    assert saved["rotary_inside_attention"] == saved["packed_qkv"] == NUM_LAYERS


def test_several_tokens_after_a_past(exports: Callable[..., OnnxExportResult]) -> None:
    """Rotary inside attention: one sequence takes several new tokens after a past, equal to the traced graph's
    logits (2e-5 x max |logit|); a batch of several gets a one-line OptionError naming --no-fuse (ONNX Runtime's
    kernel refuses it), which the traced graph (``--no-fuse``) runs."""
    fused, traced = OnnxCausalLM.load(exports("llama-h16").out), OnnxCausalLM.load(exports("llama-h16", fuse=False).out)
    ids = np.array([[5, 6, 7, 8], [9, 10, 11, 12]], dtype=np.int64)
    more = np.array([[13, 14, 15], [16, 17, 18]], dtype=np.int64)
    got = []
    for lm in (fused, traced):
        _, present = lm.forward(ids[:1], np.ones((1, 4), dtype=np.int64), np.arange(4)[None], lm.empty_cache(1))
        logits, _ = lm.forward(more[:1], np.ones((1, 7), dtype=np.int64), np.arange(4, 7)[None], present)
        got.append(logits)
    assert np.abs(got[0] - got[1]).max() <= 2e-5 * max(1.0, float(np.abs(got[1]).max()))
    positions = np.tile(np.arange(4), (2, 1))
    _, present = fused.forward(ids, np.ones((2, 4), dtype=np.int64), positions, fused.empty_cache(2))
    with pytest.raises(OptionError, match="3 new tokens after a past only for one sequence") as caught:
        fused.forward(more, np.ones((2, 7), dtype=np.int64), positions[:, 1:] + 3, present)
    assert "--no-fuse" in (caught.value.hint or "")
    _, present = traced.forward(ids, np.ones((2, 4), dtype=np.int64), positions, traced.empty_cache(2))
    logits, _ = traced.forward(more, np.ones((2, 7), dtype=np.int64), positions[:, 1:] + 3, present)
    assert logits.shape == (2, 3, 128)


@pytest.mark.parametrize(("name", "mlp_input"), [("llama", "exact"), ("llama-h16", "exact"), ("llama-h16", "shared")])
def test_wide_block_attention_is_one_group_query_attention(tiny_model: Callable[..., Path], tmp_path: Path, name: str,
                                                           mlp_input: str) -> None:
    """A wide block (layers 1-2 and 3-4 of six, run in parallel) fuses like any layer: one GroupQueryAttention over
    the K·H query heads and K·H_kv cache heads (the kernel's grouping is the branches'), its output reshaped per
    branch when the block keeps the branches apart (``exact``); heads of 16 rotate inside and take the block's own
    qkv projection whole. The export passes the full validation against PyTorch."""
    import surgery

    wide = tmp_path / "wide"
    surgery.parallel(tiny_model(name), wide, groups="1-2,3-4", mlp_input=mlp_input, quiet=True)
    result = export_onnx(wide, tmp_path / "onnx", trust_remote_code=True, quiet=True)
    assert result.validation is not None and result.validation.passed, result.validation.format()
    fusion = result.fusion
    assert fusion is not None and fusion.attention_fused and fusion.reason == ""
    graph = onnx.load(str(result.out / "model.onnx")).graph
    heads = []
    for node in (n for n in graph.node if n.op_type == "GroupQueryAttention"):
        attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        heads.append((attributes["num_heads"], attributes["kv_num_heads"]))
    assert heads == [(4, 2), (8, 4), (8, 4), (4, 2)]  # 6 layers -> 4: the two wide blocks carry two branches each
    inside = name.endswith("h16")
    assert fusion.rotary_inside == fusion.packed_qkv == (4 if inside else 0)
    ops = Counter(node.op_type for node in graph.node)
    assert ops["RotaryEmbedding"] == (0 if inside else 8) and ops["Softmax"] == 0
    producers = {out: node.op_type for node in graph.node for out in node.output}
    for node in (n for n in graph.node if n.op_type == "GroupQueryAttention" and inside):
        assert node.input[1] == node.input[2] == "" and producers[node.input[0]] == "MatMul"  # the packed projection


@pytest.mark.parametrize("name", ["llama", "llama-h16"])
def test_no_fuse_keeps_the_traced_graph_and_agrees_with_the_fused_one(exports: Callable[..., OnnxExportResult],
                                                                      name: str) -> None:
    """``fuse=False`` writes the traced graph (no contrib kernels); on a left-padded batch, prefill and a step
    on each graph's own cache, the fused and traced graphs' logits agree to 2e-5 x max |logit| (heads of 16:
    the rotary inside attention turns each token at its cache slot, not its position, which RoPE attention,
    depending only on the distance between tokens, does not see)."""
    fused, traced = exports(name), exports(name, fuse=False)
    assert traced.fusion is None and json.loads((traced.out / "onnx-export.json").read_text())["fusion"] is None
    ops = _op_types(traced.out)
    assert ops["GroupQueryAttention"] == 0 and ops["RotaryEmbedding"] == 0 and ops["Neg"] > 0
    assert len(onnx.load(str(traced.out / "model.onnx")).graph.node) > 3 * len(onnx.load(str(fused.out / "model.onnx")).graph.node)
    ids = np.array([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]], dtype=np.int64)
    mask = (ids != 0).astype(np.int64)
    positions = np.where(mask == 0, 1, np.cumsum(mask, axis=-1) - 1)
    logits = []
    for directory in (fused.out, traced.out):
        lm = OnnxCausalLM.load(directory)
        first, present = lm.forward(ids, mask, positions, lm.empty_cache(2))
        step_mask = np.concatenate([mask, np.ones((2, 1), dtype=np.int64)], axis=1)
        second, _ = lm.forward(np.array([[9], [10]]), step_mask, positions[:, -1:] + 1, present)
        logits.append((first[mask.astype(bool)], second))
    for got, want in zip(logits[0], logits[1], strict=True):
        assert np.abs(got - want).max() <= 2e-5 * max(1.0, float(np.abs(want).max()))


def test_attention_left_unfused_says_why(exports: Callable[..., OnnxExportResult]) -> None:
    """Gemma 3 has two rotary modules (local and global): no single cos/sin cache, so attention stays in its traced
    form and the report says why; its norms are still fused and the export still passes validation."""
    result = exports("gemma3")
    assert result.fusion is not None and not result.fusion.attention_fused
    assert "rotary" in result.fusion.reason
    ops = _op_types(result.out)
    assert ops["GroupQueryAttention"] == 0 and ops["RotaryEmbedding"] == 0
    assert "attention left unfused" in result.summary()


def test_rotary_cache_is_the_models_own_rotary(tiny_models: Callable[[str], Any]) -> None:
    """The cos/sin cache is the model's rotary module at every position (first half of its cat(freqs, freqs)),
    past max_position_embeddings (64 here) up to MIN_ROTARY_POSITIONS, where transformers computes them too; a
    model with two rotary modules has none, nor has one whose frequencies depend on the length."""
    model = tiny_models("llama")
    head_dim = model.config.hidden_size // model.config.num_attention_heads
    cache = rotary_cache(model, head_dim)
    assert cache is not None
    cos, sin = cache
    assert model.config.max_position_embeddings < MIN_ROTARY_POSITIONS
    assert cos.shape == (MIN_ROTARY_POSITIONS, head_dim // 2)
    positions = torch.tensor([[0, 3, 17, 100, MIN_ROTARY_POSITIONS - 1]])
    want_cos, want_sin = model.model.rotary_emb(torch.zeros(1, 1, head_dim), positions)
    np.testing.assert_array_equal(cos[positions[0]], want_cos[0, :, : head_dim // 2].numpy())
    np.testing.assert_array_equal(sin[positions[0]], want_sin[0, :, : head_dim // 2].numpy())
    assert rotary_cache(tiny_models("gemma3"), 8) is None
    model.model.rotary_emb.rope_type = "dynamic"
    try:
        assert rotary_cache(model, head_dim) is None
    finally:
        model.model.rotary_emb.rope_type = "default"


@pytest.mark.parametrize("name", ["llama", "llama-h16"])
def test_share_buffer_reads_only_the_valid_past(exports: Callable[..., OnnxExportResult], name: str) -> None:
    """With --share-buffer, the fused graph's presents are GroupQueryAttention's (it appends in place); what else
    read the past (its length, for the mask) reads its valid part, so a buffer longer than the past gives the
    same logits as the past alone, and the present is the buffer's length. No node's output goes unread (a
    view of a past only the kernel reads would copy the buffer every step for nothing)."""
    result = exports(name, share_buffer=True)
    graph, read = _graph_and_read_names(result.out)
    unread = [node.name for node in graph.node if not any(output and output in read for output in node.output)]
    assert unread == []
    pasts = {value.name for value in graph.input if value.name.startswith("past_key_values.")}
    kernels = [node for node in graph.node if node.op_type == "GroupQueryAttention"]
    read_raw = [name for node in graph.node if node not in kernels for name in node.input if name in pasts]
    views = [node for node in graph.node if node.name.endswith(".past_view")]
    # besides its kernel, a buffer is read only through its one view, and only the pasts read so have one
    assert sorted(read_raw) == sorted(view.input[0] for view in views) and len(set(read_raw)) == len(read_raw)
    assert len(views) < 2 * NUM_LAYERS
    lm = OnnxCausalLM.load(result.out, io_binding=False)
    ids = np.array([[5, 6, 7, 8]], dtype=np.int64)
    mask = np.ones_like(ids)
    _, present = lm.forward(ids, mask, np.arange(4)[None], lm.empty_cache(1))
    step_mask = np.ones((1, 5), dtype=np.int64)
    want, _ = lm.forward(np.array([[9]]), step_mask, np.array([[4]]), present)
    buffers = [np.concatenate([p, np.full((1, p.shape[1], 6, p.shape[3]), 7.0, dtype=p.dtype)], axis=2) for p in present]
    got, grown = lm.forward(np.array([[9]]), step_mask, np.array([[4]]), buffers)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert grown[0].shape[2] == 10  # the buffer's length; the new key written at position 4
    np.testing.assert_allclose(grown[0][:, :, :4], present[0], rtol=0, atol=0)


def test_cli_no_fuse(tiny_model: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``export-onnx`` prints the fused operators; ``--no-fuse`` writes the traced graph and says nothing of fusion."""
    assert main(["export-onnx", str(tiny_model("llama")), str(tmp_path / "fused"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert f"fused operators: {NUM_LAYERS} GroupQueryAttention" in out and "attention left unfused" not in out
    assert main(["export-onnx", str(tiny_model("llama")), str(tmp_path / "traced"), "--quiet", "--no-fuse"]) == 0
    out = capsys.readouterr().out
    assert "fused operators" not in out and "validation passed" in out
    assert _op_types(tmp_path / "traced")["GroupQueryAttention"] == 0
    assert _op_types(tmp_path / "fused")["GroupQueryAttention"] == NUM_LAYERS
