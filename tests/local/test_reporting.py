"""What a local run shows: trainer files read back, live panel, log lines, summary, plot."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import pytest
from rich.console import Console
from tests.local.test_executor import _hand_plan

from hetmoe_operator.api.catalog import DeviceCatalog, DeviceGrade
from hetmoe_operator.api.cluster import ClusterDescription, NodePool
from hetmoe_operator.api.job import PlacementSpec
from hetmoe_operator.api.model import PRESETS
from hetmoe_operator.api.training import TrainingConfig
from hetmoe_operator.errors import UserError
from hetmoe_operator.local.capacity import check_fits_machine
from hetmoe_operator.local.display import Display, RunView, log_line, render
from hetmoe_operator.local.summary import RunSummary, plot_history, summary_table
from hetmoe_operator.local.telemetry import list_checkpoints, read_progress, read_train_log
from hetmoe_operator.placement import plan_job
from hetmoe_operator.plan import Plan, Prediction, StepTimeBreakdown


def _write_trainer_outputs(checkpoints: Path) -> None:
    """Files as the trainer writes them (schema of hetmoe_trainer.progress and .loop)."""
    checkpoints.mkdir(parents=True)
    (checkpoints / "progress.json").write_text(
        json.dumps(
            {
                "version": 1,
                "state": "running",
                "step": 3,
                "total_steps": 10,
                "tokens": 3072,
                "loss": 5.5,
                "tokens_per_s": 1500.0,
                "eta_seconds": 7.0,
                "last_checkpoint_step": 2,
                "anomalies": {"spike": 1, "skipped": 0},
                "stage_step_seconds": {"0": 0.2, "1": 0.3},
            }
        )
    )
    lines = [
        {"step": 1, "loss": 6.0, "tokens_per_s": 1000.0},
        {"step": 2, "loss": 5.9, "tokens_per_s": 1100.0},
        {"step": 2, "loss": 5.8, "tokens_per_s": 1200.0},  # resumed: the last line wins
        {"step": 3, "loss": 5.5, "tokens_per_s": 1500.0},
    ]
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"step": 4, "lo'
    (checkpoints / "train_log.jsonl").write_text(text)
    for step in (1, 2):
        (checkpoints / f"step_{step:08d}").mkdir()
        (checkpoints / f"step_{step:08d}" / "MANIFEST.json").write_text("{}")
    (checkpoints / "step_00000003").mkdir()  # killed mid-save: no manifest
    (checkpoints / "latest").write_text("step_00000002\n")


@pytest.fixture
def view(tmp_path: Path) -> RunView:
    _write_trainer_outputs(tmp_path / "checkpoints")
    return RunView(
        job="tiny",
        phase="Running",
        generation=2,
        restarts=1,
        progress=read_progress(tmp_path / "checkpoints"),
        plan=_hand_plan(),
        events=("WorkerFailed: Running -> Restarting: pod tiny-g1-slow-0 exited with code 137",),
    )


def test_trainer_files_are_read_back(tmp_path: Path, view: RunView) -> None:
    checkpoints = tmp_path / "checkpoints"
    assert view.progress is not None
    assert (view.progress.step, view.progress.loss) == (3, 5.5)
    assert view.progress.stage_step_seconds == {0: 0.2, 1: 0.3}
    assert [r["loss"] for r in read_train_log(checkpoints)] == [6.0, 5.8, 5.5]
    assert list_checkpoints(checkpoints) == ["step_00000001", "step_00000002 (latest)"]
    assert read_progress(tmp_path / "absent") is None


def test_live_panel_and_log_lines_say_simulated(view: RunView) -> None:
    console = Console(file=io.StringIO(), width=120)
    console.print(render(view))
    panel = console.file.getvalue()  # type: ignore[attr-defined]
    assert "step time per stage (simulated)" in panel
    assert "slow/sim-slow x2" in panel and "0.300" in panel
    assert "spike 1" in panel and "exited with code 137" in panel
    line = log_line(view)
    assert "step=3/10" in line and "tokens_per_s_simulated=1500" in line
    assert "stage_step_s_simulated=0:0.200,1:0.300" in line


def test_plain_display_prints_each_event_once(view: RunView) -> None:
    stream = io.StringIO()
    display = Display(stream, interval=3600)
    display.update(view)
    display.update(view)
    assert stream.getvalue().count("exited with code 137") == 1
    assert stream.getvalue().count("job=tiny") == 1


def test_summary_table_and_plot(tmp_path: Path, view: RunView) -> None:
    checkpoints = tmp_path / "checkpoints"
    table = summary_table(RunSummary(view, 12.5, list_checkpoints(checkpoints)))
    console = Console(file=io.StringIO(), width=140)
    console.print(table)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert "last loss" in text and "5.500000" in text  # not final: the view is Running
    assert "stage 1 step time (simulated) [slow/sim-slow x2]" in text
    assert "step_00000002 (latest)" in text
    plot = plot_history(read_train_log(checkpoints), tmp_path / "p.png", job="tiny", simulated=True)
    assert plot is not None and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_history([], tmp_path / "none.png", job="tiny", simulated=True) is None


def _summary_text(view: RunView) -> str:
    console = Console(file=io.StringIO(), width=160)
    console.print(summary_table(RunSummary(view, 1.0, [])))
    return console.file.getvalue()  # type: ignore[attr-defined]


def test_summary_shows_the_planners_time_per_stage(view: RunView) -> None:
    cluster = ClusterDescription(
        catalog=DeviceCatalog(
            grades=[DeviceGrade(name="cpu", peak_bf16_tflops=0.2, memory_gib=8, price_per_hour=0)]
        ),
        pools=[NodePool(name="local", grade="cpu", nodes=1, devices_per_node=2)],
    )
    plan = plan_job(
        PRESETS["tiny"],
        TrainingConfig(steps=4, global_batch_size=8, sequence_length=128),
        cluster,
        PlacementSpec(pipeline_parallel=2),
    )
    assert plan.prediction is not None
    stages = {e.stage: e.step_seconds for e in plan.prediction.stages}
    assert stages[1] < stages[0] <= plan.prediction.step_time.total  # stage 0 drains last
    text = _summary_text(replace(view, plan=plan))
    for stage, seconds in stages.items():
        assert f"predicted {seconds:.3f} s" in text.split(f"stage {stage} step time")[1]


def test_summary_of_a_plan_without_stage_predictions_shows_the_step_time(view: RunView) -> None:
    assert view.plan is not None
    prediction = Prediction(
        step_time=StepTimeBreakdown(
            compute=0.25, bubble=0, communication=0, imbalance=0, optimizer=0, total=0.25
        ),
        tokens_per_s=1.0,
        cost_per_hour=0,
        cost_per_1t_tokens=0,
        ideal_tokens_per_s=1.0,
        fraction_of_ideal=1.0,
    )
    text = _summary_text(
        replace(view, plan=view.plan.model_copy(update={"prediction": prediction}))
    )
    assert text.count("predicted 0.250 s") == len(view.plan.stages)


def _with_ranks(plan: Plan, world: int) -> Plan:
    data = plan.model_dump()
    data["parallel"]["dp"] = world // 2
    data["ranks"] = [
        {**data["ranks"][0], "rank": r, "local_rank": r, "stage": r // (world // 2)}
        for r in range(world)
    ]
    global_batch = data["training"]["global_batch_size"]
    share = global_batch // (world // 2)
    data["replicas"] = [
        {"dp_index": i, "samples_per_step": share, "microbatch_size": share, "num_microbatches": 1}
        for i in range(world // 2)
    ]
    data["training"]["global_batch_size"] = share * (world // 2)
    return Plan.model_validate(data)


def test_machine_limits_are_user_errors() -> None:
    plan = _hand_plan()
    check_fits_machine(plan, cpus=2, memory_gib=16)
    with pytest.raises(UserError, match="at most 8"):
        check_fits_machine(_with_ranks(plan, 16), cpus=2, memory_gib=64)
    with pytest.raises(UserError, match="GiB of host memory"):
        check_fits_machine(plan, cpus=2, memory_gib=0.5)
