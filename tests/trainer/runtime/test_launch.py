"""The torchrun wrapper keeps the trainer's exit codes visible to the operator."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hetmoe_operator.plan import WorkerExit
from hetmoe_trainer.launch import telling_exit_code


@pytest.mark.parametrize(
    ("codes", "expected"),
    [
        ([1, 86], 86),
        ([86, 78], 78),
        ([87, 1], 87),
        ([3, 1], 3),
        ([-9], 137),
        ([], 1),
    ],
)
def test_hetmoe_codes_win_over_ordinary_failures(codes: list[int], expected: int) -> None:
    assert telling_exit_code(codes) == expected


def test_a_real_torchrun_agent_exits_with_the_workers_replace_node_code(tmp_path: Path) -> None:
    worker = tmp_path / "worker.py"
    worker.write_text(
        textwrap.dedent(
            f"""
            import os, sys
            sys.exit({WorkerExit.REPLACE_NODE} if os.environ["LOCAL_RANK"] == "1" else 1)
            """
        )
    )
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "hetmoe_trainer.launch",
            "--standalone",
            "--nproc-per-node=2",
            str(worker),
        ],
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == WorkerExit.REPLACE_NODE, result.stderr[-2000:]
