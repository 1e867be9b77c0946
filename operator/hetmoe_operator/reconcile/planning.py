"""Capacity checks and planner calls: keep the plan, re-plan, or explain why not."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hetmoe_operator.api.catalog import DeviceCatalog
from hetmoe_operator.api.cluster import ClusterDescription, NodePool
from hetmoe_operator.api.job import MoEJobSpec
from hetmoe_operator.api.status import MoEJobStatus, PlanStatus, PoolPlanStatus
from hetmoe_operator.discovery import Discovery, below_min_nodes, held_workers
from hetmoe_operator.placement.errors import PlanningError
from hetmoe_operator.plan import Plan
from hetmoe_operator.reconcile.failures import keeps_its_nodes
from hetmoe_operator.reconcile.observe import Observation

PlanFunction = Callable[..., Plan]
"""``hetmoe_operator.placement.plan_job`` or a test double with its signature."""

TRANSIENT_CONSTRAINTS = frozenset({"memory", "devices", "time"})
"""Planner constraints that more (or freed) capacity can lift: the job waits Pending.
Every other constraint (divisibility, pins, budget, grade, expert-load) needs a spec
change, so the job is Failed with the planner's message until the spec is edited."""


@dataclass(frozen=True)
class PlanOutcome:
    """A plan, or why there is none and whether waiting can help."""

    plan: Plan | None
    reason: str = ""
    message: str = ""
    transient: bool = True


def pool_needs(plan: Plan) -> dict[str, tuple[int, int]]:
    """Pool -> (nodes used, most processes on one node)."""
    needs: dict[str, tuple[int, int]] = {}
    for pool, _slot, nproc in plan.nodes():
        nodes, widest = needs.get(pool, (0, 0))
        needs[pool] = (nodes + 1, max(widest, nproc))
    return needs


def plan_fits(plan: Plan, discovery: Discovery) -> bool:
    """Whether every pool the plan uses still has enough whole free nodes."""
    pools = {p.name: p for p in discovery.pools}
    grades = {r.pool: r.grade for r in plan.ranks}
    for pool, (nodes, widest) in pool_needs(plan).items():
        have = pools.get(pool)
        if (
            have is None
            or have.grade != grades[pool]
            or have.nodes < nodes
            or have.devices_per_node < widest
        ):
            return False
    return True


def trim(pools: tuple[NodePool, ...], max_nodes: int | None) -> list[NodePool]:
    """Drop nodes from the largest pools until at most ``max_nodes`` remain."""
    counts = {p.name: p.nodes for p in pools}
    if max_nodes is not None:
        while sum(counts.values()) > max_nodes:
            largest = max(sorted(counts), key=lambda n: counts[n])
            counts[largest] -= 1
    return [
        NodePool(
            name=p.name,
            grade=p.grade,
            nodes=counts[p.name],
            devices_per_node=p.devices_per_node,
            node_names=p.node_names[: counts[p.name]],
        )
        for p in pools
        if counts[p.name] > 0
    ]


def make_plan(
    spec: MoEJobSpec,
    job_name: str,
    discovery: Discovery,
    catalog: DeviceCatalog,
    planner: PlanFunction,
    previous: Plan | None = None,
) -> PlanOutcome:
    """Call the planner on the usable capacity, translating every refusal into words.

    ``previous`` is the plan the job ran with: the planner searches near it first, which
    keeps re-planning after losing a node fast (and the new layout familiar).
    """
    short = below_min_nodes(discovery, spec.pools)
    if short:
        return PlanOutcome(
            None, "WaitingForCapacity", f"{'; '.join(short)} (usable: {discovery.summary()})"
        )
    usable = sum(p.nodes for p in discovery.pools)
    if spec.elastic.min_nodes and usable < spec.elastic.min_nodes:
        return PlanOutcome(
            None,
            "WaitingForCapacity",
            f"elastic.minNodes is {spec.elastic.min_nodes} but only {usable} whole node(s) "
            f"are usable ({discovery.summary()})",
        )
    pools = trim(discovery.pools, spec.elastic.max_nodes)
    if not pools:
        reason = "UnknownGrade" if discovery.unknown_grades else "WaitingForCapacity"
        return PlanOutcome(None, reason, f"no usable nodes: {discovery.summary()}")
    cluster = ClusterDescription(catalog=catalog, pools=pools)
    try:
        plan = planner(
            spec.model.resolve(),
            spec.training,
            cluster,
            spec.placement,
            job_name=job_name,
            previous=previous,
        )
    except PlanningError as error:
        transient = error.constraint in TRANSIENT_CONSTRAINTS
        reason = "WaitingForCapacity" if transient else "PlanInfeasible"
        return PlanOutcome(
            None, reason, f"{error.message} (usable: {discovery.summary()})", transient
        )
    except Exception as error:  # a planner bug must not crash-loop the operator
        return PlanOutcome(
            None, "PlanInfeasible", f"planner error {type(error).__name__}: {error}", True
        )
    return PlanOutcome(plan)


def plan_status(plan: Plan, config_map: str) -> PlanStatus:
    """The status summary of a plan."""
    prediction = plan.prediction
    total_cost = prediction.cost_per_hour if prediction else 0.0
    per_1t = prediction.cost_per_1t_tokens if prediction else 0.0
    summaries = list(plan.pools)
    if summaries:
        pools = [
            PoolPlanStatus(
                pool=s.pool,
                grade=s.grade,
                nodes=s.nodes,
                devices=s.devices,
                stages=list(s.stages),
                layers=s.layers,
                experts_per_device=s.experts_per_device,
                predicted_tokens_per_second=s.predicted_tokens_per_s,
                predicted_cost_per_1t_tokens=per_1t * s.cost_per_hour / total_cost
                if total_cost
                else 0.0,
            )
            for s in summaries
        ]
    else:
        pools = _pools_from_ranks(plan)
    degrees = plan.parallel
    return PlanStatus(
        config_map=config_map,
        world_size=plan.world_size,
        parallel=f"pp={degrees.pp} dp={degrees.dp} ep={degrees.ep} tp={degrees.tp}",
        predicted_tokens_per_second=prediction.tokens_per_s if prediction else 0.0,
        predicted_cost_per_1t_tokens=per_1t,
        currency=plan.currency,
        pools=pools,
    )


def _pools_from_ranks(plan: Plan) -> list[PoolPlanStatus]:
    grades = {r.pool: r.grade for r in plan.ranks}
    stages: dict[str, set[int]] = {}
    devices: dict[str, int] = {}
    for rank in plan.ranks:
        stages.setdefault(rank.pool, set()).add(rank.stage)
        devices[rank.pool] = devices.get(rank.pool, 0) + 1
    return [
        PoolPlanStatus(
            pool=pool,
            grade=grades[pool],
            nodes=nodes,
            devices=devices[pool],
            stages=sorted(stages[pool]),
        )
        for pool, (nodes, _) in pool_needs(plan).items()
    ]


def grades_column(plan: Plan) -> str:
    """``A:2,D:1``: nodes per grade, for the Grades printer column."""
    per_grade: dict[str, int] = {}
    grades = {r.pool: r.grade for r in plan.ranks}
    for pool, (nodes, _) in pool_needs(plan).items():
        per_grade[grades[pool]] = per_grade.get(grades[pool], 0) + nodes
    return ",".join(f"{g}:{n}" for g, n in sorted(per_grade.items()))


def restart_hold(observation: Observation, status: MoEJobStatus) -> list[dict[str, Any]]:
    """Stand-ins for the nodes of the job's plan while its restart has not launched
    (``failures.keeps_its_nodes``), so a job queued for the same pools cannot take
    them meanwhile; none otherwise."""
    if observation.plan is None or not keeps_its_nodes(status, observation.now):
        return []
    nodes = {pool: count for pool, (count, _) in pool_needs(observation.plan).items()}
    return held_workers(observation.job.uid, status.generation + 1, nodes)
