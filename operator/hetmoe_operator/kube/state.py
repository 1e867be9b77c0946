"""In-memory state of one operator process: watch-fed caches and per-job wake-ups.

A reconcile pass reads the job, its pods and every node from these caches instead of
the API server: under load each GET or LIST costs seconds, and a pass that only reads
would otherwise wait on three of them. All caches are rebuilt from the API server at
start-up (full LISTs before any job is reconciled), so losing them with the process
loses nothing; a stale entry costs at most a pass that is refused (status patches
carry the resourceVersion they were computed from, creates answer 409).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from hetmoe_operator.desired.names import JOB_LABEL, ROLE_LABEL
from hetmoe_operator.discovery import is_ready
from hetmoe_operator.reconcile.failures import node_counts_as_up
from hetmoe_operator.reconcile.observe import parse_time

JobKey = tuple[str, str]


def newer(candidate: Mapping[str, Any], current: Mapping[str, Any] | None) -> bool:
    """Whether ``candidate`` is at least as new as ``current`` (by resourceVersion).

    resourceVersions are opaque by contract but etcd revisions in practice; when both
    are integers the larger wins, so a late watch event never replaces what our own
    write returned. Anything else: the latest arrival wins.
    """
    if current is None:
        return True
    new = str(candidate.get("metadata", {}).get("resourceVersion", ""))
    old = str(current.get("metadata", {}).get("resourceVersion", ""))
    if new.isdigit() and old.isdigit():
        return int(new) >= int(old)
    return True


@dataclass
class JobCache:
    """Latest body of every MoEJob: from the MoEJob watch and our own status patches."""

    _jobs: dict[JobKey, dict[str, Any]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def put(self, body: Mapping[str, Any]) -> None:
        meta = body.get("metadata", {})
        key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
        with self._lock:
            if newer(body, self._jobs.get(key)):
                self._jobs[key] = dict(body)

    def remove(self, key: JobKey) -> None:
        with self._lock:
            self._jobs.pop(key, None)

    def get(self, key: JobKey) -> dict[str, Any] | None:
        with self._lock:
            return self._jobs.get(key)


def slim_node(node: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a Node discovery and health checks read (keeps memory flat)."""
    meta, spec, status = node.get("metadata", {}), node.get("spec") or {}, node.get("status") or {}
    ready = is_ready(node)
    since = next(
        (
            c.get("lastTransitionTime")
            for c in status.get("conditions") or ()
            if c.get("type") == "Ready"
        ),
        None,
    )
    return {
        "metadata": {"name": meta.get("name"), "labels": dict(meta.get("labels") or {})},
        "spec": {
            "unschedulable": bool(spec.get("unschedulable")),
            "taints": list(spec.get("taints") or []),
        },
        "status": {
            "allocatable": dict(status.get("allocatable") or {}),
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True" if ready else "False",
                    "lastTransitionTime": since,
                }
            ],
        },
    }


@dataclass
class NodeCache:
    """Latest slim copy of every Node, fed by a full LIST and then the Node watch."""

    _nodes: dict[str, dict[str, Any]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def replace_all(self, nodes: Sequence[Mapping[str, Any]]) -> None:
        with self._lock:
            self._nodes = {n["metadata"]["name"]: slim_node(n) for n in nodes}

    def upsert(self, node: Mapping[str, Any]) -> bool:
        """Store a node; True if it is new or anything discovery reads changed (readiness,
        taints, cordon, labels, allocatable). Heartbeats change none of these, so the
        steady stream of node updates wakes no job."""
        slim = slim_node(node)
        name = slim["metadata"]["name"]
        with self._lock:
            old = self._nodes.get(name)
            self._nodes[name] = slim
        return old != slim

    def remove(self, name: str) -> None:
        with self._lock:
            self._nodes.pop(name, None)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._nodes.values())

    def readiness(self, now: datetime) -> dict[str, bool]:
        """Node -> whether its pods count as alive (``reconcile.failures`` grace)."""
        with self._lock:
            nodes = list(self._nodes.items())
        return {
            name: node_counts_as_up(
                is_ready(n), parse_time(n["status"]["conditions"][0]["lastTransitionTime"]), now
            )
            for name, n in nodes
        }


def slim_pod(pod: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a Pod discovery reads: owner, labels, node, device requests, phase."""
    meta, spec = pod.get("metadata", {}), pod.get("spec") or {}
    return {
        "metadata": {
            "labels": dict(meta.get("labels") or {}),
            "ownerReferences": [{"uid": o.get("uid")} for o in meta.get("ownerReferences") or ()],
            "deletionTimestamp": meta.get("deletionTimestamp"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "spec": {
            "nodeName": spec.get("nodeName"),
            "containers": [
                {
                    "resources": {
                        "requests": dict(((c.get("resources") or {}).get("requests")) or {}),
                        "limits": dict(((c.get("resources") or {}).get("limits")) or {}),
                    }
                }
                for c in spec.get("containers") or ()
            ],
        },
        "status": {"phase": (pod.get("status") or {}).get("phase", "Pending")},
    }


def slim_worker(pod: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a worker pod a pass reads (``reconcile.observe.pod_obs``, progress)."""
    meta, spec, status = pod.get("metadata", {}), pod.get("spec") or {}, pod.get("status") or {}
    return {
        "metadata": {
            "name": meta.get("name"),
            "namespace": meta.get("namespace"),
            "labels": dict(meta.get("labels") or {}),
            "deletionTimestamp": meta.get("deletionTimestamp"),
            "resourceVersion": meta.get("resourceVersion"),
        },
        "spec": {"nodeName": spec.get("nodeName")},
        "status": {
            key: status[key]
            for key in ("phase", "reason", "message", "podIP", "conditions", "containerStatuses")
            if key in status
        },
    }


@dataclass
class PodIndex:
    """Slim copies of every non-terminated pod, and of every worker pod in any phase,
    fed by LISTs at start-up and the Pod watch: planning never LISTs all pods
    (megabytes at 1,000+ nodes) and a pass never LISTs its job's pods.

    Pods the operator creates are added at once (before the watch reports them) so
    the next job planned cannot book the same nodes and the next pass of the same
    job sees them.
    """

    _pods: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    _workers: dict[JobKey, dict[str, dict[str, Any]]] = field(default_factory=dict)
    """(namespace, job) -> pod name -> slim worker; finished pods too (exit codes)."""
    _holds: dict[JobKey, list[dict[str, Any]]] = field(default_factory=dict)
    """(namespace, job) -> stand-in workers holding its nodes until its restart launches
    (``discovery.held_workers``); only discovery sees them, never the job's passes."""
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def hold(self, job: JobKey, stand_ins: Sequence[Mapping[str, Any]]) -> int:
        """Replace the job's held stand-ins (none: release its hold); returns how many
        it let go. Kept in this process only: an operator restarted mid-restart
        forgets them until the job's next pass sets them again."""
        with self._lock:
            before = len(self._holds.get(job, ()))
            if stand_ins:
                self._holds[job] = [dict(s) for s in stand_ins]
            else:
                self._holds.pop(job, None)
        return max(0, before - len(stand_ins))

    def replace_workers(self, pods: Sequence[Mapping[str, Any]]) -> None:
        """Every worker pod, whatever its phase (start-up)."""
        workers: dict[JobKey, dict[str, dict[str, Any]]] = {}
        for pod in pods:
            job = self._job(pod)
            if job is not None:
                workers.setdefault(job, {})[str(pod["metadata"]["name"])] = slim_worker(pod)
        with self._lock:
            self._workers = workers

    @staticmethod
    def _key(pod: Mapping[str, Any]) -> tuple[str, str]:
        meta = pod.get("metadata", {})
        return str(meta.get("namespace", "")), str(meta.get("name", ""))

    @staticmethod
    def _job(pod: Mapping[str, Any]) -> JobKey | None:
        meta = pod.get("metadata", {})
        labels = meta.get("labels") or {}
        job = labels.get(JOB_LABEL)
        if not job or labels.get(ROLE_LABEL) != "worker":
            return None
        return str(meta.get("namespace", "")), str(job)

    def job_pods(self, key: JobKey) -> list[dict[str, Any]]:
        """The job's worker pods as last seen (or just created by this process)."""
        with self._lock:
            return list(self._workers.get(key, {}).values())

    def replace_all(self, pods: Sequence[Mapping[str, Any]]) -> None:
        with self._lock:
            self._pods = {self._key(p): slim_pod(p) for p in pods}

    def upsert(self, pod: Mapping[str, Any]) -> None:
        """A pod as the watch reports it (always wins over a booked manifest)."""
        key = self._key(pod)
        job = self._job(pod)
        with self._lock:
            if job is not None:
                self._workers.setdefault(job, {})[key[1]] = slim_worker(pod)
            if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                self._pods.pop(key, None)
            else:
                self._pods[key] = slim_pod(pod)

    def remove(self, pod: Mapping[str, Any]) -> None:
        """A pod DELETED event: drop it from both views."""
        key = self._key(pod)
        job = self._job(pod)
        with self._lock:
            self._pods.pop(key, None)
            if job is not None:
                self._drop_worker(job, key[1])

    def book(self, manifest: Mapping[str, Any]) -> None:
        """A pod this process is about to create: visible at once to discovery (so no
        other job plans onto its node) and to the job's next pass. Never replaces
        what the watch reported."""
        key = self._key(manifest)
        job = self._job(manifest)
        with self._lock:
            self._pods.setdefault(key, slim_pod(manifest))
            if job is not None:
                self._workers.setdefault(job, {}).setdefault(key[1], slim_worker(manifest))

    def unbook(self, manifest: Mapping[str, Any]) -> None:
        """Undo ``book`` after a failed apply, unless the watch has confirmed the pod
        (an entry with a resourceVersion exists on the server)."""
        key = self._key(manifest)
        job = self._job(manifest)
        with self._lock:
            if not self._pods.get(key, {}).get("metadata", {}).get("resourceVersion"):
                self._pods.pop(key, None)
            if job is not None:
                entry = self._workers.get(job, {}).get(key[1], {})
                if not entry.get("metadata", {}).get("resourceVersion"):
                    self._drop_worker(job, key[1])

    def _drop_worker(self, job: JobKey, name: str) -> None:
        pods = self._workers.get(job, {})
        pods.pop(name, None)
        if not pods:
            self._workers.pop(job, None)

    def snapshot(self) -> list[dict[str, Any]]:
        """Every pod discovery must count: live pods, booked ones, held stand-ins."""
        with self._lock:
            return [*self._pods.values(), *(s for held in self._holds.values() for s in held)]


CAPACITY_WAKE_SECONDS = 0.5
"""How long capacity signals are gathered before the jobs waiting for it are woken."""


@dataclass
class Wakeups:
    """One asyncio.Event per job: watches set it, the job's daemon waits on it.

    Also remembers which nodes each job's pods were on, so a Node event wakes only
    the jobs it concerns.
    """

    loop: asyncio.AbstractEventLoop | None = None
    _events: dict[JobKey, asyncio.Event] = field(default_factory=dict)
    _nodes_of: dict[JobKey, frozenset[str]] = field(default_factory=dict)
    _waiting: set[JobKey] = field(default_factory=set)
    """Jobs whose last pass found too little capacity: woken when capacity may be back."""
    _capacity_wake_pending: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def event(self, key: JobKey) -> asyncio.Event:
        with self._lock:
            return self._events.setdefault(key, asyncio.Event())

    def forget(self, key: JobKey) -> None:
        with self._lock:
            self._events.pop(key, None)
            self._nodes_of.pop(key, None)
            self._waiting.discard(key)

    def poke(self, key: JobKey) -> None:
        """Wake a job's daemon (safe from any thread)."""
        with self._lock:
            event = self._events.get(key)
        if event is None:
            return
        if self.loop is not None:
            self.loop.call_soon_threadsafe(event.set)
        else:
            event.set()

    def record_nodes(self, key: JobKey, nodes: frozenset[str]) -> None:
        with self._lock:
            self._nodes_of[key] = nodes

    def jobs_on(self, node: str) -> list[JobKey]:
        with self._lock:
            return [k for k, nodes in self._nodes_of.items() if node in nodes]

    def set_waiting(self, key: JobKey, waiting: bool) -> None:
        """Record whether ``key`` waits for capacity (see :meth:`capacity_may_be_back`)."""
        with self._lock:
            if waiting:
                self._waiting.add(key)
            else:
                self._waiting.discard(key)

    def capacity_may_be_back(self) -> None:
        """Wake every job waiting for capacity: a node became usable or a pod let go of
        its devices. Without this a waiting job only looked again at its next resync.

        Coalesced: the signals of one burst (a restart deletes every pod of a job, a
        node pool comes back at once) wake each waiting job once, ``CAPACITY_WAKE_SECONDS``
        after the first, instead of a pass per pod. Every waiting pass runs discovery
        under the capacity lock, which a job being launched or restarted needs too.
        """
        with self._lock:
            if self._capacity_wake_pending:
                return
            self._capacity_wake_pending = True
        if self.loop is None:
            self._wake_waiting()
        else:
            self.loop.call_soon_threadsafe(
                self.loop.call_later, CAPACITY_WAKE_SECONDS, self._wake_waiting
            )

    def _wake_waiting(self) -> None:
        with self._lock:
            self._capacity_wake_pending = False
            waiting = list(self._waiting)
        for key in waiting:
            self.poke(key)
