"""A pipeline step: prune the embedded default model, load the result with stock transformers,
and generate a sentence.

Run: python examples/prune_and_generate.py [OUT]   (default OUT: out/smollm2-pruned)
"""

from __future__ import annotations

import sys
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

import surgery


def main(out: Path) -> str:
    # Drop layers 12 and 13 of SmolLM2-135M (30 -> 28). None = the embedded default model.
    result = surgery.prune(None, out, drop="12-13", force=True, quiet=True)
    print(f"{result.architecture.num_layers} -> {len(result.recipe.plan)} layers, "
          f"{result.source_params:,} -> {result.output_params:,} parameters, written to {out}")

    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    generated = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    text = tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    print(text)
    return text


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path("out/smollm2-pruned"))
