"""Weight-only quantised ONNX exports (``surgery export-onnx --quantize int4``), validated by KL, not parity.

After the float export has been built and validated against PyTorch (:mod:`exporters.onnx_parity`), the graph in
the staging directory is rewritten by ONNX Runtime's own quantizer
(``onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer``, its default configuration: blockwise
round-to-nearest, no calibration data): every ``MatMul`` whose second input is a constant weight becomes a
``com.microsoft`` ``MatMulNBits`` with 4-bit weights and one scale (symmetric) or a scale and a zero point
(asymmetric) per block of ``block_size`` rows of each column. The activations keep the export's dtype (fp32 or
fp16). Attention's own MatMuls (query x key, weights x value) have no constant input and stay as they are.

A quantised graph cannot match PyTorch to the parity bound, so it is measured instead: KL(PyTorch fp32 ||
quantised graph) of the next-token distributions, top-1 agreement and perplexity on windows of the project's
default text (:mod:`surgery.corpus`; RTN sees no data, so every window is held out), and greedy agreement of
continuations decoded with the KV cache, all through :func:`surgery.metrics.compare` with the graph wrapped as a
model. The figures, the sizes on disk and the settings go into ``onnx-export.json`` under ``quantization``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from exporters.onnx_graph import EXTERNAL_DATA_FILENAME, EXTERNAL_DATA_THRESHOLD
from exporters.onnx_model import _Loaded
from exporters.onnx_session import ONNX_FILENAME
from surgery.errors import OnnxValidationError, OptionError

if TYPE_CHECKING:
    import torch

QUANTIZE_METHODS = ("int4",)
DEFAULT_BLOCK_SIZE = 32
# What MatMulNBits accepts: a power of two, at least 16 (ONNX Runtime's kernels; the reference builder offers the same).
BLOCK_SIZES = (16, 32, 64, 128, 256)
# MatMulNBits' accuracy_level 4: the activations are quantised to int8 inside the kernel on the CPU (the fast MLAS
# path, and the reference builder's CPU default); other providers ignore it.
ACCURACY_LEVEL = 4
# The measuring budget: windows of the default text, and greedy prompts cut from them.
SEQ_LEN = 128
MAX_TOKENS = 2048
BATCH_SIZE = 4
PROMPTS = 4
NEW_TOKENS = 32


@dataclass(frozen=True)
class QuantizationReport:
    """What :func:`quantize_export` did and measured.

    Attributes:
        method: ``int4``.
        block_size: rows of a weight column sharing one scale.
        symmetric: int4 with a scale per block (True) or uint4 with a scale and a zero point (False).
        accuracy_level: MatMulNBits' ``accuracy_level`` (4: int8 activations inside the kernel on the CPU).
        lm_head: whether the output projection (the MatMul to the vocabulary) was quantised.
        quantized_matmuls: weight MatMuls rewritten to MatMulNBits.
        kept_matmuls: names of the weight MatMuls left in float (the output projection with ``lm_head=False``).
        float_bytes: ``model.onnx`` (+ external data) before quantisation.
        bytes: the same after.
        measured: whether the KL, top-1 and greedy figures below were measured (not with ``validate=False``).
        kl: mean KL(PyTorch fp32 || quantised graph) of the next-token distributions, nats per token.
        top1: share of positions where both predict the same next token.
        ppl_reference: perplexity of the PyTorch fp32 model on the windows.
        ppl_quantized: perplexity of the quantised graph.
        greedy_agreement: share of identical tokens in greedy continuations (KV cache) of the prompts.
        greedy_prefix: mean share of each continuation before the first differing token.
        tokens: positions scored.
        windows: text windows.
        seq_len: tokens per window.
        prompts: greedy prompts.
        new_tokens: tokens generated per prompt.
        text: what the windows were cut from.
        provider: the ONNX Runtime execution provider the quantised graph ran on.
        max_kl: the gate (None: no gate).
    """

    method: str
    block_size: int
    symmetric: bool
    accuracy_level: int
    lm_head: bool
    quantized_matmuls: int
    kept_matmuls: list[str]
    float_bytes: int
    bytes: int
    measured: bool = False
    kl: float | None = None
    top1: float | None = None
    ppl_reference: float | None = None
    ppl_quantized: float | None = None
    greedy_agreement: float | None = None
    greedy_prefix: float | None = None
    tokens: int = 0
    windows: int = 0
    seq_len: int = 0
    prompts: int = 0
    new_tokens: int = 0
    text: str = ""
    provider: str = ""
    max_kl: float | None = None

    @property
    def size_ratio(self) -> float:
        """Float size over quantised size (how many times smaller the graph got)."""
        return self.float_bytes / self.bytes if self.bytes else float("nan")

    @property
    def passed(self) -> bool:
        """True unless the KL was measured above ``max_kl``."""
        return self.max_kl is None or self.kl is None or self.kl <= self.max_kl

    def format(self) -> str:
        """The lines ``surgery export-onnx`` prints."""
        scheme = "symmetric" if self.symmetric else "asymmetric"
        head = "lm_head included" if self.lm_head else "lm_head kept in float"
        lines = [
            f"quantized {self.method} (MatMulNBits, block {self.block_size}, {scheme}, RTN, accuracy level "
            f"{self.accuracy_level}): {self.quantized_matmuls} weight MatMuls, {head}; "
            f"{self.float_bytes / 1e6:.1f} MB -> {self.bytes / 1e6:.1f} MB ({self.size_ratio:.2f}x smaller)",
        ]
        if not self.measured:
            lines.append("quantized graph not measured (--no-validate)")
            return "\n".join(lines)
        gate = "" if self.max_kl is None else f" (gate --max-kl {self.max_kl:g}: {'passed' if self.passed else 'MISSED'})"
        lines.append(
            f"KL(PyTorch fp32 || {self.method}) {self.kl:.4f} nats/token, top-1 agreement {self.top1:.1%}, "
            f"perplexity {self.ppl_reference:.2f} -> {self.ppl_quantized:.2f} over {self.tokens} tokens "
            f"({self.windows} windows of {self.seq_len}, {self.text}){gate}"
        )
        if self.greedy_agreement is not None:
            lines.append(f"greedy agreement {self.greedy_agreement:.1%} ({self.prompts} prompts x {self.new_tokens} "
                         f"tokens, KV cache; identical prefix {self.greedy_prefix:.1%}) on {self.provider}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (``onnx-export.json`` ``quantization``, ``--json``)."""
        body = asdict(self)
        body["size_ratio"] = round(self.size_ratio, 3)
        body["algorithm"] = "RTN (onnxruntime MatMulNBitsQuantizer, default configuration)"
        body["reference"] = "PyTorch fp32"
        return body


def check_quantize_options(quantize: str | None, block_size: int, max_kl: float | None, validate: bool) -> None:
    """Refuse bad quantisation options before any work is done.

    Args:
        quantize: None (no quantisation) or a method of :data:`QUANTIZE_METHODS`.
        block_size: one of :data:`BLOCK_SIZES`.
        max_kl: a KL gate (needs ``quantize`` and ``validate``), at least 0.
        validate: whether the export is validated (the KL is measured only then).

    Raises:
        OptionError: an unknown method or block size, or a gate that cannot apply.

    Example:
        >>> check_quantize_options("int4", 32, None, True)
        >>> check_quantize_options("int3", 32, None, True)
        Traceback (most recent call last):
        ...
        surgery.errors.OptionError: unknown quantization 'int3'; choose int4
    """
    if quantize is None:
        if max_kl is not None:
            raise OptionError("--max-kl gates a quantized export", hint="add --quantize int4")
        return
    if quantize not in QUANTIZE_METHODS:
        raise OptionError(f"unknown quantization {quantize!r}; choose {', '.join(QUANTIZE_METHODS)}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size not in BLOCK_SIZES:
        raise OptionError(f"block size {block_size!r} is not supported by MatMulNBits; choose one of "
                          f"{', '.join(map(str, BLOCK_SIZES))}")
    if max_kl is not None:
        if not validate:
            raise OptionError("--max-kl needs the quantized graph measured", hint="drop --no-validate")
        if not (isinstance(max_kl, int | float) and math.isfinite(max_kl) and max_kl >= 0):
            raise OptionError(f"--max-kl must be a number of nats, 0 or more, not {max_kl!r}")


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[Any]:
    """Import the quantizer without letting it reconfigure logging (its module calls ``logging.basicConfig`` at INFO)."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
    logger = logging.getLogger(matmul_nbits_quantizer.__name__)
    previous = logger.level
    logger.setLevel(logging.WARNING)  # one INFO line per node otherwise
    try:
        yield matmul_nbits_quantizer
    finally:
        logger.setLevel(previous)


def _graph_bytes(directory: Path) -> int:
    return sum((directory / name).stat().st_size for name in (ONNX_FILENAME, EXTERNAL_DATA_FILENAME)
               if (directory / name).exists())


def _output_projections(model: Any, vocab: int) -> list[str]:
    """Names of the weight MatMuls that project to the vocabulary (the lm_head, tied or not)."""
    constants = {init.name: list(init.dims) for init in model.graph.initializer}
    return [node.name for node in model.graph.node
            if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in constants
            and constants[node.input[1]][-1:] == [vocab]]


def _split_branch_weights(model: Any) -> int:
    """Rewrite each MatMul of a ``[K branches, M, in]`` activation by a constant ``[K, in, out]`` weight (a wide
    block's stacked branch projections, a batched MatMul that ONNX Runtime's quantizer skips) into K plain MatMuls
    on 2-D weights: ``Gather`` branch k, ``MatMul`` by its ``[in, out]`` slice, ``Unsqueeze``, then one ``Concat``.
    The result is the same; the quantizer then rewrites each slice. Returns the MatMuls split."""
    import onnx
    from onnx import helper, numpy_helper

    constants = {init.name: init for init in model.graph.initializer}
    batched = [node for node in model.graph.node if node.op_type == "MatMul" and len(node.input) > 1
               and node.input[1] in constants and len(constants[node.input[1]].dims) == 3
               and constants[node.input[1]].dims[0] > 1]
    if not batched:
        return 0
    inferred = onnx.shape_inference.infer_shapes(model)  # a copy; only wide-block graphs come here
    ranks = {value.name: len(value.type.tensor_type.shape.dim) for value in inferred.graph.value_info
             if value.type.tensor_type.HasField("shape")}
    axis0 = numpy_helper.from_array(np.array([0], dtype=np.int64), "surgery_branch_axis0")
    model.graph.initializer.append(axis0)
    replaced: dict[int, list[Any]] = {}
    for node in batched:
        weight = constants[node.input[1]]
        if ranks.get(node.input[0]) != 3:
            continue  # not a [K, M, in] activation: left as it is (and in float)
        array = numpy_helper.to_array(weight)
        nodes, pieces = [], []
        for k in range(array.shape[0]):
            stem = f"{node.name or weight.name}_branch{k}"
            index = numpy_helper.from_array(np.array(k, dtype=np.int64), f"{stem}_index")
            model.graph.initializer.extend([index, numpy_helper.from_array(np.ascontiguousarray(array[k]), f"{stem}_weight")])
            nodes += [helper.make_node("Gather", [node.input[0], index.name], [f"{stem}_in"], name=f"{stem}_gather", axis=0),
                      helper.make_node("MatMul", [f"{stem}_in", f"{stem}_weight"], [f"{stem}_mm"], name=f"{stem}_matmul"),
                      helper.make_node("Unsqueeze", [f"{stem}_mm", axis0.name], [f"{stem}_out"], name=f"{stem}_unsqueeze")]
            pieces.append(f"{stem}_out")
        nodes.append(helper.make_node("Concat", pieces, [node.output[0]], name=f"{node.name}_branches", axis=0))
        replaced[id(node)] = nodes
    rewritten = []
    for node in model.graph.node:
        rewritten.extend(replaced.get(id(node), [node]))
    del model.graph.node[:]
    model.graph.node.extend(rewritten)
    return len(replaced)


def _untie_transposed_weights(model: Any) -> int:
    """Give each MatMul whose weight is ``Transpose(constant)`` (a tied lm_head: the embedding, transposed at run
    time, which the exporter does not fold for a large vocabulary) its own transposed constant, so that the quantizer
    sees a constant weight; a Transpose left without readers is removed. Returns the MatMuls untied."""
    from onnx import numpy_helper

    constants = {init.name: init for init in model.graph.initializer}
    producers = {out: node for node in model.graph.node for out in node.output}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    untied, dropped = 0, set()
    for node in model.graph.node:
        source = producers.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if source is None or source.op_type != "Transpose" or source.input[0] not in constants:
            continue
        array = numpy_helper.to_array(constants[source.input[0]])
        perm = next((list(a.ints) for a in source.attribute if a.name == "perm"), list(range(array.ndim))[::-1])
        if array.ndim != 2 or perm != [1, 0]:
            continue
        name = f"{source.input[0]}_transposed"
        if name not in constants:
            constants[name] = numpy_helper.from_array(np.ascontiguousarray(array.T), name)
            model.graph.initializer.append(constants[name])
        readers[source.output[0]] -= 1
        node.input[1] = name
        untied += 1
        if readers[source.output[0]] == 0 and source.output[0] not in {o.name for o in model.graph.output}:
            dropped.add(id(source))
    if dropped:
        kept = [node for node in model.graph.node if id(node) not in dropped]
        del model.graph.node[:]
        model.graph.node.extend(kept)
    return untied


def quantize_graph(directory: Path, *, block_size: int = DEFAULT_BLOCK_SIZE, symmetric: bool = True,
                   lm_head: bool = True, vocab_size: int, accuracy_level: int = ACCURACY_LEVEL) -> tuple[int, list[str], bool]:
    """Rewrite ``directory/model.onnx`` in place: weight MatMuls to int4 ``MatMulNBits`` (ONNX Runtime's quantizer).

    Args:
        directory: an export directory (the staging directory during an export).
        block_size: rows per quantisation block.
        symmetric: int4 with scales only (True), or uint4 with zero points.
        lm_head: quantise the projection to the vocabulary too.
        vocab_size: the vocabulary, to find that projection.
        accuracy_level: MatMulNBits' ``accuracy_level`` (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8 activations).

    Returns:
        ``(MatMulNBits nodes written, names of the weight MatMuls kept in float, weights in external data)``.

    Raises:
        OnnxValidationError: the quantizer rewrote no MatMul (nothing to quantise: not a transformer graph).

    Example:
        >>> quantize_graph(Path("out/smol-19-onnx"), vocab_size=49152)  # doctest: +SKIP
        (134, [], False)
    """
    import onnx

    path = directory / ONNX_FILENAME
    model = onnx.load(str(path))  # external data too
    _split_branch_weights(model)  # a wide block's stacked branch weights, into 2-D MatMuls the quantizer takes
    if lm_head:
        _untie_transposed_weights(model)  # a tied lm_head gets its own copy, quantised (as the reference builder)
    heads = _output_projections(model, vocab_size)
    keep = [] if lm_head else heads
    with _quiet_quantizer() as module, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quantizer = module.MatMulNBitsQuantizer(
            model, bits=4, block_size=block_size, is_symmetric=symmetric, accuracy_level=accuracy_level or None,
            nodes_to_exclude=keep, op_types_to_quantize=("MatMul",),
        )
        quantizer.process()
    quantized = quantizer.model.model
    count = sum(1 for node in quantized.graph.node if node.op_type == "MatMulNBits")
    if count == 0:
        raise OnnxValidationError("int4 quantization", None, None, "CPUExecutionProvider",
                                  "(no MatMul with a constant weight in the graph)")
    quantized.metadata_props.add(key="surgery.quantize", value="int4")
    quantized.metadata_props.add(key="surgery.block_size", value=str(block_size))
    weight_bytes = sum(len(init.raw_data) for init in quantized.graph.initializer)
    external = weight_bytes > EXTERNAL_DATA_THRESHOLD
    data = directory / EXTERNAL_DATA_FILENAME
    temporary = directory / (ONNX_FILENAME + ".int4")
    with contextlib.suppress(FileNotFoundError):
        data.unlink()  # the float weights, loaded above; external data is appended to, never replaced
    if external:
        onnx.save(quantized, str(temporary), save_as_external_data=True, all_tensors_to_one_file=True,
                  location=EXTERNAL_DATA_FILENAME, size_threshold=1024)
    else:
        onnx.save(quantized, str(temporary))
    os.replace(temporary, path)
    return count, keep, external


class _Output:
    """What :func:`surgery.metrics.compare` reads from a model call."""

    def __init__(self, logits: torch.Tensor, past_key_values: Any) -> None:
        self.logits = logits
        self.past_key_values = past_key_values


class OnnxAsModel:
    """An ONNX decoder export called like a ``transformers`` causal LM, as :mod:`surgery.metrics` calls models.

    Full windows run with a past of length 0; a call given ``past_key_values`` (what the previous call returned)
    continues from it, so greedy continuations use the graph's KV cache. Rows are never padded.

    Args:
        lm: the loaded graph.
        config: the PyTorch model's config (for the layer count in the report).

    Example:
        >>> model = OnnxAsModel(OnnxCausalLM.load("out/smol-19-onnx"), config)  # doctest: +SKIP
        >>> model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=False).logits.shape  # doctest: +SKIP
        torch.Size([1, 3, 49152])
    """

    def __init__(self, lm: Any, config: Any) -> None:
        self.lm = lm
        self.config = config

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False, past_key_values: Any = None) -> _Output:
        """One call: logits of every position, and (present, length) to continue from.

        Args:
            input_ids: ``[batch, sequence]`` ids.
            use_cache: ignored (the graph always returns its present).
            past_key_values: None, or the ``past_key_values`` of the previous output.

        Returns:
            An object with ``logits`` (float32 tensor) and ``past_key_values``.
        """
        import torch

        ids = input_ids.detach().cpu().numpy().astype(np.int64)
        batch, length = ids.shape
        past, done = past_key_values if past_key_values is not None else (self.lm.empty_cache(batch), 0)
        mask = np.ones((batch, done + length), dtype=np.int64)
        positions = np.broadcast_to(np.arange(done, done + length, dtype=np.int64), (batch, length)).copy()
        logits, present = self.lm.forward(ids, mask, positions, past)
        return _Output(torch.from_numpy(np.asarray(logits, dtype=np.float32)), (present, done + length))

    __call__ = forward


def _windows(directory: Path, vocab: int) -> tuple[torch.Tensor, str]:
    """Windows of the default text when the export has a tokenizer, else seeded random ids (tiny test models)."""
    import torch

    from surgery.checkpoint import has_tokenizer
    from surgery.corpus import read_texts, token_windows

    if has_tokenizer(directory):
        with contextlib.suppress(Exception), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
            texts = read_texts(None)
            windows = token_windows(tokenizer, texts, seq_len=SEQ_LEN, max_tokens=MAX_TOKENS)
            if int(windows.max()) < vocab:
                return windows, texts.name.split(" (")[0]
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab, (MAX_TOKENS // SEQ_LEN, SEQ_LEN), generator=generator), "random token ids (no tokenizer)"


def quantize_export(loaded: _Loaded, directory: Path, *, block_size: int = DEFAULT_BLOCK_SIZE, symmetric: bool = True,
                    lm_head: bool = True, measure: bool = True, max_kl: float | None = None, device: str = "cpu",
                    quiet: bool = True) -> QuantizationReport:
    """Quantise a validated decoder export in place and measure it against the PyTorch model.

    Args:
        loaded: the PyTorch model the export came from (fp32).
        directory: the export directory (staging: nothing is published until the caller renames it).
        block_size: rows per quantisation block (:data:`BLOCK_SIZES`).
        symmetric: int4 with scales only (True, the default, as the reference builder), or uint4 with zero points.
        lm_head: quantise the projection to the vocabulary too (True, as the reference builder).
        measure: measure KL, top-1, perplexity and greedy agreement (False: sizes only).
        max_kl: fail when the KL is above this many nats per token.
        device: where the quantised graph runs while measured.
        quiet: no progress bar.

    Returns:
        The :class:`QuantizationReport`.

    Raises:
        OptionError: the export is not a decoder.
        OnnxValidationError: the KL is above ``max_kl``, or there was nothing to quantise.

    Example:
        >>> quantize_export(loaded, staging).kl  # doctest: +SKIP
        0.0468
    """
    from exporters.onnx_session import OnnxCausalLM
    from surgery.metrics import Candidate, compare

    if loaded.kind != "decoder":
        raise OptionError("--quantize applies to decoder exports (causal language models), not encoders")
    config = loaded.model.config
    vocab = int(config.get_text_config().vocab_size)
    before = _graph_bytes(directory)
    count, kept, _ = quantize_graph(directory, block_size=block_size, symmetric=symmetric, lm_head=lm_head, vocab_size=vocab)
    settings: dict[str, Any] = {
        "method": "int4", "block_size": block_size, "symmetric": symmetric, "accuracy_level": ACCURACY_LEVEL,
        "lm_head": lm_head, "quantized_matmuls": count, "kept_matmuls": kept, "float_bytes": before,
        "bytes": _graph_bytes(directory), "max_kl": max_kl,
    }
    if not measure:
        return QuantizationReport(**settings)
    lm = OnnxCausalLM.load(directory, device)
    windows, text = _windows(directory, vocab)
    candidate = Candidate.of_model(OnnxAsModel(lm, config), "int4")
    measurement = compare(loaded.model, [candidate], windows, causal=True, batch_size=BATCH_SIZE, prompts=PROMPTS,
                          new_tokens=NEW_TOKENS, quiet=quiet, description="measuring int4")
    result = measurement.comparisons[0]
    report = QuantizationReport(
        **settings, measured=True, kl=result.kl, top1=result.top1, ppl_reference=result.ppl_original,
        ppl_quantized=result.ppl_new, greedy_agreement=result.greedy_agreement, greedy_prefix=result.greedy_prefix,
        tokens=result.tokens, windows=measurement.windows, seq_len=measurement.seq_len, prompts=measurement.prompts,
        new_tokens=measurement.new_tokens, text=text, provider=lm.provider,
    )
    if not report.passed:
        raise OnnxValidationError(f"KL(PyTorch fp32 || int4) {report.kl:.4g} nats/token > --max-kl {max_kl:g}",
                                  None, None, lm.provider, f"(top-1 agreement {report.top1:.1%})")
    return report
