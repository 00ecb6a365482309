"""The ONNX runner, :func:`generate` (``surgery generate``): a prompt through an ONNX directory, exported into the
cache first when MODEL is a checkpoint (:func:`exporters.onnx.cached_export`).

The sessions and the decoder loop with its KV cache live in :mod:`exporters.onnx_session` (re-exported here).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Re-exported: the runtime names this module has always offered.
from exporters.onnx_session import DEVICES as DEVICES
from exporters.onnx_session import ONNX_FILENAME as ONNX_FILENAME
from exporters.onnx_session import CacheSpec as CacheSpec
from exporters.onnx_session import GreedyResult as GreedyResult
from exporters.onnx_session import OnnxCausalLM as OnnxCausalLM
from exporters.onnx_session import create_session as create_session
from exporters.onnx_session import cuda_problem as cuda_problem
from exporters.onnx_session import find_onnx_dir as find_onnx_dir
from surgery.checkpoint import has_tokenizer, read_json_object
from surgery.errors import CheckpointError, CudaUnavailableError, OptionError


@dataclass(frozen=True)
class Generation:
    """What :func:`generate` produced.

    Attributes:
        text: the generated text (the prompt excluded).
        token_ids: the generated ids.
        onnx_dir: the ONNX directory that ran (exported into the cache when MODEL was a checkpoint).
        provider: the ONNX Runtime execution provider that ran it.
        prefill_seconds: prompt in, first token out.
        decode_tokens_per_second: later tokens per second.
    """

    text: str
    token_ids: list[int]
    onnx_dir: Path
    provider: str
    prefill_seconds: float
    decode_tokens_per_second: float

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "token_ids": self.token_ids, "onnx_dir": str(self.onnx_dir), "provider": self.provider,
                "prefill_seconds": round(self.prefill_seconds, 4),
                "decode_tokens_per_second": round(self.decode_tokens_per_second, 2)}

    def stats(self) -> str:
        """One line: provider, token count and speed."""
        return (f"[{self.provider}] {len(self.token_ids)} tokens; prefill {self.prefill_seconds * 1000:.0f} ms, "
                f"decode {self.decode_tokens_per_second:.1f} tokens/s ({self.onnx_dir})")


def _eos_ids(directory: Path) -> list[int]:
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        file = directory / name
        if file.exists():
            value = read_json_object(file, "config").get("eos_token_id")
            if value is None:
                continue
            values = value if isinstance(value, list) else [value]
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
                raise CheckpointError(str(file), f"eos_token_id must be a token id or a list of them, got {value!r}")
            ids.extend(values)
            break
    return ids


def generate(
    model: str | os.PathLike[str] | None,
    prompt: str,
    *,
    max_new_tokens: int = 64,
    device: str = "cpu",
    chat: bool = False,
    on_text: Callable[[str], None] | None = None,
    threads: int | None = None,
    quiet: bool = False,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
) -> Generation:
    """Generate greedily from a prompt with ONNX Runtime and the KV cache, streaming the text.

    MODEL may be an ONNX directory (``model.onnx`` beside the tokenizer), a checkpoint written with
    ``--onnx`` (its ``onnx/`` directory is used), or any model :func:`surgery.source.open_source` accepts,
    which is exported (fp32, validated) into ``$SURGERY_CACHE/onnx`` once.

    Args:
        model: the ONNX directory or model.
        prompt: the text to continue.
        max_new_tokens: how many tokens at most (stops earlier at the end-of-sequence token).
        device: ``cpu`` or ``cuda`` (ONNX Runtime's ``CUDAExecutionProvider``, with I/O binding).
        chat: wrap the prompt in the tokenizer's chat template as a user message.
        on_text: called with each new piece of text as it is decoded.
        threads: CPU intra-op threads.
        quiet: no progress messages on stderr.
        allow_pickle: accept ``.bin``/``.pt`` weights when exporting.
        trust_remote_code: allow a model whose code ships in its repository.

    Returns:
        The :class:`Generation`.

    Raises:
        CudaUnavailableError: ``cuda`` asked for but unusable.
        CheckpointError: no tokenizer beside the graph, or not a decoder graph.
        OnnxExportError, OnnxValidationError: exporting a checkpoint failed.
        OptionError: a bad ``max_new_tokens`` or device.

    Example:
        >>> import surgery
        >>> result = surgery.generate("out/smol-19", "The capital of France is", max_new_tokens=8)  # doctest: +SKIP
        >>> print(result.text)  # doctest: +SKIP
    """
    if max_new_tokens < 1:
        raise OptionError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if device not in DEVICES:
        raise OptionError(f"unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if device == "cuda" and (problem := cuda_problem()) is not None:
        raise CudaUnavailableError(problem)  # before any export work
    directory = find_onnx_dir(model) if model is not None else None
    if directory is None:
        from exporters.onnx import cached_export

        directory = cached_export(model, quiet=quiet, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
    lm = OnnxCausalLM.load(directory, device, threads=threads)
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not has_tokenizer(directory):  # transformers 5.0 would make up an empty tokenizer instead of failing
        raise CheckpointError(str(directory), "has no tokenizer files (tokenizer.json, tokenizer.model, ...)",
                              hint="export from a checkpoint directory that holds its tokenizer")
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a config whose code is not run falls back quietly; the error says it all
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError) as exc:
        raise CheckpointError(str(directory), f"has no usable tokenizer ({str(exc).splitlines()[0]})") from None
    finally:
        hf_logging.set_verbosity(verbosity)
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise OptionError("this model's tokenizer has no chat template; drop --chat")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise OptionError("the prompt encodes to no tokens")
    eos = _eos_ids(directory)
    new: list[int] = []
    shown = ""

    def stream(token: np.ndarray) -> None:
        nonlocal shown
        if int(token[0]) in eos:
            return
        new.append(int(token[0]))
        decoded = str(tokenizer.decode(new, skip_special_tokens=True))
        if on_text is not None and not decoded.endswith("\ufffd") and decoded.startswith(shown):
            on_text(decoded[len(shown):])
            shown = decoded

    result = lm.greedy(np.array([ids], dtype=np.int64), max_new_tokens=max_new_tokens, eos_token_id=eos, on_token=stream)
    text = str(tokenizer.decode(new, skip_special_tokens=True))
    if on_text is not None and text.startswith(shown) and len(text) > len(shown):
        on_text(text[len(shown):])
    return Generation(text=text, token_ids=new, onnx_dir=directory, provider=lm.provider,
                      prefill_seconds=result.prefill_seconds, decode_tokens_per_second=result.decode_tokens_per_second)
