"""What a rewrite cost: compare a new model with its original on a text set.

Causal LMs: perplexity of both, KL(original || new) of the next-token distributions, top-1
agreement, and greedy-continuation agreement on prompts cut from the text. Encoders (BERT):
cosine similarity of the final hidden states, per token and mean-pooled per sequence.

The new model is either a written checkpoint (``validate(ORIGINAL, NEW)``, two loads) or a plan
run on the original through :func:`surgery.view.plan_view` (``validate(ORIGINAL, plan=...)``:
one load, nothing written). Both go through :func:`surgery.metrics.compare`, which runs the original once per
batch and then every candidate on the same batch, so :mod:`surgery.sweep` measures any number
of plans with one copy of the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Unpack

# Re-exported: the names measuring code and tests have imported from this module.
from surgery.bars import BARS as BARS
from surgery.bars import Bar as Bar
from surgery.bars import check_bar_values as check_bar_values
from surgery.corpus import TextSet, read_texts, token_windows
from surgery.errors import CheckpointError, OptionError, PlanError
from surgery.loading import DEVICE_MAPS as DEVICE_MAPS
from surgery.loading import DEVICES as DEVICES
from surgery.loading import DTYPES as DTYPES
from surgery.loading import LoadedModel as LoadedModel
from surgery.loading import MeasureOptions as MeasureOptions
from surgery.loading import PathLike as PathLike
from surgery.loading import Settings as Settings
from surgery.loading import check_comparable as check_comparable
from surgery.loading import input_device as input_device
from surgery.loading import load_model as load_model
from surgery.loading import num_layers_of as num_layers_of
from surgery.metrics import PROMPT_TOKENS as PROMPT_TOKENS
from surgery.metrics import Candidate as Candidate
from surgery.metrics import Comparison as Comparison
from surgery.metrics import Measurement as Measurement
from surgery.metrics import _Tally as _Tally
from surgery.metrics import compare as compare
from surgery.metrics import greedy_continuation as greedy_continuation
from surgery.plan import RECIPE_FILENAME, Plan, Recipe
from surgery.report import ValidationReport as ValidationReport
from surgery.report import format_metric as format_metric
from surgery.source import open_source

if TYPE_CHECKING:
    import torch


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
    data: PathLike | TextSet | None = None,
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
        data: a ``.txt`` or ``.jsonl`` file, None for the default corpus (Hamlet), or a
            :class:`~surgery.corpus.TextSet` already read.
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
