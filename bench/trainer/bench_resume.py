"""Kill-to-first-resumed-step for the tiny preset under real torchrun elastic restarts.

Two workers (dp2, ep2) train with a checkpoint every 2 steps; rank 1 is killed
(``kind=crash``) at step ``--crash-step`` on the first attempt; torchrun (c10d
rendezvous, ``--max-restarts 1``, TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1) restarts the
group, which resumes from the latest checkpoint. The figure is the wall time from the
last step logged before the kill to the first step logged after the restart: failure
detection, re-rendezvous, interpreter and torch start-up, process groups, checkpoint
load and one step. Median of ``--repeats`` runs.

After each run, two ``python -c "import hetmoe_trainer.__main__"`` processes are started
together (what the restart does before any trainer code runs) and timed: the part of
the figure spent importing Python and torch, which no setting of ours can shorten.

    python bench/trainer/bench_resume.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from hetmoe_operator.api.model import PRESETS
from hetmoe_operator.api.training import TrainingConfig
from hetmoe_operator.plan import ParallelDegrees, Plan, RankPlan, ReplicaPlan, StagePlan

REPO = Path(__file__).resolve().parents[2]


def tiny_plan(steps: int) -> Plan:
    """dp2 x ep2 plan of the tiny preset on one node."""
    arch = PRESETS["tiny"]
    half = arch.num_experts // 2
    return Plan(
        model=arch,
        training=TrainingConfig(steps=steps, global_batch_size=8, sequence_length=32),
        parallel=ParallelDegrees(pp=1, dp=2, ep=2),
        stages=[StagePlan.whole_model(arch)],
        replicas=[
            ReplicaPlan(dp_index=j, samples_per_step=4, microbatch_size=2, num_microbatches=2)
            for j in range(2)
        ],
        ranks=[
            RankPlan(
                rank=j,
                pool="local",
                grade="cpu",
                node_slot=0,
                local_rank=j,
                stage=0,
                dp_index=j,
                ep_group=0,
                ep_rank=j,
                experts=list(range(j * half, (j + 1) * half)),
            )
            for j in range(2)
        ],
    )


def free_port() -> int:
    """An unused TCP port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def one_run(workdir: Path, crash_step: int) -> float:
    """Seconds from the kill to the first resumed step of one run."""
    plan_path = workdir / "plan.json"
    plan_path.write_text(tiny_plan(crash_step + 3).to_json())
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc-per-node=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "--max-restarts=1",
        "--monitor-interval=0.5",
        "-m",
        "hetmoe_trainer",
        "--plan",
        str(plan_path),
        "--checkpoint-dir",
        str(workdir / "ckpt"),
        "--checkpoint-interval",
        "2",
        "--peak-tflops",
        "0.1",
        "--inject-fault",
        f"kind=crash,step={crash_step},rank=1,attempt=0",
    ]
    subprocess.run(cmd, env=env, cwd=REPO, check=True, capture_output=True, timeout=900)
    records = [json.loads(line) for line in (workdir / "ckpt" / "train_log.jsonl").open()]
    for before, after in itertools.pairwise(records):
        if after["restart_count"] > before["restart_count"]:  # first step of the new attempt
            return after["time"] - before["time"]
    attempts = [(r["step"], r["restart_count"]) for r in records]
    raise RuntimeError(f"no restart found in train_log.jsonl: (step, restart) {attempts}")


def import_seconds(processes: int = 2) -> float:
    """Wall time of ``processes`` concurrent cold starts that import the trainer's entry point."""
    start = time.perf_counter()
    children = [
        subprocess.Popen([sys.executable, "-c", "import hetmoe_trainer.__main__"], cwd=REPO)
        for _ in range(processes)
    ]
    for child in children:
        if child.wait(timeout=600) != 0:
            raise RuntimeError("importing hetmoe_trainer.__main__ failed")
    return time.perf_counter() - start


def main() -> None:
    """Measure and print a table and JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--crash-step", type=int, default=5)
    args = parser.parse_args()
    seconds, imports = [], []
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            seconds.append(one_run(Path(tmp), args.crash_step))
        imports.append(import_seconds())
        print(f"run {repeat}: {seconds[-1]:.1f} s (imports {imports[-1]:.1f} s)", flush=True)
    result = {
        "kill_to_first_step_s": statistics.median(seconds),
        "runs_s": seconds,
        "import_s": statistics.median(imports),
        "imports_s": imports,
        "load_average_1m": os.getloadavg()[0],
    }
    print(
        f"kill-to-first-resumed-step median {result['kill_to_first_step_s']:.1f} s (target <= 20 s)"
        f", of which two concurrent interpreter + torch imports {result['import_s']:.1f} s"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
