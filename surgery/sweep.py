"""Measure a family of plans against the original with one load of the weights.

Every plan runs as a :func:`surgery.view.plan_view` of the one loaded model, and
:func:`surgery.metrics.compare` passes each batch through the original once and then through
every plan, so memory does not grow with the number of plans.

Built-in families:

* ``drop_window=n``: every contiguous window of ``n`` layers dropped in turn;
* ``painters=True``: the variants of "Transformer Layers as Painters" (Sun et al. 2024) over a
  middle range: keep the first ``N+1`` and the last ``N`` layers and vary ``N``; the middle is
  skipped, replaced by its centre layer repeated, reversed, shuffled (several seeds, averaged
  in the plot), run in parallel (one group: the middle layers on the same input, averaged) or
  looped parallel (that group applied ``painters_loop`` times in a row). Parallel groups run in
  the view as the K original layers averaged (:class:`surgery.view.ParallelStep`), the same
  definition the wide-block checkpoints of ``surgery parallel`` are tested equal to.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Unpack

from surgery.corpus import read_texts
from surgery.errors import OptionError
from surgery.loading import MeasureOptions, PathLike, Settings, load_model
from surgery.metrics import Candidate, Comparison, compare
from surgery.plan import ParallelGroup, Plan, parse_ranges
from surgery.report import format_metric
from surgery.validate import greedy_budget, measuring_windows

PAINTERS_VARIANTS = ("skip", "middle repeat", "reverse", "random order", "parallel", "looped parallel")
CSV_COLUMNS = (
    "family", "variant", "n", "seed", "affected", "x", "plan", "num_layers", "tokens",
    "ppl_original", "ppl_new", "kl", "top1", "greedy_agreement", "greedy_prefix", "hidden_cosine", "embedding_cosine",
)


@dataclass(frozen=True)
class SweepPlan:
    """One plan of a sweep and where it sits in its family.

    Attributes:
        family: ``drop-window``, ``painters`` or ``custom``.
        variant: the line it belongs to in the plot (``drop 4``, ``skip``, ``reverse``, ...).
        x: its x coordinate: the first dropped layer (drop windows) or the number of middle
            layers affected (Painters).
        affected: how many source layers the variant changes (dropped, replaced or moved).
        plan: the plan.
        n: Painters' N (first N+1 and last N layers kept), when it applies.
        seed: the shuffle seed of a random-order plan.
    """

    family: str
    variant: str
    x: int
    affected: int
    plan: Plan
    n: int | None = None
    seed: int | None = None


def drop_window_plans(num_layers: int, size: int) -> list[SweepPlan]:
    """Every contiguous window of ``size`` layers dropped, one plan per first layer.

    Raises:
        OptionError: ``size`` outside 1 .. num_layers - 1.

    Example:
        >>> [str(p.plan) for p in drop_window_plans(4, 2)]
        ['2-3', '0,3', '0-1']
    """
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size < num_layers:
        raise OptionError(f"--drop-window must be a whole number from 1 to {num_layers - 1} for this model, got {size!r}")
    return [
        SweepPlan("drop-window", f"drop {size}", start, size, Plan.drop(f"{start}-{start + size - 1}", num_layers))
        for start in range(num_layers - size + 1)
    ]


def middle_layers(num_layers: int, n: int) -> list[int]:
    """The middle of Painters' split: all but the first ``n + 1`` and the last ``n`` layers.

    Example:
        >>> middle_layers(8, 2)
        [3, 4, 5]
    """
    return list(range(n + 1, num_layers - n))


def painters_plans(
    num_layers: int, seeds: Sequence[int] = (0, 1, 2), n_values: Sequence[int] | None = None, loop: int = 3
) -> list[SweepPlan]:
    """The Painters variants for every N whose middle has at least two layers.

    Args:
        num_layers: L.
        seeds: the shuffle seeds of the random-order variant.
        n_values: the N to use (default all from 0 while the middle has two layers or more).
        loop: how many times the looped-parallel variant applies the parallel middle (0: leave
            that variant out).

    Returns:
        Per N: skip, middle repeat, reverse, one random order per seed, parallel (the middle
        layers as one group ``[a-b]``) and looped parallel (``[a-b]xloop``).

    Raises:
        OptionError: no seed, an N whose middle has fewer than two layers, a loop below 0.

    Example:
        >>> [(p.variant, str(p.plan)) for p in painters_plans(6, seeds=(0,), n_values=[1])][:3]
        [('skip', '0-1,5'), ('middle repeat', '0-1,3,3,3,5'), ('reverse', '0-1,4,3,2,5')]
        >>> [str(p.plan) for p in painters_plans(6, seeds=(0,), n_values=[1])][4:]
        ['0-1,[2-4],5', '0-1,[2-4]x3,5']
    """
    if not seeds:
        raise OptionError("the random-order variant needs at least one seed")
    if isinstance(loop, bool) or not isinstance(loop, int) or loop < 0:
        raise OptionError(f"the looped-parallel loop count must be a whole number of at least 0, got {loop!r}")
    largest = (num_layers - 3) // 2  # the middle has L - 2N - 1 layers
    chosen = list(range(largest + 1)) if n_values is None else list(n_values)
    plans: list[SweepPlan] = []
    for n in chosen:
        middle = middle_layers(num_layers, n)
        if n < 0 or len(middle) < 2:
            raise OptionError(f"N={n} leaves {max(0, len(middle))} middle layer(s); N must be from 0 to {largest} for this model")
        head, tail = tuple(range(n + 1)), tuple(range(num_layers - n, num_layers))
        centre = middle[len(middle) // 2]
        spec = f"{middle[0]}-{middle[-1]}"
        m = len(middle)
        plans.append(SweepPlan("painters", "skip", m, m, Plan(head + tail, num_layers), n))
        plans.append(SweepPlan("painters", "middle repeat", m, m, Plan(head + (centre,) * m + tail, num_layers), n))
        plans.append(SweepPlan("painters", "reverse", m, m, Plan.reverse(spec, num_layers), n))
        for seed in seeds:
            plans.append(SweepPlan("painters", "random order", m, m, Plan.shuffle(spec, seed, num_layers), n, seed))
        plans.append(SweepPlan("painters", "parallel", m, m, Plan((*head, ParallelGroup(tuple(middle)), *tail), num_layers), n))
        if loop > 1:
            looped = Plan((*head, ParallelGroup(tuple(middle), loop=loop), *tail), num_layers)
            plans.append(SweepPlan("painters", "looped parallel", m, m, looped, n))
    return plans


@dataclass(frozen=True)
class SweepRow:
    """One measured plan."""

    spec: SweepPlan
    comparison: Comparison

    def to_dict(self) -> dict[str, Any]:
        s, c = self.spec, self.comparison
        return {
            "family": s.family, "variant": s.variant, "n": s.n, "seed": s.seed, "affected": s.affected, "x": s.x,
            "plan": str(s.plan), "num_layers": c.num_layers, "tokens": c.tokens,
            "ppl_original": c.ppl_original, "ppl_new": c.ppl_new, "kl": c.kl, "top1": c.top1,
            "greedy_agreement": c.greedy_agreement, "greedy_prefix": c.greedy_prefix,
            "hidden_cosine": c.hidden_cosine, "embedding_cosine": c.embedding_cosine,
        }


@dataclass(frozen=True)
class SweepReport:
    """What :func:`sweep` measured.

    Attributes:
        model: the model, described.
        kind: ``causal`` or ``encoder``.
        data: the text set's name.
        windows: samples measured per plan.
        seq_len: tokens per sample.
        rows: one per plan, in sweep order.
        seconds: wall time of the scoring passes.
        files: what was written (``csv``, ``json``, ``plot``).
    """

    model: str
    kind: str
    data: str
    windows: int
    seq_len: int
    rows: list[SweepRow]
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics plotted: KL and top-1 for causal LMs, embedding cosine for encoders."""
        return ("kl", "top1") if self.kind == "causal" else ("embedding_cosine",)

    def to_dict(self) -> dict[str, Any]:
        """The JSON body of ``surgery sweep --json`` and of ``sweep.json``."""
        return {
            "model": self.model, "kind": self.kind, "data": self.data, "windows": self.windows,
            "seq_len": self.seq_len, "seconds": self.seconds, "rows": [row.to_dict() for row in self.rows],
            "files": {k: str(v) for k, v in self.files.items()},
        }

    def to_csv(self) -> str:
        """The table as CSV, one row per plan."""
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(CSV_COLUMNS), lineterminator="\n")
        writer.writeheader()
        for row in self.rows:
            writer.writerow({k: "" if v is None else v for k, v in row.to_dict().items()})
        return buffer.getvalue()

    def format(self) -> str:
        """The table printed by ``surgery sweep``."""
        lines = [
            f"model     {self.model}",
            f"text      {self.data}: {self.windows} windows x {self.seq_len} tokens per plan",
            f"plans     {len(self.rows)} measured with one load in {self.seconds:.1f} s",
            "",
        ]
        if self.kind == "causal":
            lines.append(f"{'variant':<17}{'N':>4}{'seed':>5}{'aff.':>5}  {'ppl':>10}{'KL':>9}{'top-1':>8}{'greedy':>8}  plan")
            for row in self.rows:
                s, c = row.spec, row.comparison
                greedy = "" if c.greedy_agreement is None else f"{c.greedy_agreement:.1%}"
                lines.append(
                    f"{s.variant:<17}{'' if s.n is None else s.n:>4}{'' if s.seed is None else s.seed:>5}{s.affected:>5}"
                    f"  {format_metric(c.ppl_new or 0):>10}{c.kl or 0:>9.4f}{c.top1 or 0:>8.1%}{greedy:>8}  {s.plan}"
                )
        else:
            lines.append(f"{'variant':<17}{'N':>4}{'seed':>5}{'aff.':>5}  {'cos(emb)':>9}{'cos(tok)':>9}  plan")
            for row in self.rows:
                s, c = row.spec, row.comparison
                lines.append(
                    f"{s.variant:<17}{'' if s.n is None else s.n:>4}{'' if s.seed is None else s.seed:>5}{s.affected:>5}"
                    f"  {c.embedding_cosine or 0:>9.4f}{c.hidden_cosine or 0:>9.4f}  {s.plan}"
                )
        if self.files:
            lines.append("")
            lines.extend(f"wrote {path}" for path in self.files.values())
        return "\n".join(lines)

    def series(self, family: str, metric: str) -> dict[str, list[tuple[int, float]]]:
        """Plot lines of one family: variant -> sorted ``(x, metric)``, seeds averaged."""
        points: dict[str, dict[int, list[float]]] = {}
        for row in self.rows:
            value = getattr(row.comparison, metric)
            if row.spec.family != family or value is None:
                continue
            points.setdefault(row.spec.variant, {}).setdefault(row.spec.x, []).append(float(value))
        return {
            variant: sorted((x, sum(values) / len(values)) for x, values in by_x.items())
            for variant, by_x in points.items()
        }

    def plot(self, path: Path) -> Path:
        """Write the metric-vs-affected-layers plot: one panel per metric and family, one line per variant."""
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        families = [f for f in ("painters", "drop-window") if any(r.spec.family == f for r in self.rows)]
        if not families:
            raise OptionError("there is nothing to plot: the sweep has only custom plans")
        labels = {"kl": "KL(original || new), nats/token", "top1": "top-1 agreement with the original",
                  "embedding_cosine": "embedding cosine with the original"}
        x_labels = {"painters": "middle layers affected (L - 2N - 1)", "drop-window": "first dropped layer"}
        figure = Figure(figsize=(6.5 * len(families), 3.6 * len(self.metrics)), dpi=110)
        FigureCanvasAgg(figure)
        grid = figure.subplots(len(self.metrics), len(families), squeeze=False)
        for column, family in enumerate(families):
            for row_index, metric in enumerate(self.metrics):
                axes = grid[row_index][column]
                for variant, points in self.series(family, metric).items():
                    xs, ys = zip(*points, strict=True)
                    axes.plot(xs, ys, marker="o", markersize=3, label=variant)
                if metric == "kl" and all(y > 0 for r in self.rows if (y := r.comparison.kl) is not None):
                    axes.set_yscale("log")
                axes.set_xlabel(x_labels[family])
                axes.set_ylabel(labels[metric])
                axes.grid(alpha=0.3)
                axes.legend(fontsize=8)
        figure.suptitle(f"{self.model}\nplans vs the original ({self.windows} x {self.seq_len} tokens)", fontsize=10)
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path)
        return path

    def write(self, directory: Path) -> dict[str, Path]:
        """Write ``sweep.csv``, ``sweep.json`` and (unless only custom plans) ``sweep.png``."""
        directory.mkdir(parents=True, exist_ok=True)
        written = {"csv": directory / "sweep.csv", "json": directory / "sweep.json"}
        written["csv"].write_text(self.to_csv(), encoding="utf-8")
        if any(row.spec.family != "custom" for row in self.rows):
            written["plot"] = self.plot(directory / "sweep.png")
        self.files.update(written)
        written["json"].write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        return written


def sweep(
    model: PathLike | None,
    *,
    drop_window: int | None = None,
    painters: bool = False,
    painters_n: str | None = None,
    seeds: Sequence[int] = (0, 1, 2),
    painters_loop: int = 3,
    plans: Sequence[str | Plan] = (),
    data: PathLike | None = None,
    out: PathLike | None = None,
    **options: Unpack[MeasureOptions],
) -> SweepReport:
    """Measure many plans against the original in one process with one copy of the weights.

    Args:
        model: a model directory, ``.gguf`` file, Hub id, or None for the default.
        drop_window: add every contiguous drop window of this many layers.
        painters: add the Painters variants (skip, middle repeat, reverse, random order,
            parallel, looped parallel).
        painters_n: the N values for Painters in range syntax (default: all).
        seeds: shuffle seeds of the random-order variant.
        painters_loop: how many times the looped-parallel variant applies the parallel middle
            (default 3; 0 or 1 leaves that variant out).
        plans: extra plans (range syntax or :class:`Plan`), family ``custom``.
        data: a ``.txt``/``.jsonl`` file, or None for the default corpus.
        out: a directory for ``sweep.csv``, ``sweep.json`` and ``sweep.png`` (None: write nothing).
        **options: see :class:`surgery.validate.MeasureOptions`.

    Returns:
        The :class:`SweepReport`.

    Raises:
        OptionError: no plan at all, a drop window or N that does not fit the model.
        PlanError: a custom plan that does not fit the model.
        DataError: a text file that is missing, empty, too short or malformed.
        ModelNotFoundError: MODEL does not exist.
        CheckpointError: a weights file, index or config that cannot be read.
        UnsupportedArchitectureError: no layer stack found.

    Example:
        >>> report = surgery.sweep(None, painters=True, out="sweep")  # doctest: +SKIP
        >>> report.files["plot"]  # doctest: +SKIP
        PosixPath('sweep/sweep.png')
    """
    from surgery.view import live_architecture

    settings = Settings.from_options(options)
    if drop_window is None and not painters and not plans:
        raise OptionError("nothing to sweep: give a drop window (--drop-window N), --painters, or plans (--plan)")
    if any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise OptionError(f"seeds must be whole numbers, got {list(seeds)!r}")
    texts = read_texts(data, text_field=settings.text_field)
    loaded = load_model(model, settings)
    num_layers = loaded.num_layers
    specs: list[SweepPlan] = []
    if drop_window is not None:
        specs += drop_window_plans(num_layers, drop_window)
    if painters:
        n_values = parse_ranges(painters_n) if painters_n is not None else None
        specs += painters_plans(num_layers, seeds=seeds, n_values=n_values, loop=painters_loop)
    for given in plans:
        plan = given if isinstance(given, Plan) else Plan.from_ranges(str(given), num_layers)
        # dropped or merged into a group: the source layers that no longer run as themselves
        affected = num_layers - len({step for step in plan.layers if isinstance(step, int)})
        specs.append(SweepPlan("custom", "custom", affected, affected, plan))
    arch = live_architecture(loaded.model)
    for spec in specs:
        arch.check_plan(spec.plan)  # refuse a bad plan before hours of measuring
    windows = measuring_windows(loaded, texts, settings)
    prompts, new_tokens = greedy_budget(loaded, windows, settings)
    candidates = [Candidate.of_plan(loaded.model, spec.plan) for spec in specs]
    measurement = compare(
        loaded.model, candidates, windows, causal=loaded.causal, batch_size=settings.batch_size,
        prompts=prompts, new_tokens=new_tokens, quiet=settings.quiet, description=f"sweep ({len(specs)} plans)",
    )
    report = SweepReport(
        model=loaded.describe(), kind="causal" if loaded.causal else "encoder", data=texts.name,
        windows=measurement.windows, seq_len=measurement.seq_len,
        rows=[SweepRow(spec, c) for spec, c in zip(specs, measurement.comparisons, strict=True)],
        seconds=measurement.seconds,
    )
    if out is not None:
        report.write(Path(out))
    return report
