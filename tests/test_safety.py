"""Trust (issue #12, sections 4 and 5): no code runs that the user did not allow, and the user's
files are never lost or mixed up: what appears at OUT meanwhile, a concurrent run, debris of a
killed run, overlapping paths, and hostile files in a model directory.

Each test here fails when the protection it names is removed.
"""

from __future__ import annotations

import ast
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import surgery
from exporters.staging import MARKER_FILENAME, lock_path
from surgery.cli import main
from tests import tiny
from tests.helpers import ROOT, assert_one_line_error
from tests.helpers import read_tree as tree


def cli(*argv: str, stdin: str = "", cwd: Path | None = None, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """The CLI in a fresh interpreter, as a user runs it (stdin is a pipe holding ``stdin``)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "surgery.cli", *argv], input=stdin, capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def one_line_error(result: subprocess.CompletedProcess[str], expected: str) -> None:
    assert_one_line_error(result.returncode, result.stderr, expected, ignore_warnings=True)


# -- 4. code: nothing from a model directory runs without --trust-remote-code ---------------------


def test_every_transformers_load_states_trust_remote_code() -> None:
    """Every from_pretrained/from_config/pipeline call in the package passes trust_remote_code itself:
    left out (None), transformers asks on stdin, and a pipe answering "y" would run the model's code."""
    missing = []
    for file in sorted([*(ROOT / "surgery").rglob("*.py"), *(ROOT / "exporters").rglob("*.py")]):
        for node in ast.walk(ast.parse(file.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if name not in ("from_pretrained", "from_config", "pipeline"):
                continue
            given = {k.arg: k.value for k in node.keywords}
            value = given.get("trust_remote_code")
            if value is None or (isinstance(value, ast.Constant) and value.value is None):
                missing.append(f"{file.relative_to(ROOT)}:{node.lineno}")
    assert not missing, f"calls without an explicit trust_remote_code: {missing}"


def _marker_code(marker: Path, body: str) -> str:
    return f"import pathlib\npathlib.Path({str(marker)!r}).write_text('code ran')\n" + textwrap.dedent(body)


@pytest.fixture
def remote_code_model(tiny_model: Callable[..., Path], tmp_path: Path) -> tuple[Path, Path]:
    """A tiny Llama whose config maps to code in the directory; importing that code writes MARKER."""
    model = tmp_path / "custom"
    shutil.copytree(tiny_model("llama"), model)
    marker = tmp_path / "MARKER"
    (model / "configuration_custom.py").write_text(_marker_code(marker, """
        from transformers import LlamaConfig

        class CustomConfig(LlamaConfig):
            model_type = "custom_llama"
    """))
    (model / "modeling_custom.py").write_text(_marker_code(marker, """
        from transformers import LlamaForCausalLM
        from .configuration_custom import CustomConfig

        class CustomForCausalLM(LlamaForCausalLM):
            config_class = CustomConfig
    """))
    config = json.loads((model / "config.json").read_text())
    config.update(model_type="custom_llama", architectures=["CustomForCausalLM"], auto_map={
        "AutoConfig": "configuration_custom.CustomConfig", "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"})
    (model / "config.json").write_text(json.dumps(config))
    return model, marker


def _tiny_onnx_dir(directory: Path) -> Path:
    """The smallest graph that loads as a decoder with cache (input_ids -> logits, one cache layer)."""
    import onnx
    from onnx import TensorProto, helper

    cache = ["batch", 2, "past", 4]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])]
    inputs += [helper.make_tensor_value_info(f"past_key_values.0.{k}", TensorProto.FLOAT, cache) for k in ("key", "value")]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq"])]
    outputs += [helper.make_tensor_value_info(f"present.0.{k}", TensorProto.FLOAT, cache) for k in ("key", "value")]
    nodes = [helper.make_node("Cast", ["input_ids"], ["logits"], to=TensorProto.FLOAT)]
    nodes += [helper.make_node("Identity", [f"past_key_values.0.{k}"], [f"present.0.{k}"]) for k in ("key", "value")]
    model = helper.make_model(helper.make_graph(nodes, "tiny", inputs, outputs), opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    onnx.save(model, str(directory / "model.onnx"))
    return directory


@pytest.mark.parametrize("verb", ["inspect", "validate", "prune", "generate"])
def test_remote_code_never_runs_without_the_flag_even_if_stdin_says_yes(
    remote_code_model: tuple[Path, Path], tmp_path: Path, verb: str
) -> None:
    model, marker = remote_code_model
    args = {
        "inspect": ["inspect", str(model)],
        "validate": ["validate", str(model), str(model), "--max-tokens", "64", "--prompts", "0", "-q"],
        "prune": ["prune", str(model), str(tmp_path / "out"), "--drop", "1", "-q"],
        # an ONNX directory: the graph runs no Python, but its tokenizer would load the config's code
        "generate": ["generate", str(_tiny_onnx_dir(model)), "--prompt", "hello", "--max-new-tokens", "1", "-q"],
    }[verb]
    result = cli(*args, stdin="y\n" * 5)
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("surgery: error:"), result.stderr
    assert "run the custom code" not in result.stderr + result.stdout  # transformers never asked
    assert not marker.exists(), "the model's code ran without --trust-remote-code"
    assert not (tmp_path / "out").exists()


def test_with_the_flag_the_code_is_allowed(remote_code_model: tuple[Path, Path]) -> None:
    model, marker = remote_code_model
    result = cli("inspect", str(model), "--trust-remote-code", "--json")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["num_layers"] == 6
    assert marker.read_text() == "code ran"


# -- 4. secrets: no token is ever printed -------------------------------------------------------

TOKEN = "hf_" + "Zq7" * 10  # token-shaped
ENV_TOKEN = "my-env-token-value-42"  # not token-shaped: hidden because it is the value of HF_TOKEN
ENDPOINT = "https://alice:s3cr3t-pass@hub.example.com"


_FAILING_RUN = """
import logging, sys, warnings
from surgery import api
from surgery.cli import main
from tests.helpers import ROOT, assert_one_line_error
from tests.helpers import read_tree as tree
from surgery.errors import HubPushError

ENDPOINT, TOKEN, ENV_TOKEN, KIND = sys.argv[1:5]
message = f"the Hub at {ENDPOINT} refused {TOKEN} (token {ENV_TOKEN})"

def inspect(*args, **kwargs):
    warnings.warn(f"retrying {ENDPOINT}/api with {TOKEN}")
    logging.getLogger("huggingface_hub").warning("Authorization: Bearer %s", ENV_TOKEN)
    from transformers.utils import logging as hf_logging
    hf_logging.get_logger("transformers").warning(f"fetching {ENDPOINT}/config.json")
    sys.stderr.write(f"\\rdownloading {ENDPOINT}/model.safetensors  50%")
    print(f"endpoint {ENDPOINT}")
    raise {"surgery": HubPushError("org/x", message), "os": ConnectionError(message), "bug": RuntimeError(message)}[KIND]

api.inspect = inspect
logging.basicConfig(format="%(message)s")  # a handler made before the CLI starts (as an embedding program would)
sys.exit(main(sys.argv[5:]))
"""


def _assert_no_secret(text: str) -> None:
    for secret in (TOKEN, ENV_TOKEN, "s3cr3t-pass", "alice"):
        assert secret not in text, f"{secret!r} was printed:\n{text}"
    assert "***" in text


@pytest.mark.parametrize("debug", [False, True])
@pytest.mark.parametrize("kind", ["surgery", "os", "bug"])
def test_errors_warnings_logs_and_progress_print_no_secret(debug: bool, kind: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_TOKEN": ENV_TOKEN, "HF_ENDPOINT": ENDPOINT}
    result = subprocess.run(
        [sys.executable, "-c", _FAILING_RUN, ENDPOINT, TOKEN, ENV_TOKEN, kind, "inspect", "org/x", *(["--debug"] if debug else [])],
        capture_output=True, text=True, timeout=120, env=env,
    )
    assert result.returncode == (1 if kind == "bug" else 2), result.stderr
    _assert_no_secret(result.stderr)
    _assert_no_secret(result.stdout)
    assert "https://***@hub.example.com refused ***" in result.stderr
    assert "retrying https://***@hub.example.com/api with ***" in result.stderr  # the warning
    assert "Authorization: Bearer ***" in result.stderr  # a library's log line
    assert "fetching https://***@hub.example.com/config.json" in result.stderr  # transformers' own logger
    assert ("Traceback (most recent call last)" in result.stderr) == (debug or kind == "bug")


def test_a_token_given_with_the_option_is_never_printed(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    secret = "not-token-shaped-but-secret"
    code = main(["push", str(tmp_path / "missing"), "org/x", "--token", secret, "--debug"])
    captured = capsys.readouterr()
    assert code == 2
    assert "Traceback" in captured.err  # the --debug traceback (it shows the call's locals nowhere)
    assert secret not in captured.err and secret not in captured.out
    code = main(["push", str(tmp_path), "org/x", "--token", secret, "--no-such-option", secret])
    err = capsys.readouterr().err
    assert code == 2 and secret not in err and "***" in err


def test_redact_patterns(monkeypatch: pytest.MonkeyPatch) -> None:
    from surgery.redact import redact

    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "legacy-env-token")
    monkeypatch.setenv("HF_TOKEN", "abc")  # too short to hide by substitution: left as is
    assert redact(f"{TOKEN} and hf_short") == "*** and hf_short"
    assert redact("git+ssh://u@host/x http://user:pw@h:8080/p ok@mail") == "git+ssh://***@host/x http://***@h:8080/p ok@mail"
    assert redact("use legacy-env-token now") == "use *** now"
    assert redact("Authorization: Bearer xyz123") == "Authorization: Bearer ***"
    assert redact("abc stays", ["secret-value"]) == "abc stays"
    assert redact("a secret-value b", ["secret-value", None]) == "a *** b"


# -- 5. your files: what appears at OUT meanwhile is never touched ---------------------------------


def _during_write(monkeypatch: pytest.MonkeyPatch, action: Callable[[], None]) -> None:
    """Run ``action`` while the shards are being written (after the run started)."""
    import surgery.engine

    real = surgery.engine.write_shards

    def write_shards(*args: object, **kwargs: object) -> object:
        action()
        return real(*args, **kwargs)

    monkeypatch.setattr(surgery.engine, "write_shards", write_shards)


@pytest.mark.parametrize("force", [False, True])
def test_a_full_disk_is_one_line_and_leaves_nothing_behind(
    tiny_model: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], force: bool,
) -> None:
    import surgery.engine
    from surgery.errors import OutOfSpaceError

    model, out = tiny_model("llama", max_shard_size=40_000), tmp_path / "out"
    if force:  # an earlier output that --force would replace: it must survive the failed run whole
        assert main(["prune", str(model), str(out), "--drop", "1", "-q"]) == 0
    before = tree(out) if force else {}
    real = surgery.engine.write_shards

    def write_shards(staging: Path, shards: list[Any], **kwargs: Any) -> None:
        real(staging, shards[:1], **kwargs)  # part of the model is on disk when the disk fills
        raise OSError(errno.ENOSPC, "No space left on device")  # as os.write raises it: no file name

    monkeypatch.setattr(surgery.engine, "write_shards", write_shards)
    code = main(["prune", str(model), str(out), "--drop", "2", "-q", *(["--force"] if force else [])])
    assert_one_line_error(code, capsys.readouterr().err, f"no space left on the file system of {tmp_path} while "
                          f"writing {out} (", "B free there now); nothing was written", "another file system")
    assert tree(out) == before
    assert sorted(os.listdir(tmp_path)) == (["out"] if force else [])  # no staging directory, no lock file
    # Through the API it is still an OSError with errno ENOSPC, for pipelines that catch those.
    with pytest.raises(OSError) as caught:
        surgery.prune(model, tmp_path / "api-out", drop="2", quiet=True)
    assert isinstance(caught.value, OutOfSpaceError) and caught.value.errno == errno.ENOSPC
    assert caught.value.free is not None and caught.value.free > 0
    assert not (tmp_path / "api-out").exists()


def test_a_full_disk_elsewhere_names_that_file_system(tmp_path: Path) -> None:
    from exporters.staging import staged_output
    from surgery.errors import OutOfSpaceError

    out, scratch = tmp_path / "models" / "out", tmp_path / "scratch" / "graph.onnx"
    with pytest.raises(OutOfSpaceError) as caught, staged_output(out, force=False) as staging:
        (staging / "config.json").write_text("{}")
        raise OSError(errno.ENOSPC, "No space left on device", str(scratch))
    assert caught.value.device_path == str(scratch) and caught.value.path == str(out)
    assert not out.exists() and os.listdir(out.parent) == []
    # safetensors says it as a Rust error (no OSError, no file name): the file system of OUT's directory.
    with pytest.raises(OutOfSpaceError) as caught, staged_output(out, force=False):
        raise _safetensors_disk_full()
    assert caught.value.device_path == str(out.parent) and os.listdir(out.parent) == []
    # Any other OSError passes through as it is.
    with pytest.raises(PermissionError), staged_output(out, force=False):
        raise PermissionError(errno.EACCES, "Permission denied")


def _safetensors_disk_full() -> Exception:
    """What safetensors 0.8 raised on a full 2 MB tmpfs (its Rust I/O error, not an OSError)."""
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")


def test_which_errors_are_a_full_disk() -> None:
    from surgery.errors import OutOfSpaceError, is_disk_full

    assert is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert is_disk_full(_safetensors_disk_full())
    assert not is_disk_full(OSError(errno.EIO, "Input/output error"))
    assert not is_disk_full(ValueError("no space in this name"))
    assert not is_disk_full(OutOfSpaceError("out", ".", 0))  # already explained: passed on as it is


def test_a_full_disk_while_converting_into_the_cache_names_surgery_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import safetensors.torch

    model = tiny.build("llama")
    src, cache = tmp_path / "pickled", tmp_path / "cache"
    src.mkdir()
    model.config.save_pretrained(src)
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    monkeypatch.setenv("SURGERY_CACHE", str(cache))

    def save_file(*args: Any, **kwargs: Any) -> None:
        raise _safetensors_disk_full()

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    code = main(["prune", str(src), str(tmp_path / "out"), "--drop", "1", "--allow-pickle", "-q"])
    assert_one_line_error(code, capsys.readouterr().err, f"no space left on the file system of {cache / 'pickle'}",
                          "nothing was written", "set SURGERY_CACHE to a directory on another file system")
    assert os.listdir(cache / "pickle") == [] and not (tmp_path / "out").exists()  # no partial conversion


@pytest.mark.parametrize("force", [False, True])
def test_a_directory_that_appears_at_out_during_the_run_is_left_alone(
    tiny_model: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], force: bool,
) -> None:
    out = tmp_path / "out"

    def user_creates_out() -> None:
        out.mkdir()
        (out / "thesis.txt").write_text("years of work")

    _during_write(monkeypatch, user_creates_out)
    code = main(["prune", str(tiny_model("llama")), str(out), "--drop", "1", "-q", *(["--force"] if force else [])])
    err = capsys.readouterr().err
    assert code == 2 and "appeared while this run was writing" in err, err
    assert tree(out) == {"thesis.txt": b"years of work"}
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging directory, no lock file left


def test_an_empty_directory_that_appears_is_not_replaced(
    tiny_model: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    _during_write(monkeypatch, out.mkdir)  # rename(2) would silently replace an empty directory
    assert main(["prune", str(tiny_model("llama")), str(out), "--drop", "1", "-q"]) == 2
    assert out.is_dir() and list(out.iterdir()) == []
    # Even when it appears between the last check and the rename, the rename itself refuses it.
    from exporters.staging import _rename_noreplace
    from surgery.errors import OutputChangedError

    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "weights").write_text("ours")
    with pytest.raises(OutputChangedError):
        _rename_noreplace(tmp_path / "new", out)
    assert out.is_dir() and list(out.iterdir()) == [] and (tmp_path / "new" / "weights").exists()


def test_force_replaces_only_the_directory_that_was_there_at_the_start(
    tiny_model: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    surgery.prune(tiny_model("llama"), out, drop="1", quiet=True)

    def user_swaps_out() -> None:
        out.rename(tmp_path / "moved")
        out.mkdir()
        (out / "notes.txt").write_text("mine")

    _during_write(monkeypatch, user_swaps_out)
    assert main(["prune", str(tiny_model("llama")), str(out), "--drop", "2", "--force", "-q"]) == 2
    assert "was replaced by another directory" in capsys.readouterr().err
    assert tree(out) == {"notes.txt": b"mine"}
    monkeypatch.undo()
    # Untouched, the same --force replaces the earlier output as before.
    first = tmp_path / "first"
    surgery.prune(tiny_model("llama"), first, drop="1", quiet=True)
    inode = first.stat().st_ino
    assert main(["prune", str(tiny_model("llama")), str(first), "--drop", "2", "--force", "-q"]) == 0
    assert first.stat().st_ino != inode and "layers: 0-1,3-5" in (first / "surgery-recipe.yaml").read_text()


# -- 5. --force replaces only what this tool wrote ---------------------------------------------------


def _user_directory(out: Path) -> dict[str, bytes]:
    """A directory the user made: it even looks like a model and holds a graph, but this tool wrote none of it."""
    out.mkdir()
    (out / "thesis.txt").write_text("years of work")
    (out / "config.json").write_text("{}")
    (out / "model.onnx").write_bytes(b"my own graph")  # a graph, but without this tool's onnx-export.json
    (out / "notes").mkdir()
    (out / "notes" / "surgery-recipe.yaml").write_text("not at the top: not a recipe of an output")
    return tree(out)


@pytest.mark.parametrize("verb", ["prune", "parallel", "export-onnx"])
def test_force_refuses_a_directory_this_tool_did_not_write(
    tiny_model: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], verb: str,
) -> None:
    import exporters.onnx
    import surgery.engine
    import surgery.widen

    out = tmp_path / "out"
    before = _user_directory(out)
    model = str(tiny_model("llama"))
    for module, name in ((surgery.engine, "detect"), (exporters.onnx, "_load")):  # every rewrite detects in engine.run_rewrite
        monkeypatch.setattr(module, name, None)  # refused at the start: any work would fail differently
    args = {"prune": ["prune", model, str(out), "--drop", "1"],
            "parallel": ["parallel", model, str(out), "--groups", "1-2"],
            "export-onnx": ["export-onnx", model, str(out), "--no-validate"]}[verb]
    code = main([*args, "--force", "-q"])
    one_line_error(subprocess.CompletedProcess([], code, "", capsys.readouterr().err), "was not written by layer-surgery")
    assert tree(out) == before
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no staging directory, no lock file left


def test_force_refuses_a_symlink_at_out_even_to_an_output(
    tiny_model: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    earlier = tmp_path / "earlier"
    surgery.prune(tiny_model("llama"), earlier, drop="1", quiet=True)
    before = tree(earlier)
    (tmp_path / "out").symlink_to(earlier)
    code = main(["prune", str(tiny_model("llama")), str(tmp_path / "out"), "--drop", "2", "--force", "-q"])
    one_line_error(subprocess.CompletedProcess([], code, "", capsys.readouterr().err), "it is a symlink")
    assert (tmp_path / "out").is_symlink() and tree(earlier) == before


def test_force_replaces_an_empty_directory_and_earlier_outputs(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    from exporters.onnx import export_onnx

    empty = tmp_path / "empty"
    empty.mkdir()
    surgery.prune(tiny_model("llama"), empty, drop="1", force=True, quiet=True)
    assert "layers: 0,2-5" in (empty / "surgery-recipe.yaml").read_text()
    onnx = tmp_path / "onnx"  # an ONNX export of this tool: its report beside its graph
    export_onnx(tiny_model("llama"), onnx, validate=False, quiet=True)
    inode = onnx.stat().st_ino
    export_onnx(tiny_model("llama"), onnx, validate=False, force=True, quiet=True)
    assert onnx.stat().st_ino != inode and (onnx / "onnx-export.json").is_file()
    assert sorted(os.listdir(tmp_path)) == ["empty", "onnx"]


def test_force_checks_again_just_before_replacing(
    tiny_model: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An output the user turns into their own directory during the run (same inode) is not replaced."""
    out = tmp_path / "out"
    surgery.prune(tiny_model("llama"), out, drop="1", quiet=True)

    def user_reuses_out() -> None:
        for file in out.iterdir():
            file.unlink()
        (out / "thesis.txt").write_text("years of work")

    _during_write(monkeypatch, user_reuses_out)
    code = main(["prune", str(tiny_model("llama")), str(out), "--drop", "2", "--force", "-q"])
    one_line_error(subprocess.CompletedProcess([], code, "", capsys.readouterr().err), "was not written by layer-surgery")
    assert tree(out) == {"thesis.txt": b"years of work"}
    assert sorted(os.listdir(tmp_path)) == ["out"]


# -- 5. one writer per OUT --------------------------------------------------------------------------


def test_a_second_run_to_the_same_out_exits_2_while_the_first_writes(
    tiny_model: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    second: list[int] = []
    seen: list[bool] = []

    def second_run() -> None:
        seen.append(lock_path(out).exists() and lock_path(out).parent == out.parent)
        second.append(main(["prune", str(tiny_model("llama")), str(out), "--drop", "2", "--force", "-q"]))

    _during_write(monkeypatch, second_run)
    assert main(["prune", str(tiny_model("llama")), str(out), "--drop", "1", "-q"]) == 0
    assert second == [2] and seen == [True]
    assert "is being written by another run" in capsys.readouterr().err
    assert "layers: 0,2-5" in (out / "surgery-recipe.yaml").read_text()  # the first run's output, whole
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the lock file goes with the run


def test_a_held_lock_refuses_before_any_work(
    tiny_model: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from filelock import FileLock

    import surgery.engine

    out = tmp_path / "out"
    monkeypatch.setattr(surgery.engine, "detect", None)  # any work past the check would fail differently
    with FileLock(str(lock_path(out))):
        code = main(["prune", str(tiny_model("llama")), str(out), "--drop", "1", "-q"])
    one_line_error(subprocess.CompletedProcess([], code, "", capsys.readouterr().err), "is being written by another run")
    assert not out.exists()



def test_our_lock_and_filelock_exclude_each_other(tmp_path: Path) -> None:
    # The POSIX path takes flock(2) itself; an older surgery (or anything using filelock) must still
    # be refused while we hold it, and we while it holds it.
    from filelock import FileLock, Timeout

    from exporters.staging import _locked
    from surgery.errors import OutputBusyError

    out = tmp_path / "out"
    with _locked(out):
        with pytest.raises(Timeout):
            FileLock(str(lock_path(out)), timeout=0).acquire()
        with pytest.raises(OutputBusyError), _locked(out):
            pass
    assert not lock_path(out).exists()  # removed by its holder
    with _locked(out):  # free again
        pass


@pytest.mark.skipif(os.name != "posix", reason="flock(2)")
def test_a_lock_file_its_holder_removed_as_we_opened_it_counts_as_busy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import fcntl

    from exporters.staging import _locked
    from surgery.errors import OutputBusyError

    out = tmp_path / "out"
    real_flock = fcntl.flock

    def holder_finishes_first(fd: int, operation: int) -> None:
        lock_path(out).unlink()  # the previous holder removes the file and releases
        real_flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", holder_finishes_first)
    entered = []
    with pytest.raises(OutputBusyError), _locked(out):
        entered.append(True)
    assert not entered

# -- 5. debris of a killed run ------------------------------------------------------------------------

_KILLED_RUN = """
import sys, time
import surgery.engine
from surgery.cli import main
from tests.helpers import ROOT, assert_one_line_error
from tests.helpers import read_tree as tree

def stall(staging, *args, **kwargs):
    (staging / "model.safetensors").write_bytes(b"half")
    print("writing", flush=True)
    time.sleep(600)

surgery.engine.write_shards = stall
main(sys.argv[1:])
"""


def test_debris_of_a_killed_run_is_removed_by_the_next_run_only_when_provably_stale(
    tiny_model: Callable[..., Path], tmp_path: Path
) -> None:
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    killed = subprocess.Popen([sys.executable, "-c", _KILLED_RUN, "prune", str(tiny_model("llama")), str(out), "--drop", "1", "-q"],
                              stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert killed.stdout is not None and killed.stdout.readline().strip() == "writing"
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=60)
    debris = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial-")]
    assert len(debris) == 1 and (debris[0] / MARKER_FILENAME).is_file()
    assert f".out.partial-{killed.pid}-" in debris[0].name
    # Lookalikes the next run must keep: no marker, a live owner, another OUT's marker.
    no_marker = tmp_path / f".out.partial-{killed.pid}-nomarker"
    no_marker.mkdir()
    (no_marker / "user-file").write_text("keep")
    live = tmp_path / f".out.partial-{os.getpid()}-live"
    live.mkdir()
    marker = json.loads((debris[0] / MARKER_FILENAME).read_text())
    (live / MARKER_FILENAME).write_text(json.dumps({**marker, "pid": os.getpid()}))
    other = tmp_path / f".out.partial-{killed.pid}-other"
    other.mkdir()
    (other / MARKER_FILENAME).write_text(json.dumps({**marker, "out": "another"}))

    assert main(["prune", str(tiny_model("llama")), str(out), "--drop", "1", "-q"]) == 0
    assert not debris[0].exists()
    assert (no_marker / "user-file").read_text() == "keep" and live.is_dir() and other.is_dir()
    assert (out / "config.json").is_file() and MARKER_FILENAME not in os.listdir(out)


# -- 5. OUT never overlaps the source or the current directory ----------------------------------


@pytest.mark.parametrize("where", ["cwd", "source", "inside-source", "contains-source", "symlink-to-source", "pickle-source"])
def test_overlapping_out_is_refused_and_nothing_is_touched(
    tiny_model: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
    where: str,
) -> None:
    work = tmp_path / "work"
    source = work / "model"
    shutil.copytree(tiny_model("llama"), source)
    (work / "here").mkdir()
    (work / "here" / "notes.txt").write_text("the user's working directory")
    extra: list[str] = []
    if where == "pickle-source":
        import torch
        from safetensors.torch import load_file

        torch.save(load_file(str(source / "model.safetensors")), source / "pytorch_model.bin")
        (source / "model.safetensors").unlink()
        extra = ["--allow-pickle"]
    out, cwd = {
        "cwd": (Path("."), work / "here"), "source": (source, tmp_path), "inside-source": (source / "out", tmp_path),
        "contains-source": (work, tmp_path), "symlink-to-source": (tmp_path / "link", tmp_path),
        "pickle-source": (source, tmp_path),
    }[where]
    if where == "symlink-to-source":
        (tmp_path / "link").symlink_to(source)
    before = tree(work)
    monkeypatch.chdir(cwd)
    code = main(["prune", str(source), str(out), "--drop", "1", "--force", "-q", *extra])
    expected = "the current directory" if where == "cwd" else "overlaps the source model"
    one_line_error(subprocess.CompletedProcess([], code, "", capsys.readouterr().err), expected)
    assert tree(work) == before
    assert sorted(p.name for p in work.iterdir()) == ["here", "model"]


# -- 5. hostile files in a model directory -----------------------------------------------------------


def test_fifos_and_symlinks_out_of_the_model_are_skipped_not_read(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    source = tmp_path / "model"
    shutil.copytree(tiny_model("llama"), source)
    (source / "tokenizer_config.json").write_text('{"model_max_length": 64}')
    os.mkfifo(source / "vocab.txt")  # reading it would block forever
    (source / "leak.txt").symlink_to("/etc/passwd")
    (source / "docs").mkdir()
    (source / "docs" / "secret.md").symlink_to(tmp_path / "elsewhere.md")
    (tmp_path / "elsewhere.md").write_text("private")
    (source / "alias.json").symlink_to("tokenizer_config.json")  # inside the model: copied as a file
    out = tmp_path / "out"
    started = time.monotonic()
    result = cli("prune", str(source), str(out), "--drop", "1", "-q", timeout=180)
    assert result.returncode == 0, result.stderr
    assert time.monotonic() - started < 180
    copied = set(tree(out))
    assert {"vocab.txt", "leak.txt", "docs/secret.md"}.isdisjoint(copied)
    assert "tokenizer_config.json" in copied and "alias.json" in copied and not (out / "alias.json").is_symlink()
    warnings = [line for line in result.stderr.splitlines() if line.startswith("surgery: warning: skipped")]
    assert len(warnings) == 3, result.stderr
    assert any("vocab.txt: a FIFO" in w for w in warnings)
    assert any("leak.txt: a symlink to /etc/passwd, outside the model directory" in w for w in warnings)
    assert any("secret.md: a symlink to" in w for w in warnings)


def test_hugging_face_cache_snapshots_keep_their_symlinked_files(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    """A snapshot in the HF cache is all symlinks into ../../blobs: those count as inside the model."""
    from surgery.source import safe_files

    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in tiny_model("llama").iterdir():
        shutil.copyfile(file, repo / "blobs" / file.name)
        (snapshot / file.name).symlink_to(Path("../../blobs") / file.name)
    assert {p.name for p in safe_files(snapshot)} == {p.name for p in tiny_model("llama").iterdir()}
