"""The worker command line: plan-rank lookup, config errors exit 78, an end-to-end torchrun run."""

from __future__ import annotations

import argparse
import json
import subprocess
from pathlib import Path

import pytest
from plan_factory import make_plan

from conftest import PYTHON, REPO, losses, run_torchrun
from hetmoe_operator.plan import WorkerExit
from hetmoe_trainer.__main__ import grade_peaks
from hetmoe_trainer.distributed import PlanError, plan_rank_from_env


def test_plan_rank_from_seat_and_fallback() -> None:
    plan = make_plan(dp=2)
    env = {"HETMOE_POOL": "local", "HETMOE_NODE_SLOT": "0", "LOCAL_RANK": "1", "RANK": "0"}
    assert plan_rank_from_env(plan, env) == 1
    assert plan_rank_from_env(plan, {"RANK": "1"}) == 1
    with pytest.raises(PlanError):
        plan_rank_from_env(plan, {**env, "HETMOE_POOL": "elsewhere"})


def test_config_errors_exit_78_with_one_message(tmp_path: Path) -> None:
    plan_path = tmp_path / "plan.json"
    wire = json.loads(make_plan().to_json())
    wire["parallel"]["tp"] = 2  # the plan's own validation rejects this world size
    plan_path.write_text(json.dumps(wire))
    result = subprocess.run(
        [
            PYTHON,
            "-m",
            "hetmoe_trainer",
            "--plan",
            str(plan_path),
            "--checkpoint-dir",
            str(tmp_path),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == WorkerExit.CONFIG_ERROR
    assert "configuration error: invalid plan" in result.stderr
    assert "Traceback" not in result.stderr


def test_torchrun_elastic_restart_resumes(tmp_path: Path) -> None:
    """Real torchrun, c10d rendezvous, one restart after a killed rank."""
    plan = make_plan(dp=2, steps=8, sequence_length=16)
    result = run_torchrun(
        plan,
        tmp_path,
        "--checkpoint-interval",
        "3",
        "--sync-checkpoint",
        "--inject-fault",
        "kind=crash,step=4,rank=1,attempt=0",
        max_restarts=1,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    progress = json.loads((tmp_path / "ckpt" / "progress.json").read_text())
    assert progress["state"] == "finished" and progress["restarts"] == 1
    assert sorted(losses(tmp_path / "ckpt")) == list(range(1, 9))


def test_a_trainer_option_the_plan_cannot_run_exits_78_without_a_traceback(
    tmp_path: Path,
) -> None:
    plan = make_plan(pp=2, split_backward=True, steps=2)
    result = run_torchrun(plan, tmp_path, "--compile", timeout=300)
    assert result.returncode == WorkerExit.CONFIG_ERROR, result.stderr[-3000:]
    assert "configuration error: regional torch.compile cannot run" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("text", ["A", "A=", "A=abc", "A=-1", "=5"])
def test_bad_grade_peaks_are_refused_with_the_expected_form(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="GRADE=TFLOPS"):
        grade_peaks(text)


def test_grade_peaks_are_read_in_tflops() -> None:
    assert grade_peaks("A=370, D=989.5") == {"A": 370e12, "D": 989.5e12}
    assert grade_peaks("") == {}
