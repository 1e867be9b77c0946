"""A deliberately simple exhaustive search over the planner's decision space.

It shares only the cost model (``Problem``, ``Layout``, ``evaluate``) with the planner,
not its search code: every grade subset, every pipeline degree, every expert-parallel
degree dividing the expert count, every contiguous layer split with non-empty
stages, every microbatch size dividing the batch, every distribution of microbatches
over EP groups, with and without redundant expert replicas. Pipelines are either
homogeneous (every pool of the grade subset contributes as many groups as fit, or,
when the batch cannot give each of them pp microbatches, every choice of as many as it
can) or mixed: any assignment of pools to stages that uses more than one pool, with
every group following that one assignment and as many groups as the pools hold and the
batch feeds; optionally (``every_group_count``) any smaller number of groups too. With
pp > 1, every count of chunks per position v (interleaved 1F1B) from 1 up to the
smallest stage's layer count, when every group's microbatch count is a multiple of pp
and every group's stages are seated in plan-rank (pool cluster) order, which the
trainer's interleaved schedule needs; each of those also with the backward split
(ZB1P, ZB-H1 for v = 1; torch's ScheduleInterleavedZeroBubble, when every group's
count is a multiple of max(1, count // pp)); and, for every split whose positions hold
at least two layers, ZB-V (two chunks per position in V order, any microbatch count).
Only feasible for tiny instances, which is what it is for.
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


def _distributions(
    total: int, groups: tuple[tuple[str, ...], ...], minimum: int
) -> Iterator[tuple[int, ...]]:
    """Every split of ``total`` microbatches over ``groups``, at least ``minimum`` each;
    groups with the same pools are interchangeable, so their counts only decrease."""

    def rest(i: int, remaining: int, cap: int | None) -> Iterator[tuple[int, ...]]:
        if i == len(groups) - 1:
            if remaining >= minimum and (cap is None or remaining <= cap):
                yield (remaining,)
            return
        most = remaining - minimum * (len(groups) - 1 - i)
        if cap is not None:
            most = min(most, cap)
        for count in range(minimum, most + 1):
            following = count if groups[i + 1] == groups[i] else None
            for tail in rest(i + 1, remaining - count, following):
                yield (count, *tail)

    yield from rest(0, total, None)


def _homogeneous(
    problem: Problem, pp: int, ep: int, max_groups: int, every_count: bool
) -> Iterator[tuple[tuple[str, ...], ...]]:
    """For every grade subset: single-pool groups from each of its pools (each grade
    of the subset used), up to ``max_groups`` in all: any number of them if
    ``every_count``, else as many as fit, or when the batch cannot give each of them pp
    microbatches, every choice of as many as it can (the planner's rule)."""
    grades = sorted({info.grade.name for info in problem.pools.values()})
    feedable = problem.training.global_batch_size // (pp * ep)
    for size in range(1, len(grades) + 1):
        for subset in itertools.combinations(grades, size):
            pools = [name for name, info in problem.pools.items() if info.grade.name in subset]
            fits = [problem.pools[name].pool.devices // (pp * ep) for name in pools]
            wanted = min(sum(fits), feedable)
            for counts in itertools.product(*(range(n + 1) for n in fits)):
                total = sum(counts)
                if not 0 < total <= max_groups or (not every_count and total != wanted):
                    continue
                used = {
                    problem.pools[n].grade.name for n, c in zip(pools, counts, strict=True) if c
                }
                if used != set(subset):
                    continue
                yield tuple(
                    (name,) * pp
                    for name, count in zip(pools, counts, strict=True)
                    for _ in range(count)
                )


def _mixed(
    problem: Problem, pp: int, ep: int, max_groups: int, every_count: bool
) -> Iterator[tuple[tuple[str, ...], ...]]:
    """For every assignment of pools to stages using two or more pools: groups
    following it, any number the pools hold if ``every_count``, else as many as they
    hold and the batch can feed."""
    feedable = problem.training.global_batch_size // (pp * ep)
    for template in itertools.product(list(problem.pools), repeat=pp):
        if len(set(template)) < 2:
            continue
        count = min(
            problem.pools[pool].pool.devices // (template.count(pool) * ep) for pool in template
        )
        counts = range(1, count + 1) if every_count else [min(count, feedable)]
        for groups in counts:
            if 0 < groups <= max_groups:
                yield (template,) * groups


def exhaustive_best(
    problem: Problem, max_groups: int = 4, *, every_group_count: bool = False
) -> tuple[Evaluation, Layout] | None:
    """The layout with the smallest predicted step time (None if nothing fits).

    By default every pool of a grade subset contributes as many EP groups as fit,
    unless the batch cannot feed them all (pp microbatches each), as in the planner;
    ``every_group_count`` also tries fewer groups (fewer devices)."""
    model = problem.model
    batch = problem.training.global_batch_size
    best: tuple[Evaluation, Layout] | None = None
    for pp in range(1, model.num_hidden_layers + 1):
        for ep in _divisors(model.num_experts):
            for groups in itertools.chain(
                _homogeneous(problem, pp, ep, max_groups, every_group_count),
                _mixed(problem, pp, ep, max_groups, every_group_count),
            ):
                order = {name: i for i, name in enumerate(problem.pools)}
                ordered = all(
                    order[a] <= order[b] for t in groups for a, b in itertools.pairwise(t)
                )
                for bounds in _splits(model.num_hidden_layers, pp):
                    smallest = min(b - a for a, b in itertools.pairwise(bounds))
                    virtuals = range(1, smallest + 1) if pp > 1 and ordered else (1,)
                    schedules = [(v, "loop", False) for v in virtuals]
                    if pp > 1:  # ZB1P / ZB-H1: the same with the backward split
                        schedules += [(v, "loop", True) for v in virtuals]
                    if pp > 1 and smallest >= 2:  # ZB-V: two chunks per position, V order
                        schedules.append((2, "v", True))
                    for micro in _divisors(batch):
                        rows, rest = divmod(batch // micro, ep)
                        if rest or rows < len(groups):
                            continue
                        # 1F1B needs a microbatch per stage
                        for counts in _distributions(rows, groups, pp):
                            for redundant, (virtual, shape, split) in itertools.product(
                                (True, False), schedules
                            ):
                                if shape == "loop" and split:
                                    if any(c % max(1, c // pp) for c in counts):
                                        continue
                                elif (
                                    shape == "loop" and virtual > 1 and any(c % pp for c in counts)
                                ):
                                    continue
                                layout = Layout(
                                    pp,
                                    ep,
                                    bounds,
                                    groups,
                                    micro,
                                    counts,
                                    (False,) * pp,
                                    redundant,
                                    virtual,
                                    shape,
                                    split,
                                )
                                evaluation = evaluate(problem, layout)
                                if evaluation.fits and (
                                    best is None or evaluation.step.total < best[0].step.total
                                ):
                                    best = (evaluation, layout)
    return best
