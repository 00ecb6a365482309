"""Export a model to ONNX with its KV cache, and validate the graph against PyTorch in ONNX Runtime.

Decoders become one graph that serves the first step (past length 0) and every later step, with the names
the ecosystem's loaders expect::

    input_ids [batch, sequence]            logits [batch, sequence, vocab]
    attention_mask [batch, total_sequence] present.{i}.key / .value [batch, heads, past + sequence, head_dim]
    position_ids [batch, sequence]
    past_key_values.{i}.key / .value [batch, heads, past_sequence, head_dim]

Encoders (BERT and its kin) map ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the model
has them) to ``last_hidden_state``.

How: the Hugging Face model is wrapped in a module whose forward takes the flat past tensors, builds a
``DynamicCache`` from them, runs the model with ``use_cache=True`` and returns the logits and the flat
present tensors; ``torch.onnx.export(dynamo=True)`` traces that with sample shapes of at least 2 on every
dynamic axis and a left-padded attention mask, so no axis is frozen.

Sliding-window layers (Gemma 2/3, Mistral-style windows, Qwen ``layer_types``): every layer of the graph
keeps its whole past, and the model's own sliding-window mask hides what lies outside the window. That is
exactly what ``transformers`` computes with its trimmed sliding cache (validation checks it against
``transformers`` itself, whose cache is the trimmed one), at the cost of a past that grows past the window.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from exporters.onnx_runtime import ONNX_FILENAME, OnnxCausalLM, create_session
from exporters.staging import check_output, staged_output
from surgery.architecture import load_config
from surgery.checkpoint import has_tokenizer, read_json_object
from surgery.compat import output_cache, with_cache
from surgery.errors import (
    CheckpointError,
    CudaUnavailableError,
    OnnxExportError,
    OnnxOpsetError,
    OnnxValidationError,
    OptionError,
    OutputExistsError,
    SurgeryError,
    UnsupportedArchitectureError,
)
from surgery.source import Source, cache_root, open_source

if TYPE_CHECKING:
    import torch

PathLike = str | os.PathLike[str]

DTYPES = ("fp32", "fp16")
DEFAULT_OPSET = 18
MIN_OPSET = 18  # the torch.onnx (dynamo) exporter's lowest opset
EXTERNAL_DATA_FILENAME = "model.onnx_data"
EXTERNAL_DATA_THRESHOLD = 2_000_000_000  # bytes of weights above which they go to EXTERNAL_DATA_FILENAME
REPORT_FILENAME = "onnx-export.json"
# The bound, one rule for both dtypes: max |ONNX Runtime - PyTorch fp32| <= tolerance x max(1, max |logit|),
# the largest |logit| (|value| for encoders) of PyTorch over the compared positions. fp32 rounding grows with
# the size of the activations, so the bound scales with the logits.
# fp32: 2e-5 (~170 fp32 epsilons). Measured (benchmarks/onnx_parity.py), worst of all checks: PyTorch fp32 is
# itself off its float64 run by up to 3.1e-6 of max |logit|, ONNX Runtime off PyTorch fp32 by up to 3.9e-6
# (both SmolLM2-135M --drop 10-20: 9.1e-5 and 1.16e-4 at |logit| 29.4), so the margin is ~5x; a graph with
# one middle-layer norm weight off by 0.1% exceeds the bound 7-290x (tiny Llama, MiniLM, SmolLM2).
FP32_RELATIVE_TOLERANCE = 2e-5
# fp16 graph vs the fp32 PyTorch model. Measured (CPU): SmolLM2-135M 1.1e-3, pruned+repeated fp16 SmolLM2
# 0.75e-3, Gemma 3 270M 0.9e-3, tiny random Llama 1.1e-3; the bound leaves a margin of ~4.5x.
FP16_RELATIVE_TOLERANCE = 5e-3
GREEDY_TOKENS = 16
_EXPORT_BATCH, _EXPORT_SEQUENCE, _EXPORT_PAST = 2, 3, 4


# --------------------------------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Check:
    """One validation check.

    Attributes:
        name: what was compared.
        passed: whether it met its bound.
        max_abs_diff: largest |ONNX Runtime - PyTorch| (None for token comparisons).
        tolerance: the bound on ``max_abs_diff``: the relative tolerance x max(1, ``scale``).
        detail: a short note (scale and margin, mismatching token).
        scale: the largest |logit| (|value| for encoders) of PyTorch over the compared positions.
    """

    name: str
    passed: bool
    max_abs_diff: float | None = None
    tolerance: float | None = None
    detail: str = ""
    scale: float | None = None

    @property
    def relative(self) -> float | None:
        """``max_abs_diff`` as a fraction of max(1, ``scale``): what the relative tolerance bounds."""
        if self.max_abs_diff is None or self.scale is None:
            return None
        return self.max_abs_diff / max(self.scale, 1.0)

    @property
    def margin(self) -> float | None:
        """``tolerance / max_abs_diff``: how many times the difference fits in the bound (above 1 passes)."""
        if self.max_abs_diff is None or self.tolerance is None:
            return None
        return self.tolerance / self.max_abs_diff if self.max_abs_diff > 0 else float("inf")

    def format(self) -> str:
        status = "ok  " if self.passed else "FAIL"
        numbers = f" max |diff| {self.max_abs_diff:.3g} <= {self.tolerance:.3g}" if self.max_abs_diff is not None and self.tolerance is not None else ""
        if self.max_abs_diff is not None and self.tolerance is not None and not self.passed:
            numbers = numbers.replace("<=", ">")
        return f"  {status} {self.name}:{numbers}{' ' + self.detail if self.detail else ''}"

    def to_dict(self) -> dict[str, Any]:
        margin = self.margin
        return {**asdict(self), "relative": self.relative,
                "margin": round(margin, 2) if margin is not None and margin != float("inf") else None}


@dataclass(frozen=True)
class OnnxValidationReport:
    """ONNX Runtime against PyTorch, and which execution provider actually ran.

    Attributes:
        provider: the ONNX Runtime execution provider of the session (what really ran).
        dtype: ``fp32`` or ``fp16``.
        checks: every check, in order.
        seconds: how long validation took.
    """

    provider: str
    dtype: str
    checks: tuple[Check, ...]
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return all(check.passed for check in self.checks)

    @property
    def rule(self) -> str:
        """The bound every numeric check is held to, in one line."""
        return (f"max |ONNX Runtime - PyTorch fp32| <= {relative_tolerance(self.dtype):g} x max(1, max |PyTorch logit|) "
                "over the compared positions")

    def format(self) -> str:
        """The report as ``surgery export-onnx`` prints it."""
        verdict = "passed" if self.passed else "FAILED"
        lines = [f"validation {verdict} on {self.provider} ({self.dtype}, {self.seconds:.1f} s; "
                 f"bound {relative_tolerance(self.dtype):g} x max(1, max |logit|)):"]
        lines.extend(check.format() for check in self.checks)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"provider": self.provider, "dtype": self.dtype, "passed": self.passed, "seconds": round(self.seconds, 2),
                "rule": self.rule, "relative_tolerance": relative_tolerance(self.dtype),
                "checks": [check.to_dict() for check in self.checks]}


def relative_tolerance(dtype: str) -> float:
    """The bound on max |ONNX Runtime - PyTorch fp32| as a fraction of max(1, max |logit|), for a graph dtype."""
    return FP32_RELATIVE_TOLERANCE if dtype == "fp32" else FP16_RELATIVE_TOLERANCE


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
        lines.append(self.validation.format() if self.validation else "validation skipped (--no-validate)")
        lines.append(f"wrote {self.out}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out), "kind": self.kind, "dtype": self.dtype, "opset": self.opset,
            "num_layers": self.num_layers, "inputs": self.inputs, "outputs": self.outputs,
            "files": [{"file": n, "bytes": b} for n, b in self.files], "external_data": self.external_data,
            "export_seconds": round(self.export_seconds, 2),
            "validation": self.validation.to_dict() if self.validation else None,
        }


# --------------------------------------------------------------------------------------------------- loading


@dataclass
class _Loaded:
    model: Any  # the transformers model, fp32, eval mode
    kind: str
    model_type: str
    cache: list[tuple[int, int]] = field(default_factory=list)  # (heads, head_dim) per cache layer
    token_type_ids: bool = False


def _classify(config: Any) -> str:
    """``decoder`` or ``encoder`` from the config's architecture, or UnsupportedArchitectureError."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
        MODEL_MAPPING_NAMES,
    )

    model_type = str(getattr(config, "model_type", "?"))
    names = list(getattr(config, "architectures", None) or [])
    causal = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    base = set(MODEL_MAPPING_NAMES.values())
    if names and names[0] in causal:
        return "decoder"
    if "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}):  # code shipped in the model (wide blocks)
        return "decoder"
    if names and names[0] in base and model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not getattr(config, "is_decoder", False):
        return "encoder"
    if not names and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and model_type not in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        return "decoder"
    raise UnsupportedArchitectureError(
        model_type, f"ONNX export covers causal language models and base encoders, not {names[0] if names else 'this model'}",
    )


def _load(path: Path, trust_remote_code: bool) -> _Loaded:
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # loading is not what the user asked to watch
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = load_config(path, trust_remote_code=trust_remote_code)  # checked, then transformers' own
            kind = _classify(config)
            auto = transformers.AutoModelForCausalLM if kind == "decoder" else transformers.AutoModel
            model = auto.from_pretrained(str(path), dtype=torch.float32, trust_remote_code=trust_remote_code).eval()
    except SurgeryError:
        raise
    except ValueError as exc:
        if "trust_remote_code" in str(exc):  # a model whose code ships with it
            raise UnsupportedArchitectureError(
                str(read_json_object(path / "config.json", "config").get("model_type", "?")),
                "its modelling code ships in the model directory", hint="pass --trust-remote-code to run it",
            ) from None
        raise CheckpointError(str(path), f"cannot be loaded by transformers ({str(exc).splitlines()[0] if str(exc) else 'ValueError'})") from exc
    except Exception as exc:  # transformers raises many kinds on a malformed checkpoint; --debug shows the chain
        first = (str(exc).splitlines() or [""])[0]
        raise CheckpointError(str(path), f"cannot be loaded by transformers ({type(exc).__name__}: {first})") from exc
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    model_type = str(getattr(config, "model_type", "?"))
    loaded = _Loaded(model=model, kind=kind, model_type=model_type)
    if kind == "encoder":
        import inspect

        loaded.token_type_ids = "token_type_ids" in inspect.signature(model.forward).parameters and getattr(
            config, "type_vocab_size", 0) > 0
        return loaded
    from transformers.cache_utils import Cache

    with torch.no_grad():
        probe = model(input_ids=torch.zeros((1, 2), dtype=torch.long), use_cache=True)
    cache = output_cache(probe)
    layers = getattr(cache, "layers", None) if isinstance(cache, Cache) else None
    if not layers or any(getattr(layer, "keys", None) is None or layer.keys.dim() != 4 for layer in layers):
        raise UnsupportedArchitectureError(
            model_type, "its cache is not one key/value pair per layer, which the ONNX decoder graph needs",
        )
    loaded.cache = [(int(layer.keys.shape[1]), int(layer.keys.shape[3])) for layer in layers]
    if any(layer.values.shape[1] != h for layer, (h, _) in zip(layers, loaded.cache, strict=True)):
        raise UnsupportedArchitectureError(model_type, "its keys and values differ in head count")
    return loaded


# --------------------------------------------------------------------------------------------------- wrappers


def _cache_layer_class() -> type:
    from transformers.cache_utils import DynamicLayer

    class FullPastLayer(DynamicLayer):
        """A full-attention cache layer whose length is its tensor's length (no data-dependent branch)."""

        def get_seq_length(self) -> Any:  # a SymInt while tracing: int() would freeze the past axis
            assert self.keys is not None
            return self.keys.shape[-2]

    return FullPastLayer


def _build_cache(past: tuple[torch.Tensor, ...]) -> Any:
    """A DynamicCache of full (untrimmed) layers holding ``past`` (key, value, key, value, ...)."""
    from transformers import DynamicCache

    layer_class = _cache_layer_class()
    cache = DynamicCache()
    layers = []
    for key, value in zip(past[0::2], past[1::2], strict=True):
        layer = layer_class()
        layer.lazy_initialization(key, value)
        layer.keys, layer.values = key, value
        layers.append(layer)
    cache.layers = layers
    return cache


def _decoder_wrapper(model: Any) -> torch.nn.Module:
    import torch

    class DecoderWithPast(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                    past_key_values: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
            out = self.model(**with_cache(self.model, _build_cache(past_key_values), input_ids=input_ids,
                                          attention_mask=attention_mask, position_ids=position_ids, use_cache=True))
            present: list[torch.Tensor] = []
            for layer in output_cache(out).layers:
                present.extend((layer.keys, layer.values))
            return out.logits, tuple(present)

    return DecoderWithPast().eval()


def _encoder_wrapper(model: Any, token_type_ids: bool) -> torch.nn.Module:
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    class EncoderWithTokenTypes(Encoder):
        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,  # type: ignore[override]
                    token_type_ids: torch.Tensor) -> torch.Tensor:
            return self.model(input_ids=input_ids, attention_mask=attention_mask,
                              token_type_ids=token_type_ids).last_hidden_state

    return (EncoderWithTokenTypes if token_type_ids else Encoder)().eval()


def left_padded_positions(mask: np.ndarray) -> np.ndarray:
    """Position ids for a (left-)padded mask, as ``transformers`` computes them: cumsum - 1, 1 at padding."""
    positions = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, positions).astype(np.int64)


# --------------------------------------------------------------------------------------------------- export


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """torch.onnx logs progress and torchvision notices; keep the CLI's output to what it reports."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "torch.fx", "onnxscript")]
    levels = [logger.level for logger in loggers]
    try:
        for logger in loggers:
            logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(open(os.devnull, "w")) as sink:  # noqa: SIM115
            warnings.simplefilter("ignore")
            try:
                yield
            finally:
                sink.close()
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


def _failure_line(exc: BaseException) -> str:
    """The informative line of a torch.onnx failure (its 'Exception summary'), else the first line."""
    text = str(exc)
    marker = "## Exception summary"
    if marker in text:
        for line in text.split(marker, 1)[1].splitlines():
            if line.strip():
                return " ".join(line.split())[:400]
    first = next((line for line in text.splitlines() if line.strip()), type(exc).__name__)
    return " ".join(first.split())[:400]


def _export_graph(loaded: _Loaded, path: Path, dtype: str, opset: int) -> tuple[list[str], list[str], bool]:
    """Trace, lower and save the graph at ``path``; returns (input names, output names, external data)."""
    import torch

    torch_dtype = torch.float16 if dtype == "fp16" else torch.float32
    model = loaded.model if dtype == "fp32" else copy.deepcopy(loaded.model).to(torch_dtype)
    dim = torch.export.Dim
    batch, sequence = dim("batch_size"), dim("sequence_length")
    generator = torch.Generator().manual_seed(0)
    vocab = int(model.config.get_text_config().vocab_size) if loaded.kind == "decoder" else int(model.config.vocab_size)
    if loaded.kind == "decoder":
        b, s, p = _EXPORT_BATCH, _EXPORT_SEQUENCE, _EXPORT_PAST
        past_dim = dim("past_sequence_length")
        ids = torch.randint(0, vocab, (b, s), generator=generator)
        mask_np = np.ones((b, p + s), dtype=np.int64)
        mask_np[0, :2] = 0  # left padding: the mask is data, not a constant
        mask = torch.from_numpy(mask_np)
        positions = torch.from_numpy(left_padded_positions(mask_np)[:, p:].copy())
        past = tuple(torch.randn((b, heads, p, head_dim), generator=generator).to(torch_dtype)
                     for heads, head_dim in loaded.cache for _ in ("key", "value"))
        module = _decoder_wrapper(model)
        args: tuple[Any, ...] = (ids, mask, positions, past)
        dynamic: tuple[Any, ...] = ({0: batch, 1: sequence}, {0: batch, 1: dim.AUTO}, {0: batch, 1: sequence},
                                    tuple({0: batch, 2: past_dim} for _ in past))
        n = len(loaded.cache)
        inputs = ["input_ids", "attention_mask", "position_ids",
                  *(f"past_key_values.{i}.{k}" for i in range(n) for k in ("key", "value"))]
        outputs = ["logits", *(f"present.{i}.{k}" for i in range(n) for k in ("key", "value"))]
    else:
        b, s = 2, 5
        ids = torch.randint(0, vocab, (b, s), generator=generator)
        mask = torch.ones((b, s), dtype=torch.long)
        mask[1, -2:] = 0
        module = _encoder_wrapper(model, loaded.token_type_ids)
        args = (ids, mask) + ((torch.zeros((b, s), dtype=torch.long),) if loaded.token_type_ids else ())
        dynamic = tuple({0: batch, 1: sequence} for _ in args)
        inputs = ["input_ids", "attention_mask"] + (["token_type_ids"] if loaded.token_type_ids else [])
        outputs = ["last_hidden_state"]
    try:
        with _quiet_exporter(), torch.no_grad():
            program = torch.onnx.export(module, args, dynamo=True, dynamic_shapes=dynamic, input_names=inputs,
                                        output_names=outputs, opset_version=opset, optimize=False, verbose=False)
    except Exception as exc:  # noqa: BLE001 - any tracing or lowering failure means: this model cannot be exported
        raise OnnxExportError(loaded.model_type, "tracing", _failure_line(exc)) from None
    if program is None:
        raise OnnxExportError(loaded.model_type, "tracing", "torch.onnx.export returned no program")
    try:
        _optimize(program.model)
    except Exception as exc:  # noqa: BLE001 - an optimizer failure is an export failure, not a crash
        raise OnnxExportError(loaded.model_type, "optimizing", _failure_line(exc)) from None
    graph = program.model.graph
    got = [value.name for value in graph.inputs]
    if got != inputs:
        # A Python-constant input (an unused token_type_ids, a dim the tracer fixed) would shift every name.
        raise OnnxExportError(loaded.model_type, "naming", f"the graph's inputs are {got[:4]}..., expected {inputs[:4]}...")
    if loaded.kind == "decoder":
        _rename_dim(graph.inputs[1], 1, "total_sequence_length")
    program.model.metadata_props.update({"surgery.kind": loaded.kind, "surgery.dtype": dtype,
                                         "surgery.model_type": loaded.model_type})
    weight_bytes = sum(int(v.const_value.nbytes) for v in graph.initializers.values() if v.const_value is not None)
    external = weight_bytes > EXTERNAL_DATA_THRESHOLD
    import onnx_ir

    try:
        if external:
            onnx_ir.save(program.model, str(path), external_data=EXTERNAL_DATA_FILENAME)
        else:
            onnx_ir.save(program.model, str(path))
    except (ValueError, OSError) as exc:
        raise OnnxExportError(loaded.model_type, "saving", _failure_line(exc)) from None
    return inputs, outputs, external


def _optimize(model: Any) -> None:
    """Constant folding, inlining, deduplication and dead-code removal, in place.

    This is onnxscript's optimizer without its pattern-rewrite rules: on a 30-layer model the rules take
    ~40 s of a ~100 s export and change nothing ONNX Runtime's own session optimizer does not already do
    (measured: same node count within 6%, same decode speed).

    Tried on SmolLM2-135M and not done: merging the MatMuls that share an input (q/k/v, gate/up: 211 ->
    121 weight MatMuls plus 60 Splits; bit-identical logits) reads the same 538 MB no faster in ONNX
    Runtime (the weight MatMuls alone: 18.1 vs 18.2 ms, interleaved best of 30) and left decode within
    noise; onnxscript's RMSNorm fusions push the pruned model's left-padded logits past 1e-4 of float64
    (measured under the earlier absolute bound).
    (The runner's per-step cost is small too: binding the ~125 inputs and outputs of a 30-layer step takes
    ~0.3 ms of a ~22 ms step; ``run_with_ort_values`` would take ~0.03 ms, within the decode noise.)
    """
    import onnx_ir
    import onnx_ir.passes.common as common
    from onnxscript.optimizer import _constant_folding

    fold = _constant_folding.FoldConstantsPass(
        shape_inference=True,
        input_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_INPUT_SIZE_LIMIT,
        output_size_limit=_constant_folding.DEFAULT_CONSTANT_FOLD_OUTPUT_SIZE_LIMIT,
    )
    onnx_ir.passes.Sequential(
        common.InlinePass(),
        onnx_ir.passes.PassManager([fold, common.RemoveUnusedNodesPass()], steps=2, early_stop=True),
        common.RemoveUnusedFunctionsPass(),
        common.RemoveUnusedOpsetsPass(),
        common.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0),
        common.DeduplicateInitializersPass(),
        common.CommonSubexpressionEliminationPass(),
        common.RemoveUnusedNodesPass(),
        common.OutputFixPass(),
        common.NameFixPass(),
    )(model)


def _rename_dim(value: Any, axis: int, name: str) -> None:
    import onnx_ir

    if value.shape is None or isinstance(value.shape[axis], int):
        return
    dims = list(value.shape)
    dims[axis] = onnx_ir.SymbolicDim(name)
    value.shape = onnx_ir.Shape(dims)


def _check_options(dtype: str, opset: int, device: str) -> None:
    """Everything about the options that can fail, checked before any work is done."""
    from exporters.onnx_runtime import DEVICES, cuda_problem

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
) -> OnnxExportResult:
    """Export a model to an ONNX directory: the graph (KV cache for decoders), config, generation config and
    tokenizer; then validate it in ONNX Runtime against PyTorch.

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

    Returns:
        The :class:`OnnxExportResult`, with the validation report.

    Raises:
        OutputExistsError: ``out`` exists and ``force`` is False.
        OptionError: an unknown dtype, or ``out`` inside the source model.
        OnnxOpsetError: an opset below 18 or newer than the installed ``onnx`` knows.
        UnsupportedArchitectureError: neither a causal LM nor a base encoder, or a cache without per-layer keys/values.
        OnnxExportError: the model cannot be traced or lowered to ONNX.
        OnnxValidationError: ONNX Runtime disagrees with PyTorch beyond the stated bounds.
        CudaUnavailableError: ``device="cuda"`` but ONNX Runtime cannot use CUDA.

    Example:
        >>> import surgery
        >>> result = surgery.export_onnx("out/smol-19", "out/smol-19-onnx")  # doctest: +SKIP
        >>> result.validation.provider  # doctest: +SKIP
        'CPUExecutionProvider'
    """
    _check_options(dtype, opset, device)
    out = Path(out)
    source = open_source(model, allow_pickle=allow_pickle, quiet=quiet)
    check_output(out, force=force, protected=source.protected_paths())
    return export_source(source, out, dtype=dtype, opset=opset, validate=validate, device=device, force=force,
                         trust_remote_code=trust_remote_code)


def export_source(
    source: Source, out: Path, *, dtype: str = "fp32", opset: int = DEFAULT_OPSET, validate: bool = True,
    device: str = "cpu", force: bool = False, trust_remote_code: bool = False,
) -> OnnxExportResult:
    """:func:`export_onnx` on an opened source, with no check that ``out`` lies outside it (``--onnx``
    writes into ``OUT/onnx`` of the checkpoint it just wrote).

    Raises:
        The errors of :func:`export_onnx`.
    """
    _check_options(dtype, opset, device)
    check_output(out, force=force)
    source.fetch(source.pending_files)
    loaded = _load(source.path, trust_remote_code)
    with staged_output(out, force=force) as staging:
        started = time.perf_counter()
        inputs, outputs, external = _export_graph(loaded, staging / ONNX_FILENAME, dtype, opset)
        export_seconds = time.perf_counter() - started
        _copy_beside(source, loaded, staging)  # before validation, which reads the tokenizer
        report = None
        if validate:
            report = validate_against(loaded, staging, dtype=dtype, device=device)
            if not report.passed:
                failed = next(check for check in report.checks if not check.passed)
                raise OnnxValidationError(failed.name, failed.max_abs_diff, failed.tolerance, report.provider, failed.detail)
        files = sorted((p.name, p.stat().st_size) for p in staging.iterdir() if p.is_file())
        result = OnnxExportResult(
            out=out, kind=loaded.kind, dtype=dtype, opset=opset, num_layers=len(loaded.cache) or _hidden_layers(loaded),
            inputs=inputs, outputs=outputs, files=files, external_data=external, validation=report,
            export_seconds=export_seconds,
        )
        body = {**result.to_dict(), "source": source.name, "versions": _versions()}
        body.pop("out")
        (staging / REPORT_FILENAME).write_text(json.dumps(body, indent=2) + "\n")
        files.append((REPORT_FILENAME, (staging / REPORT_FILENAME).stat().st_size))
    return result


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


# --------------------------------------------------------------------------------------------------- validation


def _prompts(directory: Path, vocab: int) -> list[list[int]]:
    """Two prompts of different lengths: real text when a tokenizer is there, else fixed random ids."""
    with contextlib.suppress(Exception):
        from transformers import AutoTokenizer

        if not has_tokenizer(directory):
            raise LookupError("no tokenizer files")  # random ids below (transformers 5.0 would make up an empty one)

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)  # best effort, never code
        texts = ["The history of the printing press begins in the fifteenth century, when",
                 "def fibonacci(n):"]
        ids = [tokenizer(text)["input_ids"] for text in texts]
        if all(len(i) >= 3 and max(i) < vocab for i in ids):
            return ids
    rng = np.random.default_rng(0)
    return [rng.integers(0, vocab, 11).tolist(), rng.integers(0, vocab, 6).tolist()]


def _left_pad(prompts: list[list[int]], pad: int) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(p) for p in prompts)
    ids = np.full((len(prompts), width), pad, dtype=np.int64)
    mask = np.zeros((len(prompts), width), dtype=np.int64)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = prompt
        mask[row, width - len(prompt):] = 1
    return ids, mask


def _diff_check(name: str, got: np.ndarray, want: np.ndarray, keep: np.ndarray | None, dtype: str,
                what: str = "logit") -> Check:
    """Largest |got - want| over the kept positions, held to ``relative_tolerance(dtype)`` x max(1, max |want|)."""
    got = got.astype(np.float32)
    if keep is not None:
        got, want = got[keep], want[keep]
    if not np.isfinite(got).all():
        return Check(name, False, float("inf"), None, "(ONNX Runtime produced inf/nan)")
    diff = float(np.abs(got - want).max())
    scale = float(np.abs(want).max())
    rtol = relative_tolerance(dtype)
    tolerance = rtol * max(scale, 1.0)
    check = Check(name, diff <= tolerance, diff, tolerance, scale=scale)
    margin = f"{check.margin:.1f}x margin" if check.passed and diff > 0 else f"relative {check.relative:.2g}"
    return Check(name, check.passed, diff, tolerance, f"({rtol:g} x max |{what}| {scale:.3g}; {margin})", scale)


def validate_against(loaded: _Loaded, directory: Path, *, dtype: str = "fp32", device: str = "cpu") -> OnnxValidationReport:
    """Run the graph in ``directory`` on ONNX Runtime and compare it with the PyTorch model it came from.

    Decoders: logits of a prefill (past length 0), of one decode step fed ONNX Runtime's own present
    cache, of a left-padded batch (prefill and one step, real positions only), and the tokens of a greedy
    generation of 16 tokens against ``transformers`` ``generate``. Encoders: ``last_hidden_state`` of a
    right-padded batch (real positions only).

    Bound, per numeric check: max |ONNX Runtime - PyTorch fp32| <= ``relative_tolerance(dtype)`` x
    max(1, max |PyTorch logit|) over the compared positions (fp32 ``FP32_RELATIVE_TOLERANCE`` 2e-5,
    fp16 ``FP16_RELATIVE_TOLERANCE`` 5e-3).

    Args:
        loaded: the fp32 PyTorch model and its layout (from the export).
        directory: the ONNX directory (``model.onnx`` and the tokenizer).
        dtype: the graph's dtype.
        device: ``cpu`` or ``cuda``.

    Returns:
        The :class:`OnnxValidationReport`; it records the provider that ran.
    """
    import torch

    started = time.perf_counter()
    model = loaded.model
    config = model.config.get_text_config() if loaded.kind == "decoder" else model.config
    vocab = int(config.vocab_size)
    prompts = _prompts(directory, vocab)
    if loaded.kind == "encoder":
        session = create_session(directory / ONNX_FILENAME, device)
        ids, mask = _left_pad(prompts, 0)
        ids, mask = ids[:, ::-1].copy(), mask[:, ::-1].copy()  # encoders: right padding
        feed = {"input_ids": ids, "attention_mask": mask}
        kwargs = {}
        if loaded.token_type_ids:
            feed["token_type_ids"] = np.zeros_like(ids)
            kwargs["token_type_ids"] = torch.zeros(ids.shape, dtype=torch.long)
        got = session.run(["last_hidden_state"], feed)[0]
        with torch.no_grad():
            want = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask), **kwargs).last_hidden_state.numpy()
        check = _diff_check("last_hidden_state, right-padded batch", got, want, mask.astype(bool), dtype, "value")
        return OnnxValidationReport(session.get_providers()[0], dtype, (check,), time.perf_counter() - started)

    lm = OnnxCausalLM.load(directory, device)
    pad = config.pad_token_id if isinstance(getattr(config, "pad_token_id", None), int) else 0
    eos = model.generation_config.eos_token_id if getattr(model, "generation_config", None) is not None else None
    checks: list[Check] = []

    def torch_step(ids: np.ndarray, mask: np.ndarray, positions: np.ndarray, cache: Any) -> tuple[np.ndarray, Any]:
        with torch.no_grad():
            out = model(**with_cache(model, cache, input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                     position_ids=torch.from_numpy(positions), use_cache=True))
        return out.logits.float().numpy(), output_cache(out)

    # 1. prefill, past length 0, one sequence
    ids = np.array([prompts[0]], dtype=np.int64)
    mask = np.ones_like(ids)
    positions = left_padded_positions(mask)
    got, present = lm.forward(ids, mask, positions, lm.empty_cache(1))
    want, cache = torch_step(ids, mask, positions, None)
    checks.append(_diff_check(f"prefill logits ({ids.shape[1]} tokens, past 0)", got, want, None, dtype))
    # 2. one decode step: ONNX Runtime fed its own present, PyTorch its own cache
    step = want[:, -1].argmax(-1)[:, None].astype(np.int64)
    mask = np.ones((1, ids.shape[1] + 1), dtype=np.int64)
    full_positions = left_padded_positions(mask)
    got, _ = lm.forward(step, mask, full_positions[:, -1:], present)
    want, _ = torch_step(step, mask, full_positions[:, -1:], cache)
    checks.append(_diff_check(f"decode step logits (past {ids.shape[1]})", got, want, None, dtype))
    # 3. a left-padded batch: prefill and one step, real positions only
    ids, mask = _left_pad(prompts, pad)
    positions = left_padded_positions(mask)
    got, present = lm.forward(ids, mask, positions, lm.empty_cache(len(prompts)))
    want, cache = torch_step(ids, mask, positions, None)
    checks.append(_diff_check("left-padded batch prefill logits (real positions)", got, want, mask.astype(bool), dtype))
    step = want[:, -1].argmax(-1)[:, None].astype(np.int64)
    mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=np.int64)], axis=1)
    full_positions = np.concatenate([positions, positions[:, -1:] + 1], axis=1)
    got, _ = lm.forward(step, mask, full_positions[:, -1:], present)
    want, _ = torch_step(step, mask, full_positions[:, -1:], cache)
    checks.append(_diff_check("left-padded batch decode step logits", got, want, None, dtype))
    # 4. greedy generation of 16 tokens against transformers
    checks.append(_greedy_check(lm, model, prompts, pad, eos, dtype))
    return OnnxValidationReport(lm.provider, dtype, tuple(checks), time.perf_counter() - started)


def _greedy_check(lm: OnnxCausalLM, model: Any, prompts: list[list[int]], pad: int, eos: Any, dtype: str) -> Check:
    """Greedy tokens of ONNX Runtime against ``transformers`` ``generate``, row by row.

    The tokens must be equal, except that a row may part where PyTorch's own logits of the two
    tokens chosen lie within the logit bound (``relative_tolerance(dtype)`` x max(1, max |logit|)):
    a near-tie that any two correct implementations may break differently (it happens in fp16).
    Past such a point the row is not compared: the sequences are no longer the same input.
    """
    import torch
    from transformers import GenerationConfig

    ids, mask = _left_pad(prompts, pad)
    ours = lm.greedy(ids, mask, max_new_tokens=GREEDY_TOKENS, eos_token_id=eos, pad_token_id=pad).tokens
    settings = GenerationConfig(do_sample=False, max_new_tokens=GREEDY_TOKENS, eos_token_id=eos, pad_token_id=pad)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = model.generate(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask),
                                generation_config=settings)[:, ids.shape[1]:].numpy()
    name = f"greedy {GREEDY_TOKENS} tokens with cache, left-padded batch of {len(prompts)}, vs transformers generate"
    if ours.shape == theirs.shape and (ours == theirs).all():
        return Check(name, True, detail=f"({ours.shape[1]} tokens per row equal)")
    width = min(ours.shape[1], theirs.shape[1])
    if ours.shape[1] != theirs.shape[1] and (ours[:, :width] == theirs[:, :width]).all():
        return Check(name, False, detail=f"(lengths {ours.shape[1]} vs {theirs.shape[1]})")
    ties = []
    for row in range(len(prompts)):
        parted = np.nonzero(ours[row, :width] != theirs[row, :width])[0]
        if not len(parted):
            continue
        col = int(parted[0])
        mine, reference = int(ours[row, col]), int(theirs[row, col])
        context = torch.tensor([prompts[row] + [int(t) for t in theirs[row, :col]]])
        with torch.no_grad():
            logits = model(input_ids=context, use_cache=False).logits[0, -1].float()
        gap = float(logits[reference] - logits[mine])
        bound = relative_tolerance(dtype) * max(1.0, float(logits.abs().max()))
        where = f"row {row} token {col}: {mine} vs {reference}"
        if gap > bound:
            return Check(name, False, detail=f"(first difference at {where}; PyTorch prefers {reference} by {gap:.3g} "
                                             f"> bound {bound:.3g})")
        ties.append(f"{where}, a near-tie: logits {gap:.3g} apart <= bound {bound:.3g}")
    return Check(name, True, detail=f"(equal up to {'; '.join(ties)}; compared up to there)")


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
        CheckpointError, UnsupportedArchitectureError, CudaUnavailableError.

    Example:
        >>> validate_onnx("out/smol-19/onnx", "out/smol-19").passed  # doctest: +SKIP
        True
    """
    source = open_source(model, allow_pickle=allow_pickle)
    source.fetch(source.pending_files)
    loaded = _load(source.path, trust_remote_code)
    directory = Path(onnx_dir)
    meta = directory / REPORT_FILENAME
    dtype = read_json_object(meta, "ONNX export report").get("dtype", "fp32") if meta.exists() else "fp32"
    if dtype not in ("fp32", "fp16"):
        raise CheckpointError(str(meta), f"names dtype {dtype!r}, not fp32 or fp16")
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
