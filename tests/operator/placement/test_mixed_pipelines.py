"""Mixed-grade pipelines: one replica's stages served by pools of different grades."""

from __future__ import annotations

from hetmoe_operator.api.job import PlacementSpec
from hetmoe_operator.api.model import ModelArchitecture
from hetmoe_operator.placement import plan_job
from hetmoe_operator.plan import Plan

from .helpers import check_plan, cluster, grade, small_model, training

MODEL = ModelArchitecture(
    num_hidden_layers=8,
    hidden_size=1024,
    num_attention_heads=8,
    num_key_value_heads=4,
    num_experts=8,
    num_shared_experts=1,
    num_experts_per_tok=2,
    moe_intermediate_size=1024,
    intermediate_size=4096,
    first_k_dense_replace=1,
    vocab_size=32000,
)
"""0.3B parameters: about 5 GiB of weights, gradients and optimizer state."""


def _stage_grades(plan: Plan) -> dict[int, tuple[str, ...]]:
    """Per replica: the grade serving each stage."""
    grades: dict[int, dict[int, str]] = {}
    for rank in plan.ranks:
        grades.setdefault(rank.dp_index, {})[rank.stage] = rank.grade
    return {dp: tuple(g[s] for s in sorted(g)) for dp, g in grades.items()}


def _layers_per(plan: Plan, owner: dict[int, str]) -> dict[str, int]:
    """Layers per owner of a pipeline position (chunks of an interleaved plan summed)."""
    sizes: dict[str, int] = {}
    for stage in plan.stages:
        key = owner[stage.index % plan.parallel.pp]
        sizes[key] = sizes.get(key, 0) + stage.layer_end - stage.layer_start
    return sizes


def test_a_model_no_single_device_holds_is_split_over_two_grades() -> None:
    # The fast device has 4 GiB (2.1 usable after overhead): only a pipeline that puts
    # most layers on the roomy slow device fits.
    description = cluster(
        [grade("fast", 40, 4, 1.0), grade("slow", 10, 16, 1.0)],
        [("f", "fast", 1, 1), ("s", "slow", 1, 1)],
    )
    plan = plan_job(MODEL, training(16, 512), description, PlacementSpec())
    check_plan(plan, description)
    assert set(_stage_grades(plan).values()) == {("slow", "fast")}
    pools = {r.stage: r.pool for r in plan.ranks}
    sizes = _layers_per(plan, pools)
    assert sizes["s"] > sizes["f"], "memory decides: the roomy device takes more layers"


def test_stage_split_balances_grade_speed() -> None:
    # Both devices hold the model; the mixed pipeline gives the 4x faster grade about
    # 4x the layers, and beats data parallelism over the slow cross-pool link.
    description = cluster(
        [grade("fast", 40, 16, 1.0), grade("slow", 10, 16, 1.0)],
        [("f", "fast", 1, 1), ("s", "slow", 1, 1)],
    )
    plan = plan_job(MODEL, training(16, 512), description, PlacementSpec())
    check_plan(plan, description)
    (kind,) = set(_stage_grades(plan).values())
    assert sorted(kind) == ["fast", "slow"]
    layers = _layers_per(plan, {r.stage: r.grade for r in plan.ranks})
    assert layers["fast"] >= 3 * layers["slow"]
    for pinned in (PlacementSpec(pipeline_parallel=1),):
        other = plan_job(MODEL, training(16, 512), description, pinned)
        assert plan.prediction is not None and other.prediction is not None
        assert plan.prediction.tokens_per_s > other.prediction.tokens_per_s


def test_every_mixed_replica_shares_one_grade_order() -> None:
    description = cluster(
        [grade("fast", 40, 4, 1.0), grade("slow", 10, 16, 1.0)],
        [("f", "fast", 2, 2), ("s", "slow", 2, 2)],
    )
    plan = plan_job(MODEL, training(32, 512), description, PlacementSpec())
    check_plan(plan, description)
    kinds = set(_stage_grades(plan).values())
    assert len(kinds) == 1 and len(set(next(iter(kinds)))) == 2
    assert plan.parallel.dp >= 2


def test_replan_from_a_mixed_pipeline_is_as_good_as_from_scratch() -> None:
    grades = [grade("fast", 40, 4, 1.0), grade("slow", 10, 16, 1.0)]
    before = cluster(grades, [("f", "fast", 2, 2), ("s", "slow", 2, 2)])
    after = cluster(grades, [("f", "fast", 2, 2), ("s", "slow", 1, 2)])
    first = plan_job(MODEL, training(32, 512), before, PlacementSpec())
    assert all(len(set(kind)) == 2 for kind in _stage_grades(first).values())
    again = plan_job(MODEL, training(32, 512), after, PlacementSpec(), previous=first)
    check_plan(again, after)
    fresh = plan_job(MODEL, training(32, 512), after, PlacementSpec())
    assert again.prediction is not None and fresh.prediction is not None
    assert again.prediction.tokens_per_s >= 0.9 * fresh.prediction.tokens_per_s


def test_free_grades_under_a_budget_and_a_one_sequence_batch_plan_cleanly() -> None:
    """Found by hypothesis: a zero-price mixed pipeline under a budget divided by its
    price, and a batch too small for any mixed pipeline was reported as over budget."""
    description = cluster(
        [grade("g0", 0.5, 4.0, 0.0), grade("g1", 0.5, 4.0, 0.0)],
        [("p0", "g0", 1, 1), ("p1", "g1", 1, 1)],
    )
    spec = PlacementSpec(objective="throughput-under-budget", budget_per_hour=1.0)
    plan = plan_job(small_model(layers=2, experts=2, dense=0), training(batch=1), description, spec)
    check_plan(plan, description)
    assert plan.parallel.dp == 1
