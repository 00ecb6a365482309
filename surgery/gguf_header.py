"""A bounds check of a GGUF file's header, before the ``gguf`` library is asked to read it.

``gguf.GGUFReader`` trusts the counts in the header: a tensor count, a key-value count or a
string or array length of 2**63 makes it loop (practically forever) or build giant arrays. This
module walks the same header with ``struct`` and checks every count and length against the bytes
that are actually left in the file, every value type and tensor type against the known ones, and
every tensor's data range against the file size. It reads nothing but the header.

The layout (GGUF versions 2 and 3, either byte order): ``GGUF`` magic, u32 version, u64 tensor
count, u64 key-value count; each key-value is a string key (u64 length + UTF-8 bytes), a u32
value type and the value (arrays: u32 item type, u64 count, items); each tensor info is a string
name, u32 dimension count, u64 dimensions, u32 tensor type and u64 offset into the data section,
which starts at the next multiple of ``general.alignment`` (default 32).
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from surgery.checkpoint import open_regular
from surgery.errors import CheckpointError

SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
# GGML_MAX_DIMS is 4; a few more are allowed for future formats.
MAX_DIMS = 8
# Arrays nested deeper than this are refused (llama.cpp writes flat arrays only).
MAX_ARRAY_DEPTH = 4

# Value types: the size of each scalar type in bytes; 8 = string and 9 = array are variable.
_STRING, _ARRAY = 8, 9
_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_UINT32 = 4


class _Walker:
    """Reads the header fields in order, refusing any read past the end of the file."""

    def __init__(self, path: Path, data: mmap.mmap | bytes, size: int) -> None:
        self.path = path
        self.data = data
        self.size = size
        self.offset = 0
        self.order = "<"

    def fail(self, reason: str) -> CheckpointError:
        return CheckpointError(str(self.path), f"corrupt GGUF header ({reason})")

    def need(self, count: int, what: str) -> None:
        if count > self.size - self.offset:
            raise self.fail(f"{what} needs {count:,} bytes at offset {self.offset:,}, but the file has {self.size - self.offset:,} left")

    def unpack(self, fmt: str, what: str) -> int:
        width = struct.calcsize(fmt)
        self.need(width, what)
        (value,) = struct.unpack_from(self.order + fmt, self.data, self.offset)
        self.offset += width
        return int(value)

    def string(self, what: str) -> str:
        length = self.unpack("Q", f"the length of {what}")
        self.need(length, what)
        raw = bytes(self.data[self.offset : self.offset + length])
        self.offset += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def skip_strings(self, count: int, key: str) -> None:
        """Skip ``count`` strings (u64 length + bytes), each bounded by the bytes left in the file.

        The same checks as ``string`` per item, in one tight loop: a 49k-token vocabulary and its
        merges are ~100k items, which the general ``unpack``/``need`` calls took ~0.2 s to walk
        (half of a whole SmolLM2 prune); this loop takes milliseconds.
        """
        unpack = struct.Struct(self.order + "Q").unpack_from
        data, size, offset = self.data, self.size, self.offset
        for _ in range(count):
            if offset + 8 > size:
                self.offset = offset
                self.need(8, f"the length of an item of {key!r}")
            (length,) = unpack(data, offset)
            offset += 8
            if length > size - offset:
                self.offset = offset
                self.need(length, f"an item of {key!r}")
            offset += length
        self.offset = offset

    def value(self, kind: int, key: str, depth: int = 0) -> int | str | None:
        """Skip one value of ``kind``; returns it when it is a u32 (``general.alignment``) or a string."""
        if kind in _SCALAR_SIZES:
            if kind == _UINT32:
                return self.unpack("I", f"the value of {key!r}")
            self.need(_SCALAR_SIZES[kind], f"the value of {key!r}")
            self.offset += _SCALAR_SIZES[kind]
            return None
        if kind == _STRING:
            return self.string(f"the value of {key!r}")
        if kind != _ARRAY:
            raise self.fail(f"key {key!r} has unknown value type {kind}")
        if depth >= MAX_ARRAY_DEPTH:
            raise self.fail(f"key {key!r} nests arrays more than {MAX_ARRAY_DEPTH} deep")
        item = self.unpack("I", f"the item type of {key!r}")
        count = self.unpack("Q", f"the length of {key!r}")
        if item in _SCALAR_SIZES:
            self.need(count * _SCALAR_SIZES[item], f"the {count:,} items of {key!r}")
            self.offset += count * _SCALAR_SIZES[item]
            return None
        if item not in (_STRING, _ARRAY):
            raise self.fail(f"key {key!r} is an array of unknown type {item}")
        # Every string or array item takes at least 8 bytes (its length): bound the count first.
        self.need(count * 8, f"the {count:,} items of {key!r}")
        if item == _STRING:  # a vocabulary: bounds-checked and skipped, not decoded (the reader decodes what it uses)
            self.skip_strings(count, key)
            return None
        for _ in range(count):
            self.value(item, key, depth + 1)
        return None


def check_gguf(path: Path) -> None:
    """Check a GGUF file's header against its size before any GGUF reader trusts it.

    Args:
        path: the ``.gguf`` file.

    Raises:
        CheckpointError: not a regular file, not GGUF, an unsupported version, or a count,
            length, value type, tensor type or tensor data range that the file cannot hold;
            the message names the file and the field.

    Example:
        >>> import tempfile, os
        >>> p = Path(tempfile.mkdtemp()) / "x.gguf"
        >>> _ = p.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (2**62).to_bytes(8, "little") + bytes(8))
        >>> check_gguf(p)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        surgery.errors.CheckpointError: ...x.gguf: corrupt GGUF header (a tensor count of 4,611,686,018,427,387,904 ...)
    """
    from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

    with _mapped(path) as walker:
        _walk(walker, GGML_QUANT_SIZES, GGMLQuantizationType)


@contextmanager
def _mapped(path: Path) -> Iterator[_Walker]:
    """A walker over the file mapped read-only; a missing, irregular or too short file is refused."""
    try:
        handle, size = open_regular(path)
    except FileNotFoundError:
        raise CheckpointError(str(path), "is missing") from None
    except OSError as exc:
        raise CheckpointError(str(path), f"cannot be read ({exc.strerror or exc})") from None
    with handle:
        if size < 24:
            raise CheckpointError(str(path), f"is not a GGUF file ({size} bytes, shorter than a GGUF header)")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            yield _Walker(path, data, size)


def gguf_strings(path: Path, prefix: str = "general.") -> dict[str, str]:
    """The string values of a GGUF header whose keys start with ``prefix`` (the model's name, license ...).

    Reads only the key-value section with the same bounds checks as :func:`check_gguf`, and
    skips arrays (the tokenizer's vocabulary) without decoding them: milliseconds, where
    ``gguf.GGUFReader`` decodes every field first.

    Args:
        path: the ``.gguf`` file.
        prefix: keep keys starting with this.

    Returns:
        ``{key: value}`` for string-valued keys under ``prefix``.

    Raises:
        CheckpointError: not a regular file, not GGUF, or a header the file cannot hold.

    Example:
        >>> gguf_strings(Path("no/such.gguf"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        surgery.errors.CheckpointError: no/such.gguf: is missing
    """
    with _mapped(path) as walker:
        _, kv_count = _preamble(walker)
        found: dict[str, str] = {}
        for _ in range(kv_count):
            key = walker.string("a key")
            value = walker.value(walker.unpack("I", f"the value type of {key!r}"), key)
            if key.startswith(prefix) and isinstance(value, str):
                found[key] = value
        return found


def _preamble(walker: _Walker) -> tuple[int, int]:
    """Check the magic and version; return the tensor and key-value counts, bounded by the file size."""
    if bytes(walker.data[:4]) != b"GGUF":
        raise CheckpointError(str(walker.path), "is not a GGUF file (no GGUF magic)")
    walker.offset = 4
    version = walker.unpack("I", "the version")
    if version & 0xFFFF == 0:  # written on a machine of the other byte order
        walker.order = ">"
        version = struct.unpack(">I", struct.pack("<I", version))[0]
    if version not in SUPPORTED_VERSIONS:
        raise CheckpointError(str(walker.path), f"GGUF version {version} is not supported (versions 2 and 3 are)")
    tensor_count = walker.unpack("Q", "the tensor count")
    kv_count = walker.unpack("Q", "the key-value count")
    left = walker.size - walker.offset
    # A key-value takes at least 8 + 4 + 1 bytes, a tensor info at least 8 + 4 + 4 + 8.
    if kv_count * 13 > left:
        raise walker.fail(f"a key-value count of {kv_count:,} in a file with {left:,} bytes left")
    if tensor_count * 24 > left:
        raise walker.fail(f"a tensor count of {tensor_count:,} in a file with {left:,} bytes left")
    return tensor_count, kv_count


def _walk(walker: _Walker, quant_sizes: dict[Any, tuple[int, int]], quant_types: Callable[[int], Any]) -> None:
    tensor_count, kv_count = _preamble(walker)
    keys: set[str] = set()
    alignment = DEFAULT_ALIGNMENT
    for _ in range(kv_count):
        key = walker.string("a key")
        if key in keys:
            raise walker.fail(f"the key {key!r} appears twice")
        keys.add(key)
        kind = walker.unpack("I", f"the value type of {key!r}")
        value = walker.value(kind, key)
        if key == "general.alignment":
            if kind != _UINT32 or not isinstance(value, int) or value == 0 or value & (value - 1):
                raise walker.fail("general.alignment must be a u32 power of two")
            alignment = value
    tensors: list[tuple[str, int, int]] = []
    names: set[str] = set()
    for _ in range(tensor_count):
        name = walker.string("a tensor name")
        if name in names:
            raise walker.fail(f"tensor {name!r} appears twice")
        names.add(name)
        n_dims = walker.unpack("I", f"the dimension count of tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise walker.fail(f"tensor {name!r} has {n_dims:,} dimensions")
        elements = 1
        for _ in range(n_dims):
            elements *= walker.unpack("Q", f"a dimension of tensor {name!r}")
            elements = min(elements, walker.size * 256 + 1)  # past any size the file can hold; keep it small
        kind = walker.unpack("I", f"the type of tensor {name!r}")
        try:
            block, type_size = quant_sizes[quant_types(kind)]
        except (ValueError, KeyError):
            raise walker.fail(f"tensor {name!r} has unknown type {kind}") from None
        offset = walker.unpack("Q", f"the data offset of tensor {name!r}")
        tensors.append((name, offset, elements * type_size // block))
    start = -(-walker.offset // alignment) * alignment
    for name, offset, nbytes in tensors:
        if start + offset + nbytes > walker.size:
            raise walker.fail(
                f"tensor {name!r} needs bytes {start + offset:,} to {start + offset + nbytes:,} of a {walker.size:,}-byte file; "
                "is the file truncated?"
            )
