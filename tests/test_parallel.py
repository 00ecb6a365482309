"""Parallel groups merged into wide blocks (issue #4): the checkpoint equals the independent reference.

The oracle is tests/reference.py's :func:`parallel_reference_model`, written independently of the
product (neither :mod:`surgery.view` nor :mod:`surgery.widen`): deep copies of the original layers
in the plan's order, each group ``[i-j]xR`` a module that calls its K original layers on the same
input and averages them, ``h' = (1/K) * sum_k L_k(h)`` (docs/parallel.md, "Semantics (exact)"), applied R
times. The wide-block checkpoint, loaded with ``AutoModelForCausalLM.from_pretrained(OUT,
trust_remote_code=True)``, must give the same logits with and without the KV cache (the reference
runs uncached), for K = 2, 4, 8, looped or not, on tiny models of every supported family and on the
real SmolLM2-135M and Gemma 3 270M.

Tolerance: fp32, relative error ``max |a - b| / max |b| <= 1e-5`` (RTOL) on the logits; greedy tokens
equal. A bf16 checkpoint is held to 5e-2. Each comparison also checks that the reference differs from
the unmodified model by more than 100 x RTOL, so it is not two copies of the original agreeing.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from surgery import api
from surgery.cli import main
from surgery.compat import output_cache
from surgery.errors import ParallelGroupError, ParallelMergeError, PlanError
from surgery.plan import ParallelGroup, Plan, Recipe
from tests import tiny
from tests.helpers import TINY_IDS as IDS
from tests.helpers import assert_one_line_error, greedy, load_wide, random_llama, rel
from tests.reference import cached_logits, parallel_reference_model

RTOL = 1e-5


def check_equal(
    model: torch.nn.Module, out: Path, plan: Plan, ids: torch.Tensor, prefix: int, new: int = 6, *, uncached_generation: bool = True,
) -> dict[str, float]:
    """The wide checkpoint against the independent reference of ``model`` running ``plan``
    (tests/reference.py): full logits, cached logits (prefill of ``prefix`` tokens, then one token at
    a time), left-padded logits when ``ids`` has two rows, and greedy generation with the cache (and
    without it, when ``uncached_generation``) equal to the reference's uncached greedy tokens.
    Every logit comparison within RTOL (relative, fp32)."""
    wide = load_wide(out)
    reference = parallel_reference_model(model, plan)
    with torch.no_grad():
        expected = reference(ids, use_cache=False).logits
        original = model(ids, use_cache=False).logits
        assert rel(expected, original) > 100 * RTOL  # the plan changes the model: not two originals agreeing
        full = wide(ids, use_cache=False).logits
        cached = cached_logits(wide, ids, prefix)
        errors = {"uncached": rel(full, expected), "cached": rel(cached, expected)}
        if ids.shape[0] > 1:  # left padding in the second row: the masks reach every branch
            mask = torch.ones_like(ids)
            mask[1, :3] = 0
            want = reference(ids, attention_mask=mask, use_cache=False).logits[mask.bool()]
            got = wide(ids, attention_mask=mask, use_cache=False).logits[mask.bool()]
            errors["padded"] = rel(got, want)
        assert all(error <= RTOL for error in errors.values()), errors
        start = ids[:1, :prefix]
        expected_tokens = greedy(reference, start, new, use_cache=False)
        assert torch.equal(greedy(wide, start, new, use_cache=True), expected_tokens)
        if uncached_generation:
            assert torch.equal(greedy(wide, start, new, use_cache=False), expected_tokens)
    return errors


# -- the plan ------------------------------------------------------------------------------------


def test_plan_syntax_builder_and_recipe_round_trip() -> None:
    plan = Plan.parallel("10-13,14-17", loop=3, num_source_layers=30)
    assert str(plan) == "0-9,[10-13]x3,[14-17]x3,18-29"
    assert Plan.from_ranges(str(plan), 30) == plan
    assert len(plan) == 10 + 3 + 3 + 12 and len(plan.layers) == 10 + 2 + 12
    assert plan.groups == (ParallelGroup((10, 11, 12, 13), 3), ParallelGroup((14, 15, 16, 17), 3))
    assert plan.operations == ("layer-repeated", "parallel-merged")
    assert Plan.parallel("10-11", 1, 30).operations == ("parallel-merged",)
    assert plan.mapping()[:10] == [(i, i) for i in range(10)] and plan.mapping()[10] == (16, 18)
    assert [p for p, s in plan.positions() if s == plan.groups[0]] == [10, 11, 12]
    shared = Plan.from_ranges("0,[1-2]x2:shared,3", 4)
    assert shared.groups[0].mlp_input == "shared" and str(shared) == "0,[1-2]x2:shared,3"
    recipe = Recipe(shared, source="x")
    assert Recipe.from_yaml(recipe.to_yaml()) == recipe
    assert Recipe.from_yaml("num_source_layers: 4\nlayers: [0, '[1-2]x2:shared', 3]\n").plan == shared
    # plain plans are untouched
    assert Plan.drop("1", 3).mapping() == [(0, 0), (1, 2)] and len(Plan.repeat("1", 2, 3)) == 4


@pytest.mark.parametrize(
    "build, match",
    [
        (lambda: Plan.parallel("10", 1, 30), "two or more layers"),
        (lambda: Plan.parallel("10-13,12-15", 1, 30), "overlap at layer 12"),
        (lambda: Plan.parallel("28-31", 1, 30), "crosses the end of the model"),
        (lambda: Plan.parallel("10-13", 0, 30), "at least 1"),
        (lambda: Plan.from_ranges("0-9,[10-11]x0,12-29", 30), "at least 1"),
        (lambda: Plan.from_ranges("[1-2],[1-2]", 30), "overlap"),
        (lambda: Plan((ParallelGroup((3, 5)),), 30), "consecutive"),
    ],
)
def test_bad_groups_are_refused(build: Callable[[], Plan], match: str) -> None:
    with pytest.raises(ParallelGroupError, match=match):
        build()


# -- tiny models: every supported family ----------------------------------------------------------


@pytest.fixture(scope="module")
def llama10(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    """A tiny 10-layer llama with attention and MLP biases (so K = 8 fits, and every bias path is used)."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=tiny.VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=10, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, attention_bias=True, mlp_bias=True,
    )
    model = random_llama(config)
    path = tmp_path_factory.mktemp("llama10") / "src"
    model.save_pretrained(path)
    return path, model.eval()



@pytest.mark.parametrize(
    "name, spec",
    [
        ("llama", "[0-1],[2-5]"),  # K = 2 and K = 4
        ("llama", "0,[1-4]x3,5"),  # K = 4 looped
        ("llama-tied", "[0-2]x2,3-5"),
        ("mistral", "0,[1-2]x2,[3-4],5"),
        ("qwen2", "[0-2]x2,[3-5]"),  # full-attention group, then a sliding-window group
        ("qwen3", "0,[2-3]x2,4,5"),  # per-head q/k norms kept per branch; layers 2-3 are both sliding-window
        ("gemma3", "0,[2-3]x2,4,5"),  # sandwich norms (1 + w) and q/k norms kept per branch
        ("gemma2", "0,[2-3]x2,4,5"),  # attention logit soft-capping
    ],
)
def test_wide_block_equals_reference(tiny_model: Callable[..., Path], tmp_path: Path, name: str, spec: str) -> None:
    src = tiny_model(name)
    out = tmp_path / "wide"
    result = api.apply(src, out, spec, quiet=True)
    assert "parallel-merged" in result.recipe.plan.operations
    check_equal(tiny.build(name), out, Plan.from_ranges(spec, tiny.NUM_LAYERS), IDS, prefix=9)


def test_the_comparison_catches_a_slightly_wrong_wide_block(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    """The oracle and its tolerance mean something: one branch's MLP output weights off by 0.1% in the
    stored wide block (the reference untouched) fail the comparison, by more than 3x RTOL."""
    from safetensors.torch import load_file, save_file

    out = tmp_path / "wide"
    api.apply(tiny_model("llama"), out, "0,[1-2]x2,3-5", quiet=True)
    shard = out / "model.safetensors"
    with safe_open(str(shard), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(shard))
    down = tensors["model.layers.1.mlp.down_proj.weight"]  # (D, K·I): the second branch's columns from I on
    down[:, down.shape[1] // 2 :] *= 1.001
    save_file(tensors, str(shard), metadata=metadata)
    plan = Plan.from_ranges("0,[1-2]x2,3-5", tiny.NUM_LAYERS)
    with pytest.raises(AssertionError):
        check_equal(tiny.build("llama"), out, plan, IDS, prefix=9)
    reference = parallel_reference_model(tiny.build("llama"), plan)
    with torch.no_grad():
        assert rel(load_wide(out)(IDS, use_cache=False).logits, reference(IDS, use_cache=False).logits) > 3 * RTOL


@pytest.mark.parametrize("spec", ["[1-8]", "0,[1-8]x2,9"])
def test_eight_wide_with_biases(llama10: tuple[Path, torch.nn.Module], tmp_path: Path, spec: str) -> None:
    src, model = llama10
    out = tmp_path / "wide"
    api.apply(src, out, spec, quiet=True)
    check_equal(model, out, Plan.from_ranges(spec, 10), IDS, prefix=9)


def test_shared_mlp_input_is_validated_and_reported_not_equal(tiny_model: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tiny_model("llama")
    out = tmp_path / "shared"
    assert main(["parallel", str(src), str(out), "--groups", "1-4", "--loop", "2", "--mlp-input", "shared", "-q"]) == 0
    printed = capsys.readouterr().out
    assert "APPROXIMATION" in printed and "[1-4]x2:shared" in printed
    plan = Plan.from_ranges("0,[1-4]x2:shared,5", tiny.NUM_LAYERS)
    model = tiny.build("llama")
    errors = check_equal(model, out, plan, IDS, prefix=9)  # equals its own definition ...
    exact = parallel_reference_model(model, Plan.from_ranges("0,[1-4]x2,5", tiny.NUM_LAYERS))
    with torch.no_grad():
        deviation = rel(load_wide(out)(IDS).logits, exact(IDS, use_cache=False).logits)
    assert deviation > 100 * RTOL, (deviation, errors)  # ... and is not the exact parallel layers
    config = json.loads((out / "config.json").read_text())
    assert config["surgery_steps"][1]["mlp_input"] == "shared"


# -- the checkpoint ------------------------------------------------------------------------------


def test_checkpoint_layout_config_and_loading(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    src = tiny_model("llama", max_shard_size=20_000)  # sharded source
    out = tmp_path / "wide"
    result = api.parallel(src, out, groups="1-2,3-4", loop=3, quiet=True)
    assert str(result.recipe.plan) == "0,[1-2]x3,[3-4]x3,5"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "surgery_parallel" and config["architectures"] == ["ParallelForCausalLM"]
    assert config["num_hidden_layers"] == 1 + 3 + 3 + 1
    assert config["surgery_plan"] == "0,[1-2]x3,[3-4]x3,5" and config["surgery_base_model_type"] == "llama"
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_surgery_parallel.ParallelForCausalLM"
    assert 'BASE_MODEL_TYPE = "llama"' in (out / "configuration_surgery_parallel.py").read_text()
    assert (out / "modeling_surgery_parallel.py").exists() and (out / "surgery-recipe.yaml").exists()
    # Weights stored once: a looped block is one set of tensors, under its first position.
    names: dict[str, tuple[int, ...]] = {}
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as handle:
            names.update({n: tuple(handle.get_slice(n).get_shape()) for n in handle.keys()})  # noqa: SIM118
    stored = sorted({int(n.split(".")[2]) for n in names if n.startswith("model.layers.")})
    assert stored == [0, 1, 4, 7]
    assert names["model.layers.1.self_attn.qkv_proj.weight"] == (2 * (32 + 2 * 16), 32)
    assert names["model.layers.1.self_attn.o_proj.weight"] == (2, 32, 32)
    assert names["model.layers.1.mlp.gate_up_proj.weight"] == (2, 2 * 48, 32)
    assert names["model.layers.1.mlp.down_proj.weight"] == (32, 2 * 48)
    assert not any("layernorm" in n for n in names if n.startswith(("model.layers.1.", "model.layers.4.")))
    wide = load_wide(out)
    assert wide.model.layers[2]._block[0] is wide.model.layers[1]  # the loop reuses the module
    with torch.no_grad():
        cache = output_cache(wide(IDS, use_cache=True))
    # One cache entry per application; a wide block's entry holds K·H_kv = 2·2 heads.
    assert [layer.keys.shape[1] for layer in cache.layers] == [2, 4, 4, 4, 4, 4, 4, 2]
    # A rebuild from the recipe in OUT gives the same bytes.
    again = tmp_path / "again"
    api.apply(src, again, recipe=out, quiet=True)
    for shard in out.glob("*.safetensors"):
        assert (again / shard.name).read_bytes() == shard.read_bytes()


def test_without_trust_remote_code_the_error_says_what_to_pass(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    out = tmp_path / "wide"
    api.parallel(tiny_model("llama"), out, groups="1-2", quiet=True)
    with pytest.raises(ValueError, match="trust_remote_code=True"):
        AutoModelForCausalLM.from_pretrained(str(out))


def test_bf16_cast_of_fused_weights(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    out = tmp_path / "wide"
    api.parallel(tiny_model("llama"), out, groups="1-4", dtype="bf16", quiet=True)
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        assert handle.get_tensor("model.layers.1.self_attn.qkv_proj.weight").dtype == torch.bfloat16
    wide = load_wide(out)
    reference = parallel_reference_model(tiny.build("llama"), Plan.from_ranges("0,[1-4],5", tiny.NUM_LAYERS))
    with torch.no_grad():
        assert rel(wide(IDS).logits.float(), reference(IDS, use_cache=False).logits) < 5e-2


def test_dry_run_json_writes_nothing(tiny_model: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "wide"
    assert main(["parallel", str(tiny_model("llama")), str(out), "--groups", "2-3", "--loop", "2", "--dry-run", "--json"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert body["plan"] == "0-1,[2-3]x2,4-5" and body["layers"] == [0, 1, "[2-3]x2", 4, 5]
    assert body["operations"] == ["layer-repeated", "parallel-merged"] and not out.exists()


def test_the_engine_refuses_groups_and_the_api_writes_them_wide(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    # The engine sits below widen: a plan with groups reaches execute_parallel through the API only.
    from exporters.card import write_card
    from surgery.engine import execute
    from surgery.source import open_source
    from surgery.widen import ParallelResult

    out = tmp_path / "wide"
    with pytest.raises(PlanError, match="without parallel groups"):
        execute(open_source(tiny_model("llama")), out, Recipe(Plan.parallel("2-3", 2, 6)), card=write_card)
    assert not out.exists()
    result = api.parallel(tiny_model("llama"), out, groups="2-3", loop=2, dry_run=True)
    assert isinstance(result, ParallelResult) and str(result.recipe.plan) == "0-1,[2-3]x2,4-5"


# -- bad input: one line, exit 2, nothing written ----------------------------------------------------


@pytest.mark.parametrize(
    "name, args, expected",
    [
        ("llama", ["--groups", "1-3,3-4"], "overlap at layer 3"),
        ("llama", ["--groups", "2"], "two or more layers"),
        ("llama", ["--groups", "4-7"], "crosses the end of the model"),
        ("llama", ["--groups", "1-2", "--loop", "0"], "at least 1"),
        ("llama", ["--groups", "1-x"], "malformed layer range"),
        ("qwen3", ["--groups", "0-1"], "differ in layer_types"),
        ("gemma3", ["--groups", "3-4"], "differ in layer_types ('sliding_attention' vs 'full_attention')"),
        ("gemma3", ["--groups", "2-3", "--mlp-input", "shared"], "mlp-input shared is not defined"),
        ("bert", ["--groups", "1-2"], "post-norm encoder"),
        ("gpt2", ["--groups", "1-2"], "wide blocks are implemented for gemma2, gemma3_text, llama, mistral, qwen2, qwen3"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(
    tiny_model: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, args: list[str], expected: str
) -> None:
    out = tmp_path / "out" / "wide"
    code = main(["parallel", str(tiny_model(name)), str(out), *args])
    assert_one_line_error(code, capsys.readouterr().err, expected)
    assert not out.exists()
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_errors_carry_fields(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    with pytest.raises(ParallelMergeError) as caught:
        api.parallel(tiny_model("qwen3"), tmp_path / "x", groups="0-1", quiet=True)
    assert caught.value.model_type == "qwen3" and caught.value.group == "[0-1]"
    assert isinstance(caught.value, NotImplementedError)
    with pytest.raises(ParallelGroupError) as group_error:
        Plan.parallel("5-7", 1, 6)
    assert group_error.value.group == "[5-7]" and isinstance(group_error.value, ValueError)


# -- the real SmolLM2-135M ------------------------------------------------------------------------


@pytest.mark.real
@pytest.mark.parametrize(
    "spec",
    [
        "0-9,[10-11],[12-13],[14-15],[16-17],[18-19],[20-21],22-29",  # K = 2: the benchmark model, depth 24
        "0-9,[10-13]x3,[14-17]x3,18-29",  # K = 4 looped: the example
        "0-11,[12-19],20-29",  # K = 8
        "0-11,[12-19]x2,20-29",  # K = 8 looped
    ],
)
def test_smollm2_wide_equals_reference(smollm2_dir: Path, smollm2: torch.nn.Module, tmp_path: Path, spec: str) -> None:
    out = tmp_path / "wide"
    api.apply(smollm2_dir, out, spec, quiet=True)
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    check_equal(smollm2, out, Plan.from_ranges(spec, 30), ids, prefix=12, new=4, uncached_generation=False)


@pytest.mark.real
@pytest.mark.parametrize(
    "spec",
    [
        "0-11,[12-13],[14-15],16-17",  # K = 2, sliding-window pairs
        "0-5,[6-10]x2,11-17",  # K = 5 looped (layers 6-10 are all sliding-window; 11 is global)
    ],
)
def test_gemma3_wide_equals_reference(gemma3_dir: Path, gemma3: torch.nn.Module, tmp_path: Path, spec: str) -> None:
    out = tmp_path / "wide"
    api.apply(gemma3_dir, out, spec, quiet=True)
    ids = torch.randint(0, 262144, (1, 16), generator=torch.Generator().manual_seed(0))
    check_equal(gemma3, out, Plan.from_ranges(spec, 18), ids, prefix=12, new=4, uncached_generation=False)


# -- downstream: the checkpoint is a model like any other ---------------------------------------------


def test_onnx_export_and_hub_dry_run_take_the_wide_checkpoint(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    from exporters.hub import push
    from exporters.onnx import export_onnx

    out = tmp_path / "wide"
    api.apply(tiny_model("llama"), out, "0,[1-2]x2,[3-5]", quiet=True)
    result = export_onnx(out, tmp_path / "onnx", trust_remote_code=True, quiet=True)
    assert result.validation is not None and result.validation.passed  # prefill, cached decode, padding, greedy
    pushed = push(out, "someone/wide", dry_run=True, quiet=True, allow_unvalidated=True)
    assert {"modeling_surgery_parallel.py", "configuration_surgery_parallel.py", "README.md"} <= {
        name for name, _ in pushed.files
    }
