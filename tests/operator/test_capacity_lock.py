"""The capacity lock serves launching and restarting jobs before waiting ones."""

from __future__ import annotations

import threading
import time

import pytest

from hetmoe_operator.api.status import Condition, MoEJobStatus
from hetmoe_operator.kube.capacity_lock import CapacityLock
from hetmoe_operator.kube.reconciler import takes_capacity_first


def _taker(lock: CapacityLock, urgent: bool, order: list[str], name: str) -> threading.Thread:
    def take() -> None:
        lock.acquire(urgent=urgent)
        order.append(name)
        lock.release()

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    return thread


def test_an_urgent_pass_goes_before_waiting_ones_queued_earlier() -> None:
    lock, order = CapacityLock(), []
    lock.acquire(urgent=True)
    waiting = [_taker(lock, False, order, f"waiting-{i}") for i in range(3)]
    time.sleep(0.1)  # let them queue first (if one is late it still queues behind)
    restart = _taker(lock, True, order, "restart")
    deadline = time.monotonic() + 10
    while lock.urgent_queued == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    lock.release()
    for thread in [restart, *waiting]:
        thread.join(timeout=10)
    assert order[0] == "restart" and sorted(order[1:]) == ["waiting-0", "waiting-1", "waiting-2"]


def test_waiting_passes_take_the_lock_when_no_urgent_pass_is_queued() -> None:
    lock, order = CapacityLock(), []
    _taker(lock, False, order, "waiting").join(timeout=10)
    assert order == ["waiting"] and lock.urgent_queued == 0


def status(phase: str, ready_reason: str | None) -> MoEJobStatus:
    conditions = (
        [
            Condition(
                type="Ready",
                status="False",
                reason=ready_reason,
                last_transition_time="2026-11-24T00:00:00Z",
            )
        ]
        if ready_reason
        else []
    )
    return MoEJobStatus(phase=phase, conditions=conditions)


@pytest.mark.parametrize(
    ("phase", "ready_reason", "first"),
    [
        ("Pending", None, True),  # a new job's first pass
        ("Running", "WorkerFailed", True),  # the pass that handles a failure
        ("Restarting", "WaitingForCapacity", True),  # ran before: keeps its claim
        ("Pending", "WaitingForCapacity", False),  # never started: waits its turn
    ],
)
def test_who_takes_the_capacity_lock_first(
    phase: str, ready_reason: str | None, first: bool
) -> None:
    assert takes_capacity_first(status(phase, ready_reason)) is first
