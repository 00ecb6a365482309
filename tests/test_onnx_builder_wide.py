"""``export-onnx --graph builder`` on wide-block checkpoints (``surgery parallel``): the builder's fused graph with
each wide layer fused (one GroupQueryAttention over K·H heads, batched per-branch projections), validated against
PyTorch, served by onnxruntime-genai; both ``--mlp-input`` modes, a looped block, biases, wide first and last layers,
the Llama, Mistral and Qwen 2 families, and what is refused.

The tiny Llama is the builder tests' (head size 16, 4 heads, 2 KV heads, hidden 64, MLP 96, 6 layers, a
character tokenizer). The tiny Qwen 2 and Mistral have the same shapes, every parameter (Qwen 2's q/k/v biases
included) moved off its init by noise, and sliding windows shorter than the prompts: Qwen 2 a window of 4 in
layers 3-5 (``max_window_layers`` 3), Mistral a window of 16 in every layer.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from exporters.onnx_builder import builder_problem, validate_builder_graph
from exporters.onnx_genai import genai_greedy, genai_problem
from exporters.onnx_model import _load
from exporters.onnx_parity import FP32_RELATIVE_TOLERANCE, _prompts
from exporters.onnx_runtime import OnnxCausalLM
from surgery.cli import main
from tests.helpers import assert_one_line_error, random_causal_lm, random_llama
from tests.test_onnx_builder import GENAI_TOKENS, _build_tiny16, _expected_tokens
from tests.tiny_text import readable

pytestmark = pytest.mark.skipif(genai_problem() is not None, reason=str(genai_problem()))

HEADS, KV_HEADS = 4, 2
MISTRAL_WINDOW = 16  # shorter than both validation prompts (71 and 17 tokens) and the long greedy prompt (47)
# name -> (parallel arguments, cache heads per layer, (layer, K) of each wide layer); "bias": exact, on a tiny Llama
# with attention and MLP biases; "qwen2*", "mistral*": on the tiny Qwen 2 and Mistral
CASES: dict[str, tuple[list[str], list[int], list[tuple[int, int]]]] = {
    "exact": (["--groups", "1-2,3-4"], [2, 4, 4, 2], [(1, 2), (2, 2)]),
    "shared": (["--groups", "2-4", "--loop", "2", "--mlp-input", "shared"], [2, 2, 6, 6, 2], [(2, 3), (3, 3)]),
    "bias": (["--groups", "0-1,4-5"], [4, 2, 2, 4], [(0, 2), (3, 2)]),
    "qwen2": (["--groups", "1-2,4-5"], [2, 4, 2, 4], [(1, 2), (3, 2)]),
    "qwen2-shared": (["--groups", "3-5", "--loop", "2", "--mlp-input", "shared"], [2, 2, 2, 6, 6], [(3, 3), (4, 3)]),
    "mistral": (["--groups", "1-2,3-4"], [2, 4, 4, 2], [(1, 2), (2, 2)]),
    "mistral-shared": (["--groups", "0-1", "--mlp-input", "shared"], [4, 2, 2, 2, 2], [(0, 2)]),
}
# GroupQueryAttention's local_window_size per layer (-1: full attention); Llama cases: -1 everywhere
WINDOWS = {
    "qwen2": [-1, -1, 4, 4],  # layers 0 and [1-2] full; 3 and [4-5] sliding
    "qwen2-shared": [-1, -1, -1, 4, 4],
    "mistral": [MISTRAL_WINDOW] * 4,  # Mistral's window is every layer's
    "mistral-shared": [MISTRAL_WINDOW] * 5,
}
# config values of the tiny Qwen 2 and Mistral beyond the builder tests' shapes (the builder needs an eos id)
TINY16_EXTRA: dict[str, dict[str, Any]] = {"qwen2": {"bos_token_id": 1, "eos_token_id": 2},
                                           "mistral": {"sliding_window": MISTRAL_WINDOW}}


def _mode(case: str) -> str:
    return "shared" if case.endswith("shared") else "exact"


def _family(case: str) -> str:
    return case.split("-")[0] if case.startswith(("qwen2", "mistral")) else "llama"


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


def _tiny16(family: str, directory: Path) -> Path:
    """The tiny Qwen 2 or Mistral (head size 16, every parameter off its init) with the character tokenizer."""
    import transformers

    from tests import tiny

    architecture, values = tiny.CONFIGS[family]
    values = {**values, "hidden_size": 64, "intermediate_size": 96, "max_position_embeddings": 256,
              **TINY16_EXTRA[family]}
    config = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
    random_causal_lm(config, architecture).save_pretrained(directory / "weights")
    return readable(family, directory / family, source=directory / "weights")


@pytest.fixture(scope="module", params=sorted(CASES))
def wide_export(request: pytest.FixtureRequest, tiny16_dir: Path,
                tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """(case, the wide checkpoint, its --graph builder export)."""
    root = tmp_path_factory.mktemp(f"wide-{request.param}")
    wide, out = root / "wide", root / "onnx"
    family = _family(request.param)
    source = (_tiny16_biased(root) if request.param == "bias" else
              tiny16_dir if family == "llama" else _tiny16(family, root))
    assert main(["parallel", str(source), str(wide), *CASES[request.param][0], "--quiet"]) == 0
    assert main(["export-onnx", str(wide), str(out), "--graph", "builder", "--trust-remote-code", "--quiet"]) == 0
    return request.param, wide, out


def _wide_model(wide: Path) -> Any:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(wide), trust_remote_code=True).eval()


def test_wide_layers_fused_validated_and_reported(wide_export: tuple[str, Path, Path]) -> None:
    """One GroupQueryAttention per layer, with K·H query and K·H_kv KV heads in the wide ones and each layer's
    sliding window (Qwen 2's local layers, every Mistral layer); their cache inputs and outputs have K·H_kv heads;
    nothing decomposed; biases added; the report says builder, lists the wide layers as fused, and every check
    passed within the fp32 relative bound; genai_config names the base family."""
    case, _, out = wide_export
    _, cache_heads, wide_layers = CASES[case]
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    ops = {node.op_type for node in graph.node}
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"} <= ops
    assert not {"Pow", "Sqrt", "Softmax", "Neg", "Concat"} & ops  # no decomposed norm, attention or rotary
    gqa = {node.name: {a.name: a.i for a in node.attribute} for node in graph.node if node.op_type == "GroupQueryAttention"}
    assert len(gqa) == len(cache_heads)
    widths = dict(wide_layers)
    windows = WINDOWS.get(case, [-1] * len(cache_heads))
    for layer in range(len(cache_heads)):
        attrs = gqa[f"/model/layers.{layer}/attn/GroupQueryAttention"]
        k = widths.get(layer, 1)
        assert (attrs["num_heads"], attrs["kv_num_heads"], attrs["do_rotary"]) == (k * HEADS, k * KV_HEADS, 1)
        assert attrs.get("local_window_size", -1) == windows[layer], layer
        assert not attrs.get("sliding_window_cache"), layer  # a full-length cache in every layer
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in [*graph.input, *graph.output]}
    for layer, heads in enumerate(cache_heads):
        for name in (f"past_key_values.{layer}.key", f"present.{layer}.value"):
            assert shapes[name][1] == heads
    assert not any(node.op_type == "MatMul" and "q_proj" in node.name for node in graph.node)  # QKV packed
    adds = {node.name for node in graph.node if node.op_type == "Add"}
    if case == "bias":  # every wide projection has its bias added
        for layer, _ in wide_layers:
            for proj in ("attn/qkv_proj", "attn/o_proj", "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj"):
                assert f"/model/layers.{layer}/{proj}/Add" in adds
    if _family(case) == "qwen2":  # Q/K/V biases only, in every layer
        assert {f"/model/layers.{layer}/attn/qkv_proj/Add" for layer in range(len(cache_heads))} <= adds
        assert not any("o_proj" in name or "mlp" in name for name in adds)
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
    assert genai["model"]["type"] == _family(case) and genai["model"]["decoder"]["num_key_value_heads"] == KV_HEADS
    assert "sliding_window" not in genai["model"]["decoder"]  # no ring cache: windows are the operator's


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


def _edited_copy(out: Path, directory: Path, name: str, edit: Any) -> Path:
    """A copy of the export in ``directory`` with the initializer ``name`` replaced by ``edit(its array)``."""
    model = onnx.load(str(out / "model.onnx"))
    init = next(t for t in model.graph.initializer if t.name == name)
    init.CopyFrom(onnx.numpy_helper.from_array(edit(onnx.numpy_helper.to_array(init).copy()), name))
    directory.mkdir()
    for file in out.iterdir():
        if file.name not in ("model.onnx", "model.onnx.data"):
            (directory / file.name).write_bytes(file.read_bytes())
    onnx.save(model, str(directory / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return directory


def _assert_fails_on_logits(wide: Path, directory: Path) -> None:
    report = validate_builder_graph(_load(wide, True), directory)
    assert not report.passed
    failed = [c for c in report.checks if not c.passed]
    assert failed and all(c.max_abs_diff is None or c.max_abs_diff > c.tolerance for c in failed)


def test_perturbed_branch_fails_validation(wide_export: tuple[str, Path, Path], tmp_path: Path) -> None:
    """Negative control: one branch's output projection (the second of the first wide layer) scaled by 1.001 in
    the graph; the validation of the builder's graph fails on the logits."""
    case, wide, out = wide_export
    layer, k = CASES[case][2][0]

    def scale_branch_1(weight: np.ndarray) -> np.ndarray:
        if _mode(case) == "exact":
            weight[1] *= 1.001  # (K, H·d, D): branch 1
        else:
            per_branch = weight.shape[0] // k  # (K·H·d, D): rows of branch 1
            weight[per_branch:2 * per_branch] *= 1.001
        return weight

    _assert_fails_on_logits(wide, _edited_copy(out, tmp_path / "bad", f"model.layers.{layer}.wide.o_proj.weight",
                                               scale_branch_1))


@pytest.mark.parametrize("wide_export", ["bias", "qwen2", "qwen2-shared"], indirect=True)
def test_mispacked_qkv_bias_fails_validation(wide_export: tuple[str, Path, Path], tmp_path: Path) -> None:
    """Negative control for the bias layout: the first wide layer's fused Q/K/V bias re-packed per branch,
    ``[q_1 k_1 v_1 | q_2 k_2 v_2 | ...]``, instead of the weight's ``[q_1..q_K | k_1..k_K | v_1..v_K]``, fails the
    validation on the logits; the same copy with the bias as written passes (the failure is the layout's)."""
    case, wide, out = wide_export
    layer, k = CASES[case][2][0]
    q, kv = HEADS * 16, KV_HEADS * 16  # per branch, head size 16

    def per_branch(bias: np.ndarray) -> np.ndarray:
        qs, ks, vs = np.split(bias, [k * q, k * (q + kv)])
        return np.concatenate([part for b in range(k) for part in (qs[b * q:(b + 1) * q], ks[b * kv:(b + 1) * kv],
                                                                   vs[b * kv:(b + 1) * kv])])

    name = f"model.layers.{layer}.wide.qkv_proj.bias"
    assert validate_builder_graph(_load(wide, True), _edited_copy(out, tmp_path / "same", name, lambda b: b)).passed
    _assert_fails_on_logits(wide, _edited_copy(out, tmp_path / "bad", name, per_branch))


@pytest.mark.parametrize("wide_export", ["qwen2"], indirect=True)
def test_prompts_of_a_wide_export_without_the_config_warning(wide_export: tuple[str, Path, Path]) -> None:
    """The validation prompts of a wide-block export (its config.json is surgery_parallel's) are tokenised by the
    tokenizer the user gets (AutoTokenizer with trust_remote_code) without transformers' warning that a model of
    type surgery_parallel instantiates a model of type '' (which AutoTokenizer alone, on the same directory, logs)."""
    import transformers
    from transformers.utils import logging as hf_logging

    _, wide, out = wide_export
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_warning()  # an earlier export in this process may have left it at error
    try:
        prompts = _prompts(out, 128)
        warned = [r.getMessage() for r in records if "surgery_parallel" in r.getMessage()]
        transformers.AutoTokenizer.from_pretrained(str(out), trust_remote_code=False)  # the control: the cause
        control = [r.getMessage() for r in records if "surgery_parallel" in r.getMessage()]
    finally:
        logger.removeHandler(handler)
        hf_logging.set_verbosity(verbosity)
    assert not warned and control
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(wide), trust_remote_code=True)
    assert prompts[1] == tokenizer("def fibonacci(n):")["input_ids"] and len(prompts[0]) > MISTRAL_WINDOW


def test_wide_refusals(tiny16_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A wide block without --trust-remote-code, and a wide Qwen 3 (its per-head q/k norms, kept per branch, are not
    written): --graph builder is one line, exit 2, nothing written; auto keeps surgery's graph and says why."""
    wide = tmp_path / "wide"
    assert main(["parallel", str(tiny16_dir), str(wide), "--groups", "1-2", "--quiet"]) == 0
    assert builder_problem(wide) == "a wide-block model: its modelling code ships in the checkpoint; pass --trust-remote-code"
    assert builder_problem(wide, trust_remote_code=True) is None
    code = main(["export-onnx", str(wide), str(tmp_path / "b"), "--graph", "builder"])
    assert_one_line_error(code, capsys.readouterr().err, "--graph builder cannot export", "--trust-remote-code")
    assert not (tmp_path / "b").exists()
    qwen3_wide = tmp_path / "qwen3-wide"
    assert main(["parallel", str(readable("qwen3", tmp_path / "qwen3")), str(qwen3_wide), "--groups", "2-3",
                 "--quiet"]) == 0
    capsys.readouterr()  # saving the source prints a progress bar
    reason = ("a wide-block model: the fused wide block is implemented for llama, mistral and qwen2 checkpoints, "
              "not qwen3: its per-head q/k norms")
    assert (builder_problem(qwen3_wide, trust_remote_code=True) or "").startswith(reason)
    code = main(["export-onnx", str(qwen3_wide), str(tmp_path / "q"), "--graph", "builder", "--trust-remote-code"])
    assert_one_line_error(code, capsys.readouterr().err, "--graph builder cannot export", "not qwen3")
    assert not (tmp_path / "q").exists()
    assert main(["export-onnx", str(qwen3_wide), str(tmp_path / "a"), "--graph", "auto", "--trust-remote-code",
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
