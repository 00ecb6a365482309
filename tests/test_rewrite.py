"""Correct means equal: every rewrite, loaded with stock transformers, gives the logits of the
original layers run in the plan's order in memory (tests/reference.py), and its KV cache gives
what a full uncached forward gives.

Tolerance: fp32, rtol 1e-5 / atol 1e-6. The weights are the same bytes and the computation the
same, so any real bug (a wrong layer, a config list that did not follow, a shared cache slot)
shows up as a difference orders of magnitude larger.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import surgery
from tests import tiny
from tests.helpers import outputs
from tests.reference import cached_logits, reference_model

RTOL, ATOL = 1e-5, 1e-6

# operation name -> (API call, plan it must produce on a 6-layer model)
OPERATIONS: dict[str, tuple[Callable[[Path, Path], Any], list[int]]] = {
    "prune": (lambda src, out: surgery.prune(src, out, drop="1-2", quiet=True), [0, 3, 4, 5]),
    "repeat": (lambda src, out: surgery.repeat(src, out, layers="2-3", times=2, quiet=True), [0, 1, 2, 3, 2, 3, 4, 5]),
    "reverse": (lambda src, out: surgery.reorder(src, out, reverse="1-4", quiet=True), [0, 4, 3, 2, 1, 5]),
    "shuffle": (lambda src, out: surgery.reorder(src, out, shuffle="0-5", seed=3, quiet=True), surgery.Plan.shuffle("0-5", 3, 6).layers),
    "apply": (lambda src, out: surgery.apply(src, out, "5,0,0,3", quiet=True), [5, 0, 0, 3]),
}


def load(path: Path, name: str) -> Any:
    return getattr(transformers, tiny.CONFIGS[name][0]).from_pretrained(path).eval()


def assert_cache_consistent(model: Any, ids: torch.Tensor, prefill: int = 8) -> None:
    """Prefill then one-token steps with the KV cache == one uncached forward over everything."""
    with torch.no_grad():
        full = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(cached_logits(model, ids, prefill), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("operation", list(OPERATIONS))
@pytest.mark.parametrize("name", list(tiny.CONFIGS))
def test_rewrite_equals_reference(tiny_model: Callable[..., Path], tmp_path: Path, name: str, operation: str) -> None:
    src = tiny_model(name)
    run, expected_layers = OPERATIONS[operation]
    result = run(src, tmp_path / "out")
    assert list(result.recipe.plan.layers) == list(expected_layers)

    ids = torch.randint(3, tiny.VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
    reference = reference_model(load(src, name), expected_layers)
    rewritten = load(tmp_path / "out", name)
    assert rewritten.config.get_text_config().num_hidden_layers == len(expected_layers)
    torch.testing.assert_close(outputs(rewritten, ids), outputs(reference, ids), rtol=RTOL, atol=ATOL)
    if name in tiny.CAUSAL:
        assert_cache_consistent(rewritten, ids)


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma3", "gpt2", "opt"])
def test_cached_greedy_generation_equals_uncached(tiny_model: Callable[..., Path], tmp_path: Path, name: str) -> None:
    surgery.apply(tiny_model(name), tmp_path / "out", "0-3,2-3,5,1", quiet=True)
    model = load(tmp_path / "out", name)
    ids = torch.randint(3, tiny.VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    kwargs = {"max_new_tokens": 10, "do_sample": False, "pad_token_id": 0}
    with torch.no_grad():
        cached = model.generate(ids, use_cache=True, **kwargs)
        uncached = model.generate(ids, use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_per_layer_config_follows_the_layers(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    """Gemma 3's layer_types must travel with the layers (a peer tool crashes or silently mixes them)."""
    surgery.apply(tiny_model("gemma3"), tmp_path / "out", "4,4,0,1", quiet=True)
    config = transformers.AutoConfig.from_pretrained(tmp_path / "out")
    assert config.layer_types == [tiny.MIXED_TYPES[i] for i in (4, 4, 0, 1)]
    assert config.num_hidden_layers == 4


def test_qwen2_derived_layer_types_are_written_explicitly(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    """Qwen2 derives layer_types from max_window_layers; after a reorder only an explicit list is right."""
    original = transformers.AutoConfig.from_pretrained(tiny_model("qwen2")).layer_types
    assert len(set(original)) == 2  # the fixture really mixes sliding and full attention
    surgery.reorder(tiny_model("qwen2"), tmp_path / "out", reverse="0-5", quiet=True)
    assert transformers.AutoConfig.from_pretrained(tmp_path / "out").layer_types == original[::-1]


def test_index_lists_are_remapped(tmp_path: Path) -> None:
    """mlp_only_layers lists layer indices: they are renumbered, not permuted."""
    from surgery.architecture import Architecture

    arch = Architecture("m", "M", 6, "model.layers", "model.layers", "num_hidden_layers", (), {}, {"mlp_only_layers": (1, 4)}, {})
    new = arch.rewrite_config({"num_hidden_layers": 6, "mlp_only_layers": [1, 4]}, surgery.Plan.from_ranges("4,0,1,1", 6))
    assert new == {"num_hidden_layers": 4, "mlp_only_layers": [0, 2, 3]}


def test_positional_behaviour_is_refused(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    """GPT-2 with scale_attn_by_inverse_layer_idx scales each layer by its position: moving one changes it."""
    import json
    import shutil

    src = tmp_path / "gpt2-scaled"
    shutil.copytree(tiny_model("gpt2"), src)
    config = json.loads((src / "config.json").read_text())
    config["scale_attn_by_inverse_layer_idx"] = True
    (src / "config.json").write_text(json.dumps(config))
    surgery.prune(src, tmp_path / "ok", drop="5", quiet=True)  # positions 0-4 unchanged: allowed
    with pytest.raises(surgery.errors.UnsupportedArchitectureError, match="position"):
        surgery.prune(src, tmp_path / "bad", drop="0", quiet=True)
    assert not (tmp_path / "bad").exists()
