"""Cost-model accuracy (issue 4, benchmark item 6): predicted vs measured CPU step time.

Run from the repository root:

    .venv/bin/python bench/planner/bench_accuracy.py [--runs 3] [--steps 14]
        [--json bench/planner/accuracy.json]

1. Profiles this CPU once with ``hetmoe profile``'s measurement (the tiny preset,
   one thread: what each torchrun worker gets; CPU time, so the machine's other
   tenants do not distort it). The profile times the operation classes and the
   trainer's real one-process step, and scales the classes to that step; the
   multi-process layouts then test whether the calibrated model generalises.
2. For each layout (dp1, dp2, dp2 with ep2, pp2 with the planner's uneven split,
   pp2 x dp2), writes a one-pool local cluster whose grade carries the profile's
   throughput shared by that layout's processes (``cores / processes`` each when the
   processes outnumber the cores; the cores are those two co-scheduled workers got
   in the profile when fewer than the machine's), plans the job with the layout
   pinned, and runs it for real with ``hetmoe run`` (local mode, OMP_NUM_THREADS=1
   as in the profile).
   The profile includes gloo collective latency and bandwidth between two local
   processes; the plan uses them (latencies in the cost model's assumptions,
   bandwidth as the grade's link speed).
3. Before each run, repeats the profile's co-scheduling probe (two workers
   alternating compute and an all-reduce: the cores they get between them) and also
   predicts the same layout with those cores instead of the profile's
   ("predicted@free"; a single worker keeps a core of its own, as in the profile).
4. Also predicts each layout from the operation classes alone with every core free,
   as profiles did before they timed a real step and co-scheduled workers ("classes
   only"), for a before/after in one run.
5. Checks that ``hetmoe run`` ran the predicted plan (it plans again, with the cost
   model's default assumptions): stage split, virtual stages and microbatching.
6. Prints predicted vs measured step time (median over the steps after warm-up of
   every run, then the median of the runs; and the fastest step of all runs, the
   least disturbed like the profile's fastest repetition), ratios and load averages.

The machine is shared: every figure comes with ``uptime``'s load average. A failed
run's worker logs are copied to a kept ``hetmoe-accuracy-failed-*`` directory under
the system temp directory, whose path is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from hetmoe_operator.api.catalog import DeviceCatalog, DeviceGrade
from hetmoe_operator.api.cluster import ClusterDescription, NodePool
from hetmoe_operator.api.job import PlacementSpec
from hetmoe_operator.api.model import PRESETS
from hetmoe_operator.api.training import TrainingConfig
from hetmoe_operator.cli.profile_command import make_profile, measure_communication
from hetmoe_operator.placement.build import build_plan
from hetmoe_operator.placement.checks import check_inputs
from hetmoe_operator.placement.cost_model import Assumptions
from hetmoe_operator.placement.layout import Layout, Problem, evaluate
from hetmoe_operator.placement.planner import expert_loads
from hetmoe_operator.placement.profile import (
    DeviceProfile,
    assumptions_with_profile,
    grade_with_communication,
    shared_throughput,
    throughput_from_seconds,
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


def co_scheduled_cores() -> float:
    """Cores two workers alternating compute and an all-reduce get right now: the
    profile's own probe (``hetmoe profile``'s ``concurrentCores``), repeated before
    each run because the machine's other tenants come and go."""
    communication = measure_communication(10)
    assert communication.concurrent_cores is not None
    return communication.concurrent_cores


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


def classes_only(profile: DeviceProfile) -> DeviceProfile:
    """``profile`` as profiles were before they timed a real step and co-scheduled
    workers: the operation classes as timed, every core assumed free."""
    seconds = profile.seconds.model_copy(update={"step": None})
    throughput = throughput_from_seconds(
        profile.model, profile.sequence_length, seconds, profile.throughput.source
    )
    communication = profile.communication
    if communication is not None:
        communication = communication.model_copy(update={"concurrent_cores": None})
    return profile.model_copy(
        update={"seconds": seconds, "throughput": throughput, "communication": communication}
    )


def problem_for(
    profile: DeviceProfile,
    training: TrainingConfig,
    cluster: ClusterDescription,
    processes: int,
    cores: float | None = None,
) -> Problem:
    """The planner's inputs with the profile's measured collective latencies and
    per-step fixed seconds (shared like the throughput by ``processes`` on ``cores``)
    in the cost model's assumptions (``plan_job`` itself always uses the defaults)."""
    assumptions = assumptions_with_profile(profile, processes, cores, Assumptions())
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
    problem = problem_for(profile, training, cluster, sum(p.devices for p in cluster.pools))
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


def plan_shape(plan: Plan) -> dict[str, Any]:
    """What decides a plan's step time besides the degrees: stage split, virtual stages
    and microbatching."""
    return {
        "stage_layers": [[s.layer_start, s.layer_end] for s in plan.stages],
        "virtual_stages": plan.virtual_stages,
        "microbatch_size": plan.replicas[0].microbatch_size,
        "microbatches": [r.num_microbatches for r in plan.replicas],
    }


def run_plan(run_dir: Path) -> Plan | None:
    """The plan ``hetmoe run`` planned and ran (its plan ConfigMap), if found. It plans
    with the cost model's default assumptions, not the profile's latencies and
    per-step seconds, so its split or microbatching can differ from the predicted plan."""
    for path in sorted(run_dir.glob("configmaps/*/plan.json")):
        return Plan.from_json(path.read_text())
    return None


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
            ran: Plan | None = None
            for run in range(args.runs):
                loads.append(load_average())
                free.append(co_scheduled_cores())
                try:
                    seconds, stages = run_once(
                        job_file, cluster_file, Path(tmp) / f"run{index}-{run}", kept
                    )
                except RunFailed as error:
                    failures[f"{name} run {run}"] = str(error).splitlines()[0]
                    print(f"{name} run {run}: {error}", flush=True)
                    break  # deterministic so far (e.g. a plan the trainer rejects)
                ran = run_plan(Path(tmp) / f"run{index}-{run}")
                medians.append(statistics.median(seconds))
                fastest.append(min(seconds))
            if not medians:
                continue
            measured = statistics.median(medians)
            best = min(fastest)
            predicted = plan.prediction.step_time.total
            cores_free = statistics.median(free)
            now = cores_free if devices > 1 else None
            shared = cluster_for(profile, devices, now)
            adjusted = evaluate(
                problem_for(profile, training, shared, devices, now), layout
            ).step.total
            bare = classes_only(profile)
            before = evaluate(
                problem_for(bare, training, cluster_for(bare, devices), devices), layout
            ).step.total
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
                "co_scheduled_cores_per_run": free,
                "predicted_at_free_cores_s": adjusted,
                "ratio_measured_over_predicted_at_free_cores": measured / adjusted,
                "predicted_plan": plan_shape(plan),
                "run_plan": plan_shape(ran) if ran is not None else None,
                "run_plan_matches": ran is not None and plan_shape(ran) == plan_shape(plan),
                "predicted_classes_only_s": before,
                "ratio_measured_over_predicted_classes_only": measured / before,
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
                    f"{before:.3f}",
                    f"{measured / before:.2f}",
                    "yes" if ran is not None and plan_shape(ran) == plan_shape(plan) else "NO",
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
        "co-sched. cores",
        "predicted@free s",
        "ratio",
        "classes only s",
        "ratio",
        "run = predicted plan",
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
    bare = [v["ratio_measured_over_predicted_classes_only"] for v in layouts.values()]
    report["classes_only_within_15_percent"] = sum(abs(r - 1) <= 0.15 for r in bare)
    text = json.dumps(report, indent=1)
    print("\n## JSON\n" + text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
