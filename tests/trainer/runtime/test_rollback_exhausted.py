"""Anomalies that survive every rollback end the job with ROLLBACK_EXHAUSTED (87).

End to end through the pod's real entry point: ``python -m hetmoe_trainer.launch``
(torchrun) starting ``-m hetmoe_trainer`` workers, so the test also proves that the
code reaches the operator through the agent, and that the last log line names the
sample ranges rollbacks skipped.
"""

from __future__ import annotations

import json
from pathlib import Path

from plan_factory import make_plan

from conftest import records, run_torchrun
from hetmoe_operator.api.training import AnomalyPolicy
from hetmoe_operator.plan import WorkerExit

POLICY = AnomalyPolicy(window=8, spike_zscore=6.0, max_consecutive_skips=3)


def test_persistent_nan_exhausts_rollbacks_and_exits_87(tmp_path: Path) -> None:
    plan = make_plan(dp=2, steps=10, sequence_length=16, anomaly=POLICY)
    ckpt = tmp_path / "ckpt"
    result = run_torchrun(
        plan,
        tmp_path,
        "--checkpoint-interval",
        "2",
        "--sync-checkpoint",
        "--max-rollbacks",
        "1",
        # Overlapped gradient buckets (off by default on CPU): the NaN must still reach
        # every rank's verdict.
        "--grad-overlap",
        "on",
        "--grad-bucket-mb",
        "0.05",
        # Rank 1's gradients are NaN at every step from step 2 on: a fault no rollback
        # can clear.
        "--inject-fault",
        "kind=nan,step=2,rank=1,sticky=1",
    )
    assert result.returncode == WorkerExit.ROLLBACK_EXHAUSTED, result.stderr[-3000:]
    batch = plan.training.global_batch_size
    # Checkpoint at step 2 (none is taken inside the skip streak); steps 2, 3, 4 skip
    # -> rollback 1 skips their samples [2B, 5B); the replay takes fresh samples
    # [5B, 8B), skips again -> rollback 2 exceeds --max-rollbacks 1. The two ranges
    # are adjacent, so they are reported merged.
    skipped = f"[{2 * batch}, {8 * batch})"
    exhausted = [line for line in result.stderr.splitlines() if "did not clear" in line]
    assert len(exhausted) == 2, result.stderr[-3000:]  # one line per rank
    for line in exhausted:
        assert "2 rollbacks to step 2" in line
        assert line.endswith(f"sample ranges skipped: {skipped}"), line
    assert "Traceback" not in result.stderr
    progress = json.loads((ckpt / "progress.json").read_text())
    assert progress["state"] == "rollback-exhausted"
    assert progress["anomalies"]["rollback"] == 1 and progress["anomalies"]["nonfinite"] == 6
    assert [r["action"] for r in records(ckpt)][:2] == ["apply", "apply"]
