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
3. Prints predicted vs measured step time (median over the steps after warm-up of
   every run, then the median of the runs; and the fastest step of all runs, the
   least disturbed like the profile's fastest repetition), ratios and load averages.

The machine is shared: every figure comes with ``uptime``'s load average.
"""

from __future__ import annotations

import argparse
import json
import os
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
from hetmoe_operator.cli.profile_command import make_profile
from hetmoe_operator.placement import plan_job
from hetmoe_operator.placement.profile import DeviceProfile, shared_throughput
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


def cluster_for(profile: DeviceProfile, devices: int) -> ClusterDescription:
    grade = DeviceGrade(
        name="cpu",
        description="this machine's CPU, measured by hetmoe profile",
        peak_bf16_tflops=1.0,
        memory_gib=4,
        price_per_hour=0,
        intra_node_gbps=10.0,
        inter_node_gbps=10.0,
        measured=shared_throughput(profile, devices),
    )
    return ClusterDescription(
        catalog=DeviceCatalog(grades=[grade], cross_pool_gbps=10.0),
        pools=[NodePool(name="cpu", grade="cpu", nodes=1, devices_per_node=devices)],
    )


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


def run_once(job: Path, cluster: Path, run_dir: Path) -> tuple[list[float], dict[str, float]]:
    """Step seconds after warm-up and the last per-stage step times of one real run."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*HETMOE, "run", "-f", str(job), "--cluster", str(cluster), "--run-dir", str(run_dir)],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode:
        raise RuntimeError(f"hetmoe run failed ({done.returncode}):\n{done.stderr[-3000:]}")
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
    with tempfile.TemporaryDirectory(prefix="hetmoe-accuracy-") as tmp:
        for index, (name, pins) in enumerate(LAYOUTS.items()):
            if args.only and name not in args.only:
                continue
            devices = pins["pipelineParallel"] * pins["dataParallel"]
            cluster = cluster_for(profile, devices)
            spec = PlacementSpec.model_validate(pins)
            plan = plan_job(PRESETS["tiny"], training, cluster, spec, job_name=f"acc{index}")
            assert plan.prediction is not None
            cluster_file = Path(tmp) / f"cluster{index}.yaml"
            cluster_file.write_text(yaml.safe_dump(cluster.to_wire(), sort_keys=False))
            job_file = Path(tmp) / f"job{index}.yaml"
            manifest = job_manifest(f"acc{index}", pins, args.steps, args.batch, args.seq)
            job_file.write_text(yaml.safe_dump(manifest, sort_keys=False))
            medians, fastest, loads, stages = [], [], [], {}
            for run in range(args.runs):
                loads.append(load_average())
                seconds, stages = run_once(job_file, cluster_file, Path(tmp) / f"run{index}-{run}")
                medians.append(statistics.median(seconds))
                fastest.append(min(seconds))
            measured = statistics.median(medians)
            best = min(fastest)
            predicted = plan.prediction.step_time.total
            layouts[name] = {
                "devices": devices,
                "degrees": plan.parallel.to_wire(),
                "stage_layers": [[s.layer_start, s.layer_end] for s in plan.stages],
                "microbatch_size": plan.replicas[0].microbatch_size,
                "predicted_step_s": predicted,
                "measured_step_s_per_run": medians,
                "measured_step_s": measured,
                "ratio_measured_over_predicted": measured / predicted,
                "fastest_step_s": best,
                "ratio_fastest_over_predicted": best / predicted,
                "predicted_stage_s": predicted_stages(plan),
                "measured_stage_s_last_run": stages,
                "load_average_per_run": loads,
            }
            rows.append(
                [
                    name,
                    str(devices),
                    ",".join(f"{s.layer_start}-{s.layer_end}" for s in plan.stages),
                    f"{predicted:.3f}",
                    f"{measured:.3f}",
                    f"{measured / predicted:.2f}",
                    f"{best:.3f}",
                    f"{best / predicted:.2f}",
                    "/".join(f"{load[0]:.1f}" for load in loads),
                ]
            )
            print(f"{name}: predicted {predicted:.3f} s, measured {measured:.3f} s", flush=True)
    headers = [
        "layout",
        "procs",
        "stages",
        "predicted s",
        "measured median s",
        "ratio",
        "fastest step s",
        "ratio",
        "load (per run)",
    ]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
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
    text = json.dumps(report, indent=1)
    print("\n## JSON\n" + text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
