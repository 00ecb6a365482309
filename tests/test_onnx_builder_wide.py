"""``export-onnx --graph builder`` on wide-block checkpoints (``surgery parallel``): the builder's fused graph with
each wide layer fused (one GroupQueryAttention over K·H heads, batched per-branch projections), validated against
PyTorch, served by onnxruntime-genai; both ``--mlp-input`` modes, a looped block, biases, wide first and last layers,
and what is refused.

The tiny Llama is the builder tests' (head size 16, 4 heads, 2 KV heads, hidden 64, MLP 96, 6 layers, a
character tokenizer).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from exporters.onnx_builder import builder_problem, validate_builder_graph
from exporters.onnx_genai import genai_greedy, genai_problem
from exporters.onnx_model import _load
from exporters.onnx_parity import FP32_RELATIVE_TOLERANCE
from exporters.onnx_runtime import OnnxCausalLM
from surgery.cli import main
from tests.helpers import assert_one_line_error, random_llama
from tests.test_onnx_builder import GENAI_TOKENS, _build_tiny16, _expected_tokens
from tests.tiny_text import readable

pytestmark = pytest.mark.skipif(genai_problem() is not None, reason=str(genai_problem()))

HEADS, KV_HEADS = 4, 2
# name -> (parallel arguments, cache heads per layer, (layer, K) of each wide layer); "bias": exact, on a tiny Llama
# with attention and MLP biases
CASES: dict[str, tuple[list[str], list[int], list[tuple[int, int]]]] = {
    "exact": (["--groups", "1-2,3-4"], [2, 4, 4, 2], [(1, 2), (2, 2)]),
    "shared": (["--groups", "2-4", "--loop", "2", "--mlp-input", "shared"], [2, 2, 6, 6, 2], [(2, 3), (3, 3)]),
    "bias": (["--groups", "0-1,4-5"], [4, 2, 2, 4], [(0, 2), (3, 2)]),
}


def _mode(case: str) -> str:
    return "shared" if case == "shared" else "exact"


@pytest.fixture(scope="module")
def tiny16_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("tiny16-wide")
    _build_tiny16().save_pretrained(root / "weights")
    return readable("llama", root / "llama", source=root / "weights")


def _tiny16_biased(directory: Path) -> Path:
    import transformers

    from tests import tiny

    _, values = tiny.CONFIGS["llama"]
    values = {**values, "hidden_size": 64, "intermediate_size": 96, "max_position_embeddings": 256,
              "attention_bias": True, "mlp_bias": True}
    config = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
    model = random_llama(config)
    model.save_pretrained(directory / "weights")
    return readable("llama", directory / "llama", source=directory / "weights")


@pytest.fixture(scope="module", params=sorted(CASES))
def wide_export(request: pytest.FixtureRequest, tiny16_dir: Path,
                tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """(case, the wide checkpoint, its --graph builder export)."""
    root = tmp_path_factory.mktemp(f"wide-{request.param}")
    wide, out = root / "wide", root / "onnx"
    source = _tiny16_biased(root) if request.param == "bias" else tiny16_dir
    assert main(["parallel", str(source), str(wide), *CASES[request.param][0], "--quiet"]) == 0
    assert main(["export-onnx", str(wide), str(out), "--graph", "builder", "--trust-remote-code", "--quiet"]) == 0
    return request.param, wide, out


def _wide_model(wide: Path) -> Any:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(wide), trust_remote_code=True).eval()


def test_wide_layers_fused_validated_and_reported(wide_export: tuple[str, Path, Path]) -> None:
    """One GroupQueryAttention per layer, with K·H query and K·H_kv KV heads in the wide ones; their cache inputs and
    outputs have K·H_kv heads; nothing decomposed; the report says builder, lists the wide layers as fused, and
    every check passed within the fp32 relative bound."""
    case, _, out = wide_export
    _, cache_heads, wide_layers = CASES[case]
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    ops = {node.op_type for node in graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"} <= ops
    assert not {"Pow", "Sqrt", "Softmax", "Neg", "Concat"} & ops  # no decomposed norm, attention or rotary
    gqa = {node.name: {a.name: a.i for a in node.attribute} for node in graph.node if node.op_type == "GroupQueryAttention"}
    assert len(gqa) == len(cache_heads)
    widths = dict(wide_layers)
    for layer in range(len(cache_heads)):
        attrs = gqa[f"/model/layers.{layer}/attn/GroupQueryAttention"]
        k = widths.get(layer, 1)
        assert (attrs["num_heads"], attrs["kv_num_heads"], attrs["do_rotary"]) == (k * HEADS, k * KV_HEADS, 1)
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in [*graph.input, *graph.output]}
    for layer, heads in enumerate(cache_heads):
        for name in (f"past_key_values.{layer}.key", f"present.{layer}.value"):
            assert shapes[name][1] == heads
    assert not any(node.op_type == "MatMul" and "q_proj" in node.name for node in graph.node)  # QKV packed
    if case == "bias":  # every wide projection has its bias added
        adds = {node.name for node in graph.node if node.op_type == "Add"}
        for layer, _ in wide_layers:
            for proj in ("attn/qkv_proj", "attn/o_proj", "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj"):
                assert f"/model/layers.{layer}/{proj}/Add" in adds
    report = json.loads((out / "onnx-export.json").read_text())
    assert report["graph"] == "builder" and "wide layer(s) fused" in report["graph_reason"]
    assert report["wide_layers"] == [{"layer": layer, "branches": k, "mlp_input": _mode(case), "fused": True}
                                     for layer, k in wide_layers]
    assert report["cache_heads"] == cache_heads and report["op_types"]["GroupQueryAttention"] == len(cache_heads)
    validation = report["validation"]
    assert validation["passed"] and len(validation["checks"]) == 6
    for check in validation["checks"]:
        if check["max_abs_diff"] is not None:
            assert check["max_abs_diff"] <= FP32_RELATIVE_TOLERANCE * max(1.0, check["scale"])
    genai = json.loads((out / "genai_config.json").read_text())
    assert genai["model"]["type"] == "llama" and genai["model"]["decoder"]["num_key_value_heads"] == KV_HEADS


def test_wide_builder_logits_recomputed(wide_export: tuple[str, Path, Path]) -> None:
    """Independently of the report: prefill and one decode step of surgery's runner on the fused graph against the
    wide checkpoint in transformers, within the bound."""
    import torch

    _, wide, out = wide_export
    model = _wide_model(wide)
    lm = OnnxCausalLM.load(out)
    ids = np.arange(3, 40, dtype=np.int64)[None]
    got, present = lm.forward(ids, np.ones_like(ids), np.arange(ids.shape[1], dtype=np.int64)[None], lm.empty_cache(1))
    with torch.no_grad():
        full = model(input_ids=torch.from_numpy(np.concatenate([ids, [[7]]], axis=1))).logits.numpy()
    bound = FP32_RELATIVE_TOLERANCE * max(1.0, float(np.abs(full).max()))
    assert np.abs(got - full[:, :-1]).max() <= bound
    step, _ = lm.forward(np.array([[7]]), np.ones((1, ids.shape[1] + 1), dtype=np.int64),
                         np.array([[ids.shape[1]]]), present)
    assert np.abs(step[:, -1] - full[:, -1]).max() <= bound


def test_wide_builder_greedy_in_genai(wide_export: tuple[str, Path, Path]) -> None:
    """onnxruntime-genai's 32 greedy tokens equal transformers' generate on the wide checkpoint, with the builder's
    share buffer (each layer's buffer sized from the graph: K·H_kv heads in the wide layers) and without."""
    _, wide, out = wide_export
    model = _wide_model(wide)
    for prompt in ([5, 6, 7, 8], list(range(3, 50))):
        expected = _expected_tokens(model, prompt, GENAI_TOKENS)
        assert genai_greedy(out, prompt, GENAI_TOKENS) == expected  # as written: the share buffer on
        assert genai_greedy(out, prompt, GENAI_TOKENS, share_buffer=False) == expected


def test_perturbed_branch_fails_validation(wide_export: tuple[str, Path, Path], tmp_path: Path) -> None:
    """Negative control: one branch's output projection (the second of the first wide layer) scaled by 1.001 in
    the graph; the validation of the builder's graph fails on the logits."""
    case, wide, out = wide_export
    layer, k = CASES[case][2][0]
    model = onnx.load(str(out / "model.onnx"))
    name = f"model.layers.{layer}.wide.o_proj.weight"
    init = next(t for t in model.graph.initializer if t.name == name)
    weight = onnx.numpy_helper.to_array(init).copy()
    if _mode(case) == "exact":
        weight[1] *= 1.001  # (K, H·d, D): branch 1
    else:
        per_branch = weight.shape[0] // k  # (K·H·d, D): rows of branch 1
        weight[per_branch:2 * per_branch] *= 1.001
    init.CopyFrom(onnx.numpy_helper.from_array(weight, name))
    bad = tmp_path / "bad"
    bad.mkdir()
    for file in out.iterdir():
        if file.name not in ("model.onnx", "model.onnx.data"):
            (bad / file.name).write_bytes(file.read_bytes())
    onnx.save(model, str(bad / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    report = validate_builder_graph(_load(wide, True), bad)
    assert not report.passed
    failed = [c for c in report.checks if not c.passed]
    assert failed and all(c.max_abs_diff is None or c.max_abs_diff > c.tolerance for c in failed)


def _tiny16_mistral(directory: Path) -> Path:
    import torch
    import transformers

    from tests import tiny

    _, values = tiny.CONFIGS["mistral"]
    values = {**values, "hidden_size": 64, "intermediate_size": 96, "max_position_embeddings": 256}
    config = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory / "weights")
    return readable("mistral", directory / "mistral", source=directory / "weights")


def test_wide_refusals(tiny16_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A wide block without --trust-remote-code, and a wide Mistral (the fused wide block is the builder's
    LlamaModel's): --graph builder is one line, exit 2, nothing written; auto keeps surgery's graph and says why."""
    wide = tmp_path / "wide"
    assert main(["parallel", str(tiny16_dir), str(wide), "--groups", "1-2", "--quiet"]) == 0
    assert builder_problem(wide) == "a wide-block model: its modelling code ships in the checkpoint; pass --trust-remote-code"
    assert builder_problem(wide, trust_remote_code=True) is None
    code = main(["export-onnx", str(wide), str(tmp_path / "b"), "--graph", "builder"])
    assert_one_line_error(code, capsys.readouterr().err, "--graph builder cannot export", "--trust-remote-code")
    assert not (tmp_path / "b").exists()
    mistral_wide = tmp_path / "mistral-wide"
    assert main(["parallel", str(_tiny16_mistral(tmp_path)), str(mistral_wide), "--groups", "1-2", "--quiet"]) == 0
    capsys.readouterr()  # saving the source prints a progress bar
    reason = "a wide-block model: the fused wide block is implemented for Llama-family checkpoints"
    assert (builder_problem(mistral_wide, trust_remote_code=True) or "").startswith(reason)
    code = main(["export-onnx", str(mistral_wide), str(tmp_path / "m"), "--graph", "builder", "--trust-remote-code"])
    assert_one_line_error(code, capsys.readouterr().err, "--graph builder cannot export", "not mistral")
    assert main(["export-onnx", str(mistral_wide), str(tmp_path / "a"), "--graph", "auto", "--trust-remote-code",
                 "--quiet"]) == 0
    report = json.loads((tmp_path / "a" / "onnx-export.json").read_text())
    assert report["graph"] == "surgery" and reason in report["graph_reason"] and report["validation"]["passed"]


# ------------------------------------------------------------------------------------------ real model


@pytest.mark.real
def test_smollm2_wide_blocks_builder_graph(smollm2_dir: Path, tmp_path: Path) -> None:
    """SmolLM2 `parallel --groups 10-11,12-13` (28 layers, two wide layers of 18 heads and 6 KV heads) through
    --graph builder: fused, validated, onnxruntime-genai's 32 greedy tokens equal transformers'."""
    import transformers

    import surgery

    wide = tmp_path / "wide"
    surgery.parallel(smollm2_dir, wide, groups="10-11,12-13", quiet=True)
    out = tmp_path / "onnx"
    assert main(["export-onnx", str(wide), str(out), "--graph", "builder", "--trust-remote-code", "--quiet"]) == 0
    report = json.loads((out / "onnx-export.json").read_text())
    assert report["graph"] == "builder" and report["validation"]["passed"] and report["num_layers"] == 28
    assert report["op_types"]["GroupQueryAttention"] == 28 and report["cache_heads"][10:13] == [6, 6, 3]
    assert [w["layer"] for w in report["wide_layers"]] == [10, 11]
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    heads = [{a.name: a.i for a in n.attribute}["num_heads"] for n in graph.node if n.op_type == "GroupQueryAttention"]
    assert heads == [9] * 10 + [18, 18] + [9] * 16
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    ids = tokenizer("The capital of France is Paris. The capital of Germany is")["input_ids"]
    expected = _expected_tokens(_wide_model(wide), ids, GENAI_TOKENS)
    assert genai_greedy(out, ids, GENAI_TOKENS) == expected
    assert genai_greedy(out, ids, GENAI_TOKENS, share_buffer=False) == expected
