"""Operator behaviour around the edges of a job's life, on the real control plane:
deletion without an operator, growth onto returning capacity, capacity contended by a
queued job, what the scheduler and the API server refuse, and the catalog ConfigMap
the chart ships."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import ApiClient, CoreV1Api
from kubernetes.client.exceptions import ApiException

from hetmoe_operator.api.operator_config import CatalogSource
from hetmoe_operator.kube.catalog_source import CatalogLoader
from tests.cluster.controlplane import ControlPlane
from tests.cluster.topology import Pool, Topology, node_manifest, wait_nodes_ready
from tests.integration.operator.conftest import (
    REFERENCE_CATALOG,
    OperatorProcess,
    create_job,
    delete_job,
    eventually,
    fail_pod,
    get_job,
    job_events,
    job_manifest,
    job_pods,
    wait_phase,
)

pytestmark = pytest.mark.integration


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or () if c["type"] == type_), {})


def test_a_job_deletes_without_a_running_operator(
    operator: OperatorProcess, kube_api: ApiClient, namespace: str
) -> None:
    create_job(kube_api, namespace, job_manifest("orphan"))
    wait_phase(kube_api, namespace, "orphan", "Running", timeout=90)
    assert not get_job(kube_api, namespace, "orphan")["metadata"].get("finalizers")
    operator.stop()
    try:
        delete_job(kube_api, namespace, "orphan", timeout=60)  # also waits for pod GC
    finally:
        operator.start()


def test_scale_up_grows_a_running_job_onto_added_nodes(
    operator: OperatorProcess, kube_api: ApiClient, namespace: str, cluster_topology: Topology
) -> None:
    core = CoreV1Api(kube_api)
    template = next(p for p in cluster_topology.pools if p.grade == "A")
    pool = dataclasses.replace(template, name=f"grow-{namespace[3:]}", nodes=3)
    names = pool.node_names()
    core.create_node(node_manifest(pool, names[0]))
    try:
        wait_nodes_ready(kube_api, names[:1])
        manifest = job_manifest(
            "grow",
            pools=[{"name": pool.name}],
            # 24 sequences feed one replica per device of 3 nodes (8 would fill one node).
            training={"steps": 40, "globalBatchSize": 24, "sequenceLength": 64},
            elastic={
                "maxRestarts": 3,
                "backoffSeconds": 1,
                "scaleUp": True,
                "scaleUpStabilizationSeconds": 3,
                "maxNodes": 3,
            },
        )
        create_job(kube_api, namespace, manifest)
        status = wait_phase(kube_api, namespace, "grow", "Running", timeout=90)
        assert status["plan"]["pools"][0]["nodes"] == 1
        for name in names[1:]:
            core.create_node(node_manifest(pool, name))
        wait_nodes_ready(kube_api, names)
        status = wait_phase(kube_api, namespace, "grow", "Running", timeout=120, generation=2)
        assert status["plan"]["pools"][0]["nodes"] == 3 and status["planGeneration"] == 2
        assert status["restarts"] == 0, "growing is not a failure"
        placed = {
            p["spec"]["nodeName"]
            for p in job_pods(kube_api, namespace, "grow")
            if p["metadata"]["labels"]["hetmoe.io/generation"] == "2"
        }
        assert placed == set(names)
        scaled = [e for e in job_events(kube_api, namespace, "grow") if e["reason"] == "ScaledUp"]
        assert scaled and "1 -> 3 nodes" in scaled[0]["message"]
        delete_job(kube_api, namespace, "grow")
    finally:
        for name in names:
            try:
                core.delete_node(name)
            except ApiException as error:
                if error.status != 404:
                    raise


@contextmanager
def one_node_pool(kube_api: ApiClient, topology: Topology, name: str) -> Iterator[tuple[Pool, str]]:
    """A grade-A pool of one node of its own (not created yet), deleted afterwards."""
    template = next(p for p in topology.pools if p.grade == "A")
    pool = dataclasses.replace(template, name=name, nodes=1)
    (node,) = pool.node_names()
    try:
        yield pool, node
    finally:
        try:
            CoreV1Api(kube_api).delete_node(node)
        except ApiException as error:
            if error.status != 404:
                raise


def add_node(kube_api: ApiClient, pool: Pool, node: str) -> None:
    CoreV1Api(kube_api).create_node(node_manifest(pool, node))
    wait_nodes_ready(kube_api, [node])


def ready_reason(kube_api: ApiClient, namespace: str, name: str) -> str:
    status = get_job(kube_api, namespace, name).get("status") or {}
    return str(condition(status, "Ready").get("reason"))


def test_a_job_waiting_for_capacity_starts_when_a_node_appears_not_at_its_resync(
    operator: OperatorProcess,
    control_plane: ControlPlane,
    kube_api: ApiClient,
    namespace: str,
    cluster_topology: Topology,
    tmp_path: Path,
) -> None:
    # An operator whose resync would take five minutes: only the node event can wake
    # the waiting job in time.
    operator.stop()
    slow = OperatorProcess(control_plane, tmp_path, ("--resync-seconds", "300"))
    slow.start()
    try:
        with one_node_pool(kube_api, cluster_topology, f"late-{namespace[3:]}") as (pool, node):
            create_job(kube_api, namespace, job_manifest("late", pools=[{"name": pool.name}]))
            eventually(
                lambda: ready_reason(kube_api, namespace, "late") == "WaitingForCapacity",
                60,
                "the job waiting for capacity",
            )
            add_node(kube_api, pool, node)
            eventually(
                lambda: job_pods(kube_api, namespace, "late"), 60, "workers on the new node", 0.2
            )
            delete_job(kube_api, namespace, "late")
    finally:
        slow.stop()
        operator.start()


def test_a_restart_keeps_its_nodes_through_the_backoff_from_a_queued_job(
    operator: OperatorProcess,
    control_plane: ControlPlane,
    kube_api: ApiClient,
    namespace: str,
    cluster_topology: Topology,
) -> None:
    # A one-node pool: "first" runs on it, "queued" waits for it. When first's worker
    # fails, the node is free at once (a Failed pod holds no devices) and the queued
    # job is woken; first's restart must still get the node back after its backoff.
    with one_node_pool(kube_api, cluster_topology, f"held-{namespace[3:]}") as (pool, node):
        add_node(kube_api, pool, node)
        elastic = {"maxRestarts": 3, "backoffSeconds": 4, "maxBackoffSeconds": 4}
        pools = [{"name": pool.name}]
        create_job(kube_api, namespace, job_manifest("first", pools=pools, elastic=elastic))
        wait_phase(kube_api, namespace, "first", "Running", timeout=90)
        create_job(kube_api, namespace, job_manifest("queued", pools=pools))
        eventually(
            lambda: ready_reason(kube_api, namespace, "queued") == "WaitingForCapacity",
            60,
            "the queued job waiting for the node",
        )
        (victim,) = job_pods(kube_api, namespace, "first")
        fail_pod(control_plane, namespace, victim["metadata"]["name"])
        wait_phase(kube_api, namespace, "first", "Running", timeout=90, restarts=1, generation=2)
        assert ready_reason(kube_api, namespace, "queued") == "WaitingForCapacity"
        assert not job_pods(kube_api, namespace, "queued")
        delete_job(kube_api, namespace, "queued")
        delete_job(kube_api, namespace, "first")


def test_unschedulable_workers_show_the_scheduler_message(
    operator: OperatorProcess, kube_api: ApiClient, namespace: str
) -> None:
    # Discovery counts devices; a CPU request no node has is the scheduler's to refuse.
    create_job(kube_api, namespace, job_manifest("stuck", resources={"cpu": "5000"}))

    def blocked() -> dict[str, Any] | None:
        ready = condition(get_job(kube_api, namespace, "stuck").get("status") or {}, "Ready")
        return ready if ready.get("reason") == "Unschedulable" else None

    ready = eventually(blocked, 90, "Ready=False Unschedulable")
    assert "Insufficient cpu" in ready["message"], ready["message"]
    events = [e for e in job_events(kube_api, namespace, "stuck") if e["reason"] == "Unschedulable"]
    assert len(events) == 1 and "Insufficient cpu" in events[0]["message"]
    delete_job(kube_api, namespace, "stuck")


def test_refused_pod_creation_is_a_child_create_failed_condition(
    operator: OperatorProcess, kube_api: ApiClient, namespace: str
) -> None:
    CoreV1Api(kube_api).create_namespaced_resource_quota(
        namespace, {"metadata": {"name": "no-pods"}, "spec": {"hard": {"pods": "0"}}}
    )
    eventually(
        lambda: (
            CoreV1Api(kube_api).read_namespaced_resource_quota("no-pods", namespace).status.hard
        ),
        30,
        "quota admitted",
    )
    create_job(kube_api, namespace, job_manifest("quota"))

    def refused() -> dict[str, Any] | None:
        ready = condition(get_job(kube_api, namespace, "quota").get("status") or {}, "Ready")
        return ready if ready.get("reason") == "ChildCreateFailed" else None

    ready = eventually(refused, 90, "Ready=False ChildCreateFailed")
    assert "403" in ready["message"] and "exceeded quota" in ready["message"], ready["message"]
    assert not job_pods(kube_api, namespace, "quota")
    delete_job(kube_api, namespace, "quota")


def test_catalog_is_read_from_a_config_map_and_bad_content_is_reported(
    kube_api: ApiClient, namespace: str
) -> None:
    core = CoreV1Api(kube_api)
    source = CatalogSource(config_map="hetmoe-catalog", config_map_namespace=namespace)
    loader = CatalogLoader(source, "unused", core, max_age_seconds=0)
    assert loader.load() is None and "hetmoe-catalog" in loader.last_error, "missing ConfigMap"
    text = Path(REFERENCE_CATALOG).read_text()
    core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "hetmoe-catalog"}, "data": {"catalog.yaml": text}}
    )
    catalog = loader.load()
    assert catalog is not None and {g.name for g in catalog.grades} == {"A", "B", "C", "D", "E"}
    core.patch_namespaced_config_map(
        "hetmoe-catalog", namespace, {"data": {"catalog.yaml": "grades: 3"}}
    )
    assert loader.load() is None
    assert "hetmoe-catalog/catalog.yaml" in loader.last_error


POD_GROUP_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "podgroups.scheduling.x-k8s.io"},
    "spec": {
        "group": "scheduling.x-k8s.io",
        "scope": "Namespaced",
        "names": {"plural": "podgroups", "singular": "podgroup", "kind": "PodGroup"},
        "versions": [
            {
                "name": "v1alpha1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "x-kubernetes-preserve-unknown-fields": True,
                    }
                },
            }
        ],
    },
}


def test_coscheduling_creates_an_owned_pod_group_or_says_the_crd_is_missing(
    operator: OperatorProcess, kube_api: ApiClient, namespace: str, control_plane: Any
) -> None:
    from kubernetes.client import ApiextensionsV1Api, CustomObjectsApi

    create_job(kube_api, namespace, job_manifest("gang", scheduling={"gang": "coscheduling"}))

    def refused() -> dict[str, Any] | None:
        ready = condition(get_job(kube_api, namespace, "gang").get("status") or {}, "Ready")
        return ready if ready.get("reason") == "PodGroupUnavailable" else None

    ready = eventually(refused, 90, "Ready=False PodGroupUnavailable")
    assert "podgroups.scheduling.x-k8s.io" in ready["message"] and "gang" in ready["message"]
    assert not job_pods(kube_api, namespace, "gang"), "no pods without their gang"
    extensions = ApiextensionsV1Api(kube_api)
    extensions.create_custom_resource_definition(POD_GROUP_CRD)
    try:
        control_plane.kubectl(
            "wait",
            "--for=condition=Established",
            "--timeout=60s",
            "crd/podgroups.scheduling.x-k8s.io",
        )
        status = wait_phase(kube_api, namespace, "gang", "Running", timeout=120)
        groups = CustomObjectsApi(kube_api).list_namespaced_custom_object(
            "scheduling.x-k8s.io", "v1alpha1", namespace, "podgroups"
        )["items"]
        pods = job_pods(kube_api, namespace, "gang")
        assert [g["metadata"]["name"] for g in groups] == [f"gang-g{status['generation']}"]
        assert groups[0]["spec"]["minMember"] == len(pods) > 0
        owner = groups[0]["metadata"]["ownerReferences"][0]
        job = get_job(kube_api, namespace, "gang")
        assert (owner["kind"], owner["uid"]) == ("MoEJob", job["metadata"]["uid"])
        labels = {p["metadata"]["labels"]["scheduling.x-k8s.io/pod-group"] for p in pods}
        assert labels == {groups[0]["metadata"]["name"]}

        # A restart brings the next generation's gang and removes the last one.
        fail_pod(control_plane, namespace, pods[0]["metadata"]["name"])

        def next_generation_running() -> dict[str, Any] | None:
            now = get_job(kube_api, namespace, "gang").get("status") or {}
            later = now.get("generation", 0) > status["generation"]
            return now if later and now.get("phase") == "Running" else None

        restarted = eventually(next_generation_running, 180, "the next generation Running")

        def only_current_group() -> list[str] | None:
            names = [
                g["metadata"]["name"]
                for g in CustomObjectsApi(kube_api).list_namespaced_custom_object(
                    "scheduling.x-k8s.io", "v1alpha1", namespace, "podgroups"
                )["items"]
            ]
            return names if names == [f"gang-g{restarted['generation']}"] else None

        eventually(only_current_group, 60, "only the current generation's PodGroup")
        delete_job(kube_api, namespace, "gang")
    finally:
        extensions.delete_custom_resource_definition("podgroups.scheduling.x-k8s.io")
