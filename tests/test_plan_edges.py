"""The plan's edges: exact boundaries, parallel groups in every builder, and the words of each error.

Written against the mutants that tests/test_plan.py and tests/test_malformed.py let live (docs/development.md,
"Mutation testing"). Two kinds of check:

- boundaries: a count, index or size exactly at a limit is accepted and one past it refused, with
  both sides asserted (``MAX_POSITIONS`` layer positions, the last layer ``n - 1``, one byte);
- messages: an error is the product's interface (the CLI prints it as the one line of
  ``surgery: error:``), so each message is checked whole. The expected text is built from the
  error class's documented form (surgery/errors.py: ``malformed layer range TEXT: REASON``,
  ``parallel group GROUP: REASON``, ``layer I is out of range ...``, ``recipe PATH: REASON``) with
  what the user wrote and why it is refused, so a message that lost the input, the reason or the
  fix fails here.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import surgery.plan
from surgery.errors import (
    EmptyPlanError,
    LayerIndexError,
    OptionError,
    ParallelGroupError,
    PlanError,
    RangeSyntaxError,
    RecipeError,
    SurgeryError,
)
from surgery.plan import (
    MAX_POSITIONS,
    RECIPE_FILENAME,
    ParallelGroup,
    Plan,
    Recipe,
    WriteOptions,
    format_steps,
    parse_ranges,
    parse_size,
    parse_steps,
)

RANGE_HINT = "write 0-based inclusive ranges such as '10-20' or '3,7,10-12'"
GROUP_HINT = "write groups of two or more consecutive layers, e.g. --groups 10-13,14-17 (0-based, inclusive)"


def error(kind: type[SurgeryError], call: object, *args: object, **kwargs: object) -> SurgeryError:
    """The error ``call(*args, **kwargs)`` raises, checked to be of ``kind``."""
    assert callable(call)
    with pytest.raises(kind) as info:
        call(*args, **kwargs)
    return info.value


def range_error(text: str, reason: str) -> str:
    return f"malformed layer range {text!r}: {reason}"


def out_of_range(index: int, layers: int) -> str:
    return f"layer {index} is out of range: the model has {layers} layers (0-{layers - 1})"


def crosses(group: str, end: int, layers: int) -> str:
    return (
        f"parallel group {group}: it crosses the end of the model: layer {end} does not exist "
        f"(the model has {layers} layers, 0-{layers - 1})"
    )


# -- parse_steps: plain items, groups, limits --------------------------------------------------------


def test_parse_steps_reads_each_group_form() -> None:
    assert parse_steps("[1-2]") == [ParallelGroup((1, 2))]  # no xR: the group runs once
    assert parse_steps("[1-2]").pop().loop == 1
    assert parse_steps("0, [2-4] x3 : shared ,5") == [0, ParallelGroup((2, 3, 4), loop=3, mlp_input="shared"), 5]
    assert parse_steps("[3-4]:exact") == [ParallelGroup((3, 4), loop=1, mlp_input="exact")]


@pytest.mark.parametrize(
    ("text", "kind", "message"),
    [
        pytest.param("", RangeSyntaxError, range_error("", "it is empty"), id="empty"),
        pytest.param("  ", RangeSyntaxError, range_error("  ", "it is empty"), id="blank"),
        pytest.param("1,,2", RangeSyntaxError, range_error("1,,2", "an empty item"), id="empty-item"),
        pytest.param("1,x", RangeSyntaxError, range_error("1,x", "'x' is not N or A-B with whole numbers"), id="not-a-number"),
        pytest.param("5-3", RangeSyntaxError, range_error("5-3", "5-3 runs backwards (write the lower index first)"), id="backwards"),
        # One bracket is still a group that is written wrong, not a plain range.
        pytest.param("[1-2", RangeSyntaxError,
                     range_error("[1-2", "'[1-2' is not a group such as [10-13], [10-13]x3 or [10-13]x3:shared"), id="open-group"),
        pytest.param("1-2]", RangeSyntaxError,
                     range_error("1-2]", "'1-2]' is not a group such as [10-13], [10-13]x3 or [10-13]x3:shared"), id="close-group"),
        pytest.param("[4-2]", RangeSyntaxError, range_error("[4-2]", "[4-2] runs backwards (write the lower index first)"),
                     id="group-backwards"),
        pytest.param("[1-2]:wide", RangeSyntaxError,
                     range_error("[1-2]:wide", "'[1-2]:wide': the group suffix must be :exact or :shared, not :wide"), id="suffix"),
        # A group of one layer parses (it is not backwards) and is refused as a group.
        pytest.param("[3-3]", ParallelGroupError,
                     "parallel group [3]: a group needs two or more layers (a group of one layer is just that layer)", id="one-layer"),
        pytest.param("0-" + "9" * 19, RangeSyntaxError, range_error("0-" + "9" * 19, "9" * 19 + "... is too large to be a layer index"),
                     id="long-end"),
        pytest.param("[" + "9" * 19 + "-1]", RangeSyntaxError,
                     range_error("[" + "9" * 19 + "-1]", "9" * 19 + "... is too large to be a layer index"), id="long-group-start"),
        pytest.param("[1-" + "9" * 19 + "]", RangeSyntaxError,
                     range_error("[1-" + "9" * 19 + "]", "9" * 19 + "... is too large to be a layer index"), id="long-group-end"),
        pytest.param("[1-2]x" + "9" * 19, RangeSyntaxError,
                     range_error("[1-2]x" + "9" * 19, "9" * 19 + "... is too large to be a layer index"), id="long-loop"),
    ],
)
def test_parse_steps_errors_name_the_text_and_the_reason(text: str, kind: type[SurgeryError], message: str) -> None:
    err = error(kind, parse_steps, text)
    assert str(err) == message
    if kind is RangeSyntaxError:
        assert err.one_line() == f"{' '.join(message.split())} ({RANGE_HINT})"  # one line: whitespace runs folded


def test_parse_steps_refuses_what_is_not_text() -> None:
    for value in (None, 5, ["0-3"]):
        err = error(RangeSyntaxError, parse_steps, value)
        assert str(err) == range_error(str(value), "it is empty")


def test_parse_steps_limit_is_the_layer_count() -> None:
    assert parse_steps("5", limit=6) == [5]
    assert str(error(LayerIndexError, parse_steps, "6", limit=6)) == out_of_range(6, 6)
    assert str(error(LayerIndexError, parse_steps, "4-6", limit=6)) == out_of_range(6, 6)
    # a group that starts at the limit names its first layer; one that only ends past it "crosses"
    assert parse_steps("[4-5]", limit=6) == [ParallelGroup((4, 5))]
    assert str(error(LayerIndexError, parse_steps, "[6-7]", limit=6)) == out_of_range(6, 6)
    assert str(error(ParallelGroupError, parse_steps, "[4-6]", limit=6)) == crosses("[4-6]", 6, 6)
    assert str(error(ParallelGroupError, parse_steps, "[4-6]x2", limit=6)) == crosses("[4-6]x2", 6, 6)


def test_parse_steps_counts_plain_and_group_layers_against_the_cap() -> None:
    cap = f"at most {MAX_POSITIONS:,} are allowed"
    assert len(parse_steps(f"0-{MAX_POSITIONS - 1}")) == MAX_POSITIONS
    assert len(parse_steps(f"{MAX_POSITIONS // 2}-{MAX_POSITIONS // 2 + MAX_POSITIONS - 1}")) == MAX_POSITIONS
    text = f"0-{MAX_POSITIONS}"
    assert str(error(RangeSyntaxError, parse_steps, text)) == range_error(text, f"it names {MAX_POSITIONS + 1:,} layers; {cap}")
    # plain layers then a group: the group's two layers count too
    fits = parse_steps(f"0-{MAX_POSITIONS - 3},[5-6]")
    assert len(fits) == MAX_POSITIONS - 1 and fits[-1] == ParallelGroup((5, 6))
    text = f"0-{MAX_POSITIONS - 2},[5-6]"
    assert str(error(RangeSyntaxError, parse_steps, text)) == range_error(text, f"it names {MAX_POSITIONS + 1:,} layers; {cap}")


# -- parse_ranges and format_steps -----------------------------------------------------------------


def test_parse_ranges_last_index_is_inside() -> None:
    assert parse_ranges("0-5", limit=6) == [0, 1, 2, 3, 4, 5]
    assert str(error(LayerIndexError, parse_ranges, "3-6", limit=6)) == out_of_range(6, 6)
    assert str(error(LayerIndexError, parse_ranges, "8-9", limit=6)) == out_of_range(8, 6)


def test_format_steps_folds_runs_around_groups() -> None:
    assert format_steps([0, 1, 2, ParallelGroup((3, 4), loop=2), 5]) == "0-2,[3-4]x2,5"
    assert format_steps([ParallelGroup((0, 1)), ParallelGroup((2, 3), loop=3, mlp_input="shared"), 4, 5]) == "[0-1],[2-3]x3:shared,4-5"
    assert format_steps([1, 0, ParallelGroup((2, 3)), 7, 8]) == "1,0,[2-3],7-8"
    for text in ("0-2,[3-4]x2,5", "[0-1],[2-3]x3:shared,4-5", "5,[1-2],0"):
        assert format_steps(parse_steps(text)) == text


# -- ParallelGroup ---------------------------------------------------------------------------------


def test_group_layers_become_a_tuple() -> None:
    group = ParallelGroup([4, 5, 6])  # type: ignore[arg-type]
    assert group.layers == (4, 5, 6) and isinstance(group.layers, tuple)
    assert hash(group) == hash(ParallelGroup((4, 5, 6)))
    assert str(group) == "[4-6]" and len(group) == 3


@pytest.mark.parametrize(
    ("layers", "shown", "reason"),
    [
        ((), "[]", "a group needs two or more layers (a group of one layer is just that layer)"),
        ((5,), "[5]", "a group needs two or more layers (a group of one layer is just that layer)"),
        ((1, 3), "[1,3]", "the layers of a group must be consecutive and ascending, such as 10-13"),
        ((3, 2), "[3,2]", "the layers of a group must be consecutive and ascending, such as 10-13"),
    ],
)
def test_group_layers_errors(layers: tuple[int, ...], shown: str, reason: str) -> None:
    err = error(ParallelGroupError, ParallelGroup, layers)
    assert str(err) == f"parallel group {shown}: {reason}"
    assert err.one_line() == f"parallel group {shown}: {reason} ({GROUP_HINT})"


@pytest.mark.parametrize("loop", [0, -1, True, 2.0, "2", None])
def test_group_loop_must_be_a_whole_number_of_at_least_one(loop: object) -> None:
    err = error(ParallelGroupError, ParallelGroup, (1, 2), loop=loop)
    assert str(err) == f"parallel group [1-2]: the loop count must be a whole number of at least 1, got {loop!r}"
    assert err.hint == "pass --loop 1 (each group once) or more"


def test_group_loop_cap_is_the_plan_cap() -> None:
    assert ParallelGroup((0, 1), loop=MAX_POSITIONS).loop == MAX_POSITIONS
    err = error(ParallelGroupError, ParallelGroup, (0, 1), loop=MAX_POSITIONS + 1)
    assert str(err) == (
        f"parallel group [0-1]: the loop count {MAX_POSITIONS + 1:,} is more than the {MAX_POSITIONS:,} layer positions a plan may have"
    )
    assert err.hint == "pass a smaller --loop"


def test_group_mlp_input_is_checked() -> None:
    err = error(OptionError, ParallelGroup, (1, 2), mlp_input="wide")
    assert str(err) == "mlp_input must be one of exact, shared, got 'wide'"


# -- Plan builders ---------------------------------------------------------------------------------


def test_parallel_places_each_group_at_its_first_layer() -> None:
    assert str(Plan.parallel("2-3", loop=1, num_source_layers=6)) == "0-1,[2-3],4-5"
    # groups at both ends, three layers wide, looped: each replaces exactly its own layers
    plan = Plan.parallel("0-2,4-5", loop=2, num_source_layers=6)
    assert plan.layers == (ParallelGroup((0, 1, 2), loop=2), 3, ParallelGroup((4, 5), loop=2))
    assert str(plan) == "[0-2]x2,3,[4-5]x2"
    assert len(plan) == 5
    shared = Plan.parallel("1-2", loop=1, num_source_layers=4, mlp_input="shared")
    assert shared.groups == (ParallelGroup((1, 2), mlp_input="shared"),)


@pytest.mark.parametrize(
    ("groups", "loop", "kind", "message"),
    [
        pytest.param("", 1, RangeSyntaxError, range_error("", "it is empty"), id="empty"),
        pytest.param(None, 1, RangeSyntaxError, range_error("None", "it is empty"), id="none"),
        pytest.param("1-2,,3-4", 1, RangeSyntaxError, range_error("1-2,,3-4", "an empty item"), id="empty-item"),
        pytest.param("1-2,[3-4]", 1, RangeSyntaxError, range_error("1-2,[3-4]", "'[3-4]' is not a group A-B with whole numbers"),
                     id="brackets"),
        pytest.param("4-2", 1, RangeSyntaxError, range_error("4-2", "4-2 runs backwards (write the lower index first)"), id="backwards"),
        pytest.param("6-7", 1, LayerIndexError, out_of_range(6, 6), id="starts-past-the-end"),
        pytest.param("4-6", 2, ParallelGroupError, crosses("[4-6]x2", 6, 6), id="crosses-looped"),
        pytest.param("4-6", 1, ParallelGroupError, crosses("[4-6]", 6, 6), id="crosses"),
        # a loop that is not a number is shown as no loop here; ParallelGroup refuses it by name
        pytest.param("4-6", "3", ParallelGroupError, crosses("[4-6]", 6, 6), id="crosses-text-loop"),
        pytest.param("1-2", "3", ParallelGroupError,
                     "parallel group [1-2]: the loop count must be a whole number of at least 1, got '3'", id="text-loop"),
        pytest.param("1-3,3-4", 1, ParallelGroupError,
                     "parallel group [1-3] and [3-4]: they overlap at layer 3; a layer can belong to one group only", id="overlap"),
    ],
)
def test_parallel_errors(groups: str, loop: int, kind: type[SurgeryError], message: str) -> None:
    assert str(error(kind, Plan.parallel, groups, loop=loop, num_source_layers=6)) == message


def test_repeat_times_boundaries() -> None:
    assert Plan.repeat("1-2", 1, 6) == Plan.identity(6)
    for times in (0, True, 2.0, "2"):
        err = error(OptionError, Plan.repeat, "1-2", times, 6)
        assert str(err) == f"--times must be a whole number of at least 1, got {times!r}"
    # 6 layers, one repeated: 5 + times positions; the plan cap is reached exactly, then passed
    most = MAX_POSITIONS - 5
    assert len(Plan.repeat("3", most, 6)) == MAX_POSITIONS
    err = error(OptionError, Plan.repeat, "3", most + 1, 6)
    assert str(err) == f"--times {most + 1:,} would give {MAX_POSITIONS + 1:,} layers; a plan may have at most {MAX_POSITIONS:,}"
    assert str(error(RangeSyntaxError, Plan.repeat, "1,3", 2, 6)) == range_error("1,3", "repeat takes one contiguous block such as 8-15")


def test_reverse_and_shuffle_take_one_block() -> None:
    for build in (lambda: Plan.reverse("1,3", 6), lambda: Plan.shuffle("3,1-2", 0, 6)):
        err = error(RangeSyntaxError, build)
        assert str(err).endswith(": takes one contiguous block such as 4-25")
    assert str(error(RangeSyntaxError, Plan.reverse, "1,3", 6)) == range_error("1,3", "takes one contiguous block such as 4-25")
    assert Plan.reverse("4-5", 6).layers == (0, 1, 2, 3, 5, 4)


@pytest.mark.parametrize(
    ("spec", "missing", "repeated"),
    [
        ("0,0,2-5", "1", "0"),
        ("0-5,5", "none", "5"),
        ("0-4", "5", "none"),
        ("5,4,3,3,1,1", "0,2", "1,3"),
    ],
)
def test_order_names_what_is_missing_and_repeated(spec: str, missing: str, repeated: str) -> None:
    err = error(RangeSyntaxError, Plan.order, spec, 6)
    assert str(err) == range_error(
        spec,
        f"--order must name each of the 6 layers once (missing {missing}, repeated {repeated}); "
        "use 'surgery apply --layers' for drops and repeats",
    )


def test_drop_everything_names_the_spec() -> None:
    assert str(error(EmptyPlanError, Plan.drop, "0-2", 3)) == "dropping 0-2 leaves no layers"
    assert str(error(EmptyPlanError, Plan, (), 3)) == "this plan leaves no layers"


def test_plan_cap_counts_loops() -> None:
    fits = Plan((ParallelGroup((0, 1), loop=MAX_POSITIONS - 1), 2), 3)
    assert len(fits) == MAX_POSITIONS
    err = error(PlanError, Plan, (ParallelGroup((0, 1), loop=MAX_POSITIONS), 2), 3)
    assert str(err) == f"the plan has {MAX_POSITIONS + 1:,} layer positions; at most {MAX_POSITIONS:,} are allowed"


# -- what the plan does ----------------------------------------------------------------------------


def test_positions_mapping_and_sequence_unroll_loops() -> None:
    plan = Plan.from_ranges("0,[1-2]x2,3", 4)
    group = ParallelGroup((1, 2), loop=2)
    assert plan.positions() == [(0, 0), (1, group), (2, group), (3, 3)]
    # plain layers keep their position in the new model: after a group looped twice, 3 is at 3
    assert plan.mapping() == [(0, 0), (3, 3)]
    assert plan.source_sequence() == [0, 1, 2, 1, 2, 3]
    plain = Plan.from_ranges("2,0,0", 3)
    assert plain.positions() == [(0, 2), (1, 0), (2, 0)]
    assert plain.mapping() == [(0, 2), (1, 0), (2, 0)]


def test_operations_of_groups() -> None:
    assert Plan.parallel("0-1", loop=1, num_source_layers=3).operations == ("parallel-merged",)
    # a looped group applies its layers' weights again: repeated, not pruned
    assert Plan.parallel("0-1", loop=2, num_source_layers=3).operations == ("layer-repeated", "parallel-merged")


# -- sizes -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1", 1), ("7B", 7), ("7 b", 7), ("3KB", 3 * 10**3), ("3MB", 3 * 10**6), ("3GB", 3 * 10**9), ("3TB", 3 * 10**12),
        ("3KiB", 3 * 2**10), ("3MiB", 3 * 2**20), ("3GiB", 3 * 2**30), ("3TiB", 3 * 2**40),
        # units are case-insensitive (flags=re.IGNORECASE): what users type, '2gib', '500mb', is read the same
        ("500mb", 500 * 10**6), ("2gib", 2 * 2**30), ("2GIB", 2 * 2**30), ("1.5GB", 15 * 10**8), (" 2 kb ", 2000),
    ],
)
def test_parse_size_units(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (True, "shard size True is not a size such as 5GB, 500MB or 1073741824"),
        ("5 GBs", "shard size '5 GBs' is not a size such as 5GB, 500MB or 1073741824"),
        ("0", "shard size must be positive, got '0'"),
        (0, "shard size must be positive, got 0"),
        ("0.5B", "shard size must be positive, got '0.5B'"),
        ("9" * 400 + "TB", f"shard size {'9' * 40!r} is too large"),
    ],
)
def test_parse_size_errors(value: object, message: str) -> None:
    assert str(error(OptionError, parse_size, value)) == message


def test_write_options_messages() -> None:
    assert str(error(OptionError, WriteOptions, dtype="int4")) == "dtype 'int4' is not one of bf16, fp16, fp32"
    for size in (0, True, 1.5):
        assert str(error(OptionError, WriteOptions, max_shard_size=size)) == f"max_shard_size must be a positive byte count, got {size!r}"
    assert WriteOptions(max_shard_size=1).max_shard_size == 1


# -- recipes ---------------------------------------------------------------------------------------


def test_recipe_defaults() -> None:
    recipe = Recipe.from_yaml("num_source_layers: 4\nlayers: 0-3\n")
    assert recipe.options == WriteOptions() and recipe.options.max_shard_size == 5 * 10**9
    assert recipe.source is None
    assert Recipe.from_yaml("num_source_layers: 4\nlayers: 1\nsource: 7\n").source == "7"
    assert Recipe.from_yaml("num_source_layers: 1\nlayers: [0]\n").plan == Plan.identity(1)


def test_recipe_text_leads_with_the_version_and_says_how_to_rebuild() -> None:
    text = Recipe(Plan.from_ranges("0,[1-2]x2,3", 4), source="m").to_yaml()
    first, *body = text.splitlines()
    assert first.startswith("#") and "surgery apply SOURCE OUT --recipe THIS_FILE" in first
    # keys in the documented order (Recipe's docstring), the version first
    assert [line.split(":")[0] for line in body] == [
        "layer_surgery_recipe", "source", "num_source_layers", "layers", "dtype", "max_shard_size",
    ]
    assert Recipe.from_yaml(text).plan.layers == (0, ParallelGroup((1, 2), loop=2), 3)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("- 1\n- 2\n", "must be a YAML mapping with at least 'layers' and 'num_source_layers'"),
        ("num_source_layers: 4\nlayers: 0\nextra: 1\n", "unknown keys ['extra']"),
        ("layer_surgery_recipe: 2\nnum_source_layers: 4\nlayers: 0\n", "format version 2 is not supported (this tool reads 1)"),
        ("num_source_layers: 0\nlayers: 0\n", "'num_source_layers' must be a positive whole number"),
        ("num_source_layers: true\nlayers: 0\n", "'num_source_layers' must be a positive whole number"),
        (f"num_source_layers: {MAX_POSITIONS + 1}\nlayers: 0\n",
         f"'num_source_layers' is {MAX_POSITIONS + 1:,}; this tool handles models of at most {MAX_POSITIONS:,} layers"),
        # YAML's true/false are not layer 1 and layer 0
        ("num_source_layers: 4\nlayers: [true, false]\n",
         "'layers' as a list must hold whole numbers (or group strings such as '[10-13]x3')"),
        ("num_source_layers: 4\nlayers: [1.0]\n", "'layers' as a list must hold whole numbers (or group strings such as '[10-13]x3')"),
        ("num_source_layers: 4\nlayers: null\n", "'layers' must be a range string such as '0-9,21-29' or a list of indices"),
    ],
)
def test_recipe_errors_name_the_origin(text: str, reason: str) -> None:
    assert str(error(RecipeError, Recipe.from_yaml, text, origin="r.yaml")) == f"recipe r.yaml: {reason}"


def test_recipe_list_items_are_checked_against_the_model() -> None:
    # the model's layer count bounds each string item before it is unrolled
    err = error(LayerIndexError, Recipe.from_yaml, "num_source_layers: 6\nlayers: ['0-999999999999']\n")
    assert str(err) == out_of_range(6, 6)
    recipe = Recipe.from_yaml("num_source_layers: 6\nlayers: [5, '[0-1]x2', '2-3']\n")
    assert recipe.plan.layers == (5, ParallelGroup((0, 1), loop=2), 2, 3)


def test_recipe_list_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    # The cap is read when a recipe is parsed; a small one keeps YAML lists short (the boundary is the same).
    cap = 40
    monkeypatch.setattr(surgery.plan, "MAX_POSITIONS", cap)
    at_cap = f"num_source_layers: 1\nlayers: [{', '.join(['0'] * cap)}]\n"
    assert len(Recipe.from_yaml(at_cap).plan) == cap
    over = f"num_source_layers: 1\nlayers: [{', '.join(['0'] * (cap + 1))}]\n"
    err = error(RecipeError, Recipe.from_yaml, over, origin="r")
    assert str(err) == f"recipe r: 'layers' lists {cap + 1:,} layers; at most {cap:,} are allowed"
    # a short list whose string items unroll past the cap
    unrolled = f"num_source_layers: {cap}\nlayers: ['0-{cap - 1}', 0]\n"
    assert str(error(RecipeError, Recipe.from_yaml, unrolled, origin="r")) == f"recipe r: 'layers' names more than {cap:,} layers"


def test_recipe_load_reads_a_file_or_an_output_directory(tmp_path: Path) -> None:
    recipe = Recipe(Plan.drop("1", 3), WriteOptions("fp16", 1000), source="m")
    (tmp_path / RECIPE_FILENAME).write_text(recipe.to_yaml(), encoding="utf-8")
    assert Recipe.load(tmp_path) == recipe
    assert Recipe.load(tmp_path / RECIPE_FILENAME) == recipe
    assert Recipe.load(str(tmp_path / RECIPE_FILENAME)) == recipe


def test_recipe_load_errors_name_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "none.yaml"
    assert str(error(RecipeError, Recipe.load, missing)) == f"recipe {missing}: cannot be read (No such file or directory)"
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"num_source_layers: 4\nlayers: \xff\n")
    assert str(error(RecipeError, Recipe.load, bad)) == f"recipe {bad}: is not UTF-8 text"
    bad.write_text("layers: 0\n", encoding="utf-8")
    assert str(error(RecipeError, Recipe.load, bad)) == f"recipe {bad}: 'num_source_layers' must be a positive whole number"
    # the size cap: a file of exactly the cap is read, one byte more is refused
    monkeypatch.setattr(surgery.plan, "MAX_RECIPE_BYTES", 64)
    text = "num_source_layers: 4\nlayers: 0-3\n"
    bad.write_text(text + "#" * (64 - len(text) - 1) + "\n", encoding="utf-8")
    assert bad.stat().st_size == 64
    assert Recipe.load(bad).plan == Plan.identity(4)
    bad.write_text(text + "#" * (64 - len(text)) + "\n", encoding="utf-8")
    assert str(error(RecipeError, Recipe.load, bad)) == f"recipe {bad}: is larger than 64 bytes; a recipe is a few lines"


def test_recipe_yaml_errors_are_one_line_naming_the_origin() -> None:
    import yaml

    text = "num_source_layers: 4\nlayers: [1, 2\n"
    with pytest.raises(yaml.YAMLError) as parsed:
        yaml.safe_load(text)
    first = str(parsed.value).splitlines()[0]  # the YAML parser's own first line, e.g. "while parsing a flow sequence"
    assert first and len(str(parsed.value).splitlines()) > 1
    assert str(error(RecipeError, Recipe.from_yaml, text, origin="r.yaml")) == f"recipe r.yaml: is not valid YAML ({first})"
    deep = "num_source_layers: 6\nlayers: " + "[" * 50_000 + "]" * 50_000 + "\n"
    assert str(error(RecipeError, Recipe.from_yaml, deep, origin="r.yaml")) == "recipe r.yaml: is not a recipe (YAML nested too deeply)"


def test_parse_ranges_errors_name_the_text_and_the_reason() -> None:
    cases = {
        "": "it is empty",
        "   ": "it is empty",
        "1,,2": "an empty item",
        "1, x": "'x' is not N or A-B with whole numbers",
        "5-3": "5-3 runs backwards (write the lower index first)",
        f"0-{MAX_POSITIONS}": f"it names {MAX_POSITIONS + 1:,} layers; at most {MAX_POSITIONS:,} are allowed",
    }
    for text, reason in cases.items():
        assert str(error(RangeSyntaxError, parse_ranges, text)) == range_error(text, reason)
    assert str(error(RangeSyntaxError, parse_ranges, None)) == range_error("None", "it is empty")
    # the cap counts each item's own length: 100,000 layers starting at 50,000 are allowed
    assert len(parse_ranges(f"{MAX_POSITIONS // 2}-{MAX_POSITIONS // 2 + MAX_POSITIONS - 1}")) == MAX_POSITIONS


def test_layer_numbers_have_at_most_18_digits() -> None:
    assert parse_ranges("1" * 18) == [int("1" * 18)]  # a number, if no model has that many layers
    text = "1" * 19
    assert str(error(RangeSyntaxError, parse_ranges, text)) == range_error(text, "1" * 19 + "... is too large to be a layer index")
    text = "2" * 25  # shown cut to 20 digits
    assert str(error(RangeSyntaxError, parse_ranges, text)) == range_error(text, "2" * 20 + "... is too large to be a layer index")


def test_plan_checks_plain_layers_and_groups_against_the_model() -> None:
    assert len(Plan.identity(3)) == 3 and len(Plan.drop("1", 3)) == 2
    assert len(Plan.from_ranges("0,[1-2]x2,3", 4)) == 4  # one position per plain layer, one per loop of a group
    assert str(error(LayerIndexError, Plan, (0, 6), 6)) == out_of_range(6, 6)
    assert str(error(LayerIndexError, Plan, (-1,), 6)) == out_of_range(-1, 6)
    assert Plan((ParallelGroup((0, 1)), 2), 3).groups == (ParallelGroup((0, 1)),)
    assert str(error(LayerIndexError, Plan, (ParallelGroup((6, 7)),), 6)) == out_of_range(6, 6)
    assert str(error(ParallelGroupError, Plan, (0, ParallelGroup((5, 6))), 6)) == crosses("[5-6]", 6, 6)
    assert str(error(ParallelGroupError, Plan, (0, ParallelGroup((4, 5, 6))), 6)) == crosses("[4-6]", 6, 6)
    err = error(ParallelGroupError, Plan, (ParallelGroup((1, 2, 3)), ParallelGroup((3, 4), loop=2)), 6)
    assert str(err) == "parallel group [1-3] and [3-4]x2: they overlap at layer 3; a layer can belong to one group only"
    assert err.hint == "split the layers into disjoint groups; to apply a group again, loop it ([10-13]x3, --loop 3)"


def test_a_long_number_anywhere_is_shown_with_the_text_it_came_from() -> None:
    long = "9" * 19
    reason = long + "... is too large to be a layer index"
    for text in (long, f"0-{long}", f"{long}-0"):
        assert str(error(RangeSyntaxError, parse_ranges, text)) == range_error(text, reason)
        assert str(error(RangeSyntaxError, parse_steps, text)) == range_error(text, reason)
    for groups in (f"{long}-0", f"1-{long}"):
        assert str(error(RangeSyntaxError, Plan.parallel, groups, loop=1, num_source_layers=6)) == range_error(groups, reason)


def test_a_group_of_one_layer_is_refused_as_a_group() -> None:
    one = "parallel group [3]: a group needs two or more layers (a group of one layer is just that layer)"
    for text in ("[3]", "[3-3]x2"):
        assert str(error(ParallelGroupError, parse_steps, text)) == one
    for groups in ("3", "3-3"):
        assert str(error(ParallelGroupError, Plan.parallel, groups, loop=1, num_source_layers=6)) == one


def test_a_recipe_without_an_origin_is_called_recipe() -> None:
    assert str(error(RecipeError, Recipe.from_yaml, "layers: 0\n")) == "recipe <recipe>: 'num_source_layers' must be a positive whole number"
