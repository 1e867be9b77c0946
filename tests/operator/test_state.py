"""The watch-fed caches a reconcile pass reads instead of the API server."""

from __future__ import annotations

from typing import Any

from hetmoe_operator.kube.state import JobCache, PodIndex


def worker(
    name: str, job: str = "j", rv: str | None = "5", phase: str = "Pending"
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": "ns",
        "labels": {"hetmoe.io/job": job, "hetmoe.io/role": "worker"},
    }
    if rv is not None:
        meta["resourceVersion"] = rv
    return {
        "metadata": meta,
        "spec": {"nodeName": "n1", "containers": []},
        "status": {"phase": phase},
    }


def test_workers_are_kept_per_job_in_every_phase_and_dropped_when_deleted() -> None:
    index = PodIndex()
    index.upsert(worker("a"))
    index.upsert(worker("b", phase="Failed"))
    index.upsert({"metadata": {"name": "other", "namespace": "ns"}, "spec": {}, "status": {}})
    assert sorted(p["metadata"]["name"] for p in index.job_pods(("ns", "j"))) == ["a", "b"]
    assert len(index.snapshot()) == 2, "finished pods hold no devices"
    index.remove(worker("b"))
    assert [p["metadata"]["name"] for p in index.job_pods(("ns", "j"))] == ["a"]


def test_booking_never_hides_what_the_watch_saw_and_unbooking_keeps_confirmed_pods() -> None:
    index = PodIndex()
    index.upsert(worker("seen", phase="Running"))
    index.book(worker("seen", rv=None))
    index.book(worker("new", rv=None))
    pods = {p["metadata"]["name"]: p for p in index.job_pods(("ns", "j"))}
    assert pods["seen"]["status"]["phase"] == "Running"
    index.unbook(worker("seen", rv=None))
    index.unbook(worker("new", rv=None))
    assert [p["metadata"]["name"] for p in index.job_pods(("ns", "j"))] == ["seen"]
    assert len(index.snapshot()) == 1


def test_a_hold_is_seen_by_discovery_only_and_released_when_emptied() -> None:
    index = PodIndex()
    index.upsert(worker("a", phase="Running"))
    stand_in = {"metadata": {"labels": {"hetmoe.io/role": "worker"}}, "spec": {}, "status": {}}
    assert index.hold(("ns", "j"), [stand_in, stand_in]) == 0
    assert len(index.snapshot()) == 3
    assert [p["metadata"]["name"] for p in index.job_pods(("ns", "j"))] == ["a"]
    assert index.hold(("ns", "j"), [stand_in]) == 1, "one node let go: wake waiting jobs"
    assert index.hold(("ns", "j"), []) == 1
    assert len(index.snapshot()) == 1
    assert index.hold(("ns", "j"), []) == 0


def test_job_cache_keeps_the_newest_resource_version() -> None:
    cache = JobCache()
    cache.put({"metadata": {"namespace": "ns", "name": "j", "resourceVersion": "10"}})
    cache.put({"metadata": {"namespace": "ns", "name": "j", "resourceVersion": "9"}})
    assert cache.get(("ns", "j"))["metadata"]["resourceVersion"] == "10"  # type: ignore[index]
    cache.put({"metadata": {"namespace": "ns", "name": "j", "resourceVersion": "11"}})
    assert cache.get(("ns", "j"))["metadata"]["resourceVersion"] == "11"  # type: ignore[index]
    cache.remove(("ns", "j"))
    assert cache.get(("ns", "j")) is None


def test_a_node_not_ready_for_a_moment_still_counts_as_up_a_deleted_one_never() -> None:
    from datetime import UTC, datetime, timedelta

    from hetmoe_operator.kube.state import NodeCache
    from hetmoe_operator.reconcile.failures import NOT_READY_GRACE_SECONDS

    flipped = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    cache = NodeCache()
    cache.replace_all(
        [
            {
                "metadata": {"name": name},
                "status": {
                    "conditions": [
                        {
                            "type": "Ready",
                            "status": status,
                            "lastTransitionTime": flipped.strftime("%Y-%m-%dT%H:%M:%SZ"),
                        }
                    ]
                },
            }
            for name, status in (("up", "True"), ("blip", "False"))
        ]
    )
    assert cache.readiness(flipped + timedelta(seconds=5)) == {"up": True, "blip": True}
    late = flipped + timedelta(seconds=NOT_READY_GRACE_SECONDS + 1)
    assert cache.readiness(late) == {"up": True, "blip": False}
    cache.remove("blip")
    assert cache.readiness(late) == {"up": True}


def node(taints: list[dict[str, str]], heartbeat: str = "12:00:00") -> dict[str, Any]:
    return {
        "metadata": {"name": "n1", "labels": {"hetmoe.io/pool": "a"}},
        "spec": {"taints": taints},
        "status": {
            "allocatable": {"nvidia.com/gpu": "8"},
            "conditions": [
                {
                    "type": "Ready",
                    "status": "True",
                    "lastHeartbeatTime": f"2026-01-01T{heartbeat}Z",
                    "lastTransitionTime": "2026-01-01T11:00:00Z",
                }
            ],
        },
    }


def test_a_lifted_taint_is_a_node_change_and_a_heartbeat_is_not() -> None:
    from hetmoe_operator.kube.state import NodeCache

    cache = NodeCache()
    tainted = [{"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}]
    assert cache.upsert(node(tainted)), "a new node"
    assert not cache.upsert(node(tainted, heartbeat="12:00:10")), "only the heartbeat moved"
    assert cache.upsert(node([])), "the lifecycle controller lifted its taint: now usable"


def test_only_jobs_waiting_for_capacity_are_woken_when_it_may_be_back() -> None:
    from hetmoe_operator.kube.state import Wakeups

    wakeups = Wakeups()
    waiting, running = ("ns", "waiting"), ("ns", "running")
    events = {key: wakeups.event(key) for key in (waiting, running)}
    wakeups.set_waiting(waiting, True)
    wakeups.set_waiting(running, False)
    wakeups.capacity_may_be_back()
    assert events[waiting].is_set() and not events[running].is_set()
    events[waiting].clear()
    wakeups.set_waiting(waiting, False)  # it found its nodes
    wakeups.capacity_may_be_back()
    assert not events[waiting].is_set()


def test_a_burst_of_capacity_signals_wakes_each_waiting_job_once() -> None:
    import asyncio

    from hetmoe_operator.kube.state import CAPACITY_WAKE_SECONDS, Wakeups

    key = ("ns", "waiting")

    async def burst() -> tuple[list[Any], bool]:
        wakeups = Wakeups(loop=asyncio.get_running_loop())
        event = wakeups.event(key)
        wakeups.set_waiting(key, True)
        pokes: list[Any] = []
        poke = wakeups.poke
        wakeups.poke = lambda k: (pokes.append(k), poke(k))[1]  # type: ignore[method-assign]
        for _ in range(16):  # a restart deleting 16 pods
            wakeups.capacity_may_be_back()
        await asyncio.sleep(CAPACITY_WAKE_SECONDS + 0.3)
        return pokes, event.is_set()

    pokes, woken = asyncio.run(burst())
    assert pokes == [key] and woken
