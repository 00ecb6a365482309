"""``surgery heal``: distillation with LoRA, merged, written as the same kind of checkpoint as NEW.

Tiny readable models (a character tokenizer over 128 ids) for breadth; SmolLM2 and Gemma 3 for
truth (a few steps: that the real checkpoints heal, load with stock transformers and keep their
per-layer config, not how well they heal: benchmarks/heal.py measures that).
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import surgery
from surgery.checkpoint import read_tensor_index
from surgery.errors import DataError, OptionError, PlanError, TokenizerMismatchError
from surgery.healing import (
    HEAL_FILENAME,
    HEAL_SECTION,
    _bridge_cuts,
    _first_interrupt_stops,
    cut_positions,
    default_layers,
)
from surgery.plan import Plan
from tests.helpers import assert_one_line_error, run_cli, sha256

# Small and fast: 32-token windows, a few steps, a large learning rate so a few steps show.
FAST: dict[str, Any] = {"steps": 12, "seq_len": 32, "max_minutes": None, "lr": 3e-3, "eval_tokens": 256, "quiet": True,
                        "device": "cpu"}


@pytest.fixture(scope="module")
def pruned(readable_tiny: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(ORIGINAL, NEW): the readable tiny llama and its prune of layers 2-3."""
    original = readable_tiny("llama")
    new = tmp_path_factory.mktemp("heal") / "new"
    surgery.prune(original, new, drop="2-3", quiet=True)
    return original, new


@pytest.fixture(scope="module")
def healed(pruned: tuple[Path, Path], text_file: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    original, new = pruned
    out = tmp_path_factory.mktemp("heal") / "healed"
    return out, surgery.heal(original, new, out, data=text_file, **FAST)


def load(directory: Path, **kwargs: Any) -> Any:
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(directory), **kwargs).eval()


def held_out_kl(original: Path, model: Any, report: Any, text_file: Path) -> float:
    """KL(original || model) re-measured on the held-out windows (the text's last 10%), independently of the heal run."""
    import transformers

    from surgery.corpus import read_texts, token_windows

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(original))
    windows = token_windows(tokenizer, read_texts(text_file), seq_len=FAST["seq_len"], max_tokens=10**12)
    held = windows[len(windows) - max(1, round(len(windows) * 0.1)) :][: report.held_out_windows]
    assert len(held) == report.held_out_windows
    reference = load(original)
    with torch.no_grad():
        # Positions that have a next token, as validate scores them.
        p = torch.log_softmax(reference(input_ids=held).logits[:, :-1].float(), -1)
        q = torch.log_softmax(model(input_ids=held).logits[:, :-1].float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def tensor_bytes(entry: Any) -> bytes:
    with open(entry.file, "rb") as handle:
        handle.seek(entry.start)
        return handle.read(entry.nbytes)


def test_cut_positions_and_default_blocks() -> None:
    assert cut_positions(Plan.drop("13-16", 30)) == [13]
    assert cut_positions(Plan.drop("3,7", 10)) == [3, 6]
    assert default_layers(Plan.drop("13-16", 30), 26) == (10, 11, 12, 13, 14, 15)
    assert cut_positions(Plan.drop("0-1", 6)) == [0]  # the embeddings now feed layer 2
    assert default_layers(Plan.drop("0-1", 6), 4) == (0, 1, 2)  # a cut at the start: no blocks before it
    assert default_layers(Plan.drop("4-5", 6), 4) == (1, 2, 3)  # the final norm now reads layer 3
    assert default_layers(None, 4) == (0, 1, 2, 3)


def test_heal_lowers_held_out_kl_and_writes_what_it_trained(
    pruned: tuple[Path, Path], healed: tuple[Path, Any], text_file: Path
) -> None:
    original, new = pruned
    out, report = healed
    assert report.before.kl is not None and report.after.kl is not None
    assert report.after.kl < report.before.kl
    assert report.steps == FAST["steps"] and report.stopped == "steps"
    # OUT loads with stock transformers (no PEFT), and measures as the report says (fp32; tolerance 1e-4 relative).
    model = load(out)
    assert "peft" not in json.loads((out / "config.json").read_text()).get("architectures", [""])[0].lower()
    assert held_out_kl(original, model, report, text_file) == pytest.approx(report.after.kl, rel=1e-4)


def test_only_the_trained_blocks_change(pruned: tuple[Path, Path], healed: tuple[Path, Any]) -> None:
    _, new = pruned
    out, report = healed
    before, after = read_tensor_index(new), read_tensor_index(out)
    assert before.keys() == after.keys()
    changed = {name for name in before if tensor_bytes(before[name]) != tensor_bytes(after[name])}
    trained = {f"model.layers.{j}." for j in report.adapter_layers}
    assert changed, "healing changed no tensor"
    assert all(name.startswith(tuple(trained)) for name in changed)
    # LoRA adapts the linear weights only: norms keep their values.
    assert not any("norm" in name for name in changed)
    for name in ("config.json", "tokenizer.json", "surgery-recipe.yaml"):
        assert sha256(out / name) == sha256(new / name)


def test_card_and_record(healed: tuple[Path, Any]) -> None:
    out, report = healed
    card = (out / "README.md").read_text()
    assert card.count(HEAL_SECTION) == 1
    assert f"{report.steps} steps" in card and "LoRA rank 16" in card
    assert f"{report.after.kl:.4f}" in card and f"{report.before.kl:.4f}" in card
    record = json.loads((out / HEAL_FILENAME).read_text())
    assert record["recipe"]["seed"] == 0 and record["steps"] == report.steps
    assert record["after"]["kl"] == pytest.approx(report.after.kl)


def test_healing_again_replaces_the_section(healed: tuple[Path, Any], pruned: tuple[Path, Path], text_file: Path,
                                            tmp_path: Path) -> None:
    original, _ = pruned
    out, _ = healed
    again = surgery.heal(original, out, tmp_path / "again", data=text_file, **{**FAST, "steps": 2})
    card = (tmp_path / "again" / "README.md").read_text()
    assert card.count(HEAL_SECTION) == 1
    assert f"{again.steps} steps" in card


def test_same_seed_same_result_other_seed_differs(pruned: tuple[Path, Path], text_file: Path) -> None:
    original, new = pruned
    runs = [surgery.heal(original, new, None, data=text_file, dry_run=True, **{**FAST, "steps": 4, "seed": seed})
            for seed in (0, 0, 1)]
    assert runs[0].losses == runs[1].losses and runs[0].after == runs[1].after
    assert runs[0].losses != runs[2].losses


def test_full_layers_train_every_parameter_of_a_block(pruned: tuple[Path, Path], text_file: Path, tmp_path: Path) -> None:
    original, new = pruned
    report = surgery.heal(original, new, tmp_path / "out", data=text_file, layers="", full_layers="1", select=False,
                          **{**FAST, "steps": 3})
    assert report.kept == "trained" and report.validation_windows == 0
    assert report.adapter_layers == () and report.full_layers == (1,)
    before, after = read_tensor_index(new), read_tensor_index(tmp_path / "out")
    changed = [name for name in before if tensor_bytes(before[name]) != tensor_bytes(after[name])]
    assert changed and all(name.startswith("model.layers.1.") for name in changed)
    assert any("norm" in name for name in changed)  # a full block trains its norms too


def test_wide_block_output_heals_into_a_wide_block_output(
    readable_tiny: Callable[..., Path], text_file: Path, tmp_path: Path
) -> None:
    original = readable_tiny("llama")
    surgery.parallel(original, tmp_path / "new", groups="2-3", quiet=True)
    # select=False: what is under test is that training reaches the wide layout and merges back
    # into it; on this tiny model its validation KL may not fall, and selection would keep NEW.
    report = surgery.heal(original, tmp_path / "new", tmp_path / "out", data=text_file, select=False, **FAST)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "surgery_parallel"
    assert report.after.kl < report.before.kl
    model = load(tmp_path / "out", trust_remote_code=True)
    assert held_out_kl(original, model, report, text_file) == pytest.approx(report.after.kl, rel=1e-4)


def test_plan_in_memory_is_written_then_healed(pruned: tuple[Path, Path], text_file: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    original, new = pruned
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "heal", str(original), str(out), "--plan", "0-1,4-5", "--data", str(text_file),
                                "--steps", "2", "--seq-len", "32", "--max-minutes", "0", "--device", "cpu", "-q", "--json")
    assert code == 0, err
    body = json.loads(stdout)
    assert body["steps"] == 2 and body["out"] == str(out)
    assert (out / "surgery-recipe.yaml").read_text() == (new / "surgery-recipe.yaml").read_text()
    card = (out / "README.md").read_text()
    assert "0-1,4-5" in card and HEAL_SECTION in card  # the plan's card, then the healing section
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".surgery-heal-")]  # the scratch NEW is gone


def stream_gap(original: Any, new: Any, windows: torch.Tensor, cut: int, resumes_at: int) -> float:
    """Squared distance between NEW's stream after block ``cut - 1`` and the original's stream entering
    layer ``resumes_at``, from transformers' own hidden states (``hidden_states[i]`` is layer i's input)."""
    with torch.no_grad():
        ours = new(input_ids=windows, output_hidden_states=True).hidden_states[cut]
        theirs = original(input_ids=windows, output_hidden_states=True).hidden_states[resumes_at]
    return float(((ours - theirs) ** 2).sum())


def test_bridge_closes_the_gap_at_the_cut_on_its_own_fit(pruned: tuple[Path, Path], text_file: Path) -> None:
    """The closed-form bridge, checked from outside: on the windows it was fitted on, NEW's stream after
    block 1 (the block before the cut of drop 2-3) is nearer the original's stream entering layer 4 than
    before (the identity map is one the least-squares fit could choose), and only that block's last linear
    layer (down_proj) changed."""
    from surgery.corpus import read_texts, token_windows

    original_dir, new_dir = pruned
    original, new = load(original_dir), load(new_dir)
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(original_dir))
    windows = token_windows(tokenizer, read_texts(text_file), seq_len=32, max_tokens=10**12)[:16]
    untouched = {name: value.clone() for name, value in new.state_dict().items()}
    gap_before = stream_gap(original, new, windows, 2, 4)
    bridged, note = _bridge_cuts(original, new, Plan.drop("2-3", 6), windows, 4, quiet=True)
    assert bridged == (1,) and note == ""
    gap_after = stream_gap(original, new, windows, 2, 4)
    assert gap_after < 0.9 * gap_before
    changed = [name for name, value in new.state_dict().items() if not torch.equal(value, untouched[name])]
    assert changed == ["model.layers.1.mlp.down_proj.weight"]


def test_bridge_lowers_held_out_kl_before_training(healed: tuple[Path, Any]) -> None:
    _, report = healed
    assert report.init_layers == (1,)
    assert report.after_init is not None and report.after_init.kl < report.before.kl
    assert 0 < report.init_seconds
    card = report.card_section()
    assert "least-squares map folded into the last linear layer of block(s) 1" in card
    assert "| bridged (no training) |" in report.table()


def test_training_is_kept_when_it_lowers_the_validation_kl(pruned: tuple[Path, Path], text_file: Path) -> None:
    """Without the bridge, training from the raw prune lowers the validation KL and is kept."""
    original, new = pruned
    report = surgery.heal(original, new, None, data=text_file, dry_run=True, init="none", **FAST)
    assert report.validation_windows > 0
    assert report.validation_kl_trained < report.validation_kl_start
    assert report.kept == "trained"
    assert "kept: the trained weights (validation KL" in report.format()


def test_training_that_raises_the_validation_kl_is_not_kept(pruned: tuple[Path, Path], text_file: Path, tmp_path: Path) -> None:
    """A learning rate of 1 wrecks the adapters: the bridged weights are written, measured as the bridge measured them."""
    original, new = pruned
    report = surgery.heal(original, new, tmp_path / "out", data=text_file, **{**FAST, "steps": 3, "lr": 1.0})
    assert report.validation_kl_trained > report.validation_kl_start
    assert report.kept == "start" and report.after_init is not None
    assert report.after.kl == pytest.approx(report.after_init.kl, rel=1e-6)
    before, after = read_tensor_index(new), read_tensor_index(tmp_path / "out")
    changed = {name for name in before if tensor_bytes(before[name]) != tensor_bytes(after[name])}
    assert changed == {"model.layers.1.mlp.down_proj.weight"}  # the bridge only
    assert "training did not lower the validation KL" in (tmp_path / "out" / "README.md").read_text()


def test_init_none_trains_from_new_as_it_is(pruned: tuple[Path, Path], text_file: Path) -> None:
    original, new = pruned
    report = surgery.heal(original, new, None, data=text_file, dry_run=True, init="none", **{**FAST, "steps": 2})
    assert report.init_layers == () and report.after_init is None
    assert "bridge: none (init none)" in report.format()


def test_a_bridged_block_without_adapters_is_still_written(pruned: tuple[Path, Path], text_file: Path, tmp_path: Path) -> None:
    """Adapters on block 3 only: the bridge changed block 1, and OUT holds that change (it measures as reported)."""
    original, new = pruned
    report = surgery.heal(original, new, tmp_path / "out", data=text_file, layers="3", **{**FAST, "steps": 2})
    assert report.adapter_layers == (3,) and report.init_layers == (1,)
    before, after = read_tensor_index(new), read_tensor_index(tmp_path / "out")
    changed = {name for name in before if tensor_bytes(before[name]) != tensor_bytes(after[name])}
    assert "model.layers.1.mlp.down_proj.weight" in changed
    assert all(name.startswith(("model.layers.1.mlp.down_proj.", "model.layers.3.")) for name in changed)
    assert held_out_kl(original, load(tmp_path / "out"), report, text_file) == pytest.approx(report.after.kl, rel=1e-4)


def test_a_block_that_normalises_its_output_is_not_bridged(readable_tiny: Callable[..., Path], text_file: Path,
                                                           tmp_path: Path) -> None:
    """Gemma 3 normalises the MLP's output before adding it to the stream: no linear map can be folded there."""
    original = readable_tiny("gemma3")
    surgery.prune(original, tmp_path / "new", drop="2-3", quiet=True)
    report = surgery.heal(original, tmp_path / "new", None, data=text_file, dry_run=True, **{**FAST, "steps": 1})
    assert report.init_layers == () and report.after_init is None
    assert report.init_note == "block 1 does not end in a linear layer added to the residual stream"


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--steps", "0"], "steps must be a whole number from 1"),
        (["--held-out", "1.5"], "held-out must be a share between 0 and 1"),
        (["--lr", "-1"], "lr must be a positive number"),
        (["--layers", "9"], "NEW has blocks 0-3; 9 is not one of them"),
        (["--init", "cubic"], "argument --init: invalid choice: 'cubic'"),
    ],
)
def test_bad_options_are_one_line(pruned: tuple[Path, Path], text_file: Path, tmp_path: Path,
                                  capsys: pytest.CaptureFixture[str], argv: list[str], expected: str) -> None:
    original, new = pruned
    code, _, err = run_cli(capsys, "heal", str(original), str(new), str(tmp_path / "out"), "--data", str(text_file),
                           "--seq-len", "32", "-q", *argv)
    assert_one_line_error(code, err, expected)
    assert not (tmp_path / "out").exists()


def test_new_not_made_from_original(pruned: tuple[Path, Path], text_file: Path, tmp_path: Path) -> None:
    _, new = pruned
    with pytest.raises(PlanError, match="NEW was made from a model with 6 layers, but ORIGINAL has 4"):
        surgery.heal(new, new, tmp_path / "out", data=text_file, **FAST)
    with pytest.raises(PlanError, match="heal takes an output of this tool"):
        surgery.heal(new, pruned[0], tmp_path / "out", data=text_file, **FAST)
    assert not (tmp_path / "out").exists()


def test_other_tokenizer_and_empty_text(readable_tiny: Callable[..., Path], pruned: tuple[Path, Path], tmp_path: Path) -> None:
    _, new = pruned
    with pytest.raises(TokenizerMismatchError):
        surgery.heal(readable_tiny("llama", permuted=True), new, tmp_path / "out", **FAST)
    empty = tmp_path / "empty.txt"
    empty.write_text("   \n")
    with pytest.raises(DataError, match="holds no text"):
        surgery.heal(pruned[0], new, tmp_path / "out", data=empty, **FAST)
    short = tmp_path / "short.txt"
    short.write_text("Short, but more than sixteen characters.")
    with pytest.raises(DataError, match="healing needs at least 2"):
        surgery.heal(pruned[0], new, tmp_path / "out", data=short, **{**FAST, "seq_len": 64})
    with pytest.raises(OptionError, match="exactly one of NEW"):
        surgery.heal(pruned[0], new, tmp_path / "out", plan="0-3", **FAST)
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_first_ctrl_c_stops_training_second_aborts() -> None:
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, whatever pytest inherited
    try:
        with _first_interrupt_stops() as flag:
            os.kill(os.getpid(), signal.SIGINT)
            assert flag["stop"]
            with pytest.raises(KeyboardInterrupt):
                os.kill(os.getpid(), signal.SIGINT)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_an_ignored_ctrl_c_stays_ignored() -> None:
    """A process started with SIGINT ignored (a background job, nohup) keeps ignoring it during training."""
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with _first_interrupt_stops() as flag:
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            os.kill(os.getpid(), signal.SIGINT)
            assert not flag["stop"]
        assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)


@pytest.mark.real
def test_smollm2_heals_and_loads_with_stock_transformers(smollm2_dir: Path, text_file: Path, tmp_path: Path) -> None:
    surgery.prune(smollm2_dir, tmp_path / "new", drop="13-16", quiet=True)
    report = surgery.heal(smollm2_dir, tmp_path / "new", tmp_path / "out", data=text_file,  # 6,000 characters: ~25 windows
                          **{**FAST, "steps": 3, "seq_len": 64, "lr": 5e-4, "eval_tokens": 128})
    assert report.adapter_layers == (10, 11, 12, 13, 14, 15)
    assert report.init_layers == (12,)  # Llama's block ends in down_proj added to the stream: bridged
    assert report.after_init is not None and report.after_init.kl < report.before.kl
    model = load(tmp_path / "out")
    assert model.config.num_hidden_layers == 26
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()
    assert report.after.kl is not None and report.before.kl is not None


@pytest.mark.real
def test_gemma3_heal_keeps_layer_types(gemma3_dir: Path, text_file: Path, tmp_path: Path) -> None:
    surgery.prune(gemma3_dir, tmp_path / "new", drop="6-9", quiet=True)
    surgery.heal(gemma3_dir, tmp_path / "new", tmp_path / "out", data=text_file,
                 **{**FAST, "steps": 2, "seq_len": 64, "eval_tokens": 128})
    source_types = json.loads((gemma3_dir / "config.json").read_text())["layer_types"]
    written = json.loads((tmp_path / "out" / "config.json").read_text())["layer_types"]
    assert written == source_types[:6] + source_types[10:]
    model = load(tmp_path / "out")
    assert list(model.config.layer_types) == written


def test_accelerate_launch_runs_the_same_heal(pruned: tuple[Path, Path], text_file: Path, tmp_path: Path) -> None:
    """The distributed entry point, with one CPU process here: same steps, same weights as in-process."""
    import shutil
    import subprocess

    original, new = pruned
    launcher = shutil.which("accelerate")
    assert launcher is not None, "accelerate's launcher is installed with the project"
    common = ["--data", str(text_file), "--steps", "3", "--seq-len", "32", "--max-minutes", "0", "--lr", "3e-3",
              "--device", "cpu", "-q"]
    result = subprocess.run(
        [launcher, "launch", "--cpu", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "-m", "surgery.cli", "heal", str(original), str(new), str(tmp_path / "launched"), *common],
        capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    surgery.heal(original, new, tmp_path / "direct", data=text_file, steps=3, seq_len=32, max_minutes=None, lr=3e-3,
                 device="cpu", quiet=True)
    launched, direct = read_tensor_index(tmp_path / "launched"), read_tensor_index(tmp_path / "direct")
    assert {n: tensor_bytes(e) for n, e in launched.items()} == {n: tensor_bytes(e) for n, e in direct.items()}


# -- heal --validate (issue 17): OUT measured on the held-out text and recorded in its card -------------

HEAL_CLI = ["--steps", "2", "--seq-len", "32", "--max-minutes", "0", "--lr", "3e-3", "--eval-tokens", "256",
            "--device", "cpu", "-q", "--prompts", "0"]


def test_heal_validate_measures_out_on_the_held_out_text_and_records_it(
    pruned: tuple[Path, Path], text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from exporters.card import check_validated

    original, new = pruned
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "heal", str(original), str(new), str(out), "--data", str(text_file),
                                "--validate", "--max-kl", "5", *HEAL_CLI, "--json")
    assert code == 0, err
    body = json.loads(stdout)
    validation = body["validation"]
    assert validation["passed"] is True and "held out" in validation["data"]
    # The text validate measured is the held-out windows' text: the end of the file, never trained on.
    report = surgery.heal(original, new, None, data=text_file, dry_run=True, **{**FAST, "steps": 1})
    text = text_file.read_text(encoding="utf-8")
    assert report.held_out_text and text.rindex(report.held_out_text) >= 0.85 * len(text)
    record = check_validated(out)  # the push would accept it: validated, on these weights
    [row] = record["validation"]
    assert row["text"].endswith("hamlet.txt (held out: its last 10%, not trained on)")
    assert HEAL_SECTION in (out / "README.md").read_text()  # the heal section is still there beside the table


def test_heal_validate_missed_gate_exits_1_and_keeps_the_healed_output(
    pruned: tuple[Path, Path], text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from exporters.card import check_validated
    from surgery.errors import UnvalidatedOutputError

    original, new = pruned
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "heal", str(original), str(new), str(out), "--data", str(text_file),
                                "--validate", "--max-kl", "0", *HEAL_CLI)
    assert code == 1, err
    assert err.startswith("surgery: validation failed: --max-kl 0: KL") and err.count("\n") == 1
    assert "validation" in stdout.lower()  # the report is printed after the heal table
    assert (out / "model.safetensors").is_file()  # the healed weights are kept ...
    with pytest.raises(UnvalidatedOutputError):  # ... but the missed gate in the card stops a push
        check_validated(out)


@pytest.mark.parametrize(("extra", "expected"), [
    (["--max-kl", "0.5"], "apply only with validate"),
    (["--validate", "--dry-run"], "a dry run writes nothing"),
    (["--validate", "--max-kl", "-1"], "max"),
])
def test_heal_validate_options_are_refused_before_training(
    pruned: tuple[Path, Path], text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    extra: list[str], expected: str,
) -> None:
    original, new = pruned
    code, _, err = run_cli(capsys, "heal", str(original), str(new), str(tmp_path / "out"), "--data", str(text_file),
                           *HEAL_CLI, *extra)
    assert_one_line_error(code, err, expected)
    assert not (tmp_path / "out").exists()


def test_distill_loss_is_the_kl_over_the_top_k_and_one_tail_bucket() -> None:
    """Against KL computed independently from the full distributions: equal when k is the vocabulary,
    equal to the KL of the two distributions coarsened to (top k, everything else) otherwise, never above
    the full KL, and zero when the student is the teacher."""
    from surgery.healing import _distill_loss

    generator = torch.Generator().manual_seed(0)
    teacher, student = torch.randn(2, 5, 40, generator=generator) * 3, torch.randn(2, 5, 40, generator=generator) * 3
    p, q = teacher.softmax(-1), student.softmax(-1)
    full = float((p * (p.log() - q.log())).sum(-1).mean())
    top, ids = p.topk(40, dim=-1)
    assert float(_distill_loss(student, top, ids)) == pytest.approx(full, rel=1e-5)
    top, ids = p.topk(6, dim=-1)
    q_top = q.gather(-1, ids)
    p_rest, q_rest = 1 - top.sum(-1), 1 - q_top.sum(-1)
    coarse = ((top * (top.log() - q_top.log())).sum(-1) + p_rest * (p_rest.log() - q_rest.log())).mean()
    assert float(_distill_loss(student, top, ids)) == pytest.approx(float(coarse), rel=1e-5)
    assert float(_distill_loss(student, top, ids)) < full
    assert abs(float(_distill_loss(teacher, top, ids))) < 1e-6
