"""The operator end to end on the real control plane (apiserver, scheduler, GC, kwok).

The operator runs as a ``hetmoe operator`` subprocess with the test kubeconfig, as in
production; the real planner makes every plan.
"""

from __future__ import annotations

import subprocess
import time
from typing import Any
from unittest.mock import ANY

import pytest
from kubernetes.client import ApiClient, CoreV1Api

from hetmoe_operator.plan import WorkerExit, replace_node_request
from hetmoe_operator.reconcile.failures import REPLACEMENT_UNSCHEDULABLE_SECONDS
from tests.cluster.controlplane import ControlPlane
from tests.cluster.topology import Topology, node_manifest, wait_nodes_ready
from tests.integration.operator.conftest import (
    OperatorProcess,
    create_job,
    delete_job,
    eventually,
    fail_pod,
    get_job,
    job_events,
    job_manifest,
    job_pods,
    node_grade,
    operator_metric,
    patch_spec,
    wait_phase,
)

pytestmark = pytest.mark.integration

HOLD = "test.hetmoe.io/hold"


def running_job(kube_api: ApiClient, namespace: str, name: str, **spec: Any) -> dict[str, Any]:
    create_job(kube_api, namespace, job_manifest(name, **spec))
    return wait_phase(kube_api, namespace, name, "Running", timeout=90)


def current_pods(
    kube_api: ApiClient, namespace: str, name: str, generation: int
) -> list[dict[str, Any]]:
    return [
        p
        for p in job_pods(kube_api, namespace, name)
        if p["metadata"]["labels"]["hetmoe.io/generation"] == str(generation)
        and not p["metadata"].get("deletionTimestamp")
    ]


def two_node_job(
    kube_api: ApiClient, namespace: str, name: str, **elastic: Any
) -> list[dict[str, Any]]:
    """A Running job on two of pool-a's three nodes (no backoff); its pods by node slot."""
    running_job(
        kube_api,
        namespace,
        name,
        pools=[{"name": "pool-a"}],
        # 16 sequences: one replica per device of two pool-a nodes (pool-a has three).
        training={"steps": 40, "globalBatchSize": 16, "sequenceLength": 64},
        elastic={"maxRestarts": 3, "backoffSeconds": 0, "maxNodes": 2, **elastic},
    )
    pods = sorted(
        current_pods(kube_api, namespace, name, 1),
        key=lambda p: int(p["metadata"]["labels"]["hetmoe.io/node-slot"]),
    )
    assert len(pods) == 2, pods
    return pods


def test_apply_creates_pods_on_the_planned_grades_and_runs(
    operator: OperatorProcess, kube_api: ApiClient, namespace: str, control_plane: ControlPlane
) -> None:
    status = running_job(kube_api, namespace, "place")
    plan = status["plan"]
    pools = {p["pool"]: p for p in plan["pools"]}
    pods = current_pods(kube_api, namespace, "place", status["generation"])
    assert len(pods) == sum(p["nodes"] for p in plan["pools"])
    for pod in pods:
        pool = pod["metadata"]["labels"]["hetmoe.io/pool"]
        assert pod["spec"]["nodeName"], "bound by the real scheduler"
        assert node_grade(kube_api, pod["spec"]["nodeName"]) == pools[pool]["grade"]
        assert pod["status"]["phase"] == "Running"
    assert len({p["spec"]["nodeName"] for p in pods}) == len(pods), "one worker per node"
    table = control_plane.kubectl("-n", namespace, "get", "mj", "place").stdout
    assert "Running" in table and status["grades"] in table
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"], ready["observedGeneration"]) == (
        "True",
        "WorkersRunning",
        1,
    )
    delete_job(kube_api, namespace, "place")


def test_pod_failure_restarts_once_with_the_cause_in_status(
    operator: OperatorProcess, kube_api: ApiClient, namespace: str, control_plane: ControlPlane
) -> None:
    status = running_job(kube_api, namespace, "flaky")
    victim = current_pods(kube_api, namespace, "flaky", 1)[0]
    fail_pod(control_plane, namespace, victim["metadata"]["name"], exit_code=3)
    status = wait_phase(
        kube_api, namespace, "flaky", "Running", timeout=90, restarts=1, generation=2
    )
    failure = status["lastFailure"]
    assert failure["pod"] == victim["metadata"]["name"]
    assert failure["node"] == victim["spec"]["nodeName"]
    assert (failure["exitCode"], failure["cause"], failure["action"]) == (
        3,
        "WorkerFailed",
        "restart",
    )
    assert not current_pods(kube_api, namespace, "flaky", 1)
    events = control_plane.kubectl(
        "-n", namespace, "get", "events", "--field-selector", "involvedObject.name=flaky"
    ).stdout
    assert "WorkerFailed" in events and "PlanKept" in events
    delete_job(kube_api, namespace, "flaky")


def test_a_straggler_exit_seen_on_another_pod_replaces_the_straggler_node(
    operator: OperatorProcess, kube_api: ApiClient, namespace: str, control_plane: ControlPlane
) -> None:
    """Every rank exits 86 naming the straggler's place in the plan; the first pod the
    operator sees is another one, and the straggler's node is still the one left out."""
    reporter, straggler = two_node_job(kube_api, namespace, "slowpoke")
    slot = straggler["metadata"]["labels"]["hetmoe.io/node-slot"]
    fail_pod(
        control_plane,
        namespace,
        reporter["metadata"]["name"],
        exit_code=WorkerExit.REPLACE_NODE,
        message=f"plan rank 0: rank 9 (pool-a node {slot}) straggled for 20 steps; "
        + replace_node_request("pool-a", int(slot)),
    )
    status = wait_phase(kube_api, namespace, "slowpoke", "Running", timeout=90, generation=2)
    failure = status["lastFailure"]
    assert (failure["pod"], failure["node"], failure["cause"], failure["exitCode"]) == (
        straggler["metadata"]["name"],
        straggler["spec"]["nodeName"],
        "ReplaceNode",
        WorkerExit.REPLACE_NODE,
    )
    assert status["excludedNodes"] == [straggler["spec"]["nodeName"]]
    placed = {p["spec"]["nodeName"] for p in current_pods(kube_api, namespace, "slowpoke", 2)}
    assert len(placed) == 2 and straggler["spec"]["nodeName"] not in placed
    assert reporter["spec"]["nodeName"] in placed, "the reporting pod's node stays usable"
    delete_job(kube_api, namespace, "slowpoke")


def test_with_in_place_restarts_a_failed_pod_is_replaced_alone(
    operator: OperatorProcess, kube_api: ApiClient, namespace: str, control_plane: ControlPlane
) -> None:
    """elastic.inPlaceRestarts: the second pod fails (exit 137, as after the OOM killer)
    while the first runs; only that pod is replaced, under a new name, in the same
    generation, and the first (which serves the rendezvous) is the same object."""
    host, other = two_node_job(kube_api, namespace, "mender", inPlaceRestarts=1)
    failed = other["metadata"]["name"]
    replaced_before = operator_metric(operator, "hetmoe_operator_pods_replaced_total")
    fail_pod(control_plane, namespace, failed, exit_code=137)
    replacement = f"{failed}-r1"

    def replaced() -> dict[str, Any] | None:
        status = get_job(kube_api, namespace, "mender")["status"]
        pods = {p["metadata"]["name"]: p for p in job_pods(kube_api, namespace, "mender")}
        running = replacement in pods and pods[replacement]["status"].get("phase") == "Running"
        done = running and failed not in pods and status["phase"] == "Running"
        return status if done else None

    status = eventually(replaced, 90, f"{replacement} Running, {failed} gone, the job Running")
    assert (status["generation"], status["restarts"]) == (1, 1)
    assert status["replacedPods"] == [failed]
    assert status["lastFailure"]["pod"] == failed and status["lastFailure"]["replacedAlone"]
    alive = {
        p["metadata"]["name"]: p["metadata"]["uid"] for p in job_pods(kube_api, namespace, "mender")
    }
    assert alive == {host["metadata"]["name"]: host["metadata"]["uid"], replacement: ANY}, alive
    assert any(e["reason"] == "PodReplaced" for e in job_events(kube_api, namespace, "mender"))
    replaced = operator_metric(operator, "hetmoe_operator_pods_replaced_total")
    assert replaced == replaced_before + 1
    delete_job(kube_api, namespace, "mender")


def cpu_hog(node: str, cpu: str) -> dict[str, Any]:
    """A foreign pod bound straight to ``node`` (no scheduler) that books all its
    ``cpu`` but no device: the operator's discovery still counts the node as free, the
    scheduler does not."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"hog-{node}"},
        "spec": {
            "nodeName": node,
            "containers": [
                {"name": "hog", "image": "hog", "resources": {"requests": {"cpu": cpu}}}
            ],
        },
    }


def scheduler_sees(kube_api: ApiClient, namespace: str, verdict: str) -> None:
    """Wait until the scheduler's cache holds what was just bound: a probe pod that
    fits nowhere in pool-a is turned away with ``verdict`` in the scheduler's words."""
    core = CoreV1Api(kube_api)
    probe = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "probe"},
        "spec": {
            "nodeSelector": {"hetmoe.io/pool": "pool-a"},
            "tolerations": [{"operator": "Exists"}],
            "containers": [
                {
                    "name": "probe",
                    "image": "probe",
                    "resources": {
                        "requests": {"cpu": "1", "nvidia.com/gpu": "8"},
                        "limits": {"nvidia.com/gpu": "8"},
                    },
                }
            ],
        },
    }
    core.create_namespaced_pod(namespace, probe)

    def turned_away() -> bool:
        pod = core.read_namespaced_pod("probe", namespace)
        return any(verdict in (c.message or "") for c in pod.status.conditions or ())

    eventually(turned_away, 30, f"the scheduler to say {verdict!r}")
    core.delete_namespaced_pod("probe", namespace, grace_period_seconds=0)


def test_a_replacement_the_scheduler_cannot_place_restarts_the_generation(
    operator: OperatorProcess, kube_api: ApiClient, namespace: str, control_plane: ControlPlane
) -> None:
    """A pod replaced alone that stays unschedulable must not leave its peers waiting at
    the rendezvous: once its predecessor is gone, after REPLACEMENT_UNSCHEDULABLE_SECONDS
    the generation restarts (uncounted), and runs when capacity returns."""
    running_job(
        kube_api,
        namespace,
        "stranded",
        pools=[{"name": "pool-a"}],
        training={"steps": 40, "globalBatchSize": 16, "sequenceLength": 64},
        elastic={"maxRestarts": 3, "backoffSeconds": 0, "maxNodes": 2, "inPlaceRestarts": 1},
        resources={"cpu": "1"},
    )
    host, other = sorted(
        current_pods(kube_api, namespace, "stranded", 1),
        key=lambda p: int(p["metadata"]["labels"]["hetmoe.io/node-slot"]),
    )
    core = CoreV1Api(kube_api)
    cpus = {
        n.metadata.name: n.status.allocatable["cpu"]
        for n in core.list_node(label_selector="hetmoe.io/pool=pool-a").items
    }
    hogged = sorted(set(cpus) - {host["spec"]["nodeName"]})
    for node in hogged:
        core.create_namespaced_pod(namespace, cpu_hog(node, cpus[node]))
    try:
        scheduler_sees(kube_api, namespace, f"{len(hogged)} Insufficient cpu")
        failed = other["metadata"]["name"]
        started = time.monotonic()
        fail_pod(control_plane, namespace, failed, exit_code=137)

        def restarted() -> dict[str, Any] | None:
            status = get_job(kube_api, namespace, "stranded")["status"]
            return status if status.get("generation") == 2 else None

        status = eventually(restarted, 120, "generation 2 after the replacement stayed unplaced")
        assert time.monotonic() - started >= REPLACEMENT_UNSCHEDULABLE_SECONDS
        assert status["lastFailure"]["cause"] == "ReplacementUnschedulable"
        assert status["lastFailure"]["pod"] == f"{failed}-r1"
        assert "Insufficient cpu" in status["lastFailure"]["message"], status["lastFailure"]
        assert (status["restarts"], status["uncountedRestarts"]) == (1, 1)
        reasons = [e["reason"] for e in job_events(kube_api, namespace, "stranded")]
        assert "PodReplaced" in reasons and "ReplacementUnschedulable" in reasons, reasons
    finally:
        for node in hogged:
            core.delete_namespaced_pod(f"hog-{node}", namespace, grace_period_seconds=0)
    wait_phase(kube_api, namespace, "stranded", "Running", timeout=90, generation=2)
    delete_job(kube_api, namespace, "stranded")


def test_exceeding_max_restarts_fails_with_the_cause(
    operator: OperatorProcess, kube_api: ApiClient, namespace: str, control_plane: ControlPlane
) -> None:
    running_job(kube_api, namespace, "doomed", elastic={"maxRestarts": 0, "backoffSeconds": 0})
    victim = current_pods(kube_api, namespace, "doomed", 1)[0]["metadata"]["name"]
    fail_pod(control_plane, namespace, victim, exit_code=2)
    status = wait_phase(kube_api, namespace, "doomed", "Failed", timeout=60)
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "MaxRestartsExceeded"
    assert victim in failed["message"] and "code 2" in failed["message"]
    eventually(
        lambda: (
            all(
                p["status"]["phase"] != "Running" or p["metadata"].get("deletionTimestamp")
                for p in job_pods(kube_api, namespace, "doomed")
            )
            or None
        ),
        30,
        "survivors stopped",
    )
    delete_job(kube_api, namespace, "doomed")


def test_node_deletion_replans_on_the_remaining_nodes(
    operator: OperatorProcess, kube_api: ApiClient, namespace: str, cluster_topology: Topology
) -> None:
    status = running_job(kube_api, namespace, "shrink", pools=[{"name": "pool-a"}])
    pods = current_pods(kube_api, namespace, "shrink", 1)
    lost = pods[0]["spec"]["nodeName"]
    core = CoreV1Api(kube_api)
    pool = next(p for p in cluster_topology.pools if p.name == "pool-a")
    core.delete_node(lost)
    try:
        status = wait_phase(kube_api, namespace, "shrink", "Running", timeout=90, generation=2)
        assert status["lastFailure"]["cause"] == "NodeLost"
        assert status["lastFailure"]["node"] == lost
        assert status["restarts"] == 0 and status["uncountedRestarts"] == 1
        placed = {p["spec"]["nodeName"] for p in current_pods(kube_api, namespace, "shrink", 2)}
        assert lost not in placed and placed
    finally:
        core.create_node(node_manifest(pool, lost))
        wait_nodes_ready(kube_api, [lost])
    delete_job(kube_api, namespace, "shrink")


def test_suspend_stops_workers_and_resume_continues(
    operator: OperatorProcess, kube_api: ApiClient, namespace: str
) -> None:
    running_job(kube_api, namespace, "pausable")
    patch_spec(kube_api, namespace, "pausable", {"suspend": True})
    wait_phase(kube_api, namespace, "pausable", "Suspended", timeout=60)
    eventually(lambda: not job_pods(kube_api, namespace, "pausable"), 60, "workers stopped")
    patch_spec(kube_api, namespace, "pausable", {"suspend": False})
    status = wait_phase(kube_api, namespace, "pausable", "Running", timeout=90, generation=2)
    assert status["restarts"] == 0
    delete_job(kube_api, namespace, "pausable")


def test_a_worker_deleted_from_outside_restarts_uncounted_once_the_old_workers_are_gone(
    operator: OperatorProcess, kube_api: ApiClient, namespace: str
) -> None:
    """A drain or ``kubectl delete pod``: the trainers save on SIGTERM, so the restart is
    not the job's fault, and the next generation must wait for that save."""
    running_job(
        kube_api,
        namespace,
        "drained",
        checkpoint={
            "volume": {"hostPath": "/var/lib/hetmoe/checkpoints"},
            "stopGracePeriodSeconds": 45,
        },
    )
    pods = current_pods(kube_api, namespace, "drained", 1)
    for pod in pods:
        assert pod["spec"]["terminationGracePeriodSeconds"] == 45
        assert "--shutdown-timeout=40" in pod["spec"]["containers"][0]["args"]
    victim = pods[0]["metadata"]["name"]
    core = CoreV1Api(kube_api)
    # kwok removes a deleted pod at once; a kubelet keeps it while the trainer saves.
    # A finalizer of the test's own holds it in Terminating, Running, the same way.
    core.patch_namespaced_pod(victim, namespace, {"metadata": {"finalizers": [HOLD]}})
    core.delete_namespaced_pod(victim, namespace)
    try:

        def stopping() -> dict[str, Any] | None:
            status = get_job(kube_api, namespace, "drained").get("status", {})
            ready = next((c for c in status.get("conditions", []) if c["type"] == "Ready"), {})
            return status if ready.get("reason") == "WorkersStopping" else None

        status = eventually(stopping, 60, "Ready=False WorkersStopping")
        assert status["lastFailure"]["cause"] == "WorkerStopped"
        assert status["lastFailure"]["pod"] == victim
        time.sleep(2)  # a few passes: nothing of generation 2 while the old worker saves
        assert not current_pods(kube_api, namespace, "drained", 2)
    finally:
        core.patch_namespaced_pod(victim, namespace, {"metadata": {"finalizers": None}})
    status = wait_phase(kube_api, namespace, "drained", "Running", timeout=90, generation=2)
    assert (status["restarts"], status["uncountedRestarts"]) == (0, 1)
    delete_job(kube_api, namespace, "drained")


def test_delete_garbage_collects_children_but_not_the_checkpoint_claim(
    operator: OperatorProcess, kube_api: ApiClient, namespace: str
) -> None:
    core = CoreV1Api(kube_api)
    pv_name = f"{namespace}-ckpt"
    core.create_persistent_volume(
        {
            "metadata": {"name": pv_name},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "hostPath": {"path": f"/tmp/{pv_name}"},
                "claimRef": {"namespace": namespace, "name": "ckpt"},
            },
        }
    )
    core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": "ckpt"},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "volumeName": pv_name,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )
    try:
        running_job(
            kube_api, namespace, "gc", checkpoint={"volume": {"persistentVolumeClaim": "ckpt"}}
        )
        assert core.read_namespaced_config_map("gc-plan", namespace)
        assert core.read_namespaced_service("gc", namespace)
        delete_job(kube_api, namespace, "gc")
        eventually(
            lambda: (
                not core.list_namespaced_config_map(
                    namespace, label_selector="hetmoe.io/job=gc"
                ).items
            ),
            60,
            "plan ConfigMap GC",
        )
        eventually(
            lambda: (
                not core.list_namespaced_service(namespace, label_selector="hetmoe.io/job=gc").items
            ),
            60,
            "Service GC",
        )
        claim = core.read_namespaced_persistent_volume_claim("ckpt", namespace)
        assert claim.metadata.deletion_timestamp is None
    finally:
        core.delete_persistent_volume(pv_name)


def test_operator_killed_mid_reconcile_converges_without_duplicates(
    operator: OperatorProcess, kube_api: ApiClient, namespace: str
) -> None:
    names = [f"crash-{i}" for i in range(3)]
    for name in names:
        create_job(kube_api, namespace, job_manifest(name))
    eventually(
        lambda: any(job_pods(kube_api, namespace, n) for n in names), 30, "first pods created"
    )
    operator.kill()
    operator.start()
    for name in names:
        status = wait_phase(kube_api, namespace, name, "Running", timeout=120)
        pods = job_pods(kube_api, namespace, name)
        assert all(
            p["metadata"]["labels"]["hetmoe.io/generation"] == str(status["generation"])
            for p in pods
        ), "no orphaned pod of another generation"
        seats = [
            (
                p["metadata"]["labels"]["hetmoe.io/pool"],
                p["metadata"]["labels"]["hetmoe.io/node-slot"],
            )
            for p in pods
        ]
        assert len(seats) == len(set(seats)) == sum(p["nodes"] for p in status["plan"]["pools"])
    for name in names:
        delete_job(kube_api, namespace, name)


@pytest.mark.parametrize(
    "patch,expected",
    [
        ({"training": None}, "spec.training: Required value"),
        (
            {
                "model": {
                    "preset": "tiny",
                    "architecture": {
                        "num_hidden_layers": 2,
                        "hidden_size": 64,
                        "num_attention_heads": 4,
                        "num_key_value_heads": 2,
                        "num_experts": 4,
                        "num_experts_per_tok": 2,
                        "moe_intermediate_size": 32,
                        "vocab_size": 128,
                    },
                }
            },
            "set exactly one of model.preset and model.architecture",
        ),
        ({"placement": {"objective": "fastest"}}, "spec.placement.objective: Unsupported value"),
        ({"elastic": {"maxRestarts": -1}}, "spec.elastic.maxRestarts"),
        ({"pools": [{"name": "Bad_Name"}]}, "spec.pools[0].name"),
        (
            {"checkpoint": {"volume": {"emptyDir": True, "hostPath": "/x"}}},
            "exactly one of persistentVolumeClaim, hostPath, emptyDir",
        ),
    ],
)
def test_malformed_manifests_are_rejected_with_the_field_path(
    moejob_crd: Any,
    control_plane: ControlPlane,
    namespace: str,
    patch: dict[str, Any],
    expected: str,
) -> None:
    import json

    manifest = job_manifest("bad")
    for key, value in patch.items():
        if value is None:
            manifest["spec"].pop(key)
        else:
            manifest["spec"][key] = value
    result = control_plane.kubectl(
        "-n", namespace, "apply", "-f", "-", input=json.dumps(manifest), check=False
    )
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr


def test_model_and_training_are_immutable(
    operator: OperatorProcess, kube_api: ApiClient, namespace: str, control_plane: ControlPlane
) -> None:
    create_job(kube_api, namespace, job_manifest("frozen", suspend=True))
    result = control_plane.kubectl(
        "-n",
        namespace,
        "patch",
        "mj",
        "frozen",
        "--type=merge",
        "-p",
        '{"spec":{"model":{"preset":"ling-lite"}}}',
        check=False,
    )
    assert result.returncode != 0 and "model is immutable" in result.stderr
    result = control_plane.kubectl(
        "-n",
        namespace,
        "patch",
        "mj",
        "frozen",
        "--type=merge",
        "-p",
        '{"spec":{"elastic":{"maxRestarts":5}}}',
    )
    assert result.returncode == 0


def test_impossible_job_waits_with_an_actionable_message(
    operator: OperatorProcess, kube_api: ApiClient, namespace: str
) -> None:
    create_job(
        kube_api,
        namespace,
        job_manifest(
            "huge",
            model={"preset": "ling-plus"},
            training={"steps": 10, "globalBatchSize": 64, "sequenceLength": 4096},
        ),
    )

    def planned_false() -> dict[str, Any] | None:
        status = get_job(kube_api, namespace, "huge").get("status") or {}
        return next(
            (
                c
                for c in status.get("conditions") or ()
                if c["type"] == "Planned" and c["status"] == "False"
            ),
            None,
        )

    condition = eventually(planned_false, 60, "Planned=False")
    status = get_job(kube_api, namespace, "huge")["status"]
    assert status["phase"] in ("Pending", "Failed")
    assert condition["reason"] in ("WaitingForCapacity", "PlanInfeasible")
    assert (
        "ling-plus" in condition["message"]
        or "TiB" in condition["message"]
        or "GiB" in (condition["message"])
    )
    assert not job_pods(kube_api, namespace, "huge"), "nothing half-created"
    assert operator.alive()


def test_status_command_shows_the_printer_column_truth(
    operator: OperatorProcess, kube_api: ApiClient, namespace: str, control_plane: ControlPlane
) -> None:
    import os
    import sys

    status = running_job(kube_api, namespace, "shown")
    code = (
        "import argparse,sys\nfrom hetmoe_operator.cli import status_command as s\n"
        "p=argparse.ArgumentParser();s.register(p.add_subparsers())\n"
        "a=p.parse_args(sys.argv[1:]);sys.exit(a.handler(a))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, "status", "shown", "-n", namespace],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "KUBECONFIG": str(control_plane.kubeconfig)},
    ).stdout
    assert "Running" in out and status["grades"] in out and "Planned" in out
    delete_job(kube_api, namespace, "shown")
