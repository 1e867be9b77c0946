"""``hetmoe profile`` and ``hetmoe plan --profile`` through the real CLI entry point."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from hetmoe_operator.api.model import PRESETS
from hetmoe_operator.cli.main import main
from hetmoe_operator.cli.profile_command import (
    _fit_link,
    concurrent_cores,
    fit_step,
    measure_step,
)
from hetmoe_operator.errors import UserError
from hetmoe_operator.plan import Plan

JOB = """
apiVersion: hetmoe.io/v1alpha1
kind: MoEJob
metadata: {name: tiny-local}
spec:
  model: {preset: tiny}
  training: {steps: 10, globalBatchSize: 8, sequenceLength: 64}
  placement: {pipelineParallel: 1, dataParallel: 1}
"""

CLUSTER = """
catalog:
  grades:
    - {name: cpu, peakBf16Tflops: 0.2, memoryGib: 8, pricePerHour: 0}
pools:
  - {name: local, grade: cpu, nodes: 1, devicesPerNode: 2}
"""


@pytest.fixture(scope="module")
def profile_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("profile") / "cpu.yaml"
    assert main(["profile", "--repeats", "2", "--processes", "4", "-o", str(path)]) == 0
    return path


def test_profile_measures_every_operation_class(
    profile_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = yaml.safe_load(profile_file.read_text())
    assert data["apiVersion"] == "hetmoe.io/profile/v1"
    for name in ("attention", "expertFfn", "denseFfn", "embedding", "optimizer"):
        assert data["seconds"][name] > 0
        assert data["throughput"][name] > 0
    step = data["seconds"]["step"]
    assert step["perToken"] > 0 and step["perMicrobatch"] >= 0 and step["perStep"] >= 0
    assert step["parameters"] == PRESETS["tiny"].total_params
    assert "calibrated to a real step" in data["throughput"]["source"]
    communication = data["communication"]
    assert communication["backend"] == "gloo"
    for name in ("allReduce", "allToAll", "sendRecv"):
        assert communication[name]["latencySeconds"] > 0
        assert communication[name]["gbps"] > 0
    assert 0 < communication["concurrentCores"] <= data["cores"]


def test_link_fit_recovers_latency_and_bandwidth() -> None:
    latency, seconds_per_byte = 50e-6, 1e-9
    points = [[size, latency + size * seconds_per_byte] for size in (64, 256 << 10, 4 << 20)]
    link = _fit_link(points, 1.0)
    assert link.latency_seconds == pytest.approx(latency, rel=1e-3)
    assert link.gbps == pytest.approx(1.0, rel=1e-6)


def test_link_fit_keeps_latency_positive_when_large_messages_are_noisy() -> None:
    # A least-squares line through these points crosses zero below 0 s: the old fit
    # reported free collectives (a flaky CI failure on 2026-11-24).
    points = [[64, 20e-6], [256 << 10, 60e-6], [4 << 20, 1.9e-3]]
    link = _fit_link(points, 1.0)
    assert link.latency_seconds >= 10e-6
    assert link.gbps > 0


def _line(per_token: float, per_microbatch: float, per_step: float) -> list[tuple[int, int, float]]:
    shapes = [(64, 1), (256, 1), (1024, 1), (64, 4), (256, 4)]
    return [(t, k, per_step + k * (per_microbatch + t * per_token)) for t, k in shapes]


def test_step_fit_recovers_tokens_microbatches_and_step() -> None:
    step = fit_step(_line(50e-6, 20e-3, 7e-3), 1000)
    assert step.per_token == pytest.approx(50e-6)
    assert step.per_microbatch == pytest.approx(20e-3)
    assert step.per_step == pytest.approx(7e-3)
    assert step.parameters == 1000


def test_step_fit_drops_a_term_noise_would_make_negative() -> None:
    # Four microbatches timed as fast as one of the same total size: no per-microbatch
    # term, the intercept carries the fixed time.
    points = [(t, k, 10e-3 + k * t * 50e-6) for t, k in [(64, 1), (256, 1), (1024, 1), (64, 4)]]
    points.append((256, 4, 0.9 * (10e-3 + 4 * 256 * 50e-6)))
    step = fit_step(points, 1000)
    assert step.per_microbatch == 0.0
    assert step.per_token > 0 and step.per_step > 0


def test_step_fit_without_any_positive_slope_uses_the_largest_step() -> None:
    points = [(64, 1, 0.10), (256, 1, 0.05), (1024, 1, 0.01), (64, 4, 0.10), (256, 4, 0.01)]
    step = fit_step(points, 1000)
    assert step.per_token > 0 and step.per_microbatch >= 0 and step.per_step >= 0


@pytest.mark.parametrize(
    ("cpu", "wall", "cores"),
    [
        (2.0, 1.1, 2.0),  # both computed all the time: two cores
        (1.0, 1.1, 1.0),  # half the time each: they shared one core
        (4.0, 1.1, 2.0),  # never more than the machine has
        (0.0, 0.05, 0.01),  # a broken probe still gives a positive figure
    ],
)
def test_concurrent_cores_is_compute_over_wall_time_less_latency(
    cpu: float, wall: float, cores: float
) -> None:
    assert concurrent_cores(cpu, wall, 10, 0.01, 2) == pytest.approx(cores)


def test_step_timing_refuses_to_run_inside_a_process_group() -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        with pytest.raises(UserError, match="inside a running job"):
            measure_step(PRESETS["tiny"], 64, 1, 1)
    finally:
        dist.destroy_process_group()


def test_profile_can_skip_communication(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cpu.yaml"
    args = ["profile", "--repeats", "1", "--microbatch-size", "1", "--no-communication"]
    assert main([*args, "-o", str(path)]) == 0
    assert yaml.safe_load(path.read_text()).get("communication") is None
    assert "real step (one process):" in capsys.readouterr().out


def _plan(tmp_path: Path, *extra: str, capsys: pytest.CaptureFixture[str]) -> Plan:
    job, cluster = tmp_path / "job.yaml", tmp_path / "cluster.yaml"
    job.write_text(JOB)
    cluster.write_text(CLUSTER)
    capsys.readouterr()
    assert main(["plan", "-f", str(job), "--cluster", str(cluster), "-o", "json", *extra]) == 0
    return Plan.from_json(capsys.readouterr().out)


def test_plan_uses_the_profile_and_shares_cores(
    profile_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    catalog = _plan(tmp_path, capsys=capsys)
    alone = _plan(tmp_path, "--profile", f"cpu={profile_file}", capsys=capsys)
    shared = _plan(
        tmp_path,
        "--profile",
        f"cpu={profile_file}",
        "--processes-per-machine",
        "4",
        capsys=capsys,
    )
    assert catalog.prediction and alone.prediction and shared.prediction
    assert any("measured effective TFLOPS" in line for line in alone.prediction.assumptions)
    assert alone.prediction.step_time.total != catalog.prediction.step_time.total
    # Four single-threaded workers on two cores: each computes at half speed, or
    # slower when two co-scheduled workers got fewer cores in the profile.
    data = yaml.safe_load(profile_file.read_text())
    cores = min(data["cores"], data["communication"]["concurrentCores"])
    ratio = shared.prediction.step_time.compute / alone.prediction.step_time.compute
    assert ratio == pytest.approx(4 / cores, rel=1e-6)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--profile", "cpu"], "expected GRADE=FILE"),
        (["--profile", "gpu={profile}"], "unknown accelerator grade 'gpu'"),
        (["--profile", "cpu=/nonexistent.yaml"], "no such file"),
    ],
)
def test_bad_profile_arguments_are_one_clear_error(
    args: list[str],
    message: str,
    profile_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    job, cluster = tmp_path / "job.yaml", tmp_path / "cluster.yaml"
    job.write_text(JOB)
    cluster.write_text(CLUSTER)
    args = [a.replace("{profile}", str(profile_file)) for a in args]
    assert main(["plan", "-f", str(job), "--cluster", str(cluster), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_bad_profile_file_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps({"apiVersion": "hetmoe.io/profile/v1", "device": "x"}))
    job, cluster = tmp_path / "job.yaml", tmp_path / "cluster.yaml"
    job.write_text(JOB)
    cluster.write_text(CLUSTER)
    assert main(["plan", "-f", str(job), "--cluster", str(cluster), "--profile", f"cpu={bad}"]) == 2
    assert "bad.yaml" in capsys.readouterr().err


def test_profile_rejects_bad_numbers(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["profile", "--repeats", "0"]) == 2
    assert "--repeats must be at least 1" in capsys.readouterr().err
