"""Plain helpers shared by the test modules (fixtures live in tests/conftest.py).

One copy each of: the repository root, the in-process CLI runner and its one-line-error check,
directory digests, model outputs, and the wide-block loading and comparison helpers.
"""

from __future__ import annotations

import hashlib
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch

from tests import tiny

ROOT = Path(__file__).resolve().parents[1]

# Tokens the fake Hub (tests/conftest.py) knows: a write token of user "tester" (member of "testorg"),
# a read-only token of user "reader", and one it does not know.
HUB_TOKEN = "hf_TestWriteToken0123456789SECRETabcdef"
HUB_READ_TOKEN = "hf_TestReadOnlyToken0123456789SECRETxyz"
HUB_BAD_TOKEN = "hf_NotAKnownToken0123456789SECRETqwerty"

# Token ids for the wide-block tests on tiny models: two rows, so a left-padded second row can be tried.
TINY_IDS = torch.randint(0, tiny.VOCAB, (2, 14), generator=torch.Generator().manual_seed(3))


# -- the command line ------------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """``surgery ARGV`` in this process: exit code (SystemExit included), stdout, stderr."""
    from surgery.cli import main

    try:
        code = main(list(argv))
    except SystemExit as exc:
        code = int(exc.code or 0)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code: int, err: str, *expected: str, ignore_warnings: bool = False) -> str:
    """Exit 2 and exactly one ``surgery: error:`` line on stderr holding every ``expected`` text, no traceback.

    ``ignore_warnings`` leaves ``surgery: warning:`` lines out of the count. Returns the error line.
    """
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if not (ignore_warnings and line.startswith("surgery: warning:"))]
    assert len(lines) == 1, err
    assert lines[0].startswith("surgery: error:"), err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


# -- files -----------------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def digest_tree(directory: Path, pattern: str = "*") -> dict[str, str]:
    """``{relative posix path: sha256}`` of the regular files under ``directory`` matching ``pattern``
    (recursively), leaving out ``.cache`` folders (huggingface_hub's download metadata)."""
    return {
        p.relative_to(directory).as_posix(): sha256(p)
        for p in sorted(directory.rglob(pattern))
        if p.is_file() and ".cache" not in p.relative_to(directory).parts
    }


def read_tree(directory: Path) -> dict[str, bytes]:
    """``{relative posix path: contents}`` of every regular file under ``directory``."""
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# -- models ----------------------------------------------------------------------------------------


def outputs(model: Any, ids: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """Logits (causal LMs) or the last hidden state (encoders) of one forward, without gradients."""
    with torch.no_grad():
        out = model(input_ids=ids, **kwargs)
    return out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the relative error the wide-block tests bound."""
    return float((a - b).abs().max() / b.abs().max())


def load_wide(out: Path) -> Any:
    """A wide-block checkpoint loaded as a user loads it (trust_remote_code=True), every weight accounted for."""
    from transformers import AutoModelForCausalLM

    loaded: Any
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loaded = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, output_loading_info=True)
    model, info = loaded
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def greedy(model: Any, ids: torch.Tensor, new: int, *, use_cache: bool) -> torch.Tensor:
    """``new`` greedy tokens appended to ``ids`` (no stop token), through ``generate``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.generate(
            ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, use_cache=use_cache,
            attention_mask=torch.ones_like(ids), pad_token_id=0,
        )


def random_llama(config: Any, *, seed: int = 0, noise: float = 0.05) -> Any:
    """A ``LlamaForCausalLM`` of ``config`` (architectures set) with every parameter, biases included,
    moved off its initial value by Gaussian noise of std ``noise``, so no zero bias hides a path."""
    return random_causal_lm(config, "LlamaForCausalLM", seed=seed, noise=noise)


def random_causal_lm(config: Any, architecture: str, *, seed: int = 0, noise: float = 0.05) -> Any:
    """:func:`random_llama` for any transformers causal-LM class (``Qwen2ForCausalLM``, ``MistralForCausalLM``)."""
    import transformers

    config.architectures = [architecture]
    torch.manual_seed(seed)
    model = getattr(transformers, architecture)(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * noise)
    return model
