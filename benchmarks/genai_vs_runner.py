"""Benchmark: onnxruntime-genai against surgery's runner on the same ONNX export, batch 1, on this CPU.

What it measures
    For SmolLM2-135M (the embedded model, dequantized to fp32) and its ``--drop 10-20`` version, each
    exported twice with ``surgery export-onnx`` (which writes ``genai_config.json``): as is, and with
    ``--share-buffer``; side by side in one run with the same thread count:

    * decode speed: tokens per second over ``--decode`` greedy steps after a ``--prompt``-token prefill,
      in surgery's runner (:class:`exporters.onnx_runtime.OnnxCausalLM`, the engine of ``surgery generate``,
      CPUExecutionProvider) on both exports (what the share-buffer rewrite costs an ordinary cache), and in
      onnxruntime-genai (its ``Generator``, CPU provider) on the plain export with its dynamic cache and on
      the ``--share-buffer`` export with ``past_present_share_buffer`` true (one static buffer per
      past/present pair, ``max_length`` = prompt + decode + 1, as short as the run allows);
    * the ratios to surgery's runner on the plain export, and whether the greedy tokens of all four agree;
    * unless ``--no-int4``: a third export with ``--quantize int4`` (MatMulNBits, block 32), run in both engines
      (dynamic cache), its speed against the fp32 plain graph and the share of its greedy tokens equal to the
      fp32 runner's (int4 tokens are not expected to be all equal).

    Engines alternate within each round; the figures are the best of ``--repeat`` rounds (a machine shared
    with other jobs only ever makes a run slower), and the median is printed too.

How to run (needs ``pip install 'layer-surgery[genai]'``)
    python benchmarks/genai_vs_runner.py                         # 1 thread, 5 rounds
    python benchmarks/genai_vs_runner.py --workdir /tmp/genai-bench   # reuse the exports next time
    python benchmarks/genai_vs_runner.py --no-int4               # the four fp32 engines only
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import surgery  # noqa: E402
from exporters.onnx import export_onnx  # noqa: E402
from exporters.onnx_genai import genai_problem  # noqa: E402
from exporters.onnx_runtime import OnnxCausalLM  # noqa: E402
from surgery.source import open_source  # noqa: E402


def export(source: Path, workdir: Path, name: str, drop: str | None, share_buffer: bool, int4: bool = False) -> Path:
    """The ONNX directory of the model (pruned first with ``drop``), written once into the work directory."""
    checkpoint = source if drop is None else workdir / name
    onnx_dir = workdir / f"{name}-onnx{'-share' if share_buffer else ''}{'-int4' if int4 else ''}"
    if drop is not None and not (checkpoint / "config.json").exists():
        surgery.prune(source, checkpoint, drop=drop, quiet=True)
    if not (onnx_dir / "genai_config.json").exists():
        flags = (" --share-buffer" if share_buffer else "") + (" --quantize int4" if int4 else "")
        sys.stderr.write(f"exporting {name} to ONNX{flags} (validated)...\n")
        export_onnx(checkpoint, onnx_dir, quiet=True, force=True, share_buffer=share_buffer,
                    quantize="int4" if int4 else None)
    return onnx_dir


class Genai:
    """onnxruntime-genai on an export directory, with ``threads`` intra-op threads."""

    def __init__(self, directory: Path, threads: int, share_buffer: bool) -> None:
        import json

        import onnxruntime_genai as og

        self.og = og
        config = og.Config(str(directory))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}},
                                   "search": {"past_present_share_buffer": share_buffer}}))
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads for both engines (default 1)")
    parser.add_argument("--repeat", type=int, default=5, help="rounds (default 5)")
    parser.add_argument("--prompt", type=int, default=16, help="prompt tokens (default 16)")
    parser.add_argument("--decode", type=int, default=128, help="decode steps per round (default 128)")
    parser.add_argument("--workdir", type=Path, help="where the exports go (default: a temporary directory)")
    parser.add_argument("--no-int4", action="store_true", help="leave out the --quantize int4 export")
    args = parser.parse_args()
    if (problem := genai_problem()) is not None:
        sys.exit(problem)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="genai-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import onnxruntime_genai as og

    source = open_source(None, quiet=True).path
    print(f"machine: {platform.machine()} {os.cpu_count()} logical CPUs, onnxruntime-genai {og.__version__}, "
          f"threads {args.threads}, prompt {args.prompt} tokens, {args.decode} decode steps, best of {args.repeat}; "
          f"load average {os.getloadavg()[0]:.1f}")
    rows = []
    for name, drop in (("SmolLM2-135M", None), ("SmolLM2-135M --drop 10-20", "10-20")):
        short = name.split()[0] + ("-drop" if drop else "")
        plain, shared = (export(source, workdir, short, drop, share) for share in (False, True))
        runners = {"runner": OnnxCausalLM.load(plain, threads=args.threads),
                   "runner, share graph": OnnxCausalLM.load(shared, threads=args.threads)}
        genai = {"genai": Genai(plain, args.threads, False), "genai share": Genai(shared, args.threads, True)}
        if not args.no_int4:
            int4 = export(source, workdir, short, drop, False, int4=True)
            runners["runner, int4"] = OnnxCausalLM.load(int4, threads=args.threads)
            genai["genai int4"] = Genai(int4, args.threads, False)
        ids = np.random.default_rng(0).integers(100, 40_000, (1, args.prompt)).astype(np.int64)
        for runner in runners.values():  # warm-up all four
            runner.greedy(ids, max_new_tokens=4)
        for engine in genai.values():
            engine.greedy(ids[0].tolist(), 4)
        speeds: dict[str, list[float]] = {engine: [] for engine in (*runners, *genai)}
        same = True
        agreement: dict[str, list[float]] = {}
        order = list(speeds)
        for round_ in range(args.repeat):
            tokens: dict[str, list[int]] = {}
            turn = round_ % len(order)
            for engine in order[turn:] + order[:turn]:  # each engine first in turn
                if engine in runners:
                    result = runners[engine].greedy(ids, max_new_tokens=args.decode + 1)
                    speed, tokens[engine] = result.decode_tokens_per_second, result.tokens[0].tolist()
                else:
                    speed, tokens[engine] = genai[engine].greedy(ids[0].tolist(), args.decode)
                speeds[engine].append(speed)
                sys.stderr.write(f"  {name} round {round_ + 1} {engine}: decode {speed:.1f} tok/s\n")
            same = same and all(t == tokens["runner"] for engine, t in tokens.items() if "int4" not in engine)
            for engine in (e for e in tokens if "int4" in e):  # int4: the share of the fp32 runner's tokens
                pairs = list(zip(tokens[engine], tokens["runner"], strict=False))
                agreement.setdefault(engine, []).append(sum(a == b for a, b in pairs) / max(1, len(pairs)))
        rows.append((name, runners["runner"].num_layers, speeds, same, agreement))
        del runners, genai

    print()
    print("| model | layers | engine | graph | decode (tok/s) | median | vs runner, plain graph | same tokens |")
    print("|---|---|---|---|---|---|---|---|")
    labels = {"runner": ("surgery's runner", "plain"), "runner, share graph": ("surgery's runner", "--share-buffer"),
              "genai": ("onnxruntime-genai, dynamic cache", "plain"),
              "genai share": ("onnxruntime-genai, share buffer", "--share-buffer"),
              "runner, int4": ("surgery's runner", "--quantize int4"),
              "genai int4": ("onnxruntime-genai, dynamic cache", "--quantize int4")}
    for name, layers, speeds, same, agreement in rows:
        base = max(speeds["runner"])
        for engine, values in speeds.items():
            label, graph = labels[engine]
            equal = (f"{min(agreement[engine]):.0%} of fp32's" if engine in agreement else ("yes" if same else "NO"))
            print(f"| {name} | {layers} | {label} | {graph} | {max(values):.1f} | {statistics.median(values):.1f} | "
                  f"{max(values) / base:.2f}x | {equal} |")
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
