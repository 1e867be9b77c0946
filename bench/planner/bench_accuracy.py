"""Cost-model accuracy (issue 4, benchmark item 6): predicted vs measured CPU step time.

Run from the repository root:

    .venv/bin/python bench/planner/bench_accuracy.py [--runs 3] [--steps 14]
        [--json bench/planner/accuracy.json]

1. Profiles this CPU once with ``hetmoe profile``'s measurement (the tiny preset,
   one thread: what each torchrun worker gets; CPU time, so the machine's other
   tenants do not distort it).
2. For each layout (dp1, dp2, dp2 with ep2, pp2 with the planner's uneven split,
   pp2 x dp2), writes a one-pool local cluster whose grade carries the profile's
   throughput shared by that layout's processes (``cores / processes`` each when the
   processes outnumber the cores), plans the job with the layout pinned, and runs it
   for real with ``hetmoe run`` (local mode, OMP_NUM_THREADS=1 as in the profile).
   The profile includes gloo collective latency and bandwidth between two local
   processes; the plan uses them (latencies in the cost model's assumptions,
   bandwidth as the grade's link speed).
3. Before each run, measures the cores the machine's other tenants leave free (busy
   processes' CPU over wall time) and also predicts the same layout with the
   profile shared over those instead of all cores ("predicted@free").
4. Prints predicted vs measured step time (median over the steps after warm-up of
   every run, then the median of the runs; and the fastest step of all runs, the
   least disturbed like the profile's fastest repetition), ratios and load averages.

The machine is shared: every figure comes with ``uptime``'s load average. A failed
run's worker logs are copied to a kept ``hetmoe-accuracy-failed-*`` directory under
the system temp directory, whose path is printed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from hetmoe_operator.api.catalog import DeviceCatalog, DeviceGrade
from hetmoe_operator.api.cluster import ClusterDescription, NodePool
from hetmoe_operator.api.job import PlacementSpec
from hetmoe_operator.api.model import PRESETS
from hetmoe_operator.api.training import TrainingConfig
from hetmoe_operator.cli.profile_command import make_profile
from hetmoe_operator.placement.build import build_plan
from hetmoe_operator.placement.checks import check_inputs
from hetmoe_operator.placement.cost_model import Assumptions
from hetmoe_operator.placement.layout import Layout, Problem, evaluate
from hetmoe_operator.placement.planner import expert_loads
from hetmoe_operator.placement.profile import (
    DeviceProfile,
    assumptions_with_communication,
    grade_with_communication,
    shared_throughput,
)
from hetmoe_operator.placement.search import Searcher
from hetmoe_operator.plan import Plan

REPO = Path(__file__).resolve().parents[2]
HETMOE = [
    sys.executable,
    "-c",
    "import sys; from hetmoe_operator.cli.main import main; sys.exit(main())",
]
"""The ``hetmoe`` CLI in this interpreter (independent of the console script)."""
LAYOUTS: dict[str, dict[str, int]] = {
    "dp1": {"pipelineParallel": 1, "dataParallel": 1, "expertParallel": 1},
    "dp2": {"pipelineParallel": 1, "dataParallel": 2, "expertParallel": 1},
    "dp2 ep2": {"pipelineParallel": 1, "dataParallel": 2, "expertParallel": 2},
    "pp2 (uneven split)": {"pipelineParallel": 2, "dataParallel": 1, "expertParallel": 1},
    "pp2 x dp2": {"pipelineParallel": 2, "dataParallel": 2, "expertParallel": 1},
}
WARMUP_STEPS = 3


def load_average() -> tuple[float, float, float]:
    return os.getloadavg()


def _spin(seconds: float) -> float:
    wall, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - wall < seconds:
        pass
    return (time.process_time() - cpu) / (time.perf_counter() - wall)


def free_cores(cores: int, seconds: float = 1.0) -> float:
    """Cores a job gets right now: ``cores`` busy processes for ``seconds``, summing
    their CPU over wall time (the machine's other tenants take the rest). The
    profile's CPU seconds assume a core of one's own; this is what is left of them."""
    with multiprocessing.Pool(cores) as pool:
        return sum(pool.map(_spin, [seconds] * cores))


def cluster_for(
    profile: DeviceProfile, devices: int, cores: float | None = None
) -> ClusterDescription:
    grade = DeviceGrade(
        name="cpu",
        description="this machine's CPU, measured by hetmoe profile",
        peak_bf16_tflops=1.0,
        memory_gib=4,
        price_per_hour=0,
        intra_node_gbps=10.0,
        inter_node_gbps=10.0,
        measured=shared_throughput(profile, devices, cores),
    )
    if profile.communication is not None:
        grade = grade_with_communication(grade, profile.communication)
    return ClusterDescription(
        catalog=DeviceCatalog(grades=[grade], cross_pool_gbps=10.0),
        pools=[NodePool(name="cpu", grade="cpu", nodes=1, devices_per_node=devices)],
    )


def problem_for(
    profile: DeviceProfile, training: TrainingConfig, cluster: ClusterDescription
) -> Problem:
    """The planner's inputs with the profile's measured collective latencies in the
    cost model's assumptions (``plan_job`` itself always uses the defaults)."""
    assumptions = Assumptions()
    if profile.communication is not None:
        assumptions = assumptions_with_communication(profile.communication, assumptions)
    model = PRESETS["tiny"]
    return Problem(model, training, cluster, expert_loads(model, None), assumptions)


def plan_measured(
    profile: DeviceProfile,
    training: TrainingConfig,
    cluster: ClusterDescription,
    spec: PlacementSpec,
    name: str,
) -> tuple[Plan, Layout]:
    """``plan_job`` on :func:`problem_for`'s inputs, and the chosen layout."""
    problem = problem_for(profile, training, cluster)
    check_inputs(problem, spec)
    searcher = Searcher(problem, spec, None)
    searcher.run(float("inf"))
    assert searcher.best is not None, f"no plan for {name}"
    best = searcher.best
    return build_plan(problem, best.layout, best.evaluation, spec, name), best.layout


def job_manifest(name: str, pins: dict[str, int], steps: int, batch: int, seq: int) -> dict:
    return {
        "apiVersion": "hetmoe.io/v1alpha1",
        "kind": "MoEJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"preset": "tiny"},
            "training": {
                "steps": steps,
                "globalBatchSize": batch,
                "sequenceLength": seq,
                "seed": 1234,
                "data": {"kind": "synthetic"},
            },
            "placement": pins,
            "checkpoint": {
                "volume": {"persistentVolumeClaim": f"{name}-checkpoints"},
                "intervalSteps": 10 * steps,
                "keep": 1,
            },
        },
    }


class RunFailed(RuntimeError):
    """A real run exited non-zero; its run directory and output were kept."""


def run_once(
    job: Path, cluster: Path, run_dir: Path, kept: Path
) -> tuple[list[float], dict[str, float]]:
    """Step seconds after warm-up and the last per-stage step times of one real run.

    A failed run's directory (worker logs, checkpoints) and its output are copied to
    ``kept`` (outside the temporary directory) before raising RunFailed."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*HETMOE, "run", "-f", str(job), "--cluster", str(cluster), "--run-dir", str(run_dir)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        target = kept / run_dir.name
        if run_dir.exists():
            shutil.copytree(run_dir, target, dirs_exist_ok=True)
        target.mkdir(parents=True, exist_ok=True)
        (target / "hetmoe-run.stdout").write_text(done.stdout)
        (target / "hetmoe-run.stderr").write_text(done.stderr)
        raise RunFailed(
            f"hetmoe run failed ({done.returncode}); logs kept in {target}\n{done.stderr[-2000:]}"
        )
    log = run_dir / "checkpoints/train_log.jsonl"
    records = {}
    for line in log.read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record
    seconds = [r["seconds"] for step, r in sorted(records.items()) if step > WARMUP_STEPS]
    progress = json.loads((run_dir / "checkpoints/progress.json").read_text())
    return seconds, {k: float(v) for k, v in (progress.get("stage_step_seconds") or {}).items()}


def predicted_stages(plan: Plan) -> dict[str, float]:
    assert plan.prediction is not None
    result: dict[str, float] = {}
    for entry in plan.prediction.stages:
        key = str(entry.stage)
        result[key] = max(result.get(key, 0.0), entry.step_seconds)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--microbatch-size", type=int, default=1, help="for the profile")
    parser.add_argument("--repeats", type=int, default=20, help="profile repetitions")
    parser.add_argument("--only", nargs="*", help="layout names to run")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    profile_load = load_average()
    profile = make_profile("tiny", args.seq, args.microbatch_size, 1, args.repeats)
    print(f"# profile at load {profile_load}:", flush=True)
    print(yaml.safe_dump(profile.throughput.to_wire(), sort_keys=False), flush=True)
    report: dict[str, Any] = {"profile": profile.to_wire(), "load_at_profile": profile_load}
    training = TrainingConfig(
        steps=args.steps, global_batch_size=args.batch, sequence_length=args.seq
    )
    rows = []
    layouts: dict[str, Any] = {}
    kept = Path(tempfile.mkdtemp(prefix="hetmoe-accuracy-failed-"))
    failures: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="hetmoe-accuracy-") as tmp:
        for index, (name, pins) in enumerate(LAYOUTS.items()):
            if args.only and name not in args.only:
                continue
            devices = pins["pipelineParallel"] * pins["dataParallel"]
            cluster = cluster_for(profile, devices)
            spec = PlacementSpec.model_validate(pins)
            plan, layout = plan_measured(profile, training, cluster, spec, f"acc{index}")
            assert plan.prediction is not None
            cluster_file = Path(tmp) / f"cluster{index}.yaml"
            cluster_file.write_text(yaml.safe_dump(cluster.to_wire(), sort_keys=False))
            job_file = Path(tmp) / f"job{index}.yaml"
            manifest = job_manifest(f"acc{index}", pins, args.steps, args.batch, args.seq)
            job_file.write_text(yaml.safe_dump(manifest, sort_keys=False))
            medians, fastest, loads, stages, free = [], [], [], {}, []
            for run in range(args.runs):
                loads.append(load_average())
                free.append(free_cores(profile.cores))
                try:
                    seconds, stages = run_once(
                        job_file, cluster_file, Path(tmp) / f"run{index}-{run}", kept
                    )
                except RunFailed as error:
                    failures[f"{name} run {run}"] = str(error).splitlines()[0]
                    print(f"{name} run {run}: {error}", flush=True)
                    break  # deterministic so far (e.g. a plan the trainer rejects)
                medians.append(statistics.median(seconds))
                fastest.append(min(seconds))
            if not medians:
                continue
            measured = statistics.median(medians)
            best = min(fastest)
            predicted = plan.prediction.step_time.total
            cores_free = statistics.median(free)
            shared = cluster_for(profile, devices, cores_free)
            adjusted = evaluate(problem_for(profile, training, shared), layout).step.total
            layouts[name] = {
                "devices": devices,
                "degrees": plan.parallel.to_wire(),
                "stage_layers": [[s.layer_start, s.layer_end] for s in plan.stages],
                "microbatch_size": plan.replicas[0].microbatch_size,
                "predicted_step_s": predicted,
                "predicted_breakdown_s": plan.prediction.step_time.to_wire(),
                "measured_step_s_per_run": medians,
                "measured_step_s": measured,
                "ratio_measured_over_predicted": measured / predicted,
                "fastest_step_s": best,
                "ratio_fastest_over_predicted": best / predicted,
                "predicted_stage_s": predicted_stages(plan),
                "measured_stage_s_last_run": stages,
                "load_average_per_run": loads,
                "free_cores_per_run": free,
                "predicted_at_free_cores_s": adjusted,
                "ratio_measured_over_predicted_at_free_cores": measured / adjusted,
            }
            rows.append(
                [
                    name,
                    str(devices),
                    ",".join(f"{s.layer_start}-{s.layer_end}" for s in plan.stages),
                    str(plan.replicas[0].microbatch_size),
                    f"{predicted:.3f}",
                    f"{measured:.3f}",
                    f"{measured / predicted:.2f}",
                    f"{best:.3f}",
                    f"{best / predicted:.2f}",
                    f"{cores_free:.2f}",
                    f"{adjusted:.3f}",
                    f"{measured / adjusted:.2f}",
                    "/".join(f"{load[0]:.1f}" for load in loads),
                ]
            )
            print(f"{name}: predicted {predicted:.3f} s, measured {measured:.3f} s", flush=True)
    if failures:
        print(f"\n# {len(failures)} failed run(s); worker logs kept in {kept}")
    else:
        kept.rmdir()
    report["failures"] = failures
    headers = [
        "layout",
        "procs",
        "stages",
        "mb size",
        "predicted s",
        "measured median s",
        "ratio",
        "fastest step s",
        "ratio",
        "free cores",
        "predicted@free s",
        "ratio",
        "load (per run)",
    ]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    print("\n## 6. predicted vs measured step time (tiny, CPU, median of runs)")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))
    ratios = [v["ratio_measured_over_predicted"] for v in layouts.values()]
    report["layouts"] = layouts
    report["median_within_15_percent"] = sum(abs(r - 1) <= 0.15 for r in ratios)
    fastest = [v["ratio_fastest_over_predicted"] for v in layouts.values()]
    report["fastest_within_15_percent"] = sum(abs(r - 1) <= 0.15 for r in fastest)
    report["layouts_run"] = len(ratios)
    at_free = [v["ratio_measured_over_predicted_at_free_cores"] for v in layouts.values()]
    report["at_free_cores_within_15_percent"] = sum(abs(r - 1) <= 0.15 for r in at_free)
    text = json.dumps(report, indent=1)
    print("\n## JSON\n" + text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
