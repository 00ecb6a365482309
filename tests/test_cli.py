"""The CLI: verbs produce the same checkpoints as the API, and every bad input gets one line on
stderr, exit code 2, no traceback, and no output directory."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.helpers import assert_one_line_error, digest_tree
from tests.helpers import run_cli as run


@pytest.fixture
def broken(tiny_model: Callable[..., Path], tmp_path: Path) -> Callable[[str], Path]:
    """A copy of the tiny sharded llama, damaged in a named way."""

    def make(kind: str) -> Path:
        src = tmp_path / f"broken-{kind}"
        shutil.copytree(tiny_model("llama", max_shard_size=20_000), src)
        shards = sorted(src.glob("*.safetensors"))
        if kind == "missing-shard":
            shards[1].unlink()
        elif kind == "truncated":
            data = shards[0].read_bytes()
            shards[0].write_bytes(data[: len(data) // 2])
        elif kind == "garbage-header":
            shards[0].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
        elif kind == "unknown-architecture":
            config = json.loads((src / "config.json").read_text())
            config["model_type"] = "no_such_architecture"
            config["architectures"] = ["NoSuchForCausalLM"]
            (src / "config.json").write_text(json.dumps(config))
        elif kind == "no-config":
            (src / "config.json").unlink()
        return src

    return make


@pytest.mark.parametrize(
    "args, expected",
    [
        (["prune", "--drop", "5-6"], "layer 6 is out of range: the model has 6 layers"),
        (["prune", "--drop", "0-5"], "leaves no layers"),
        (["prune", "--drop", "10-"], "malformed layer range '10-'"),
        (["prune", "--drop", "20-10"], "runs backwards"),
        (["prune", "--drop", "a-b"], "malformed layer range 'a-b'"),
        (["prune", "--keep", "1,,2"], "an empty item"),
        (["repeat", "--layers", "1-2", "--times", "0"], "--times must be"),
        (["reorder", "--order", "0-4"], "must name each of the 6 layers once"),
        (["apply", "--layers", "0-3", "--max-shard-size", "huge"], "shard size 'huge'"),
    ],
)
def test_bad_plans_and_options(
    capsys: pytest.CaptureFixture[str], tiny_model: Callable[..., Path], tmp_path: Path, args: list[str], expected: str
) -> None:
    verb, *rest = args
    code, _, err = run(capsys, verb, str(tiny_model("llama")), str(tmp_path / "out"), *rest)
    assert_one_line_error(code, err, expected)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "kind, expected",
    [
        ("missing-shard", "is missing"),
        ("truncated", "corrupt safetensors header"),
        ("garbage-header", "corrupt safetensors header"),
        ("unknown-architecture", "architecture 'no_such_architecture'"),
        ("no-config", "has no config.json"),
    ],
)
def test_bad_checkpoints(
    capsys: pytest.CaptureFixture[str], broken: Callable[[str], Path], tmp_path: Path, kind: str, expected: str
) -> None:
    code, _, err = run(capsys, "prune", str(broken(kind)), str(tmp_path / "out"), "--drop", "1")
    assert_one_line_error(code, err, expected)
    assert not (tmp_path / "out").exists()


def test_pickle_refused_and_existing_out(capsys: pytest.CaptureFixture[str], tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    src = tmp_path / "pickled"
    shutil.copytree(tiny_model("llama"), src)
    from safetensors.torch import load_file

    torch.save(load_file(src / "model.safetensors"), src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    code, _, err = run(capsys, "prune", str(src), str(tmp_path / "out"), "--drop", "1")
    assert_one_line_error(code, err, "pass --allow-pickle")
    assert not (tmp_path / "out").exists()

    (tmp_path / "exists").mkdir()
    code, _, err = run(capsys, "prune", str(tiny_model("llama")), str(tmp_path / "exists"), "--drop", "1")
    assert_one_line_error(code, err, "already exists")
    assert list((tmp_path / "exists").iterdir()) == []


def test_missing_model_and_missing_out(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run(capsys, "prune", str(tmp_path / "nope"), str(tmp_path / "out"), "--drop", "1")
    assert_one_line_error(code, err, "no such file or directory")
    code, _, err = run(capsys, "prune", "--drop", "1")
    assert_one_line_error(code, err, "missing OUT")
    code, _, err = run(capsys, "prune", str(tmp_path / "out"), "--drop", "1", "--keep", "2")
    assert_one_line_error(code, err, "not allowed with argument")


def test_recipe_for_another_model(capsys: pytest.CaptureFixture[str], tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    recipe = tmp_path / "r.yaml"
    recipe.write_text("num_source_layers: 30\nlayers: 0-9,21-29\n")
    code, _, err = run(capsys, "apply", str(tiny_model("llama")), str(tmp_path / "out"), "--recipe", str(recipe))
    assert_one_line_error(code, err, "made for a model with 30 layers, but this model has 6")
    code, _, err = run(capsys, "apply", str(tiny_model("llama")), str(tmp_path / "out"), "--recipe", str(tmp_path / "none.yaml"))
    assert_one_line_error(code, err, "cannot be read")


def test_debug_shows_the_traceback(capsys: pytest.CaptureFixture[str], tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    code, _, err = run(capsys, "prune", str(tiny_model("llama")), str(tmp_path / "out"), "--drop", "9", "--debug")
    assert code == 2
    assert err.startswith("Traceback (most recent call last):")
    assert "surgery.errors.LayerIndexError: layer 9 is out of range" in err


def test_verbs_write_what_the_api_writes(capsys: pytest.CaptureFixture[str], tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    """Each verb's output is byte for byte the output of the API call it stands for (and has the expected plan)."""
    import surgery

    src = str(tiny_model("llama"))
    cases = {
        "prune": (["--drop", "1-2"], lambda out: surgery.prune(src, out, drop="1-2", quiet=True), "0,3-5"),
        "keep": (["--keep", "0,3-5"], lambda out: surgery.prune(src, out, keep="0,3-5", quiet=True), "0,3-5"),
        "repeat": (["--layers", "2-3", "--times", "3"], lambda out: surgery.repeat(src, out, layers="2-3", times=3, quiet=True),
                   "0-3,2-3,2-5"),
        "reverse": (["--reverse", "1-4"], lambda out: surgery.reorder(src, out, reverse="1-4", quiet=True), "0,4,3,2,1,5"),
        "shuffle": (["--shuffle", "1-4", "--seed", "5"], lambda out: surgery.reorder(src, out, shuffle="1-4", seed=5, quiet=True),
                    str(surgery.Plan.shuffle("1-4", 5, 6))),
        "order": (["--order", "1,0,2-5"], lambda out: surgery.reorder(src, out, order="1,0,2-5", quiet=True), "1,0,2-5"),
        "apply": (["--layers", "0-2,2,5"], lambda out: surgery.apply(src, out, "0-2,2,5", quiet=True), "0-2,2,5"),
    }
    verbs = {"keep": "prune", "reverse": "reorder", "shuffle": "reorder", "order": "reorder"}
    for case, (extra, api_call, plan) in cases.items():
        code, out, err = run(capsys, verbs.get(case, case), src, str(tmp_path / "cli" / case), "-q", "--json", *extra)
        assert code == 0, err
        assert json.loads(out)["plan"] == plan, case
        api_call(tmp_path / "api" / case)
        written = digest_tree(tmp_path / "cli" / case)
        assert "surgery-recipe.yaml" in written and "model.safetensors" in written, case
        assert written == digest_tree(tmp_path / "api" / case), case
        assert f"layers: {plan}" in (tmp_path / "cli" / case / "surgery-recipe.yaml").read_text()


def test_dry_run_prints_the_mapping(capsys: pytest.CaptureFixture[str], tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    code, out, _ = run(capsys, "repeat", str(tiny_model("gemma3")), str(tmp_path / "out"), "--layers", "4", "--dry-run")
    assert code == 0
    assert "5 <- 4    full_attention" in out and "6 <- 5    sliding_attention" in out
    assert "would write" in out
    assert not (tmp_path / "out").exists()


def test_inspect(capsys: pytest.CaptureFixture[str], tiny_model: Callable[..., Path]) -> None:
    code, out, _ = run(capsys, "inspect", str(tiny_model("gemma3", max_shard_size=20_000)), "--json")
    assert code == 0
    info = json.loads(out)
    assert info["num_layers"] == 6 and info["layer_prefix"] == "model.layers"
    assert [layer["config"]["layer_types"] for layer in info["layers"]][:2] == ["sliding_attention", "full_attention"]
    assert len(info["shards"]) > 1
    assert info["total_params"] == sum(layer["params"] for layer in info["layers"]) + info["other_params"]
    code, out, _ = run(capsys, "inspect", str(tiny_model("gpt2")))
    assert "transformer.h.N" in out and "'n_layer'" in out


def test_console_script_end_to_end(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    """The installed entry point, as a user runs it: success, then a bad range."""
    exe = Path(sys.executable).with_name("surgery")
    ok = subprocess.run([str(exe), "prune", str(tiny_model("opt")), str(tmp_path / "out"), "--drop", "2", "-q"],
                        capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 5
    assert "layers: 0-1,3-5" in (tmp_path / "out" / "surgery-recipe.yaml").read_text()
    bad = subprocess.run([str(exe), "prune", str(tiny_model("opt")), str(tmp_path / "out2"), "--drop", "2-"],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2
    assert_one_line_error(bad.returncode, bad.stderr, "malformed layer range")
    assert not (tmp_path / "out2").exists()
