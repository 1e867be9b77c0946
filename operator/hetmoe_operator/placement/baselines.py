"""What the plan is worth: the same job as a type-blind even split and on one grade.

The even split is what a grade-unaware launcher does: take every device in cluster
order, the same number of layers per stage and the same batch per replica. It is
still given its best pipeline/expert degrees, microbatch size and chunks per stage
(interleaved 1F1B) under the same cost model, so the comparison isolates grade
awareness. The single-grade plans are the planner itself restricted to the pools of one
grade.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

from hetmoe_operator.api.cluster import ClusterDescription
from hetmoe_operator.api.job import PlacementSpec
from hetmoe_operator.api.model import ModelArchitecture
from hetmoe_operator.api.training import TrainingConfig
from hetmoe_operator.placement.errors import PlanningError
from hetmoe_operator.placement.layout import Evaluation, Layout, Problem, evaluate
from hetmoe_operator.placement.planner import make_problem, plan_job
from hetmoe_operator.placement.search import apportion, divisors
from hetmoe_operator.placement.stages import even_split
from hetmoe_operator.plan import Plan

_EVEN_SPLIT_MICROBATCH_OPTIONS = 6


@dataclass(frozen=True)
class Alternative:
    """One point of comparison: its predicted speed and cost, or why it has none."""

    name: str
    tokens_per_s: float | None
    cost_per_hour: float | None
    cost_per_1t_tokens: float | None
    devices: int
    note: str = ""


@dataclass(frozen=True)
class Comparison:
    """The chosen plan next to the type-blind even split and each single-grade plan."""

    plan: Plan
    even_split: Alternative
    single_grade: tuple[Alternative, ...]
    """Best plan on the pools of each grade alone, in grade-name order."""

    @property
    def best_single_grade(self) -> Alternative | None:
        """The single-grade plan that is best under the plan's objective."""
        feasible = [a for a in self.single_grade if a.tokens_per_s is not None]
        if not feasible:
            return None
        if self.plan.objective == "cost":
            return min(feasible, key=lambda a: a.cost_per_1t_tokens or 0.0)
        return max(feasible, key=lambda a: a.tokens_per_s or 0.0)


def _alternative(name: str, evaluation: Evaluation, devices: int, note: str = "") -> Alternative:
    return Alternative(
        name=name,
        tokens_per_s=evaluation.tokens_per_s,
        cost_per_hour=evaluation.cost_per_hour,
        cost_per_1t_tokens=evaluation.cost_per_1t_tokens,
        devices=devices,
        note=note,
    )


def even_split_layout(problem: Problem, pp: int, ep: int, microbatch_size: int) -> Layout | None:
    """All devices in cluster order, equal layers per stage, equal batch per replica."""
    bounds = even_split(problem.model.num_hidden_layers, pp)
    if bounds is None:
        return None
    blocks = [name for name, info in problem.pools.items() for _ in range(info.pool.devices // ep)]
    groups = tuple(tuple(blocks[g * pp : (g + 1) * pp]) for g in range(len(blocks) // pp))
    units = problem.training.global_batch_size // microbatch_size
    if not groups or units % ep:
        return None
    counts = apportion(units // ep, [1.0] * len(groups))
    if counts is None:
        return None
    layout = Layout(pp, ep, bounds, groups, microbatch_size, tuple(counts), (False,) * pp, True)
    if evaluate(problem, layout).fits:
        return layout
    # A grade-blind launcher still turns on recomputation when memory is short.
    return Layout(pp, ep, bounds, groups, microbatch_size, tuple(counts), (True,) * pp, True)


def _interleaved(layout: Layout) -> list[Layout]:
    """The even split as ZB-V (two chunks per stage in V order), ZB-H1 (1F1B with the
    backward split) and with 2, 4, ... chunks per stage (interleaved 1F1B), where every
    stage has that many layers and, for ZB-H1 and interleaved, every replica whole
    rounds of pp microbatches: a grade-blind launcher may pick any of them too."""
    if layout.pp == 1:
        return []
    fewest = min(b - a for a, b in itertools.pairwise(layout.bounds))
    variants = [replace(layout, virtual=2, shape="v")] if fewest >= 2 else []
    if any(count % layout.pp for count in layout.microbatches):
        return variants
    variants.append(replace(layout, split_backward=True))
    virtual = 2
    while virtual <= fewest:
        variants.append(replace(layout, virtual=virtual))
        virtual *= 2
    return variants


def best_even_split(problem: Problem, degrees: Sequence[tuple[int, int]]) -> Alternative:
    """The fastest even split over the given (pp, ep) pairs and microbatch counts."""
    batch = problem.training.global_batch_size
    best: tuple[Evaluation, Layout] | None = None
    for pp, ep in degrees:
        for size in divisors(batch)[:_EVEN_SPLIT_MICROBATCH_OPTIONS]:
            layout = even_split_layout(problem, pp, ep, size)
            if layout is None:
                continue
            for candidate in (layout, *_interleaved(layout)):
                evaluation = evaluate(problem, candidate)
                if evaluation.fits and (
                    best is None or evaluation.tokens_per_s > best[0].tokens_per_s
                ):
                    best = (evaluation, candidate)
    if best is None:
        return Alternative("even split", None, None, None, 0, "does not fit in memory")
    evaluation, layout = best
    return _alternative(
        "even split",
        evaluation,
        sum(layout.devices_per_pool().values()),
        f"pp={layout.pp} ep={layout.ep} dp={layout.dp}"
        + ("" if layout.schedule_name == "1F1B" else f" {layout.schedule_name}"),
    )


def compare_baselines(
    model: ModelArchitecture,
    training: TrainingConfig,
    cluster: ClusterDescription,
    placement: PlacementSpec,
    *,
    job_name: str = "local",
    expert_load: Sequence[float] | None = None,
) -> Comparison:
    """Plan the job, then predict the even split and every single-grade plan."""
    plan = plan_job(model, training, cluster, placement, job_name=job_name, expert_load=expert_load)
    problem = make_problem(model, training, cluster, expert_load)
    layers = model.num_hidden_layers
    degrees = [(plan.parallel.pp, plan.parallel.ep)] + [
        (pp, ep)
        for pp in (1, 2, 4, 8, 16, 32)
        if pp <= layers
        for ep in divisors(model.num_experts)
        if ep <= 16
    ]
    even = best_even_split(problem, list(dict.fromkeys(degrees)))
    singles = []
    for grade in sorted({p.grade for p in cluster.pools if p.devices}):
        pools = [p for p in cluster.pools if p.grade == grade]
        sub = ClusterDescription(catalog=cluster.catalog, pools=pools)
        try:
            single = plan_job(
                model, training, sub, placement, job_name=job_name, expert_load=expert_load
            )
        except PlanningError as error:
            singles.append(Alternative(f"only {grade}", None, None, None, 0, error.message))
            continue
        assert single.prediction is not None
        singles.append(
            Alternative(
                name=f"only {grade}",
                tokens_per_s=single.prediction.tokens_per_s,
                cost_per_hour=single.prediction.cost_per_hour,
                cost_per_1t_tokens=single.prediction.cost_per_1t_tokens,
                devices=single.world_size,
                note=f"pp={single.parallel.pp} ep={single.parallel.ep} dp={single.parallel.dp}",
            )
        )
    return Comparison(plan=plan, even_split=even, single_grade=tuple(singles))
