"""Uneven contiguous layer split."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from hetmoe_operator.placement.stages import (
    even_split,
    minimum_layers,
    reach_by_scan,
    split_layers,
)


def prefix_cost(weights: list[float], speeds: list[float]):
    prefix = [0.0]
    for w in weights:
        prefix.append(prefix[-1] + w)

    def cost(stage: int, start: int, end: int) -> float:
        return (prefix[end] - prefix[start]) / speeds[stage]

    return cost


def brute_force(weights: list[float], speeds: list[float], fits=None) -> float | None:
    n, k = len(weights), len(speeds)
    cost = prefix_cost(weights, speeds)
    best = None
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0, *cuts, n)
        if fits and not all(fits(s, bounds[s], bounds[s + 1]) for s in range(k)):
            continue
        worst = max(cost(s, bounds[s], bounds[s + 1]) for s in range(k))
        best = worst if best is None else min(best, worst)
    return best


def solve(weights, speeds, fits=None):
    cost = prefix_cost(weights, speeds)
    reach = reach_by_scan(len(weights), cost, fits)
    high = max(cost(s, 0, len(weights)) for s in range(len(speeds)))
    bounds = split_layers(len(weights), len(speeds), reach, high)
    if bounds is None:
        return None, None
    return bounds, max(cost(s, bounds[s], bounds[s + 1]) for s in range(len(speeds)))


def test_equal_layers_split_evenly() -> None:
    bounds, _ = solve([1.0] * 8, [1.0] * 4)
    assert bounds == (0, 2, 4, 6, 8)


def test_faster_stage_gets_more_layers() -> None:
    bounds, _ = solve([1.0] * 12, [3.0, 1.0])
    assert bounds == (0, 9, 12)


def test_memory_limit_moves_layers_elsewhere() -> None:
    bounds, _ = solve([1.0] * 8, [1.0, 1.0], fits=lambda s, a, b: s != 0 or b - a <= 2)
    assert bounds == (0, 2, 8)


def test_infeasible_memory_returns_none() -> None:
    bounds, _ = solve([1.0] * 4, [1.0, 1.0], fits=lambda s, a, b: b - a <= 1)
    assert bounds is None


def test_more_stages_than_layers() -> None:
    assert minimum_layers(4, 5) == [0, 1, 1, 1, 1]
    assert minimum_layers(4, 6) == [0, 1, 1, 1, 1, 0]
    bounds, _ = solve([1.0] * 4, [1.0] * 6)
    assert bounds is not None and bounds[0] == 0 and bounds[-1] == 4
    assert split_layers(4, 7, reach_by_scan(4, prefix_cost([1.0] * 4, [1.0] * 7)), 10.0) is None


def test_even_split() -> None:
    assert even_split(10, 4) == (0, 3, 6, 8, 10)
    assert even_split(3, 4) is None


@settings(max_examples=60, deadline=None)
@given(
    weights=st.lists(st.floats(0.1, 10.0), min_size=2, max_size=9),
    speeds=st.lists(st.floats(0.5, 4.0), min_size=1, max_size=4),
    cap=st.integers(1, 9),
)
def test_split_is_optimal_against_brute_force(weights, speeds, cap) -> None:
    if len(speeds) > len(weights):
        speeds = speeds[: len(weights)]
    fits = lambda s, a, b: b - a <= cap  # noqa: E731
    expected = brute_force(weights, speeds, fits)
    bounds, worst = solve(weights, speeds, fits)
    if expected is None:
        assert bounds is None
        return
    assert bounds is not None and worst is not None
    assert bounds[0] == 0 and bounds[-1] == len(weights)
    assert all(b - a >= 1 for a, b in itertools.pairwise(bounds))
    assert worst <= expected * (1 + 3e-3)
