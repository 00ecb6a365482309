"""surgery/view.py at its edges, on micro models (hidden size 16, 4 layers) and on hand-made blocks.

The mutation selection of view.py (docs/development.md, "Mutation testing"): every test here runs in
well under a second, so each mutant of the view is judged in seconds. Outputs are checked against
the independent reference of tests/reference.py (deep copies of the original layers in the plan's
order, parallel groups as the averaged layers), cached runs against uncached ones, and every error
message whole. Tolerances: view vs reference rtol 1e-5, atol 1e-6 (the same float32 operations in
the same order, up to kernel choice); cached vs uncached rtol 1e-4, atol 1e-5 (attention over a
cache sums in another order); hand-made blocks exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
import transformers
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer, EncoderDecoderCache

# Imported with the module, not on first use: a mutation run's fork server collects these tests once
# and forks one process per mutant, which then starts with the model code loaded (7 s less each).
from transformers import (  # isort: skip
    CLIPVisionConfig, Gemma3ForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, LlavaConfig,
    LlavaForConditionalGeneration, Qwen2MoeForCausalLM, Qwen3Config, Qwen3ForCausalLM, VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel, ViTConfig,
)

from surgery.architecture import Architecture
from surgery.compat import with_cache
from surgery.errors import ParallelGroupError, PlanError, UnsupportedArchitectureError
from surgery.plan import ParallelGroup, Plan
from surgery.view import (
    ParallelStep,
    PlanStep,
    _cache_argument,
    _CacheGrowth,
    _ViewStep,
    live_architecture,
    plan_view,
    step_module,
    text_config_of,
)
from tests.helpers import outputs
from tests.reference import cached_logits, parallel_reference_model, reference_model

RTOL, ATOL = 1e-5, 1e-6  # view vs reference
CACHE_RTOL, CACHE_ATOL = 1e-4, 1e-5  # cached vs uncached
VOCAB = 64
LAYERS = 4
WINDOW = 3  # shorter than the test sequences: a sliding layer's window changes its output
# sliding layers 0 and 1, full layers 2 and 3: groups [0-1] and [2-3] are each of one kind.
TYPES = ["sliding_attention", "sliding_attention", "full_attention", "full_attention"]
# Drops 2, repeats 1 and 3, reorders (3 first): every kind of plain plan at once.
MIXED = (3, 1, 1, 0, 3)

_DECODER = {"vocab_size": VOCAB, "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": LAYERS,
            "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 32}
MICRO: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", {**_DECODER, "model_type": "llama", "tie_word_embeddings": False}),
    "qwen3": ("Qwen3ForCausalLM", {**_DECODER, "model_type": "qwen3", "head_dim": 8, "layer_types": TYPES,
                                   "sliding_window": WINDOW, "use_sliding_window": True}),
    "gemma3": ("Gemma3ForCausalLM", {**_DECODER, "model_type": "gemma3_text", "head_dim": 8, "layer_types": TYPES,
                                     "sliding_window": WINDOW}),
    "gpt2": ("GPT2LMHeadModel", {"model_type": "gpt2", "vocab_size": VOCAB, "n_embd": 16, "n_layer": LAYERS,
                                 "n_head": 2, "n_positions": 32}),
    "qwen2_moe": ("Qwen2MoeForCausalLM", {**_DECODER, "model_type": "qwen2_moe", "moe_intermediate_size": 8,
                                          "shared_expert_intermediate_size": 8, "num_experts": 2,
                                          "num_experts_per_tok": 1, "mlp_only_layers": [1, 3]}),
}


CLASSES: dict[str, Any] = {
    cls.__name__: cls
    for cls in (LlamaForCausalLM, Qwen3ForCausalLM, Gemma3ForCausalLM, GPT2LMHeadModel, Qwen2MoeForCausalLM,
                LlavaForConditionalGeneration)
}


def micro(name: str) -> Any:
    """A micro model in fp32 with deterministic random weights, every tensor perturbed (eval mode)."""
    if name == "llava":  # a multimodal model: the layer stack's settings live in config.text_config
        config: Any = LlavaConfig(
            text_config=LlamaConfig(**{k: v for k, v in MICRO["llama"][1].items() if k != "model_type"}),
            vision_config=CLIPVisionConfig(hidden_size=8, intermediate_size=8, num_hidden_layers=1,
                                                        num_attention_heads=2, image_size=8, patch_size=4),
            image_token_id=VOCAB - 1,
        )
        class_name = "LlavaForConditionalGeneration"
    else:
        class_name, values = MICRO[name]
        values = dict(values)
        config = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
    config.architectures = [class_name]
    torch.manual_seed(0)
    model = CLASSES[class_name](config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def models() -> Callable[[str], Any]:
    built: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in built:
            built[name] = micro(name)
        return built[name]

    return get


def ids_for(seed: int = 1, length: int = 8, rows: int = 2) -> torch.Tensor:
    return torch.randint(3, VOCAB - 1, (rows, length), generator=torch.Generator().manual_seed(seed))


def stack_of(model: Any) -> Any:
    """The model's layer stack (the view's positions inside a view)."""
    if isinstance(model, transformers.GPT2LMHeadModel):
        return model.transformer.h
    return model.model.language_model.layers if hasattr(model.model, "language_model") else model.model.layers


def layer_indices(stack: Any) -> list[int]:
    return [m.layer_idx for m in stack.modules() if isinstance(getattr(m, "layer_idx", None), int)]


def greedy(model: Any, prompt: torch.Tensor, new: int, *, use_cache: bool) -> torch.Tensor:
    with torch.no_grad():
        out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=use_cache,
                             pad_token_id=0)
    return out[:, prompt.shape[1]:]


# -- plain plans: drops, repeats, reorders -----------------------------------------------------------


@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma3", "gpt2"])
def test_plain_plan_equals_reference_and_restores(models: Callable[[str], Any], name: str) -> None:
    model = models(name)
    ids = ids_for()
    before = outputs(model, ids)
    stack = stack_of(model)
    config = model.config.get_text_config()
    saved_types = getattr(config, "layer_types", None)
    saved_idx = layer_indices(stack)
    assert sorted(set(saved_idx)) == list(range(LAYERS))
    expected = outputs(reference_model(model, MIXED), ids)
    with plan_view(model, Plan(MIXED, LAYERS)) as view:
        assert view is model
        assert config.num_hidden_layers == len(MIXED)
        if saved_types is not None:
            assert config.layer_types == [TYPES[i] for i in MIXED]
        steps = list(stack_of(model))
        assert all(type(step) is PlanStep for step in steps)
        assert [step.block for step in steps] == [stack[i] for i in MIXED]
        assert [(step.position, step.source_index) for step in steps] == list(enumerate(MIXED))
        got = outputs(view, ids)
        torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
        assert layer_indices(stack) != saved_idx  # the run pointed the attention modules at positions
    assert not torch.allclose(got, before, atol=1e-3)  # the plan changed the model
    assert stack_of(model) is stack
    assert config.num_hidden_layers == LAYERS
    assert getattr(config, "layer_types", None) is saved_types
    assert layer_indices(stack) == saved_idx
    torch.testing.assert_close(outputs(model, ids), before, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["llama", "qwen3", "gpt2"])
def test_repeated_layers_cache_like_uncached(models: Callable[[str], Any], name: str) -> None:
    model = models(name)
    ids = ids_for(3, length=9)
    plan = Plan((0, 1, 2, 1, 2, 3, 3), LAYERS)
    expected = outputs(reference_model(model, plan.layers), ids)
    with plan_view(model, plan) as view:
        full = outputs(view, ids, use_cache=False)
        torch.testing.assert_close(cached_logits(view, ids, 5), full, rtol=CACHE_RTOL, atol=CACHE_ATOL)
        torch.testing.assert_close(full, expected, rtol=RTOL, atol=ATOL)
        prompt = ids[:1, :4]
        assert torch.equal(greedy(view, prompt, 5, use_cache=True), greedy(view, prompt, 5, use_cache=False))


def test_each_position_runs_with_its_own_layer_index(models: Callable[[str], Any]) -> None:
    model = models("llama")
    seen: list[int] = []
    attentions = [layer.self_attn for layer in model.model.layers]
    handles = [a.register_forward_pre_hook(lambda module, args: seen.append(module.layer_idx)) for a in attentions]
    try:
        with plan_view(model, Plan.from_ranges("2,2,0,[1-3]x2,3", LAYERS)) as view, torch.no_grad():
            view(input_ids=ids_for(4, length=4), use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    # Plain positions 0-2 and 5; the group's applications at 3 and 4 run their branches at slots
    # [3, 6, 7] and [4, 8, 9] (after the view's 6 positions).
    assert seen == [0, 1, 2, 3, 6, 7, 4, 8, 9, 5]
    assert [a.layer_idx for a in attentions] == list(range(LAYERS))


def test_index_lists_and_per_layer_lists_follow_the_layers(models: Callable[[str], Any]) -> None:
    model = models("qwen2_moe")
    config = model.config
    saved = config.mlp_only_layers, config.layer_types
    assert saved[0] == [1, 3]
    ids = ids_for(5)
    expected = outputs(reference_model(model, MIXED), ids)
    with plan_view(model, Plan(MIXED, LAYERS)) as view:
        assert config.mlp_only_layers == [0, 1, 2, 4]  # the positions of sources 3, 1, 1, 0, 3 that are in [1, 3]
        assert config.layer_types == ["full_attention"] * len(MIXED)
        torch.testing.assert_close(outputs(view, ids), expected, rtol=RTOL, atol=ATOL)
    assert config.mlp_only_layers is saved[0] and config.layer_types is saved[1]


def test_view_restores_the_model_when_the_body_raises(models: Callable[[str], Any]) -> None:
    model = models("qwen3")
    stack = stack_of(model)
    config = model.config
    saved_types = config.layer_types
    with pytest.raises(RuntimeError, match="^boom$"), plan_view(model, Plan.from_ranges("3,[0-1]x2,1", LAYERS)) as view:
        with torch.no_grad():
            view(input_ids=ids_for(length=4), use_cache=False)
        assert layer_indices(stack) != list(range(LAYERS))
        raise RuntimeError("boom")
    assert stack_of(model) is stack
    assert config.num_hidden_layers == LAYERS
    assert config.layer_types is saved_types and saved_types == TYPES
    assert layer_indices(stack) == list(range(LAYERS))


def test_multimodal_model_views_its_text_config(models: Callable[[str], Any]) -> None:
    model = models("llava")
    outer, text = model.config, model.config.text_config
    assert text_config_of(model) is text
    arch = live_architecture(model)
    assert arch == Architecture(
        model_type="llama", class_name="LlavaForConditionalGeneration", num_layers=LAYERS,
        layer_prefix="model.language_model.layers", module_path="model.language_model.layers",
        count_key="num_hidden_layers", config_scope=("text_config",), per_layer={}, index_lists={},
        config=outer.to_dict(),
    )
    stack = model.model.language_model.layers
    ids = ids_for(6)
    expected = outputs(reference_model(model, MIXED), ids)
    with plan_view(model, Plan(MIXED, LAYERS)) as view:
        assert text.num_hidden_layers == len(MIXED)
        assert [step.block for step in model.model.language_model.layers] == [stack[i] for i in MIXED]
        torch.testing.assert_close(outputs(view, ids), expected, rtol=RTOL, atol=ATOL)
    assert model.model.language_model.layers is stack and text.num_hidden_layers == LAYERS


def test_encoder_decoder_model_checks_its_decoder_config() -> None:
    """A GPT-2 decoder under config.decoder: the positional check reads the decoder's settings
    (it read the outer config, and let a reorder move scale_attn_by_inverse_layer_idx layers)."""
    decoder = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=LAYERS, n_head=2, n_positions=32, add_cross_attention=True,
                         is_decoder=True, scale_attn_by_inverse_layer_idx=True)
    encoder = ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16, image_size=8,
                        patch_size=4)
    model = VisionEncoderDecoderModel(VisionEncoderDecoderConfig.from_encoder_decoder_configs(encoder, decoder)).eval()
    text = model.config.decoder
    arch = live_architecture(model)
    assert (arch.module_path, arch.config_scope, arch.model_type) == ("decoder.transformer.h", ("decoder",), "gpt2")
    stack = model.decoder.transformer.h
    with pytest.raises(UnsupportedArchitectureError) as error, plan_view(model, Plan.reverse("0-3", LAYERS)):
        pass
    assert str(error.value) == (
        "architecture 'gpt2': scale_attn_by_inverse_layer_idx=True makes a layer's behaviour depend on its position, "
        "and the plan moves layer 3 to position 0, which behaves differently"
    )
    assert model.decoder.transformer.h is stack and text.n_layer == LAYERS
    with plan_view(model, Plan.drop("3", LAYERS)):  # keeps every layer where it is: allowed
        assert text.n_layer == 3 and [step.block for step in model.decoder.transformer.h] == list(stack[:3])
    assert model.decoder.transformer.h is stack and text.n_layer == LAYERS


@pytest.mark.parametrize(
    "name, expected",
    [
        ("llama", {"model_type": "llama", "class_name": "LlamaForCausalLM", "module_path": "model.layers",
                   "per_layer": {}, "index_lists": {}}),
        ("qwen3", {"model_type": "qwen3", "class_name": "Qwen3ForCausalLM", "module_path": "model.layers",
                   "per_layer": {"layer_types": tuple(TYPES)}, "index_lists": {}}),
        ("gpt2", {"model_type": "gpt2", "class_name": "GPT2LMHeadModel", "module_path": "transformer.h",
                  "per_layer": {}, "index_lists": {}}),
        ("qwen2_moe", {"model_type": "qwen2_moe", "class_name": "Qwen2MoeForCausalLM", "module_path": "model.layers",
                       "per_layer": {"layer_types": ("full_attention",) * LAYERS}, "index_lists": {"mlp_only_layers": (1, 3)}}),
    ],
)
def test_live_architecture_is_the_models_own(models: Callable[[str], Any], name: str, expected: dict[str, Any]) -> None:
    model = models(name)
    expected = dict(expected)  # the parameter is shared by reruns in one process (mutmut's)
    module_path = expected.pop("module_path")
    assert live_architecture(model) == Architecture(
        num_layers=LAYERS, layer_prefix=module_path, module_path=module_path, count_key="num_hidden_layers",
        config_scope=(), config=model.config.to_dict(), **expected,
    )


def test_refusals_leave_the_model_alone(models: Callable[[str], Any]) -> None:
    model = models("llama")
    stack = model.model.layers
    with pytest.raises(PlanError) as error, plan_view(model, Plan.identity(8)):
        pass
    assert str(error.value) == "the plan was made for a model with 8 layers, but this model has 4"
    with plan_view(model, Plan.identity(LAYERS)):
        with pytest.raises(PlanError) as error, plan_view(model, Plan.identity(LAYERS)):
            pass
        assert model.config.num_hidden_layers == LAYERS
    assert str(error.value) == "this model is already running a plan view; leave it before entering another"
    assert error.value.hint is None
    assert model.model.layers is stack and model.config.num_hidden_layers == LAYERS


# -- the view's positions --------------------------------------------------------------------------


def test_steps_answer_for_their_blocks(models: Callable[[str], Any]) -> None:
    model = models("llama")
    stack = model.model.layers
    with plan_view(model, Plan.from_ranges("3,[1-2]x2,0", LAYERS)):
        plain, first, second, last = model.model.layers
        assert plain.self_attn is stack[3].self_attn and last.mlp is stack[0].mlp
        assert first.input_layernorm is stack[1].input_layernorm  # a group answers for its first branch
        assert plain.extra_repr() == "position=0, source=3"
        assert first.extra_repr() == "position=1, group=[1-2]x2, slots=[1, 4]"
        assert second.extra_repr() == "position=2, group=[1-2]x2, slots=[2, 5]"
        assert list(first.branches) == [stack[1], stack[2]] and first.group == ParallelGroup((1, 2), loop=2)
        assert (first.position, second.position, last.position, last.source_index) == (1, 2, 3, 0)
        assert first.attention_type is None  # Llama layers have no attention type
        with pytest.raises(AttributeError) as error:
            plain.nothing_here  # noqa: B018
        assert str(error.value) == "'LlamaDecoderLayer' object has no attribute 'nothing_here'"
        with pytest.raises(AttributeError) as error:
            first.nothing_here  # noqa: B018
        assert str(error.value) == "'LlamaDecoderLayer' object has no attribute 'nothing_here'"
    with pytest.raises(AttributeError) as error:
        _ViewStep().nothing_here  # noqa: B018
    assert str(error.value) == "'_ViewStep' object has no attribute 'nothing_here'"


def test_step_module_builds_plain_steps_only() -> None:
    blocks = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])
    step = step_module(blocks, 2, 5)
    assert type(step) is PlanStep and step.block is blocks[2] and (step.position, step.source_index) == (5, 2)
    for bad, shown in [(True, "True"), ("1", "1"), (1.0, "1.0"), (ParallelGroup((0, 1)), "[0-1]")]:
        with pytest.raises(PlanError) as error:
            step_module(blocks, bad, 0)
        assert str(error.value) == f"step {shown} of the plan is not a single layer"
        assert error.value.hint == "build parallel groups with plan_view"


# -- parallel groups -------------------------------------------------------------------------------

# Per model, a plan with a looped group and a plain one (groups of one attention kind: TYPES).
GROUP_PLANS = {"llama": "0,[1-2]x2,3", "qwen3": "[0-1]x2,[2-3],1", "gemma3": "[0-1]x2,3,[2-3]", "gpt2": "[0-1],[2-3]x2,1"}


@pytest.mark.parametrize("name", list(GROUP_PLANS))
def test_groups_equal_the_reference_cached_and_uncached(models: Callable[[str], Any], name: str) -> None:
    model = models(name)
    plan = Plan.from_ranges(GROUP_PLANS[name], LAYERS)
    ids = ids_for(7, length=9)
    stack = stack_of(model)
    saved_idx = layer_indices(stack)
    expected = outputs(parallel_reference_model(model, plan), ids, use_cache=False)
    with plan_view(model, plan) as view:
        assert model.config.get_text_config().num_hidden_layers == len(plan)
        groups = [step for step in stack_of(model) if isinstance(step, ParallelStep)]
        assert len(groups) == sum(g.loop for g in plan.groups)
        assert all(branch is stack[i] for g in groups for branch, i in zip(g.branches, g.group.layers, strict=True))
        full = outputs(view, ids, use_cache=False)
        torch.testing.assert_close(full, expected, rtol=RTOL, atol=ATOL)
        torch.testing.assert_close(cached_logits(view, ids, 5), full, rtol=CACHE_RTOL, atol=CACHE_ATOL)
        prompt = ids[:1, :4]
        assert torch.equal(greedy(view, prompt, 5, use_cache=True), greedy(view, prompt, 5, use_cache=False))
    assert stack_of(model) is stack and layer_indices(stack) == saved_idx
    assert not torch.allclose(full, outputs(model, ids), atol=1e-3)


def test_a_group_position_takes_its_first_layers_settings(models: Callable[[str], Any]) -> None:
    """mlp_only_layers [1, 3]: "[0-1],[2-3]x2" runs sources 0, 2, 2 first at its positions, none of them listed."""
    model = models("qwen2_moe")
    plan = Plan.from_ranges("[0-1],[2-3]x2", LAYERS)
    ids = ids_for(9)
    expected = outputs(parallel_reference_model(model, plan), ids, use_cache=False)
    with plan_view(model, plan) as view:
        assert model.config.mlp_only_layers == []
        assert model.config.layer_types == ["full_attention"] * 3
        torch.testing.assert_close(outputs(view, ids, use_cache=False), expected, rtol=RTOL, atol=ATOL)
    assert model.config.mlp_only_layers == [1, 3]


def test_shared_mlp_input_is_the_approximation(models: Callable[[str], Any]) -> None:
    model = models("llama")
    ids = ids_for(8, length=9)
    shared, exact = (Plan.from_ranges(f"0,[1-2]x2{suffix},3", LAYERS) for suffix in (":shared", ""))
    with plan_view(model, shared) as view:
        got = outputs(view, ids, use_cache=False)
        torch.testing.assert_close(cached_logits(view, ids, 5), got, rtol=CACHE_RTOL, atol=CACHE_ATOL)
    torch.testing.assert_close(got, outputs(parallel_reference_model(model, shared), ids, use_cache=False),
                               rtol=RTOL, atol=ATOL)
    with plan_view(model, exact) as view:
        assert not torch.allclose(outputs(view, ids, use_cache=False), got, atol=1e-4)


def test_branch_slots_get_cache_layers_of_their_kind(models: Callable[[str], Any]) -> None:
    """qwen3 "[0-1]x2,[2-3]": positions 0, 1 (sliding group), 2 (full group); slots 3, 4 copy the
    kind of positions 0 and 1, slot 5 that of position 2."""
    model = models("qwen3")
    with plan_view(model, Plan.from_ranges("[0-1]x2,[2-3]", LAYERS)) as view, torch.no_grad():
        steps = list(model.model.layers)
        assert [step.slots for step in steps] == [[0, 3], [1, 4], [2, 5]]
        assert steps[0]._cache_growth is steps[2]._cache_growth and steps[0]._cache_growth.twin == [0, 1, 2, 0, 1, 2]
        cache = view(input_ids=ids_for(length=5), use_cache=True).past_key_values
    layers = cache.layers
    assert [type(layer) for layer in layers] == [DynamicSlidingWindowLayer] * 2 + [DynamicLayer] + [
        DynamicSlidingWindowLayer] * 2 + [DynamicLayer]
    assert [getattr(layer, "sliding_window", None) for layer in layers] == [WINDOW, WINDOW, None, WINDOW, WINDOW, None]
    # Every slot was written: the full ones hold the 5 tokens, the sliding ones the last WINDOW - 1.
    assert [layer.keys.shape[-2] for layer in layers] == [2, 2, 5, 2, 2, 5]


def test_parallel_step_averages_whole_blocks_and_keeps_the_first_extras() -> None:
    """``h' = (1/K) sum_k L_k(h)`` on hand-made blocks; each branch runs at its slot; a block returning
    a tuple gives the first branch's extras."""

    class Indexed(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layer_idx = -1

    class Block(torch.nn.Module):
        def __init__(self, weight: float, tuple_out: bool) -> None:
            super().__init__()
            self.weight, self.tuple_out, self.attn = weight, tuple_out, Indexed()
            self.attention_type = f"kind{weight}"  # the mask kind older transformers read from the layer
            self.calls: list[tuple[int, tuple[Any, ...], dict[str, Any]]] = []

        def forward(self, h: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self.calls.append((self.attn.layer_idx, args, kwargs))
            return (h * self.weight, f"extra{self.weight}", self.weight) if self.tuple_out else h * self.weight

    h = torch.tensor([[1.0, -2.0]])
    for tuple_out in (False, True):
        blocks = torch.nn.ModuleList(Block(w, tuple_out) for w in (5.0, 1.0, 2.0, 6.0))
        step = ParallelStep(blocks, ParallelGroup((1, 2, 3)), 2, [2, 7, 8], _CacheGrowth([0, 1, 2, 3, 4, 5, 2, 2, 2]))
        assert list(step.branches) == list(blocks[1:]) and step.attention_type == "kind1.0"
        out = step(h, "arg", flag=True)
        if tuple_out:
            assert isinstance(out, tuple) and len(out) == 3
            assert torch.equal(out[0], h * 3.0) and out[1:] == ("extra1.0", 1.0)
        else:
            assert torch.equal(out, h * 3.0)
        assert [call[0] for b in blocks for call in b.calls] == [2, 7, 8]
        assert all(call[1:] == (("arg",), {"flag": True}) for b in blocks for call in b.calls)


class _Scale(torch.nn.Module):
    def __init__(self, factor: float, tuple_out: bool = False) -> None:
        super().__init__()
        self.factor, self.tuple_out = factor, tuple_out
        self.seen: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        self.seen.append((args, kwargs))
        return (x * self.factor, "weights") if self.tuple_out else x * self.factor


class _PreNorm(torch.nn.Module):
    """A pre-norm decoder layer made of scalings: norm n, attention a, post-attention norm p, MLP m."""

    def __init__(self, n: float, a: float, p: float, m: float) -> None:
        super().__init__()
        self.input_layernorm, self.self_attn = _Scale(n), _Scale(a, tuple_out=True)
        self.post_attention_layernorm, self.mlp = _Scale(p), _Scale(m)
        self.self_attn.layer_idx = -1


def test_shared_step_math_on_hand_made_layers() -> None:
    """``u = h + (1/K) sum_k a_k n_k h``, ``h' = u + (1/K) sum_k m_k p_k u``, exactly."""
    blocks = torch.nn.ModuleList([_PreNorm(2, 3, 5, 7), _PreNorm(1, 4, 2, 2), _PreNorm(3, 1, 1, 4)])
    step = ParallelStep(blocks, ParallelGroup((0, 1, 2), mlp_input="shared"), 1, [1, 4, 5],
                        _CacheGrowth([0, 1, 2, 3, 1, 1]))
    seen: list[int] = []
    for block in blocks:
        block.self_attn.register_forward_pre_hook(lambda module, args: seen.append(module.layer_idx))
    h = torch.tensor([[1.0, 2.0]])
    u = h + (2 * 3 + 1 * 4 + 3 * 1) / 3 * h
    expected = u + (5 * 7 + 2 * 2 + 1 * 4) / 3 * u
    assert torch.equal(step(h, "arg", mask="m"), expected)
    assert seen == [1, 4, 5]
    assert all(block.self_attn.seen == [(("arg",), {"mask": "m"})] for block in blocks)


@pytest.mark.parametrize("missing", ["input_layernorm", "self_attn", "post_attention_layernorm", "mlp", None])
def test_shared_input_is_refused_for_other_layers(missing: str | None) -> None:
    blocks = torch.nn.ModuleList([_PreNorm(1, 1, 1, 1), _PreNorm(1, 1, 1, 1)])
    if missing is None:
        blocks[0].pre_feedforward_layernorm = _Scale(1)  # a per-branch output norm (Gemma 2 and 3)
    else:
        delattr(blocks[0], missing)
    with pytest.raises(ParallelGroupError) as error:
        ParallelStep(blocks, ParallelGroup((0, 1), loop=2, mlp_input="shared"), 0, [0, 2], _CacheGrowth([0, 1, 0]))
    assert str(error.value) == (
        "parallel group [0-1]x2:shared: the shared MLP input is defined for pre-norm decoder layers (input norm, "
        "attention, post-attention norm, MLP) without per-branch output norms, and these layers are not"
    )
    assert error.value.hint == "use the exact form (drop ':shared' / --mlp-input shared)"
    ParallelStep(torch.nn.ModuleList([_PreNorm(1, 1, 1, 1), _PreNorm(1, 1, 1, 1)]),
                 ParallelGroup((0, 1), mlp_input="shared"), 0, [0, 2], _CacheGrowth([0, 1, 0]))  # complete layers pass


@pytest.mark.parametrize("name", ["gemma3", "gpt2"])
def test_real_layers_refuse_the_shared_input_and_the_model_stays(models: Callable[[str], Any], name: str) -> None:
    model = models(name)
    stack = stack_of(model)
    with pytest.raises(ParallelGroupError, match="shared MLP input is defined"), plan_view(
        model, Plan.from_ranges("[2-3]:shared,0", LAYERS)
    ):
        pass
    assert stack_of(model) is stack and model.config.get_text_config().num_hidden_layers == LAYERS


@pytest.mark.parametrize("name", ["qwen3", "gemma3"])
def test_groups_of_differing_layers_are_refused(models: Callable[[str], Any], name: str) -> None:
    model = models(name)
    stack = stack_of(model)
    with pytest.raises(ParallelGroupError) as error, plan_view(model, Plan.from_ranges("0,[1-2]x2,3", LAYERS)):
        pass
    assert str(error.value) == (
        "parallel group [1-2]x2: its layers differ in the per-layer setting layer_types ('full_attention', "
        "'sliding_attention'); one model call passes one mask and one setting per position"
    )
    assert error.value.hint == "group layers of the same kind"
    assert stack_of(model) is stack and model.config.layer_types == TYPES
    with plan_view(model, Plan.from_ranges("[0-1]x2,[2-3]", LAYERS)):  # groups of one kind pass
        pass


# -- the KV cache of parallel groups ---------------------------------------------------------------


def test_cache_argument_is_found_by_type() -> None:
    cache, other = DynamicCache(), DynamicCache()
    assert _cache_argument((), {}) is None
    assert _cache_argument((1, "x"), {"use_cache": True}) is None
    assert _cache_argument((1, cache), {"mask": None}) is cache  # GPT-2 passes it positionally
    assert _cache_argument((), {"mask": None, "past_key_values": cache}) is cache
    assert _cache_argument((other,), {"cache": cache}) is cache


def _dynamic(types: list[str]) -> DynamicCache:
    config = Qwen3Config(**{**MICRO["qwen3"][1], "num_hidden_layers": len(types), "layer_types": types})
    return DynamicCache(config=config)


def test_growth_adds_the_missing_slots_of_their_twins_kind() -> None:
    growth = _CacheGrowth([0, 1, 2, 1, 2, 2])
    growth.grow(None, 5)  # no cache: nothing to do
    cache = _dynamic(["full_attention", "sliding_attention", "full_attention"])
    assert cache.layer_class_to_replicate is None
    first = list(cache.layers)
    growth.grow(cache, 4)
    assert cache.layers[:3] == first
    assert [type(layer) for layer in cache.layers] == [DynamicLayer, DynamicSlidingWindowLayer, DynamicLayer,
                                                       DynamicSlidingWindowLayer, DynamicLayer]
    assert cache.layers[3].sliding_window == WINDOW
    grown = list(cache.layers)
    growth.grow(cache, 4)  # already there
    growth.grow(cache, 2)
    assert cache.layers == grown
    growth.grow(cache, 5)
    assert cache.layers[:5] == grown and len(cache.layers) == 6 and type(cache.layers[5]) is DynamicLayer


def test_growth_leaves_caches_that_grow_on_their_own() -> None:
    cache = DynamicCache()  # no config: makes its layers as they are first written
    assert cache.layer_class_to_replicate is DynamicLayer
    before = list(cache.layers)
    _CacheGrowth([0, 1, 0]).grow(cache, 2)
    assert cache.layers == before


def test_growth_grows_the_self_attention_cache_of_an_encoder_decoder_cache() -> None:
    inner = _dynamic(["sliding_attention", "full_attention"])
    cache = EncoderDecoderCache(inner, DynamicCache())
    _CacheGrowth([0, 1, 0]).grow(cache, 2)
    assert [type(layer) for layer in inner.layers] == [DynamicSlidingWindowLayer, DynamicLayer,
                                                       DynamicSlidingWindowLayer]


def test_growth_refuses_a_cache_of_fixed_layers(models: Callable[[str], Any]) -> None:
    model = models("llama")
    with plan_view(model, Plan.from_ranges("0,[1-2],3", LAYERS)) as view:
        cache = transformers.StaticCache(config=view.config, max_cache_len=8)
        with pytest.raises(PlanError) as error:
            _CacheGrowth([0, 1, 2, 1]).grow(cache, 3)
        assert len(cache.layers) == 3
        with pytest.raises(PlanError), torch.no_grad():  # the same through the model
            view(**with_cache(view, cache, input_ids=ids_for(length=3), use_cache=True))
    assert str(error.value) == "a plan view with parallel groups needs a DynamicCache, got StaticCache"
    assert error.value.hint == (
        "generate with the default cache (no cache_implementation), or write the plan and load the checkpoint"
    )
    _CacheGrowth([0, 1, 2, 1]).grow(cache, 2)  # a cache that already has the slots is not checked
