"""Edges of surgery/engine.py that the streaming tests do not pin down (found by mutation testing).

The summary the CLI prints, the write order of tensors, which shards' headers are read (and
fetched, for a Hub source), the config's dtype key, what a dry run or ``out=None`` leaves alone,
which files the writer puts into OUT, and the read-back check of a rewritten config. Tensors are
written by hand as small safetensors files where the tiny models would hide the order.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from surgery import engine
from surgery.architecture import Architecture, detect
from surgery.checkpoint import INDEX_FILENAME, TensorEntry, read_header, read_tensor_index
from surgery.engine import (
    SurgeryResult,
    execute,
    layer_config,
    plan_output,
    plan_tensors,
    read_needed_tensors,
    run_rewrite,
    write_output,
)
from surgery.errors import CheckpointError, OutputExistsError, PlanError, UnsupportedArchitectureError
from surgery.plan import RECIPE_FILENAME, Plan, Recipe, WriteOptions
from surgery.source import Source


def make_arch(num_layers: int = 3, per_layer: dict[str, tuple[Any, ...]] | None = None, **fields: Any) -> Architecture:
    values: dict[str, Any] = {
        "model_type": "llama",
        "class_name": "LlamaForCausalLM",
        "num_layers": num_layers,
        "layer_prefix": "model.layers",
        "module_path": "model.layers",
        "count_key": "num_hidden_layers",
        "config_scope": (),
        "per_layer": per_layer or {},
        "index_lists": {},
        "config": {},
        "from_files": True,
    }
    values.update(fields)
    return Architecture(**values)


@dataclass
class RecordingSource(Source):
    """A local source that records which files it was asked to fetch (as a Hub source would download them)."""

    fetched: list[list[str]] = field(default_factory=list)

    def fetch(self, needed_files: Iterable[str]) -> None:
        needed = sorted(needed_files)
        self.fetched.append(needed)
        self.pending_files = [f for f in self.pending_files if f not in needed]


def no_card(staging: Path, result: SurgeryResult, source: Source) -> None:
    (staging / "README.md").write_text("card\n")


# -- the summary ------------------------------------------------------------------------------------


def result_of(
    plan: Plan,
    *,
    out: Path | None,
    dry_run: bool,
    shards: list[tuple[str, int]],
    source_params: int | None,
    per_layer: dict[str, tuple[Any, ...]] | None = None,
    dtype: str | None = None,
) -> SurgeryResult:
    return SurgeryResult(
        out=out,
        recipe=Recipe(plan, WriteOptions(dtype=dtype)),
        architecture=make_arch(per_layer=per_layer),
        shards=shards,
        source_params=source_params,
        output_params=1234,
        dry_run=dry_run,
    )


def test_summary_of_a_write() -> None:
    result = result_of(
        Plan((2, 0), 3),
        out=Path("out/dir"),
        dry_run=False,
        shards=[("a", 1500), ("b", 2500)],
        source_params=5_000_000,
        dtype="bf16",
    )
    assert result.total_bytes == 4000
    assert result.summary() == "\n".join(
        [
            "LlamaForCausalLM: 3 layers -> 2 (pruned, layer-reordered)",
            "plan: 2,0",
            "new <- source",
            "  0 <- 2",
            "  1 <- 0",
            "parameters: 5,000,000 -> 1,234; output: 4.0 KB in 2 shard(s), dtype bf16",
            "wrote out/dir",
        ]
    )


def test_summary_of_a_dry_run_with_layer_types_and_unknown_parameters() -> None:
    result = result_of(
        Plan((0, 1, 2), 3),
        out=Path("o"),
        dry_run=True,
        shards=[("m", 999)],
        source_params=None,
        per_layer={"layer_types": ("full", "sliding", "full")},
    )
    lines = result.summary().splitlines()
    assert lines[0] == "LlamaForCausalLM: 3 layers -> 3 (unchanged)"
    assert lines[3:6] == ["  0 <- 0    full", "  1 <- 1    sliding", "  2 <- 2    full"]
    assert lines[6] == "parameters: unknown -> 1,234; output: 999 B in 1 shard(s), dtype as source"
    assert lines[7] == "would write o"
    nothing = result_of(Plan((10,), 11), out=None, dry_run=True, shards=[], source_params=0)
    assert nothing.summary().splitlines()[3:] == [
        "  0 <- 10",
        "parameters: 0 -> 1,234; output: 0 B in 0 shard(s), dtype as source",
        "nothing written",
    ]


@pytest.mark.parametrize(
    ("size", "shown"),
    [
        (0, "0 B"),
        (999, "999 B"),
        (1000, "1.0 KB"),
        (999_949, "999.9 KB"),
        (999_950, "1.0 MB"),  # rounds up: shown in the next unit, never "1000.0 KB"
        (999_950_000, "1.0 GB"),
        (1_000_000, "1.0 MB"),
        (2_500_000_000, "2.5 GB"),
        (999 * 10**9, "999.0 GB"),
        (10**12, "1.0 TB"),
        (1234 * 10**12, "1234.0 TB"),
    ],
)
def test_sizes_for_people(size: int, shown: str) -> None:
    assert engine._human(size) == shown


# -- which tensors, in which order ------------------------------------------------------------------


def entry(name: str, file: str, start: int, dtype: str = "F32", shape: tuple[int, ...] = (2,)) -> TensorEntry:
    return TensorEntry(name, Path(file), dtype, shape, start, start + 8)


def test_tensors_are_written_leading_then_plan_then_trailing_in_file_order() -> None:
    tensors = {
        e.name: e
        for e in [
            entry("model.norm.weight", "b.safetensors", 8),  # after a layer tensor in file order: trailing
            entry("model.layers.1.w", "b.safetensors", 0),
            entry("model.embed.weight", "a.safetensors", 16),
            entry("model.layers.0.w", "a.safetensors", 32),
            entry("model.layers.0.v", "a.safetensors", 24),
            entry("model.rotary.inv_freq", "a.safetensors", 0, dtype="I64"),  # leading, and not cast
            entry("model.layers.2.w", "c.safetensors", 0),
            entry("lm_head.weight", "c.safetensors", 8),
        ]
    }
    recipe = Recipe(Plan((2, 0, 0), 3), WriteOptions(dtype="bf16"))
    out = plan_tensors(tensors, make_arch(), recipe)
    assert [(t.name, t.source.name, t.dtype) for t in out] == [
        ("model.rotary.inv_freq", "model.rotary.inv_freq", "I64"),
        ("model.embed.weight", "model.embed.weight", "BF16"),
        ("model.layers.0.w", "model.layers.2.w", "BF16"),
        ("model.layers.1.v", "model.layers.0.v", "BF16"),
        ("model.layers.1.w", "model.layers.0.w", "BF16"),
        ("model.layers.2.v", "model.layers.0.v", "BF16"),
        ("model.layers.2.w", "model.layers.0.w", "BF16"),
        ("model.norm.weight", "model.norm.weight", "BF16"),
        ("lm_head.weight", "lm_head.weight", "BF16"),
    ]
    kept = plan_tensors(tensors, make_arch(), Recipe(Plan((1,), 3)))
    assert [(t.name, t.dtype) for t in kept][2:4] == [("model.layers.0.w", "F32"), ("model.norm.weight", "F32")]


@pytest.mark.parametrize(
    ("raw", "dtype", "expected"),
    [
        ({"torch_dtype": "float32"}, "bf16", {"torch_dtype": "bfloat16"}),  # the key the source uses
        ({"dtype": "float32"}, "fp16", {"dtype": "float16"}),
        # both stated: both follow, or a loader reading the other one would cast the weights back
        ({"dtype": "bfloat16", "torch_dtype": "bfloat16"}, "fp32", {"dtype": "float32", "torch_dtype": "float32"}),
        ({}, "fp32", {"dtype": "float32"}),
        ({"torch_dtype": "float32"}, None, {"torch_dtype": "float32"}),
    ],
)
def test_layer_config_records_the_cast(raw: dict[str, Any], dtype: str | None, expected: dict[str, Any]) -> None:
    config = {"num_hidden_layers": 3, "layer_types": ["a", "b", "c"], **raw}
    arch = make_arch(per_layer={"layer_types": ("a", "b", "c")})
    new = layer_config(config, arch, Recipe(Plan((2, 2), 3), WriteOptions(dtype=dtype)))
    assert new == {"num_hidden_layers": 2, "layer_types": ["c", "c"], **expected}


# -- which files are read -------------------------------------------------------------------------


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    """A three-layer model in four shards: embed+layer 0, layer 1, layer 2, norm+head; with an index."""
    model = tmp_path / "model"
    model.mkdir()
    shards = {
        "s1.safetensors": {"model.embed.weight": torch.ones(4), "model.layers.0.w": torch.full((2,), 0.0)},
        "s2.safetensors": {"model.layers.1.w": torch.full((2,), 1.0)},
        "s3.safetensors": {"model.layers.2.w": torch.full((2,), 2.0)},
        "s4.safetensors": {"model.norm.weight": torch.ones(2), "lm_head.weight": torch.ones(4)},
    }
    weight_map = {}
    for file, tensors in shards.items():
        save_file(tensors, str(model / file), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, file))
    (model / INDEX_FILENAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (model / "config.json").write_text(
        json.dumps(
            {
                "model_type": "llama",
                "architectures": ["LlamaForCausalLM"],
                "num_hidden_layers": 3,
                "torch_dtype": "float32",
            }
        )
    )
    return model


def test_only_the_shards_of_needed_tensors_are_fetched_and_read(sharded: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = RecordingSource("m", sharded, pending_files=["s3.safetensors", "s2.safetensors"])
    read: list[str] = []
    monkeypatch.setattr(engine, "read_header", lambda path: (read.append(path.name), read_header(path))[1])
    names, weight_map = engine._tensor_names(source)
    assert source.fetched == []  # the index alone names the tensors
    assert weight_map is not None and sorted(names) == sorted(weight_map)
    result, shards = plan_output(
        SurgeryResult, source, None, Recipe(Plan((2, 0), 3)), make_arch(), names, weight_map, plan_tensors, dry_run=True
    )
    assert source.fetched == [["s1.safetensors", "s3.safetensors", "s4.safetensors"]]
    assert sorted(read) == ["s1.safetensors", "s3.safetensors", "s4.safetensors"]
    assert [t.name for _, group in shards for t in group] == [
        "model.embed.weight",
        "model.layers.0.w",
        "model.layers.1.w",
        "lm_head.weight",
        "model.norm.weight",
    ]
    assert result.output_params == 4 + 2 + 2 + 2 + 4
    assert result.source_params is None  # s2 is still on the Hub, and this source has no repository to ask
    assert result.shards == [("model.safetensors", 14 * 4)]
    assert result.dry_run is True and result.out is None


def test_an_unsharded_source_is_fetched_whole_and_read_from_its_headers(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    save_file({"model.layers.0.w": torch.ones(2), "x": torch.ones(1)}, str(model / "model.safetensors"))
    source = RecordingSource("m", model, pending_files=["model.safetensors"])
    names, weight_map = engine._tensor_names(source)
    assert (sorted(names), weight_map) == (["model.layers.0.w", "x"], None)
    assert source.fetched == [["model.safetensors"]]
    assert read_needed_tensors(source, None, ["x"]) == read_tensor_index(model)  # every tensor, not just the needed


def test_an_index_naming_a_shard_without_the_tensor_is_refused_with_the_index_path(sharded: Path) -> None:
    source = Source("m", sharded)
    weight_map = {"model.norm.weight": "s1.safetensors"}
    with pytest.raises(CheckpointError) as info:
        read_needed_tensors(source, weight_map, ["model.norm.weight"])
    assert str(info.value) == (
        f"{sharded / INDEX_FILENAME}: weight_map['model.norm.weight'] names 's1.safetensors', which does not hold it"
    )


# -- what is written --------------------------------------------------------------------------------


def test_a_plan_with_groups_is_refused_by_execute(sharded: Path, tmp_path: Path) -> None:
    with pytest.raises(PlanError) as info:
        execute(Source("m", sharded), tmp_path / "out", Recipe(Plan.from_ranges("[0-1],2", 3)), card=no_card)
    assert str(info.value) == (
        "surgery.engine.execute writes plans without parallel groups; "
        "write this one with surgery.widen.execute_parallel (as surgery.api does)"
    )
    assert not (tmp_path / "out").exists()


def test_a_dry_run_or_no_out_writes_nothing_even_over_an_existing_out(sharded: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    recipe = Recipe(Plan((0, 2), 3))
    dry = execute(Source("m", sharded), out, recipe, card=no_card, dry_run=True)
    assert (dry.out, dry.dry_run, dry.output_params, dry.source_params) == (out, True, 14, 16)
    assert sorted(p.name for p in out.iterdir()) == ["keep"]
    nowhere = execute(Source("m", sharded), None, recipe, card=no_card, quiet=True)
    assert (nowhere.out, nowhere.dry_run) == (None, False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "out"]
    with pytest.raises(OutputExistsError):
        execute(Source("m", sharded), out, recipe, card=no_card, quiet=True)


def test_the_written_directory(sharded: Path, tmp_path: Path) -> None:
    (sharded / "tokenizer.json").write_text("{}")
    (sharded / "sub" / "deeper").mkdir(parents=True)
    (sharded / "sub" / "deeper" / "t.txt").write_text("nested")
    (sharded / "skipped.py").write_text("# written by the caller")
    seen: dict[str, Any] = {}

    def card(staging: Path, result: SurgeryResult, source: Source) -> None:
        seen["card"] = (sorted(p.name for p in staging.iterdir()), result.recipe.plan.layers, source.path)
        (staging / "README.md").write_text("card\n")

    def before(staging: Path) -> None:
        seen["before"] = sorted(p.name for p in staging.iterdir())

    source = Source("m", sharded)
    recipe = Recipe(Plan((2, 1), 3))
    names, weight_map = engine._tensor_names(source)
    result, shards = plan_output(
        SurgeryResult, source, tmp_path / "out", recipe, make_arch(), names, weight_map, plan_tensors, dry_run=False
    )
    config = {"b": 1, "a": [1, 2]}
    write_output(
        source,
        tmp_path / "out",
        result,
        shards,
        config,
        card=card,
        force=False,
        quiet=True,
        before_files=before,
        skip_files=frozenset({"skipped.py"}),
    )
    out = tmp_path / "out"
    assert seen["before"] == ["config.json", "model.safetensors"]  # weights and config first
    assert seen["card"] == (
        ["config.json", "model.safetensors", "sub", RECIPE_FILENAME, "tokenizer.json"],
        (2, 1),
        sharded,
    )  # the card last, seeing everything else
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        "README.md",
        "config.json",
        "model.safetensors",
        "sub/deeper/t.txt",
        RECIPE_FILENAME,
        "tokenizer.json",
    ]
    assert (out / "config.json").read_text() == '{\n  "b": 1,\n  "a": [\n    1,\n    2\n  ]\n}\n'
    assert (out / "sub" / "deeper" / "t.txt").read_text() == "nested"
    assert (out / RECIPE_FILENAME).read_text() == recipe.to_yaml()
    written = load_file(str(out / "model.safetensors"))
    assert sorted(written) == [
        "lm_head.weight",
        "model.embed.weight",
        "model.layers.0.w",
        "model.layers.1.w",
        "model.norm.weight",
    ]
    assert written["model.layers.0.w"].tolist() == [2.0, 2.0] and written["model.layers.1.w"].tolist() == [1.0, 1.0]


def test_run_rewrite_writes_the_new_config_and_runs_before_files(sharded: Path, tmp_path: Path) -> None:
    calls: list[Any] = []
    rewrite = engine.Rewrite(
        result_type=SurgeryResult,
        check=lambda arch, plan, names: calls.append(("check", arch.num_layers, str(plan), len(names))),
        to_outputs=plan_tensors,
        new_config=lambda raw, arch, recipe: {**raw, "rewritten": len(recipe.plan)},
        before_files=lambda staging, arch, recipe: calls.append(
            ("before", (staging / "config.json").exists(), len(recipe.plan))
        ),
        skip_files=frozenset({"extra.txt"}),
    )
    (sharded / "extra.txt").write_text("x")
    result = run_rewrite(
        rewrite,
        Source("m", sharded),
        tmp_path / "out",
        Recipe(Plan((1,), 3)),
        card=no_card,
        force=False,
        dry_run=False,
        quiet=True,
        trust_remote_code=False,
    )
    assert calls == [("check", 3, "1", 6), ("before", True, 1)]
    assert json.loads((tmp_path / "out" / "config.json").read_text())["rewritten"] == 1
    assert not (tmp_path / "out" / "extra.txt").exists()
    assert result.out == tmp_path / "out" and not result.dry_run


# -- the read-back check of a config derived through transformers -----------------------------------


def test_config_read_back_is_checked(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    source = tiny_model("gemma3")
    arch = detect(source, list(read_tensor_index(source)), with_transformers=True)
    assert not arch.from_files
    raw = json.loads((source / "config.json").read_text())
    plan = Plan((5, 0, 1), 6)
    recipe = Recipe(plan)
    good = arch.rewrite_config(raw, plan)

    def check(config: dict[str, Any]) -> None:
        directory = tmp_path / str(len(list(tmp_path.iterdir())))
        directory.mkdir()
        (directory / "config.json").write_text(json.dumps(config))
        engine._check_config_reads_back(directory, arch, recipe)

    check(good)
    with pytest.raises(UnsupportedArchitectureError) as info:
        check({**good, "num_hidden_layers": 4, "layer_types": [*good["layer_types"], "full_attention"]})
    assert str(info.value) == "architecture 'gemma3_text': the rewritten config does not read back its layer count"
    with pytest.raises(UnsupportedArchitectureError) as info:
        check({**good, "layer_types": list(reversed(good["layer_types"]))})
    assert str(info.value) == (
        "architecture 'gemma3_text': config field 'layer_types' does not read back as the plan requires after rewriting"
    )
    # A config class that ships as code (our own wide blocks' outputs) is not run, and not checked.
    check({**good, "model_type": "surgery_shipped", "auto_map": {"AutoConfig": "configuration_x.XConfig"}})
    files = detect(source, list(read_tensor_index(source)))
    assert files.from_files
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("not json at all")
    engine._check_config_reads_back(bad, files, recipe)  # a stack read from the files needs no read-back


def test_read_back_errors_other_than_remote_code_propagate(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    source = tiny_model("gemma3")
    arch = detect(source, list(read_tensor_index(source)), with_transformers=True)
    shutil.copy(source / "config.json", tmp_path / "config.json")
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "model_type": "no_such_type_anywhere"}))
    with pytest.raises(ValueError) as info:
        engine._check_config_reads_back(tmp_path, arch, Recipe(Plan((0,), 6)))
    assert "trust_remote_code" not in str(info.value)


def test_the_wide_config_records_the_cast_the_same_way() -> None:
    from surgery.widen import parallel_config

    raw = {"num_hidden_layers": 3, "dtype": "bfloat16", "torch_dtype": "bfloat16"}
    recipe = Recipe(Plan.from_ranges("[0-1],2", 3), WriteOptions(dtype="fp32"))
    new = parallel_config(raw, make_arch(), recipe)
    assert (new["dtype"], new["torch_dtype"]) == ("float32", "float32")
    assert parallel_config({"num_hidden_layers": 3}, make_arch(), recipe)["dtype"] == "float32"
    assert "torch_dtype" not in parallel_config({"num_hidden_layers": 3}, make_arch(), recipe)
