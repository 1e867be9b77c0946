"""Benchmark the local control plane the integration tests depend on.

Measures what decides whether the real-cluster tests stay cheap enough to run
on every change: the one-off cold build, the per-session warm start, the
memory of the running stack, and how fast a 1,000+ node fleet becomes Ready.

    python -m bench.cluster.bench_controlplane [--runs 3] [--cold-build-seconds S]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from tests.cluster.controlplane import ControlPlane, ensure_built, k8s_version
from tests.cluster.topology import apply_topology, load_topology

WARM_START_TARGET_S = 30.0


@dataclass(frozen=True)
class Run:
    """One fresh stack: start, idle memory, fleet creation, memory under the fleet."""

    start_s: float
    rss_idle_mib: float
    nodes_ready_s: float
    rss_with_nodes_mib: float


def rss_mib(pids: list[int]) -> float:
    """Sum of resident memory of the given processes, from /proc (MiB)."""
    total_kib = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total_kib += int(line.split()[1])
    return total_kib / 1024


def one_run(bin_dir: Path, topology_name: str) -> Run:
    """Time a cold-process (warm-cache) start, then the fleet, on a fresh stack."""
    began = time.monotonic()
    with ControlPlane(bin_dir=bin_dir) as plane:
        started = time.monotonic() - began
        idle = rss_mib(plane.pids)
        topology = load_topology(topology_name)
        with plane.api_client() as client:
            t0 = time.monotonic()
            apply_topology(client, topology)
            nodes_ready = time.monotonic() - t0
        loaded = rss_mib(plane.pids)
    return Run(started, idle, nodes_ready, loaded)


def read_cold_build_seconds(bin_dir: Path) -> float | None:
    """build.sh records its wall-clock time next to the bin dir on a real build."""
    path = bin_dir.parent / "build-seconds"
    return float(path.read_text()) if path.exists() else None


def summarize(
    runs: list[Run], cold_build_s: float | None, build_source: str, node_count: int
) -> dict[str, object]:
    def median(attr: str) -> float:
        return round(float(statistics.median(getattr(r, attr) for r in runs)), 2)

    return {
        "k8s_version": k8s_version(),
        "runs": len(runs),
        "cold_build_s": cold_build_s,
        "build_source": build_source,
        "warm_start_median_s": median("start_s"),
        "warm_start_target_s": WARM_START_TARGET_S,
        "rss_idle_median_mib": median("rss_idle_mib"),
        "rss_with_nodes_median_mib": median("rss_with_nodes_mib"),
        "fake_nodes": node_count,
        "nodes_ready_median_s": median("nodes_ready_s"),
        "per_run": [asdict(r) for r in runs],
    }


def table(summary: dict[str, object]) -> str:
    rows = [
        ("Kubernetes", summary["k8s_version"]),
        (f"build (s, {summary['build_source']})", summary["cold_build_s"]),
        (
            f"warm start, median of {summary['runs']} (s)",
            f"{summary['warm_start_median_s']} (target <= {WARM_START_TARGET_S:.0f})",
        ),
        ("stack RSS idle (MiB)", summary["rss_idle_median_mib"]),
        (
            f"stack RSS with {summary['fake_nodes']} nodes (MiB)",
            summary["rss_with_nodes_median_mib"],
        ),
        (f"{summary['fake_nodes']} fake nodes created+Ready (s)", summary["nodes_ready_median_s"]),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3, help="fresh stacks to start (median)")
    parser.add_argument("--topology", default="reference-5-grades")
    parser.add_argument(
        "--cold-build-seconds", type=float, default=None, help="override the time build.sh recorded"
    )
    args = parser.parse_args()
    bin_dir = ensure_built()
    runs = [one_run(bin_dir, args.topology) for _ in range(args.runs)]
    cold, source = args.cold_build_seconds, "--cold-build-seconds"
    if cold is None:
        # Cold only if this cache key was built from an empty Go build cache.
        cold, source = read_cold_build_seconds(bin_dir), "recorded by build.sh"
    summary = summarize(runs, cold, source, load_topology(args.topology).total_nodes)
    print(table(summary))
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
