"""The model card every output carries: its metadata, its body, and the validation update (issue #5)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from huggingface_hub import ModelCard

import surgery
from exporters.card import (
    CARD_FILENAME,
    build_card,
    card_metadata_fields,
    metadata_yaml,
    set_card_repo_id,
    update_card_with_validation,
    validate_card,
)
from surgery.architecture import detect
from surgery.checkpoint import read_tensor_index
from surgery.cli import main
from surgery.engine import SurgeryResult
from surgery.errors import ModelCardError
from surgery.plan import RECIPE_FILENAME, Plan, Recipe
from surgery.source import Source

REPORT = {"text": "wikitext-2 test, first 512 tokens", "tokens": 512, "kl": 0.0421, "top1": 0.912,
          "ppl_original": 11.84, "ppl_new": 13.07}


def _params(directory: Path) -> int:
    return sum(e.numel for e in read_tensor_index(directory).values())


def test_prune_writes_a_card_that_parses_and_tells_the_truth(tiny_sharded: Path, tmp_path: Path) -> None:
    out = tmp_path / "pruned"
    result = surgery.prune(tiny_sharded, out, drop="1-3", quiet=True)
    card = ModelCard.load(out / CARD_FILENAME)
    meta = card.data.to_dict()
    assert meta["base_model"] == tiny_sharded.name  # a local source: the path's name
    assert meta["library_name"] == "transformers"
    assert meta["tags"] == ["pruned", "layer-surgery"]
    assert meta["pipeline_tag"] == "text-generation"
    assert "license" not in meta and "base_model_relation" not in meta  # nothing to carry, no relation applies
    text = card.text
    assert "layers 1-3 removed (6 → 3 layers)" in text
    # the recipe, verbatim, so that anyone can rebuild it
    assert (out / RECIPE_FILENAME).read_text().rstrip("\n") in text
    # the layer map
    assert "| 0 | 0 |\n| 1 | 4 |\n| 2 | 5 |" in text
    # parameters before (the whole source, every shard) and after
    assert f"| source | 6 | {_params(tiny_sharded):,} |" in text
    assert f"| this model | 3 | {_params(out):,} |" in text
    assert result.output_params == _params(out)
    assert "Not validated yet" in text
    assert 'AutoModelForCausalLM.from_pretrained("path/to/this/directory")' in text
    assert text.startswith(f"\n# {tiny_sharded.name}: pruned\n")
    assert "trust_remote_code" not in text


@pytest.mark.parametrize(("verb", "args", "tag", "phrase"), [
    ("repeat", ["--layers", "2-3", "--times", "2"], "layer-repeated", "layers 2-3 repeated (6 → 8 layers)"),
    ("reorder", ["--reverse", "1-4"], "layer-reordered", "the layer order changed (6 → 6 layers)"),
])
def test_cli_verbs_tag_their_operation(tiny_model: Callable[..., Path], tmp_path: Path, verb: str, args: list[str],
                                       tag: str, phrase: str) -> None:
    out = tmp_path / verb
    assert main([verb, str(tiny_model("llama")), str(out), "-q", "--dtype", "bf16", *args]) == 0
    card = validate_card(out / CARD_FILENAME)
    assert card.data.get("tags") == [tag, "layer-surgery"]
    assert phrase in card.text
    assert "cast to bf16" in card.text


def test_license_is_carried_over_from_the_source_card(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    source = tmp_path / "src"
    shutil.copytree(tiny_model("llama"), source)
    (source / CARD_FILENAME).write_text(
        "---\nlicense: other\nlicense_name: tiny-license\nlicense_link: LICENSE\ntags: [original]\n---\n# Source\n"
    )
    surgery.prune(source, tmp_path / "out", keep="0-2", quiet=True)
    meta = validate_card(tmp_path / "out" / CARD_FILENAME).data.to_dict()
    assert (meta["license"], meta["license_name"], meta["license_link"]) == ("other", "tiny-license", "LICENSE")
    assert meta["tags"] == ["pruned", "layer-surgery"]  # the source's own tags are not claimed


def test_a_source_inside_a_hub_cache_names_its_repo(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    snapshot = tmp_path / "hub" / "models--some-org--tiny-llama" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_model("llama"), snapshot)
    surgery.prune(snapshot, tmp_path / "out", drop="5", quiet=True)
    card = validate_card(tmp_path / "out" / CARD_FILENAME)
    assert card.data.get("base_model") == "some-org/tiny-llama"
    assert "[some-org/tiny-llama](" in card.text


def test_a_wide_block_model_is_loaded_with_trust_remote_code(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    """A parallel-merged plan: the merge relation, its tag, the group in the layer map, remote code to load."""
    source_dir = tiny_model("llama")
    names = list(read_tensor_index(source_dir))
    plan = Plan.from_ranges("0,[1-2]x2,3-5", 6)
    result = SurgeryResult(out=tmp_path / "wide", recipe=Recipe(plan, source="tiny"),
                           architecture=detect(source_dir, names), shards=[("model.safetensors", 10)],
                           source_params=1, output_params=1, dry_run=False)
    directory = tmp_path / "staging"
    directory.mkdir()
    config = json.loads((source_dir / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_wide.WideForCausalLM"}
    (directory / "config.json").write_text(json.dumps(config))
    card = validate_card(build_card(directory, result, Source("tiny", source_dir)))
    assert card.data.get("base_model_relation") == "merge"
    assert card.data.get("tags") == ["layer-repeated", "parallel-merged", "layer-surgery"]
    assert ("with layers 1-2 run in parallel on the same input with their outputs averaged, applied 2 times in a row "
            "(6 layers → 6 layer applications in 5 blocks)") in card.text
    assert "| 1 | 1-2 in parallel (`[1-2]x2`) |\n| 2 | 1-2 in parallel (`[1-2]x2`) |" in card.text
    assert 'from_pretrained("path/to/this/directory", trust_remote_code=True)' in card.text


def test_validation_results_update_the_card(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    surgery.prune(tiny_model("llama"), out, drop="2", quiet=True)
    before = (out / CARD_FILENAME).read_text()
    update_card_with_validation(out, REPORT)
    text = validate_card(out / CARD_FILENAME).text
    assert "Not validated yet" not in text
    assert "| wikitext-2 test, first 512 tokens | 512 | 0.0421 | 91.2% | 11.84 | 13.07 |" in text
    # running it again replaces the table; several texts give several rows
    update_card_with_validation(out, [REPORT, {"text": "c4 sample", "kl": 0.1}])
    text = (out / CARD_FILENAME).read_text()
    assert text.count("| text | tokens |") == 1
    assert "| c4 sample | — | 0.1 | — | — | — |" in text
    # the body outside the validation section is untouched (the metadata gains the results)
    body_before, body = ModelCard(before).text, ModelCard(text).text
    head = body_before.split("<!-- layer-surgery:validation -->")[0]
    tail = body_before.split("<!-- /layer-surgery:validation -->")[1]
    assert body.startswith(head) and body.endswith(tail)
    assert {k: v for k, v in ModelCard(text).data.to_dict().items() if k not in ("layer_surgery", "model-index")} == \
        ModelCard(before).data.to_dict()


@pytest.mark.parametrize("report", [
    {"kl": 0.1},  # no text
    {"text": "x"},  # no metric
    {"text": "x", "top1": 91.2},  # a percentage, not a fraction
    {"text": "x", "kl": -1.0},
    {"text": "x", "kl": "0.1"},
    {"text": "x", "ppl_new": float("nan")},
    [],
    "not a report",
])
def test_a_malformed_validation_report_is_refused(tiny_model: Callable[..., Path], tmp_path: Path, report: object) -> None:
    out = tmp_path / "out"
    surgery.prune(tiny_model("llama"), out, drop="2", quiet=True)
    before = (out / CARD_FILENAME).read_text()
    with pytest.raises(ModelCardError):
        update_card_with_validation(out, report)  # type: ignore[arg-type]
    assert (out / CARD_FILENAME).read_text() == before


def test_the_load_snippet_follows_the_repo_id(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    out = tmp_path / "out"
    surgery.prune(tiny_model("llama"), out, drop="2", quiet=True)
    assert set_card_repo_id(out, "org/tiny-pruned")
    assert not set_card_repo_id(out, "org/tiny-pruned")  # already there: unchanged
    text = validate_card(out / CARD_FILENAME).text
    assert 'AutoModelForCausalLM.from_pretrained("org/tiny-pruned")' in text
    assert "path/to/this/directory" not in text


@pytest.mark.parametrize(("content", "reason"), [
    (None, "is missing"),
    ("# no metadata\n", "no YAML metadata"),
    ("---\nlicense: [unclosed\n---\n# x\n", "does not parse"),
    ("---\n---\n# empty\n", "empty YAML metadata"),
])
def test_broken_cards_are_reported(tmp_path: Path, content: str | None, reason: str) -> None:
    path = tmp_path / CARD_FILENAME
    if content is not None:
        path.write_text(content)
    with pytest.raises(ModelCardError, match=reason):
        validate_card(path)
    with pytest.raises(ModelCardError):
        update_card_with_validation(tmp_path, REPORT)


def test_one_recipe_gives_one_card_wherever_it_is_written(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    surgery.apply(tiny_model("qwen3"), tmp_path / "first", "0-2,4,4,1", quiet=True)
    surgery.apply(tiny_model("qwen3"), tmp_path / "elsewhere" / "second", recipe=tmp_path / "first", quiet=True)
    card = (tmp_path / "first" / CARD_FILENAME).read_text()
    assert card == (tmp_path / "elsewhere" / "second" / CARD_FILENAME).read_text()
    assert "first" not in card and str(tmp_path) not in card.split("```yaml")[0]
    assert "| 4 | 4 | full_attention |\n| 5 | 1 | full_attention |" in card  # per-layer types in the map


@pytest.mark.real
def test_gguf_general_strings_equal_the_gguf_readers() -> None:
    """The card reads GGUF ``general.*`` strings with the bounded header walk (milliseconds); they equal
    what ``gguf.GGUFReader`` decodes from the embedded default model (seconds)."""
    from gguf import GGUFReader

    from surgery.gguf_header import gguf_strings
    from surgery.source import default_model_path

    path = default_model_path()
    expected = {}
    for key, field in GGUFReader(str(path)).fields.items():
        if key.startswith("general."):
            value = field.contents()
            if isinstance(value, str):
                expected[key] = value
    assert expected.get("general.license") == "apache-2.0"
    assert gguf_strings(path) == expected


@pytest.mark.parametrize("text", [
    "---\nlibrary_name: transformers\n---\n# m\n",
    "---\r\nlicense: apache-2.0\r\n---\r\ntext",
    "---\nlicense: [unclosed\n---\n",
    "---\n- a list\n---\n",
    "---\n\n---\n# empty\n",
    "# no block\n",
    "---\nno end of the block\n",
    "---\nmodel-index: 3\n---\n",
])
def test_the_light_metadata_check_agrees_with_huggingface_hub_model_card(text: str) -> None:
    """The check every write runs (no huggingface_hub.repocard import; validate_card runs it too)
    refuses exactly the cards huggingface_hub.ModelCard cannot parse, has no block at the top of, or
    reads as empty metadata; and validate_card says the same."""
    from huggingface_hub import ModelCard

    from exporters.card import check_card_metadata

    def hub_refuses() -> bool:
        if not text.startswith("---"):
            return True
        try:
            return not ModelCard(text).data.to_dict()
        except Exception:
            return True

    def refused(check: Callable[[], object]) -> str | None:
        try:
            check()
        except ModelCardError as exc:
            return str(exc)
        return None

    light = refused(lambda: check_card_metadata(text))
    assert (light is not None) == hub_refuses()
    assert refused(lambda: validate_card(text)) == light


@pytest.mark.parametrize("text", [
    "---\nlicense: apache-2.0\nlicense_name: x\n---\n# m\n",
    "\ufeff---\r\nlicense: mit\r\n---\r\ntext",  # a byte-order mark, CRLF
    "---\nlicense: [unclosed\n---\n",
    "---\n- a list\n---\n",
    "---\n\n---\n# empty\n",
    "# no block\n",
    "---\nno end of the block\n",
])
def test_card_metadata_reads_as_huggingface_hub_metadata_load(text: str, tmp_path: Path) -> None:
    """license_of reads the source card with card_metadata (no huggingface_hub.repocard import):
    the same mapping as metadata_load, or a ValueError where it raises."""
    from huggingface_hub.repocard import metadata_load

    from exporters.card import card_metadata

    path = tmp_path / "README.md"
    path.write_text(text, encoding="utf-8")

    def outcome(read: Callable[[], object]) -> object:
        try:
            return read() or {}
        except ValueError:  # yaml.YAMLError is not a ValueError: metadata_load lets it through
            return "refused"
        except Exception as exc:
            if type(exc).__module__.startswith("yaml"):
                return "refused"
            raise

    assert outcome(lambda: card_metadata(path.read_text(encoding="utf-8-sig"))) == outcome(lambda: metadata_load(path))


@pytest.mark.parametrize("fields", [
    {"base_model": "org/model", "base_model_relation": None, "library_name": "transformers",
     "pipeline_tag": "text-generation", "tags": ["pruned", "layer-surgery"], "license": "apache-2.0",
     "license_name": None, "license_link": None},
    {"base_model": "`tiny`", "base_model_relation": "merge", "library_name": "transformers", "pipeline_tag": None,
     "tags": ["parallel-merged", "pruned", "parallel-merged", "layer-surgery"], "license": "other",
     "license_name": "gemma", "license_link": "https://ai.google.dev/gemma/terms"},
    {"tags": "one", "library_name": "transformers", "license": None, "base_model": "naïve/é: model"},
])
def test_card_metadata_equals_huggingface_hub_model_card_data(fields: dict[str, object]) -> None:
    """The card's metadata is built without huggingface_hub (17 ms of every write): the same dict and YAML."""
    from huggingface_hub import ModelCardData

    reference = ModelCardData(**fields)
    ours = card_metadata_fields(**fields)
    assert ours == reference.to_dict() and list(ours) == list(reference.to_dict())
    assert metadata_yaml(ours) == reference.to_yaml()


def test_a_card_write_does_not_import_huggingface_hub(tiny_model: Callable[..., Path], tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("import sys, surgery; surgery.prune(sys.argv[1], sys.argv[2], drop='1', quiet=True); "
            "print(sorted(m for m in sys.modules if m.startswith('huggingface_hub')))")
    done = subprocess.run([sys.executable, "-c", code, str(tiny_model("llama")), str(tmp_path / "out")],
                          capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    ModelCard.load(tmp_path / "out" / "README.md")  # and the card parses with huggingface_hub
