"""Interleaved 1F1B as a planner decision: cost model, memory, search and plan building."""

from __future__ import annotations

import itertools
from dataclasses import replace

import pytest

from hetmoe_operator.api.job import PlacementSpec
from hetmoe_operator.api.model import PRESETS
from hetmoe_operator.api.training import TrainingConfig
from hetmoe_operator.placement import plan_job
from hetmoe_operator.placement.cost_model import Assumptions
from hetmoe_operator.placement.layout import Layout, Problem, chunk_ranges, evaluate, stage_times
from hetmoe_operator.placement.memory import interleaved_peaks
from hetmoe_operator.placement.search import Searcher, fill_pipelines
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


def _problem(overlap: bool = True, layers: int = 8) -> Problem:
    description = cluster([grade("a", 1.0, 80, 1.0)], [("pa", "a", 1, 4)])
    return Problem(
        small_model(layers=layers),
        training(16, 128),
        description,
        [1.0] * 8,
        Assumptions(overlap_communication=overlap),
    )


def _layout(virtual: int, pp: int = 4, layers: int = 8) -> Layout:
    bounds = tuple(layers * s // pp for s in range(pp + 1))
    return Layout(pp, 1, bounds, (("pa",) * pp,), 1, (16,), (False,) * pp, False, virtual)


@pytest.mark.parametrize("overlap", [True, False])
def test_bubble_shrinks_with_virtual_stages_and_transfers_grow(overlap: bool) -> None:
    problem = _problem(overlap)
    steps = {v: evaluate(problem, _layout(v)).step for v in (1, 2)}
    assert steps[1].bubble > 0
    assert steps[2].compute == pytest.approx(steps[1].compute, rel=1e-9)
    if overlap:  # Megatron-LM: (pp - 1) / (v m) of the step, half of 1F1B's
        assert steps[2].bubble == pytest.approx(steps[1].bubble / 2, rel=1e-9)
        assert steps[2].total < steps[1].total
    else:  # v transfers per microbatch and position, all exposed, also in the bubble
        assert steps[1].bubble / 2 < steps[2].bubble < steps[1].bubble * 0.75
        assert steps[2].communication > steps[1].communication
    for step in steps.values():
        parts = step.compute + step.bubble + step.communication + step.imbalance + step.optimizer
        assert parts == pytest.approx(step.total, rel=1e-12)


def test_stage_times_stay_within_the_step() -> None:
    problem = _problem()
    layout = _layout(2)
    total = evaluate(problem, layout).step.total
    times = stage_times(problem, layout)
    assert {t.stage for t in times} == set(range(4))
    for t in times:
        assert t.busy_seconds <= t.step_seconds * (1 + 1e-9) <= total * (1 + 1e-9)


def test_chunks_follow_the_position_split_in_global_order() -> None:
    bounds = (0, 3, 5, 9)
    assert chunk_ranges(bounds, 1) == ((0, 3), (3, 5), (5, 9))
    chunks = chunk_ranges(bounds, 2)
    # position r holds chunks r and r + pp; layer counts per position are unchanged
    assert chunks == ((0, 2), (2, 3), (3, 5), (5, 6), (6, 7), (7, 9))
    assert [sum(e - s for s, e in chunks[r::3]) for r in range(3)] == [3, 2, 4]


def test_interleaved_activation_peaks_match_megatron() -> None:
    pp, m = 8, 32
    for position in range(pp):
        assert interleaved_peaks(pp, 1, position, m) == ((pp - position,),)
    for v in (2, 4):
        first = interleaved_peaks(pp, v, 0, m)
        # Korthikanti et al.: the first stage holds pp + (pp - 1) / v stage-equivalents.
        assert {sum(counts) for counts in first} == {v * pp + pp - 1}
        last = interleaved_peaks(pp, v, pp - 1, m)
        assert {sum(counts) for counts in last} == {(v - 1) * pp + 1}
    # Few microbatches: every forward runs before the first backward.
    assert interleaved_peaks(2, 2, 0, 2) == ((2, 2),)


def test_interleaving_costs_activation_memory() -> None:
    problem = _problem()
    one = evaluate(problem, _layout(1)).memory
    two = evaluate(problem, _layout(2)).memory
    for a, b in zip(one, two, strict=True):
        assert b.usage.activations > a.usage.activations
        assert b.usage.weights == pytest.approx(a.usage.weights)


def test_microbatches_come_in_rounds_of_pp_when_interleaved() -> None:
    counts = fill_pipelines([1.0, 2.0, 1.0], 4, 48, virtual=2)
    assert counts is not None and sum(counts) == 48
    assert all(c % 4 == 0 and c >= 4 for c in counts)
    assert counts[1] < counts[0] == counts[2]
    assert fill_pipelines([1.0, 1.0], 4, 42, virtual=2) is None
    assert fill_pipelines([1.0, 1.0], 4, 42) == [21, 21]


def test_pinned_pipeline_plan_interleaves_and_the_trainer_accepts_it() -> None:
    model = small_model(layers=8)
    spec = PlacementSpec(pipeline_parallel=4)
    plan = plan_without_zero_bubble(model, training(16, 128), local_cluster(4), spec)
    assert plan.virtual_stages == 2 and plan.pipeline_shape == "loop"
    check_plan(plan, local_cluster(4))
    Plan.model_validate(plan.model_dump())
    validate_plan(plan)
    assert [s.has_embedding for s in plan.stages] == [True] + [False] * 7
    assert [s.has_head for s in plan.stages] == [False] * 7 + [True]
    assert plan.prediction is not None
    text = " ".join(plan.prediction.assumptions)
    assert "interleaved 1F1B, 2 chunks" in text
    assert "1F1B schedule: stage i keeps" not in text  # the 1F1B in-flight rule is replaced


def test_no_interleaving_without_whole_rounds_of_pp() -> None:
    model = small_model(layers=8)
    # 10 sequences over pp = 4: 10 (or 5) microbatches, not a multiple of 4.
    spec = PlacementSpec(pipeline_parallel=4, data_parallel=1)
    plan = plan_without_zero_bubble(model, training(10, 128), local_cluster(4), spec)
    assert plan.virtual_stages == 1
    assert len(plan.stages) == 4
    # ZB-V needs no whole rounds, so with it the planner leaves 1F1B here.
    zero_bubble = plan_job(model, training(10, 128), local_cluster(4), spec)
    assert zero_bubble.pipeline_shape == "v"
    assert zero_bubble.replicas[0].num_microbatches % 4
    validate_plan(zero_bubble)  # the trainer runs ZB-V with any count >= pp
    flat = plan_job(model, training(16, 128), local_cluster(4), PlacementSpec(pipeline_parallel=1))
    assert flat.virtual_stages == 1


def test_chunk_options_are_powers_of_two_up_to_the_layers_per_position() -> None:
    # Any seating of stages on pools may interleave: the trainer orders each pipeline's
    # process group by position (tests/trainer/runtime/test_rank_order.py).
    description = cluster(
        [grade("a", 1.0, 80, 1.0), grade("b", 2.0, 80, 1.0)],
        [("pa", "a", 1, 2), ("pb", "b", 1, 2)],
    )
    problem = Problem(small_model(layers=8), training(16, 128), description, [1.0] * 8)
    searcher = Searcher(problem, PlacementSpec())
    assert searcher.virtual_options(2) == [
        (1, "loop", False),
        (1, "loop", True),
        (2, "v", True),
        (2, "loop", False),
        (2, "loop", True),
        (4, "loop", False),
        (4, "loop", True),
    ]
    assert searcher.virtual_options(4) == [
        (1, "loop", False),
        (1, "loop", True),
        (2, "v", True),
        (2, "loop", False),
        (2, "loop", True),
    ]
    assert searcher.virtual_options(1) == [(1, "loop", False)]


def test_memory_bound_ling_plus_keeps_1f1b() -> None:
    """Interleaving makes every position hold about pp microbatches of its chunks (1F1B:
    pp - position), which the memory-tight Ling-Plus pipeline cannot afford: a
    pinned 16-stage plan fits with 1F1B and stays there."""
    description = cluster([grade("d", 400, 80, 10.0)], [("pd", "d", 16, 8)])
    spec = PlacementSpec(pipeline_parallel=16, expert_parallel=8)
    plan = plan_job(
        PRESETS["ling-plus"],
        TrainingConfig(steps=1, global_batch_size=256, sequence_length=4096),
        description,
        spec,
    )
    assert plan.virtual_stages == 1


def test_interleaved_plans_replan_and_roundtrip() -> None:
    model = small_model(layers=8)
    spec = PlacementSpec(pipeline_parallel=2)
    plan = plan_job(model, training(16, 128), local_cluster(4), spec)
    assert plan.virtual_stages > 1
    again = plan_job(model, training(16, 128), local_cluster(4), spec, previous=plan)
    assert again.virtual_stages == plan.virtual_stages
    assert Plan.from_json(plan.to_json()) == plan
    layout = _layout(2)
    assert replace(layout, virtual=1).chunks() == tuple(itertools.pairwise(layout.bounds))
