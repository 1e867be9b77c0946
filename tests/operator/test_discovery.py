"""Discovery: which whole nodes are usable, grouped into pools."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from hetmoe_operator.api.job import PoolRef
from hetmoe_operator.api.operator_config import OperatorConfig, Toleration
from hetmoe_operator.discovery import discover, held_workers
from tests.operator.fakes import catalog, node

CONFIG = OperatorConfig()


def pod_on(
    node_name: str, devices: int, owner: str = "other", phase: str = "Running"
) -> dict[str, Any]:
    return {
        "metadata": {"ownerReferences": [{"uid": owner}]},
        "spec": {
            "nodeName": node_name,
            "containers": [{"resources": {"requests": {"nvidia.com/gpu": str(devices)}}}],
        },
        "status": {"phase": phase},
    }


def test_groups_ready_nodes_into_pools_by_label() -> None:
    found = discover(
        [
            node("a0", "pool-a", "A"),
            node("a1", "pool-a", "A"),
            node("d0", "pool-d", "D", devices=4),
        ],
        [],
        catalog(),
        CONFIG,
    )
    assert [(p.name, p.grade, p.nodes, p.devices_per_node) for p in found.pools] == [
        ("pool-a", "A", 2, 8),
        ("pool-d", "D", 1, 4),
    ]
    assert found.pools[0].node_names == ["a0", "a1"]


def test_skips_not_ready_cordoned_tainted_busy_and_excluded_nodes() -> None:
    nodes = [
        node("ok", "p", "A"),
        node("down", "p", "A", ready=False),
        node("cordoned", "p", "A", unschedulable=True),
        node("tainted", "p", "A", taints=[{"key": "x", "effect": "NoSchedule"}]),
        node("busy", "p", "A"),
        node("bad", "p", "A"),
    ]
    found = discover(
        nodes,
        [pod_on("busy", 1), pod_on("ok", 8, owner="me")],
        catalog(),
        CONFIG,
        excluded=["bad"],
        ignore_owner_uid="me",
    )
    assert found.pools[0].node_names == ["ok"]
    assert found.skipped == {
        "down": "NotReady",
        "cordoned": "cordoned",
        "tainted": "taint x",
        "busy": "devices in use",
        "bad": "excluded after a failure",
    }


def test_configured_tolerations_admit_tainted_nodes() -> None:
    config = OperatorConfig(worker_tolerations=[Toleration(key="x")])
    found = discover(
        [node("t", "p", "A", taints=[{"key": "x", "effect": "NoSchedule"}])], [], catalog(), config
    )
    assert found.pools[0].nodes == 1


def test_finished_pods_free_their_devices_and_pending_workers_reserve_a_node() -> None:
    pending = {
        "metadata": {
            "labels": {"hetmoe.io/role": "worker", "hetmoe.io/pool": "p"},
            "ownerReferences": [{"uid": "other"}],
        },
        "spec": {},
        "status": {"phase": "Pending"},
    }
    found = discover(
        [node("n0", "p", "A"), node("n1", "p", "A")],
        [pod_on("n0", 8, phase="Succeeded"), pending],
        catalog(),
        CONFIG,
    )
    assert found.pools[0].nodes == 1


def worker(
    owner: str, generation: int, node_name: str | None = None, *, deleting: bool = False
) -> dict[str, Any]:
    """A hetmoe worker of pool ``p``: bound to ``node_name``, or Pending without it."""
    return {
        "metadata": {
            "labels": {
                "hetmoe.io/role": "worker",
                "hetmoe.io/pool": "p",
                "hetmoe.io/generation": str(generation),
            },
            "ownerReferences": [{"uid": owner}],
            "deletionTimestamp": "2026-11-24T00:00:00Z" if deleting else None,
        },
        "spec": {
            "nodeName": node_name,
            "containers": [{"resources": {"requests": {"nvidia.com/gpu": "8"}}}],
        },
        "status": {"phase": "Running" if node_name else "Pending"},
    }


def test_a_restarting_jobs_new_workers_take_the_nodes_its_old_ones_leave() -> None:
    """Job "a" restarts: its generation-2 workers are Pending while its generation-1
    workers still hold n0 and n1 (one already terminating, one not yet told to stop).
    Job "b", restarting at the same moment, must still see its own two nodes: counting
    a's new workers against the pool as well would leave b two nodes short."""
    nodes = [node(f"n{i}", "p", "A") for i in range(5)]
    pods = [
        worker("a", 1, "n0", deleting=True),
        worker("a", 1, "n1"),
        worker("a", 2),
        worker("a", 2),
        worker("b", 1, "n2"),
        worker("b", 1, "n3"),
    ]
    found = discover(nodes, pods, catalog(), CONFIG, ignore_owner_uid="b")
    assert found.pools[0].node_names == ["n2", "n3", "n4"]
    # Seen by a third job, a's new workers fill no free node: n4 stays free.
    assert discover(nodes, pods, catalog(), CONFIG).pools[0].node_names == ["n4"]


def test_new_workers_still_reserve_a_node_when_the_old_ones_sit_on_unusable_nodes() -> None:
    """An old worker on a NotReady node (or a same-generation bound worker) frees
    nothing the new ones could use, so they reserve free nodes as before."""
    nodes = [node("dead", "p", "A", ready=False), node("n0", "p", "A"), node("n1", "p", "A")]
    pods = [worker("a", 1, "dead", deleting=True), worker("a", 2, "n0"), worker("a", 2)]
    found = discover(nodes, pods, catalog(), CONFIG)
    assert found.pools == ()  # n1, the one free node, is the pending worker's
    assert found.skipped["n0"] == "devices in use"


def test_held_workers_keep_a_restarting_jobs_nodes_from_everyone_else() -> None:
    """Job "a" waits out a restart backoff: its failed worker frees n0 and its other
    worker on n1 is terminating. Its stand-ins keep both nodes from job "b"."""
    nodes = [node(f"n{i}", "p", "A") for i in range(3)]
    pods = [
        {**worker("a", 1, "n0"), "status": {"phase": "Failed"}},
        worker("a", 1, "n1", deleting=True),
        *held_workers("a", 2, {"p": 2}),
    ]
    others = discover(nodes, pods, catalog(), CONFIG, ignore_owner_uid="b")
    assert others.pools[0].nodes == 1  # n2 only: two stand-ins, two nodes kept
    mine = discover(nodes, pods, catalog(), CONFIG, ignore_owner_uid="a")
    assert mine.pools[0].node_names == ["n0", "n1", "n2"]


def test_unknown_grades_are_reported_not_planned() -> None:
    found = discover([node("z0", "pool-z", "Z")], [], catalog(), CONFIG)
    assert found.pools == () and found.unknown_grades == {"pool-z": "Z"}
    assert "unknown to the catalog" in found.summary()


def test_pool_refs_filter_by_name_or_selector_and_bound_max_nodes() -> None:
    nodes = [node(f"a{i}", "pool-a", "A") for i in range(4)] + [node("d0", "pool-d", "D")]
    by_name = discover(nodes, [], catalog(), CONFIG, refs=[PoolRef(name="pool-a", max_nodes=2)])
    assert [(p.name, p.nodes) for p in by_name.pools] == [("pool-a", 2)]
    by_label = discover(
        nodes, [], catalog(), CONFIG, refs=[PoolRef(selector={"hetmoe.io/accelerator": "D"})]
    )
    assert [(p.name, p.nodes) for p in by_label.pools] == [("pool-d", 1)]


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["p", "q"]),
            st.sampled_from(["A", "B", "Z"]),
            st.integers(0, 8),
            st.booleans(),
            st.integers(0, 8),
        ),
        max_size=20,
    )
)
def test_every_usable_node_is_counted_once_and_fully_free(rows: list[Any]) -> None:
    nodes = [
        node(f"n{i}", pool, grade, devices=devices, ready=ready)
        for i, (pool, grade, devices, ready, _) in enumerate(rows)
    ]
    pods = [pod_on(f"n{i}", used) for i, (*_, used) in enumerate(rows) if used]
    found = discover(nodes, pods, catalog(), CONFIG)
    names = [n for p in found.pools for n in p.node_names]
    assert len(names) == len(set(names))
    for name in names:
        i = int(name[1:])
        pool, grade, devices, ready, used = rows[i]
        assert ready and used == 0 and devices > 0 and grade != "Z"
    for pool in found.pools:
        assert pool.nodes == len(pool.node_names) > 0
