"""Checkpoint reading at its edges: which shards are read, which shard names are refused, what a
non-regular file is called, and which file a tokenizer error blames.

Written against the mutants that tests/test_malformed.py lets live (docs/development.md, "Mutation testing").
The checkpoints here are a few small tensors saved with safetensors (no model is built), and
every error is checked whole: ``PATH: REASON`` (surgery/errors.py ``CheckpointError``) is the
one line the CLI prints, so the path must be the file at fault and the reason must say why.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from surgery.checkpoint import (
    INDEX_FILENAME,
    NotRegularFileError,
    file_kind,
    open_regular,
    read_header,
    read_index,
    read_tensor_index,
    tokenizer_error,
    weight_files,
)
from surgery.errors import CheckpointError


def model_dir(root: Path, shards: dict[str, dict[str, torch.Tensor]], weight_map: dict[str, str] | None = None) -> Path:
    """A directory with these safetensors files and, when given, an index with this weight map."""
    root.mkdir(parents=True, exist_ok=True)
    for name, tensors in shards.items():
        save_file(tensors, str(root / name), metadata={"format": "pt"})
    if weight_map is not None:
        (root / INDEX_FILENAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return root


def checkpoint_error(call: object, *args: object) -> CheckpointError:
    assert callable(call)
    with pytest.raises(CheckpointError) as info:
        call(*args)
    return info.value


# -- what a file is ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "kind"),
    [
        (stat.S_IFDIR, "a directory"),
        (stat.S_IFIFO, "a FIFO (named pipe)"),
        (stat.S_IFCHR, "a device"),
        (stat.S_IFBLK, "a device"),
        (stat.S_IFSOCK, "a socket"),
        (stat.S_IFLNK, "not a regular file"),
    ],
)
def test_file_kind_names_each_kind(mode: int, kind: str) -> None:
    assert file_kind(mode | 0o644) == kind


def test_open_regular_refuses_with_the_path_and_the_kind(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    for path, kind in ((tmp_path, "a directory"), (fifo, "a FIFO (named pipe)")):
        with pytest.raises(NotRegularFileError) as info:
            open_regular(path)
        err = info.value
        assert isinstance(err, OSError) and err.errno == errno.EINVAL
        assert err.filename == str(path) and err.kind == kind
        assert err.strerror == f"it is {kind}, not a regular file"
    regular = tmp_path / "file"
    regular.write_bytes(b"12345")
    handle, size = open_regular(regular)
    with handle:
        assert size == 5 and handle.read() == b"12345"


def test_a_fifo_header_says_what_the_file_is(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "model.safetensors")
    err = checkpoint_error(read_header, tmp_path / "model.safetensors")
    assert str(err) == f"{tmp_path / 'model.safetensors'}: is not a safetensors file (it is a FIFO (named pipe), not a regular file)"


# -- which files and tensors are read ---------------------------------------------------------------


def test_no_weights_names_the_directory(tmp_path: Path) -> None:
    assert str(checkpoint_error(read_tensor_index, tmp_path)) == f"{tmp_path}: has no .safetensors weights"


def test_without_an_index_every_tensor_comes_from_its_file(tmp_path: Path) -> None:
    src = model_dir(tmp_path, {"a.safetensors": {"w": torch.ones(2, 3)}, "b.safetensors": {"v": torch.zeros(4)}})
    tensors = read_tensor_index(src)
    assert tensors == {**read_header(src / "a.safetensors")[0], **read_header(src / "b.safetensors")[0]}
    assert tensors["w"].file == src / "a.safetensors" and tensors["w"].shape == (2, 3) and tensors["w"].nbytes == 24


def test_the_index_chooses_the_files(tmp_path: Path) -> None:
    """Only the shards the index names are weights: a stray ``.safetensors`` file beside them is not read."""
    src = model_dir(
        tmp_path,
        {"a.safetensors": {"w": torch.ones(2)}, "b.safetensors": {"v": torch.ones(2)}, "stray.safetensors": {"s": torch.ones(2)}},
        {"w": "a.safetensors", "v": "b.safetensors"},
    )
    assert weight_files(src) == [src / "a.safetensors", src / "b.safetensors"]
    assert set(read_tensor_index(src)) == {"w", "v"}


def test_a_tensor_the_index_leaves_out_is_read_from_its_only_shard(tmp_path: Path) -> None:
    src = model_dir(tmp_path, {"a.safetensors": {"w": torch.ones(2), "extra": torch.zeros(3)}}, {"w": "a.safetensors"})
    tensors = read_tensor_index(src)
    assert tensors["extra"] == read_header(src / "a.safetensors")[0]["extra"]
    assert tensors["extra"].shape == (3,)


def test_a_duplicate_without_an_index_names_both_files(tmp_path: Path) -> None:
    src = model_dir(tmp_path, {"a.safetensors": {"w": torch.ones(2)}, "b.safetensors": {"w": torch.zeros(2)}})
    err = checkpoint_error(read_tensor_index, src)
    assert str(err) == (
        f"{src / 'b.safetensors'}: tensor 'w' is also stored in a.safetensors, and there is no index to say which copy is meant"
    )
    assert err.hint == "keep one copy of each tensor, or list it in model.safetensors.index.json"


def test_index_errors_name_the_index_the_tensor_and_the_shard(tmp_path: Path) -> None:
    # both shards are read (the index names each), but for w it names the one that does not hold it
    wrong = model_dir(tmp_path / "wrong", {"a.safetensors": {"w": torch.ones(2)}, "b.safetensors": {"v": torch.ones(2)}},
                      {"w": "b.safetensors", "v": "a.safetensors"})
    assert str(checkpoint_error(read_tensor_index, wrong)) == (
        f"{wrong / INDEX_FILENAME}: weight_map['w'] names 'b.safetensors', but the tensor is stored in a.safetensors"
    )
    ghost = model_dir(tmp_path / "ghost", {"a.safetensors": {"w": torch.ones(2)}}, {"w": "a.safetensors", "ghost": "a.safetensors"})
    assert str(checkpoint_error(read_tensor_index, ghost)) == (
        f"{ghost / INDEX_FILENAME}: weight_map['ghost'] names 'a.safetensors', which does not hold it"
    )


# -- shard names in the index -----------------------------------------------------------------------


def shard_name_error(root: Path, shard: str) -> str:
    src = model_dir(root, {"a.safetensors": {"w": torch.ones(2)}}, {"w": "a.safetensors", "v": shard})
    return str(checkpoint_error(read_index, src))


def not_inside(root: Path, shard: str) -> str:
    return f"{root / INDEX_FILENAME}: weight_map['v'] is {shard[:200]!r}, which is not a .safetensors file inside the model directory"


def test_a_backslash_name_is_refused_even_when_such_a_file_exists(tmp_path: Path) -> None:
    """A backslash is a separator on Windows: an index naming ``sub\\x.safetensors`` means another file there."""
    shard = "sub\\x.safetensors"
    save_file({"v": torch.ones(2)}, str(tmp_path / shard))
    assert shard_name_error(tmp_path, shard) == not_inside(tmp_path, shard)


def test_a_name_through_a_parent_is_refused_even_when_it_lands_inside(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    shard = "sub/../a.safetensors"  # one file, two spellings: the index must use the plain one
    assert shard_name_error(tmp_path, shard) == not_inside(tmp_path, shard)


def test_a_name_the_file_system_cannot_take_is_refused_and_shortened(tmp_path: Path) -> None:
    shard = "x" * 300 + ".safetensors"  # longer than a file name may be: checking it raises ENAMETOOLONG
    message = shard_name_error(tmp_path, shard)
    assert message == not_inside(tmp_path, shard)
    assert repr("x" * 200) in message and "x" * 201 not in message


def test_a_missing_shard_with_a_long_name_is_shortened(tmp_path: Path) -> None:
    shard = "y" * 230 + ".safetensors"
    assert shard_name_error(tmp_path, shard) == (
        f"{tmp_path / INDEX_FILENAME}: weight_map['v'] names {shard[:200]!r}, which is missing"
    )


# -- tokenizer errors -------------------------------------------------------------------------------


def good_tokenizer(path: Path) -> None:
    """A tokenizer.json the tokenizers library reads (a word-level vocabulary of two tokens)."""
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(path))


def test_no_tokenizer_files_is_no_tokenizer_error(tmp_path: Path) -> None:
    assert tokenizer_error(tmp_path, ValueError("x")) is None


def test_a_readable_tokenizer_json_points_at_the_other_files(tmp_path: Path) -> None:
    good_tokenizer(tmp_path / "tokenizer.json")
    (tmp_path / "special_tokens_map.json").write_text("{}")
    (tmp_path / "tokenizer_config.json").write_text("{}")
    err = tokenizer_error(tmp_path, ValueError("bad class"))
    assert err is not None
    # the first file after tokenizer.json in the order transformers reads them
    assert str(err) == f"{tmp_path / 'tokenizer_config.json'}: the tokenizer cannot be loaded (ValueError: bad class)"


def test_a_readable_tokenizer_json_alone_is_the_culprit(tmp_path: Path) -> None:
    good_tokenizer(tmp_path / "tokenizer.json")
    err = tokenizer_error(tmp_path, KeyError("k"))
    assert err is not None and str(err) == f"{tmp_path / 'tokenizer.json'}: the tokenizer cannot be loaded (KeyError: 'k')"


def test_an_unreadable_tokenizer_json_is_the_culprit(tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_text('{"model": 5}')
    (tmp_path / "tokenizer_config.json").write_text("{}")
    err = tokenizer_error(tmp_path, ValueError("x"))
    assert err is not None and str(err) == f"{tmp_path / 'tokenizer.json'}: the tokenizer cannot be loaded (ValueError: x)"


def test_without_tokenizer_json_the_first_file_present_is_blamed(tmp_path: Path) -> None:
    (tmp_path / "added_tokens.json").write_text("{}")
    (tmp_path / "special_tokens_map.json").write_text("{}")
    err = tokenizer_error(tmp_path, OSError("no"))
    assert err is not None and str(err) == f"{tmp_path / 'special_tokens_map.json'}: the tokenizer cannot be loaded (OSError: no)"


@pytest.mark.parametrize(
    ("exc", "shown"),
    [
        (ValueError(""), "ValueError: ValueError"),  # no text: the type is all there is
        (ValueError("  first line\nsecond line"), "ValueError: first line"),
        (RuntimeError("z" * 400), "RuntimeError: " + "z" * 300),
    ],
)
def test_tokenizer_error_keeps_one_short_line(tmp_path: Path, exc: BaseException, shown: str) -> None:
    (tmp_path / "tokenizer_config.json").write_text("{}")
    err = tokenizer_error(tmp_path, exc)
    assert err is not None
    assert str(err) == f"{tmp_path / 'tokenizer_config.json'}: the tokenizer cannot be loaded ({shown})"


# -- header entries ---------------------------------------------------------------------------------


def raw_safetensors(path: Path, header: dict[str, object], data_size: int) -> Path:
    """A safetensors file with exactly this JSON header and ``data_size`` zero bytes of data."""
    body = json.dumps(header).encode()
    path.write_bytes(len(body).to_bytes(8, "little") + body + bytes(data_size))
    return path


def test_a_tensor_with_a_zero_dimension_is_empty_whatever_its_other_dimensions(tmp_path: Path) -> None:
    # 0 elements take 0 bytes even beside a huge dimension (the size check stops early on huge products)
    path = raw_safetensors(tmp_path / "e.safetensors", {"e": {"dtype": "F32", "shape": [2**62, 0], "data_offsets": [0, 0]}}, 0)
    entry = read_header(path)[0]["e"]
    assert entry.shape == (2**62, 0) and entry.nbytes == 0 and entry.numel == 0


def test_a_shape_that_needs_more_than_the_data_section_is_refused_even_when_a_prefix_fits(tmp_path: Path) -> None:
    # 6 x 4 bytes fill the 24-byte section exactly; the second dimension (x2) needs 48
    path = raw_safetensors(tmp_path / "m.safetensors", {"w": {"dtype": "F32", "shape": [6, 2], "data_offsets": [0, 24]}}, 24)
    assert str(checkpoint_error(read_header, path)) == (
        f"{path}: corrupt safetensors header (tensor 'w' has 24 bytes, but its shape and dtype need more)"
    )


def test_a_short_tensor_after_another_counts_its_own_bytes(tmp_path: Path) -> None:
    header = {
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "F32", "shape": [2, 3], "data_offsets": [24, 40]},
    }
    path = raw_safetensors(tmp_path / "s.safetensors", header, 40)
    assert str(checkpoint_error(read_header, path)) == (
        f"{path}: corrupt safetensors header (tensor 'b' has 16 bytes, but its shape and dtype need 24)"
    )


def test_an_unknown_dtype_is_shown_shortened(tmp_path: Path) -> None:
    dtype = "Q" * 45
    path = raw_safetensors(tmp_path / "d.safetensors", {"w": {"dtype": dtype, "shape": [1], "data_offsets": [0, 1]}}, 1)
    assert str(checkpoint_error(read_header, path)) == f"{path}: tensor 'w' has dtype {'Q' * 40!r}, which this tool does not handle"


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"[]", "is not a valid safetensors index (a list where an object belongs)"),
        (b'{"metadata": {}}', "is not a valid safetensors index (no 'weight_map')"),
        (b'{"weight_map": 5}', "is not a valid safetensors index ('weight_map' is a whole number, not an object)"),
    ],
)
def test_index_errors_say_it_is_the_index(tmp_path: Path, content: bytes, reason: str) -> None:
    (tmp_path / INDEX_FILENAME).write_bytes(content)
    assert str(checkpoint_error(read_index, tmp_path)) == f"{tmp_path / INDEX_FILENAME}: {reason}"


# -- opening and reading files ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "shown"),
    [
        (b"null", "null"), (b"true", "a boolean"), (b"5", "a whole number"), (b"1.5", "a number"),
        (b'"s"', "a string"), (b"[1]", "a list"),
    ],
)
def test_read_json_object_names_what_it_found(tmp_path: Path, content: bytes, shown: str) -> None:
    from surgery.checkpoint import read_json_object

    (tmp_path / "config.json").write_bytes(content)
    err = checkpoint_error(read_json_object, tmp_path / "config.json", "config")
    assert str(err) == f"{tmp_path / 'config.json'}: is not a valid config ({shown} where an object belongs)"


def test_read_json_object_errors_name_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import surgery.checkpoint
    from surgery.checkpoint import read_json_object

    path = tmp_path / "tokenizer_config.json"
    assert str(checkpoint_error(read_json_object, path)) == f"{path}: is missing"
    under_a_file = path / "x.json"
    path.write_text("{}")
    assert str(checkpoint_error(read_json_object, under_a_file)) == f"{under_a_file}: cannot be read (Not a directory)"
    path.write_bytes(b'{"a": 1,\n "b": 2,\n "c": "\xff"}')
    err = checkpoint_error(read_json_object, path, "tokenizer file")
    assert str(err) == f"{path}: is not a valid tokenizer file (not UTF-8 text: line 3)"
    path.write_bytes(b'\xff{"a": 1}')
    assert str(checkpoint_error(read_json_object, path, "tokenizer file")) == (
        f"{path}: is not a valid tokenizer file (not UTF-8 text: line 1)"
    )
    path.write_bytes(b"[" * 100_000)
    assert str(checkpoint_error(read_json_object, path, "config")) == f"{path}: is not a valid config (JSON nested too deeply)"
    # the size cap: a file of exactly the cap is read, one byte more is refused before reading
    monkeypatch.setattr(surgery.checkpoint, "MAX_JSON_BYTES", 16)
    path.write_bytes(b'{"a": "' + b"x" * 7 + b'"}')
    assert path.stat().st_size == 16 and read_json_object(path) == {"a": "x" * 7}
    path.write_bytes(b'{"a": "' + b"x" * 8 + b'"}')
    message = str(checkpoint_error(read_json_object, path, "config"))
    assert message.startswith(f"{path}: ") and "is 17 bytes, over the 16-byte limit for a config" in message


def test_read_header_errors_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    assert str(checkpoint_error(read_header, path)) == f"{path}: is missing"
    path.write_bytes(b"1234567")
    assert str(checkpoint_error(read_header, path / "x")) == f"{path / 'x'}: cannot be read (Not a directory)"
    message = str(checkpoint_error(read_header, path))
    assert message.startswith(f"{path}: ") and "is not a safetensors file (shorter than its 8-byte header length)" in message
    # the length is an unsigned 64-bit number: all bits set is 2**64 - 1 bytes, not -1
    path.write_bytes(b"\xff" * 8 + b"{}")
    message = str(checkpoint_error(read_header, path))
    assert f"corrupt safetensors header (claims {2**64 - 1} header bytes in a 10-byte file)" in message
    path.write_bytes((1000).to_bytes(8, "little") + b"{}" + bytes(40))
    assert "corrupt safetensors header (claims 1000 header bytes in a 50-byte file)" in str(checkpoint_error(read_header, path))


def test_errors_raised_while_reading_name_the_file_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import surgery.checkpoint
    from surgery.checkpoint import read_json_object

    path = tmp_path / "model.safetensors"
    path.write_bytes(b"1234567")
    assert str(checkpoint_error(read_header, path)) == f"{path}: is not a safetensors file (shorter than its 8-byte header length)"
    path.write_bytes((1000).to_bytes(8, "little") + b"{}" + bytes(40))
    assert str(checkpoint_error(read_header, path)) == f"{path}: corrupt safetensors header (claims 1000 header bytes in a 50-byte file)"
    monkeypatch.setattr(surgery.checkpoint, "MAX_JSON_BYTES", 16)
    config = tmp_path / "config.json"
    config.write_bytes(b'{"a": "' + b"x" * 8 + b'"}')
    assert str(checkpoint_error(read_json_object, config, "config")) == f"{config}: is 17 bytes, over the 16-byte limit for a config"


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b'{"w": "\xff"}', "not UTF-8"),
        (b"[" * 100_000, "JSON nested too deeply"),
        (b'{"__metadata__": {"a": 1}}', "'__metadata__' must map strings to strings"),
    ],
)
def test_read_header_reasons(tmp_path: Path, raw: bytes, reason: str) -> None:
    path = tmp_path / "h.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw)
    assert str(checkpoint_error(read_header, path)) == f"{path}: corrupt safetensors header ({reason})"


def test_an_empty_tensor_does_not_hide_an_overlap_after_it(tmp_path: Path) -> None:
    header = {
        "e": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},  # sorts first, occupies nothing
        "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
        "b": {"dtype": "F32", "shape": [2, 3], "data_offsets": [12, 36]},
    }
    path = raw_safetensors(tmp_path / "o.safetensors", header, 36)
    assert str(checkpoint_error(read_header, path)) == f"{path}: corrupt safetensors header (tensors 'a' and 'b' overlap)"


def test_invalid_json_in_a_header_says_where(tmp_path: Path) -> None:
    raw = b'{"w": }'
    with pytest.raises(json.JSONDecodeError) as parsed:
        json.loads(raw)
    path = tmp_path / "j.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw)
    assert str(checkpoint_error(read_header, path)) == (
        f"{path}: corrupt safetensors header (not valid JSON: {parsed.value.msg} at byte {parsed.value.pos})"
    )


def test_a_json_file_is_called_a_json_file_by_default(tmp_path: Path) -> None:
    from surgery.checkpoint import read_json_object

    (tmp_path / "x.json").write_text("[]")
    assert str(checkpoint_error(read_json_object, tmp_path / "x.json")) == (
        f"{tmp_path / 'x.json'}: is not a valid JSON file (a list where an object belongs)"
    )


def test_a_shard_name_that_is_an_object_is_named_so(tmp_path: Path) -> None:
    (tmp_path / INDEX_FILENAME).write_text(json.dumps({"weight_map": {"w": {"file": "a.safetensors"}}}))
    assert str(checkpoint_error(read_index, tmp_path)) == (
        f"{tmp_path / INDEX_FILENAME}: is not a valid safetensors index (weight_map['w'] is an object, not a file name)"
    )
