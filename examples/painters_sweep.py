"""The "Transformer Layers as Painters" experiment on SmolLM2-135M, with one load of the weights.

For every N, the first N+1 and the last N of the 30 layers are kept and the middle is skipped,
replaced by its centre layer repeated, reversed, shuffled (three seeds, averaged), run in parallel
(every middle layer on the same input, outputs averaged) or looped parallel (that parallel group
applied three times). Each plan runs in memory as a view of the one loaded model and is measured against the original on the
default corpus (Hamlet): KL of the next-token distributions and top-1 agreement.

Run: python examples/painters_sweep.py [OUT] [--max-tokens 1024] [--painters-n 0-13] [--seeds 0-2]
(default OUT: docs/painters-sweep; writes sweep.png, sweep.csv and sweep.json there)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import surgery
from surgery.plan import parse_ranges
from surgery.sweep import SweepReport


def main(
    out: Path, *, max_tokens: int = 1024, painters_n: str | None = None, seeds: str = "0-2", quiet: bool = False
) -> SweepReport:
    # None = the embedded default model (SmolLM2-135M-Instruct); data None = the default corpus.
    report = surgery.sweep(
        None, painters=True, painters_n=painters_n, seeds=parse_ranges(seeds), out=out,
        max_tokens=max_tokens, seq_len=128, prompts=4, new_tokens=16, device="cpu", quiet=quiet,
    )
    print(report.format())
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, default=Path("docs/painters-sweep"))
    parser.add_argument("--max-tokens", type=int, default=1024, help="token budget per plan (default 1024)")
    parser.add_argument("--painters-n", help="N values in range syntax (default: all, 0-13)")
    parser.add_argument("--seeds", default="0-2", help="random-order seeds (default 0-2)")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args()
    main(args.out, max_tokens=args.max_tokens, painters_n=args.painters_n, seeds=args.seeds, quiet=args.quiet)
