"""The plan view: any plan run on one loaded model, without copying weights or writing files.

Its outputs must equal (1) the deep-copy reference of tests/reference.py on every tiny
architecture, and (2) the checkpoint the streaming engine writes for the same plan, for every
operation, on tiny models and on SmolLM2-135M. Repeated layers share a module object, so the
cache tests check that each position still writes its own KV-cache slot.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import surgery
import surgery.plan
from surgery.compat import with_cache
from surgery.errors import ParallelGroupError, PlanError, UnsupportedArchitectureError
from surgery.plan import Plan
from surgery.validate import greedy_continuation
from surgery.view import ParallelStep, PlanStep, live_architecture, plan_view
from tests import tiny
from tests.helpers import outputs
from tests.reference import cached_logits, parallel_reference_model, reference_model

RTOL, ATOL = 1e-5, 1e-6
# A plan that drops (4), repeats (3, 5) and reorders (3 before 2) at once.
MIXED = (0, 1, 3, 3, 2, 5, 5)

# operation -> API call writing it on a 6-layer model
OPERATIONS: dict[str, Callable[[Path, Path], surgery.SurgeryResult]] = {
    "prune-drop": lambda src, out: surgery.prune(src, out, drop="2-3", quiet=True),
    "prune-keep": lambda src, out: surgery.prune(src, out, keep="0,2,5", quiet=True),
    "repeat": lambda src, out: surgery.repeat(src, out, layers="2-3", times=3, quiet=True),
    "reverse": lambda src, out: surgery.reorder(src, out, reverse="1-4", quiet=True),
    "shuffle": lambda src, out: surgery.reorder(src, out, shuffle="0-5", seed=3, quiet=True),
    "order": lambda src, out: surgery.reorder(src, out, order="0,2,1,3,5,4", quiet=True),
    "apply": lambda src, out: surgery.apply(src, out, "5,0,0,3,3", quiet=True),
}


def cached_and_full(model: Any, ids: torch.Tensor, prefill: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of prefill + one-token cached steps, and of one uncached forward over everything."""
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
    return cached_logits(model, ids, prefill), full


def ids_for(seed: int = 1, length: int = 12) -> torch.Tensor:
    return torch.randint(3, tiny.VOCAB, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(tiny.CONFIGS))
def test_view_equals_reference_and_restores_the_model(tiny_models: Callable[[str], Any], name: str) -> None:
    model = tiny_models(name)
    ids = ids_for()
    before = outputs(model, ids)
    arch = live_architecture(model)
    stack = model.get_submodule(arch.module_path)
    config = model.config.get_text_config()
    saved_types = getattr(config, "layer_types", None)
    saved_idx = [m.layer_idx for m in stack.modules() if isinstance(getattr(m, "layer_idx", None), int)]

    expected = outputs(reference_model(model, MIXED), ids)
    with plan_view(model, Plan(MIXED, tiny.NUM_LAYERS)) as view:
        assert view is model
        assert config.num_hidden_layers == len(MIXED)
        if saved_types is not None:
            assert config.layer_types == [saved_types[i] for i in MIXED]
        # No weight is copied: every position holds the original block object.
        assert [step.block for step in model.get_submodule(arch.module_path)] == [stack[i] for i in MIXED]
        torch.testing.assert_close(outputs(view, ids), expected, rtol=RTOL, atol=ATOL)

    assert model.get_submodule(arch.module_path) is stack
    assert config.num_hidden_layers == tiny.NUM_LAYERS
    assert getattr(config, "layer_types", None) is saved_types
    assert [m.layer_idx for m in stack.modules() if isinstance(getattr(m, "layer_idx", None), int)] == saved_idx
    torch.testing.assert_close(outputs(model, ids), before, rtol=0, atol=0)


@pytest.mark.parametrize("operation", list(OPERATIONS))
@pytest.mark.parametrize("name", ["llama", "gemma3", "gpt2", "bert"])
def test_view_equals_written_checkpoint(
    tiny_model: Callable[..., Path], tiny_models: Callable[[str], Any], tmp_path: Path, name: str, operation: str
) -> None:
    result = OPERATIONS[operation](tiny_model(name), tmp_path / "out")
    written = getattr(transformers, tiny.CONFIGS[name][0]).from_pretrained(tmp_path / "out").eval()
    ids = ids_for(2)
    with plan_view(tiny_models(name), result.recipe.plan) as view:
        torch.testing.assert_close(outputs(view, ids), outputs(written, ids), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("name", ["llama", "gemma3", "gpt2", "opt", "phi3"])
def test_repeated_layers_keep_their_own_cache_slot(tiny_models: Callable[[str], Any], name: str) -> None:
    model = tiny_models(name)
    ids = ids_for(3, length=14)
    with plan_view(model, Plan((0, 1, 2, 3, 2, 3, 2, 3, 5), tiny.NUM_LAYERS)) as view:
        cached, full = cached_and_full(view, ids)
        torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-5)
        prompt = ids[:, :6]
        uncached = []
        with torch.no_grad():
            for _ in range(6):
                token = view(input_ids=torch.cat([prompt, *uncached], dim=1), use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
                uncached.append(token)
        assert torch.equal(greedy_continuation(view, prompt, 6), torch.cat(uncached, dim=1))


def test_cache_test_catches_a_shared_slot(tiny_models: Callable[[str], Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the per-position layer_idx, a repeated layer overwrites its first slot: the check above fails."""
    monkeypatch.setattr(PlanStep, "forward", lambda self, *args, **kwargs: self.block(*args, **kwargs))
    model = tiny_models("llama")
    with plan_view(model, Plan((0, 1, 2, 3, 2, 3, 5), tiny.NUM_LAYERS)) as view:
        cached, full = cached_and_full(view, ids_for(3, length=14))
    assert not torch.allclose(cached, full, rtol=1e-4, atol=1e-5)


def test_each_position_runs_with_its_own_layer_index(tiny_models: Callable[[str], Any]) -> None:
    model = tiny_models("qwen3")
    seen: list[int] = []
    attentions = [layer.self_attn for layer in model.model.layers]
    handles = [a.register_forward_pre_hook(lambda module, args: seen.append(module.layer_idx)) for a in attentions]
    plan = Plan((4, 4, 0, 1, 1, 1, 2), tiny.NUM_LAYERS)
    try:
        with plan_view(model, plan) as view, torch.no_grad():
            view(input_ids=ids_for(4))
    finally:
        for handle in handles:
            handle.remove()
    assert seen == list(range(len(plan)))
    assert [a.layer_idx for a in attentions] == list(range(tiny.NUM_LAYERS))


def test_view_refuses_a_plan_for_another_model(tiny_models: Callable[[str], Any]) -> None:
    model = tiny_models("llama")
    with pytest.raises(PlanError, match="made for a model with 8 layers"), plan_view(model, Plan.identity(8)):
        pass
    with plan_view(model, Plan.identity(tiny.NUM_LAYERS)):
        with pytest.raises(PlanError, match="already running a plan view"), plan_view(model, Plan.identity(tiny.NUM_LAYERS)):
            pass
    assert model.config.num_hidden_layers == tiny.NUM_LAYERS


def test_view_refuses_a_positional_setting_it_would_change() -> None:
    model = tiny.build("gpt2")
    model.config.scale_attn_by_inverse_layer_idx = True
    with pytest.raises(UnsupportedArchitectureError, match="scale_attn_by_inverse_layer_idx"):
        with plan_view(model, Plan.reverse("0-5", tiny.NUM_LAYERS)):
            pass
    assert isinstance(model.transformer.h[0], type(model.transformer.h[1])) and not isinstance(model.transformer.h[0], PlanStep)


# -- parallel groups: the K original layers on one input, averaged ----------------------------------

# Per architecture, a plan with a plain group and a looped one; groups hold layers of one attention
# type (tiny.MIXED_TYPES: sliding, full, sliding, sliding, full, sliding).
GROUP_PLANS = {
    "qwen3": "0-1,[2-3]x3,4-5", "gemma2": "[2-3]x2,0,4,5", "gemma3": "0,1,[2-3]x3,4,5,5",
    "qwen2": "[0-2]x2,[3-5]",  # max_window_layers=3: 0-2 full, 3-5 sliding
}


@pytest.mark.parametrize("name", list(tiny.CONFIGS))
def test_view_runs_parallel_groups_as_the_averaged_layers(tiny_models: Callable[[str], Any], name: str) -> None:
    """Against tests/reference.py (deep copies, written independently): uncached, cached, generation."""
    model = tiny_models(name)
    plan = Plan.from_ranges(GROUP_PLANS.get(name, "[0-1],[2-4]x2,5,2"), tiny.NUM_LAYERS)
    ids = ids_for(6, length=12)
    expected = outputs(parallel_reference_model(model, plan), ids, use_cache=False)
    path = live_architecture(model).module_path
    stack = model.get_submodule(path)
    with plan_view(model, plan) as view:
        assert model.config.get_text_config().num_hidden_layers == len(plan)
        positions = model.get_submodule(path)
        groups = [step for step in positions if isinstance(step, ParallelStep)]
        assert len(groups) == sum(g.loop for g in plan.groups)
        assert all(branch is stack[i] for g in groups for branch, i in zip(g.branches, g.group.layers, strict=True))
        got = outputs(view, ids)
        torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)
        if name in tiny.CAUSAL:
            # Every branch of every application has its own slot; sliding layers keep sliding caches.
            cached, full = cached_and_full(view, ids)
            torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(full, expected, rtol=RTOL, atol=ATOL)
            prompt = ids[:1, :5]
            with torch.no_grad():
                uncached = view.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False, use_cache=False, pad_token_id=0)
            assert torch.equal(greedy_continuation(view, prompt, 6), uncached[:, 5:])
    assert model.get_submodule(path) is stack
    assert not torch.allclose(got, outputs(model, ids), atol=1e-3)  # the groups changed the model


def test_view_shared_mlp_input_is_the_approximation(tiny_models: Callable[[str], Any]) -> None:
    model = tiny_models("llama")
    ids = ids_for(7)
    shared, exact = (Plan.from_ranges(f"0,[1-3]x2{suffix},4,5", tiny.NUM_LAYERS) for suffix in (":shared", ""))
    with plan_view(model, shared) as view:
        got = outputs(view, ids)
        cached, full = cached_and_full(view, ids)
    torch.testing.assert_close(got, outputs(parallel_reference_model(model, shared), ids, use_cache=False), rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-5)
    with plan_view(model, exact) as view:
        assert not torch.allclose(outputs(view, ids), got, atol=1e-4)  # shared is not the exact average


def test_cache_test_catches_branches_sharing_a_slot(tiny_models: Callable[[str], Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """With every branch writing the position's slot, cached decoding diverges: the cache check can fail."""
    original_init = ParallelStep.__init__

    def one_slot(self: ParallelStep, *args: Any, **kwargs: Any) -> None:
        original_init(self, *args, **kwargs)
        self.slots = [self.position] * len(self.slots)

    monkeypatch.setattr(ParallelStep, "__init__", one_slot)
    with plan_view(tiny_models("llama"), Plan.from_ranges("0,[1-3]x2,4,5", tiny.NUM_LAYERS)) as view:
        cached, full = cached_and_full(view, ids_for(3, length=14))
    assert not torch.allclose(cached, full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "name, text, match",
    [
        ("gemma3", "[0-1],2-5", "differ in the per-layer setting layer_types"),
        ("gemma2", "0,1,[2-3]:shared,4,5", "shared MLP input"),
        ("gpt2", "0,[1-2]:shared,3-5", "shared MLP input"),
    ],
)
def test_view_refuses_groups_it_cannot_run(tiny_models: Callable[[str], Any], name: str, text: str, match: str) -> None:
    model = tiny_models(name)
    with pytest.raises(ParallelGroupError, match=match), plan_view(model, Plan.from_ranges(text, tiny.NUM_LAYERS)):
        pass
    assert model.config.get_text_config().num_hidden_layers == tiny.NUM_LAYERS
    assert not isinstance(model.get_submodule(live_architecture(model).module_path)[0], (PlanStep, ParallelStep))


def test_view_refuses_a_cache_it_cannot_grow(tiny_models: Callable[[str], Any]) -> None:
    model = tiny_models("llama")
    with plan_view(model, Plan.from_ranges("0,[1-2],3-5", tiny.NUM_LAYERS)) as view, torch.no_grad():
        cache = transformers.StaticCache(config=view.config, max_cache_len=16)  # one slot per position
        with pytest.raises(PlanError, match="needs a DynamicCache"):
            view(**with_cache(view, cache, input_ids=ids_for(1)[:1, :4], use_cache=True))


def test_view_restores_the_model_when_the_body_raises(tiny_models: Callable[[str], Any]) -> None:
    model = tiny_models("gemma2")
    stack = model.model.layers
    with pytest.raises(RuntimeError, match="boom"), plan_view(model, Plan((0, 0, 1), tiny.NUM_LAYERS)):
        raise RuntimeError("boom")
    assert model.model.layers is stack
    assert model.config.num_hidden_layers == tiny.NUM_LAYERS and len(model.config.layer_types) == tiny.NUM_LAYERS


def test_view_runs_under_an_accelerate_device_map(
    tiny_model: Callable[..., Path], tiny_models: Callable[[str], Any], tmp_path: Path
) -> None:
    """Layers offloaded by accelerate (weights loaded by its hooks at each call) run in any order."""
    device_map = {name: "cpu" for name in ("model.embed_tokens", "model.norm", "model.rotary_emb", "lm_head")}
    device_map.update({f"model.layers.{i}": "cpu" if i < 2 else "disk" for i in range(tiny.NUM_LAYERS)})
    mapped = transformers.LlamaForCausalLM.from_pretrained(
        tiny_model("llama"), device_map=device_map, offload_folder=str(tmp_path / "offload")
    ).eval()
    assert mapped.model.layers[3].self_attn.q_proj.weight.device.type == "meta"
    ids = ids_for(5)
    expected = outputs(reference_model(tiny_models("llama"), MIXED), ids)
    with plan_view(mapped, Plan(MIXED, tiny.NUM_LAYERS)) as view:
        torch.testing.assert_close(outputs(view, ids), expected, rtol=RTOL, atol=ATOL)


# -- SmolLM2-135M: the real model ------------------------------------------------------------------

SMOLLM2_OPERATIONS: dict[str, Callable[[Path, Path], surgery.SurgeryResult]] = {
    "prune": lambda src, out: surgery.prune(src, out, drop="10-20", quiet=True),
    "repeat": lambda src, out: surgery.repeat(src, out, layers="12-15", times=2, quiet=True),
    "shuffle": lambda src, out: surgery.reorder(src, out, shuffle="4-25", seed=1, quiet=True),
    "apply": lambda src, out: surgery.apply(src, out, "0-9,21-29,21-23", quiet=True),
}


@pytest.fixture(scope="module")
def smollm2_ids(smollm2_dir: Path) -> torch.Tensor:
    from surgery.corpus import default_text

    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    return tokenizer(default_text()[2000:2400], return_tensors="pt")["input_ids"][:, :48]


@pytest.mark.real
@pytest.mark.parametrize("operation", list(SMOLLM2_OPERATIONS))
def test_smollm2_view_equals_written_checkpoint(
    smollm2_dir: Path, smollm2: Any, smollm2_ids: torch.Tensor, tmp_path: Path, operation: str
) -> None:
    out = tmp_path / operation
    result = SMOLLM2_OPERATIONS[operation](smollm2_dir, out)
    try:
        written = transformers.LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
        expected = outputs(written, smollm2_ids)
        del written
    finally:
        shutil.rmtree(out, ignore_errors=True)  # 0.4-0.7 GB each
    with plan_view(smollm2, result.recipe.plan) as view:
        got = outputs(view, smollm2_ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)
    # The plan changed the model: the comparison is not trivially between two originals.
    assert not torch.allclose(got, outputs(smollm2, smollm2_ids), atol=1e-2)


@pytest.mark.real
def test_smollm2_repeated_block_generates_the_same_with_and_without_cache(smollm2: Any, smollm2_ids: torch.Tensor) -> None:
    prompt = smollm2_ids[:, :16]
    with plan_view(smollm2, Plan.repeat("12-15", 2, 30)) as view:
        cached, full = cached_and_full(view, smollm2_ids[:, :20], prefill=16)
        torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4)
        generated = greedy_continuation(view, prompt, 4)
        with torch.no_grad():
            expected = view.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False, use_cache=False,
                                     pad_token_id=smollm2.config.eos_token_id)[:, 16:]
    assert torch.equal(generated, expected)
