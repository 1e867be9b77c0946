"""The LP solver and the ideal bound."""

from __future__ import annotations

import pytest

from hetmoe_operator.api.model import PRESETS
from hetmoe_operator.placement.bound import DeviceClass, ideal_seconds, solve_lp
from hetmoe_operator.placement.layout import Problem

from .helpers import cluster, grade, training


def test_solve_lp_small_program() -> None:
    # min -x - y  s.t. x + 2y <= 4, 3x + y <= 6  ->  x = 1.6, y = 1.2
    value, x = solve_lp([-1, -1], [[1, 2], [3, 1]], [4, 6], [], [])
    assert value == pytest.approx(-2.8)
    assert x == pytest.approx([1.6, 1.2])


def test_solve_lp_equalities_and_infeasibility() -> None:
    value, x = solve_lp([1, 2], [], [], [[1, 1]], [1])
    assert value == pytest.approx(1) and x == pytest.approx([1, 0])
    assert solve_lp([1], [[1]], [1], [[1]], [2]) is None


def test_one_class_splits_in_proportion_to_speed() -> None:
    classes = [
        DeviceClass("a", 2, {"w": 1.0}, 1e9),
        DeviceClass("b", 1, {"w": 0.5}, 1e9),
    ]
    seconds, shares = ideal_seconds({"w": 12.0}, {}, classes)
    # speeds: a = 2 devices x 1/s, b = 1 device x 2/s -> 4 units/s in total
    assert seconds == pytest.approx(3.0)
    assert shares["a"]["w"] == pytest.approx(0.5)


def test_classes_go_where_they_run_best() -> None:
    classes = [
        DeviceClass("a", 1, {"x": 1.0, "y": 4.0}, 1e9),
        DeviceClass("b", 1, {"x": 4.0, "y": 1.0}, 1e9),
    ]
    seconds, shares = ideal_seconds({"x": 1.0, "y": 1.0}, {}, classes)
    assert seconds == pytest.approx(1.0)
    assert shares["a"]["x"] == pytest.approx(1.0)


def test_memory_constraint_binds() -> None:
    classes = [
        DeviceClass("fast", 1, {"w": 1.0}, 1.0),
        DeviceClass("slow", 1, {"w": 10.0}, 10.0),
    ]
    seconds, _ = ideal_seconds({"w": 1.0}, {"w": 2.0}, classes)
    # fast can hold only half of the state, so it does at most half the work
    assert seconds == pytest.approx(5.0)
    assert ideal_seconds({"w": 1.0}, {"w": 20.0}, classes) is None


def test_ideal_tokens_per_second_scales_with_devices() -> None:
    from hetmoe_operator.placement.bound import ideal_tokens_per_s

    description = cluster([grade("g", 100, 80, 1)], [("p", "g", 4, 8)])
    problem = Problem(PRESETS["tiny"], training(), description, [1.0] * 8)
    one = ideal_tokens_per_s(problem, {"p": 8})
    two = ideal_tokens_per_s(problem, {"p": 16})
    assert two == pytest.approx(2 * one, rel=1e-6)
