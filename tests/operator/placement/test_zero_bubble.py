"""ZB-V (zero-bubble V schedule) as a planner decision: action order, simulated step
time, memory, search and plan building."""

from __future__ import annotations

import random
import types
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hetmoe_operator.api.job import PlacementSpec
from hetmoe_operator.api.model import PRESETS
from hetmoe_operator.api.training import TrainingConfig
from hetmoe_operator.placement import PlanningError, plan_job
from hetmoe_operator.placement.cost_model import (
    FORWARD,
    INPUT_GRAD,
    WEIGHT_GRAD,
    ChunkTimes,
    simulate_zbv,
    zbv_actions,
)
from hetmoe_operator.placement.layout import (
    ZBV_SIMULATED_ROUNDS,
    Layout,
    Problem,
    chunk_ranges,
    evaluate,
)
from hetmoe_operator.placement.memory import interleaved_peaks, zbv_peaks
from hetmoe_operator.placement.search import fill_pipelines
from hetmoe_operator.plan import Plan
from hetmoe_trainer.distributed import validate_plan

from .helpers import (
    check_plan,
    cluster,
    grade,
    local_cluster,
    plan_without_zero_bubble,
    small_model,
    training,
)


def _simulate(pp: int, m: int, chunks, hops=None) -> list[float]:
    actions = [zbv_actions(pp, r, m) for r in range(pp)]
    return simulate_zbv(chunks, hops if hops is not None else [0.0] * (pp - 1), actions)


def _uniform(pp: int, f: float, b: float, w: float):
    return [(ChunkTimes(f, b, w), ChunkTimes(f, b, w)) for _ in range(pp)]


# -- action order --------------------------------------------------------------


def test_action_order_is_torchs() -> None:
    """The order is the one torch's ScheduleZBVZeroBubble generates (the trainer runs
    that class), for every small pp and microbatch count."""
    schedules = pytest.importorskip("torch.distributed.pipelining.schedules")
    kinds = {
        schedules._ComputationType.FORWARD: FORWARD,
        schedules._ComputationType.BACKWARD_INPUT: INPUT_GRAD,
        schedules._ComputationType.BACKWARD_WEIGHT: WEIGHT_GRAD,
    }
    calculate = schedules.ScheduleZBVZeroBubble._calculate_single_rank_operations
    for pp in range(1, 7):
        for m in range(1, 3 * pp + 3):
            fake = types.SimpleNamespace(pp_group_size=pp, _n_microbatches=m, num_stages=2 * pp)
            for rank in range(pp):
                theirs = tuple(
                    (kinds[a.computation_type], int(a.stage_index != rank), a.microbatch_index)
                    for a in calculate(fake, rank)
                    if a is not None
                )
                assert theirs == zbv_actions(pp, rank, m), (pp, m, rank)


@pytest.mark.parametrize(("pp", "m"), [(1, 1), (2, 2), (4, 4), (4, 7), (4, 16), (8, 9)])
def test_every_action_once_and_in_dependency_order(pp: int, m: int) -> None:
    for rank in range(pp):
        ops = zbv_actions(pp, rank, m)
        assert sorted(ops) == sorted(
            (k, c, i) for k in (FORWARD, INPUT_GRAD, WEIGHT_GRAD) for c in (0, 1) for i in range(m)
        )
        where = {op: n for n, op in enumerate(ops)}
        for c in (0, 1):
            for i in range(m):
                assert where[(FORWARD, c, i)] < where[(INPUT_GRAD, c, i)]
                assert where[(INPUT_GRAD, c, i)] < where[(WEIGHT_GRAD, c, i)]


# -- simulated step time ---------------------------------------------------------


@pytest.mark.parametrize("pp", [2, 4, 8])
def test_equal_passes_leave_one_chunk_forward_per_position(pp: int) -> None:
    """F = B = W per chunk and m >= 2 pp - 1: the pipeline takes 6 m chunk-passes plus
    (pp - 1) F (the last position cannot start before the first forward reaches it):
    a sixth of 1F1B's (pp - 1) (F + B + W) over both chunks."""
    for m in (2 * pp - 1, 2 * pp, 4 * pp + 1):
        ends = _simulate(pp, m, _uniform(pp, 1.0, 1.0, 1.0))
        assert max(ends) == pytest.approx(6 * m + (pp - 1))
        one_f_one_b_bubble = (pp - 1) * 6.0
        assert max(ends) - 6 * m == pytest.approx(one_f_one_b_bubble / 6)


def test_less_weight_work_leaves_more_bubble() -> None:
    """W is what fills the bubble: with no W the schedule has 1F1B-like fill/drain, and
    too few microbatches (m < 2 pp - 1) cannot fill it either."""
    pp, m = 4, 16
    full = max(_simulate(pp, m, _uniform(pp, 1.0, 1.0, 1.0))) - 6 * m
    half = max(_simulate(pp, m, _uniform(pp, 1.0, 1.5, 0.5))) - 6 * m
    none = max(_simulate(pp, m, _uniform(pp, 1.0, 2.0, 0.0))) - 6 * m
    assert full < half < none
    few = max(_simulate(pp, pp, _uniform(pp, 1.0, 1.0, 1.0))) - 6 * pp
    assert few > full


def test_simulation_bounds_hold_for_uneven_stages() -> None:
    """Never faster than the busiest position, nor than one microbatch's round trip
    through every stage (F down the V and B back up), and transfers only add time."""
    rng = random.Random(7)
    for _ in range(40):
        pp = rng.choice([2, 3, 5, 8])
        m = rng.randint(1, 5 * pp)
        chunks = [
            tuple(
                ChunkTimes(rng.uniform(0.2, 2), rng.uniform(0.2, 3), rng.uniform(0, 2))
                for _ in range(2)
            )
            for _ in range(pp)
        ]
        hops = [rng.uniform(0, 0.5) for _ in range(pp - 1)]
        ends = _simulate(pp, m, chunks, hops)
        busiest = max(m * (a.total + b.total) for a, b in chunks)
        trip = sum(c.forward + c.input_grad for pair in chunks for c in pair) + 2 * 2 * sum(hops)
        assert max(ends) >= busiest - 1e-9
        assert max(ends) >= trip - 1e-9
        assert max(ends) >= max(_simulate(pp, m, chunks)) - 1e-9


def test_extrapolated_step_time_is_close_and_never_optimistic() -> None:
    """The planner simulates at most ZBV_SIMULATED_ROUNDS x pp microbatches and adds the
    rest at the slowest position's pace; against the full simulation that is within
    1% and never below it."""
    rng = random.Random(11)
    for _ in range(60):
        pp = rng.choice([2, 4, 8, 16])
        m = rng.randint(pp, 10 * pp)
        chunks = []
        for _ in range(pp):
            pair = []
            for _ in range(2):
                f = rng.uniform(0.5, 2)
                pair.append(ChunkTimes(f, f * rng.uniform(0.8, 1.6), f * rng.uniform(0.3, 1.1)))
            chunks.append(tuple(pair))
        hops = [rng.uniform(0, 0.3) for _ in range(pp - 1)]
        full = max(_simulate(pp, m, chunks, hops))
        simulated = min(m, ZBV_SIMULATED_ROUNDS * pp)
        slowest = max(a.total + b.total for a, b in chunks)
        extrapolated = max(_simulate(pp, simulated, chunks, hops)) + (m - simulated) * slowest
        assert full * (1 - 1e-12) <= extrapolated <= full * 1.01


# -- memory ----------------------------------------------------------------------


@pytest.mark.parametrize("pp", [2, 4, 8])
def test_zbv_keeps_about_pp_stage_equivalents_on_every_position(pp: int) -> None:
    """Forwards not yet weight-gradient'ed, over both chunks: at most 2 pp + 1 chunk
    microbatches (about pp stage-equivalents, 1F1B's first stage) on every position, at
    least 1F1B's pp - r stage-equivalents."""
    m = 4 * pp
    for r in range(pp):
        peaks = zbv_peaks(pp, r, m)
        held = max(sum(v) for v in peaks)
        assert held <= 2 * pp + 1
        (one_f_one_b,) = interleaved_peaks(pp, 1, r, m)
        assert held >= 2 * one_f_one_b[0] - 1
    assert max(v[0] for v in zbv_peaks(pp, 0, m)) == 2 * pp  # chunk 0 on position 0


def _problem(memory: float = 80.0, layers: int = 8) -> Problem:
    description = cluster([grade("a", 1.0, memory, 1.0)], [("pa", "a", 1, 4)])
    return Problem(small_model(layers=layers, dense=0), training(16, 128), description, [1.0] * 8)


def test_zbv_memory_never_below_1f1b_on_any_position() -> None:
    """Same layers per position (every layer alike): ZB-V's estimate is at least 1F1B's
    on every position, and the deferred weight gradients add to the activations."""
    problem = _problem()
    pp = 4
    bounds = (0, 2, 4, 6, 8)
    loop = Layout(pp, 1, bounds, (("pa",) * pp,), 1, (16,), (False,) * pp, False)
    v = replace(loop, virtual=2, shape="v")
    loop_memory = {m.stage: m.usage for m in evaluate(problem, loop).memory}
    v_memory = {m.stage: m.usage for m in evaluate(problem, v).memory}
    for stage, usage in loop_memory.items():
        assert v_memory[stage].activations >= usage.activations * (1 - 1e-12)
    # Position 0 holds both the embedding and the LM head in the V shape.
    assert v_memory[0].weights > loop_memory[0].weights
    assert v_memory[pp - 1].weights < loop_memory[pp - 1].weights


def test_v_chunks_follow_the_v() -> None:
    ranges = chunk_ranges((0, 3, 5, 8), 2, "v")
    # Position 0: layers 0-1 and the last layer; position 2 (the tip): the middle.
    assert ranges == ((0, 2), (2, 3), (3, 5), (5, 6), (6, 7), (7, 8))
    problem = _problem()
    layout = Layout(3, 1, (0, 3, 5, 8), (("pa",) * 3,), 1, (16,), (False,) * 3, False, 2, "v")
    assert problem.position_chunks(layout) == (
        ((0, 2), (7, 8)),
        ((2, 3), (6, 7)),
        ((3, 5), (5, 6)),
    )


def test_zbv_microbatch_counts_need_no_whole_rounds() -> None:
    counts = fill_pipelines([1.0, 1.0], 4, 42, virtual=2, shape="v")
    assert counts == [21, 21]
    assert fill_pipelines([1.0, 1.0], 4, 42, virtual=2) is None


# -- search and plan -------------------------------------------------------------


def test_planner_picks_zbv_where_it_is_faster_and_fits() -> None:
    model = small_model(layers=8)
    spec = PlacementSpec(pipeline_parallel=4)
    plan = plan_job(model, training(16, 128), local_cluster(4), spec)
    other = plan_without_zero_bubble(model, training(16, 128), local_cluster(4), spec)
    assert plan.pipeline_shape == "v" and plan.virtual_stages == 2
    assert plan.prediction is not None and other.prediction is not None
    assert plan.prediction.tokens_per_s > other.prediction.tokens_per_s
    assert plan.prediction.step_time.bubble < other.prediction.step_time.bubble
    check_plan(plan, local_cluster(4))
    validate_plan(plan)  # the trainer's checks accept it (16 microbatches, pp 4)
    assert [r.stage for r in plan.ranks] == [0, 1, 2, 3]  # ranks' stage is the position
    assert [s.index for s in plan.stages] == list(range(8))
    assert plan.stages[0].has_embedding and plan.stages[-1].has_head
    assert plan.stages_at(0) == [plan.stages[0], plan.stages[7]]
    text = " ".join(plan.prediction.assumptions)
    assert "zero-bubble V" in text and "W ~ B ~ F" in text
    assert "1F1B schedule: stage i keeps" not in text
    again = plan_job(model, training(16, 128), local_cluster(4), spec, previous=plan)
    assert again.pipeline_shape == "v"
    assert Plan.from_json(plan.to_json()) == plan


def test_planner_keeps_1f1b_where_zbv_does_not_fit() -> None:
    """Ling-Plus on 16 stages is memory-bound: its uneven split relies on 1F1B's late
    stages holding few microbatches, and ZB-V keeps about pp on every position."""
    description = cluster([grade("d", 400, 80, 10.0)], [("pd", "d", 16, 8)])
    spec = PlacementSpec(pipeline_parallel=16, expert_parallel=8)
    plan = plan_job(
        PRESETS["ling-plus"],
        TrainingConfig(steps=1, global_batch_size=256, sequence_length=4096),
        description,
        spec,
    )
    assert plan.pipeline_shape == "loop" and plan.virtual_stages == 1
    assert not plan.split_backward  # ZB-H1 keeps pp microbatches on every position too


@st.composite
def pipelined_instances(draw: st.DrawFn):
    layers = draw(st.integers(2, 8))
    model = small_model(
        layers=layers,
        experts=draw(st.sampled_from([2, 4, 8])),
        dense=draw(st.integers(0, 1)),
    )
    grades = [
        grade(
            f"g{i}",
            draw(st.sampled_from([0.5, 1.0, 4.0])),
            draw(st.sampled_from([1.7, 2.0, 8.0])),
            draw(st.sampled_from([0.0, 1.0, 3.0])),
        )
        for i in range(draw(st.integers(1, 2)))
    ]
    pools = [
        (f"p{i}", draw(st.sampled_from(grades)).name, draw(st.integers(1, 2)), 4)
        for i in range(draw(st.integers(1, 2)))
    ]
    batch = draw(st.integers(4, 32))
    spec = PlacementSpec(pipeline_parallel=draw(st.integers(2, max(2, layers // 2))))
    return model, training(batch, draw(st.sampled_from([16, 128]))), cluster(grades, pools), spec


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instance=pipelined_instances())
def test_pinned_pipelines_plan_validly_with_or_without_zbv(instance) -> None:
    """Every layer placed once, memory never exceeded, fraction of ideal <= 1 and a JSON
    round trip (check_plan), on pinned pipelines where ZB-V is in play."""
    model, training_config, description, spec = instance
    try:
        plan = plan_job(model, training_config, description, spec)
    except PlanningError:
        return
    check_plan(plan, description)
    if plan.pipeline_shape == "v":
        covered = sorted(
            x for r in range(plan.parallel.pp) for s in plan.stages_at(r) for x in s.layers
        )
        assert covered == list(range(model.num_hidden_layers))
