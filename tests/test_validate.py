"""surgery validate: the text set, the metrics, the bars (exit 1) and bad input (exit 2).

Tiny models (with a character tokenizer) give breadth and exact cross-checks; SmolLM2-135M and
MiniLM give the truth on real weights with short texts.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import surgery
from surgery.corpus import DEFAULT_CORPUS_NAME, MIN_TOKENS, default_text, plain_play, read_texts, token_windows
from surgery.errors import DataError, OptionError, PlanError, TokenizerMismatchError
from surgery.plan import Plan
from surgery.validate import Bar, Candidate, _Tally, check_bar_values, compare
from tests import tiny
from tests.helpers import run_cli as run
from tests.reference import reference_model
from tests.tiny_text import char_tokenizer, readable

# Small budgets: tiny models cap windows at their 64 positions.
FAST: dict[str, Any] = {"max_tokens": 256, "seq_len": 64, "prompts": 2, "new_tokens": 8, "quiet": True, "device": "cpu"}


# -- the text set --------------------------------------------------------------------------------


def test_default_corpus_is_hamlet_as_plain_text() -> None:
    text = default_text()
    assert DEFAULT_CORPUS_NAME.startswith("Hamlet")
    assert len(text) > 150_000
    assert text.startswith("Hamlet\n\nACT I\n\nSCENE I. Elsinore.")
    assert "BERNARDO.\nWho's there?" in text
    assert "To be, or not to be" in text
    assert not any(mark in text for mark in ("**", "#", "_"))


def test_plain_play_removes_markdown() -> None:
    markdown = "# Title\n\n### SCENE I. A room.\n\n_Enter KING_\n\n**KING**  \nWell met,  \nmy lord.\n\n\n\n_Exit_"
    assert plain_play(markdown) == "Title\n\nSCENE I. A room.\n\n[Enter KING]\n\nKING.\nWell met,\nmy lord.\n\n[Exit]"


def test_read_texts_reads_txt_and_jsonl(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("one document\n", encoding="utf-8")
    assert read_texts(tmp_path / "a.txt").documents == ("one document\n",)
    lines = [json.dumps({"text": "first"}), "", json.dumps({"text": "second", "id": 2})]
    (tmp_path / "b.jsonl").write_text("\n".join(lines), encoding="utf-8")
    assert read_texts(tmp_path / "b.jsonl").documents == ("first", "second")
    (tmp_path / "c.jsonl").write_text(json.dumps({"body": "x"}), encoding="utf-8")
    assert read_texts(tmp_path / "c.jsonl", text_field="body").documents == ("x",)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "", "holds no text"),
        ("blank.txt", " \n\n\t", "holds no text"),
        ("bad.jsonl", '{"text": "ok"}\nnot json', "line 2 is not JSON"),
        ("field.jsonl", '{"content": "x"}', "line 1 has no string field 'text'"),
        ("missing.txt", None, "cannot be read"),
    ],
)
def test_read_texts_refuses_bad_files(tmp_path: Path, name: str, content: str | None, message: str) -> None:
    if content is not None:
        (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_texts(tmp_path / name)


def test_token_windows_draw_with_the_seed_and_refuse_short_text() -> None:
    tokenizer = char_tokenizer()
    texts = read_texts(None)
    windows = token_windows(tokenizer, texts, seq_len=32, max_tokens=32 * 5, seed=0)
    assert windows.shape == (5, 32)
    assert torch.equal(windows, token_windows(tokenizer, texts, seq_len=32, max_tokens=160, seed=0))
    assert not torch.equal(windows, token_windows(tokenizer, texts, seq_len=32, max_tokens=160, seed=1))
    short = surgery.corpus.TextSet("short", ("x" * (MIN_TOKENS - 1),))
    with pytest.raises(DataError, match=f"at least {MIN_TOKENS}"):
        token_windows(tokenizer, short, seq_len=32, max_tokens=64)
    one = token_windows(tokenizer, surgery.corpus.TextSet("one", ("y" * 20,)), seq_len=32, max_tokens=64)
    assert one.shape == (1, 20)


def test_token_windows_wrap_encoder_windows_in_special_tokens(minilm_dir: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(minilm_dir)
    windows = token_windows(tokenizer, read_texts(None), seq_len=16, max_tokens=48, special_tokens=True)
    assert windows.shape == (3, 16)
    assert (windows[:, 0] == tokenizer.cls_token_id).all() and (windows[:, -1] == tokenizer.sep_token_id).all()


# -- the metrics ---------------------------------------------------------------------------------


def test_compare_metrics_equal_a_direct_computation() -> None:
    model = tiny.build("llama")
    layers = (0, 2, 2, 5)
    ids = torch.randint(3, tiny.VOCAB, (3, 20), generator=torch.Generator().manual_seed(7))
    measurement = compare(model, [Candidate.of_plan(model, Plan(layers, tiny.NUM_LAYERS))], ids, causal=True, batch_size=2)
    got = measurement.comparisons[0]

    with torch.no_grad():
        p = torch.log_softmax(model(ids).logits[:, :-1], -1)
        q = torch.log_softmax(reference_model(model, layers)(ids).logits[:, :-1], -1)
    targets = ids[:, 1:, None]
    assert got.tokens == 3 * 19
    assert math.isclose(got.kl, float((p.exp() * (p - q)).sum(-1).mean()), rel_tol=1e-4)
    assert math.isclose(got.top1, float((p.argmax(-1) == q.argmax(-1)).float().mean()), rel_tol=1e-6)
    assert math.isclose(got.ppl_original, math.exp(-float(p.gather(-1, targets).mean())), rel_tol=1e-4)
    assert math.isclose(got.ppl_new, math.exp(-float(q.gather(-1, targets).mean())), rel_tol=1e-4)
    assert 0 < got.kl and got.top1 < 1  # a real difference, not two copies of one model
    assert measurement.forward_tokens == 2 * ids.numel()


def test_greedy_agreement_counts_identical_tokens_and_prefixes() -> None:
    tally = _Tally()
    reference = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    tally.add_greedy(reference, torch.tensor([[1, 2, 9, 4], [5, 6, 7, 8]]))
    assert tally.greedy_same / tally.greedy_total == 7 / 8
    assert tally.greedy_prefix / tally.greedy_prompts == (2 / 4 + 4 / 4) / 2


def test_identity_plan_is_indistinguishable_from_the_original(readable_tiny: Callable[..., Path], text_file: Path) -> None:
    report = surgery.validate(readable_tiny("qwen3"), plan="0-5", data=text_file, **FAST)
    c = report.comparison
    assert c.kl == pytest.approx(0, abs=1e-6) and c.top1 == 1 and c.greedy_agreement == 1 and c.greedy_prefix == 1
    assert c.ppl_new == pytest.approx(c.ppl_original, rel=1e-6)
    assert report.measurement.seq_len == 64 and report.measurement.prompts == 2


@pytest.mark.parametrize("name", ["llama", "gemma2", "gpt2"])
def test_validate_in_memory_equals_validate_of_the_written_checkpoint(
    readable_tiny: Callable[..., Path], text_file: Path, tmp_path: Path, name: str
) -> None:
    source = readable_tiny(name)
    surgery.apply(source, tmp_path / "new", "0-2,2,4-5", quiet=True)
    written = surgery.validate(source, tmp_path / "new", data=text_file, **FAST)
    viewed = surgery.validate(source, plan="0-2,2,4-5", data=text_file, **FAST)
    assert written.plan == viewed.plan == "0-2,2,4-5"  # the written side reads NEW's recipe
    for metric in ("ppl_original", "ppl_new", "kl", "top1", "greedy_agreement", "greedy_prefix"):
        assert getattr(written.comparison, metric) == pytest.approx(getattr(viewed.comparison, metric), rel=1e-5, abs=1e-7)
    assert viewed.comparison.kl > 0


def test_validate_of_a_parallel_plan_equals_validate_of_the_wide_checkpoint(
    readable_tiny: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    """The view runs the group as the averaged layers; the written wide block must measure the same."""
    source = readable_tiny("llama")
    surgery.parallel(source, tmp_path / "wide", groups="1-3", loop=2, quiet=True)
    written = surgery.validate(source, tmp_path / "wide", data=text_file, trust_remote_code=True, **FAST)
    viewed = surgery.validate(source, plan="0,[1-3]x2,4-5", data=text_file, **FAST)
    assert written.plan == viewed.plan == "0,[1-3]x2,4-5"
    for metric in ("ppl_new", "kl", "top1", "greedy_agreement"):
        assert getattr(written.comparison, metric) == pytest.approx(getattr(viewed.comparison, metric), rel=1e-4, abs=1e-6)
    assert viewed.comparison.kl > 0


def test_encoder_gets_cosine_metrics(readable_tiny: Callable[..., Path], text_file: Path) -> None:
    same = surgery.validate(readable_tiny("bert"), plan="0-5", data=text_file, **FAST)
    assert same.kind == "encoder" and same.comparison.kl is None
    assert same.comparison.embedding_cosine == pytest.approx(1.0, abs=1e-5)
    dropped = surgery.validate(readable_tiny("bert"), plan="0,5", data=text_file, min_cosine=0.0, **FAST)
    assert 0 < dropped.comparison.hidden_cosine < 0.9999 and dropped.comparison.embedding_cosine < 0.9999
    assert "cosine, mean-pooled embeddings" in dropped.format()


# -- bars --------------------------------------------------------------------------------------------


def test_bars_compare_in_the_right_direction() -> None:
    assert Bar("max_kl", 0.5, 0.4).passed and not Bar("max_kl", 0.5, 0.6).passed
    assert Bar("min_top1", 0.8, 0.9).passed and not Bar("min_top1", 0.8, 0.7).passed
    assert "MISSED" in Bar("min_top1", 0.8, 0.7).describe() and "--min-top1 0.8" in Bar("min_top1", 0.8, 0.7).describe()


@pytest.mark.parametrize(
    ("bars", "causal", "message"),
    [
        ({"max_kl": "0.5"}, None, "must be a number"),
        ({"max_kl": float("nan")}, None, "must be a number"),
        ({"max_kl": True}, None, "must be a number"),
        ({"max_kl": -1.0}, None, "0 or more"),
        ({"min_top1": 1.5}, None, "between 0 and 1"),
        ({"min_cosine": 0.9}, True, "does not apply"),
        ({"max_kl": 0.1}, False, "does not apply"),
    ],
)
def test_bad_bars_are_refused(bars: dict[str, Any], causal: bool | None, message: str) -> None:
    with pytest.raises(OptionError, match=message):
        check_bar_values(bars, causal=causal)


# -- the command line --------------------------------------------------------------------------------


def test_cli_prints_a_table_and_json(readable_tiny: Callable[..., Path], text_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = str(readable_tiny("llama"))
    common = ["--data", str(text_file), "--max-tokens", "128", "--prompts", "2", "--new-tokens", "4", "-q"]
    code, out, err = run(capsys, "validate", model, "--plan", "0-3,5", *common)
    assert code == 0, err
    assert "perplexity" in out and "KL(original || new)" in out and "top-1 agreement" in out and "greedy agreement" in out
    code, out, err = run(capsys, "validate", model, "--plan", "0-5", "--json", "--max-kl", "0.01", "--min-top1", "0.99", *common)
    assert code == 0, err
    body = json.loads(out)
    assert body["passed"] and body["metrics"]["top1"] == 1.0 and [b["option"] for b in body["bars"]] == ["max_kl", "min_top1"]


def test_cli_exits_1_and_names_the_missed_bar(readable_tiny: Callable[..., Path], text_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = str(readable_tiny("llama"))
    common = ["--data", str(text_file), "--max-tokens", "128", "--prompts", "0", "-q"]
    code, out, err = run(capsys, "validate", model, "--plan", "0,5", "--max-kl", "1000", "--min-top1", "0.999", *common)
    assert code == 1
    assert "--min-top1 0.999" in err and "MISSED" in err and "--max-kl" not in err
    assert "Traceback" not in err and "top-1 agreement" in out
    code, _, err = run(capsys, "validate", model, "--plan", "0,5", "--max-kl", "0.000001", *common)
    assert code == 1 and "--max-kl 1e-06" in err


def test_cli_compares_a_written_checkpoint(
    readable_tiny: Callable[..., Path], text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = readable_tiny("gemma3")
    surgery.prune(source, tmp_path / "pruned", drop="2", quiet=True)
    code, out, err = run(capsys, "validate", str(source), str(tmp_path / "pruned"), "--data", str(text_file),
                         "--max-tokens", "128", "--prompts", "0", "--json", "-q")
    assert code == 0, err
    body = json.loads(out)
    assert body["plan"] == "0-1,3-5" and body["metrics"]["num_layers"] == 5 and body["metrics"]["kl"] > 0


def bad_inputs(readable_tiny: Callable[..., Path], tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    llama = str(readable_tiny("llama"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("To be.")
    other_vocab = tmp_path / "other-vocab"
    readable("llama", other_vocab)
    config = json.loads((other_vocab / "config.json").read_text())
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**config, "vocab_size": 96}))
    model.save_pretrained(other_vocab)
    return {
        "mismatched vocabulary": ([llama, str(other_vocab)], "vocabulary of 128 tokens and NEW of 96"),
        "mismatched tokenizer": ([llama, str(readable_tiny("llama", permuted=True))], "tokenizers differ"),
        "empty text": ([llama, "--plan", "0-2", "--data", str(tmp_path / "empty.txt")], "holds no text"),
        "short text": ([llama, "--plan", "0-2", "--data", str(tmp_path / "short.txt")], f"at least {MIN_TOKENS} are needed"),
        "missing text": ([llama, "--plan", "0-2", "--data", str(tmp_path / "none.txt")], "cannot be read"),
        "plan out of range": ([llama, "--plan", "0-9"], "layer 6 is out of range"),
        "plan syntax": ([llama, "--plan", "3-1"], "runs backwards"),
        "recipe for another model": ([llama, "--recipe", str(_recipe(tmp_path, 30))], "made for a model with 30 layers"),
        "bar not a number": ([llama, "--plan", "0-2", "--max-kl", "abc"], "'abc' is not a number"),
        "bar nan": ([llama, "--plan", "0-2", "--min-top1", "nan"], "not a finite number"),
        "bar out of range": ([llama, "--plan", "0-2", "--min-top1", "80"], "between 0 and 1"),
        "bar of an encoder": ([str(readable_tiny("bert")), "--plan", "0-2", "--max-kl", "0.5"], "does not apply"),
        "no NEW and no plan": ([llama], "expected ORIGINAL NEW"),
        "bad batch size": ([llama, "--plan", "0-2", "--batch-size", "0"], "batch-size must be a whole number from 1 to 65,536"),
        "absurd batch size": ([llama, "--plan", "0-2", "--batch-size", str(10**12)], "batch-size must be a whole number"),
        "absurd sequence": ([llama, "--plan", "0-2", "--seq-len", str(10**12)], "seq-len must be a whole number"),
        "absurd new tokens": ([llama, "--plan", "0-2", "--new-tokens", str(10**12)], "new-tokens must be a whole number"),
    }


def _recipe(tmp_path: Path, layers: int) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(surgery.Recipe(Plan.drop("3", layers)).to_yaml())
    return path


def test_cli_bad_input_is_one_line_and_exit_2(
    readable_tiny: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for case, (argv, message) in bad_inputs(readable_tiny, tmp_path).items():
        code, out, err = run(capsys, "validate", *argv, "--max-tokens", "64", "--prompts", "0", "-q")
        assert code == 2, (case, out, err)
        assert message in err, (case, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (case, err)


def test_api_errors_are_typed(readable_tiny: Callable[..., Path]) -> None:
    llama = readable_tiny("llama")
    with pytest.raises(TokenizerMismatchError):
        surgery.validate(llama, readable_tiny("llama", permuted=True), **FAST)
    with pytest.raises(PlanError):
        surgery.validate(llama, plan=Plan.identity(7), **FAST)
    with pytest.raises(OptionError, match="exactly one"):
        surgery.validate(llama, llama, plan="0-2", **FAST)


# -- the real models ---------------------------------------------------------------------------------


@pytest.mark.real
def test_smollm2_pruning_costs_and_identity_does_not(smollm2_dir: Path) -> None:
    short = {**FAST, "max_tokens": 128, "seq_len": 64, "prompts": 1, "new_tokens": 6}
    report = surgery.validate(smollm2_dir, plan="0-9,21-29", **short)
    c = report.comparison
    assert report.kind == "causal" and c.num_layers == 19 and c.tokens == 2 * 63
    assert 5 < c.ppl_original < 500  # an instruct model reading Shakespeare
    assert c.ppl_new > c.ppl_original and c.kl > 0.3 and c.top1 < 0.8
    assert not report.bars and report.passed
    same = surgery.validate(smollm2_dir, plan="0-29", **{**short, "prompts": 0})
    assert same.comparison.kl == pytest.approx(0, abs=1e-6) and same.comparison.top1 == 1.0


@pytest.mark.real
def test_minilm_embeddings_drift_when_layers_go(minilm_dir: Path) -> None:
    report = surgery.validate(minilm_dir, plan="0-2", min_cosine=0.999, **{**FAST, "max_tokens": 128})
    c = report.comparison
    assert report.kind == "encoder" and c.ppl_original is None
    assert 0.2 < c.embedding_cosine < 0.999 and not report.passed
    assert report.missed and "--min-cosine 0.999" in report.missed[0]
