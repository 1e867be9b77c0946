"""Step time of one pp=2 job under each pipeline schedule the trainer runs.

    python bench/trainer/bench_schedules.py [--rounds 3] [--seq 64] [--microbatches 4]

The tiny preset, pp=2, one replica, two forked gloo processes (one thread each). Each
round runs 1F1B, interleaved 1F1B (v=2), ZB-H1, ZB1P (v=2) and ZB-V back to back, so
every schedule sees the same minute of this shared machine; the figure is the median
over rounds of each run's median step (warm-up steps dropped), and the ratio is
against 1F1B. The planner assumes a GPU-like backward split (weight gradients cost
half the backward, no overhead): this shows what the split costs on CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "trainer" / "runtime"))

from plan_factory import make_plan  # noqa: E402

from conftest import records, run_forked  # noqa: E402

STEPS = 12
WARMUP_STEPS = 2
SCHEDULES: dict[str, dict[str, Any]] = {
    "1F1B": {},
    "interleaved 1F1B": {"virtual_stages": 2},
    "ZB-H1": {"split_backward": True},
    "ZB1P": {"virtual_stages": 2, "split_backward": True},
    "ZB-V": {"virtual_stages": 2, "pipeline_shape": "v"},
}


def load_average() -> float:
    return float(Path("/proc/loadavg").read_text().split()[0])


def median_step(layout: dict[str, Any], seq: int, microbatches: int, workdir: Path) -> float:
    plan = make_plan(pp=2, steps=STEPS, sequence_length=seq, replicas=[(2, microbatches)], **layout)
    codes = run_forked(plan, workdir, checkpoint_interval=1000)
    if codes != [0, 0]:
        raise RuntimeError(f"{layout}: worker exit codes {codes}")
    return statistics.median(r["seconds"] for r in records(workdir)[WARMUP_STEPS:])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--microbatches", type=int, default=4)
    args = parser.parse_args()
    loads = [load_average()]
    steps: dict[str, list[float]] = {name: [] for name in SCHEDULES}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name, layout in SCHEDULES.items():
                workdir = Path(tmp) / f"{round_}-{name.replace(' ', '-')}"
                steps[name].append(median_step(layout, args.seq, args.microbatches, workdir))
    loads.append(load_average())
    base = statistics.median(steps["1F1B"])
    print(
        f"schedule          step (ms)  vs 1F1B  (seq {args.seq}, {args.microbatches} microbatches)"
    )
    for name, values in steps.items():
        median = statistics.median(values)
        print(f"{name:<17} {median * 1000:9.1f}  {median / base:6.2f}x")
    print(f"load average (1 min) {loads[0]:.1f} -> {loads[1]:.1f}")
    result = {
        "sequence_length": args.seq,
        "microbatches": args.microbatches,
        "rounds": args.rounds,
        "median_step_s": {name: statistics.median(v) for name, v in steps.items()},
        "per_round_step_s": steps,
        "load_average_1m": loads,
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
