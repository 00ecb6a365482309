"""What :func:`surgery.validate.validate` reports: the metrics, the bars, as a table and as JSON."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from surgery.bars import Bar
from surgery.metrics import Comparison, Measurement


@dataclass(frozen=True)
class ValidationReport:
    """What :func:`surgery.validate.validate` measured, and whether it met the bars.

    Attributes:
        original: the original model, described.
        new: the new model (a path, or the plan run in memory), described.
        plan: the plan in range syntax when known (from ``plan``/``recipe``, or NEW's recipe file).
        kind: ``causal`` or ``encoder``.
        data: the text set's name.
        comparison: the metrics.
        measurement: windows, timing and greedy settings.
        bars: the gates that were given.
        card: the model card the report was recorded in (``surgery validate`` of an output of
            this tool, or ``--validate``), else None.
    """

    original: str
    new: str
    plan: str | None
    kind: str
    data: str
    comparison: Comparison
    measurement: Measurement
    bars: tuple[Bar, ...] = ()
    card: str | None = None

    @property
    def passed(self) -> bool:
        """True when every bar was met (and when none was given)."""
        return all(bar.passed for bar in self.bars)

    @property
    def missed(self) -> list[str]:
        """One line per missed bar."""
        return [bar.describe() for bar in self.bars if not bar.passed]

    def format(self) -> str:
        """The table printed by ``surgery validate``."""
        c, m = self.comparison, self.measurement
        lines = [
            f"original  {self.original}",
            f"new       {self.new}" + (f"  [plan {self.plan}]" if self.plan and self.plan not in self.new else ""),
            f"text      {self.data}: {m.windows} windows x {m.seq_len} tokens",
            "",
            f"{'metric':<34}{'original':>12}{'new':>12}",
        ]
        if self.kind == "causal":
            assert c.ppl_original is not None and c.ppl_new is not None and c.kl is not None and c.top1 is not None
            lines += [
                f"{'perplexity':<34}{format_metric(c.ppl_original):>12}{format_metric(c.ppl_new):>12}",
                f"{'KL(original || new), nats/token':<34}{'':>12}{c.kl:>12.4f}",
                f"{'top-1 agreement':<34}{'':>12}{c.top1:>12.1%}",
            ]
            if c.greedy_agreement is not None and c.greedy_prefix is not None:
                label = f"greedy agreement ({m.prompts}x{m.new_tokens} tok)"
                lines.append(f"{label:<34}{'':>12}{c.greedy_agreement:>12.1%}")
                lines.append(f"{'  identical before first change':<34}{'':>12}{c.greedy_prefix:>12.1%}")
        else:
            assert c.hidden_cosine is not None and c.embedding_cosine is not None
            lines += [
                f"{'cosine, final hidden states':<34}{'':>12}{c.hidden_cosine:>12.4f}",
                f"{'cosine, mean-pooled embeddings':<34}{'':>12}{c.embedding_cosine:>12.4f}",
            ]
        lines.append(f"{'scored tokens':<34}{'':>12}{c.tokens:>12,}")
        lines.append(f"speed     {m.tokens_per_second:,.0f} tokens/s through the forward passes")
        lines.extend(bar.describe() for bar in self.bars)
        if self.card:
            lines.append(f"card      recorded in {self.card}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The JSON body of ``surgery validate --json``."""
        m = self.measurement
        return {
            "original": self.original,
            "new": self.new,
            "plan": self.plan,
            "kind": self.kind,
            "data": self.data,
            "windows": m.windows,
            "seq_len": m.seq_len,
            "prompts": m.prompts,
            "new_tokens": m.new_tokens,
            "metrics": self.comparison.to_dict(),
            "seconds": m.seconds,
            "tokens_per_second": m.tokens_per_second,
            "bars": [
                {"option": b.option, "limit": b.limit, "value": b.value, "passed": b.passed} for b in self.bars
            ],
            "passed": self.passed,
            "card": self.card,
        }

    def card_row(self) -> dict[str, Any]:
        """The row the model card records for this text (:func:`exporters.card.update_card_with_validation`).

        The text is named as measured, a file by its name only (a local path is not published).
        """
        c = self.comparison
        text = self.data
        if "/" in text or "\\" in text:
            text = text.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
        row: dict[str, Any] = {
            "text": text, "tokens": c.tokens, "kl": None if c.kl is None else max(0.0, c.kl), "top1": c.top1, "ppl_original": c.ppl_original,
            "ppl_new": c.ppl_new, "embedding_cosine": c.embedding_cosine, "hidden_cosine": c.hidden_cosine,
            "greedy_agreement": c.greedy_agreement,
        }
        row = {key: float(f"{value:.6g}") if isinstance(value, float) else value for key, value in row.items()}
        if self.bars:
            row["bars"] = [{"option": b.option, "limit": b.limit, "passed": b.passed} for b in self.bars]
            row["passed"] = self.passed
        return {key: value for key, value in row.items() if value is not None}


def format_metric(value: float) -> str:
    """A metric in at most 11 characters: fixed point, or scientific for huge perplexities."""
    return f"{value:.2f}" if abs(value) < 1e6 else f"{value:.2e}"

