"""A worker's last word goes to the termination log the kubelet copies into the pod status."""

from __future__ import annotations

from pathlib import Path

import pytest
from plan_factory import make_plan

from hetmoe_operator.plan import TERMINATION_LOG_ENV, WAITING_FOR_PEERS_MARK
from hetmoe_trainer import termination
from hetmoe_trainer.termination import MAX_LINE_CHARS, record_termination


def test_each_rank_appends_one_shortened_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    log = tmp_path / "termination-log"
    monkeypatch.setenv(TERMINATION_LOG_ENV, str(log))
    record_termination("stopped on request\n(SIGTERM) at step 6", plan_rank=0)
    record_termination("x" * 2000, plan_rank=1)
    record_termination("configuration error: bad plan")
    first, second, third = log.read_text().splitlines()
    assert first == "plan rank 0: stopped on request (SIGTERM) at step 6"
    assert second.startswith("plan rank 1: xxx") and len(second) == MAX_LINE_CHARS
    assert second.endswith("...")
    assert third == "configuration error: bad plan"


def test_without_a_termination_log_nothing_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TERMINATION_LOG_ENV, raising=False)
    monkeypatch.setattr(termination, "KUBERNETES_TERMINATION_LOG", tmp_path / "absent")
    record_termination("lost")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv(TERMINATION_LOG_ENV, str(tmp_path / "no-such-dir" / "log"))
    record_termination("lost, quietly")  # an unwritable path never fails the exit path


@pytest.mark.parametrize(
    ("layout", "broken_in"),
    [({"dp": 2}, "gradient sync"), ({"pp": 2}, "forward/backward")],
    ids=["dp2-collective", "pp2-point-to-point"],
)
def test_a_rank_whose_peer_died_says_it_was_waiting_for_others(
    forked,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    layout: dict[str, int],
    broken_in: str,
) -> None:
    """Rank 1 vanishes (SIGKILL-like exit, no last word); rank 0's next transfer with
    it breaks, and its line says so, which lets the operator name rank 1's pod."""
    log = tmp_path / "termination-log"
    monkeypatch.setenv(TERMINATION_LOG_ENV, str(log))
    plan = make_plan(steps=10, sequence_length=16, **layout)
    codes = forked(plan, tmp_path / "ckpt", timeout=120, faults=["kind=crash,rank=1,step=3"])
    assert codes[1] == 137 and codes[0] not in (0, 137), codes
    (line,) = log.read_text().splitlines()
    assert line.startswith("plan rank 0: RuntimeError in step 4: " + broken_in), line
    assert WAITING_FOR_PEERS_MARK in line, line
