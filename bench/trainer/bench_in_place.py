"""Failure to first resumed step: in-place restart vs a new generation, in local mode.

``hetmoe run`` trains the tiny example (16 steps, a checkpoint every 5, no backoff) and
crashes plan rank 1 at step 8 (``--inject-fault rank=1,step=8``), once with
``elastic.inPlaceRestarts: 1`` (torchrun restarts the gang inside its pods) and once
without (the operator's decisions stop every pod and start generation 2). With
``--fault pod`` the second pod is lost instead (its agent and workers SIGKILLed once
rank 0 reported step 7): with the setting the operator replaces that pod alone and the
first pod's workers restart in place to take it in; without it, generation 2. The figure
is the wall time from the last step logged before the crash to the first step logged
after it, read from ``train_log.jsonl``: failure detection, stopping the survivors,
starting new worker processes (interpreter and torch import), rendezvous, process
groups, checkpoint load and one step. Rounds alternate the two modes, so each ratio
compares runs minutes apart on the same machine; the table gives medians.

Local mode has no scheduler, kubelet or image pull: on a cluster a new generation also
waits for pod deletion, scheduling and container start, which in-place restarts skip,
so these ratios understate the difference there.

    python bench/trainer/bench_in_place.py [--rounds 3] [--fault crash|pod] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
TINY_JOB = REPO / "examples" / "moejob-tiny.yaml"
LOCAL_CLUSTER = REPO / "examples" / "clusters" / "local.yaml"
CRASH = "rank=1,step=8"
MODES = {"in place": 1, "new generation": 0}


def write_job(directory: Path, in_place_restarts: int) -> Path:
    manifest = yaml.safe_load(TINY_JOB.read_text())
    manifest["metadata"]["name"] = "bench-in-place"
    manifest["spec"]["training"]["steps"] = 16
    manifest["spec"]["checkpoint"]["intervalSteps"] = 5
    manifest["spec"]["elastic"]["backoffSeconds"] = 0
    manifest["spec"]["elastic"]["inPlaceRestarts"] = in_place_restarts
    path = directory / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def recovery_seconds(train_log: Path) -> float:
    """Last step before the crash to the first step after it (the log's own times)."""
    records = [json.loads(line) for line in train_log.read_text().splitlines() if line.strip()]
    for before, after in itertools.pairwise(records):
        if after["step"] <= before["step"] or after["restart_count"] != before["restart_count"]:
            return float(after["time"] - before["time"])
    raise RuntimeError(f"no restart in {train_log}")


def lose_second_pod(process: subprocess.Popen[str], checkpoints: Path) -> None:
    """Once rank 0 reported step 7, SIGKILL the second pod's agent and its workers."""
    while True:
        with contextlib.suppress(OSError, ValueError):
            if json.loads((checkpoints / "progress.json").read_text())["step"] >= 7:
                break
        if process.poll() is not None:
            raise RuntimeError("hetmoe run ended before step 7")
        time.sleep(0.1)
    marks = (b"HETMOE_JOB=bench-in-place\0", b"HETMOE_NODE_INDEX=1\0")
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, ValueError):
            environ = (entry / "environ").read_bytes()
            if all(mark in environ for mark in marks):
                os.kill(int(entry.name), signal.SIGKILL)


def one_run(in_place_restarts: int, fault: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-in-place-") as tmp:
        directory = Path(tmp)
        job = write_job(directory, in_place_restarts)
        run_dir = directory / "run"
        argv = [sys.executable, "-m", "hetmoe_operator.cli.main", "run", "-f", str(job)]
        argv += ["--cluster", str(LOCAL_CLUSTER), "--run-dir", str(run_dir)]
        if fault == "crash":
            argv += ["--inject-fault", CRASH]
        started = time.monotonic()
        process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO
        )
        if fault == "pod":
            lose_second_pod(process, run_dir / "checkpoints")
        stdout, stderr = process.communicate(timeout=900)
        wall = time.monotonic() - started
        if process.returncode != 0:
            raise RuntimeError(f"hetmoe run failed:\n{stdout[-3000:]}{stderr[-3000:]}")
        final = [line for line in stdout.splitlines() if line.startswith("job=")][-1]
        expected = "generation=1" if in_place_restarts else "generation=2"
        if expected not in final:
            raise RuntimeError(f"expected {expected}: {final}")
        recovery = recovery_seconds(run_dir / "checkpoints" / "train_log.jsonl")
        return {"recovery_s": recovery, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--fault", choices=("crash", "pod"), default="crash")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    runs: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for round_ in range(args.rounds):
        order = list(MODES) if round_ % 2 == 0 else list(reversed(MODES))
        for mode in order:
            runs[mode].append(one_run(MODES[mode], args.fault))
            print(f"round {round_} {mode}: {runs[mode][-1]}", flush=True)
    ratios = [
        a["recovery_s"] / b["recovery_s"]
        for a, b in zip(runs["in place"], runs["new generation"], strict=True)
    ]
    print("\n| restart | failure -> first resumed step, median | whole run, median |")
    print("|---|---|---|")
    for mode, values in runs.items():
        recovery = statistics.median(v["recovery_s"] for v in values)
        wall = statistics.median(v["wall_s"] for v in values)
        print(f"| {mode} | {recovery:.1f} s | {wall:.1f} s |")
    print(f"\nin place / new generation, per round: {', '.join(f'{r:.2f}' for r in ratios)}")
    result = {
        "fault": args.fault,
        "runs": runs,
        "ratios": ratios,
        "median_ratio": statistics.median(ratios),
    }
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
