"""The end of a local run: one summary table and a loss/throughput plot.

The table puts the planner's prediction next to what was measured, because that
comparison is the point of a heterogeneous plan; every figure that depends on
simulated grades says so.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # Headless: the run may have no display; only a PNG is wanted.
import matplotlib.pyplot as plt
from rich.markup import escape
from rich.table import Table

from hetmoe_operator.local.display import RunView, predicted_step_seconds, stage_pools
from hetmoe_operator.plan import Plan

PLOT_FILE = "training.png"


@dataclass(frozen=True)
class RunSummary:
    """Facts about a finished (or stopped) local run."""

    view: RunView
    wall_seconds: float
    checkpoints: Sequence[str]


def _seconds(value: float | None) -> str:
    return f"{value:.3f}" if value is not None else "-"


def predicted_stage_seconds(plan: Plan) -> dict[int, float]:
    """Per stage: the planner's time until its slowest replica finishes the step's
    last backward (what the trainer measures per stage); plans made before per-stage
    predictions existed fall back to the whole step time for every stage."""
    prediction = plan.prediction
    if prediction is None:
        return {}
    if not prediction.stages:
        total = predicted_step_seconds(plan)
        return {stage.index: total for stage in plan.stages} if total is not None else {}
    result: dict[int, float] = {}
    for entry in prediction.stages:
        result[entry.stage] = max(result.get(entry.stage, 0.0), entry.step_seconds)
    return result


def summary_table(summary: RunSummary) -> Table:
    """Key figures, then predicted vs measured step time for every stage."""
    view = summary.view
    sim = " (simulated)" if view.simulated else ""
    table = Table(title=f"hetmoe run {view.job}: {view.phase}", show_header=False)
    table.add_column("what")
    table.add_column("value", justify="right")
    progress = view.progress
    if progress:
        table.add_row("steps", f"{progress.step}/{progress.total_steps}")
        table.add_row("tokens", f"{progress.tokens:,}")
        loss = f"{progress.loss:.6f}" if progress.loss is not None else "-"
        table.add_row("final loss" if view.phase == "Succeeded" else "last loss", loss)
        measured = progress.tokens_per_second  # 0 when this run trained no step
        table.add_row(f"tokens/s measured{sim}", f"{measured:,.0f}" if measured else "-")
    plan = view.plan
    if plan and plan.prediction:
        table.add_row(f"tokens/s predicted{sim}", f"{plan.prediction.tokens_per_s:,.0f}")
    table.add_row("wall time", f"{summary.wall_seconds:.1f} s")
    table.add_row("restarts", str(view.restarts))
    if progress and progress.in_place_restarts:
        table.add_row("in-place restarts (this generation)", str(progress.in_place_restarts))
    table.add_row("checkpoints", ", ".join(summary.checkpoints) or "none")
    if plan:
        predicted = predicted_stage_seconds(plan)
        measured = progress.stage_step_seconds if progress else {}
        for stage, pools in sorted(stage_pools(plan).items()):
            table.add_row(
                escape(f"stage {stage} step time{sim} [{pools}]"),
                f"predicted {_seconds(predicted.get(stage))} s / "
                f"measured {_seconds(measured.get(stage))} s",
            )
    return table


def plot_history(
    records: Sequence[Mapping[str, float]], path: Path, *, job: str, simulated: bool
) -> Path | None:
    """Loss and tokens/s against step, saved as a PNG; None when there is nothing to plot."""
    points = [r for r in records if r.get("loss") is not None]
    if not points:
        return None
    steps = [p["step"] for p in points]
    figure, loss_axis = plt.subplots(figsize=(8, 4.5))
    try:
        loss_axis.plot(steps, [p["loss"] for p in points], color="tab:blue")
        loss_axis.set_xlabel("step")
        loss_axis.set_ylabel("loss", color="tab:blue")
        rate_axis = loss_axis.twinx()
        rate_axis.plot(
            steps, [p.get("tokens_per_s", 0.0) for p in points], color="tab:orange", alpha=0.7
        )
        rate_axis.set_ylabel(
            "tokens/s (simulated grades)" if simulated else "tokens/s", color="tab:orange"
        )
        loss_axis.set_title(f"hetmoe run {job}")
        figure.tight_layout()
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
    finally:
        plt.close(figure)
    return path
