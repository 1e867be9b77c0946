"""Training progress reaches the MoEJob: rank 0's ``/progress`` -> status -> ``kubectl get mj``.

kwok pods run no containers, so the test plays rank 0's part with the trainer's own
progress document and HTTP server (``hetmoe_trainer.progress`` and ``.metrics``) on
this host, and points the rank-0 pod's ``status.podIP`` at it, as the kubelet would
report a real pod's address. Everything between (the operator's poll, parsing, status
patch, printer columns) is the real path.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import ApiClient, CoreV1Api

from hetmoe_operator.api.operator_config import WorkerPorts
from hetmoe_operator.desired.names import GENERATION_LABEL, RANK0_LABEL
from tests.cluster.controlplane import ControlPlane
from tests.integration.operator.conftest import (
    OperatorProcess,
    create_job,
    delete_job,
    eventually,
    get_job,
    job_events,
    job_manifest,
    job_pods,
    wait_phase,
)

pytestmark = pytest.mark.integration

PORT = WorkerPorts().metrics
"""The operator reads rank 0's progress on the default worker metrics port."""


@pytest.fixture()
def rank0_server(tmp_path: Path) -> Iterator[Any]:
    """The trainer's progress reporter, served on this host's worker metrics port."""
    from hetmoe_trainer.metrics import MetricsServer
    from hetmoe_trainer.progress import ProgressReporter

    with socket.socket() as probe:
        if probe.connect_ex(("127.0.0.1", PORT)) == 0:
            pytest.fail(f"port {PORT} is taken; this test serves rank 0's /progress there")
    reporter = ProgressReporter(tmp_path / "progress.json", total_steps=40, restarts=0)
    server = MetricsServer(PORT, {"/progress": reporter.route})
    try:
        yield reporter
    finally:
        server.close()


def test_rank0_progress_shows_on_status_printer_columns_and_hetmoe_status(
    operator: OperatorProcess,
    kube_api: ApiClient,
    namespace: str,
    control_plane: ControlPlane,
    rank0_server: Any,
) -> None:
    create_job(kube_api, namespace, job_manifest("progress"))
    status = wait_phase(kube_api, namespace, "progress", "Running", timeout=90)
    rank0 = next(
        p
        for p in job_pods(kube_api, namespace, "progress")
        if p["metadata"]["labels"].get(RANK0_LABEL) == "true"
        and p["metadata"]["labels"][GENERATION_LABEL] == str(status["generation"])
    )
    rank0_server.update(step=17, tokens=8704, loss=3.25, tokens_per_s=1234.5, eta_seconds=9.0)
    CoreV1Api(kube_api).patch_namespaced_pod_status(
        rank0["metadata"]["name"],
        namespace,
        [  # a JSON patch: a strategic merge would add the IP to kwok's instead
            {"op": "replace", "path": "/status/podIP", "value": "127.0.0.1"},
            {"op": "replace", "path": "/status/podIPs", "value": [{"ip": "127.0.0.1"}]},
        ],
    )

    def progress_at_17() -> dict[str, Any] | None:
        progress = (get_job(kube_api, namespace, "progress").get("status") or {}).get("progress")
        return progress if progress and progress.get("step") == 17 else None

    progress = eventually(progress_at_17, 60, "status.progress.step == 17")
    assert progress["totalSteps"] == 40 and progress["tokens"] == 8704
    assert progress["loss"] == pytest.approx(3.25)
    assert progress["tokensPerSecond"] == pytest.approx(1234.5)
    row = control_plane.kubectl("-n", namespace, "get", "mj", "progress", "--no-headers").stdout
    assert row.split()[:2] == ["progress", "Running"] and "17" in row.split()
    assert "1234.5" in row
    shown = _hetmoe_status(control_plane, namespace, "progress")
    assert "step 17/40" in shown and "1234.5" in shown, shown

    rank0_server.update(step=23, tokens=11776)
    eventually(
        lambda: get_job(kube_api, namespace, "progress")["status"]["progress"]["step"] == 23,
        60,
        "the next poll's step",
    )

    # The gang restarted inside its pods (elastic.inPlaceRestarts): rank 0's next start
    # reports it; the status schema keeps the fields and the operator posts one event.
    reason = "pool pool-a node slot 0: plan rank 1: RuntimeError in forward: boom"
    rank0_server.update(in_place_restarts=1, last_in_place_restart=reason)

    def restarted_in_place() -> dict[str, Any] | None:
        progress = get_job(kube_api, namespace, "progress")["status"]["progress"]
        return progress if progress.get("inPlaceRestarts") == 1 else None

    progress = eventually(restarted_in_place, 60, "status.progress.inPlaceRestarts == 1")
    assert progress["lastInPlaceRestart"] == reason
    events = eventually(
        lambda: [
            e
            for e in job_events(kube_api, namespace, "progress")
            if e["reason"] == "RestartedInPlace"
        ],
        30,
        "a RestartedInPlace event",
    )
    assert len(events) == 1 and reason in events[0]["message"], events
    status = get_job(kube_api, namespace, "progress")["status"]
    assert (status["phase"], status["restarts"], status["generation"]) == ("Running", 0, 1)
    shown = _hetmoe_status(control_plane, namespace, "progress")
    assert f"in place   1 restart(s) this generation; last: {reason}" in shown, shown
    delete_job(kube_api, namespace, "progress")


def _hetmoe_status(control_plane: ControlPlane, namespace: str, name: str) -> str:
    """What ``hetmoe status NAME`` prints against the test cluster."""
    return subprocess.run(
        [sys.executable, "-m", "hetmoe_operator.cli.main", "status", name, "-n", namespace],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "KUBECONFIG": str(control_plane.kubeconfig)},
    ).stdout
