"""Developer CLI for a detached local cluster (wired to `make cluster-up/-down`).

python -m tests.cluster up [--topology FILE] [--dir DIR]
python -m tests.cluster down [--dir DIR]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from tests.cluster.controlplane import (
    PIDS_FILE,
    ControlPlane,
    cache_root,
    ensure_built,
    pid_alive,
    stop_detached,
)
from tests.cluster.topology import apply_topology, load_topology


def default_dir() -> Path:
    return cache_root() / "dev-cluster"


def running_pids(workdir: Path) -> list[int]:
    pid_file = workdir / PIDS_FILE
    if not pid_file.exists():
        return []
    return [p for p in json.loads(pid_file.read_text()).values() if pid_alive(p)]


def up(workdir: Path, topology: Path | None) -> int:
    """Start the stack and leave it running after this process exits."""
    if running_pids(workdir):
        print(f"a cluster is already running in {workdir}; run `down` first", file=sys.stderr)
        return 1
    shutil.rmtree(workdir, ignore_errors=True)
    plane = ControlPlane(bin_dir=ensure_built(), workdir=workdir, detached=True).start()
    if topology is not None:
        try:
            names = apply_topology(plane.api_client(), load_topology(topology))
        except BaseException:
            plane.stop()
            raise
        print(f"{len(names)} nodes Ready", file=sys.stderr)
    print(f"logs and pids in {workdir}", file=sys.stderr)
    print(f"export KUBECONFIG={plane.kubeconfig}")
    return 0


def down(workdir: Path) -> int:
    pids = stop_detached(workdir)
    print(f"stopped {len(pids)} processes" if pids else "nothing running", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster")
    sub = parser.add_subparsers(dest="command", required=True)
    up_parser = sub.add_parser("up", help="start a detached cluster")
    up_parser.add_argument(
        "--topology", type=Path, help="topology YAML (or name in tests/topologies)"
    )
    down_parser = sub.add_parser("down", help="stop the detached cluster")
    for p in (up_parser, down_parser):
        p.add_argument(
            "--dir", type=Path, default=default_dir(), help="state dir (pids, kubeconfig, logs)"
        )
    args = parser.parse_args(argv)
    if args.command == "up":
        return up(args.dir, args.topology)
    return down(args.dir)


if __name__ == "__main__":
    sys.exit(main())
