"""The plan: which source layers, in which order, make up the new model.

Every verb (prune, repeat, reorder, apply), every recipe file and every API call builds one
:class:`Plan`; one engine executes any plan. A plan is frozen, prints as the range syntax users
write (``0-9,21-29,21-29``), and knows how many layers its source has so that it can refuse a
model it was not made for.

The range syntax is 0-based and inclusive: ``3``, ``10-20``, ``3,7,10-12``. A step may also be a
:class:`ParallelGroup` of consecutive layers run in parallel on the same input and averaged:
``[10-13]``, looped ``[10-13]x3`` (the merged block applied three times in a row), and with the
shared-MLP-input approximation ``[10-13]x3:shared``; e.g. ``0-9,[10-13]x3,[14-17]x3,18-29``.
"""

from __future__ import annotations

import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from surgery.checkpoint import open_regular
from surgery.errors import (
    EmptyPlanError,
    LayerIndexError,
    OptionError,
    ParallelGroupError,
    PlanError,
    RangeSyntaxError,
    RecipeError,
)

RECIPE_FILENAME = "surgery-recipe.yaml"
RECIPE_VERSION = 1
MAX_RECIPE_BYTES = 16 * 1024 * 1024

# The most layer positions a plan (or a range, or a model) may have: every count a user writes is
# checked against it before a list of that length is built.
MAX_POSITIONS = 100_000

_ITEM = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")
_GROUP_ITEM = re.compile(r"^\s*\[\s*(\d+)\s*(?:-\s*(\d+)\s*)?\]\s*(?:x\s*(\d+)\s*)?(?::\s*([a-z]+)\s*)?$")
MLP_INPUTS = ("exact", "shared")


def parse_ranges(text: str, limit: int | None = None) -> list[int]:
    """Parse the range syntax into the list of indices it names, in order, repeats kept.

    Every item is parsed and bounded before any list is built: with ``limit`` (the model's layer
    count) an index past it is refused, and in any case the text may name at most
    :data:`MAX_POSITIONS` indices, so ``0-999999999999`` is an error, not a giant allocation.

    Args:
        text: comma-separated items, each ``N`` or ``A-B`` with ``A <= B`` (inclusive).
        limit: refuse indices ``>= limit`` (None: no model to check against).

    Returns:
        The indices in the order written; ``"0-2,1"`` gives ``[0, 1, 2, 1]``.

    Raises:
        RangeSyntaxError: an empty item, a non-number, an open range (``10-``), a descending one
            (``20-10``), or more than :data:`MAX_POSITIONS` indices in all.
        LayerIndexError: an index at or past ``limit``.

    Example:
        >>> parse_ranges("3,7,10-12")
        [3, 7, 10, 11, 12]
    """
    if not isinstance(text, str) or not text.strip():
        raise RangeSyntaxError(str(text), "it is empty")
    items: list[tuple[int, int]] = []
    for item in text.split(","):
        match = _ITEM.match(item)
        if match is None:
            reason = "an empty item" if not item.strip() else f"{item.strip()!r} is not N or A-B with whole numbers"
            raise RangeSyntaxError(text, reason)
        start = _whole(match.group(1), text)
        end = _whole(match.group(2), text) if match.group(2) is not None else start
        if end < start:
            raise RangeSyntaxError(text, f"{start}-{end} runs backwards (write the lower index first)")
        items.append((start, end))
    if limit is not None:
        for start, end in items:
            if end >= limit:
                raise LayerIndexError(max(start, limit), limit)
    _check_count(text, sum(end - start + 1 for start, end in items))
    indices: list[int] = []
    for start, end in items:
        indices.extend(range(start, end + 1))
    return indices


def _whole(digits: str, text: str) -> int:
    """A whole number from the range syntax; a number too long to be a layer index is refused."""
    if len(digits) > 18:
        raise RangeSyntaxError(text, f"{digits[:20]}... is too large to be a layer index")
    return int(digits)


def _check_count(text: str, count: int) -> None:
    """Refuse a range that names more than :data:`MAX_POSITIONS` layers (before any list is built)."""
    if count > MAX_POSITIONS:
        raise RangeSyntaxError(text, f"it names {count:,} layers; at most {MAX_POSITIONS:,} are allowed")


def format_ranges(indices: tuple[int, ...] | list[int]) -> str:
    """Write indices in the range syntax, folding ascending runs: ``[0,1,2,5]`` -> ``0-2,5``.

    Example:
        >>> format_ranges([0, 1, 2, 5, 4])
        '0-2,5,4'
    """
    parts: list[str] = []
    i = 0
    while i < len(indices):
        j = i
        while j + 1 < len(indices) and indices[j + 1] == indices[j] + 1:
            j += 1
        parts.append(str(indices[i]) if i == j else f"{indices[i]}-{indices[j]}")
        i = j + 1
    return ",".join(parts)


def _check_range(indices: list[int], num_layers: int) -> None:
    for index in indices:
        if not 0 <= index < num_layers:
            raise LayerIndexError(index, num_layers)


@dataclass(frozen=True)
class ParallelGroup:
    """Consecutive source layers run in parallel on the same input, their outputs averaged.

    The group computes ``h' = (1/K) * sum_k L_k(h)`` over its K layers; with ``loop = r`` that
    block is applied r times in a row with the same weights. Range syntax: ``[10-13]``, looped
    ``[10-13]x3``, shared-MLP-input approximation ``[10-13]x3:shared`` (see :mod:`surgery.widen`).

    Attributes:
        layers: the source layers: at least two, consecutive and ascending.
        loop: how many times in a row the merged block is applied (at least 1).
        mlp_input: ``exact`` (each branch's MLP sees its own residual ``h + attn_k(h)``: equal to
            the averaged layers) or ``shared`` (every MLP sees ``h + mean_k attn_k(h)``: an approximation).

    Raises:
        ParallelGroupError: fewer than two layers, layers not consecutive, a loop below 1.
        OptionError: an unknown ``mlp_input``.

    Example:
        >>> group = ParallelGroup((10, 11, 12, 13), loop=3)
        >>> str(group), len(group)
        ('[10-13]x3', 4)
    """

    layers: tuple[int, ...]
    loop: int = 1
    mlp_input: str = "exact"

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", tuple(self.layers))
        shown = f"[{format_ranges(list(self.layers))}]" if self.layers else "[]"
        if len(self.layers) < 2:
            raise ParallelGroupError(shown, "a group needs two or more layers (a group of one layer is just that layer)")
        if self.layers != tuple(range(self.layers[0], self.layers[0] + len(self.layers))):
            raise ParallelGroupError(shown, "the layers of a group must be consecutive and ascending, such as 10-13")
        if isinstance(self.loop, bool) or not isinstance(self.loop, int) or self.loop < 1:
            raise ParallelGroupError(
                shown, f"the loop count must be a whole number of at least 1, got {self.loop!r}",
                hint="pass --loop 1 (each group once) or more",
            )
        if self.loop > MAX_POSITIONS:
            raise ParallelGroupError(
                shown, f"the loop count {self.loop:,} is more than the {MAX_POSITIONS:,} layer positions a plan may have",
                hint="pass a smaller --loop",
            )
        if self.mlp_input not in MLP_INPUTS:
            raise OptionError(f"mlp_input must be one of {', '.join(MLP_INPUTS)}, got {self.mlp_input!r}")

    def __str__(self) -> str:
        text = f"[{self.layers[0]}-{self.layers[-1]}]"
        if self.loop != 1:
            text += f"x{self.loop}"
        if self.mlp_input != "exact":
            text += f":{self.mlp_input}"
        return text

    def __len__(self) -> int:
        return len(self.layers)


def parse_steps(text: str, limit: int | None = None) -> list[int | ParallelGroup]:
    """Parse the range syntax with parallel groups into plan steps, in order.

    Args:
        text: comma-separated items: ``N``, ``A-B`` (one step per layer), or a group
            ``[A-B]``, ``[A-B]xR`` (looped R times), ``[A-B]xR:shared``.
        limit: refuse layer indices ``>= limit`` (the model's layer count; None: unchecked).

    Returns:
        The steps: an int per plain layer, a :class:`ParallelGroup` per group.

    Raises:
        RangeSyntaxError: an item that is none of these forms, a range that runs backwards, or
            more than :data:`MAX_POSITIONS` layers in all (checked before any list is built).
        LayerIndexError: an index at or past ``limit``.
        ParallelGroupError: a group of one layer, a group crossing ``limit``, or a loop below 1
            or above :data:`MAX_POSITIONS`.

    Example:
        >>> parse_steps("0-1,[2-3]x2,4")
        [0, 1, ParallelGroup(layers=(2, 3), loop=2, mlp_input='exact'), 4]
    """
    if not isinstance(text, str) or not text.strip():
        raise RangeSyntaxError(str(text), "it is empty")
    steps: list[int | ParallelGroup] = []
    for item in text.split(","):
        if "[" not in item and "]" not in item:
            if not item.strip():
                raise RangeSyntaxError(text, "an empty item")
            match = _ITEM.match(item)
            if match is None:
                raise RangeSyntaxError(text, f"{item.strip()!r} is not N or A-B with whole numbers")
            start = _whole(match.group(1), text)
            end = _whole(match.group(2), text) if match.group(2) is not None else start
            if end < start:
                raise RangeSyntaxError(text, f"{start}-{end} runs backwards (write the lower index first)")
            if limit is not None and end >= limit:
                raise LayerIndexError(max(start, limit), limit)
            _check_count(text, len(steps) + end - start + 1)
            steps.extend(range(start, end + 1))
            continue
        match = _GROUP_ITEM.match(item)
        if match is None:
            raise RangeSyntaxError(text, f"{item.strip()!r} is not a group such as [10-13], [10-13]x3 or [10-13]x3:shared")
        start = _whole(match.group(1), text)
        end = _whole(match.group(2), text) if match.group(2) is not None else start
        if end < start:
            raise RangeSyntaxError(text, f"[{start}-{end}] runs backwards (write the lower index first)")
        mode = match.group(4) or "exact"
        if mode not in MLP_INPUTS:
            raise RangeSyntaxError(text, f"{item.strip()!r}: the group suffix must be :exact or :shared, not :{mode}")
        loop = _whole(match.group(3), text) if match.group(3) is not None else 1
        if limit is not None:
            _check_group_end(start, end, loop, limit)
        _check_count(text, len(steps) + end - start + 1)
        steps.append(ParallelGroup(tuple(range(start, end + 1)), loop=loop, mlp_input=mode))
    return steps


def _check_group_end(start: int, end: int, loop: int, limit: int) -> None:
    """Refuse a group ``[start-end]`` that starts or ends past ``limit`` layers, before building it."""
    if start >= limit:
        raise LayerIndexError(start, limit)
    if end >= limit:
        shown = f"[{start}-{end}]" + (f"x{loop}" if loop != 1 else "")
        raise ParallelGroupError(
            shown,
            f"it crosses the end of the model: layer {end} does not exist (the model has {limit} layers, 0-{limit - 1})",
        )


def format_steps(steps: tuple[int | ParallelGroup, ...] | list[int | ParallelGroup]) -> str:
    """Write plan steps in the range syntax: runs of layers folded, groups in brackets.

    Example:
        >>> format_steps([0, 1, 2, ParallelGroup((3, 4), loop=2), 5])
        '0-2,[3-4]x2,5'
    """
    parts: list[str] = []
    run: list[int] = []
    for step in steps:
        if isinstance(step, ParallelGroup):
            if run:
                parts.append(format_ranges(run))
                run = []
            parts.append(str(step))
        else:
            run.append(step)
    if run:
        parts.append(format_ranges(run))
    return ",".join(parts)


@dataclass(frozen=True)
class Plan:
    """The ordered source layer indices of the new model.

    Attributes:
        layers: the steps of the new model in order: a source layer index for each plain layer
            position (repeats allowed), or a :class:`ParallelGroup` of layers merged into one
            wide block (applied ``loop`` times in a row).
        num_source_layers: the layer count of the model this plan was made for.

    ``len(plan)`` is the depth of the new model: one per plain layer, ``loop`` per group.

    Example:
        >>> plan = Plan.drop("10-20", num_source_layers=30)
        >>> str(plan)
        '0-9,21-29'
        >>> len(plan)
        19
        >>> str(Plan.parallel("10-13,14-17", loop=3, num_source_layers=30))
        '0-9,[10-13]x3,[14-17]x3,18-29'
    """

    layers: tuple[int | ParallelGroup, ...]
    num_source_layers: int

    def __post_init__(self) -> None:
        if not self.layers:
            raise EmptyPlanError("this plan")
        if len(self) > MAX_POSITIONS:  # before positions() or source_sequence() unroll the loops
            raise PlanError(f"the plan has {len(self):,} layer positions; at most {MAX_POSITIONS:,} are allowed")
        _check_range([s for s in self.layers if not isinstance(s, ParallelGroup)], self.num_source_layers)
        owner: dict[int, ParallelGroup] = {}
        for group in self.groups:
            if not 0 <= group.layers[0] < self.num_source_layers:
                raise LayerIndexError(group.layers[0], self.num_source_layers)
            if group.layers[-1] >= self.num_source_layers:
                raise ParallelGroupError(
                    str(group),
                    f"it crosses the end of the model: layer {group.layers[-1]} does not exist "
                    f"(the model has {self.num_source_layers} layers, 0-{self.num_source_layers - 1})",
                )
            for index in group.layers:
                if index in owner:
                    raise ParallelGroupError(
                        f"{owner[index]} and {group}",
                        f"they overlap at layer {index}; a layer can belong to one group only",
                        hint="split the layers into disjoint groups; to apply a group again, loop it ([10-13]x3, --loop 3)",
                    )
                owner[index] = group

    def __str__(self) -> str:
        return format_steps(self.layers)

    def __len__(self) -> int:
        return sum(step.loop if isinstance(step, ParallelGroup) else 1 for step in self.layers)

    @property
    def groups(self) -> tuple[ParallelGroup, ...]:
        """The plan's parallel groups, in order (empty for a plan of plain layers)."""
        return tuple(step for step in self.layers if isinstance(step, ParallelGroup))

    # -- builders: one per verb ------------------------------------------------------------

    @classmethod
    def from_ranges(cls, text: str, num_source_layers: int) -> Plan:
        """The plan written out in range syntax, e.g. ``"0-9,21-29,21-29"`` or ``"0-9,[10-13]x3,14-29"``."""
        return cls(tuple(parse_steps(text, num_source_layers)), num_source_layers)

    @classmethod
    def identity(cls, num_source_layers: int) -> Plan:
        """Every layer once, in order."""
        return cls(tuple(range(num_source_layers)), num_source_layers)

    @classmethod
    def drop(cls, spec: str, num_source_layers: int) -> Plan:
        """All layers except those named by ``spec``."""
        dropped = parse_ranges(spec, num_source_layers)
        _check_range(dropped, num_source_layers)
        kept = tuple(i for i in range(num_source_layers) if i not in set(dropped))
        if not kept:
            raise EmptyPlanError(f"dropping {spec}")
        return cls(kept, num_source_layers)

    @classmethod
    def keep(cls, spec: str, num_source_layers: int) -> Plan:
        """Only the layers named by ``spec``, in ascending order, each once."""
        named = parse_ranges(spec, num_source_layers)
        _check_range(named, num_source_layers)
        return cls(tuple(sorted(set(named))), num_source_layers)

    @classmethod
    def repeat(cls, spec: str, times: int, num_source_layers: int) -> Plan:
        """The contiguous block ``spec`` appears ``times`` times in place."""
        block = parse_ranges(spec, num_source_layers)
        _check_range(block, num_source_layers)
        if block != list(range(block[0], block[-1] + 1)):
            raise RangeSyntaxError(spec, "repeat takes one contiguous block such as 8-15")
        if isinstance(times, bool) or not isinstance(times, int) or times < 1:
            raise OptionError(f"--times must be a whole number of at least 1, got {times!r}")
        total = num_source_layers - len(block) + len(block) * times
        if total > MAX_POSITIONS:  # before the block is multiplied out
            raise OptionError(
                f"--times {times:,} would give {total:,} layers; a plan may have at most {MAX_POSITIONS:,}"
            )
        before = tuple(range(block[0]))
        after = tuple(range(block[-1] + 1, num_source_layers))
        return cls(before + tuple(block) * times + after, num_source_layers)

    @classmethod
    def reverse(cls, spec: str, num_source_layers: int) -> Plan:
        """The contiguous block ``spec`` in reverse order, the rest in place."""
        return cls._permute_block(spec, num_source_layers, lambda block: block[::-1])

    @classmethod
    def shuffle(cls, spec: str, seed: int, num_source_layers: int) -> Plan:
        """The contiguous block ``spec`` shuffled with ``random.Random(seed)``, the rest in place."""

        def shuffled(block: list[int]) -> list[int]:
            out = list(block)
            random.Random(seed).shuffle(out)
            return out

        return cls._permute_block(spec, num_source_layers, shuffled)

    @classmethod
    def order(cls, spec: str, num_source_layers: int) -> Plan:
        """An explicit order; it must name every layer exactly once (use apply for anything else)."""
        named = parse_ranges(spec, num_source_layers)
        _check_range(named, num_source_layers)
        if sorted(named) != list(range(num_source_layers)):
            missing = sorted(set(range(num_source_layers)) - set(named))
            repeated = sorted({i for i in named if named.count(i) > 1})
            raise RangeSyntaxError(
                spec,
                f"--order must name each of the {num_source_layers} layers once "
                f"(missing {format_ranges(missing) or 'none'}, repeated {format_ranges(repeated) or 'none'}); "
                "use 'surgery apply --layers' for drops and repeats",
            )
        return cls(tuple(named), num_source_layers)

    @classmethod
    def parallel(cls, groups: str, loop: int, num_source_layers: int, mlp_input: str = "exact") -> Plan:
        """Every layer in place, except that each group in ``groups`` becomes one parallel step.

        Args:
            groups: comma-separated ranges, one group each, e.g. ``"10-13,14-17"``.
            loop: how many times in a row each merged group is applied.
            num_source_layers: the source model's layer count.
            mlp_input: ``exact`` or ``shared`` (see :class:`ParallelGroup`).

        Returns:
            The plan, e.g. ``0-9,[10-13]x3,[14-17]x3,18-29``.

        Raises:
            RangeSyntaxError: a malformed range.
            ParallelGroupError: a group of one layer, overlapping groups, a group past the end,
                or a loop below 1.

        Example:
            >>> str(Plan.parallel("2-3", loop=1, num_source_layers=6))
            '0-1,[2-3],4-5'
        """
        if not isinstance(groups, str) or not groups.strip():
            raise RangeSyntaxError(str(groups), "it is empty")
        built: list[ParallelGroup] = []
        for item in groups.split(","):
            match = _ITEM.match(item)
            if match is None:
                reason = "an empty item" if not item.strip() else f"{item.strip()!r} is not a group A-B with whole numbers"
                raise RangeSyntaxError(groups, reason)
            start = _whole(match.group(1), groups)
            end = _whole(match.group(2), groups) if match.group(2) is not None else start
            if end < start:
                raise RangeSyntaxError(groups, f"{start}-{end} runs backwards (write the lower index first)")
            _check_group_end(start, end, loop if isinstance(loop, int) else 1, num_source_layers)
            built.append(ParallelGroup(tuple(range(start, end + 1)), loop=loop, mlp_input=mlp_input))
        cls(tuple(built), num_source_layers)  # range and overlap checks before placing the groups
        starts = {group.layers[0]: group for group in built}
        steps: list[int | ParallelGroup] = []
        index = 0
        while index < num_source_layers:
            if index in starts:
                steps.append(starts[index])
                index = starts[index].layers[-1] + 1
            else:
                steps.append(index)
                index += 1
        return cls(tuple(steps), num_source_layers)

    @classmethod
    def _permute_block(cls, spec: str, num_source_layers: int, permute: Any) -> Plan:
        block = parse_ranges(spec, num_source_layers)
        _check_range(block, num_source_layers)
        if block != list(range(block[0], block[-1] + 1)):
            raise RangeSyntaxError(spec, "takes one contiguous block such as 4-25")
        layers = list(range(num_source_layers))
        layers[block[0] : block[-1] + 1] = permute(block)
        return cls(tuple(layers), num_source_layers)

    # -- what the plan does ----------------------------------------------------------------

    @property
    def operations(self) -> tuple[str, ...]:
        """What the plan does, derived from its layers: pruned, layer-repeated, layer-reordered, parallel-merged.

        A looped group counts as repeated (its layers' weights are applied more than once).
        """
        ops = []
        applied = self.source_sequence()
        if len(set(applied)) < self.num_source_layers:
            ops.append("pruned")
        if len(set(applied)) < len(applied):
            ops.append("layer-repeated")
        first_seen = list(dict.fromkeys(applied))
        if first_seen != sorted(first_seen):
            ops.append("layer-reordered")
        if self.groups:
            ops.append("parallel-merged")
        return tuple(ops)

    def mapping(self) -> list[tuple[int, int]]:
        """``(new_index, source_index)`` for every plain layer of the new model.

        The new index is the position in the new model's layer sequence, where each application
        of a (looped) parallel group takes one position; groups themselves are in :meth:`positions`.
        """
        if not self.groups:
            return list(enumerate(s for s in self.layers if not isinstance(s, ParallelGroup)))
        return [(position, step) for position, step in self.positions() if not isinstance(step, ParallelGroup)]

    def positions(self) -> list[tuple[int, int | ParallelGroup]]:
        """``(position, step)`` for every layer application of the new model, loops unrolled.

        Example:
            >>> Plan.from_ranges("0,[1-2]x2,3", 4).positions()[1:3]  # doctest: +NORMALIZE_WHITESPACE
            [(1, ParallelGroup(layers=(1, 2), loop=2, mlp_input='exact')),
             (2, ParallelGroup(layers=(1, 2), loop=2, mlp_input='exact'))]
        """
        out: list[tuple[int, int | ParallelGroup]] = []
        for step in self.layers:
            for _ in range(step.loop if isinstance(step, ParallelGroup) else 1):
                out.append((len(out), step))
        return out

    def source_sequence(self) -> list[int]:
        """The source layers in the order their work is applied, groups expanded and loops unrolled.

        Example:
            >>> Plan.from_ranges("0,[1-2]x2,3", 4).source_sequence()
            [0, 1, 2, 1, 2, 3]
        """
        out: list[int] = []
        for step in self.layers:
            out.extend(list(step.layers) * step.loop if isinstance(step, ParallelGroup) else [step])
        return out


_DTYPES = ("bf16", "fp16", "fp32")


def parse_size(value: str | int) -> int:
    """Parse a size such as ``5GB``, ``500MB``, ``2GiB`` or a byte count.

    Example:
        >>> parse_size("2GB")
        2000000000
    """
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", str(value), flags=re.IGNORECASE)
        if match is None:
            raise OptionError(f"shard size {value!r} is not a size such as 5GB, 500MB or 1073741824")
        unit = (match.group(2) or "B").upper()
        scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
        number = float(match.group(1)) * scale
        if not math.isfinite(number):
            raise OptionError(f"shard size {str(value)[:40]!r} is too large")
        size = int(number)
    if size <= 0:
        raise OptionError(f"shard size must be positive, got {value!r}")
    return size


@dataclass(frozen=True)
class WriteOptions:
    """How a plan's output is written.

    Attributes:
        dtype: ``bf16``, ``fp16`` or ``fp32`` to cast floating-point weights; None keeps them.
        max_shard_size: the largest output shard in bytes.
    """

    dtype: str | None = None
    max_shard_size: int = 5 * 10**9

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in _DTYPES:
            raise OptionError(f"dtype {self.dtype!r} is not one of {', '.join(_DTYPES)}")
        if isinstance(self.max_shard_size, bool) or not isinstance(self.max_shard_size, int) or self.max_shard_size <= 0:
            raise OptionError(f"max_shard_size must be a positive byte count, got {self.max_shard_size!r}")


@dataclass(frozen=True)
class Recipe:
    """A plan plus the options that write it: the content of a recipe file.

    The recipe format (YAML)::

        layer_surgery_recipe: 1        # format version
        source: HuggingFaceTB/SmolLM2-135M-Instruct   # informational
        num_source_layers: 30
        layers: 0-9,21-29              # range syntax, or a YAML list of indices
                                       # parallel groups: 0-9,[10-13]x3,[14-17]x3,18-29
        dtype: null                    # bf16 | fp16 | fp32 | null (keep)
        max_shard_size: 5000000000     # bytes, or a string such as 2GB

    Example:
        >>> r = Recipe(Plan.drop("1", num_source_layers=3), source="m")
        >>> Recipe.from_yaml(r.to_yaml()) == r
        True
    """

    plan: Plan
    options: WriteOptions = field(default_factory=WriteOptions)
    source: str | None = None

    def to_yaml(self) -> str:
        """The recipe file text; the same recipe always gives the same bytes."""
        body = {
            "layer_surgery_recipe": RECIPE_VERSION,
            "source": self.source,
            "num_source_layers": self.plan.num_source_layers,
            "layers": str(self.plan),
            "dtype": self.options.dtype,
            "max_shard_size": self.options.max_shard_size,
        }
        header = "# Written by layer-surgery. Rebuild with: surgery apply SOURCE OUT --recipe THIS_FILE\n"
        return header + yaml.safe_dump(body, sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, origin: str = "<recipe>") -> Recipe:
        """Parse recipe text; ``origin`` names the file in errors."""
        try:
            body = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            first = str(exc).splitlines()[0] if str(exc) else "invalid YAML"
            raise RecipeError(origin, f"is not valid YAML ({first})") from None
        except RecursionError:
            raise RecipeError(origin, "is not a recipe (YAML nested too deeply)") from None
        if not isinstance(body, dict):
            raise RecipeError(origin, "must be a YAML mapping with at least 'layers' and 'num_source_layers'")
        unknown = set(body) - {"layer_surgery_recipe", "source", "num_source_layers", "layers", "dtype", "max_shard_size"}
        if unknown:
            raise RecipeError(origin, f"unknown keys {sorted(unknown)}")
        version = body.get("layer_surgery_recipe", RECIPE_VERSION)
        if version != RECIPE_VERSION:
            raise RecipeError(origin, f"format version {version!r} is not supported (this tool reads {RECIPE_VERSION})")
        n = body.get("num_source_layers")
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise RecipeError(origin, "'num_source_layers' must be a positive whole number")
        if n > MAX_POSITIONS:
            raise RecipeError(origin, f"'num_source_layers' is {n:,}; this tool handles models of at most {MAX_POSITIONS:,} layers")
        layers = body.get("layers")
        if isinstance(layers, list):
            if not all((isinstance(i, int) and not isinstance(i, bool)) or isinstance(i, str) for i in layers):
                raise RecipeError(origin, "'layers' as a list must hold whole numbers (or group strings such as '[10-13]x3')")
            if len(layers) > MAX_POSITIONS:
                raise RecipeError(origin, f"'layers' lists {len(layers):,} layers; at most {MAX_POSITIONS:,} are allowed")
            steps: list[int | ParallelGroup] = []
            for item in layers:
                steps.extend(parse_steps(item, n) if isinstance(item, str) else [item])
                if len(steps) > MAX_POSITIONS:
                    raise RecipeError(origin, f"'layers' names more than {MAX_POSITIONS:,} layers")
            plan = Plan(tuple(steps), n)
        elif isinstance(layers, (str, int)):
            plan = Plan.from_ranges(str(layers), n)
        else:
            raise RecipeError(origin, "'layers' must be a range string such as '0-9,21-29' or a list of indices")
        size = body.get("max_shard_size", WriteOptions.max_shard_size)
        options = WriteOptions(dtype=body.get("dtype"), max_shard_size=parse_size(size))
        source = body.get("source")
        return cls(plan=plan, options=options, source=None if source is None else str(source))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Recipe:
        """Read a recipe file, or the recipe inside an output directory this tool wrote."""
        path = Path(path)
        if path.is_dir():
            path = path / RECIPE_FILENAME
        try:
            handle, _ = open_regular(path)
            with handle:
                raw = handle.read(MAX_RECIPE_BYTES + 1)
        except OSError as exc:
            raise RecipeError(str(path), f"cannot be read ({exc.strerror or exc})") from None
        if len(raw) > MAX_RECIPE_BYTES:
            raise RecipeError(str(path), f"is larger than {MAX_RECIPE_BYTES:,} bytes; a recipe is a few lines")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise RecipeError(str(path), "is not UTF-8 text") from None
        return cls.from_yaml(text, origin=str(path))
