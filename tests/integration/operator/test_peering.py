"""Two operator replicas with kopf peering: one reconciles, the other takes over."""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes.client import ApiClient

from tests.cluster.controlplane import ControlPlane
from tests.integration.operator.conftest import (
    REPO,
    OperatorProcess,
    create_job,
    delete_job,
    fail_pod,
    job_manifest,
    job_pods,
    wait_phase,
)

pytestmark = pytest.mark.integration


# Not "hetmoe": that name belongs to the chart's release, which a later test installs.
PEERING = "peering-test"


def test_standby_replica_takes_over_when_the_active_one_dies(
    operator: OperatorProcess,
    control_plane: ControlPlane,
    kube_api: ApiClient,
    namespace: str,
    tmp_path: Path,
) -> None:
    control_plane.kubectl("apply", "-f", str(REPO / "crds" / "kopf-peering.yaml"))
    control_plane.kubectl("wait", "--for=condition=Established", "crd/clusterkopfpeerings.kopf.dev")
    control_plane.kubectl(
        "apply",
        "-f",
        "-",
        input=f"apiVersion: kopf.dev/v1\nkind: ClusterKopfPeering\nmetadata:\n  name: {PEERING}\n",
    )
    operator.stop()
    active = OperatorProcess(
        control_plane, tmp_path / "a", ("--peering", PEERING, "--priority", "200")
    )
    standby = OperatorProcess(
        control_plane, tmp_path / "b", ("--peering", PEERING, "--priority", "100")
    )
    for replica in (active, standby):
        replica.log_dir.mkdir()
        replica.start()
    try:
        create_job(kube_api, namespace, job_manifest("peered"))
        wait_phase(kube_api, namespace, "peered", "Running", timeout=90)
        active.kill()
        victim = job_pods(kube_api, namespace, "peered")[0]["metadata"]["name"]
        fail_pod(control_plane, namespace, victim)
        status = wait_phase(
            kube_api, namespace, "peered", "Running", timeout=120, restarts=1, generation=2
        )
        assert status["lastFailure"]["pod"] == victim
        pods = job_pods(kube_api, namespace, "peered")
        assert len(pods) == sum(p["nodes"] for p in status["plan"]["pools"])
        delete_job(kube_api, namespace, "peered")
    finally:
        active.stop()
        standby.stop()
        control_plane.kubectl("delete", "clusterkopfpeering", PEERING, "--ignore-not-found")
        operator.start()
