"""Dependency drift: the cache calling convention, the shipped code's revision, and `surgery update-code`.

The wide-block cache tests in test_parallel.py are the behavioural check on the installed
transformers; `.ci/compat` runs them on the oldest and newest release pyproject allows. These tests
cover the mechanisms: the convention is read from signatures, an output records what it ships, an
outdated output is reported, and `update-code` repairs it without touching weights.
"""

from __future__ import annotations

import json
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from surgery import api
from surgery.cli import main
from surgery.compat import cache_keyword, output_cache, with_cache
from surgery.modeling_wide import CODE_REVISION, SHIPPED_FILES, TESTED_TRANSFORMERS, code_status, render
from tests.helpers import ROOT, digest_tree, load_wide
from tests.helpers import TINY_IDS as IDS


def test_cache_keyword_is_read_from_the_signature() -> None:
    def new(input_ids: Any, cache: Any = None, use_cache: bool = False) -> None: ...
    def old(input_ids: Any, past_key_values: Any = None, use_cache: bool = False) -> None: ...

    assert cache_keyword(new) == "cache"
    assert cache_keyword(old) == "past_key_values"

    class Old:
        forward = staticmethod(old)

    assert with_cache(Old(), "kv", use_cache=True) == {"use_cache": True, "past_key_values": "kv"}


def test_output_cache_reads_either_field() -> None:
    @dataclass
    class New:
        logits: Any = None
        cache: Any = "new"

    @dataclass
    class Old:
        logits: Any = None
        past_key_values: Any = "old"

    assert output_cache(New()) == "new"
    assert output_cache(Old()) == "old"


def test_tested_range_is_the_declared_range() -> None:
    """The range written into outputs and cards is pyproject's, which .ci/compat runs on both ends."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = next(Requirement(r) for r in project["dependencies"] if r.startswith("transformers"))
    assert declared.specifier == SpecifierSet(TESTED_TRANSFORMERS)


def _sha(directory: Path) -> dict[str, str]:
    return digest_tree(directory, "*.safetensors")


@pytest.fixture()
def wide_out(tiny_model: Callable[..., Path], tmp_path: Path) -> Path:
    out = tmp_path / "wide"
    api.parallel(tiny_model("llama"), out, groups="1-2", loop=2, quiet=True)
    return out


def test_output_records_revision_and_range(wide_out: Path) -> None:
    config = json.loads((wide_out / "config.json").read_text())
    assert config["surgery_code_revision"] == CODE_REVISION
    assert config["surgery_tested_transformers"] == TESTED_TRANSFORMERS
    assert f"tested with transformers {TESTED_TRANSFORMERS}" in (wide_out / "README.md").read_text()
    status = code_status(wide_out)
    assert status is not None and status.current and status.warning(wide_out) is None


def test_the_block_takes_the_cache_under_either_name(wide_out: Path) -> None:
    """Old-convention and new-convention callers both reach the cache (a dropped cache is the 5.24 bug)."""
    from transformers import DynamicCache

    wide = load_wide(wide_out)
    block = wide.model.layers[1]
    hidden = torch.randn(1, 3, wide.config.hidden_size)
    rotary = wide.model.rotary_emb(hidden, torch.arange(3)[None])
    for name in ("cache", "past_key_values"):
        cache = DynamicCache(config=wide.config)
        with torch.no_grad():
            block(hidden, attention_mask=None, position_embeddings=rotary, **{name: cache})
        assert cache.get_seq_length(1) == 3, name
    with pytest.raises(TypeError, match="twice"):
        block(hidden, position_embeddings=rotary, cache=DynamicCache(config=wide.config),
              past_key_values=DynamicCache(config=wide.config))


def _make_outdated(out: Path) -> None:
    """An output as an earlier layer-surgery wrote it: no revision fields, other shipped code."""
    config = json.loads((out / "config.json").read_text())
    del config["surgery_code_revision"], config["surgery_tested_transformers"]
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    modeling = out / "modeling_surgery_parallel.py"
    modeling.write_text(modeling.read_text().replace("cache = pop_cache(kwargs)", 'cache = kwargs.pop("past_key_values", None)'))


def test_outdated_code_is_reported_and_update_code_repairs_it(
    wide_out: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _make_outdated(wide_out)
    weights = _sha(wide_out)
    status = code_status(wide_out)
    assert status is not None and not status.current and status.revision == 1

    assert main(["inspect", str(wide_out), "--trust-remote-code"]) == 0
    captured = capsys.readouterr()
    assert "shipped modelling code: revision 1" in captured.out
    assert "surgery update-code" in captured.err and "older than" in captured.err

    assert main(["update-code", str(wide_out)]) == 0
    assert "revision 1 -> 2" in capsys.readouterr().out
    expected = render("llama")
    for name in SHIPPED_FILES:
        assert (wide_out / name).read_text() == expected[name]
    config = json.loads((wide_out / "config.json").read_text())
    assert config["surgery_code_revision"] == CODE_REVISION
    assert config["surgery_tested_transformers"] == TESTED_TRANSFORMERS
    assert _sha(wide_out) == weights  # weights untouched
    assert not list(wide_out.glob(".*.tmp"))  # no temporary files left

    assert main(["inspect", str(wide_out), "--trust-remote-code"]) == 0
    assert "update-code" not in capsys.readouterr().err
    assert main(["update-code", str(wide_out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["rewritten"] == []

    # The repaired output computes with the cache: cached logits equal uncached.
    wide = load_wide(wide_out)
    with torch.no_grad():
        full = wide(IDS, use_cache=False).logits
        first = wide(IDS[:, :4], use_cache=True)
        rest = wide(**with_cache(wide, output_cache(first), input_ids=IDS[:, 4:], use_cache=True))
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], dim=1), full, rtol=1e-5, atol=1e-5)


def test_update_code_refuses_a_model_that_is_not_a_wide_block(
    tiny_model: Callable[..., Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "pruned"
    api.prune(tiny_model("llama"), out, drop="1", quiet=True)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert main(["update-code", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not a wide-block output" in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert main(["update-code", str(tmp_path / "missing")]) == 2
    assert "no config.json" in capsys.readouterr().err
