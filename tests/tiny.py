"""Tiny random checkpoints of many architectures, built from their configs with fixed seeds.

Each has 6 layers so that drops, repeats and reorders are all meaningful, and attention
settings (sliding windows, per-layer ``layer_types``) that make a wrong config rewrite visible
in the logits.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

NUM_LAYERS = 6
VOCAB = 128
# Sliding windows shorter than the test sequences, so a layer's attention type changes its output.
WINDOW = 4

_DECODER = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": NUM_LAYERS,
            "num_attention_heads": 4, "max_position_embeddings": 64}
MIXED_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "sliding_attention",
               "full_attention", "sliding_attention"]

CONFIGS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("LlamaForCausalLM", {**_DECODER, "model_type": "llama", "num_key_value_heads": 2, "tie_word_embeddings": False}),
    "llama-tied": ("LlamaForCausalLM", {**_DECODER, "model_type": "llama", "num_key_value_heads": 2, "tie_word_embeddings": True}),
    "mistral": ("MistralForCausalLM", {**_DECODER, "model_type": "mistral", "num_key_value_heads": 2, "sliding_window": None}),
    "qwen2": ("Qwen2ForCausalLM", {**_DECODER, "model_type": "qwen2", "num_key_value_heads": 2, "use_sliding_window": True,
                                   "sliding_window": WINDOW, "max_window_layers": 3}),
    "qwen3": ("Qwen3ForCausalLM", {**_DECODER, "model_type": "qwen3", "num_key_value_heads": 2, "head_dim": 8,
                                   "layer_types": MIXED_TYPES, "sliding_window": WINDOW, "use_sliding_window": True}),
    "gemma2": ("Gemma2ForCausalLM", {**_DECODER, "model_type": "gemma2", "num_key_value_heads": 2, "head_dim": 8,
                                     "sliding_window": WINDOW, "layer_types": MIXED_TYPES}),
    "gemma3": ("Gemma3ForCausalLM", {**_DECODER, "model_type": "gemma3_text", "num_key_value_heads": 2, "head_dim": 8,
                                     "sliding_window": WINDOW, "layer_types": MIXED_TYPES}),
    "phi3": ("Phi3ForCausalLM", {**_DECODER, "model_type": "phi3", "num_key_value_heads": 2, "pad_token_id": 0}),
    "gpt2": ("GPT2LMHeadModel", {"model_type": "gpt2", "vocab_size": VOCAB, "n_embd": 32, "n_layer": NUM_LAYERS,
                                  "n_head": 4, "n_positions": 64}),
    "gpt_neox": ("GPTNeoXForCausalLM", {**_DECODER, "model_type": "gpt_neox"}),
    "opt": ("OPTForCausalLM", {"model_type": "opt", "vocab_size": VOCAB, "hidden_size": 32, "ffn_dim": 48,
                               "num_hidden_layers": NUM_LAYERS, "num_attention_heads": 4, "max_position_embeddings": 64,
                               "word_embed_proj_dim": 32, "pad_token_id": 1}),
    "bert": ("BertModel", {"model_type": "bert", "vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 48,
                           "num_hidden_layers": NUM_LAYERS, "num_attention_heads": 4, "max_position_embeddings": 64}),
}
CAUSAL = [name for name, (cls, _) in CONFIGS.items() if cls != "BertModel"]
# Heads of 16: ONNX Runtime's GroupQueryAttention rotates inside only such heads (the fused ONNX graph's fast
# path). Kept out of CONFIGS, which the per-architecture tests sweep.
HEADS_OF_16: dict[str, tuple[str, dict[str, Any]]] = {
    "llama-h16": ("LlamaForCausalLM", {**_DECODER, "hidden_size": 64, "model_type": "llama", "num_key_value_heads": 2,
                                       "tie_word_embeddings": False}),
    "qwen2-h16": ("Qwen2ForCausalLM", {**_DECODER, "hidden_size": 64, "model_type": "qwen2", "num_key_value_heads": 2,
                                       "use_sliding_window": True, "sliding_window": WINDOW, "max_window_layers": 3}),
}


def build(name: str) -> Any:
    """The tiny model in fp32 with deterministic random weights (eval mode)."""
    import transformers

    class_name, values = CONFIGS[name] if name in CONFIGS else HEADS_OF_16[name]
    values = dict(values)
    config = transformers.AutoConfig.for_model(values.pop("model_type"), **values)
    config.architectures = [class_name]
    torch.manual_seed(0)
    model = getattr(transformers, class_name)(config)
    # Random init leaves norms at 1 and biases at 0; perturb everything so every tensor matters.
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    return model.eval()


def save(name: str, directory: Path, max_shard_size: int | None = None) -> Path:
    """Save the tiny model as safetensors (sharded when ``max_shard_size`` is given)."""
    import transformers

    transformers.logging.disable_progress_bar()  # fixtures are built lazily, inside tests that read stderr
    model = build(name)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, **kwargs)
    return directory
