"""Benchmark: ``surgery prune`` against ``cp`` of the same output bytes.

What it measures
    For each checkpoint size (``--sizes``, in GB = 10**9 bytes) the script generates a synthetic
    Llama checkpoint (random bf16 weights, LlamaForCausalLM config, several safetensors shards
    plus ``model.safetensors.index.json``), then, side by side in the same run:

    * ``prune + sync``: wall time of ``surgery prune SRC OUT --drop A-B -q`` as a subprocess,
      dropping a contiguous block of about a third of the layers from the middle of the stack,
      followed by ``os.sync()`` inside the timing (the whole command, start-up included, with its
      bytes flushed to disk);
    * ``cp -r + sync``: wall time of ``cp -r OUTPUT COPY`` of the directory that prune produced
      (the same bytes) followed by ``os.sync()`` inside the timing, like ``cp -r ... && sync``:
      the floor for writing that many bytes on this machine. Both sides flush, so neither is
      credited for leaving dirty pages behind;
    * ``cp -r``: the same cp run's time until cp exited (before the sync);
    * ``startup``: wall time of the same prune command with ``--dry-run`` (interpreter start,
      config load, header parsing, layer detection: everything but the writing): the CLI's fixed
      cost, reported separately;
    * ``prune excl. startup``: a complete second prune timed inside one Python process whose
      imports a dry run has already paid for (measured directly: subtracting two noisy
      multi-second timings would drown the copy time); not flushed, compared with ``cp -r``
      until it exited (not flushed either);
    * the peak RSS of the prune subprocess, read per child from ``os.wait4`` (not from
      ``getrusage(RUSAGE_CHILDREN)``, which is a maximum over every child so far).

    Unless ``--no-default-model``, the same run also measures the embedded default model
    (SmolLM2-135M; its GGUF conversion is cached under ``~/.cache/layer-surgery``, which one
    untimed warm-up prune fills if needed):

    * ``surgery --help``: wall time and peak RSS (per child, ``os.wait4``);
    * ``surgery prune OUT --drop 10-20 --dry-run`` (no model argument: the default model);
    * ``surgery prune OUT --drop 10-20 -q`` + ``os.sync()`` (the whole command, flushed) against
      ``cp -r OUTPUT COPY`` + ``os.sync()`` of the same output.

    The packages' bytecode is compiled first (:func:`compile_bytecode`), as ``pip install`` does: an
    editable install under ``PYTHONDONTWRITEBYTECODE`` would otherwise compile every module from
    source on every start (~70 ms here), a cost no installed user pays.

    The page cache cannot be dropped without root, so every measurement runs warm: one warm-up
    of each command (the warm-up prune's output is also what ``cp -r`` copies), then ``--repeat``
    rounds of every command, in alternating order, each after ``os.sync()`` so no run pays for
    the previous one's write-back, and each write right after removing its own previous output
    (:func:`fresh`: on a disk mounted with ``discard`` the state of the freed blocks changes the
    write speed 3-4x). Times are medians over the rounds; the ratios are medians of
    the per-round ratios (paired, so machine noise that hits a whole round cancels). Note that
    ``os.sync()`` flushes every dirty page on the machine, so another job writing to disk during
    the run slows both sides of a ratio. Per-round figures go to stderr.

    When ``mergekit`` is importable, its passthrough merge of the same layers
    (``mergekit-yaml``) is timed too (not flushed); otherwise the script says
    "mergekit: not installed".

Targets (printed as PASS/MISS; the script exits 0 either way: it is a benchmark, not a test)
    Synthetic checkpoints (issue 13: a 2.3 GB checkpoint):
    * the whole command (start-up included, flushed) within 1.2x of ``cp -r`` + ``sync``;
    * the write alone (prune excl. startup) within 1.1x of ``cp -r``;
    * peak RSS under 400 MB on the largest checkpoint, and within 100 MB of the smallest one's
      (memory must not grow with model size).
    Default model (SmolLM2-135M):
    * ``surgery --help`` under 0.3 s and 60 MB (medians over the rounds);
    * ``surgery prune OUT --drop 10-20 --dry-run`` under 0.3 s and 60 MB (medians);
    * ``surgery prune OUT --drop 10-20 -q`` + ``sync`` within 2x of ``cp -r`` + ``sync``.

How to run
    python benchmarks/prune_vs_copy.py                    # 0.5 GB and 2.3 GB + default model, 3 rounds
    python benchmarks/prune_vs_copy.py --sizes 0.5 --repeat 5 --no-default-model
    python benchmarks/prune_vs_copy.py --workdir /data/bench --keep   # keep and reuse checkpoints

    The 2.3 GB case needs about 3x its size in free disk space under ``--workdir``
    (default: a fresh temporary directory, deleted at the end unless ``--keep``).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

GB = 10**9
MB = 10**6
RATIO_TARGET = 1.1  # the write alone (prune excl. startup) against cp -r
WHOLE_TARGET = 1.2  # the whole command + sync against cp -r + sync (issue 13)
RSS_CAP = 400 * MB
RSS_GROWTH = 100 * MB
STARTUP_SECONDS = 0.3  # surgery --help and a default-model dry run
STARTUP_RSS = 60 * MB
DEFAULT_TARGET = 2.0  # default-model prune + sync against cp -r + sync
DEFAULT_DROP = "10-20"
DEFAULT_LAYERS = 19  # SmolLM2-135M's 30 layers less 10-20
VOCAB = 32000
INDEX = "model.safetensors.index.json"
SPEC_FILE = "bench-spec.json"  # written last: a checkpoint with it is complete and can be reused


# --------------------------------------------------------------------------------------------
# Synthetic checkpoints
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LlamaShape:
    """The dimensions of one synthetic Llama model."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    layers: int
    vocab: int = VOCAB

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def layer_tensors(self, i: int) -> list[tuple[str, tuple[int, ...]]]:
        h, kv = self.hidden, self.kv_heads * self.head_dim
        p = f"model.layers.{i}"
        return [
            (f"{p}.input_layernorm.weight", (h,)),
            (f"{p}.self_attn.q_proj.weight", (h, h)),
            (f"{p}.self_attn.k_proj.weight", (kv, h)),
            (f"{p}.self_attn.v_proj.weight", (kv, h)),
            (f"{p}.self_attn.o_proj.weight", (h, h)),
            (f"{p}.post_attention_layernorm.weight", (h,)),
            (f"{p}.mlp.gate_proj.weight", (self.intermediate, h)),
            (f"{p}.mlp.up_proj.weight", (self.intermediate, h)),
            (f"{p}.mlp.down_proj.weight", (h, self.intermediate)),
        ]

    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor, in the order transformers writes a Llama checkpoint."""
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, self.hidden))]
        for i in range(self.layers):
            out.extend(self.layer_tensors(i))
        out += [("model.norm.weight", (self.hidden,)), ("lm_head.weight", (self.vocab, self.hidden))]
        return out

    def config(self) -> dict[str, object]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "num_hidden_layers": self.layers,
            "vocab_size": self.vocab,
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "torch_dtype": "bfloat16",
        }


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# (hidden, intermediate, heads, kv_heads): Llama-style widths, smallest first.
_FAMILIES = [(1024, 2816, 16, 4), (2048, 5632, 32, 4), (4096, 11008, 32, 8), (8192, 28672, 64, 8)]


def shape_for(size_bytes: float, bytes_per_param: int = 2) -> LlamaShape:
    """The widest Llama family that still has at least 12 layers at this size."""
    chosen = None
    for hidden, inter, heads, kv in _FAMILIES:
        probe = LlamaShape(hidden, inter, heads, kv, layers=1)
        per_layer = sum(_numel(s) for _, s in probe.layer_tensors(0)) * bytes_per_param
        fixed = (2 * VOCAB * hidden + hidden) * bytes_per_param
        layers = round((size_bytes - fixed) / per_layer)
        if chosen is None or layers >= 12:
            chosen = LlamaShape(hidden, inter, heads, kv, layers=max(layers, 6))
    assert chosen is not None
    return chosen


def _spec(shape: LlamaShape, shard_bytes: int, seed: int) -> dict[str, object]:
    return {"shape": vars(shape), "shard_bytes": shard_bytes, "seed": seed}


def is_complete(directory: Path, shape: LlamaShape, shard_bytes: int, seed: int = 0) -> bool:
    """True when ``directory`` holds this exact checkpoint from an earlier run (``--keep``)."""
    marker = directory / SPEC_FILE
    return marker.exists() and json.loads(marker.read_text()) == _spec(shape, shard_bytes, seed)


def make_checkpoint(directory: Path, shape: LlamaShape, shard_bytes: int, seed: int = 0) -> None:
    """Write a random bf16 checkpoint, one shard at a time (memory: about one shard)."""
    import torch
    from safetensors.torch import save_file

    spec = _spec(shape, shard_bytes, seed)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    groups: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, tensor_shape in shape.tensors():
        nbytes = _numel(tensor_shape) * 2
        if groups[-1] and size + nbytes > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append((name, tensor_shape))
        size += nbytes
    generator = torch.Generator().manual_seed(seed)
    weight_map: dict[str, str] = {}
    total = 0
    for i, group in enumerate(groups, start=1):
        filename = f"model-{i:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, tensor_shape in group:
            if name.endswith("norm.weight"):
                tensors[name] = torch.ones(tensor_shape, dtype=torch.bfloat16)
            else:
                tensors[name] = torch.empty(tensor_shape, dtype=torch.bfloat16).normal_(0, 0.02, generator=generator)
            weight_map[name] = filename
            total += tensors[name].nbytes
        save_file(tensors, str(directory / filename), metadata={"format": "pt"})
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    (directory / "config.json").write_text(json.dumps(shape.config(), indent=2) + "\n")
    (directory / SPEC_FILE).write_text(json.dumps(spec))


# --------------------------------------------------------------------------------------------
# Measuring subprocesses
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One subprocess: wall seconds until it exited, its own peak resident set size in bytes,
    its stdout, and (``measure(..., flush=True)``) wall seconds until ``os.sync()`` after it returned."""

    seconds: float
    peak_rss: int
    stdout: str = ""
    flushed: float | None = None


def measure(cmd: Sequence[str | os.PathLike[str]], *, sync: bool = True, flush: bool = False) -> Run:
    """Run ``cmd``; return its wall time and peak RSS (from ``os.wait4``: this child only).

    With ``flush``, ``os.sync()`` runs right after the command exits, inside the timing
    (``Run.flushed``), like ``cmd && sync``: the time until its bytes are on disk.

    Python starts children with vfork, and the kernel folds the parent's peak RSS into the
    child's ``ru_maxrss`` at exec; this process stays near 20 MB (see :func:`main`), far below
    anything measured, so the figure is the child's own.

    Raises:
        RuntimeError: the command failed (its stderr is included).
    """
    if sync:
        os.sync()  # earlier runs' dirty pages are written back before the clock starts
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        start = time.perf_counter()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=out, stderr=err)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.perf_counter() - start
        flushed = None
        if flush:
            os.sync()
            flushed = time.perf_counter() - start
        proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        if proc.returncode != 0:
            err.seek(0)
            raise RuntimeError(
                f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{err.read().decode(errors='replace')}"
            )
        out.seek(0)
        stdout = out.read().decode(errors="replace")
    return Run(seconds, usage.ru_maxrss * 1024, stdout, flushed)  # Linux reports ru_maxrss in KiB


# Prune without start-up, timed inside one process: a dry run first pays for the imports
# (transformers, torch), the config and the layer detection; the clock then covers a complete
# second prune (headers, plan, config read-back, writing), exactly what the CLI does after start-up.
_WARM_PRUNE = """
import json, sys, time
import surgery
source, out, drop = sys.argv[1:4]
surgery.prune(source, None, drop=drop, dry_run=True, quiet=True)
start = time.perf_counter()
surgery.prune(source, out, drop=drop, quiet=True)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def _remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


def fresh(out: Path) -> Path:
    """``out``, with the previous round's output there removed just before a timed write into it.

    Each writer removes its own last output right before it is timed (``measure`` syncs first), so
    every timed write starts from the same disk state. It matters on a disk mounted with
    ``discard`` (as this machine's root is): blocks freed and synced a few seconds earlier are
    trimmed, and writing onto them was measured 3-4x slower (``cp -r`` of 1.6 GB + sync: 0.85-1.0 s
    right after the removal, 3.4-3.7 s three seconds later); removing an output in one step and
    writing in another would hand that cost to whichever step came next.
    """
    _remove(out)
    return out


def alternating_rounds(repeat: int, steps: dict[str, Callable[[], object]], say: Callable[[str], None],
                       summary: Callable[[], str]) -> None:
    """Run every step once per round, for ``repeat`` rounds, in the given order on even rounds and
    reversed on odd ones (so drift during a round does not favour one side); ``say`` the round's
    ``summary`` after each."""
    for round_ in range(repeat):
        say(f"round {round_ + 1}/{repeat}")
        for name in list(steps)[:: -1 if round_ % 2 else 1]:
            steps[name]()
        say(summary())


def output_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file())


def _flushed(run: Run) -> float:
    assert run.flushed is not None, "measured without flush=True"
    return run.flushed


# --------------------------------------------------------------------------------------------
# One checkpoint size
# --------------------------------------------------------------------------------------------


@dataclass
class SizeResult:
    label: str
    source_bytes: int
    shards: int
    layers: int
    drop: str
    output_bytes: int
    startup: list[float]
    prune: list[float]  # until the CLI exited
    prune_flushed: list[float]  # until os.sync() after it returned
    warm: list[float]
    cp: list[float]  # until cp -r exited
    cp_flushed: list[float]  # until os.sync() after it returned
    prune_rss: list[int]
    startup_rss: list[int]
    mergekit: list[Run] | None

    @property
    def ratio(self) -> float:
        """The whole command against cp -r, both flushed: median of the per-round ratios."""
        return statistics.median(p / c for p, c in zip(self.prune_flushed, self.cp_flushed, strict=True))

    @property
    def ratio_without_startup(self) -> float:
        return statistics.median(w / c for w, c in zip(self.warm, self.cp, strict=True))

    @property
    def peak_rss(self) -> int:
        return max(self.prune_rss)


def drop_range(layers: int) -> tuple[int, int]:
    """About a third of the layers, centred in the stack: (first, last), inclusive."""
    count = max(1, round(layers / 3))
    first = (layers - count) // 2
    return first, first + count - 1


def mergekit_command() -> list[str] | None:
    if find_spec("mergekit") is None:
        return None
    exe = Path(sys.executable).with_name("mergekit-yaml")
    found = str(exe) if exe.exists() else shutil.which("mergekit-yaml")
    return [found] if found else None


def write_mergekit_config(path: Path, source: Path, layers: int, first: int, last: int) -> None:
    """A passthrough merge keeping [0, first) and (last, layers): the same layers prune keeps."""
    slices = [(0, first), (last + 1, layers)]
    lines = ["merge_method: passthrough", "dtype: bfloat16", "slices:"]
    for begin, end in slices:
        if end > begin:
            lines += [
                "  - sources:",
                f"      - model: {json.dumps(str(source))}",
                f"        layer_range: [{begin}, {end}]",
            ]
    path.write_text("\n".join(lines) + "\n")


def bench_size(gb: float, work: Path, surgery: str, repeat: int, shard_bytes: int, log: bool) -> SizeResult:
    label = f"{gb:g} GB"
    shape = shape_for(gb * GB)
    source = work / f"llama-{gb:g}GB"

    def say(message: str) -> None:
        if log:
            print(f"[{label}] {message}", file=sys.stderr, flush=True)

    if is_complete(source, shape, shard_bytes):
        say(f"reusing {source}")
    else:
        say(f"generating {shape.layers} layers x hidden {shape.hidden} in {source}")
        # In a fresh interpreter: this process must stay small (it never imports torch), because a
        # child started with vfork inherits the parent's peak RSS in its own ru_maxrss.
        generator = multiprocessing.get_context("spawn").Process(
            target=make_checkpoint, args=(source, shape, shard_bytes)
        )
        generator.start()
        generator.join()
        if generator.exitcode != 0:
            raise RuntimeError(f"generating {source} failed (exit {generator.exitcode})")
    source_bytes = sum(p.stat().st_size for p in source.glob("*.safetensors"))
    shards = len(list(source.glob("*.safetensors")))
    first, last = drop_range(shape.layers)
    drop = f"{first}-{last}"

    reference = work / f"ref-{gb:g}GB"  # the warm-up prune's output: what cp copies
    prune_out = work / f"prune-{gb:g}GB"
    warm_out = work / f"warm-{gb:g}GB"
    cp_out = work / f"cp-{gb:g}GB"
    for d in (reference, prune_out, warm_out, cp_out):
        _remove(d)

    def prune_cmd(out: Path) -> list[str | os.PathLike[str]]:
        return [surgery, "prune", source, out, "--drop", drop, "-q"]

    def prune(out: Path) -> Run:
        return measure(prune_cmd(out), flush=True)

    def startup() -> Run:
        return measure([*prune_cmd(prune_out), "--dry-run"])

    def warm() -> float:
        run = measure([sys.executable, "-c", _WARM_PRUNE, source, fresh(warm_out), drop])
        return float(json.loads(run.stdout.strip().splitlines()[-1])["seconds"])

    def cp() -> Run:
        return measure(["cp", "-r", reference, fresh(cp_out)], flush=True)  # cp_out absent: a copy of the directory

    say("warm-up")
    startup()
    prune(reference)
    cp()
    written = json.loads((reference / "config.json").read_text())["num_hidden_layers"]
    expected = shape.layers - (last - first + 1)
    if written != expected:
        raise RuntimeError(f"prune wrote {written} layers, expected {expected}")
    output_bytes = sum(p.stat().st_size for p in output_files(reference))

    mk_cmd = mergekit_command()
    mk_runs: list[Run] | None = [] if mk_cmd else None
    mk_config = work / f"mergekit-{gb:g}GB.yml"
    mk_out = work / f"mergekit-{gb:g}GB"
    if mk_cmd:
        write_mergekit_config(mk_config, source, shape.layers, first, last)

    starts: list[Run] = []
    prunes: list[Run] = []
    warms: list[float] = []
    cps: list[Run] = []

    def run_mergekit() -> None:
        nonlocal mk_cmd
        if mk_cmd is None or mk_runs is None:
            return
        try:
            mk_runs.append(measure([*mk_cmd, mk_config, mk_out, "--no-copy-tokenizer", "--lazy-unpickle"]))
        except RuntimeError as exc:
            say(f"mergekit failed: {str(exc).splitlines()[0]}")
            mk_cmd = None
        _remove(mk_out)

    alternating_rounds(
        repeat,
        {
            "startup": lambda: starts.append(startup()),
            "prune": lambda: prunes.append(prune(fresh(prune_out))),
            "warm": lambda: warms.append(warm()),
            "cp": lambda: cps.append(cp()),
            "mergekit": run_mergekit,
        },
        say,
        lambda: (
            f"  startup {starts[-1].seconds:.2f} s, prune {prunes[-1].seconds:.2f} s "
            f"(+ sync {_flushed(prunes[-1]):.2f} s, {prunes[-1].peak_rss / MB:.0f} MB), in-process {warms[-1]:.2f} s, "
            f"cp -r {cps[-1].seconds:.2f} s (+ sync {_flushed(cps[-1]):.2f} s)"
        ),
    )
    for d in (prune_out, warm_out, cp_out):
        _remove(d)
    return SizeResult(
        label=label,
        source_bytes=source_bytes,
        shards=shards,
        layers=shape.layers,
        drop=drop,
        output_bytes=output_bytes,
        startup=[r.seconds for r in starts],
        prune=[r.seconds for r in prunes],
        prune_flushed=[_flushed(r) for r in prunes],
        warm=warms,
        cp=[r.seconds for r in cps],
        cp_flushed=[_flushed(r) for r in cps],
        prune_rss=[r.peak_rss for r in prunes],
        startup_rss=[r.peak_rss for r in starts],
        mergekit=mk_runs if mk_runs else None,
    )


# --------------------------------------------------------------------------------------------
# The embedded default model (SmolLM2-135M)
# --------------------------------------------------------------------------------------------


@dataclass
class DefaultResult:
    output_bytes: int
    help: list[Run]
    dry_run: list[Run]
    prune: list[Run]  # measured with flush=True
    cp: list[Run]  # measured with flush=True

    @property
    def ratio(self) -> float:
        """prune + sync against cp -r + sync: median of the per-round ratios."""
        return statistics.median(_flushed(p) / _flushed(c) for p, c in zip(self.prune, self.cp, strict=True))


def bench_default_model(work: Path, surgery: str, repeat: int, log: bool) -> DefaultResult:
    """``surgery --help``, a dry run and a flushed prune of the default model, against ``cp -r`` + sync."""

    def say(message: str) -> None:
        if log:
            print(f"[default model] {message}", file=sys.stderr, flush=True)

    reference = work / "default-ref"  # the warm-up prune's output: what cp -r copies
    prune_out = work / "default-prune"
    cp_out = work / "default-cp"
    for d in (reference, prune_out, cp_out):
        _remove(d)

    def help_() -> Run:
        return measure([surgery, "--help"])

    def dry_run() -> Run:
        return measure([surgery, "prune", prune_out, "--drop", DEFAULT_DROP, "--dry-run"])

    def prune(out: Path) -> Run:
        return measure([surgery, "prune", out, "--drop", DEFAULT_DROP, "-q"], flush=True)

    def cp() -> Run:
        return measure(["cp", "-r", reference, fresh(cp_out)], flush=True)

    say("warm-up (converts the default model once if ~/.cache/layer-surgery does not hold it yet)")
    try:
        prune(reference)
    except RuntimeError as exc:
        raise RuntimeError(f"{exc}\n(the default model is not usable here: pass --no-default-model)") from exc
    written = json.loads((reference / "config.json").read_text())["num_hidden_layers"]
    if written != DEFAULT_LAYERS:
        raise RuntimeError(f"default-model prune wrote {written} layers, expected {DEFAULT_LAYERS}")
    help_()
    dry_run()
    cp()
    output_bytes = sum(p.stat().st_size for p in output_files(reference))

    helps: list[Run] = []
    dries: list[Run] = []
    prunes: list[Run] = []
    cps: list[Run] = []
    alternating_rounds(
        repeat,
        {
            "help": lambda: helps.append(help_()),
            "dry-run": lambda: dries.append(dry_run()),
            "prune": lambda: prunes.append(prune(fresh(prune_out))),
            "cp": lambda: cps.append(cp()),
        },
        say,
        lambda: (
            f"  --help {helps[-1].seconds:.3f} s ({helps[-1].peak_rss / MB:.0f} MB), "
            f"dry run {dries[-1].seconds:.3f} s ({dries[-1].peak_rss / MB:.0f} MB), "
            f"prune + sync {_flushed(prunes[-1]):.2f} s ({prunes[-1].peak_rss / MB:.0f} MB), "
            f"cp -r + sync {_flushed(cps[-1]):.2f} s"
        ),
    )
    for d in (prune_out, cp_out):
        _remove(d)
    return DefaultResult(output_bytes=output_bytes, help=helps, dry_run=dries, prune=prunes, cp=cps)


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def machine_facts(work: Path) -> str:
    """One line: cores, memory, the workdir's filesystem (``df -T``), kernel, Python, cp."""
    cores = os.cpu_count() or 0
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else cores
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
    df = subprocess.run(["df", "-T", str(work)], capture_output=True, text=True).stdout.splitlines()
    fields = df[-1].split() if len(df) > 1 else ["?", "?"]
    cp_version = subprocess.run(["cp", "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"machine: {cores} cores ({usable} usable), {mem:.0f} GB RAM, load average {load}; "
        f"workdir {work} on {fields[1]} ({fields[0]}); Linux {platform.release()}; "
        f"Python {platform.python_version()}; {cp_version}"
    )


def compile_bytecode() -> list[Path]:
    """Compile the ``surgery`` and ``exporters`` packages' bytecode, as ``pip install`` does for a wheel.

    An editable install has no compiled bytecode until an interpreter writes it, and with
    ``PYTHONDONTWRITEBYTECODE`` set (this machine sets it) none ever is: every start then compiles
    the ~60 modules from source, ~70 ms that an installed wheel never pays. Returns the package dirs.
    """
    import compileall
    import importlib.util

    dirs = []
    for name in ("surgery", "exporters"):
        spec = importlib.util.find_spec(name)
        if spec and spec.submodule_search_locations:
            directory = Path(next(iter(spec.submodule_search_locations)))
            compileall.compile_dir(directory, quiet=1)
            dirs.append(directory)
    return dirs


def bytecode_note() -> str:
    """Compile the bytecode (:func:`compile_bytecode`) and say so, naming PYTHONDONTWRITEBYTECODE when set."""
    dirs = compile_bytecode()
    flag = " (PYTHONDONTWRITEBYTECODE is set here: without this step each start compiles from source)" \
        if os.environ.get("PYTHONDONTWRITEBYTECODE") else ""
    return f"bytecode: compiled {', '.join(str(d) for d in dirs)} first, as pip install does{flag}"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def report(results: list[SizeResult], repeat: int) -> str:
    med = statistics.median
    small, large = results[0], results[-1]
    head = (
        f"| checkpoint | layers (drop) | output | startup | prune + sync | cp -r + sync "
        f"| whole command / cp -r, both + sync (target ≤{WHOLE_TARGET}x) | prune excl. startup | cp -r "
        f"| excl. startup / cp -r (target ≤{RATIO_TARGET}x) "
        f"| prune peak RSS (target <{RSS_CAP / MB:.0f} MB, ≤ smallest +{RSS_GROWTH / MB:.0f} MB) |"
    )
    lines = [head, "|" + "---|" * 11]
    for r in results:
        rss = r.peak_rss
        checks = [f"<{RSS_CAP / MB:.0f} {_verdict(rss < RSS_CAP)}"] if r is large or len(results) == 1 else []
        if r is not small:
            delta = rss - small.peak_rss
            checks.append(f"{delta / MB:+.0f} MB vs {small.label} {_verdict(delta <= RSS_GROWTH)}")
        elif len(results) > 1:
            checks.append("(reference)")
        lines.append(
            f"| {r.label} ({r.source_bytes / GB:.2f} GB, {r.shards} shards) | {r.layers} ({r.drop}) "
            f"| {r.output_bytes / GB:.2f} GB | {med(r.startup):.2f} s | {med(r.prune_flushed):.2f} s "
            f"| {med(r.cp_flushed):.2f} s | {r.ratio:.2f}x {_verdict(r.ratio <= WHOLE_TARGET)} "
            f"| {med(r.warm):.2f} s | {med(r.cp):.2f} s "
            f"| {r.ratio_without_startup:.2f}x {_verdict(r.ratio_without_startup <= RATIO_TARGET)} "
            f"| {rss / MB:.0f} MB {'; '.join(checks)} |"
        )
    lines.append(
        f"medians of {repeat} rounds after a warm-up (warm page cache); ratios are medians of per-round ratios; "
        "+ sync = os.sync() after the command, inside the timing (cp -r OUTPUT COPY && sync); "
        f"startup = the same CLI prune with --dry-run (peak RSS {med(small.startup_rss) / MB:.0f} MB); "
        "excl. startup = a second prune timed inside one Python process, after a dry run paid for the imports, "
        "not flushed, against cp -r until it exited (not flushed either)"
    )
    if all(r.mergekit is None for r in results):
        lines.append("mergekit: not installed" if find_spec("mergekit") is None else "mergekit: failed (see stderr)")
    for r in results:
        if r.mergekit:
            secs = med(x.seconds for x in r.mergekit)
            rss_mk = max(x.peak_rss for x in r.mergekit)
            lines.append(
                f"mergekit passthrough ({r.label}, not flushed): {secs:.2f} s = {secs / med(r.cp):.2f}x cp -r, "
                f"{secs / med(r.prune):.2f}x prune (not flushed); peak RSS {rss_mk / MB:.0f} MB"
            )
    return "\n".join(lines)


def report_default(result: DefaultResult, repeat: int) -> str:
    med = statistics.median

    def fixed_cost(runs: list[Run]) -> tuple[str, str, str]:
        secs, rss = med(r.seconds for r in runs), med(r.peak_rss for r in runs)
        verdict = (
            f"<{STARTUP_SECONDS} s {_verdict(secs < STARTUP_SECONDS)}, "
            f"<{STARTUP_RSS / MB:.0f} MB {_verdict(rss < STARTUP_RSS)}"
        )
        return f"{secs:.3f} s", f"{rss / MB:.0f} MB", verdict

    prune_rss = max(r.peak_rss for r in result.prune)
    rows = [
        ("`surgery --help`", *fixed_cost(result.help)),
        (f"`surgery prune OUT --drop {DEFAULT_DROP} --dry-run`", *fixed_cost(result.dry_run)),
        (
            f"`surgery prune OUT --drop {DEFAULT_DROP} -q` + sync",
            f"{med(_flushed(r) for r in result.prune):.2f} s",
            f"{prune_rss / MB:.0f} MB (max)",
            f"{result.ratio:.2f}x cp -r + sync (target ≤{DEFAULT_TARGET:g}x) {_verdict(result.ratio <= DEFAULT_TARGET)}",
        ),
        (
            f"`cp -r OUTPUT COPY` + sync ({result.output_bytes / GB:.2f} GB)",
            f"{med(_flushed(r) for r in result.cp):.2f} s",
            "",
            "(reference)",
        ),
    ]
    lines = ["| default model (SmolLM2-135M, cached conversion) | wall | peak RSS | target |", "|---|---|---|---|"]
    lines += [f"| {' | '.join(row)} |" for row in rows]
    lines.append(
        f"medians of {repeat} rounds after a warm-up of each command (warm page cache); peak RSS per child "
        "(os.wait4), median over the rounds for --help and the dry run; the ratio is the median of per-round ratios; "
        "+ sync = os.sync() after the command, inside the timing"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--sizes", default="0.5,2.3", help="checkpoint sizes in GB, comma-separated (default 0.5,2.3)")
    parser.add_argument("--repeat", type=int, default=3, help="timed rounds per size, after one warm-up (default 3)")
    parser.add_argument("--workdir", type=Path, help="where checkpoints and outputs go (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir (checkpoints are reused next time)")
    parser.add_argument("--shard-size", type=float, default=0.25, help="source shard size in GB (default 0.25)")
    parser.add_argument("--surgery", default=None, help="the surgery executable (default: next to this Python)")
    parser.add_argument(
        "--no-default-model",
        action="store_true",
        help="skip the default-model rows (surgery --help, dry run and prune of SmolLM2 against cp -r)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)

    sizes = sorted(float(s) for s in args.sizes.split(",") if s.strip())
    beside = Path(sys.executable).with_name("surgery")
    surgery = args.surgery or (str(beside) if beside.exists() else shutil.which("surgery"))
    if not surgery:
        parser.error("no 'surgery' executable found; install the project (pip install -e .) or pass --surgery")
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        work = args.workdir.resolve()
    else:
        work = Path(tempfile.mkdtemp(prefix="prune-bench-"))
    print(machine_facts(work), flush=True)
    print(bytecode_note(), flush=True)
    try:
        default = None
        if not args.no_default_model:
            default = bench_default_model(work, surgery, args.repeat, log=not args.quiet)
        results = [
            bench_size(gb, work, surgery, args.repeat, int(args.shard_size * GB), log=not args.quiet) for gb in sizes
        ]
        print(report(results, args.repeat), flush=True)
        if default is not None:
            print(report_default(default, args.repeat), flush=True)
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        if own > 50 * MB:
            print(f"warning: this process peaked at {own / MB:.0f} MB; child RSS figures below that are not exact")
    finally:
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            for gb in sizes:
                for prefix in ("llama-", "ref-", "prune-", "cp-", "mergekit-"):
                    _remove(work / f"{prefix}{gb:g}GB")
                (work / f"mergekit-{gb:g}GB.yml").unlink(missing_ok=True)
            for name in ("default-ref", "default-prune", "default-cp"):
                _remove(work / name)
            if not args.workdir:
                _remove(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
