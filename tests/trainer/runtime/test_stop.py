"""A stop request (SIGTERM, SIGINT) ends training after the current step with a checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from plan_factory import make_plan

from conftest import LAUNCH_ENV, REPO, launch_argv, losses, records
from hetmoe_operator.api.training import AnomalyPolicy
from hetmoe_operator.plan import WorkerExit
from hetmoe_trainer.anomaly import Fault
from hetmoe_trainer.checkpoint import LATEST, list_checkpoints, step_dir
from hetmoe_trainer.distributed import build_context, pick_device
from hetmoe_trainer.loop import Trainer, TrainerOptions, TrainingExit
from hetmoe_trainer.stop import StopRequest, stop_on_signals

SEQ = 16


def test_the_first_signal_only_asks_the_second_acts_as_before() -> None:
    request = StopRequest()
    with stop_on_signals(request):
        os.kill(os.getpid(), signal.SIGTERM)  # would end the test run without the handler
        assert request.signal is signal.SIGTERM
        with pytest.raises(KeyboardInterrupt):  # the handlers were restored: Ctrl-C twice
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_stopped_gang_saves_its_step_and_resumes_without_replaying(
    forked, tmp_path: Path
) -> None:
    plan = make_plan(dp=2, ep=2, steps=12, sequence_length=SEQ)
    assert forked(plan, tmp_path / "clean", checkpoint_interval=100) == [0, 0]
    # Rank 1 alone gets SIGTERM at the start of step index 5; both ranks stop after it.
    stopped = tmp_path / "stopped"
    codes = forked(
        plan, stopped, checkpoint_interval=100, faults=["kind=term,step=5,rank=1,attempt=0"]
    )
    assert codes == [WorkerExit.STOPPED] * 2
    assert [p.name for p in list_checkpoints(stopped)] == [step_dir(stopped, 6).name]
    assert (stopped / LATEST).read_text().strip() == step_dir(stopped, 6).name
    progress = json.loads((stopped / "progress.json").read_text())
    assert (progress["state"], progress["step"], progress["last_checkpoint_step"]) == (
        "stopped",
        6,
        6,
    )

    assert forked(plan, stopped, checkpoint_interval=100) == [0, 0]
    steps = [r["step"] for r in records(stopped)]
    assert steps == list(range(1, 13)), "no step is replayed after a stop"
    assert losses(stopped) == losses(tmp_path / "clean")  # bit-identical


def _trainer(tmp_path: Path, faults: list[str]) -> Trainer:
    policy = AnomalyPolicy(window=8, spike_zscore=6.0, max_consecutive_skips=3)
    plan = make_plan(steps=20, sequence_length=SEQ, replicas=[(2, 2)], anomaly=policy)
    return Trainer(
        build_context(plan, 0, pick_device(0)),
        TrainerOptions(
            checkpoint_dir=tmp_path,
            checkpoint_interval=100,
            async_checkpoint=False,
            faults=tuple(Fault.parse(f) for f in faults),
            peak_flops=1e11,
        ),
        stop=StopRequest(),
    )


@pytest.mark.usefixtures("single_process_group")
def test_a_stop_inside_a_streak_of_skipped_steps_keeps_the_last_checkpoint(
    tmp_path: Path,
) -> None:
    trainer = _trainer(tmp_path, ["kind=spike,step=12,scale=50"])
    for _ in range(12):
        trainer.train_step()
    trainer.stop.request(signal.SIGTERM)
    with pytest.raises(TrainingExit) as stop:
        trainer.train_step()  # the spike: skipped, so no checkpoint may be taken now
    assert stop.value.code == WorkerExit.STOPPED
    assert "streak of skipped steps" in str(stop.value)
    assert list_checkpoints(tmp_path) == []


@pytest.mark.usefixtures("single_process_group")
def test_a_stop_request_saves_the_step_just_finished(tmp_path: Path) -> None:
    trainer = _trainer(tmp_path, [])
    for _ in range(3):
        trainer.train_step()
    before = [p.detach().clone() for p in trainer.stage.parameters()]
    trainer.stop.request(signal.SIGTERM)
    with pytest.raises(TrainingExit, match="checkpoint saved at step 4"):
        trainer.train_step()
    assert [p.name for p in list_checkpoints(tmp_path)] == [step_dir(tmp_path, 4).name]
    after = list(trainer.stage.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(after, before, strict=True)), (
        "the step that saw the request was applied before saving"
    )


def _wait_for_steps(log: Path, count: int, process: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and process.poll() is None:
        if log.exists() and len(log.read_text().splitlines()) >= count:
            return
        time.sleep(0.2)
    raise AssertionError(f"{log} never reached {count} steps (exit {process.poll()})")


def test_a_signalled_torchrun_agent_lets_its_workers_save_then_exits_143(tmp_path: Path) -> None:
    """The pod's path: the kubelet signals the agent, which forwards to its workers."""
    plan = make_plan(dp=2, steps=400, sequence_length=SEQ)
    (tmp_path / "plan.json").write_text(plan.to_json())
    ckpt = tmp_path / "ckpt"
    process = subprocess.Popen(
        launch_argv(
            tmp_path / "plan.json",
            ckpt,
            "--checkpoint-interval",
            "1000",
            "--inject-fault",
            "kind=slow,seconds=0.2",  # steps long enough that 400 never finish first
            agent_args=("--shutdown-timeout=60",),
        ),
        env=LAUNCH_ENV,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_for_steps(ckpt / "train_log.jsonl", 2, process, timeout=300)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = records(ckpt)[-1]["step"]
    assert 2 <= last < 400
    assert (ckpt / LATEST).read_text().strip() == step_dir(ckpt, last).name
    progress = json.loads((ckpt / "progress.json").read_text())
    assert progress["state"] == "stopped"
    assert progress["last_checkpoint_step"] == last
