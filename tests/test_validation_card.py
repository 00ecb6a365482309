"""Validation recorded in the card, ``--validate`` on the writing verbs, and the push that publishes only
validated weights (issue #17).

Tiny models with a character tokenizer (``readable_tiny``) measure in a second; the Hub is the local
fake of tests/hub_server.py.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from huggingface_hub import ModelCard, hf_hub_download
from huggingface_hub.repocard_data import model_index_to_eval_results

import surgery
from exporters.card import CARD_FILENAME, check_validated, output_identity, update_card_with_validation
from surgery.errors import UnvalidatedOutputError
from surgery.plan import RECIPE_FILENAME
from tests.helpers import HUB_TOKEN as TOKEN
from tests.helpers import assert_one_line_error
from tests.helpers import run_cli as run
from tests.hub_server import FakeHub

FAST: dict[str, Any] = {"max_tokens": 128, "seq_len": 64, "prompts": 0, "quiet": True, "device": "cpu"}
FAST_CLI = ["--max-tokens", "128", "--seq-len", "64", "--prompts", "0", "--device", "cpu", "-q"]


def _card(out: Path) -> ModelCard:
    return ModelCard((out / CARD_FILENAME).read_text(encoding="utf-8"))


def _rows(out: Path) -> list[dict[str, Any]]:
    return _card(out).data.get("layer_surgery")["validation"]


@pytest.fixture
def pruned(readable_tiny: Callable[..., Path], tmp_path: Path) -> Path:
    out = tmp_path / "pruned"
    surgery.prune(readable_tiny("llama"), out, drop="2", quiet=True)
    return out


@pytest.fixture
def other_text(text_file: Path, tmp_path: Path) -> Path:
    path = tmp_path / "other.txt"
    path.write_text(text_file.read_text(encoding="utf-8")[::-1], encoding="utf-8")
    return path


# -- surgery validate records its report in the card -------------------------------------------------


def test_validate_records_one_row_per_text_and_replaces_the_same_text(
    readable_tiny: Callable[..., Path], pruned: Path, text_file: Path, other_text: Path
) -> None:
    assert "Not validated yet" in _card(pruned).text
    first = surgery.validate(readable_tiny("llama"), pruned, data=text_file, **FAST)
    assert first.card == str(pruned / CARD_FILENAME)
    rows = _rows(pruned)
    assert [row["text"] for row in rows] == ["hamlet.txt"]  # the file's name, not its local path
    assert rows[0]["kl"] == pytest.approx(first.comparison.kl, rel=1e-5) and rows[0]["tokens"] == first.comparison.tokens
    assert "Not validated yet" not in _card(pruned).text
    assert f"| hamlet.txt | {first.comparison.tokens:,} | {first.comparison.kl:.4g} |" in _card(pruned).text

    surgery.validate(readable_tiny("llama"), pruned, data=other_text, **FAST)
    again = surgery.validate(readable_tiny("llama"), pruned, data=text_file, **{**FAST, "max_tokens": 192})
    rows = _rows(pruned)
    assert [row["text"] for row in rows] == ["hamlet.txt", "other.txt"]  # replaced in place, the other kept
    assert rows[0]["tokens"] == again.comparison.tokens != first.comparison.tokens
    text = _card(pruned).text
    assert text.count("| text | tokens |") == 1 and text.count("| hamlet.txt |") == 1 and "| other.txt |" in text
    # the record names the weights and recipe measured
    assert {k: _card(pruned).data.get("layer_surgery")[k] for k in ("weights_sha256", "recipe_sha256")} == \
        output_identity(pruned)


def test_the_model_index_parses_back_with_huggingface_hub(
    readable_tiny: Callable[..., Path], pruned: Path, text_file: Path
) -> None:
    report = surgery.validate(readable_tiny("llama"), pruned, data=text_file, max_kl=100.0, **FAST)
    metadata = yaml.safe_load((pruned / CARD_FILENAME).read_text().split("---")[1])
    name, results = model_index_to_eval_results(metadata["model-index"])
    assert name == "pruned"
    assert {r.task_type for r in results} == {"text-generation"}
    assert {r.dataset_name for r in results} == {"hamlet.txt"} and {r.dataset_type for r in results} == {"hamlet-txt"}
    values = {r.metric_type: r.metric_value for r in results}
    assert values == {
        "kl_divergence": pytest.approx(report.comparison.kl, rel=1e-5),
        "top1_agreement": pytest.approx(report.comparison.top1, rel=1e-5),
        "perplexity": pytest.approx(report.comparison.ppl_new, rel=1e-5),
    }
    assert all(r.metric_name for r in results)
    # the ModelCard object sees the same results
    assert len(_card(pruned).data.eval_results) == 3
    assert "max-kl 100.0: met" in _card(pruned).text


def test_rows_measured_on_other_weights_are_dropped(pruned: Path) -> None:
    update_card_with_validation(pruned, {"text": "a", "kl": 0.1}, identity={"weights_sha256": "1" * 64, "recipe_sha256": None})
    update_card_with_validation(pruned, {"text": "b", "kl": 0.2}, identity={"weights_sha256": "1" * 64, "recipe_sha256": None})
    assert [row["text"] for row in _rows(pruned)] == ["a", "b"]
    update_card_with_validation(pruned, {"text": "b", "kl": 0.3})  # the real weights: a and b described others
    assert _rows(pruned) == [{"text": "b", "kl": 0.3}]


def test_no_card_leaves_the_card_alone(
    readable_tiny: Callable[..., Path], pruned: Path, text_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = (pruned / CARD_FILENAME).read_bytes()
    code, out, err = run(capsys, "validate", str(readable_tiny("llama")), str(pruned), "--data", str(text_file),
                         "--no-card", "--json", *FAST_CLI)
    assert code == 0, err
    assert json.loads(out)["card"] is None and (pruned / CARD_FILENAME).read_bytes() == before
    code, out, err = run(capsys, "validate", str(readable_tiny("llama")), str(pruned), "--data", str(text_file), *FAST_CLI)
    assert code == 0, err
    assert f"card      recorded in {pruned / CARD_FILENAME}" in out
    assert (pruned / CARD_FILENAME).read_bytes() != before and _rows(pruned)[0]["text"] == "hamlet.txt"


def test_a_missed_gate_is_recorded_and_exits_1(
    readable_tiny: Callable[..., Path], pruned: Path, text_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "validate", str(readable_tiny("llama")), str(pruned), "--data", str(text_file),
                       "--max-kl", "1e-9", *FAST_CLI)
    assert code == 1 and "MISSED" in err
    assert _rows(pruned)[0]["passed"] is False and "max-kl 1e-09: **missed**" in _card(pruned).text
    with pytest.raises(UnvalidatedOutputError, match="missed gate on hamlet.txt"):
        check_validated(pruned)


# -- --validate on the writing verbs -----------------------------------------------------------------


def test_prune_validate_prints_records_and_reports_in_json(
    readable_tiny: Callable[..., Path], text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "prune", str(readable_tiny("llama")), str(out), "--drop", "2", "--validate",
                            "--data", str(text_file), "--max-kl", "100", "--json", *FAST_CLI)
    assert code == 0, err
    body = json.loads(stdout)
    assert body["validation"]["passed"] and body["validation"]["card"] == str(out / CARD_FILENAME)
    assert body["validation"]["metrics"]["num_layers"] == 5
    assert _rows(out)[0]["kl"] == pytest.approx(body["validation"]["metrics"]["kl"], rel=1e-5)
    check_validated(out)  # what push checks: passes
    # the text report follows the layer mapping
    code, stdout, err = run(capsys, "repeat", str(readable_tiny("llama")), str(tmp_path / "rep"), "--layers", "1-2",
                            "--validate", "--data", str(text_file), *FAST_CLI)
    assert code == 0, err
    assert "KL(original || new)" in stdout and f"recorded in {tmp_path / 'rep' / CARD_FILENAME}" in stdout


@pytest.mark.parametrize(("verb", "args"), [
    ("reorder", ["--reverse", "1-4", "--seed", "3"]),  # --seed stays the shuffle's
    ("apply", ["--layers", "0-3,5"]),
    ("parallel", ["--groups", "1-2"]),
])
def test_every_writing_verb_validates_and_gates(
    readable_tiny: Callable[..., Path], text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    verb: str, args: list[str],
) -> None:
    out = tmp_path / verb
    code, _, err = run(capsys, verb, str(readable_tiny("llama")), str(out), *args, "--validate",
                       "--data", str(text_file), "--max-kl", "1e-9", *FAST_CLI)
    assert code == 1 and "surgery: validation failed: --max-kl 1e-09" in err
    assert (out / "config.json").is_file() and _rows(out)[0]["passed"] is False  # OUT stays, saying so


def test_dry_run_validate_measures_the_plan_and_writes_nothing(
    readable_tiny: Callable[..., Path], text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, stdout, err = run(capsys, "prune", str(readable_tiny("llama")), str(tmp_path / "never"), "--drop", "2",
                            "--dry-run", "--validate", "--data", str(text_file), "--json", *FAST_CLI)
    assert code == 0, err
    body = json.loads(stdout)
    assert body["validation"]["plan"] == "0-1,3-5" and body["validation"]["card"] is None
    assert body["validation"]["metrics"]["kl"] > 0 and not (tmp_path / "never").exists()


def test_validate_options_are_checked_before_anything_is_written(
    readable_tiny: Callable[..., Path], tiny_model: Callable[..., Path], tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = str(readable_tiny("llama"))
    cases = [
        (["--max-kl", "0.5"], "max_kl apply only with validate"),
        (["--data", "x.txt"], "data apply only with validate"),
        (["--batch-size", "2"], "measure apply only with validate"),
        (["--validate", "--data", str(tmp_path / "none.txt")], "cannot be read"),
        (["--validate", "--min-top1", "80"], "between 0 and 1"),
        (["--validate", "--batch-size", "0"], "batch-size must be a whole number"),
        (["--push-to-hub", "tester/x"], "publishes only a validated output"),
        (["--allow-unvalidated"], "apply only with push_to_hub"),
    ]
    for extra, message in cases:
        code, _, err = run(capsys, "prune", model, str(tmp_path / "out"), "--drop", "2", *extra, "-q")
        assert_one_line_error(code, err, message)
        assert not (tmp_path / "out").exists(), extra
    # a model without a tokenizer fails to measure once written: the fresh OUT is removed
    code, _, err = run(capsys, "prune", str(tiny_model("llama")), str(tmp_path / "out"), "--drop", "2", "--validate", "-q")
    assert_one_line_error(code, err, "has no tokenizer")
    assert not (tmp_path / "out").exists()


# -- push publishes only validated weights ------------------------------------------------------------


def test_push_refuses_unvalidated_and_changed_outputs(
    readable_tiny: Callable[..., Path], pruned: Path, text_file: Path, hub: FakeHub,
    capsys: pytest.CaptureFixture[str],
) -> None:
    push = ["push", str(pruned), "tester/checked", "--token", TOKEN, "-q"]
    code, _, err = run(capsys, *push)
    assert_one_line_error(code, err, "is not published: its card records no validation", "--allow-unvalidated")
    code, _, err = run(capsys, *push, "--dry-run")  # a dry run says so too
    assert_one_line_error(code, err, "records no validation")
    assert hub.requests == []

    surgery.validate(readable_tiny("llama"), pruned, data=text_file, **FAST)
    code, _, err = run(capsys, *push)
    assert code == 0, err
    assert "layer_surgery" in hub.content(hub.files("tester/checked")[CARD_FILENAME]).decode()

    # the weights change after the validation (same size, one byte): refused
    shard = next(pruned.glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0x01
    shard.write_bytes(bytes(data))
    hub.reset_log()
    code, _, err = run(capsys, *push)
    assert_one_line_error(code, err, "its weights changed after the validation")
    assert hub.requests == []
    # the override publishes anyway
    code, _, err = run(capsys, *push, "--allow-unvalidated")
    assert code == 0, err
    assert hub.content(hub.files("tester/checked")[shard.name]) == bytes(data)

    # re-validated, then the recipe edited: refused again
    surgery.validate(readable_tiny("llama"), pruned, data=text_file, **FAST)
    check_validated(pruned)
    with (pruned / RECIPE_FILENAME).open("a") as handle:
        handle.write("# edited\n")
    with pytest.raises(UnvalidatedOutputError, match="its recipe changed"):
        surgery.push(pruned, "tester/checked", token=TOKEN, quiet=True)


def test_a_failed_gate_pushes_nothing(
    readable_tiny: Callable[..., Path], text_file: Path, tmp_path: Path, hub: FakeHub,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "out"
    code, _, err = run(capsys, "prune", str(readable_tiny("llama")), str(out), "--drop", "2", "--validate",
                       "--data", str(text_file), "--max-kl", "1e-9", "--push-to-hub", "tester/gated", *FAST_CLI)
    assert code == 1
    assert "validation failed" in err and "nothing pushed to tester/gated" in err
    assert hub.requests == [] and "tester/gated" not in hub.repos
    # through the API: the result says it was not pushed
    result = surgery.prune(readable_tiny("llama"), tmp_path / "api", drop="2", validate=True, data=text_file,
                           max_kl=1e-9, measure={"max_tokens": 128, "seq_len": 64, "prompts": 0, "device": "cpu"},
                           push_to_hub="tester/gated", quiet=True)
    assert result.validation is not None and not result.validation.passed and result.pushed is None
    assert hub.requests == []


def test_prune_validate_push_to_hub_publishes_the_card_with_recipe_map_and_table(
    readable_tiny: Callable[..., Path], text_file: Path, tmp_path: Path, hub: FakeHub,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The issue's done-when: surgery prune MODEL OUT --drop ... --validate --max-kl X --push-to-hub org/name."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "smol"
    code, stdout, err = run(capsys, "prune", str(readable_tiny("llama")), str(out), "--drop", "2-3", "--validate",
                            "--data", str(text_file), "--max-kl", "100", "--push-to-hub", "testorg/tiny-pruned",
                            "--json", *FAST_CLI)
    assert code == 0, err
    body = json.loads(stdout)
    assert body["pushed"]["repo_id"] == "testorg/tiny-pruned" and body["validation"]["passed"]
    card_path = hf_hub_download("testorg/tiny-pruned", CARD_FILENAME, endpoint=hub.url, token=TOKEN,
                                cache_dir=tmp_path / "dl")
    card = ModelCard(Path(card_path).read_text(encoding="utf-8"))
    assert "## Recipe" in card.text and "layers: 0-1,4-5" in card.text
    assert "## Layer map" in card.text and "| 2 | 4 |" in card.text
    kl = body["validation"]["metrics"]["kl"]
    assert "| text | tokens | KL(source ‖ this) ↓ |" in card.text and "| hamlet.txt | " in card.text
    assert f"{kl:.4g}" in card.text and "max-kl 100.0: met" in card.text
    assert card.data.model_name == "testorg/tiny-pruned"  # the model-index names the published repo
    assert {r.metric_type for r in card.data.eval_results} == {"kl_divergence", "top1_agreement", "perplexity"}
    assert card.data.get("layer_surgery")["weights_sha256"] == output_identity(out)["weights_sha256"]
