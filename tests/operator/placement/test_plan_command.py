"""``hetmoe plan`` through the real CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hetmoe_operator.cli.main import main
from hetmoe_operator.plan import Plan

REPO = Path(__file__).resolve().parents[3]

JOB = """
apiVersion: hetmoe.io/v1alpha1
kind: MoEJob
metadata: {name: tiny-local}
spec:
  model: {preset: tiny}
  training: {steps: 10, globalBatchSize: 8, sequenceLength: 128}
"""

CLUSTER = """
catalog:
  grades:
    - {name: cpu, peakBf16Tflops: 0.2, memoryGib: 8, pricePerHour: 0}
pools:
  - {name: local, grade: cpu, nodes: 1, devicesPerNode: 4}
"""


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path]:
    job = tmp_path / "job.yaml"
    cluster = tmp_path / "cluster.yaml"
    job.write_text(JOB)
    cluster.write_text(CLUSTER)
    return job, cluster


def test_table_output(files, capsys) -> None:
    job, cluster = files
    assert main(["plan", "-f", str(job), "--cluster", str(cluster)]) == 0
    out = capsys.readouterr().out
    assert "plan for tiny-local" in out
    assert "even split" in out and "only cpu" in out and "assumptions" in out


def test_json_output_is_a_plan(files, capsys) -> None:
    job, cluster = files
    argv = ["plan", "-f", str(job), "--cluster", str(cluster), "-o", "json", "--objective", "cost"]
    assert main(argv) == 0
    plan = Plan.from_json(capsys.readouterr().out)
    assert plan.job == "tiny-local" and plan.objective == "cost" and plan.world_size == 4
    assert json.loads(plan.to_json())["apiVersion"] == "hetmoe.io/plan/v1"


def test_missing_file_exits_2_without_traceback(files, capsys, tmp_path) -> None:
    _, cluster = files
    assert main(["plan", "-f", str(tmp_path / "nope.yaml"), "--cluster", str(cluster)]) == 2
    err = capsys.readouterr().err
    assert "no such file" in err and "Traceback" not in err


def test_bad_manifest_exits_2(files, capsys, tmp_path) -> None:
    _, cluster = files
    bad = tmp_path / "bad.yaml"
    bad.write_text(JOB.replace("globalBatchSize: 8", "globalBatchSize: -1"))
    assert main(["plan", "-f", str(bad), "--cluster", str(cluster)]) == 2
    assert "globalBatchSize" in capsys.readouterr().err


def test_infeasible_job_names_the_constraint(files, capsys, tmp_path) -> None:
    job, _ = files
    tiny_cluster = tmp_path / "small.yaml"
    tiny_cluster.write_text(CLUSTER.replace("memoryGib: 8", "memoryGib: 1"))
    assert main(["plan", "-f", str(job), "--cluster", str(tiny_cluster)]) == 2
    err = capsys.readouterr().err
    assert "(memory)" in err and "Traceback" not in err


def test_shipped_ling_lite_example_plans_on_the_reference_mix(capsys) -> None:
    argv = [
        "plan",
        "-f",
        str(REPO / "examples/moejob-ling-lite.yaml"),
        "--cluster",
        str(REPO / "examples/clusters/reference-mix.yaml"),
        "-o",
        "json",
    ]
    assert main(argv) == 0
    plan = Plan.from_json(capsys.readouterr().out)
    assert {r.grade for r in plan.ranks} >= {"A", "D"}


def _stage_positions(out: str) -> list[str]:
    stage_rows = out.split("\nstages\n")[1].split("\n\n")[0].splitlines()[2:]
    assert len(stage_rows) > 2 and all("GiB" in row for row in stage_rows)
    return [row.split()[1] for row in stage_rows]


def test_zero_bubble_plan_renders_per_pipeline_position(capsys, tmp_path) -> None:
    # The shipped example pinned to pp 4 plans a ZB-V pipeline (two chunks per position
    # in V order): the table looks ranks, memory and times up by position
    # (Plan.position_of), so stage s and stage 2 pp - 1 - s show the same position.
    job = (REPO / "examples/moejob-ling-lite.yaml").read_text()
    pinned = tmp_path / "job.yaml"
    pinned.write_text(
        job.replace(
            "    objective: throughput\n", "    objective: throughput\n    pipelineParallel: 4\n"
        )
    )
    argv = [
        "plan",
        "-f",
        str(pinned),
        "--cluster",
        str(REPO / "examples/clusters/reference-mix.yaml"),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "schedule: zero-bubble V" in out
    positions = _stage_positions(out)
    assert positions == ["0", "1", "2", "3", "3", "2", "1", "0"]
    stage_rows = out.split("\nstages\n")[1].split("\n\n")[0].splitlines()[2:]
    assert "embedding head" not in stage_rows[0] and "head" in stage_rows[-1]


def test_zb1p_plan_renders_per_pipeline_position(capsys) -> None:
    # Unpinned, the shipped example plans ZB1P (loop shape, backward split) with two
    # chunks per position: stage s on position s mod pp.
    argv = [
        "plan",
        "-f",
        str(REPO / "examples/moejob-ling-lite.yaml"),
        "--cluster",
        str(REPO / "examples/clusters/reference-mix.yaml"),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "schedule: ZB1P (torch ScheduleInterleavedZeroBubble), 2 virtual stages" in out
    positions = _stage_positions(out)
    pp = len(positions) // 2
    assert positions == [str(r) for r in range(pp)] * 2
