"""SIGTERM to exit, with a checkpoint of the step in flight, for the tiny preset.

What a pod being suspended, drained or preempted goes through: the torchrun agent
(``hetmoe_trainer.launch``, two workers, dp2 x ep2) gets SIGTERM after ``--after``
steps, forwards it, the workers finish their step, agree to stop, save a checkpoint
and exit; the agent exits 143. No interval checkpoint falls in the run, so every
step not lost is the stop's doing. Per run: the step logged last, the step the
``latest`` checkpoint holds (steps lost = their difference), and the wall time from
the signal to the agent's exit. Median of ``--repeats`` runs.

    python bench/trainer/bench_stop.py [--repeats 5] [--after 5]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_resume import REPO, free_port, tiny_plan


def one_run(workdir: Path, after: int) -> dict[str, float]:
    """Signal the agent once ``after`` steps are logged; what the stop kept and cost."""
    plan_path = workdir / "plan.json"
    plan_path.write_text(tiny_plan(100_000).to_json())
    ckpt = workdir / "ckpt"
    cmd = [
        sys.executable,
        "-m",
        "hetmoe_trainer.launch",
        "--nnodes=1",
        "--nproc-per-node=2",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        "--max-restarts=0",
        "--monitor-interval=0.5",
        "--shutdown-timeout=55",
        "-m",
        "hetmoe_trainer",
        "--plan",
        str(plan_path),
        "--checkpoint-dir",
        str(ckpt),
        "--checkpoint-interval",
        "100000",
        "--peak-tflops",
        "0.1",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    log = ckpt / "train_log.jsonl"
    agent = subprocess.Popen(
        cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        while not (log.exists() and len(log.read_text().splitlines()) >= after):
            if agent.poll() is not None:
                raise RuntimeError(f"the run ended early: {agent.stderr.read()[-2000:]!r}")
            time.sleep(0.05)
        signalled = time.perf_counter()
        agent.send_signal(signal.SIGTERM)
        code = agent.wait(timeout=120)
        stopped = time.perf_counter() - signalled
    finally:
        agent.kill()
    last = json.loads(log.read_text().splitlines()[-1])["step"]
    latest = (ckpt / "latest").read_text().strip() if (ckpt / "latest").exists() else ""
    saved = int(latest.rsplit("_", 1)[-1]) if latest else 0
    return {"exit_code": code, "last_step": last, "saved_step": saved, "stop_s": stopped}


def main() -> None:
    """Measure and print a table and JSON."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--after", type=int, default=5, help="steps logged before SIGTERM")
    args = parser.parse_args()
    runs = []
    print("| run | exit code | last step logged | checkpoint step | steps lost | SIGTERM -> exit |")
    print("|---|---|---|---|---|---|")
    for repeat in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            run = one_run(Path(tmp), args.after)
        runs.append(run)
        lost = run["last_step"] - run["saved_step"]
        print(
            f"| {repeat} | {run['exit_code']} | {run['last_step']} | {run['saved_step']} "
            f"| {lost} | {run['stop_s']:.2f} s |",
            flush=True,
        )
    result = {
        "stop_to_exit_s": statistics.median(r["stop_s"] for r in runs),
        "steps_lost": [r["last_step"] - r["saved_step"] for r in runs],
        "runs": runs,
        "load_average_1m": os.getloadavg()[0],
    }
    print(
        f"SIGTERM -> exit median {result['stop_to_exit_s']:.2f} s; steps lost "
        f"{result['steps_lost']} (without the stop request: every step since the last "
        "interval checkpoint)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
