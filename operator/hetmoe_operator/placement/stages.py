"""Uneven contiguous split of layers over pipeline stages.

Stages may run on different grades, carry the embedding or LM head, or need
activation recomputation, so an even split is rarely best. We minimise the slowest
stage (what 1F1B's steady state pays for) by bisecting on a time bound and filling
stages greedily: each stage takes the longest run of layers that stays within the
bound and fits in memory. That greedy is exact for contiguous splits whose per-stage
constraints only get harder as a stage grows, as long as stages may be empty; since
they may not, a dynamic program over reachable stage ends re-checks a greedy failure
that may be the greedy's fault (on small instances, where it is cheap).

Callers describe a stage by ``reach(stage, start, bound)``: the largest ``end`` such
that layers [start, end) meet the bound and fit (``start - 1`` if not even an empty
stage does). Prefix sums make that a bisection, so a split costs O(stages x log
layers) per bound.
"""

from __future__ import annotations

from collections.abc import Callable

Reach = Callable[[int, int, float], int]
StageCost = Callable[[int, int, int], float]
"""``cost(stage, start, end)``: time of layers [start, end) on that stage."""
StageFits = Callable[[int, int, int], bool]
"""``fits(stage, start, end)``: whether that stage's devices hold those layers."""

_BISECTION_STEPS = 40
_EXACT_LIMIT = 256
"""Layers x stages up to which a doubtful greedy failure is re-checked exactly; above
it (large models, where one layer is a small share of a stage) the greedy stands."""
_RELATIVE_TOLERANCE = 2e-3
"""Bisection stops when the bound is known to 0.2% (a layer is usually >= 1%)."""


def minimum_layers(num_layers: int, stages: int) -> list[int]:
    """Fewest layers per stage: one each, except that with ``layers + 1`` or ``+ 2``
    stages the first (embedding-only) and then the last (head-only) may be empty."""
    minimum = [1] * stages
    spare = stages - num_layers
    if spare >= 1:
        minimum[0] = 0
    if spare >= 2:
        minimum[-1] = 0
    return minimum


def reach_by_scan(num_layers: int, cost: StageCost, fits: StageFits | None = None) -> Reach:
    """A ``reach`` for arbitrary monotone ``cost``/``fits`` (linear scan; for tests and
    small models)."""

    def reach(stage: int, start: int, bound: float) -> int:
        end = start - 1
        while (
            end + 1 <= num_layers
            and cost(stage, start, end + 1) <= bound
            and (fits is None or fits(stage, start, end + 1))
        ):
            end += 1
        return end

    return reach


def _greedy(
    num_layers: int, minimum: list[int], bound: float, reach: Reach
) -> tuple[tuple[int, ...] | None, bool]:
    """(split or None, whether a failure may be the greedy's fault: a stage could not
    take its minimum after an earlier stage took more than its own)."""
    stages = len(minimum)
    bounds = [0]
    start = 0
    for stage in range(stages):
        furthest = reach(stage, start, bound)
        if stage == stages - 1:
            if furthest < num_layers:
                return None, False
            end = num_layers
        else:
            end = min(furthest, num_layers - sum(minimum[stage + 1 :]))
            if end < start + minimum[stage]:
                earlier_took_more = any(
                    b - a > m for a, b, m in zip(bounds, bounds[1:], minimum, strict=False)
                )
                return None, earlier_took_more
        bounds.append(end)
        start = end
    return tuple(bounds), False


def _exact(
    num_layers: int, minimum: list[int], bound: float, reach: Reach
) -> tuple[int, ...] | None:
    """Feasibility by dynamic programming over reachable stage ends.

    Needed when greedy fails only because a stage took layers the next stage then
    lacks (non-empty stages break the exchange argument); O(stages x layers) reaches.
    """
    stages = len(minimum)
    parents: list[dict[int, int]] = []
    frontier = {0: -1}
    for stage in range(stages):
        reserve = sum(minimum[stage + 1 :])
        following: dict[int, int] = {}
        for start in sorted(frontier):
            furthest = min(reach(stage, start, bound), num_layers - reserve)
            lowest = start + minimum[stage]
            if stage == stages - 1:
                lowest = num_layers
            for end in range(lowest, furthest + 1):
                following.setdefault(end, start)
        if not following:
            return None
        parents.append(following)
        frontier = following
    if num_layers not in frontier:
        return None
    bounds = [num_layers]
    for stage in range(stages - 1, -1, -1):
        bounds.append(parents[stage][bounds[-1]])
    return tuple(reversed(bounds))


def _feasible(
    num_layers: int, minimum: list[int], bound: float, reach: Reach
) -> tuple[int, ...] | None:
    found, doubtful = _greedy(num_layers, minimum, bound, reach)
    if found is None and doubtful and num_layers * len(minimum) <= _EXACT_LIMIT:
        found = _exact(num_layers, minimum, bound, reach)
    return found


def split_layers(
    num_layers: int,
    stages: int,
    reach: Reach,
    high: float,
    low: float = 0.0,
) -> tuple[int, ...] | None:
    """Stage boundaries ``(0, b1, ..., num_layers)`` minimising the slowest stage.

    ``high`` must be a bound at which any feasible split is allowed (e.g. the whole
    model's time on the slowest stage); ``low`` a known lower bound. Returns None when
    no split fits (or ``stages > num_layers + 2``).
    """
    if stages < 1 or stages > num_layers + 2:
        return None
    minimum = minimum_layers(num_layers, stages)
    best = _feasible(num_layers, minimum, high, reach)
    if best is None:
        return None
    low = min(low, high)
    for _ in range(_BISECTION_STEPS):
        if high - low <= _RELATIVE_TOLERANCE * high:
            break
        middle = (low + high) / 2
        found = _feasible(num_layers, minimum, middle, reach)
        if found is None:
            low = middle
        else:
            high, best = middle, found
    return best


def even_split(num_layers: int, stages: int) -> tuple[int, ...] | None:
    """The type-blind split: the same number of layers per stage (remainder first)."""
    if stages > num_layers:
        return None
    base, extra = divmod(num_layers, stages)
    bounds = [0]
    for stage in range(stages):
        bounds.append(bounds[-1] + base + (1 if stage < extra else 0))
    return tuple(bounds)
