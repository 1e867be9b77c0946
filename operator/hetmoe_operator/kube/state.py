"""In-memory state of one operator process: the node cache and per-job wake-ups.

Both are rebuilt from the API server at start-up (the node cache by a full LIST before
any job is reconciled), so losing them with the process loses nothing.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hetmoe_operator.discovery import is_ready

JobKey = tuple[str, str]


def slim_node(node: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a Node discovery and health checks read (keeps memory flat)."""
    meta, spec, status = node.get("metadata", {}), node.get("spec") or {}, node.get("status") or {}
    ready = is_ready(node)
    return {
        "metadata": {"name": meta.get("name"), "labels": dict(meta.get("labels") or {})},
        "spec": {
            "unschedulable": bool(spec.get("unschedulable")),
            "taints": list(spec.get("taints") or []),
        },
        "status": {
            "allocatable": dict(status.get("allocatable") or {}),
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
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
        """Store a node; True if it is new or its readiness flipped."""
        slim = slim_node(node)
        name = slim["metadata"]["name"]
        with self._lock:
            old = self._nodes.get(name)
            self._nodes[name] = slim
        return old is None or is_ready(old) != is_ready(slim)

    def remove(self, name: str) -> None:
        with self._lock:
            self._nodes.pop(name, None)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._nodes.values())

    def readiness(self) -> dict[str, bool]:
        with self._lock:
            return {name: is_ready(n) for name, n in self._nodes.items()}


def slim_pod(pod: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a Pod discovery reads: owner, labels, node, device requests, phase."""
    meta, spec = pod.get("metadata", {}), pod.get("spec") or {}
    return {
        "metadata": {
            "labels": dict(meta.get("labels") or {}),
            "ownerReferences": [{"uid": o.get("uid")} for o in meta.get("ownerReferences") or ()],
            "deletionTimestamp": meta.get("deletionTimestamp"),
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


@dataclass
class PodIndex:
    """Slim copies of every non-terminated pod, fed by a LIST at start-up and the Pod
    watch, so planning never LISTs all pods (megabytes at 1,000+ nodes).

    Pods the operator creates are added at once (before the watch reports them) so
    the next job planned cannot book the same nodes.
    """

    _pods: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    @staticmethod
    def _key(pod: Mapping[str, Any]) -> tuple[str, str]:
        meta = pod.get("metadata", {})
        return str(meta.get("namespace", "")), str(meta.get("name", ""))

    def replace_all(self, pods: Sequence[Mapping[str, Any]]) -> None:
        with self._lock:
            self._pods = {self._key(p): slim_pod(p) for p in pods}

    def upsert(self, pod: Mapping[str, Any]) -> None:
        key = self._key(pod)
        if (pod.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
            self.remove(*key)
            return
        with self._lock:
            self._pods[key] = slim_pod(pod)

    def remove(self, namespace: str, name: str) -> None:
        with self._lock:
            self._pods.pop((namespace, name), None)

    def snapshot(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._pods.values())


@dataclass
class Wakeups:
    """One asyncio.Event per job: watches set it, the job's daemon waits on it.

    Also remembers which nodes each job's pods were on, so a Node event wakes only
    the jobs it concerns.
    """

    loop: asyncio.AbstractEventLoop | None = None
    _events: dict[JobKey, asyncio.Event] = field(default_factory=dict)
    _nodes_of: dict[JobKey, frozenset[str]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def event(self, key: JobKey) -> asyncio.Event:
        with self._lock:
            return self._events.setdefault(key, asyncio.Event())

    def forget(self, key: JobKey) -> None:
        with self._lock:
            self._events.pop(key, None)
            self._nodes_of.pop(key, None)

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
