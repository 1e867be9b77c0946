"""``plan_job``: from a job and a cluster to a Plan, or a PlanningError saying why not."""

from __future__ import annotations

import time
from collections.abc import Sequence

from hetmoe_operator.api.cluster import ClusterDescription
from hetmoe_operator.api.job import PlacementSpec
from hetmoe_operator.api.model import ModelArchitecture
from hetmoe_operator.api.training import TrainingConfig
from hetmoe_operator.placement.build import build_plan
from hetmoe_operator.placement.checks import check_inputs, explain_failure
from hetmoe_operator.placement.errors import PlanningError
from hetmoe_operator.placement.layout import Problem
from hetmoe_operator.placement.search import Searcher
from hetmoe_operator.plan import Plan


def expert_loads(model: ModelArchitecture, expert_load: Sequence[float] | None) -> list[float]:
    """The expected share of tokens per routed expert (uniform unless measured)."""
    if expert_load is None:
        return [1.0] * model.num_experts
    loads = [float(x) for x in expert_load]
    if len(loads) != model.num_experts:
        raise PlanningError(
            "expert-load",
            f"the expert load histogram has {len(loads)} entries but the model has "
            f"{model.num_experts} routed experts",
            {"entries": len(loads), "experts": model.num_experts},
        )
    if any(not x >= 0 for x in loads) or sum(loads) <= 0:
        raise PlanningError(
            "expert-load",
            "expert loads must be non-negative numbers with a positive sum",
            {"loads": loads[:8]},
        )
    return loads


def make_problem(
    model: ModelArchitecture,
    training: TrainingConfig,
    cluster: ClusterDescription,
    expert_load: Sequence[float] | None = None,
) -> Problem:
    """The fixed inputs of one planning run (shared with baselines and benchmarks)."""
    return Problem(model, training, cluster, expert_loads(model, expert_load))


def plan_job(
    model: ModelArchitecture,
    training: TrainingConfig,
    cluster: ClusterDescription,
    placement: PlacementSpec,
    *,
    job_name: str = "local",
    expert_load: Sequence[float] | None = None,
    previous: Plan | None = None,
    mixed_pipelines: bool = True,
) -> Plan:
    """The best plan under ``placement``'s objective and pins.

    ``previous`` (optional) is the plan the job ran with before its capacity changed:
    the search then starts next to it, which is much faster on large clusters (a
    local search: plan without it for the global optimum). ``mixed_pipelines=False``
    keeps every replica's stages on one pool (for comparisons).

    Raises PlanningError (never anything else for valid API objects) when no layout
    satisfies memory, divisibility, device count, pins or budget.
    """
    started = time.monotonic()
    problem = make_problem(model, training, cluster, expert_load)
    check_inputs(problem, placement)
    searcher = Searcher(problem, placement, previous, mixed_pipelines=mixed_pipelines)
    deadline = started + placement.time_limit_seconds
    searcher.run(deadline)
    if searcher.best is None:
        if time.monotonic() > deadline:
            raise PlanningError(
                "time",
                f"no feasible plan found within timeLimitSeconds="
                f"{placement.time_limit_seconds:g}; raise the limit or pin degrees",
                {"time_limit_seconds": placement.time_limit_seconds},
            )
        raise explain_failure(searcher)
    best = searcher.best
    return build_plan(problem, best.layout, best.evaluation, placement, job_name)
