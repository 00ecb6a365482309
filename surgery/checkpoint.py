"""Reading a safetensors checkpoint without loading it: headers only, tensors by byte range.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor
name to ``{dtype, shape, data_offsets}``, then the raw tensor bytes. Parsing the header ourselves
gives the exact byte range of every tensor, which is what lets the writer copy tensors
kernel-side without ever holding a model in memory.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from surgery.errors import CheckpointError

# Bytes per element of every safetensors dtype (sub-byte types are refused: no layer model uses them).
DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1,
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
INDEX_FILENAME = "model.safetensors.index.json"
_MAX_HEADER = 100 * 1024 * 1024


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


def read_header(path: Path) -> tuple[dict[str, TensorEntry], dict[str, str]]:
    """Parse one safetensors file's header.

    Args:
        path: a ``.safetensors`` file.

    Returns:
        ``(tensors, metadata)``: the entries by name in data order, and ``__metadata__``.

    Raises:
        CheckpointError: the file is missing, truncated, or its header is not valid safetensors.

    Example:
        >>> import torch, safetensors.torch, tempfile, os
        >>> p = os.path.join(tempfile.mkdtemp(), "x.safetensors")
        >>> safetensors.torch.save_file({"w": torch.zeros(2, 3)}, p)
        >>> read_header(Path(p))[0]["w"].shape
        (2, 3)
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as handle:
            prefix = handle.read(8)
            if len(prefix) < 8:
                raise CheckpointError(str(path), "is not a safetensors file (shorter than its 8-byte header length)")
            (length,) = struct.unpack("<Q", prefix)
            if length > _MAX_HEADER or 8 + length > size:
                raise CheckpointError(str(path), f"corrupt safetensors header (claims {length} header bytes in a {size}-byte file)")
            raw = handle.read(length)
    except FileNotFoundError:
        raise CheckpointError(str(path), "is missing") from None
    except IsADirectoryError:
        raise CheckpointError(str(path), "is a directory, not a safetensors file") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(str(path), "corrupt safetensors header (not valid JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(str(path), "corrupt safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    base = 8 + length
    entries: list[TensorEntry] = []
    for name, info in header.items():
        try:
            dtype = str(info["dtype"])
            shape = tuple(int(d) for d in info["shape"])
            begin, finish = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(str(path), f"corrupt safetensors header (entry {name!r} lacks dtype/shape/data_offsets)") from None
        if dtype not in DTYPE_SIZES:
            raise CheckpointError(str(path), f"tensor {name!r} has dtype {dtype}, which this tool does not handle")
        if finish - begin != math.prod(shape) * DTYPE_SIZES[dtype] or begin < 0 or base + finish > size:
            raise CheckpointError(str(path), f"corrupt safetensors header (tensor {name!r} has an impossible byte range; is the file truncated?)")
        entries.append(TensorEntry(name, path, dtype, shape, base + begin, base + finish))
    entries.sort(key=lambda e: e.start)
    return {e.name: e for e in entries}, {str(k): str(v) for k, v in metadata.items()}


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model directory: those the index names, else every ``*.safetensors``."""
    index = model_dir / INDEX_FILENAME
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise CheckpointError(str(index), "is not a valid safetensors index (no 'weight_map')") from None
        return [model_dir / name for name in names]
    return sorted(model_dir.glob("*.safetensors"))


def read_tensor_index(model_dir: Path) -> dict[str, TensorEntry]:
    """Every tensor of a safetensors model directory, from the headers alone.

    Raises:
        CheckpointError: no safetensors files, a file the index names is missing, a corrupt
            header, or a tensor stored twice.
    """
    files = weight_files(model_dir)
    if not files:
        raise CheckpointError(str(model_dir), "has no .safetensors weights")
    tensors: dict[str, TensorEntry] = {}
    for file in files:
        entries, _ = read_header(file)
        for name, entry in entries.items():
            if name in tensors:
                raise CheckpointError(str(file), f"tensor {name!r} is also stored in {tensors[name].file.name}")
            tensors[name] = entry
    return tensors
