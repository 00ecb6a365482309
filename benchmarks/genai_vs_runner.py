"""Benchmark: onnxruntime-genai against surgery's runner, on surgery's exports and the reference builder's, batch 1, CPU.

What it measures
    For SmolLM2-135M (the embedded model, dequantized to fp32) and its ``--drop 10-20`` version, each exported
    with ``surgery export-onnx`` (which writes ``genai_config.json``) as is and with ``--share-buffer``, side by
    side in one run with the same thread count:

    * decode speed: tokens per second over ``--decode`` greedy steps after a ``--prompt``-token prefill,
      in surgery's runner (:class:`exporters.onnx_runtime.OnnxCausalLM`, the engine of ``surgery generate``,
      CPUExecutionProvider) on both exports (what the share-buffer rewrite costs an ordinary cache), and in
      onnxruntime-genai (its ``Generator``, CPU provider) on the plain export with its dynamic cache and on
      the ``--share-buffer`` export with ``past_present_share_buffer`` true (one static buffer per
      past/present pair, ``max_length`` = prompt + decode + 1, as short as the run allows);
    * unless ``--no-traced``: the same checkpoint exported with ``--no-fuse`` (surgery's graph as traced, without
      ONNX Runtime's fused operators: the baseline of :mod:`exporters.onnx_fusion`), run in both engines;
    * unless ``--no-builder``: the same checkpoint exported with the reference builder's graph
      (``export_onnx_graph(..., graph="builder")``, i.e. ``export-onnx --graph builder``: onnxruntime-genai's
      model builder, fp32, GroupQueryAttention), run in onnxruntime-genai with the builder's own
      ``genai_config.json`` (its share buffer on) and in surgery's runner;
    * unless ``--no-int4``: a ``--quantize int4`` export of surgery's graph (MatMulNBits, block 32), run in both
      engines (dynamic cache), and the share of its greedy tokens equal to the fp32 runner's (int4 tokens are
      not expected to be all equal);
    * unless ``--no-wide``, for the full model only: SmolLM2 with two pairs merged into wide blocks
      (``surgery parallel --groups 10-11,12-13``: 28 layers, the same weights), exported with surgery's graph,
      run in both engines against the unmerged 30-layer export above; and unless ``--no-builder`` also exported
      with ``--graph builder`` (the wide layers fused: one GroupQueryAttention over K·H heads each), run in both
      engines against the unmerged model's builder export;
    * for every engine, the physical limit beside it: the weight bytes one decode step reads (the logic and
      the bandwidth measurement of ``benchmarks/onnx_vs_eager.py``, imported from it: every weight once, the
      tied embedding whole as the output projection; for int4, the MatMulNBits weights, scales and zero
      points instead of the fp32 matrices they replace) divided by the memory read bandwidth (``torch.sum``
      over 1 GiB, the same thread count, before the runs and after each model's; the best);
    * the ratios to surgery's runner on the plain export, and for every engine the share of its greedy tokens
      equal to its reference's (the fp32 runner on surgery's plain export; for the wide model's
      onnxruntime-genai, the runner on the wide export).

    Each round runs every engine in a new session (unless ``--keep-sessions``), warmed up with 4 steps: where
    ONNX Runtime places a session's prepacked weights sets its MatMul speed for the session's life (three
    sessions of the builder's pruned graph in one process, interleaved: the same MatMuls 6-10% apart), so a
    figure from one session measures its placement as much as its graph; fresh sessions sample placements.
    All engines of a model (the wide ones with the full model) run in one round-robin, the two sides of every
    target next to each other (onnxruntime-genai's three: the builder's between surgery's two): every other round
    starts one group later, and the rounds between run the same order backwards (so with an even ``--repeat``
    each side of a pair runs first in half the rounds); the figures are the best of ``--repeat`` rounds (a
    machine shared with other jobs only ever makes a run slower), and the median is printed too.
    Every target also gets its paired ratio: the median, over the rounds, of the two engines' speeds in the same
    round (measured one after the other, so a slow spell of the machine hits both), with the rounds' range.

Targets (issue 16; printed as PASS/MISS; the script exits 0 either way: it is a benchmark, not a test)
    * decode of surgery's export at least that of the builder's export of the same checkpoint, per model and
      engine, judged on the paired ratio (the machine's drift between rounds is larger than the difference
      measured): surgery's runner on both, and onnxruntime-genai on both with the builder's cache mode (its
      ``genai_config.json`` turns the share buffer on: surgery's ``--share-buffer`` export against it; surgery's
      plain export, dynamic cache, is printed beside it); also printed: surgery's runner on surgery's export
      against onnxruntime-genai on the builder's (the reference as shipped);
    * int4 decode at least 2.5x the fp32 decode of the same export, per model and engine;
    * aim: every engine at 80% of its bandwidth limit or more;
    * the wide-block model's decode against the unmerged model's, per engine and graph: the ratio, no target.

How to run (needs ``pip install 'layer-surgery[genai]'``)
    python benchmarks/genai_vs_runner.py                         # 1 thread, 6 rounds
    python benchmarks/genai_vs_runner.py --workdir /tmp/genai-bench   # reuse the exports next time
    python benchmarks/genai_vs_runner.py --no-int4 --no-builder --no-wide   # the four fp32 surgery-graph engines
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))  # onnx_vs_eager, beside this file

from onnx_vs_eager import export_builder_graph, read_bandwidth, weight_bytes_per_token  # noqa: E402

import surgery  # noqa: E402
from exporters.onnx import export_onnx  # noqa: E402
from exporters.onnx_builder import export_onnx_graph  # noqa: E402
from exporters.onnx_genai import genai_problem  # noqa: E402
from exporters.onnx_runtime import OnnxCausalLM  # noqa: E402
from surgery.source import open_source  # noqa: E402

BUILDER_TARGET = 1.0  # surgery's export at least the builder's, same engine
INT4_TARGET = 2.5  # int4 decode over fp32 decode, same export, same engine
BANDWIDTH_AIM = 0.80
WIDE_GROUPS = "10-11,12-13"


def export(source: Path, workdir: Path, name: str, drop: str | None, share_buffer: bool, int4: bool = False,
           fuse: bool = True) -> Path:
    """The ONNX directory of the model (pruned first with ``drop``), written once into the work directory."""
    checkpoint = source if drop is None else workdir / name
    onnx_dir = workdir / f"{name}-onnx{'-share' if share_buffer else ''}{'-int4' if int4 else ''}{'' if fuse else '-traced'}"
    if drop is not None and not (checkpoint / "config.json").exists():
        surgery.prune(source, checkpoint, drop=drop, quiet=True)
    if not (onnx_dir / "genai_config.json").exists():
        flags = (" --share-buffer" if share_buffer else "") + (" --quantize int4" if int4 else "") + \
            ("" if fuse else " --no-fuse")
        sys.stderr.write(f"exporting {name} to ONNX{flags} (validated)...\n")
        export_onnx(checkpoint, onnx_dir, quiet=True, force=True, share_buffer=share_buffer,
                    quantize="int4" if int4 else None, fuse=fuse)
    return onnx_dir


def export_wide(source: Path, workdir: Path, name: str) -> tuple[Path, Path]:
    """(checkpoint, ONNX directory) of the model with ``WIDE_GROUPS`` merged into wide blocks, written once."""
    checkpoint, onnx_dir = workdir / f"{name}-wide", workdir / f"{name}-wide-onnx"
    if not (checkpoint / "config.json").exists():
        surgery.parallel(source, checkpoint, groups=WIDE_GROUPS, quiet=True, force=True)
    if not (onnx_dir / "genai_config.json").exists():
        sys.stderr.write(f"exporting {name} with wide blocks {WIDE_GROUPS} to ONNX (validated)...\n")
        export_onnx(checkpoint, onnx_dir, quiet=True, force=True, trust_remote_code=True)
    return checkpoint, onnx_dir


def export_wide_builder(checkpoint: Path, workdir: Path, name: str) -> Path:
    """The wide-block checkpoint exported with ``--graph builder`` (its wide layers fused), written once."""
    onnx_dir = workdir / f"{name}-wide-onnx-builder"
    if not (onnx_dir / "model.onnx").exists():
        sys.stderr.write(f"exporting {name} with wide blocks {WIDE_GROUPS} with --graph builder (validated)...\n")
        result = export_onnx_graph(checkpoint, onnx_dir, graph="builder", quiet=True, force=True,
                                   trust_remote_code=True)
        sys.stderr.write(result.validation.format() + "\n")
    return onnx_dir


def checkpoint_weight_bytes(checkpoint: Path, trust_remote_code: bool = False) -> int:
    """The fp32 weight bytes one decode step reads (:func:`onnx_vs_eager.weight_bytes_per_token`)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(checkpoint), dtype=torch.float32,
                                                 trust_remote_code=trust_remote_code)
    total = weight_bytes_per_token(model)
    del model
    return total


def int4_weight_bytes(onnx_dir: Path, float_bytes: int) -> int:
    """The bytes one decode step of an int4 export reads: the fp32 count, less every matrix a MatMulNBits replaced
    (K x N fp32), plus its packed weights, scales and zero points (a tied lm_head, counted whole in the fp32
    figure, is one of those matrices; the float table left for the embedding's Gather is read one row)."""
    import onnx
    from onnx import helper

    model = onnx.load(str(onnx_dir / "model.onnx"), load_external_data=False)
    sizes = {i.name: int(np.prod(i.dims)) * np.dtype(helper.tensor_dtype_to_np_dtype(i.data_type)).itemsize
             for i in model.graph.initializer}
    total = float_bytes
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            total += sum(sizes.get(name, 0) for name in node.input[1:4]) - int(attributes["K"]) * int(attributes["N"]) * 4
    return total


class Genai:
    """onnxruntime-genai on an export directory, with ``threads`` intra-op threads; ``share_buffer`` None keeps
    what the directory's ``genai_config.json`` says."""

    def __init__(self, directory: Path, threads: int, share_buffer: bool | None) -> None:
        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(directory))
        overlay: dict[str, object] = {"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}
        if share_buffer is not None:
            overlay["search"] = {"past_present_share_buffer": share_buffer}
        config.overlay(json.dumps(overlay))
        self.model = og.Model(config)

    def greedy(self, ids: list[int], steps: int) -> tuple[float, list[int]]:
        """(decode tokens/s after the first token, the generated ids)."""
        params = self.og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(ids) + steps + 1)
        generator = self.og.Generator(self.model, params)
        generator.append_tokens(np.asarray([ids], dtype=np.int32))
        generator.generate_next_token()
        tokens = [int(generator.get_next_tokens()[0])]
        started = time.perf_counter()
        for _ in range(steps):
            if generator.is_done():  # the end-of-sequence token: as the runner, stop there
                break
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
        return (len(tokens) - 1) / (time.perf_counter() - started), tokens


Run = Callable[[np.ndarray, int], tuple[float, list[int]]]  # (prompt ids [1, n], steps) -> (tok/s, tokens)


@dataclass
class Engine:
    """One engine on one export, in a model's round-robin."""

    label: str  # the engine as printed
    graph: str  # the export as printed
    load: Callable[[], Run]  # a new session of the engine on the export
    layers: int
    weight_bytes: int
    reference: str | None  # the engine whose greedy tokens this one's are compared with
    session: Run | None = None  # the session in use: the first is made with the engine, for its layer count
    measured: bool = False  # whether the session in use has been measured
    speeds: list[float] = field(default_factory=list)
    agreement: list[float] = field(default_factory=list)

    def measure(self, ids: np.ndarray, steps: int, fresh: bool) -> tuple[float, list[int]]:
        """One measured run; with ``fresh``, in a session of its own, warmed up first.

        Why fresh sessions: where ONNX Runtime's prepacked weights land in memory decides the speed of the weight
        MatMuls for the session's whole life. Measured here: three sessions of the same graph in one process,
        interleaved, ran the same MatMuls 6-10% apart, as far apart as surgery's graph and the builder's."""
        if self.session is None or (fresh and self.measured):
            self.session = None  # the old session goes before the new one is made
            self.session = self.load()
            self.session(ids, 4)
        self.measured = True
        return self.session(ids, steps)


def runner_session(directory: Path, threads: int) -> tuple[Run, int]:
    """A new session of surgery's runner on the export: (its run, the model's layer count)."""
    lm = OnnxCausalLM.load(directory, threads=threads)

    def run(ids: np.ndarray, steps: int) -> tuple[float, list[int]]:
        result = lm.greedy(ids, max_new_tokens=steps + 1)
        return result.decode_tokens_per_second, result.tokens[0].tolist()

    return run, lm.num_layers


def runner_engine(directory: Path, threads: int, graph: str, weight_bytes: int, reference: str | None) -> Engine:
    first, layers = runner_session(directory, threads)
    return Engine("surgery's runner", graph, lambda: runner_session(directory, threads)[0], layers, weight_bytes,
                  reference, session=first)


def genai_engine(directory: Path, threads: int, share_buffer: bool | None, label: str, graph: str, layers: int,
                 weight_bytes: int, reference: str | None) -> Engine:
    def load() -> Run:
        genai = Genai(directory, threads, share_buffer)
        return lambda ids, steps: genai.greedy(ids[0].tolist(), steps)

    return Engine(label, graph, load, layers, weight_bytes, reference, session=load())


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for both engines (default 1)")
    parser.add_argument("--repeat", type=int, default=6, help="rounds (default 6; even, so each order runs as often)")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens (default 16)")
    parser.add_argument("--decode", type=int, default=128, help="decode steps per round (default 128)")
    parser.add_argument("--workdir", type=Path, help="where the exports go (default: a temporary directory)")
    parser.add_argument("--no-int4", action="store_true", help="leave out the --quantize int4 export")
    parser.add_argument("--no-builder", action="store_true", help="leave out the reference builder's export")
    parser.add_argument("--no-wide", action="store_true", help="leave out the wide-block model")
    parser.add_argument("--keep-sessions", action="store_true",
                        help="measure every round in the engine's first session (faster; by default each round "
                             "makes new sessions: a session's memory placement sets its MatMul speed)")
    parser.add_argument("--no-traced", action="store_true",
                        help="leave out surgery's traced graph (--no-fuse), the fused graph's baseline")
    args = parser.parse_args()
    if (problem := genai_problem()) is not None:
        sys.exit(problem)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="genai-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import onnxruntime_genai as og

    source = open_source(None, quiet=True).path
    bandwidth = read_bandwidth(args.threads)
    print(f"machine: {platform.machine()} {os.cpu_count()} logical CPUs, onnxruntime-genai {og.__version__}, "
          f"threads {args.threads}, prompt {args.prompt} tokens, {args.decode} decode steps, best of {args.repeat}; "
          f"memory read bandwidth {bandwidth / 1e9:.1f} GB/s (measured); load average {os.getloadavg()[0]:.1f}")
    results: list[tuple[str, dict[str, Engine]]] = []
    for name, drop in (("SmolLM2-135M", None), ("SmolLM2-135M --drop 10-20", "10-20")):
        short = name.split()[0] + ("-drop" if drop else "")
        checkpoint = source if drop is None else workdir / short
        plain, shared = (export(source, workdir, short, drop, share) for share in (False, True))
        int4 = None if args.no_int4 else export(source, workdir, short, drop, False, int4=True)
        traced = None if args.no_traced else export(source, workdir, short, drop, False, fuse=False)
        builder = None
        if not args.no_builder:
            builder, why_not = export_builder_graph(checkpoint, workdir, short)
            if builder is None:
                sys.stderr.write(f"  {name}: no builder engines ({why_not})\n")
        wide = None if args.no_wide or drop is not None else export_wide(source, workdir, short)
        fp32_bytes = checkpoint_weight_bytes(checkpoint)

        engines: dict[str, Engine] = {}
        engines["runner"] = runner_engine(plain, args.threads, "plain", fp32_bytes, None)
        layers = engines["runner"].layers
        if builder is not None:
            engines["runner, builder"] = runner_engine(builder, args.threads, "--graph builder", fp32_bytes, "runner")
            engines["genai builder"] = genai_engine(builder, args.threads, None, "onnxruntime-genai, builder's config",
                                                    "--graph builder", layers, fp32_bytes, "runner")
        engines["genai share"] = genai_engine(shared, args.threads, True, "onnxruntime-genai, share buffer",
                                              "--share-buffer", layers, fp32_bytes, "runner")
        engines["genai"] = genai_engine(plain, args.threads, False, "onnxruntime-genai, dynamic cache", "plain",
                                        layers, fp32_bytes, "runner")
        engines["runner, share graph"] = runner_engine(shared, args.threads, "--share-buffer", fp32_bytes, "runner")
        if traced is not None:
            engines["runner, traced"] = runner_engine(traced, args.threads, "--no-fuse", fp32_bytes, "runner")
            engines["genai traced"] = genai_engine(traced, args.threads, False, "onnxruntime-genai, dynamic cache",
                                                   "--no-fuse", layers, fp32_bytes, "runner")
        if int4 is not None:
            int4_bytes = int4_weight_bytes(int4, fp32_bytes)
            engines["runner, int4"] = runner_engine(int4, args.threads, "--quantize int4", int4_bytes, "runner")
            engines["genai int4"] = genai_engine(int4, args.threads, False, "onnxruntime-genai, dynamic cache",
                                                 "--quantize int4", layers, int4_bytes, "runner")
        if wide is not None:
            wide_bytes = checkpoint_weight_bytes(wide[0], trust_remote_code=True)
            engines["runner, wide"] = runner_engine(wide[1], args.threads, f"wide blocks {WIDE_GROUPS}", wide_bytes,
                                                    None)
            engines["genai wide"] = genai_engine(wide[1], args.threads, False, "onnxruntime-genai, dynamic cache",
                                                 f"wide blocks {WIDE_GROUPS}", engines["runner, wide"].layers,
                                                 wide_bytes, "runner, wide")
            if builder is not None:
                wide_builder = export_wide_builder(wide[0], workdir, short)
                label = f"wide blocks {WIDE_GROUPS}, --graph builder"
                engines["runner, wide builder"] = runner_engine(wide_builder, args.threads, label, wide_bytes,
                                                                "runner, wide")
                engines["genai wide builder"] = genai_engine(wide_builder, args.threads, None,
                                                             "onnxruntime-genai, builder's config", label,
                                                             engines["runner, wide"].layers, wide_bytes, "runner, wide")

        ids = np.random.default_rng(0).integers(100, 40_000, (1, args.prompt)).astype(np.int64)
        for engine in engines.values():  # warm-up every engine's first session
            if engine.session is not None:
                engine.session(ids, 4)
        # The sides of each target stay next to each other: the rotation moves whole groups.
        grouped = [("runner", "runner, builder"), ("genai share", "genai builder", "genai")]
        groups = [tuple(k for k in group if k in engines) for group in grouped]
        groups += [(key,) for key in engines if not any(key in group for group in groups)]
        for round_ in range(args.repeat):
            tokens: dict[str, list[int]] = {}
            turn = (round_ // 2) % len(groups)
            rotated = groups[turn:] + groups[:turn]  # each group first in turn, and every other round backwards:
            order = [key for group in rotated for key in group]
            for key in order if round_ % 2 == 0 else order[::-1]:  # each side of a pair first as often
                speed, tokens[key] = engines[key].measure(ids, args.decode, fresh=not args.keep_sessions)
                engines[key].speeds.append(speed)
                sys.stderr.write(f"  {name} round {round_ + 1} {key}: decode {speed:.1f} tok/s\n")
            for key, engine in engines.items():
                if engine.reference is not None:
                    pairs = list(zip(tokens[key], tokens[engine.reference], strict=False))
                    engine.agreement.append(sum(a == b for a, b in pairs) / max(1, len(pairs)))
        for engine in engines.values():  # the sessions go; the figures stay
            engine.session = None
        results.append((name, engines))
        bandwidth = max(bandwidth, read_bandwidth(args.threads))  # again after the runs: the best is the machine's

    print()
    print("| model | layers | engine | graph | decode (tok/s) | median | vs runner, plain graph | weights/token | "
          "bandwidth limit (tok/s) | % of limit | same tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, engines in results:
        base = max(engines["runner"].speeds)
        for key, engine in engines.items():
            best, limit = max(engine.speeds), bandwidth / engine.weight_bytes
            if engine.reference is None:
                same = "(reference)" if key == "runner" else "-"
            elif min(engine.agreement) == 1.0:
                same = "yes"
            else:
                same = f"{min(engine.agreement):.0%} of {engines[engine.reference].label}'s ({engine.reference})"
            print(f"| {name} | {engine.layers} | {engine.label} | {engine.graph} | {best:.1f} | "
                  f"{median(engine.speeds):.1f} | {best / base:.2f}x | {engine.weight_bytes / 1e6:.0f} MB | "
                  f"{limit:.1f} | {100 * best / limit:.0f}% | {same} |")
    print(f"\nmemory read bandwidth, best of all passes: {bandwidth / 1e9:.1f} GB/s; "
          f"load average at the end: {os.getloadavg()[0]:.1f}")

    def ratio(a: Engine, b: Engine) -> tuple[float, float]:
        return max(a.speeds) / max(b.speeds), median(a.speeds) / median(b.speeds)

    def paired(a: Engine, b: Engine) -> tuple[float, float, float]:
        """(median, lowest, highest) over the rounds of a's speed over b's in the same round."""
        ratios = [x / y for x, y in zip(a.speeds, b.speeds, strict=True)]
        return median(ratios), min(ratios), max(ratios)

    def verdict(value: float, target: float) -> str:
        return "PASS" if value >= target else "MISS"

    print("\nTargets (best of the rounds; the ratio of the medians in brackets; the builder targets are judged on "
          "the paired ratio: the median over the rounds of the two speeds in the same round, the rounds' range beside)")
    for name, engines in results:
        for surgery_key, builder_key, engine_name in (
                ("runner", "runner, builder", "surgery's runner"),
                ("genai share", "genai builder", "onnxruntime-genai, share buffer in both"),
                ("genai", "genai builder", "onnxruntime-genai, surgery's dynamic cache against the builder's share buffer")):
            if builder_key in engines:
                best, mid = ratio(engines[surgery_key], engines[builder_key])
                pair, low, high = paired(engines[surgery_key], engines[builder_key])
                print(f"{name}, {engine_name}: surgery's export {max(engines[surgery_key].speeds):.1f} tok/s, "
                      f"the builder's {max(engines[builder_key].speeds):.1f}: {best:.2f}x ({mid:.2f}x); paired "
                      f"{pair:.3f}x ({low:.2f}-{high:.2f}), target >= {BUILDER_TARGET:.2f}x: "
                      f"{verdict(pair, BUILDER_TARGET)}")
        if "genai builder" in engines:
            best, mid = ratio(engines["runner"], engines["genai builder"])
            print(f"{name}, surgery's runner on surgery's export against onnxruntime-genai on the builder's (the "
                  f"reference as shipped): {best:.2f}x ({mid:.2f}x), target >= {BUILDER_TARGET:.2f}x: "
                  f"{verdict(best, BUILDER_TARGET)}")
        for fused_key, traced_key, engine_name in (("runner", "runner, traced", "surgery's runner"),
                                                   ("genai", "genai traced", "onnxruntime-genai")):
            if traced_key in engines:
                best, mid = ratio(engines[fused_key], engines[traced_key])
                print(f"{name}, {engine_name}: surgery's fused graph {max(engines[fused_key].speeds):.1f} tok/s "
                      f"against its traced graph (--no-fuse) {max(engines[traced_key].speeds):.1f}: {best:.2f}x "
                      f"({mid:.2f}x)")
        for fp32_key, int4_key, engine_name in (("runner", "runner, int4", "surgery's runner"),
                                                ("genai", "genai int4", "onnxruntime-genai")):
            if int4_key in engines:
                best, mid = ratio(engines[int4_key], engines[fp32_key])
                print(f"{name}, {engine_name}: int4 {max(engines[int4_key].speeds):.1f} tok/s against fp32 "
                      f"{max(engines[fp32_key].speeds):.1f}: {best:.2f}x ({mid:.2f}x), target >= {INT4_TARGET}x: "
                      f"{verdict(best, INT4_TARGET)}")
        for engine in engines.values():
            fraction = max(engine.speeds) * engine.weight_bytes / bandwidth
            print(f"{name}, {engine.label}, {engine.graph}: {100 * fraction:.0f}% of the bandwidth limit, aim "
                  f"{100 * BANDWIDTH_AIM:.0f}%: {verdict(fraction, BANDWIDTH_AIM)}")
        for wide_key, base_key, engine_name in (("runner, wide", "runner", "surgery's runner"),
                                                ("genai wide", "genai", "onnxruntime-genai"),
                                                ("runner, wide builder", "runner, builder",
                                                 "surgery's runner, builder's graph"),
                                                ("genai wide builder", "genai builder",
                                                 "onnxruntime-genai, builder's graph")):
            if wide_key in engines and base_key in engines:
                best, mid = ratio(engines[wide_key], engines[base_key])
                print(f"{name}, {engine_name}: wide blocks {WIDE_GROUPS} ({engines[wide_key].layers} layers) "
                      f"{max(engines[wide_key].speeds):.1f} tok/s against unmerged ({engines[base_key].layers} "
                      f"layers) {max(engines[base_key].speeds):.1f}: {best:.2f}x ({mid:.2f}x)")


if __name__ == "__main__":
    main()
