"""Hold an exported graph to PyTorch: run it in ONNX Runtime and compare logits, cache steps and greedy tokens
with the fp32 model it came from, within one relative bound (:func:`relative_tolerance`)."""

from __future__ import annotations

import contextlib
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from exporters.onnx_model import _Loaded, left_padded_positions
from exporters.onnx_session import ONNX_FILENAME, OnnxCausalLM, create_session
from surgery.checkpoint import has_tokenizer
from surgery.compat import output_cache, with_cache
from surgery.modeling_wide import BASE_KEY

# The bound, one rule for both dtypes: max |ONNX Runtime - PyTorch fp32| <= tolerance x max(1, max |logit|),
# the largest |logit| (|value| for encoders) of PyTorch over the compared positions. fp32 rounding grows with
# the size of the activations, so the bound scales with the logits.
# fp32: 2e-5 (~170 fp32 epsilons). Measured (benchmarks/onnx_parity.py), worst of all checks: PyTorch fp32 is
# itself off its float64 run by up to 3.1e-6 of max |logit|, ONNX Runtime off PyTorch fp32 by up to 3.9e-6
# (both SmolLM2-135M --drop 10-20: 9.1e-5 and 1.16e-4 at |logit| 29.4), so the margin is ~5x; a graph with
# one middle-layer norm weight off by 0.1% exceeds the bound 7-290x (tiny Llama, MiniLM, SmolLM2).
FP32_RELATIVE_TOLERANCE = 2e-5
# fp16 graph vs the fp32 PyTorch model. Measured (CPU): SmolLM2-135M 1.1e-3, pruned+repeated fp16 SmolLM2
# 0.75e-3, Gemma 3 270M 0.9e-3, tiny random Llama 1.1e-3; the bound leaves a margin of ~4.5x.
FP16_RELATIVE_TOLERANCE = 5e-3
GREEDY_TOKENS = 16


@dataclass(frozen=True)
class Check:
    """One validation check.

    Attributes:
        name: what was compared.
        passed: whether it met its bound.
        max_abs_diff: largest |ONNX Runtime - PyTorch| (None for token comparisons).
        tolerance: the bound on ``max_abs_diff``: the relative tolerance x max(1, ``scale``).
        detail: a short note (scale and margin, mismatching token).
        scale: the largest |logit| (|value| for encoders) of PyTorch over the compared positions.
    """

    name: str
    passed: bool
    max_abs_diff: float | None = None
    tolerance: float | None = None
    detail: str = ""
    scale: float | None = None

    @property
    def relative(self) -> float | None:
        """``max_abs_diff`` as a fraction of max(1, ``scale``): what the relative tolerance bounds."""
        if self.max_abs_diff is None or self.scale is None:
            return None
        return self.max_abs_diff / max(self.scale, 1.0)

    @property
    def margin(self) -> float | None:
        """``tolerance / max_abs_diff``: how many times the difference fits in the bound (above 1 passes)."""
        if self.max_abs_diff is None or self.tolerance is None:
            return None
        return self.tolerance / self.max_abs_diff if self.max_abs_diff > 0 else float("inf")

    def format(self) -> str:
        status = "ok  " if self.passed else "FAIL"
        numbers = f" max |diff| {self.max_abs_diff:.3g} <= {self.tolerance:.3g}" if self.max_abs_diff is not None and self.tolerance is not None else ""
        if self.max_abs_diff is not None and self.tolerance is not None and not self.passed:
            numbers = numbers.replace("<=", ">")
        return f"  {status} {self.name}:{numbers}{' ' + self.detail if self.detail else ''}"

    def to_dict(self) -> dict[str, Any]:
        margin = self.margin
        return {**asdict(self), "relative": self.relative,
                "margin": round(margin, 2) if margin is not None and margin != float("inf") else None}


@dataclass(frozen=True)
class OnnxValidationReport:
    """ONNX Runtime against PyTorch, and which execution provider actually ran.

    Attributes:
        provider: the ONNX Runtime execution provider of the session (what really ran).
        dtype: ``fp32`` or ``fp16``.
        checks: every check, in order.
        seconds: how long validation took.
    """

    provider: str
    dtype: str
    checks: tuple[Check, ...]
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def rule(self) -> str:
        """The bound every numeric check is held to, in one line."""
        return (f"max |ONNX Runtime - PyTorch fp32| <= {relative_tolerance(self.dtype):g} x max(1, max |PyTorch logit|) "
                "over the compared positions")

    def format(self) -> str:
        """The report as ``surgery export-onnx`` prints it."""
        verdict = "passed" if self.passed else "FAILED"
        lines = [f"validation {verdict} on {self.provider} ({self.dtype}, {self.seconds:.1f} s; "
                 f"bound {relative_tolerance(self.dtype):g} x max(1, max |logit|)):"]
        lines.extend(check.format() for check in self.checks)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"provider": self.provider, "dtype": self.dtype, "passed": self.passed, "seconds": round(self.seconds, 2),
                "rule": self.rule, "relative_tolerance": relative_tolerance(self.dtype),
                "checks": [check.to_dict() for check in self.checks]}


def relative_tolerance(dtype: str) -> float:
    """The bound on max |ONNX Runtime - PyTorch fp32| as a fraction of max(1, max |logit|), for a graph dtype."""
    return FP32_RELATIVE_TOLERANCE if dtype == "fp32" else FP16_RELATIVE_TOLERANCE


def _tokenizer_config(directory: Path) -> Any:
    """The config ``AutoTokenizer`` is given for ``directory``: None (it reads ``config.json`` itself), or for a
    wide-block checkpoint (or its export) a bare ``PreTrainedConfig``.

    ``AutoConfig`` cannot read a ``surgery_parallel`` config without the checkpoint's code (never run here), so
    ``AutoTokenizer`` falls back to a bare config read from the same file, logging that a model of type
    ``surgery_parallel`` instantiates one of type ``''``. Handing it the bare config directly gives the same
    tokenizer without the warning: the class named in ``tokenizer_config.json``, as the user gets it with
    ``trust_remote_code=True`` (the checkpoint's config class is in no tokenizer mapping). The base family's config
    would not do: transformers substitutes the family's tokenizer class (Qwen 2's) for the one the files name.
    """
    import json

    with contextlib.suppress(OSError, ValueError):
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
        if isinstance(config, dict) and isinstance(config.get(BASE_KEY), str):
            from transformers import PreTrainedConfig

            bare = PreTrainedConfig()
            bare.name_or_path = str(directory)  # as the fallback reads it (transformers matches some names)
            return bare
    return None


def _prompts(directory: Path, vocab: int) -> list[list[int]]:
    """Two prompts of different lengths: real text when a tokenizer is there, else fixed random ids."""
    with contextlib.suppress(Exception):
        from transformers import AutoTokenizer

        if not has_tokenizer(directory):
            raise LookupError("no tokenizer files")  # random ids below (transformers 5.0 would make up an empty one)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(str(directory), config=_tokenizer_config(directory),
                                                      trust_remote_code=False)  # best effort, never code
        texts = ["The history of the printing press begins in the fifteenth century, when",
                 "def fibonacci(n):"]
        ids = [tokenizer(text)["input_ids"] for text in texts]
        if all(len(i) >= 3 and max(i) < vocab for i in ids):
            return ids
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab, 11).tolist(), rng.integers(0, vocab, 6).tolist()]


def _left_pad(prompts: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


def _diff_check(name: str, got: np.ndarray, want: np.ndarray, keep: np.ndarray | None, dtype: str,
                what: str = "logit") -> Check:
    """Largest |got - want| over the kept positions, held to ``relative_tolerance(dtype)`` x max(1, max |want|)."""
    got = got.astype(np.float32)
    if keep is not None:
        got, want = got[keep], want[keep]
    if not np.isfinite(got).all():
        return Check(name, False, float("inf"), None, "(ONNX Runtime produced inf/nan)")
    diff = float(np.abs(got - want).max())
    scale = float(np.abs(want).max())
    rtol = relative_tolerance(dtype)
    tolerance = rtol * max(scale, 1.0)
    check = Check(name, diff <= tolerance, diff, tolerance, scale=scale)
    margin = f"{check.margin:.1f}x margin" if check.passed and diff > 0 else f"relative {check.relative:.2g}"
    return Check(name, check.passed, diff, tolerance, f"({rtol:g} x max |{what}| {scale:.3g}; {margin})", scale)


def validate_against(loaded: _Loaded, directory: Path, *, dtype: str = "fp32", device: str = "cpu") -> OnnxValidationReport:
    """Run the graph in ``directory`` on ONNX Runtime and compare it with the PyTorch model it came from.

    Decoders: logits of a prefill (past length 0), of one decode step fed ONNX Runtime's own present
    cache, of a left-padded batch (prefill and one step, real positions only), and the tokens of a greedy
    generation of 16 tokens against ``transformers`` ``generate``. Encoders: ``last_hidden_state`` of a
    right-padded batch (real positions only).

    Bound, per numeric check: max |ONNX Runtime - PyTorch fp32| <= ``relative_tolerance(dtype)`` x
    max(1, max |PyTorch logit|) over the compared positions (fp32 ``FP32_RELATIVE_TOLERANCE`` 2e-5,
    fp16 ``FP16_RELATIVE_TOLERANCE`` 5e-3).

    Args:
        loaded: the fp32 PyTorch model and its layout (from the export).
        directory: the ONNX directory (``model.onnx`` and the tokenizer).
        dtype: the graph's dtype.
        device: ``cpu`` or ``cuda``.

    Returns:
        The :class:`OnnxValidationReport`; it records the provider that ran.
    """
    import torch

    started = time.perf_counter()
    model = loaded.model
    config = model.config.get_text_config() if loaded.kind == "decoder" else model.config
    vocab = int(config.vocab_size)
    prompts = _prompts(directory, vocab)
    if loaded.kind == "encoder":
        session = create_session(directory / ONNX_FILENAME, device)
        ids, mask = _left_pad(prompts, 0)
        ids, mask = ids[:, ::-1].copy(), mask[:, ::-1].copy()  # encoders: right padding
        feed = {"input_ids": ids, "attention_mask": mask}
        kwargs = {}
        if loaded.token_type_ids:
            feed["token_type_ids"] = np.zeros_like(ids)
            kwargs["token_type_ids"] = torch.zeros(ids.shape, dtype=torch.long)
        got = session.run(["last_hidden_state"], feed)[0]
        with torch.no_grad():
            want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **kwargs).last_hidden_state.numpy()
        check = _diff_check("last_hidden_state, right-padded batch", got, want, mask.astype(bool), dtype, "value")
        return OnnxValidationReport(session.get_providers()[0], dtype, (check,), time.perf_counter() - started)

    lm = OnnxCausalLM.load(directory, device)
    pad = config.pad_token_id if isinstance(getattr(config, "pad_token_id", None), int) else 0
    eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) is not None else None
    checks: list[Check] = []

    def torch_step(ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, cache: Any) -> tuple[np.ndarray, Any]:
        with torch.no_grad():
            out = model(**with_cache(model, cache, input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                     position_ids=torch.from_numpy(positions), use_cache=True))
        return out.logits.float().numpy(), output_cache(out)

    # 1. prefill, past length 0, one sequence
    ids = np.array([prompts[0]], dtype=np.int64)
    mask = np.ones_like(ids)
    positions = left_padded_positions(mask)
    got, present = lm.forward(ids, mask, positions, lm.empty_cache(1))
    want, cache = torch_step(ids, mask, positions, None)
    checks.append(_diff_check(f"prefill logits ({ids.shape[1]} tokens, past 0)", got, want, None, dtype))
    # 2. one decode step: ONNX Runtime fed its own present, PyTorch its own cache
    step = want[:, -1].argmax(-1)[:, None].astype(np.int64)
    mask = np.ones((1, ids.shape[1] + 1), dtype=np.int64)
    full_positions = left_padded_positions(mask)
    got, _ = lm.forward(step, mask, full_positions[:, -1:], present)
    want, _ = torch_step(step, mask, full_positions[:, -1:], cache)
    checks.append(_diff_check(f"decode step logits (past {ids.shape[1]})", got, want, None, dtype))
    # 3. a left-padded batch: prefill and one step, real positions only
    ids, mask = _left_pad(prompts, pad)
    positions = left_padded_positions(mask)
    got, present = lm.forward(ids, mask, positions, lm.empty_cache(len(prompts)))
    want, cache = torch_step(ids, mask, positions, None)
    checks.append(_diff_check("left-padded batch prefill logits (real positions)", got, want, mask.astype(bool), dtype))
    step = want[:, -1].argmax(-1)[:, None].astype(np.int64)
    mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
    full_positions = np.concatenate([positions, positions[:, -1:] + 1], axis=1)
    got, _ = lm.forward(step, mask, full_positions[:, -1:], present)
    want, _ = torch_step(step, mask, full_positions[:, -1:], cache)
    checks.append(_diff_check("left-padded batch decode step logits", got, want, None, dtype))
    # 4. greedy generation of 16 tokens against transformers
    checks.append(_greedy_check(lm, model, prompts, pad, eos, dtype))
    return OnnxValidationReport(lm.provider, dtype, tuple(checks), time.perf_counter() - started)


def _greedy_check(lm: OnnxCausalLM, model: Any, prompts: list[list[int]], pad: int, eos: Any, dtype: str) -> Check:
    """Greedy tokens of ONNX Runtime against ``transformers`` ``generate``, row by row.

    The tokens must be equal, except that a row may part where PyTorch's own logits of the two
    tokens chosen lie within the logit bound (``relative_tolerance(dtype)`` x max(1, max |logit|)):
    a near-tie that any two correct implementations may break differently (it happens in fp16).
    Past such a point the row is not compared: the sequences are no longer the same input.
    """
    import torch
    from transformers import GenerationConfig

    ids, mask = _left_pad(prompts, pad)
    ours = lm.greedy(ids, mask, max_new_tokens=GREEDY_TOKENS, eos_token_id=eos, pad_token_id=pad).tokens
    settings = GenerationConfig(do_sample=False, max_new_tokens=GREEDY_TOKENS, eos_token_id=eos, pad_token_id=pad)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                generation_config=settings)[:, ids.shape[1]:].numpy()
    name = f"greedy {GREEDY_TOKENS} tokens with cache, left-padded batch of {len(prompts)}, vs transformers generate"
    if ours.shape == theirs.shape and (ours == theirs).all():
        return Check(name, True, detail=f"({ours.shape[1]} tokens per row equal)")
    width = min(ours.shape[1], theirs.shape[1])
    if ours.shape[1] != theirs.shape[1] and (ours[:, :width] == theirs[:, :width]).all():
        return Check(name, False, detail=f"(lengths {ours.shape[1]} vs {theirs.shape[1]})")
    ties = []
    for row in range(len(prompts)):
        parted = np.nonzero(ours[row, :width] != theirs[row, :width])[0]
        if not len(parted):
            continue
        col = int(parted[0])
        mine, reference = int(ours[row, col]), int(theirs[row, col])
        context = torch.tensor([prompts[row] + [int(t) for t in theirs[row, :col]]])
        with torch.no_grad():
            logits = model(input_ids=context, use_cache=False).logits[0, -1].float()
        gap = float(logits[reference] - logits[mine])
        bound = relative_tolerance(dtype) * max(1.0, float(logits.abs().max()))
        where = f"row {row} token {col}: {mine} vs {reference}"
        if gap > bound:
            return Check(name, False, detail=f"(first difference at {where}; PyTorch prefers {reference} by {gap:.3g} "
                                             f"> bound {bound:.3g})")
        ties.append(f"{where}, a near-tie: logits {gap:.3g} apart <= bound {bound:.3g}")
    return Check(name, True, detail=f"(equal up to {'; '.join(ties)}; compared up to there)")

