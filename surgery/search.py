"""Search for the layers to drop to reach a target depth: ``surgery prune MODEL OUT --to-layers N``.

Three methods, all run on one loaded copy of the weights through :func:`surgery.view.plan_view`
(nothing is written until the choice is made):

* ``greedy`` (default; SLEB, Song et al. 2024): remove one layer at a time, each step keeping the
  removal with the lowest measured KL(original || candidate) on the calibration windows; with
  ``beam=K`` the K best plans of each step are kept and extended (a beam as wide as the number of
  plans of a step makes the search exhaustive);
* ``block`` (ShortGPT / Gromov et al. 2024): the best contiguous block of ``L - N`` layers, chosen by
  measured KL (``block_by="measured"``, every block measured) or by the angular distance across it
  (``block_by="angular"``, one pass, :func:`surgery.analyze.stream_statistics`);
* ``score`` (ShortGPT's Block Influence): the ``L - N`` layers with the lowest BI, one pass.

With ``allow_parallel``, greedy may also merge two adjacent steps of consecutive source layers into
a parallel group (or grow a group by one layer), which also lowers the depth by one; the plans
without a group stay in the beam beside the others, so the same run also finds what the search
without groups finds. Block also measures every group of ``L - N + 1`` consecutive layers merged
into one wide block. The report says whether a plan with a group won; such a plan is written as a
wide-block checkpoint.

Candidates share computation: the plan a step extends is run once per calibration batch with
its residual stream recorded (:func:`surgery.analyze.residual_stream`), and each candidate runs
only from its first changed position, its input there taken from that record. The calibration
windows and the held-out windows are separate parts of the text (by default its first 90% and
its last 10%); the chosen plan's KL, top-1 agreement and perplexity are measured on the held-out
windows with :func:`surgery.metrics.compare`.

Screening keeps a large calibration budget affordable: greedy and measured block score every
candidate on 1,024 of the 4,096 calibration tokens (4 windows spread over the 16), then only the 4
best of each step (``screen``) on all of them, and rank by that. On SmolLM2 a search on 1,024 tokens
alone overfits (its plan's held-out KL 0.95x the best contiguous drop's at N = 26, against 0.87x
with every candidate on 4,096 tokens, which took 11 minutes).
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Unpack

from surgery.analyze import residual_stream, stream_statistics
from surgery.corpus import TextSet, read_texts, token_windows
from surgery.errors import CheckpointError, DataError, OptionError, SurgeryError, UnsupportedArchitectureError
from surgery.loading import LoadedModel, MeasureOptions, PathLike, Settings, input_device, load_model
from surgery.metrics import Candidate, Comparison, _NextTokens, _Tally, compare
from surgery.plan import ParallelGroup, Plan, format_ranges

if TYPE_CHECKING:
    import torch

    from surgery.architecture import Architecture

METHODS = ("greedy", "block", "score")
BLOCK_BY = ("measured", "angular")
# Calibration tokens when the caller gives no max_tokens: 16 windows of 256 tokens. 1,024 tokens (4
# windows) overfit on SmolLM2 (held-out KL 0.95x the best contiguous drop at N = 26, 0.87x at 4,096).
CALIBRATION_TOKENS = 4096
# Screening: every candidate is first scored on this many of the calibration tokens (spread over
# them), and only the best ``screen`` of a step on all of them (~1.6x the time of a 1,024-token search
# instead of 4x for every candidate on 4,096).
SCREEN_TOKENS = 1024
SCREEN = 4

Step = int | ParallelGroup


class SearchOptions(MeasureOptions, total=False):
    """The options of :func:`search` beyond the method (and of ``prune(..., to_layers=N)``'s ``search``).

    data: the ``.txt``/``.jsonl`` text (default: Hamlet).
    held_out: the share of the text, from its end, kept for the final measurement (default 0.1).
    eval_tokens: most held-out tokens measured (default 4096).
    max_tokens: the calibration budget (default 4096 tokens), drawn from the rest of the text.
    screen_tokens: greedy and measured block: the share of the calibration budget every candidate is
    first scored on (default 1024 tokens, windows spread over the budget); see ``screen`` of :func:`search`.
    lazy: greedy with screening: from the second step on, screen only the candidates whose last
    measured cost does not rule them out (:class:`_Lazy`; default False: screen every candidate).
    Every other key: as :class:`~surgery.loading.MeasureOptions` (``prompts`` and ``new_tokens`` unused).
    """

    data: PathLike | None
    held_out: float
    eval_tokens: int
    screen_tokens: int
    lazy: bool


class SearchInterrupted(KeyboardInterrupt):
    """Ctrl-C during a search; the best plan found so far was printed on stderr.

    Attributes:
        plan: that plan (None when nothing was scored yet).
        kl: its calibration KL.
        complete: True when it has the target depth (else it is a step on the way).
    """

    def __init__(self, plan: Plan | None, kl: float | None, complete: bool) -> None:
        super().__init__("search interrupted")
        self.plan = plan
        self.kl = kl
        self.complete = complete


@dataclass(frozen=True)
class ScoredCandidate:
    """One plan the search scored.

    Attributes:
        step: the greedy step (1 for the first removal); 1 for block and score.
        change: what it changes relative to the plan it extends (``drop 12``, ``merge [12-13]``,
            ``drop 20-23``, ``layer 7``).
        plan: the plan in range syntax.
        num_layers: its depth.
        kl: KL(original || plan) on all the calibration windows (None when not measured: a one-pass
            method, or screened out).
        score: the one-pass score (angular distance, Block Influence), when the method uses one.
        screen_kl: with screening, KL(original || plan) on the screening windows (None without).
    """

    step: int
    change: str
    plan: str
    num_layers: int
    kl: float | None
    score: float | None = None
    screen_kl: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"step": self.step, "change": self.change, "plan": self.plan, "num_layers": self.num_layers,
                "kl": self.kl, "score": self.score, "screen_kl": self.screen_kl}


@dataclass(frozen=True)
class SearchReport:
    """What :func:`search` chose and measured.

    Attributes:
        model: the model, described.
        method: ``greedy``, ``block`` or ``score``.
        beam: plans kept per greedy step.
        block_by: how ``block`` ranks blocks (``measured`` or ``angular``).
        allow_parallel: whether parallel groups were in the search space.
        source_layers: L.
        to_layers: N.
        plan: the chosen plan.
        calibration_kl: its KL on the calibration windows.
        candidates: every plan scored, in search order.
        trace: per step, the best plan kept.
        held_out: the chosen plan against the original on the held-out windows.
        data: the text set's name.
        calibration_windows: windows scored per candidate.
        held_out_windows: windows of the final measurement.
        seq_len: tokens per window.
        held_out_share: the share of the text held out (its end).
        seconds: wall time of the search (the final measurement excluded).
        parallel_best: with ``allow_parallel``, the best calibration KL of a final-depth plan with a
            group (None: none was scored); ``drop_best``: the same without a group.
        screen: candidates per step scored on all the calibration windows after the screening (0: no
            screening, every candidate scored on all of them).
        screen_windows: the windows every candidate was first scored on (0: no screening).
        lazy: lazy screening (``lazy`` of :class:`SearchOptions`): candidates whose last measured cost
            ruled them out were not screened (their ``screen_kl`` is None).
    """

    model: str
    method: str
    beam: int
    block_by: str
    allow_parallel: bool
    source_layers: int
    to_layers: int
    plan: Plan
    calibration_kl: float
    candidates: list[ScoredCandidate]
    trace: list[ScoredCandidate]
    held_out: Comparison
    data: str
    calibration_windows: int
    held_out_windows: int
    seq_len: int
    held_out_share: float
    seconds: float
    parallel_best: float | None = None
    drop_best: float | None = None
    screen: int = 0
    screen_windows: int = 0
    lazy: bool = False

    @property
    def screened(self) -> int:
        """Candidates scored on the screening windows."""
        return sum(1 for c in self.candidates if c.screen_kl is not None)

    @property
    def dropped(self) -> list[int]:
        """The source layers that no longer run (merged layers still run, inside their group)."""
        used = set(self.plan.source_sequence())
        return [i for i in range(self.source_layers) if i not in used]

    @property
    def parallel_won(self) -> bool | None:
        """With ``allow_parallel``: True when the chosen plan holds a parallel group (None without)."""
        return bool(self.plan.groups) if self.allow_parallel else None

    def describe_method(self) -> str:
        if self.method == "greedy":
            return f"greedy (beam {self.beam})"
        if self.method == "block":
            return f"block (by {'measured KL' if self.block_by == 'measured' else 'angular distance'})"
        return "score (Block Influence)"

    def format(self) -> str:
        """The plan and the search trace, as ``surgery prune --to-layers`` prints them."""
        lines = [
            f"search    {self.describe_method()}{', parallel groups allowed' if self.allow_parallel else ''}: "
            f"{self.source_layers} -> {self.to_layers} layers, {len(self.candidates)} candidates in {self.seconds:.1f} s",
            f"text      {self.data}: calibration {_windows(self.calibration_windows)}, held out "
            f"{_windows(self.held_out_windows)} (the last {self.held_out_share:.0%}), {self.seq_len} tokens each",
            *([f"screening {'lazily, ' if self.lazy else ''}{self._screened_text()} on {_windows(self.screen_windows)}, "
               f"the best {self.screen} of each step on all {self.calibration_windows}"] if self.screen_windows else []),
            f"{'step':>4}  {'layers':>6}  {'change':<16}{'calib. KL':>10}  plan",
        ]
        for row in self.trace:
            kl = "" if row.kl is None else f"{row.kl:.4f}"
            lines.append(f"{row.step:>4}  {row.num_layers:>6}  {row.change:<16}{kl:>10}  {row.plan}")
        c = self.held_out
        lines += [
            f"chosen    {self.plan} (drops {format_ranges(self.dropped) or 'nothing'}"
            f"{', groups ' + ', '.join(str(g) for g in self.plan.groups) if self.plan.groups else ''})",
            f"held out  KL {c.kl or 0:.4f}, top-1 {c.top1 or 0:.1%}, perplexity {c.ppl_new or 0:.2f} "
            f"(original {c.ppl_original or 0:.2f}); calibration KL {self.calibration_kl:.4f}",
        ]
        if self.allow_parallel:
            best_group = "none scored" if self.parallel_best is None else f"{self.parallel_best:.4f}"
            best_drop = "none scored" if self.drop_best is None else f"{self.drop_best:.4f}"
            verdict = "won" if self.parallel_won else "did not win"
            lines.append(f"parallel  a plan with a group {verdict} (best calibration KL with a group {best_group}, "
                         f"without {best_drop})")
        return "\n".join(lines)

    def _screened_text(self) -> str:
        if not self.lazy:
            return "every candidate"
        return f"{self.screened} of {len(self.candidates)} candidates"

    def to_dict(self) -> dict[str, Any]:
        """The ``search`` member of ``surgery prune --to-layers N --json``."""
        c = self.held_out
        return {
            "model": self.model, "method": self.method, "beam": self.beam, "block_by": self.block_by,
            "allow_parallel": self.allow_parallel, "source_layers": self.source_layers, "to_layers": self.to_layers,
            "plan": str(self.plan), "dropped": self.dropped, "groups": [str(g) for g in self.plan.groups],
            "calibration": {"windows": self.calibration_windows, "seq_len": self.seq_len, "kl": self.calibration_kl},
            "screening": None if not self.screen_windows else {"windows": self.screen_windows, "rescored": self.screen,
                                                               "lazy": self.lazy, "screened": self.screened},
            "held_out": {"windows": self.held_out_windows, "seq_len": self.seq_len, "share": self.held_out_share,
                         "kl": c.kl, "top1": c.top1, "ppl_original": c.ppl_original, "ppl_new": c.ppl_new,
                         "tokens": c.tokens},
            "data": self.data, "seconds": self.seconds,
            "parallel": None if not self.allow_parallel else {
                "won": self.parallel_won, "best_kl_with_group": self.parallel_best, "best_kl_without": self.drop_best},
            "trace": [row.to_dict() for row in self.trace],
            "candidates": [row.to_dict() for row in self.candidates],
        }


def _windows(count: int) -> str:
    return f"{count} window" if count == 1 else f"{count} windows"


def check_target(to_layers: object, num_layers: int, method: str, *, beam: int = 1, block_by: str = "measured",
                 allow_parallel: bool = False, screen: int | None = None) -> int:
    """Refuse a target depth or method that cannot be searched, before any model is loaded.

    Args:
        to_layers: N, the depth to reach.
        num_layers: L, the model's depth.
        method: ``greedy``, ``block`` or ``score``.
        beam: plans kept per greedy step.
        block_by: ``measured`` or ``angular``.
        allow_parallel: parallel groups in the search space.
        screen: candidates re-scored per step after the screening (None: the default).

    Returns:
        N.

    Raises:
        OptionError: N not a whole number from 1 to L - 1, an unknown method or ``block_by``, a beam
            below 1 or with another method than greedy, or ``allow_parallel`` with a method that
            cannot score a group (``score``, ``block`` by angular distance); ``screen`` not a whole
            number of at least 0, or with a method that measures no candidate.

    Example:
        >>> check_target(26, 30, "greedy")
        26
    """
    if method not in METHODS:
        raise OptionError(f"unknown search method {method!r}; choose one of {', '.join(METHODS)}")
    if block_by not in BLOCK_BY:
        raise OptionError(f"unknown block ranking {block_by!r}; choose one of {', '.join(BLOCK_BY)}")
    if isinstance(to_layers, bool) or not isinstance(to_layers, int) or not 1 <= to_layers < num_layers:
        raise OptionError(
            f"--to-layers must be a whole number from 1 to {num_layers - 1} for this model ({num_layers} layers), "
            f"got {to_layers!r}"
        )
    if isinstance(beam, bool) or not isinstance(beam, int) or beam < 1:
        raise OptionError(f"--beam must be a whole number of at least 1, got {beam!r}")
    if beam != 1 and method != "greedy":
        raise OptionError(f"--beam applies to --method greedy, not {method}")
    if allow_parallel and (method == "score" or (method == "block" and block_by == "angular")):
        raise OptionError(
            "--allow-parallel needs a method that measures a merged group: --method greedy, or block by measured KL",
            hint="drop --allow-parallel, or use --method greedy",
        )
    if screen is not None:
        if isinstance(screen, bool) or not isinstance(screen, int) or screen < 0:
            raise OptionError(f"--screen must be a whole number of at least 0, got {screen!r}")
        if method == "score" or (method == "block" and block_by == "angular"):
            raise OptionError("--screen applies to the methods that measure candidates: greedy, or block by measured KL")
    return to_layers


def split_windows(
    loaded: LoadedModel, texts: TextSet, settings: Settings, *, held_out: float, eval_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The text as calibration windows and held-out windows, from separate parts of it.

    The text is cut into windows of ``settings.seq_len`` tokens in order; the last ``held_out`` share
    of them is held out. Up to ``settings.max_tokens`` calibration tokens are drawn from the rest
    and up to ``eval_tokens`` held-out tokens from the held-out part (with ``settings.seed``).

    Args:
        loaded: the model (its tokenizer and context length).
        texts: the text set.
        settings: ``seq_len``, ``max_tokens`` and ``seed``.
        held_out: the share held out, between 0 and 1.
        eval_tokens: the held-out budget.

    Returns:
        ``(calibration, held_out)`` token id tensors, windows in text order.

    Raises:
        CheckpointError: the model has no tokenizer.
        DataError: the text gives fewer than two windows.

    Example:
        >>> calibration, held = split_windows(loaded, read_texts(None), Settings(), held_out=0.1, eval_tokens=4096)  # doctest: +SKIP
    """
    if loaded.tokenizer is None:
        raise CheckpointError(str(loaded.path), "has no tokenizer; the search needs one to read the text")
    seq_len = min(settings.seq_len, loaded.max_positions or settings.seq_len)
    every = token_windows(loaded.tokenizer, texts, seq_len=seq_len, max_tokens=1 << 40, seed=settings.seed)
    count = int(every.shape[0])
    if count < 2:
        raise DataError(texts.name, f"gives {count} window of {seq_len} tokens; the search needs two (calibration and held out)",
                        hint="give a longer text or a smaller --seq-len")
    held_count = min(count - 1, max(1, round(count * held_out)))
    pool, held = every[: count - held_count], every[count - held_count :]
    rng = random.Random(settings.seed)

    def draw(windows: torch.Tensor, budget: int) -> torch.Tensor:
        take = max(1, budget // seq_len)
        if windows.shape[0] <= take:
            return windows
        return windows[sorted(rng.sample(range(int(windows.shape[0])), take))]

    return draw(pool, settings.max_tokens), draw(held, eval_tokens)


# -- scoring: KL(original || plan) on the calibration windows, sharing each plan's prefix ----------------


def _unrolled(plan: Plan) -> list[Step]:
    return [step for _, step in plan.positions()]


def screening_order(count: int, screen_windows: int) -> list[int]:
    """The calibration windows in scoring order: first ``screen_windows`` of them spread evenly over all
    ``count`` (the screening windows), then the rest, each part in text order.

    Example:
        >>> screening_order(8, 2)
        [0, 4, 1, 2, 3, 5, 6, 7]
    """
    if not 0 < screen_windows < count:
        return list(range(count))
    first = [i * count // screen_windows for i in range(screen_windows)]
    chosen = set(first)
    return first + [i for i in range(count) if i not in chosen]


class _Scorer:
    """Scores plans by their calibration KL; a candidate runs only from its first change.

    ``base(plan)`` runs a plan once per batch and records the stream entering each of its
    positions; ``kl(base, candidate)`` runs ``candidate``'s positions from the first one that differs
    from ``base``, with that position's input taken from the record. With ``screen_windows``, the
    first batches hold that many windows spread over the calibration text, and
    ``kl(..., screening=True)`` scores on those batches alone; a later full score of the same plan
    reuses those batches' sums and runs only the others (summed in the same order: the same value).
    """

    def __init__(self, loaded: LoadedModel, arch: Architecture, windows: torch.Tensor, batch_size: int,
                 screen_windows: int = 0) -> None:
        import torch

        self.model = loaded.model
        self.arch = arch
        self.num_layers = loaded.num_layers
        self.identity = Plan(tuple(range(self.num_layers)), self.num_layers)
        device = input_device(loaded.model)
        parts, self.screen_windows, self.screen_batches = [windows], 0, 0
        if 0 < screen_windows < int(windows.shape[0]):  # the screening windows fill the first batches
            order = screening_order(int(windows.shape[0]), screen_windows)
            parts = [windows[order[:screen_windows]], windows[order[screen_windows:]]]
            self.screen_windows, self.screen_batches = screen_windows, len(parts[0].split(batch_size))
        self.batches = [batch.to(device) for part in parts for batch in part.split(batch_size)]
        self.references: list[_NextTokens] = []
        self.scratch = torch.empty(0)
        # plan -> per batch, the stream entering each position (None: a batch not recorded yet)
        self.recorded: dict[str, list[list[torch.Tensor] | None]] = {}
        self.screen_sums: dict[str, tuple[float, int]] = {}  # plan -> its screening batches' (KL sum, tokens)
        self.parents: dict[str, Plan] = {}  # plan -> the plan it was scored from (its record's prefix)
        self.forward_tokens = 0
        stack = self.model.get_submodule(arch.module_path)
        states: list[list[torch.Tensor] | None] = []
        with torch.inference_mode():
            for batch in self.batches:
                with residual_stream(stack) as recorded:
                    logits = self.model(input_ids=batch, use_cache=False).logits
                shape = (logits.shape[0], logits.shape[1] - 1, logits.shape[2])
                if self.scratch.shape != shape[1:]:
                    self.scratch = torch.empty(shape[1:], device=logits.device)
                self.references.append(_NextTokens.of(logits, batch, torch.empty(shape, device=logits.device)))
                states.append(list(recorded))
                self.forward_tokens += int(batch.numel())
        self.recorded[str(self.identity)] = states

    def base(self, plan: Plan) -> None:
        """Record the stream entering each position of ``plan`` (once per plan; batches a full
        score of ``plan`` recorded already are kept); when the plan it was scored from is still
        recorded, its positions before the first change are taken from that record and only the
        rest run."""
        key = str(plan)
        states = self.recorded.get(key)
        missing = [index for index, state in enumerate(states or [None] * len(self.batches)) if state is None]
        if not missing:
            return
        first, tail = 0, plan
        parent = self.parents.get(key)
        if parent is not None and str(parent) in self.recorded:
            first, tail = self._tail(parent, plan)
        filled: list[list[torch.Tensor] | None] = list(states) if states else [None] * len(self.batches)
        before = self.recorded[str(parent)] if first else None
        for index, _, stream in self._run_tail(tail, first, before, missing, record=True):
            filled[index] = stream
        self.recorded[key] = filled

    def drop_record(self, plan: Plan) -> None:
        """Free ``plan``'s record (a candidate the step will not keep)."""
        self.recorded.pop(str(plan), None)

    def forget(self, keep: list[Plan]) -> None:
        """Drop the records of every plan but ``keep`` (and the original's), and the screening sums."""
        wanted = {str(p) for p in keep} | {str(self.identity)}
        for key in [k for k in self.recorded if k not in wanted]:
            del self.recorded[key]
        self.screen_sums.clear()
        self.parents = {key: plan for key, plan in self.parents.items() if key in wanted}

    def _tail(self, base: Plan, candidate: Plan) -> tuple[int, Plan]:
        """The first position where ``candidate`` differs from ``base``, and ``candidate`` from there on
        (0 and all of it when the tail cannot run alone: a position-dependent setting)."""
        old, new = _unrolled(base), _unrolled(candidate)
        first = next((i for i, (a, b) in enumerate(zip(old, new, strict=False)) if a != b), min(len(old), len(new)))
        first = min(first, len(new) - 1)  # the last position at least runs, so the tail is a plan
        tail = Plan(tuple(new[first:]), self.num_layers)
        try:
            self.arch.check_plan(tail)
        except SurgeryError:
            return 0, candidate
        return first, tail

    def kl(self, base: Plan, candidate: Plan, *, screening: bool = False, record: bool = False) -> float:
        """KL(original || candidate) per token on the calibration windows (``screening``: on the screening
        windows only); ``base`` must be recorded. ``record`` (a full score): keep the stream of the
        batches it runs as ``candidate``'s record, so that recording it as a base later runs only the
        rest (:meth:`drop_record` when it is not needed)."""
        first, tail = self._tail(base, candidate)
        states = self.recorded[str(base)]
        key = str(candidate)
        self.parents[key] = base
        tally = _Tally()
        skip = 0
        if screening and self.screen_batches:
            stop = self.screen_batches
        else:
            stop = len(self.batches)
            if key in self.screen_sums:  # its screening batches are scored already: the same sums, in order
                tally.kl, tally.tokens = self.screen_sums[key]
                skip = self.screen_batches
        record = record and not (screening and self.screen_batches)
        states_of_candidate: list[list[torch.Tensor] | None] = [None] * len(self.batches)
        for index, output, stream in self._run_tail(tail, first, states, range(skip, stop), record=record):
            tally.add_causal(self.references[index], output.logits, self.scratch)
            states_of_candidate[index] = stream
        if record and key not in self.recorded:
            self.recorded[key] = states_of_candidate
        if screening and self.screen_batches:
            self.screen_sums[key] = (tally.kl, tally.tokens)
        return tally.kl / tally.tokens

    def _run_tail(self, tail: Plan, first: int, before: list[list[torch.Tensor] | None] | None, indices: Iterable[int],
                  *, record: bool) -> Iterator[tuple[int, Any, list[torch.Tensor] | None]]:
        """Run ``tail`` (a plan's positions from ``first`` on) on each batch of ``indices``, its input at
        ``first`` taken from ``before`` (the record of the plan it extends; unused when ``first`` is 0);
        yields each batch's index, the model's output and (``record``) the plan's whole stream on it."""
        import torch

        from surgery.view import plan_view

        with torch.inference_mode(), plan_view(self.model, tail) as model:
            stack = model.get_submodule(self.arch.module_path)
            for index in indices:
                prefix = before[index] if first and before is not None else None
                assert prefix is not None or not first  # base() fills every batch of a plan a tail extends
                recording: AbstractContextManager[list[torch.Tensor]] = (
                    residual_stream(stack) if record else nullcontext([]))
                with _entering(stack[0], prefix[first] if prefix is not None else None), recording as recorded:
                    output = model(input_ids=self.batches[index], use_cache=False)
                self.forward_tokens += int(self.batches[index].numel())
                yield index, output, _joined(prefix, first, recorded) if record else None


def _joined(prefix: list[torch.Tensor] | None, first: int, recorded: list[torch.Tensor]) -> list[torch.Tensor]:
    """A plan's stream on one batch: the plan it extends' record up to position ``first`` (None: no
    prefix, the tail ran from the start) and what its tail recorded after that. The parent's own
    tensor enters position ``first``: the same stream, whichever hook ran first."""
    return [*prefix[: first + 1], *recorded[1:]] if prefix is not None else list(recorded)


@contextmanager
def _entering(block: torch.nn.Module, state: torch.Tensor | None) -> Iterator[None]:
    """Replace the hidden states ``block`` is called with by ``state`` (None: leave them)."""
    if state is None:
        yield
        return

    def replace(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if "hidden_states" in kwargs:
            return args, {**kwargs, "hidden_states": state}
        return (state, *args[1:]), kwargs

    handle = block.register_forward_pre_hook(replace, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


# -- the search ------------------------------------------------------------------------------------------


class _Progress:
    """The progress bar (candidates scored, best so far) and the record the Ctrl-C message is taken from."""

    def __init__(self, quiet: bool, description: str, to_layers: int) -> None:
        from tqdm.auto import tqdm

        self.bar = tqdm(total=0, desc=description, unit="plan", disable=quiet, file=sys.stderr)
        self.to_layers = to_layers
        self.best: tuple[float, Plan] | None = None  # at the target depth
        self.partial: tuple[int, float, Plan] | None = None  # the lowest depth reached, and its best

    def expect(self, count: int) -> None:
        self.bar.total = (self.bar.total or 0) + count
        self.bar.refresh()

    def screened(self) -> None:
        """One candidate scored on the screening windows (counted, not a best: a different text)."""
        self.bar.update()

    def scored(self, plan: Plan, kl: float) -> None:
        depth = len(plan)
        if depth == self.to_layers and (self.best is None or kl < self.best[0]):
            self.best = (kl, plan)
        if self.partial is None or depth < self.partial[0] or (depth == self.partial[0] and kl < self.partial[1]):
            self.partial = (depth, kl, plan)
        shown = self.best[0] if self.best is not None else self.partial[1]
        self.bar.set_postfix_str(f"best KL {shown:.4f} at {self.partial[0] if self.best is None else depth} layers",
                                 refresh=False)
        self.bar.update()

    def interrupted(self) -> SearchInterrupted:
        """Print the best plan so far on stderr; the exception to raise."""
        self.bar.close()
        if self.best is not None:
            kl, plan = self.best
            sys.stderr.write(f"surgery: search interrupted; best plan found so far ({len(plan)} layers, "
                             f"calibration KL {kl:.4f}): {plan}\n")
            return SearchInterrupted(plan, kl, True)
        if self.partial is not None:
            depth, kl, plan = self.partial
            sys.stderr.write(f"surgery: search interrupted before reaching {self.to_layers} layers; best plan so far "
                             f"({depth} layers, calibration KL {kl:.4f}): {plan}\n")
            return SearchInterrupted(plan, kl, False)
        sys.stderr.write("surgery: search interrupted before any plan was scored\n")
        return SearchInterrupted(None, None, False)


def _same_kind(arch: Architecture, layers: tuple[int, ...]) -> bool:
    """True when ``layers`` agree in every per-layer setting (one mask per position: a group needs that)."""
    return all(len({repr(values[i]) for i in layers}) == 1 for values in arch.per_layer.values())


def _moves(arch: Architecture, plan: Plan, allow_parallel: bool) -> list[tuple[str, Plan]]:
    """The plans one layer shallower than ``plan``: each plain layer dropped, and (``allow_parallel``)
    each two adjacent steps of consecutive source layers merged into one group."""
    steps = list(plan.layers)
    moves: list[tuple[str, Plan]] = []
    for i, step in enumerate(steps):
        if isinstance(step, int) and len(steps) > 1:
            moves.append((f"drop {step}", Plan(tuple(steps[:i] + steps[i + 1 :]), plan.num_source_layers)))
    if allow_parallel:
        for i in range(len(steps) - 1):
            a, b = steps[i], steps[i + 1]
            left = a.layers if isinstance(a, ParallelGroup) else (a,)
            right = b.layers if isinstance(b, ParallelGroup) else (b,)
            layers = (*left, *right)
            if layers != tuple(range(layers[0], layers[0] + len(layers))) or not _same_kind(arch, layers):
                continue
            group = ParallelGroup(layers)
            moves.append((f"merge {group}", Plan(tuple(steps[:i] + [group] + steps[i + 2 :]), plan.num_source_layers)))
    return moves


def _allowed(arch: Architecture, plan: Plan) -> bool:
    try:
        arch.check_plan(plan)
    except SurgeryError:
        return False
    return True


Row = tuple[float, str, Plan, str]  # (kl, the plan as text, plan, change)


Entry = tuple[str, Plan, Plan]  # (change, plan, the plan it extends)


class _Lazy:
    """Lazy screening across greedy steps (Minoux's lazy greedy, on the screening KL).

    A change (``drop 14``, ``merge [12-13]``) costs about as much one step later as it did when it
    was last screened: its *increment*, the screening KL of the plan it makes minus that of the plan it
    extends. Each step, every entry gets a bound, the base's screening KL plus the change's last
    increment (unknown: minus infinity), and entries are taken from a heap lowest bound first: a
    stale entry is screened and pushed back with its fresh KL; a fresh entry at the top is taken.
    When an increment never shrinks from one step to the next (removing layers compounds), the
    shortlist equals the one screening every entry gives; when one shrinks, that change can be missed
    (the price of the speed). Only entries whose bound reaches the shortlist are screened.
    """

    def __init__(self, identity: Plan) -> None:
        self.increments: dict[str, float] = {}  # change -> its increment when last screened
        self.base_kl: dict[str, float] = {str(identity): 0.0}  # plan -> its screening KL
        self.last: dict[str, float] = {}  # the latest step's screening KLs

    def shortlist(self, scorer: _Scorer, progress: _Progress, entries: list[Entry], shortlist: int, plain_too: bool,
                  screen_kl: dict[str, float]) -> list[Entry]:
        """The ``shortlist`` entries of lowest screening KL (and, ``plain_too``, the ``shortlist`` lowest
        without a group), screening only what the bounds do not rule out; fills ``screen_kl``."""
        import heapq

        heap: list[tuple[float, bool, str, int]] = []
        for index, (change, plan, base) in enumerate(entries):
            base_kl = self.base_kl.get(str(base))
            increment = self.increments.get(change) if base_kl is not None else None
            heap.append((float("-inf") if increment is None or base_kl is None else base_kl + increment,
                         False, str(plan), index))
        heapq.heapify(heap)
        self.last = screen_kl
        best: list[Entry] = []
        plain = 0
        while heap and (len(best) < shortlist or (plain_too and plain < shortlist)):
            bound, fresh, text, index = heapq.heappop(heap)
            change, plan, base = entries[index]
            if not fresh:
                scorer.base(base)
                screen_kl[text] = kl = scorer.kl(base, plan, screening=True)
                progress.screened()
                base_kl = self.base_kl.get(str(base))
                if base_kl is not None:
                    self.increments[change] = kl - base_kl
                heapq.heappush(heap, (kl, True, text, index))
                continue
            if len(best) < shortlist or not plan.groups:  # past the shortlist, only plain plans are still wanted
                best.append(entries[index])
                plain += not plan.groups
        return best

    def kept(self, plans: list[Plan]) -> None:
        """Remember the screening KL of the plans the next step extends (from the latest step)."""
        for plan in plans:
            if str(plan) in self.last:
                self.base_kl[str(plan)] = self.last[str(plan)]


def _rank(scorer: _Scorer, progress: _Progress, step: int, entries: list[Entry], shortlist: int,
          plain_too: bool, candidates: list[ScoredCandidate], lazy: _Lazy | None = None, keep: int = 1) -> list[Row]:
    """Score ``entries`` (change, plan, the plan it extends) and append them to ``candidates``; returns
    the rows scored on all the calibration windows, lowest KL first.

    With screening (and more entries than ``shortlist``), every entry is first scored on the
    screening windows, and only the ``shortlist`` best of those (and, ``plain_too``, the best
    ``shortlist`` without a parallel group) on all the windows; with ``lazy``, only the entries
    :class:`_Lazy` cannot rule out are screened.
    """
    progress.expect(len(entries))
    screen_kl: dict[str, float] = {}
    chosen = entries
    if scorer.screen_batches and len(entries) > shortlist and lazy is not None:
        best = lazy.shortlist(scorer, progress, entries, shortlist, plain_too, screen_kl)
        chosen = [entry for entry in entries if entry in best]  # in search order
        progress.expect(len(chosen) - (len(entries) - len(screen_kl)))  # the unscreened ones never run
    elif scorer.screen_batches and len(entries) > shortlist:
        for _, plan, base in entries:
            scorer.base(base)
            screen_kl[str(plan)] = scorer.kl(base, plan, screening=True)
            progress.screened()
        order = sorted(entries, key=lambda entry: (screen_kl[str(entry[1])], str(entry[1])))
        best = order[:shortlist]
        if plain_too:
            best += [entry for entry in order if not entry[1].groups and entry not in best][: max(
                0, shortlist - sum(1 for entry in best if not entry[1].groups))]
        chosen = [entry for entry in entries if entry in best]  # in search order
        progress.expect(len(chosen))
    full: dict[str, float] = {}
    for _, plan, base in chosen:
        scorer.base(base)
        full[str(plan)] = kl = scorer.kl(base, plan, record=True)
        progress.scored(plan, kl)
        # a full score records the candidate's stream (the kept plan is then a base at a quarter of
        # the cost); only the plans the step can still keep hold on to theirs
        scored_now = _sorted_rows([(full[str(other)], str(other), other, change) for change, other, _ in chosen
                                  if str(other) in full])
        keepable = {str(p) for p in _kept(scored_now, keep, plain_too)}
        for _, text, candidate, _ in scored_now:
            if text not in keepable:
                scorer.drop_record(candidate)
    for change, plan, _ in entries:
        text = str(plan)
        candidates.append(ScoredCandidate(step, change, text, len(plan), full.get(text), screen_kl=screen_kl.get(text)))
    return _sorted_rows([(full[str(plan)], str(plan), plan, change) for change, plan, _ in chosen])


def _sorted_rows(rows: list[Row]) -> list[Row]:
    """``rows`` lowest KL first (ties: by the plan's text)."""
    return sorted(rows, key=lambda row: (row[0], row[1]))


def _kept(rows: list[Row], beam: int, plain_too: bool) -> list[Plan]:
    """The plans a step keeps from ``rows`` (sorted): the ``beam`` best and (``plain_too``) the ``beam``
    best without a group, when they are not among those."""
    kept = [plan for _, _, plan, _ in rows[:beam]]
    if plain_too:
        kept += [plan for _, _, plan, _ in [row for row in rows if not row[2].groups][:beam] if plan not in kept]
    return kept


def _greedy(scorer: _Scorer, arch: Architecture, to_layers: int, beam: int, allow_parallel: bool, screen: int,
            progress: _Progress, lazy: _Lazy | None = None,
            ) -> tuple[list[ScoredCandidate], list[ScoredCandidate], list[tuple[float, Plan]]]:
    """Remove one layer per step, keeping the ``beam`` lowest-KL plans (with screening, among the
    ``max(screen, beam)`` best on the screening windows; ``lazy``: screening only what
    :class:`_Lazy` cannot rule out); returns the candidates, the trace and the final step's
    ``(kl, plan)`` sorted.

    With ``allow_parallel``, the ``beam`` best plans without a group are kept too when they are not
    among the best: that plain line, extended by drops alone, is the search without groups that the
    result is compared with (whether parallel won); only the best plans are also extended by merges.
    """
    kept: list[Plan] = [scorer.identity]
    plain_line: set[str] = set()  # kept only as the plain line: extended by drops alone
    candidates: list[ScoredCandidate] = []
    trace: list[ScoredCandidate] = []
    ranked: list[tuple[float, Plan]] = []
    for step in range(1, scorer.num_layers - to_layers + 1):
        seen: dict[str, tuple[str, Plan, Plan]] = {}
        for base in kept:
            for change, plan in _moves(arch, base, allow_parallel and str(base) not in plain_line):
                if str(plan) not in seen and _allowed(arch, plan):
                    seen[str(plan)] = (change, plan, base)
        if not seen:
            raise OptionError(f"no plan of {len(kept[0]) - 1} layers can be reached from {kept[0]} on this model",
                              hint="choose another --to-layers or --method")
        entries = [entry for base in kept for entry in seen.values() if entry[2] is base]  # one base at a time
        scored = _rank(scorer, progress, step, entries, max(screen, beam), allow_parallel, candidates, lazy, beam)
        # with allow_parallel the best plain plans stay too: their line is the search without groups, to compare
        kept = _kept(scored, beam, allow_parallel)
        plain_line = {str(plan) for plan in kept[min(beam, len(scored)):]}
        if lazy is not None:
            lazy.kept(kept)
        best_kl, best_text, best_plan, best_change = scored[0]
        trace.append(ScoredCandidate(step, best_change, best_text, len(best_plan), best_kl))
        ranked = [(kl, plan) for kl, _, plan, _ in scored]
        if step < scorer.num_layers - to_layers:
            for plan in kept:  # recorded from the plans they extend, before those records go
                scorer.base(plan)
        scorer.forget(kept)
    return candidates, trace, ranked


def _block(scorer: _Scorer, arch: Architecture, to_layers: int, allow_parallel: bool, screen: int,
           progress: _Progress) -> tuple[list[ScoredCandidate], list[tuple[float, Plan]]]:
    """Every contiguous block of ``L - N`` layers dropped (and, ``allow_parallel``, every ``L - N + 1``
    consecutive layers merged), measured (with screening, the ``screen`` best of the screening on all
    the windows); returns the candidates and ``(kl, plan)`` sorted."""
    num_layers = scorer.num_layers
    size = num_layers - to_layers
    plans: list[tuple[str, Plan]] = []
    for start in range(num_layers - size + 1):
        spec = format_ranges(list(range(start, start + size)))
        plans.append((f"drop {spec}", Plan.drop(spec, num_layers)))
    if allow_parallel:
        for start in range(num_layers - size):
            layers = tuple(range(start, start + size + 1))
            if _same_kind(arch, layers):
                group = ParallelGroup(layers)
                steps = (*range(start), group, *range(start + size + 1, num_layers))
                plans.append((f"merge {group}", Plan(steps, num_layers)))
    plans = [(change, plan) for change, plan in plans if _allowed(arch, plan)]
    if not plans:
        raise OptionError(f"no contiguous block of {size} layers can be dropped from this model",
                          hint="choose another --to-layers, or --method greedy")
    candidates: list[ScoredCandidate] = []
    rows = _rank(scorer, progress, 1, [(change, plan, scorer.identity) for change, plan in plans], screen,
                 allow_parallel, candidates)
    return candidates, [(kl, plan) for kl, _, plan, _ in rows]


def _one_pass(loaded: LoadedModel, arch: Architecture, calibration: torch.Tensor, settings: Settings, method: str,
              to_layers: int) -> tuple[list[ScoredCandidate], Plan]:
    """``block`` by angular distance, or ``score`` by Block Influence: one pass over the calibration windows."""
    num_layers = loaded.num_layers
    size = num_layers - to_layers
    _, angular, influence = stream_statistics(loaded, calibration, settings, description=f"search ({method})")
    candidates: list[ScoredCandidate] = []
    if method == "block":
        distances = {start: angular[start][start + size] for start in range(num_layers - size + 1)}
        for start, distance in distances.items():
            spec = format_ranges(list(range(start, start + size)))
            candidates.append(ScoredCandidate(1, f"drop {spec}", str(Plan.drop(spec, num_layers)), to_layers, None, distance))
        order = sorted(distances, key=lambda s: (distances[s], s))
        allowed = [s for s in order if _allowed(arch, Plan.drop(format_ranges(list(range(s, s + size))), num_layers))]
        if not allowed:
            raise OptionError(f"no contiguous block of {size} layers can be dropped from this model",
                              hint="choose another --to-layers, or --method greedy")
        return candidates, Plan.drop(format_ranges(list(range(allowed[0], allowed[0] + size))), num_layers)
    for layer, bi in enumerate(influence):
        candidates.append(ScoredCandidate(1, f"layer {layer}", str(Plan.drop(str(layer), num_layers)),
                                          num_layers - 1, None, bi))
    lowest = sorted(sorted(range(num_layers), key=lambda i: (influence[i], i))[:size])
    plan = Plan.drop(format_ranges(lowest), num_layers)
    if not _allowed(arch, plan):
        raise OptionError(f"the {size} layers of lowest Block Influence ({format_ranges(lowest)}) cannot be dropped "
                          "from this model", hint="use --method greedy")
    return candidates, plan


def search(
    model: PathLike | None,
    to_layers: int,
    *,
    method: str = "greedy",
    beam: int = 1,
    block_by: str = "measured",
    allow_parallel: bool = False,
    screen: int | None = None,
    **options: Unpack[SearchOptions],
) -> SearchReport:
    """Search for the plan of ``to_layers`` layers that costs the least, on one copy of the weights.

    Args:
        model: a model directory, ``.gguf`` file, Hub id, or None for the default.
        to_layers: N, the depth to reach (1 to L - 1).
        method: ``greedy`` (default), ``block`` or ``score`` (see the module's description).
        beam: plans kept per greedy step (default 1).
        block_by: how ``block`` ranks blocks: ``measured`` KL (default) or ``angular`` distance.
        allow_parallel: the search may merge consecutive layers into a parallel group.
        screen: greedy and measured block: every candidate is first scored on ``screen_tokens`` of
            the calibration tokens (default 1024), and the ``screen`` best of a step (default 4; at
            least ``beam``) on all of them; 0 scores every candidate on all of them.
        **options: see :class:`SearchOptions`.

    Returns:
        The :class:`SearchReport`: the plan, every candidate scored, and the held-out measurement.

    Raises:
        OptionError: a bad N, method, beam, screen or option (see :func:`check_target`), or no plan
            of N layers that this model can run.
        UnsupportedArchitectureError: an encoder (the search scores next-token distributions).
        DataError: an unreadable text, or one too short for a calibration and a held-out window.
        ModelNotFoundError: MODEL does not exist.
        CheckpointError: a weights file, index or config that cannot be read, or no tokenizer.
        SearchInterrupted: Ctrl-C; the best plan so far was printed on stderr.

    Example:
        >>> report = search(None, 26, method="greedy")  # doctest: +SKIP
        >>> print(report.plan, report.held_out.kl)  # doctest: +SKIP
    """
    from surgery.view import live_architecture

    measure: dict[str, Any] = {"max_tokens": CALIBRATION_TOKENS, "prompts": 0}
    own = ("data", "held_out", "eval_tokens", "screen_tokens", "lazy")
    measure.update({k: v for k, v in options.items() if k not in own and v is not None})
    settings = Settings.from_options(measure)  # type: ignore[arg-type]  # the keys of MeasureOptions
    held_share = options.get("held_out", 0.1)
    if isinstance(held_share, bool) or not isinstance(held_share, (int, float)) or not 0 < held_share < 1:
        raise OptionError(f"held-out must be a share between 0 and 1, got {held_share!r}")
    eval_tokens = options.get("eval_tokens", 4096)
    if isinstance(eval_tokens, bool) or not isinstance(eval_tokens, int) or eval_tokens < 1:
        raise OptionError(f"eval-tokens must be a whole number of at least 1, got {eval_tokens!r}")
    screen_tokens = options.get("screen_tokens", SCREEN_TOKENS)
    if isinstance(screen_tokens, bool) or not isinstance(screen_tokens, int) or screen_tokens < 1:
        raise OptionError(f"screen-tokens must be a whole number of at least 1, got {screen_tokens!r}")
    lazy = options.get("lazy") or False
    if not isinstance(lazy, bool):
        raise OptionError(f"lazy must be True or False, got {lazy!r}")
    if lazy and (method != "greedy" or screen == 0):
        raise OptionError("--lazy applies to --method greedy with screening (not --screen 0)")
    texts = read_texts(options.get("data"), text_field=settings.text_field)
    loaded = load_model(model, settings)
    check_target(to_layers, loaded.num_layers, method, beam=beam, block_by=block_by, allow_parallel=allow_parallel,
                 screen=screen)
    shortlist = SCREEN if screen is None else screen
    if not loaded.causal:
        raise UnsupportedArchitectureError(
            type(loaded.model).__name__, "the search scores plans by the KL of next-token distributions: causal LMs only",
            hint="choose the layers with surgery analyze and prune with --drop",
        )
    arch = live_architecture(loaded.model)
    calibration, held = split_windows(loaded, texts, settings, held_out=float(held_share), eval_tokens=eval_tokens)
    screen_windows = max(1, screen_tokens // int(calibration.shape[1])) if shortlist else 0
    progress = _Progress(settings.quiet, f"search ({method})", to_layers)
    start = time.perf_counter()
    parallel_best = drop_best = None
    try:
        if method == "greedy" or (method == "block" and block_by == "measured"):
            scorer = _Scorer(loaded, arch, calibration, settings.batch_size, screen_windows)
            if method == "greedy":
                lazy_state = _Lazy(scorer.identity) if lazy else None
                candidates, trace, ranked = _greedy(scorer, arch, to_layers, beam, allow_parallel, shortlist, progress,
                                                    lazy_state)
            else:
                candidates, ranked = _block(scorer, arch, to_layers, allow_parallel, shortlist, progress)
                trace = [next(c for c in candidates if c.plan == str(ranked[0][1]))]
            calibration_kl, plan = ranked[0]
            if allow_parallel:
                parallel_best = min((kl for kl, p in ranked if p.groups), default=None)
                drop_best = min((kl for kl, p in ranked if not p.groups), default=None)
        else:
            candidates, plan = _one_pass(loaded, arch, calibration, settings, method, to_layers)
            scorer = _Scorer(loaded, arch, calibration, settings.batch_size)
            calibration_kl = scorer.kl(scorer.identity, plan)
            progress.scored(plan, calibration_kl)
            chosen = next((c for c in candidates if c.plan == str(plan)), None)  # block: its row
            trace = [ScoredCandidate(1, chosen.change if chosen else f"drop {format_ranges(_dropped(plan))}",
                                     str(plan), len(plan), calibration_kl, chosen.score if chosen else None)]
    except KeyboardInterrupt:
        raise progress.interrupted() from None
    finally:
        progress.bar.close()
    seconds = time.perf_counter() - start
    screened = scorer.screen_windows  # 0: no screening (a one-pass method, or too few windows)
    del scorer  # the recorded streams: freed before the final measurement
    measurement = compare(
        loaded.model, [Candidate.of_plan(loaded.model, plan)], held, causal=True, batch_size=settings.batch_size,
        quiet=settings.quiet, description="held out",
    )
    return SearchReport(
        model=loaded.describe(), method=method, beam=beam, block_by=block_by, allow_parallel=allow_parallel,
        source_layers=loaded.num_layers, to_layers=to_layers, plan=plan, calibration_kl=calibration_kl,
        candidates=candidates, trace=trace, held_out=measurement.comparisons[0], data=texts.name,
        calibration_windows=int(calibration.shape[0]), held_out_windows=int(held.shape[0]),
        seq_len=int(calibration.shape[1]), held_out_share=float(held_share), seconds=seconds,
        parallel_best=parallel_best, drop_best=drop_best, screen=max(shortlist, beam) if screened else 0,
        screen_windows=screened, lazy=lazy and bool(screened),
    )


def _dropped(plan: Plan) -> list[int]:
    used = set(plan.source_sequence())
    return [i for i in range(plan.num_source_layers) if i not in used]

