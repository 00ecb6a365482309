"""surgery analyze (residual-stream similarity, Block Influence, angular distance) and surgery
sweep (families of plans measured with one load of the weights)."""

from __future__ import annotations

import csv
import importlib
import importlib.util
import io
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import surgery
from surgery.analyze import residual_stream
from surgery.errors import OptionError
from surgery.plan import ParallelGroup, Plan
from surgery.sweep import PAINTERS_VARIANTS, drop_window_plans, middle_layers, painters_plans
from tests import tiny
from tests.helpers import run_cli as run

FAST: dict[str, Any] = {"max_tokens": 192, "seq_len": 64, "quiet": True, "device": "cpu"}
PNG = b"\x89PNG\r\n\x1a\n"


# -- analyze ------------------------------------------------------------------------------------------


def test_residual_stream_is_the_input_of_every_layer_before_the_final_norm() -> None:
    model = tiny.build("llama")
    ids = torch.randint(3, tiny.VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), residual_stream(model.model.layers) as states:
        out = model(input_ids=ids, output_hidden_states=True)
    hidden = out.hidden_states
    assert len(states) == tiny.NUM_LAYERS + 1
    for i in range(tiny.NUM_LAYERS):
        torch.testing.assert_close(states[i], hidden[i])
    # hidden_states[-1] has the final norm applied; the captured last state does not.
    assert not torch.allclose(states[-1], hidden[-1], atol=1e-3)
    torch.testing.assert_close(model.model.norm(states[-1]), hidden[-1])
    assert not model.model.layers[0]._forward_pre_hooks  # the hooks are gone


def test_analyze_metrics_follow_their_definitions(readable_tiny: Callable[[str], Path], text_file: Path, tmp_path: Path) -> None:
    report = surgery.analyze(readable_tiny("llama"), drop_count=2, data=text_file, plots=tmp_path / "plots", **FAST)
    n_layers = tiny.NUM_LAYERS
    similarity = torch.tensor(report.similarity)
    assert similarity.shape == (n_layers + 1, n_layers + 1)
    torch.testing.assert_close(similarity, similarity.T, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(similarity.diagonal(), torch.ones(n_layers + 1, dtype=similarity.dtype), rtol=1e-5, atol=1e-5)

    # Recompute from the hidden states of the same windows.
    model = transformers.LlamaForCausalLM.from_pretrained(readable_tiny("llama")).eval()
    from surgery.corpus import read_texts, token_windows
    from tests.tiny_text import char_tokenizer

    windows = token_windows(char_tokenizer(), read_texts(text_file), seq_len=64, max_tokens=192)
    with torch.no_grad(), residual_stream(model.model.layers) as states:
        model(input_ids=windows)
    x = torch.stack(states).double()  # (L+1, samples, tokens, hidden)
    bi = 1 - torch.nn.functional.cosine_similarity(x[:-1], x[1:], dim=-1).mean((1, 2))
    assert report.block_influence == pytest.approx(bi.tolist(), rel=1e-4)
    last = x[:, :, -1]
    angle = torch.arccos(torch.nn.functional.cosine_similarity(last[0], last[2], dim=-1).clamp(-1, 1)).mean() / math.pi
    assert report.block_distances(2)[0] == pytest.approx(float(angle), rel=1e-4)
    flat = x.permute(1, 0, 2, 3).flatten(2)
    cos_1_4 = torch.nn.functional.cosine_similarity(flat[:, 1], flat[:, 4], dim=-1).mean()
    assert report.similarity[1][4] == pytest.approx(float(cos_1_4), rel=1e-4)

    distances = [c.angular_distance for c in report.candidates]
    assert distances == sorted(distances) and len(report.candidates) == 5  # 5 windows of 2 in 6 layers
    best = report.candidates[0]
    assert best.last - best.first + 1 == 2 and best.angular_distance == min(report.block_distances(2))
    assert best.command == f"surgery prune {readable_tiny('llama')} llama-drop-{best.layers} --drop {best.layers}"
    assert report.lowest_influence == sorted(sorted(range(n_layers), key=lambda i: report.block_influence[i])[:2])
    for path in report.plots.values():
        assert path.read_bytes().startswith(PNG) and path.stat().st_size > 5000


def test_analyze_cli_prints_candidates_writes_plots_and_json(
    readable_tiny: Callable[[str], Path], text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = str(readable_tiny("gpt2"))
    common = ["--data", str(text_file), "--max-tokens", "128", "-q"]
    code, out, err = run(capsys, "analyze", model, "--drop-count", "3", "--plots", str(tmp_path / "p"), *common)
    assert code == 0, err
    assert "drop candidates: blocks of 3" in out and "--drop" in out and "Block Influence" in out
    for plot in ("similarity.png", "block-influence.png"):
        assert (tmp_path / "p" / plot).read_bytes().startswith(PNG), plot
    code, out, err = run(capsys, "analyze", model, "--json", "--no-plots", "--top", "2", *common)
    body = json.loads(out)
    assert code == 0 and body["drop_count"] == 1 and len(body["candidates"]) == 2 and body["plots"] == {}
    assert len(body["angular_distance"]["1"]) == tiny.NUM_LAYERS and len(body["block_influence"]) == tiny.NUM_LAYERS
    code, _, err = run(capsys, "analyze", model, "--drop-count", "6", "--no-plots", *common)
    assert code == 2 and "from 1 to 5" in err and len(err.strip().splitlines()) == 1


def test_analyze_encoder(readable_tiny: Callable[[str], Path], text_file: Path) -> None:
    """BERT's Block Influence equals a direct computation from its hidden states (no final norm to undo)."""
    from surgery.corpus import read_texts, token_windows

    report = surgery.analyze(readable_tiny("bert"), drop_count=1, data=text_file, **FAST)
    assert len(report.block_influence) == tiny.NUM_LAYERS
    model = transformers.BertModel.from_pretrained(readable_tiny("bert")).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(readable_tiny("bert"))
    windows = token_windows(tokenizer, read_texts(text_file), seq_len=64, max_tokens=192, special_tokens=True)
    with torch.no_grad():
        x = torch.stack(model(input_ids=windows, output_hidden_states=True).hidden_states).double()
    bi = 1 - torch.nn.functional.cosine_similarity(x[:-1], x[1:], dim=-1).mean((1, 2))
    assert report.block_influence == pytest.approx(bi.tolist(), rel=1e-4)


@pytest.mark.real
def test_smollm2_analysis(smollm2_dir: Path) -> None:
    report = surgery.analyze(smollm2_dir, drop_count=8, **{**FAST, "max_tokens": 128})
    assert report.num_layers == 30 and len(report.block_influence) == 30
    # The first layer rewrites the embedding most; the middle of the stack changes it least.
    assert max(report.block_influence) == report.block_influence[0]
    assert min(report.block_influence) < 0.1
    best = report.candidates[0]
    assert 0 < best.first and best.last < 29 and best.angular_distance < report.block_distances(8)[0]


# -- sweep families ------------------------------------------------------------------------------


def test_drop_window_family() -> None:
    plans = drop_window_plans(30, 4)
    assert len(plans) == 27 and [p.x for p in plans] == list(range(27))
    assert str(plans[10].plan) == "0-9,14-29" and all(len(p.plan) == 26 for p in plans)
    with pytest.raises(OptionError, match="from 1 to 29"):
        drop_window_plans(30, 30)


def test_painters_family_follows_the_paper() -> None:
    plans = painters_plans(30, seeds=(0, 1))
    by = {(p.variant, p.n, p.seed): p for p in plans}
    assert sorted({p.n for p in plans}) == list(range(14))  # N = 0..13: the middle keeps two layers or more
    assert len(plans) == 14 * 7
    assert middle_layers(30, 10) == list(range(11, 20))  # keep 0-10 (N+1 layers) and 20-29 (N layers)
    assert by["skip", 10, None].plan.layers == tuple(range(11)) + tuple(range(20, 30))
    assert by["middle repeat", 10, None].plan.layers == tuple(range(11)) + (15,) * 9 + tuple(range(20, 30))
    assert by["reverse", 10, None].plan.layers == tuple(range(11)) + tuple(range(19, 10, -1)) + tuple(range(20, 30))
    shuffled = [by["random order", 10, seed].plan.layers for seed in (0, 1)]
    assert shuffled[0] != shuffled[1] and all(sorted(s[11:20]) == list(range(11, 20)) for s in shuffled)
    assert all(p.affected == p.x == 9 for p in plans if p.n == 10)
    # parallel: the middle as one group on one input, averaged; looped parallel: that group three times
    assert by["parallel", 10, None].plan.layers == (*range(11), ParallelGroup(tuple(range(11, 20))), *range(20, 30))
    assert str(by["looped parallel", 10, None].plan) == "0-10,[11-19]x3,20-29"
    assert len(by["looped parallel", 10, None].plan) == 11 + 3 + 10
    assert str(painters_plans(30, seeds=(0,), n_values=[10], loop=5)[-1].plan) == "0-10,[11-19]x5,20-29"
    assert [p.variant for p in painters_plans(30, seeds=(0,), n_values=[10], loop=1)][-1] == "parallel"
    with pytest.raises(OptionError, match="N must be from 0 to 13"):
        painters_plans(30, n_values=[14])
    with pytest.raises(OptionError, match="at least 0"):
        painters_plans(30, loop=-1)


# -- sweep ---------------------------------------------------------------------------------------------


def test_sweep_measures_every_plan_with_one_load(
    readable_tiny: Callable[[str], Path], text_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # surgery.sweep is the function (exported by the package); the module is in sys.modules.
    sweep_module = importlib.import_module("surgery.sweep")
    loads: list[Any] = []
    real_load = sweep_module.load_model
    monkeypatch.setattr(sweep_module, "load_model", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    report = sweep_module.sweep(
        readable_tiny("llama"), drop_window=2, painters=True, seeds=(0, 1), plans=["0-2,2-5"], data=text_file,
        out=tmp_path / "sweep", prompts=2, new_tokens=4, **FAST,
    )
    assert len(loads) == 1
    assert len(report.rows) == 5 + 2 * 7 + 1  # drop windows, N = 0..1 x 7 variants, one custom plan
    assert {r.spec.family for r in report.rows} == {"drop-window", "painters", "custom"}

    # Each row equals validating that plan alone.
    for row in (report.rows[0], report.rows[-2]):
        alone = surgery.validate(readable_tiny("llama"), plan=row.spec.plan, data=text_file, prompts=2, new_tokens=4, **FAST)
        for metric in ("kl", "top1", "ppl_new", "greedy_agreement"):
            assert getattr(row.comparison, metric) == pytest.approx(getattr(alone.comparison, metric), rel=1e-5)

    table = list(csv.DictReader(io.StringIO((tmp_path / "sweep" / "sweep.csv").read_text())))
    assert len(table) == len(report.rows) and table[0]["plan"] == "2-5" and float(table[0]["kl"]) > 0
    body = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert len(body["rows"]) == len(report.rows) and body["files"]["plot"].endswith("sweep.png")
    assert (tmp_path / "sweep" / "sweep.png").read_bytes().startswith(PNG)
    series = report.series("painters", "kl")
    assert set(series) == set(PAINTERS_VARIANTS) and [x for x, _ in series["skip"]] == [3, 5]
    looped = [row for row in report.rows if row.spec.variant == "looped parallel"]
    assert [str(row.spec.plan) for row in looped] == ["0,[1-5]x3", "0-1,[2-4]x3,5"] and looped[1].comparison.kl > 0


def test_sweep_cli(readable_tiny: Callable[[str], Path], text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = str(readable_tiny("bert"))
    common = ["--data", str(text_file), "--max-tokens", "128", "-q"]
    code, out, err = run(capsys, "sweep", model, "--painters", "--seeds", "0", "--out", str(tmp_path / "s"), *common)
    assert code == 0, err
    assert "cos(emb)" in out and "middle repeat" in out and (tmp_path / "s" / "sweep.png").read_bytes().startswith(PNG)
    assert "looped parallel" in out and "0-1,[2-4]x3,5" in out  # BERT: the average of the post-norm outputs
    code, out, err = run(capsys, "sweep", model, "--plan", "0,5", "--plan", "0-4", "--json", "--out", str(tmp_path / "c"), *common)
    assert code == 0 and [r["plan"] for r in json.loads(out)["rows"]] == ["0,5", "0-4"]
    for argv, message in [([], "nothing to sweep"), (["--drop-window", "6"], "from 1 to 5"),
                          (["--plan", "0-7"], "out of range"), (["--painters", "--seeds", "a"], "--seeds 'a'")]:
        code, _, err = run(capsys, "sweep", model, *argv, "--out", str(tmp_path / "x"), *common)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)


@pytest.mark.real
def test_smollm2_painters_sweep_agrees_with_validate(smollm2_dir: Path) -> None:
    short = {**FAST, "max_tokens": 64, "prompts": 0}
    report = surgery.sweep(smollm2_dir, painters=True, painters_n="12", seeds=(0,), **short)
    assert [r.spec.variant for r in report.rows] == list(PAINTERS_VARIANTS)
    assert all(r.comparison.kl > 0 and r.spec.affected == 5 for r in report.rows)
    looped = report.rows[-1]
    assert str(looped.spec.plan) == "0-12,[13-17]x3,18-29" and looped.comparison.num_layers == 28
    reverse = report.rows[2]
    alone = surgery.validate(smollm2_dir, plan=reverse.spec.plan, **short)
    assert reverse.comparison.kl == pytest.approx(alone.comparison.kl, rel=1e-4)
    assert str(reverse.spec.plan) == str(Plan.reverse("13-17", 30))


@pytest.mark.real
def test_painters_example_writes_its_plot(smollm2_dir: Path, tmp_path: Path) -> None:
    """examples/painters_sweep.py, on one N and one seed so that it stays short."""
    path = Path(__file__).resolve().parents[1] / "examples" / "painters_sweep.py"
    spec = importlib.util.spec_from_file_location("painters_sweep", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    report = example.main(tmp_path / "out", max_tokens=128, painters_n="13", seeds="0", quiet=True)
    assert [r.spec.variant for r in report.rows] == list(PAINTERS_VARIANTS)
    assert (tmp_path / "out" / "sweep.png").read_bytes().startswith(PNG)
    assert (tmp_path / "out" / "sweep.csv").read_text().count("\n") == 7
