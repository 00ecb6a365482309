"""Export a model to ONNX with its KV cache (``surgery export-onnx``), validated against PyTorch in ONNX Runtime.

The verb and the directory it writes: the graph (:mod:`exporters.onnx_graph`), config, generation config,
tokenizer, ``genai_config.json`` for onnxruntime-genai (decoders, :mod:`exporters.onnx_genai`) and
``onnx-export.json``, staged and renamed into place only when the parity checks
(:mod:`exporters.onnx_parity`) pass; :func:`validate_onnx` runs those checks on an existing directory, and
:func:`cached_export` keeps one fp32 export per model in the cache for the runner (:mod:`exporters.onnx_runtime`).
The PyTorch model is loaded by :mod:`exporters.onnx_model`; the graph layout is described in :mod:`exporters.onnx_graph`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exporters.onnx_fusion import FusionReport
from exporters.onnx_genai import write_genai_config

# The ``X as X`` imports are re-exports: names tests, benchmarks and users import from this module.
from exporters.onnx_graph import DEFAULT_OPSET, EXTERNAL_DATA_FILENAME, MIN_OPSET, _export_graph
from exporters.onnx_graph import EXTERNAL_DATA_THRESHOLD as EXTERNAL_DATA_THRESHOLD
from exporters.onnx_graph import _decoder_wrapper as _decoder_wrapper
from exporters.onnx_model import _load, _Loaded
from exporters.onnx_model import left_padded_positions as left_padded_positions
from exporters.onnx_parity import FP16_RELATIVE_TOLERANCE as FP16_RELATIVE_TOLERANCE
from exporters.onnx_parity import FP32_RELATIVE_TOLERANCE as FP32_RELATIVE_TOLERANCE
from exporters.onnx_parity import GREEDY_TOKENS as GREEDY_TOKENS
from exporters.onnx_parity import Check as Check
from exporters.onnx_parity import OnnxValidationReport, validate_against
from exporters.onnx_parity import _diff_check as _diff_check
from exporters.onnx_parity import _greedy_check as _greedy_check
from exporters.onnx_parity import relative_tolerance as relative_tolerance
from exporters.onnx_quantize import DEFAULT_BLOCK_SIZE, QuantizationReport, check_quantize_options, quantize_export
from exporters.onnx_session import ONNX_FILENAME
from exporters.staging import check_output, staged_output
from surgery.checkpoint import read_json_object
from surgery.errors import (
    CheckpointError,
    CudaUnavailableError,
    OnnxOpsetError,
    OnnxValidationError,
    OptionError,
    OutputExistsError,
)
from surgery.source import Source, cache_root, open_source

PathLike = str | os.PathLike[str]

DTYPES = ("fp32", "fp16")
REPORT_FILENAME = "onnx-export.json"


@dataclass(frozen=True)
class OnnxExportResult:
    """What :func:`export_onnx` wrote.

    Attributes:
        out: the ONNX directory.
        kind: ``decoder`` (with KV cache) or ``encoder``.
        dtype: ``fp32`` or ``fp16``.
        opset: the ONNX opset.
        num_layers: cache layers (decoders) or hidden layers (encoders).
        inputs: graph input names.
        outputs: graph output names.
        files: ``(name, bytes)`` of every file written.
        external_data: whether the weights went to ``model.onnx_data``.
        validation: the report, or None with ``validate=False``.
        export_seconds: time spent tracing and writing the graph.
        share_buffer: the graph fills onnxruntime-genai's share buffer (``--share-buffer``).
        quantization: what ``--quantize`` did and measured (None: a float export).
        fusion: decoders: which ONNX Runtime fused operators the graph uses and why attention was left
            unfused, if it was (None: encoders, or ``fuse=False``).
    """

    out: Path
    kind: str
    dtype: str
    opset: int
    num_layers: int
    inputs: list[str]
    outputs: list[str]
    files: list[tuple[str, int]]
    external_data: bool
    validation: OnnxValidationReport | None
    export_seconds: float
    share_buffer: bool = False
    quantization: QuantizationReport | None = None
    fusion: FusionReport | None = None

    def summary(self) -> str:
        """What ``surgery export-onnx`` prints."""
        size = sum(b for n, b in self.files if n in (ONNX_FILENAME, EXTERNAL_DATA_FILENAME))
        shown_inputs = self.inputs[:3] + (["past_key_values.{i}.key/.value"] if self.kind == "decoder" else self.inputs[3:])
        shown_outputs = self.outputs[:1] + (["present.{i}.key/.value"] if self.kind == "decoder" else [])
        lines = [
            f"ONNX {self.kind}, {self.num_layers} layers, {self.dtype}, opset {self.opset}: "
            f"{size / 1e6:.1f} MB{' (weights in ' + EXTERNAL_DATA_FILENAME + ')' if self.external_data else ''}, "
            f"exported in {self.export_seconds:.1f} s",
            f"inputs: {', '.join(shown_inputs)}",
            f"outputs: {', '.join(shown_outputs)}",
        ]
        if self.fusion is not None:
            lines.append(self.fusion.format())
        lines.append(self.validation.format() if self.validation else "validation skipped (--no-validate)")
        if self.quantization is not None:
            lines.append(self.quantization.format())
        genai = (f" (with genai_config.json for onnxruntime-genai, share buffer {'on' if self.share_buffer else 'off'})"
                 if self.kind == "decoder" else "")
        lines.append(f"wrote {self.out}{genai}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out), "kind": self.kind, "dtype": self.dtype, "opset": self.opset,
            "num_layers": self.num_layers, "inputs": self.inputs, "outputs": self.outputs,
            "files": [{"file": n, "bytes": b} for n, b in self.files], "external_data": self.external_data,
            "export_seconds": round(self.export_seconds, 2), "share_buffer": self.share_buffer,
            "validation": self.validation.to_dict() if self.validation else None,
            "quantization": self.quantization.to_dict() if self.quantization else None,
            "fusion": self.fusion.to_dict() if self.fusion else None,
        }


def _check_options(dtype: str, opset: int, device: str) -> None:
    """Everything about the options that can fail, checked before any work is done."""
    from exporters.onnx_session import DEVICES, cuda_problem

    if device not in DEVICES:
        raise OptionError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cuda" and (problem := cuda_problem()) is not None:
        raise CudaUnavailableError(problem)
    if dtype not in DTYPES:
        raise OptionError(f"unknown ONNX dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    import onnx

    newest = int(onnx.defs.onnx_opset_version())
    with contextlib.suppress(ImportError, AttributeError):  # what torch.onnx can target
        from torch.onnx import _constants

        newest = min(newest, int(_constants.ONNX_MAX_OPSET))
    if not MIN_OPSET <= opset <= newest:
        raise OnnxOpsetError(opset, MIN_OPSET, newest)


def export_onnx(
    model: PathLike | None,
    out: PathLike,
    *,
    dtype: str = "fp32",
    opset: int = DEFAULT_OPSET,
    validate: bool = True,
    device: str = "cpu",
    force: bool = False,
    quiet: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    share_buffer: bool = False,
    quantize: str | None = None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    symmetric: bool = True,
    quantize_lm_head: bool = True,
    max_kl: float | None = None,
    fuse: bool = True,
) -> OnnxExportResult:
    """Export a model to an ONNX directory: the graph (KV cache for decoders), config, generation config,
    tokenizer and, for decoders, ``genai_config.json`` (onnxruntime-genai serves the directory as is); then
    validate it in ONNX Runtime against PyTorch.

    Nothing is written unless export and validation both succeed: the directory is built beside ``out``
    and renamed into place at the end.

    Args:
        model: any checkpoint this tool wrote, a model directory, ``.gguf`` file or Hub repo id
            (None: the embedded default model).
        out: the ONNX directory to create.
        dtype: ``fp32`` or ``fp16`` weights and activations.
        opset: the ONNX opset (at least 18).
        validate: compare ONNX Runtime with PyTorch (logits, cache, greedy tokens) before writing.
        device: where validation runs: ``cpu`` or ``cuda``.
        force: replace ``out`` if it exists.
        quiet: no progress messages.
        allow_pickle: accept ``.bin``/``.pt`` weights (loaded with ``weights_only=True``).
        trust_remote_code: allow a model whose code ships in its repository.
        share_buffer: decoders: let each present fill its past when the past is a longer buffer, as
            onnxruntime-genai's ``past_present_share_buffer`` needs (written true in ``genai_config.json``);
            an ordinary past gives the same present as without (docs/onnx.md, "The share buffer").
        quantize: ``int4``: once the float graph is validated, rewrite its weight MatMuls to ONNX Runtime's
            ``MatMulNBits`` (round-to-nearest, :mod:`exporters.onnx_quantize`) and measure KL, top-1 and greedy
            agreement against PyTorch fp32 (decoders only).
        block_size: int4 block size (16, 32, 64, 128 or 256 rows per scale).
        symmetric: int4 with a scale per block (True) or uint4 with a zero point too (False).
        quantize_lm_head: quantise the projection to the vocabulary too (True, as onnxruntime-genai's builder).
        max_kl: with ``quantize``, fail (nothing written) when KL(PyTorch fp32 || int4) is above this.
        fuse: decoders: rewrite the traced graph into ONNX Runtime's fused operators (RMSNorm, rotary,
            GroupQueryAttention with the model's mask; :mod:`exporters.onnx_fusion`); False keeps the traced form.

    Returns:
        The :class:`OnnxExportResult`, with the validation report.

    Raises:
        OutputExistsError: ``out`` exists and ``force`` is False.
        OptionError: an unknown dtype, quantization or block size, or ``out`` inside the source model.
        OnnxOpsetError: an opset below 18 or newer than the installed ``onnx`` knows.
        UnsupportedArchitectureError: neither a causal LM nor a base encoder, or a cache without per-layer keys/values.
        OnnxExportError: the model cannot be traced or lowered to ONNX.
        OnnxValidationError: ONNX Runtime disagrees with PyTorch beyond the stated bounds, or the int4 KL is
            above ``max_kl``.
        CudaUnavailableError: ``device="cuda"`` but ONNX Runtime cannot use CUDA.

    Example:
        >>> import surgery
        >>> result = surgery.export_onnx("out/smol-19", "out/smol-19-onnx")  # doctest: +SKIP
        >>> result.validation.provider  # doctest: +SKIP
        'CPUExecutionProvider'
    """
    _check_options(dtype, opset, device)
    check_quantize_options(quantize, block_size, max_kl, validate)
    out = Path(out)
    source = open_source(model, allow_pickle=allow_pickle, quiet=quiet)
    check_output(out, force=force, protected=source.protected_paths())
    return export_source(source, out, dtype=dtype, opset=opset, validate=validate, device=device, force=force,
                         trust_remote_code=trust_remote_code, share_buffer=share_buffer, quantize=quantize,
                         block_size=block_size, symmetric=symmetric, quantize_lm_head=quantize_lm_head, max_kl=max_kl,
                         quiet=quiet, fuse=fuse)


def export_source(
    source: Source, out: Path, *, dtype: str = "fp32", opset: int = DEFAULT_OPSET, validate: bool = True,
    device: str = "cpu", force: bool = False, trust_remote_code: bool = False, share_buffer: bool = False,
    quantize: str | None = None, block_size: int = DEFAULT_BLOCK_SIZE, symmetric: bool = True,
    quantize_lm_head: bool = True, max_kl: float | None = None, quiet: bool = True,
    graph_reason: str = "the default (--graph surgery)", fuse: bool = True,
) -> OnnxExportResult:
    """:func:`export_onnx` on an opened source, with no check that ``out`` lies outside it (``--onnx``
    writes into ``OUT/onnx`` of the checkpoint it just wrote).

    Raises:
        The errors of :func:`export_onnx`.
    """
    _check_options(dtype, opset, device)
    check_quantize_options(quantize, block_size, max_kl, validate)
    check_output(out, force=force)
    source.fetch(source.pending_files)
    loaded = _load(source.path, trust_remote_code)
    with staged_output(out, force=force) as staging:
        started = time.perf_counter()
        inputs, outputs, external, fusion = _export_graph(loaded, staging / ONNX_FILENAME, dtype, opset, share_buffer, fuse)
        export_seconds = time.perf_counter() - started
        _copy_beside(source, loaded, staging)  # before validation, which reads the tokenizer
        if loaded.kind == "decoder":  # onnxruntime-genai's model directory: the config beside the tokenizer
            write_genai_config(loaded, staging, share_buffer=share_buffer)
        report = None
        if validate:
            report = validate_against(loaded, staging, dtype=dtype, device=device)
            if not report.passed:
                failed = next(check for check in report.checks if not check.passed)
                raise OnnxValidationError(failed.name, failed.max_abs_diff, failed.tolerance, report.provider, failed.detail)
        quantization = None
        if quantize is not None:  # the float graph passed parity; the int4 one is measured by KL instead
            quantization = quantize_export(loaded, staging, block_size=block_size, symmetric=symmetric,
                                           lm_head=quantize_lm_head, measure=validate, max_kl=max_kl, device=device,
                                           quiet=quiet)
            external = (staging / EXTERNAL_DATA_FILENAME).exists()
        files = sorted((p.name, p.stat().st_size) for p in staging.iterdir() if p.is_file())
        result = OnnxExportResult(
            out=out, kind=loaded.kind, dtype=dtype, opset=opset, num_layers=len(loaded.cache) or _hidden_layers(loaded),
            inputs=inputs, outputs=outputs, files=files, external_data=external, validation=report,
            export_seconds=export_seconds, share_buffer=share_buffer, quantization=quantization, fusion=fusion,
        )
        body = {**result.to_dict(), "source": source.name, "versions": _versions()}
        if loaded.kind == "decoder":  # each cache layer's KV heads (a wide block's K x H_kv among H_kv)
            body["cache_heads"] = [heads for heads, _ in loaded.cache]
        body.pop("out")
        body.update(graph="surgery", graph_reason=graph_reason, **_graph_stats(staging / ONNX_FILENAME))
        (staging / REPORT_FILENAME).write_text(json.dumps(body, indent=2) + "\n")
        files.append((REPORT_FILENAME, (staging / REPORT_FILENAME).stat().st_size))
    return result


def _graph_stats(path: Path) -> dict[str, Any]:
    """The graph's node count and op types, for the report (:func:`exporters.onnx_builder.graph_stats`)."""
    from exporters.onnx_builder import graph_stats

    return graph_stats(path)


def _hidden_layers(loaded: _Loaded) -> int:
    return int(getattr(loaded.model.config, "num_hidden_layers", 0))


def _versions() -> dict[str, str]:
    import onnx
    import onnxruntime
    import torch
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}


def _copy_beside(source: Source, loaded: _Loaded, staging: Path) -> None:
    """config.json, generation_config.json and the tokenizer (every non-weight file) beside the graph."""
    shutil.copyfile(source.path / "config.json", staging / "config.json")
    for file in source.other_files():
        target = staging / file.relative_to(source.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, target)
    generation = getattr(loaded.model, "generation_config", None)
    if loaded.kind == "decoder" and not (staging / "generation_config.json").exists() and generation is not None:
        generation.to_json_file(str(staging / "generation_config.json"))



def validate_onnx(
    onnx_dir: PathLike, model: PathLike, *, device: str = "cpu", allow_pickle: bool = False, trust_remote_code: bool = False
) -> OnnxValidationReport:
    """Validate an existing ONNX directory against the PyTorch model it was exported from.

    Args:
        onnx_dir: the directory holding ``model.onnx``.
        model: the source model (directory, ``.gguf`` file or Hub repo id).
        device: ``cpu`` or ``cuda``.

    Returns:
        The :class:`OnnxValidationReport` (check ``.passed``).

    Raises:
        CheckpointError: the ONNX directory or the model cannot be read.
        UnsupportedArchitectureError: a head this exporter does not handle.
        CudaUnavailableError: ``device="cuda"`` without a usable CUDA.
        OptionError: the directory holds an int4 export (measured by KL when exported, not by parity).

    Example:
        >>> validate_onnx("out/smol-19/onnx", "out/smol-19").passed  # doctest: +SKIP
        True
    """
    source = open_source(model, allow_pickle=allow_pickle)
    source.fetch(source.pending_files)
    loaded = _load(source.path, trust_remote_code)
    directory = Path(onnx_dir)
    meta = directory / REPORT_FILENAME
    body = read_json_object(meta, "ONNX export report") if meta.exists() else {}
    if body.get("quantization"):
        raise OptionError(f"{directory} holds an int4 (MatMulNBits) graph, which cannot meet the parity bound; its KL "
                          "against PyTorch was measured when it was exported (onnx-export.json, quantization)",
                          hint="validate the float export, or export again with --quantize int4 --max-kl X")
    dtype = body.get("dtype", "fp32")
    if dtype not in ("fp32", "fp16"):
        raise CheckpointError(str(meta), f"names dtype {dtype!r}, not fp32 or fp16")
    if meta.exists() and read_json_object(meta, "ONNX export report").get("graph") == "builder":
        from exporters.onnx_builder import validate_builder_graph  # the builder's graph: one sequence at a time

        return validate_builder_graph(loaded, directory, device=device)
    return validate_against(loaded, directory, dtype=dtype, device=device)


# --------------------------------------------------------------------------------------------------- cache


def cached_export(
    model: PathLike | None, *, quiet: bool = False, allow_pickle: bool = False, trust_remote_code: bool = False
) -> Path:
    """The fp32 ONNX export of ``model`` under ``$SURGERY_CACHE/onnx``, exported and validated on first use.

    Returns:
        The ONNX directory.

    Raises:
        The errors of :func:`export_onnx`.
    """
    import sys

    source = open_source(model, allow_pickle=allow_pickle, quiet=quiet)
    source.fetch(source.pending_files)
    digest = hashlib.sha256()
    for file in sorted(source.path.iterdir()):
        if file.is_file():
            stat = file.stat()
            digest.update(f"{file.name}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    digest.update(str(source.path.resolve()).encode())
    target = cache_root() / "onnx" / f"{source.path.name}-{digest.hexdigest()[:16]}"
    if (target / ONNX_FILENAME).exists():
        return target
    if not quiet:
        sys.stderr.write(f"exporting {source.name} to ONNX once (cached in {target})...\n")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        export_source(source, target, trust_remote_code=trust_remote_code)
    except OutputExistsError:  # another process exported it first
        if not (target / ONNX_FILENAME).exists():
            raise
    return target
