"""Step time by phase includes the expert-parallel all-to-all, and only where EP exchanges."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from plan_factory import make_plan

from conftest import records

PHASES = {"data", "forward", "backward", "all_to_all", "grad_sync", "optimizer"}


@pytest.mark.parametrize(("ep", "exchanges"), [(2, True), (1, False)], ids=["ep2", "ep1"])
def test_all_to_all_is_its_own_phase(forked, tmp_path: Path, ep: int, exchanges: bool) -> None:
    plan = make_plan(dp=2, ep=ep, steps=3, sequence_length=16)
    assert forked(plan, tmp_path) == [0, 0]
    for record in records(tmp_path):
        phases = record["phases"]
        assert phases.keys() >= PHASES
        assert (phases["all_to_all"] > 0) is exchanges, phases
        assert phases["forward"] > 0 and phases["backward"] > 0
        # all_to_all is carved out of forward and backward, not added on top.
        assert sum(phases.values()) <= record["seconds"] * 1.01
    progress = json.loads((tmp_path / "progress.json").read_text())
    assert (progress["phase_seconds"]["all_to_all"] > 0) is exchanges
