"""Pools from Nodes: which whole nodes of which grade a job could use right now.

Pure: takes Node and Pod objects as plain dicts (as the API returns them) so the
operator, local mode and tests share it. A node is usable when it is Ready, not
cordoned, carries no NoSchedule/NoExecute taint the workers do not tolerate, has a
grade the catalog knows, and *all* of its devices are free: MoE training wants whole
nodes (the plan's intra-node bandwidth assumes it), so a half-used node is skipped
rather than planned on and left Pending by the scheduler.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from hetmoe_operator.api.catalog import DeviceCatalog
from hetmoe_operator.api.cluster import ClusterDescription, NodePool
from hetmoe_operator.api.job import PoolRef
from hetmoe_operator.api.operator_config import OperatorConfig, Toleration
from hetmoe_operator.desired.names import GENERATION_LABEL, ROLE_LABEL, WORKER_POOL_LABEL

Obj = Mapping[str, Any]


@dataclass(frozen=True)
class Discovery:
    """Usable pools plus why other nodes were not counted (for status messages)."""

    pools: tuple[NodePool, ...]
    skipped: Mapping[str, str] = field(default_factory=dict)
    """Node name -> reason it is not usable."""
    unknown_grades: Mapping[str, str] = field(default_factory=dict)
    """Pool name -> grade label value missing from the catalog."""
    reserved: Mapping[str, int] = field(default_factory=dict)
    """Pool name -> free nodes left out for other jobs' workers not yet bound."""

    def summary(self) -> str:
        """One line for condition messages, e.g. ``pool-a: 3 nodes of A; 2 skipped``."""
        parts = [f"{p.name}: {p.nodes} free node(s) of {p.grade}" for p in self.pools]
        if self.skipped:
            reasons: dict[str, int] = {}
            for reason in self.skipped.values():
                reasons[reason] = reasons.get(reason, 0) + 1
            parts.append("skipped " + ", ".join(f"{n} {r}" for r, n in sorted(reasons.items())))
        for pool, count in sorted(self.reserved.items()):
            if count:
                parts.append(f"{count} free node(s) of {pool} kept for other jobs' new workers")
        for pool, grade in sorted(self.unknown_grades.items()):
            parts.append(f"pool {pool} has grade {grade!r} unknown to the catalog")
        return "; ".join(parts) or "no nodes carry the pool and grade labels"


def worker_tolerations(resource_name: str, config: OperatorConfig) -> list[Toleration]:
    """Tolerations every worker pod carries: the device taint plus configured ones.

    Discovery and the pod builder share this so that a node counted as usable is a
    node the scheduler will actually bind the workers to.
    """
    return [Toleration(key=resource_name), *config.worker_tolerations]


def is_ready(node: Obj) -> bool:
    """Whether the Node's Ready condition is True."""
    for condition in node.get("status", {}).get("conditions") or ():
        if condition.get("type") == "Ready":
            return bool(condition.get("status") == "True")
    return False


def _labels(obj: Obj) -> Mapping[str, str]:
    return obj.get("metadata", {}).get("labels") or {}


def matches(node: Obj, refs: Sequence[PoolRef], pool_label: str) -> bool:
    """Whether the job's pool refs admit the node (no refs admit every node)."""
    if not refs:
        return True
    labels = _labels(node)
    for ref in refs:
        if ref.name is not None and labels.get(pool_label) == ref.name:
            return True
        if ref.selector is not None and all(labels.get(k) == v for k, v in ref.selector.items()):
            return True
    return False


def parse_quantity_int(value: object) -> int:
    """Integer count from an extended-resource quantity (``"8"``; ``"8k"`` style never
    occurs for devices, so anything else counts as zero rather than guessing)."""
    try:
        return int(str(value))
    except ValueError:
        return 0


def devices_in_use(
    pods: Iterable[Obj], resource_of: Mapping[str, str], ignore_owner_uid: str | None = None
) -> dict[str, int]:
    """Devices requested by non-terminated pods bound to each node of ``resource_of``
    (node name -> the extended resource its grade counts).

    Only the given nodes are counted, in one pass over the pods: with 1,000+ nodes
    and as many pods this runs under the operator's capacity lock for every plan, so
    pods on nodes the job cannot use cost one dict lookup. Pods owned by
    ``ignore_owner_uid`` (the job being re-planned, whose pods are about to be
    stopped) are not counted.
    """
    used: dict[str, int] = {}
    for pod in pods:
        node = pod.get("spec", {}).get("nodeName")
        resource = resource_of.get(node) if node else None
        if resource is None or pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            continue
        owners = pod.get("metadata", {}).get("ownerReferences") or ()
        if ignore_owner_uid and any(o.get("uid") == ignore_owner_uid for o in owners):
            continue
        for container in pod.get("spec", {}).get("containers") or ():
            requests = (container.get("resources") or {}).get("requests") or {}
            limits = (container.get("resources") or {}).get("limits") or {}
            count = parse_quantity_int(requests.get(resource, limits.get(resource, 0)))
            used[node] = used.get(node, 0) + count
    return used


def pending_workers(
    pods: Iterable[Obj], usable_nodes: Collection[str], ignore_owner_uid: str | None = None
) -> dict[str, int]:
    """Unscheduled hetmoe workers per pool that will each take a free whole node.

    Counting them keeps jobs planned moments apart from planning onto the same free
    nodes before the scheduler has bound the first job's pods. A restarting job's new
    workers, though, go where its previous generation is still being stopped: each
    older-generation worker of the same job and pool still bound to a usable node
    already holds the node one new worker will take, so it is not reserved twice.
    Counting it twice made a pool with two jobs restarting at once look a job's worth
    of nodes short, so the second one waited and could lose its nodes to a queued job.
    """
    pending: dict[tuple[str, str], list[int]] = {}  # (owner, pool) -> generations
    vacating: dict[tuple[str, str], list[int]] = {}
    for pod in pods:
        meta = pod.get("metadata", {})
        labels = meta.get("labels") or {}
        if labels.get(ROLE_LABEL) != "worker" or pod.get("status", {}).get("phase") in (
            "Succeeded",
            "Failed",
        ):
            continue
        owners = meta.get("ownerReferences") or ()
        owner = str(owners[0].get("uid")) if owners else ""
        if ignore_owner_uid and any(o.get("uid") == ignore_owner_uid for o in owners):
            continue
        pool = labels.get(WORKER_POOL_LABEL)
        if not pool:
            continue
        try:
            generation = int(labels.get(GENERATION_LABEL, 0))
        except ValueError:
            generation = 0
        node = pod.get("spec", {}).get("nodeName")
        if node:
            if node in usable_nodes:
                vacating.setdefault((owner, pool), []).append(generation)
        elif not meta.get("deletionTimestamp"):
            pending.setdefault((owner, pool), []).append(generation)
    reserved: dict[str, int] = {}
    for (owner, pool), generations in pending.items():
        newest = max(generations)
        held = sum(1 for g in vacating.get((owner, pool), ()) if g < newest) if owner else 0
        reserved[pool] = reserved.get(pool, 0) + max(0, len(generations) - held)
    return reserved


def held_workers(
    owner_uid: str, generation: int, nodes_per_pool: Mapping[str, int]
) -> list[dict[str, Any]]:
    """Stand-ins for the workers a restarting job will create once it launches: one
    Pending worker of its next generation per node of its plan, which
    :func:`pending_workers` reserves against every other job (and ignores for the job
    itself).

    A failed generation's pods are stopped at once, so without them the nodes would
    look free for the whole backoff, and a job queued for the same pool would take
    them: the job that only had to restart would then wait behind it.
    """
    return [
        {
            "metadata": {
                "labels": {
                    ROLE_LABEL: "worker",
                    WORKER_POOL_LABEL: pool,
                    GENERATION_LABEL: str(generation),
                },
                "ownerReferences": [{"uid": owner_uid}],
                "deletionTimestamp": None,
            },
            "spec": {"nodeName": None, "containers": []},
            "status": {"phase": "Pending"},
        }
        for pool, nodes in sorted(nodes_per_pool.items())
        for _ in range(nodes)
    ]


def discover(
    nodes: Iterable[Obj],
    pods: Iterable[Obj],
    catalog: DeviceCatalog,
    config: OperatorConfig,
    *,
    refs: Sequence[PoolRef] = (),
    excluded: Iterable[str] = (),
    ignore_owner_uid: str | None = None,
) -> Discovery:
    """Group usable nodes into pools; see the module docstring for "usable"."""
    pods = list(pods)
    excluded_set = set(excluded)
    known = {g.name: g for g in catalog.grades}
    skipped: dict[str, str] = {}
    unknown: dict[str, str] = {}
    candidates: list[tuple[str, str, str, int]] = []  # node, pool, grade, devices
    for node in nodes:
        name = str(node.get("metadata", {}).get("name", ""))
        labels = _labels(node)
        pool, grade_name = labels.get(config.pool_label), labels.get(config.grade_label)
        if not pool or not grade_name or not matches(node, refs, config.pool_label):
            continue
        grade = known.get(grade_name)
        reason = _unusable(
            node,
            name,
            excluded_set,
            worker_tolerations(grade.resource_name, config) if grade else None,
        )
        if grade is None:
            unknown[pool] = grade_name
        if reason:
            skipped[name] = reason
            continue
        assert grade is not None
        allocatable = parse_quantity_int(
            (node.get("status", {}).get("allocatable") or {}).get(grade.resource_name, 0)
        )
        if allocatable < 1:
            skipped[name] = "no devices"
            continue
        candidates.append((name, pool, grade.name, allocatable))
    usage = devices_in_use(
        pods, {n: known[g].resource_name for n, _, g, _ in candidates}, ignore_owner_uid
    )
    members: dict[str, list[tuple[str, str, int]]] = {}
    for name, pool, grade_name, allocatable in candidates:
        if usage.get(name, 0) > 0:
            skipped[name] = "devices in use"
            continue
        members.setdefault(pool, []).append((name, grade_name, allocatable))
    reserved = pending_workers(pods, {c[0] for c in candidates}, ignore_owner_uid)
    pools = []
    for pool_name in sorted(members):
        pool_nodes = members[pool_name]
        grade_name, per_node = _dominant(pool_nodes)
        names = sorted(n for n, g, d in pool_nodes if (g, d) == (grade_name, per_node))
        for n, g, d in pool_nodes:
            if (g, d) != (grade_name, per_node):
                skipped[n] = "differs from the rest of its pool"
        names = names[: max(0, len(names) - reserved.get(pool_name, 0))]
        names = _bounded(names, pool_name, refs)
        pools.append(
            NodePool(
                name=pool_name,
                grade=grade_name,
                nodes=len(names),
                devices_per_node=min(per_node, 64),
                node_names=names,
            )
        )
    return Discovery(
        pools=tuple(p for p in pools if p.nodes),
        skipped=skipped,
        unknown_grades=unknown,
        reserved={pool: min(n, len(members.get(pool, ()))) for pool, n in reserved.items() if n},
    )


def _unusable(node: Obj, name: str, excluded: set[str], allowed: list[Toleration] | None) -> str:
    if allowed is None:
        return "unknown grade"
    if name in excluded:
        return "excluded after a failure"
    if not is_ready(node):
        return "NotReady"
    spec = node.get("spec", {})
    if spec.get("unschedulable"):
        return "cordoned"
    for taint in spec.get("taints") or ():
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not any(
            t.tolerates(taint) for t in allowed
        ):
            return f"taint {taint.get('key')}"
    return ""


def _dominant(pool_nodes: list[tuple[str, str, int]]) -> tuple[str, int]:
    """The most common (grade, devices per node) of a pool; ties break by name."""
    counts: dict[tuple[str, int], int] = {}
    for _, grade, devices in pool_nodes:
        counts[(grade, devices)] = counts.get((grade, devices), 0) + 1
    return max(sorted(counts), key=lambda k: counts[k])


def _bounded(names: list[str], pool: str, refs: Sequence[PoolRef]) -> list[str]:
    """Apply a named ref's maxNodes (selector refs bound nothing: they span pools)."""
    for ref in refs:
        if ref.name == pool and ref.max_nodes is not None:
            return names[: ref.max_nodes]
    return names


def cluster_description(discovery: Discovery, catalog: DeviceCatalog) -> ClusterDescription | None:
    """The planner's input, or None when no pool is usable."""
    if not discovery.pools:
        return None
    return ClusterDescription(catalog=catalog, pools=list(discovery.pools))


def below_min_nodes(discovery: Discovery, refs: Sequence[PoolRef]) -> list[str]:
    """Messages for named pools with fewer usable nodes than their minNodes."""
    have = {p.name: p.nodes for p in discovery.pools}
    return [
        f"pool {ref.name} has {have.get(ref.name, 0)} usable node(s), minNodes is {ref.min_nodes}"
        for ref in refs
        if ref.name is not None and ref.min_nodes and have.get(ref.name, 0) < ref.min_nodes
    ]
