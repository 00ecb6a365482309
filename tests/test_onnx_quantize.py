"""Weight-only int4 ONNX exports (``export-onnx --quantize int4``): ONNX Runtime's MatMulNBits, measured by KL.

Tiny random models for the graph rewrite, the report, onnxruntime-genai, wide blocks, fp16 and every bad input;
SmolLM2-135M pruned (marker ``real``) for figures that mean something: KL, top-1 and the size on disk.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest

import surgery
from exporters.onnx import OnnxExportResult, export_onnx
from exporters.onnx_genai import genai_greedy, genai_problem
from exporters.onnx_quantize import check_quantize_options
from exporters.onnx_session import OnnxCausalLM
from surgery.cli import main
from surgery.errors import OnnxValidationError, OptionError
from tests.helpers import assert_one_line_error

needs_genai = pytest.mark.skipif(genai_problem() is not None, reason=str(genai_problem()))
VOCAB = 128  # tests/tiny.py


def _weight_matmuls(model: onnx.ModelProto) -> list[tuple[str, list[int]]]:
    """(name, weight shape) of every plain MatMul whose second input is a constant."""
    constants = {init.name: list(init.dims) for init in model.graph.initializer}
    return [(node.name, constants[node.input[1]]) for node in model.graph.node
            if node.op_type == "MatMul" and node.input[1] in constants]


def _nbits(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [node for node in model.graph.node if node.op_type == "MatMulNBits" and node.domain == "com.microsoft"]


def _nothing_written(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p for p in parent.iterdir() if p.name.startswith(f".{name}.")], "a staging directory was left behind"


@pytest.fixture(scope="module")
def tiny_pair(readable_tiny: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[OnnxExportResult, OnnxExportResult]:
    """The fp32 export and the int4 export of tiny Llama with a character tokenizer (so the KL runs on text)."""
    root = tmp_path_factory.mktemp("quant")
    model = readable_tiny("llama")
    return (export_onnx(model, root / "fp32", quiet=True),
            export_onnx(model, root / "int4", quantize="int4", quiet=True))


def test_int4_rewrites_every_weight_matmul(tiny_pair: tuple[OnnxExportResult, OnnxExportResult]) -> None:
    """Every weight MatMul of the float graph becomes a MatMulNBits (4 bits, block 32, symmetric: no zero points);
    attention stays GroupQueryAttention; the weights shrink to about 5 bits each."""
    fp32, int4 = tiny_pair
    float_graph = onnx.load(str(fp32.out / "model.onnx"))
    graph = onnx.load(str(int4.out / "model.onnx"))
    weights = _weight_matmuls(float_graph)
    assert len(weights) == 6 * 7 + 1  # q, k, v, o, gate, up, down per layer, and lm_head
    nodes = _nbits(graph)
    assert len(nodes) == len(weights) and _weight_matmuls(graph) == []
    attributes = [{a.name: onnx.helper.get_attribute_value(a) for a in node.attribute} for node in nodes]
    assert {(a["bits"], a["block_size"], a["accuracy_level"]) for a in attributes} == {(4, 32, 4)}
    assert sorted((a["K"], a["N"]) for a in attributes) == sorted((k, n) for _, (k, n) in weights)
    assert all(len(node.input) == 3 for node in nodes)  # symmetric: A, B, scales; no zero point
    # attention's own MatMuls (no constant input) would stay; the fused graph has none left, GroupQueryAttention
    # does them, and keeps doing them in the int4 graph
    assert fp32.fusion is not None and fp32.fusion.attention_fused
    assert sum(node.op_type == "MatMul" for node in float_graph.graph.node) == len(weights)
    assert sum(node.op_type == "MatMul" for node in graph.graph.node) == 0
    assert sum(node.op_type == "GroupQueryAttention" for node in graph.graph.node) == 6
    # The weights: int4 plus one fp32 scale per 32 rows is 5 bits a weight, against 32 (6.4x); padding K=48 to 64
    # (down_proj) costs a little.
    constants = {init.name: init for init in graph.graph.initializer}
    packed = sum(len(constants[node.input[1]].raw_data) + len(constants[node.input[2]].raw_data) for node in nodes)
    assert 5.0 < sum(4 * k * n for _, (k, n) in weights) / packed < 6.5
    meta = {p.key: p.value for p in graph.metadata_props}
    assert meta["surgery.quantize"] == "int4" and meta["surgery.block_size"] == "32"


def test_int4_report_kl_size_and_runner(tiny_pair: tuple[OnnxExportResult, OnnxExportResult]) -> None:
    """KL against PyTorch fp32 on text windows is above zero (the weights changed) and small (they did not break);
    sizes on disk are the files' sizes; onnx-export.json and the printed report carry the figures."""
    fp32, int4 = tiny_pair
    q = int4.quantization
    assert fp32.quantization is None and q is not None and q.measured
    assert q.float_bytes == (fp32.out / "model.onnx").stat().st_size  # the float graph before the rewrite
    assert q.bytes == (int4.out / "model.onnx").stat().st_size < q.float_bytes
    assert q.kl is not None and 1e-5 < q.kl < 0.05, q.format()
    assert q.top1 is not None and q.top1 > 0.5  # a random tiny model: near-flat distributions, many near-ties
    assert q.greedy_agreement is not None and q.prompts == 4 and q.new_tokens == 32
    assert q.windows * (q.seq_len - 1) == q.tokens and "Hamlet" in q.text  # the default text, tokenized
    assert q.ppl_reference is not None and q.ppl_quantized is not None and q.ppl_quantized != q.ppl_reference
    body = json.loads((int4.out / "onnx-export.json").read_text())
    assert body["quantization"]["kl"] == q.kl and body["quantization"]["bytes"] == q.bytes
    assert body["quantization"]["block_size"] == 32 and body["quantization"]["symmetric"] is True
    assert body["validation"]["passed"]  # the float graph's parity came first
    text = int4.summary()
    assert "quantized int4 (MatMulNBits, block 32, symmetric" in text and f"KL(PyTorch fp32 || int4) {q.kl:.4f}" in text
    # The runner serves the quantised graph: its greedy tokens mostly equal the fp32 graph's.
    ids = np.array([[5, 6, 7, 8, 9, 10]], dtype=np.int64)
    want = OnnxCausalLM.load(fp32.out).greedy(ids, max_new_tokens=8).tokens
    got = OnnxCausalLM.load(int4.out).greedy(ids, max_new_tokens=8).tokens
    assert got.shape == want.shape and (got == want).mean() >= 0.5


def test_validate_onnx_refuses_an_int4_export(tiny_pair: tuple[OnnxExportResult, OnnxExportResult],
                                             readable_tiny: Callable[..., Path]) -> None:
    """Re-validating an int4 directory by parity would always fail: refused with the reason instead."""
    with pytest.raises(OptionError, match="int4 .MatMulNBits. graph, which cannot meet the parity bound"):
        surgery.validate_onnx(tiny_pair[1].out, readable_tiny("llama"))
    assert surgery.validate_onnx(tiny_pair[0].out, readable_tiny("llama")).passed


@needs_genai
def test_genai_runs_the_int4_export(tiny_pair: tuple[OnnxExportResult, OnnxExportResult]) -> None:
    """onnxruntime-genai loads the int4 directory with the written genai_config.json and generates: its greedy
    tokens equal surgery's runner's on the same graph (both run the same MatMulNBits)."""
    int4 = tiny_pair[1].out
    tokens = genai_greedy(int4, [5, 6, 7, 8], 16)
    assert len(tokens) == 16
    runner = OnnxCausalLM.load(int4).greedy(np.array([[5, 6, 7, 8]], dtype=np.int64), max_new_tokens=16)
    assert tokens == runner.tokens[0].tolist()


def test_keep_lm_head_and_asymmetric(readable_tiny: Callable[..., Path], tmp_path: Path) -> None:
    """--keep-lm-head leaves exactly the projection to the vocabulary in float; --asymmetric adds zero points;
    --block-size 16 is written into every node."""
    result = export_onnx(readable_tiny("llama"), tmp_path / "o", quantize="int4", block_size=16, symmetric=False,
                         quantize_lm_head=False, validate=False, quiet=True)
    graph = onnx.load(str(result.out / "model.onnx"))
    left = _weight_matmuls(graph)
    assert [shape for _, shape in left] == [[32, VOCAB]]
    q = result.quantization
    assert q is not None and q.kept_matmuls == [left[0][0]] and not q.lm_head and not q.measured and q.kl is None
    nodes = _nbits(graph)
    assert len(nodes) == 6 * 7 and all(len(node.input) == 4 for node in nodes)  # zero points
    assert {a.i for node in nodes for a in node.attribute if a.name == "block_size"} == {16}
    assert "not measured (--no-validate)" in result.summary()


def test_wide_block_export_quantizes(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    """A wide block's stacked branch projections (o_proj and gate/up: batched MatMuls by a constant [K, in, out]
    weight, which ONNX Runtime's quantizer skips) are split into K plain MatMuls first: nothing stays in float."""
    wide = tmp_path / "wide"
    surgery.parallel(tiny_model("llama"), wide, groups="1-2,3-4", quiet=True)
    float_graph = onnx.load(str(export_onnx(wide, tmp_path / "fp32", trust_remote_code=True, validate=False,
                                            quiet=True).out / "model.onnx"))
    batched = [name for name, shape in _weight_matmuls(float_graph) if len(shape) == 3 and shape[0] == 2]
    assert len(batched) == 4  # two wide blocks, two stacked projections each
    result = export_onnx(wide, tmp_path / "onnx", trust_remote_code=True, quantize="int4", quiet=True)
    graph = onnx.load(str(result.out / "model.onnx"))
    nodes = _nbits(graph)
    assert _weight_matmuls(graph) == []
    assert len(nodes) == len(_weight_matmuls(float_graph)) + len(batched)  # each batched one became two
    assert sum("_branch" in node.name for node in nodes) == 2 * len(batched)
    q = result.quantization
    assert q is not None and q.kl is not None and 0 < q.kl < 0.05 and q.text.startswith("random token ids")
    lm = OnnxCausalLM.load(result.out)
    assert {c.heads for c in lm.cache} == {2, 4}  # the wide blocks' heads survive the rewrite


def test_fp16_int4_loads_and_agrees(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    """fp16 activations with int4 weights (the GPU combination): on the CPU it loads, MatMulNBits takes fp16
    input, and the KL against PyTorch fp32 stays small."""
    result = export_onnx(tiny_model("llama"), tmp_path / "o", dtype="fp16", quantize="int4", quiet=True)
    graph = onnx.load(str(result.out / "model.onnx"))
    assert _weight_matmuls(graph) == [] and len(_nbits(graph)) == 6 * 7 + 1
    scales = {init.name: init.data_type for init in graph.graph.initializer}
    assert {scales[node.input[2]] for node in _nbits(graph)} == {onnx.TensorProto.FLOAT16}
    q = result.quantization
    assert q is not None and q.kl is not None and 0 < q.kl < 0.05


def test_tied_lm_head_behind_a_transpose_is_quantized(tmp_path: Path) -> None:
    """A tied lm_head reaches its MatMul as Transpose(embedding) (the exporter does not fold a large vocabulary's
    transpose): it gets its own transposed copy and is quantised, the embedding's Gather keeps the float table;
    with lm_head=False the tie stays and the MatMul stays float. Outputs agree with the float graph."""
    from onnx import TensorProto, helper, numpy_helper

    from exporters.onnx_quantize import quantize_graph

    rng = np.random.default_rng(0)
    table = rng.standard_normal((VOCAB, 64)).astype(np.float32)
    layer = (rng.standard_normal((64, 64)) / 8).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["embed", "ids"], ["x"], axis=0),
         helper.make_node("MatMul", ["x", "layer"], ["h"], name="layer"),
         helper.make_node("Transpose", ["embed"], ["embed_t"], perm=[1, 0]),
         helper.make_node("MatMul", ["h", "embed_t"], ["logits"], name="lm_head")],
        "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", VOCAB])],
        [numpy_helper.from_array(table, "embed"), numpy_helper.from_array(layer, "layer")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    ids = np.arange(10, dtype=np.int64)
    import onnxruntime

    for lm_head, nbits in ((True, 2), (False, 1)):
        directory = tmp_path / str(lm_head)
        directory.mkdir()
        onnx.save(model, str(directory / "model.onnx"))
        count, kept, _ = quantize_graph(directory, vocab_size=VOCAB, lm_head=lm_head)
        written = onnx.load(str(directory / "model.onnx"))
        assert count == len(_nbits(written)) == nbits and kept == []
        assert [n.op_type for n in written.graph.node].count("Transpose") == (0 if lm_head else 1)
        assert any(init.name == "embed" for init in written.graph.initializer)  # the Gather's float table
        got = onnxruntime.InferenceSession(str(directory / "model.onnx")).run(None, {"ids": ids})[0]
        want = table[ids] @ layer @ table.T
        error = np.abs(got - want).max() / np.abs(want).max()
        assert 0 < error < 0.2, error


# ------------------------------------------------------------------------------------------ bad input


def test_option_checks() -> None:
    check_quantize_options(None, 32, None, True)
    check_quantize_options("int4", 256, 0.1, True)
    for args, message in [(("int8", 32, None, True), "unknown quantization 'int8'"),
                          (("int4", 48, None, True), "block size 48 is not supported"),
                          (("int4", 8, None, True), "block size 8"),
                          (("int4", True, None, True), "block size True"),
                          ((None, 32, 0.1, True), "--max-kl gates a quantized export"),
                          (("int4", 32, 0.1, False), "--max-kl needs the quantized graph measured"),
                          (("int4", 32, -1.0, True), "--max-kl must be")]:
        with pytest.raises(OptionError, match=message):
            check_quantize_options(*args)


@pytest.mark.parametrize(("extra", "message"), [
    (["--quantize", "int4", "--block-size", "48"], "block size 48 is not supported by MatMulNBits"),
    (["--block-size", "64"], "apply to a quantized export (add --quantize int4)"),
    (["--keep-lm-head"], "apply to a quantized export"),
    (["--quantize", "int4", "--max-kl", "0.1", "--no-validate"], "--max-kl needs the quantized graph measured"),
    (["--max-kl", "0.1"], "--max-kl gates a quantized export"),
    (["--quantize", "int3"], "invalid choice: 'int3'"),
    (["--quantize", "int4", "--block-size", "x"], "invalid int value: 'x'"),
])
def test_bad_options_exit_2_before_any_work(tiny_model: Callable[..., Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str], extra: list[str], message: str) -> None:
    code = main(["export-onnx", str(tiny_model("llama")), str(tmp_path / "o"), *extra])
    assert message in assert_one_line_error(code, capsys.readouterr().err)
    _nothing_written(tmp_path, "o")


def test_missed_kl_gate_and_encoder_write_nothing(tiny_model: Callable[..., Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """--max-kl 0 is missed by any real quantisation: exit 2, one line naming the KL, nothing written. An encoder
    has no quantised path: the same."""
    code = main(["export-onnx", str(tiny_model("llama")), str(tmp_path / "o"), "--quantize", "int4", "--max-kl", "0",
                 "--quiet"])
    err = assert_one_line_error(code, capsys.readouterr().err)
    assert "KL(PyTorch fp32 || int4)" in err and "> --max-kl 0" in err and "nothing was written" in err
    _nothing_written(tmp_path, "o")
    with pytest.raises(OnnxValidationError):
        export_onnx(tiny_model("llama"), tmp_path / "o", quantize="int4", max_kl=0.0, quiet=True)
    _nothing_written(tmp_path, "o")
    code = main(["export-onnx", str(tiny_model("bert")), str(tmp_path / "b"), "--quantize", "int4", "--quiet"])
    assert "decoder exports" in assert_one_line_error(code, capsys.readouterr().err)
    _nothing_written(tmp_path, "b")


# ------------------------------------------------------------------------------------------ real model


@pytest.mark.real
@pytest.mark.slow
def test_smollm2_pruned_int4(smollm2_dir: Path, tmp_path: Path) -> None:
    """SmolLM2-135M with layers 10-20 dropped, int4 (the tied lm_head untied and quantised too): every weight
    MatMul rewritten, about 2.2x smaller (the fp32 embedding table stays), KL against PyTorch fp32 on Hamlet
    measured and within what RTN int4 costs this model (docs/onnx.md: 0.8-1.0 nats/token)."""
    pruned = tmp_path / "m"
    surgery.prune(smollm2_dir, pruned, drop="10-20", quiet=True)
    result = export_onnx(pruned, tmp_path / "int4", quantize="int4", quiet=True)
    q = result.quantization
    assert q is not None and q.kl is not None and q.top1 is not None and q.greedy_agreement is not None
    assert q.quantized_matmuls == 19 * 5 + 1 and q.kept_matmuls == []  # packed qkv, o, gate, up, down; the head
    assert _weight_matmuls(onnx.load(str(result.out / "model.onnx"))) == []
    assert 2.0 < q.size_ratio < 2.6, q.format()
    assert 0.3 < q.kl < 1.5 and q.top1 > 0.4, q.format()
    assert len(surgery.generate(result.out, "The capital of France is", max_new_tokens=6).token_ids) == 6
