"""Tiny models that can read text: the tiny checkpoints of :mod:`tests.tiny` plus a tokenizer.

The tiny models have a vocabulary of 128 ids, so the tokenizer maps each ASCII character to its
code point (anything else to ``?``): real text becomes valid ids, and every measuring verb runs
end to end on a model of a few kilobytes.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from tests import tiny


def char_tokenizer(*, permuted: bool = False) -> Any:
    """A character tokenizer over the 128 ASCII code points.

    Args:
        permuted: map characters to ids in another order (same vocabulary size, different
            tokenizer), for the mismatched-tokenizer checks.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ids = list(range(tiny.VOCAB))
    if permuted:
        ids = ids[1:] + ids[:1]
    vocab = {chr(code): ids[code] for code in range(tiny.VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="?"))
    backend.normalizer = normalizers.Replace(Regex(r"[^\x00-\x7f]"), "?")
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="?")


def readable(name: str, directory: Path, *, source: Path | None = None, permuted: bool = False) -> Path:
    """A tiny checkpoint with a tokenizer in ``directory``: a copy of ``source``, or built fresh."""
    if source is not None:
        shutil.copytree(source, directory)
    else:
        tiny.save(name, directory)
    char_tokenizer(permuted=permuted).save_pretrained(directory)
    return directory

