"""Benchmark: ONNX Runtime against PyTorch eager for SmolLM2-135M, batch 1, on this CPU.

What it measures
    For SmolLM2-135M (the embedded model, dequantized to fp32) and its ``--drop 10-20`` version,
    side by side in one run, both with the KV cache and the same number of threads:

    * prefill latency: one forward of a 128-token prompt (past length 0), first token out;
    * decode speed: tokens per second over ``--decode`` greedy steps after that prefill
      (PyTorch: the ``transformers`` model called step by step with its ``DynamicCache`` under
      ``torch.inference_mode``; ONNX Runtime: :class:`exporters.onnx_runtime.OnnxCausalLM`, the
      runner of ``surgery generate``, CPUExecutionProvider);
    * the physical limit beside them: the weight bytes a decode step must read (every weight
      matrix once; the tied embedding is read whole as the output projection, an untied input
      embedding only a row) divided by the memory read bandwidth, measured in the same script
      (the best of several passes of ``torch.sum`` over a 1 GiB tensor with the same thread count,
      before and after each model's runs; the limit uses the best);
    * the reference builder's graph beside surgery's: the same checkpoint exported with
      ``export-onnx --graph builder`` (onnxruntime-genai's model builder, fp32: GroupQueryAttention,
      SkipSimplifiedLayerNormalization, packed QKV) run by the same runner, in the same rounds (skipped,
      with the reason, when the builder cannot take the model or onnxruntime-genai is missing);
    * what ONNX Runtime's own weight reads reach: a graph holding only the exported graph's
      weight MatMuls (same weights, shapes and order, one row in), timed after every engine run
      of every round, best of all. The gap between it and the decode step is everything else in
      the graph (norms, rotary, attention, cache concatenation: ~1,900 small kernels) and the runner.

    Engines rotate within each round (eager, surgery's graph, the builder's graph; each round starts one later); the figures are the best of ``--repeat`` rounds (a
    machine shared with other jobs only ever makes a run slower), and the median is printed too.

Targets (printed as PASS/MISS; the script exits 0 either way: it is a benchmark, not a test)
    * ONNX Runtime decode at least 2.5x PyTorch eager;
    * ONNX Runtime decode at least 80% of the bandwidth limit.

How to run
    python benchmarks/onnx_vs_eager.py                         # 1 thread each, 5 rounds
    python benchmarks/onnx_vs_eager.py --threads 2 --repeat 3
    python benchmarks/onnx_vs_eager.py --workdir /tmp/onnx-bench   # reuse the exports next time
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import surgery  # noqa: E402
from exporters.onnx import export_onnx  # noqa: E402
from exporters.onnx_builder import builder_problem, export_onnx_graph, graph_stats  # noqa: E402
from exporters.onnx_runtime import OnnxCausalLM  # noqa: E402
from surgery.compat import output_cache, with_cache  # noqa: E402
from surgery.source import open_source  # noqa: E402

PROMPT_TOKENS = 128
DECODE_TARGET = 2.5
BANDWIDTH_TARGET = 0.80


@dataclass
class Timing:
    prefill_ms: float
    decode_tps: float


def read_bandwidth(threads: int, gib: float = 1.0, passes: int = 7) -> float:
    """Memory read bandwidth in bytes/s: the best pass of a sum over a tensor far larger than the caches."""
    torch.set_num_threads(threads)
    data = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    data.sum()
    best = float("inf")
    for _ in range(passes):
        started = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - started)
    nbytes = data.numel() * 4
    del data
    return nbytes / best


def matmul_only(onnx_dir: Path, threads: int) -> Callable[[int], float]:
    """A timer for the exported graph's weight MatMuls alone, one token in (ONNX Runtime's weight-read floor):
    called with a number of runs, it returns the best of them in milliseconds."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    model = onnx.load(str(onnx_dir / "model.onnx"))
    weights = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:  # a tied output embedding is a Transpose of the embedding, folded by ONNX Runtime
        if node.op_type == "Transpose" and node.input[0] in weights:
            weights[node.output[0]] = numpy_helper.from_array(
                np.ascontiguousarray(numpy_helper.to_array(weights[node.input[0]]).T), node.output[0])
    nodes, used, outputs = [], {}, []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights and len(weights[node.input[1]].dims) == 2:
            weight = weights[node.input[1]]
            used[weight.name] = weight
            name = f"out{len(nodes)}"
            nodes.append(helper.make_node("MatMul", [f"x{weight.dims[0]}", weight.name], [name]))
            outputs.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    rows = sorted({int(w.dims[0]) for w in used.values()})
    graph = helper.make_graph(nodes, "weight_matmuls",
                              [helper.make_tensor_value_info(f"x{k}", onnx.TensorProto.FLOAT, [1, 1, k]) for k in rows],
                              outputs, list(used.values()))
    blob = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9).SerializeToString()
    del model, weights
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(blob, options, providers=["CPUExecutionProvider"])
    feed = {f"x{k}": np.random.default_rng(0).random((1, 1, k), dtype=np.float32) for k in rows}
    session.run(None, feed)

    def best_ms(runs: int) -> float:
        best = float("inf")
        for _ in range(runs):
            started = time.perf_counter()
            session.run(None, feed)
            best = min(best, time.perf_counter() - started)
        return best * 1000

    return best_ms


def weight_bytes_per_token(model: Any) -> int:
    """Bytes of weights one decode step reads: every parameter once, an untied input embedding only a row."""
    seen: set[int] = set()
    total = 0
    for parameter in model.parameters():
        if parameter.data_ptr() in seen:
            continue
        seen.add(parameter.data_ptr())
        total += parameter.numel() * parameter.element_size()
    embedding = model.get_input_embeddings().weight
    output = model.get_output_embeddings()
    tied = output is not None and output.weight.data_ptr() == embedding.data_ptr()
    if not tied:
        total -= embedding.numel() * embedding.element_size() - embedding.shape[1] * embedding.element_size()
    return total


def time_eager(model: Any, ids: torch.Tensor, steps: int) -> Timing:
    with torch.inference_mode():
        started = time.perf_counter()
        out = model(input_ids=ids, use_cache=True)
        prefill = time.perf_counter() - started
        cache, token = output_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
        started = time.perf_counter()
        for _ in range(steps):
            out = model(**with_cache(model, cache, input_ids=token, use_cache=True))
            cache, token = output_cache(out), out.logits[:, -1].argmax(-1, keepdim=True)
        decode = time.perf_counter() - started
    return Timing(prefill * 1000, steps / decode)


def time_onnx(lm: OnnxCausalLM, ids: np.ndarray, steps: int) -> Timing:
    result = lm.greedy(ids, max_new_tokens=steps + 1)
    return Timing(result.prefill_seconds * 1000, result.decode_tokens_per_second)


def export_builder_graph(checkpoint: Path, workdir: Path, name: str) -> tuple[Path | None, str]:
    """(the builder's ONNX directory or None, why not), written once into the work directory."""
    onnx_dir = workdir / f"{name}-onnx-builder"
    if (onnx_dir / "model.onnx").exists():
        return onnx_dir, ""
    if (problem := builder_problem(checkpoint)) is not None:
        return None, problem
    sys.stderr.write(f"exporting {name} with --graph builder (validated)...\n")
    result = export_onnx_graph(checkpoint, onnx_dir, graph="builder", quiet=True)
    sys.stderr.write(result.validation.format() + "\n")
    return onnx_dir, ""


def export(source: Path, workdir: Path, name: str, drop: str | None) -> tuple[Path, Path]:
    """(checkpoint, ONNX directory), written once into the work directory."""
    checkpoint = source if drop is None else workdir / name
    onnx_dir = workdir / f"{name}-onnx"
    if drop is not None and not (checkpoint / "config.json").exists():
        surgery.prune(source, checkpoint, drop=drop, quiet=True)
    if not (onnx_dir / "model.onnx").exists():
        sys.stderr.write(f"exporting {name} to ONNX (validated)...\n")
        result = export_onnx(checkpoint, onnx_dir, quiet=True)
        assert result.validation is not None
        sys.stderr.write(result.validation.format() + "\n")
    return checkpoint, onnx_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for both engines (default 1: on a machine shared with other jobs, one core each "
                        "is the stable measurement; use the core count on a dedicated machine)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--decode", type=int, default=64, help="decode steps per round (default 64)")
    parser.add_argument("--workdir", type=Path, help="where the exports go (default: a temporary directory)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="onnx-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from transformers import AutoModelForCausalLM

    source = open_source(None, quiet=True).path
    cases = [("SmolLM2-135M", None), ("SmolLM2-135M --drop 10-20", "10-20")]
    bandwidth = read_bandwidth(args.threads)
    print(f"machine: {platform.machine()} {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
          f"threads {args.threads}; memory read bandwidth {bandwidth / 1e9:.1f} GB/s (measured); "
          f"load average {os.getloadavg()[0]:.1f} (other jobs on the machine slow both engines)")
    rows = []
    for name, drop in cases:
        checkpoint, onnx_dir = export(source, workdir, name.split()[0] + ("-drop" if drop else ""), drop)
        builder_dir, why_not = export_builder_graph(checkpoint, workdir, name.split()[0] + ("-drop" if drop else ""))
        if builder_dir is None:
            sys.stderr.write(f"  {name}: no builder column ({why_not})\n")
        torch.set_num_threads(args.threads)
        model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32).eval()
        lm = OnnxCausalLM.load(onnx_dir, threads=args.threads)
        lm_builder = OnnxCausalLM.load(builder_dir, threads=args.threads) if builder_dir is not None else None
        nodes = {"onnx": graph_stats(onnx_dir / "model.onnx")["nodes"],
                 "builder": graph_stats(builder_dir / "model.onnx")["nodes"] if builder_dir is not None else 0}
        layers, provider = int(model.config.num_hidden_layers), lm.provider
        floor = matmul_only(onnx_dir, args.threads)
        floor_ms = floor(3)
        rng = np.random.default_rng(0)
        ids = rng.integers(100, int(model.config.vocab_size), (1, PROMPT_TOKENS)).astype(np.int64)
        time_eager(model, torch.from_numpy(ids), 4)  # warm-up both
        time_onnx(lm, ids, 4)
        if lm_builder is not None:
            time_onnx(lm_builder, ids, 4)
        eager: list[Timing] = []
        ort: list[Timing] = []
        built: list[Timing] = []
        engines = [("eager", eager), ("onnx", ort)] + ([("builder", built)] if lm_builder is not None else [])
        for round_ in range(args.repeat):
            shift = round_ % len(engines)
            for engine, into in engines[shift:] + engines[:shift]:
                if engine == "eager":
                    timing = time_eager(model, torch.from_numpy(ids), args.decode)
                else:
                    timing = time_onnx(lm if engine == "onnx" else lm_builder, ids, args.decode)  # type: ignore[arg-type]
                into.append(timing)
                floor_ms = min(floor_ms, floor(10))
                sys.stderr.write(f"  {name} round {round_ + 1} {engine}: prefill {timing.prefill_ms:.0f} ms, "
                                 f"decode {timing.decode_tps:.1f} tok/s\n")
        weights = weight_bytes_per_token(model)
        del model, lm, lm_builder, floor
        bandwidth = max(bandwidth, read_bandwidth(args.threads))  # again after the runs: the best is the machine's
        limit = bandwidth / weights
        rows.append((name, layers, weights, eager, ort, limit, provider, floor_ms, built, nodes))

    print()
    header = (f"| model | layers | engine | prefill {PROMPT_TOKENS} tok (ms) | decode (tok/s) | median decode | "
              f"vs eager | graph nodes | weights/token | bandwidth limit (tok/s) | % of limit |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    verdicts = []
    for name, layers, weights, eager, ort, limit, provider, floor_ms, built, nodes in rows:
        best_eager = max(t.decode_tps for t in eager)
        best_ort = max(t.decode_tps for t in ort)
        columns = [("PyTorch eager", eager, "-"), (f"ONNX Runtime ({provider}), surgery's graph", ort, nodes["onnx"])]
        if built:
            columns.append((f"ONNX Runtime ({provider}), builder's graph", built, nodes["builder"]))
        for engine, timings, count in columns:
            best = max(t.decode_tps for t in timings)
            print(f"| {name} | {layers} | {engine} | {min(t.prefill_ms for t in timings):.0f} | {best:.1f} | "
                  f"{statistics.median(t.decode_tps for t in timings):.1f} | {best / best_eager:.2f}x | {count} | "
                  f"{weights / 1e6:.0f} MB | {limit:.1f} | {100 * best / limit:.0f}% |")
        if built:
            best_built = max(t.decode_tps for t in built)
            print(f"|  |  | builder's graph / surgery's graph, decode | | {best_built / best_ort:.2f}x | "
                  f"{statistics.median(t.decode_tps for t in built) / statistics.median(t.decode_tps for t in ort):.2f}x "
                  f"(medians) | | | | | |")
        verdicts.append((name, best_ort / best_eager, best_ort / limit, floor_ms, best_ort))
    print(f"\nmemory read bandwidth, best of all passes: {bandwidth / 1e9:.1f} GB/s; "
          f"load average at the end: {os.getloadavg()[0]:.1f}")
    for name, speedup, fraction, floor_ms, best_ort in verdicts:
        print(f"{name}: ONNX Runtime decode {speedup:.2f}x eager (target {DECODE_TARGET}x: "
              f"{'PASS' if speedup >= DECODE_TARGET else 'MISS'}), {100 * fraction:.0f}% of the bandwidth limit "
              f"(target {100 * BANDWIDTH_TARGET:.0f}%: {'PASS' if fraction >= BANDWIDTH_TARGET else 'MISS'})")
        print(f"  where the step goes: {1000 / best_ort:.1f} ms per token, of which the weight MatMuls alone take "
              f"{floor_ms:.1f} ms in ONNX Runtime ({100 * (1000 / floor_ms) / (best_ort / fraction):.0f}% of the "
              f"bandwidth limit at best) and the rest of the graph and the runner {1000 / best_ort - floor_ms:.1f} ms")


if __name__ == "__main__":
    main()
