"""``genai_config.json``: what onnxruntime-genai needs, beside the tokenizer files, to serve a decoder export.

:func:`genai_config` builds it from the model as loaded for the export (its config, its generation config
and the layout of its KV cache); :func:`exporters.onnx.export_source` writes it into the staging directory,
so a finished export directory is an onnxruntime-genai model directory::

    import onnxruntime_genai as og
    model = og.Model("out/smol-19/onnx")             # CPU unless the config names another provider

:func:`genai_greedy` runs an export's greedy decoding in onnxruntime-genai (the tests and
``benchmarks/genai_vs_runner.py`` use it). onnxruntime-genai is optional: ``pip install 'layer-surgery[genai]'``
(``onnxruntime-genai-cuda`` on Linux x86_64, which pairs with ``onnxruntime-gpu`` and runs on its CPU
provider too; ``onnxruntime-genai`` elsewhere).

The share buffer: ``search.past_present_share_buffer`` (onnxruntime-genai's static KV buffer: one
``[batch, kv_heads, max_length, head_size]`` tensor per past/present pair, bound as both the graph's past input
and its present output) needs a present as long as its past. The traced graph returns ``concat(past, new)``,
one step longer, so it is written ``false``; ``export-onnx --share-buffer`` rewrites the cache to fill the
buffer (:func:`exporters.onnx_graph._share_buffer_ready`) and writes ``true``. docs/onnx.md has the details.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from exporters.onnx_model import _Loaded
from surgery.errors import CheckpointError

GENAI_CONFIG_FILENAME = "genai_config.json"

# onnxruntime-genai's model types that select its plain decoder-only state (src/models/model_type.h); any
# other causal LM, and every wide-block model, is declared "decoder", the generic type: the graph's
# inputs and outputs are the same for all of them.
GENAI_DECODER_TYPES = frozenset({
    "gemma", "gemma2", "gemma3_text", "gpt2", "granite", "llama", "mistral", "nemotron", "olmo", "phi", "phi3",
    "qwen2", "qwen3", "smollm3",
})
# transformers' own defaults for a field the generation config leaves unset (GenerationConfig's
# _get_default_generation_params), so onnxruntime-genai searches as model.generate() does.
_SEARCH_DEFAULTS: dict[str, Any] = {
    "do_sample": False, "num_beams": 1, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0,
    "length_penalty": 1.0, "no_repeat_ngram_size": 0, "num_return_sequences": 1, "diversity_penalty": 0.0,
}


def genai_problem() -> str | None:
    """Why onnxruntime-genai cannot be imported here, or None when it can.

    Returns:
        None, or one line naming the package to install.

    Example:
        >>> genai_problem() is None or "pip install" in genai_problem()
        True
    """
    try:
        import onnxruntime_genai  # noqa: F401
    except ImportError as exc:
        return (f"onnxruntime-genai is not installed ({exc}); pip install 'layer-surgery[genai]' "
                "(onnxruntime-genai-cuda on Linux x86_64, onnxruntime-genai elsewhere)")
    return None


def _token_ids(value: Any) -> int | list[int] | None:
    if value is None:
        return None
    values = value if isinstance(value, list | tuple) else [value]
    ids = [int(v) for v in values]
    return ids[0] if len(ids) == 1 else ids


def _first(*values: Any) -> Any:
    return next((v for v in values if v is not None), None)


def genai_config(loaded: _Loaded, *, filename: str = "model.onnx", share_buffer: bool = False) -> dict[str, Any]:
    """The ``genai_config.json`` of a decoder export of ``loaded``.

    The model section comes from the model's (text) config and the cache layout read from the model itself:
    ``num_hidden_layers`` counts the cache layers of the graph, ``head_size`` and ``num_key_value_heads`` are
    those of its past inputs. A wide-block model's cache layers carry K x H_kv heads where the other layers
    carry H_kv: the config declares H_kv (the most common count) and onnxruntime-genai reads each layer's own
    count from the graph's fixed head axis, so the wide layers are allocated with their K x H_kv heads.
    The search section is the model's ``generation_config`` with ``transformers``' defaults for what it
    leaves unset, ``max_length`` the context length, and ``past_present_share_buffer`` as the graph allows.

    Args:
        loaded: the model as loaded for the export (a decoder).
        filename: the graph's file name inside the export directory.
        share_buffer: the graph was exported with ``--share-buffer`` (``past_present_share_buffer`` true).

    Returns:
        The configuration, ready for ``json.dump``.

    Raises:
        CheckpointError: ``loaded`` is not a decoder, or its config gives no vocabulary size.

    Example:
        >>> config = genai_config(loaded)  # doctest: +SKIP
        >>> config["model"]["decoder"]["num_hidden_layers"] == len(loaded.cache)  # doctest: +SKIP
        True
    """
    if loaded.kind != "decoder" or not loaded.cache:
        raise CheckpointError(loaded.model_type, "has no KV cache: onnxruntime-genai serves decoders only")
    text = loaded.model.config.get_text_config()
    generation = getattr(loaded.model, "generation_config", None)
    heads_count = Counter(heads for heads, _ in loaded.cache)
    kv_heads = min(heads_count, key=lambda h: (-heads_count[h], h))
    head_size = Counter(head_dim for _, head_dim in loaded.cache).most_common(1)[0][0]
    vocab = getattr(text, "vocab_size", None)
    if vocab is None:
        raise CheckpointError(loaded.model_type, "its config gives no vocab_size")
    context = int(_first(getattr(text, "max_position_embeddings", None), getattr(text, "n_positions", None), 2048))
    eos = _token_ids(_first(getattr(generation, "eos_token_id", None), getattr(text, "eos_token_id", None)))
    bos = _token_ids(_first(getattr(generation, "bos_token_id", None), getattr(text, "bos_token_id", None)))
    pad = _token_ids(_first(getattr(generation, "pad_token_id", None), getattr(text, "pad_token_id", None)))
    if pad is None and eos is not None:
        pad = eos[0] if isinstance(eos, list) else eos
    base_type = str(getattr(text, "surgery_base_model_type", None) or loaded.model_type)
    model_type = base_type if base_type in GENAI_DECODER_TYPES and loaded.model_type == base_type else "decoder"
    model: dict[str, Any] = {
        "type": model_type,
        "context_length": context,
        "vocab_size": int(vocab),
        "decoder": {
            "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
            "filename": filename,
            "head_size": int(head_size),
            "hidden_size": int(text.hidden_size),
            "num_attention_heads": int(text.num_attention_heads),
            "num_hidden_layers": len(loaded.cache),
            "num_key_value_heads": int(kv_heads),
            "inputs": {
                "input_ids": "input_ids", "attention_mask": "attention_mask", "position_ids": "position_ids",
                "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value",
            },
            "outputs": {
                "logits": "logits", "present_key_names": "present.%d.key", "present_value_names": "present.%d.value",
            },
        },
    }
    for key, value in (("bos_token_id", bos), ("eos_token_id", eos), ("pad_token_id", pad)):
        if value is not None:
            model[key] = value
    search: dict[str, Any] = {}
    for key, default in _SEARCH_DEFAULTS.items():
        value = getattr(generation, key, None)
        search[key] = type(default)(default if value is None else value)
    search.update({"min_length": 0, "max_length": context, "early_stopping": True,
                   "past_present_share_buffer": share_buffer})
    return {"model": model, "search": dict(sorted(search.items()))}


def write_genai_config(loaded: _Loaded, directory: Path, *, filename: str = "model.onnx",
                       share_buffer: bool = False) -> Path:
    """Write :func:`genai_config` as ``directory/genai_config.json``.

    Args:
        loaded: the model as loaded for the export (a decoder).
        directory: the export directory (the staging directory during an export).
        filename: the graph's file name.
        share_buffer: the graph was exported with ``--share-buffer``.

    Returns:
        The path written.

    Raises:
        CheckpointError: as :func:`genai_config`.
    """
    path = Path(directory) / GENAI_CONFIG_FILENAME
    path.write_text(json.dumps(genai_config(loaded, filename=filename, share_buffer=share_buffer), indent=2) + "\n")
    return path


def genai_greedy(directory: str | os.PathLike[str], prompt_ids: list[int], max_new_tokens: int, *,
                 share_buffer: bool | None = None) -> list[int]:
    """Greedy decoding of an export in onnxruntime-genai (its provider as the config names it; CPU as written).

    Args:
        directory: the export directory (``genai_config.json`` beside ``model.onnx``).
        prompt_ids: the prompt's token ids (batch 1).
        max_new_tokens: how many tokens to generate; fewer when the end-of-sequence token comes first.
        share_buffer: override the config's ``past_present_share_buffer`` (None: as written). The buffer is
            ``len(prompt_ids) + max_new_tokens`` long.

    Returns:
        The generated ids, the prompt excluded.

    Raises:
        CheckpointError: onnxruntime-genai is not installed, or it cannot load or run the directory.

    Example:
        >>> genai_greedy("out/smol-19/onnx", [504, 3575, 282, 4649, 314], 8)  # doctest: +SKIP
        [7042, 30, ...]
    """
    if (problem := genai_problem()) is not None:
        raise CheckpointError(str(directory), problem)
    import onnxruntime_genai as og

    try:
        config = og.Config(str(directory))
        if share_buffer is not None:
            config.overlay(json.dumps({"search": {"past_present_share_buffer": share_buffer}}))
        model = og.Model(config)
        params = og.GeneratorParams(model)
        params.set_search_options(do_sample=False, num_beams=1, max_length=len(prompt_ids) + max_new_tokens)
        generator = og.Generator(model, params)
        generator.append_tokens(np.asarray([prompt_ids], dtype=np.int32))
        tokens: list[int] = []
        while not generator.is_done() and len(tokens) < max_new_tokens:
            generator.generate_next_token()
            tokens.append(int(generator.get_next_tokens()[0]))
    except RuntimeError as exc:  # onnxruntime-genai reports every failure as RuntimeError
        first = " ".join((str(exc).splitlines() or [""])[0].split())
        if "Status Message:" in first:  # ONNX Runtime's own reason, past the node's name and source location
            first = first.split("Status Message:", 1)[1].split("[ONNXRuntimeError] : 2 : ")[-1].strip()
        raise CheckpointError(str(directory), f"onnxruntime-genai cannot run it ({first[:400]})") from None
    return tokens
