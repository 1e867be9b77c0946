"""Fixtures for local-mode tests: the shipped examples and runs of ``hetmoe run``.

End-to-end runs are real (planner, desired-state builder, reconcile decisions,
torchrun and the trainer), so they are shortened through a temporary copy of the
tiny manifest and shared across tests where a test only reads their outcome.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from hetmoe_operator.api.cluster import ClusterDescription
from hetmoe_operator.api.manifests import load_cluster

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
LOCAL_CLUSTER = EXAMPLES / "clusters" / "local.yaml"
TINY_JOB = EXAMPLES / "moejob-tiny.yaml"
RUN_TIMEOUT = 420
"""Upper bound for one end-to-end run on 2 cores (a healthy one takes far less)."""


@dataclass(frozen=True)
class RunResult:
    """Outcome of one ``hetmoe run`` subprocess."""

    returncode: int
    stdout: str
    stderr: str
    run_dir: Path
    seconds: float


@pytest.fixture(scope="session")
def local_cluster() -> ClusterDescription:
    """The shipped local cluster of simulated grades."""
    return load_cluster(LOCAL_CLUSTER)


def write_job(
    directory: Path,
    *,
    name: str,
    steps: int,
    interval: int,
    backoff: float | None = None,
    hang_timeout: int | None = None,
    in_place_restarts: int | None = None,
) -> Path:
    """A copy of the tiny example with fewer steps (and another restart backoff, hang
    timeout or in-place restart budget), written to ``directory``."""
    manifest = yaml.safe_load(TINY_JOB.read_text())
    manifest["metadata"]["name"] = name
    manifest["spec"]["training"]["steps"] = steps
    manifest["spec"]["checkpoint"]["intervalSteps"] = interval
    if backoff is not None:
        manifest["spec"]["elastic"]["backoffSeconds"] = backoff
    if hang_timeout is not None:
        manifest["spec"]["elastic"]["hangTimeoutSeconds"] = hang_timeout
    if in_place_restarts is not None:
        manifest["spec"]["elastic"]["inPlaceRestarts"] = in_place_restarts
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def hetmoe_argv(job: Path, run_dir: Path, *extra: str, cluster: Path = LOCAL_CLUSTER) -> list[str]:
    """argv of ``hetmoe run`` for ``job`` on ``cluster`` (the shipped local one)."""
    return [
        sys.executable,
        "-m",
        "hetmoe_operator.cli.main",
        "run",
        "-f",
        str(job),
        "--cluster",
        str(cluster),
        "--run-dir",
        str(run_dir),
        *extra,
    ]


def run_hetmoe(argv: Sequence[str], run_dir: Path, *, timeout: float = RUN_TIMEOUT) -> RunResult:
    """Run ``hetmoe`` to completion (killing its whole group if it overruns)."""
    started = time.monotonic()
    process = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process.pid)
        stdout, stderr = process.communicate()
        pytest.fail(f"hetmoe run overran {timeout}s\n{stdout}\n{stderr}")
    return RunResult(process.returncode, stdout, stderr, run_dir, time.monotonic() - started)


def kill_group(pgid: int) -> None:
    """SIGKILL a process group and everything hetmoe started in its own groups."""
    for pid in descendants(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)


def descendants(root: int) -> list[int]:
    """Live descendants of ``root`` (any session), from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def alive(pids: Sequence[int]) -> list[int]:
    """The pids of ``pids`` that are still running (zombies count as gone)."""
    result = []
    for pid in pids:
        try:
            state = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        if state[state.rindex(")") + 2] != "Z":
            result.append(pid)
    return result


@pytest.fixture(scope="session")
def tiny_baseline(tmp_path_factory: pytest.TempPathFactory) -> RunResult:
    """A fault-free end-to-end run of the shortened tiny job (shared by several tests)."""
    directory = tmp_path_factory.mktemp("baseline")
    job = write_job(directory, name="tiny-e2e", steps=16, interval=5)
    run_dir = directory / "run"
    return run_hetmoe(hetmoe_argv(job, run_dir), run_dir)
