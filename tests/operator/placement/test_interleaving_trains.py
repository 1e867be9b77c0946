"""A plan the planner chose to interleave runs on the real trainer (torchrun, 2 CPU processes).

The planner only emits ``virtual_stages`` > 1 where the trainer's checks and torch's
``ScheduleInterleaved1F1B`` accept it (whole rounds of pp microbatches, each
pipeline's processes in stage order); this runs one such plan end to end.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

from hetmoe_operator.api.job import PlacementSpec
from hetmoe_operator.api.model import PRESETS
from hetmoe_operator.api.training import TrainingConfig
from hetmoe_trainer.distributed import validate_plan

from .helpers import check_plan, local_cluster, plan_without_zero_bubble

REPO = Path(__file__).resolve().parents[3]
STEPS = 6


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_planner_chosen_interleaved_plan_trains(tmp_path: Path) -> None:
    description = local_cluster(2)
    training = TrainingConfig(steps=STEPS, global_batch_size=8, sequence_length=16)
    # ZB-V would win here; this test is about interleaved 1F1B (the loop shape).
    spec = PlacementSpec(pipeline_parallel=2)
    plan = plan_without_zero_bubble(PRESETS["tiny"], training, description, spec)
    assert plan.virtual_stages == 2, "the planner should interleave this pinned pipeline"
    check_plan(plan, description)
    validate_plan(plan)
    plan_path = tmp_path / "plan.json"
    plan_path.write_text(plan.to_json())
    env = dict(os.environ, OMP_NUM_THREADS="1", TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc-per-node={plan.world_size}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint=127.0.0.1:{_free_port()}",
        "--max-restarts=0",
        "-m",
        "hetmoe_trainer",
        "--plan",
        str(plan_path),
        "--checkpoint-dir",
        str(tmp_path / "ckpt"),
        "--peak-tflops",
        "0.1",
    ]
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    losses: dict[int, float] = {}
    for line in (tmp_path / "ckpt" / "train_log.jsonl").read_text().splitlines():
        record = json.loads(line)
        losses[record["step"]] = record["loss"]
    assert sorted(losses) == list(range(1, STEPS + 1))
    assert all(math.isfinite(loss) for loss in losses.values())
    assert losses[STEPS] < losses[1], "the synthetic data is learnable"
