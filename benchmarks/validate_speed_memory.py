"""Benchmark (issue #3; a benchmark, not a test): what measuring costs on SmolLM2-135M.

Memory: one copy of the weights however many plans are swept
    Two fresh subprocesses on the same text budget: ``surgery.validate(None, plan=P)`` (one plan
    in memory) and ``surgery.sweep(None, plans=[20 plans])``. Peak RSS of each is read from
    ``os.wait4`` (per child). Target: the sweep within 10% of the single validation.

Speed: validate against a plain transformers forward over the same batches
    The scoring engine of ``surgery validate`` (:func:`surgery.validate.compare`: both forward
    passes plus log-sum-exp, KL, top-1 and perplexity) on each batch, against plain
    ``model(input_ids=batch)`` calls of the same two models (the original and a checkpoint
    written by ``surgery prune``, layers 10-14 dropped) on the same batch. Two validate paths:
    ``NEW`` (the written checkpoint, a second model) and ``--plan`` (the plan view of the one
    loaded original). Greedy generation is off so both sides do exactly the same forward work.
    On a machine shared with other jobs one run can be several times slower than the next, so
    every validate run is paired with the mean of the plain runs just before and after it, and
    the figure is the median ratio over all pairs (the range is printed too). The tokens per
    second of one end-to-end ``surgery.validate(None, NEW)`` call are reported alongside.
    Target: validate >= 0.9x plain.

Usage::

    SURGERY_CACHE=/tmp/scache python benchmarks/validate_speed_memory.py [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

CHILD = """
import json, sys, torch
torch.set_num_threads({threads})
import surgery
from surgery.plan import Plan
plans = [str(Plan.drop(f"{{s}}-{{s + 3}}", 30)) for s in range({plans})]
options = dict(max_tokens={max_tokens}, seq_len={seq_len}, batch_size={batch_size}, prompts=4, new_tokens=16,
               device="cpu", quiet=True)
if sys.argv[1] == "validate":
    report = surgery.validate(None, plan=plans[0], **options)
    print(json.dumps({{"plans": 1, "kl": report.comparison.kl}}))
else:
    report = surgery.sweep(None, plans=plans, **options)
    print(json.dumps({{"plans": len(report.rows), "kl": report.rows[0].comparison.kl}}))
"""


def peak_rss(mode: str, args: argparse.Namespace) -> tuple[float, dict[str, Any], float]:
    """(peak RSS in MB, the child's JSON line, wall seconds) of one measuring subprocess."""
    script = CHILD.format(threads=args.threads, plans=args.plans, max_tokens=args.max_tokens, seq_len=args.seq_len,
                          batch_size=args.batch_size)
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", script, mode], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    out = child.stdout.read() if child.stdout else ""
    err = child.stderr.read() if child.stderr else ""
    if status != 0:
        raise SystemExit(f"{mode} child failed:\n{err[-3000:]}")
    return usage.ru_maxrss / 1024, json.loads(out.strip().splitlines()[-1]), seconds


def plain_forward_seconds(models: list[Any], batch: Any) -> float:
    """Seconds of plain forwards of every model over one batch."""
    import torch

    start = time.perf_counter()
    with torch.inference_mode():
        for model in models:
            model(input_ids=batch, use_cache=False)
    return time.perf_counter() - start


def speed(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    import surgery
    from surgery.corpus import read_texts
    from surgery.plan import Plan
    from surgery.source import open_source
    from surgery.validate import Candidate, LoadedModel, Settings, compare, measuring_windows

    transformers.logging.set_verbosity_error()
    original = open_source(None, quiet=True).path
    with tempfile.TemporaryDirectory() as tmp:
        new = Path(tmp) / "pruned"
        surgery.prune(None, new, drop="10-14", quiet=True)
        models = [transformers.LlamaForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in (original, new)]
        tokenizer = transformers.AutoTokenizer.from_pretrained(original)
        loaded = LoadedModel("default", original, models[0], tokenizer, True)
        windows = measuring_windows(loaded, read_texts(None), Settings(max_tokens=args.max_tokens, seq_len=args.seq_len))
        # The same work on both sides: the original and the pruned model over the same batch.
        measured = {
            "validate NEW": lambda batch: compare(models[0], [Candidate.of_model(models[1], "new")], batch,
                                                  causal=True, batch_size=len(batch), quiet=True).seconds,
            "validate --plan": lambda batch: compare(models[0], [Candidate.of_plan(models[0], Plan.drop("10-14", 30))],
                                                     batch, causal=True, batch_size=len(batch), quiet=True).seconds,
        }
        batches = list(windows.split(args.batch_size))
        plain_forward_seconds(models, batches[0][:1])  # warm-up
        ratios: dict[str, list[float]] = {name: [] for name in measured}
        plain_times: list[float] = []
        for round_number in range(args.rounds):
            for batch in batches:
                # Each validate run sits between two plain runs: contention from other jobs, which
                # changes over seconds, hits both sides of a pair alike.
                before = plain_forward_seconds(models, batch)
                plain_times.append(before)
                for name, run in measured.items():
                    seconds = run(batch)
                    after = plain_forward_seconds(models, batch)
                    ratios[name].append((before + after) / 2 / seconds)
                    plain_times.append(after)
                    before = after
            print(f"round {round_number + 1}: " + ", ".join(f"{name} {values[-1]:.3f}x" for name, values in ratios.items()),
                  file=sys.stderr)
        tokens = 2 * int(batches[0].numel())
        end_to_end = surgery.validate(None, new, max_tokens=args.max_tokens, seq_len=args.seq_len,
                                      batch_size=args.batch_size, prompts=0, device="cpu", quiet=True,
                                      card=False)  # the measurement only, as before validate recorded into the card
    return {
        "windows": int(windows.shape[0]),
        "seq_len": int(windows.shape[1]),
        "pairs": len(ratios["validate NEW"]),
        "plain_tps_median": tokens / statistics.median(plain_times),
        "validate_new_ratio": statistics.median(ratios["validate NEW"]),
        "validate_plan_ratio": statistics.median(ratios["validate --plan"]),
        "validate_new_ratio_range": [min(ratios["validate NEW"]), max(ratios["validate NEW"])],
        "validate_plan_ratio_range": [min(ratios["validate --plan"]), max(ratios["validate --plan"])],
        "end_to_end_validate_tps": end_to_end.measurement.tokens_per_second,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--plans", type=int, default=20, help="plans in the swept family (default 20)")
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    torch.set_num_threads(args.threads)
    results: dict[str, Any] = {"threads": args.threads, "max_tokens": args.max_tokens, "seq_len": args.seq_len,
                               "batch_size": args.batch_size}
    if not args.skip_memory:
        one_rss, one, one_s = peak_rss("validate", args)
        many_rss, many, many_s = peak_rss("sweep", args)
        results.update(validate_rss_mb=one_rss, sweep_rss_mb=many_rss, sweep_plans=many["plans"],
                       rss_ratio=many_rss / one_rss, validate_seconds=one_s, sweep_seconds=many_s,
                       same_first_kl=abs(one["kl"] - many["kl"]) < 1e-6)
        print(f"peak RSS: validate 1 plan {one_rss:.0f} MB ({one_s:.0f} s), sweep {many['plans']} plans "
              f"{many_rss:.0f} MB ({many_s:.0f} s): {many_rss / one_rss:.3f}x (target <= 1.10)")
    if not args.skip_speed:
        results.update(speed(args))
        print(f"speed over {results['windows']} x {results['seq_len']} tokens, median of {results['pairs']} paired runs: "
              f"validate NEW {results['validate_new_ratio']:.3f}x plain forward, validate --plan "
              f"{results['validate_plan_ratio']:.3f}x (target >= 0.9x); plain {results['plain_tps_median']:.0f} tok/s")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
