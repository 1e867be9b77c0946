"""The metrics endpoint serves the documented metrics; progress is written and served."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

import pytest
from plan_factory import make_plan

from conftest import free_port
from hetmoe_trainer.distributed import build_context, pick_device
from hetmoe_trainer.loop import Trainer, TrainerOptions
from hetmoe_trainer.metrics import mfu_denominator
from hetmoe_trainer.progress import ANOMALY_KINDS, ProgressReporter, record_in_place_restart

METRICS = (
    "hetmoe_tokens_per_second",
    'hetmoe_step_seconds{phase="forward"',
    'hetmoe_step_seconds{phase="backward"',
    'hetmoe_step_seconds{phase="all_to_all"',
    'hetmoe_step_seconds{phase="grad_sync"',
    'hetmoe_step_seconds{phase="optimizer"',
    "hetmoe_loss",
    "hetmoe_grad_norm",
    "hetmoe_expert_load_max",
    "hetmoe_expert_load_mean",
    "hetmoe_checkpoint_blocking_seconds",
    "hetmoe_restarts",
    "hetmoe_straggler_score",
    "hetmoe_mfu",
    'hetmoe_anomalies{kind="skipped"',
)


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read()


@pytest.mark.usefixtures("single_process_group")
def test_metrics_and_progress_endpoints(tmp_path: Path) -> None:
    port = free_port()
    plan = make_plan(steps=6, sequence_length=16, replicas=[(2, 2)])
    trainer = Trainer(
        build_context(plan, 0, pick_device(0)),
        TrainerOptions(
            checkpoint_dir=tmp_path,
            checkpoint_interval=3,
            metrics_port=port,
            faults=(),
            peak_flops=1e11,
        ),
    )
    try:
        for _ in range(4):
            trainer.train_step()
        text = _get(f"http://127.0.0.1:{port}/metrics").decode()
        for name in METRICS:
            assert name in text, name
        served = json.loads(_get(f"http://127.0.0.1:{port}/progress"))
        assert served["step"] == 4 and served["total_steps"] == 6
        assert set(served["anomalies"]) == set(ANOMALY_KINDS)
    finally:
        # No thread may outlive the test: later tests fork this process.
        trainer.checkpointer.wait()
        assert trainer.server is not None
        trainer.server.close()
    written = json.loads((tmp_path / "progress.json").read_text())
    for key in (
        "state",
        "step",
        "total_steps",
        "tokens",
        "loss",
        "tokens_per_s",
        "eta_seconds",
        "last_checkpoint_step",
        "anomalies",
        "stage_step_seconds",
        "straggler",
    ):
        assert key in written, key
    assert written["tokens"] == 4 * plan.training.tokens_per_step
    assert written["stage_step_seconds"].keys() == {"0"}
    assert written["loss"] > 0 and written["eta_seconds"] > 0


@pytest.mark.usefixtures("single_process_group")
def test_resuming_a_finished_run_reports_where_it_stands(tmp_path: Path) -> None:
    """Run a job to its end, then start it again on the same checkpoints (what a
    second ``hetmoe run`` does): nothing is left to train, and progress must say step
    4 of 4 with the last loss, not step 0 with none."""
    plan = make_plan(steps=4, sequence_length=16, replicas=[(2, 2)])

    def trainer() -> Trainer:
        options = TrainerOptions(
            checkpoint_dir=tmp_path, checkpoint_interval=2, faults=(), peak_flops=1e11
        )
        return Trainer(build_context(plan, 0, pick_device(0)), options)

    assert trainer().run() == 0
    first = json.loads((tmp_path / "progress.json").read_text())
    (tmp_path / "progress.json").unlink()
    assert trainer().run() == 0
    again = json.loads((tmp_path / "progress.json").read_text())
    assert (again["state"], again["step"], again["tokens"]) == ("finished", 4, first["tokens"])
    assert again["consumed_samples"] == first["consumed_samples"]
    assert again["loss"] == pytest.approx(first["loss"])
    assert again["last_checkpoint_step"] == 4


def test_rank_0_counts_the_attempts_of_one_launch_and_reports_why(tmp_path: Path) -> None:
    """Each ProgressReporter is one start of plan rank 0. Starts under the same launch
    id are in-place restarts; the reason recorded after the previous start is reported,
    progress carries over until the next step, and a new launch counts afresh."""
    path = tmp_path / "progress.json"
    first = ProgressReporter(path, total_steps=10, restarts=0, launch_id="launch-1")
    first.update(step=4, loss=5.5, last_checkpoint_step=4)
    record_in_place_restart(tmp_path, "pool a node slot 1", ["plan rank 3: boom"])
    ProgressReporter(path, total_steps=10, restarts=1, launch_id="launch-1")
    doc = json.loads(path.read_text())  # written at start: a crash before a step counts
    assert doc["in_place_restarts"] == 1
    assert doc["last_in_place_restart"] == "pool a node slot 1: plan rank 3: boom"
    assert (doc["step"], doc["loss"], doc["last_checkpoint_step"]) == (4, 5.5, 4)
    ProgressReporter(path, total_steps=10, restarts=2, launch_id="launch-1")
    doc = json.loads(path.read_text())
    assert doc["in_place_restarts"] == 2
    assert doc["last_in_place_restart"] is None, "no new reason since the last start"
    ProgressReporter(path, total_steps=10, restarts=0, launch_id="launch-2")
    assert json.loads(path.read_text())["in_place_restarts"] == 0


def test_mfu_on_gpus_is_against_the_catalogs_peaks_summed_over_the_ranks() -> None:
    peaks = {"A": 370e12, "D": 989e12}

    def must_not_measure() -> float:
        raise AssertionError("measured although the catalog answers")

    assert mfu_denominator(["A", "A", "D"], "cuda", peaks, must_not_measure) == 1729e12
    # A grade the catalog does not list, or a CPU: the measured (or given) device peak.
    assert mfu_denominator(["A", "X"], "cuda", peaks, lambda: 5e12) == 10e12
    assert mfu_denominator(["A", "D"], "cpu", peaks, lambda: 2e11) == 4e11
