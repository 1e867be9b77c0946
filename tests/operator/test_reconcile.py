"""Reconcile decisions driven through an in-memory world with a fake planner."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hetmoe_operator.api.reasons import is_known
from hetmoe_operator.placement.errors import PlanningError
from hetmoe_operator.plan import WAITING_FOR_PEERS_MARK, WorkerExit, replace_node_request
from hetmoe_operator.reconcile.conditions import rfc3339
from hetmoe_operator.reconcile.decide import BROKEN_GANG_GRACE_SECONDS, DELETE_POLL_SECONDS
from hetmoe_operator.reconcile.failures import (
    PEER_WAIT_SETTLE_SECONDS,
    REPLACEMENT_UNSCHEDULABLE_SECONDS,
    RESTART_HOLD_SECONDS,
    STUCK_TERMINATING_SECONDS,
    keeps_its_nodes,
)
from hetmoe_operator.reconcile.planning import restart_hold
from tests.operator.fakes import World, fake_planner, small_nodes, spec


def running_world(**spec_overrides: Any) -> World:
    world = World(spec(**spec_overrides), small_nodes())
    world.settle(3)
    assert world.status.phase == "Running", world.status
    return world


def test_fresh_job_creates_plan_service_and_one_pod_per_node() -> None:
    world = World(spec(), small_nodes())
    decision = world.reconcile()
    kinds = [m["kind"] for m in decision.creates]
    assert kinds == ["ConfigMap", "Service", "Pod", "Pod"]
    assert world.status.phase == "Planning"
    assert world.status.generation == 1 and world.status.plan_generation == 1
    assert world.status.grades == "A:1,D:1"
    assert world.status.plan is not None and world.status.plan.world_size == 4
    assert sorted(world.pods) == ["job-g1-pool-a-0", "job-g1-pool-d-0"]


def test_all_pods_running_means_running_and_ready() -> None:
    world = running_world()
    ready = next(c for c in world.status.conditions if c.type == "Ready")
    assert (ready.status, ready.reason) == ("True", "WorkersRunning")
    assert ready.observed_generation == 1
    assert world.pod_creates == 2


def test_pod_failure_restarts_with_cause_backoff_and_kept_plan() -> None:
    world = running_world()
    world.fail_pod("job-g1-pool-a-0", exit_code=1)
    world.reconcile()
    status = world.status
    assert status.phase == "Restarting" and status.restarts == 1
    assert status.last_failure is not None
    assert (status.last_failure.pod, status.last_failure.node, status.last_failure.exit_code) == (
        "job-g1-pool-a-0",
        "a0",
        1,
    )
    assert status.last_failure.cause == "WorkerFailed"
    world.settle(4)
    assert world.status.phase == "Running" and world.status.generation == 2
    assert world.status.plan_generation == 1  # capacity allowed keeping the plan
    assert sorted(world.pods) == ["job-g2-pool-a-0", "job-g2-pool-d-0"]
    assert any(e.reason == "PlanKept" for e in world.events)


def test_without_backoff_the_failure_pass_itself_creates_the_next_generation() -> None:
    world = running_world(elastic={"maxRestarts": 3, "backoffSeconds": 0})
    world.fail_pod("job-g1-pool-a-0", exit_code=1)
    decision = world.reconcile()
    created = sorted(m["metadata"]["name"] for m in decision.creates if m["kind"] == "Pod")
    assert created == ["job-g2-pool-a-0", "job-g2-pool-d-0"]
    stopped = [d.name for d in decision.deletes]
    assert sorted(stopped) == ["job-g1-pool-a-0", "job-g1-pool-d-0"], "each old pod, once"
    assert world.status.phase == "Restarting" and world.status.generation == 2
    assert world.status.restarts == 1 and world.status.last_failure is not None


def test_a_restart_in_backoff_holds_its_plans_nodes_until_the_next_generation() -> None:
    world = running_world()
    world.fail_pod("job-g1-pool-a-0", exit_code=1)
    world.reconcile()
    held = restart_hold(world.observation(), world.status)
    assert sorted(
        (w["metadata"]["labels"]["hetmoe.io/pool"], w["metadata"]["labels"]["hetmoe.io/generation"])
        for w in held
    ) == [("pool-a", "2"), ("pool-d", "2")]
    assert all(w["metadata"]["ownerReferences"] == [{"uid": "uid-1"}] for w in held)
    world.settle(4)  # the backoff ends, the next generation launches: nothing is held
    assert world.status.phase == "Running" and world.status.generation == 2
    assert restart_hold(world.observation(), world.status) == []


def test_a_restart_short_of_nodes_keeps_them_for_a_while_then_lets_them_go() -> None:
    world = running_world()
    world.fail_pod("job-g1-pool-a-0", exit_code=1)
    world.reconcile()
    status, after = world.status, datetime.fromisoformat(world.status.restart_after or "")
    hold = timedelta(seconds=RESTART_HOLD_SECONDS)
    assert keeps_its_nodes(status, after + hold - timedelta(seconds=1))
    assert not keeps_its_nodes(status, after + hold + timedelta(seconds=1))
    assert not keeps_its_nodes(status.model_copy(update={"phase": "Running"}), after)


def test_an_in_place_restart_is_one_event_and_a_new_generation_counts_afresh() -> None:
    from hetmoe_operator.api.status import Progress

    world = running_world(elastic={"maxRestarts": 3, "backoffSeconds": 0, "inPlaceRestarts": 2})
    reason = "pool pool-a node slot 0: plan rank 1: RuntimeError in forward: boom"
    world.progress = Progress(step=9, in_place_restarts=1, last_in_place_restart=reason)
    world.reconcile()
    world.reconcile()  # the same report again: no second event
    in_place = [e for e in world.events if e.reason == "RestartedInPlace"]
    assert len(in_place) == 1 and reason in in_place[0].message, in_place
    assert is_known("RestartedInPlace")
    status = world.status
    assert status.phase == "Running" and status.restarts == 0 and status.generation == 1
    assert status.progress is not None and status.progress.in_place_restarts == 1
    world.progress = None  # a pod failure: the next generation's launch starts at 0
    world.fail_pod("job-g1-pool-a-0", exit_code=1)
    world.settle(4)
    assert world.status.generation == 2 and world.status.progress is not None
    assert world.status.progress.in_place_restarts == 0
    assert world.status.progress.last_in_place_restart is None
    world.progress = Progress(step=12, in_place_restarts=1, last_in_place_restart=reason)
    world.reconcile()
    assert len([e for e in world.events if e.reason == "RestartedInPlace"]) == 2


IN_PLACE = {"maxRestarts": 3, "backoffSeconds": 0, "inPlaceRestarts": 1}


def test_with_in_place_restarts_a_pod_that_failed_alone_is_replaced_alone() -> None:
    world = running_world(elastic=IN_PLACE)
    world.fail_pod("job-g1-pool-d-0", exit_code=137)
    decision = world.reconcile()
    assert [m["metadata"]["name"] for m in decision.creates if m["kind"] == "Pod"] == [
        "job-g1-pool-d-0-r1"
    ]
    assert [d.name for d in decision.deletes] == ["job-g1-pool-d-0"]
    status = world.status
    assert (status.phase, status.generation, status.restarts) == ("Restarting", 1, 1)
    assert status.replaced_pods == ["job-g1-pool-d-0"]
    assert status.last_failure is not None and status.last_failure.replaced_alone
    assert status.last_failure.pod == "job-g1-pool-d-0"
    restarting = next(c for c in status.conditions if c.type == "Restarting")
    assert restarting.reason == "PodReplaced" and is_known("PodReplaced")
    world.settle(4)
    assert world.status.phase == "Running" and world.status.generation == 1
    assert sorted(world.pods) == ["job-g1-pool-a-0", "job-g1-pool-d-0-r1"]
    assert world.pod_creates == 3, "the surviving pod was left alone"


def test_the_rendezvous_hosts_pod_is_never_replaced_alone() -> None:
    world = running_world(elastic=IN_PLACE)
    world.fail_pod("job-g1-pool-a-0", exit_code=137)
    world.settle(4)
    assert world.status.generation == 2 and world.status.replaced_pods == []
    assert sorted(world.pods) == ["job-g2-pool-a-0", "job-g2-pool-d-0"]


def test_pod_replacements_stop_at_the_in_place_budget_then_the_generation_restarts() -> None:
    world = running_world(elastic=IN_PLACE)
    world.fail_pod("job-g1-pool-d-0", exit_code=137)
    world.settle(4)
    world.fail_pod("job-g1-pool-d-0-r1", exit_code=137)
    world.settle(4)
    status = world.status
    assert (status.phase, status.generation, status.restarts) == ("Running", 2, 2)
    assert status.replaced_pods == [] and sorted(world.pods) == [
        "job-g2-pool-a-0",
        "job-g2-pool-d-0",
    ]


@pytest.mark.parametrize("spare", [True, False])
def test_a_pod_on_a_lost_node_is_replaced_alone_only_with_a_spare_node(spare: bool) -> None:
    world = running_world(elastic=IN_PLACE)
    lost = world.pods["job-g1-pool-d-0"]["spec"]["nodeName"]
    if not spare:
        del world.nodes[next(n for n in ("d0", "d1") if n != lost)]
    del world.nodes[lost]
    world.reconcile()
    if spare:
        assert world.status.replaced_pods == ["job-g1-pool-d-0"] and world.status.generation == 1
        world.settle(4)
        assert world.status.phase == "Running"
        assert world.pods["job-g1-pool-d-0-r1"]["spec"]["nodeName"] not in (lost, "")
    else:
        assert world.status.replaced_pods == [] and world.status.phase != "Running"
        assert "job-g1-pool-d-0-r1" not in world.pods


def _turned_away(world: World, name: str) -> None:
    """The scheduler's verdict on pod ``name``, from now on."""
    world.pods[name]["status"]["conditions"] = [
        {
            "type": "PodScheduled",
            "status": "False",
            "reason": "Unschedulable",
            "message": "0/4 nodes are available: 4 Insufficient nvidia.com/gpu.",
            "lastTransitionTime": rfc3339(world.now),
        }
    ]


def test_a_replacement_the_scheduler_cannot_place_restarts_the_generation_uncounted() -> None:
    world = running_world(elastic=IN_PLACE)
    world.fail_pod("job-g1-pool-d-0", exit_code=137)
    world.reconcile()
    assert world.status.replaced_pods == ["job-g1-pool-d-0"]
    _turned_away(world, "job-g1-pool-d-0-r1")
    world.advance(REPLACEMENT_UNSCHEDULABLE_SECONDS - 1)
    decision = world.reconcile()
    assert world.status.generation == 1, "the scheduler may still place it"
    assert decision.requeue_after is not None and 0 < decision.requeue_after <= 1
    world.advance(2)
    world.reconcile()
    status = world.status
    assert (status.generation, status.restarts, status.uncounted_restarts) == (2, 1, 1)
    assert status.replaced_pods == [] and status.last_failure is not None
    assert status.last_failure.cause == "ReplacementUnschedulable"
    assert is_known("ReplacementUnschedulable")
    assert [e.type for e in world.events if e.reason == "ReplacementUnschedulable"] == ["Warning"]
    assert "replaced job-g1-pool-d-0 alone" in status.last_failure.message
    assert "Insufficient nvidia.com/gpu" in status.last_failure.message
    world.settle(4)
    assert world.status.phase == "Running" and world.status.generation == 2
    assert sorted(world.pods) == ["job-g2-pool-a-0", "job-g2-pool-d-0"]


def test_a_replacement_is_not_judged_while_its_predecessor_still_holds_its_node() -> None:
    world = running_world(elastic=IN_PLACE)
    world.linger = True  # the failed pod's deletion takes its time
    world.fail_pod("job-g1-pool-d-0", exit_code=137)
    world.reconcile()
    _turned_away(world, "job-g1-pool-d-0-r1")
    world.advance(REPLACEMENT_UNSCHEDULABLE_SECONDS + 5)
    world.reconcile()
    assert world.status.generation == 1 and "job-g1-pool-d-0" in world.pods
    world.finish_terminating()
    world.kwok()  # now the scheduler places it
    world.reconcile()
    assert world.status.phase == "Running" and world.status.generation == 1
    assert world.status.replaced_pods == ["job-g1-pool-d-0"]


def test_a_pod_that_fails_while_another_is_not_running_restarts_the_generation() -> None:
    world = running_world(elastic=IN_PLACE)
    world.pods["job-g1-pool-a-0"]["status"]["phase"] = "Pending"
    world.fail_pod("job-g1-pool-d-0", exit_code=137)
    world.reconcile()
    assert world.status.generation == 2 and world.status.replaced_pods == []


def test_backoff_doubles_up_to_the_cap() -> None:
    from hetmoe_operator.reconcile.failures import backoff_seconds

    assert [backoff_seconds(1, 4, n) for n in range(5)] == [1, 2, 4, 4, 4]
    assert backoff_seconds(10, 300, 10_000) == 300


def test_exceeding_max_restarts_fails_with_the_cause() -> None:
    world = running_world()
    for _ in range(3):
        generation = world.status.generation
        name = f"job-g{generation}-pool-d-0"
        world.fail_pod(name, exit_code=3)
        world.settle(4)
    assert world.status.phase == "Failed"
    failed = next(c for c in world.status.conditions if c.type == "Failed")
    assert failed.reason == "MaxRestartsExceeded"
    assert "exited with code 3" in failed.message and "maxRestarts=2" in failed.message
    assert world.status.restarts == 2
    assert not any(p["status"]["phase"] == "Running" for p in world.pods.values())


def test_config_error_exit_fails_without_restart() -> None:
    world = running_world()
    world.fail_pod("job-g1-pool-a-0", exit_code=78)
    world.reconcile()
    assert world.status.phase == "Failed"
    assert world.status.last_failure is not None
    assert world.status.last_failure.cause == "ConfigError"
    assert [d.name for d in world.last_decision.deletes] == ["job-g1-pool-d-0"]


def test_replace_node_excludes_the_node_from_the_next_generation() -> None:
    world = running_world()
    world.fail_pod("job-g1-pool-a-0", exit_code=86)
    world.settle(4)
    assert world.status.excluded_nodes == ["a0"]
    assert world.status.phase == "Running"
    assert world.pods["job-g2-pool-a-0"]["spec"]["nodeName"] == "a1"


def test_replace_node_leaves_out_the_node_the_workers_name_whichever_pod_is_seen_first() -> None:
    world = running_world()
    world.fail_pod(
        "job-g1-pool-d-0",
        exit_code=86,
        message="plan rank 2: rank 0 (pool-a node 0) straggled for 20 steps (score 2.40); "
        f"checkpoint saved at step 7; {replace_node_request('pool-a', 0)}",
    )
    world.settle(4)
    assert world.status.excluded_nodes == ["a0"]
    assert world.status.last_failure is not None
    assert (world.status.last_failure.pod, world.status.last_failure.node) == (
        "job-g1-pool-a-0",
        "a0",
    )
    assert world.pods["job-g2-pool-a-0"]["spec"]["nodeName"] == "a1"
    assert world.pods["job-g2-pool-d-0"]["spec"]["nodeName"] == "d0"


def _hang_reason(plan_rank: int, phase: str, *, waiting: bool) -> str:
    mark = f" {WAITING_FOR_PEERS_MARK}" if waiting else ""
    return f"plan rank {plan_rank}: no progress for 1800 s, stuck in {phase}{mark}: exiting"


@pytest.mark.parametrize(
    ("fallout", "culprit", "cause"),
    [
        (
            (WorkerExit.HUNG, _hang_reason(0, "step 9: gradient sync", waiting=True)),
            (WorkerExit.HUNG, _hang_reason(2, "step 9: forward/backward", waiting=False)),
            "WorkerHung",
        ),
        (
            (1, f"plan rank 0: RuntimeError in step 9: gradient sync {WAITING_FOR_PEERS_MARK}: x"),
            (137, ""),
            "WorkerFailed",
        ),
        (
            (WorkerExit.HUNG, _hang_reason(0, "step 9: gradient sync", waiting=True)),
            (1, "local rank 1 was killed by SIGKILL"),
            "WorkerFailed",
        ),
    ],
    ids=["hang", "crash", "killed-while-a-peer-hung"],
)
def test_a_failure_that_waited_for_peers_is_held_until_the_culprit_shows(
    fallout: tuple[int, str], culprit: tuple[int, str], cause: str
) -> None:
    world = running_world()
    world.fail_pod("job-g1-pool-a-0", exit_code=fallout[0], message=fallout[1])
    decision = world.reconcile()
    assert world.status.phase == "Running" and world.status.restarts == 0
    assert not decision.deletes
    assert 0 < decision.requeue_after <= PEER_WAIT_SETTLE_SECONDS
    world.advance(3)
    world.fail_pod("job-g1-pool-d-0", exit_code=culprit[0], message=culprit[1])
    world.reconcile()  # both failed now: the culprit is named, though listed second
    assert world.status.last_failure is not None
    assert (world.status.last_failure.pod, world.status.last_failure.cause) == (
        "job-g1-pool-d-0",
        cause,
    )
    assert world.status.phase == "Restarting" and world.status.restarts == 1


def test_a_hang_that_waited_for_peers_is_acted_on_when_no_better_report_comes() -> None:
    world = running_world()
    world.fail_pod(
        "job-g1-pool-d-0",
        exit_code=WorkerExit.HUNG,
        message=_hang_reason(2, "step 9: gradient sync", waiting=True),
    )
    world.reconcile()
    assert world.status.phase == "Running"
    world.advance(PEER_WAIT_SETTLE_SECONDS)
    world.reconcile()
    assert world.status.last_failure is not None
    assert world.status.last_failure.pod == "job-g1-pool-d-0"
    assert world.status.phase == "Restarting" and world.status.restarts == 1


def test_failure_rule_can_make_a_failure_free() -> None:
    world = running_world(
        elastic={
            "maxRestarts": 0,
            "backoffSeconds": 0,
            "failureRules": [
                {
                    "name": "oom",
                    "reasons": ["OOMKilled"],
                    "action": "restart",
                    "countTowardsMaxRestarts": False,
                }
            ],
        }
    )
    world.fail_pod("job-g1-pool-a-0", exit_code=137, reason="OOMKilled")
    world.settle(3)
    assert world.status.phase == "Running"
    assert (world.status.restarts, world.status.uncounted_restarts) == (0, 1)


def test_node_loss_force_deletes_stuck_pods_and_replans_on_the_rest() -> None:
    world = running_world()
    del world.nodes["d0"]
    del world.nodes["d1"]
    decision = world.reconcile()
    assert world.status.last_failure is not None
    assert world.status.last_failure.cause == "NodeLost" and world.status.restarts == 0
    forced = [d for d in decision.deletes if d.grace_seconds == 0]
    assert [d.name for d in forced] == ["job-g1-pool-d-0"]
    world.settle(4)
    assert world.status.phase == "Running"
    assert world.status.plan_generation == 2 and world.status.grades == "A:1"
    assert any(e.reason == "Replanned" for e in world.events)


def test_not_ready_node_is_a_node_loss() -> None:
    world = running_world()
    world.nodes["a0"]["status"]["conditions"][0]["status"] = "False"
    world.reconcile()
    assert world.status.phase == "Restarting"
    assert world.status.last_failure is not None
    assert "NotReady" in world.status.last_failure.message


def test_suspend_stops_pods_and_resume_starts_a_new_generation() -> None:
    world = running_world()
    world.spec = spec(suspend=True)
    world.metadata_generation = 2
    world.settle(2)
    assert world.status.phase == "Suspended" and world.pods == {}
    world.spec = spec(suspend=False)
    world.metadata_generation = 3
    world.settle(3)
    assert world.status.phase == "Running" and world.status.generation == 2
    assert world.status.restarts == 0


def test_suspend_gives_workers_their_own_grace_to_save_a_checkpoint() -> None:
    world = running_world()
    world.spec = spec(suspend=True)
    world.metadata_generation = 2
    decision = world.reconcile()
    assert sorted((d.name, d.grace_seconds) for d in decision.deletes) == [
        ("job-g1-pool-a-0", None),
        ("job-g1-pool-d-0", None),
    ]


def test_a_broken_gang_is_stopped_with_a_short_grace() -> None:
    world = running_world(elastic={"maxRestarts": 3, "backoffSeconds": 0})
    world.fail_pod("job-g1-pool-a-0", exit_code=1)
    decision = world.reconcile()
    deletes = {d.name: d.grace_seconds for d in decision.deletes}
    assert deletes == {
        "job-g1-pool-a-0": BROKEN_GANG_GRACE_SECONDS,
        "job-g1-pool-d-0": BROKEN_GANG_GRACE_SECONDS,
    }


def test_a_gang_stopping_in_order_keeps_its_grace_to_save() -> None:
    stopped = running_world()
    stopped.fail_pod("job-g1-pool-a-0", exit_code=88)
    decision = stopped.reconcile()
    assert {d.name: d.grace_seconds for d in decision.deletes}["job-g1-pool-d-0"] is None
    drained = running_world()
    drained.pods["job-g1-pool-a-0"]["metadata"]["deletionTimestamp"] = "2026-01-01T13:00:00Z"
    decision = drained.reconcile()
    assert drained.status.phase == "Restarting"
    assert [(d.name, d.grace_seconds) for d in decision.deletes] == [("job-g1-pool-d-0", None)]


def test_resume_waits_for_the_suspended_workers_to_finish_saving() -> None:
    world = running_world()
    world.linger = True
    world.spec = spec(suspend=True)
    world.metadata_generation = 2
    world.settle(2)
    assert world.status.phase == "Suspended" and len(world.pods) == 2
    world.spec = spec(suspend=False)
    world.metadata_generation = 3
    for _ in range(3):
        decision = world.reconcile()
        assert not [m for m in decision.creates if m["kind"] == "Pod"]
        assert decision.requeue_after == DELETE_POLL_SECONDS
        world.advance(1)
    ready = next(c for c in world.status.conditions if c.type == "Ready")
    assert (ready.reason, world.status.generation) == ("WorkersStopping", 1)
    assert "generation 1" in ready.message
    world.finish_terminating()
    world.settle(3)
    assert world.status.phase == "Running" and world.status.generation == 2


def test_resume_force_deletes_workers_stuck_terminating_and_goes_on() -> None:
    world = running_world()
    world.linger = True
    world.spec = spec(suspend=True)
    world.metadata_generation = 2
    world.reconcile()
    world.spec = spec(suspend=False)
    world.metadata_generation = 3
    world.reconcile()
    assert world.status.generation == 1
    world.advance(60 + STUCK_TERMINATING_SECONDS + 1)  # the pods' grace, then stuck
    decision = world.reconcile()
    assert sorted((d.name, d.grace_seconds) for d in decision.deletes) == [
        ("job-g1-pool-a-0", 0),
        ("job-g1-pool-d-0", 0),
    ]
    world.settle(3)
    assert world.status.phase == "Running" and world.status.generation == 2


def test_a_restart_after_an_orderly_stop_waits_for_the_old_workers_to_save() -> None:
    world = running_world(elastic={"maxRestarts": 3, "backoffSeconds": 0})
    world.linger = True
    world.fail_pod("job-g1-pool-a-0", exit_code=WorkerExit.STOPPED)
    for _ in range(2):
        decision = world.reconcile()
        assert not [m for m in decision.creates if m["kind"] == "Pod"]
        world.advance(1)
    ready = next(c for c in world.status.conditions if c.type == "Ready")
    assert ready.reason == "WorkersStopping"
    world.finish_terminating()
    world.settle(3)
    assert world.status.phase == "Running" and world.status.generation == 2


def test_a_restart_after_a_resume_does_not_wait_for_the_old_workers() -> None:
    world = running_world(elastic={"maxRestarts": 3, "backoffSeconds": 0})
    world.spec = spec(elastic={"maxRestarts": 3, "backoffSeconds": 0}, suspend=True)
    world.metadata_generation = 2
    world.settle(2)
    world.spec = spec(elastic={"maxRestarts": 3, "backoffSeconds": 0})
    world.metadata_generation = 3
    world.settle(3)
    assert world.status.phase == "Running" and world.status.generation == 2
    world.linger = True
    world.fail_pod("job-g2-pool-a-0", exit_code=1)
    world.reconcile()
    assert world.status.generation == 3
    assert "job-g2-pool-d-0" in world.pods, "the old worker is still terminating"
    assert world.live_pods() == ["job-g3-pool-a-0", "job-g3-pool-d-0"]


def test_a_job_reopened_after_failing_does_not_wait_as_if_resuming_from_a_suspend() -> None:
    """Suspended and resumed long ago, then Failed (PlanInfeasible) and reopened by a
    spec change: its lingering pods were stopped as a broken gang and save nothing, so
    the next generation must not wait for them "saving a checkpoint"."""
    elastic = {"maxRestarts": 3, "backoffSeconds": 0}
    world = running_world(elastic=elastic)
    world.spec = spec(elastic=elastic, suspend=True)
    world.metadata_generation = 2
    world.settle(2)
    world.spec = spec(elastic=elastic)
    world.metadata_generation = 3
    world.settle(3)
    assert world.status.phase == "Running" and world.status.generation == 2

    def infeasible(*args: Any, **kwargs: Any) -> Any:
        raise PlanningError("divisibility", "num_experts 8 is not divisible by EP degree 3")

    world.linger = True
    world.planner = infeasible
    del world.nodes["a0"], world.nodes["a1"]  # a worker lost; the re-plan on the rest fails
    world.settle(3)
    assert world.status.phase == "Failed", world.status
    assert any(p.get("metadata", {}).get("deletionTimestamp") for p in world.pods.values())
    world.planner = fake_planner
    world.metadata_generation = 4
    world.reconcile()
    ready = next(c for c in world.status.conditions if c.type == "Ready")
    assert ready.reason != "WorkersStopping", ready
    world.settle(3)
    assert world.status.generation == 3


def test_success_when_every_worker_exits_zero() -> None:
    world = running_world()
    world.succeed_all()
    world.reconcile()
    assert world.status.phase == "Succeeded" and world.status.completion_time
    world.reconcile()
    assert world.status.phase == "Succeeded"


def test_transient_planning_error_waits_pending_with_the_planner_message() -> None:
    def planner(*args: Any, **kwargs: Any) -> Any:
        raise PlanningError("memory", "ling-plus needs about 9.1 TiB; eligible pools offer 1 TiB")

    world = World(spec(), small_nodes(), planner=planner)
    decision = world.reconcile()
    assert world.status.phase == "Pending"
    planned = next(c for c in world.status.conditions if c.type == "Planned")
    assert planned.reason == "WaitingForCapacity" and "9.1 TiB" in planned.message
    assert decision.creates == () and decision.requeue_after == world.config.resync_seconds


def test_permanent_planning_error_fails_until_the_spec_changes() -> None:
    calls = []

    def planner(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        raise PlanningError("divisibility", "num_experts 8 is not divisible by EP degree 3")

    world = World(spec(), small_nodes(), planner=planner)
    world.reconcile()
    world.reconcile()
    assert world.status.phase == "Failed" and len(calls) == 1
    world.metadata_generation = 2
    world.reconcile()
    assert len(calls) == 2


def test_no_usable_nodes_waits_with_a_summary() -> None:
    world = World(spec(), [n for n in small_nodes() if n["metadata"]["name"] == "a0"])
    world.nodes["a0"]["spec"]["unschedulable"] = True
    world.reconcile()
    assert world.status.phase == "Pending"
    ready = next(c for c in world.status.conditions if c.type == "Ready")
    assert "cordoned" in ready.message


def test_operator_killed_between_creates_and_status_adopts_without_duplicates() -> None:
    world = World(spec(), small_nodes())
    world.reconcile(drop_status=True)
    assert len(world.pods) == 2 and world.status.generation == 0
    world.reconcile()
    assert world.status.generation == 1 and world.pod_creates == 2
    assert sorted(world.pods) == ["job-g1-pool-a-0", "job-g1-pool-d-0"]


def test_operator_killed_after_failure_status_deletes_survivors_once() -> None:
    world = running_world()
    world.fail_pod("job-g1-pool-a-0")
    world.reconcile()
    world.reconcile()
    assert world.status.restarts == 1


EVENTS = st.lists(
    st.one_of(
        st.tuples(st.just("fail"), st.sampled_from([1, 2, 78, 86, 87, 88, 137, 143])),
        st.tuples(st.just("node-down"), st.sampled_from(["a0", "a1", "d0", "d1"])),
        st.tuples(st.just("node-up"), st.sampled_from(["a0", "a1", "d0", "d1"])),
        st.tuples(st.just("crash"), st.none()),
        st.tuples(st.just("suspend"), st.booleans()),
        st.tuples(st.just("succeed"), st.none()),
        st.tuples(st.just("tick"), st.none()),
    ),
    max_size=25,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(EVENTS)
def test_random_histories_keep_the_invariants(events: list[tuple[str, Any]]) -> None:
    from tests.operator.fakes import node

    world = World(spec(elastic={"maxRestarts": 3, "backoffSeconds": 1}), small_nodes())
    spare = {n: node(n, "pool-" + n[0], n[0].upper()) for n in ["a0", "a1", "d0", "d1"]}
    suspended = False
    for kind, arg in events:
        if kind == "fail":
            running = sorted(n for n, p in world.pods.items() if p["status"]["phase"] == "Running")
            if running:
                world.fail_pod(running[0], exit_code=arg)
        elif kind == "node-down":
            world.nodes.pop(arg, None)
        elif kind == "node-up":
            world.nodes[arg] = spare[arg]
        elif kind == "suspend" and arg != suspended:
            suspended = arg
            world.spec = spec(elastic={"maxRestarts": 3, "backoffSeconds": 1}, suspend=arg)
            world.metadata_generation += 1
        elif kind == "succeed":
            world.succeed_all()
        world.reconcile(drop_status=kind == "crash")
        world.kwok()
        world.advance(3)
        status = world.status
        assert status.restarts <= 3
        assert all(is_known(c.reason) for c in status.conditions)
        assert len({c.type for c in status.conditions}) == len(status.conditions)
        live = [
            p
            for p in world.pods.values()
            if "deletionTimestamp" not in p["metadata"]
            and p["status"]["phase"] in ("Pending", "Running")
        ]
        generations = {p["metadata"]["labels"]["hetmoe.io/generation"] for p in live}
        if kind != "crash":
            assert len(generations) <= 1, generations
            if status.phase in ("Failed", "Suspended"):
                assert not live or (
                    status.phase == "Failed"
                    and all(not world.nodes.get(p["spec"].get("nodeName", ""), True) for p in live)
                )
        if live and kind != "crash":
            assert max(int(g) for g in generations) <= status.generation
        if status.phase == "Running":
            assert status.plan is not None and status.grades


@pytest.mark.parametrize(
    "exit_code,cause",
    [
        (78, "ConfigError"),
        (87, "RollbackExhausted"),
        (86, "ReplaceNode"),
        (1, "WorkerFailed"),
        (89, "WorkerHung"),
    ],
)
def test_default_exit_code_contract(exit_code: int, cause: str) -> None:
    from hetmoe_operator.reconcile.failures import Failure, classify

    verdict = classify(Failure("p", "n", exit_code, "Error", ""), [])
    assert verdict.cause == cause


def test_stops_from_outside_are_orderly_other_failures_are_not() -> None:
    from hetmoe_operator.reconcile.failures import detect
    from hetmoe_operator.reconcile.observe import PodObs

    deleted = datetime(2026, 1, 1, tzinfo=UTC)

    def pod(name: str, phase: str, exit_code: int | None = None, deleting: bool = False) -> PodObs:
        return PodObs(
            name,
            generation=1,
            pool="pool-a",
            node_slot=0,
            phase=phase,
            node="n",
            exit_code=exit_code,
            deletion_deadline=deleted if deleting else None,
        )

    pods = [
        pod("stopped", "Failed", 88),
        pod("signalled", "Failed", 143),
        pod("crashed", "Failed", 1),
        pod("drained", "Running", deleting=True),
        pod("unstarted", "Pending", deleting=True),
    ]
    found = detect(pods, [*(p.name for p in pods), "vanished"], {"n": True})
    assert {f.pod: f.orderly for f in found} == {
        "stopped": True,
        "signalled": True,
        "crashed": False,
        "drained": True,
        "unstarted": False,
        "vanished": False,
    }


def test_a_workers_own_verdict_is_the_failure_reported_not_the_fallout() -> None:
    from hetmoe_operator.reconcile.failures import detect
    from hetmoe_operator.reconcile.observe import PodObs

    def failed(name: str, exit_code: int) -> PodObs:
        return PodObs(
            name, generation=1, pool="p", node_slot=0, phase="Failed", node="n",
            exit_code=exit_code,
        )  # fmt: skip

    pods = [failed("fallout", 1), failed("hung", WorkerExit.HUNG)]
    assert [f.pod for f in detect(pods, [], {"n": True})] == ["hung", "fallout"]


@pytest.mark.parametrize("exit_code", [88, 143])
def test_a_stopped_worker_restarts_without_using_up_a_restart(exit_code: int) -> None:
    world = running_world(elastic={"maxRestarts": 0, "backoffSeconds": 0})
    world.fail_pod("job-g1-pool-a-0", exit_code=exit_code)
    world.settle(3)
    assert world.status.phase == "Running" and world.status.generation == 2
    assert (world.status.restarts, world.status.uncounted_restarts) == (0, 1)


def test_a_failure_rule_for_143_wins_over_the_default() -> None:
    from hetmoe_operator.api.job import FailureRule
    from hetmoe_operator.reconcile.failures import Failure, classify

    rule = FailureRule(name="sigterm", exit_codes=[143], action="fail")
    verdict = classify(Failure("p", "n", 143, "Error", "", orderly=True), [rule])
    assert (verdict.action, verdict.cause) == ("fail", "FailureRuleFail")


def test_replanning_hands_the_planner_the_plan_the_job_ran_with() -> None:
    seen: list[Any] = []

    def recording_planner(*args: Any, previous: Any = None, **kwargs: Any) -> Any:
        seen.append(previous)
        return fake_planner(*args, previous=previous, **kwargs)

    world = World(spec(), small_nodes(), planner=recording_planner)
    world.settle(3)
    assert world.status.phase == "Running" and seen == [None]
    del world.nodes["d0"]
    del world.nodes["d1"]
    world.settle(4)
    assert world.status.plan_generation == 2
    assert seen[-1] is not None and {r.pool for r in seen[-1].ranks} >= {"pool-d"}


def test_unschedulable_workers_surface_the_scheduler_message_once() -> None:
    world = World(spec(), small_nodes())
    world.reconcile()
    stuck = "job-g1-pool-a-0"
    world.pods[stuck]["status"] = {
        "phase": "Pending",
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/4 nodes are available: 4 node(s) had untolerated taint {x: y}.",
            }
        ],
    }
    decision = world.reconcile()
    ready = next(c for c in world.status.conditions if c.type == "Ready")
    assert (ready.status, ready.reason) == ("False", "Unschedulable")
    assert (
        f"{stuck}: 0/4 nodes are available" in ready.message
        and "untolerated taint" in ready.message
    )
    assert [e.reason for e in decision.events] == ["Unschedulable"]
    assert world.reconcile().events == (), "one event, not one per pass"
    world.kwok()
    world.reconcile()
    ready = next(c for c in world.status.conditions if c.type == "Ready")
    assert ready.reason == "WorkersRunning" and world.status.phase == "Running"


def test_scale_up_grows_a_running_job_once_capacity_returns_after_the_window() -> None:
    import functools

    from tests.operator.fakes import node

    planner = functools.partial(fake_planner, nodes_per_pool=2)
    job = spec(elastic={"scaleUp": True, "scaleUpStabilizationSeconds": 60, "maxNodes": 3})
    world = World(job, [node("a0", "pool-a", "A"), node("d0", "pool-d", "D")], planner=planner)
    world.settle(3)
    assert world.status.phase == "Running" and world.status.grades == "A:1,D:1"
    world.nodes["a1"] = node("a1", "pool-a", "A")
    world.nodes["d1"] = node("d1", "pool-d", "D")
    world.reconcile()
    assert world.status.generation == 1, "not before the stabilisation window"
    world.advance(61)
    decision = world.reconcile()
    assert world.status.phase == "Restarting" and world.status.generation == 2
    restarting = next(c for c in world.status.conditions if c.type == "Restarting")
    assert restarting.reason == "ScaledUp" and "2 -> 3 nodes" in restarting.message
    assert any(e.reason == "ScaledUp" for e in decision.events)
    assert world.status.restarts == 0 and world.status.uncounted_restarts == 0
    # A healthy gang: its workers keep their grace period to save a checkpoint.
    assert sorted((d.name, d.grace_seconds) for d in decision.deletes) == [
        ("job-g1-pool-a-0", None),
        ("job-g1-pool-d-0", None),
    ]
    world.settle(3)
    assert world.status.phase == "Running" and world.status.plan_generation == 2
    assert len(world.live_pods()) == 3 and all("-g2-" in n for n in world.live_pods())
    world.advance(61)
    world.reconcile()
    assert world.status.generation == 2, "maxNodes reached: no further growth"


def test_scale_up_starts_the_new_gang_only_once_the_old_one_has_saved_and_gone() -> None:
    """New pods on nodes of their own would start at once and resume from the checkpoint
    before the one the old gang is writing."""
    import functools

    from tests.operator.fakes import node

    planner = functools.partial(fake_planner, nodes_per_pool=2)
    job = spec(elastic={"scaleUp": True, "scaleUpStabilizationSeconds": 60})
    world = World(job, [node("a0", "pool-a", "A"), node("d0", "pool-d", "D")], planner=planner)
    world.settle(3)
    world.linger = True  # deleted pods stay Terminating while their trainers save
    world.nodes["a1"] = node("a1", "pool-a", "A")
    world.nodes["d1"] = node("d1", "pool-d", "D")
    world.advance(61)
    world.reconcile()
    assert world.status.generation == 2 and world.status.phase == "Restarting"
    for _ in range(3):
        world.kwok()
        world.advance(2)
        decision = world.reconcile()
        assert not [n for n in world.pods if "-g2-" in n], "no new pod while the old gang saves"
        assert 0 < decision.requeue_after <= DELETE_POLL_SECONDS
    ready = next(c for c in world.status.conditions if c.type == "Ready")
    assert ready.reason == "WorkersStopping" and "saving a checkpoint" in ready.message
    world.finish_terminating()
    world.settle(3)
    assert world.status.phase == "Running" and world.status.restarts == 0
    assert sorted(world.live_pods()) == [
        "job-g2-pool-a-0",
        "job-g2-pool-a-1",
        "job-g2-pool-d-0",
        "job-g2-pool-d-1",
    ]


def test_scale_up_looks_for_capacity_at_most_once_per_window() -> None:
    import functools

    from tests.operator.fakes import node

    looks: list[Any] = []
    world = World(
        spec(elastic={"scaleUp": True, "scaleUpStabilizationSeconds": 30}),
        [node("a0", "pool-a", "A")],
        planner=functools.partial(fake_planner, nodes_per_pool=2),
    )
    world.settle(3)
    discover = world.environment().discover
    world.environment = lambda: _counting(world, discover, looks)  # type: ignore[method-assign]
    for _ in range(10):
        world.advance(10)
        world.reconcile()
    assert world.status.generation == 1 and len(looks) == 3


def _counting(world: World, discover: Any, looks: list[Any]) -> Any:
    from hetmoe_operator.reconcile.decide import Environment

    def counted(excluded: Any) -> Any:
        looks.append(excluded)
        return discover(excluded)

    return Environment(
        planner=world.planner, discover=counted, catalog=world.catalog, config=world.config
    )


def test_coscheduling_creates_an_owned_pod_group_per_generation_before_the_pods() -> None:
    world = World(spec(scheduling={"gang": "coscheduling"}), small_nodes())
    decision = world.reconcile()
    kinds = [m["kind"] for m in decision.creates]
    assert kinds.index("PodGroup") < kinds.index("Pod")
    group = next(m for m in decision.creates if m["kind"] == "PodGroup")
    assert group["apiVersion"] == "scheduling.x-k8s.io/v1alpha1"
    assert group["metadata"]["name"] == "job-g1" and group["spec"] == {"minMember": 2}
    assert group["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    pods = [m for m in decision.creates if m["kind"] == "Pod"]
    assert {p["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] for p in pods} == {"job-g1"}
    assert not any(
        m["kind"] == "PodGroup" for m in World(spec(), small_nodes()).reconcile().creates
    )


def test_a_restart_replaces_the_last_generations_pod_group() -> None:
    world = World(spec(scheduling={"gang": "coscheduling"}), small_nodes())
    world.settle(4)
    assert world.status.phase == "Running" and world.pod_groups == {"job-g1"}
    world.fail_pod("job-g1-pool-a-0", exit_code=1)
    world.settle(6)
    assert world.status.phase == "Running" and world.status.generation == 2
    assert world.pod_groups == {"job-g2"}
