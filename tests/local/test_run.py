"""``hetmoe run`` end to end: real planner, builders, reconcile decisions, torchrun, trainer.

The tiny example is shortened through a temporary copy of its manifest; everything
else is what ``make run`` does.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from tests.local.conftest import (
    LOCAL_CLUSTER,
    REPO,
    RUN_TIMEOUT,
    RunResult,
    alive,
    descendants,
    hetmoe_argv,
    kill_group,
    run_hetmoe,
    write_job,
)

from hetmoe_operator.local.telemetry import LATEST_POINTER, read_progress, read_train_log
from hetmoe_operator.plan import WAITING_FOR_PEERS_MARK

STOP_TIMEOUT = 120
"""Ctrl-C to exit: SIGTERM, the trainer's grace to finish, SIGKILL for what is left."""


def _final_line(result: RunResult) -> str:
    lines = [line for line in result.stdout.splitlines() if line.startswith("job=")]
    return lines[-1] if lines else ""


def test_tiny_run_completes_and_the_loss_falls(tiny_baseline: RunResult) -> None:
    result = tiny_baseline
    assert result.returncode == 0, result.stdout + result.stderr
    assert "phase=Succeeded" in _final_line(result)
    records = read_train_log(result.run_dir / "checkpoints")
    assert [r["step"] for r in records] == list(range(1, 17))
    assert records[-1]["loss"] < records[0]["loss"]
    plot = result.run_dir / "training.png"
    assert plot.stat().st_size > 0
    assert f"plot: {plot}" in result.stdout
    assert "(simulated)" in result.stdout  # the summary labels simulated figures
    assert "Traceback" not in result.stderr


def test_running_a_finished_job_again_resumes_at_its_end_and_says_so(
    tiny_baseline: RunResult, tmp_path: Path
) -> None:
    """The second ``make run`` a newcomer types: the checkpoints are kept, so the job
    resumes at its last step, trains nothing, and must report where it stands (it
    used to print step 0 and no loss)."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_baseline.run_dir, run_dir)
    job = write_job(tmp_path, name="tiny-e2e", steps=16, interval=5)
    before = read_train_log(run_dir / "checkpoints")
    again = run_hetmoe(hetmoe_argv(job, run_dir), run_dir)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "resuming from checkpoint step_00000016 (--fresh starts over)" in again.stdout
    final = _final_line(again)
    assert "phase=Succeeded" in final and "step=16/16" in final, final
    assert f"loss={before[-1]['loss']:.4f}" in final, final
    assert read_train_log(run_dir / "checkpoints") == before, "nothing left to train"


def _run_with_a_crash(tmp_path: Path, **job: Any) -> tuple[RunResult, str]:
    """The tiny job (16 steps, a checkpoint every 5; ``job`` overrides) with plan rank 1
    crashed at step 8; the run must succeed. Returns it and its final status line."""
    path = write_job(tmp_path, name="tiny-e2e", steps=16, interval=5, **job)
    run_dir = tmp_path / "run"
    result = run_hetmoe(hetmoe_argv(path, run_dir, "--inject-fault", "rank=1,step=8"), run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    return result, _final_line(result)


def test_injected_crash_restarts_once_and_ends_at_the_fault_free_loss(
    tiny_baseline: RunResult, tmp_path: Path
) -> None:
    # No backoff: the failure's own pass starts the next generation, so this also
    # checks that local mode stops the old processes before starting new ones.
    result, final = _run_with_a_crash(tmp_path, backoff=0)
    run_dir = result.run_dir
    assert "phase=Succeeded" in final and "restarts=1" in final, final
    assert "WorkerFailed" in result.stdout
    # The crashed rank's pod is named (its agent says which worker died), not the
    # other pod, whose ranks fell with it on the broken collective.
    assert "exited with code 137" in result.stdout, result.stdout
    steps = [
        int(line.split('"step": ')[1].split(",")[0]) for line in _lines(run_dir / "checkpoints")
    ]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[restart] > 1, "the restarted generation did not resume from a checkpoint"
    faulty = read_train_log(run_dir / "checkpoints")[-1]
    clean = read_train_log(tiny_baseline.run_dir / "checkpoints")[-1]
    assert faulty["step"] == clean["step"] == 16
    assert faulty["loss"] == clean["loss"]


def test_with_in_place_restarts_a_crash_is_recovered_in_the_same_pods_at_the_same_loss(
    tiny_baseline: RunResult, tmp_path: Path
) -> None:
    """The same crash as above, with elastic.inPlaceRestarts: torchrun restarts the gang
    inside its pods; the operator sees no failure, no new generation, and reports the
    in-place restart with the crashed worker's own words."""
    result, final = _run_with_a_crash(tmp_path, in_place_restarts=1)
    run_dir = result.run_dir
    assert "phase=Succeeded" in final and "generation=1 restarts=0" in final, final
    assert "in_place_restarts=1" in final, final
    events = [line for line in result.stdout.splitlines() if "RestartedInPlace" in line]
    assert len(events) == 1 and "local rank 1 exited with code 137" in events[0], events
    assert WAITING_FOR_PEERS_MARK not in events[0], "the fallout is not the reason"
    assert "WorkerFailed" not in result.stdout
    faulty = read_train_log(run_dir / "checkpoints")
    assert {r["restart_count"] for r in faulty} == {0, 1}, "resumed by torchrun, in place"
    clean = read_train_log(tiny_baseline.run_dir / "checkpoints")[-1]
    assert faulty[-1]["step"] == clean["step"] == 16
    assert faulty[-1]["loss"] == clean["loss"]


def test_an_injected_hang_is_ended_by_the_watchdog_and_the_job_restarts(
    tiny_baseline: RunResult, tmp_path: Path
) -> None:
    job = write_job(tmp_path, name="tiny-hang", steps=16, interval=5, backoff=0, hang_timeout=20)
    run_dir = tmp_path / "run"
    argv = hetmoe_argv(job, run_dir, "--inject-fault", "kind=hang,rank=1,step=8")
    result = run_hetmoe(argv, run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    final = _final_line(result)
    assert "phase=Succeeded" in final and "restarts=1" in final, final
    logs = "".join(p.read_text() for p in (run_dir / "logs").glob("*.gen1.log"))
    assert "stuck in step 9: forward/backward" in logs
    # The other pod fails too (its collective breaks, exit 1, or on a loaded machine
    # its own watchdog fires 2 s later) and may be seen first; it says it was waiting
    # for others, so it is held until the hung pod's report names the culprit.
    assert "WorkerHung" in result.stdout, result.stdout
    assert "code 89" in result.stdout and "plan rank 1: no progress for" in result.stdout
    hung = read_train_log(run_dir / "checkpoints")[-1]
    clean = read_train_log(tiny_baseline.run_dir / "checkpoints")[-1]
    assert hung["step"] == clean["step"] == 16
    assert hung["loss"] == clean["loss"]


def test_a_persistent_straggler_gets_its_node_replaced_and_the_job_finishes_without_it(
    tmp_path: Path,
) -> None:
    """Three one-device nodes, a plan on two; rank 1 is slowed from step 2 on. Every rank
    saves and exits 86 naming rank 1's node; the job names that pod and node and resumes
    from the exit step (that the next plan avoids the node: test_reconcile)."""
    cluster = yaml.safe_load(LOCAL_CLUSTER.read_text())
    cluster["pools"] = [{"name": "fast", "grade": "sim-fast", "nodes": 3, "devicesPerNode": 1}]
    cluster_path = tmp_path / "three-nodes.yaml"
    cluster_path.write_text(yaml.safe_dump(cluster))
    job = write_job(tmp_path, name="tiny-slow", steps=16, interval=100, backoff=0)
    manifest = yaml.safe_load(job.read_text())
    manifest["spec"]["elastic"]["maxNodes"] = 2
    manifest["spec"]["training"]["anomaly"] = {
        "window": 8,
        "stragglerFactor": 1.5,
        "stragglerPatience": 3,
    }
    job.write_text(yaml.safe_dump(manifest))
    run_dir = tmp_path / "run"
    argv = hetmoe_argv(
        job, run_dir, "--inject-fault", "kind=slow,rank=1,step=2,seconds=1.5", cluster=cluster_path
    )
    result = run_hetmoe(argv, run_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    final = _final_line(result)
    assert "phase=Succeeded" in final and "restarts=1" in final, final
    assert "event ReplaceNode" in result.stdout, result.stdout
    steps = [
        int(line.split('"step": ')[1].split(",")[0]) for line in _lines(run_dir / "checkpoints")
    ]
    assert steps == list(range(1, 17)), "resumed from the exit step: none lost or replayed"
    # Whichever pod's exit was seen first, the straggler's pod and node are named.
    assert "pod tiny-slow-g1-fast-1 on node fast-1 exited with code 86" in result.stdout
    assert "(replace node: pool=fast slot=1)" in result.stdout


def _trainer_workers(root: int) -> list[int]:
    """Trainer processes under ``root``: the children of a torchrun agent
    (``hetmoe_trainer.launch``)."""

    def parent(pid: int) -> int:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return 0
        return int(stat[stat.rindex(")") + 2 :].split()[1])

    return [
        pid
        for pid in descendants(root)
        if "hetmoe_trainer.launch" not in _cmdline(pid)
        and "hetmoe_trainer.launch" in _cmdline(parent(pid))
    ]


def test_killing_a_worker_by_hand_restarts_and_ends_at_the_fault_free_loss(
    tiny_baseline: RunResult, tmp_path: Path
) -> None:

    def kill_a_worker(root: int) -> None:
        workers = _trainer_workers(root)
        assert len(workers) == 4, f"expected 4 trainer processes, found {workers}"
        os.kill(workers[-1], signal.SIGKILL)

    output = _interrupted_run(tmp_path, kill_a_worker)
    checkpoints = tmp_path / "run" / "checkpoints"
    final = [line for line in output.splitlines() if line.startswith("job=")][-1]
    assert "phase=Succeeded" in final and "restarts=1" in final, final
    assert "was killed by SIGKILL" in output, "the killed worker's pod is the one named"
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in _lines(checkpoints)]
    restart = next(i for i in range(1, len(steps)) if steps[i] <= steps[i - 1])
    assert steps[restart] > 1, "the restarted generation did not resume from a checkpoint"
    killed = read_train_log(checkpoints)[-1]
    clean = read_train_log(tiny_baseline.run_dir / "checkpoints")[-1]
    assert killed["step"] == clean["step"] == 16
    assert killed["loss"] == clean["loss"]


def test_with_in_place_restarts_a_lost_pod_is_replaced_alone_and_the_job_ends_at_the_same_loss(
    tiny_baseline: RunResult, tmp_path: Path
) -> None:
    """The second pod (node 1) dies whole, as when its node goes: its agent and workers
    are SIGKILLed. The operator replaces that pod alone (same generation, ``-r1``); the
    first pod's agent, which serves the rendezvous, restarts its workers in place and
    takes the new pod in; training resumes from the checkpoint at the fault-free loss."""

    def lose_the_second_pod(root: int) -> None:
        agent = next(
            pid
            for pid in descendants(root)
            if "hetmoe_trainer.launch" in _cmdline(pid)
            and b"HETMOE_NODE_INDEX=1\0" in Path(f"/proc/{pid}/environ").read_bytes()
        )
        kill_group(agent)  # the whole pod: its agent leads the group, workers too

    output = _interrupted_run(tmp_path, lose_the_second_pod, in_place_restarts=1)
    checkpoints = tmp_path / "run" / "checkpoints"
    final = [line for line in output.splitlines() if line.startswith("job=")][-1]
    assert "phase=Succeeded" in final and "generation=1 restarts=1" in final, final
    assert "PodReplaced" in output and "-r1" in output, output[-3000:]
    records = read_train_log(checkpoints)
    clean = read_train_log(tiny_baseline.run_dir / "checkpoints")[-1]
    assert records[-1]["step"] == clean["step"] == 16
    assert records[-1]["loss"] == clean["loss"]


def _interrupted_run(
    tmp_path: Path, interrupt: Callable[[int], None], *, in_place_restarts: int | None = None
) -> str:
    """Run the tiny job (16 steps, a checkpoint every 5), call ``interrupt`` with the
    ``hetmoe run`` pid once rank 0 reported step 7; the run must still succeed.
    Returns its output."""
    job = write_job(
        tmp_path, name="tiny-e2e", steps=16, interval=5, in_place_restarts=in_place_restarts
    )
    run_dir = tmp_path / "run"
    with (tmp_path / "run.log").open("wb") as log:
        process = subprocess.Popen(
            hetmoe_argv(job, run_dir),
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            start_new_session=True,
        )
        try:
            _wait_for_step(process, run_dir / "checkpoints", 7, set())
            interrupt(process.pid)
            assert process.wait(timeout=RUN_TIMEOUT) == 0, (tmp_path / "run.log").read_text()
        finally:
            kill_group(process.pid)
    return (tmp_path / "run.log").read_text()


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _wait_for_step(
    process: subprocess.Popen[bytes], checkpoints: Path, step: int, seen: set[int]
) -> None:
    """Until rank 0 reports ``step``; records every descendant process seen meanwhile."""
    deadline = time.monotonic() + RUN_TIMEOUT
    while time.monotonic() < deadline:
        seen.update(descendants(process.pid))
        progress = read_progress(checkpoints)
        if progress is not None and progress.step >= step:
            return
        assert process.poll() is None, "hetmoe run ended before the step to interrupt at"
        time.sleep(0.2)
    raise AssertionError(f"step {step} not reached within {RUN_TIMEOUT}s")


def test_ctrl_c_saves_a_checkpoint_stops_every_process_and_the_same_command_resumes(
    tmp_path: Path,
) -> None:
    # No interval checkpoint falls in the run: the one to resume from is the stop's.
    job = write_job(tmp_path, name="tiny-stop", steps=30, interval=1000)
    run_dir = tmp_path / "run"
    argv = hetmoe_argv(job, run_dir)
    checkpoints = run_dir / "checkpoints"
    seen: set[int] = set()
    with (tmp_path / "first.log").open("wb") as log:
        process = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True
        )
        try:
            _wait_for_step(process, checkpoints, 4, seen)
            seen.update(descendants(process.pid))
            # A terminal's Ctrl-C signals the foreground process group: hetmoe alone,
            # since it starts every pod in a session of its own.
            os.killpg(process.pid, signal.SIGINT)
            assert process.wait(timeout=STOP_TIMEOUT) == 130
        finally:
            kill_group(process.pid)
    output = (tmp_path / "first.log").read_text()
    assert "the workers finish their step and save a checkpoint" in output
    assert len(seen) >= 6, "expected 2 torchrun agents and 4 trainer processes"
    assert alive(sorted(seen)) == []
    interrupted_at = max(r["step"] for r in read_train_log(checkpoints))
    assert interrupted_at < 30
    assert (checkpoints / LATEST_POINTER).exists(), f"the stop saved no checkpoint:\n{output}"
    resume_from = int((checkpoints / LATEST_POINTER).read_text().strip().split("_")[-1])
    assert resume_from == interrupted_at, "the stop did not checkpoint its last step"
    assert f"(latest: step_{resume_from:08d})" in output

    rerun = run_hetmoe(argv, run_dir)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in _lines(checkpoints)]
    assert steps == list(range(1, 31)), "no step is lost or replayed across the stop"


def _lines(checkpoints: Path) -> list[str]:
    return (checkpoints / "train_log.jsonl").read_text().splitlines()
