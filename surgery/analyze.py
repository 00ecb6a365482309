"""Which layers matter: similarity of the residual stream from layer to layer, on a text set.

Hooks record the residual stream *entering* every layer, and leaving the last one, before the
final norm (``output_hidden_states`` replaces its last entry with the normed output). With
``x_i`` the stream entering layer ``i`` (``x_L`` after the last layer):

* the layer-by-layer cosine similarity matrix of "Transformer Layers as Painters" (Sun et al.
  2024): ``cos(x_i, x_j)`` with all tokens of a sample flattened into one vector, averaged over
  samples;
* Block Influence (ShortGPT, Men et al. 2024): ``BI_i = 1 - mean cos(x_i, x_{i+1})`` over tokens;
* angular distance of every block of ``n`` consecutive layers (Gromov et al. 2024):
  ``(1/pi) arccos(cos(x_l, x_{l+n}))`` on the last token, averaged over samples. The block with
  the smallest distance changes the stream least: the first candidate to drop.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Unpack

from surgery.corpus import read_texts
from surgery.errors import OptionError
from surgery.loading import LoadedModel, MeasureOptions, PathLike, Settings, input_device, load_model
from surgery.plan import format_ranges
from surgery.validate import measuring_windows

if TYPE_CHECKING:  # imported where models run, so that importing surgery stays fast
    import torch


@contextmanager
def residual_stream(stack: torch.nn.ModuleList) -> Iterator[list[torch.Tensor]]:
    """Record the hidden states entering each block of ``stack`` and leaving the last one.

    Args:
        stack: the model's layer stack.

    Returns:
        A context manager yielding a list that each forward pass appends ``len(stack) + 1``
        tensors to, in layer order; the hooks are removed on exit.

    Example:
        >>> with residual_stream(model.model.layers) as states:  # doctest: +SKIP
        ...     model(input_ids)
        >>> len(states)  # doctest: +SKIP
        31
    """
    states: list[torch.Tensor] = []

    def entering(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        states.append(hidden.detach())

    def leaving(_module: Any, _args: Any, output: Any) -> None:
        states.append((output[0] if isinstance(output, tuple) else output).detach())

    handles = [block.register_forward_pre_hook(entering, with_kwargs=True) for block in stack]
    handles.append(stack[len(stack) - 1].register_forward_hook(leaving))
    try:
        yield states
    finally:
        for handle in handles:
            handle.remove()


@dataclass(frozen=True)
class DropCandidate:
    """A block of consecutive layers whose removal changes the residual stream least.

    Attributes:
        rank: 1 for the best candidate.
        first: the block's first layer.
        last: the block's last layer.
        angular_distance: between the stream entering ``first`` and leaving ``last`` (0 to 1).
        command: the ``surgery prune`` command that drops the block.
    """

    rank: int
    first: int
    last: int
    angular_distance: float
    command: str

    @property
    def layers(self) -> str:
        """The block in range syntax."""
        return format_ranges(list(range(self.first, self.last + 1)))


@dataclass(frozen=True)
class AnalysisReport:
    """What :func:`analyze` found.

    Attributes:
        model: the model, described.
        num_layers: L.
        data: the text set's name.
        windows: samples measured.
        seq_len: tokens per sample.
        similarity: ``(L+1) x (L+1)`` mean cosine similarity of the flattened residual streams
            (index ``i < L``: entering layer ``i``; index ``L``: leaving the last layer).
        block_influence: ``BI_i`` for each of the L layers.
        angular: ``(L+1) x (L+1)`` mean last-token angular distance; ``angular[l][l+n]`` is the
            distance across the block of ``n`` layers starting at ``l``.
        drop_count: the block size the candidates are for.
        candidates: contiguous blocks of ``drop_count`` layers, smallest angular distance first.
        lowest_influence: the ``drop_count`` layers with the smallest BI (ShortGPT's choice).
        lowest_influence_command: the ``surgery prune`` command that drops them.
        plots: the image files written (``similarity``, ``block_influence``).
    """

    model: str
    num_layers: int
    data: str
    windows: int
    seq_len: int
    similarity: list[list[float]]
    block_influence: list[float]
    angular: list[list[float]]
    drop_count: int
    candidates: list[DropCandidate]
    lowest_influence: list[int]
    lowest_influence_command: str
    plots: dict[str, Path] = field(default_factory=dict)

    def block_distances(self, n: int) -> list[float]:
        """Angular distance across every block of ``n`` layers, by first layer."""
        return [self.angular[start][start + n] for start in range(self.num_layers - n + 1)]

    def format(self) -> str:
        """The report printed by ``surgery analyze``."""
        n = self.drop_count
        lines = [
            f"model     {self.model}",
            f"text      {self.data}: {self.windows} windows x {self.seq_len} tokens",
            "",
            f"drop candidates: blocks of {n} consecutive layer(s), by angular distance (smaller = less change)",
            f"{'rank':>4}  {'layers':<9}{'distance':>9}  command",
        ]
        for c in self.candidates:
            lines.append(f"{c.rank:>4}  {c.layers:<9}{c.angular_distance:>9.4f}  {c.command}")
        lines += [
            "",
            f"lowest Block Influence (ShortGPT): layers {format_ranges(sorted(self.lowest_influence))}",
            f"      {self.lowest_influence_command}",
            "",
            "Block Influence per layer (1 - cos(x_i, x_i+1)):",
        ]
        peak = max(self.block_influence) or 1.0
        for i, bi in enumerate(self.block_influence):
            lines.append(f"{i:>4}  {bi:.4f}  {'#' * max(1, round(30 * bi / peak))}")
        if self.plots:
            lines.append("")
            lines.extend(f"wrote {path}" for path in self.plots.values())
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The JSON body of ``surgery analyze --json``."""
        return {
            "model": self.model,
            "num_layers": self.num_layers,
            "data": self.data,
            "windows": self.windows,
            "seq_len": self.seq_len,
            "similarity": self.similarity,
            "block_influence": self.block_influence,
            "angular_distance": {str(n): self.block_distances(n) for n in range(1, self.num_layers + 1)},
            "drop_count": self.drop_count,
            "candidates": [
                {"rank": c.rank, "layers": c.layers, "first": c.first, "last": c.last,
                 "angular_distance": c.angular_distance, "command": c.command}
                for c in self.candidates
            ],
            "lowest_influence": self.lowest_influence,
            "lowest_influence_command": self.lowest_influence_command,
            "plots": {k: str(v) for k, v in self.plots.items()},
        }


@dataclass
class _Sums:
    """Running sums over samples: similarity, angular distance, BI numerators."""

    similarity: torch.Tensor
    angular: torch.Tensor
    influence: torch.Tensor
    samples: int = 0
    tokens: int = 0

    def add(self, states: list[torch.Tensor]) -> None:
        import torch

        x = torch.stack([s.float().cpu() for s in states])  # (L+1, batch, tokens, hidden)
        points, batch, tokens, _ = x.shape
        flat = torch.nn.functional.normalize(x.permute(1, 0, 2, 3).reshape(batch, points, -1), dim=-1)
        self.similarity += (flat @ flat.transpose(1, 2)).sum(0).double()
        self.influence += (1 - torch.nn.functional.cosine_similarity(x[:-1], x[1:], dim=-1)).sum((1, 2)).double()
        last = torch.nn.functional.normalize(x[:, :, -1, :], dim=-1)
        cosine = torch.einsum("ibh,jbh->bij", last, last).clamp(-1.0, 1.0)
        self.angular += (torch.arccos(cosine) / math.pi).sum(0).double()
        self.samples += batch
        self.tokens += batch * tokens


def stream_statistics(
    loaded: LoadedModel, windows: torch.Tensor, settings: Settings, description: str = "analyze"
) -> tuple[list[list[float]], list[list[float]], list[float]]:
    """The residual-stream statistics of :func:`analyze` on token windows: one forward pass per batch.

    Args:
        loaded: the model (its layer stack is found with :func:`surgery.view.live_architecture`).
        windows: ``(count, length)`` token ids.
        settings: batch size and quiet.
        description: the progress bar's label.

    Returns:
        ``(similarity, angular, block_influence)``: the ``(L+1) x (L+1)`` mean cosine similarity of
        the flattened streams, the ``(L+1) x (L+1)`` mean last-token angular distance, and ``BI_i``
        for each of the L layers (see :class:`AnalysisReport`).

    Example:
        >>> similarity, angular, influence = stream_statistics(loaded, windows, Settings())  # doctest: +SKIP
        >>> len(influence) == loaded.num_layers  # doctest: +SKIP
        True
    """
    import torch
    from tqdm.auto import tqdm

    from surgery.view import live_architecture

    num_layers = loaded.num_layers
    stack = loaded.model.get_submodule(live_architecture(loaded.model).module_path)
    points = num_layers + 1
    sums = _Sums(torch.zeros(points, points, dtype=torch.float64), torch.zeros(points, points, dtype=torch.float64),
                 torch.zeros(num_layers, dtype=torch.float64))
    device = input_device(loaded.model)
    batches = list(windows.split(settings.batch_size))
    with torch.inference_mode(), residual_stream(stack) as states:
        for batch in tqdm(batches, desc=description, unit="batch", disable=settings.quiet, file=sys.stderr):
            states.clear()
            if loaded.causal:
                loaded.model(input_ids=batch.to(device), use_cache=False)
            else:
                loaded.model.base_model(input_ids=batch.to(device))
            sums.add(states)
            states.clear()
    return (
        (sums.similarity / sums.samples).tolist(),
        (sums.angular / sums.samples).tolist(),
        (sums.influence / sums.tokens).tolist(),
    )


def _prune_command(model: PathLike | None, drop: str) -> str:
    name = Path(str(model)).name if model is not None else "smollm2"
    where = f"{model} " if model is not None else ""
    return f"surgery prune {where}{name}-drop-{drop.replace(',', '_')} --drop {drop}"


def analyze(
    model: PathLike | None,
    *,
    drop_count: int | None = None,
    data: PathLike | None = None,
    plots: PathLike | None = None,
    top: int = 5,
    **options: Unpack[MeasureOptions],
) -> AnalysisReport:
    """Measure layer similarity on a text set and rank blocks of layers to drop.

    Args:
        model: a model directory, ``.gguf`` file, Hub id, or None for the default.
        drop_count: the size of the block to drop (default: a quarter of the layers).
        data: a ``.txt``/``.jsonl`` file, or None for the default corpus.
        plots: a directory to write ``similarity.png`` and ``block-influence.png`` into (None:
            no plots).
        top: how many candidate blocks to list.
        **options: see :class:`surgery.validate.MeasureOptions` (``prompts``/``new_tokens`` unused).

    Returns:
        The :class:`AnalysisReport`.

    Raises:
        OptionError: ``drop_count`` outside 1 .. L-1, or ``top`` below 1.
        DataError: a text file that is missing, empty, too short or malformed.
        ModelNotFoundError: MODEL does not exist.
        CheckpointError: a weights file, index or config that cannot be read.
        UnsupportedArchitectureError: no layer stack found.

    Example:
        >>> report = surgery.analyze(None, drop_count=8, plots="analysis")  # doctest: +SKIP
        >>> report.candidates[0].command  # doctest: +SKIP
        'surgery prune smollm2-drop-20-27 --drop 20-27'
    """
    settings = Settings.from_options(options)
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise OptionError(f"top must be a whole number of at least 1, got {top!r}")
    texts = read_texts(data, text_field=settings.text_field)
    loaded = load_model(model, settings)
    num_layers = loaded.num_layers
    n = max(1, num_layers // 4) if drop_count is None else drop_count
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n < num_layers:
        raise OptionError(f"--drop-count must be a whole number from 1 to {num_layers - 1} for this model, got {n!r}")
    windows = measuring_windows(loaded, texts, settings)
    similarity, angular, influence = stream_statistics(loaded, windows, settings)
    distances = [angular[start][start + n] for start in range(num_layers - n + 1)]
    order = sorted(range(len(distances)), key=lambda start: (distances[start], start))[:top]
    candidates = []
    for rank, start in enumerate(order, start=1):
        drop = format_ranges(list(range(start, start + n)))
        candidates.append(DropCandidate(rank, start, start + n - 1, distances[start], _prune_command(model, drop)))
    lowest = sorted(sorted(range(num_layers), key=lambda i: (influence[i], i))[:n])
    report = AnalysisReport(
        model=loaded.describe(), num_layers=num_layers, data=texts.name, windows=int(windows.shape[0]),
        seq_len=int(windows.shape[1]), similarity=similarity, block_influence=influence, angular=angular,
        drop_count=n, candidates=candidates, lowest_influence=lowest,
        lowest_influence_command=_prune_command(model, format_ranges(lowest)),
    )
    if plots is not None:
        report.plots.update(write_plots(report, Path(plots)))
    return report


def write_plots(report: AnalysisReport, directory: Path) -> dict[str, Path]:
    """Write the similarity heatmap and the Block Influence bar chart as PNG files.

    Args:
        report: from :func:`analyze`.
        directory: created if missing.

    Returns:
        ``{"similarity": path, "block_influence": path}``.

    Example:
        >>> write_plots(report, Path("analysis"))  # doctest: +SKIP
        {'similarity': PosixPath('analysis/similarity.png'), ...}
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    directory.mkdir(parents=True, exist_ok=True)
    n_layers = report.num_layers
    labels = [str(i) for i in range(n_layers)] + ["out"]
    step = max(1, n_layers // 15)

    figure = Figure(figsize=(7, 6), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(report.similarity, cmap="viridis", vmin=min(0.0, min(map(min, report.similarity))), vmax=1.0)
    figure.colorbar(image, ax=axes, label="cosine similarity")
    ticks = list(range(0, n_layers + 1, step))
    if n_layers not in ticks:
        ticks.append(n_layers)
    axes.set_xticks(ticks, [labels[t] for t in ticks])
    axes.set_yticks(ticks, [labels[t] for t in ticks])
    axes.set_xlabel("residual stream entering layer")
    axes.set_ylabel("residual stream entering layer")
    axes.set_title(f"Layer similarity (all tokens per sample), {report.windows} samples")
    figure.tight_layout()
    similarity = directory / "similarity.png"
    figure.savefig(similarity)

    figure = Figure(figsize=(8, 4), dpi=110)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colors = ["tab:orange" if i in report.lowest_influence else "tab:blue" for i in range(n_layers)]
    axes.bar(range(n_layers), report.block_influence, color=colors)
    axes.set_xlabel("layer")
    axes.set_ylabel("Block Influence  1 - cos(x_i, x_i+1)")
    axes.set_title(f"Block Influence per layer (orange: the {report.drop_count} lowest)")
    axes.set_xticks(list(range(0, n_layers, step)))
    figure.tight_layout()
    influence = directory / "block-influence.png"
    figure.savefig(influence)
    return {"similarity": similarity, "block_influence": influence}
