"""The Python API: one function per CLI verb, each building a :class:`~surgery.plan.Plan` and calling the engine."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypedDict, Unpack

from exporters.card import CARD_FILENAME, output_identity, update_card_with_validation, write_card
from surgery.architecture import count_layers, detect
from surgery.checkpoint import read_json_object, read_tensor_index
from surgery.engine import SurgeryResult, _human, _tensor_names, execute
from surgery.errors import CheckpointError, OptionError
from surgery.modeling_wide import CodeStatus, code_status
from surgery.plan import RECIPE_FILENAME, Plan, Recipe, WriteOptions, format_ranges, parse_size
from surgery.source import Source, open_source
from surgery.widen import CodeUpdate, execute_parallel, update_modeling_code

if TYPE_CHECKING:
    from surgery.corpus import TextSet
    from surgery.healing import HealReport
    from surgery.loading import MeasureOptions
    from surgery.report import ValidationReport
    from surgery.search import SearchOptions

PathLike = str | os.PathLike[str]


class Options(TypedDict, total=False):
    """Options shared by every writing function (and CLI verb).

    dtype: ``bf16``/``fp16``/``fp32`` cast of floating-point weights (default: keep).
    max_shard_size: largest output shard, bytes or a string such as ``2GB`` (default 5GB).
    force: replace an existing output directory.
    dry_run: print the plan and sizes, write nothing.
    quiet: no progress bar.
    allow_pickle: accept ``.bin``/``.pt`` weights, loaded with ``weights_only=True``.
    trust_remote_code: allow a model whose code ships in its repository.
    push_to_hub: a Hub repo id: once the output is complete, push it there (see :func:`surgery.push`).
    private: with ``push_to_hub``, create the repository private.
    token: with ``push_to_hub``, the Hugging Face token (default ``HF_TOKEN`` or the stored login).
    onnx: once the output is complete, export it to ONNX (validated) into ``OUT/onnx``
        (fp16 when ``dtype`` is fp16, else fp32; see :func:`exporters.onnx.export_onnx`).
    validate: once the output is complete, compare it with its source (:func:`validate`): the
        report goes into ``result.validation`` and OUT's card; with a dry run, the plan is measured
        in memory. A missed gate leaves OUT (and its card saying so) but pushes nothing.
    data: with ``validate``: the ``.txt``/``.jsonl`` text to measure on (default: Hamlet).
    max_kl, min_top1, min_cosine: with ``validate``: the gates, as for :func:`validate`.
    measure: with ``validate``: the measuring options (:class:`~surgery.loading.MeasureOptions`;
        ``quiet``, ``allow_pickle`` and ``trust_remote_code`` default to this call's).
    allow_unvalidated: with ``push_to_hub`` and no ``validate``: push anyway (the push otherwise
        refuses an output whose card records no validation).
    """

    dtype: str | None
    max_shard_size: int | str | None
    force: bool
    dry_run: bool
    quiet: bool
    allow_pickle: bool
    trust_remote_code: bool
    push_to_hub: str | None
    private: bool
    token: str | None
    onnx: bool
    validate: bool
    data: PathLike | None
    max_kl: float | None
    min_top1: float | None
    min_cosine: float | None
    measure: MeasureOptions
    allow_unvalidated: bool


def _run(model: PathLike | None, out: PathLike | None, build: Callable[[int], Plan], options: Options) -> SurgeryResult:
    source = open_source(model, allow_pickle=options.get("allow_pickle", False), quiet=options.get("quiet", False))
    num_layers = count_layers(source.path, trust_remote_code=options.get("trust_remote_code", False))
    plan = build(num_layers)
    size = options.get("max_shard_size")
    write = WriteOptions(dtype=options.get("dtype"), max_shard_size=parse_size(size) if size else WriteOptions.max_shard_size)
    return _execute(source, out, Recipe(plan=plan, options=write, source=source.name), options)


def _execute(source: Source, out: PathLike | None, recipe: Recipe, options: Options) -> SurgeryResult:
    """Write ``recipe``'s model: plans with parallel groups as wide blocks (:func:`~surgery.widen.execute_parallel`),
    any other through :func:`~surgery.engine.execute`; then the ONNX export and the push, if asked."""
    _check_validate_options(options)
    _check_push_options(options)
    rewrite = execute_parallel if recipe.plan.groups else execute
    result = rewrite(
        source,
        Path(out) if out is not None else None,
        recipe,
        force=options.get("force", False),
        dry_run=options.get("dry_run", False),
        quiet=options.get("quiet", False),
        trust_remote_code=options.get("trust_remote_code", False),
        card=write_card,
    )
    result = _export_onnx_if_asked(source, result, options)
    result = _validate_if_asked(source, result, options)
    # Anything that completes the output (validation) runs before this line: the push is last.
    return _push_if_asked(result, options)


def _export_onnx_if_asked(source: Source, result: SurgeryResult, options: Options) -> SurgeryResult:
    """With ``onnx``: export the complete output into ``OUT/onnx``. If that fails, a freshly written OUT
    is removed, so the command leaves nothing behind (an OUT replaced with ``force`` stays, complete)."""
    if not options.get("onnx") or result.dry_run or result.out is None:
        return result
    import dataclasses
    import shutil

    from exporters.onnx import export_source

    out = result.out
    # Wide-block outputs carry modelling code that this run has just written: trusting it trusts this tool.
    trust = options.get("trust_remote_code", False) or bool(getattr(result.recipe.plan, "groups", None))
    try:
        exported = export_source(
            open_source(out), out / "onnx", dtype="fp16" if options.get("dtype") == "fp16" else "fp32",
            trust_remote_code=trust,
        )
    except BaseException:
        if not options.get("force", False):  # OUT did not exist before this run
            shutil.rmtree(out, ignore_errors=True)
        raise
    return dataclasses.replace(result, onnx=exported)


_GATES = ("max_kl", "min_top1", "min_cosine")


def _check_validate_options(options: Options) -> None:
    """Refuse measuring options without ``validate``, and bad ones with it, before anything is written."""
    given = [key for key in ("data", *_GATES, "measure") if options.get(key) not in (None, {})]
    if not options.get("validate"):
        if given:
            raise OptionError(f"{', '.join(given)} apply only with validate (--validate)")
        return
    from surgery.bars import check_bar_values
    from surgery.corpus import read_texts
    from surgery.loading import Settings

    check_bar_values(_gate_values(options))
    settings = Settings.from_options(_measure_options(options))
    read_texts(options.get("data"), text_field=settings.text_field)  # an unreadable text fails before writing


def _gate_values(options: Options) -> dict[str, float | None]:
    return {"max_kl": options.get("max_kl"), "min_top1": options.get("min_top1"), "min_cosine": options.get("min_cosine")}


def _measure_options(options: Options, *, trust: bool = False) -> MeasureOptions:
    measure: dict[str, Any] = {
        "quiet": options.get("quiet", False), "allow_pickle": options.get("allow_pickle", False),
        "trust_remote_code": options.get("trust_remote_code", False) or trust,
    }
    measure.update(options.get("measure") or {})
    return measure  # type: ignore[return-value]  # the keys of MeasureOptions, checked by Settings


def _validate_if_asked(source: Source, result: SurgeryResult, options: Options) -> SurgeryResult:
    """With ``validate``: compare the output with its source (recorded in OUT's card), or on a dry run
    the plan in memory. If measuring fails, a freshly written OUT is removed, as for the ONNX export."""
    if not options.get("validate"):
        return result
    import dataclasses
    import shutil

    original = None if source.name == "default" else source.name
    # A wide-block output runs the modelling code this run has just written: trusting it trusts this tool.
    measure = _measure_options(options, trust=bool(result.recipe.plan.groups))
    gates = _gate_values(options)
    max_kl, min_top1, min_cosine = gates["max_kl"], gates["min_top1"], gates["min_cosine"]
    if result.dry_run or result.out is None:
        report = validate(original, plan=result.recipe.plan, data=options.get("data"), max_kl=max_kl, min_top1=min_top1,
                          min_cosine=min_cosine, card=False, **measure)
        return dataclasses.replace(result, validation=report)
    try:
        report = validate(original, result.out, data=options.get("data"), max_kl=max_kl, min_top1=min_top1,
                          min_cosine=min_cosine, **measure)
    except BaseException:
        if not options.get("force", False):  # OUT did not exist before this run
            shutil.rmtree(result.out, ignore_errors=True)
        raise
    return dataclasses.replace(result, validation=report)


def _check_push_options(options: Options) -> None:
    """Refuse push options without a target, a bad repo id, and an unvalidated push, before any work is done."""
    repo_id = options.get("push_to_hub")
    if repo_id is None:
        if options.get("private") or options.get("token") or options.get("allow_unvalidated"):
            raise OptionError("private (--private), token (--token) and allow_unvalidated (--allow-unvalidated) "
                              "apply only with push_to_hub (--push-to-hub)")
        return
    from exporters.hub import check_repo_id

    check_repo_id(repo_id)
    if not options.get("validate") and not options.get("allow_unvalidated"):
        raise OptionError(
            f"push_to_hub (--push-to-hub {repo_id}) publishes only a validated output",
            hint="add validate (--validate) with its gates (--max-kl, --min-top1), or allow_unvalidated "
            "(--allow-unvalidated) to push without measuring",
        )


def _push_if_asked(result: SurgeryResult, options: Options) -> SurgeryResult:
    """Push the complete output to the Hub when ``push_to_hub`` names a repo (not on a dry run, and not
    when ``validate`` missed a gate: then ``result.pushed`` stays None)."""
    repo_id = options.get("push_to_hub")
    if repo_id is None:
        return result
    quiet = options.get("quiet", False)
    if result.dry_run or result.out is None:
        if not quiet:
            sys.stderr.write(f"dry run: nothing written, so nothing pushed to {repo_id}\n")
        return result
    if result.validation is not None and not result.validation.passed:
        return result  # the caller reports the missed gate (the CLI: exit 1); nothing is published
    import dataclasses

    from exporters.hub import push

    pushed = push(result.out, repo_id, private=options.get("private", False), token=options.get("token"), quiet=quiet,
                  allow_unvalidated=options.get("allow_unvalidated", False))
    if not quiet:
        sys.stderr.write(f"pushed {result.out} to {pushed.url} (commit {pushed.commit})\n")
    return dataclasses.replace(result, pushed=pushed)


def _our_output(new: PathLike | None) -> Path | None:
    """``new`` when it is a local output directory of this tool (its recipe and card beside the weights)."""
    if new is None:
        return None
    path = Path(new)
    return path if (path / RECIPE_FILENAME).is_file() and (path / CARD_FILENAME).is_file() else None


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
    card: bool = True,
    **options: Unpack[MeasureOptions],
) -> ValidationReport:
    """Compare a new model with its original (:func:`surgery.validate.validate`), and record the
    result in NEW's model card when NEW is an output of this tool.

    The card gets one row per text (replacing an earlier row for the same text; rows measured on
    other weights are dropped), the results as the Hub's ``model-index``, and the hashes of the
    weights and recipe measured, which :func:`exporters.hub.push` checks before publishing.

    Args:
        original: the source model (directory, ``.gguf``, Hub id, or None for the default).
        new: a checkpoint written from ``original`` (exclusive with ``plan``/``recipe``).
        plan: a plan run in memory instead of NEW (nothing is written, no card).
        recipe: a recipe file or output directory whose plan to run in memory.
        data: a ``.txt`` or ``.jsonl`` file, None for the default corpus (Hamlet), or a
            :class:`~surgery.corpus.TextSet` already read.
        max_kl: the gate on KL(original || new); a missed gate gives ``report.passed`` False (and is
            recorded in the card, so the push refuses it).
        min_top1: the gate on top-1 agreement (a share, 0-1), as ``max_kl``.
        min_cosine: the gate on the mean-pooled embedding cosine (encoders), as ``max_kl``.
        card: record the report in NEW's card (default True; only for an output of this tool).
        **options: see :class:`~surgery.loading.MeasureOptions`.

    Returns:
        The :class:`~surgery.report.ValidationReport`; ``report.card`` is the card it was recorded in.

    Raises:
        OptionError: as :func:`surgery.validate.validate`.
        PlanError: as :func:`surgery.validate.validate`.
        RecipeError: as :func:`surgery.validate.validate`.
        TokenizerMismatchError: as :func:`surgery.validate.validate`.
        DataError: as :func:`surgery.validate.validate`.
        ModelNotFoundError: as :func:`surgery.validate.validate`.
        CheckpointError: as :func:`surgery.validate.validate`.
        UnsupportedArchitectureError: as :func:`surgery.validate.validate`.
        ModelCardError: NEW's card does not parse.

    Example:
        >>> import surgery
        >>> report = surgery.validate(None, "out/smol-19", max_kl=0.5)  # doctest: +SKIP
        >>> report.card  # doctest: +SKIP
        'out/smol-19/README.md'
    """
    import dataclasses

    from surgery.validate import validate as measure

    target = _our_output(new) if card else None
    identity = output_identity(target) if target is not None else None  # the weights measured, hashed first
    report = measure(original, new, plan=plan, recipe=recipe, data=data, max_kl=max_kl, min_top1=min_top1,
                     min_cosine=min_cosine, **options)
    if target is None:
        return report
    path = update_card_with_validation(target, report.card_row(), identity=identity)
    return dataclasses.replace(report, card=str(path))


def prune(
    model: PathLike | None, out: PathLike | None, *, drop: str | None = None, keep: str | None = None,
    to_layers: int | None = None, method: str = "greedy", beam: int = 1, block_by: str = "measured",
    allow_parallel: bool = False, screen: int | None = None, search: SearchOptions | None = None,
    **options: Unpack[Options],
) -> SurgeryResult:
    """Drop layers: ``drop`` names the layers to remove, ``keep`` the ones to keep, or ``to_layers``
    the depth to reach, the layers to drop then found by a search (:func:`surgery.search.search`).

    With ``to_layers``, the model is loaded once and candidate plans are scored in memory by their
    KL(original || plan) on calibration windows; the chosen plan is measured on held-out windows
    and written like any prune (a plan with a parallel group, possible with ``allow_parallel``, as
    a wide-block checkpoint). ``result.search`` holds the :class:`~surgery.search.SearchReport`.

    Args:
        model: a model directory, ``.gguf`` file, Hub repo id, or None for the embedded default.
        out: the output directory (None with ``dry_run=True``).
        drop: ranges to remove, e.g. ``"10-20"`` or ``"3,7,10-12"``.
        keep: ranges to keep, e.g. ``"0-9,21-29"`` (exclusive with ``drop``).
        to_layers: the depth to reach (1 to L - 1), exclusive with ``drop`` and ``keep``.
        method: with ``to_layers``: ``greedy`` (default: one layer at a time, lowest measured KL),
            ``block`` (the best contiguous block) or ``score`` (lowest Block Influence, one pass).
        beam: with ``greedy``: plans kept per step (default 1).
        block_by: with ``block``: ``measured`` KL (default) or ``angular`` distance (one pass).
        allow_parallel: with ``greedy`` or ``block``: the search may merge consecutive layers into a
            parallel group.
        screen: with ``greedy`` or measured ``block``: candidates per step re-scored on the whole
            calibration budget after a screening on ``search["screen_tokens"]`` (default 4; 0: every
            candidate on the whole budget).
        search: with ``to_layers``: the text and measuring options (:class:`~surgery.search.SearchOptions`:
            ``data``, ``held_out``, ``eval_tokens``, ``max_tokens`` (calibration, default 4096),
            ``screen_tokens`` (default 1024), ``seq_len``, ...).
        **options: see :class:`Options`.

    Returns:
        The :class:`~surgery.engine.SurgeryResult` (``search`` set with ``to_layers``).

    Raises:
        OptionError: not exactly one of ``drop``, ``keep`` and ``to_layers``; search options without
            ``to_layers``; a bad ``to_layers``, method, beam or screen (see :func:`surgery.search.check_target`).
        PlanError: a malformed range, an index out of range, or nothing left.
        OutputExistsError: with ``to_layers``: OUT exists and ``force`` is False (checked before the search).
        SearchInterrupted: Ctrl-C during the search (the best plan so far is printed; nothing written).

    Example:
        >>> import surgery
        >>> result = surgery.prune(None, "out/smol-19", drop="10-20")  # doctest: +SKIP
        >>> len(result.recipe.plan)  # doctest: +SKIP
        19
        >>> result = surgery.prune(None, "out/smol-26", to_layers=26)  # doctest: +SKIP
        >>> result.search.plan, result.search.held_out.kl  # doctest: +SKIP
    """
    if sum(x is not None for x in (drop, keep, to_layers)) != 1:
        raise OptionError("give exactly one of drop (--drop), keep (--keep) and to_layers (--to-layers)")
    if to_layers is not None:
        return _prune_to(model, out, to_layers, method, beam, block_by, allow_parallel, screen, search or {}, options)
    if (method, beam, block_by, allow_parallel, screen, search) != ("greedy", 1, "measured", False, None, None):
        raise OptionError("method, beam, block_by, allow_parallel, screen and search apply only with to_layers "
                          "(--to-layers)")
    if drop is not None:
        return _run(model, out, lambda n: Plan.drop(drop, n), options)
    assert keep is not None  # narrowed by the check above
    return _run(model, out, lambda n: Plan.keep(keep, n), options)


def _prune_to(
    model: PathLike | None, out: PathLike | None, to_layers: int, method: str, beam: int, block_by: str,
    allow_parallel: bool, screen: int | None, search: SearchOptions, options: Options,
) -> SurgeryResult:
    """``prune(..., to_layers=N)``: every input checked, then the search, then the write of its plan."""
    import dataclasses

    from exporters.staging import check_output
    from surgery.search import check_target
    from surgery.search import search as run_search

    source = open_source(model, allow_pickle=options.get("allow_pickle", False), quiet=options.get("quiet", False))
    num_layers = count_layers(source.path, trust_remote_code=options.get("trust_remote_code", False))
    check_target(to_layers, num_layers, method, beam=beam, block_by=block_by, allow_parallel=allow_parallel,
                 screen=screen)
    _check_validate_options(options)
    _check_push_options(options)
    if out is None and not options.get("dry_run", False):
        raise OptionError("missing OUT, the output directory")
    if out is not None and not options.get("dry_run", False):  # an OUT that cannot be written fails before the search
        check_output(Path(out), force=options.get("force", False), protected=(source.path,))
    measure: dict[str, Any] = {"quiet": options.get("quiet", False), "allow_pickle": options.get("allow_pickle", False),
                               "trust_remote_code": options.get("trust_remote_code", False), **search}
    report = run_search(model, to_layers, method=method, beam=beam, block_by=block_by, allow_parallel=allow_parallel,
                        screen=screen, **measure)
    chosen = report.plan
    result = _run(model, out, lambda n: chosen, options)
    return dataclasses.replace(result, search=report)


def repeat(
    model: PathLike | None, out: PathLike | None, *, layers: str, times: int = 2, **options: Unpack[Options]
) -> SurgeryResult:
    """Repeat the contiguous block ``layers`` ``times`` times in place.

    Example:
        >>> surgery.repeat(None, "out/rep", layers="8-15", times=2)  # doctest: +SKIP
    """
    return _run(model, out, lambda n: Plan.repeat(layers, times, n), options)


def reorder(
    model: PathLike | None, out: PathLike | None, *, reverse: str | None = None, shuffle: str | None = None,
    seed: int = 0, order: str | None = None, **options: Unpack[Options],
) -> SurgeryResult:
    """Reverse or shuffle a contiguous block, or give an explicit order of all layers.

    Args:
        reverse: a block such as ``"4-25"`` to reverse.
        shuffle: a block to shuffle with ``random.Random(seed)``.
        seed: the shuffle seed.
        order: every layer exactly once, e.g. ``"0,1,3,2,4-29"``.

    Raises:
        OptionError: not exactly one of ``reverse``, ``shuffle``, ``order``.

    Example:
        >>> surgery.reorder(None, "out/rev", reverse="4-25")  # doctest: +SKIP
    """
    given = [v for v in (reverse, shuffle, order) if v is not None]
    if len(given) != 1:
        raise OptionError("give exactly one of reverse (--reverse), shuffle (--shuffle) and order (--order)")
    if reverse is not None:
        return _run(model, out, lambda n: Plan.reverse(reverse, n), options)
    if shuffle is not None:
        return _run(model, out, lambda n: Plan.shuffle(shuffle, seed, n), options)
    assert order is not None
    return _run(model, out, lambda n: Plan.order(order, n), options)


def apply(
    model: PathLike | None, out: PathLike | None, plan: Plan | str | None = None, *,
    recipe: PathLike | Recipe | None = None, **options: Unpack[Options],
) -> SurgeryResult:
    """Apply an explicit plan (a :class:`Plan` or range string) or a recipe file.

    Args:
        plan: e.g. ``"0-9,21-29,21-29"`` or a :class:`Plan`.
        recipe: a recipe file, an output directory of this tool, or a :class:`Recipe`;
            ``dtype``/``max_shard_size`` given here override the recipe's.

    Example:
        >>> surgery.apply(None, "out/x", "0-9,21-29,21-29")  # doctest: +SKIP
        >>> surgery.apply(None, "out/y", recipe="out/x")  # doctest: +SKIP
    """
    if (plan is None) == (recipe is None):
        raise OptionError("give exactly one of a plan (--layers) and a recipe (--recipe)")
    if recipe is not None:
        loaded = recipe if isinstance(recipe, Recipe) else Recipe.load(recipe)
        size = options.get("max_shard_size")
        write = WriteOptions(
            dtype=options.get("dtype") or loaded.options.dtype,
            max_shard_size=parse_size(size) if size else loaded.options.max_shard_size,
        )
        source = open_source(model, allow_pickle=options.get("allow_pickle", False), quiet=options.get("quiet", False))
        return _execute(source, out, Recipe(plan=loaded.plan, options=write, source=source.name), options)
    if isinstance(plan, Plan):
        fixed = plan
        return _run(model, out, lambda n: fixed, options)
    assert isinstance(plan, str)
    text = plan
    return _run(model, out, lambda n: Plan.from_ranges(text, n), options)


@dataclass(frozen=True)
class LayerInfo:
    """One layer of :func:`inspect`'s report."""

    index: int
    params: int
    bytes: int
    config: dict[str, Any]


@dataclass(frozen=True)
class ModelInfo:
    """What :func:`inspect` reports about a model."""

    source: str
    class_name: str
    model_type: str
    num_layers: int
    layer_prefix: str
    count_key: str
    layers: list[LayerInfo]
    other_params: int
    other_bytes: int
    shards: list[tuple[str, int]]
    shipped_code: CodeStatus | None = None  # wide-block outputs: the modelling code they carry

    @property
    def total_params(self) -> int:
        return self.other_params + sum(layer.params for layer in self.layers)

    def format(self) -> str:
        """The human-readable report printed by ``surgery inspect``."""
        lines = [
            f"model: {self.source}",
            f"architecture: {self.class_name} (model_type {self.model_type})",
            f"layers: {self.num_layers} under '{self.layer_prefix}.N' (config field '{self.count_key}')",
            f"parameters: {self.total_params:,} ({self.other_params:,} outside the layers)",
        ]
        if self.shipped_code is not None:
            lines.append(self.shipped_code.describe())
        fields = sorted({k for layer in self.layers for k in layer.config})
        lines.append(" ".join(["layer", "params".rjust(12), "bytes".rjust(10), *fields]))
        for layer in self.layers:
            extra = [str(layer.config.get(k)) for k in fields]
            lines.append(" ".join([f"{layer.index:>5}", f"{layer.params:>12,}", _human(layer.bytes).rjust(10), *extra]))
        lines.append("shards:")
        lines.extend(f"  {name}  {_human(size)}" for name, size in self.shards)
        return "\n".join(lines)


def inspect(model: PathLike | None, *, allow_pickle: bool = False, trust_remote_code: bool = False) -> ModelInfo:
    """Report a model's architecture, layer stack, per-layer config, sizes and shards.

    Args:
        model: a model directory, ``.gguf`` file, Hub repo id, or None for the embedded default.

    Returns:
        The :class:`ModelInfo`.

    Raises:
        ModelNotFoundError: MODEL does not exist.
        CheckpointError: a weights file, index or config that cannot be read.
        UnsupportedArchitectureError: no layer stack found.
        PickleRefusedError: pickle weights without ``allow_pickle``.

    Example:
        >>> print(surgery.inspect(None).format())  # doctest: +SKIP
    """
    source = open_source(model, allow_pickle=allow_pickle)
    names, weight_map = _tensor_names(source)
    if weight_map is not None:
        source.fetch(sorted(set(weight_map.values())))
    tensors = read_tensor_index(source.path)
    shipped = code_status(source.path)
    if shipped is not None:  # a wide-block output: its layer stack is read from its plan, not detected
        return _inspect_wide(source, tensors, shipped)
    arch = detect(source.path, names, trust_remote_code=trust_remote_code)
    params = [0] * arch.num_layers
    sizes = [0] * arch.num_layers
    other_params = other_bytes = 0
    for entry in tensors.values():
        layer = arch.layer_of(entry.name)
        if layer is None:
            other_params += entry.numel
            other_bytes += entry.nbytes
        else:
            params[layer] += entry.numel
            sizes[layer] += entry.nbytes
    shards: dict[str, int] = {}
    for entry in tensors.values():
        shards[entry.file.name] = max(shards.get(entry.file.name, 0), entry.file.stat().st_size)
    layers = [
        LayerInfo(i, params[i], sizes[i], {k: v[i] for k, v in arch.per_layer.items()})
        for i in range(arch.num_layers)
    ]
    return ModelInfo(
        source=source.name, class_name=arch.class_name, model_type=arch.model_type, num_layers=arch.num_layers,
        layer_prefix=arch.layer_prefix, count_key=arch.count_key, layers=layers,
        other_params=other_params, other_bytes=other_bytes, shards=sorted(shards.items()),
    )


WIDE_LAYER_PREFIX = "model.layers"  # where surgery.widen stores the positions of a wide-block output


def _inspect_wide(source: Source, tensors: dict[str, Any], shipped: CodeStatus) -> ModelInfo:
    """:func:`inspect` of a wide-block output, from its config's ``surgery_steps`` (no code from it runs)."""
    config = read_json_object(source.path / "config.json", "config")
    steps = config.get("surgery_steps")
    if not isinstance(steps, list) or not all(isinstance(s, dict) and isinstance(s.get("sources"), list) for s in steps):
        raise CheckpointError(str(source.path / "config.json"), "'surgery_steps' is not a list of steps with 'sources'")
    positions: list[dict[str, Any]] = []
    for step in steps:
        loop = step.get("loop", 1)
        for application in range(loop if isinstance(loop, int) and loop > 0 else 1):
            positions.append({"sources": format_ranges(list(step["sources"])), "application": application + 1,
                              "mlp_input": step.get("mlp_input", "-")})
    params, sizes = [0] * len(positions), [0] * len(positions)
    other_params = other_bytes = 0
    shards: dict[str, int] = {}
    for entry in tensors.values():
        shards[entry.file.name] = max(shards.get(entry.file.name, 0), entry.file.stat().st_size)
        parts = entry.name.split(".")
        index = parts[2] if entry.name.startswith(WIDE_LAYER_PREFIX + ".") and len(parts) > 2 else ""
        if index.isdigit() and int(index) < len(positions):
            params[int(index)] += entry.numel
            sizes[int(index)] += entry.nbytes
        else:
            other_params += entry.numel
            other_bytes += entry.nbytes
    layers = [LayerInfo(i, params[i], sizes[i], positions[i]) for i in range(len(positions))]
    architectures = config.get("architectures")
    return ModelInfo(
        source=source.name,
        class_name=str(architectures[0]) if isinstance(architectures, list) and architectures else "ParallelForCausalLM",
        model_type=f"surgery_parallel over {config.get('surgery_base_model_type')}",
        num_layers=len(positions), layer_prefix=WIDE_LAYER_PREFIX, count_key="num_hidden_layers", layers=layers,
        other_params=other_params, other_bytes=other_bytes, shards=sorted(shards.items()), shipped_code=shipped,
    )


def update_code(out: PathLike) -> CodeUpdate:
    """Re-ship this installation's modelling code into a wide-block output written by an earlier version.

    The weights are not touched: only the shipped ``.py`` files, the code revision and tested
    transformers range in ``config.json``, and the card's sentence about them are rewritten (each
    atomically). Run it when ``inspect`` or ``validate`` warns that an output's code is outdated.

    Args:
        out: a model directory written by ``surgery parallel`` (any version).

    Returns:
        The :class:`~surgery.widen.CodeUpdate` (files rewritten; none when already current).

    Raises:
        NotWideBlockError: ``out`` is not a wide-block output.

    Example:
        >>> from surgery import update_code
        >>> print(update_code("out/smol-par").summary())  # doctest: +SKIP
        out/smol-par: shipped modelling code is already current (revision 2)
    """
    return update_modeling_code(Path(out))


def parallel(
    model: PathLike | None, out: PathLike | None, *, groups: str, loop: int = 1, mlp_input: str = "exact",
    **options: Unpack[Options],
) -> SurgeryResult:
    """Merge groups of consecutive layers into wide blocks that run them in parallel (optionally looped).

    Each group of K layers becomes one block computing ``h' = (1/K) * sum_k L_k(h)``: the K
    layers run on the same input and their outputs are averaged; ``loop`` applies every block
    that many times in a row (weights stored once). The output is a Hugging Face model directory
    with its modelling code inside: load it with
    ``AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)``.

    Args:
        model: a model directory, ``.gguf`` file, Hub repo id, or None for the embedded default.
        out: the output directory (None with ``dry_run=True``).
        groups: comma-separated ranges, one group each, e.g. ``"10-13,14-17"``.
        loop: how many times in a row each merged group is applied (default 1).
        mlp_input: ``"exact"`` (each branch's MLP sees its own residual: equal to the averaged
            layers) or ``"shared"`` (every MLP sees ``h + mean_k attn_k(h)``: one layer of K·H heads
            and K·I MLP width; an approximation, reported as such).
        **options: see :class:`Options`.

    Returns:
        The :class:`~surgery.widen.ParallelResult`.

    Raises:
        ParallelGroupError: a group of one layer, overlapping groups, a group past the end, loop < 1.
        ParallelMergeError: the architecture (or a group of it) cannot be merged exactly.
        OptionError: an unknown ``mlp_input``.

    Example:
        >>> from surgery import parallel
        >>> parallel(None, "out/smol-par", groups="10-13,14-17", loop=3)  # doctest: +SKIP
        >>> # the plan: 0-9,[10-13]x3,[14-17]x3,18-29
    """
    return _run(model, out, lambda n: Plan.parallel(groups, loop, n, mlp_input=mlp_input), options)


class HealOptions(TypedDict, total=False):
    """Options of :func:`heal` (and ``surgery heal``); see :class:`surgery.healing.HealSettings` for the defaults.

    steps, max_minutes, rank, alpha, lr, batch_size, seq_len, held_out, eval_tokens, top_k, seed:
        the training recipe.
    layers: NEW's blocks that get LoRA adapters, in range syntax (``"10-15"``; ``""`` for none);
        default: the blocks around each cut of the plan.
    full_layers: NEW's blocks trained in full, in range syntax.
    init: ``"linear"`` (default) bridges each cut in closed form before training; ``"none"`` does not.
    select: keep training only when it lowers the KL on validation windows (default True).
    device: ``cpu``, ``cuda`` or ``auto``.
    text_field: the JSON field holding the text in a ``.jsonl`` file.
    validate: once OUT is written, run :func:`validate` on it against ORIGINAL, on the held-out
        text (never trained on), and record the report in OUT's card (``report.validation``).
    max_kl, min_top1: with ``validate``, its gates (``report.validation.passed``).
    prompts, new_tokens: with ``validate``, its greedy-agreement prompts and tokens per prompt.
    quiet, allow_pickle, trust_remote_code: as for every verb.
    """

    steps: int
    max_minutes: float | None
    rank: int
    alpha: int
    lr: float
    batch_size: int
    seq_len: int
    held_out: float
    eval_tokens: int
    top_k: int
    seed: int
    layers: str | None
    full_layers: str | None
    init: str
    select: bool
    device: str
    text_field: str
    validate: bool
    max_kl: float | None
    min_top1: float | None
    prompts: int
    new_tokens: int
    quiet: bool
    allow_pickle: bool
    trust_remote_code: bool


def heal(
    original: PathLike | None,
    new: PathLike | None,
    out: PathLike | None,
    *,
    plan: str | Plan | None = None,
    recipe: PathLike | Recipe | None = None,
    data: PathLike | None = None,
    force: bool = False,
    dry_run: bool = False,
    **options: Unpack[HealOptions],
) -> HealReport:
    """Recover what surgery cost: train NEW to match ORIGINAL by distillation (LoRA, merged), write OUT.

    NEW is an output of this tool, or (``plan``/``recipe``, as for :func:`surgery.validate`) a plan
    of ORIGINAL, written first into a temporary directory beside OUT. OUT is NEW with the trained
    tensors replaced: the same kind of checkpoint (standard or wide-block), loading with stock
    transformers, with the heal recipe and the held-out before/after table in its card and in
    ``surgery-heal.json``. See :mod:`surgery.healing` for the method.

    Args:
        original: the model NEW was made from (directory, ``.gguf``, Hub id, None for the default).
        new: an output directory of this tool (None with ``plan``/``recipe``).
        out: the directory to write (None only with ``dry_run``).
        plan: instead of NEW: a plan of ORIGINAL in range syntax (``"0-12,17-29"``) or a :class:`Plan`.
        recipe: instead of NEW: a recipe file or output directory whose plan to apply.
        data: a ``.txt``/``.jsonl`` file; None for the default corpus (Hamlet).
        force: replace an existing OUT (only once the new one is complete).
        dry_run: train and measure, write nothing.
        **options: see :class:`HealOptions`.

    Returns:
        The :class:`~surgery.healing.HealReport`.

    Raises:
        OptionError: a bad option, not exactly one of NEW / plan / recipe, or ``validate`` with
            ``dry_run`` (nothing is written to validate; the report's held-out table is the
            in-memory measurement), or a gate without ``validate``.
        PlanError: NEW not made from a model with ORIGINAL's layer count, or a block outside NEW.
        TokenizerMismatchError: different vocabularies or tokenizers.
        DataError: an empty or too short text.
        OutputExistsError: OUT exists and ``force`` is False.

    Example:
        >>> import surgery
        >>> report = surgery.heal(None, "out/smol-26", "out/smol-26-healed", max_minutes=15)  # doctest: +SKIP
        >>> print(report.table())  # doctest: +SKIP
    """
    import dataclasses
    import shutil
    import tempfile

    from surgery.healing import HealSettings, heal_checkpoint, parse_positions
    from surgery.loading import Settings

    if sum(x is not None for x in (new, plan, recipe)) != 1:
        raise OptionError("give exactly one of NEW (an output of this tool), a plan (--plan) and a recipe (--recipe)")
    _check_heal_validation(options, dry_run=dry_run)
    training: dict[str, Any] = {key: options[key] for key in (
        "steps", "max_minutes", "rank", "alpha", "lr", "batch_size", "seq_len", "held_out", "eval_tokens", "top_k", "seed", "init", "select",
    ) if key in options}
    settings = dataclasses.replace(
        HealSettings(), **training,
        layers=parse_positions(options.get("layers")),
        full_layers=parse_positions(options.get("full_layers")) or (),
    )
    settings.check()
    measure = Settings.from_options({
        "device": options.get("device", "auto"), "quiet": options.get("quiet", False),
        "text_field": options.get("text_field", "text"), "allow_pickle": options.get("allow_pickle", False),
        "trust_remote_code": options.get("trust_remote_code", False),
    })
    if new is not None:
        report = heal_checkpoint(original, new, out, data=data, heal_settings=settings, measure=measure,
                                 force=force, dry_run=dry_run)
        return _validate_healed(original, report, options)
    # A plan of ORIGINAL: written (with its card and recipe) into a private directory beside OUT, healed, removed.
    parent = Path(out).resolve().parent if out is not None else None
    if parent is not None:
        parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".surgery-heal-", dir=parent))
    try:
        written = scratch / "new"
        if plan is not None:
            apply(original, written, plan, quiet=measure.quiet, allow_pickle=measure.allow_pickle,
                  trust_remote_code=measure.trust_remote_code)
        else:
            apply(original, written, recipe=recipe, quiet=measure.quiet, allow_pickle=measure.allow_pickle,
                  trust_remote_code=measure.trust_remote_code)
        report = heal_checkpoint(original, written, out, data=data, heal_settings=settings, measure=measure,
                                 force=force, dry_run=dry_run)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return _validate_healed(original, report, options)


_HEAL_VALIDATION_ONLY = ("max_kl", "min_top1", "prompts", "new_tokens")


def _check_heal_validation(options: HealOptions, *, dry_run: bool) -> None:
    """Refuse validation options that cannot apply, before any training."""
    if not options.get("validate"):
        given = [key for key in _HEAL_VALIDATION_ONLY if options.get(key) is not None]
        if given:
            raise OptionError(f"{', '.join(given)} apply only with validate (--validate)")
        return
    if dry_run:
        raise OptionError("validate (--validate) measures the written OUT; a dry run writes nothing",
                          hint="drop --dry-run (the dry run's held-out table is its in-memory measurement)")
    from surgery.bars import check_bar_values

    check_bar_values({"max_kl": options.get("max_kl"), "min_top1": options.get("min_top1"), "min_cosine": None})


def _validate_healed(original: PathLike | None, report: HealReport, options: HealOptions) -> HealReport:
    """With ``validate``: measure the written OUT against ORIGINAL on the held-out text (the last
    ``held_out`` share, which training never saw) and record it in OUT's card. A failure while
    measuring leaves OUT as written (complete, its card without validation: push refuses it)."""
    if not options.get("validate") or report.out is None:
        return report
    import dataclasses

    from surgery.corpus import TextSet

    held_out = TextSet(f"{report.data} (held out: its last {report.settings.held_out:.0%}, not trained on)",
                       (report.held_out_text,))
    # A wide-block OUT runs the modelling code this tool wrote into it: trusting it trusts this tool.
    wide = read_json_object(Path(report.out) / "config.json", "config.json").get("model_type") == "surgery_parallel"
    measure: dict[str, Any] = {
        "device": options.get("device", "auto"), "quiet": options.get("quiet", False),
        "allow_pickle": options.get("allow_pickle", False),
        "trust_remote_code": options.get("trust_remote_code", False) or wide,
        "seq_len": report.settings.seq_len,  # the windows heal measured its held-out table with
        **{key: options[key] for key in ("prompts", "new_tokens") if options.get(key) is not None},
    }
    validation = validate(original, report.out, data=held_out, max_kl=options.get("max_kl"),
                          min_top1=options.get("min_top1"), **measure)
    return dataclasses.replace(report, validation=validation)
