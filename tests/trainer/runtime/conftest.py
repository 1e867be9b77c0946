"""Launchers for runtime tests: forked gloo workers (fast) and real torchrun (end to end).

Forked workers inherit the already-imported torch, so a 4-process run starts in about
a second instead of re-importing torch in every process; they run exactly the code
the CLI runs after argument parsing (``build_context`` + ``Trainer``). Because they
are forked, in-process tests must not leave threads behind (pending async saves,
HTTP servers): a lock held by such a thread at fork time deadlocks the children. The torchrun
launcher is used where the launcher itself matters (elastic restarts, exit codes).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from hetmoe_operator.plan import Plan

REPO = Path(__file__).resolve().parents[3]
PYTHON = sys.executable
LAUNCH_ENV = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(plan_json: str, rank: int, world: int, port: int, options: dict) -> None:
    from hetmoe_trainer.anomaly import Fault
    from hetmoe_trainer.distributed import build_context, pick_device
    from hetmoe_trainer.loop import Trainer, TrainerOptions
    from hetmoe_trainer.stop import stop_on_signals

    code = 1
    try:
        torch.set_num_threads(1)
        store = dist.TCPStore("127.0.0.1", port, world, rank == 0)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
        plan = Plan.from_json(plan_json)
        context = build_context(plan, rank, pick_device(0))
        faults = tuple(Fault.parse(f) for f in options.pop("faults", []))
        resave = options.pop("resave", None)
        trainer = Trainer(
            context,
            TrainerOptions(
                checkpoint_dir=Path(options.pop("checkpoint_dir")), faults=faults, **options
            ),
        )
        if resave is None:
            with stop_on_signals(trainer.stop):  # as the CLI runs it
                code = trainer.run()
        else:
            # Load the newest checkpoint under the new plan and save it again elsewhere,
            # so a test can compare the resharded state with the original bit for bit.
            trainer.load(trainer.checkpointer.find_resume_point())
            trainer.checkpointer.root = Path(resave)
            trainer.save()
            trainer.checkpointer.wait()
            code = 0
        dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _launch(plan: Plan, options: dict, timeout: float) -> list[int]:
    context = multiprocessing.get_context("fork")
    port = free_port()
    procs = [
        context.Process(
            target=_worker, args=(plan.to_json(), rank, plan.world_size, port, dict(options))
        )
        for rank in range(plan.world_size)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout
    failed_at: float | None = None
    while any(p.is_alive() for p in procs):
        now = time.monotonic()
        if failed_at is None and any(p.exitcode not in (None, 0) for p in procs):
            failed_at = now  # like torchrun: once one worker fails, stop the rest
        if now > deadline or (failed_at is not None and now - failed_at > 5):
            for proc in procs:
                if proc.is_alive():
                    proc.kill()
        time.sleep(0.05)
    for proc in procs:
        proc.join()
    return [proc.exitcode for proc in procs]


def run_forked(
    plan: Plan, checkpoint_dir: Path, timeout: float = 300, restarts: int = 0, **options: object
) -> list[int]:
    """Run every rank of ``plan`` in forked processes, restarting the whole group on failure
    up to ``restarts`` times (as torchrun --max-restarts does); returns the last exit codes."""
    base = {"checkpoint_dir": str(checkpoint_dir), "peak_flops": 1e11, **options}
    for attempt in range(restarts + 1):
        codes = _launch(plan, {**base, "restart_count": attempt}, timeout)
        if all(code == 0 for code in codes):
            break
    return codes


def run_torchrun(
    plan: Plan,
    workdir: Path,
    *extra: str,
    max_restarts: int = 0,
    timeout: float = 400,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """The pod's entry point on one node with a c10d rendezvous (see :func:`launch_argv`)."""
    workdir.mkdir(parents=True, exist_ok=True)
    plan_path = workdir / "plan.json"
    plan_path.write_text(plan.to_json())
    cmd = launch_argv(
        plan_path, workdir / "ckpt", *extra, nproc=plan.world_size, max_restarts=max_restarts
    )
    return subprocess.run(
        cmd,
        env={**LAUNCH_ENV, **(env or {})},
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def launch_argv(
    plan_path: Path,
    checkpoint_dir: Path,
    *trainer_args: str,
    nproc: int = 2,
    max_restarts: int = 0,
    agent_args: tuple[str, ...] = (),
) -> list[str]:
    """``hetmoe_trainer.launch`` (torchrun keeping the trainer's exit codes, what a pod
    runs) with ``nproc`` workers on one node."""
    return [
        PYTHON,
        "-m",
        "hetmoe_trainer.launch",
        "--nnodes=1",
        f"--nproc-per-node={nproc}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        f"--max-restarts={max_restarts}",
        "--monitor-interval=0.5",
        *agent_args,
        "-m",
        "hetmoe_trainer",
        "--plan",
        str(plan_path),
        "--checkpoint-dir",
        str(checkpoint_dir),
        "--peak-tflops",
        "0.1",
        *trainer_args,
    ]


def losses(checkpoint_dir: Path) -> dict[int, float]:
    """Loss per completed step from train_log.jsonl (the last line of a step wins)."""
    out: dict[int, float] = {}
    for line in (checkpoint_dir / "train_log.jsonl").read_text().splitlines():
        record = json.loads(line)
        out[record["step"]] = record["loss"]
    return out


def records(checkpoint_dir: Path) -> list[dict]:
    """Every line of train_log.jsonl."""
    return [
        json.loads(line) for line in (checkpoint_dir / "train_log.jsonl").read_text().splitlines()
    ]


@pytest.fixture(scope="session")
def forked() -> Callable[..., list[int]]:
    """The fork launcher (torch threads pinned to one in the parent before any fork)."""
    torch.set_num_threads(1)
    return run_forked


@pytest.fixture
def single_process_group() -> Iterator[None]:
    """A one-process gloo group in the test process, for in-process ``Trainer`` tests."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
