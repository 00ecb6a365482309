"""The second graph of ``surgery export-onnx``: onnxruntime-genai's model builder, called as a library.

``--graph`` chooses which graph a decoder export gets:

* ``surgery`` (the default): surgery's own graph (:mod:`exporters.onnx_graph`), traced from ``transformers``;
  every output of this tool, wide blocks included, validated against PyTorch on single sequences and on a
  left-padded batch.
* ``builder``: the reference builder (``onnxruntime_genai.models.builder.create_model``, from the installed
  package) run on the checkpoint directory (pruned, repeated or reordered: a standard ``transformers``
  checkpoint), fp32, into the export's staging directory. Its graph is fused (``GroupQueryAttention`` with
  rotary inside, ``SkipSimplifiedLayerNormalization``, one packed QKV MatMul per layer). Surgery adds what
  only it knows: ``config.json``, ``generation_config.json``, the recipe and the card copied beside the graph,
  the validation against PyTorch and ``onnx-export.json`` naming the graph taken, its node count and op types.
  The builder's ``GroupQueryAttention`` takes positions from the attention mask's lengths, so the graph
  serves one sequence (or right-aligned batches) but not a left-padded batch: validation checks each
  prompt alone, and the runner refuses a left-padded batch on such a graph.
* ``auto``: the builder when it can take the model (:func:`builder_problem` says why not: an architecture the
  builder does not list, a wide block of a family other than Llama, Mistral and Qwen 2 or without
  ``--trust-remote-code``, a head size that is not a multiple of 16, no tokenizer, fp16, ``--share-buffer`` or
  ``--quantize``, onnxruntime-genai missing) and its graph passes validation; else surgery's graph, and the report
  says why.

Wide-block checkpoints (``surgery parallel``) of Llama, Mistral and Qwen 2 models go through the builder's class
for their base architecture (``LlamaModel``, ``MistralModel``, ``QwenModel``), subclassed in
:mod:`exporters.onnx_builder_wide` so that each wide layer is written fused (one ``GroupQueryAttention`` over its
K·H heads); the report lists the wide layers (``wide_layers``).
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import shutil
import sys
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from exporters.onnx_builder_wide import run_wide_builder, wide_base_architecture, wide_problem, wide_steps
from exporters.onnx_model import _load, _Loaded, left_padded_positions
from exporters.onnx_parity import Check, OnnxValidationReport, _diff_check, _greedy_check, _prompts
from exporters.onnx_session import ONNX_FILENAME, OnnxCausalLM
from exporters.staging import check_output, staged_output
from surgery.checkpoint import has_tokenizer, read_json_object
from surgery.compat import output_cache, with_cache
from surgery.errors import OnnxExportError, OnnxValidationError, OptionError, SurgeryError
from surgery.plan import RECIPE_FILENAME
from surgery.source import Source, open_source
from surgery.widen import MODEL_TYPE as WIDE_MODEL_TYPE

GRAPHS = ("auto", "builder", "surgery")
DEFAULT_GRAPH = "surgery"
BUILDER_DATA_FILENAME = "model.onnx.data"  # where the builder writes the weights
# GroupQueryAttention's CPU kernel: "head_size shall be a multiple of 16" (onnxruntime 1.31).
GQA_HEAD_MULTIPLE = 16
# Surgery's export options the builder path does not take (auto then keeps surgery's graph).
_SURGERY_ONLY = ("share_buffer", "quantize")


@dataclass(frozen=True)
class GraphChoice:
    """Which graph an export takes and why.

    Attributes:
        graph: ``builder`` or ``surgery``.
        reason: one line: what was asked, or why ``auto`` kept surgery's graph.
    """

    graph: str
    reason: str


def graph_stats(path: Path) -> dict[str, Any]:
    """Node count and op types (with counts, most common first) of an ONNX graph, its weights not loaded.

    Args:
        path: the ``.onnx`` file.

    Returns:
        ``{"nodes": N, "op_types": {"MatMul": 31, ...}}``.

    Example:
        >>> graph_stats(Path("out/onnx/model.onnx"))["nodes"]  # doctest: +SKIP
        342
    """
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    counts = Counter(node.op_type for node in graph.node)
    return {"nodes": len(graph.node), "op_types": dict(counts.most_common())}


def _builder_module() -> Any:
    """onnxruntime-genai's model builder module (imports torch, transformers and onnx_ir)."""
    from onnxruntime_genai.models import builder

    return builder


def builder_architectures() -> set[str]:
    """The ``architectures[0]`` names the installed builder's ``create_model`` dispatches on (read from its source).

    Returns:
        The names; empty when onnxruntime-genai or its builder is not installed.

    Example:
        >>> "LlamaForCausalLM" in builder_architectures() or not builder_architectures()
        True
    """
    import importlib.util

    with contextlib.suppress(ImportError, ValueError):
        spec = importlib.util.find_spec("onnxruntime_genai")
        if spec is None or not spec.submodule_search_locations:
            return set()
        source = Path(next(iter(spec.submodule_search_locations))) / "models" / "builder.py"
        with contextlib.suppress(OSError):
            return set(re.findall(r'config\.architectures\[0\] == "(\w+)"', source.read_text(encoding="utf-8")))
    return set()


def builder_problem(model_dir: Path, *, dtype: str = "fp32", options: dict[str, Any] | None = None,
                    trust_remote_code: bool = False) -> str | None:
    """Why the reference builder cannot export this checkpoint as surgery would validate it, or None.

    Args:
        model_dir: the checkpoint directory (a GGUF source's converted directory).
        dtype: the export dtype (the builder path writes fp32 only).
        options: surgery's other export options; ``share_buffer`` or ``quantize`` keep surgery's graph.
        trust_remote_code: a wide-block checkpoint (its modelling code ships in it) is loaded only with it.

    Returns:
        A one-line reason, or None when the builder can be tried.

    Example:
        >>> builder_problem(Path("out/smol-19"))  # doctest: +SKIP
    """
    from exporters.onnx_genai import genai_problem

    if (problem := genai_problem()) is not None:
        return problem
    asked = [name for name in _SURGERY_ONLY if (options or {}).get(name)]
    if asked:
        return f"--{asked[0].replace('_', '-')} is surgery's graph only"
    if dtype != "fp32":
        return f"the builder path writes fp32 only (asked {dtype})"
    config = read_json_object(model_dir / "config.json", "config")
    names = config.get("architectures") or []
    if config.get("auto_map") or any(model_dir.glob("modeling_*.py")):
        if config.get("model_type") != WIDE_MODEL_TYPE:
            return "its modelling code ships in the checkpoint (not a wide-block model of this tool): the builder does not know it"
        if (problem := wide_problem(config)) is not None:
            return f"a wide-block model: {problem}"
        if not trust_remote_code:
            return "a wide-block model: its modelling code ships in the checkpoint; pass --trust-remote-code"
        names = [wide_base_architecture(config)]
    nested = config.get("text_config")
    text: dict[str, Any] = nested if isinstance(nested, dict) else config
    if not names or names[0] not in builder_architectures():
        return f"the builder does not list {names[0] if names else 'this architecture'}"
    heads = text.get("num_attention_heads")
    head_dim = text.get("head_dim") or (text.get("hidden_size", 0) // heads if isinstance(heads, int) and heads else None)
    if not isinstance(head_dim, int) or head_dim % GQA_HEAD_MULTIPLE:
        return f"head size {head_dim} is not a multiple of {GQA_HEAD_MULTIPLE} (GroupQueryAttention's CPU kernel needs it)"
    if not has_tokenizer(model_dir):
        return "no tokenizer files (the builder writes the tokenizer for onnxruntime-genai)"
    return None


@dataclass(frozen=True)
class BuilderExportResult:
    """What the builder path of ``export-onnx`` wrote.

    Attributes:
        out: the ONNX directory.
        graph: ``builder``.
        reason: why this graph was taken.
        num_layers: cache layers.
        inputs: graph input names.
        outputs: graph output names.
        files: ``(name, bytes)`` of every file written.
        validation: the report, or None with ``validate=False``.
        export_seconds: time the builder took.
        nodes: the graph's node count.
        op_types: op type -> node count.
        opset: the graph's ONNX opset (default domain).
        share_buffer: ``past_present_share_buffer`` as the builder wrote it in ``genai_config.json``.
        wide_layers: each wide-layer application (``layer``, ``branches`` K, ``mlp_input``, ``fused``); empty for a
            standard checkpoint.
        kind: always ``decoder``.
        dtype: always ``fp32``.
    """

    out: Path
    graph: str
    reason: str
    num_layers: int
    inputs: list[str]
    outputs: list[str]
    files: list[tuple[str, int]]
    validation: OnnxValidationReport | None
    export_seconds: float
    nodes: int
    op_types: dict[str, int] = field(default_factory=dict)
    opset: int = 0
    share_buffer: bool = True
    wide_layers: list[dict[str, Any]] = field(default_factory=list)
    kind: str = "decoder"
    dtype: str = "fp32"

    @property
    def external_data(self) -> bool:
        return any(name == BUILDER_DATA_FILENAME for name, _ in self.files)

    def summary(self) -> str:
        """What ``surgery export-onnx --graph builder`` prints."""
        size = sum(b for n, b in self.files if n in (ONNX_FILENAME, BUILDER_DATA_FILENAME))
        ops = ", ".join(f"{name} {count}" for name, count in list(self.op_types.items())[:6])
        lines = [
            f"ONNX decoder (onnxruntime-genai model builder's graph: {self.reason}), {self.num_layers} layers, fp32, "
            f"opset {self.opset}: {size / 1e6:.1f} MB, built in {self.export_seconds:.1f} s",
            f"graph: {self.nodes} nodes ({ops}{', ...' if len(self.op_types) > 6 else ''})",
            f"inputs: {', '.join(self.inputs[:2])}, past_key_values.{{i}}.key/.value (no position_ids: "
            "positions come from the mask)",
            f"outputs: {self.outputs[0]}, present.{{i}}.key/.value",
            self.validation.format() if self.validation else "validation skipped (--no-validate)",
            f"wrote {self.out} (with the builder's genai_config.json, share buffer {'on' if self.share_buffer else 'off'})",
        ]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out), "graph": self.graph, "graph_reason": self.reason, "kind": self.kind,
            "dtype": self.dtype, "opset": self.opset, "num_layers": self.num_layers, "inputs": self.inputs,
            "outputs": self.outputs, "nodes": self.nodes, "op_types": self.op_types,
            "files": [{"file": n, "bytes": b} for n, b in self.files], "external_data": self.external_data,
            "export_seconds": round(self.export_seconds, 2), "share_buffer": self.share_buffer,
            "wide_layers": self.wide_layers,
            "validation": self.validation.to_dict() if self.validation else None,
        }


def export_onnx_graph(
    model: str | Path | None,
    out: str | Path,
    *,
    graph: str = "surgery",
    dtype: str = "fp32",
    validate: bool = True,
    device: str = "cpu",
    force: bool = False,
    quiet: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    **surgery_options: Any,
) -> Any:
    """``export-onnx`` with a choice of graph: onnxruntime-genai's model builder, surgery's own, or ``auto``.

    Args:
        model: a checkpoint, model directory, ``.gguf`` file or Hub id (None: the embedded default model).
        out: the ONNX directory to create.
        graph: ``surgery`` (the default, as the CLI's ``--graph``: the graph that also passes the
            left-padded batch checks), ``builder``, or ``auto`` (the builder when it can take the model
            and its graph passes validation, else surgery's).
        dtype: ``fp32`` (``fp16``: surgery's graph only).
        validate: compare ONNX Runtime with PyTorch before writing.
        device: where validation runs; also the builder's execution provider (``cpu`` or ``cuda``).
        force: replace ``out`` if it is an earlier output of this tool.
        quiet: no progress messages.
        allow_pickle: accept ``.bin``/``.pt`` weights.
        trust_remote_code: passed to the builder (its ``hf_remote``) and to ``transformers``; False unless asked.
        **surgery_options: the other options of :func:`exporters.onnx.export_onnx` (``opset``,
            ``share_buffer``, ``quantize``, ...), used by surgery's graph.

    Returns:
        A :class:`BuilderExportResult` (builder) or :class:`exporters.onnx.OnnxExportResult` (surgery's graph);
        both have ``summary()`` and ``to_dict()``, and ``onnx-export.json`` names the graph and why.

    Raises:
        OptionError: an unknown graph, or ``builder`` asked for a model it cannot take (a wide Qwen 3 or Gemma, ...).
        OnnxExportError: the builder failed (``--debug`` shows its traceback).
        OnnxValidationError: ``builder``: its graph disagrees with PyTorch beyond the bound.
        The errors of :func:`exporters.onnx.export_onnx`.

    Example:
        >>> result = export_onnx_graph("out/smol-19", "out/smol-19-onnx", graph="builder")  # doctest: +SKIP
        >>> result.op_types["GroupQueryAttention"]  # doctest: +SKIP
        19
    """
    from exporters.onnx import _check_options, export_source

    if graph not in GRAPHS:
        raise OptionError(f"unknown graph {graph!r}; choose one of {', '.join(GRAPHS)}")
    _check_options(dtype, int(surgery_options.get("opset", 18)), device)
    out = Path(out)
    source = open_source(model, allow_pickle=allow_pickle, quiet=quiet)
    check_output(out, force=force, protected=source.protected_paths())
    source.fetch(source.pending_files)

    def surgery(reason: str) -> Any:
        return export_source(source, out, dtype=dtype, validate=validate, device=device, force=force,
                             trust_remote_code=trust_remote_code, graph_reason=reason, **surgery_options)

    if graph == "surgery":
        return surgery("asked (--graph surgery)")
    problem = builder_problem(source.path, dtype=dtype, options=surgery_options, trust_remote_code=trust_remote_code)
    if problem is not None:
        if graph == "builder":
            raise OptionError(f"--graph builder cannot export {source.name}: {problem}",
                              hint="use --graph surgery (or auto, which falls back to it)")
        _say(quiet, f"graph: surgery's ({problem})")
        return surgery(f"auto: the builder was not used: {problem}")
    reason = "asked (--graph builder)" if graph == "builder" else "auto: a standard architecture the builder takes"
    try:
        return export_builder(source, out, reason=reason, validate=validate, device=device, force=force,
                              quiet=quiet, trust_remote_code=trust_remote_code)
    except (OnnxExportError, OnnxValidationError) as exc:
        if graph == "builder":
            raise
        _say(quiet, f"graph: surgery's (the builder's graph was not kept: {exc})")
        return surgery(f"auto: the builder's graph was not kept: {str(exc).splitlines()[0]}")


def _say(quiet: bool, text: str) -> None:
    if not quiet:
        sys.stderr.write(text + "\n")


def export_builder(
    source: Source, out: Path, *, reason: str = "asked (--graph builder)", validate: bool = True, device: str = "cpu",
    force: bool = False, quiet: bool = False, trust_remote_code: bool = False,
) -> BuilderExportResult:
    """Run onnxruntime-genai's model builder on ``source`` into a staging directory, add surgery's files and
    report, validate, and move it to ``out``.

    Args:
        source: the opened model (a GGUF source: its converted directory).
        out: the ONNX directory to create.
        reason: why the builder's graph was taken (recorded in ``onnx-export.json``).
        validate: compare ONNX Runtime with PyTorch before writing (:func:`validate_builder_graph`).
        device: validation's device and the builder's execution provider.
        force: replace ``out`` if it is an earlier output of this tool.
        quiet: no progress message.
        trust_remote_code: the builder's ``hf_remote`` and ``transformers``' ``trust_remote_code``.

    Returns:
        The :class:`BuilderExportResult`.

    Raises:
        OnnxExportError: the builder failed (its first line; ``--debug`` shows the traceback).
        OnnxValidationError: the graph disagrees with PyTorch beyond the bound; nothing is written.

    Example:
        >>> export_builder(open_source("out/smol-19"), Path("out/smol-19-onnx"))  # doctest: +SKIP
    """
    from exporters.onnx import REPORT_FILENAME, _copy_beside, _versions

    check_output(out, force=force)
    loaded = _load(source.path, trust_remote_code)
    if loaded.kind != "decoder":
        raise OptionError(f"--graph builder exports decoders, not {loaded.model_type} (an encoder)")
    with staged_output(out, force=force) as staging:
        _say(quiet, f"running onnxruntime-genai's model builder on {source.name} (fp32, {device})...")
        started = time.perf_counter()
        config = read_json_object(source.path / "config.json", "config")
        wide = config.get("model_type") == WIDE_MODEL_TYPE
        wide_layers = [{"layer": p, "branches": k, "mlp_input": m, "fused": True} for p, k, m in wide_steps(config)]
        if wide:
            reason += f"; {len(wide_layers)} wide layer(s) fused (one GroupQueryAttention over K·H heads each)"
        run_builder(source.path, staging, staging.parent / "builder-cache", execution_provider=device,
                    trust_remote_code=trust_remote_code, model_type=loaded.model_type,
                    wide_base=wide_base_architecture(config) if wide else None)
        export_seconds = time.perf_counter() - started
        _copy_missing(source, loaded, staging, _copy_beside)
        report = None
        if validate:
            report = validate_builder_graph(loaded, staging, device=device)
            if not report.passed:
                failed = next(check for check in report.checks if not check.passed)
                raise OnnxValidationError(failed.name, failed.max_abs_diff, failed.tolerance, report.provider, failed.detail)
        import onnx

        model = onnx.load(str(staging / ONNX_FILENAME), load_external_data=False)
        stats = graph_stats(staging / ONNX_FILENAME)
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        genai = read_json_object(staging / "genai_config.json", "genai config")
        files = sorted((p.name, p.stat().st_size) for p in staging.iterdir() if p.is_file())
        result = BuilderExportResult(
            out=out, graph="builder", reason=reason, num_layers=len(loaded.cache),
            inputs=[i.name for i in model.graph.input], outputs=[o.name for o in model.graph.output], files=files,
            validation=report, export_seconds=export_seconds, nodes=stats["nodes"], op_types=stats["op_types"],
            opset=opset, share_buffer=bool(genai.get("search", {}).get("past_present_share_buffer", False)),
            wide_layers=wide_layers,
        )
        import onnxruntime_genai

        body = {**result.to_dict(), "source": source.name,
                "versions": {**_versions(), "onnxruntime_genai": onnxruntime_genai.__version__},
                "cache_heads": [heads for heads, _ in loaded.cache]}
        if (recipe := source.path / RECIPE_FILENAME).is_file():  # how the checkpoint was made, if this tool made it
            body["source_recipe"] = recipe.read_text(encoding="utf-8")
        body.pop("out")
        (staging / REPORT_FILENAME).write_text(json.dumps(body, indent=2) + "\n")
        files.append((REPORT_FILENAME, (staging / REPORT_FILENAME).stat().st_size))
    return result


def run_builder(model_dir: Path, output_dir: Path, cache_dir: Path, *, execution_provider: str = "cpu",
                trust_remote_code: bool = False, model_type: str = "?", wide_base: str | None = None) -> None:
    """``create_model`` of onnxruntime-genai's builder, fp32, on a local checkpoint; its chatter swallowed.

    Args:
        model_dir: the Hugging Face checkpoint directory (safetensors, config, tokenizer).
        output_dir: where the builder writes ``model.onnx``, ``model.onnx.data``, ``genai_config.json`` and the tokenizer.
        cache_dir: the builder's scratch directory.
        execution_provider: ``cpu`` or ``cuda``.
        trust_remote_code: the builder's ``hf_remote`` (False unless the user asked).
        model_type: named in the error.
        wide_base: a wide-block checkpoint's base architecture (``LlamaForCausalLM``, ...): its builder model class,
            subclassed to write the wide layers fused (:mod:`exporters.onnx_builder_wide`); None: ``create_model``.

    Raises:
        OnnxExportError: the builder raised (the first line of its message; the traceback is chained for ``--debug``).

    Example:
        >>> run_builder(Path("out/smol-19"), Path("/tmp/b"), Path("/tmp/b-cache"))  # doctest: +SKIP
    """
    chatter = io.StringIO()
    try:
        with contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            builder = _builder_module()
            extra = [f"hf_remote={'true' if trust_remote_code else 'false'}", "hf_token=false"]
            if wide_base is not None:
                run_wide_builder(builder, model_dir, output_dir, cache_dir, execution_provider=execution_provider,
                                 extra=extra, base_architecture=wide_base)
            else:
                options = builder.parse_extra_options(None, str(model_dir), str(output_dir), "fp32", execution_provider,
                                                      str(cache_dir), extra)
                builder.create_model(None, str(model_dir), str(output_dir), "fp32", execution_provider, str(cache_dir),
                                     **options)
    except SurgeryError:
        raise
    except BaseException as exc:  # noqa: BLE001 - the builder raises anything (ValueError, NotImplementedError, ...)
        if isinstance(exc, KeyboardInterrupt):
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise OnnxExportError(model_type, "onnxruntime-genai model builder", f"{type(exc).__name__}: {first}") from exc
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    if not (output_dir / ONNX_FILENAME).exists():
        raise OnnxExportError(model_type, "onnxruntime-genai model builder", f"it wrote no {ONNX_FILENAME}")


def _copy_missing(source: Source, loaded: _Loaded, staging: Path, copy_beside: Any) -> None:
    """Surgery's files beside the builder's (config, generation config, recipe, card), the builder's own kept."""
    aside = staging.parent / "surgery-files"
    aside.mkdir()
    copy_beside(source, loaded, aside)
    for file in aside.rglob("*"):
        target = staging / file.relative_to(aside)
        if file.is_file() and not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(file), target)
    shutil.rmtree(aside, ignore_errors=True)


def validate_builder_graph(loaded: _Loaded, directory: Path, *, device: str = "cpu") -> OnnxValidationReport:
    """Surgery's validation of a decoder graph, one sequence at a time (the builder's graph takes no left padding).

    For each of the two validation prompts: prefill logits (past 0), one decode step fed ONNX Runtime's own
    present, and 16 greedy tokens with the cache against ``transformers`` ``generate``; every logit check
    held to the fp32 relative bound (:data:`exporters.onnx_parity.FP32_RELATIVE_TOLERANCE`). The left-padded
    batch checks of surgery's graph are not run: ``GroupQueryAttention`` takes each row's positions from its
    mask length, which a left-padded row gets wrong (measured: tiny Llama, relative error 0.76).

    Args:
        loaded: the fp32 PyTorch model.
        directory: the ONNX directory.
        device: ``cpu`` or ``cuda``.

    Returns:
        The :class:`OnnxValidationReport`.

    Example:
        >>> validate_builder_graph(_load(Path("out/smol-19"), False), Path("out/smol-19-onnx")).passed  # doctest: +SKIP
        True
    """
    import torch

    started = time.perf_counter()
    model = loaded.model
    config = model.config.get_text_config()
    prompts = _prompts(directory, int(config.vocab_size))
    lm = OnnxCausalLM.load(directory, device)
    pad = config.pad_token_id if isinstance(getattr(config, "pad_token_id", None), int) else 0
    eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) is not None else None
    checks: list[Check] = []
    for number, prompt in enumerate(prompts, 1):
        ids = np.array([prompt], dtype=np.int64)
        mask = np.ones_like(ids)
        positions = left_padded_positions(mask)
        got, present = lm.forward(ids, mask, positions, lm.empty_cache(1))
        with torch.no_grad():
            out = model(**with_cache(model, None, input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                     position_ids=torch.from_numpy(positions), use_cache=True))
        want, cache = out.logits.float().numpy(), output_cache(out)
        checks.append(_diff_check(f"prompt {number}: prefill logits ({ids.shape[1]} tokens, past 0)", got, want, None, "fp32"))
        step = want[:, -1].argmax(-1)[:, None].astype(np.int64)
        mask = np.ones((1, ids.shape[1] + 1), dtype=np.int64)
        position = np.array([[ids.shape[1]]], dtype=np.int64)
        got, _ = lm.forward(step, mask, position, present)
        with torch.no_grad():
            out = model(**with_cache(model, cache, input_ids=torch.from_numpy(step), attention_mask=torch.from_numpy(mask),
                                     position_ids=torch.from_numpy(position), use_cache=True))
        checks.append(_diff_check(f"prompt {number}: decode step logits (past {ids.shape[1]})", got,
                                  out.logits.float().numpy(), None, "fp32"))
        greedy = _greedy_check(lm, model, [prompt], pad, eos, "fp32")
        checks.append(Check(greedy.name.replace("left-padded batch of 1", f"prompt {number} alone"), greedy.passed,
                            greedy.max_abs_diff, greedy.tolerance, greedy.detail, greedy.scale))
    return OnnxValidationReport(lm.provider, "fp32", tuple(checks), time.perf_counter() - started)
