"""Push to and pull from the Hub, offline: the real ``huggingface_hub`` client against a local fake Hub.

The fake (``tests/hub_server.py``, fixtures ``fake_hub`` and ``hub`` in tests/conftest.py) listens on 127.0.0.1; the client finds it through ``HF_ENDPOINT``,
set after ``huggingface_hub`` was imported (so the code under test must pass the endpoint on
itself), with ``HF_HUB_DISABLE_XET=1`` so that large files take the LFS path. ``SURGERY_LIVE_HUB=1``
with ``HF_TOKEN`` runs the same push against the real Hub.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from huggingface_hub import HfApi, ModelCard, constants, snapshot_download
from huggingface_hub.errors import HfHubHTTPError

import surgery
from exporters.card import CARD_FILENAME, update_card_with_validation
from surgery.architecture import detect
from surgery.checkpoint import read_tensor_index
from surgery.cli import main
from surgery.errors import (
    HubAuthError,
    HubPushError,
    HubRevisionError,
    MissingTokenError,
    ModelNotFoundError,
    RejectedTokenError,
)
from tests.helpers import HUB_BAD_TOKEN as BAD_TOKEN
from tests.helpers import HUB_READ_TOKEN as READ_TOKEN
from tests.helpers import HUB_TOKEN as TOKEN
from tests.helpers import assert_one_line_error
from tests.helpers import digest_tree as _tree
from tests.hub_server import FakeHub


def _download(hub: FakeHub, repo_id: str, target: Path, token: str | None = TOKEN) -> dict[str, str]:
    snapshot_download(repo_id, local_dir=target, endpoint=hub.url, token=token)
    return _tree(target)


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The one error line of a run that exited 2 (the exit code is asserted by the caller)."""
    return assert_one_line_error(2, capsys.readouterr().err)


@pytest.fixture
def tiny_out(tiny_sharded: Path, tmp_path: Path) -> Path:
    """A pruned tiny model whose card records a validation of its weights (so push publishes it)."""
    out = tmp_path / "tiny-out"
    surgery.prune(tiny_sharded, out, drop="2", max_shard_size=40_000, quiet=True)
    update_card_with_validation(out, {"text": "a fixture text", "tokens": 64, "kl": 0.01, "top1": 0.9})
    return out


# -- push ----------------------------------------------------------------------------------------


@pytest.mark.real
def test_prune_push_to_hub_round_trip_is_byte_identical(smollm2_dir: Path, hub: FakeHub, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A pruned SmolLM2 in several shards, pushed by --push-to-hub: every file arrives byte for byte."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    out = tmp_path / "smol-pruned"
    code = main(["prune", str(out), "--drop", "4-27", "--dtype", "bf16", "--max-shard-size", "20MB",
                 "--push-to-hub", "tester/smol-pruned", "--allow-unvalidated", "-q"])
    assert code == 0
    shards = sorted(p.name for p in out.glob("*.safetensors"))
    assert len(shards) >= 3
    assert hub.commit_count("tester/smol-pruned") == 2  # the repo's first commit, then exactly one push
    assert len(hub.lfs_uploads) == len(shards)  # every shard through LFS ...
    assert any(m == "POST" and p.endswith("/complete") for m, p, _ in hub.requests)  # ... the largest in parts
    local = _tree(out)
    remote = _download(hub, "tester/smol-pruned", tmp_path / "download")
    assert set(remote) == set(local) | {".gitattributes"}
    assert {name: remote[name] for name in local} == local
    card = ModelCard.load(tmp_path / "download" / CARD_FILENAME)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert card.data.license == "apache-2.0"
    assert card.data.tags == ["pruned", "layer-surgery"]
    assert 'AutoModelForCausalLM.from_pretrained("tester/smol-pruned")' in card.text
    assert "layers 4-27 removed (30 → 6 layers)" in card.text


def test_push_verb_creates_the_repo_and_reports(tiny_out: Path, hub: FakeHub,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["push", str(tiny_out), "tester/tiny-push", "--token", TOKEN, "--json", "-q",
                 "--commit-message", "first version"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["repo_id"] == "tester/tiny-push" and body["commit"] == hub.head("tester/tiny-push")
    assert {f["file"] for f in body["files"]} == set(_tree(tiny_out))
    assert not hub.repos["tester/tiny-push"].private
    # an unchanged push sends nothing and makes no new commit
    hub.reset_log()
    result = surgery.push(tiny_out, "tester/tiny-push", token=TOKEN, quiet=True)
    assert result.commit == body["commit"] and hub.commit_count("tester/tiny-push") == 2
    assert body["changed"] and not result.changed and "nothing sent, no new commit" in result.summary()
    assert hub.lfs_uploads == []


def test_dry_run_lists_files_with_sizes_and_sends_nothing(tiny_out: Path, hub: FakeHub,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["push", str(tiny_out), "tester/never", "--dry-run", "--json"]) == 0  # no token needed
    body = json.loads(capsys.readouterr().out)
    assert body["dry_run"] and body["commit"] is None
    assert {f["file"]: f["bytes"] for f in body["files"]} == {
        p.name: p.stat().st_size for p in tiny_out.iterdir() if p.is_file()}
    assert hub.requests == [] and "tester/never" not in hub.repos


def test_push_sends_only_regular_files_inside_out(tiny_out: Path, hub: FakeHub, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    """Symlinks leading outside OUT (a private key, /etc/passwd, a directory), FIFOs and sockets are
    skipped with a warning, by the --dry-run listing and by the upload alike; nothing outside OUT is sent."""
    import socket

    outside = tmp_path / "home"
    (outside / ".ssh").mkdir(parents=True)
    (outside / ".ssh" / "id_rsa").write_text("-----BEGIN OPENSSH PRIVATE KEY----- s3cret")
    (outside / "photos").mkdir()
    (outside / "photos" / "me.jpg").write_text("private photo")
    (tiny_out / "id_rsa").symlink_to(outside / ".ssh" / "id_rsa")
    (tiny_out / "passwd").symlink_to("/etc/passwd")
    (tiny_out / "photos").symlink_to(outside / "photos")
    os.mkfifo(tiny_out / "pipe.bin")  # opening it would block the push forever
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(tiny_out / "agent.sock"))
    (tiny_out / "alias.json").symlink_to("config.json")  # inside OUT: sent as the file it names
    (tiny_out / "docs").mkdir()
    (tiny_out / "docs" / "notes.md").write_text("notes")
    skipped = ["id_rsa", "passwd", "photos", "pipe.bin", "agent.sock"]
    expected = {name for name in _tree(tiny_out) if name.split("/")[0] not in skipped} | {"alias.json"}
    try:
        assert main(["push", str(tiny_out), "tester/never", "--dry-run", "--json"]) == 0
        captured = capsys.readouterr()
        assert {f["file"] for f in json.loads(captured.out)["files"]} == expected
        warnings = [line for line in captured.err.splitlines() if line.startswith("surgery: warning: skipped")]
        assert sorted(w.split(": ")[2].rsplit("/", 1)[1] for w in warnings) == sorted(skipped), captured.err

        result = surgery.push(tiny_out, "tester/only-ours", token=TOKEN, quiet=True)
    finally:
        listener.close()
    assert {name for name, _ in result.files} == expected
    remote = hub.files("tester/only-ours")
    assert set(remote) == expected | {".gitattributes"}
    assert hub.content(remote["alias.json"]) == (tiny_out / "config.json").read_bytes()
    assert not [name for name, entry in remote.items() if b"s3cret" in hub.content(entry) or b"root:" in hub.content(entry)]
    assert len([line for line in capsys.readouterr().err.splitlines() if "warning: skipped" in line]) == len(skipped)


def test_an_interrupted_push_completes_on_rerun_without_resending(tiny_out: Path, hub: FakeHub,
                                                                 tmp_path: Path) -> None:
    shards = sorted(tiny_out.glob("*.safetensors"))
    assert len(shards) >= 4
    hub.fail_lfs_uploads_after = 2  # the connection "drops" after two LFS objects arrived
    with pytest.raises(HubPushError) as failed:
        surgery.push(tiny_out, "tester/resumed", token=TOKEN, quiet=True)
    assert "nothing was committed" in str(failed.value)
    assert hub.commit_count("tester/resumed") == 1  # only the repo's own first commit: no partial commit
    assert set(hub.files("tester/resumed")) == {".gitattributes"}
    arrived = list(hub.lfs_uploads)
    assert len(arrived) == 2

    hub.reset_log()
    surgery.push(tiny_out, "tester/resumed", token=TOKEN, quiet=True)
    assert len(hub.lfs_uploads) == len(shards) - 2  # only what had not arrived
    assert not set(hub.lfs_uploads) & set(arrived)
    assert hub.commit_count("tester/resumed") == 2
    remote = _download(hub, "tester/resumed", tmp_path / "download")
    assert {name: remote[name] for name in _tree(tiny_out)} == _tree(tiny_out)


def test_a_private_repo_is_refused_without_a_token(tiny_out: Path, hub: FakeHub,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["push", str(tiny_out), "tester/secret", "--private", "-q"]) == 2
    assert "needs a Hugging Face token" in _error_line(capsys)
    with pytest.raises(MissingTokenError):
        surgery.push(tiny_out, "tester/secret", private=True)
    assert hub.requests == [] and "tester/secret" not in hub.repos
    # the server refuses too: no anonymous repo creation
    with pytest.raises(HfHubHTTPError, match="401"):
        HfApi(endpoint=hub.url, token=False).create_repo("tester/secret", private=True)


def test_a_private_push_stays_private(tiny_out: Path, hub: FakeHub, tmp_path: Path,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "surgery-cache"))  # where inspect puts the Hub files
    # the token from the stored login (hf auth login writes this file)
    Path(constants.HF_TOKEN_PATH).parent.mkdir(parents=True, exist_ok=True)
    Path(constants.HF_TOKEN_PATH).write_text(TOKEN)
    surgery.push(tiny_out, "testorg/private-tiny", private=True, quiet=True)
    assert hub.repos["testorg/private-tiny"].private
    Path(constants.HF_TOKEN_PATH).unlink()
    with pytest.raises(ModelNotFoundError):  # invisible without a token
        surgery.inspect("testorg/private-tiny")
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert surgery.inspect("testorg/private-tiny").num_layers == 5
    # a private push into an existing public repo is refused before anything is sent
    surgery.push(tiny_out, "tester/public-tiny", quiet=True)
    with pytest.raises(HubAuthError, match="is public"):
        surgery.push(tiny_out, "tester/public-tiny", private=True, quiet=True, commit_message="leak?")
    assert hub.commit_count("tester/public-tiny") == 2


def test_rejected_and_read_only_tokens_are_one_line_errors(tiny_out: Path, hub: FakeHub,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["push", str(tiny_out), "tester/rejected", "--token", BAD_TOKEN]) == 2
    assert "rejected the token (401" in _error_line(capsys)
    with pytest.raises(RejectedTokenError) as refused:
        surgery.push(tiny_out, "reader/read-only", token=READ_TOKEN, quiet=True)
    assert refused.value.status == 403
    assert "tester/rejected" not in hub.repos and "reader/read-only" not in hub.repos


@pytest.mark.parametrize(("target", "repo_id", "expected"), [
    ("out", "tester//double", "invalid Hub repo id"),
    ("out", "tester/bad name", "invalid Hub repo id"),
    ("out", "org/a/b", "invalid Hub repo id"),
    ("empty", "tester/x", "not a model directory: it has no config.json"),
    ("file", "tester/x", "not a model directory: it is a file"),
    ("missing", "tester/x", "not a model directory: it does not exist"),
    ("no-card", "tester/x", "README.md: is missing"),
])
def test_bad_push_input_is_one_line_exit_2_and_sends_nothing(
    tiny_out: Path, hub: FakeHub, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    target: str, repo_id: str, expected: str,
) -> None:
    paths = {"out": tiny_out, "empty": tmp_path / "empty", "file": tiny_out / "config.json",
             "missing": tmp_path / "missing", "no-card": tmp_path / "no-card"}
    (tmp_path / "empty").mkdir()
    if target == "no-card":
        (tmp_path / "no-card").mkdir()
        for name in ("config.json", "model-00001-of-00005.safetensors"):
            (tmp_path / "no-card" / name).write_bytes((tiny_out / name).read_bytes())
    assert main(["push", str(paths[target]), repo_id, "--token", TOKEN]) == 2
    assert expected in _error_line(capsys)
    assert hub.requests == []


def test_a_revision_that_does_not_exist_is_refused(tiny_out: Path, hub: FakeHub,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    surgery.push(tiny_out, "tester/branches", token=TOKEN, quiet=True)
    head = hub.head("tester/branches")
    assert main(["push", str(tiny_out), "tester/branches", "--revision", "nope", "--token", TOKEN]) == 2
    assert "has no revision 'nope'" in _error_line(capsys)
    with pytest.raises(HubRevisionError):  # nor in a repo that does not exist yet: nothing is created
        surgery.push(tiny_out, "tester/no-such-repo", revision="dev", token=TOKEN, quiet=True)
    assert "tester/no-such-repo" not in hub.repos
    # an existing branch takes the commit; main stays where it was
    HfApi(endpoint=hub.url, token=TOKEN).create_branch("tester/branches", branch="dev")
    (tiny_out / "notes.txt").write_text("on the dev branch\n")
    result = surgery.push(tiny_out, "tester/branches", revision="dev", token=TOKEN, quiet=True)
    assert result.revision == "dev" and hub.head("tester/branches", "dev") == result.commit
    assert hub.head("tester/branches") == head and "notes.txt" in hub.files("tester/branches", "dev")


def test_push_to_hub_option_through_the_api(tiny_model: Callable[..., Path], hub: FakeHub, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "repeated"
    surgery.repeat(tiny_model("llama"), out, layers="1-2", times=2, quiet=True,
                   push_to_hub="testorg/tiny-repeated", token=TOKEN, allow_unvalidated=True)
    assert _tree(out) == {k: v for k, v in _download(hub, "testorg/tiny-repeated", tmp_path / "dl").items()
                          if k != ".gitattributes"}
    # a dry run writes nothing and so pushes nothing; push options without a target are refused
    hub.reset_log()
    assert main(["repeat", str(tiny_model("llama")), str(tmp_path / "x"), "--layers", "1-2", "--dry-run",
                 "--push-to-hub", "testorg/never", "--allow-unvalidated"]) == 0
    assert hub.requests == [] and "nothing pushed" in capsys.readouterr().err
    assert main(["repeat", str(tiny_model("llama")), str(tmp_path / "y"), "--layers", "1-2", "--private"]) == 2
    assert "apply only with push_to_hub" in _error_line(capsys)
    assert main(["prune", str(tiny_model("llama")), str(tmp_path / "z"), "--drop", "1", "--push-to-hub", "a//b"]) == 2
    assert "invalid Hub repo id" in _error_line(capsys) and not (tmp_path / "z").exists()


def test_the_token_never_appears_anywhere(tiny_out: Path, hub: FakeHub, tmp_path: Path,
                                          caplog: pytest.LogCaptureFixture,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    caplog.set_level(logging.DEBUG)  # everything, including the client's own debug logs
    caplog.set_level(logging.DEBUG, logger="huggingface_hub")
    seen: list[str] = []
    assert main(["push", str(tiny_out), "tester/token-check", "--token", TOKEN]) == 0
    hub.fail_lfs_uploads_after = 0
    (tiny_out / "extra.safetensors").write_bytes(b"\0" * 1000)  # one more LFS object, refused
    # (new weights after the validation: each push below says --allow-unvalidated, so it reaches the Hub)
    assert main(["push", str(tiny_out), "tester/token-check", "--token", TOKEN, "--allow-unvalidated"]) == 2
    hub.fail_lfs_uploads_after = None
    assert main(["push", str(tiny_out), "tester/token-check", "--token", BAD_TOKEN, "--allow-unvalidated"]) == 2
    assert main(["push", str(tiny_out), "tester/token-check", "--revision", "nope", "--token", TOKEN,
                 "--allow-unvalidated"]) == 2
    for call in (lambda: surgery.push(tiny_out, "tester/token-check", token=BAD_TOKEN, allow_unvalidated=True),
                 lambda: surgery.push(tiny_out, "tester/x", revision="nope", token=TOKEN, allow_unvalidated=True)):
        with pytest.raises(surgery.SurgeryError) as caught:
            call()
        seen += [str(caught.value), caught.value.one_line(), repr(caught.value)]
    captured = capsys.readouterr()
    assert "pushing 10 files to tester/token-check" in caplog.text and "rejected the token" in captured.err
    seen += [captured.out, captured.err, caplog.text]
    seen += [p.read_text(errors="replace") for p in tiny_out.rglob("*") if p.is_file()]
    remote = tmp_path / "download"
    _download(hub, "tester/token-check", remote)
    seen += [p.read_text(errors="replace") for p in remote.rglob("*") if p.is_file()]
    for secret in (TOKEN, BAD_TOKEN):
        assert not [text for text in seen if secret in text]


# -- pull ----------------------------------------------------------------------------------------


def test_a_hub_source_downloads_only_the_shards_the_plan_needs(tiny_sharded: Path, hub: FakeHub, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for file in tiny_sharded.iterdir():
        (source / file.name).write_bytes(file.read_bytes())
    (source / CARD_FILENAME).write_text("---\nlicense: mit\n---\n# tiny source\n")
    api = HfApi(endpoint=hub.url, token=TOKEN)
    api.create_repo("testorg/tiny-source")
    api.upload_folder(repo_id="testorg/tiny-source", folder_path=source)
    monkeypatch.setenv("SURGERY_CACHE", str(tmp_path / "surgery-cache"))

    index = json.loads((source / "model.safetensors.index.json").read_text())["weight_map"]
    arch = detect(source, list(index))
    kept = {0, 5}
    needed = {shard for name, shard in index.items() if arch.layer_of(name) in (None, *kept)}
    assert needed < set(index.values())  # the plan really leaves some shards out

    hub.reset_log()
    result = surgery.prune("testorg/tiny-source", tmp_path / "out", drop="1-4", quiet=True)
    downloads = {p.rsplit("/", 1)[1] for m, p, r in hub.requests
                 if m == "GET" and p.endswith(".safetensors") and r is None}
    assert downloads == needed
    for method, path, byte_range in hub.requests:  # the others: only their headers, for the card's count
        if path.endswith(".safetensors") and path.rsplit("/", 1)[1] not in needed:
            assert method == "GET" and byte_range == "bytes=0-100000"

    local = surgery.prune(source, tmp_path / "local-out", drop="1-4", quiet=True)
    assert len(result.recipe.plan) == len(local.recipe.plan) == 2
    assert {k: v for k, v in _tree(tmp_path / "out").items() if k.endswith(".safetensors")} == {
        k: v for k, v in _tree(tmp_path / "local-out").items() if k.endswith(".safetensors")}
    card = ModelCard.load(tmp_path / "out" / CARD_FILENAME)
    assert card.data.base_model == "testorg/tiny-source" and card.data.license == "mit"
    total = sum(e.numel for e in read_tensor_index(source).values())
    assert f"| source | 6 | {total:,} |" in card.text
    assert result.source_params == local.source_params == total  # the summary counts the whole source too

    hub.reset_log()  # a second run at the same commit finds everything in the cache
    surgery.prune("testorg/tiny-source", tmp_path / "again", drop="1-4", quiet=True)
    assert not [p for m, p, r in hub.requests if m == "GET" and p.endswith(".safetensors") and r is None]


def test_a_missing_hub_source_is_a_one_line_error(hub: FakeHub, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune", "testorg/does-not-exist", str(tmp_path / "out"), "--drop", "1"]) == 2
    assert "not found on the Hub" in _error_line(capsys)
    assert not (tmp_path / "out").exists()


# -- the real Hub, opt-in ------------------------------------------------------------------------


@pytest.mark.skipif(os.environ.get("SURGERY_LIVE_HUB") != "1" or not os.environ.get("HF_TOKEN"),
                    reason="live Hub test: set SURGERY_LIVE_HUB=1 and HF_TOKEN (a write token)")
def test_live_push_round_trip(tiny_out: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same push against the real Hub: a private repo, downloaded back byte for byte, then deleted."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    api = HfApi(token=os.environ["HF_TOKEN"])
    user = api.whoami()["name"]
    repo_id = f"{user}/layer-surgery-live-test-{uuid.uuid4().hex[:8]}"
    try:
        result = surgery.push(tiny_out, repo_id, private=True, quiet=True)
        assert result.commit
        snapshot_download(repo_id, local_dir=tmp_path / "download", token=os.environ["HF_TOKEN"])
        remote = _tree(tmp_path / "download")
        assert {name: remote[name] for name in _tree(tiny_out)} == _tree(tiny_out)
    finally:
        api.delete_repo(repo_id, missing_ok=True)
