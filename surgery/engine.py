"""The one engine: execute a plan on a source checkpoint, streaming tensors into a new one.

plan (which layers) -> architecture (where they live, how the config follows) -> engine (which
output tensor comes from which source byte range) -> writer (``exporters.safetensors``).

Every rewrite runs the one orchestration, :func:`run_rewrite` (check OUT, detect, check the plan,
plan the tensors, write), given a :class:`Rewrite` saying what its kind of plan does differently:
:data:`LAYER_REWRITE` here (:func:`execute`: plans of whole layers), the wide blocks'
``WIDE_REWRITE`` in :mod:`surgery.widen` (one floor up). :mod:`surgery.api` chooses between the two.
"""

from __future__ import annotations

import json
import shutil
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from exporters.safetensors import OutputTensor, layout_shards, output_dtype, write_shards
from exporters.staging import check_output, staged_output
from surgery.architecture import Architecture, detect, read_config
from surgery.checkpoint import INDEX_FILENAME, TensorEntry, read_header, read_index, read_tensor_index
from surgery.errors import CheckpointError, PlanError, UnsupportedArchitectureError
from surgery.plan import RECIPE_FILENAME, Plan, Recipe
from surgery.source import Source

_TORCH_DTYPE_NAMES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


class ExportRecord(Protocol):
    """What an export attached to a result offers: :class:`exporters.onnx.OnnxExportResult` is one
    (declared here as a protocol because the exporters sit on a floor above the engine)."""

    @property
    def out(self) -> Path: ...

    def summary(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


class ValidationRecord(Protocol):
    """What a validation attached to a result offers: :class:`surgery.report.ValidationReport` is one
    (a protocol here, as measuring sits on a floor above the engine)."""

    @property
    def passed(self) -> bool: ...

    @property
    def missed(self) -> list[str]: ...

    def format(self) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class SurgeryResult:
    """What a plan produced (or, on a dry run, would produce).

    Attributes:
        out: the output directory (None when nothing was written).
        recipe: the plan and options that were applied.
        architecture: the source's layer stack.
        shards: ``(filename, bytes)`` of every output shard.
        source_params: parameters in the source checkpoint.
        output_params: parameters in the output checkpoint.
        dry_run: True when nothing was written.
        onnx: the ONNX export into ``OUT/onnx`` (an :class:`exporters.onnx.OnnxExportResult`), when asked for.
        validation: OUT compared with its source (a :class:`surgery.report.ValidationReport`), when asked for.
        pushed: the push to the Hub (an :class:`exporters.hub.PushResult`), when asked for and made.
        search: the search that chose the plan (a :class:`surgery.search.SearchReport`), for
            ``prune --to-layers``.
    """

    out: Path | None
    recipe: Recipe
    architecture: Architecture
    shards: list[tuple[str, int]]
    source_params: int | None
    output_params: int
    dry_run: bool
    onnx: ExportRecord | None = None
    validation: ValidationRecord | None = None
    pushed: Any = None
    search: Any = None

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.shards)

    def summary(self) -> str:
        """The layer mapping and sizes, as the CLI prints them."""
        plan = self.recipe.plan
        arch = self.architecture
        lines = [
            f"{arch.class_name}: {arch.num_layers} layers -> {len(plan)} ({', '.join(plan.operations) or 'unchanged'})",
            f"plan: {plan}",
            "new <- source",
        ]
        types = arch.per_layer.get("layer_types")
        for new, src in plan.mapping():
            note = f"  {types[src]}" if types else ""
            lines.append(f"{new:>3} <- {src:<3}{note}".rstrip())
        dtype = self.recipe.options.dtype or "as source"
        lines.append(
            f"parameters: {_count(self.source_params)} -> {self.output_params:,}; "
            f"output: {_human(self.total_bytes)} in {len(self.shards)} shard(s), dtype {dtype}"
        )
        verb = "would write" if self.dry_run else "wrote"
        lines.append(f"{verb} {self.out}" if self.out else "nothing written")
        return "\n".join(lines)


# Writes the model card into the staging directory (``exporters.card.write_card``): passed down by the
# API, because the card is built on a floor above the engine.
CardWriter = Callable[[Path, SurgeryResult, Source], object]


def _count(params: int | None) -> str:
    """A parameter count for people: ``134,515,008``, or ``unknown`` when it could not be read."""
    return "unknown" if params is None else f"{params:,}"


def _human(size: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        # Compared after rounding to one decimal: 999,950 B is "1.0 MB", not "1000.0 KB".
        if (int(size) if unit == "B" else round(size, 1)) < 1000:
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1000
    return f"{size:.1f} TB"


def _tensor_names(source: Source) -> tuple[list[str], dict[str, str] | None]:
    """Tensor names and, when the source is sharded, the name -> shard map (from the index alone)."""
    weight_map = read_index(source.path, pending=set(source.pending_files))
    if weight_map is not None:
        return list(weight_map), weight_map
    source.fetch(source.pending_files)
    return list(read_tensor_index(source.path)), None


def read_needed_tensors(source: Source, weight_map: dict[str, str] | None, needed: list[str]) -> dict[str, TensorEntry]:
    """Headers of the shards that hold ``needed`` (fetched first for a Hub source), or of every file when unsharded.

    With an index, each tensor is read from the shard the index names for it, even when another
    shard holds a tensor of the same name (the index is authoritative).

    Raises:
        CheckpointError: the index names a tensor that its shard does not hold.
    """
    if weight_map is None:
        return read_tensor_index(source.path)
    files = sorted({weight_map[n] for n in needed})
    source.fetch(files)
    headers = {file: read_header(source.path / file)[0] for file in files}
    tensors: dict[str, TensorEntry] = {}
    for name in needed:
        entry = headers[weight_map[name]].get(name)
        if entry is None:
            raise CheckpointError(
                str(source.path / INDEX_FILENAME), f"weight_map[{name!r}] names {weight_map[name]!r}, which does not hold it"
            )
        tensors[name] = entry
    return tensors


def plan_tensors(
    tensors: dict[str, TensorEntry], architecture: Architecture, recipe: Recipe
) -> list[OutputTensor]:
    """Every output tensor in write order: leading non-layer tensors, the plan's layers, the rest.

    Args:
        tensors: the source tensors (from :func:`surgery.checkpoint.read_tensor_index`).
        architecture: the source's layer stack.
        recipe: the plan and the dtype cast.

    Returns:
        The output tensors; each names its source byte range.
    """
    ordered = sorted(tensors.values(), key=lambda e: (e.file.name, e.start))
    by_layer: dict[int, list[TensorEntry]] = {}
    leading: list[TensorEntry] = []
    trailing: list[TensorEntry] = []
    for entry in ordered:
        layer = architecture.layer_of(entry.name)
        if layer is not None:
            by_layer.setdefault(layer, []).append(entry)
        else:
            (trailing if by_layer else leading).append(entry)
    cast = recipe.options.dtype

    def out(name: str, entry: TensorEntry) -> OutputTensor:
        return OutputTensor(name, entry, output_dtype(entry.dtype, cast))

    result = [out(e.name, e) for e in leading]
    for new_index, source_index in recipe.plan.mapping():
        result.extend(out(architecture.rename(e.name, new_index), e) for e in by_layer.get(source_index, []))
    result.extend(out(e.name, e) for e in trailing)
    return result


def execute(
    source: Source,
    out: Path | None,
    recipe: Recipe,
    *,
    card: CardWriter,
    force: bool = False,
    dry_run: bool = False,
    quiet: bool = False,
    trust_remote_code: bool = False,
) -> SurgeryResult:
    """Apply a recipe without parallel groups to a source checkpoint and write the new model into ``out``.

    A plan with groups is :func:`surgery.widen.execute_parallel`'s (``surgery.api`` dispatches);
    both run :func:`run_rewrite`, each with its own :class:`Rewrite`.

    Args:
        source: from :func:`surgery.source.open_source`.
        out: the output directory; it must not exist unless ``force``.
        recipe: the plan and write options.
        card: writes the model card into the staging directory (:func:`exporters.card.write_card`;
            passed in because the card sits on a floor above the engine).
        force: replace an existing ``out``.
        dry_run: plan and size everything, write nothing.
        quiet: no progress bar.
        trust_remote_code: allow a model whose code ships in its repository.

    Returns:
        The :class:`SurgeryResult`.

    Raises:
        PlanError: the plan does not fit this model, or it has parallel groups.
        UnsupportedArchitectureError: no layer stack, or a config that cannot follow the plan.
        CheckpointError: missing or corrupt weights.
        OutputExistsError: ``out`` exists and ``force`` is False.

    Example:
        >>> from surgery.source import open_source  # doctest: +SKIP
        >>> from surgery.plan import Plan, Recipe  # doctest: +SKIP
        >>> from exporters.card import write_card  # doctest: +SKIP
        >>> execute(open_source(None), Path("out"), Recipe(Plan.drop("10-20", 30)), card=write_card)  # doctest: +SKIP
    """
    if recipe.plan.groups:  # never written as plain layers: wide blocks need fused weights and shipped code
        raise PlanError("surgery.engine.execute writes plans without parallel groups; "
                        "write this one with surgery.widen.execute_parallel (as surgery.api does)")
    return run_rewrite(
        LAYER_REWRITE, source, out, recipe, card=card, force=force, dry_run=dry_run, quiet=quiet,
        trust_remote_code=trust_remote_code,
    )


_Result = TypeVar("_Result", bound=SurgeryResult)


@dataclass(frozen=True)
class Rewrite(Generic[_Result]):
    """What differs between kinds of plan; :func:`run_rewrite` is the one orchestration they share.

    Attributes:
        result_type: the result class (:class:`SurgeryResult` or a subclass).
        check: refuses a plan this architecture cannot take: ``check(architecture, plan, tensor_names)``.
        to_outputs: the output tensors from the needed source tensors (:func:`plan_tensors`).
        new_config: the output ``config.json`` from the source's: ``new_config(raw, architecture, recipe)``.
        before_files: run on the staging directory once weights and config are written (a
            read-back check, shipped modelling code), or None.
        skip_files: source files not copied (because ``before_files`` writes them).
        with_transformers: derive the architecture through transformers even when config.json
            states it (see :func:`surgery.architecture.detect`).
    """

    result_type: type[_Result]
    check: Callable[[Architecture, Plan, list[str]], None]
    to_outputs: Callable[[dict[str, TensorEntry], Architecture, Recipe], list[OutputTensor]]
    new_config: Callable[[dict[str, Any], Architecture, Recipe], dict[str, Any]]
    before_files: Callable[[Path, Architecture, Recipe], object] | None = None
    skip_files: frozenset[str] = frozenset()
    with_transformers: bool = False


def run_rewrite(
    rewrite: Rewrite[_Result],
    source: Source,
    out: Path | None,
    recipe: Recipe,
    *,
    card: CardWriter,
    force: bool,
    dry_run: bool,
    quiet: bool,
    trust_remote_code: bool,
) -> _Result:
    """The one orchestration of every rewrite: check OUT, detect, check the plan, plan, write.

    Args:
        rewrite: what this kind of plan does differently (:data:`LAYER_REWRITE`, or the wide
            blocks' in :mod:`surgery.widen`).
        source, out, recipe, card, force, dry_run, quiet, trust_remote_code: as in :func:`execute`.

    Returns:
        The result, of ``rewrite.result_type``.

    Raises:
        PlanError, UnsupportedArchitectureError, CheckpointError, OutputExistsError: as in :func:`execute`.

    Example:
        >>> run_rewrite(LAYER_REWRITE, source, None, recipe, card=write_card, force=False, dry_run=True,
        ...             quiet=True, trust_remote_code=False)  # doctest: +SKIP
    """
    if out is not None and not dry_run:
        check_output(out, force=force, protected=source.protected_paths())
    names, weight_map = _tensor_names(source)
    architecture = detect(
        source.path, names, trust_remote_code=trust_remote_code, with_transformers=rewrite.with_transformers
    )
    rewrite.check(architecture, recipe.plan, names)
    result, shards = plan_output(
        rewrite.result_type, source, out, recipe, architecture, names, weight_map, rewrite.to_outputs, dry_run=dry_run
    )
    if dry_run or out is None:
        return result
    new_config = rewrite.new_config(read_config(source.path), architecture, recipe)
    before = rewrite.before_files
    write_output(
        source, out, result, shards, new_config, card=card, force=force, quiet=quiet,
        before_files=None if before is None else lambda staging: before(staging, architecture, recipe),
        skip_files=rewrite.skip_files,
    )
    return result


def layer_config(raw: dict[str, Any], architecture: Architecture, recipe: Recipe) -> dict[str, Any]:
    """The output ``config.json`` of a plan of whole layers: layer count and per-layer fields follow the
    plan (:meth:`~surgery.architecture.Architecture.rewrite_config`), and ``dtype`` the cast."""
    new_config = architecture.rewrite_config(raw, recipe.plan)
    if recipe.options.dtype is not None:
        # Every dtype key the source states (transformers 4 reads torch_dtype, 5 dtype): a stale one would
        # make `dtype="auto"` load the weights in the source's dtype.
        for key in [k for k in ("dtype", "torch_dtype") if k in new_config] or ["dtype"]:
            new_config[key] = _TORCH_DTYPE_NAMES[recipe.options.dtype]
    return new_config




def plan_output(
    result_type: type[_Result],
    source: Source,
    out: Path | None,
    recipe: Recipe,
    architecture: Architecture,
    names: list[str],
    weight_map: dict[str, str] | None,
    to_outputs: Callable[[dict[str, TensorEntry], Architecture, Recipe], list[OutputTensor]],
    *,
    dry_run: bool,
) -> tuple[_Result, list[tuple[str, list[OutputTensor]]]]:
    """Read the headers of the tensors a plan needs, plan the output tensors and lay out the shards.

    The planning half shared by both rewrites (plain layer plans here, wide blocks in
    :mod:`surgery.widen`, which pass their own ``to_outputs``); no tensor data is read.

    Args:
        result_type: the result class to build (:class:`SurgeryResult` or a subclass).
        source: the source model; only the shards holding needed tensors are fetched.
        out: the output directory (recorded in the result).
        recipe: the plan and write options.
        architecture: the detected architecture.
        names: every tensor name of the source.
        weight_map: tensor name -> shard file (None: one unsharded file).
        to_outputs: builds the output tensors from the needed source tensors.
        dry_run: recorded in the result.

    Returns:
        The result (sizes, parameter counts) and the shards to write.

    Raises:
        CheckpointError: missing or corrupt weights.

    Example:
        >>> result, shards = plan_output(SurgeryResult, source, None, recipe, arch, names, weight_map,
        ...                              plan_tensors, dry_run=True)  # doctest: +SKIP
    """
    used = set(recipe.plan.source_sequence())
    needed = [n for n in names if (layer := architecture.layer_of(n)) is None or layer in used]
    tensors = read_needed_tensors(source, weight_map, needed)
    outputs = to_outputs({n: tensors[n] for n in needed}, architecture, recipe)
    shards = layout_shards(outputs, recipe.options.max_shard_size)
    result = result_type(
        out=out,
        recipe=recipe,
        architecture=architecture,
        shards=[(name, sum(t.nbytes for t in group)) for name, group in shards],
        source_params=source.parameter_count(),
        output_params=sum(t.source.numel for t in outputs),
        dry_run=dry_run,
    )
    return result, shards


def write_output(
    source: Source,
    out: Path,
    result: SurgeryResult,
    shards: list[tuple[str, list[OutputTensor]]],
    config: dict[str, Any],
    *,
    card: CardWriter,
    force: bool,
    quiet: bool,
    before_files: Callable[[Path], object] | None = None,
    skip_files: frozenset[str] = frozenset(),
) -> None:
    """Write a planned output into a staging directory and rename it into place as ``out``.

    The one writer of both rewrites (plain layer plans here, wide blocks in :mod:`surgery.widen`):
    the shards (with a progress bar), ``config.json``, the source's other files (tokenizer,
    generation config, ...), the recipe and the model card. Nothing appears at ``out`` unless all
    of it succeeds.

    Args:
        source: the source model (its other files are copied; it is never modified).
        out: the output directory.
        result: the planned result (sizes for the progress bar, facts for the card).
        shards: ``(file name, tensors)`` per shard, from :func:`~exporters.safetensors.layout_shards`.
        config: the new ``config.json`` contents.
        card: writes the model card last, into the staging directory (it reads everything above).
        force: replace an existing ``out`` (only once the new one is complete).
        quiet: no progress bar.
        before_files: called with the staging directory once the weights and config are written
            (a read-back check, shipped modelling code).
        skip_files: names of source files not to copy (files the caller writes itself).

    Raises:
        OutputExistsError: ``out`` exists and ``force`` is False.
        CheckpointError: a source tensor cannot be read.

    Example:
        >>> write_output(source, Path("out"), result, shards, config, card=write_card, force=False, quiet=True)  # doctest: +SKIP
    """
    with staged_output(out, force=force) as staging:
        if quiet:  # no bar: and no tqdm import (with asyncio, 33 ms of a 0.5 s prune)
            write_shards(staging, shards)
        else:
            from tqdm.auto import tqdm

            with tqdm(total=result.total_bytes, unit="B", unit_scale=True, desc="writing", file=sys.stderr) as bar:
                write_shards(staging, shards, on_bytes=bar.update)
        (staging / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if before_files is not None:
            before_files(staging)
        for extra in source.other_files():
            if extra.name in skip_files:
                continue
            target = staging / extra.relative_to(source.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(extra, target)
        (staging / RECIPE_FILENAME).write_text(result.recipe.to_yaml())
        card(staging, result, source)  # the model card (README.md), derived from all of the above


def _check_config_reads_back(directory: Path, architecture: Architecture, recipe: Recipe) -> None:
    """Load the written config with transformers and check every per-layer field follows the plan.

    This catches a config class that re-derives a per-layer list from some other field. A stack read
    from config.json alone needs no check (its family derives nothing more: ``STATED_IN_CONFIG``,
    checked against transformers in the tests), so that write path never imports transformers.
    """
    if architecture.from_files:
        return
    from transformers import AutoConfig

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = AutoConfig.from_pretrained(str(directory), trust_remote_code=False)
    except ValueError as exc:
        if "trust_remote_code" in str(exc):  # a config class that ships as code: not run on our own output
            return
        raise
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text_config.num_hidden_layers != len(recipe.plan):
        raise UnsupportedArchitectureError(architecture.model_type, "the rewritten config does not read back its layer count")
    for field, expected in architecture.expected_fields(recipe.plan).items():
        got = getattr(text_config, field, None)
        if got is not None and list(got) != expected:
            raise UnsupportedArchitectureError(
                architecture.model_type,
                f"config field {field!r} does not read back as the plan requires after rewriting",
            )


# Plans of whole layers: dropped, repeated, reordered.
LAYER_REWRITE: Rewrite[SurgeryResult] = Rewrite(
    result_type=SurgeryResult,
    check=lambda architecture, plan, _names: architecture.check_plan(plan),
    to_outputs=plan_tensors,
    new_config=layer_config,
    before_files=_check_config_reads_back,
)
