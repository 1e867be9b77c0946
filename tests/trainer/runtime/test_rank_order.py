"""Process ranks in any order: what torchrun's c10d rendezvous gives on a real cluster.

On Kubernetes each worker finds its plan seat from ``HETMOE_POOL``/``HETMOE_NODE_SLOT``
and ``LOCAL_RANK``, while torchrun numbers processes in rendezvous arrival order, so
process rank r need not hold plan rank r. Here the plan seats its stage-1 rank on
local rank 0: process 0 runs the *last* stage. Interleaved 1F1B places virtual stage s
on pp-group rank s % pp, so it trains only if the pp group follows the pipeline
positions rather than the process ranks.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from plan_factory import make_plan

from conftest import losses, run_torchrun
from hetmoe_operator.plan import Plan

STEPS = 6


def _reversed_seats(plan: Plan) -> Plan:
    """The same plan with the two ranks' local ranks swapped."""
    last = plan.world_size - 1
    ranks = [r.model_copy(update={"local_rank": last - r.local_rank}) for r in plan.ranks]
    return Plan.model_validate(plan.model_copy(update={"ranks": ranks}).model_dump())


def test_interleaved_pipeline_trains_when_process_ranks_run_against_the_stages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = make_plan(pp=2, virtual_stages=2, replicas=[(2, 4)], steps=STEPS, sequence_length=16)
    flipped = _reversed_seats(plan)
    assert [r.stage for r in sorted(flipped.ranks, key=lambda r: r.local_rank)] == [1, 0]
    monkeypatch.setenv("HETMOE_POOL", "local")
    monkeypatch.setenv("HETMOE_NODE_SLOT", "0")
    runs = {}
    for name, layout in (("in-order", plan), ("flipped", flipped)):
        result = run_torchrun(layout, tmp_path / name)
        assert result.returncode == 0, result.stderr[-4000:]
        runs[name] = losses(tmp_path / name / "ckpt")
    assert sorted(runs["flipped"]) == list(range(1, STEPS + 1))
    assert runs["flipped"] == pytest.approx(runs["in-order"], rel=1e-6)
