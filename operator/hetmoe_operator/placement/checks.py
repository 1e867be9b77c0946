"""Turning impossible requests into PlanningErrors that say what to change.

``check_inputs`` rejects what no layout can satisfy before searching (cheap, exact
messages); ``explain_failure`` names the binding constraint when the search found
nothing feasible.
"""

from __future__ import annotations

from hetmoe_operator.api.job import PlacementSpec
from hetmoe_operator.placement.cost_model import GIB, TIB
from hetmoe_operator.placement.errors import PlanningError
from hetmoe_operator.placement.layout import Problem
from hetmoe_operator.placement.search import Searcher


def check_inputs(problem: Problem, placement: PlacementSpec) -> None:
    """Raise PlanningError for requests no layout can satisfy, before searching."""
    model = problem.model
    devices = sum(info.pool.devices for info in problem.pools.values())
    if devices == 0:
        raise PlanningError(
            "devices",
            "the cluster has no usable devices: every pool has 0 nodes",
            {"pools": [p.name for p in problem.cluster.pools]},
        )
    pp, dp, ep = placement.pipeline_parallel, placement.data_parallel, placement.expert_parallel
    layers = model.num_hidden_layers
    if pp is not None and pp > layers:
        raise PlanningError(
            "pins",
            f"pipelineParallel={pp} exceeds the model's {layers} layers; pin at most {layers}",
            {"pipeline_parallel": pp, "layers": layers},
        )
    if ep is not None and ep > model.num_experts:
        raise PlanningError(
            "pins",
            f"expertParallel={ep} exceeds the {model.num_experts} routed experts; pin at most "
            f"{model.num_experts}",
            {"expert_parallel": ep, "experts": model.num_experts},
        )
    if ep is not None and dp is not None and dp % ep:
        raise PlanningError(
            "divisibility",
            f"expertParallel={ep} must divide dataParallel={dp} (an EP group is made of "
            "data-parallel replicas)",
            {"expert_parallel": ep, "data_parallel": dp},
        )
    world = (pp or 1) * (dp or 1)
    if world > devices:
        raise PlanningError(
            "devices",
            f"the pins need {world} devices (pipelineParallel x dataParallel) but the "
            f"cluster has {devices}",
            {"needed": world, "available": devices},
        )
    largest_pool = max(info.pool.devices for info in problem.pools.values())
    if (pp or 1) * (ep or 1) > largest_pool:
        raise PlanningError(
            "devices",
            f"one EP group needs pipelineParallel x expertParallel = {(pp or 1) * (ep or 1)} "
            f"devices inside one pool; the largest pool has {largest_pool}",
            {"needed": (pp or 1) * (ep or 1), "largest_pool": largest_pool},
        )
    batch = problem.training.global_batch_size
    if dp is not None and batch < dp:
        raise PlanningError(
            "divisibility",
            f"globalBatchSize={batch} is smaller than dataParallel={dp}: every replica needs "
            "at least one sequence",
            {"global_batch_size": batch, "data_parallel": dp},
        )
    if dp is not None and pp is not None and pp > 1 and batch < dp * pp:
        raise PlanningError(
            "divisibility",
            f"globalBatchSize={batch} cannot give each of dataParallel={dp} replicas "
            f"pipelineParallel={pp} microbatches (1F1B needs one per stage): raise "
            f"globalBatchSize to at least {dp * pp} or lower the pins",
            {"global_batch_size": batch, "data_parallel": dp, "pipeline_parallel": pp},
        )
    needed = problem.memory.model_state_bytes()
    offered = sum(info.usable_bytes * info.pool.devices for info in problem.pools.values())
    if needed > offered:
        raise PlanningError(
            "memory",
            f"the model needs about {needed / TIB:.1f} TiB of accelerator memory for weights, "
            f"gradients and optimizer state; eligible pools offer {offered / TIB:.1f} TiB "
            "usable: add nodes or choose a smaller model",
            {"needed_gib": needed / GIB, "usable_gib": offered / GIB},
        )


def explain_failure(searcher: Searcher) -> PlanningError:
    """The error for a search that found nothing feasible."""
    placement = searcher.placement
    if searcher.over_budget is not None or searcher.cheapest_blocked < float("inf"):
        cheapest = min(
            searcher.cheapest_blocked,
            searcher.over_budget.cost_per_hour if searcher.over_budget else float("inf"),
        )
        return PlanningError(
            "budget",
            f"the cheapest layout costs at least {cheapest:.2f} per hour, above "
            f"budgetPerHour={placement.budget_per_hour}: raise the budget",
            {"cheapest_per_hour": cheapest, "budget_per_hour": placement.budget_per_hour},
        )
    misfit = searcher.closest_misfit
    if misfit is not None:
        worst = max(misfit.memory, key=lambda m: m.usage.total / m.usable_bytes)
        return PlanningError(
            "memory",
            f"no layout fits in memory: the closest one needs "
            f"{worst.usage.total / GIB:.1f} GiB per device on pool {worst.pool} (stage "
            f"{worst.stage}) where {worst.usable_bytes / GIB:.1f} GiB are usable; add "
            "devices, shorten sequences or reduce the batch",
            {
                "pool": worst.pool,
                "stage": worst.stage,
                "needed_gib": worst.usage.total / GIB,
                "usable_gib": worst.usable_bytes / GIB,
            },
        )
    pins = {
        "pipelineParallel": placement.pipeline_parallel,
        "dataParallel": placement.data_parallel,
        "expertParallel": placement.expert_parallel,
    }
    pinned = ", ".join(f"{k}={v}" for k, v in pins.items() if v is not None)
    if pinned:
        return PlanningError(
            "pins",
            f"no layout satisfies the pins {pinned}: each EP group of expertParallel replicas "
            "must fit inside one pool with pipelineParallel stages, and dataParallel must be "
            "reachable with whole groups; relax or change the pins",
            {k: v for k, v in pins.items() if v is not None},
        )
    return PlanningError(
        "divisibility",
        "no layout divides the global batch and the devices: globalBatchSize must be at "
        "least the number of data-parallel replicas",
        {"global_batch_size": searcher.problem.training.global_batch_size},
    )
