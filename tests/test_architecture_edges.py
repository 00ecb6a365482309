"""Edges of surgery/architecture.py that the tiny-model tests do not pin down (found by mutation testing).

Exact error messages, the boundaries of counts and positions, which tensor names belong to a layer,
how the config follows a plan (per-layer lists, index lists, nested text configs), and which settings
make a layer's behaviour depend on its position. Most tests build an :class:`Architecture` by hand;
the ones that go through transformers use the tiny Llama of tests/conftest.py.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from surgery import architecture
from surgery.architecture import (
    Architecture,
    count_layers,
    detect,
    detect_from_files,
    layer_count,
    layer_fields,
    load_config,
    read_config,
    stack_prefix,
    stated_layer_count,
)
from surgery.checkpoint import read_tensor_index
from surgery.errors import CheckpointError, PlanError, UnsupportedArchitectureError
from surgery.plan import MAX_POSITIONS, Plan


def make_arch(config: dict[str, Any], num_layers: int = 6, **fields: Any) -> Architecture:
    """An architecture of ``num_layers`` layers under ``model.layers`` whose config is ``config``."""
    values: dict[str, Any] = {
        "model_type": "test_type",
        "class_name": "TestModel",
        "num_layers": num_layers,
        "layer_prefix": "model.layers",
        "module_path": "model.layers",
        "count_key": "num_hidden_layers",
        "config_scope": (),
        "per_layer": {},
        "index_lists": {},
        "config": config,
    }
    values.update(fields)
    return Architecture(**values)


def plan(layers: list[int], num_source_layers: int = 6) -> Plan:
    return Plan(tuple(layers), num_source_layers)


# -- tensor names -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.layers.0.self_attn.q_proj.weight", 0),
        ("model.layers.12.mlp.experts.3.w1", 12),  # the first number after the prefix, not the expert's
        ("model.layers.7", 7),
        ("model.layers.norm.weight", None),  # under the prefix but not a numbered layer
        ("model.layers", None),
        ("model.layers_extra.1.weight", None),  # another name that merely starts like the prefix
        ("model.layers1.weight", None),
        ("lm_head.weight", None),
        ("x.model.layers.1.weight", None),
    ],
)
def test_layer_of(name: str, expected: int | None) -> None:
    assert make_arch({}).layer_of(name) == expected


def test_rename_replaces_only_the_layer_number() -> None:
    arch = make_arch({})
    assert arch.rename("model.layers.12.self_attn.q_proj.weight", 3) == "model.layers.3.self_attn.q_proj.weight"
    assert arch.rename("model.layers.0.mlp.experts.5.w1", 41) == "model.layers.41.mlp.experts.5.w1"


def test_stack_prefix_of_a_one_layer_model() -> None:
    assert stack_prefix(["emb.weight", "model.layers.0.a", "model.layers.0.b", "norm.weight"], 1) == "model.layers"


# -- plans and positions ----------------------------------------------------------------------------


def test_a_plan_for_another_layer_count_is_refused_with_both_counts() -> None:
    with pytest.raises(PlanError) as info:
        make_arch({}).check_plan(plan([0, 1, 2], num_source_layers=8))
    assert str(info.value) == "the plan was made for a model with 8 layers, but this model has 6"


def positional_error(config: dict[str, Any], layers: list[int], **fields: Any) -> str | None:
    """The message check_plan raises for ``layers`` on a 6-layer model with ``config``, or None."""
    try:
        make_arch(config, **fields).check_plan(plan(layers))
    except UnsupportedArchitectureError as exc:
        assert exc.model_type == "test_type"
        assert exc.hint == "choose a plan that keeps such layers at positions of the same kind"
        return exc.reason
    return None


def test_gpt2_inverse_layer_scaling_refuses_any_move_and_names_the_first() -> None:
    config = {"scale_attn_by_inverse_layer_idx": True}
    # Dropping the last layers moves nothing; every other layer keeps its index.
    assert positional_error(config, [0, 1, 2, 3]) is None
    assert positional_error(config, [0, 2, 3]) == (
        "scale_attn_by_inverse_layer_idx=True makes a layer's behaviour depend on its position, "
        "and the plan moves layer 2 to position 1, which behaves differently"
    )
    assert positional_error({"scale_attn_by_inverse_layer_idx": False}, [5, 4, 3]) is None


def test_sparse_step_allows_moves_between_positions_of_the_same_kind() -> None:
    # Qwen-MoE: layer i is sparse when (i + 1) % step == 0; with step 2 the odd layers are sparse.
    config = {"decoder_sparse_step": 2}
    assert positional_error(config, [2, 3, 4, 5]) is None  # dense 2 -> 0, sparse 3 -> 1, ...
    assert positional_error(config, [0, 1, 4, 5, 2, 3]) is None
    assert positional_error(config, [1, 0]) == (
        "decoder_sparse_step=2 makes a layer's behaviour depend on its position, "
        "and the plan moves layer 1 to position 0, which behaves differently"
    )
    assert positional_error(config, [0, 2, 1]) is not None  # the first move named is position 1
    assert "moves layer 2 to position 1" in str(positional_error(config, [0, 2, 1]))
    assert positional_error({"decoder_sparse_step": 1}, [5, 4, 3, 2, 1, 0]) is None  # every layer alike


def test_interleave_step_of_three() -> None:
    # Llama 4: layer i is MoE when (i + 1) % step == 0: with step 3, layers 2 and 5.
    config = {"interleave_moe_layer_step": 3}
    assert positional_error(config, [0, 1, 2]) is None
    assert positional_error(config, [1, 0, 5, 3, 4, 2]) is None
    assert "moves layer 3 to position 2" in str(positional_error(config, [0, 1, 3]))
    assert "moves layer 2 to position 1" in str(positional_error(config, [0, 2]))


def test_first_k_dense_then_every_freq_th() -> None:
    # DeepSeek: layer i is MoE when i >= k and i % freq == 0.
    assert positional_error({"first_k_dense_replace": 2}, [1, 0, 3, 2, 5, 4]) is None
    assert "moves layer 2 to position 1" in str(positional_error({"first_k_dense_replace": 2}, [0, 2]))
    freq = {"first_k_dense_replace": 0, "moe_layer_freq": 2}  # MoE at 0, 2, 4
    assert positional_error(freq, [2, 1, 0, 3]) is None
    assert "moves layer 1 to position 0" in str(positional_error(freq, [1]))
    assert positional_error({"first_k_dense_replace": 0, "moe_layer_freq": 1}, [5, 4, 3]) is None  # not active


def test_positional_settings_are_read_in_the_nested_text_config() -> None:
    config = {"model_type": "outer", "text_config": {"decoder_sparse_step": 2}}
    assert positional_error(config, [1, 0], config_scope=("text_config",)) is not None
    # the same setting outside the scope is not the stack's
    assert (
        positional_error({"decoder_sparse_step": 2, "text_config": {}}, [1, 0], config_scope=("text_config",)) is None
    )


# -- the config follows the plan --------------------------------------------------------------------


def test_rewrite_config_permutes_lists_remaps_indices_and_keeps_the_rest() -> None:
    raw = {
        "model_type": "m",
        "text_config": {
            "num_hidden_layers": 6,
            "layer_types": ["a0", "a1", "a2", "a3", "a4", "a5"],
            "mlp_only_layers": [1, 3],
            "hidden_size": 32,
        },
        "num_hidden_layers": 6,  # outside the scope: not the stack's, left alone
    }
    arch = make_arch(
        raw,
        config_scope=("text_config",),
        per_layer={"layer_types": ("a0", "a1", "a2", "a3", "a4", "a5")},
        index_lists={"mlp_only_layers": (1, 3)},
    )
    before = json.dumps(raw)
    new = arch.rewrite_config(raw, plan([3, 1, 1, 0]))
    assert json.dumps(raw) == before  # the source dict is not modified
    assert new == {
        "model_type": "m",
        "text_config": {
            "num_hidden_layers": 4,
            "layer_types": ["a3", "a1", "a1", "a0"],
            "mlp_only_layers": [0, 1, 2],  # new positions 0, 1 and 2 hold source layers 3, 1 and 1
            "hidden_size": 32,
        },
        "num_hidden_layers": 6,
    }
    assert list(new["text_config"]) == ["num_hidden_layers", "layer_types", "mlp_only_layers", "hidden_size"]
    assert arch.expected_fields(plan([3, 1, 1, 0])) == {"layer_types": ["a3", "a1", "a1", "a0"]}


def test_rewrite_config_updates_an_alias_stating_the_same_count_and_nothing_else() -> None:
    """num_hidden_layers and n_layer both say 6: both say 4 after a 4-layer plan; a key holding
    another number (decoder_layers 2) is about something else and stays."""
    raw = {"model_type": "m", "num_hidden_layers": 6, "n_layer": 6, "decoder_layers": 2, "n_layers": "6"}
    arch = make_arch(raw)
    new = arch.rewrite_config(raw, plan([3, 1, 1, 0]))
    assert new == {"model_type": "m", "num_hidden_layers": 4, "n_layer": 4, "decoder_layers": 2, "n_layers": "6"}
    assert raw["n_layer"] == 6


def test_layer_fields_picks_lists_of_one_scalar_per_layer() -> None:
    derived = {
        "layer_types": ["a", "b", "c"],
        "mixed": [1, 2.5, None],
        "flags": [True, False, True],
        "architectures": ["A", "B", "C"],  # not per-layer, though it has three entries
        "suppress_tokens": [1, 2, 3],
        "nested": [[1], [2], [3]],  # not scalars
        "short": ["a", "b"],
        "mlp_only_layers": [2, 0],  # indices, any length
        "name": "abc",
    }
    per_layer, index_lists = layer_fields(derived, 3)
    assert per_layer == {"layer_types": ("a", "b", "c"), "mixed": (1, 2.5, None), "flags": (True, False, True)}
    assert index_lists == {"mlp_only_layers": (2, 0)}


# -- layer counts -----------------------------------------------------------------------------------


@pytest.mark.parametrize("count", [1, 7, MAX_POSITIONS])
def test_layer_count_accepts_one_to_max(count: int) -> None:
    assert layer_count(SimpleNamespace(num_hidden_layers=count, model_type="m")) == count


@pytest.mark.parametrize("count", [0, MAX_POSITIONS + 1, -1, "6", 6.0, True, None])
def test_layer_count_refuses_others_naming_the_value(count: Any) -> None:
    with pytest.raises(UnsupportedArchitectureError) as info:
        layer_count(SimpleNamespace(num_hidden_layers=count, model_type="m"))
    assert str(info.value) == f"architecture 'm': its config has no layer count (num_hidden_layers is {count!r})"


def test_layer_count_reads_the_text_config_and_names_unknown_types() -> None:
    text = SimpleNamespace(num_hidden_layers=4, model_type="inner")
    outer = SimpleNamespace(num_hidden_layers=99, model_type="outer", get_text_config=lambda: text)
    assert layer_count(outer) == 4
    with pytest.raises(UnsupportedArchitectureError) as info:
        layer_count(SimpleNamespace())
    assert str(info.value) == "architecture 'unknown': its config has no layer count (num_hidden_layers is None)"


def test_stated_layer_count_boundaries() -> None:
    base = {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    assert stated_layer_count({**base, "num_hidden_layers": 1}) == ("num_hidden_layers", 1)
    assert stated_layer_count({**base, "num_hidden_layers": MAX_POSITIONS}) == ("num_hidden_layers", MAX_POSITIONS)
    assert stated_layer_count({**base, "num_hidden_layers": 0}) is None
    assert stated_layer_count({**base, "num_hidden_layers": MAX_POSITIONS + 1}) is None
    assert stated_layer_count({**base, "num_hidden_layers": "4"}) is None
    assert stated_layer_count({**base, "n_layers": 3}) == ("n_layers", 3)
    assert stated_layer_count({**base, "decoder_layers": 3, "num_layers": 3}) == ("num_layers", 3)  # agreeing keys
    assert stated_layer_count({**base, "num_hidden_layers": 3, "architectures": []}) is None
    assert stated_layer_count({**base, "num_hidden_layers": 3, "architectures": "LlamaForCausalLM"}) is None
    assert stated_layer_count({**base, "num_hidden_layers": 3, "architectures": ["llamaForCausalLM"]}) is None
    assert stated_layer_count({**base, "num_hidden_layers": 3, "architectures": ["Llama.ForCausalLM"]}) is None
    assert stated_layer_count({**base, "num_hidden_layers": 3, "language_config": {}}) is None
    assert stated_layer_count({**base, "num_hidden_layers": 3, "text_config": None}) == ("num_hidden_layers", 3)
    assert stated_layer_count({**base, "num_hidden_layers": 3, "auto_map": {}}) == ("num_hidden_layers", 3)
    assert stated_layer_count({"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 3}) is None


def test_stated_layer_count_needs_the_derived_fields() -> None:
    qwen2 = {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 3}
    assert stated_layer_count({**qwen2, "layer_types": ["a", "b", "c"]}) == ("num_hidden_layers", 3)
    assert stated_layer_count({**qwen2, "layer_types": ["a", "b"]}) is None  # one per layer, or it is derived
    assert stated_layer_count({**qwen2, "layer_types": "a"}) is None
    moe = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"], "num_hidden_layers": 3}
    assert stated_layer_count({**moe, "mlp_only_layers": []}) == ("num_hidden_layers", 3)  # indices: any length
    assert stated_layer_count({**moe, "mlp_only_layers": [0, 2]}) == ("num_hidden_layers", 3)
    assert stated_layer_count(moe) is None
    smol = {
        "model_type": "smollm3",
        "architectures": ["SmolLM3ForCausalLM"],
        "num_hidden_layers": 2,
        "layer_types": ["a", "b"],
    }
    assert stated_layer_count(smol) is None  # no_rope_layers missing
    assert stated_layer_count({**smol, "no_rope_layers": [1, 0]}) == ("num_hidden_layers", 2)


def test_detect_from_files_fills_every_field() -> None:
    raw = {
        "model_type": "qwen3_moe",
        "architectures": ["Qwen3MoeForCausalLM"],
        "num_hidden_layers": 2,
        "mlp_only_layers": [1],
        "layer_types": ["x", "y"],
        "nested": {"deep": [1]},
    }
    names = ["model.embed.weight", "model.layers.0.w", "model.layers.1.w", "lm_head.weight"]
    arch = detect_from_files(raw, names)
    assert arch == Architecture(
        model_type="qwen3_moe",
        class_name="Qwen3MoeForCausalLM",
        num_layers=2,
        layer_prefix="model.layers",
        module_path="model.layers",
        count_key="num_hidden_layers",
        config_scope=(),
        per_layer={"layer_types": ("x", "y")},
        index_lists={"mlp_only_layers": (1,)},
        config=raw,
        from_files=True,
    )
    assert arch is not None and arch.config is not raw and arch.config["nested"] is not raw["nested"]  # a copy
    assert detect_from_files(raw, ["model.layers.0.w"]) is None  # layer 1 missing


# -- config.json checks -----------------------------------------------------------------------------


def write_config(directory: Path, config: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def test_a_wrong_value_is_shown_whole_up_to_40_characters(tmp_path: Path) -> None:
    hint = 'fix config.json: counts and sizes are JSON numbers such as 30, not strings such as "30"'
    short = write_config(tmp_path / "short", {"hidden_size": "x" * 38})  # repr: 40 characters
    with pytest.raises(CheckpointError) as info:
        read_config(short)
    assert (
        str(info.value)
        == f"{short / 'config.json'}: config key 'hidden_size' is '{'x' * 38}', not a non-negative whole number"
    )
    assert info.value.hint == hint
    long = write_config(tmp_path / "long", {"hidden_size": "x" * 39})
    with pytest.raises(CheckpointError) as info:
        read_config(long)
    assert (
        str(info.value) == f"{long / 'config.json'}: config key 'hidden_size' is str, not a non-negative whole number"
    )
    nested = write_config(tmp_path / "nested", {"vision_config": {"n_layer": MAX_POSITIONS + 1}})
    with pytest.raises(CheckpointError) as info:
        read_config(nested)
    assert str(info.value) == (
        f"{nested / 'config.json'}: config key 'vision_config.n_layer' is {MAX_POSITIONS + 1}, "
        f"not a layer count this tool handles (at most {MAX_POSITIONS:,})"
    )
    assert read_config(write_config(tmp_path / "max", {"n_layer": MAX_POSITIONS})) == {"n_layer": MAX_POSITIONS}


# -- through transformers ---------------------------------------------------------------------------


REMOTE_CONFIG = """
from pathlib import Path
from transformers import PretrainedConfig
Path(__file__).with_name("RAN").write_text("the model's own code ran")
class MineConfig(PretrainedConfig):
    model_type = "my_new_arch"
"""


def test_remote_code_is_not_run_unless_asked(tmp_path: Path) -> None:
    model = write_config(
        tmp_path / "m",
        {
            "model_type": "my_new_arch",
            "num_hidden_layers": 2,
            "auto_map": {"AutoConfig": "configuration_mine.MineConfig"},
        },
    )
    (model / "configuration_mine.py").write_text(REMOTE_CONFIG)
    for call in (lambda: load_config(model), lambda: count_layers(model), lambda: detect(model, ["l.0.w", "l.1.w"])):
        with pytest.raises(UnsupportedArchitectureError) as info:
            call()
        assert str(info.value) == (
            "architecture 'my_new_arch': its code lives in the model repository, and remote code is not run unless asked"
        )
        assert info.value.hint == "pass --trust-remote-code if you trust this model's code"
    assert not (model / "RAN").exists()


@pytest.mark.parametrize(("config", "shown"), [({"model_type": "my_new_arch"}, "my_new_arch"), ({}, "unknown")])
def test_a_model_type_transformers_does_not_know(tmp_path: Path, config: dict[str, Any], shown: str) -> None:
    model = write_config(tmp_path / "m", config)
    with pytest.raises(UnsupportedArchitectureError) as info:
        load_config(model)
    assert info.value.model_type == shown
    assert info.value.reason.startswith("transformers does not know it (") and "\n" not in info.value.reason
    assert info.value.hint == "upgrade transformers, or pass --trust-remote-code for a model that ships its own code"


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (OSError("disk on fire\nsecond line"), "{dir}: config.json cannot be read (disk on fire)"),
        (RuntimeError(""), "{dir}/config.json: transformers cannot read this config (RuntimeError: RuntimeError)"),
        (
            RuntimeError("x" * 400),
            "{dir}/config.json: transformers cannot read this config (RuntimeError: " + "x" * 300 + ")",
        ),
        (
            ValueError("  bad value\nmore"),
            "{dir}/config.json: transformers cannot read this config (ValueError: bad value)",
        ),
    ],
)
def test_load_config_turns_transformers_errors_into_one_line(
    tiny_model: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: Exception, expected: str
) -> None:
    import transformers

    model = tmp_path / "m"
    shutil.copytree(tiny_model("llama"), model)

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)
    with pytest.raises(CheckpointError) as info:
        load_config(model)
    assert str(info.value) == expected.format(dir=model)


def test_a_surgery_error_inside_transformers_passes_through(
    tiny_model: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers

    error = PlanError("raised on purpose")

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise error

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)
    with pytest.raises(PlanError) as info:
        load_config(tiny_model("llama"))
    assert info.value is error


@pytest.fixture
def llama_config(tiny_model: Callable[..., Path], tmp_path: Path) -> Callable[..., tuple[Path, list[str]]]:
    """``llama_config(**changes)``: a directory with the tiny Llama's config.json changed, and its tensor names."""
    source = tiny_model("llama")
    names = list(read_tensor_index(source))

    def make(drop: tuple[str, ...] = (), **changes: Any) -> tuple[Path, list[str]]:
        config = {k: v for k, v in json.loads((source / "config.json").read_text()).items() if k not in drop}
        directory = tmp_path / f"c{len(list(tmp_path.iterdir()))}"
        return write_config(directory, {**config, **changes}), names

    return make


def test_a_class_transformers_lacks_falls_back_to_the_auto_classes(llama_config: Callable[..., Any]) -> None:
    model, names = llama_config(architectures=["NotInTransformers"])
    arch = detect(model, names, with_transformers=True)
    assert (arch.class_name, arch.layer_prefix, arch.module_path, arch.count_key) == (
        "LlamaForCausalLM",
        "model.layers",
        "model.layers",
        "num_hidden_layers",
    )
    model, names = llama_config(drop=("architectures",))
    assert detect(model, names, with_transformers=True).class_name == "LlamaForCausalLM"
    # remote model classes are skipped unless trusted: the base model, whose stack is "layers" under "model"
    model, names = llama_config(architectures=["Custom"], auto_map={"AutoModelForCausalLM": "modeling_x.Custom"})
    arch = detect(model, names, with_transformers=True)
    assert (arch.class_name, arch.module_path, arch.layer_prefix) == ("LlamaModel", "layers", "model.layers")
    model, names = llama_config(
        architectures=["Custom"], auto_map={"AutoModelForCausalLM": "modeling_x.Custom", "AutoModel": "modeling_x.Base"}
    )
    with pytest.raises(UnsupportedArchitectureError) as info:
        detect(model, names, with_transformers=True)
    assert str(info.value) == "architecture 'llama': no transformers model class for Custom"


def test_a_class_that_cannot_be_built_is_named(llama_config: Callable[..., Any]) -> None:
    model, names = llama_config(architectures=["logging"])  # a transformers attribute, but no model class
    with pytest.raises(UnsupportedArchitectureError) as info:
        detect(model, names, with_transformers=True)
    assert str(info.value) == (
        "architecture 'llama': logging cannot be built from this config.json (TypeError: 'module' object is not callable)"
    )


def test_layer_counts_through_transformers(llama_config: Callable[..., Any]) -> None:
    model, names = llama_config(num_hidden_layers=1)
    arch = detect(
        model,
        [n for n in names if not n.startswith("model.layers.") or n.startswith("model.layers.0.")],
        with_transformers=True,
    )
    assert (arch.num_layers, arch.count_key) == (1, "num_hidden_layers")
    model, names = llama_config(num_hidden_layers=0)
    with pytest.raises(UnsupportedArchitectureError) as info:
        detect(model, names)
    assert str(info.value) == "architecture 'llama': its config has no layer count (num_hidden_layers)"
    model, names = llama_config(drop=("num_hidden_layers",))  # the config class's default count, stated nowhere
    with pytest.raises(UnsupportedArchitectureError) as info:
        detect(model, names)
    assert str(info.value) == "architecture 'llama': cannot tell which config.json field holds the layer count"


def test_a_merged_output_is_not_rewritten(llama_config: Callable[..., Any]) -> None:
    model, names = llama_config(model_type="surgery_parallel")
    with pytest.raises(UnsupportedArchitectureError) as info:
        detect(model, names)
    assert str(info.value) == (
        "architecture 'surgery_parallel': this checkpoint's parallel groups are already merged into wide blocks "
        "(surgery parallel), so its layers are not a stack of identical layers to rewrite"
    )
    assert (
        info.value.hint
        == "rewrite its source instead: surgery apply SOURCE OUT --recipe THIS_DIR (its surgery-recipe.yaml)"
    )


def test_a_multimodal_config_without_a_nested_text_config_is_refused(tmp_path: Path) -> None:
    model = write_config(tmp_path / "m", {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]})
    with pytest.raises(UnsupportedArchitectureError) as info:
        detect(model, [])
    assert str(info.value) == (
        "architecture 'gemma3_text': its config.json has no nested text config (text_config) holding the layer stack"
    )


def test_the_stack_of_a_multimodal_model_is_in_its_text_config(tmp_path: Path) -> None:
    from tests import tiny

    text = {
        "model_type": "gemma3_text",
        "vocab_size": 128,
        "hidden_size": 32,
        "intermediate_size": 48,
        "num_hidden_layers": 6,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "sliding_window": 4,
        "layer_types": tiny.MIXED_TYPES,
    }
    vision = {
        "model_type": "siglip_vision_model",
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 28,
        "patch_size": 14,
    }
    raw = {
        "model_type": "gemma3",
        "architectures": ["Gemma3ForConditionalGeneration"],
        "text_config": text,
        "vision_config": vision,
        "mm_tokens_per_image": 4,
    }
    model = write_config(tmp_path / "m", raw)
    vision_names = [f"model.vision_tower.encoder.layers.{i}.mlp.fc1.weight" for i in range(2)]
    text_names = [
        f"model.language_model.layers.{i}.{w}"
        for i in range(6)
        for w in ("mlp.up_proj.weight", "input_layernorm.weight")
    ]
    arch = detect(model, ["model.language_model.embed_tokens.weight", *vision_names, *text_names, "lm_head.weight"])
    assert (
        arch.model_type,
        arch.class_name,
        arch.num_layers,
        arch.config_scope,
        arch.count_key,
        arch.layer_prefix,
    ) == (
        "gemma3_text",
        "Gemma3ForConditionalGeneration",
        6,
        ("text_config",),
        "num_hidden_layers",
        "model.language_model.layers",
    )
    assert arch.per_layer["layer_types"] == tuple(tiny.MIXED_TYPES)
    new = arch.rewrite_config(raw, plan([4, 0]))
    assert new["text_config"]["num_hidden_layers"] == 2
    assert new["text_config"]["layer_types"] == ["full_attention", "sliding_attention"]
    assert new["vision_config"] == vision and "num_hidden_layers" not in new


def test_a_type_without_a_causal_lm_class_is_built_as_its_base_model(tmp_path: Path) -> None:
    model = write_config(
        tmp_path / "m",
        {
            "model_type": "distilbert",
            "architectures": ["NotAClass"],
            "vocab_size": 128,
            "dim": 32,
            "hidden_dim": 48,
            "n_layers": 3,
            "n_heads": 4,
        },
    )
    names = [
        f"distilbert.transformer.layer.{i}.ffn.lin1.weight" for i in range(3)
    ]  # as a DistilBertForMaskedLM saves them
    arch = detect(model, ["distilbert.embeddings.word_embeddings.weight", *names], with_transformers=True)
    assert (arch.class_name, arch.module_path, arch.layer_prefix, arch.count_key) == (
        "DistilBertModel",
        "transformer.layer",
        "distilbert.transformer.layer",
        "n_layers",
    )


def test_no_class_and_no_name(llama_config: Callable[..., Any]) -> None:
    model, names = llama_config(drop=("architectures",), auto_map={"AutoModelForCausalLM": "x.A", "AutoModel": "x.B"})
    with pytest.raises(UnsupportedArchitectureError) as info:
        detect(model, names, with_transformers=True)
    assert str(info.value) == "architecture 'llama': no transformers model class for this config"


def test_the_unknown_type_message_quotes_transformers_first_line(tmp_path: Path) -> None:
    from transformers import AutoConfig

    model = write_config(tmp_path / "m", {"model_type": "my_new_arch"})
    with pytest.raises(ValueError) as original:
        AutoConfig.from_pretrained(str(model))
    with pytest.raises(UnsupportedArchitectureError) as info:
        load_config(model)
    assert info.value.reason == f"transformers does not know it ({str(original.value).strip().splitlines()[0]})"


def test_find_stack_takes_the_largest_list_of_identical_blocks() -> None:
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.other = nn.ModuleList([nn.Linear(50, 50) for _ in range(2)])  # largest, but not 3 layers
            self.small = nn.ModuleList([nn.Linear(2, 2) for _ in range(3)])
            self.mixed = nn.ModuleList([nn.Linear(20, 20), nn.Conv1d(20, 20, 3), nn.Linear(20, 20)])
            self.big = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
            self.twin = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])  # as large: the first one found wins

    assert architecture._find_stack(Net(), 3) == "big"
    with pytest.raises(UnsupportedArchitectureError) as info:
        architecture._find_stack(Net(), 4)
    assert str(info.value) == "architecture 'Net': no list of 4 identical layers found in the model"


def test_match_prefix_candidates_and_messages() -> None:
    match = architecture._match_prefix
    names = ["model.layers.0.w", "model.layers.1.w"]
    assert match("model.layers", "model", names, 2) == "model.layers"
    assert match("model.layers", "model", ["layers.0.w", "layers.1.w"], 2) == "layers"  # saved from the base model
    assert match("h", "transformer", ["transformer.h.0.w", "transformer.h.1.w"], 2) == "transformer.h"
    assert match("modelx.layers", "model", ["modelx.layers.0.w", "modelx.layers.1.w"], 2) == "modelx.layers"
    with pytest.raises(CheckpointError) as info:
        match("model.layers", "model", ["lm_head.weight"], 2)
    assert str(info.value) == (
        "model.layers: no checkpoint tensors found under 'model.layers.N' or 'layers.N' or 'model.model.layers.N'"
    )
    with pytest.raises(CheckpointError) as info:
        match("layers", "", ["x.0.w"], 2)
    assert str(info.value) == "layers: no checkpoint tensors found under 'layers.N'"
    with pytest.raises(CheckpointError) as info:
        match("m.l", "", [f"m.l.{i}.w" for i in (0, 1, 2, 11, 12, 13, 14, 15, 16)], 10)
    assert str(info.value) == (
        "m.l: the checkpoint's layers do not match the config's 10 (missing [3, 4, 5, 6, 7], unexpected [11, 12, 13, 14, 15])"
    )
