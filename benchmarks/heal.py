"""Benchmark: how much of what surgery cost does ``surgery heal`` recover, in a fixed time budget?

What it measures
    For each case (a plan applied to SmolLM2-135M, the embedded default model), side by side in
    one run on the same text split (the default corpus: its first 90% trains, its last 10% is
    held out):

    * ``heal``: ``surgery.heal`` with its default settings (the closed-form bridge of each cut,
      then LoRA on the blocks around the cut), for ``--minutes`` in all (bridge + training);
    * ``naive``: the baseline of issue 14, a full fine-tune of the four blocks around the cut
      (no LoRA), AdamW lr 5e-5, batch 2 x 256 tokens, same loss and budget.

    Reported per case: held-out KL(original || model) before and after, their ratio, held-out
    perplexity (original, before, after), top-1 agreement, steps and training minutes.

Targets (printed as PASS/MISS; exit 0 either way: a benchmark, not a test)
    * 13-16 dropped (26 layers): heal's KL ratio at most 0.35, and its perplexity closer to the
      original's than the unhealed model's.

How to run
    python benchmarks/heal.py                          # 13-16, 15 minutes each for heal and naive
    python benchmarks/heal.py --cases 13-16,11-18 --minutes 15 --no-naive
    python benchmarks/heal.py --cases wide:13-14       # a wide-block plan (layers 13 and 14 in parallel)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def run_case(case: str, minutes: float, naive: bool, workdir: Path) -> list[dict[str, object]]:
    import surgery
    from surgery.plan import parse_ranges

    kind, _, ranges = case.rpartition(":")
    new = workdir / f"new-{case.replace(':', '-')}"
    if kind == "wide":
        surgery.parallel(None, new, groups=ranges, quiet=True, force=True)
        cut = parse_ranges(ranges)
    else:
        surgery.prune(None, new, drop=ranges, quiet=True, force=True)
        cut = parse_ranges(ranges)
    rows = []
    first = cut[0]
    setups = [("heal (defaults)", {})]
    if naive:
        # Issue 14's baseline: the four blocks around the cut trained in full, lr 5e-5.
        setups.append(("naive full FT, 4 blocks", {"layers": "", "full_layers": f"{max(0, first - 2)}-{first + 1}", "lr": 5e-5,
                                                  "init": "none", "select": False}))
    for label, overrides in setups:
        started = time.perf_counter()
        report = surgery.heal(None, new, None, dry_run=True, max_minutes=minutes, quiet=True, **overrides)
        rows.append({
            "case": case, "setup": label,
            "kl_before": report.before.kl, "kl_after": report.after.kl, "kl_ratio": report.kl_ratio,
            "kl_bridged": report.after_init.kl if report.after_init is not None else None,
            "init_seconds": report.init_seconds, "kept": report.kept,
            "validation_kl_start": report.validation_kl_start, "validation_kl_trained": report.validation_kl_trained,
            "ppl_original": report.before.ppl_original, "ppl_before": report.before.ppl_new, "ppl_after": report.after.ppl_new,
            "top1_before": report.before.top1, "top1_after": report.after.top1,
            "steps": report.steps, "train_minutes": report.seconds / 60, "total_minutes": (time.perf_counter() - started) / 60,
            "trainable_params": report.trainable_params,
        })
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default="13-16", help="comma-separated: layers to drop (13-16), or wide:A-B for a parallel group")
    parser.add_argument("--minutes", type=float, default=15.0, help="training budget per setup (default 15)")
    parser.add_argument("--no-naive", action="store_true", help="skip the naive full fine-tune baseline")
    parser.add_argument("--workdir", help="where NEW checkpoints are written (default: a temporary directory)")
    args = parser.parse_args()
    cases = [case for case in args.cases.split(",") if case]
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="surgery-heal-bench-"))
    import torch

    print(f"machine: {os.cpu_count()} cores, torch threads {torch.get_num_threads()}, load {os.getloadavg()[0]:.1f}; "
          f"budget {args.minutes:g} min per setup")
    rows = [row for case in cases for row in run_case(case, args.minutes, not args.no_naive, workdir)]
    print("| case | setup | steps | bridge s + train min | held-out KL before -> bridged -> after | ratio (bridged) | "
          "ppl original / before / after | top-1 before -> after | validation KL start -> trained (kept) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        bridged = r["kl_bridged"]
        bridged_text = f"{bridged:.4f}" if bridged is not None else "-"
        bridged_ratio = f" ({bridged / r['kl_before']:.3f})" if bridged is not None else ""
        print(f"| {r['case']} | {r['setup']} | {r['steps']} | {r['init_seconds']:.0f} s + {r['train_minutes']:.1f} | "
              f"{r['kl_before']:.4f} -> {bridged_text} -> {r['kl_after']:.4f} | {r['kl_ratio']:.3f}{bridged_ratio} | "
              f"{r['ppl_original']:.2f} / {r['ppl_before']:.2f} / {r['ppl_after']:.2f} | {r['top1_before']:.1%} -> {r['top1_after']:.1%} | "
              f"{r['validation_kl_start']} -> {r['validation_kl_trained']} ({r['kept']}) |")
    for r in rows:
        if r["case"] == "13-16" and r["setup"] == "heal (defaults)":
            ratio_ok = r["kl_ratio"] is not None and r["kl_ratio"] <= 0.35
            ppl_ok = abs(r["ppl_after"] - r["ppl_original"]) < abs(r["ppl_before"] - r["ppl_original"])
            print(f"target KL ratio <= 0.35: {r['kl_ratio']:.3f} {'PASS' if ratio_ok else 'MISS'}; "
                  f"perplexity closer to the original's: {'PASS' if ppl_ok else 'MISS'}")


if __name__ == "__main__":
    main()
