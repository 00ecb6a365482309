"""Malformed input (issue 12, section 6): every malformed file, range or count is a one-line error
(exit 2) naming the file and the key, never a traceback, a hang or a giant allocation, and nothing
is written at OUT.

Covered: safetensors headers, tensors stored in two shards, index files, config.json, tokenizer
files, layer ranges and counts, GGUF headers and ``--data`` files; then property-based tests
(hypothesis) that generate malformed headers, index files and configs and run the CLI on them.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import struct
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from surgery import corpus
from surgery.checkpoint import DTYPE_SIZES, INDEX_FILENAME, read_header, read_tensor_index
from surgery.corpus import read_texts
from surgery.errors import (
    CheckpointError,
    DataError,
    LayerIndexError,
    ParallelGroupError,
    PlanError,
    RangeSyntaxError,
    RecipeError,
    SurgeryError,
)
from surgery.gguf_header import check_gguf, gguf_strings
from surgery.plan import MAX_POSITIONS, ParallelGroup, Plan, Recipe, parse_ranges, parse_steps
from tests.helpers import assert_one_line_error, run_cli
from tests.tiny_text import readable

# -- helpers ---------------------------------------------------------------------------------------


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    """The CLI's exit code and stderr (SystemExit included)."""
    code, _, err = run_cli(capsys, *argv)
    return code, err


@contextlib.contextmanager
def no_hang(seconds: int = 30) -> Iterator[None]:
    """Fail the test (TimeoutError) instead of hanging, e.g. on a FIFO opened for reading."""

    def alarm(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"hung for {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def write_safetensors(path: Path, header: Any = None, data: bytes = b"", *, raw: bytes | None = None) -> Path:
    """A safetensors file with exactly this header (JSON, or ``raw`` bytes) and data section."""
    body = raw if raw is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    return path


def split_safetensors(path: Path) -> tuple[dict[str, Any], bytes]:
    """The header (as JSON) and the data section of a safetensors file."""
    blob = path.read_bytes()
    (length,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8 : 8 + length]), blob[8 + length :]


@pytest.fixture
def copy_model(tiny_model: Callable[..., Path], tmp_path: Path) -> Callable[..., Path]:
    """``copy_model(sharded=False)``: a private copy of the tiny llama to damage."""

    def make(sharded: bool = False) -> Path:
        target = tmp_path / ("sharded" if sharded else "single")
        shutil.copytree(tiny_model("llama", max_shard_size=20_000 if sharded else None), target)
        return target

    return make


W = {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}


# -- safetensors headers ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "data", "raw", "expected"),
    [
        pytest.param([], b"", None, "a list, not a JSON object", id="not-an-object"),
        pytest.param(None, bytes(24), b'{"w": ' + json.dumps(W).encode() + b', "w": ' + json.dumps(W).encode() + b"}",
                     "the key 'w' appears twice", id="duplicate-key"),
        pytest.param(None, b"", b'{"w": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply", id="deep-nesting"),
        pytest.param(None, b"", b'{"w": "\xff"}', "not UTF-8", id="not-utf8"),
        pytest.param({"w": 5}, b"", None, "tensor 'w' is a whole number, not an object", id="entry-not-object"),
        pytest.param({"w": {"dtype": "F32"}}, b"", None, "tensor 'w' lacks shape, data_offsets", id="missing-keys"),
        pytest.param({"w": {**W, "dtype": 5}}, bytes(24), None, "tensor 'w' has dtype a whole number", id="dtype-not-a-string"),
        pytest.param({"w": {**W, "dtype": "F4"}}, bytes(24), None, "tensor 'w' has dtype 'F4'", id="dtype-unknown"),
        pytest.param({"w": {**W, "shape": "2x3"}}, bytes(24), None, "tensor 'w' has a shape that is not", id="shape-not-a-list"),
        # -2 x -3 = 6 elements = 24 bytes: only the sign check refuses it.
        pytest.param({"w": {**W, "shape": [-2, -3]}}, bytes(24), None, "tensor 'w' has a shape that is not", id="shape-negative"),
        pytest.param({"w": {**W, "shape": ["2", "3"]}}, bytes(24), None, "tensor 'w' has a shape that is not", id="shape-strings"),
        pytest.param({"w": {**W, "shape": [2.0, 3]}}, bytes(24), None, "tensor 'w' has a shape that is not", id="shape-float"),
        pytest.param({"w": {**W, "shape": [True, 6]}}, bytes(24), None, "tensor 'w' has a shape that is not", id="shape-bool"),
        pytest.param({"w": {**W, "data_offsets": [0, 12, 24]}}, bytes(24), None, "tensor 'w' has data_offsets that are not",
                     id="offsets-three"),
        # [-24, 0] spans 24 bytes, as the shape needs: only the sign check refuses it.
        pytest.param({"w": {**W, "data_offsets": [-24, 0]}}, bytes(24), None, "tensor 'w' has data_offsets that are not",
                     id="offsets-negative"),
        pytest.param({"w": {**W, "data_offsets": [24, 0]}}, bytes(24), None, "tensor 'w' has data_offsets [24, 0] that run backwards",
                     id="offsets-backwards"),
        pytest.param({"w": {**W, "data_offsets": [24, 48]}}, bytes(24), None, "tensor 'w' ends at byte 48 of a 24-byte data section",
                     id="offsets-past-the-end"),
        pytest.param({"w": {**W, "data_offsets": [0, 20]}}, bytes(24), None, "tensor 'w' has 20 bytes, but its shape and dtype need 24",
                     id="bytes-not-shape-times-dtype"),
        pytest.param({"w": {**W, "shape": [2**62] * 64}}, bytes(24), None, "tensor 'w' has 24 bytes, but its shape and dtype need more",
                     id="huge-shape"),
        pytest.param({"a": W, "b": {**W, "data_offsets": [12, 36]}}, bytes(36), None, "tensors 'a' and 'b' overlap", id="overlap"),
        pytest.param({"__metadata__": ["x"], "w": W}, bytes(24), None, "'__metadata__' must map strings to strings", id="metadata-list"),
        pytest.param({"__metadata__": {"format": 1}, "w": W}, bytes(24), None, "'__metadata__' must map strings to strings",
                     id="metadata-values"),
    ],
)
def test_malformed_safetensors_headers_are_refused(
    tmp_path: Path, header: Any, data: bytes, raw: bytes | None, expected: str
) -> None:
    path = write_safetensors(tmp_path / "model.safetensors", header, data, raw=raw)
    with pytest.raises(CheckpointError) as info:
        read_header(path)
    assert str(path) in str(info.value)
    assert expected in str(info.value)
    assert len(info.value.one_line().splitlines()) == 1


def test_valid_header_with_empty_tensor_and_metadata_reads(tmp_path: Path) -> None:
    header = {"__metadata__": {"format": "pt"}, "w": W, "e": {"dtype": "F16", "shape": [0, 4], "data_offsets": [12, 12]}}
    tensors, metadata = read_header(write_safetensors(tmp_path / "x.safetensors", header, bytes(24)))
    assert metadata == {"format": "pt"}
    assert tensors["w"].shape == (2, 3) and tensors["e"].nbytes == 0


def test_header_length_is_capped_before_it_is_read(tmp_path: Path) -> None:
    """A header claiming 150 MB in a (sparse) 200 MB file is refused by the 100 MB cap, not read."""
    path = tmp_path / "big.safetensors"
    with path.open("wb") as handle:
        handle.write(struct.pack("<Q", 150 * 1024 * 1024))
        handle.truncate(200 * 1024 * 1024)
    with pytest.raises(CheckpointError, match="claims 157286400 header bytes"):
        read_header(path)


def test_safetensors_fifo_is_refused_without_hanging(
    capsys: pytest.CaptureFixture[str], copy_model: Callable[..., Path], tmp_path: Path
) -> None:
    src = copy_model()
    (src / "model.safetensors").unlink()
    os.mkfifo(src / "model.safetensors")
    with no_hang():
        code, err = run(capsys, "prune", str(src), str(tmp_path / "out"), "--drop", "1", "-q")
    assert_one_line_error(code, err, "model.safetensors", "FIFO")
    assert not (tmp_path / "out").exists()


# -- a tensor in two shards -------------------------------------------------------------------------


def _extra_shard(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path


def test_tensor_in_two_files_without_index_is_refused(
    capsys: pytest.CaptureFixture[str], copy_model: Callable[..., Path], tmp_path: Path
) -> None:
    src = copy_model()
    _extra_shard(src / "zz-extra.safetensors", {"model.norm.weight": torch.full((32,), 7.0)})
    code, err = run(capsys, "prune", str(src), str(tmp_path / "out"), "--drop", "1", "-q")
    assert_one_line_error(code, err, "'model.norm.weight' is also stored in", "no index")
    assert not (tmp_path / "out").exists()


def _add_to_index(src: Path, shard: str, names: list[str]) -> None:
    index = json.loads((src / INDEX_FILENAME).read_text())
    index["weight_map"].update(dict.fromkeys(names, shard))
    (src / INDEX_FILENAME).write_text(json.dumps(index))


def test_index_decides_which_copy_of_a_tensor_is_read(
    capsys: pytest.CaptureFixture[str], copy_model: Callable[..., Path], tmp_path: Path
) -> None:
    """A shard listed in the index (for another tensor) also holds a copy of model.norm.weight:
    the copy the index names is written, never the last one read."""
    src = copy_model(sharded=True)
    _extra_shard(src / "zz-extra.safetensors", {"model.norm.weight": torch.full((32,), 7.0), "extra.bias": torch.ones(2)})
    _add_to_index(src, "zz-extra.safetensors", ["extra.bias"])
    code, err = run(capsys, "prune", str(src), str(tmp_path / "out"), "--drop", "1", "-q")
    assert code == 0, err
    original = read_tensor_index(src)["model.norm.weight"]
    assert original.file.name != "zz-extra.safetensors"
    written = {}
    for shard in (tmp_path / "out").glob("*.safetensors"):
        written.update(load_file(str(shard)))
    with original.file.open("rb") as handle:
        handle.seek(original.start)
        expected = torch.frombuffer(bytearray(handle.read(original.nbytes)), dtype=torch.float32)
    assert torch.equal(written["model.norm.weight"], expected)
    assert not torch.equal(written["model.norm.weight"], torch.full((32,), 7.0))


def test_tensor_in_two_shards_that_the_index_does_not_name_is_refused(copy_model: Callable[..., Path]) -> None:
    src = copy_model(sharded=True)
    _extra_shard(src / "zz-a.safetensors", {"stray.weight": torch.ones(2), "a.bias": torch.ones(2)})
    _extra_shard(src / "zz-b.safetensors", {"stray.weight": torch.zeros(2), "b.bias": torch.ones(2)})
    _add_to_index(src, "zz-a.safetensors", ["a.bias"])
    _add_to_index(src, "zz-b.safetensors", ["b.bias"])
    with pytest.raises(CheckpointError, match="'stray.weight' is also stored in zz-a.safetensors, and the index does not name it"):
        read_tensor_index(src)


def test_index_naming_the_wrong_shard_is_refused(
    capsys: pytest.CaptureFixture[str], copy_model: Callable[..., Path], tmp_path: Path
) -> None:
    src = copy_model(sharded=True)
    index = json.loads((src / INDEX_FILENAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    holder = index["weight_map"]["model.norm.weight"]
    index["weight_map"]["model.norm.weight"] = next(s for s in shards if s != holder)
    (src / INDEX_FILENAME).write_text(json.dumps(index))
    code, err = run(capsys, "prune", str(src), str(tmp_path / "out"), "--drop", "1", "-q")
    assert_one_line_error(code, err, INDEX_FILENAME, "weight_map['model.norm.weight']", "which does not hold it")
    with pytest.raises(CheckpointError, match="but the tensor is stored in"):
        read_tensor_index(src)
    assert not (tmp_path / "out").exists()


# -- index files -----------------------------------------------------------------------------------


def _first(weight_map: dict[str, str]) -> str:
    return next(iter(weight_map))


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        pytest.param(lambda index: b"[]", "a list where an object belongs", id="a-list"),
        pytest.param(lambda index: b'{"weight_map": ', "invalid JSON", id="invalid-json"),
        pytest.param(lambda index: b'{"weight_map": "\xff"}', "not UTF-8", id="not-utf8"),
        pytest.param(lambda index: b"[" * 100_000, "nested too deeply", id="deep-nesting"),
        pytest.param(lambda index: {"metadata": {}}, "no 'weight_map'", id="no-weight-map"),
        pytest.param(lambda index: {"weight_map": list(index["weight_map"])}, "'weight_map' is a list", id="weight-map-a-list"),
        pytest.param(lambda index: {"weight_map": {**index["weight_map"], _first(index["weight_map"]): 3}},
                     "is a whole number, not a file name", id="value-a-number"),
        pytest.param(lambda index: {"weight_map": {**index["weight_map"], _first(index["weight_map"]): ["a.safetensors"]}},
                     "is a list, not a file name", id="value-a-list"),
        pytest.param(lambda index: {"weight_map": {**index["weight_map"], _first(index["weight_map"]): "../single/model.safetensors"}},
                     "not a .safetensors file inside the model directory", id="outside-the-directory"),
        pytest.param(lambda index: {"weight_map": {**index["weight_map"], _first(index["weight_map"]): "./" + index["weight_map"][_first(index["weight_map"])]}},
                     "not a .safetensors file inside the model directory", id="second-spelling"),
        pytest.param(lambda index: {"weight_map": {**index["weight_map"], _first(index["weight_map"]): "/etc/passwd"}},
                     "not a .safetensors file inside the model directory", id="absolute-path"),
        pytest.param(lambda index: {"weight_map": {**index["weight_map"], _first(index["weight_map"]): "config.json"}},
                     "not a .safetensors file inside the model directory", id="not-safetensors"),
        pytest.param(lambda index: {"weight_map": {**index["weight_map"], _first(index["weight_map"]): "model-00099-of-00099.safetensors"}},
                     "which is missing", id="missing-shard"),
    ],
)
def test_malformed_index_is_one_line(
    capsys: pytest.CaptureFixture[str], copy_model: Callable[..., Path], tmp_path: Path,
    damage: Callable[[dict[str, Any]], Any], expected: str,
) -> None:
    copy_model()  # ../single exists, so an escaping name points at a real file
    src = copy_model(sharded=True)
    damaged = damage(json.loads((src / INDEX_FILENAME).read_text()))
    (src / INDEX_FILENAME).write_bytes(damaged if isinstance(damaged, bytes) else json.dumps(damaged).encode())
    code, err = run(capsys, "prune", str(src), str(tmp_path / "out"), "--drop", "1", "-q")
    assert_one_line_error(code, err, INDEX_FILENAME, expected)
    assert not (tmp_path / "out").exists()


# -- config.json -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param(b"[]", "is not a valid config (a list where an object belongs)", id="a-list"),
        pytest.param(b'{"model_type": "llama",', "invalid JSON", id="invalid-json"),
        pytest.param(b'{"model_type": "ll\xffama"}', "not UTF-8", id="not-utf8"),
        pytest.param({"num_hidden_layers": "6"}, "config key 'num_hidden_layers' is '6', not a non-negative whole number",
                     id="layer-count-a-string"),
        pytest.param({"num_hidden_layers": 6.0}, "config key 'num_hidden_layers' is 6.0", id="layer-count-a-float"),
        pytest.param({"num_hidden_layers": 10**12}, "a layer count this tool handles (at most 100,000)", id="layer-count-huge"),
        pytest.param({"num_hidden_layers": None}, "num_hidden_layers", id="layer-count-null"),
        pytest.param({"hidden_size": [32]}, "config key 'hidden_size' is list", id="size-a-list"),
        pytest.param({"vocab_size": -1}, "config key 'vocab_size' is -1", id="size-negative"),
        pytest.param({"text_config": {"num_hidden_layers": "2"}}, "config key 'text_config.num_hidden_layers' is '2'",
                     id="nested-count-a-string"),
        pytest.param({"text_config": []}, "config key 'text_config' is list, not an object", id="nested-config-a-list"),
        pytest.param({"model_type": 5}, "config key 'model_type' is 5, not a string", id="model-type-a-number"),
        pytest.param({"architectures": "LlamaForCausalLM"}, "config key 'architectures' is 'LlamaForCausalLM', not a list",
                     id="architectures-a-string"),
        pytest.param({"architectures": ["logging"]}, "cannot be built from this config.json", id="architectures-not-a-model"),
    ],
)
def test_malformed_config_is_one_line(
    capsys: pytest.CaptureFixture[str], copy_model: Callable[..., Path], tmp_path: Path, change: Any, expected: str
) -> None:
    src = copy_model()
    if isinstance(change, bytes):
        (src / "config.json").write_bytes(change)
    else:
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**config, **change}))
    code, err = run(capsys, "prune", str(src), str(tmp_path / "out"), "--drop", "1", "-q")
    assert_one_line_error(code, err, expected)
    assert "config.json" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        pytest.param({"num_attention_heads": 0}, "transformers cannot read this config (ZeroDivisionError", id="heads-zero"),
        pytest.param({"rms_norm_eps": "small"}, "transformers cannot read this config", id="value-transformers-refuses"),
    ],
)
def test_config_transformers_refuses_is_one_line(
    capsys: pytest.CaptureFixture[str], copy_model: Callable[..., Path], tmp_path: Path, change: Any, expected: str
) -> None:
    # A prune reads config.json without transformers and carries values it does not use over unchanged;
    # the verbs that build the model (here a wide block) go through transformers' config class.
    src = copy_model()
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, **change}))
    code, err = run(capsys, "parallel", str(src), str(tmp_path / "out"), "--groups", "1-2", "-q")
    assert_one_line_error(code, err, expected)
    assert "config.json" in err
    assert not (tmp_path / "out").exists()


def test_config_fifo_is_refused_without_hanging(
    capsys: pytest.CaptureFixture[str], copy_model: Callable[..., Path], tmp_path: Path
) -> None:
    src = copy_model()
    (src / "config.json").unlink()
    os.mkfifo(src / "config.json")
    with no_hang():
        code, err = run(capsys, "inspect", str(src))
    assert_one_line_error(code, err, "config.json", "FIFO")


# -- tokenizer files -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        pytest.param("tokenizer.json", b'{"model": ', "tokenizer.json: is not a valid tokenizer file (invalid JSON", id="invalid-json"),
        pytest.param("tokenizer.json", b'{"model": 5}', "tokenizer.json: the tokenizer cannot be loaded", id="wrong-structure"),
        pytest.param("tokenizer_config.json", b"[]", "tokenizer_config.json: is not a valid tokenizer file (a list", id="config-a-list"),
        pytest.param("tokenizer_config.json", b"\xff\xfe", "tokenizer_config.json: is not a valid tokenizer file (not UTF-8",
                     id="config-not-utf8"),
    ],
)
def test_malformed_tokenizer_is_one_line(
    capsys: pytest.CaptureFixture[str], tiny_model: Callable[..., Path], tmp_path: Path, name: str, content: bytes, expected: str
) -> None:
    src = readable("llama", tmp_path / "readable", source=tiny_model("llama"))
    (src / name).write_bytes(content)
    data = tmp_path / "text.txt"
    data.write_text("To be, or not to be, that is the question. " * 20)
    code, err = run(capsys, "validate", str(src), "--plan", "0-2", "--data", str(data), "--max-tokens", "64",
                    "--seq-len", "32", "--prompts", "0", "--device", "cpu", "-q")
    assert_one_line_error(code, err, expected)


# -- ranges and counts -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(["prune", "--drop", "0-999999999999"], "layer 6 is out of range", id="drop"),
        pytest.param(["prune", "--keep", "0-99999999999"], "layer 6 is out of range", id="keep"),
        pytest.param(["repeat", "--layers", "0-999999999999"], "layer 6 is out of range", id="repeat-range"),
        pytest.param(["repeat", "--layers", "1-2", "--times", str(10**12)], "--times 1,000,000,000,000 would give", id="times"),
        pytest.param(["reorder", "--reverse", "0-999999999999"], "layer 6 is out of range", id="reverse"),
        pytest.param(["reorder", "--order", "0-999999999999"], "layer 6 is out of range", id="order"),
        pytest.param(["apply", "--layers", "0-99999999999"], "layer 6 is out of range", id="layers"),
        pytest.param(["apply", "--layers", "0-5," * 20_000 + "0"], "at most 100,000 are allowed", id="layers-many-items"),
        pytest.param(["apply", "--layers", "[0-99999999999]x2"], "crosses the end of the model", id="group-range"),
        pytest.param(["apply", "--layers", "[0-1]x1000000000000"], "more than the 100,000 layer positions", id="group-loop"),
        pytest.param(["apply", "--layers", "9" * 5000], "too large to be a layer index", id="5000-digits"),
        pytest.param(["parallel", "--groups", "1-999999999999"], "crosses the end of the model", id="parallel-range"),
        pytest.param(["parallel", "--groups", "1-2", "--loop", str(10**12)], "more than the 100,000 layer positions", id="loop"),
        pytest.param(["apply", "--layers", "0-5", "--max-shard-size", "9" * 400 + "TB"], "is too large", id="shard-size"),
    ],
)
def test_huge_ranges_and_counts_are_refused_before_allocating(
    capsys: pytest.CaptureFixture[str], tiny_model: Callable[..., Path], tmp_path: Path, args: list[str], expected: str
) -> None:
    verb, *rest = args
    code, err = run(capsys, verb, str(tiny_model("llama")), str(tmp_path / "out"), *rest, "-q")
    assert_one_line_error(code, err, expected)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("recipe", "expected"),
    [
        pytest.param("num_source_layers: 6\nlayers: 0-999999999999\n", "layer 6 is out of range", id="huge-range"),
        pytest.param("num_source_layers: 6\nlayers: ['[0-1]x1000000000000']\n", "more than the 100,000", id="huge-loop"),
        pytest.param("num_source_layers: 1000000000000\nlayers: 0-5\n", "models of at most 100,000 layers", id="huge-model"),
        pytest.param("num_source_layers: 6\nlayers: " + "[" * 50_000 + "]" * 50_000 + "\n", "nested too deeply", id="deep-yaml"),
    ],
)
def test_recipes_with_huge_ranges_are_refused(
    capsys: pytest.CaptureFixture[str], tiny_model: Callable[..., Path], tmp_path: Path, recipe: str, expected: str
) -> None:
    (tmp_path / "r.yaml").write_text(recipe)
    code, err = run(capsys, "apply", str(tiny_model("llama")), str(tmp_path / "out"), "--recipe", str(tmp_path / "r.yaml"), "-q")
    assert_one_line_error(code, err, expected)
    assert not (tmp_path / "out").exists()


def test_range_parser_caps_positions_before_building_lists() -> None:
    with pytest.raises(RangeSyntaxError, match="names 2,000,001 layers; at most 100,000"):
        parse_ranges("0-2000000")
    with pytest.raises(RangeSyntaxError, match="at most 100,000"):
        parse_ranges("0-60000,0-60000")  # each item under the cap, the two together over it
    with pytest.raises(RangeSyntaxError, match="at most 100,000"):
        parse_steps("0-60000,0-60000")
    with pytest.raises(LayerIndexError, match="layer 30 is out of range"):
        parse_ranges("0-999999999999", limit=30)
    with pytest.raises(ParallelGroupError, match="crosses the end"):
        parse_steps("[2-999999999999]", limit=30)
    assert len(parse_ranges(f"0-{MAX_POSITIONS - 1}")) == MAX_POSITIONS


def test_plan_length_is_capped_before_loops_unroll() -> None:
    groups = (ParallelGroup((0, 1), loop=60_000), ParallelGroup((2, 3), loop=60_000))
    with pytest.raises(PlanError, match="120,000 layer positions"):
        Plan(groups, 4)
    with pytest.raises(RecipeError, match="models of at most"):
        Recipe.from_yaml(f"num_source_layers: {MAX_POSITIONS + 1}\nlayers: 0\n")


# -- GGUF headers ----------------------------------------------------------------------------------


def _gs(text: bytes) -> bytes:
    return struct.pack("<Q", len(text)) + text


def _kv_u32(key: bytes, value: int) -> bytes:
    return _gs(key) + struct.pack("<II", 4, value)


def _kv_str(key: bytes, value: bytes) -> bytes:
    return _gs(key) + struct.pack("<I", 8) + _gs(value)


def _tensor(name: bytes, dims: list[int], kind: int = 0, offset: int = 0) -> bytes:
    return _gs(name) + struct.pack("<I", len(dims)) + b"".join(struct.pack("<Q", d) for d in dims) + struct.pack("<IQ", kind, offset)


def gguf_file(
    path: Path, *, kvs: list[bytes] | None = None, tensors: list[bytes] | None = None, data: bytes = bytes(16),
    magic: bytes = b"GGUF", version: int = 3, kv_count: int | None = None, tensor_count: int | None = None,
) -> Path:
    """A GGUF file; by default a valid one: one key (the architecture) and one F32 tensor of 4 values."""
    kvs = [_kv_str(b"general.architecture", b"llama")] if kvs is None else kvs
    tensors = [_tensor(b"t", [4])] if tensors is None else tensors
    head = magic + struct.pack("<IQQ", version, len(tensors) if tensor_count is None else tensor_count,
                               len(kvs) if kv_count is None else kv_count)
    body = head + b"".join(kvs) + b"".join(tensors)
    body += bytes(-len(body) % 32)
    path.write_bytes(body + data)
    return path


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        pytest.param({"magic": b"GGUX"}, "no GGUF magic", id="magic"),
        pytest.param({"version": 99}, "GGUF version 99 is not supported", id="version"),
        pytest.param({"tensor_count": 2**62}, "a tensor count of 4,611,686,018,427,387,904", id="tensor-count"),
        pytest.param({"kv_count": 2**62}, "a key-value count of 4,611,686,018,427,387,904", id="kv-count"),
        pytest.param({"kvs": [struct.pack("<Q", 2**62) + b"key"]}, "a key needs 4,611,686,018,427,387,904 bytes", id="key-length"),
        pytest.param({"kvs": [_kv_str(b"a", b"")[:-8] + struct.pack("<Q", 2**60)]}, "the value of 'a' needs", id="string-length"),
        pytest.param({"kvs": [_gs(b"tokens") + struct.pack("<IIQ", 9, 0, 2**60)]}, "the 1,152,921,504,606,846,976 items of 'tokens'",
                     id="array-count"),
        pytest.param({"kvs": [_gs(b"tokens") + struct.pack("<IIQ", 9, 8, 2**40)]}, "items of 'tokens' needs", id="string-array-count"),
        pytest.param({"kvs": [_gs(b"tokens") + struct.pack("<IIQ", 9, 8, 2) + _gs(b"ab") + struct.pack("<Q", 2**50)]},
                     "an item of 'tokens' needs 1,125,899,906,842,624 bytes", id="string-array-item-length"),
        pytest.param({"kvs": [_gs(b"x") + struct.pack("<II", 99, 0)]}, "key 'x' has unknown value type 99", id="value-type"),
        pytest.param({"kvs": [_kv_u32(b"general.alignment", 3)]}, "general.alignment must be a u32 power of two", id="alignment"),
        pytest.param({"kvs": [_kv_u32(b"a", 1), _kv_u32(b"a", 2)]}, "the key 'a' appears twice", id="duplicate-key"),
        pytest.param({"tensors": [_tensor(b"t", [4], kind=999)]}, "tensor 't' has unknown type 999", id="tensor-type"),
        pytest.param({"tensors": [_tensor(b"t", [2] * 20)]}, "tensor 't' has 20 dimensions", id="tensor-dims"),
        pytest.param({"tensors": [_tensor(b"t", [2**40, 2**40])]}, "is the file truncated?", id="tensor-huge"),
        pytest.param({"tensors": [_tensor(b"t", [4], offset=2**63)]}, "is the file truncated?", id="tensor-offset"),
        pytest.param({"tensors": [_tensor(b"t", [4]), _tensor(b"t", [4])]}, "tensor 't' appears twice", id="duplicate-tensor"),
        pytest.param({"data": b""}, "is the file truncated?", id="no-data"),
    ],
)
def test_malformed_gguf_headers_are_refused(tmp_path: Path, options: dict[str, Any], expected: str) -> None:
    path = gguf_file(tmp_path / "m.gguf", **options)
    with pytest.raises(CheckpointError) as info:
        check_gguf(path)
    assert str(path) in str(info.value) and expected in str(info.value)


def test_valid_gguf_header_passes_the_check(tmp_path: Path) -> None:
    check_gguf(gguf_file(tmp_path / "m.gguf", kvs=[_kv_u32(b"general.alignment", 32), _kv_str(b"general.architecture", b"llama")]))
    with pytest.raises(CheckpointError, match="shorter than a GGUF header"):
        (tmp_path / "short.gguf").write_bytes(b"GGUF")
        check_gguf(tmp_path / "short.gguf")


def test_gguf_strings_reads_the_keys_after_a_string_array(tmp_path: Path) -> None:
    # The vocabulary is skipped item by item: each item's length must move the walk exactly past it.
    vocab = _gs(b"tokens") + struct.pack("<IIQ", 9, 8, 3) + _gs(b"a") + _gs(b"") + _gs("\u00e9t\u00e9".encode())
    path = gguf_file(tmp_path / "m.gguf", kvs=[_kv_str(b"general.name", b"x"), vocab, _kv_str(b"general.license", b"mit")])
    check_gguf(path)
    assert gguf_strings(path) == {"general.name": "x", "general.license": "mit"}


def test_gguf_with_a_huge_array_is_one_line_and_never_hangs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, surgery_cache: Path
) -> None:
    """gguf's reader would loop 2**60 times over an array of bytes that are not there."""
    path = gguf_file(tmp_path / "bad.gguf", kvs=[_gs(b"tokens") + struct.pack("<IIQ", 9, 0, 2**60)])
    with no_hang(60):
        code, err = run(capsys, "prune", str(path), str(tmp_path / "out"), "--drop", "1", "-q")
    assert_one_line_error(code, err, "bad.gguf", "corrupt GGUF header")
    assert not (tmp_path / "out").exists()
    assert not list(surgery_cache.glob("gguf/.converting-*"))


@pytest.mark.parametrize(
    "kvs",
    [
        pytest.param([_kv_str(b"general.architecture", b"nonesuch")], id="unknown-architecture"),
        pytest.param([_kv_u32(b"general.architecture", 5)], id="architecture-a-number"),  # TypeError inside transformers
    ],
)
def test_gguf_that_passes_the_header_check_but_is_no_model_is_one_line(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, kvs: list[bytes]
) -> None:
    path = gguf_file(tmp_path / "empty.gguf", kvs=kvs)
    code, err = run(capsys, "prune", str(path), str(tmp_path / "out"), "--drop", "1", "-q")
    assert_one_line_error(code, err, "empty.gguf", "cannot be read as GGUF")
    assert not (tmp_path / "out").exists()


# -- --data ----------------------------------------------------------------------------------------


def test_data_directory_and_devices_are_refused(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="it is a directory, not a regular file"):
        read_texts(tmp_path)
    for device in ("/dev/zero", "/dev/urandom"):
        with no_hang(), pytest.raises(DataError, match="it is a device, not a regular file"):
            read_texts(device)


def test_data_fifo_is_refused_without_hanging(capsys: pytest.CaptureFixture[str], tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    fifo = tmp_path / "text.jsonl"
    os.mkfifo(fifo)
    with no_hang():
        code, err = run(capsys, "validate", str(tiny_model("llama")), "--plan", "0-2", "--data", str(fifo), "-q", "--device", "cpu")
    assert_one_line_error(code, err, "text.jsonl", "FIFO")


def test_data_over_the_cap_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(corpus, "MAX_DATA_BYTES", 10)
    (tmp_path / "big.txt").write_text("x" * 100)
    with pytest.raises(DataError, match="is 100 bytes; at most 10 are read"):
        read_texts(tmp_path / "big.txt")


@pytest.mark.parametrize(
    ("name", "content", "expected"),
    [
        pytest.param("a.txt", b"fine\nfine\nbad \xff here\n", "is not UTF-8 text (line 3)", id="not-utf8"),
        pytest.param("a.jsonl", b'{"text": "a"}\n[1, 2]\n', "line 2 is a list, not a JSON object with a 'text' field", id="line-a-list"),
        pytest.param("a.jsonl", b'"just a string"\n', "line 1 is a string, not a JSON object", id="line-a-string"),
        pytest.param("a.jsonl", b'{"text": 5}\n', "line 1 has no string field 'text' (it is a number)", id="text-a-number"),
        pytest.param("a.jsonl", b'{"text": null}\n', "line 1 has no string field 'text' (it is null)", id="text-null"),
        pytest.param("a.jsonl", b'{"body": "x"}\n', "line 1 has no string field 'text'", id="text-missing"),
        pytest.param("a.jsonl", b"[" * 100_000 + b"\n", "line 1 is not a JSON object (nested too deeply)", id="deep-nesting"),
    ],
)
def test_malformed_data_names_the_file_and_line(tmp_path: Path, name: str, content: bytes, expected: str) -> None:
    (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError) as info:
        read_texts(tmp_path / name)
    assert str(tmp_path / name) in str(info.value) and expected in str(info.value)


def test_jsonl_lines_end_at_newlines_only(tmp_path: Path) -> None:
    """U+2028 inside a JSON string is valid JSON; str.splitlines would cut the line there."""
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one\u2028two"}, ensure_ascii=False) + "\n", encoding="utf-8")
    assert read_texts(tmp_path / "a.jsonl").documents == ("one\u2028two",)


# -- property-based: generated malformed headers, index files and configs --------------------------

JSON_LEAVES = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=8)
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
                           max_leaves=12)
NEAR_ENTRIES = st.fixed_dictionaries(
    {
        "dtype": st.sampled_from([*DTYPE_SIZES, "F4", "f32"]) | JSON_LEAVES,
        "shape": st.lists(st.integers(-2, 5) | JSON_LEAVES, max_size=3),
        "data_offsets": st.lists(st.integers(-4, 80) | JSON_LEAVES, max_size=3),
    }
)
HEADERS = JSON_VALUES | st.dictionaries(st.text(max_size=4), NEAR_ENTRIES | JSON_VALUES, max_size=4)
FAST = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _read_or_refused(path: Path, data_size: int) -> None:
    """``read_header`` either refuses ``path`` with a CheckpointError naming it, or accepts it, and then
    every entry is consistent and inside the file's last ``data_size`` bytes, and no two share bytes."""
    size = path.stat().st_size
    try:
        tensors, metadata = read_header(path)
    except CheckpointError as exc:
        assert str(path) in str(exc)
        return
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    spans = []
    for entry in tensors.values():
        assert all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in entry.shape)
        assert entry.nbytes == math.prod(entry.shape) * DTYPE_SIZES[entry.dtype]
        assert size - data_size <= entry.start <= entry.end <= size
        if entry.nbytes:
            spans.append((entry.start, entry.end))
    spans.sort()
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:], strict=False))


@FAST
@given(header=HEADERS, data_size=st.integers(0, 80))
def test_any_json_header_is_read_or_refused_with_a_checkpoint_error(header: Any, data_size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _read_or_refused(write_safetensors(Path(tmp) / "x.safetensors", header, bytes(data_size)), data_size)


@FAST
@given(raw=st.binary(max_size=64), data_size=st.integers(0, 16))
def test_any_header_bytes_are_read_or_refused_with_a_checkpoint_error(raw: bytes, data_size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        _read_or_refused(write_safetensors(Path(tmp) / "x.safetensors", raw=raw, data=bytes(data_size)), data_size)


# Values that are never valid where a count, size, name or object belongs.
NOT_A_COUNT = (
    st.text(max_size=6) | st.floats(allow_nan=False) | st.booleans()
    | st.integers(max_value=-1) | st.lists(st.integers(0, 9), max_size=2) | st.dictionaries(st.text(max_size=3), st.integers(), max_size=2)
)
NOT_AN_OBJECT = st.lists(JSON_LEAVES, max_size=3) | st.text(max_size=6) | st.integers() | st.floats(allow_nan=False) | st.booleans()


@st.composite
def damaged_headers(draw: st.DrawFn, header: dict[str, Any]) -> dict[str, Any]:
    """The header of a valid file with exactly one thing broken."""
    header = json.loads(json.dumps(header))
    names = sorted(k for k in header if k != "__metadata__")
    name = draw(st.sampled_from(names))
    entry = header[name]
    begin, end = entry["data_offsets"]
    kind = draw(st.sampled_from(["entry", "drop-key", "dtype", "shape", "offsets", "metadata"]))
    if kind == "entry":
        header[name] = draw(NOT_AN_OBJECT)
    elif kind == "drop-key":
        del entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))]
    elif kind == "dtype":
        entry["dtype"] = draw(st.text(max_size=6).filter(lambda s: s not in DTYPE_SIZES) | JSON_LEAVES.filter(lambda v: not isinstance(v, str)))
    elif kind == "shape":
        size = DTYPE_SIZES[entry["dtype"]]
        entry["shape"] = draw(
            NOT_AN_OBJECT.filter(lambda v: not isinstance(v, list))
            | st.lists(NOT_A_COUNT, min_size=1, max_size=3)
            | st.lists(st.integers(0, 2**40), max_size=3).filter(lambda s: math.prod(s) * size != end - begin)
        )
    elif kind == "offsets":
        entry["data_offsets"] = draw(
            NOT_AN_OBJECT.filter(lambda v: not isinstance(v, list))
            | st.lists(st.integers(0, 10**6), min_size=3, max_size=4)
            | st.lists(NOT_A_COUNT, min_size=2, max_size=2)
            | st.tuples(st.integers(0, 10**7), st.integers(0, 10**7)).map(list).filter(lambda o: o != [begin, end])
            # the same length, shifted: onto a neighbour's bytes (the data section has no gaps) or past the end
            | st.integers(-min(begin, 64), 64).filter(lambda d: d != 0).map(lambda d: [begin + d, end + d])
        )
    else:
        header["__metadata__"] = draw(
            NOT_AN_OBJECT.filter(lambda v: v is not None)
            | st.dictionaries(st.text(max_size=4), NOT_A_COUNT.filter(lambda v: not isinstance(v, str)), min_size=1, max_size=2)
        )
    return header


def _cli_refuses(capsys: pytest.CaptureFixture[str], src: Path, out: Path, expected: str, *args: str) -> None:
    code, err = run(capsys, *args[:1], str(src), str(out), *args[1:], "-q")
    assert_one_line_error(code, err, expected)
    assert not out.exists()


@FAST
@given(data=st.data())
def test_cli_refuses_generated_malformed_safetensors_headers(
    capsys: pytest.CaptureFixture[str], tiny_model: Callable[..., Path], data: st.DataObject
) -> None:
    header, body = split_safetensors(tiny_model("llama") / "model.safetensors")
    damaged = data.draw(damaged_headers(header))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "m"
        shutil.copytree(tiny_model("llama"), src)
        write_safetensors(src / "model.safetensors", damaged, body)
        _cli_refuses(capsys, src, Path(tmp) / "out", "model.safetensors", "prune", "--drop", "1")


@st.composite
def damaged_indexes(draw: st.DrawFn, index: dict[str, Any]) -> Any:
    """A valid index with exactly one thing broken."""
    weight_map = dict(index["weight_map"])
    name = draw(st.sampled_from(sorted(weight_map)))
    kind = draw(st.sampled_from(["index", "weight_map", "value", "shard-name", "extra-tensor", "no-weight-map"]))
    if kind == "index":
        return draw(NOT_AN_OBJECT)
    if kind == "no-weight-map":
        return {"metadata": index.get("metadata", {})}
    if kind == "weight_map":
        return {**index, "weight_map": draw(NOT_AN_OBJECT)}
    if kind == "value":
        weight_map[name] = draw(NOT_A_COUNT.filter(lambda v: not isinstance(v, str)) | st.none())
    elif kind == "shard-name":
        weight_map[name] = draw(
            st.text(max_size=40).filter(lambda s: s != weight_map[name])
            | st.sampled_from(["../m/model.safetensors", "/etc/passwd", "./" + weight_map[name], weight_map[name] + "/", "config.json"])
        )
    else:  # the index names a tensor that no shard holds
        weight_map[draw(st.text(min_size=1, max_size=8).filter(lambda s: s not in weight_map))] = weight_map[name]
    return {**index, "weight_map": weight_map}


@FAST
@given(data=st.data())
def test_cli_refuses_generated_malformed_index_files(
    capsys: pytest.CaptureFixture[str], tiny_model: Callable[..., Path], data: st.DataObject
) -> None:
    sharded = tiny_model("llama", max_shard_size=20_000)
    damaged = data.draw(damaged_indexes(json.loads((sharded / INDEX_FILENAME).read_text())))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "m"
        shutil.copytree(sharded, src)
        (src / INDEX_FILENAME).write_text(json.dumps(damaged))
        # Every tensor is needed by the identity plan, so a wrong entry for any of them must be found.
        _cli_refuses(capsys, src, Path(tmp) / "out", INDEX_FILENAME, "apply", "--layers", "0-5")


@st.composite
def damaged_configs(draw: st.DrawFn, config: dict[str, Any]) -> Any:
    """A valid config with exactly one value of the wrong type (or not an object at all)."""
    config = dict(config)
    kind = draw(st.sampled_from(["config", "count", "model_type", "architectures", "nested"]))
    if kind == "config":
        return draw(NOT_AN_OBJECT)
    if kind == "count":
        key = draw(st.sampled_from(["num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                                    "num_key_value_heads", "vocab_size", "max_position_embeddings"]))
        config[key] = draw(NOT_A_COUNT)
    elif kind == "model_type":
        config["model_type"] = draw(NOT_A_COUNT.filter(lambda v: not isinstance(v, str)))
    elif kind == "architectures":
        config["architectures"] = draw(
            NOT_AN_OBJECT.filter(lambda v: not isinstance(v, list)) | st.lists(NOT_A_COUNT.filter(lambda v: not isinstance(v, str)), min_size=1)
        )
    else:
        config["text_config"] = draw(NOT_AN_OBJECT)
    return config


@FAST
@given(data=st.data())
def test_cli_refuses_generated_malformed_configs(
    capsys: pytest.CaptureFixture[str], tiny_model: Callable[..., Path], data: st.DataObject
) -> None:
    damaged = data.draw(damaged_configs(json.loads((tiny_model("llama") / "config.json").read_text())))
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "m"
        shutil.copytree(tiny_model("llama"), src)
        (src / "config.json").write_text(json.dumps(damaged))
        _cli_refuses(capsys, src, Path(tmp) / "out", "config.json", "prune", "--drop", "1")


def test_errors_are_typed_surgery_errors(tmp_path: Path) -> None:
    """The library raises the typed errors the CLI turns into one line (and that subclass builtins)."""
    path = write_safetensors(tmp_path / "x.safetensors", {"w": 5})
    with pytest.raises(CheckpointError) as info:
        read_header(path)
    assert isinstance(info.value, SurgeryError) and isinstance(info.value, OSError)
    assert info.value.path == str(path)
