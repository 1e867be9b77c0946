"""Discovery: which whole nodes are usable, grouped into pools."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from hetmoe_operator.api.job import PoolRef
from hetmoe_operator.api.operator_config import OperatorConfig, Toleration
from hetmoe_operator.discovery import discover
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
