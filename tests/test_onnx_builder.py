"""``export-onnx --graph builder|auto``: onnxruntime-genai's model builder called as a library, its fused graph
validated against PyTorch one sequence at a time, served by onnxruntime-genai and by surgery's runner; wide blocks
taken by auto (their fused graph: tests/test_onnx_builder_wide.py).

The tiny Llama here has head size 16 (hidden 64, 4 heads): ``GroupQueryAttention``'s CPU kernel refuses the
shared tiny models' head size 8 — which :func:`test_auto_keeps_surgery_graph_for_head_size_8` checks — and a
character tokenizer (the builder writes the tokenizer), and 256 positions (the builder's rotary cache is that long;
the validation prompt is 71 characters).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from exporters import onnx_builder
from exporters.onnx import validate_onnx
from exporters.onnx_builder import builder_problem
from exporters.onnx_genai import genai_greedy, genai_problem
from exporters.onnx_parity import FP32_RELATIVE_TOLERANCE, Check, OnnxValidationReport
from exporters.onnx_runtime import OnnxCausalLM
from surgery.cli import main
from surgery.errors import OptionError
from tests import tiny
from tests.helpers import assert_one_line_error
from tests.tiny_text import readable

pytestmark = pytest.mark.skipif(genai_problem() is not None, reason=str(genai_problem()))
GENAI_TOKENS = 32


def _build_tiny16() -> Any:
    import torch
    import transformers

    class_name, values = tiny.CONFIGS["llama"]
    values = {**values, "hidden_size": 64, "intermediate_size": 96, "max_position_embeddings": 256}
    model_type = values.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **values)
    config.architectures = [class_name]
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """(checkpoint directory with a character tokenizer, the fp32 PyTorch model)."""
    root = tmp_path_factory.mktemp("tiny16")
    model = _build_tiny16()
    model.save_pretrained(root / "weights")
    return readable("llama", root / "llama", source=root / "weights"), model


@pytest.fixture(scope="module")
def builder_export(tiny16: tuple[Path, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("builder") / "onnx"
    assert main(["export-onnx", str(tiny16[0]), str(out), "--graph", "builder", "--quiet"]) == 0
    return out


def _op_types(directory: Path) -> set[str]:
    return {node.op_type for node in onnx.load(str(directory / "model.onnx"), load_external_data=False).graph.node}


def _expected_tokens(model: Any, prompt_ids: list[int], count: int) -> list[int]:
    import torch

    with torch.no_grad():
        ids = torch.tensor([prompt_ids])
        return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=count, do_sample=False,
                              pad_token_id=model.generation_config.eos_token_id)[0, len(prompt_ids):].tolist()


def test_builder_graph_is_fused_validated_and_reported(builder_export: Path, tiny16: tuple[Path, Any]) -> None:
    """The builder's fused ops are in the graph; the report names the graph, its nodes and op types, and every
    validation check (prefill, decode step, greedy, per prompt) passed within the fp32 relative bound."""
    ops = _op_types(builder_export)
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "SimplifiedLayerNormalization"} <= ops
    assert not {"Pow", "ReduceMean", "Sqrt", "Softmax"} & ops  # nothing decomposed: surgery's graph has these
    report = json.loads((builder_export / "onnx-export.json").read_text())
    assert report["graph"] == "builder" and report["graph_reason"] == "asked (--graph builder)"
    assert report["op_types"]["GroupQueryAttention"] == tiny.NUM_LAYERS
    assert report["nodes"] == sum(report["op_types"].values()) < 100
    assert report["versions"]["onnxruntime_genai"] and report["cache_heads"] == [2] * tiny.NUM_LAYERS
    assert "position_ids" not in report["inputs"] and report["share_buffer"] is True
    validation = report["validation"]
    assert validation["passed"] and validation["relative_tolerance"] == FP32_RELATIVE_TOLERANCE
    logit_checks = [c for c in validation["checks"] if c["max_abs_diff"] is not None]
    assert len(logit_checks) == 4 and len(validation["checks"]) == 6
    for check in logit_checks:
        assert check["max_abs_diff"] <= FP32_RELATIVE_TOLERANCE * max(1.0, check["scale"]) == pytest.approx(check["tolerance"])
    again = validate_onnx(builder_export, tiny16[0])  # re-validation knows the graph
    assert again.passed and len(again.checks) == 6
    names = {p.name for p in builder_export.iterdir()}
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "config.json",
            "generation_config.json", "onnx-export.json"} <= names


def test_builder_graph_parity_recomputed(builder_export: Path, tiny16: tuple[Path, Any]) -> None:
    """Independently of the report: surgery's runner on the builder's graph against PyTorch, prefill logits of a
    20-token prompt within the bound; and a left-padded batch is refused (the graph takes no position ids)."""
    import torch

    lm = OnnxCausalLM.load(builder_export)
    ids = np.arange(3, 23, dtype=np.int64)[None]
    mask = np.ones_like(ids)
    got, _ = lm.forward(ids, mask, np.arange(20, dtype=np.int64)[None], lm.empty_cache(1))
    with torch.no_grad():
        want = tiny16[1](input_ids=torch.from_numpy(ids)).logits.numpy()
    assert np.abs(got - want).max() <= FP32_RELATIVE_TOLERANCE * max(1.0, float(np.abs(want).max()))
    padded = np.array([[0, 5, 6], [4, 5, 6]], dtype=np.int64)
    with pytest.raises(OptionError, match="padded batch"):
        lm.greedy(padded, np.array([[0, 1, 1], [1, 1, 1]]), max_new_tokens=2)


def test_builder_graph_greedy_in_genai_and_runner(builder_export: Path, tiny16: tuple[Path, Any],
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """32 greedy tokens of onnxruntime-genai (share buffer on, as the builder writes it, and off) and of surgery's
    runner equal transformers' generate."""
    prompt = [5, 6, 7, 8]
    expected = _expected_tokens(tiny16[1], prompt, GENAI_TOKENS)
    assert len(expected) == GENAI_TOKENS
    assert genai_greedy(builder_export, prompt, GENAI_TOKENS) == expected
    assert genai_greedy(builder_export, prompt, GENAI_TOKENS, share_buffer=False) == expected
    ours = OnnxCausalLM.load(builder_export).greedy(np.array([prompt]), max_new_tokens=GENAI_TOKENS).tokens
    assert ours[0].tolist() == expected
    assert main(["generate", str(builder_export), "--prompt", "the", "--max-new-tokens", "4"]) == 0
    assert "[CPUExecutionProvider] 4 tokens" in capsys.readouterr().err


def test_auto_takes_the_builder_and_default_stays_surgery(tiny16: tuple[Path, Any], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """auto takes the builder for a standard Llama; without --graph the export is surgery's, and says so."""
    assert main(["export-onnx", str(tiny16[0]), str(tmp_path / "auto"), "--graph", "auto", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["graph"] == "builder" and body["graph_reason"].startswith("auto:")
    assert main(["export-onnx", str(tiny16[0]), str(tmp_path / "default"), "--quiet"]) == 0
    report = json.loads((tmp_path / "default" / "onnx-export.json").read_text())
    assert report["graph"] == "surgery" and report["graph_reason"] == "the default (--graph surgery)"
    # surgery's graph, fused: GroupQueryAttention like the builder's, a few more nodes (separate Q, K, V MatMuls,
    # RotaryEmbedding outside attention); the traced graph had over 5x the builder's
    builder_nodes = json.loads((tmp_path / "auto" / "onnx-export.json").read_text())["nodes"]
    assert report["fusion"]["attention_fused"] and "GroupQueryAttention" in report["op_types"]
    assert builder_nodes < report["nodes"] < 2 * builder_nodes
    # the Python function defaults to the CLI's graph
    assert inspect.signature(onnx_builder.export_onnx_graph).parameters["graph"].default == "surgery"


def test_auto_takes_the_builder_for_a_wide_llama(tiny16: tuple[Path, Any], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """A Llama wide-block model with --trust-remote-code: auto takes the builder, its wide layers fused (more in
    tests/test_onnx_builder_wide.py); without --trust-remote-code, auto keeps surgery's graph and says why."""
    wide = tmp_path / "wide"
    assert main(["parallel", str(tiny16[0]), str(wide), "--groups", "1-2,3-4", "--quiet"]) == 0
    assert main(["export-onnx", str(wide), str(tmp_path / "a"), "--graph", "auto", "--trust-remote-code"]) == 0
    report = json.loads((tmp_path / "a" / "onnx-export.json").read_text())
    assert report["graph"] == "builder" and "2 wide layer(s) fused" in report["graph_reason"]
    assert report["cache_heads"] == [2, 4, 4, 2] and report["validation"]["passed"]
    capsys.readouterr()
    assert builder_problem(wide) == "a wide-block model: its modelling code ships in the checkpoint; pass --trust-remote-code"


def test_auto_keeps_surgery_graph_for_head_size_8(tiny_model: Callable[..., Path]) -> None:
    """The shared tiny Llama (head size 8) is not the builder's: GroupQueryAttention's CPU kernel refuses it."""
    assert builder_problem(tiny_model("llama")) == (
        "head size 8 is not a multiple of 16 (GroupQueryAttention's CPU kernel needs it)")


def test_builder_failure_is_one_line_and_debug_shows_it(tiny16: tuple[Path, Any], tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """A builder that raises: one line (OnnxExportError), exit 2, nothing written; --debug shows the traceback;
    auto falls back to surgery's graph."""

    class Broken:
        @staticmethod
        def parse_extra_options(*args: Any) -> dict[str, Any]:
            raise NotImplementedError("The model is not currently supported.\nsecond line")

    monkeypatch.setattr(onnx_builder, "_builder_module", lambda: Broken)
    out = tmp_path / "out"
    code = main(["export-onnx", str(tiny16[0]), str(out), "--graph", "builder", "--quiet"])
    assert_one_line_error(code, capsys.readouterr().err, "onnxruntime-genai model builder failed",
                          "NotImplementedError: The model is not currently supported.")
    assert not out.exists() and not list(tmp_path.iterdir())  # no staging debris either
    assert main(["export-onnx", str(tiny16[0]), str(out), "--graph", "builder", "--debug", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "NotImplementedError: The model is not currently supported." in err
    assert "OnnxExportError" in err and "second line" in err  # the builder's own exception, chained
    assert main(["export-onnx", str(tiny16[0]), str(out), "--graph", "auto", "--quiet"]) == 0
    report = json.loads((out / "onnx-export.json").read_text())
    assert report["graph"] == "surgery" and "builder's graph was not kept" in report["graph_reason"]


def test_auto_falls_back_when_the_builder_graph_fails_validation(tiny16: tuple[Path, Any], tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """A builder graph that misses the bound is never written: builder fails (exit 2), auto keeps surgery's."""
    failed = OnnxValidationReport("CPUExecutionProvider", "fp32", (Check("prefill", False, 1.0, 1e-5, "(made up)", 1.0),))
    monkeypatch.setattr(onnx_builder, "validate_builder_graph", lambda *args, **kwargs: failed)
    code = main(["export-onnx", str(tiny16[0]), str(tmp_path / "b"), "--graph", "builder", "--quiet"])
    assert_one_line_error(code, capsys.readouterr().err, "prefill")
    assert main(["export-onnx", str(tiny16[0]), str(tmp_path / "a"), "--graph", "auto", "--quiet"]) == 0
    assert json.loads((tmp_path / "a" / "onnx-export.json").read_text())["graph"] == "surgery"


def test_builder_path_options_kept_on_surgery(tiny16: tuple[Path, Any]) -> None:
    """fp16 and --share-buffer are surgery's graph only; the builder path writes fp32."""
    assert builder_problem(tiny16[0], options={"share_buffer": True}) == "--share-buffer is surgery's graph only"
    assert builder_problem(tiny16[0], dtype="fp16") == "the builder path writes fp32 only (asked fp16)"
    assert builder_problem(tiny16[0]) is None


# ------------------------------------------------------------------------------------------ real model


@pytest.mark.real
def test_smollm2_pruned_builder_graph(smollm2_dir: Path, tmp_path: Path) -> None:
    """SmolLM2 --drop 10-20 (19 layers) through the builder: 19 GroupQueryAttention nodes, validated, and
    onnxruntime-genai's 32 greedy tokens equal transformers'. About 40 s on 2 cores."""
    import torch
    import transformers

    import surgery

    pruned = tmp_path / "pruned"
    surgery.prune(smollm2_dir, pruned, drop="10-20", quiet=True)
    out = tmp_path / "onnx"
    assert main(["export-onnx", str(pruned), str(out), "--graph", "auto", "--quiet"]) == 0
    report = json.loads((out / "onnx-export.json").read_text())
    assert report["graph"] == "builder" and report["validation"]["passed"] and report["num_layers"] == 19
    assert report["op_types"]["GroupQueryAttention"] == 19 and report["nodes"] < 300
    assert "layers: 0-9,21-29" in report["source_recipe"]  # the pruning recipe, carried into the report
    ids = transformers.AutoTokenizer.from_pretrained(str(out))("The capital of France is Paris. The capital of Germany is")["input_ids"]
    model = transformers.AutoModelForCausalLM.from_pretrained(str(pruned), dtype=torch.float32).eval()
    assert genai_greedy(out, ids, GENAI_TOKENS) == _expected_tokens(model, ids, GENAI_TOKENS)
