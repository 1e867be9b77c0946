"""A worker's last word goes to the termination log the kubelet copies into the pod status."""

from __future__ import annotations

from pathlib import Path

import pytest

from hetmoe_trainer import termination
from hetmoe_trainer.termination import MAX_LINE_CHARS, TERMINATION_LOG_ENV, record_termination


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
