"""The plan and the range syntax: every builder, every malformed range, recipe round trips."""

from __future__ import annotations

import pytest

from surgery.errors import EmptyPlanError, LayerIndexError, OptionError, RangeSyntaxError, RecipeError
from surgery.plan import Plan, Recipe, WriteOptions, format_ranges, parse_ranges, parse_size


def test_parse_ranges_keeps_order_and_repeats() -> None:
    assert parse_ranges("3,7,10-12") == [3, 7, 10, 11, 12]
    assert parse_ranges("0-2,1") == [0, 1, 2, 1]
    assert parse_ranges(" 4 - 5 , 9 ") == [4, 5, 9]


@pytest.mark.parametrize("text", ["10-", "20-10", "a-b", "", "1,,2", "-3", "1.5", "3-4-5"])
def test_malformed_ranges_are_refused(text: str) -> None:
    with pytest.raises(RangeSyntaxError):
        parse_ranges(text)


def test_format_ranges_folds_ascending_runs() -> None:
    assert format_ranges([0, 1, 2, 5, 4, 4]) == "0-2,5,4,4"
    for text in ["0-9,21-29,21-29", "3,2,1,0", "0"]:
        assert format_ranges(parse_ranges(text)) == text


def test_builders() -> None:
    assert Plan.drop("10-20", 30).layers == tuple(range(10)) + tuple(range(21, 30))
    assert Plan.keep("21-29,0-9", 30) == Plan.drop("10-20", 30)
    assert Plan.repeat("2-3", 3, 6).layers == (0, 1, 2, 3, 2, 3, 2, 3, 4, 5)
    assert Plan.reverse("1-4", 6).layers == (0, 4, 3, 2, 1, 5)
    assert Plan.order("1,0,2-5", 6).layers == (1, 0, 2, 3, 4, 5)
    shuffled = Plan.shuffle("1-4", 7, 6)
    assert shuffled == Plan.shuffle("1-4", 7, 6)  # seeded: reproducible
    assert shuffled.layers[0] == 0 and shuffled.layers[5] == 5 and sorted(shuffled.layers) == list(range(6))
    assert any(Plan.shuffle("0-29", seed, 30).layers != Plan.shuffle("0-29", 0, 30).layers for seed in (1, 2))


def test_operations_are_derived_from_the_layers() -> None:
    assert Plan.drop("1", 3).operations == ("pruned",)
    assert Plan.repeat("1", 2, 3).operations == ("layer-repeated",)
    assert Plan.reverse("0-2", 3).operations == ("layer-reordered",)
    assert Plan.from_ranges("2,0,0", 3).operations == ("pruned", "layer-repeated", "layer-reordered")
    assert Plan.identity(3).operations == ()


def test_bad_plans() -> None:
    with pytest.raises(LayerIndexError, match="layer 30 is out of range"):
        Plan.drop("25-30", 30)
    with pytest.raises(EmptyPlanError):
        Plan.drop("0-29", 30)
    with pytest.raises(RangeSyntaxError, match="contiguous"):
        Plan.repeat("1,3", 2, 6)
    with pytest.raises(OptionError):
        Plan.repeat("1-2", 0, 6)
    with pytest.raises(RangeSyntaxError, match="missing 5"):
        Plan.order("0-4", 6)


def test_recipe_round_trip_is_byte_stable() -> None:
    recipe = Recipe(Plan.from_ranges("0-9,21-29,21-29", 30), WriteOptions("bf16", 2 * 10**9), source="x/y")
    text = recipe.to_yaml()
    assert Recipe.from_yaml(text) == recipe
    assert Recipe.from_yaml(text).to_yaml() == text


def test_recipe_accepts_lists_and_size_strings() -> None:
    recipe = Recipe.from_yaml("num_source_layers: 4\nlayers: [0, 1, 1, 3]\nmax_shard_size: 2GB\n")
    assert recipe.plan.layers == (0, 1, 1, 3)
    assert recipe.options.max_shard_size == 2 * 10**9


@pytest.mark.parametrize(
    "text, match",
    [
        ("layers: 0-3\n", "num_source_layers"),
        ("num_source_layers: 4\nlayers: {a: 1}\n", "'layers' must be"),
        ("num_source_layers: 4\nlayers: 0-3\nbogus: 1\n", "unknown keys"),
        ("[1, 2", "not valid YAML"),
        ("layer_surgery_recipe: 9\nnum_source_layers: 4\nlayers: 0-3\n", "version"),
    ],
)
def test_bad_recipes(text: str, match: str) -> None:
    with pytest.raises(RecipeError, match=match):
        Recipe.from_yaml(text)


def test_sizes() -> None:
    assert parse_size("500MB") == 500 * 10**6
    assert parse_size("1GiB") == 2**30
    assert parse_size(1234) == 1234
    for bad in ("lots", "0", "-5MB"):
        with pytest.raises(OptionError):
            parse_size(bad)
    with pytest.raises(OptionError):
        WriteOptions(dtype="int4")
