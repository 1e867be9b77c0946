"""Heterogeneous accelerator topologies as kwok fake Nodes.

A topology YAML lists pools of identical nodes (one accelerator grade each).
Nodes are created concurrently through the real API server and kwok's
node-initialize stage makes them Ready, so 1,000+ nodes take seconds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import yaml
from kubernetes.client import ApiClient, CoreV1Api, V1Node
from kubernetes.client.exceptions import ApiException

from tests.cluster.controlplane import KWOK_NODE_ANNOTATION

TOPOLOGY_DIR = Path(__file__).resolve().parents[1] / "topologies"
POOL_LABEL = "hetmoe.io/pool"
GRADE_LABEL = "hetmoe.io/accelerator"
DEFAULT_RESOURCE = "nvidia.com/gpu"
KWOK_ANNOTATION_KEY, KWOK_ANNOTATION_VALUE = KWOK_NODE_ANNOTATION
CREATE_WORKERS = 8
#: Each poll lists every node (MBs at 1,000+ nodes); polling faster steals the
#: apiserver CPU that kwok needs to make them Ready.
READY_POLL_SECONDS = 1.0


@dataclass(frozen=True)
class Pool:
    """A set of identical nodes carrying one accelerator grade."""

    name: str
    grade: str
    nodes: int
    devices_per_node: int
    resource_name: str = DEFAULT_RESOURCE
    cpu: str = "64"
    memory: str = "512Gi"
    max_pods: int = 110
    labels: dict[str, str] = field(default_factory=dict)
    taints: tuple[dict[str, str], ...] = ()

    def node_names(self) -> list[str]:
        return [f"{self.name}-{i:04d}" for i in range(self.nodes)]


@dataclass(frozen=True)
class Topology:
    name: str
    pools: tuple[Pool, ...]

    @property
    def total_nodes(self) -> int:
        return sum(p.nodes for p in self.pools)

    def node_names(self) -> list[str]:
        return [n for p in self.pools for n in p.node_names()]


def _pool_from_dict(raw: dict[str, Any]) -> Pool:
    return Pool(
        name=str(raw["name"]),
        grade=str(raw["grade"]),
        nodes=int(raw["nodes"]),
        devices_per_node=int(raw["devicesPerNode"]),
        resource_name=str(raw.get("resourceName", DEFAULT_RESOURCE)),
        cpu=str(raw.get("cpu", Pool.cpu)),
        memory=str(raw.get("memory", Pool.memory)),
        max_pods=int(raw.get("maxPods", Pool.max_pods)),
        labels={str(k): str(v) for k, v in (raw.get("labels") or {}).items()},
        taints=tuple(dict(t) for t in raw.get("taints") or ()),
    )


def load_topology(path: Path | str) -> Topology:
    """Parse a topology file; a bare name resolves inside tests/topologies/."""
    path = Path(path)
    if not path.exists() and not path.suffix:
        path = TOPOLOGY_DIR / f"{path}.yaml"
    raw = yaml.safe_load(path.read_text())
    pools = tuple(_pool_from_dict(p) for p in raw["pools"])
    names = [p.name for p in pools]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: duplicate pool names {names}")
    return Topology(name=str(raw.get("name", path.stem)), pools=pools)


def node_manifest(pool: Pool, name: str) -> dict[str, Any]:
    """A kwok-managed Node advertising the pool's devices as an extended resource."""
    resources = {
        "cpu": pool.cpu,
        "memory": pool.memory,
        "pods": str(pool.max_pods),
        pool.resource_name: str(pool.devices_per_node),
    }
    labels = {
        **pool.labels,
        POOL_LABEL: pool.name,
        GRADE_LABEL: pool.grade,
        "type": "kwok",
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {KWOK_ANNOTATION_KEY: KWOK_ANNOTATION_VALUE},
        },
        "spec": {"taints": [dict(t) for t in pool.taints]},
        "status": {"capacity": resources, "allocatable": dict(resources)},
    }


def node_manifests(topology: Topology) -> list[dict[str, Any]]:
    return [node_manifest(p, n) for p in topology.pools for n in p.node_names()]


def _create_node(api: CoreV1Api, body: dict[str, Any]) -> str:
    """Create one node; an existing one is fine so reruns are idempotent."""
    try:
        # The client sends plain dicts unchanged, which skips slow model building.
        api.create_node(cast(V1Node, body), _preload_content=False)
    except ApiException as err:
        if err.status != 409:
            raise
    return str(body["metadata"]["name"])


def create_nodes(client: ApiClient, topology: Topology, workers: int = CREATE_WORKERS) -> list[str]:
    """Create all nodes of a topology concurrently (the API server is the bottleneck)."""
    api = CoreV1Api(client)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda body: _create_node(api, body), node_manifests(topology)))


LIFECYCLE_TAINTS = frozenset({"node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"})
"""Taints the node lifecycle controller puts on a node until it has seen it Ready."""


def _is_ready(node: dict[str, Any]) -> bool:
    """Ready=True *and* no lifecycle taint left: only then will pods schedule on it.

    A new node reports Ready within seconds (kwok), but the controller-manager removes
    its ``not-ready`` taint later, one node at a time within its API rate limit. A
    benchmark that started on Ready-but-tainted nodes measured that queue instead of
    the operator (jobs waited ``WaitingForCapacity`` for 0 usable nodes).
    """
    conditions = node.get("status", {}).get("conditions") or []
    taints = node.get("spec", {}).get("taints") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions) and (
        not any(t.get("key") in LIFECYCLE_TAINTS for t in taints)
    )


def ready_node_names(client: ApiClient, label_selector: str = "type=kwok") -> set[str]:
    """Names of Ready, schedulable nodes (see ``_is_ready``), read as raw JSON because
    model parsing is slow at 1,000+.

    resourceVersion=0 is served from the apiserver's watch cache, which keeps
    frequent polling from competing with kwok for the apiserver's CPU.
    """
    response: Any = CoreV1Api(client).list_node(
        label_selector=label_selector, resource_version="0", _preload_content=False
    )
    items = json.loads(response.data)["items"]
    return {n["metadata"]["name"] for n in items if _is_ready(n)}


def wait_nodes_ready(client: ApiClient, names: Iterable[str], timeout: float = 180.0) -> None:
    """Block until every named node is Ready and free of lifecycle taints."""
    wanted = set(names)
    deadline = time.monotonic() + timeout
    while True:
        missing = wanted - ready_node_names(client)
        if not missing:
            return
        if time.monotonic() > deadline:
            sample = sorted(missing)[:5]
            raise TimeoutError(
                f"{len(missing)} nodes not Ready after {timeout:.0f}s, e.g. {sample}"
            )
        time.sleep(READY_POLL_SECONDS)


def apply_topology(client: ApiClient, topology: Topology, timeout: float = 300.0) -> list[str]:
    """Create a topology's nodes and wait for all of them to be Ready."""
    names = create_nodes(client, topology)
    wait_nodes_ready(client, names, timeout=timeout)
    return names


def delete_nodes(client: ApiClient, names: Iterable[str], workers: int = CREATE_WORKERS) -> None:
    """Delete nodes (missing ones are fine), e.g. after a benchmark run."""
    api = CoreV1Api(client)

    def delete(name: str) -> None:
        try:
            api.delete_node(name, _preload_content=False)
        except ApiException as err:
            if err.status != 404:
                raise

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(delete, names))
