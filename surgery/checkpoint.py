"""Reading a safetensors checkpoint without loading it: headers only, tensors by byte range.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor
name to ``{dtype, shape, data_offsets}``, then the raw tensor bytes. Parsing the header ourselves
gives the exact byte range of every tensor, which is what lets the writer copy tensors
kernel-side without ever holding a model in memory.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, TypeGuard

from surgery.errors import CheckpointError

# Bytes per element of every safetensors dtype (sub-byte types are refused: no layer model uses them).
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
INDEX_FILENAME = "model.safetensors.index.json"
# The largest safetensors header accepted (the cap safetensors itself applies), and the largest
# JSON file (index, config, tokenizer) read whole.
_MAX_HEADER = 100 * 1024 * 1024
MAX_JSON_BYTES = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file and the absolute byte range of its data."""

    name: str
    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def open_regular(path: Path) -> tuple[BinaryIO, int]:
    """Open a regular file for reading, never blocking on a FIFO or reading a device.

    The file is opened non-blocking and checked with ``fstat`` on the open descriptor, so a FIFO,
    a directory or a device such as ``/dev/zero`` is refused before a byte is read.

    Args:
        path: the file.

    Returns:
        ``(handle, size)``: the open binary handle (the caller closes it) and the size in bytes.

    Raises:
        NotRegularFileError: the path is a directory, FIFO, device or socket.
        OSError: the file is missing or cannot be opened.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "a.txt")
        >>> _ = open(p, "w").write("abc")
        >>> handle, size = open_regular(Path(p)); handle.close(); size
        3
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFileError(str(path), file_kind(info.st_mode))
        return os.fdopen(fd, "rb"), info.st_size
    except BaseException:
        os.close(fd)
        raise


class NotRegularFileError(OSError):
    """A path that is a directory, FIFO, device or socket where a regular file belongs."""

    def __init__(self, path: str, kind: str) -> None:
        super().__init__(errno.EINVAL, f"it is {kind}, not a regular file", path)
        self.kind = kind


def file_kind(mode: int) -> str:
    """What a non-regular file is, for messages: ``a directory``, ``a FIFO (named pipe)``, ``a device`` ..."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


class _DuplicateKeyError(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """``object_pairs_hook`` that refuses a key given twice (JSON would keep the last silently)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKeyError(key)
        out[key] = value
    return out


def _type_name(value: object) -> str:
    """The JSON name of a value's type, for messages: ``a list``, ``a string``, ``null`` ..."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "a whole number"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def is_count(value: object) -> TypeGuard[int]:
    """True for a non-negative whole number given as a JSON number (not a bool, a float or a string).

    Example:
        >>> is_count(3), is_count(-1), is_count("3"), is_count(True), is_count(3.0)
        (True, False, False, False, False)
    """
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def read_json_object(path: Path, what: str = "JSON file") -> dict[str, Any]:
    """Read a small JSON file that must hold one object (an index, a config, a tokenizer file).

    Args:
        path: the file.
        what: what the file is, for messages (``config``, ``safetensors index`` ...).

    Returns:
        The object.

    Raises:
        CheckpointError: missing, not a regular file, larger than :data:`MAX_JSON_BYTES`, not
            UTF-8, not valid JSON (or nested too deeply), or not an object; the message names the file.

    Example:
        >>> import tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "config.json")
        >>> _ = open(p, "w").write("[1, 2]")
        >>> read_json_object(Path(p), "config")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        surgery.errors.CheckpointError: ...config.json: is not a valid config (a list where an object belongs)
    """
    try:
        handle, size = open_regular(path)
        with handle:
            if size > MAX_JSON_BYTES:
                raise CheckpointError(str(path), f"is {size:,} bytes, over the {MAX_JSON_BYTES:,}-byte limit for a {what}")
            raw = handle.read(MAX_JSON_BYTES + 1)
    except CheckpointError:  # raised above; an OSError too, so it must pass the next handlers unwrapped
        raise
    except FileNotFoundError:
        raise CheckpointError(str(path), "is missing") from None
    except OSError as exc:
        raise CheckpointError(str(path), f"cannot be read ({exc.strerror or exc})") from None
    if len(raw) > MAX_JSON_BYTES:
        raise CheckpointError(str(path), f"is over the {MAX_JSON_BYTES:,}-byte limit for a {what}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise CheckpointError(str(path), f"is not a valid {what} (not UTF-8 text: line {line})") from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CheckpointError(str(path), f"is not a valid {what} (invalid JSON: {exc.msg} at line {exc.lineno} column {exc.colno})") from None
    except RecursionError:
        raise CheckpointError(str(path), f"is not a valid {what} (JSON nested too deeply)") from None
    if not isinstance(value, dict):
        raise CheckpointError(str(path), f"is not a valid {what} ({_type_name(value)} where an object belongs)")
    return value


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse one safetensors file's header, checking every entry before anything uses it.

    Checked: the header length against the file size and a 100 MB cap; the header is UTF-8 JSON
    (not nested deeply, no key given twice) holding an object; every entry is an object with a
    known ``dtype``, a ``shape`` of non-negative whole numbers and ``data_offsets`` of two
    non-negative whole numbers ``begin <= end`` inside the data section, whose length is
    ``prod(shape) x`` the dtype's size; no two tensors share bytes; ``__metadata__`` maps
    strings to strings.

    Args:
        path: a ``.safetensors`` file.

    Returns:
        ``(tensors, metadata)``: the entries by name in data order, and ``__metadata__``.

    Raises:
        CheckpointError: the file is missing, truncated, or its header is not valid safetensors;
            the message names the file and the tensor.

    Example:
        >>> import torch, safetensors.torch, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "x.safetensors")
        >>> safetensors.torch.save_file({"w": torch.zeros(2, 3)}, p)
        >>> read_header(Path(p))[0]["w"].shape
        (2, 3)
    """
    try:
        handle, size = open_regular(path)
        with handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(str(path), "is not a safetensors file (shorter than its 8-byte header length)")
            (length,) = struct.unpack("<Q", prefix)
            if length > _MAX_HEADER or 8 + length > size:
                raise CheckpointError(str(path), f"corrupt safetensors header (claims {length} header bytes in a {size}-byte file)")
            raw = handle.read(length)
    except CheckpointError:  # raised above; an OSError too, so it must pass the next handlers unwrapped
        raise
    except FileNotFoundError:
        raise CheckpointError(str(path), "is missing") from None
    except NotRegularFileError as exc:
        raise CheckpointError(str(path), f"is not a safetensors file ({exc.strerror})") from None
    except OSError as exc:
        raise CheckpointError(str(path), f"cannot be read ({exc.strerror or exc})") from None
    if len(raw) < length:
        raise CheckpointError(str(path), "corrupt safetensors header (the file is shorter than its header)")

    def corrupt(reason: str) -> CheckpointError:
        return CheckpointError(str(path), f"corrupt safetensors header ({reason})")

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError:
        raise corrupt("not UTF-8") from None
    except json.JSONDecodeError as exc:
        raise corrupt(f"not valid JSON: {exc.msg} at byte {exc.pos}") from None
    except RecursionError:
        raise corrupt("JSON nested too deeply") from None
    except _DuplicateKeyError as exc:
        raise corrupt(f"the key {exc.key!r} appears twice") from None
    if not isinstance(header, dict):
        raise corrupt(f"{_type_name(header)}, not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise corrupt("'__metadata__' must map strings to strings")
    base = 8 + length
    data_size = size - base
    entries: list[TensorEntry] = []
    for name, info in header.items():
        entries.append(_entry(path, name, info, base, data_size))
    entries.sort(key=lambda e: (e.start, e.end))
    previous: TensorEntry | None = None
    for entry in entries:
        if entry.end == entry.start:
            continue  # an empty tensor occupies no bytes
        if previous is not None and entry.start < previous.end:
            raise corrupt(f"tensors {previous.name!r} and {entry.name!r} overlap")
        previous = entry
    return {e.name: e for e in entries}, dict(metadata)


def _entry(path: Path, name: str, info: Any, base: int, data_size: int) -> TensorEntry:
    """One header entry, checked: dtype, shape, offsets inside the data section, bytes = numel x size."""

    def corrupt(reason: str) -> CheckpointError:
        return CheckpointError(str(path), f"corrupt safetensors header (tensor {name!r} {reason})")

    if not isinstance(info, dict):
        raise corrupt(f"is {_type_name(info)}, not an object with dtype, shape and data_offsets")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in info]
    if missing:
        raise corrupt(f"lacks {', '.join(missing)}")
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str):
        raise corrupt(f"has dtype {_type_name(dtype)}, not a dtype name such as 'F32'")
    if dtype not in DTYPE_SIZES:
        raise CheckpointError(str(path), f"tensor {name!r} has dtype {dtype[:40]!r}, which this tool does not handle")
    if not isinstance(shape, list) or not all(is_count(d) for d in shape):
        raise corrupt("has a shape that is not a list of non-negative whole numbers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(is_count(o) for o in offsets):
        raise corrupt("has data_offsets that are not two non-negative whole numbers")
    begin, finish = offsets
    if begin > finish:
        raise corrupt(f"has data_offsets [{begin}, {finish}] that run backwards")
    if finish > data_size:
        raise corrupt(f"ends at byte {finish} of a {data_size}-byte data section; is the file truncated?")
    # prod(shape) x size must equal finish - begin, which is at most the file size: stop multiplying
    # as soon as the product passes it, so that a shape of huge numbers costs nothing.
    expected = DTYPE_SIZES[dtype] if 0 not in shape else 0
    for dim in shape:
        expected *= dim
        if expected > data_size:
            break
    if expected != finish - begin:
        raise corrupt(f"has {finish - begin} bytes, but its shape and dtype need {'more' if expected > data_size else expected}")
    return TensorEntry(name, path, dtype, tuple(shape), base + begin, base + finish)


def read_index(model_dir: Path, *, pending: frozenset[str] | set[str] = frozenset()) -> dict[str, str] | None:
    """The ``weight_map`` of a directory's ``model.safetensors.index.json`` (tensor -> shard), checked.

    Args:
        model_dir: the model directory.
        pending: shards not downloaded yet (a Hub source): not required to exist.

    Returns:
        The weight map, or None when the directory has no index.

    Raises:
        CheckpointError: the index is not a JSON object with a ``weight_map`` object of tensor
            name -> shard file name; a shard name is not a ``.safetensors`` file inside the
            directory; or a named shard is missing (and not pending). The message names the file
            and the key.

    Example:
        >>> read_index(Path("no/such/dir")) is None
        True
    """
    index = model_dir / INDEX_FILENAME
    if not index.exists() and not index.is_symlink():
        return None
    body = read_json_object(index, "safetensors index")
    if "weight_map" not in body:
        raise CheckpointError(str(index), "is not a valid safetensors index (no 'weight_map')")
    weight_map = body["weight_map"]
    if not isinstance(weight_map, dict):
        raise CheckpointError(str(index), f"is not a valid safetensors index ('weight_map' is {_type_name(weight_map)}, not an object)")
    root = model_dir.resolve()
    checked: dict[str, bool] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise CheckpointError(
                str(index), f"is not a valid safetensors index (weight_map[{name!r}] is {_type_name(shard)}, not a file name)"
            )
        if shard not in checked:
            checked[shard] = _check_shard_name(index, root, name, shard, pending)
    return dict(weight_map)


def _check_shard_name(index: Path, root: Path, name: str, shard: str, pending: frozenset[str] | set[str]) -> bool:
    """Refuse a shard name that leaves the directory, is not ``.safetensors``, or names a missing file."""
    parts = PurePosixPath(shard).parts
    try:
        inside = (
            bool(shard)
            and str(PurePosixPath(shard)) == shard  # no "./x", "a//b" or "x/": one spelling per file
            and "\\" not in shard
            and "\x00" not in shard
            and not PurePosixPath(shard).is_absolute()
            and not any(part in ("..", ".") for part in parts)
            and shard.endswith(".safetensors")
            and (root / shard).resolve().is_relative_to(root)
        )
        present = inside and (shard in pending or (root / shard).is_file())
    except (ValueError, OSError):  # a name the file system cannot even encode
        inside = present = False
    if not inside:
        raise CheckpointError(
            str(index), f"weight_map[{name!r}] is {shard[:200]!r}, which is not a .safetensors file inside the model directory"
        )
    if not present:
        raise CheckpointError(str(index), f"weight_map[{name!r}] names {shard[:200]!r}, which is missing")
    return True


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory: those the index names, else every ``*.safetensors``.

    Raises:
        CheckpointError: the index is malformed or names a missing shard (see :func:`read_index`).
    """
    weight_map = read_index(model_dir)
    if weight_map is not None:
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    return sorted(model_dir.glob("*.safetensors"))


def read_tensor_index(model_dir: Path) -> dict[str, TensorEntry]:
    """Every tensor of a safetensors model directory, from the headers alone.

    A tensor stored in more than one file is taken from the shard the index names for it (the
    index is authoritative); without an index, or when the index does not name it, it is refused,
    never "the last file read wins".

    Raises:
        CheckpointError: no safetensors files, a file the index names is missing, a corrupt
            header, a tensor stored twice with no index entry saying which copy is meant, or an
            index that names a shard not holding the tensor (or a tensor no shard holds).
    """
    weight_map = read_index(model_dir)
    files = weight_files(model_dir)
    if not files:
        raise CheckpointError(str(model_dir), "has no .safetensors weights")
    index = model_dir / INDEX_FILENAME
    headers = {file: read_header(file)[0] for file in files}
    holders: dict[str, list[Path]] = {}
    for file, entries in headers.items():
        for name in entries:
            holders.setdefault(name, []).append(file)
    tensors: dict[str, TensorEntry] = {}
    for file, entries in headers.items():
        for name, entry in entries.items():
            where = holders[name]
            if weight_map is not None and name in weight_map:
                named = model_dir / weight_map[name]
                if named not in where:
                    raise CheckpointError(
                        str(index), f"weight_map[{name!r}] names {weight_map[name]!r}, but the tensor is stored in {where[0].name}"
                    )
                if file == named:
                    tensors[name] = entry
            elif len(where) > 1:
                why = "the index does not name it" if weight_map is not None else "there is no index to say which copy is meant"
                raise CheckpointError(
                    str(where[1]), f"tensor {name!r} is also stored in {where[0].name}, and {why}",
                    hint="keep one copy of each tensor, or list it in model.safetensors.index.json",
                )
            else:
                tensors[name] = entry
    if weight_map is not None:
        absent = [name for name in weight_map if name not in holders]
        if absent:
            raise CheckpointError(str(index), f"weight_map[{absent[0]!r}] names {weight_map[absent[0]]!r}, which does not hold it")
    return tensors


# The JSON files a transformers tokenizer is read from.
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
# Files that define a tokenizer's vocabulary or class. Without any of them a directory has no tokenizer:
# some transformers releases (5.0) then build an empty one of the config's default class instead of failing.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
    "vocab.json", "vocab.txt",
)


def has_tokenizer(model_dir: Path) -> bool:
    """Whether ``model_dir`` holds any file that defines a tokenizer (:data:`TOKENIZER_FILES`).

    Args:
        model_dir: a model directory.

    Returns:
        True when at least one of the files is there.

    Example:
        >>> import tempfile
        >>> has_tokenizer(Path(tempfile.mkdtemp()))
        False
    """
    return any((model_dir / name).exists() for name in TOKENIZER_FILES)


def check_tokenizer_files(model_dir: Path) -> None:
    """Check that every tokenizer JSON file present in ``model_dir`` is a readable JSON object.

    Args:
        model_dir: the model directory.

    Raises:
        CheckpointError: a file of :data:`TOKENIZER_JSON_FILES` that is not a regular file, not
            UTF-8, not valid JSON, or not an object; the message names the file.

    Example:
        >>> check_tokenizer_files(Path("no/such/dir"))  # no tokenizer files: nothing to check
    """
    for name in TOKENIZER_JSON_FILES:
        path = model_dir / name
        if path.exists() or path.is_symlink():
            read_json_object(path, "tokenizer file")


def tokenizer_error(model_dir: Path, exc: BaseException) -> CheckpointError | None:
    """The one-line error for a tokenizer that transformers could not load, naming the file at fault.

    Args:
        model_dir: the model directory.
        exc: what ``AutoTokenizer.from_pretrained`` raised.

    Returns:
        The error naming ``tokenizer.json`` (when the tokenizers library cannot read it on its own)
        or ``tokenizer_config.json``; None when the directory has no tokenizer files (no tokenizer,
        not a malformed one).

    Example:
        >>> tokenizer_error(Path("no/such/dir"), ValueError("x")) is None
        True
    """
    present = [name for name in TOKENIZER_JSON_FILES if (model_dir / name).exists()]
    if not present:
        return None
    culprit = present[0]
    if "tokenizer.json" in present:
        try:
            from tokenizers import Tokenizer

            Tokenizer.from_file(str(model_dir / "tokenizer.json"))
            culprit = next((n for n in present if n != "tokenizer.json"), "tokenizer.json")
        except Exception:  # the tokenizers library refuses the file itself: it is the one at fault
            culprit = "tokenizer.json"
    text = str(exc).strip()
    first = (text.splitlines()[0] if text else type(exc).__name__)[:300]
    return CheckpointError(str(model_dir / culprit), f"the tokenizer cannot be loaded ({type(exc).__name__}: {first})")
