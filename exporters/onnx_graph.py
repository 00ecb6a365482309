"""Trace a model into an ONNX graph with its KV cache, and save it (``model.onnx``, ``model.onnx_data``).

Decoders become one graph that serves the first step (past length 0) and every later step, with the names
the ecosystem's loaders expect::

    input_ids [batch, sequence]            logits [batch, sequence, vocab]
    attention_mask [batch, total_sequence] present.{i}.key / .value [batch, heads, past + sequence, head_dim]
    position_ids [batch, sequence]
    past_key_values.{i}.key / .value [batch, heads, past_sequence, head_dim]

With ``--share-buffer``, a past longer than ``attention_mask.shape[1] - input_ids.shape[1]`` is a buffer
(onnxruntime-genai's ``past_present_share_buffer``): the new keys are written into it and the present is the
buffer itself (:func:`_share_buffer_ready`).

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
import logging
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from exporters.onnx_fusion import FusionReport, fuse_decoder, register_constant, rotary_cache
from exporters.onnx_model import _Loaded, left_padded_positions
from exporters.onnx_session import ROTARY_AT_CACHE_SLOTS
from surgery.compat import output_cache, with_cache
from surgery.errors import OnnxExportError

if TYPE_CHECKING:
    import torch

DEFAULT_OPSET = 18
MIN_OPSET = 18  # the torch.onnx (dynamo) exporter's lowest opset
EXTERNAL_DATA_FILENAME = "model.onnx_data"
EXTERNAL_DATA_THRESHOLD = 2_000_000_000  # bytes of weights above which they go to EXTERNAL_DATA_FILENAME
_EXPORT_BATCH, _EXPORT_SEQUENCE, _EXPORT_PAST = 2, 3, 4


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


def _export_graph(loaded: _Loaded, path: Path, dtype: str, opset: int, share_buffer: bool = False,
                  fuse: bool = True) -> tuple[list[str], list[str], bool, FusionReport | None]:
    """Trace, lower and save the graph at ``path`` (``share_buffer``: with :func:`_share_buffer_ready`'s rewrite;
    ``fuse``: decoders rewritten into ONNX Runtime's fused operators, :mod:`exporters.onnx_fusion`);
    returns (input names, output names, external data, the fusion report or None when not fused)."""
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
    fusion = None
    if loaded.kind == "decoder" and fuse and dtype == "fp16":
        # Measured: on the CPU the fused kernels' fp16 arithmetic takes repeated SmolLM2's prefill to 0.0062 x
        # max |logit| from PyTorch fp32, past the fp16 bound 0.005 the traced graph meets.
        fusion = FusionReport({}, "fp16 graphs are written as traced (the fused kernels' fp16 error exceeds the "
                                  "fp16 bound on the CPU)")
    elif loaded.kind == "decoder" and fuse:
        try:
            fusion = fuse_decoder(program.model, rotary_cache(loaded.model, loaded.cache[0][1]), dtype)
        except Exception as exc:  # noqa: BLE001 - a rewrite failure is an export failure, not a crash
            raise OnnxExportError(loaded.model_type, "fusing ONNX Runtime operators (--no-fuse skips it)",
                                  _failure_line(exc)) from None
    graph = program.model.graph
    got = [value.name for value in graph.inputs]
    if got != inputs:
        # A Python-constant input (an unused token_type_ids, a dim the tracer fixed) would shift every name.
        raise OnnxExportError(loaded.model_type, "naming", f"the graph's inputs are {got[:4]}..., expected {inputs[:4]}...")
    if loaded.kind == "decoder":
        _rename_dim(graph.inputs[1], 1, "total_sequence_length")
        if share_buffer and not _share_buffer_ready(graph):
            raise OnnxExportError(loaded.model_type, "rewriting the cache for the share buffer",
                                  "a present output is not the concatenation of its past and the new keys")
        program.model.metadata_props["surgery.share_buffer"] = str(share_buffer).lower()
        # Read by the runner: such a graph takes several new tokens after a past only for one sequence.
        program.model.metadata_props["surgery.rotary"] = ROTARY_AT_CACHE_SLOTS if fusion and fusion.rotary_inside \
            else "position_ids"
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
    return inputs, outputs, external, fusion


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


def _share_buffer_ready(graph: Any) -> bool:
    """Let each present output reuse its past input's buffer (onnxruntime-genai's ``past_present_share_buffer``).

    The traced graph computes ``present = Concat(past, new)``: one step longer than its past. With the share
    buffer, onnxruntime-genai binds one ``[batch, heads, max_length, head_dim]`` tensor as both past and
    present, holding the valid past in its first ``past_length`` positions, where
    ``past_length = attention_mask.shape[1] - input_ids.shape[1]``. The rewrite, per past/present pair::

        full    = Concat(Slice(past, 0, past_length), new)     # what attention reads, as before
        present = Concat(full, Slice(past, total_length, end))  # the keys in place, the buffer's tail kept

    Everything else that read the past (its length, for the mask and positions) reads the valid part.
    With a past exactly ``past_length`` long (surgery's runner, ``transformers``-style loaders, genai without
    the share buffer) both slices are the identity and the empty tail: the same present as before. With a
    buffer, the present is the buffer's length, its first ``total_length`` positions the new cache.

    A present written by ONNX Runtime's ``GroupQueryAttention`` (the fused graph, :mod:`exporters.onnx_fusion`)
    needs no rewrite: the kernel appends in place when its past and present share a buffer, and reads only the
    first ``seqlens_k + 1`` positions. Only the other readers of that past (its length) are given the valid part.

    Returns:
        Whether the graph was rewritten: False, and the graph untouched, when a present output is neither
        ``Concat(past, new)`` on the sequence axis nor a ``GroupQueryAttention`` present of a graph input.
    """
    import onnx_ir

    inputs = {value.name: value for value in graph.inputs}
    concats = []
    kernels = []  # (present, past) pairs a GroupQueryAttention appends to itself
    for present in graph.outputs[1:]:
        producer = present.producer()
        if (producer is not None and producer.op_type == "GroupQueryAttention" and producer.domain == "com.microsoft"
                and present.index() in (1, 2)):
            past = producer.inputs[present.index() + 2]
            if past is None or not past.is_graph_input():
                return False
            kernels.append((present, past))
            continue
        concat = producer
        axis_attr = concat.attributes.get("axis") if concat is not None else None
        if (concat is None or concat.op_type != "Concat" or len(concat.inputs) != 2 or concat.inputs[0] is None
                or not concat.inputs[0].is_graph_input() or axis_attr is None or axis_attr.as_int() not in (2, -2)):
            return False
        concats.append((present, concat))

    # The pasts something besides their kernel reads (its length, for the mask): each gets a view of its valid part.
    viewed = [(present, past, [(user, index) for user, index in past.uses() if user is not present.producer()])
              for present, past in kernels]
    viewed = [entry for entry in viewed if entry[2]]
    added: list[Any] = []
    if concats or viewed:
        def constant(name: str, values: list[int]) -> Any:
            return register_constant(graph, name, np.array(values, dtype=np.int64))

        zero, axis = constant("share_zero", [0]), constant("share_axis", [2])
        total = onnx_ir.node("Shape", [inputs["attention_mask"]], {"start": 1, "end": 2}, name="share_total_length")
        sequence = onnx_ir.node("Shape", [inputs["input_ids"]], {"start": 1, "end": 2}, name="share_sequence_length")
        past_length = onnx_ir.node("Sub", [total.outputs[0], sequence.outputs[0]], name="share_past_length")
        added += [total, sequence, past_length]
        end = constant("share_end", [2**63 - 1]) if concats else None

        def past_view(present: Any, past: Any) -> Any:
            return onnx_ir.node("Slice", [past, zero, past_length.outputs[0], axis], name=f"{present.name}.past_view")

        for present, concat in concats:
            past, new = concat.inputs
            view = past_view(present, past)
            full = onnx_ir.node("Concat", [view.outputs[0], new], {"axis": -2}, name=f"{present.name}.full")
            tail = onnx_ir.node("Slice", [past, total.outputs[0], end, axis], name=f"{present.name}.buffer_tail")
            for user, index in list(present.uses()):  # attention reads the full cache; the output stays
                user.replace_input_with(index, full.outputs[0])
            concat.replace_input_with(0, full.outputs[0])
            concat.replace_input_with(1, tail.outputs[0])
            for user, index in list(past.uses()):  # e.g. the past length read from its shape: the valid part's
                if user is not view and user is not tail:
                    user.replace_input_with(index, view.outputs[0])
            added += [view, full, tail]
        # Only these pasts: a view nobody reads would still be computed, a copy of the buffer every step.
        for present, past, readers in viewed:
            view = past_view(present, past)
            for user, index in readers:
                user.replace_input_with(index, view.outputs[0])
            added.append(view)
    for present in graph.outputs[1:]:  # every present, either kind: the buffer's length, or past + sequence without one
        _rename_dim(present, 2, "present_sequence_length")
    graph.extend(added)
    graph.sort()
    return True


def _rename_dim(value: Any, axis: int, name: str) -> None:
    import onnx_ir

    if value.shape is None or isinstance(value.shape[axis], int):
        return
    dims = list(value.shape)
    dims[axis] = onnx_ir.SymbolicDim(name)
    value.shape = onnx_ir.Shape(dims)

