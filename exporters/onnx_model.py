"""The PyTorch side of an ONNX export: the model loaded in fp32, decoder or encoder, the layout of its KV cache,
and position ids as ``transformers`` computes them for a padded batch."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from surgery.architecture import load_config
from surgery.checkpoint import read_json_object
from surgery.compat import output_cache
from surgery.errors import CheckpointError, SurgeryError, UnsupportedArchitectureError


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


def left_padded_positions(mask: np.ndarray) -> np.ndarray:
    """Position ids for a (left-)padded mask, as ``transformers`` computes them: cumsum - 1, 1 at padding."""
    positions = np.cumsum(mask, axis=-1) - 1
    return np.where(mask == 0, 1, positions).astype(np.int64)

