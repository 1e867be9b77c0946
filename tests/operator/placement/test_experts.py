"""Expert placement with redundant replicas (EPLB-style, speed-aware)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from hetmoe_operator.placement.experts import balanced_placement, place_experts, slots_for_speeds


def zipf(n: int, s: float) -> list[float]:
    return [1.0 / (i + 1) ** s for i in range(n)]


def test_uniform_load_needs_no_redundancy() -> None:
    placement = balanced_placement([1.0] * 64, [1.0] * 8, max_redundant=8)
    assert placement.redundant_slots == 0
    assert placement.imbalance == 1.0
    assert sorted(e for device in placement.experts for e in device) == list(range(64))


def test_zipf_load_is_balanced_with_12_5_percent_extra_slots() -> None:
    loads = zipf(64, 0.8)
    placement = balanced_placement(loads, [1.0] * 8, max_redundant=8)
    assert placement.redundant_slots <= 8
    assert placement.imbalance <= 1.15
    without = place_experts(loads, [1.0] * 8, [8] * 8)
    assert placement.imbalance < without.imbalance


def test_faster_devices_get_more_slots_and_load() -> None:
    speeds = [3.0, 1.0, 1.0, 1.0]
    slots = slots_for_speeds(32, speeds, redundant=4)
    assert slots[0] > slots[1] and sum(slots) == 36
    placement = place_experts(zipf(32, 0.8), speeds, slots)
    assert placement.device_load[0] > max(placement.device_load[1:])
    assert placement.imbalance <= 1.05


def test_capacity_caps_slots() -> None:
    assert slots_for_speeds(8, [10.0, 1.0], redundant=0, capacity=[5, 8]) == [5, 3]


def test_experts_not_divisible_by_devices() -> None:
    placement = balanced_placement([1.0] * 8, [1.0] * 3, max_redundant=1)
    assert {e for device in placement.experts for e in device} == set(range(8))
    assert max(len(d) for d in placement.experts) == 3


@settings(max_examples=60, deadline=None)
@given(
    experts=st.integers(2, 24),
    speeds=st.lists(st.sampled_from([1.0, 2.0, 3.0]), min_size=1, max_size=8),
    skew=st.floats(0.0, 1.5),
    extra=st.integers(0, 4),
)
def test_every_expert_is_placed_once_per_device_at_most(experts, speeds, skew, extra) -> None:
    if len(speeds) > experts:
        speeds = speeds[:experts]
    placement = balanced_placement(zipf(experts, skew), speeds, max_redundant=extra)
    hosted = [e for device in placement.experts for e in device]
    assert set(hosted) == set(range(experts))
    assert all(len(set(d)) == len(d) and len(d) >= 1 for d in placement.experts)
    assert placement.redundant_slots == len(hosted) - experts <= extra
    assert abs(sum(placement.device_load) - sum(zipf(experts, skew))) < 1e-9
