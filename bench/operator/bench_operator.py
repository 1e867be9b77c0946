"""Benchmark the operator on the 1,050-node reference topology.

100 MoEJobs of 16 worker pods each are created at once against a real control
plane (kwok nodes), with the operator running as a ``hetmoe operator`` subprocess:

* apply -> all 16 pods created, and -> all 16 Running (p50/p99 over jobs that fit);
* pod failure -> every replacement pod created (p50/p99); with ``--in-place-restarts N``
  the jobs set ``elastic.inPlaceRestarts`` and a pod other than the rendezvous host
  fails, so the operator replaces that pod alone: the time until it exists;
* Kubernetes API requests per job (from the operator's own counter);
* operator peak RSS (VmHWM).

    python -m bench.operator.bench_operator [--jobs 100] [--failures 20] [--out FILE]
        [--in-place-restarts N]

Each job is a tiny-model job pinned to one pool with ``maxNodes: 16`` so that its
plan uses exactly 16 whole nodes; jobs are spread over the pools in proportion to
their size. Jobs that do not fit (16 whole nodes each) wait Pending and are
reported, not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from kubernetes import watch
from kubernetes.client import CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException
from tests.cluster.controlplane import ControlPlane, ensure_built, free_port
from tests.cluster.topology import apply_topology, load_topology
from urllib3.exceptions import ProtocolError

from hetmoe_operator.desired.names import RANK0_LABEL

REPO = Path(__file__).resolve().parents[2]
CATALOG = REPO / "examples" / "catalogs" / "reference-5-grades.yaml"
NAMESPACE = "bench"
PODS_PER_JOB = 16
TARGETS = {"created_p99_s": 5.0, "replacement_p99_s": 3.0, "rss_mib": 250.0}


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def job(name: str, pool: str, in_place_restarts: int = 0) -> dict[str, Any]:
    return {
        "apiVersion": "hetmoe.io/v1alpha1",
        "kind": "MoEJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"preset": "tiny"},
            "training": {"steps": 100, "globalBatchSize": 128, "sequenceLength": 2048},
            "pools": [{"name": pool, "minNodes": PODS_PER_JOB, "maxNodes": PODS_PER_JOB}],
            "elastic": {
                "maxRestarts": 5,
                "backoffSeconds": 0,
                "maxBackoffSeconds": 0,
                "inPlaceRestarts": in_place_restarts,
            },
            "checkpoint": {"volume": {"emptyDir": True}},
        },
    }


class _RawWatch(watch.Watch):
    """A watch yielding plain dicts: building client models per event would make the
    benchmark client, which shares the CPU, slower than the operator it measures."""

    def get_return_type(self, func: Any) -> None:
        return None


class PodTracker:
    """Watches the bench namespace's pods and records, per (job, generation), when all
    pods existed and when all were Running.

    A watch, not a LIST every 0.1 s: listing 1,600 pods ten times a second was the
    largest load the benchmark itself put on the API server it measures.
    """

    def __init__(self, core: CoreV1Api) -> None:
        self.core = core
        self.created: dict[tuple[str, str], float] = {}
        self.running: dict[tuple[str, str], float] = {}
        self.first_seen: dict[str, float] = {}
        self.stop = threading.Event()
        self._pods: dict[str, tuple[tuple[str, str], bool]] = {}

    def _record(self, pod: dict[str, Any], deleted: bool) -> None:
        meta = pod["metadata"]
        if deleted:
            self._pods.pop(meta["name"], None)
            return
        labels = meta.get("labels") or {}
        key = (labels.get("hetmoe.io/job", ""), labels.get("hetmoe.io/generation", ""))
        running = (pod.get("status") or {}).get("phase") == "Running"
        self._pods[meta["name"]] = (key, running)
        now = time.monotonic()
        self.first_seen.setdefault(meta["name"], now)
        total = sum(1 for k, _ in self._pods.values() if k == key)
        if total >= PODS_PER_JOB:
            self.created.setdefault(key, now)
        if running and sum(1 for k, r in self._pods.values() if k == key and r) >= PODS_PER_JOB:
            self.running.setdefault(key, now)

    def pods_by_generation(self, job: str) -> dict[str, int]:
        counts: dict[str, int] = {}
        for (name, generation), _ in list(self._pods.values()):
            if name == job:
                counts[generation] = counts.get(generation, 0) + 1
        return counts

    def poll(self) -> None:
        while not self.stop.is_set():
            listing = json.loads(
                self.core.list_namespaced_pod(NAMESPACE, _preload_content=False).data
            )
            self._pods.clear()
            for pod in listing["items"]:
                self._record(pod, False)
            version = listing["metadata"]["resourceVersion"]
            try:
                for event in _RawWatch().stream(
                    self.core.list_namespaced_pod,
                    NAMESPACE,
                    resource_version=version,
                    timeout_seconds=60,
                ):
                    if self.stop.is_set():
                        return
                    if event["type"] == "ERROR":
                        break  # e.g. 410 Gone: list again
                    self._record(event["raw_object"], event["type"] == "DELETED")
            except ApiException as error:
                if error.status != 410:  # expired: list again
                    raise
            except ProtocolError:
                # The API server cut the stream (it does under load): list again. An
                # uncaught error here used to end this thread silently mid-run, so
                # every later creation went unrecorded.
                continue


def api_server_floor(core: CoreV1Api, pods: int) -> dict[str, float]:
    """The API server alone, in the same minute: create ``pods`` bare pods (16 at a
    time, like the operator) in their own namespace and time it. No operator can
    create pods faster than this, so it is the baseline the launch figures compare to.
    The pods select a node label nobody has, so they stay Pending and cost the
    scheduler and kwok nothing afterwards."""
    namespace = "bench-floor"
    core.create_namespace({"metadata": {"name": namespace}})
    while True:
        try:
            core.read_namespaced_service_account("default", namespace)
            break
        except ApiException:
            time.sleep(0.2)

    def create(i: int) -> None:
        body = {
            "metadata": {"name": f"floor-{i:05d}"},
            "spec": {
                "nodeSelector": {"hetmoe.io/bench-floor": "none"},
                "containers": [{"name": "c", "image": "x"}],
            },
        }
        response = core.create_namespaced_pod(namespace, body, _preload_content=False)
        response.drain_conn()  # read to the end so the connection goes back to the pool
        response.release_conn()

    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(create, range(pods)))
    elapsed = time.monotonic() - started
    core.delete_namespace(namespace)
    return {"floor_pods": float(pods), "floor_seconds": elapsed, "floor_pods_per_s": pods / elapsed}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far (from /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds each process used over a window, to say where a slow phase's time
    went: on this 2-core host the control plane, kwok, the operator and the bench
    compete for the same cores."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids = pids
        self.started = time.monotonic()
        self.start = {name: cpu_seconds(pid) for name, pid in pids.items()}

    def report(self) -> dict[str, float]:
        used = {
            name: round(cpu_seconds(pid) - self.start[name], 1) for name, pid in self.pids.items()
        }
        used["window_s"] = round(time.monotonic() - self.started, 1)
        return used


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def api_requests(metrics_port: int) -> float:
    text = (
        urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10)
        .read()
        .decode()
    )
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("hetmoe_operator_api_requests_total{")
    )


def why_not_replaced(custom: CustomObjectsApi, tracker: PodTracker, name: str) -> dict[str, Any]:
    """What a job whose replacement never appeared says about itself, and which of its
    generations the tracker saw: the trace a slow replacement is chased with."""
    status = (
        custom.get_namespaced_custom_object(
            "hetmoe.io", "v1alpha1", NAMESPACE, "moejobs", name
        ).get("status")
        or {}
    )
    return {
        "phase": status.get("phase"),
        "restarts": status.get("restarts"),
        "conditions": [
            {k: c.get(k) for k in ("type", "status", "reason", "message")}
            for c in status.get("conditions") or []
        ],
        "pods_by_generation": tracker.pods_by_generation(name),
    }


def fail_pod(core: CoreV1Api, name: str) -> None:
    """Mark a worker Failed with exit code 1 through the status subresource (what a
    kubelet reports when the trainer crashes)."""
    core.patch_namespaced_pod_status(
        name,
        NAMESPACE,
        {
            "status": {
                "phase": "Failed",
                "containerStatuses": [
                    {
                        "name": "trainer",
                        "image": "x",
                        "imageID": "",
                        "ready": False,
                        "restartCount": 0,
                        "state": {"terminated": {"exitCode": 1, "reason": "Error"}},
                    }
                ],
            }
        },
    )


def run(args: argparse.Namespace) -> dict[str, Any]:
    topology = load_topology("reference-5-grades")
    with ControlPlane(bin_dir=ensure_built(), startup_timeout=180) as plane:
        client = plane.api_client()
        client.configuration.connection_pool_maxsize = 32
        apply_topology(client, topology)
        plane.kubectl("apply", "--server-side", "-f", str(REPO / "crds" / "moejob.yaml"))
        for attempt in range(10):  # under load the CRD may not be listed yet
            try:
                plane.kubectl(
                    "wait", "--for=condition=Established", "--timeout=180s", "crd/moejobs.hetmoe.io"
                )
                break
            except subprocess.CalledProcessError:
                if attempt == 9:
                    raise
                time.sleep(2)
        plane.kubectl("create", "namespace", NAMESPACE)
        core, custom = CoreV1Api(client), CustomObjectsApi(client)
        while True:
            try:
                core.read_namespaced_service_account("default", NAMESPACE)
                break
            except Exception:
                time.sleep(0.2)
        metrics_port = free_port()
        log = open(args.log, "wb")  # noqa: SIM115 - kept open for the operator's lifetime
        sampler = ["-m", "bench.operator.sampler", str(args.profile)] if args.profile else []
        argv = [
            sys.executable,
            *sampler,
            "-m",
            "hetmoe_operator.cli.operator_command",
            "--catalog",
            str(CATALOG),
            "--metrics-port",
            str(metrics_port),
            "--toleration",
            "hetmoe.io/grade-e",
        ]
        operator = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=REPO,
            env={**os.environ, "KUBECONFIG": str(plane.kubeconfig)},
        )
        try:
            pids = {c.name: c.process.pid for c in plane.components}
            pids |= {"operator": operator.pid, "bench": os.getpid()}
            return measure(args, topology, core, custom, operator, metrics_port, pids)
        finally:
            operator.terminate()
            operator.wait(timeout=30)


def measure(
    args: argparse.Namespace,
    topology: Any,
    core: CoreV1Api,
    custom: CustomObjectsApi,
    operator: subprocess.Popen[bytes],
    metrics_port: int,
    pids: dict[str, int],
) -> dict[str, Any]:
    deadline = time.monotonic() + 60
    while True:  # operator start-up: node cache warm-up, then /metrics answers
        try:
            api_requests(metrics_port)
            break
        except OSError:
            if operator.poll() is not None or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    pools = [p for p in topology.pools]
    capacity = {p.name: p.nodes // PODS_PER_JOB for p in pools}
    order = sorted(pools, key=lambda p: -p.nodes)
    names = []
    assigned: dict[str, int] = {}
    for i in range(args.jobs):  # proportional: fill pools by free job slots, then overflow
        free = [p for p in order if assigned.get(p.name, 0) < capacity[p.name]] or order
        pool = max(free, key=lambda p: capacity[p.name] - assigned.get(p.name, 0))
        assigned[pool.name] = assigned.get(pool.name, 0) + 1
        names.append((f"bench-{i:03d}", pool.name))
    tracker = PodTracker(core)
    poller = threading.Thread(target=tracker.poll, daemon=True)
    poller.start()
    requests_before = api_requests(metrics_port)
    applied: dict[str, float] = {}

    def create(item: tuple[str, str]) -> None:
        applied[item[0]] = time.monotonic()
        custom.create_namespaced_custom_object(
            "hetmoe.io", "v1alpha1", NAMESPACE, "moejobs", job(*item, args.in_place_restarts)
        )

    launch_cpu = CpuMeter(pids)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(create, names))
    deadline = time.monotonic() + args.timeout
    fits = sum(min(capacity[p], assigned.get(p, 0)) for p in capacity)
    while time.monotonic() < deadline and sum((n, "1") in tracker.created for n, _ in names) < fits:
        time.sleep(0.5)
    launch_cpu_seconds = launch_cpu.report()
    while time.monotonic() < deadline and sum((n, "1") in tracker.running for n, _ in names) < fits:
        time.sleep(0.5)
    created = [
        tracker.created[(n, "1")] - applied[n] for n, _ in names if (n, "1") in tracker.created
    ]
    running = [
        tracker.running[(n, "1")] - applied[n] for n, _ in names if (n, "1") in tracker.running
    ]
    if operator.poll() is not None:
        raise RuntimeError(f"operator exited with {operator.returncode}; see {args.log}")
    requests_launch = api_requests(metrics_port) - requests_before
    victims: dict[str, str] = {}  # job -> generation that will replace the failed one
    alone: dict[str, str] = {}  # job -> the pod that will replace the failed one alone
    failed_at: dict[str, float] = {}
    for name in [n for n, _ in names if (n, "1") in tracker.running]:
        if len(victims) >= args.failures:
            break
        pods = json.loads(
            core.list_namespaced_pod(
                NAMESPACE, label_selector=f"hetmoe.io/job={name}", _preload_content=False
            ).data
        )
        alive = [
            p
            for p in pods["items"]
            if (p.get("status") or {}).get("phase") == "Running"
            and not p["metadata"].get("deletionTimestamp")
        ]
        if len(alive) < PODS_PER_JOB:
            continue  # restarting for another reason (e.g. a node went NotReady)
        if args.in_place_restarts:  # the rendezvous host is never replaced alone
            alive = [p for p in alive if RANK0_LABEL not in p["metadata"]["labels"]]
        generation = int(alive[0]["metadata"]["labels"]["hetmoe.io/generation"])
        try:
            failed_at[name] = time.monotonic()
            fail_pod(core, alive[0]["metadata"]["name"])
        except ApiException:
            failed_at.pop(name)
            continue
        victims[name] = str(generation + 1)
        alone[name] = f"{alive[0]['metadata']['name']}-r1"
        time.sleep(args.failure_spacing)
    deadline = time.monotonic() + args.timeout

    def replaced_at(name: str) -> float | None:
        if args.in_place_restarts:
            return tracker.first_seen.get(alone[name])
        return tracker.created.get((name, victims[name]))

    while time.monotonic() < deadline and not all(replaced_at(n) for n in victims):
        time.sleep(0.2)
    replacement = [t - failed_at[n] for n in victims if (t := replaced_at(n)) is not None]
    unreplaced = {
        n: why_not_replaced(custom, tracker, n) for n in victims if replaced_at(n) is None
    }
    tracker.stop.set()
    total_requests = api_requests(metrics_port) - requests_before
    floor = api_server_floor(core, args.floor_pods) if args.floor_pods else {}
    result = {
        "jobs": args.jobs,
        "pods_per_job": PODS_PER_JOB,
        "nodes": topology.total_nodes,
        "jobs_that_fit": fits,
        "jobs_all_created": len(created),
        "jobs_all_running": len(running),
        "created_p50_s": percentile(created, 50),
        "created_p99_s": percentile(created, 99),
        "running_p50_s": percentile(running, 50),
        "running_p99_s": percentile(running, 99),
        "in_place_restarts": args.in_place_restarts,
        "failures_injected": len(victims),
        "replacements_created": len(replacement),
        "replacement_p50_s": percentile(replacement, 50),
        "replacement_p99_s": percentile(replacement, 99),
        "unreplaced": unreplaced,
        "api_requests_per_job_launch": requests_launch / max(1, args.jobs),
        "api_requests_total": total_requests,
        "operator_peak_rss_mib": peak_rss_mib(operator.pid),
        "launch_cpu_seconds": launch_cpu_seconds,
        **floor,
        "targets": TARGETS,
    }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--failures", type=int, default=20)
    parser.add_argument(
        "--failure-spacing", type=float, default=0.5, help="seconds between injected failures"
    )
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument(
        "--in-place-restarts",
        type=int,
        default=0,
        help="jobs set elastic.inPlaceRestarts: a failed pod is replaced alone",
    )
    parser.add_argument("--log", default="/tmp/hetmoe-bench-operator.log")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--floor-pods",
        type=int,
        default=256,
        help="bare pods the bench creates itself at the end to time the API server (0: skip)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        default=None,
        help="run the operator under bench.operator.sampler and write its report here",
    )
    args = parser.parse_args()
    # SIGTERM unwinds like Ctrl-C so the control plane and operator are stopped.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
