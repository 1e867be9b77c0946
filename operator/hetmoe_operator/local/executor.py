"""A tiny local kubelet: run the operator's worker Pod manifests as local process groups.

Local mode must not have its own idea of what a worker is. The Pods come from the
same desired-state builder the operator sends to the Kubernetes API; this module
only translates what a kubelet and the cluster network would have provided, so that
a container command that works in a Pod works unchanged on this machine.

The translation, applied to every worker Pod (``translate_pod``):

* **Interpreter.** The image's ``torchrun`` becomes ``<this python> -m
  torch.distributed.run`` and ``python``/``python3`` becomes this interpreter: the
  venv running ``hetmoe`` plays the trainer image.
* **Volumes.** The filesystem a container sees is mapped onto the run directory:
  a ``configMap`` volume becomes ``<run>/configmaps/<configmap>/`` holding its keys as
  files (so the plan ConfigMap becomes ``plan.json`` there); a shared volume
  (``persistentVolumeClaim``, ``hostPath``) becomes ``<run>/<volume name>`` (the
  checkpoint volume: ``runs/<job>/checkpoints``), shared by every process as a PVC is
  shared by every pod; an ``emptyDir`` becomes a per-pod directory that is wiped when
  the pod starts, as an emptyDir dies with its pod. Every argv element or env value
  that starts with a container ``mountPath`` (also after ``--flag=``) is rewritten to
  the host directory.
* **Service DNS.** Pods reach the c10d rendezvous through the job's headless
  Service. Every spelling of that Service's DNS name (``svc``, ``pod.svc``,
  ``svc.ns``, ``svc.ns.svc``, ``... .cluster.local``) becomes ``127.0.0.1``, and
  each Service port becomes one free local port shared by all pods of a generation.
* **Pod ports.** Every pod on Kubernetes has its own network namespace, so all of
  them expose the same ``containerPort`` (the trainer metrics port); local processes
  share one. Each pod therefore gets its own block of free local ports (one per
  torchrun worker process, ``--nproc-per-node`` of them, since the trainer adds
  its local rank to the base port). A port number is rewritten where it is a
  value: the argv element after a flag that mentions ``port``, ``--flag=PORT``,
  ``host:PORT``, or the value of an env variable whose name contains ``PORT``.
* **Downward API.** ``fieldRef`` env values resolve to the pod's name, namespace
  and labels; ``status.podIP``/``status.hostIP`` resolve to ``127.0.0.1``.
* **Simulated grades.** ``HETMOE_SIMULATED_SLOWDOWN`` is added to every pod's env
  (see :func:`simulated_slowdowns`); on Kubernetes the hardware is real and the
  variable is never set.
* **CPU share.** A pod on Kubernetes has CPUs of its own; local workers share this
  machine's cores. Every pod gets ``OMP_NUM_THREADS`` = cores // the launch's worker
  processes (at least 1) unless its manifest sets it: torchrun sets 1 only when a
  node runs several workers, and two one-worker pods each spinning two OpenMP threads
  on two cores ran their steps 100x slower.

Processes are started in their own session, so a pod is a process group: stopping a
pod signals the whole group (torchrun and its workers), as a container runtime kills
everything in a container.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from hetmoe_operator.api.catalog import DeviceGrade
from hetmoe_operator.api.cluster import ClusterDescription
from hetmoe_operator.plan import TERMINATION_LOG_ENV

SLOWDOWN_ENV = "HETMOE_SIMULATED_SLOWDOWN"
THREADS_ENV = "OMP_NUM_THREADS"
TERMINATION_MESSAGE_BYTES = 4096
"""As much of it as a kubelet keeps."""
LOCAL_ADDRESS = "127.0.0.1"
_COMPUTE_OPERATIONS = ("attention", "expert_ffn", "dense_ffn", "embedding")
# Variables a launcher on the host may have set that would confuse torchrun inside a
# "pod": a container never inherits them from the node.
_HOST_ONLY_ENV = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
)

KILL_WAIT_SECONDS = 5.0
"""How long SIGKILLed processes may take to disappear (the kernel frees memory first)."""

PodPhase = Literal["Pending", "Running", "Succeeded", "Failed"]


class TranslationError(ValueError):
    """A Pod manifest uses something a local process cannot be given."""


@dataclass(frozen=True)
class LocalPod:
    """A worker Pod translated into what one local process group needs."""

    name: str
    """Pod name (also names its log file)."""
    argv: tuple[str, ...]
    """Command line with interpreter, paths, host names and ports rewritten."""
    env: Mapping[str, str]
    """The pod's own environment (the host's is added when it starts)."""
    labels: Mapping[str, str]
    """Pod labels, as the reconcile decisions see them."""
    metrics_ports: tuple[int, ...]
    """Local ports of the trainer processes' metrics endpoints, by local rank."""
    empty_dirs: tuple[Path, ...] = ()
    """Per-pod scratch directories, wiped when the pod starts."""
    service_ports: Mapping[int, int] = field(default_factory=dict)
    """The Service ports it dials (container port -> local port), shared by its
    generation's pods."""

    def with_env(self, extra: Mapping[str, str]) -> LocalPod:
        """The same pod with ``extra`` variables added (local-only hooks)."""
        return replace(self, env={**self.env, **extra})


@dataclass(frozen=True)
class PodState:
    """What a kubelet would report about one pod: its phase and exit code."""

    name: str
    phase: PodPhase
    exit_code: int | None = None
    """Container exit code once terminated; 128+N for a process killed by signal N."""
    reason: str = ""
    """``Completed`` or ``Error``, as Kubernetes reports a terminated container."""
    message: str = ""
    """What the container wrote to its termination log (the trainer: why it ended)."""
    finished_at: datetime | None = None
    """When the process was first seen to have exited (a kubelet's ``finishedAt``)."""


@dataclass(frozen=True)
class NetworkMap:
    """Ports chosen for one generation: Service ports and per-pod port blocks."""

    service_ports: Mapping[int, int]
    """Container-side Service port -> local port."""
    pod_ports: Mapping[str, Mapping[int, int]]
    """Pod name -> (container port -> local base port of its block)."""


def simulated_slowdowns(cluster: ClusterDescription) -> dict[str, float]:
    """Pool name -> slowdown factor: fastest grade's effective speed / this grade's.

    A grade's effective speed is its peak throughput times the mean achieved
    efficiency over the compute operation classes, the same inputs the planner's
    cost model uses, so the simulation slows a pool as much as the plan expects.
    """

    def speed(grade: DeviceGrade) -> float:
        return sum(grade.effective_tflops(op) for op in _COMPUTE_OPERATIONS) / len(
            _COMPUTE_OPERATIONS
        )

    speeds = {pool.name: speed(cluster.catalog.grade(pool.grade)) for pool in cluster.pools}
    fastest = max(speeds.values())
    return {name: round(fastest / value, 4) for name, value in speeds.items()}


def free_port_blocks(sizes: Sequence[int], *, host: str = LOCAL_ADDRESS) -> list[int]:
    """Base ports of blocks of ``sizes[i]`` consecutive free ports, all distinct.

    Each block is verified by binding every port of it at once, so the blocks do not
    overlap; the ports are released before returning (a small race with other
    programs that a local run accepts).
    """
    bases: list[int] = []
    with ExitStack() as held:
        for size in sizes:
            for _attempt in range(200):
                probe = held.enter_context(socket.socket())
                probe.bind((host, 0))
                base = probe.getsockname()[1]
                if base + size > 65535:
                    continue
                try:
                    for offset in range(1, size):
                        extra = held.enter_context(socket.socket())
                        extra.bind((host, base + offset))
                except OSError:
                    continue
                bases.append(base)
                break
            else:
                raise OSError(f"no block of {size} free local ports")
    return bases


def _items(manifests: Iterable[Mapping[str, Any]], kind: str) -> list[Mapping[str, Any]]:
    return [m for m in manifests if m.get("kind") == kind]


def _container(pod: Mapping[str, Any]) -> Mapping[str, Any]:
    containers = pod["spec"]["containers"]
    if len(containers) != 1:
        raise TranslationError(
            f"pod {pod['metadata']['name']}: local mode runs one container per pod, "
            f"got {len(containers)}"
        )
    return containers[0]


def _command_line(container: Mapping[str, Any]) -> list[str]:
    """A container's ``command`` followed by its ``args``."""
    return [*container.get("command", []), *container.get("args", [])]


def _nproc_per_node(argv: Sequence[str]) -> int:
    """torchrun's processes per node, i.e. how many metrics ports one pod needs."""
    for index, arg in enumerate(argv):
        for flag in ("--nproc-per-node", "--nproc_per_node"):
            if arg == flag and index + 1 < len(argv):
                value = argv[index + 1]
            elif arg.startswith(flag + "="):
                value = arg.split("=", 1)[1]
            else:
                continue
            return int(value) if value.isdigit() else 1
    return 1


def _argv_and_env_values(pod: Mapping[str, Any]) -> list[str]:
    container = _container(pod)
    values = [*container.get("command", []), *container.get("args", [])]
    return values + [str(item["value"]) for item in container.get("env", []) if "value" in item]


def allocate_network(
    manifests: Sequence[Mapping[str, Any]],
    *,
    namespace: str = "default",
    service_ports: Mapping[int, int] | None = None,
) -> NetworkMap:
    """Free local ports: one per port reached through the Service, a block per pod port.

    A port written next to the Service's DNS name (``svc:29400``) is one endpoint every
    pod dials, so all pods share one local port for it; every other container port is
    something each pod serves itself and gets a block of its own. ``service_ports``
    are the ones already given to the same generation's earlier pods: a pod created
    later (a replacement) must dial the same rendezvous.
    """
    pods = _items(manifests, "Pod")
    pattern = _service_pattern(_items(manifests, "Service"), namespace)
    shared = sorted(
        {
            int(match.group("port"))
            for pod in pods
            for value in _argv_and_env_values(pod)
            for match in pattern.finditer(value)
            if match.group("port")
        }
    )
    pod_requests: list[tuple[str, int, int]] = []
    for pod in pods:
        container = _container(pod)
        span = _nproc_per_node([*container.get("command", []), *container.get("args", [])])
        block_starts: list[int] = []
        for number in sorted(int(port["containerPort"]) for port in container.get("ports", [])):
            # ``metrics-k`` ports (base + k) already lie in the block of the base port.
            inside_block = any(start < number < start + span for start in block_starts)
            if number not in shared and not inside_block:
                block_starts.append(number)
                pod_requests.append((pod["metadata"]["name"], number, span))
    known = dict(service_ports or {})
    new = [port for port in shared if port not in known]
    bases = free_port_blocks([1] * len(new) + [span for _, _, span in pod_requests])
    pod_ports: dict[str, dict[int, int]] = {}
    for (pod_name, number, _span), base in zip(pod_requests, bases[len(new) :], strict=True):
        pod_ports.setdefault(pod_name, {})[number] = base
    known.update(zip(new, bases[: len(new)], strict=True))
    return NetworkMap(
        service_ports={port: known[port] for port in shared},
        pod_ports=pod_ports,
    )


def write_config_maps(manifests: Iterable[Mapping[str, Any]], run_dir: Path) -> None:
    """Write every ConfigMap's keys as files under ``<run>/configmaps/<name>/``.

    Files are replaced atomically: a rerun may rewrite the plan while nothing reads it,
    and a half-written plan must never be seen.
    """
    for config_map in _items(manifests, "ConfigMap"):
        directory = run_dir / "configmaps" / config_map["metadata"]["name"]
        directory.mkdir(parents=True, exist_ok=True)
        for key, value in (config_map.get("data") or {}).items():
            partial = directory / f".{key}.partial"
            partial.write_text(value)
            partial.replace(directory / key)


def _volume_dirs(pod: Mapping[str, Any], run_dir: Path) -> dict[str, tuple[Path, bool]]:
    """Volume name -> (host directory, whether it is a per-pod emptyDir)."""
    pod_name = pod["metadata"]["name"]
    result: dict[str, tuple[Path, bool]] = {}
    for volume in pod["spec"].get("volumes", []):
        name = volume["name"]
        if "configMap" in volume:
            result[name] = (run_dir / "configmaps" / volume["configMap"]["name"], False)
        elif "emptyDir" in volume:
            result[name] = (run_dir / "pods" / pod_name / name, True)
        elif "persistentVolumeClaim" in volume or "hostPath" in volume:
            result[name] = (run_dir / name, False)
        else:
            kinds = ", ".join(k for k in volume if k != "name")
            raise TranslationError(f"pod {pod_name}: volume {name} ({kinds}) has no local mapping")
    return result


def _mounts(
    container: Mapping[str, Any], volumes: Mapping[str, tuple[Path, bool]]
) -> list[tuple[str, Path]]:
    """(mountPath, host directory), longest mount path first so nested mounts win."""
    mounts = []
    for mount in container.get("volumeMounts", []):
        host, _ = volumes[mount["name"]]
        if mount.get("subPath"):
            host = host / mount["subPath"]
        mounts.append((mount["mountPath"].rstrip("/") or "/", host))
    return sorted(mounts, key=lambda item: len(item[0]), reverse=True)


def _rewrite_path(value: str, mounts: Sequence[tuple[str, Path]]) -> str:
    prefix, sep, rest = value.partition("=") if value.startswith("-") else ("", "", value)
    for mount_path, host in mounts:
        if rest == mount_path or rest.startswith(mount_path + "/"):
            return f"{prefix}{sep}{host}{rest[len(mount_path) :]}"
    return value


def _service_pattern(services: Sequence[Mapping[str, Any]], namespace: str) -> re.Pattern[str]:
    """Any DNS spelling of the job's Services, with an optional ``:port``.

    The Service is often named like the job, so a bare name is only taken for a host
    when something marks it as one: a pod hostname before it, the namespace after it,
    or a port (see :func:`_localise_host`).
    """
    names = "|".join(re.escape(s["metadata"]["name"]) for s in services) or "(?!)"
    ns = re.escape(services[0]["metadata"].get("namespace", namespace) if services else namespace)
    return re.compile(
        rf"(?<![A-Za-z0-9.-])(?P<hostname>[a-z0-9-]+\.)?(?:{names})"
        rf"(?P<domain>\.{ns}(?:\.svc(?:\.cluster\.local)?)?)?(?![A-Za-z0-9.-])"
        rf"(?::(?P<port>\d+))?"
    )


def _localise_host(match: re.Match[str], port_map: Mapping[int, int]) -> str:
    """127.0.0.1 (with the local port) for a Service host name; anything else unchanged."""
    hostname, domain, port = match.group("hostname", "domain", "port")
    if not (hostname or domain or port):
        return match.group(0)
    if port is None:
        return LOCAL_ADDRESS
    return f"{LOCAL_ADDRESS}:{port_map.get(int(port), int(port))}"


def _env_from_field(pod: Mapping[str, Any], path: str) -> str:
    metadata = pod["metadata"]
    labels = metadata.get("labels", {})
    label = re.fullmatch(r"metadata\.labels\['([^']+)'\]", path)
    if label:
        return str(labels.get(label.group(1), ""))
    values = {
        "metadata.name": metadata["name"],
        "metadata.namespace": metadata.get("namespace", "default"),
        "status.podIP": LOCAL_ADDRESS,
        "status.hostIP": LOCAL_ADDRESS,
        "spec.nodeName": socket.gethostname(),
    }
    if path not in values:
        raise TranslationError(f"pod {metadata['name']}: fieldRef {path} has no local value")
    return values[path]


def _interpreter(argv: list[str]) -> list[str]:
    head = Path(argv[0]).name
    if head == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *argv[1:]]
    if re.fullmatch(r"python(3(\.\d+)?)?", head):
        return [sys.executable, *argv[1:]]
    return argv


def translate_pod(
    pod: Mapping[str, Any],
    services: Sequence[Mapping[str, Any]],
    network: NetworkMap,
    run_dir: Path,
    slowdowns: Mapping[str, float],
    threads: int = 1,
) -> LocalPod:
    """Turn one worker Pod manifest into a local process description (see module doc)."""
    metadata = pod["metadata"]
    name = metadata["name"]
    container = _container(pod)
    volumes = _volume_dirs(pod, run_dir)
    mounts = _mounts(container, volumes)
    host_pattern = _service_pattern(services, metadata.get("namespace", "default"))
    own_ports = network.pod_ports.get(name, {})
    port_map = {**network.service_ports, **own_ports}

    def rewrite_hosts(value: str) -> str:
        return host_pattern.sub(lambda match: _localise_host(match, port_map), value)

    def rewrite_port(value: str) -> str:
        return str(port_map.get(int(value), value)) if value.isdigit() else value

    argv: list[str] = []
    raw = _command_line(container)
    for index, arg in enumerate(raw):
        value = rewrite_hosts(_rewrite_path(arg, mounts))
        if index and "port" in raw[index - 1].lower() and raw[index - 1].startswith("-"):
            value = rewrite_port(value)
        elif value.startswith("-") and "port" in value.split("=", 1)[0].lower() and "=" in value:
            flag, number = value.split("=", 1)
            value = f"{flag}={rewrite_port(number)}"
        argv.append(value)

    env: dict[str, str] = {}
    for item in container.get("env", []):
        if "value" in item:
            value = str(item["value"])
        elif "fieldRef" in item.get("valueFrom", {}):
            value = _env_from_field(pod, item["valueFrom"]["fieldRef"]["fieldPath"])
        else:
            raise TranslationError(f"pod {name}: env {item['name']} has no local value")
        value = rewrite_hosts(_rewrite_path(value, mounts))
        if "PORT" in item["name"].upper():
            value = rewrite_port(value)
        env[item["name"]] = value
    pool = env.get("HETMOE_POOL", metadata.get("labels", {}).get("hetmoe.io/pool", ""))
    if pool in slowdowns:
        env[SLOWDOWN_ENV] = f"{slowdowns[pool]:g}"
    env.setdefault(THREADS_ENV, str(threads))

    metrics_bases = sorted(own_ports.values())
    span = _nproc_per_node(argv)
    return LocalPod(
        name=name,
        argv=tuple(_interpreter(argv)),
        env=env,
        labels=dict(metadata.get("labels", {})),
        metrics_ports=tuple(base + i for base in metrics_bases for i in range(span)),
        empty_dirs=tuple(path for path, per_pod in volumes.values() if per_pod),
        service_ports=dict(network.service_ports),
    )


def translate(
    manifests: Sequence[Mapping[str, Any]],
    run_dir: Path,
    cluster: ClusterDescription,
    *,
    namespace: str = "default",
    service_ports: Mapping[int, int] | None = None,
) -> list[LocalPod]:
    """Translate the worker Pods among ``manifests`` (with their Services) for one launch
    (``service_ports``: see :func:`allocate_network`).

    Also creates the shared volume directories, as a kubelet mounts volumes before
    starting containers; ConfigMaps are written by :func:`write_config_maps` when
    they are created, not here.
    """
    services = _items(manifests, "Service")
    network = allocate_network(manifests, namespace=namespace, service_ports=service_ports)
    slowdowns = simulated_slowdowns(cluster)
    pods = _items(manifests, "Pod")
    for pod in pods:
        for path, per_pod in _volume_dirs(pod, run_dir).values():
            if not per_pod:
                path.mkdir(parents=True, exist_ok=True)
    workers = sum(_nproc_per_node(_command_line(_container(pod))) for pod in pods)
    threads = max(1, (os.cpu_count() or 1) // max(1, workers))
    return [translate_pod(pod, services, network, run_dir, slowdowns, threads) for pod in pods]


def host_path(pod: Mapping[str, Any], container_path: str, run_dir: Path) -> Path:
    """Where ``container_path`` of ``pod``'s container lives on this machine."""
    mounts = _mounts(_container(pod), _volume_dirs(pod, run_dir))
    return Path(_rewrite_path(container_path, mounts))


@dataclass
class _Running:
    pod: LocalPod
    process: subprocess.Popen[bytes]
    termination_log: Path
    finished_at: datetime | None = None


@dataclass
class LocalExecutor:
    """Starts, observes and stops translated pods as local process groups."""

    run_dir: Path
    grace_seconds: float = 10.0
    """How long a stopped pod may take to exit after SIGTERM before SIGKILL."""
    _running: dict[str, _Running] = field(default_factory=dict)

    def start(self, pod: LocalPod, generation: int) -> None:
        """Start ``pod`` in a new session; its output goes to ``logs/<pod>.gen<N>.log``."""
        for scratch in pod.empty_dirs:
            shutil.rmtree(scratch, ignore_errors=True)
            scratch.mkdir(parents=True)
        logs = self.run_dir / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k not in _HOST_ONLY_ENV}
        env.update(pod.env)
        # The stand-in for the kubelet's /dev/termination-log (hetmoe_trainer.termination).
        termination_log = logs / f"{pod.name}.gen{generation}.termination"
        termination_log.unlink(missing_ok=True)
        env[TERMINATION_LOG_ENV] = str(termination_log)
        with (logs / f"{pod.name}.gen{generation}.log").open("ab") as log:
            try:
                process = subprocess.Popen(
                    pod.argv,
                    env=env,
                    cwd=self.run_dir,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            except OSError as error:
                raise TranslationError(
                    f"pod {pod.name}: cannot start {pod.argv[0]}: {error.strerror}"
                ) from None
        self._running[pod.name] = _Running(pod, process, termination_log)

    def pods(self) -> list[LocalPod]:
        """Pods started and not yet removed, in start order."""
        return [entry.pod for entry in self._running.values()]

    def pids(self) -> list[int]:
        """Process-group ids of every pod started and not yet removed."""
        return [entry.process.pid for entry in self._running.values()]

    def observe(self) -> list[PodState]:
        """Phase and exit code of every pod, as a kubelet would report them.

        When a pod's main process has exited, anything it left in its group is killed:
        a container's processes do not outlive it.
        """
        states = []
        for name, entry in self._running.items():
            code = entry.process.poll()
            if code is None:
                states.append(PodState(name, "Running"))
                continue
            _signal_group(entry.process.pid, signal.SIGKILL)
            if entry.finished_at is None:
                entry.finished_at = datetime.now(UTC)
            exit_code = 128 - code if code < 0 else code
            phase: PodPhase = "Succeeded" if exit_code == 0 else "Failed"
            reason = "Completed" if exit_code == 0 else "Error"
            message = _read_head(entry.termination_log, TERMINATION_MESSAGE_BYTES)
            states.append(PodState(name, phase, exit_code, reason, message, entry.finished_at))
        return states

    def delete(
        self, grace_seconds: Mapping[str, float], *, kill_now: threading.Event | None = None
    ) -> None:
        """Stop the named pods and forget them: SIGTERM to each whole group, then
        SIGKILL once its grace period is over (0 kills at once), as a kubelet does,
        or as soon as ``kill_now`` is set (a second Ctrl-C)."""
        entries = [
            (self._running.pop(name), grace)
            for name, grace in grace_seconds.items()
            if name in self._running
        ]
        for entry, grace in entries:
            _signal_group(entry.process.pid, signal.SIGTERM if grace > 0 else signal.SIGKILL)
        signalled = time.monotonic()
        for entry, grace in entries:
            deadline = signalled + grace
            while entry.process.poll() is None and time.monotonic() < deadline:
                if kill_now is not None and kill_now.is_set():
                    break
                with contextlib.suppress(subprocess.TimeoutExpired):
                    entry.process.wait(timeout=min(0.1, max(0.0, deadline - time.monotonic())))
            _signal_group(entry.process.pid, signal.SIGKILL)
            entry.process.wait()
            _wait_group_gone(entry.process.pid, timeout=KILL_WAIT_SECONDS)

    def delete_all(self) -> None:
        """Stop every pod with the default grace period."""
        self.delete(dict.fromkeys(self._running, self.grace_seconds))


def _read_head(path: Path, limit: int) -> str:
    try:
        with path.open("rb") as file:
            return file.read(limit).decode("utf-8", errors="replace").strip()
    except OSError:
        return ""


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes of process group ``pgid``, read from ``/proc``.

    ``killpg(pgid, 0)`` is not enough: workers orphaned by a killed torchrun are
    reparented to PID 1, and a PID 1 that does not reap leaves zombies that still
    "exist" for kill(2) although they hold no resources.
    """
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # Fields after the parenthesised command name: state ppid pgrp ...
        state, _ppid, group = stat[stat.rindex(")") + 2 :].split()[:3]
        if int(group) == pgid and state != "Z":
            members.append(int(entry.name))
    return members


def _wait_group_gone(pgid: int, *, timeout: float) -> None:
    """Wait until no live process of group ``pgid`` is left, SIGKILLing stragglers."""
    deadline = time.monotonic() + timeout
    while group_members(pgid) and time.monotonic() < deadline:
        _signal_group(pgid, signal.SIGKILL)
        time.sleep(0.05)
