"""Heal: train a rewritten model to match its original again, by distillation, into a physical checkpoint.

ORIGINAL is the teacher and NEW (an output of this tool) the student. The text is cut into token
windows and split in text order: the first part trains, the last part (``held_out``) only measures.
The teacher's next-token distribution on every training window is computed once and kept as its
top-k probabilities plus the mass of every other token as one bucket; each step minimises the KL of
teacher and student over those k + 1 outcomes (see :func:`_distill_loss`) over a batch.

Before training, each cut is bridged in closed form (``init="linear"``, after ReplaceMe, Shopkhoev et
al. 2025): the block before the cut ends in a linear layer whose output is added to the residual
stream; a least-squares map T from that output to what the original's stream holds where the plan
resumes is folded into that layer's weight (W <- T^T W), so the rewritten model starts close to the
original without a step of training. Whether a block ends that way is read from the model itself
(doubling the last linear output must change the block's output by exactly that output); a block
that normalises after it (Gemma 3) is left as it is.

What trains: LoRA adapters (``peft``) on every linear layer of the blocks around each cut of the
plan (``layers``), optionally whole blocks (``full_layers``). The adapters are merged into the
weights before writing, so OUT loads with stock transformers, without peft. OUT is NEW with the
trained tensors replaced (same shards, dtype, config, tokenizer and shipped code), plus the heal
recipe and the before/after measurement (``surgery-heal.json``, and a section of the card).

The training loop runs through ``accelerate`` (one process here; ``accelerate launch`` spreads it
over processes, each taking every n-th batch), and is deterministic on CPU for a given seed and
``steps`` (a time budget stops at a step boundary, so the step count then depends on speed).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exporters.safetensors import ComputedSource, OutputTensor, write_shards
from exporters.staging import check_output, staged_output
from surgery.checkpoint import read_header, read_index
from surgery.corpus import TextSet, read_texts, token_windows
from surgery.errors import DataError, OptionError, PlanError
from surgery.loading import LoadedModel, Settings, check_comparable, load_model
from surgery.metrics import Candidate, Comparison, compare
from surgery.modeling_wide import code_status
from surgery.plan import RECIPE_FILENAME, Plan, Recipe, format_ranges, parse_ranges
from surgery.source import open_source

if TYPE_CHECKING:
    import torch

    from surgery.report import ValidationReport

HEAL_FILENAME = "surgery-heal.json"
CARD_FILENAME = "README.md"
# Blocks on each side of a cut that get adapters by default.
DEFAULT_REACH = 3
INITS = ("linear", "none")
# Most training windows the closed-form bridge of a cut is fitted on (256 tokens each: 32k tokens
# for a 576 x 576 map; more changed the held-out KL by under 1%).
INIT_WINDOWS = 128
# Most validation windows (5% of the training text) that decide whether training is kept.
VALIDATION_WINDOWS = 16
HEAL_SECTION = "## Healing"


@dataclass(frozen=True)
class HealSettings:
    """The training recipe (recorded in the output so the result can be reproduced).

    Attributes:
        steps: most optimiser steps.
        max_minutes: wall-clock budget of the training loop (None: only ``steps`` bounds it).
        rank: LoRA rank.
        alpha: LoRA alpha (the adapter's scale is alpha / rank).
        lr: peak learning rate (linear warm-up over the first 5% of steps, cosine decay to 10%).
        layers: NEW's block positions that get LoRA adapters; None for the blocks around each cut.
        full_layers: NEW's block positions trained in full (every parameter).
        batch_size: windows per step.
        seq_len: tokens per window.
        held_out: the share of the text (its end) kept for measuring.
        eval_tokens: most held-out tokens measured before and after.
        top_k: teacher probabilities kept per position.
        seed: which batches, in which order, and the adapters' initialisation.
        init: ``linear`` bridges each cut in closed form before training (see the module docstring);
            ``none`` starts from NEW as it is.
        select: keep the trained weights only when they lower the KL on validation windows (the
            training text's last 5%, not trained on); False writes them whatever it measures.
    """

    steps: int = 1000
    max_minutes: float | None = 15.0
    rank: int = 16
    alpha: int = 32
    lr: float = 5e-4
    layers: tuple[int, ...] | None = None
    full_layers: tuple[int, ...] = ()
    batch_size: int = 2
    seq_len: int = 256
    held_out: float = 0.1
    eval_tokens: int = 8192
    top_k: int = 64
    seed: int = 0
    init: str = "linear"
    select: bool = True

    def check(self) -> None:
        """Refuse values that cannot train.

        Raises:
            OptionError: naming the option.
        """
        def whole(name: str, value: object, low: int, high: int) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise OptionError(f"{name} must be a whole number from {low} to {high:,}, got {value!r}")

        whole("steps", self.steps, 1, 10_000_000)
        whole("rank", self.rank, 1, 4096)
        whole("alpha", self.alpha, 1, 1_000_000)
        whole("batch-size", self.batch_size, 1, 65_536)
        whole("seq-len", self.seq_len, 8, 1_048_576)
        whole("eval-tokens", self.eval_tokens, 8, 1_000_000_000)
        whole("top-k", self.top_k, 1, 1_000_000)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise OptionError(f"seed must be a whole number, got {self.seed!r}")
        if self.max_minutes is not None and not (isinstance(self.max_minutes, (int, float)) and 0 < self.max_minutes < 1e6):
            raise OptionError(f"max-minutes must be a positive number, got {self.max_minutes!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise OptionError(f"lr must be a positive number, got {self.lr!r}")
        if not (isinstance(self.held_out, (int, float)) and 0 < self.held_out < 1):
            raise OptionError(f"held-out must be a share between 0 and 1, got {self.held_out!r}")
        if not isinstance(self.select, bool):
            raise OptionError(f"select must be True or False, got {self.select!r}")
        if self.init not in INITS:
            raise OptionError(f"init must be one of {', '.join(INITS)}, got {self.init!r}")


@dataclass(frozen=True)
class HealReport:
    """What :func:`heal` did and measured.

    Attributes:
        out: the healed checkpoint (None with ``dry_run``).
        original: how the original is named.
        new: how NEW is named.
        data: the text's name.
        settings: the training recipe.
        adapter_layers: NEW's positions that got LoRA adapters.
        full_layers: NEW's positions trained in full.
        trainable_params: parameters trained.
        train_windows: training windows (of ``settings.seq_len`` tokens).
        held_out_windows: held-out windows measured.
        steps: optimiser steps taken.
        stopped: why training stopped: ``steps``, ``time`` or ``interrupted``.
        seconds: training time.
        losses: the training loss (KL on the batch, nats) every step.
        before: NEW against ORIGINAL on the held-out windows, before training.
        after: the healed model against ORIGINAL on the same windows.
        init_layers: NEW's blocks whose last linear layer got the closed-form bridge.
        init_note: why a cut got no bridge (empty when every cut got one).
        after_init: the bridged model against ORIGINAL on the held-out windows (None without a bridge).
        init_seconds: time spent fitting the bridges (counted in the ``max_minutes`` budget).
        validation_windows: training-text windows (its last 5%, at most 16, not trained on) that
            decide whether training is kept (0: too little text to spare them; training is kept).
        validation_kl_start: their KL before training (after the bridge).
        validation_kl_trained: their KL after training.
        kept: ``trained``, or ``start`` when training did not lower the validation KL and the
            weights training started from (NEW, bridged) were written instead.
        held_out_text: the held-out windows measured, decoded back to text (what ``heal --validate``
            measures OUT on, as text the training never saw).
        validation: the :func:`surgery.validate` report of OUT against ORIGINAL on ``held_out_text``
            (``validate=True`` only; recorded in OUT's card).
    """

    out: Path | None
    original: str
    new: str
    data: str
    settings: HealSettings
    adapter_layers: tuple[int, ...]
    full_layers: tuple[int, ...]
    trainable_params: int
    train_windows: int
    held_out_windows: int
    steps: int
    stopped: str
    seconds: float
    losses: tuple[float, ...]
    before: Comparison
    after: Comparison
    init_layers: tuple[int, ...] = ()
    init_note: str = ""
    after_init: Comparison | None = None
    init_seconds: float = 0.0
    validation_windows: int = 0
    validation_kl_start: float | None = None
    validation_kl_trained: float | None = None
    kept: str = "trained"
    held_out_text: str = field(default="", repr=False, compare=False)
    validation: ValidationReport | None = None

    @property
    def kl_ratio(self) -> float | None:
        """Held-out KL after / before (lower is better)."""
        if self.before.kl is None or self.after.kl is None or self.before.kl == 0:
            return None
        return self.after.kl / self.before.kl

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready (``--json`` and ``surgery-heal.json``)."""
        return {
            "out": str(self.out) if self.out else None,
            "original": self.original,
            "new": self.new,
            "data": self.data,
            "recipe": dataclasses.asdict(self.settings),
            "adapter_layers": list(self.adapter_layers),
            "full_layers": list(self.full_layers),
            "trainable_params": self.trainable_params,
            "train_windows": self.train_windows,
            "held_out_windows": self.held_out_windows,
            "steps": self.steps,
            "stopped": self.stopped,
            "seconds": round(self.seconds, 1),
            "loss_first": self.losses[0] if self.losses else None,
            "loss_last": self.losses[-1] if self.losses else None,
            "init_layers": list(self.init_layers),
            "init_note": self.init_note,
            "init_seconds": round(self.init_seconds, 1),
            "before": self.before.to_dict(),
            "after_init": self.after_init.to_dict() if self.after_init is not None else None,
            "after": self.after.to_dict(),
            "validation_windows": self.validation_windows,
            "validation_kl_start": self.validation_kl_start,
            "validation_kl_trained": self.validation_kl_trained,
            "kept": self.kept,
            "kl_ratio": self.kl_ratio,
            "validation": self.validation.to_dict() if self.validation is not None else None,
        }

    def table(self) -> str:
        """Before/after on the held-out text, as a Markdown table (with the bridged model between them when there is one)."""
        stages = [self.before, *([self.after_init] if self.after_init is not None else []), self.after]
        rows = [
            ("KL(original ‖ model), nats", [c.kl for c in stages], "{:.4f}"),
            ("top-1 agreement", [c.top1 for c in stages], "{:.1%}"),
            ("perplexity", [c.ppl_new for c in stages], "{:.2f}"),
        ]
        heads = ["before healing", *(["bridged (no training)"] if self.after_init is not None else []), "after healing"]
        lines = [f"| held-out | original | {' | '.join(heads)} |", "|---" * (len(heads) + 2) + "|"]
        for name, values, fmt in rows:
            if any(v is None for v in values):
                continue
            original = {"perplexity": self.before.ppl_original, "top-1 agreement": 1.0}.get(name, 0.0)
            shown = fmt.format(original) if original is not None else "—"
            lines.append(f"| {name} | {shown} | {' | '.join(fmt.format(v) for v in values)} |")
        return "\n".join(lines)

    def format(self) -> str:
        """What the CLI prints."""
        s = self.settings
        lines = [
            f"healed {self.new} against {self.original}",
            f"text: {self.data}: {self.train_windows} training windows, {self.held_out_windows} held-out "
            f"({s.seq_len} tokens each; the last {s.held_out:.0%} of the text is held out)",
            f"trained: LoRA rank {s.rank} on blocks {format_ranges(self.adapter_layers) or '-'}"
            + (f", full blocks {format_ranges(self.full_layers)}" if self.full_layers else "")
            + f" ({self.trainable_params:,} parameters), lr {s.lr:g}, batch {s.batch_size}, seed {s.seed}",
            f"bridge: {self._bridge_text()}",
            f"steps: {self.steps} in {self.seconds / 60:.1f} min (stopped by {self.stopped})",
            f"kept: {self._kept_text()}",
            self.table(),
        ]
        if self.kl_ratio is not None:
            lines.append(f"held-out KL after / before: {self.kl_ratio:.3f}")
        lines.append(f"wrote {self.out}" if self.out else "nothing written")
        if self.validation is not None:
            lines += ["", self.validation.format()]
        return "\n".join(lines)

    def _kept_text(self) -> str:
        if not self.settings.select:
            return "the trained weights (no selection)"
        if self.validation_kl_start is None or self.validation_kl_trained is None:
            return "the trained weights (too little text to spare validation windows)"
        figures = f"validation KL {self.validation_kl_start:.4f} -> {self.validation_kl_trained:.4f} on {self.validation_windows} windows"
        if self.kept == "start":
            start = "the bridged weights" if self.init_layers else "NEW's weights"
            return f"{start}: training did not lower the validation KL ({figures})"
        return f"the trained weights ({figures})"

    def _bridge_text(self) -> str:
        if self.settings.init == "none":
            return "none (init none)"
        done = (f"closed-form least-squares map folded into the last linear layer of block(s) "
                f"{format_ranges(self.init_layers)} ({self.init_seconds:.0f} s)") if self.init_layers else "none"
        return done + (f"; {self.init_note}" if self.init_note else "")

    def card_section(self) -> str:
        """The model card's section: the recipe and the table, so the result can be reproduced."""
        s = self.settings
        layers = format_ranges(self.adapter_layers) or "none"
        full = format_ranges(self.full_layers) or "none"
        minutes = f"{s.max_minutes:g}" if s.max_minutes is not None else "none"
        return "\n".join([
            HEAL_SECTION,
            "",
            "After the surgery, this model was trained to match the original's next-token distribution "
            "(distillation: KL(original ‖ model) on the original's top-"
            f"{s.top_k} probabilities and the rest of the vocabulary as one bucket) with LoRA adapters, merged into the weights. No PEFT is needed to load it.",
            "",
            f"- text: {self.data}; the first {1 - s.held_out:.0%} trains ({self.train_windows} windows of {s.seq_len} tokens), "
            f"the last {s.held_out:.0%} is held out ({self.held_out_windows} windows measured)",
            f"- bridge before training: {self._bridge_text()}",
            f"- kept: {self._kept_text()}",
            f"- LoRA rank {s.rank}, alpha {s.alpha}, on blocks {layers}; full blocks: {full}; "
            f"{self.trainable_params:,} parameters trained",
            f"- {self.steps} steps (at most {s.steps}, budget {minutes} min; stopped by {self.stopped}) in "
            f"{self.seconds / 60:.1f} min, AdamW lr {s.lr:g} (warm-up, cosine), batch {s.batch_size}, seed {s.seed}",
            f"- the full recipe and figures: `{HEAL_FILENAME}`",
            "",
            self.table(),
            "",
        ])


def cut_positions(plan: Plan) -> list[int]:
    """NEW's positions whose input the plan changed: where a layer does not follow its predecessor,
    position 0 when the first layers were dropped, and ``len(plan)`` (the final norm's input) when the last were.

    Example:
        >>> cut_positions(Plan.drop("13-16", 30))
        [13]
        >>> cut_positions(Plan.repeat("4-5", 2, 8))
        [6]
        >>> cut_positions(Plan.drop("0-1,8-9", 10))
        [0, 6]
    """
    mapping = [source for _, source in plan.mapping()]
    cuts = [j for j in range(1, len(mapping)) if mapping[j] != mapping[j - 1] + 1]
    if mapping and mapping[0] != 0:
        cuts.insert(0, 0)
    if mapping and mapping[-1] != plan.num_source_layers - 1:
        cuts.append(len(mapping))
    return cuts


def default_layers(plan: Plan | None, num_layers: int, reach: int = DEFAULT_REACH) -> tuple[int, ...]:
    """The blocks around each cut (``reach`` on each side); every block when the plan has no cut.

    Example:
        >>> default_layers(Plan.drop("13-16", 30), 26)
        (10, 11, 12, 13, 14, 15)
    """
    cuts = cut_positions(plan) if plan is not None and not plan.groups else []
    if not cuts:
        return tuple(range(num_layers))
    chosen = {j for cut in cuts for j in range(max(0, cut - reach), min(num_layers, cut + reach))}
    return tuple(sorted(chosen))


def _stack(model: Any) -> tuple[str, Any]:
    """The module path and ModuleList of the model's block stack (the ModuleList with most parameters)."""
    import torch

    best: tuple[int, str, Any] | None = None
    for path, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > best[0]:
                best = (size, path, module)
    if best is None:
        raise PlanError(f"{type(model).__name__} has no stack of blocks to heal")
    return best[1], best[2]


def _teacher_targets(
    teacher: Any, windows: torch.Tensor, top_k: int, batch_size: int, quiet: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """The teacher's top-k next-token probabilities (as they are, not renormalised: the rest of the
    mass is the tail bucket of :func:`_distill_loss`) and their token ids, per position."""
    import torch
    from tqdm.auto import tqdm

    probs, ids = [], []
    with torch.no_grad(), tqdm(total=len(windows), desc="teacher", unit="window", disable=quiet, file=sys.stderr) as bar:
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size]
            logits = teacher(input_ids=batch).logits.float()
            p = torch.softmax(logits, dim=-1)
            values, indices = p.topk(top_k, dim=-1)
            probs.append(values)
            ids.append(indices.to(torch.int32))
            bar.update(len(batch))
    return torch.cat(probs), torch.cat(ids)


def _distill_loss(logits: torch.Tensor, probs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Mean over positions of KL(teacher || student) over the teacher's top-k tokens plus one bucket
    for every other token (the teacher's remaining mass against the student's).

    Why the bucket: a loss on the top-k alone, renormalised, is minimised by a student that puts no
    mass outside the top k, sharper than the teacher; on SmolLM2 that raised the held-out KL on the
    full vocabulary while the training loss fell. With the bucket the loss is the KL of the two
    distributions coarsened to k + 1 outcomes: at most the full KL, and zero only when the student
    matches the teacher's tail mass too.
    """
    import torch

    logits = logits.float()
    log_norm = torch.logsumexp(logits, dim=-1, keepdim=True)
    log_q = logits.gather(-1, ids.long()) - log_norm
    head = (probs * (torch.log(probs.clamp_min(1e-12)) - log_q)).sum(-1)
    if ids.shape[-1] >= logits.shape[-1]:  # every token kept: no tail
        return head.mean()
    # The student's log-mass outside the teacher's top k, computed from the logits (not 1 - sum q,
    # which cancels catastrophically when the top k hold nearly all the mass).
    log_q_tail = torch.logsumexp(logits.scatter(-1, ids.long(), float("-inf")), dim=-1, keepdim=True) - log_norm
    p_tail = (1.0 - probs.sum(-1, keepdim=True)).clamp_min(0.0)
    tail = (p_tail * (torch.log(p_tail.clamp_min(1e-12)) - log_q_tail)).squeeze(-1)
    return (head + tail).mean()


@contextmanager
def _first_interrupt_stops() -> Iterator[dict[str, bool]]:
    """Within the block, a first Ctrl-C sets ``flag["stop"]`` (training ends at the step boundary and
    the model trained so far is measured and written); a second one raises KeyboardInterrupt (nothing written)."""
    flag = {"stop": False}
    try:
        previous = signal.getsignal(signal.SIGINT)
    except ValueError:  # not the main thread: no handler can be installed
        yield flag
        return
    if previous == signal.SIG_IGN:  # started with Ctrl-C ignored (a background job, nohup): keep ignoring it
        yield flag
        return

    def handler(signum: int, frame: object) -> None:
        if flag["stop"]:
            raise KeyboardInterrupt
        flag["stop"] = True
        sys.stderr.write("\nsurgery: stopping after this step (Ctrl-C again to abort and write nothing)\n")

    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def _lr_factor(step: int, total: int) -> float:
    """Linear warm-up over 5% of the steps, then cosine decay to 10% of the peak."""
    warmup = max(1, total // 20)
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def _new_plan(new_dir: Path) -> Plan | None:
    """NEW's plan against its source, from its recipe (None when it has none)."""
    if not (new_dir / RECIPE_FILENAME).is_file():
        return None
    return Recipe.load(new_dir / RECIPE_FILENAME).plan


def heal_checkpoint(
    original: str | os.PathLike[str] | None,
    new: str | os.PathLike[str],
    out: str | os.PathLike[str] | None,
    *,
    data: str | os.PathLike[str] | None = None,
    heal_settings: HealSettings | None = None,
    measure: Settings | None = None,
    force: bool = False,
    dry_run: bool = False,
) -> HealReport:
    """Train NEW (an output of this tool) to match ORIGINAL on a text, and write the healed checkpoint.

    Args:
        original: the source model NEW was made from (directory, ``.gguf``, Hub id, None for the default).
        new: an output directory of this tool (it holds ``surgery-recipe.yaml``).
        out: where to write the healed model (None only with ``dry_run``).
        data: a ``.txt``/``.jsonl`` file; None for the default corpus (Hamlet).
        heal_settings: the training recipe (:class:`HealSettings`; defaults when None).
        measure: device, dtype and loading permissions (:class:`~surgery.loading.Settings`).
        force: replace an existing ``out`` (only once the new one is complete).
        dry_run: train and measure, but write nothing.

    Returns:
        The :class:`HealReport`.

    Raises:
        OptionError: a bad training option.
        PlanError: NEW is not an output of this tool made from a model with ORIGINAL's layer count,
            or a layer position outside NEW.
        TokenizerMismatchError: ORIGINAL and NEW have different vocabularies or tokenizers.
        DataError: a text too short to give a training and a held-out window.
        OutputExistsError: ``out`` exists and ``force`` is False.

    Example:
        >>> report = heal_checkpoint(None, "out/smol-26", "out/smol-26-healed", heal_settings=HealSettings(steps=100))  # doctest: +SKIP
        >>> report.kl_ratio < 0.5  # doctest: +SKIP
        True
    """
    hs = heal_settings or HealSettings()
    hs.check()
    settings = measure or Settings()
    if out is None and not dry_run:
        raise OptionError("give OUT, or dry_run to train and measure without writing")
    new_source = open_source(new, quiet=settings.quiet)
    out_path = Path(out) if out is not None else None
    if out_path is not None and not dry_run:
        check_output(out_path, force=force, protected=new_source.protected_paths())
    plan = _new_plan(new_source.path)
    if plan is None:
        raise PlanError(f"{new}: has no {RECIPE_FILENAME}; heal takes an output of this tool (prune, repeat, ...) as NEW")
    texts = read_texts(data, text_field=settings.text_field)

    teacher = load_model(original, settings)
    if teacher.num_layers != plan.num_source_layers:
        raise PlanError(
            f"NEW was made from a model with {plan.num_source_layers} layers, but ORIGINAL has {teacher.num_layers}: "
            "pass the model NEW was made from"
        )
    status = code_status(new_source.path)
    # A wide-block output runs the modelling code this tool shipped into it: trusted when it is exactly this installation's.
    student_settings = dataclasses.replace(
        settings, trust_remote_code=settings.trust_remote_code or bool(status is not None and status.current),
        dtype="fp32",  # trained in fp32; written back in NEW's stored dtype
    )
    student = load_model(new_source.path, student_settings)
    check_comparable(teacher, student)
    if not teacher.causal:
        raise PlanError(f"{type(student.model).__name__} is an encoder; heal distils next-token distributions of causal LMs")

    train, held = _split_windows(teacher, texts, hs)
    stack_path, stack = _stack(student.model)
    num_blocks = len(stack)
    adapter_layers = hs.layers if hs.layers is not None else default_layers(plan, num_blocks)
    for name, positions in (("layers", adapter_layers), ("full-layers", hs.full_layers)):
        bad = [j for j in positions if not 0 <= j < num_blocks]
        if bad:
            raise PlanError(f"{name}: NEW has blocks 0-{num_blocks - 1}; {bad[0]} is not one of them")
    adapter_layers = tuple(j for j in adapter_layers if j not in set(hs.full_layers))

    reference = teacher.model
    before = _measure(reference, student.model, held, settings, "before")
    init_layers: tuple[int, ...] = ()
    init_note, init_seconds, after_init = "", 0.0, None
    if hs.init == "linear":
        started = time.perf_counter()
        init_layers, init_note = _bridge_cuts(reference, student.model, plan, train[:INIT_WINDOWS], settings.batch_size, settings.quiet)
        init_seconds = time.perf_counter() - started
        if init_layers:
            after_init = _measure(reference, student.model, held, settings, "bridged")
    # Model selection on validation windows carved from the end of the training text (never the
    # held-out part): training is kept only when it lowers their KL; otherwise the starting
    # weights (NEW, bridged) are written. Training windows are not reused for validation.
    val_count = min(VALIDATION_WINDOWS, len(train) // 20) if hs.select and len(train) >= 20 else 0
    val = train[len(train) - val_count :] if val_count else None
    if val is not None:
        train = train[: len(train) - val_count]
    trainable_prefixes = tuple(f"{stack_path}.{j}." for j in {*adapter_layers, *hs.full_layers})
    start_state = {name: value.detach().clone() for name, value in student.model.state_dict().items()
                   if name.startswith(trainable_prefixes)} if val is not None else {}
    val_start = _measure(reference, student.model, val, settings, "validation, start").kl if val is not None else None
    targets = _teacher_targets(reference, train, hs.top_k, settings.batch_size, settings.quiet)

    budget = None if hs.max_minutes is None else max(1.0, hs.max_minutes * 60 - init_seconds)
    with warnings.catch_warnings():  # transformers' deprecation notices raised inside peft
        warnings.simplefilter("ignore", FutureWarning)
        trained, trainable, steps, stopped, seconds, losses = _train(
            student.model, stack_path, adapter_layers, tuple(hs.full_layers), train, targets, hs, budget, settings.quiet
        )
    kept, val_trained = "trained", None
    if val is not None:
        val_trained = _measure(reference, trained, val, settings, "validation, trained").kl
        if val_start is not None and val_trained is not None and val_trained >= val_start:
            trained.load_state_dict(start_state, strict=False)
            kept = "start"
    after = _measure(reference, trained, held, settings, "after")

    report = HealReport(
        out=None, original=teacher.describe(), new=student.describe(), data=texts.name, settings=hs,
        adapter_layers=adapter_layers, full_layers=tuple(hs.full_layers), trainable_params=trainable,
        train_windows=len(train), held_out_windows=len(held), steps=steps, stopped=stopped, seconds=seconds,
        losses=tuple(losses), before=before, after=after, init_layers=init_layers, init_note=init_note,
        after_init=after_init, init_seconds=init_seconds, validation_windows=val_count, validation_kl_start=val_start,
        validation_kl_trained=val_trained, kept=kept,
        held_out_text=_decode(teacher, held),
    )
    from accelerate import PartialState

    if dry_run or out_path is None or not PartialState().is_main_process:  # under accelerate launch: one writer
        return report
    changed_prefixes = [f"{stack_path}.{j}." for j in sorted({*adapter_layers, *hs.full_layers, *init_layers})]
    state = {name: tensor for name, tensor in trained.state_dict().items() if name.startswith(tuple(changed_prefixes))}
    report = dataclasses.replace(report, out=out_path)
    _write_healed(new_source.path, out_path, state, report, force=force, quiet=settings.quiet)
    return report


def _split_windows(teacher: LoadedModel, texts: TextSet, hs: HealSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Every window of the text in order; the last ``held_out`` share (at most ``eval_tokens``) is held out."""
    if teacher.tokenizer is None:
        raise DataError(str(teacher.path), "has no tokenizer to cut the text with")
    seq_len = min(hs.seq_len, teacher.max_positions or hs.seq_len)
    windows = token_windows(teacher.tokenizer, texts, seq_len=seq_len, max_tokens=10**12, seed=hs.seed)
    if len(windows) < 2:
        raise DataError(texts.name, f"gives {len(windows)} window of {seq_len} tokens; healing needs at least 2 "
                        "(one to train on, one held out)", hint="give a longer text or a smaller --seq-len")
    held_count = max(1, round(len(windows) * hs.held_out))
    train, held = windows[: len(windows) - held_count], windows[len(windows) - held_count :]
    return train, held[: max(1, hs.eval_tokens // seq_len)]


def _decode(teacher: LoadedModel, windows: torch.Tensor) -> str:
    """The windows' text (special tokens left out), in order."""
    if teacher.tokenizer is None:
        return ""
    return "".join(teacher.tokenizer.decode(window, skip_special_tokens=True) for window in windows.tolist())


def _measure(reference: Any, model: Any, windows: torch.Tensor, settings: Settings, label: str) -> Comparison:
    measurement = compare(
        reference, [Candidate.of_model(model, label)], windows, causal=True, batch_size=settings.batch_size,
        prompts=0, quiet=settings.quiet, description=f"held-out ({label})",
    )
    return measurement.comparisons[0]


def _train(
    model: Any,
    stack_path: str,
    adapter_layers: tuple[int, ...],
    full_layers: tuple[int, ...],
    windows: torch.Tensor,
    targets: tuple[torch.Tensor, torch.Tensor],
    hs: HealSettings,
    budget: float | None,
    quiet: bool,
) -> tuple[Any, int, int, str, float, list[float]]:
    """Attach adapters, train, merge. Returns (merged model, trainable params, steps, stopped by, seconds, losses)."""
    import torch
    from accelerate import Accelerator
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm

    torch.manual_seed(hs.seed)
    targets_names = [
        name for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and any(name.startswith(f"{stack_path}.{j}.") for j in adapter_layers)
    ]
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    if targets_names:
        config = LoraConfig(r=hs.rank, lora_alpha=hs.alpha, lora_dropout=0.0, target_modules=targets_names, bias="none")
        model = get_peft_model(model, config)
    full_prefixes = tuple(f"{stack_path}.{j}." for j in full_layers)
    for name, parameter in model.named_parameters():
        if full_prefixes and _base_name(name).startswith(full_prefixes) and "lora_" not in name:
            parameter.requires_grad_(True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    count = sum(p.numel() for p in trainable)
    if not trainable:
        raise PlanError("nothing to train: no linear layers in the chosen blocks", hint="choose blocks with --layers")

    accelerator = Accelerator(cpu=not any(p.is_cuda for p in model.parameters()))
    optimizer = torch.optim.AdamW(trainable, lr=hs.lr, weight_decay=0.0)
    model, optimizer = accelerator.prepare(model, optimizer)
    probs, ids = targets
    generator = torch.Generator().manual_seed(hs.seed)
    order: list[int] = []
    planned = hs.steps
    losses: list[float] = []
    deadline = budget
    stopped = "steps"
    start = time.perf_counter()
    device = next(model.parameters()).device
    with _first_interrupt_stops() as flag, tqdm(
        total=planned, desc="healing", unit="step", disable=quiet or not accelerator.is_main_process, file=sys.stderr
    ) as bar:
        step = 0
        while step < planned:
            if len(order) < hs.batch_size * accelerator.num_processes:
                order.extend(torch.randperm(len(windows), generator=generator).tolist())
            chosen = order[: hs.batch_size * accelerator.num_processes]
            del order[: len(chosen)]
            mine = chosen[accelerator.process_index :: accelerator.num_processes]
            batch = windows[mine].to(device)
            for group in optimizer.param_groups:
                group["lr"] = hs.lr * _lr_factor(step, planned)
            logits = model(input_ids=batch).logits
            loss = _distill_loss(logits, probs[mine].to(device), ids[mine].to(device))
            optimizer.zero_grad(set_to_none=True)
            accelerator.backward(loss)
            optimizer.step()
            losses.append(float(loss.detach()))
            step += 1
            elapsed = time.perf_counter() - start
            if deadline is not None and (step == 3 or step % 10 == 0):
                # Plan the schedule on the speed measured so far (again every 10 steps: the first
                # steps are slow to warm up, and a machine's load changes), so the cosine decay ends
                # when the budget does instead of early or never.
                planned = max(step + 1, min(hs.steps, int(deadline / (elapsed / step))))
                bar.total = planned
                bar.refresh()
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            bar.update(1)
            if flag["stop"]:
                stopped = "interrupted"
                break
            if deadline is not None and elapsed >= deadline:
                stopped = "time"
                break
    seconds = time.perf_counter() - start
    model = accelerator.unwrap_model(model)
    if targets_names:
        model = model.merge_and_unload()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.eval()
    return model, count, len(losses), stopped, seconds, losses


class _Enough(Exception):
    """Raised from a hook to end a forward pass once what it was run for has been seen."""


def _run_until_enough(model: Any, batch: torch.Tensor) -> None:
    """A forward pass that a hook may end early by raising :class:`_Enough`."""
    try:
        model(input_ids=batch.to(next(model.parameters()).device))
    except _Enough:
        pass


def _output(value: Any) -> Any:
    return value[0] if isinstance(value, tuple) else value


def _bridge_cuts(
    teacher: Any, student: Any, plan: Plan, windows: torch.Tensor, batch_size: int, quiet: bool
) -> tuple[tuple[int, ...], str]:
    """Bridge each cut of ``plan`` in closed form; returns the blocks changed and why others were not.

    For a cut at NEW's position c, the block before it (p = c - 1) computes ``h + M`` with M the
    output of its last linear layer. The original's stream where the plan resumes (the input of
    the original layer NEW's block c runs, or the last block's output when the plan cut the end) is
    the target Y; T = argmin ||(h + M T) - Y||^2 (ridge 1e-4 of the mean diagonal), folded into that
    layer as W <- T^T W (and its bias b <- b T). Cuts are bridged in order, each seeing the earlier
    bridges. A cut at position 0, a parallel group, or a block not ending in a linear layer added to
    the stream is left alone (said in the note).
    """
    import torch
    from tqdm.auto import tqdm

    if plan.groups:
        return (), "a parallel group has no cut to bridge"
    mapping = [source for _, source in plan.mapping()]
    _, teacher_stack = _stack(teacher)
    _, student_stack = _stack(student)
    bridged: list[int] = []
    notes: list[str] = []
    cuts = cut_positions(plan)
    with torch.no_grad(), tqdm(total=len(cuts) * len(windows), desc="bridging", unit="window", disable=quiet, file=sys.stderr) as bar:
        for cut in cuts:
            if cut == 0:
                notes.append("the cut before block 0 has no block before it")
                bar.update(len(windows))
                continue
            block = student_stack[cut - 1]
            last = _last_linear_adding_to_stream(student, block, windows[:1])
            if last is None:
                notes.append(f"block {cut - 1} does not end in a linear layer added to the residual stream")
                bar.update(len(windows))
                continue
            resumes_at_input = cut < len(mapping)
            target_block = teacher_stack[mapping[cut]] if resumes_at_input else teacher_stack[-1]
            bridge = _fit_bridge(student, teacher, block, last, target_block, resumes_at_input, windows, batch_size, bar)
            last.weight.copy_((bridge.T @ last.weight.double()).to(last.weight.dtype))
            if last.bias is not None:
                last.bias.copy_((last.bias.double() @ bridge).to(last.bias.dtype))
            bridged.append(cut - 1)
    return tuple(bridged), "; ".join(notes)


def _fit_bridge(
    student: Any, teacher: Any, block: Any, last: Any, target_block: Any, at_input: bool,
    windows: torch.Tensor, batch_size: int, bar: Any,
) -> torch.Tensor:
    """T = argmin ||(h + M T) - Y||^2 over the windows' positions (ridge 1e-4 of the mean diagonal):
    M is ``last``'s output, h + M ``block``'s output in the student, Y the teacher's stream at
    ``target_block``'s input (``at_input``) or output. Both passes stop where they have what they need."""
    import torch

    seen: dict[str, Any] = {}

    def keep_linear(module: Any, args: Any, output: Any) -> None:
        seen["M"] = output

    def keep_block(module: Any, args: Any, output: Any) -> None:
        seen["out"] = _output(output)
        raise _Enough

    def keep_input(module: Any, args: Any, kwargs: Any) -> None:
        seen["Y"] = args[0] if args else kwargs["hidden_states"]
        raise _Enough

    def keep_output(module: Any, args: Any, output: Any) -> None:
        seen["Y"] = _output(output)
        raise _Enough

    hooks = [
        last.register_forward_hook(keep_linear),
        block.register_forward_hook(keep_block),
        target_block.register_forward_pre_hook(keep_input, with_kwargs=True) if at_input
        else target_block.register_forward_hook(keep_output),
    ]
    width = last.weight.shape[0]
    gram = torch.zeros(width, width, dtype=torch.float64, device=last.weight.device)
    cross = torch.zeros_like(gram)
    try:
        for start in range(0, len(windows), batch_size):
            batch = windows[start : start + batch_size]
            _run_until_enough(student, batch)
            _run_until_enough(teacher, batch)
            m = seen["M"].reshape(-1, width).double()
            y = (seen["Y"] - seen["out"] + seen["M"]).reshape(-1, width).double().to(m.device)
            gram += m.T @ m
            cross += m.T @ y
            bar.update(len(batch))
    finally:
        for hook in hooks:
            hook.remove()
    ridge = 1e-4 * gram.diagonal().mean()
    return torch.linalg.solve(gram + ridge * torch.eye(width, dtype=gram.dtype, device=gram.device), cross)


def _last_linear_adding_to_stream(model: Any, block: Any, window: torch.Tensor) -> Any:
    """The last linear layer ``block`` runs, when its output is added to the block's output as it
    is (checked: doubling it changes the block's output by exactly it); otherwise None."""
    import torch

    calls: list[tuple[Any, Any]] = []
    outputs: list[Any] = []
    doubled: list[Any] = []  # the layer whose output the second pass doubles

    def record(module: Any, args: Any, output: Any) -> Any:
        calls.append((module, output))
        return output * 2 if doubled and module is doubled[0] else None

    def keep_block(module: Any, args: Any, output: Any) -> None:
        outputs.append(_output(output))
        raise _Enough

    hooks = [m.register_forward_hook(record) for m in block.modules() if isinstance(m, torch.nn.Linear)]
    hooks.append(block.register_forward_hook(keep_block))
    try:
        _run_until_enough(model, window)
        if not calls:
            return None
        last, last_output = calls[-1]
        doubled.append(last)
        _run_until_enough(model, window)
    finally:
        for hook in hooks:
            hook.remove()
    change = (outputs[1] - outputs[0]).double()
    expected = last_output.double()
    scale = expected.abs().max().clamp_min(1e-12)
    return last if bool(((change - expected).abs().max() / scale) < 1e-3) else None


def _base_name(name: str) -> str:
    """A parameter's name without peft's wrapping (``base_model.model.``, ``.base_layer``)."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def _write_healed(new_dir: Path, out: Path, state: dict[str, Any], report: HealReport, *, force: bool, quiet: bool) -> None:
    """OUT = NEW with the trained tensors replaced (same shards, dtype and files), plus the heal record and card section."""
    import shutil

    from tqdm.auto import tqdm

    weight_map = read_index(new_dir)
    files = sorted(set(weight_map.values())) if weight_map is not None else ["model.safetensors"]
    shards: list[tuple[str, list[OutputTensor]]] = []
    seen: set[str] = set()
    for file in files:
        header = read_header(new_dir / file)[0]
        tensors = []
        for entry in sorted(header.values(), key=lambda e: e.start):
            if entry.name in state:
                value = state[entry.name]
                if tuple(value.shape) != tuple(entry.shape):
                    raise PlanError(f"the healed {entry.name} has shape {tuple(value.shape)}, NEW's {tuple(entry.shape)}",
                                    hint="this is a bug in layer-surgery: please report it")
                tensors.append(OutputTensor(entry.name, ComputedSource(tuple(entry.shape), _constant(value), "healed"), entry.dtype))
                seen.add(entry.name)
            else:
                tensors.append(OutputTensor(entry.name, entry, entry.dtype))
        shards.append((file, tensors))
    missing = sorted(set(state) - seen)
    if missing:
        raise PlanError(f"the healed tensor {missing[0]} is not in NEW's checkpoint",
                        hint="this is a bug in layer-surgery: please report it")
    with staged_output(out, force=force) as staging:
        total = sum(t.nbytes for _, tensors in shards for t in tensors)
        with tqdm(total=total, unit="B", unit_scale=True, desc="writing", disable=quiet, file=sys.stderr) as bar:
            write_shards(staging, shards, on_bytes=bar.update)
        # The files every rewrite copies (Source.other_files: regular files only, never a FIFO or a
        # symlink out), plus the two it writes itself and heal keeps as they are.
        for path in [new_dir / "config.json", new_dir / RECIPE_FILENAME, *open_source(new_dir).other_files()]:
            if path.name == HEAL_FILENAME:  # rewritten below
                continue
            target = staging / path.relative_to(new_dir)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, target)
        (staging / HEAL_FILENAME).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
        card = (new_dir / CARD_FILENAME).read_text(encoding="utf-8") if (new_dir / CARD_FILENAME).is_file() else ""
        if HEAL_SECTION in card:  # healed again: the newest section replaces the old one
            card = card[: card.index(HEAL_SECTION)].rstrip() + "\n"
        (staging / CARD_FILENAME).write_text((card.rstrip() + "\n\n" if card else "") + report.card_section())


def _constant(value: Any) -> Callable[[], Any]:
    return lambda: value


def parse_positions(text: str | None) -> tuple[int, ...] | None:
    """``--layers 10-15`` as positions (None stays None: the default blocks).

    Example:
        >>> parse_positions("10-12,20")
        (10, 11, 12, 20)
        >>> parse_positions("")
        ()
    """
    if text is None:
        return None
    if not text.strip():  # --layers '': no adapters (with --full-layers)
        return ()
    return tuple(parse_ranges(text))
