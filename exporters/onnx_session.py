"""Run exported ONNX graphs with ONNX Runtime: sessions that really use the device asked for, and the decoder
loop with its KV cache (:class:`OnnxCausalLM`). The runner verb on top of it is :mod:`exporters.onnx_runtime`.

``onnxruntime-gpu`` lists ``CUDAExecutionProvider`` even when the CUDA libraries are missing, and a session
asked for it then runs on the CPU without a word. :func:`create_session` checks which provider the session
really got and, for ``device="cuda"``, fails with the library that is missing. On the GPU the decoder binds
its inputs and outputs to device memory (I/O binding), so the cache never leaves the device between steps.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from surgery.errors import CheckpointError, CudaUnavailableError, OptionError

if TYPE_CHECKING:
    import onnxruntime

ONNX_FILENAME = "model.onnx"
DEVICES = ("cpu", "cuda")
_PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16}
# A graph's "surgery.rotary" metadata when its GroupQueryAttention applies the rotary itself, at each token's
# cache slot: ONNX Runtime's kernel then takes several new tokens after a past only for a batch of one.
ROTARY_AT_CACHE_SLOTS = "cache_slots"


def _ort() -> Any:
    import onnxruntime

    return onnxruntime


def cuda_problem() -> str | None:
    """Why ONNX Runtime cannot run on CUDA here, or None when nothing is known to be missing.

    Checks, in order: a CUDA build of ONNX Runtime (``onnxruntime-gpu``), its CUDA provider library and
    the CUDA/cuDNN libraries it links (whose loader error names the missing file), and the NVIDIA driver.

    Returns:
        A one-line reason, or None.

    Example:
        >>> cuda_problem() is None or isinstance(cuda_problem(), str)
        True
    """
    ort = _ort()
    if _PROVIDERS["cuda"] not in ort.get_available_providers():
        return (f"this onnxruntime {ort.__version__} build has no CUDAExecutionProvider; "
                "install onnxruntime-gpu (and not onnxruntime beside it)")
    try:  # CUDA and cuDNN from the nvidia-* pip packages, if present; it prints what it misses: the checks below say it
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            ort.preload_dlls(directory="")
    except Exception:  # noqa: BLE001 - preloading is best effort; the checks below report what is missing
        pass
    library = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
    if library.exists():
        try:
            ctypes.CDLL(str(library))
        except OSError as exc:
            reason = str(exc).split(": ", 1)[-1] if str(library) in str(exc) else str(exc)
            return (f"ONNX Runtime's CUDA provider cannot load: {reason} "
                    f"(onnxruntime-gpu {ort.__version__} needs the CUDA and cuDNN 9 runtime libraries on the "
                    "library path, e.g. pip install 'onnxruntime-gpu[cuda,cudnn]')")
    try:
        ctypes.CDLL("libcuda.so.1" if sys.platform.startswith("linux") else "nvcuda.dll")
    except OSError:
        return "no NVIDIA driver (libcuda.so.1 not found): this machine has no usable GPU"
    return None


def create_session(
    model_path: str | os.PathLike[str], device: str = "cpu", *, threads: int | None = None
) -> onnxruntime.InferenceSession:
    """An ONNX Runtime session that really runs on ``device``.

    Args:
        model_path: the ``.onnx`` file.
        device: ``cpu`` or ``cuda``.
        threads: intra-op threads (default: ONNX Runtime's choice, one per physical core).

    Returns:
        The session; ``session.get_providers()[0]`` is the provider that runs it.

    Raises:
        OptionError: an unknown device.
        CudaUnavailableError: ``cuda`` asked for but unusable (the reason names what is missing).
        CheckpointError: the file is not a graph ONNX Runtime can load.

    Example:
        >>> session = create_session("out/onnx/model.onnx", "cpu")  # doctest: +SKIP
        >>> session.get_providers()[0]  # doctest: +SKIP
        'CPUExecutionProvider'
    """
    if device not in DEVICES:
        raise OptionError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    ort = _ort()
    if device == "cuda" and (problem := cuda_problem()) is not None:
        raise CudaUnavailableError(problem)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    providers: list[Any] = ["CPUExecutionProvider"]
    if device == "cuda":
        providers.insert(0, ("CUDAExecutionProvider", {"device_id": 0}))
    try:
        session = ort.InferenceSession(str(model_path), options, providers=providers)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types for unloadable graphs
        raise CheckpointError(str(model_path), f"ONNX Runtime cannot load it ({str(exc).splitlines()[0]})") from None
    ran = session.get_providers()[0]
    if ran != _PROVIDERS[device]:
        # The checks above passed, yet ONNX Runtime fell back: say so rather than run on the CPU silently.
        raise CudaUnavailableError(f"ONNX Runtime fell back to {ran} (GPU not supported by this build or driver)")
    return session


@dataclass(frozen=True)
class CacheSpec:
    """One past/present tensor of the decoder graph: ``[batch, heads, past_sequence, head_dim]``."""

    input_name: str
    output_name: str
    heads: int
    head_dim: int


@dataclass
class OnnxCausalLM:
    """A decoder graph with KV cache, loaded in ONNX Runtime.

    Build it with :meth:`load`. Inputs follow the names the ecosystem's loaders expect: ``input_ids``,
    ``attention_mask``, ``position_ids``, ``past_key_values.{i}.key``/``.value``; outputs ``logits`` and
    ``present.{i}.key``/``.value``.

    Attributes:
        session: the ONNX Runtime session.
        device: ``cpu`` or ``cuda``.
        provider: the execution provider that runs the session.
        cache: the past/present pairs in graph order.
        dtype: the floating-point type of the cache (float32 or float16).
        io_binding: run with I/O binding (the default: the cache stays in ONNX Runtime's buffers, on the GPU
            for CUDA); off, every step goes through numpy arrays.
        rotary_at_cache_slots: the graph's attention applies the rotary itself (metadata ``surgery.rotary``), so
            several new tokens after a past are refused for a batch of more than one.
    """

    session: onnxruntime.InferenceSession
    device: str
    provider: str
    cache: list[CacheSpec]
    dtype: Any
    io_binding: bool = False
    _inputs: set[str] = field(default_factory=set)
    rotary_at_cache_slots: bool = False

    @classmethod
    def load(cls, directory: str | os.PathLike[str], device: str = "cpu", *, threads: int | None = None,
             io_binding: bool | None = None) -> OnnxCausalLM:
        """Load ``directory/model.onnx`` (or a ``.onnx`` file).

        Args:
            directory: an ONNX directory written by :func:`exporters.onnx.export_onnx`, a checkpoint with
                ``onnx/`` inside (``--onnx``), or the graph file.
            device: ``cpu`` or ``cuda``.
            threads: intra-op threads for the CPU.
            io_binding: I/O binding on (default) or off. On: each step's present cache is handed to the
                next step as ONNX Runtime's own buffers (on the device, for CUDA), never copied out.

        Raises:
            CheckpointError: no graph, or a graph that is not a decoder with cache.
            CudaUnavailableError: ``cuda`` asked for but unusable.

        Example:
            >>> lm = OnnxCausalLM.load("out/onnx")  # doctest: +SKIP
        """
        path = Path(directory)
        found = find_onnx_dir(path)
        graph = path if path.suffix == ".onnx" else (found or path) / ONNX_FILENAME
        if not graph.exists():
            raise CheckpointError(str(path), f"has no {ONNX_FILENAME}")
        session = create_session(graph, device, threads=threads)
        names = {i.name: i for i in session.get_inputs()}
        outputs = {o.name for o in session.get_outputs()}
        if "input_ids" not in names or "logits" not in outputs:
            raise CheckpointError(str(graph), "is not a decoder graph (needs input_ids -> logits)")
        cache: list[CacheSpec] = []
        layer = 0
        while f"past_key_values.{layer}.key" in names:
            for kind in ("key", "value"):
                info = names[f"past_key_values.{layer}.{kind}"]
                heads, head_dim = info.shape[1], info.shape[3]
                if not isinstance(head_dim, int):  # onnxruntime-genai's builder: a named axis, head_size in its config
                    head_dim = _genai_head_size(graph.parent)
                if not isinstance(heads, int) or not isinstance(head_dim, int):
                    raise CheckpointError(str(graph), f"{info.name} has no fixed heads/head_dim")
                cache.append(CacheSpec(info.name, f"present.{layer}.{kind}", heads, head_dim))
            layer += 1
        if not cache:
            raise CheckpointError(str(graph), "has no past_key_values inputs: not a decoder with KV cache")
        dtype = _ORT_TYPES.get(names["past_key_values.0.key"].type)
        if dtype is None:
            raise CheckpointError(str(graph), f"cache type {names['past_key_values.0.key'].type} is not supported")
        rotary = session.get_modelmeta().custom_metadata_map.get("surgery.rotary")
        return cls(session, device, session.get_providers()[0], cache, dtype,
                   io_binding=True if io_binding is None else io_binding, _inputs=set(names),
                   rotary_at_cache_slots=rotary == ROTARY_AT_CACHE_SLOTS)

    @property
    def num_layers(self) -> int:
        return len(self.cache) // 2

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        """The past of length 0 for the first step."""
        return [np.zeros((batch, c.heads, 0, c.head_dim), dtype=self.dtype) for c in self.cache]

    def forward(
        self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray, past: Sequence[Any]
    ) -> tuple[np.ndarray, list[Any]]:
        """One step: logits for every input position and the present cache.

        Args:
            input_ids: ``[batch, sequence]`` int64.
            attention_mask: ``[batch, past + sequence]`` int64, 0 at padding.
            position_ids: ``[batch, sequence]`` int64.
            past: the previous step's present tensors (numpy arrays, or OrtValues with I/O binding).

        Returns:
            ``(logits, present)``; logits as a numpy array, present as numpy arrays (OrtValues with I/O binding).

        Raises:
            OptionError: several new tokens after a past for more than one sequence, on a graph whose attention
                applies the rotary itself (ONNX Runtime's kernel refuses it).
        """
        batch, new = input_ids.shape
        if self.rotary_at_cache_slots and batch > 1 and new > 1 and attention_mask.shape[1] > new:  # a past
            raise OptionError(f"this graph's GroupQueryAttention takes {new} new tokens after a past only "
                              f"for one sequence, not a batch of {batch}",
                              hint="feed one token per step, one sequence at a time, or export with --no-fuse")
        feed = {"input_ids": input_ids, "attention_mask": attention_mask}
        if "position_ids" in self._inputs:  # the reference builder's graphs derive positions from the mask
            feed["position_ids"] = position_ids
        if not self.io_binding:
            feed.update({c.input_name: p for c, p in zip(self.cache, past, strict=True)})
            outputs = self.session.run(["logits", *(c.output_name for c in self.cache)], feed)
            return outputs[0], list(outputs[1:])
        ort = _ort()
        binding = self.session.io_binding()
        device_id = 0
        for name, array in feed.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array), self.device, device_id))
        for spec, value in zip(self.cache, past, strict=True):
            if isinstance(value, np.ndarray):
                value = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), self.device, device_id)
            binding.bind_ortvalue_input(spec.input_name, value)
        binding.bind_output("logits", "cpu")  # read on the host every step; the cache stays on the device
        for spec in self.cache:
            binding.bind_output(spec.output_name, self.device, device_id)
        self.session.run_with_iobinding(binding)
        values = binding.get_outputs()
        return values[0].numpy(), list(values[1:])

    def greedy(
        self,
        input_ids: np.ndarray,
        attention_mask: np.ndarray | None = None,
        *,
        max_new_tokens: int = 16,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int = 0,
        on_token: Callable[[np.ndarray], None] | None = None,
    ) -> GreedyResult:
        """Greedy decoding with the cache: one prefill, then one token per step.

        Position ids follow the attention mask (left padding allowed), as ``transformers`` computes them.

        Args:
            input_ids: ``[batch, prompt]`` int64, left-padded when the prompts differ in length.
            attention_mask: ``[batch, prompt]``, 0 at padding (default: all ones).
            max_new_tokens: how many tokens to generate at most.
            eos_token_id: stop a row when it emits one of these; stop when every row has.
            pad_token_id: what a finished row emits.
            on_token: called with the ``[batch]`` new tokens after each step (streaming).

        Returns:
            The :class:`GreedyResult`.

        Raises:
            OptionError: a padded batch on a graph without ``position_ids`` (onnxruntime-genai's model builder's).

        Example:
            >>> OnnxCausalLM.load("out/onnx").greedy(np.array([[1, 2, 3]]), max_new_tokens=4).tokens  # doctest: +SKIP
        """
        input_ids = np.asarray(input_ids, dtype=np.int64)
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        if "position_ids" not in self._inputs and (mask == 0).any():
            raise OptionError("this graph (onnxruntime-genai's model builder) takes positions from the mask's lengths, "
                              "so it cannot run a padded batch", hint="run one prompt at a time, or export with --graph surgery")
        stops = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
        batch = input_ids.shape[0]
        positions = np.cumsum(mask, axis=-1) - 1
        positions = np.where(mask == 0, 1, positions).astype(np.int64)
        past: list[Any] = self.empty_cache(batch)
        done = np.zeros(batch, dtype=bool)
        generated: list[np.ndarray] = []
        started = time.perf_counter()
        prefill_seconds = 0.0
        step_ids = input_ids
        for step in range(max_new_tokens):
            logits, past = self.forward(step_ids, mask, positions, past)
            token = logits[:, -1, :].argmax(-1).astype(np.int64)
            token = np.where(done, pad_token_id, token)
            generated.append(token)
            if step == 0:
                prefill_seconds = time.perf_counter() - started
            if on_token is not None:
                on_token(token)
            done |= np.isin(token, list(stops))
            if done.all():
                break
            step_ids = token[:, None]
            mask = np.concatenate([mask, np.ones((batch, 1), dtype=np.int64)], axis=-1)
            positions = positions[:, -1:] + 1
        total = time.perf_counter() - started
        tokens = np.stack(generated, axis=1) if generated else np.zeros((batch, 0), dtype=np.int64)
        return GreedyResult(tokens=tokens, prefill_seconds=prefill_seconds, decode_seconds=total - prefill_seconds)


@dataclass(frozen=True)
class GreedyResult:
    """Tokens from :meth:`OnnxCausalLM.greedy` and how long it took.

    Attributes:
        tokens: ``[batch, new]`` generated ids (the prompt excluded).
        prefill_seconds: the first step (prompt in, first token out).
        decode_seconds: every later step.
    """

    tokens: np.ndarray
    prefill_seconds: float
    decode_seconds: float

    @property
    def decode_tokens_per_second(self) -> float:
        steps = self.tokens.shape[1] - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else 0.0


def _genai_head_size(directory: Path) -> int | None:
    """``decoder.head_size`` of ``genai_config.json`` in ``directory`` (None when absent or unreadable)."""
    import json

    with contextlib.suppress(OSError, ValueError, AttributeError):
        value = json.loads((directory / "genai_config.json").read_text()).get("model", {}).get("decoder", {}).get("head_size")
        return value if isinstance(value, int) else None
    return None


def find_onnx_dir(path: str | os.PathLike[str]) -> Path | None:
    """The ONNX directory at ``path``: itself if it holds ``model.onnx``, ``path/onnx`` if that does, else None."""
    directory = Path(path)
    if directory.is_file() and directory.suffix == ".onnx":
        return directory.parent
    for candidate in (directory, directory / "onnx"):
        if (candidate / ONNX_FILENAME).is_file():
            return candidate
    return None

