"""The local control plane behaves like a real cluster (no mocks anywhere).

Each test exercises one upstream component through its observable effect:
kwok node/pod stages, kube-scheduler placement and refusal, controller-manager
garbage collection, apiserver CRD schema validation, and clean teardown.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from kubernetes.client import ApiClient, CoreV1Api
from kubernetes.client.exceptions import ApiException
from kubernetes.utils import parse_quantity

from tests.cluster.controlplane import ControlPlane, ControlPlaneError, k8s_version, pid_alive
from tests.cluster.topology import GRADE_LABEL, POOL_LABEL, Topology, ready_node_names

pytestmark = pytest.mark.integration

T = TypeVar("T")
#: Label that opts a pod into kwok's pod-container-running-failed chaos stage.
CHAOS_FAIL_LABEL = "pod-container-running-failed.stage.kwok.x-k8s.io"


def eventually(probe: Callable[[], T | None], timeout: float = 60.0, what: str = "condition") -> T:
    """Poll until ``probe`` returns something truthy; controllers are asynchronous."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def core(client: ApiClient) -> Any:
    """CoreV1Api typed loosely: every model field is Optional, and the tests
    assert the shapes they rely on at run time anyway."""
    return CoreV1Api(client)


@pytest.fixture
def namespace(kube_api: ApiClient) -> Iterator[str]:
    """A fresh namespace whose `default` ServiceAccount exists (pods need it)."""
    api = core(kube_api)
    name = f"t-{uuid.uuid4().hex[:8]}"
    api.create_namespace({"metadata": {"name": name}})

    def has_default_sa() -> bool:
        try:
            api.read_namespaced_service_account("default", name)
        except ApiException:
            return False
        return True

    eventually(has_default_sa, 30, "default ServiceAccount")
    yield name
    api.delete_namespace(name)


def device_pod(name: str, devices: int, grade: str | None = None) -> dict[str, Any]:
    """A pod asking for accelerators, optionally pinned to one grade by node affinity."""
    resources = {"nvidia.com/gpu": str(devices)}
    spec: dict[str, Any] = {
        "containers": [
            {
                "name": "main",
                "image": "busybox",
                "resources": {"requests": resources, "limits": resources},
            }
        ],
    }
    if grade is not None:
        term = {"matchExpressions": [{"key": GRADE_LABEL, "operator": "In", "values": [grade]}]}
        spec["affinity"] = {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [term]}
            }
        }
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name}, "spec": spec}


def test_every_pool_has_ready_nodes_with_labels_and_capacity(
    kube_api: ApiClient, cluster_topology: Topology
) -> None:
    api = core(kube_api)
    ready = ready_node_names(kube_api)
    for pool in cluster_topology.pools:
        nodes = api.list_node(label_selector=f"{POOL_LABEL}={pool.name}").items
        assert sorted(n.metadata.name for n in nodes) == pool.node_names()
        for node in nodes:
            assert node.metadata.name in ready
            assert node.metadata.labels[GRADE_LABEL] == pool.grade
            assert node.metadata.labels["type"] == "kwok"
            assert pool.labels.items() <= node.metadata.labels.items()
            for field in (node.status.capacity, node.status.allocatable):
                assert field[pool.resource_name] == str(pool.devices_per_node)
                assert parse_quantity(field["cpu"]) == parse_quantity(pool.cpu)
                assert parse_quantity(field["memory"]) == parse_quantity(pool.memory)


def test_grade_affinity_pod_is_scheduled_on_that_grade_and_runs(
    kube_api: ApiClient, namespace: str
) -> None:
    api = core(kube_api)
    api.create_namespaced_pod(namespace, device_pod("on-grade-d", devices=4, grade="D"))

    def running_pod() -> Any:
        pod = api.read_namespaced_pod("on-grade-d", namespace)
        return pod if pod.status.phase == "Running" else None

    pod = eventually(running_pod, 60, "pod Running via kwok pod-ready stage")
    node = api.read_node(pod.spec.node_name)
    assert node.metadata.labels[GRADE_LABEL] == "D"


def test_kwok_chaos_stage_fails_a_labelled_running_pod(kube_api: ApiClient, namespace: str) -> None:
    api = core(kube_api)
    pod = device_pod("crashing", devices=1)
    pod["metadata"]["labels"] = {CHAOS_FAIL_LABEL: "true"}
    api.create_namespaced_pod(namespace, pod)

    def failed_pod() -> Any:
        current = api.read_namespaced_pod("crashing", namespace)
        return current if current.status.phase == "Failed" else None

    failed = eventually(failed_pod, 60, "pod-container-running-failed stage")
    assert failed.status.container_statuses[0].state.terminated.exit_code == 1


def test_pod_larger_than_any_node_stays_pending_with_scheduler_reason(
    kube_api: ApiClient, namespace: str
) -> None:
    api = core(kube_api)
    api.create_namespaced_pod(namespace, device_pod("too-big", devices=9))

    def unschedulable_condition() -> Any:
        conditions = api.read_namespaced_pod("too-big", namespace).status.conditions or []
        return next(
            (c for c in conditions if c.type == "PodScheduled" and c.reason == "Unschedulable"),
            None,
        )

    condition = eventually(unschedulable_condition, 60, "PodScheduled=False/Unschedulable")
    assert condition.status == "False"
    assert "Insufficient nvidia.com/gpu" in condition.message
    pod = api.read_namespaced_pod("too-big", namespace)
    assert pod.status.phase == "Pending" and not pod.spec.node_name
    events = api.list_namespaced_event(namespace, field_selector="involvedObject.name=too-big")
    assert any(e.reason == "FailedScheduling" for e in events.items)


def test_deleting_owner_garbage_collects_children(kube_api: ApiClient, namespace: str) -> None:
    api = core(kube_api)
    owner = api.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    reference = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "owner",
        "uid": owner.metadata.uid,
    }
    api.create_namespaced_config_map(
        namespace, {"metadata": {"name": "child", "ownerReferences": [reference]}}
    )
    api.delete_namespaced_config_map("owner", namespace)

    def child_gone() -> bool:
        try:
            api.read_namespaced_config_map("child", namespace)
        except ApiException as err:
            return bool(err.status == 404)
        return False

    eventually(child_gone, 60, "garbage collector to delete the child")


CRD_YAML = """
apiVersion: apiextensions.k8s.io/v1
kind: CustomResourceDefinition
metadata: {name: widgets.test.hetmoe.io}
spec:
  group: test.hetmoe.io
  scope: Namespaced
  names: {plural: widgets, singular: widget, kind: Widget}
  versions:
  - name: v1
    served: true
    storage: true
    schema:
      openAPIV3Schema:
        type: object
        properties:
          spec:
            type: object
            required: [replicas]
            properties:
              replicas: {type: integer, minimum: 1}
"""


def widget(name: str, replicas: int) -> str:
    return json.dumps(
        {
            "apiVersion": "test.hetmoe.io/v1",
            "kind": "Widget",
            "metadata": {"name": name},
            "spec": {"replicas": replicas},
        }
    )


def test_crd_is_served_and_schema_is_enforced(control_plane: ControlPlane, namespace: str) -> None:
    control_plane.kubectl("apply", "-f", "-", input=CRD_YAML)
    control_plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/widgets.test.hetmoe.io"
    )

    def served() -> bool:
        return control_plane.kubectl("get", "widgets", "-n", namespace, check=False).returncode == 0

    eventually(served, 30, "widgets to be served")
    control_plane.kubectl("apply", "-n", namespace, "-f", "-", input=widget("ok", 2))
    rejected = control_plane.kubectl(
        "apply", "-n", namespace, "-f", "-", input=widget("bad", 0), check=False
    )
    assert rejected.returncode != 0
    assert "spec.replicas" in rejected.stderr
    assert "should be greater than or equal to 1" in rejected.stderr
    names = control_plane.kubectl("get", "widgets", "-n", namespace, "-o", "name").stdout.split()
    assert names == ["widget.test.hetmoe.io/ok"]


def test_kubectl_reports_stamped_server_version(control_plane: ControlPlane) -> None:
    version = json.loads(control_plane.kubectl("version", "-o", "json").stdout)
    expected = k8s_version()
    assert version["serverVersion"]["gitVersion"] == expected
    assert version["serverVersion"]["minor"] == expected.split(".")[1]


def test_helm_works_against_the_cluster(control_plane: ControlPlane) -> None:
    helm = str(control_plane.bin_dir / "helm")
    short = subprocess.run([helm, "version", "--short"], capture_output=True, text=True, check=True)
    assert short.stdout.startswith("v3.")
    listing = subprocess.run(
        [helm, "list", "-A", "--kubeconfig", str(control_plane.kubeconfig)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert listing.stdout.startswith("NAME")


def test_second_control_plane_leaves_no_process_behind(control_plane: ControlPlane) -> None:
    with ControlPlane(bin_dir=control_plane.bin_dir) as second:
        pids = second.pids
        workdir = second.workdir
        assert len(pids) == 5 and all(pid_alive(p) for p in pids)
        assert second.kubectl("get", "--raw", "/readyz").stdout == "ok"
    assert not any(Path(f"/proc/{p}").exists() for p in pids)
    assert workdir is not None and not workdir.exists()


def test_startup_failure_reports_component_log_tail(tmp_path: Path) -> None:
    fake = tmp_path / "bin" / "hetmoe-k8s"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho 'etcd: boom, bad flag' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(ControlPlaneError, match=r"(?s)etcd exited with code 3.*boom, bad flag"):
        ControlPlane(bin_dir=fake.parent, startup_timeout=10).start()
