"""ZB-H1 / ZB1P (loop shape, split backward) as a planner decision: action order,
simulated step time, memory, search and plan building."""

from __future__ import annotations

import random
import types
from dataclasses import replace

import pytest

from hetmoe_operator.api.job import PlacementSpec
from hetmoe_operator.cli.plan_command import _schedule
from hetmoe_operator.placement import plan_job
from hetmoe_operator.placement.cost_model import (
    FORWARD,
    INPUT_GRAD,
    WEIGHT_GRAD,
    ChunkTimes,
    loop_stages,
    simulate_pipeline,
    zb1p_actions,
)
from hetmoe_operator.placement.layout import ZBV_SIMULATED_ROUNDS, Layout, Problem, evaluate
from hetmoe_operator.placement.memory import interleaved_peaks, zb1p_peaks
from hetmoe_operator.placement.search import Searcher, fill_pipelines
from hetmoe_operator.plan import Plan

from .helpers import check_plan, cluster, grade, local_cluster, small_model, training


def _valid_counts(pp: int, most: int) -> list[int]:
    """Microbatch counts torch's ZB1P accepts (a multiple of its number of rounds)."""
    return [m for m in range(1, most + 1) if m % max(1, m // pp) == 0]


def _simulate(pp: int, virtual: int, m: int, times, links=None) -> list[float]:
    actions = [zb1p_actions(pp, virtual, r, m) for r in range(pp)]
    if links is None:
        links = [0.0] * (pp * virtual - 1)
    return simulate_pipeline(times, loop_stages(pp, virtual), links, actions)


def _uniform(pp: int, virtual: int, f: float, b: float, w: float):
    return [[ChunkTimes(f, b, w)] * virtual for _ in range(pp)]


# -- action order --------------------------------------------------------------


def test_action_order_is_torchs() -> None:
    """The order is the one torch's ScheduleInterleavedZeroBubble generates (the trainer
    runs that class) for pp 1-6, 1-3 stages per rank and every count torch accepts up
    to 4 pp + 2; the bubbles torch adds afterwards are only idle slots (None)."""
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    kinds = {
        schedules._ComputationType.FORWARD: FORWARD,
        schedules._ComputationType.BACKWARD_INPUT: INPUT_GRAD,
        schedules._ComputationType.BACKWARD_WEIGHT: WEIGHT_GRAD,
    }
    calculate = schedules.ScheduleInterleavedZeroBubble._calculate_single_rank_operations
    checked = 0
    for pp in range(1, 7):
        for virtual in (1, 2, 3):
            for m in _valid_counts(pp, 4 * pp + 2):
                rounds = max(1, m // pp)
                fake = types.SimpleNamespace(
                    pp_group_size=pp,
                    _n_microbatches=m,
                    n_local_stages=virtual,
                    number_of_rounds=rounds,
                    microbatches_per_round=m // rounds,
                )
                for rank in range(pp):
                    theirs = [a for a in calculate(fake, rank) if a is not None]
                    assert all(a.stage_index % pp == rank for a in theirs)
                    mine = zb1p_actions(pp, virtual, rank, m)
                    assert mine == tuple(
                        (kinds[a.computation_type], a.stage_index // pp, a.microbatch_index)
                        for a in theirs
                    ), (pp, virtual, m, rank)
                    checked += 1
    assert checked > 500


def test_torch_refuses_what_the_order_refuses() -> None:
    with pytest.raises(ValueError, match="multiple of"):
        zb1p_actions(4, 1, 0, 11)  # 11 // 4 = 2 rounds do not divide 11
    assert zb1p_actions(4, 1, 0, 10)  # 2 rounds of 5


@pytest.mark.parametrize(("pp", "virtual", "m"), [(1, 1, 1), (2, 1, 2), (4, 1, 16), (4, 2, 8)])
def test_every_action_once_and_in_dependency_order(pp: int, virtual: int, m: int) -> None:
    for rank in range(pp):
        ops = zb1p_actions(pp, virtual, rank, m)
        assert sorted(ops) == sorted(
            (k, c, i)
            for k in (FORWARD, INPUT_GRAD, WEIGHT_GRAD)
            for c in range(virtual)
            for i in range(m)
        )
        where = {op: n for n, op in enumerate(ops)}
        for c in range(virtual):
            for i in range(m):
                assert where[(FORWARD, c, i)] < where[(INPUT_GRAD, c, i)]
                assert where[(INPUT_GRAD, c, i)] < where[(WEIGHT_GRAD, c, i)]


# -- simulated step time ---------------------------------------------------------


@pytest.mark.parametrize("pp", [2, 4, 8])
def test_zbh1_bubble_is_pp_minus_one_times_f_plus_b_minus_w(pp: int) -> None:
    """Uniform stages: ZB-H1's bubble is (pp - 1)(F + B - W) (Qi et al., 2024), a third
    of 1F1B's (pp - 1)(F + B + W) when F = B = W; with W = 0 it is 1F1B's."""
    for m in (pp, 2 * pp, 4 * pp):
        for f, b, w in ((1.0, 1.0, 1.0), (1.0, 1.5, 0.5), (1.0, 2.0, 0.0)):
            ends = _simulate(pp, 1, m, _uniform(pp, 1, f, b, w))
            assert max(ends) - m * (f + b + w) == pytest.approx((pp - 1) * (f + b - w))


def test_simulation_bounds_hold_for_uneven_stages() -> None:
    """Never faster than the busiest position, nor than one microbatch's trip down and
    back up, and transfers only add time."""
    rng = random.Random(5)
    for _ in range(40):
        pp = rng.choice([2, 3, 4, 8])
        virtual = rng.choice([1, 1, 2])
        m = rng.choice([c for c in _valid_counts(pp, 5 * pp) if c >= pp])
        times = [
            [
                ChunkTimes(rng.uniform(0.2, 2), rng.uniform(0.2, 3), rng.uniform(0, 2))
                for _ in range(virtual)
            ]
            for _ in range(pp)
        ]
        links = [rng.uniform(0, 0.5) for _ in range(pp * virtual - 1)]
        ends = _simulate(pp, virtual, m, times, links)
        busiest = max(m * sum(c.total for c in position) for position in times)
        trip = sum(c.forward + c.input_grad for p in times for c in p) + 2 * sum(links)
        assert max(ends) >= busiest - 1e-9
        assert max(ends) >= trip - 1e-9
        assert max(ends) >= max(_simulate(pp, virtual, m, times)) - 1e-9


def test_extrapolated_step_time_is_close_and_never_optimistic() -> None:
    """The planner simulates at most ZBV_SIMULATED_ROUNDS x pp microbatches (multiples
    of pp, as the planner's counts are) and adds the rest at the slowest position's
    pace: within 1% of the full simulation and never below it."""
    rng = random.Random(13)
    for _ in range(40):
        pp = rng.choice([2, 4, 8, 16])
        m = pp * rng.randint(1, 10)
        times = []
        for _ in range(pp):
            f = rng.uniform(0.5, 2)
            times.append([ChunkTimes(f, f * rng.uniform(0.8, 1.6), f * rng.uniform(0.3, 1.1))])
        links = [rng.uniform(0, 0.3) for _ in range(pp - 1)]
        full = max(_simulate(pp, 1, m, times, links))
        simulated = min(m, ZBV_SIMULATED_ROUNDS * pp)
        slowest = max(p[0].total for p in times)
        extrapolated = max(_simulate(pp, 1, simulated, times, links)) + (m - simulated) * slowest
        assert full * (1 - 1e-12) <= extrapolated <= full * 1.01


# -- memory ----------------------------------------------------------------------


@pytest.mark.parametrize("pp", [2, 4, 8])
def test_zbh1_keeps_pp_microbatches_on_every_position(pp: int) -> None:
    """Position r keeps 1F1B's pp - r microbatches before their B and r more whose W is
    deferred (m >= pp, as the planner's counts are): pp not yet weight-gradient'ed on
    every position, which only matches 1F1B's peak on position 0."""
    for m in (pp, 4 * pp):
        for r in range(pp):
            peaks = zb1p_peaks(pp, 1, r, m)
            (one_f_one_b,) = interleaved_peaks(pp, 1, r, m)
            assert max(v[0] for v in peaks) == one_f_one_b[0] == min(pp - r, m)
            # Right after a B (before its W) one more is deferred, one fewer alive.
            assert max(v[1] for v in peaks) == r + 1
            assert max(sum(v) for v in peaks) == pp


@pytest.mark.parametrize(("pp", "virtual"), [(2, 2), (4, 2), (4, 4)])
def test_zb1p_keeps_fewer_alive_than_interleaved_1f1b_but_defers(pp: int, virtual: int) -> None:
    """With chunks, ZB1P warms up pp - 1 - r forwards fewer than interleaved 1F1B
    (torch's multiply_factor 1 vs 2), so fewer chunk-microbatches wait for their B,
    while some wait for their W."""
    m = 2 * pp
    for r in range(pp):
        peaks = zb1p_peaks(pp, virtual, r, m)
        alive = max(sum(v[:virtual]) for v in peaks)
        deferred = max(sum(v[virtual:]) for v in peaks)
        interleaved = max(sum(v) for v in interleaved_peaks(pp, virtual, r, m))
        assert alive <= interleaved
        assert deferred >= 1


def _problem(memory: float = 80.0, layers: int = 8) -> Problem:
    description = cluster([grade("a", 1.0, memory, 1.0)], [("pa", "a", 1, 4)])
    return Problem(small_model(layers=layers, dense=0), training(16, 128), description, [1.0] * 8)


def test_zbh1_memory_and_time_against_1f1b() -> None:
    """Same layout: ZB-H1 is faster (smaller bubble), holds about the same on position 0
    and, on position r, at least pp / (pp - r) times 1F1B's (deferred W's)."""
    problem = _problem()
    pp = 4
    plain = Layout(pp, 1, (0, 2, 4, 6, 8), (("pa",) * pp,), 1, (16,), (False,) * pp, False)
    split = replace(plain, split_backward=True)
    one, zb = evaluate(problem, plain), evaluate(problem, split)
    assert zb.step.total < one.step.total
    assert zb.step.bubble < one.step.bubble
    before = {m.stage: m.usage.activations for m in one.memory}
    after = {m.stage: m.usage.activations for m in zb.memory}
    # Position 0 only briefly trades one alive microbatch for a deferred one (after a
    # B, before its W); later positions keep r deferred throughout.
    assert before[0] <= after[0] < 1.2 * before[0]
    for stage in range(1, pp):
        assert after[stage] > before[stage] * (1 + stage / (pp - stage)) * 0.99
    assert split.schedule_name == "ZB-H1"
    assert replace(split, virtual=2).schedule_name == "ZB1P v=2"


def test_split_counts_are_what_torch_accepts() -> None:
    """ZB-H1: any count torch's ZB1P accepts, else whole rounds of pp (42 = 21 + 21:
    21 // 4 = 5 rounds do not divide 21, and 42 is no multiple of 4); ZB1P with chunks:
    whole rounds of pp."""
    assert fill_pipelines([1.0, 1.0], 4, 12, split_backward=True) == [6, 6]
    counts = fill_pipelines([1.0, 2.0], 4, 48, split_backward=True)
    assert counts is not None and sum(counts) == 48
    assert all(c % max(1, c // 4) == 0 for c in counts)
    assert fill_pipelines([1.0, 1.0], 4, 42, split_backward=True) is None
    # 22 + 22 would not do (22 // 4 = 5 rounds): 24 + 20 (6 and 5 rounds).
    assert fill_pipelines([1.0, 1.0], 4, 44, split_backward=True) == [24, 20]
    counts = fill_pipelines([1.0, 1.0], 4, 40, virtual=2, split_backward=True)
    assert counts == [20, 20]
    assert fill_pipelines([1.0, 1.0], 4, 42, virtual=2, split_backward=True) is None


# -- search and plan -------------------------------------------------------------


def test_planner_picks_zbh1_where_it_is_faster_and_fits() -> None:
    """One layer per position: neither ZB-V nor interleaving can split the layers, and
    ZB-H1 beats 1F1B by most of the bubble."""
    model = small_model(layers=4)
    spec = PlacementSpec(pipeline_parallel=4)
    plan = plan_job(model, training(16, 128), local_cluster(4), spec)
    assert plan.pipeline_shape == "loop" and plan.virtual_stages == 1
    assert plan.split_backward
    problem = Problem(model, training(16, 128), local_cluster(4), [1.0] * model.num_experts)
    without = Searcher(problem, spec, zero_bubble=False)
    without.run(float("inf"))
    assert without.best is not None and not without.best.layout.split_backward
    assert plan.prediction is not None
    assert plan.prediction.tokens_per_s > without.best.evaluation.tokens_per_s
    assert plan.prediction.step_time.bubble < without.best.evaluation.step.bubble
    check_plan(plan, local_cluster(4))
    for replica in plan.replicas:  # torch's ZB1P constraint
        m = replica.num_microbatches
        assert m % max(1, m // 4) == 0
    text = " ".join(plan.prediction.assumptions)
    assert "ZB-H1" in text and "1F1B schedule: stage i keeps" not in text
    assert _schedule(plan).startswith("ZB-H1")
    assert Plan.from_json(plan.to_json()) == plan
