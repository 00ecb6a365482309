"""The gates of ``--max-kl`` / ``--min-top1`` / ``--min-cosine``: which metric each bounds, and whether it was met."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from surgery.errors import OptionError

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

