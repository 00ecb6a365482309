"""Benchmark: does ``surgery prune --to-layers N`` find a better plan than the best contiguous drop, fast?

What it measures
    On SmolLM2-135M (the embedded default model, 30 layers), for each target depth N, side by side in
    one run on the same text split (the default corpus: calibration windows from its first 90%, the
    held-out windows from its last 10%):

    * every search method: ``greedy`` (beam 1), ``greedy --allow-parallel``, both with ``--lazy`` screening,
      ``block`` by measured KL,
      ``block`` by angular distance, ``score`` (Block Influence): its plan, its held-out
      KL(original || plan), top-1 agreement and perplexity, and the search time (the model load and
      the final held-out measurement excluded);
    * the baseline: every contiguous window of ``30 - N`` layers dropped, each measured on the same
      held-out windows (:func:`surgery.sweep.drop_window_plans` through :func:`surgery.metrics.compare`);
      the best of them is the reference of the targets.

Targets (printed as PASS/MISS; exit 0 either way: a benchmark, not a test)
    * N = 26 and N = 22: the held-out KL of each greedy variant's plan at most 0.9x the best
      contiguous drop's of the same depth (4 and 8 layers), and its search under 10 minutes.

How to run
    python benchmarks/search.py                            # N = 26 and 22, every method
    python benchmarks/search.py --depths 26 --methods greedy,block
    python benchmarks/search.py --model path/to/model --depths 20 --max-tokens 2048
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

METHODS: dict[str, dict[str, Any]] = {
    "greedy": {"method": "greedy"},
    "block (measured)": {"method": "block", "block_by": "measured"},
    "block (angular)": {"method": "block", "block_by": "angular"},
    "score (BI)": {"method": "score"},
    "greedy+parallel": {"method": "greedy", "allow_parallel": True},
    "greedy (lazy)": {"method": "greedy", "lazy": True},
    "greedy+parallel (lazy)": {"method": "greedy", "allow_parallel": True, "lazy": True},
}
TARGET_RATIO = 0.9
TARGET_SECONDS = 600.0


def contiguous(model: str | None, depth: int, options: dict[str, Any]) -> list[dict[str, Any]]:
    """Every contiguous drop to ``depth`` layers, measured on the search's held-out windows."""
    from surgery.corpus import read_texts
    from surgery.loading import Settings, load_model
    from surgery.metrics import Candidate, compare
    from surgery.search import split_windows
    from surgery.sweep import drop_window_plans

    settings = Settings(device=options["device"], seq_len=options["seq_len"], max_tokens=options["max_tokens"],
                        quiet=True, prompts=0)
    loaded = load_model(model, settings)
    _, held = split_windows(loaded, read_texts(None), settings, held_out=0.1, eval_tokens=options["eval_tokens"])
    plans = drop_window_plans(loaded.num_layers, loaded.num_layers - depth)
    started = time.perf_counter()
    measurement = compare(loaded.model, [Candidate.of_plan(loaded.model, p.plan) for p in plans], held, causal=True,
                          batch_size=settings.batch_size, quiet=True)
    print(f"  {len(plans)} contiguous drops measured in {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    return [{"plan": str(p.plan), "first": p.x, "kl": c.kl, "top1": c.top1, "ppl": c.ppl_new}
            for p, c in zip(plans, measurement.comparisons, strict=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="default: the embedded SmolLM2-135M")
    parser.add_argument("--depths", default="26,22", help="target depths N, comma-separated (default 26,22)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of: {', '.join(METHODS)}")
    parser.add_argument("--max-tokens", type=int, default=4096, help="calibration tokens (default 4096, the search's)")
    parser.add_argument("--screen", type=int, help="greedy and measured block: candidates re-scored per step on all "
                                                   "the calibration tokens after screening (default: the search's, 4)")
    parser.add_argument("--eval-tokens", type=int, default=4096, help="held-out tokens (default 4096)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window (default 256)")
    parser.add_argument("--no-contiguous", action="store_true",
                        help="skip the contiguous baseline (no ratios; e.g. a second run of more methods)")
    parser.add_argument("--json", metavar="FILE", help="also write every row as JSON")
    args = parser.parse_args()
    import torch

    import surgery.search

    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods: {', '.join(unknown)}")
    options: dict[str, Any] = {"device": "cpu", "seq_len": args.seq_len, "max_tokens": args.max_tokens,
                               "eval_tokens": args.eval_tokens}
    print(f"machine: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}; "
          f"calibration {args.max_tokens} tokens, held out {args.eval_tokens} tokens, windows of {args.seq_len}; "
          f"screening {'the search default' if args.screen is None else args.screen}")
    results: dict[str, Any] = {}
    lines: list[str] = []
    verdicts: list[str] = []
    for depth in [int(d) for d in args.depths.split(",") if d]:
        print(f"N = {depth}", file=sys.stderr, flush=True)
        windows = [] if args.no_contiguous else contiguous(args.model, depth, options)
        best = min(windows, key=lambda row: row["kl"]) if windows else {"plan": "-", "kl": math.nan, "top1": math.nan,
                                                                       "ppl": math.nan}
        rows = []
        for name in methods:
            screen = {} if args.screen is None or name in ("block (angular)", "score (BI)") else {"screen": args.screen}
            report = surgery.search.search(args.model, depth, quiet=True, **options, **METHODS[name], **screen)
            c = report.held_out
            row = {"method": name, "plan": str(report.plan), "dropped": report.dropped,
                   "groups": [str(g) for g in report.plan.groups], "kl": c.kl, "top1": c.top1, "ppl": c.ppl_new,
                   "ppl_original": c.ppl_original, "calibration_kl": report.calibration_kl,
                   "candidates": len(report.candidates), "seconds": report.seconds, "parallel_won": report.parallel_won,
                   "parallel_best": report.parallel_best, "drop_best": report.drop_best,
                   "source_layers": report.source_layers, "screen": report.screen,
                   "screen_windows": report.screen_windows, "calibration_windows": report.calibration_windows,
                   "lazy": report.lazy, "screened": report.screened}
            rows.append(row)
            print("  " + json.dumps(row), file=sys.stderr, flush=True)
        results[str(depth)] = {"contiguous": windows, "best_contiguous": best, "methods": rows}
        drop = rows[0]["source_layers"] - depth if rows else "?"
        lines += [
            "",
            f"N = {depth} (best contiguous {drop}-layer drop: {best['plan']}, held-out KL {best['kl']:.4f}, "
            f"top-1 {best['top1']:.1%}, perplexity {best['ppl']:.2f}; original {rows[0]['ppl_original']:.2f})",
            "",
            "| method | plan (dropped / merged) | held-out KL | vs best contiguous | top-1 | perplexity | candidates | search time |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for row in rows:
            what = ",".join(str(i) for i in row["dropped"]) + (f" + {' '.join(row['groups'])}" if row["groups"] else "")
            lines.append(f"| {row['method']} | {what} | {row['kl']:.4f} | {row['kl'] / best['kl']:.2f}x | {row['top1']:.1%} | "
                         f"{row['ppl']:.2f} | {row['candidates']} | {row['seconds']:.0f} s |")
        for greedy in (row for row in rows if row["method"].startswith("greedy")):
            if not windows:
                break
            ratio = greedy["kl"] / best["kl"]
            verdicts.append(
                f"N = {depth}: {greedy['method']} held-out KL {ratio:.2f}x the best contiguous (target <= {TARGET_RATIO}x) "
                f"{'PASS' if ratio <= TARGET_RATIO else 'MISS'}; search {greedy['seconds']:.0f} s (target < "
                f"{TARGET_SECONDS / 60:.0f} min) {'PASS' if greedy['seconds'] < TARGET_SECONDS else 'MISS'}"
                f"{'; screened ' + str(greedy['screened']) + ' of ' + str(greedy['candidates']) if greedy['lazy'] else ''}"
            )
        for parallel in (row for row in rows if row["method"].startswith("greedy+parallel")):
            with_group, without = (f"{x:.4f}" if x is not None else "-" for x in (parallel["parallel_best"], parallel["drop_best"]))
            verdicts.append(f"N = {depth}: {parallel['method']}: a plan with a parallel group "
                            f"{'won' if parallel['parallel_won'] else 'did not win'} (best calibration KL with a group "
                            f"{with_group}, without {without})")
    print("\n".join(lines))
    print()
    print("\n".join(verdicts))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
