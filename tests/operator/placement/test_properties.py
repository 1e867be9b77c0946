"""Property tests on random small instances: a valid plan or a structured error."""

from __future__ import annotations

import typing

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hetmoe_operator.api.job import PlacementSpec
from hetmoe_operator.api.training import TrainingConfig
from hetmoe_operator.placement import PlanningError, plan_job
from hetmoe_operator.placement.errors import Constraint

from .helpers import check_plan, cluster, grade, small_model

CONSTRAINTS = set(typing.get_args(Constraint))


@st.composite
def instances(draw: st.DrawFn):
    layers = draw(st.integers(1, 6))
    model = small_model(
        layers=layers,
        experts=draw(st.sampled_from([2, 4, 8])),
        dense=draw(st.integers(0, min(1, layers))),
    )
    grades = [
        grade(
            f"g{i}",
            draw(st.sampled_from([0.5, 1.0, 4.0])),
            draw(st.sampled_from([1.6, 1.7, 2.0, 8.0])),
            draw(st.sampled_from([0.0, 1.0, 3.0])),
        )
        for i in range(draw(st.integers(1, 3)))
    ]
    pools = [
        (
            f"p{i}",
            draw(st.sampled_from(grades)).name,
            draw(st.integers(0, 3)),
            draw(st.sampled_from([1, 2, 4])),
        )
        for i in range(draw(st.integers(1, 3)))
    ]
    training = TrainingConfig(
        steps=1,
        global_batch_size=draw(st.integers(1, 32)),
        sequence_length=draw(st.sampled_from([16, 128, 512])),
    )
    objective = draw(st.sampled_from(["throughput", "cost", "throughput-under-budget"]))
    spec = PlacementSpec(
        objective=objective,
        budget_per_hour=draw(st.sampled_from([1.0, 10.0, 100.0]))
        if objective == "throughput-under-budget"
        else None,
        pipeline_parallel=draw(st.one_of(st.none(), st.integers(1, 4))),
        data_parallel=draw(st.one_of(st.none(), st.integers(1, 4))),
        expert_parallel=draw(st.one_of(st.none(), st.sampled_from([1, 2, 4]))),
    )
    return model, training, cluster(grades, pools), spec


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instance=instances())
def test_random_instances_plan_or_fail_cleanly(instance) -> None:
    model, training, description, spec = instance
    try:
        plan = plan_job(model, training, description, spec)
    except PlanningError as error:
        assert error.constraint in CONSTRAINTS
        assert str(error) == error.message and error.message
        return
    check_plan(plan, description)
    degrees = plan.parallel
    for pinned, actual in (
        (spec.pipeline_parallel, degrees.pp),
        (spec.data_parallel, degrees.dp),
        (spec.expert_parallel, degrees.ep),
    ):
        assert pinned is None or pinned == actual
    assert plan.prediction is not None
    if spec.budget_per_hour is not None:
        assert plan.prediction.cost_per_hour <= spec.budget_per_hour * (1 + 1e-9)
    used: dict[str, int] = {}
    for rank in plan.ranks:
        used[rank.pool] = used.get(rank.pool, 0) + 1
    for pool in description.pools:
        assert used.get(pool.name, 0) <= pool.devices
