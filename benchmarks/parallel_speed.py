"""How much faster is a wide block than the layers it merges? (issue #4; a benchmark, not a test)

Two measurements on the real SmolLM2-135M (Llama, 30 layers), fp32 and bf16, on this machine:

(a) one wide block of K = 2 and K = 4 (layers 10..10+K-1, ``mlp_input="exact"``) against the same
    K original layers run one after another: batch-1 decode (one token with a KV cache over a
    128-token context) and a 512-token prefill, in milliseconds per call;
(b) the whole model with parallel pairs over layers 10-21 (depth 30 -> 24) against the unmerged
    model: batch-1 decode and 512-token prefill, in tokens per second. Target >= 1.15x; the
    physical limit (fewer sequential layers, the same arithmetic) is 30/24 = 1.25x.
(c) where a decode step's time goes, from ``torch.profiler`` over 10 steps of each whole model:
    the matrix products (``mm``/``addmm``/``bmm``/``baddbmm``, which read every weight once) and
    everything else (norms, rotary, cache, attention, Python dispatch), and the operator calls per
    token. The wide block can only save the second part, so the ceiling of (b) on this CPU is the
    30-layer step time over that time less all the non-matmul time of the 12 merged layers
    (estimated as 12/30 of the model's).

A prefill figure is the best of ``--repeats`` timed runs after a warm-up; a decode figure is the
median of every timed decode step over ``--repeats`` runs of ``--steps`` steps, each run on a fresh
cache prefilled outside the timing (robust to a shared machine's spikes). In (b) the three models
take turns one decode step (or one prefill) at a time, on caches of ``--context`` tokens; the
speed-up is the ratio of the median steps (best prefills) and, in brackets, the median of the
ratios of steps run back to back.
The wide checkpoints are written with :func:`surgery.api.parallel` into a temporary directory and
loaded with ``trust_remote_code=True``, exactly as a user would.

Usage::

    SURGERY_CACHE=/tmp/scache python benchmarks/parallel_speed.py [--threads 1] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from surgery.compat import cache_keyword, output_cache, with_cache  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PAIRS = "10-11,12-13,14-15,16-17,18-19,20-21"
MERGED_LAYERS, NUM_LAYERS = 12, 30


def median_step(prepare: Callable[[], Any], step: Callable[[Any, int], None], steps: int, repeats: int) -> float:
    """Median seconds of one ``step(state, t)`` over ``repeats`` runs on a fresh ``prepare()`` state each."""
    state = prepare()
    step(state, 0)  # warm-up
    times = []
    for _ in range(repeats):
        state = prepare()
        for t in range(steps):
            start = time.perf_counter()
            step(state, t)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def best(fn: Callable[[], Any], repeats: int) -> float:
    """Seconds of the fastest of ``repeats`` runs of ``fn`` after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def load(path: Path, dtype: torch.dtype, *, remote: bool) -> Any:
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=remote)
    return model.eval()


def block_timings(model: Any, first: int, count: int, ctx: int, prefill: int, steps: int, repeats: int) -> dict[str, float]:
    """ms per call of ``model.model.layers[first:first+count]`` (run in sequence): decode and prefill."""
    from transformers import DynamicCache

    layers = list(model.model.layers[first : first + count])
    rotary = model.model.rotary_emb
    hidden = model.config.hidden_size
    dtype = next(model.parameters()).dtype
    generator = torch.Generator().manual_seed(0)

    def run(h: torch.Tensor, start: int, cache: Any) -> torch.Tensor:
        positions = torch.arange(start, start + h.shape[1])[None]
        embeddings = rotary(h, positions)
        for layer in layers:
            h = layer(h, attention_mask=None, position_embeddings=embeddings, position_ids=positions,
                      use_cache=cache is not None, **{cache_keyword(layer.forward): cache})
        return h

    context = torch.randn(1, ctx, hidden, generator=generator).to(dtype)
    tokens = torch.randn(1, steps, hidden, generator=generator).to(dtype)
    long = torch.randn(1, prefill, hidden, generator=generator).to(dtype)

    def prepare() -> Any:
        cache = DynamicCache()
        run(context, 0, cache)
        return cache

    def decode(cache: Any, t: int) -> None:
        run(tokens[:, t : t + 1], ctx + t, cache)

    with torch.no_grad():
        decode_s = median_step(prepare, decode, steps, repeats)
        prefill_s = best(lambda: run(long, 0, None), repeats)
    return {"decode_ms": 1e3 * decode_s, "prefill_ms": 1e3 * prefill_s}


def interleaved_timings(models: dict[str, Any], prompt: int, prefill: int, steps: int, repeats: int) -> dict[str, dict[str, Any]]:
    """Whole-model speed of several models, measured in turns so that background load hits them alike.

    Decode: in each of ``repeats`` rounds every model gets a fresh cache of ``prompt`` tokens, then
    the models take turns one decode step at a time for ``steps`` steps. Prefill: the models take
    turns, one ``prefill``-token forward each, ``repeats`` times.

    Returns:
        Per model: ``decode_tok_s`` (from the median step), ``prefill_tok_s`` (best run) and the
        raw ``decode_steps`` / ``prefill_runs`` in seconds, in turn order (for paired ratios).
    """
    vocab = next(iter(models.values())).config.vocab_size
    generator = torch.Generator().manual_seed(0)
    start_ids = torch.randint(0, vocab, (1, prompt), generator=generator)
    next_ids = torch.randint(0, vocab, (1, steps), generator=generator)
    long_ids = torch.randint(0, vocab, (1, prefill), generator=generator)
    decode_steps: dict[str, list[float]] = {name: [] for name in models}
    prefill_runs: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():  # warm-up
            cache = output_cache(model(start_ids, use_cache=True, logits_to_keep=1))
            model(next_ids[:, :1], **with_cache(model, cache, use_cache=True))
            model(long_ids, use_cache=True, logits_to_keep=1)
        for _ in range(repeats):
            caches = {name: output_cache(m(start_ids, use_cache=True, logits_to_keep=1)) for name, m in models.items()}
            for t in range(steps):
                for name, model in models.items():
                    started = time.perf_counter()
                    model(next_ids[:, t : t + 1], **with_cache(model, caches[name], use_cache=True))
                    decode_steps[name].append(time.perf_counter() - started)
            for name, model in models.items():
                started = time.perf_counter()
                model(long_ids, use_cache=True, logits_to_keep=1)
                prefill_runs[name].append(time.perf_counter() - started)
    return {
        name: {
            "decode_tok_s": 1 / statistics.median(decode_steps[name]),
            "prefill_tok_s": prefill / min(prefill_runs[name]),
            "decode_steps": decode_steps[name],
            "prefill_runs": prefill_runs[name],
        }
        for name in models
    }


def paired_ratio(slow: list[float], fast: list[float]) -> float:
    """The median of ``slow[i] / fast[i]`` over steps measured back to back."""
    return statistics.median(a / b for a, b in zip(slow, fast, strict=True))


MATMULS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


def decode_profile(model: Any, prompt: int, steps: int = 10) -> dict[str, float]:
    """ms per decode step in matrix products and in everything else, and operator calls per step."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, model.config.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    token = ids[:, -1:]
    with torch.no_grad():
        cache = output_cache(model(ids, use_cache=True, logits_to_keep=1))
        for _ in range(3):
            model(token, **with_cache(model, cache, use_cache=True))
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(steps):
                model(token, **with_cache(model, cache, use_cache=True))
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / steps / 1e3
    matmul = sum(e.self_cpu_time_total for e in events if e.key in MATMULS) / steps / 1e3
    return {"matmul_ms": matmul, "other_ms": total - matmul, "calls": sum(e.count for e in events) / steps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", default=None, help="source model (default: the embedded SmolLM2-135M)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per figure; the best is kept (default 3)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16 (default both)")
    parser.add_argument("--prefill", type=int, default=512, help="prefill length (default 512)")
    parser.add_argument("--steps", type=int, default=32, help="decode steps per timed run (default 32)")
    parser.add_argument("--context", type=int, default=128, help="KV-cache context for the decode timings (default 128)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    from surgery.api import parallel
    from surgery.source import open_source

    source = open_source(args.model, quiet=True)
    work = Path(tempfile.mkdtemp(prefix="parallel-speed-"))
    try:
        return _run(args, source.path, source.name, work, parallel)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _run(args: argparse.Namespace, source_path: Path, source_name: str, work: Path, parallel: Any) -> int:
    print(f"source: {source_name}; torch {torch.__version__}, {args.threads} thread(s), best of {args.repeats}", file=sys.stderr)
    pairs, shared = work / "pairs", work / "pairs-shared"
    parallel(source_path, pairs, groups=PAIRS, quiet=True)
    parallel(source_path, shared, groups=PAIRS, mlp_input="shared", quiet=True)
    blocks = {k: work / f"block{k}" for k in (2, 4)}
    for k, path in blocks.items():
        parallel(source_path, path, groups=f"10-{10 + k - 1}", quiet=True)

    rows_a: list[str] = []
    rows_b: list[str] = []
    rows_c: list[str] = []
    for name in args.dtypes.split(","):
        dtype = DTYPES[name]
        base = load(source_path, dtype, remote=False)
        for k, path in blocks.items():
            wide = load(path, dtype, remote=True)
            seq = block_timings(base, 10, k, args.context, args.prefill, args.steps, args.repeats)
            par = block_timings(wide, 10, 1, args.context, args.prefill, args.steps, args.repeats)
            rows_a.append(
                f"| {name} | K={k} | {seq['decode_ms']:.2f} | {par['decode_ms']:.2f} | {seq['decode_ms'] / par['decode_ms']:.2f}x "
                f"| {seq['prefill_ms']:.1f} | {par['prefill_ms']:.1f} | {seq['prefill_ms'] / par['prefill_ms']:.2f}x |"
            )
            print(rows_a[-1], file=sys.stderr)
            del wide
        # The three models take turns step by step, so a load spike on a shared machine hits them
        # alike; the speed-up is the ratio of median steps and, in brackets, the median of the
        # ratios of steps run back to back.
        models = {"30 layers": base}
        for label, path in (("exact", pairs), ("shared (approximation)", shared)):
            models[label] = load(path, dtype, remote=True)
        timings = interleaved_timings(models, args.context, args.prefill, args.steps, args.repeats)
        profiles = {label: decode_profile(model, args.context) for label, model in models.items()}
        plain = timings["30 layers"]
        for label in ("exact", "shared (approximation)"):
            fast = timings[label]
            decode_pair = paired_ratio(plain["decode_steps"], fast["decode_steps"])
            prefill_pair = paired_ratio(plain["prefill_runs"], fast["prefill_runs"])
            rows_b.append(
                f"| {name} | {label} | {plain['decode_tok_s']:.1f} | {fast['decode_tok_s']:.1f} | "
                f"{fast['decode_tok_s'] / plain['decode_tok_s']:.2f}x ({decode_pair:.2f}x) | {plain['prefill_tok_s']:.0f} | "
                f"{fast['prefill_tok_s']:.0f} | {fast['prefill_tok_s'] / plain['prefill_tok_s']:.2f}x ({prefill_pair:.2f}x) | 1.25x |"
            )
            print(rows_b[-1], file=sys.stderr)
        del models, base
        # The most merging can save on a CPU: all the non-matmul time of the merged layers (the
        # matrix products read the same weight bytes either way).
        plain_prof = profiles["30 layers"]
        total = plain_prof["matmul_ms"] + plain_prof["other_ms"]
        merged_share = MERGED_LAYERS / NUM_LAYERS
        for label, prof in profiles.items():
            ceiling = f"{total / (total - plain_prof['other_ms'] * merged_share):.2f}x" if label == "30 layers" else ""
            rows_c.append(
                f"| {name} | {label} | {prof['matmul_ms']:.1f} | {prof['other_ms']:.1f} | {prof['calls']:.0f} | {ceiling} |"
            )
            print(rows_c[-1], file=sys.stderr)

    print(f"(a) one wide block vs the K layers in sequence, SmolLM2-135M layers 10.., CPU, {args.threads} thread(s)\n")
    print(f"| dtype | group | decode ms, K layers | decode ms, wide | speed-up | prefill-{args.prefill} ms, K layers "
          f"| prefill-{args.prefill} ms, wide | speed-up |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows_a))
    print(f"\n(b) whole model, parallel pairs over layers 10-21 (depth 30 -> 24), CPU, {args.threads} thread(s)\n")
    print(f"| dtype | mlp-input | decode tok/s, 30 layers | decode tok/s, depth 24 | speed-up (paired) | prefill-{args.prefill} tok/s, "
          f"30 layers | prefill-{args.prefill} tok/s, depth 24 | speed-up (paired) | physical limit |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows_b))
    print(f"\n(c) where a batch-1 decode step goes (torch.profiler, {args.context}-token context), ms per token\n")
    print("| dtype | model | matrix products | everything else | operator calls | ceiling of (b) on this CPU |")
    print("|---|---|---|---|---|---|")
    print("\n".join(rows_c))
    print("\nGPU: not measured (no GPU on this machine).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
