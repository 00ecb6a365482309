"""The metrics of a new model against its original, on the same token windows.

Causal LMs: perplexity of both, KL(original || new) of the next-token distributions, top-1
agreement, and greedy-continuation agreement on prompts cut from the windows. Encoders (BERT):
cosine similarity of the final hidden states, per token and mean-pooled per sequence.

:func:`compare` runs the original once per batch and then every :class:`Candidate` on the same
batch, so :mod:`surgery.sweep` measures any number of plans with one copy of the weights.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from surgery.compat import output_cache, with_cache
from surgery.loading import input_device
from surgery.plan import Plan

if TYPE_CHECKING:
    import torch

PROMPT_TOKENS = 32


@dataclass(frozen=True)
class Candidate:
    """One model to compare with the original.

    Attributes:
        label: how tables name it (a path, or the plan in range syntax).
        plan: the plan, when the candidate is a view of the original.
        enter: a context manager factory that yields the model to run (a view is entered per
            batch, so one loaded model serves every candidate).
    """

    label: str
    plan: Plan | None
    enter: Callable[[], AbstractContextManager[Any]]

    @classmethod
    def of_plan(cls, model: Any, plan: Plan, label: str | None = None) -> Candidate:
        """The candidate that runs ``plan`` on ``model`` through :func:`~surgery.view.plan_view`."""
        from surgery.view import plan_view

        return cls(label or str(plan), plan, lambda: plan_view(model, plan))

    @classmethod
    def of_model(cls, model: Any, label: str) -> Candidate:
        """A separately loaded model."""
        return cls(label, None, lambda: nullcontext(model))


@dataclass(frozen=True)
class Comparison:
    """The metrics of one candidate against the original (None where they do not apply).

    Attributes:
        label: the candidate's label.
        plan: its plan in range syntax, if any.
        num_layers: its layer count.
        tokens: predicted tokens scored (causal) or tokens compared (encoder).
        ppl_original: perplexity of the original on the text.
        ppl_new: perplexity of the candidate.
        kl: mean KL(original || new) of the next-token distributions, in nats.
        top1: share of positions where both predict the same next token.
        greedy_agreement: share of identical tokens in greedy continuations of the prompts.
        greedy_prefix: mean share of each continuation before the first differing token.
        hidden_cosine: mean cosine similarity of the final hidden states, per token (encoders).
        embedding_cosine: mean cosine similarity of the mean-pooled embeddings (encoders).
    """

    label: str
    plan: str | None
    num_layers: int
    tokens: int
    ppl_original: float | None = None
    ppl_new: float | None = None
    kl: float | None = None
    top1: float | None = None
    greedy_agreement: float | None = None
    greedy_prefix: float | None = None
    hidden_cosine: float | None = None
    embedding_cosine: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _log_normalizer(logits: torch.Tensor, scratch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logsumexp, argmax, sum of exp(logits - max))`` per row, leaving ``exp(logits - max)`` in ``scratch``.

    One max pass gives both the stabilizer and the top-1 token; the exponentials go into a
    buffer that lives across batches, so no (length x vocab) tensor is allocated per call.
    """
    import torch

    top_values, top_index = logits.max(dim=-1)
    torch.sub(logits, top_values[:, None], out=scratch)
    scratch.exp_()
    sums = scratch.sum(dim=-1)
    return top_values + sums.log(), top_index, sums


@dataclass
class _NextTokens:
    """The original's next-token distributions on one batch, prepared once for every candidate.

    Attributes:
        probs: ``p``, ``(batch, length - 1, vocab)``.
        neg_entropy: ``sum_v p log p`` per position.
        top1: the original's most likely next token per position.
        targets: the actual next tokens.
        nll: the original's summed negative log-likelihood of the targets.
    """

    probs: torch.Tensor
    neg_entropy: torch.Tensor
    top1: torch.Tensor
    targets: torch.Tensor
    nll: float

    @classmethod
    def of(cls, logits: torch.Tensor, batch: torch.Tensor, probs: torch.Tensor) -> _NextTokens:
        """From the original's logits; ``probs`` is a ``(batch, length - 1, vocab)`` buffer to fill."""
        import torch

        targets = batch[:, 1:].to(logits.device)
        neg_entropy = torch.empty(targets.shape, device=logits.device)
        top1 = torch.empty(targets.shape, dtype=torch.long, device=logits.device)
        nll = 0.0
        for row in range(logits.shape[0]):
            row_logits = logits[row, :-1].float()
            normalizer, top1[row], sums = _log_normalizer(row_logits, probs[row])
            probs[row].div_(sums[:, None])
            neg_entropy[row] = torch.linalg.vecdot(probs[row], row_logits) - normalizer
            nll += float((normalizer - row_logits.gather(-1, targets[row, :, None])[:, 0]).sum())
        return cls(probs, neg_entropy, top1, targets, nll)


@dataclass
class _Tally:
    """Running sums of one candidate's metrics."""

    tokens: int = 0
    nll: float = 0.0
    kl: float = 0.0
    top1: int = 0
    sequences: int = 0
    hidden_cosine: float = 0.0
    embedding_cosine: float = 0.0
    greedy_same: int = 0
    greedy_prefix: float = 0.0
    greedy_total: int = 0
    greedy_prompts: int = 0
    num_layers: int = 0

    def add_causal(self, reference: _NextTokens, logits: torch.Tensor, scratch: torch.Tensor) -> None:
        import torch

        # One sequence at a time, through a reused (length x vocab) buffer. log q is never
        # materialized: sum_v p log q = p . logits - logsumexp(logits), since sum_v p = 1.
        for row in range(logits.shape[0]):
            row_logits = logits[row, :-1].float()
            normalizer, top1, _ = _log_normalizer(row_logits, scratch)
            cross = torch.linalg.vecdot(reference.probs[row], row_logits) - normalizer
            self.kl += float((reference.neg_entropy[row] - cross).clamp_min(0).sum())
            self.nll += float((normalizer - row_logits.gather(-1, reference.targets[row, :, None])[:, 0]).sum())
            self.top1 += int((top1 == reference.top1[row]).sum())
            self.tokens += int(reference.targets.shape[1])

    def add_encoder(self, ref_hidden: torch.Tensor, hidden: torch.Tensor) -> None:
        import torch

        ref, new = ref_hidden.float(), hidden.float()
        self.hidden_cosine += float(torch.nn.functional.cosine_similarity(ref, new, dim=-1).sum())
        self.embedding_cosine += float(torch.nn.functional.cosine_similarity(ref.mean(1), new.mean(1), dim=-1).sum())
        self.tokens += int(ref.shape[0] * ref.shape[1])
        self.sequences += int(ref.shape[0])

    def add_greedy(self, reference: torch.Tensor, continuation: torch.Tensor) -> None:
        import torch

        same = reference == continuation
        self.greedy_same += int(same.sum())
        self.greedy_total += same.numel()
        # Length of the identical prefix: the position of the first difference, or all of it.
        prefix = torch.where(same.all(1), same.shape[1], (~same).int().argmax(1))
        self.greedy_prefix += float(prefix.sum()) / same.shape[1]
        self.greedy_prompts += same.shape[0]


@dataclass
class Measurement:
    """What :func:`compare` measured: one :class:`Comparison` per candidate, and the cost of it.

    Attributes:
        comparisons: in the candidates' order.
        windows: the number of text windows.
        seq_len: tokens per window.
        forward_tokens: tokens through a forward pass, summed over the original and all candidates.
        seconds: wall time of the scoring passes (greedy generation excluded).
        prompts: prompts used for greedy agreement.
        new_tokens: tokens generated per prompt.
    """

    comparisons: list[Comparison]
    windows: int
    seq_len: int
    forward_tokens: int
    seconds: float
    prompts: int = 0
    new_tokens: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        return self.forward_tokens / self.seconds if self.seconds > 0 else float("nan")


def _forward(model: Any, batch: torch.Tensor, causal: bool) -> torch.Tensor:
    if causal:
        return model(input_ids=batch, use_cache=False).logits
    return model.base_model(input_ids=batch).last_hidden_state


def greedy_continuation(model: Any, prompts: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """The ``new_tokens`` tokens that greedy decoding with a KV cache appends to each prompt.

    No stop token ends a row early, so every row has the same length and two models' rows can
    be compared position by position.

    Args:
        model: a causal LM (or a view of one).
        prompts: ``(count, length)`` token ids, no padding.
        new_tokens: how many tokens to generate.

    Returns:
        ``(count, new_tokens)`` token ids.

    Example:
        >>> greedy_continuation(model, torch.tensor([[1, 2, 3]]), 4).shape  # doctest: +SKIP
        torch.Size([1, 4])
    """
    import torch

    with torch.inference_mode():
        out = model(input_ids=prompts, use_cache=True)
        cache = output_cache(out)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
        generated = [token]
        for _ in range(new_tokens - 1):
            out = model(**with_cache(model, cache, input_ids=token, use_cache=True))
            cache = output_cache(out)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            generated.append(token)
        return torch.cat(generated, dim=1)


def compare(
    reference: Any,
    candidates: Sequence[Candidate],
    windows: torch.Tensor,
    *,
    causal: bool,
    batch_size: int,
    prompts: int = 0,
    new_tokens: int = 32,
    quiet: bool = False,
    description: str = "measuring",
) -> Measurement:
    """Measure every candidate against the reference model on the same windows.

    Each batch goes through the reference once, then through each candidate; a view candidate
    is entered and left around its pass, so the reference runs unchanged.

    Args:
        reference: the original model.
        candidates: the models to compare (views of ``reference`` or other models).
        windows: ``(count, length)`` token ids from :func:`surgery.corpus.token_windows`.
        causal: causal-LM metrics (True) or encoder metrics (False).
        batch_size: windows per forward pass.
        prompts: greedy-agreement prompts, cut from the first windows (0 skips it).
        new_tokens: tokens generated per prompt.
        quiet: no progress bar.
        description: the progress bar's label.

    Returns:
        The :class:`Measurement`.

    Example:
        >>> m = compare(model, [Candidate.of_plan(model, plan)], windows, causal=True, batch_size=4)  # doctest: +SKIP
        >>> m.comparisons[0].kl  # doctest: +SKIP
        0.42
    """
    import torch
    from tqdm.auto import tqdm

    from surgery.view import text_config_of

    tallies = [_Tally() for _ in candidates]
    reference_nll = 0.0
    # Buffers for the causal metrics, reused across batches (fresh pages cost as much as the math).
    probs: torch.Tensor | None = None
    scratch = torch.empty(0)
    device = input_device(reference)
    batches = list(windows.split(batch_size))
    prompt_ids = windows[:prompts, : min(PROMPT_TOKENS, windows.shape[1])] if causal and prompts else None
    steps = len(batches) * (1 + len(candidates)) + (len(candidates) + 1 if prompt_ids is not None else 0)
    with torch.inference_mode(), tqdm(total=steps, desc=description, unit="pass", disable=quiet, file=sys.stderr) as bar:
        start = time.perf_counter()
        for batch in batches:
            batch = batch.to(device)
            ref_out = _forward(reference, batch, causal)
            if causal:
                shape = (ref_out.shape[0], ref_out.shape[1] - 1, ref_out.shape[2])
                if probs is None or probs.shape[1:] != shape[1:] or probs.shape[0] < shape[0]:
                    probs = torch.empty(shape, device=ref_out.device)
                    scratch = torch.empty(shape[1:], device=ref_out.device)
                reference_next = _NextTokens.of(ref_out, batch, probs[: shape[0]])  # a last, smaller batch uses a slice
                del ref_out
                reference_nll += reference_next.nll
            bar.update()
            for candidate, tally in zip(candidates, tallies, strict=True):
                with candidate.enter() as model:
                    out = _forward(model, batch, causal)
                    tally.num_layers = int(text_config_of(model).num_hidden_layers)
                if causal:
                    tally.add_causal(reference_next, out.to(reference_next.probs.device), scratch)
                else:
                    tally.add_encoder(ref_out, out.to(ref_out.device))
                del out
                bar.update()
        seconds = time.perf_counter() - start
        if prompt_ids is not None:
            prompt_ids = prompt_ids.to(device)
            expected = greedy_continuation(reference, prompt_ids, new_tokens)
            bar.update()
            for candidate, tally in zip(candidates, tallies, strict=True):
                with candidate.enter() as model:
                    tally.add_greedy(expected, greedy_continuation(model, prompt_ids, new_tokens).to(expected.device))
                bar.update()
    comparisons = [_comparison(c, t, reference_nll, causal) for c, t in zip(candidates, tallies, strict=True)]
    return Measurement(
        comparisons=comparisons,
        windows=int(windows.shape[0]),
        seq_len=int(windows.shape[1]),
        forward_tokens=int(windows.numel()) * (1 + len(candidates)),
        seconds=seconds,
        prompts=0 if prompt_ids is None else int(prompt_ids.shape[0]),
        new_tokens=new_tokens if prompt_ids is not None else 0,
    )


def _comparison(candidate: Candidate, tally: _Tally, reference_nll: float, causal: bool) -> Comparison:
    plan = str(candidate.plan) if candidate.plan is not None else None
    if not causal:
        return Comparison(
            candidate.label, plan, tally.num_layers, tally.tokens,
            hidden_cosine=tally.hidden_cosine / tally.tokens,
            embedding_cosine=tally.embedding_cosine / tally.sequences,
        )
    greedy = tally.greedy_total > 0
    return Comparison(
        candidate.label, plan, tally.num_layers, tally.tokens,
        ppl_original=math.exp(reference_nll / tally.tokens),
        ppl_new=math.exp(tally.nll / tally.tokens),
        kl=tally.kl / tally.tokens,
        top1=tally.top1 / tally.tokens,
        greedy_agreement=tally.greedy_same / tally.greedy_total if greedy else None,
        greedy_prefix=tally.greedy_prefix / tally.greedy_prompts if greedy else None,
    )

