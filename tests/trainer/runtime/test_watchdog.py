"""A step that never finishes ends the worker with WorkerExit.HUNG and says where it is stuck."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from plan_factory import make_plan

from conftest import records, run_torchrun
from hetmoe_operator.plan import WAITING_FOR_PEERS_MARK, WorkerExit
from hetmoe_trainer.watchdog import HangWatchdog


class _Reports:
    """Records what the watchdog would exit with, instead of exiting."""

    def __init__(self) -> None:
        self.messages: list[str] = []
        self.fired = threading.Event()

    def __call__(self, message: str) -> None:
        self.messages.append(message)
        self.fired.set()


def test_beats_keep_it_quiet_and_a_missed_deadline_names_the_phase() -> None:
    reports = _Reports()
    hung, fired = reports.messages, reports.fired
    with HangWatchdog(0.5, on_hang=reports) as watchdog:
        for step in range(6):  # 1.2 s of steps, each well inside the deadline
            watchdog.beat(f"step {step}")
            time.sleep(0.2)
        assert not hung
        watchdog.phase("step 6: gradient sync")
        assert fired.wait(5)
    assert len(hung) == 1
    assert "stuck in step 6: gradient sync" in hung[0] and str(WorkerExit.HUNG) in hung[0]
    assert WAITING_FOR_PEERS_MARK not in hung[0], "not marked as a collective"


def test_a_rank_that_gives_up_in_a_collective_says_it_was_waiting_for_others() -> None:
    reports = _Reports()
    with HangWatchdog(0.2, on_hang=reports) as watchdog:
        watchdog.beat("step 1")
        watchdog.phase("step 1: statistics all-reduce", collective=True)
        assert reports.fired.wait(10)
    assert "stuck in step 1: statistics all-reduce " + WAITING_FOR_PEERS_MARK in reports.messages[0]


def test_a_zero_timeout_starts_no_thread() -> None:
    before = threading.active_count()
    with HangWatchdog(0) as watchdog:
        watchdog.beat("step 1")
        assert threading.active_count() == before


def test_a_hung_rank_ends_the_pod_with_89_and_its_stack(tmp_path: Path) -> None:
    plan = make_plan(dp=2, steps=20, sequence_length=16)
    result = run_torchrun(
        plan,
        tmp_path,
        "--hang-timeout",
        "4",
        # Rank 1's forward never returns at step index 3; rank 0 then waits for it in a
        # collective, as a real hang looks from the other ranks.
        "--inject-fault",
        "kind=hang,step=3,rank=1",
        timeout=300,
        env={"HETMOE_TERMINATION_LOG": str(tmp_path / "termination-log")},
    )
    assert result.returncode == WorkerExit.HUNG, result.stderr[-3000:]
    assert "stuck in step 4: forward/backward" in result.stderr, result.stderr[-3000:]
    assert "in hang" in result.stderr, "the stuck thread's stack names the blocking call"
    assert [r["step"] for r in records(tmp_path / "ckpt")] == [1, 2, 3]
    # What the pod's status will say. The wedged rank normally comes first (the others
    # wait 2 s longer), but a loaded machine may delay its watchdog thread past that.
    lines = (tmp_path / "termination-log").read_text().splitlines()
    assert any(
        line.startswith("plan rank 1: no progress for") and "forward/backward" in line
        for line in lines
    ), lines
