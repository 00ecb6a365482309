"""What a rewrite cost: compare a new model with its original on a text set.

Causal LMs: perplexity of both, KL(original || new) of the next-token distributions, top-1
agreement, and greedy-continuation agreement on prompts cut from the text. Encoders (BERT):
cosine similarity of the final hidden states, per token and mean-pooled per sequence.

The new model is either a written checkpoint (``validate(ORIGINAL, NEW)``, two loads) or a plan
run on the original through :func:`surgery.view.plan_view` (``validate(ORIGINAL, plan=...)``:
one load, nothing written). Both go through :func:`compare`, which runs the original once per
batch and then every candidate on the same batch, so :mod:`surgery.sweep` measures any number
of plans with one copy of the weights.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

from surgery.architecture import layer_count, load_config
from surgery.compat import output_cache, with_cache
from surgery.corpus import TextSet, read_texts, token_windows
from surgery.errors import (
    CheckpointError,
    OptionError,
    PlanError,
    SurgeryError,
    TokenizerMismatchError,
    UnsupportedArchitectureError,
)
from surgery.modeling_wide import code_status
from surgery.plan import RECIPE_FILENAME, Plan, Recipe
from surgery.source import open_source

PathLike = str | os.PathLike[str]

# torch is imported by the functions that run models, so that importing surgery stays fast.
if TYPE_CHECKING:
    import torch

DTYPES = {"auto": "auto", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
DEVICES = ("auto", "cpu", "cuda")
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
PROMPT_TOKENS = 32


class MeasureOptions(TypedDict, total=False):
    """Options shared by :func:`validate`, :func:`surgery.analyze.analyze` and :func:`surgery.sweep.sweep`.

    device: ``cpu``, ``cuda`` or ``auto`` (CUDA when available; default).
    dtype: ``auto`` (as stored; default), ``fp32``, ``bf16`` or ``fp16``.
    device_map: ``auto`` to spread a model too large for one device over GPUs and CPU with
        ``accelerate`` (then ``device`` is ignored).
    batch_size: windows per forward pass (default 4).
    max_tokens: token budget of the text set (default 4096).
    seq_len: tokens per window (default 256, capped at the model's context length).
    seed: which windows are drawn from a text longer than the budget (default 0).
    prompts: prompts for greedy-continuation agreement, 0 to skip (default 8).
    new_tokens: tokens generated per prompt (default 32).
    text_field: the JSON field holding the text in a ``.jsonl`` file (default ``text``).
    quiet: no progress bar.
    allow_pickle: accept ``.bin``/``.pt`` weights (loaded with ``weights_only=True``).
    trust_remote_code: allow a model whose code ships in its repository.
    """

    device: str
    dtype: str
    device_map: str | None
    batch_size: int
    max_tokens: int
    seq_len: int
    seed: int
    prompts: int
    new_tokens: int
    text_field: str
    quiet: bool
    allow_pickle: bool
    trust_remote_code: bool


# Upper bounds of the counting options: far above any real measurement, low enough that an absurd
# value (10**12) is refused before it sizes an allocation.
OPTION_MAXIMUM = {"batch_size": 65_536, "max_tokens": 1_000_000_000, "seq_len": 1_048_576,
                  "prompts": 1_000_000, "new_tokens": 1_000_000}


def _whole(options: MeasureOptions, key: str, default: int, minimum: int) -> int:
    value = options.get(key, default)
    if value is None:
        return default
    maximum = OPTION_MAXIMUM[key]
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise OptionError(
            f"{key.replace('_', '-')} must be a whole number from {minimum} to {maximum:,}, got {value!r}"
        )
    return value


@dataclass(frozen=True)
class Settings:
    """:class:`MeasureOptions` checked, with defaults filled in."""

    device: str = "auto"
    dtype: str = "auto"
    device_map: str | None = None
    batch_size: int = 4
    max_tokens: int = 4096
    seq_len: int = 256
    seed: int = 0
    prompts: int = 8
    new_tokens: int = 32
    text_field: str = "text"
    quiet: bool = False
    allow_pickle: bool = False
    trust_remote_code: bool = False

    @classmethod
    def from_options(cls, options: MeasureOptions) -> Settings:
        """Check every option; a bad value is an :class:`~surgery.errors.OptionError`."""
        device = options.get("device") or "auto"
        if device not in DEVICES:
            raise OptionError(f"device {device!r} is not one of {', '.join(DEVICES)}")
        dtype = options.get("dtype") or "auto"
        if dtype not in DTYPES:
            raise OptionError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        device_map = options.get("device_map")
        if device_map is not None and device_map not in DEVICE_MAPS:
            raise OptionError(f"device map {device_map!r} is not one of {', '.join(DEVICE_MAPS)}")
        seed = options.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise OptionError(f"seed must be a whole number, got {seed!r}")
        return cls(
            device=device, dtype=dtype, device_map=device_map,
            batch_size=_whole(options, "batch_size", cls.batch_size, 1),
            max_tokens=_whole(options, "max_tokens", cls.max_tokens, 2),
            seq_len=_whole(options, "seq_len", cls.seq_len, 8),
            seed=seed,
            prompts=_whole(options, "prompts", cls.prompts, 0),
            new_tokens=_whole(options, "new_tokens", cls.new_tokens, 1),
            text_field=options.get("text_field") or "text",
            quiet=bool(options.get("quiet", False)),
            allow_pickle=bool(options.get("allow_pickle", False)),
            trust_remote_code=bool(options.get("trust_remote_code", False)),
        )

    def resolved_device(self) -> str:
        """``cpu`` or ``cuda`` for ``device``; ``auto`` picks CUDA when there is one."""
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise OptionError("--device cuda was given, but no CUDA device is available", hint="use --device cpu or auto")
        return self.device


@dataclass
class LoadedModel:
    """A model loaded for measuring.

    Attributes:
        name: what the user passed (a path, a repo id, or ``default``).
        path: the local checkpoint directory.
        model: the ``transformers`` model, in eval mode.
        tokenizer: its tokenizer, or None when the directory has none.
        causal: True for a model that generates (a causal LM), False for an encoder.
    """

    name: str
    path: Path
    model: Any
    tokenizer: Any | None
    causal: bool

    @property
    def num_layers(self) -> int:
        from surgery.view import text_config_of

        return int(text_config_of(self.model).num_hidden_layers)

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_input_embeddings().num_embeddings)

    @property
    def max_positions(self) -> int | None:
        from surgery.view import text_config_of

        value = getattr(text_config_of(self.model), "max_position_embeddings", None)
        return value if isinstance(value, int) and value > 0 else None

    def describe(self) -> str:
        """How reports name the model: what the user passed, its class and depth."""
        name = self.name
        if name == "default":
            from surgery.source import DEFAULT_MODEL_FILE

            name = f"{DEFAULT_MODEL_FILE.split('.')[0]} (embedded default)"
        return f"{name} ({type(self.model).__name__}, {self.num_layers} layers)"


def load_model(model: PathLike | None, settings: Settings) -> LoadedModel:
    """Load a MODEL argument (directory, ``.gguf``, Hub id or None for the default) for measuring.

    Args:
        model: as for every verb.
        settings: device, dtype, device map, pickle and remote-code permissions.

    Returns:
        The :class:`LoadedModel`.

    Raises:
        ModelNotFoundError, CheckpointError, PickleRefusedError, UnsupportedArchitectureError,
        OptionError (``cuda`` requested without a CUDA device).

    Example:
        >>> loaded = load_model(None, Settings(device="cpu"))  # doctest: +SKIP
        >>> loaded.num_layers  # doctest: +SKIP
        30
    """
    import torch
    import transformers

    device = None if settings.device_map else settings.resolved_device()  # a missing CUDA fails before any work
    source = open_source(model, allow_pickle=settings.allow_pickle, quiet=settings.quiet)
    config = load_config(source.path, trust_remote_code=settings.trust_remote_code)
    source.fetch(source.pending_files)
    status = code_status(source.path)
    warning = status.warning(source.name) if status is not None else None
    if warning:  # outdated code shipped in a wide-block output can compute wrong results: say so before measuring
        sys.stderr.write(f"surgery: warning: {warning}\n")
    name = (getattr(config, "architectures", None) or [None])[0]
    model_class = getattr(transformers, name, None) if name else None
    dtype = "auto" if settings.dtype == "auto" else getattr(torch, DTYPES[settings.dtype])
    placement: dict[str, Any] = {"device_map": settings.device_map} if settings.device_map else {}
    if settings.quiet:
        transformers.logging.disable_progress_bar()
    loaded: Any
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if model_class is None:
                auto = transformers.AutoModelForCausalLM if _is_causal_config(config) else transformers.AutoModel
                loaded = auto.from_pretrained(
                    str(source.path), dtype=dtype, trust_remote_code=settings.trust_remote_code,
                    **placement,
                )
            else:
                loaded = model_class.from_pretrained(
                    str(source.path), dtype=dtype, trust_remote_code=settings.trust_remote_code, **placement
                )
    except SurgeryError:
        raise
    except Exception as exc:  # transformers raises many kinds on a malformed checkpoint; --debug shows the chain
        first = (str(exc).splitlines() or [""])[0]
        raise CheckpointError(
            str(source.path), f"cannot be loaded by transformers ({type(exc).__name__}: {first})"
        ) from exc
    if device is not None:
        loaded = loaded.to(device)
    loaded.eval()
    return LoadedModel(source.name, source.path, loaded, _load_tokenizer(source.path, settings.trust_remote_code), _is_causal(loaded))


def _is_causal_config(config: Any) -> bool:
    return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in (getattr(config, "architectures", None) or []))


def _is_causal(model: Any) -> bool:
    can_generate = getattr(model, "can_generate", None)
    return bool(can_generate()) if callable(can_generate) else False


def _load_tokenizer(path: Path, trust_remote_code: bool) -> Any | None:
    from transformers import AutoTokenizer

    from surgery.checkpoint import check_tokenizer_files, has_tokenizer, tokenizer_error

    if not has_tokenizer(path):  # never let transformers make up an empty tokenizer (5.0 does)
        return None
    check_tokenizer_files(path)  # a malformed tokenizer file is a one-line error naming it
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:  # no tokenizer files: None; present but unloadable: a typed error naming the file
        error = tokenizer_error(path, exc)
        if error is None:
            return None
        raise error from None


def input_device(model: Any) -> torch.device:
    """Where input ids go: the device of the input embeddings (also under a device map)."""
    import torch

    device = torch.device(model.get_input_embeddings().weight.device)
    # Embeddings offloaded by accelerate sit on "meta"; its hooks move CPU inputs where they run.
    return torch.device("cpu") if device.type == "meta" else device


def check_comparable(original: LoadedModel, new: LoadedModel) -> None:
    """Refuse two models whose outputs cannot be compared token by token.

    Raises:
        TokenizerMismatchError: different vocabulary sizes, or tokenizers mapping text differently.
        UnsupportedArchitectureError: a causal LM against an encoder.
    """
    if original.causal != new.causal:
        kinds = {True: "a causal LM", False: "an encoder"}
        raise UnsupportedArchitectureError(
            type(new.model).__name__, f"NEW is {kinds[new.causal]} and ORIGINAL {kinds[original.causal]}; they cannot be compared"
        )
    if original.vocab_size != new.vocab_size:
        raise TokenizerMismatchError(
            f"ORIGINAL has a vocabulary of {original.vocab_size} tokens and NEW of {new.vocab_size}"
        )
    if original.tokenizer is not None and new.tokenizer is not None:
        a, b = original.tokenizer.get_vocab(), new.tokenizer.get_vocab()
        if a != b:
            differ = len(set(a.items()) ^ set(b.items()))
            raise TokenizerMismatchError(f"their tokenizers differ ({differ} token-to-id entries are not shared)")


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


# -- bars: the gates of --max-kl / --min-top1 / --min-cosine ---------------------------------------

BARS: dict[str, tuple[str, str, str]] = {
    # option -> (metric, comparison, label)
    "max_kl": ("kl", "<=", "KL(original || new)"),
    "min_top1": ("top1", ">=", "top-1 agreement"),
    "min_cosine": ("embedding_cosine", ">=", "embedding cosine similarity"),
}


@dataclass(frozen=True)
class Bar:
    """One gate and whether the measurement met it.

    Attributes:
        option: ``max_kl``, ``min_top1`` or ``min_cosine``.
        limit: the bar.
        value: the measured metric.
    """

    option: str
    limit: float
    value: float

    @property
    def passed(self) -> bool:
        metric_sense = BARS[self.option][1]
        return self.value <= self.limit if metric_sense == "<=" else self.value >= self.limit

    def describe(self) -> str:
        metric, sense, label = BARS[self.option]
        verdict = "met" if self.passed else "MISSED"
        return f"--{self.option.replace('_', '-')} {self.limit:g}: {label} {self.value:.4g} (must be {sense} {self.limit:g}) {verdict}"


def check_bar_values(bars: Mapping[str, float | None], *, causal: bool | None = None) -> dict[str, float]:
    """The given bars as floats; refuses a bar that is not a number or does not apply.

    Args:
        bars: option name -> limit or None.
        causal: the model kind when known (``max_kl``/``min_top1`` need a causal LM,
            ``min_cosine`` an encoder).

    Returns:
        The bars that were given.

    Raises:
        OptionError: a non-number, NaN or infinity, a share outside 0-1, a negative KL, or a bar
            of a metric this model does not have.

    Example:
        >>> check_bar_values({"max_kl": 0.5, "min_top1": None})
        {'max_kl': 0.5}
    """
    given: dict[str, float] = {}
    for option, limit in bars.items():
        if limit is None:
            continue
        flag = f"--{option.replace('_', '-')}"
        if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit):
            raise OptionError(f"{flag} must be a number, got {limit!r}")
        if option == "max_kl" and limit < 0:
            raise OptionError(f"{flag} must be 0 or more (KL is never negative), got {limit!r}")
        if option == "min_top1" and not 0 <= limit <= 1:
            raise OptionError(f"{flag} must be a share between 0 and 1, got {limit!r}")
        if option == "min_cosine" and not -1 <= limit <= 1:
            raise OptionError(f"{flag} must be between -1 and 1, got {limit!r}")
        if causal is not None and (option == "min_cosine") == causal:
            kind = "a causal LM" if causal else "an encoder"
            use = "--max-kl / --min-top1" if causal else "--min-cosine"
            raise OptionError(f"{flag} does not apply: the model is {kind}", hint=f"use {use}")
        given[option] = float(limit)
    return given


@dataclass(frozen=True)
class ValidationReport:
    """What :func:`validate` measured, and whether it met the bars.

    Attributes:
        original: the original model, described.
        new: the new model (a path, or the plan run in memory), described.
        plan: the plan in range syntax when known (from ``plan``/``recipe``, or NEW's recipe file).
        kind: ``causal`` or ``encoder``.
        data: the text set's name.
        comparison: the metrics.
        measurement: windows, timing and greedy settings.
        bars: the gates that were given.
    """

    original: str
    new: str
    plan: str | None
    kind: str
    data: str
    comparison: Comparison
    measurement: Measurement
    bars: tuple[Bar, ...] = ()

    @property
    def passed(self) -> bool:
        """True when every bar was met (and when none was given)."""
        return all(bar.passed for bar in self.bars)

    @property
    def missed(self) -> list[str]:
        """One line per missed bar."""
        return [bar.describe() for bar in self.bars if not bar.passed]

    def format(self) -> str:
        """The table printed by ``surgery validate``."""
        c, m = self.comparison, self.measurement
        lines = [
            f"original  {self.original}",
            f"new       {self.new}" + (f"  [plan {self.plan}]" if self.plan and self.plan not in self.new else ""),
            f"text      {self.data}: {m.windows} windows x {m.seq_len} tokens",
            "",
            f"{'metric':<34}{'original':>12}{'new':>12}",
        ]
        if self.kind == "causal":
            assert c.ppl_original is not None and c.ppl_new is not None and c.kl is not None and c.top1 is not None
            lines += [
                f"{'perplexity':<34}{format_metric(c.ppl_original):>12}{format_metric(c.ppl_new):>12}",
                f"{'KL(original || new), nats/token':<34}{'':>12}{c.kl:>12.4f}",
                f"{'top-1 agreement':<34}{'':>12}{c.top1:>12.1%}",
            ]
            if c.greedy_agreement is not None and c.greedy_prefix is not None:
                label = f"greedy agreement ({m.prompts}x{m.new_tokens} tok)"
                lines.append(f"{label:<34}{'':>12}{c.greedy_agreement:>12.1%}")
                lines.append(f"{'  identical before first change':<34}{'':>12}{c.greedy_prefix:>12.1%}")
        else:
            assert c.hidden_cosine is not None and c.embedding_cosine is not None
            lines += [
                f"{'cosine, final hidden states':<34}{'':>12}{c.hidden_cosine:>12.4f}",
                f"{'cosine, mean-pooled embeddings':<34}{'':>12}{c.embedding_cosine:>12.4f}",
            ]
        lines.append(f"{'scored tokens':<34}{'':>12}{c.tokens:>12,}")
        lines.append(f"speed     {m.tokens_per_second:,.0f} tokens/s through the forward passes")
        lines.extend(bar.describe() for bar in self.bars)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The JSON body of ``surgery validate --json``."""
        m = self.measurement
        return {
            "original": self.original,
            "new": self.new,
            "plan": self.plan,
            "kind": self.kind,
            "data": self.data,
            "windows": m.windows,
            "seq_len": m.seq_len,
            "prompts": m.prompts,
            "new_tokens": m.new_tokens,
            "metrics": self.comparison.to_dict(),
            "seconds": m.seconds,
            "tokens_per_second": m.tokens_per_second,
            "bars": [
                {"option": b.option, "limit": b.limit, "value": b.value, "passed": b.passed} for b in self.bars
            ],
            "passed": self.passed,
        }


def format_metric(value: float) -> str:
    """A metric in at most 11 characters: fixed point, or scientific for huge perplexities."""
    return f"{value:.2f}" if abs(value) < 1e6 else f"{value:.2e}"


def num_layers_of(model_dir: Path, settings: Settings) -> int:
    """The layer count in a checkpoint directory's config (its text config for multimodal models)."""
    return layer_count(load_config(model_dir, trust_remote_code=settings.trust_remote_code))


def resolve_plan(plan: str | Plan | None, recipe: PathLike | Recipe | None, num_layers: int) -> Plan | None:
    """The plan given as range syntax, a :class:`Plan`, a recipe file or a recipe; None if neither.

    Raises:
        OptionError: both a plan and a recipe.
        PlanError, RecipeError: a plan that does not parse or was made for another layer count.
    """
    if plan is not None and recipe is not None:
        raise OptionError("give at most one of a plan (--plan) and a recipe (--recipe)")
    if recipe is not None:
        resolved = (recipe if isinstance(recipe, Recipe) else Recipe.load(Path(recipe))).plan
    elif isinstance(plan, Plan):
        resolved = plan
    elif plan is not None:
        resolved = Plan.from_ranges(str(plan), num_layers)
    else:
        return None
    if resolved.num_source_layers != num_layers:
        raise PlanError(
            f"the plan was made for a model with {resolved.num_source_layers} layers, but this model has {num_layers}"
        )
    return resolved


def measuring_windows(loaded: LoadedModel, texts: TextSet, settings: Settings) -> torch.Tensor:
    """The text set as token windows for this model (window length capped at its context length).

    Raises:
        CheckpointError: the model directory has no tokenizer.
        DataError: the text is too short.
    """
    if loaded.tokenizer is None:
        raise CheckpointError(str(loaded.path), "has no tokenizer; measuring needs one to read the text")
    seq_len = min(settings.seq_len, loaded.max_positions or settings.seq_len)
    return token_windows(
        loaded.tokenizer, texts, seq_len=seq_len, max_tokens=max(settings.max_tokens, seq_len),
        seed=settings.seed, special_tokens=not loaded.causal,
    )


def greedy_budget(loaded: LoadedModel, windows: torch.Tensor, settings: Settings) -> tuple[int, int]:
    """``(prompts, new_tokens)`` that fit the model's context after a prompt of :data:`PROMPT_TOKENS`."""
    if not loaded.causal or settings.prompts == 0:
        return 0, 0
    prompt_len = min(PROMPT_TOKENS, int(windows.shape[1]))
    room = (loaded.max_positions or prompt_len + settings.new_tokens) - prompt_len
    return settings.prompts, max(1, min(settings.new_tokens, room))


def _recipe_plan(directory: Path) -> str | None:
    """NEW's plan, when a recipe file of this tool sits beside its weights."""
    if not (directory / RECIPE_FILENAME).is_file():
        return None
    try:
        return str(Recipe.load(directory).plan)
    except (ValueError, OSError):
        return None


def validate(
    original: PathLike | None,
    new: PathLike | None = None,
    *,
    plan: str | Plan | None = None,
    recipe: PathLike | Recipe | None = None,
    data: PathLike | None = None,
    max_kl: float | None = None,
    min_top1: float | None = None,
    min_cosine: float | None = None,
    **options: Unpack[MeasureOptions],
) -> ValidationReport:
    """Compare a new model with its original: a written checkpoint, or a plan run in memory.

    Args:
        original: the source model (directory, ``.gguf``, Hub id, or None for the default).
        new: a checkpoint written from ``original`` (exclusive with ``plan``/``recipe``).
        plan: a plan in range syntax (``"0-9,21-29"``) or a :class:`Plan`, run through
            :func:`surgery.view.plan_view` without writing anything.
        recipe: a recipe file (or an output directory of this tool) whose plan to run.
        data: a ``.txt`` or ``.jsonl`` file; None for the default corpus (Hamlet).
        max_kl: bar: mean KL(original || new) must be at most this (causal LMs).
        min_top1: bar: top-1 agreement must be at least this share (causal LMs).
        min_cosine: bar: mean-pooled embedding cosine must be at least this (encoders).
        **options: see :class:`MeasureOptions`.

    Returns:
        The :class:`ValidationReport`; ``report.passed`` is False when a bar was missed.

    Raises:
        OptionError: not exactly one of ``new``/``plan``/``recipe``, a bad option, or a bar that
            is not a number or does not apply to this model.
        PlanError, RecipeError: a plan that does not fit the original.
        TokenizerMismatchError: ORIGINAL and NEW have different vocabularies or tokenizers.
        DataError: an unreadable, empty or too short text.
        ModelNotFoundError, CheckpointError, UnsupportedArchitectureError.

    Example:
        >>> import surgery
        >>> report = surgery.validate(None, plan="10-20", max_tokens=1024)  # doctest: +SKIP
        >>> report.comparison.top1  # doctest: +SKIP
        0.71
    """
    settings = Settings.from_options(options)
    bars = check_bar_values({"max_kl": max_kl, "min_top1": min_top1, "min_cosine": min_cosine})
    plan_text: str | None
    if sum(x is not None for x in (new, plan, recipe)) != 1:
        raise OptionError("give exactly one of NEW (a checkpoint), a plan (--plan) and a recipe (--recipe)")
    texts = read_texts(data, text_field=settings.text_field)
    if new is None:
        # Parse the plan against the config before loading any weights: a bad plan fails fast.
        source = open_source(original, allow_pickle=settings.allow_pickle, quiet=settings.quiet)
        resolved = resolve_plan(plan, recipe, num_layers_of(source.path, settings))
        assert resolved is not None  # exactly one of new/plan/recipe was given
        reference = load_model(original, settings)
        from surgery.view import live_architecture

        live_architecture(reference.model).check_plan(resolved)
        candidate = Candidate.of_plan(reference.model, resolved, label=f"plan {resolved} (in memory)")
        new_label, plan_text = candidate.label, str(resolved)
    else:
        reference = load_model(original, settings)
        other = load_model(new, settings)
        check_comparable(reference, other)
        candidate = Candidate.of_model(other.model, other.describe())
        new_label, plan_text = other.describe(), _recipe_plan(other.path)
    check_bar_values(bars, causal=reference.causal)
    windows = measuring_windows(reference, texts, settings)
    prompts, new_tokens = greedy_budget(reference, windows, settings)
    measurement = compare(
        reference.model, [candidate], windows, causal=reference.causal, batch_size=settings.batch_size,
        prompts=prompts, new_tokens=new_tokens, quiet=settings.quiet, description="validate",
    )
    comparison = measurement.comparisons[0]
    measured = {option: getattr(comparison, BARS[option][0]) for option in bars}
    return ValidationReport(
        original=reference.describe(),
        new=new_label,
        plan=plan_text,
        kind="causal" if reference.causal else "encoder",
        data=texts.name,
        comparison=comparison,
        measurement=measurement,
        bars=tuple(Bar(option, limit, float(measured[option])) for option, limit in bars.items()),
    )
