"""The real pretrained models: SmolLM2-135M (Llama, tied embeddings), Gemma 3 270M (layer_types,
sliding windows) and all-MiniLM-L6-v2 (BERT). Same bar as the tiny models: the rewritten
checkpoint, loaded with stock transformers, equals the original layers run in the plan's order
(fp32, rtol 1e-5), and cached greedy generation equals uncached."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import surgery
from tests.reference import reference_model

pytestmark = pytest.mark.real
PROMPT = "The quick brown fox jumps over the lazy dog because it wants to see"


@pytest.fixture(scope="module")
def smollm2_ids(smollm2_dir: Path) -> torch.Tensor:
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)(PROMPT, return_tensors="pt").input_ids


SMOLLM2_CASES: dict[str, Callable[[Path, Path], surgery.SurgeryResult]] = {
    "prune": lambda src, out: surgery.prune(src, out, drop="10-20", quiet=True),
    "repeat": lambda src, out: surgery.repeat(src, out, layers="8-15", times=2, quiet=True),
    "reverse": lambda src, out: surgery.reorder(src, out, reverse="4-25", quiet=True),
    "shuffle": lambda src, out: surgery.reorder(src, out, shuffle="4-25", seed=0, quiet=True),
}


@pytest.mark.parametrize("case", list(SMOLLM2_CASES))
def test_smollm2(smollm2_dir: Path, smollm2: Any, smollm2_ids: torch.Tensor, tmp_path: Path, case: str) -> None:
    result = SMOLLM2_CASES[case](smollm2_dir, tmp_path / "out")
    layers = list(result.recipe.plan.layers)
    rewritten = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert rewritten.config.num_hidden_layers == len(layers)
    assert rewritten.lm_head.weight.data_ptr() == rewritten.model.embed_tokens.weight.data_ptr()  # still tied
    reference = reference_model(smollm2, layers)
    with torch.no_grad():
        torch.testing.assert_close(rewritten(smollm2_ids).logits, reference(smollm2_ids).logits, rtol=1e-5, atol=1e-5)
    if case in ("repeat", "reverse"):
        kwargs: dict[str, Any] = {"max_new_tokens": 16, "do_sample": False}
        with torch.no_grad():
            cached = rewritten.generate(smollm2_ids, use_cache=True, **kwargs)
            uncached = rewritten.generate(smollm2_ids, use_cache=False, **kwargs)
        assert torch.equal(cached, uncached)


def test_smollm2_identity_is_the_original(smollm2_dir: Path, smollm2: Any, smollm2_ids: torch.Tensor, tmp_path: Path) -> None:
    """A control: the identity plan reproduces the source bit for bit, so the other comparisons mean something."""
    surgery.apply(smollm2_dir, tmp_path / "out", "0-29", quiet=True)
    copy = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.equal(copy(smollm2_ids).logits, smollm2(smollm2_ids).logits)
        pruned_differs = reference_model(smollm2, [i for i in range(30) if not 10 <= i <= 20])(smollm2_ids).logits
    assert not torch.allclose(pruned_differs, smollm2(smollm2_ids).logits, atol=1e-2)


@pytest.mark.parametrize("plan", ["0-5,12-17", "0-3,11,10,9,8,7,6,5,4,12-17"])
def test_gemma3(gemma3_dir: Path, gemma3: Any, tmp_path: Path, plan: str) -> None:
    original = gemma3
    assert original.config.num_hidden_layers == 18
    assert len(set(original.config.layer_types)) == 2
    result = surgery.apply(gemma3_dir, tmp_path / "out", plan, quiet=True)
    layers = list(result.recipe.plan.layers)
    rewritten = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert rewritten.config.layer_types == [original.config.layer_types[i] for i in layers]
    # The prompt is shorter than Gemma 3's 512-token window, so the layer_types assertion above is what
    # checks the types here; the tiny gemma3 (window 4) checks them through the logits.
    ids = transformers.AutoTokenizer.from_pretrained(gemma3_dir)(PROMPT, return_tensors="pt").input_ids
    reference = reference_model(original, layers)
    with torch.no_grad():
        torch.testing.assert_close(rewritten(ids).logits, reference(ids).logits, rtol=1e-5, atol=1e-4)


def test_minilm(minilm_dir: Path, tmp_path: Path) -> None:
    original = transformers.AutoModel.from_pretrained(minilm_dir).eval()
    surgery.apply(minilm_dir, tmp_path / "out", "0,1,4,3,5", quiet=True)
    rewritten = transformers.AutoModel.from_pretrained(tmp_path / "out").eval()
    batch = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")(
        ["layer surgery on a sentence encoder", "a second, longer sentence with padding on the first"],
        padding=True, return_tensors="pt",
    )
    reference = reference_model(original, [0, 1, 4, 3, 5])
    with torch.no_grad():
        torch.testing.assert_close(
            rewritten(**batch).last_hidden_state, reference(**batch).last_hidden_state, rtol=1e-5, atol=1e-5
        )


def test_default_model_from_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`surgery prune --drop 10-20 OUT` with no MODEL uses the embedded SmolLM2 and generates."""
    from surgery.cli import main

    assert main(["prune", "--drop", "10-20", str(tmp_path / "out"), "-q"]) == 0
    assert "30 layers -> 19" in capsys.readouterr().out
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.num_hidden_layers == 19
