"""The streaming writer: shards, dtype casts, tied embeddings, copied files, reproducible
recipes, an untouched source, and no output left behind by a failed run."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

import surgery
from surgery.checkpoint import read_tensor_index
from tests import tiny
from tests.helpers import digest_tree


def test_sharded_in_sharded_out(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    src = tiny_model("llama", max_shard_size=20_000)
    assert len(list(src.glob("*.safetensors"))) > 2  # the source really is sharded
    result = surgery.prune(src, tmp_path / "out", drop="2-3", max_shard_size="30KB", quiet=True)
    shards = sorted((tmp_path / "out").glob("*.safetensors"))
    assert len(shards) == len(result.shards) > 2
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == result.total_bytes
    assert "model.layers.3.mlp.up_proj.weight" in index["weight_map"]
    assert "model.layers.4.mlp.up_proj.weight" not in index["weight_map"]
    # each renamed tensor holds the bytes of its source layer
    src_tensors = read_tensor_index(src)
    out_tensors = read_tensor_index(tmp_path / "out")
    for new, old in [(2, 4), (3, 5), (0, 0)]:
        name = "model.layers.{}.self_attn.q_proj.weight"
        a, b = src_tensors[name.format(old)], out_tensors[name.format(new)]
        with open(a.file, "rb") as fa, open(b.file, "rb") as fb:
            fa.seek(a.start)
            fb.seek(b.start)
            assert fa.read(a.nbytes) == fb.read(b.nbytes)


def test_shard_size_is_respected_except_for_single_large_tensors(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    result = surgery.prune(tiny_model("llama"), tmp_path / "out", drop="0", max_shard_size=10_000, quiet=True)
    biggest_tensor = max(e.nbytes for e in read_tensor_index(tmp_path / "out").values())
    assert all(size <= max(10_000, biggest_tensor) for _, size in result.shards)


@pytest.mark.parametrize("dtype, torch_dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_dtype_cast(tiny_model: Callable[..., Path], tmp_path: Path, dtype: str, torch_dtype: torch.dtype) -> None:
    src = tiny_model("llama")
    surgery.prune(src, tmp_path / "out", drop="1", dtype=dtype, quiet=True)
    with safe_open(str(src / "model.safetensors"), "pt") as original, safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as cast:
        for name in cast.keys():
            assert cast.get_tensor(name).dtype == torch_dtype
        expected = original.get_tensor("model.layers.2.mlp.down_proj.weight").to(torch_dtype)
        assert torch.equal(cast.get_tensor("model.layers.1.mlp.down_proj.weight"), expected)
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["dtype"] == {"bf16": "bfloat16", "fp16": "float16"}[dtype]


def test_cast_is_chunked_and_exact(tiny_model: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cast in chunks smaller than a tensor gives the same bytes as one cast of the whole tensor."""
    import exporters.safetensors

    monkeypatch.setattr(exporters.safetensors, "_CAST_CHUNK_ELEMENTS", 37)
    surgery.prune(tiny_model("llama"), tmp_path / "out", drop="1", dtype="bf16", quiet=True)
    with safe_open(str(tiny_model("llama") / "model.safetensors"), "pt") as a, safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as b:
        assert torch.equal(b.get_tensor("model.embed_tokens.weight"), a.get_tensor("model.embed_tokens.weight").bfloat16())


def test_tied_embeddings_stay_tied(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    src = tiny_model("llama-tied")
    assert "lm_head.weight" not in read_tensor_index(src)
    surgery.prune(src, tmp_path / "out", drop="2", quiet=True)
    assert "lm_head.weight" not in read_tensor_index(tmp_path / "out")
    model = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_other_files_are_copied_and_card_of_source_is_not(minilm_dir: Path, tmp_path: Path) -> None:
    surgery.prune(minilm_dir, tmp_path / "out", drop="5", quiet=True)
    out = tmp_path / "out"
    for name in ["tokenizer.json", "vocab.txt", "special_tokens_map.json", "modules.json", "1_Pooling/config.json"]:
        assert (out / name).read_bytes() == (minilm_dir / name).read_bytes(), name
    # the source's README describes the 6-layer source model, not this one: OUT's README.md is this tool's card
    card = (out / "README.md").read_text()
    assert card != (minilm_dir / "README.md").read_text()
    assert "layer-surgery" in card and "layer 5 removed (6 → 5 layers)" in card


def test_recipe_reproduces_output_byte_for_byte(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    src = tiny_model("gemma3")
    surgery.apply(src, tmp_path / "first", "0-2,4,4,1", dtype="bf16", max_shard_size="20KB", quiet=True)
    surgery.apply(src, tmp_path / "second", recipe=tmp_path / "first" / "surgery-recipe.yaml", quiet=True)
    surgery.apply(src, tmp_path / "third", recipe=tmp_path / "first", quiet=True)  # the directory works too
    assert digest_tree(tmp_path / "first") == digest_tree(tmp_path / "second") == digest_tree(tmp_path / "third")
    assert len(digest_tree(tmp_path / "first")) > 3


def test_source_is_never_modified(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    src = tiny_model("qwen3")
    before = digest_tree(src)
    surgery.reorder(src, tmp_path / "out", reverse="0-5", dtype="fp16", quiet=True)
    assert digest_tree(src) == before
    with pytest.raises(surgery.errors.OptionError, match="overlaps the source"):
        surgery.prune(src, src / "inside", drop="1", quiet=True)
    assert digest_tree(src) == before


def test_failed_run_leaves_nothing(tiny_model: Callable[..., Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import surgery.engine

    def explode(*args: object, **kwargs: object) -> None:
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C while shards were being written

    monkeypatch.setattr(surgery.engine, "write_shards", explode)
    with pytest.raises(KeyboardInterrupt):
        surgery.prune(tiny_model("llama"), tmp_path / "out", drop="1", quiet=True)
    assert os.listdir(tmp_path) == []


def test_force_replaces_only_after_success(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    surgery.prune(tiny_model("llama"), out, drop="1", quiet=True)
    with pytest.raises(surgery.errors.OutputExistsError):
        surgery.prune(tiny_model("llama"), out, drop="2", quiet=True)
    surgery.prune(tiny_model("llama"), out, drop="2", force=True, quiet=True)
    assert "layers: 0-1,3-5" in (out / "surgery-recipe.yaml").read_text()
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_dry_run_writes_nothing_and_sizes_exactly(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    dry = surgery.prune(tiny_model("llama"), tmp_path / "dry", drop="1-2", dry_run=True)
    assert not (tmp_path / "dry").exists()
    real = surgery.prune(tiny_model("llama"), tmp_path / "real", drop="1-2", quiet=True)
    assert dry.shards == real.shards
    assert (tmp_path / "real" / "model.safetensors").stat().st_size > real.total_bytes  # header on top
    assert dry.output_params < dry.source_params
    assert "0 <- 0" in dry.summary() and "1 <- 3" in dry.summary()


def test_pickle_checkpoints_are_refused_unless_allowed(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    model = tiny.build("llama")
    src = tmp_path / "pickled"
    src.mkdir()
    model.config.save_pretrained(src)  # transformers 5 saves safetensors only: write the pickle ourselves
    torch.save(model.state_dict(), src / "pytorch_model.bin")
    with pytest.raises(surgery.errors.PickleRefusedError) as refused:
        surgery.prune(src, tmp_path / "out", drop="1", quiet=True)
    assert "--allow-pickle" in refused.value.one_line()
    assert not (tmp_path / "out").exists()
    surgery.prune(src, tmp_path / "out", drop="1", allow_pickle=True, quiet=True)
    surgery.prune(tiny_model("llama"), tmp_path / "from-safetensors", drop="1", quiet=True)
    a = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out")
    b = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "from-safetensors")
    ids = torch.arange(3, 15).unsqueeze(0)
    with torch.no_grad():
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=0, atol=0)
    assert a.config.num_hidden_layers == 5


def test_copied_tensors_keep_their_source_page_alignment(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    """The header is padded so that each copied tensor starts at its source offset modulo the page size
    (the kernel copies congruent ranges ~1.4x faster); the output still loads, equal to the source."""
    from exporters.safetensors import PAGE

    src = tiny_model("llama")
    surgery.prune(src, tmp_path / "out", drop="2-3", quiet=True)
    before, after = read_tensor_index(src), read_tensor_index(tmp_path / "out")
    renamed = {f"model.layers.{new}.": f"model.layers.{old}." for new, old in [(0, 0), (1, 1), (2, 4), (3, 5)]}
    by_shift: dict[int, int] = {}  # output offset - source offset, modulo the page: bytes
    for name, tensor in after.items():
        prefix = next((p for p in renamed if name.startswith(p)), None)
        origin = before[name.replace(prefix, renamed[prefix]) if prefix else name]
        shift = (tensor.start - origin.start) % PAGE
        by_shift[shift] = by_shift.get(shift, 0) + tensor.nbytes
    assert max(by_shift, key=lambda k: by_shift[k]) == 0, by_shift  # the most bytes are congruent with their source
    assert all(t.start % 8 == 0 for t in after.values())  # safetensors' own data alignment kept
    with safe_open(str(tmp_path / "out" / "model.safetensors"), "pt") as out, \
         safe_open(str(next(src.glob("*.safetensors"))), "pt") as source:
        assert torch.equal(out.get_tensor("model.layers.2.mlp.up_proj.weight"),
                           source.get_tensor("model.layers.4.mlp.up_proj.weight"))


def test_the_header_pads_to_where_most_copied_bytes_align(tmp_path: Path) -> None:
    """Two sources whose tensors sit at different page offsets: the data start follows the larger one,
    the header stays valid JSON (padded with spaces) and every tensor reads back equal."""
    from safetensors.torch import load_file, save_file

    from exporters.safetensors import PAGE, OutputTensor, data_residue, layout_shards, write_shards
    from surgery.checkpoint import read_header

    save_file({"big": torch.arange(6000, dtype=torch.float32)}, str(tmp_path / "a.safetensors"),
              metadata={"pad": "x" * 100})
    save_file({"small": torch.ones(100, dtype=torch.float32)}, str(tmp_path / "b.safetensors"))
    big, small = read_header(tmp_path / "a.safetensors")[0]["big"], read_header(tmp_path / "b.safetensors")[0]["small"]
    assert (big.start - 400) % PAGE != small.start % PAGE  # the two cannot both align
    tensors = [OutputTensor("small", small, "F32"), OutputTensor("big", big, "F32")]
    assert data_residue(tensors) == (big.start - 400) % PAGE  # big follows 400 bytes of small
    out = tmp_path / "out"
    out.mkdir()
    write_shards(out, layout_shards(tensors, 10**9))
    written = read_header(out / "model.safetensors")[0]
    assert (written["big"].start - big.start) % PAGE == 0 and written["small"].start % 8 == 0
    loaded = load_file(str(out / "model.safetensors"))
    assert torch.equal(loaded["big"], torch.arange(6000, dtype=torch.float32)) and torch.equal(loaded["small"], torch.ones(100))
    raw = (out / "model.safetensors").read_bytes()
    length = int.from_bytes(raw[:8], "little")
    assert json.loads(raw[8 : 8 + length])["big"]["data_offsets"] == [400, 24400]
    assert data_residue([OutputTensor("cast", big, "BF16")]) == 8  # a cast is not a copy: nothing to align


def test_a_large_run_that_cannot_align_starts_its_own_shard(tiny_sharded: Path, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """With the run threshold lowered to tiny sizes, the output of a sharded source is split where
    runs change alignment, so that nearly every byte keeps its source page offset; it still loads."""
    from exporters.safetensors import PAGE

    def congruent_share(out: Path) -> float:
        before, after = read_tensor_index(tiny_sharded), read_tensor_index(out)
        renamed = {f"model.layers.{new}.": f"model.layers.{old}." for new, old in [(0, 0), (1, 1), (2, 4), (3, 5)]}
        total = same = 0
        for name, tensor in after.items():
            prefix = next((p for p in renamed if name.startswith(p)), None)
            origin = before[name.replace(prefix, renamed[prefix]) if prefix else name]
            total += tensor.nbytes
            same += tensor.nbytes * ((tensor.start - origin.start) % PAGE == 0)
        return same / total

    one = surgery.prune(tiny_sharded, tmp_path / "one", drop="2-3", quiet=True)
    monkeypatch.setattr("exporters.safetensors.ALIGNED_RUN_BYTES", 1024)
    split = surgery.prune(tiny_sharded, tmp_path / "split", drop="2-3", quiet=True)
    assert len(one.shards) == 1 < len(split.shards)
    assert congruent_share(tmp_path / "one") < 0.5 < 0.95 < congruent_share(tmp_path / "split")
    a = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "one").state_dict()
    b = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "split").state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tensors_stored_back_to_back_are_copied_in_one_call(tiny_model: Callable[..., Path], tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs of source-contiguous tensors go through one copy_file_range each; the bytes are the same
    as a copy per tensor."""
    calls: list[int] = []
    real = os.copy_file_range

    def counted(src: int, dst: int, count: int, offset_src: int | None = None, offset_dst: int | None = None) -> int:
        calls.append(count)
        return real(src, dst, count, offset_src, offset_dst)

    src = tiny_model("llama")
    monkeypatch.setattr(os, "copy_file_range", counted)
    surgery.prune(src, tmp_path / "merged", drop="2-3", quiet=True)
    merged_calls = len(calls)
    monkeypatch.setattr("exporters.safetensors._RUN_CALL_BYTES", 1)  # no run may grow: a call per tensor
    surgery.prune(src, tmp_path / "single", drop="2-3", quiet=True)
    tensors = len(read_tensor_index(tmp_path / "single"))
    assert merged_calls < tensors // 2 and len(calls) - merged_calls == tensors
    assert (tmp_path / "merged" / "model.safetensors").read_bytes() == (tmp_path / "single" / "model.safetensors").read_bytes()


def test_only_copied_runs_split_shards_for_alignment(monkeypatch: pytest.MonkeyPatch) -> None:
    """A large computed or cast tensor has no source offset to keep: it never starts a shard of its own,
    where a large copied run off the shard's alignment does."""
    from exporters.safetensors import ComputedSource, OutputTensor, layout_shards
    from surgery.checkpoint import TensorEntry

    monkeypatch.setattr("exporters.safetensors.ALIGNED_RUN_BYTES", 1024)
    first = OutputTensor("a", TensorEntry("a", Path("s.safetensors"), "F32", (1024,), 4096, 8192), "F32")
    computed = OutputTensor("b", ComputedSource((1000,), lambda: torch.zeros(1000)), "F32")
    cast = OutputTensor("c", TensorEntry("c", Path("s.safetensors"), "F32", (1000,), 8192, 12192), "BF16")
    off = OutputTensor("d", TensorEntry("d", Path("s.safetensors"), "F32", (1024,), 12300, 16396), "F32")
    assert len(layout_shards([first, computed, cast], 10**9)) == 1
    assert [len(group) for _, group in layout_shards([first, computed, cast, off], 10**9)] == [3, 1]
