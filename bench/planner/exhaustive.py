"""A deliberately simple exhaustive search over the planner's decision space.

It shares only the cost model (``Problem``, ``Layout``, ``evaluate``) with the planner,
not its search code: every grade subset, every pipeline degree, every expert-parallel
degree dividing the expert count, every contiguous layer split with non-empty
stages, every microbatch size dividing the batch, every distribution of microbatches
over EP groups, with and without redundant expert replicas. Pipelines are either
homogeneous (every pool of the grade subset contributes as many groups as fit) or
mixed: any assignment of pools to stages that uses more than one pool, with every
group following that one assignment and as many groups as the pools hold. Only
feasible for tiny instances, which is what it is for.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

from hetmoe_operator.placement.layout import Evaluation, Layout, Problem, evaluate


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _splits(layers: int, stages: int) -> Iterator[tuple[int, ...]]:
    for cuts in itertools.combinations(range(1, layers), stages - 1):
        yield (0, *cuts, layers)


def _compositions(total: int, parts: int) -> Iterator[tuple[int, ...]]:
    for cuts in itertools.combinations(range(1, total), parts - 1):
        bounds = (0, *cuts, total)
        yield tuple(b - a for a, b in itertools.pairwise(bounds))


def _homogeneous(problem: Problem, pp: int, ep: int) -> Iterator[tuple[tuple[str, ...], ...]]:
    """For every grade subset: as many single-pool groups as its pools hold."""
    grades = sorted({info.grade.name for info in problem.pools.values()})
    for size in range(1, len(grades) + 1):
        for subset in itertools.combinations(grades, size):
            pools = [name for name, info in problem.pools.items() if info.grade.name in subset]
            yield tuple(
                (name,) * pp
                for name in pools
                for _ in range(problem.pools[name].pool.devices // (pp * ep))
            )


def _mixed(problem: Problem, pp: int, ep: int) -> Iterator[tuple[tuple[str, ...], ...]]:
    """For every assignment of pools to stages using two or more pools: as many
    groups following it as the pools hold."""
    for template in itertools.product(list(problem.pools), repeat=pp):
        if len(set(template)) < 2:
            continue
        count = min(
            problem.pools[pool].pool.devices // (template.count(pool) * ep) for pool in template
        )
        yield (template,) * count


def exhaustive_best(problem: Problem, max_groups: int = 4) -> tuple[Evaluation, Layout] | None:
    """The layout with the smallest predicted step time (None if nothing fits)."""
    model = problem.model
    batch = problem.training.global_batch_size
    best: tuple[Evaluation, Layout] | None = None
    for pp in range(1, model.num_hidden_layers + 1):
        for ep in _divisors(model.num_experts):
            for groups in itertools.chain(_homogeneous(problem, pp, ep), _mixed(problem, pp, ep)):
                if not groups or len(groups) > max_groups:
                    continue
                for bounds in _splits(model.num_hidden_layers, pp):
                    for micro in _divisors(batch):
                        rows, rest = divmod(batch // micro, ep)
                        if rest or rows < len(groups):
                            continue
                        for counts in _compositions(rows, len(groups)):
                            if min(counts) < pp:  # 1F1B needs a microbatch per stage
                                continue
                            for redundant in (True, False):
                                layout = Layout(
                                    pp, ep, bounds, groups, micro, counts, (False,) * pp, redundant
                                )
                                evaluation = evaluate(problem, layout)
                                if evaluation.fits and (
                                    best is None or evaluation.step.total < best[0].step.total
                                ):
                                    best = (evaluation, layout)
    return best
