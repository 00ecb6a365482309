"""The plan: which source layers, in which order, make up the new model.

Every verb (prune, repeat, reorder, apply), every recipe file and every API call builds one
:class:`Plan`; one engine executes any plan. A plan is frozen, prints as the range syntax users
write (``0-9,21-29,21-29``), and knows how many layers its source has so that it can refuse a
model it was not made for.

The range syntax is 0-based and inclusive: ``3``, ``10-20``, ``3,7,10-12``.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from surgery.errors import EmptyPlanError, LayerIndexError, OptionError, RangeSyntaxError, RecipeError

RECIPE_FILENAME = "surgery-recipe.yaml"
RECIPE_VERSION = 1

_ITEM = re.compile(r"^\s*(\d+)\s*(?:-\s*(\d+)\s*)?$")


def parse_ranges(text: str) -> list[int]:
    """Parse the range syntax into the list of indices it names, in order, repeats kept.

    Args:
        text: comma-separated items, each ``N`` or ``A-B`` with ``A <= B`` (inclusive).

    Returns:
        The indices in the order written; ``"0-2,1"`` gives ``[0, 1, 2, 1]``.

    Raises:
        RangeSyntaxError: an empty item, a non-number, an open range (``10-``) or a
            descending one (``20-10``).

    Example:
        >>> parse_ranges("3,7,10-12")
        [3, 7, 10, 11, 12]
    """
    if not isinstance(text, str) or not text.strip():
        raise RangeSyntaxError(str(text), "it is empty")
    indices: list[int] = []
    for item in text.split(","):
        match = _ITEM.match(item)
        if match is None:
            reason = "an empty item" if not item.strip() else f"{item.strip()!r} is not N or A-B with whole numbers"
            raise RangeSyntaxError(text, reason)
        start = int(match.group(1))
        end = int(match.group(2)) if match.group(2) is not None else start
        if end < start:
            raise RangeSyntaxError(text, f"{start}-{end} runs backwards (write the lower index first)")
        indices.extend(range(start, end + 1))
    return indices


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
class Plan:
    """The ordered source layer indices of the new model.

    Attributes:
        layers: source layer index for each new layer position, repeats allowed.
        num_source_layers: the layer count of the model this plan was made for.

    Example:
        >>> plan = Plan.drop("10-20", num_source_layers=30)
        >>> str(plan)
        '0-9,21-29'
        >>> len(plan)
        19
    """

    layers: tuple[int, ...]
    num_source_layers: int

    def __post_init__(self) -> None:
        if not self.layers:
            raise EmptyPlanError("this plan")
        _check_range(list(self.layers), self.num_source_layers)

    def __str__(self) -> str:
        return format_ranges(self.layers)

    def __len__(self) -> int:
        return len(self.layers)

    # -- builders: one per verb ------------------------------------------------------------

    @classmethod
    def from_ranges(cls, text: str, num_source_layers: int) -> Plan:
        """The plan written out in range syntax, e.g. ``"0-9,21-29,21-29"``."""
        return cls(tuple(parse_ranges(text)), num_source_layers)

    @classmethod
    def identity(cls, num_source_layers: int) -> Plan:
        """Every layer once, in order."""
        return cls(tuple(range(num_source_layers)), num_source_layers)

    @classmethod
    def drop(cls, spec: str, num_source_layers: int) -> Plan:
        """All layers except those named by ``spec``."""
        dropped = parse_ranges(spec)
        _check_range(dropped, num_source_layers)
        kept = tuple(i for i in range(num_source_layers) if i not in set(dropped))
        if not kept:
            raise EmptyPlanError(f"dropping {spec}")
        return cls(kept, num_source_layers)

    @classmethod
    def keep(cls, spec: str, num_source_layers: int) -> Plan:
        """Only the layers named by ``spec``, in ascending order, each once."""
        named = parse_ranges(spec)
        _check_range(named, num_source_layers)
        return cls(tuple(sorted(set(named))), num_source_layers)

    @classmethod
    def repeat(cls, spec: str, times: int, num_source_layers: int) -> Plan:
        """The contiguous block ``spec`` appears ``times`` times in place."""
        block = parse_ranges(spec)
        _check_range(block, num_source_layers)
        if block != list(range(block[0], block[-1] + 1)):
            raise RangeSyntaxError(spec, "repeat takes one contiguous block such as 8-15")
        if isinstance(times, bool) or not isinstance(times, int) or times < 1:
            raise OptionError(f"--times must be a whole number of at least 1, got {times!r}")
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
        named = parse_ranges(spec)
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
    def _permute_block(cls, spec: str, num_source_layers: int, permute: Any) -> Plan:
        block = parse_ranges(spec)
        _check_range(block, num_source_layers)
        if block != list(range(block[0], block[-1] + 1)):
            raise RangeSyntaxError(spec, "takes one contiguous block such as 4-25")
        layers = list(range(num_source_layers))
        layers[block[0] : block[-1] + 1] = permute(block)
        return cls(tuple(layers), num_source_layers)

    # -- what the plan does ----------------------------------------------------------------

    @property
    def operations(self) -> tuple[str, ...]:
        """What the plan does, derived from its layers: pruned, layer-repeated, layer-reordered."""
        ops = []
        if len(set(self.layers)) < self.num_source_layers:
            ops.append("pruned")
        if len(set(self.layers)) < len(self.layers):
            ops.append("layer-repeated")
        first_seen = list(dict.fromkeys(self.layers))
        if first_seen != sorted(first_seen):
            ops.append("layer-reordered")
        return tuple(ops)

    def mapping(self) -> list[tuple[int, int]]:
        """``(new_index, source_index)`` for every layer of the new model."""
        return list(enumerate(self.layers))


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
        size = int(float(match.group(1)) * scale)
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
        layers = body.get("layers")
        if isinstance(layers, list):
            if not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
                raise RecipeError(origin, "'layers' as a list must hold whole numbers only")
            plan = Plan(tuple(layers), n)
        elif isinstance(layers, (str, int)):
            plan = Plan.from_ranges(str(layers), n)
        else:
            raise RecipeError(origin, "'layers' must be a range string such as '0-9,21-29' or a list of indices")
        size = body.get("max_shard_size", WriteOptions.max_shard_size)
        options = WriteOptions(dtype=body.get("dtype"), max_shard_size=parse_size(size))
        source = body.get("source")
        return cls(plan=plan, options=options, source=None if source is None else str(source))

    @classmethod
    def load(cls, path: str | Path) -> Recipe:
        """Read a recipe file, or the recipe inside an output directory this tool wrote."""
        path = Path(path)
        if path.is_dir():
            path = path / RECIPE_FILENAME
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise RecipeError(str(path), f"cannot be read ({exc.strerror or exc})") from None
        return cls.from_yaml(text, origin=str(path))
