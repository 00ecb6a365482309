"""surgery prune --to-layers N: the search (greedy, beam, block, score, parallel groups) against an
exhaustive search computed here with the independent reference (tests/reference.py), the shared
prefix of the candidates, the held-out split, the CLI (--json, --dry-run, bad input, Ctrl-C)."""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import transformers

import surgery
from surgery.corpus import read_texts
from surgery.errors import OptionError
from surgery.loading import Settings, load_model
from surgery.plan import ParallelGroup, Plan
from surgery.search import SearchInterrupted, check_target, screening_order, search, split_windows
from tests import tiny
from tests.helpers import assert_one_line_error
from tests.helpers import run_cli as run
from tests.reference import parallel_reference_model, reference_model

L = tiny.NUM_LAYERS
N = 3  # 20 plans of 3 layers out of 6: small enough to measure them all here
FAST: dict[str, Any] = {"seq_len": 64, "max_tokens": 128, "eval_tokens": 128, "quiet": True, "device": "cpu"}
CLI_FAST = ["--seq-len", "64", "--max-tokens", "128", "--eval-tokens", "128", "--device", "cpu", "-q"]
# 8 calibration windows of 64 tokens, 2 of them the screening windows
SCREENED: dict[str, Any] = {**FAST, "max_tokens": 512, "screen_tokens": 128}


def _windows(path: Path, text_file: Path) -> tuple[torch.Tensor, torch.Tensor]:
    loaded = load_model(path, Settings(device="cpu", quiet=True))
    settings = Settings(seq_len=FAST["seq_len"], max_tokens=FAST["max_tokens"], device="cpu", quiet=True)
    return split_windows(loaded, read_texts(text_file), settings, held_out=0.1, eval_tokens=FAST["eval_tokens"])


def _kl(model: Any, reference_logits: torch.Tensor, windows: torch.Tensor) -> float:
    """KL(original || model) per predicted token, written directly from the definition."""
    with torch.no_grad():
        q = torch.log_softmax(model(input_ids=windows, use_cache=False).logits[:, :-1].double(), -1)
    p = torch.log_softmax(reference_logits[:, :-1].double(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


@pytest.fixture(scope="module")
def exhaustive(readable_tiny: Callable[[str], Path], text_file: Path) -> Callable[[str], dict[str, float]]:
    """``exhaustive(name)``: the calibration KL of every plan that keeps N of the L layers, by the reference."""
    done: dict[str, dict[str, float]] = {}

    def measure(name: str) -> dict[str, float]:
        if name not in done:
            calibration, _ = _windows(readable_tiny(name), text_file)
            model = transformers.AutoModelForCausalLM.from_pretrained(readable_tiny(name)).eval()
            with torch.no_grad():
                logits = model(input_ids=calibration, use_cache=False).logits
            done[name] = {
                str(Plan(kept, L)): _kl(reference_model(model, list(kept)), logits, calibration)
                for kept in itertools.combinations(range(L), N)
            }
        return done[name]

    return measure


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_greedy_with_a_beam_as_wide_as_every_plan_is_the_exhaustive_search(
    readable_tiny: Callable[[str], Path], text_file: Path, exhaustive: Callable[[str], dict[str, float]], name: str
) -> None:
    """gemma3 mixes sliding and full layers (window 4 < 64 tokens): a candidate run from a cached prefix must
    still see each layer's own attention type."""
    truth = exhaustive(name)
    report = search(readable_tiny(name), N, beam=20, data=text_file, **FAST)  # C(6,3) = 20 plans at the last step
    best = min(truth, key=lambda plan: truth[plan])
    assert str(report.plan) == best
    assert report.calibration_kl == pytest.approx(truth[best], rel=1e-4)
    final = [c for c in report.candidates if c.num_layers == N]
    assert sorted(c.plan for c in final) == sorted(truth)  # every plan of N layers was scored ...
    for candidate in final:  # ... each equal to the reference run whole (the shared prefix changes nothing)
        assert candidate.kl == pytest.approx(truth[candidate.plan], rel=1e-4, abs=1e-7), candidate.plan
    assert [row.num_layers for row in report.trace] == [5, 4, 3]


def test_greedy_keeps_the_best_removal_of_each_step(
    readable_tiny: Callable[[str], Path], text_file: Path, exhaustive: Callable[[str], dict[str, float]]
) -> None:
    truth = exhaustive("llama")
    report = search(readable_tiny("llama"), N, data=text_file, **FAST)
    assert [c.step for c in report.candidates] == [1] * 6 + [2] * 5 + [3] * 4  # one plan per removable layer
    for step, row in enumerate(report.trace, start=1):
        scored = [c for c in report.candidates if c.step == step]
        assert row.kl == min(c.kl for c in scored if c.kl is not None) and row.plan in {c.plan for c in scored}
        if step > 1:  # each step extends the plan the previous one kept
            previous = set(Plan.from_ranges(report.trace[step - 2].plan, L).layers)
            assert all(set(Plan.from_ranges(c.plan, L).layers) < previous for c in scored)
    assert str(report.plan) == report.trace[-1].plan
    assert report.calibration_kl == pytest.approx(truth[str(report.plan)], rel=1e-4)
    assert report.calibration_kl >= min(truth.values()) - 1e-9  # greedy is never better than exhaustive


def test_block_is_the_best_contiguous_block_by_measured_kl(
    readable_tiny: Callable[[str], Path], text_file: Path, exhaustive: Callable[[str], dict[str, float]]
) -> None:
    truth = exhaustive("llama")
    blocks = {str(Plan.drop(f"{s}-{s + L - N - 1}", L)): truth[str(Plan.drop(f"{s}-{s + L - N - 1}", L))]
              for s in range(N + 1)}
    report = search(readable_tiny("llama"), N, method="block", data=text_file, **FAST)
    assert str(report.plan) == min(blocks, key=lambda plan: blocks[plan])
    assert {c.plan: c.kl for c in report.candidates} == pytest.approx(blocks, rel=1e-4)


def test_score_and_angular_block_follow_the_residual_stream(readable_tiny: Callable[[str], Path], text_file: Path) -> None:
    from surgery.analyze import residual_stream

    calibration, _ = _windows(readable_tiny("llama"), text_file)
    model = transformers.AutoModelForCausalLM.from_pretrained(readable_tiny("llama")).eval()
    with torch.no_grad(), residual_stream(model.model.layers) as states:
        model(input_ids=calibration, use_cache=False)
    x = torch.stack(states).double()
    influence = (1 - torch.nn.functional.cosine_similarity(x[:-1], x[1:], dim=-1)).mean((1, 2))
    last = torch.nn.functional.normalize(x[:, :, -1], dim=-1)
    angle = [float(torch.arccos((last[s] * last[s + L - N]).sum(-1).clamp(-1, 1)).mean()) for s in range(N + 1)]

    report = search(readable_tiny("llama"), N, method="score", data=text_file, **FAST)
    lowest = sorted(torch.argsort(influence)[: L - N].tolist())
    assert report.dropped == lowest
    assert [c.score for c in report.candidates] == pytest.approx(influence.tolist(), rel=1e-4)
    report = search(readable_tiny("llama"), N, method="block", block_by="angular", data=text_file, **FAST)
    start = min(range(N + 1), key=lambda s: angle[s])
    assert report.dropped == list(range(start, start + L - N))
    assert report.calibration_kl > 0 and report.trace[0].score == pytest.approx(angle[start] / torch.pi, rel=1e-4)


def test_parallel_groups_are_measured_as_the_reference_and_the_plain_line_is_kept(
    readable_tiny: Callable[[str], Path], text_file: Path
) -> None:
    path = readable_tiny("llama")
    calibration, _ = _windows(path, text_file)
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        logits = model(input_ids=calibration, use_cache=False).logits
    report = search(path, N, method="block", allow_parallel=True, data=text_file, **FAST)
    merged = [c for c in report.candidates if c.change.startswith("merge")]
    assert len(merged) == L - (L - N)  # every group of L - N + 1 consecutive layers
    for candidate in merged:
        plan = Plan.from_ranges(candidate.plan, L)
        assert candidate.kl == pytest.approx(_kl(parallel_reference_model(model, plan), logits, calibration), rel=1e-4)
    assert report.parallel_best == min(c.kl for c in merged if c.kl is not None)

    plain = search(path, N, data=text_file, **FAST)
    mixed = search(path, N, allow_parallel=True, data=text_file, **FAST)
    assert mixed.drop_best == pytest.approx(plain.calibration_kl, rel=1e-6)  # the search without groups, inside
    assert mixed.calibration_kl == min(x for x in (mixed.parallel_best, mixed.drop_best) if x is not None)
    assert mixed.parallel_won == bool(mixed.plan.groups)
    assert any(c.change.startswith("merge") for c in mixed.candidates)
    assert "parallel  a plan with a group" in mixed.format()
    for candidate in mixed.candidates:  # merges extend the best plan; the plain line grows by drops alone
        if candidate.step > 1 and candidate.change.startswith("merge"):
            best_before = Plan.from_ranges(mixed.trace[candidate.step - 2].plan, L)
            assert set(Plan.from_ranges(candidate.plan, L).source_sequence()) == set(best_before.source_sequence())


def test_scorer_reuses_screening_sums_and_parent_records_exactly(readable_tiny: Callable[[str], Path],
                                                                 text_file: Path) -> None:
    """A full score after a screening runs only the other batches, and a kept plan's record is run from
    its first change on: both give exactly what running everything gives."""
    from surgery.search import _Scorer
    from surgery.view import live_architecture

    path = readable_tiny("llama")
    loaded = load_model(path, Settings(device="cpu", quiet=True))
    arch = live_architecture(loaded.model)
    settings = Settings(seq_len=64, max_tokens=512, device="cpu", quiet=True)
    calibration, _ = split_windows(loaded, read_texts(text_file), settings, held_out=0.1, eval_tokens=128)
    identity = Plan(tuple(range(L)), L)
    one, two = Plan.drop("3", L), Plan.drop("1,3", L)

    reusing, fresh, recording = (_Scorer(loaded, arch, calibration, 2, screen_windows=2) for _ in range(3))
    layers = loaded.model.get_submodule(arch.module_path)
    calls = [0]
    handles = [layer.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1)) for layer in layers]
    # 8 windows in 4 batches of 2, the first batch the screening one; dropping layer 3 changes position 3 on
    try:
        screened = reusing.kl(identity, one, screening=True)
        calls[0] = 0
        full = reusing.kl(identity, one)
        assert calls[0] == 3 * 2  # the 3 other batches, through the tail (layers 4 and 5)
        calls[0] = 0
        assert full == fresh.kl(identity, one)  # bit for bit
        assert calls[0] == 4 * 2
        assert screened != full  # the sums were the screening batch's only
        calls[0] = 0
        reusing.base(one)  # positions 0-2 from the original's record
        assert calls[0] == 4 * 2
        calls[0] = 0
        fresh.parents.clear()
        fresh.base(one)  # no parent known: every position runs
        assert calls[0] == 4 * 5
        recording.kl(identity, one, screening=True)
        calls[0] = 0
        assert recording.kl(identity, one, record=True) == full  # a full score that records as it runs
        assert calls[0] == 3 * 2
        calls[0] = 0
        recording.base(one)  # only the screening batch is left to record
        assert calls[0] == 1 * 2
        calls[0] = 0
        recording.base(one)  # complete: nothing runs
        assert calls[0] == 0
    finally:
        for handle in handles:
            handle.remove()
    for scorer in (reusing, recording):
        for ours, theirs in zip(scorer.recorded[str(one)], fresh.recorded[str(one)], strict=True):
            assert ours is not None and theirs is not None
            assert len(ours) == len(theirs) == len(one) + 1
            for a, b in zip(ours, theirs, strict=True):
                assert torch.equal(a, b)
    assert reusing.kl(one, two) == fresh.kl(one, two) == recording.kl(one, two)


def test_full_scores_keep_only_the_records_the_step_can_keep(readable_tiny: Callable[[str], Path],
                                                              text_file: Path) -> None:
    """Every full score records its candidate as it runs; only the best (and, with parallel groups,
    the best plain) plan keeps its record, complete after its screening batches are added."""
    from surgery.search import _Progress, _rank, _Scorer
    from surgery.view import live_architecture

    loaded = load_model(readable_tiny("llama"), Settings(device="cpu", quiet=True))
    arch = live_architecture(loaded.model)
    settings = Settings(seq_len=64, max_tokens=512, device="cpu", quiet=True)
    calibration, _ = split_windows(loaded, read_texts(text_file), settings, held_out=0.1, eval_tokens=128)
    scorer = _Scorer(loaded, arch, calibration, 2, screen_windows=2)
    identity = scorer.identity
    entries = [(f"drop {i}", Plan.drop(str(i), L), identity) for i in range(L)]
    entries.append(("merge [2-3]", Plan((0, 1, ParallelGroup((2, 3)), 4, 5), L), identity))
    rows = _rank(scorer, _Progress(True, "test", N), 1, entries, L + 1, True, [], keep=1)
    best_plain = next(row for row in rows if not row[2].groups)
    assert set(scorer.recorded) == {str(identity), rows[0][1], best_plain[1]}
    assert all(batch is not None for batch in scorer.recorded[rows[0][1]])  # no screening ran: all batches
    scorer = _Scorer(loaded, arch, calibration, 2, screen_windows=2)
    rows = _rank(scorer, _Progress(True, "test", N), 1, entries, 2, False, [], keep=1)  # screened: 2 re-scored
    assert set(scorer.recorded) == {str(identity), rows[0][1]}
    best = rows[0][2]
    record = scorer.recorded[str(best)]
    assert record is not None and [batch is None for batch in record] == [True] + [False] * (len(record) - 1)
    scorer.base(best)  # the screening batch is added
    fresh = _Scorer(loaded, arch, calibration, 2, screen_windows=2)
    fresh.base(best)
    for ours, theirs in zip(scorer.recorded[str(best)], fresh.recorded[str(best)], strict=True):
        assert ours is not None and theirs is not None
        assert all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def test_screening_order_spreads_the_screening_windows_and_keeps_every_window() -> None:
    assert screening_order(16, 4)[:4] == [0, 4, 8, 12]
    assert screening_order(10, 3)[:3] == [0, 3, 6]
    for count, screen in [(16, 4), (10, 3), (7, 6), (5, 1)]:
        order = screening_order(count, screen)
        assert sorted(order) == list(range(count)) and order[screen:] == sorted(order[screen:])
    assert screening_order(4, 4) == screening_order(4, 0) == [0, 1, 2, 3]  # nothing to screen


@pytest.mark.parametrize("method", ["greedy", "block"])
def test_screening_scores_every_candidate_on_its_windows_and_the_best_on_all(
    readable_tiny: Callable[[str], Path], text_file: Path, method: str
) -> None:
    """Each screening KL and each full KL equal the reference run whole on its windows; exactly the
    ``screen`` lowest by screening KL of a step get a full KL, and the step keeps the lowest of those."""
    path = readable_tiny("llama")
    loaded = load_model(path, Settings(device="cpu", quiet=True))
    settings = Settings(seq_len=64, max_tokens=512, device="cpu", quiet=True)
    calibration, _ = split_windows(loaded, read_texts(text_file), settings, held_out=0.1, eval_tokens=128)
    assert calibration.shape[0] == 8
    screen_windows = calibration[screening_order(8, 2)[:2]]
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        all_logits = model(input_ids=calibration, use_cache=False).logits
        screen_logits = model(input_ids=screen_windows, use_cache=False).logits

    report = search(path, N, method=method, screen=2, data=text_file, **SCREENED)
    assert (report.screen, report.screen_windows, report.calibration_windows) == (2, 2, 8)
    assert "screening every candidate on 2 windows, the best 2 of each step on all 8" in report.format()
    assert report.to_dict()["screening"] == {"windows": 2, "rescored": 2, "lazy": False,
                                             "screened": sum(c.screen_kl is not None for c in report.candidates)}
    for step in sorted({c.step for c in report.candidates}):
        rows = [c for c in report.candidates if c.step == step]
        for row in rows:
            layers = list(Plan.from_ranges(row.plan, L).layers)
            assert row.screen_kl == pytest.approx(_kl(reference_model(model, layers), screen_logits, screen_windows),
                                                  rel=1e-4), row.plan
        full = [c for c in rows if c.kl is not None]
        assert {c.plan for c in full} == {c.plan for c in sorted(rows, key=lambda c: (c.screen_kl, c.plan))[:2]}
        for row in full:
            layers = list(Plan.from_ranges(row.plan, L).layers)
            assert row.kl == pytest.approx(_kl(reference_model(model, layers), all_logits, calibration), rel=1e-4)
        assert report.trace[step - 1].kl == min(c.kl for c in full if c.kl is not None)
    assert report.calibration_kl == report.trace[-1].kl and str(report.plan) == report.trace[-1].plan

    plain = search(path, N, method=method, screen=0, data=text_file, **SCREENED)
    assert plain.screen_windows == 0 and "screening" not in plain.format()
    assert all(c.screen_kl is None and c.kl is not None for c in plain.candidates)
    if method == "block":  # every block measured on all the windows: the screened choice is never better
        assert plain.calibration_kl <= report.calibration_kl + 1e-9
    for row in report.candidates:  # the full KLs are the plain search's, candidate by candidate
        same = next((c for c in plain.candidates if c.plan == row.plan and c.step == row.step), None)
        if row.kl is not None and same is not None and same.kl is not None:
            assert row.kl == pytest.approx(same.kl, rel=1e-5)


class _FakeScorer:
    """Screening KLs from a table (``{plan text: kl}``); counts what was screened."""

    def __init__(self, kls: dict[str, float]) -> None:
        self.kls = kls
        self.asked: list[str] = []

    def base(self, plan: Plan) -> None:
        pass

    def kl(self, base: Plan, candidate: Plan, *, screening: bool = False) -> float:
        assert screening
        self.asked.append(str(candidate))
        return self.kls[str(candidate)]


class _Silent:
    def screened(self) -> None:
        pass


def _lazy_steps(costs: list[dict[int, float]], shortlist: int) -> tuple[list[list[int]], list[list[int]], int]:
    """Greedy drops over layers 0..5 of a 6-layer plan, where dropping layer i at step t adds
    ``costs[t][i]`` to the base's screening KL: the lazy shortlists, the eager ones, and the lazy screenings."""
    from surgery.search import _Lazy

    base = Plan(tuple(range(6)), 6)
    lazy, lazy_lists, eager_lists, screened = _Lazy(base), [], [], 0
    base_kl = 0.0
    for cost in costs:
        entries = [(f"drop {i}", Plan(tuple(x for x in base.layers if x != i), 6), base)
                   for i in base.layers if isinstance(i, int)]
        kls = {str(plan): base_kl + cost[int(change.split()[1])] for change, plan, _ in entries}
        scorer = _FakeScorer(kls)
        best = lazy.shortlist(scorer, _Silent(), entries, shortlist, False, {})  # type: ignore[arg-type]
        screened += len(scorer.asked)
        lazy_lists.append([int(change.split()[1]) for change, _, _ in best])
        eager = sorted(entries, key=lambda e: (kls[str(e[1])], str(e[1])))[:shortlist]
        eager_lists.append([int(change.split()[1]) for change, _, _ in eager])
        chosen = best[0][1]
        lazy.kept([chosen])
        base, base_kl = chosen, kls[str(chosen)]
    return lazy_lists, eager_lists, screened


def test_lazy_screening_equals_screening_everything_when_costs_only_grow() -> None:
    # Step by step every remaining layer costs a little more than it did before (removals compound).
    first = {0: 0.9, 1: 0.10, 2: 0.30, 3: 0.20, 4: 0.50, 5: 0.8}
    costs = [{i: c * (1 + 0.1 * t) + 0.01 * t for i, c in first.items()} for t in range(3)]
    lazy, eager, screened = _lazy_steps(costs, shortlist=2)
    assert lazy == eager == [[1, 3], [3, 2], [2, 4]]
    assert screened < 6 + 5 + 4  # the stale bounds ruled some out after the first step
    assert screened >= 6 + 2 + 2  # the first step screens all; later steps at least their shortlist


def test_lazy_screening_can_miss_a_change_whose_cost_shrinks() -> None:
    # Layer 5 is expensive first and then nearly free (it only mattered together with layer 1): the
    # stale bound keeps it from being screened; screening everything finds it. The price of the speed.
    costs = [{0: 0.9, 1: 0.10, 2: 0.30, 3: 0.20, 4: 0.50, 5: 0.8},
             {0: 0.9, 1: 0.10, 2: 0.30, 3: 0.20, 4: 0.50, 5: 0.01}]
    lazy, eager, _ = _lazy_steps(costs, shortlist=1)
    assert eager[1] == [5] and lazy[1] == [3]


def test_lazy_search_screens_fewer_and_scores_what_it_screens_exactly(
    readable_tiny: Callable[[str], Path], text_file: Path
) -> None:
    path = readable_tiny("llama")
    eager = search(path, 2, method="greedy", screen=2, data=text_file, allow_parallel=True, **SCREENED)
    lazy = search(path, 2, method="greedy", screen=2, data=text_file, allow_parallel=True, **{**SCREENED, "lazy": True})
    assert lazy.lazy and not eager.lazy
    assert lazy.screened < eager.screened == sum(c.screen_kl is not None for c in eager.candidates)
    assert f"screening lazily, {lazy.screened} of {len(lazy.candidates)} candidates on 2 windows" in lazy.format()
    assert lazy.to_dict()["screening"]["lazy"] is True
    eager_rows = {(c.step, c.plan): c for c in eager.candidates}
    for row in lazy.candidates:  # a screened or scored candidate: the same KLs as the eager search's
        same = eager_rows[(row.step, row.plan)]
        if row.screen_kl is not None:
            assert row.screen_kl == pytest.approx(same.screen_kl, rel=1e-5)
        if row.kl is not None and same.kl is not None:
            assert row.kl == pytest.approx(same.kl, rel=1e-5)
    assert str(lazy.plan) == str(eager.plan)  # on this model the stale bounds rule out nothing that wins
    for bad in [{"method": "block"}, {"screen": 0}]:
        with pytest.raises(OptionError, match="--lazy applies to --method greedy"):
            search(path, 2, data=text_file, **{"method": "greedy", **bad}, **{**SCREENED, "lazy": True})


def test_the_held_out_windows_are_the_end_of_the_text_and_never_calibrate(
    readable_tiny: Callable[[str], Path], text_file: Path
) -> None:
    from surgery.corpus import token_windows
    from tests.tiny_text import char_tokenizer

    calibration, held = _windows(readable_tiny("llama"), text_file)
    assert calibration.shape == (2, 64) and held.shape == (2, 64)
    every = token_windows(char_tokenizer(), read_texts(text_file), seq_len=64, max_tokens=1 << 30)
    index = {tuple(row.tolist()): i for i, row in enumerate(every)}
    tail = len(every) - round(len(every) * 0.1)
    assert all(index[tuple(row.tolist())] >= tail for row in held)
    assert all(index[tuple(row.tolist())] < tail for row in calibration)


def test_check_target_refuses_what_cannot_be_searched() -> None:
    assert check_target(1, 6, "greedy") == 1 and check_target(5, 6, "block", block_by="angular") == 5
    for bad, method, extra, text in [
        (0, "greedy", {}, "from 1 to 5"), (6, "greedy", {}, "from 1 to 5"), (True, "greedy", {}, "from 1 to 5"),
        (3, "greedy", {"beam": 0}, "--beam"), (3, "block", {"beam": 2}, "--beam applies to --method greedy"),
        (3, "score", {"allow_parallel": True}, "--allow-parallel"), (3, "magic", {}, "unknown search method"),
        (3, "block", {"block_by": "angular", "allow_parallel": True}, "--allow-parallel"),
        (3, "block", {"block_by": "cosine"}, "unknown block ranking"),
        (3, "greedy", {"screen": -1}, "--screen must be"), (3, "greedy", {"screen": 1.5}, "--screen must be"),
        (3, "score", {"screen": 2}, "--screen applies"), (3, "block", {"block_by": "angular", "screen": 0}, "--screen applies"),
    ]:
        with pytest.raises(OptionError, match=text):
            check_target(bad, 6, method, **extra)


def test_prune_to_layers_writes_the_searched_plan(readable_tiny: Callable[[str], Path], text_file: Path, tmp_path: Path) -> None:
    result = surgery.prune(readable_tiny("llama"), tmp_path / "out", to_layers=4, quiet=True,
                           search={"data": text_file, "seq_len": 64, "max_tokens": 128, "eval_tokens": 128, "device": "cpu"})
    assert result.search is not None and result.recipe.plan == result.search.plan and len(result.recipe.plan) == 4
    written = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert written.config.num_hidden_layers == 4
    with pytest.raises(OptionError, match="exactly one of drop"):
        surgery.prune(readable_tiny("llama"), tmp_path / "x", drop="1", to_layers=4)
    with pytest.raises(OptionError, match="only with to_layers"):
        surgery.prune(readable_tiny("llama"), tmp_path / "x", drop="1", method="block")
    assert not (tmp_path / "x").exists()


def test_a_winning_parallel_group_is_written_as_a_wide_block(readable_tiny: Callable[[str], Path], text_file: Path, tmp_path: Path) -> None:
    result = surgery.prune(readable_tiny("llama"), tmp_path / "out", to_layers=N, method="block", allow_parallel=True,
                           quiet=True, search={"data": text_file, **{k: v for k, v in FAST.items() if k != "quiet"}})
    assert result.search is not None
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert result.search.parallel_won  # on this tiny model a group of 4 beats every block of 3 dropped
    assert all(isinstance(step, ParallelGroup) for step in result.recipe.plan.groups) and "surgery_steps" in config


def test_cli_dry_run_and_json(readable_tiny: Callable[[str], Path], text_file: Path, tmp_path: Path,
                              capsys: pytest.CaptureFixture[str]) -> None:
    model, out = str(readable_tiny("llama")), tmp_path / "out"
    code, stdout, err = run(capsys, "prune", model, str(out), "--to-layers", "4", "--dry-run", "--data", str(text_file), *CLI_FAST)
    assert code == 0, err
    assert "search    greedy (beam 1): 6 -> 4 layers, 11 candidates" in stdout and "held out  KL" in stdout
    assert "6 layers -> 4" in stdout and not out.exists()
    code, stdout, err = run(capsys, "prune", model, str(out), "--to-layers", "4", "--method", "block", "--json",
                            "--data", str(text_file), *CLI_FAST)
    assert code == 0, err
    body = json.loads(stdout)
    found = body["search"]
    assert body["plan"] == found["plan"] and found["method"] == "block" and found["to_layers"] == 4
    assert len(found["candidates"]) == 5 and all(c["kl"] > 0 for c in found["candidates"])
    assert set(found["held_out"]) >= {"kl", "top1", "ppl_new", "ppl_original", "windows"}
    assert found["calibration"]["kl"] == min(c["kl"] for c in found["candidates"])
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4


@pytest.mark.parametrize("argv, expected", [
    (["--to-layers", "0"], "from 1 to 5"),
    (["--to-layers", "6"], "from 1 to 5"),
    (["--to-layers", "-2"], "from 1 to 5"),
    (["--to-layers", "3", "--drop", "1"], "not allowed with"),
    (["--to-layers", "3", "--method", "dfs"], "invalid choice"),
    (["--to-layers", "3", "--method", "score", "--allow-parallel"], "--allow-parallel"),
    (["--to-layers", "3", "--method", "block", "--beam", "4"], "--beam applies to --method greedy"),
    (["--drop", "3", "--method", "block"], "--method, --eval-tokens apply only with --to-layers"),
    (["--drop", "3", "--screen", "2"], "--screen, --eval-tokens apply only with --to-layers"),
    (["--to-layers", "3", "--screen", "-1"], "--screen must be"),
    (["--to-layers", "3", "--screen-tokens", "0"], "screen-tokens must be"),
    (["--to-layers", "3", "--held-out", "1.5"], "held-out"),
    (["--drop", "3", "--lazy"], "--eval-tokens, --lazy apply only with --to-layers"),
    (["--to-layers", "3", "--lazy", "--screen", "0"], "--lazy applies to --method greedy with screening"),
    (["--to-layers", "3", "--lazy", "--method", "block"], "--lazy applies to --method greedy with screening"),
])
def test_bad_input_is_one_line_exit_2_and_nothing_written(
    readable_tiny: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], expected: str
) -> None:
    out = tmp_path / "out"
    code, _, err = run(capsys, "prune", str(readable_tiny("llama")), str(out), *argv, *CLI_FAST)
    assert_one_line_error(code, err, expected)
    assert not out.exists()


def test_an_existing_out_is_refused_before_the_search(readable_tiny: Callable[[str], Path], tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep me")
    monkeypatch.setattr("surgery.search.search", lambda *a, **k: pytest.fail("searched"))
    code, _, err = run(capsys, "prune", str(readable_tiny("llama")), str(tmp_path / "out"), "--to-layers", "3", *CLI_FAST)
    assert_one_line_error(code, err, "exists")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["mine.txt"]


def test_encoders_are_refused(readable_tiny: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(capsys, "prune", str(readable_tiny("bert")), str(tmp_path / "out"), "--to-layers", "3", *CLI_FAST)
    assert_one_line_error(code, err, "causal LMs only")
    assert not (tmp_path / "out").exists()


def test_ctrl_c_prints_the_best_plan_so_far_and_writes_nothing(
    readable_tiny: Callable[[str], Path], text_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from surgery import search as module

    measured: list[tuple[str, float]] = []
    original = module._Scorer.kl

    def interrupted_after_eight(self: Any, base: Plan, candidate: Plan, **options: bool) -> float:
        if len(measured) == 8:  # the 6 plans of step 1, then 2 of step 2
            raise KeyboardInterrupt
        kl = original(self, base, candidate, **options)
        measured.append((str(candidate), kl))
        return kl

    monkeypatch.setattr(module._Scorer, "kl", interrupted_after_eight)
    out = tmp_path / "out"
    code, stdout, err = run(capsys, "prune", str(readable_tiny("llama")), str(out), "--to-layers", "3",
                            "--data", str(text_file), *CLI_FAST)
    assert code == 130 and not out.exists() and stdout == ""
    best_plan, best_kl = min((row for row in measured if len(Plan.from_ranges(row[0], L)) == 4), key=lambda row: row[1])
    assert f"best plan so far (4 layers, calibration KL {best_kl:.4f}): {best_plan}" in err
    assert "interrupted; nothing was written" in err

    measured.clear()
    with pytest.raises(SearchInterrupted) as caught:  # the API: the exception carries the plan
        search(readable_tiny("llama"), N, data=text_file, **FAST)
    assert caught.value.complete is False and str(caught.value.plan) == best_plan
    monkeypatch.setattr(module._Scorer, "kl", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(SearchInterrupted) as caught:
        search(readable_tiny("llama"), N, data=text_file, **FAST)
    assert caught.value.plan is None


@pytest.mark.real
def test_gemma3_to_14_layers_remaps_layer_types_and_loads(gemma3_dir: Path, gemma3: Any, tmp_path: Path) -> None:
    """Gemma 3 270M (18 layers, sliding and full attention) searched down to 14 on a few short windows."""
    result = surgery.prune(gemma3_dir, tmp_path / "out", to_layers=14, quiet=True,
                           search={"seq_len": 32, "max_tokens": 32, "eval_tokens": 64, "device": "cpu", "dtype": "fp32"})
    plan = result.recipe.plan
    assert len(plan) == 14 and result.search is not None and result.search.plan == plan
    layers = list(plan.layers)
    rewritten = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()  # stock transformers
    assert rewritten.config.num_hidden_layers == 14
    assert rewritten.config.layer_types == [gemma3.config.layer_types[i] for i in layers]
    ids = transformers.AutoTokenizer.from_pretrained(gemma3_dir)("The quick brown fox", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(rewritten(ids).logits, reference_model(gemma3, layers)(ids).logits, rtol=1e-5, atol=1e-4)
