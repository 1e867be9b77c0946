"""``hetmoe run``: train a MoEJob on this machine, with processes instead of pods.

The job is planned over a local cluster file (pools of simulated grades), and the
operator's own builders and reconcile decisions run it; see
:mod:`hetmoe_operator.local`. Ctrl-C stops every worker and keeps the checkpoints;
the same command resumes.
"""

from __future__ import annotations

import argparse
import re
import shutil
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, cast, get_args

from rich.console import Console

from hetmoe_operator.api.manifests import load_cluster, load_job
from hetmoe_operator.errors import UserError
from hetmoe_operator.local.display import Display
from hetmoe_operator.local.executor import simulated_slowdowns
from hetmoe_operator.local.summary import PLOT_FILE, RunSummary, plot_history, summary_table
from hetmoe_operator.local.supervisor import FaultInjection, FaultKind, Supervisor
from hetmoe_operator.local.telemetry import latest_checkpoint, list_checkpoints, read_train_log
from hetmoe_operator.plan import Plan

DEFAULT_CLUSTER = Path("examples/clusters/local.yaml")
RUN_DIR_ENTRIES = frozenset({"checkpoints", "configmaps", "logs", "pods", "prometheus", PLOT_FILE})
"""What a run directory holds: the checkpoint volume, the plan ConfigMap, worker logs,
emptyDir volumes, Prometheus targets and the plot."""
FAULT_SYNTAX = "[kind=crash|hang|slow,]rank=R,step=S[,seconds=X]"
"""What ``--inject-fault`` accepts; ``seconds`` only with ``kind=slow``."""


def register(subparsers: Any) -> None:
    """Add the ``run`` sub-command."""
    parser = subparsers.add_parser(
        "run",
        help="train a MoEJob on this machine (local mode)",
        description="Train a MoEJob on this machine, with processes instead of pods.",
    )
    parser.add_argument("-f", "--file", required=True, type=Path, help="MoEJob manifest")
    parser.add_argument(
        "--cluster",
        type=Path,
        help="local cluster file (default: clusters/local.yaml next to the manifest, "
        f"else {DEFAULT_CLUSTER})",
    )
    parser.add_argument(
        "--run-dir", type=Path, help="checkpoints, logs and plot (default: runs/<job>)"
    )
    parser.add_argument(
        "--inject-fault",
        metavar=FAULT_SYNTAX,
        help="crash plan rank R at step S, once, to watch an elastic restart; kind=hang "
        "blocks it instead, until the hang watchdog (elastic.hangTimeoutSeconds) fires; "
        "kind=slow delays each of its steps from S on by X seconds (default 1) in the "
        "first generation, until the straggler check "
        "(training.anomaly.stragglerPatience) replaces its node",
    )
    parser.add_argument(
        "--fresh", action="store_true", help="delete the run directory first (no resume)"
    )
    parser.set_defaults(handler=run)


def parse_fault(text: str) -> FaultInjection:
    """:data:`FAULT_SYNTAX` (any order) into a fault; anything else is a UserError."""
    items = [part.partition("=")[::2] for part in text.split(",")]
    parts = dict(items)
    kind = parts.pop("kind", "crash")
    seconds = parts.pop("seconds", "1") if kind == "slow" else "1"
    if (
        len(set(key for key, _ in items)) != len(items)  # a key given twice
        or sorted(parts) != ["rank", "step"]
        or kind not in get_args(FaultKind)
        or not all(re.fullmatch(r"\d+", v) for v in parts.values())
        or not re.fullmatch(r"\d+(\.\d*)?", seconds)
    ):
        raise UserError(
            f"--inject-fault {text!r}: expected {FAULT_SYNTAX} with whole numbers "
            "(seconds may have decimals)"
        )
    return FaultInjection(
        rank=int(parts["rank"]),
        step=int(parts["step"]),
        kind=cast(FaultKind, kind),
        seconds=float(seconds),
    )


def cluster_file(job_file: Path, explicit: Path | None) -> Path:
    """The cluster file to plan over (see ``--cluster``)."""
    if explicit is not None:
        return explicit
    for candidate in (job_file.parent / "clusters" / "local.yaml", DEFAULT_CLUSTER):
        if candidate.is_file():
            return candidate
    raise UserError(
        f"no local cluster file next to {job_file} or at {DEFAULT_CLUSTER}; pass --cluster FILE"
    )


def clear_run_dir(run_dir: Path) -> None:
    """Delete a previous run's directory, refusing one that holds anything else.

    ``--fresh`` with a mistyped ``--run-dir`` (``.``, a home directory) must not
    delete a user's files.
    """
    if not run_dir.exists():
        return
    foreign = sorted(p.name for p in run_dir.iterdir() if p.name not in RUN_DIR_ENTRIES)
    if foreign:
        raise UserError(
            f"--fresh: {run_dir} holds files hetmoe run did not create "
            f"({', '.join(foreign[:5])}); remove it yourself or choose another --run-dir"
        )
    shutil.rmtree(run_dir)


def describe_plan(plan: Plan, slowdowns: Mapping[str, float]) -> str:
    """Degrees, ranks per pool, how the batch is split by speed, and the simulation."""
    per_pool: dict[str, int] = {}
    for rank in plan.ranks:
        key = f"{rank.pool}/{rank.grade}"
        per_pool[key] = per_pool.get(key, 0) + 1
    pools = ", ".join(f"{key} x{n}" for key, n in per_pool.items())
    degrees = plan.parallel
    lines = [f"plan: pp={degrees.pp} dp={degrees.dp} ep={degrees.ep} on {pools}"]
    if plan.prediction:
        lines[0] += f"; predicted {plan.prediction.tokens_per_s:,.0f} tokens/s (simulated grades)"
    first_pool = {r.dp_index: r.pool for r in reversed(plan.ranks)}
    split = ", ".join(
        f"replica {r.dp_index} ({first_pool[r.dp_index]}) {r.samples_per_step}"
        for r in plan.replicas
    )
    lines.append(f"samples per step, split by speed: {split}")
    factors = ", ".join(f"{pool} {factor:g}x" for pool, factor in sorted(slowdowns.items()))
    lines.append(f"simulated slowdown per pool: {factors}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Run the job; 0 when it Succeeded, 1 when it Failed, 130 when stopped by a signal."""
    job = load_job(args.file)
    cluster = load_cluster(cluster_file(args.file, args.cluster))
    fault = parse_fault(args.inject_fault) if args.inject_fault else None
    run_dir = (args.run_dir or Path("runs") / job.metadata.name).resolve()
    if args.fresh:
        clear_run_dir(run_dir)
    supervisor = Supervisor(job, cluster, run_dir, fault=fault)
    print(describe_plan(supervisor.preflight(), simulated_slowdowns(cluster)), flush=True)
    print(f"run directory: {run_dir} (worker logs in logs/)", flush=True)
    resume_from = latest_checkpoint(supervisor.checkpoint_dir)
    if resume_from:
        print(f"resuming from checkpoint {resume_from} (--fresh starts over)", flush=True)
    started = time.monotonic()
    interrupted = False
    try:
        with Display() as display:
            supervisor.run(lambda s: display.update(s.view()), on_stop=_announce_stop)
    except KeyboardInterrupt:
        interrupted = True
    view = supervisor.view()
    console = Console()
    console.print(
        summary_table(
            RunSummary(
                view, time.monotonic() - started, list_checkpoints(supervisor.checkpoint_dir)
            )
        )
    )
    plot = plot_history(
        read_train_log(supervisor.checkpoint_dir),
        run_dir / PLOT_FILE,
        job=view.job,
        simulated=view.simulated,
    )
    if plot:
        print(f"plot: {plot}")
    if interrupted:
        saved = latest_checkpoint(supervisor.checkpoint_dir)
        print(
            "hetmoe: stopped; every worker is gone and the checkpoints are kept"
            + (f" (latest: {saved})" if saved else "")
            + ": run the same command again to resume",
            file=sys.stderr,
        )
        return 130
    if view.phase != "Succeeded":
        print(f"hetmoe: job {view.job} {view.phase}: {_failure(supervisor)}", file=sys.stderr)
        print(f"hetmoe: worker logs are in {run_dir / 'logs'}", file=sys.stderr)
        return 1
    return 0


def _announce_stop() -> None:
    print(
        "hetmoe: stopping: the workers finish their step and save a checkpoint "
        "(Ctrl-C again to stop them now)",
        file=sys.stderr,
        flush=True,
    )


def _failure(supervisor: Supervisor) -> str:
    """The Failed condition's message (what to change), or the last event."""
    for condition in supervisor.status.conditions:
        if condition.type == "Failed" and condition.status == "True":
            return condition.message
    return supervisor.events[-1] if supervisor.events else "no message"
