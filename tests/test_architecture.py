"""The layer stack read from config.json and tensor names alone equals what transformers derives.

The write path (prune, repeat, reorder, apply, inspect, dry runs) finds the stack without torch or
transformers when config.json states it (``surgery.architecture.STATED_IN_CONFIG``). These tests
keep that table true against the installed transformers, show the two ways agree on every tiny
architecture, that a write through each is byte-identical, and that the write path really starts
without the heavy imports.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from surgery import architecture
from surgery.architecture import (
    POSITIONAL_SETTINGS,
    STATED_IN_CONFIG,
    detect,
    detect_from_files,
    layer_fields,
    read_config,
    stack_prefix,
    stated_layer_count,
)
from surgery.checkpoint import read_tensor_index
from surgery.errors import CheckpointError
from tests import tiny
from tests.helpers import ROOT, read_tree

COMPARED = ("model_type", "class_name", "num_layers", "layer_prefix", "count_key", "config_scope", "per_layer", "index_lists")


@pytest.mark.parametrize("model_type", sorted(STATED_IN_CONFIG))
def test_table_row_matches_the_config_class(model_type: str) -> None:
    """The per-layer fields the config class derives by default are exactly the row's, and no
    position-dependent setting is on by default: otherwise config.json would not tell the whole story."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    assert model_type in CONFIG_MAPPING, f"transformers no longer knows {model_type!r}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = CONFIG_MAPPING[model_type]()
    derived = config.to_dict()
    per_layer, index_lists = layer_fields(derived, config.num_hidden_layers)
    assert set(per_layer) | set(index_lists) == set(STATED_IN_CONFIG[model_type])
    active = [field for field, (is_active, _) in POSITIONAL_SETTINGS.items() if field in derived and is_active(derived)]
    assert active == []


@pytest.mark.parametrize("name", sorted(tiny.CONFIGS))
def test_files_and_transformers_agree(tiny_model: Callable[..., Path], name: str) -> None:
    model_dir = tiny_model(name)
    names = list(read_tensor_index(model_dir))
    fast = detect(model_dir, names)
    slow = detect(model_dir, names, with_transformers=True)
    assert fast.from_files and not slow.from_files  # every tiny family is in the table
    assert {k: getattr(fast, k) for k in COMPARED} == {k: getattr(slow, k) for k in COMPARED}


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma3", "gpt2", "bert"])
def test_writes_through_either_way_are_identical(
    tiny_model: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    from surgery import api

    source = tiny_model(name)
    api.apply(source, tmp_path / "files", "5,0-2,2", quiet=True)
    monkeypatch.setattr(architecture, "STATED_IN_CONFIG", {})
    api.apply(source, tmp_path / "transformers", "5,0-2,2", quiet=True)
    files, derived = read_tree(tmp_path / "files"), read_tree(tmp_path / "transformers")
    assert files.keys() == derived.keys()
    assert {k: v for k, v in files.items() if k != "README.md"} == {k: v for k, v in derived.items() if k != "README.md"}
    config = json.loads(files["config.json"])
    if "layer_types" in config:  # the per-layer list followed the plan
        source_types = json.loads((source / "config.json").read_text())["layer_types"]
        assert config["layer_types"] == [source_types[i] for i in (5, 0, 1, 2, 2)]


def test_qwen2_without_layer_types_goes_through_transformers(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    """Qwen2's config class derives layer_types from use_sliding_window/max_window_layers when absent:
    config.json alone does not say which layers slide, so the stack is not read from the files."""
    raw = read_config(tiny_model("qwen2"))
    del raw["layer_types"]
    assert stated_layer_count(raw) is None
    (tmp_path / "config.json").write_text(json.dumps(raw))
    names = list(read_tensor_index(tiny_model("qwen2")))
    arch = detect(tmp_path, names)
    assert not arch.from_files
    # Qwen2: layers from max_window_layers (3) on use the sliding window
    assert arch.per_layer["layer_types"] == ("full_attention",) * 3 + ("sliding_attention",) * 3


@pytest.mark.parametrize(
    ("change", "why"),
    [
        ({"model_type": "deepseek_v3"}, "a family not in the table"),
        ({"auto_map": {"AutoConfig": "x.Config"}}, "remote code"),
        ({"text_config": {"num_hidden_layers": 6}}, "a nested text config"),
        ({"architectures": ["A", "B"]}, "two classes"),
        ({"architectures": ["logging"]}, "not a class name"),
        ({"num_layers": 5}, "two layer counts that disagree"),
        ({"num_hidden_layers": None}, "no layer count"),
    ],
)
def test_files_do_not_settle_it(change: dict[str, Any], why: str) -> None:
    raw = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 6, **change}
    assert stated_layer_count(raw) is None, why


def test_stated_layer_count_reads_the_family_key() -> None:
    assert stated_layer_count({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_layer": 12}) == ("n_layer", 12)
    assert stated_layer_count(
        {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "num_hidden_layers": 4, "num_layers": 4}
    ) == ("num_hidden_layers", 4)


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        (["model.layers.0.a", "model.layers.1.a", "model.layers.2.a", "lm_head.weight"], "model.layers"),
        (["h.0.attn.w", "h.1.attn.w", "h.2.attn.w", "h.0.mlp.w", "h.1.mlp.w", "h.2.mlp.w"], "h"),
        # experts numbered inside a layer are not a second stack
        (["m.l.0.e.0.w", "m.l.0.e.1.w", "m.l.1.e.0.w", "m.l.1.e.1.w", "m.l.2.e.0.w", "m.l.2.e.1.w"], "m.l"),
        (["enc.0.w", "enc.1.w", "enc.2.w", "dec.0.w", "dec.1.w", "dec.2.w"], None),  # two stacks: ambiguous
        (["model.layers.0.a", "model.layers.2.a", "model.layers.3.a"], None),  # layer 1 missing, 3 extra
        (["model.layers.0.a", "model.layers.1.a", "model.layers.2.b"], None),  # not identical blocks
        (["model.layers.00.a", "model.layers.1.a", "model.layers.2.a"], None),  # "00" is not a layer index
    ],
)
def test_stack_prefix(names: list[str], expected: str | None) -> None:
    assert stack_prefix(names, 3) == expected


def test_a_missing_layer_is_named_by_the_transformers_path(tiny_model: Callable[..., Path]) -> None:
    model_dir = tiny_model("llama")
    names = [n for n in read_tensor_index(model_dir) if not n.startswith("model.layers.3.")]
    assert detect_from_files(read_config(model_dir), names) is None
    with pytest.raises(CheckpointError, match=r"missing \[3\]"):
        detect(model_dir, names)


WRITE_PATH = """
import json, sys
from surgery.cli import main
codes = []
for argv in {argvs!r}:
    try:
        codes.append(main(argv))
    except SystemExit as exc:
        codes.append(exc.code)
print(json.dumps({{"codes": codes, "heavy": [m for m in {heavy!r} if m in sys.modules]}}))
"""


# What the write path never needs: the deep-learning stack, and the Hub client (repocard alone is
# 0.14 s to import, repocard_data 17 ms; an output read as a source has a README.md whose license is
# carried over, and every write builds a card).
HEAVY = ("torch", "transformers", "huggingface_hub")


def test_write_path_imports_neither_torch_nor_transformers(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    source = str(tiny_model("llama", max_shard_size=20_000))
    out = tmp_path / "out"
    argvs = [
        ["prune", source, str(out / "p"), "--drop", "1-2", "-q"],
        ["prune", source, str(out / "d"), "--drop", "1-2", "--dry-run"],
        ["repeat", source, str(out / "r"), "--layers", "2-3", "--times", "2", "-q"],
        ["reorder", source, str(out / "o"), "--reverse", "0-5", "-q"],
        ["apply", source, str(out / "a"), "--recipe", str(out / "p" / "surgery-recipe.yaml"), "-q"],
        ["inspect", str(out / "p")],
        ["prune", str(out / "p"), str(out / "q"), "--drop", "0", "-q"],  # a source with a model card
    ]
    result = subprocess.run(
        [sys.executable, "-c", WRITE_PATH.format(argvs=argvs, heavy=HEAVY)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == {"codes": [0] * len(argvs), "heavy": []}, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a", "o", "p", "q", "r"]  # the dry run wrote nothing
    # The recipe applied again reproduces the prune byte for byte.
    assert read_tree(out / "a") == read_tree(out / "p")
