"""Fixtures for operator tests: the CRD, a running ``hetmoe operator`` subprocess, and
one fresh namespace per test. Everything runs against the real control plane."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from kubernetes.client import ApiClient, CoreV1Api, CustomObjectsApi
from kubernetes.client.exceptions import ApiException
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster.controlplane import ControlPlane

REPO = Path(__file__).resolve().parents[3]
CRD = REPO / "crds" / "moejob.yaml"
REFERENCE_CATALOG = REPO / "examples" / "catalogs" / "reference-5-grades.yaml"
TEST_CATALOG = REPO / "tests" / "operator" / "data" / "catalog-small.yaml"
GROUP, VERSION, PLURAL = "hetmoe.io", "v1alpha1", "moejobs"
T = TypeVar("T")


def job_events(kube_api: ApiClient, namespace: str, name: str) -> list[dict[str, Any]]:
    """Every event about the MoEJob (or anything else) called ``name``."""
    response = CoreV1Api(kube_api).list_namespaced_event(
        namespace, field_selector=f"involvedObject.name={name}", _preload_content=False
    )
    return list(json.loads(response.data)["items"])


def eventually(
    probe: Callable[[], T | None],
    timeout: float = 60.0,
    what: str = "condition",
    interval: float = 0.2,
) -> T:
    """Poll ``probe`` until it returns something truthy."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = probe()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})")


def operator_argv(metrics_port: int) -> list[str]:
    """``hetmoe operator`` when the console script works, else the operator module."""
    catalog = REFERENCE_CATALOG if REFERENCE_CATALOG.exists() else TEST_CATALOG
    args = [
        "operator",
        "--catalog",
        str(catalog),
        "--metrics-port",
        str(metrics_port),
        "--resync-seconds",
        "2",
        "--progress-poll-seconds",
        "2",
    ]
    script = Path(sys.executable).parent / "hetmoe"
    probe = subprocess.run([str(script), "operator", "--help"], capture_output=True)
    if probe.returncode == 0:
        return [str(script), *args]
    return [sys.executable, "-m", "hetmoe_operator.cli.operator_command", *args[1:]]


class OperatorProcess:
    """A ``hetmoe operator`` subprocess that tests can kill and restart."""

    def __init__(self, plane: ControlPlane, log_dir: Path, extra: tuple[str, ...] = ()) -> None:
        self.plane = plane
        self.log_dir = log_dir
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        from tests.cluster.controlplane import free_port

        self.starts += 1
        log = (self.log_dir / f"operator-{self.starts}.log").open("wb")
        env = {**os.environ, "KUBECONFIG": str(self.plane.kubeconfig)}
        self.process = subprocess.Popen(
            [*operator_argv(free_port()), *self.extra],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
            cwd=REPO,
        )

    def kill(self) -> None:
        """SIGKILL: the hardest stop (no cleanup, no finalizer removal)."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        text = (self.log_dir / f"operator-{self.starts}.log").read_text(errors="replace")
        return "\n".join(text.splitlines()[-lines:])


@pytest.fixture(scope="session")
def moejob_crd(control_plane: ControlPlane) -> Path:
    """The committed CRD, installed and Established."""
    control_plane.kubectl("apply", "--server-side", "-f", str(CRD))
    control_plane.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "crd/moejobs.hetmoe.io"
    )
    return CRD


@pytest.fixture(scope="session")
def operator(
    control_plane: ControlPlane, moejob_crd: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """One operator for the session (tests that kill it start it again)."""
    process = OperatorProcess(control_plane, tmp_path_factory.mktemp("operator"))
    process.start()
    yield process
    process.stop()


@pytest.fixture()
def namespace(kube_api: ApiClient) -> Iterator[str]:
    """A fresh namespace with its default ServiceAccount, deleted afterwards."""
    name = f"mj-{uuid.uuid4().hex[:8]}"
    core = CoreV1Api(kube_api)
    core.create_namespace({"metadata": {"name": name}})

    def has_sa() -> bool:
        try:
            core.read_namespaced_service_account("default", name)
            return True
        except ApiException:
            return False

    eventually(has_sa, 60, "default ServiceAccount")
    yield name
    jobs = CustomObjectsApi(kube_api).list_namespaced_custom_object(GROUP, VERSION, name, PLURAL)
    for job in jobs["items"]:
        delete_job(kube_api, name, job["metadata"]["name"])
    core.delete_namespace(name)


def job_manifest(name: str, **spec: Any) -> dict[str, Any]:
    """A small tiny-model job that the small-mixed topology can run."""
    body: dict[str, Any] = {
        "model": {"preset": "tiny"},
        "training": {"steps": 40, "globalBatchSize": 8, "sequenceLength": 64},
        "elastic": {"maxRestarts": 3, "backoffSeconds": 1, "maxBackoffSeconds": 2},
        "checkpoint": {"volume": {"hostPath": "/var/lib/hetmoe/checkpoints"}},
    }
    body.update(spec)
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "MoEJob",
        "metadata": {"name": name},
        "spec": body,
    }


def create_job(client: ApiClient, namespace: str, manifest: dict[str, Any]) -> None:
    CustomObjectsApi(client).create_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, manifest
    )


def get_job(client: ApiClient, namespace: str, name: str) -> dict[str, Any]:
    return dict(
        CustomObjectsApi(client).get_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name
        )
    )


def patch_spec(client: ApiClient, namespace: str, name: str, spec: dict[str, Any]) -> None:
    CustomObjectsApi(client).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name, {"spec": spec}
    )


def job_pods(client: ApiClient, namespace: str, name: str) -> list[dict[str, Any]]:
    response = CoreV1Api(client).list_namespaced_pod(
        namespace, label_selector=f"hetmoe.io/job={name}", _preload_content=False
    )
    return list(json.loads(response.data)["items"])


def wait_phase(
    client: ApiClient, namespace: str, name: str, phase: str, timeout: float = 60.0, **expect: Any
) -> dict[str, Any]:
    """The job once its status phase is ``phase`` and every ``expect`` field matches."""

    def probe() -> dict[str, Any] | None:
        status = get_job(client, namespace, name).get("status") or {}
        if status.get("phase") != phase:
            return None
        if any(status.get(k) != v for k, v in expect.items()):
            return None
        return status

    return eventually(probe, timeout, f"{name} phase {phase} {expect}")


def delete_job(client: ApiClient, namespace: str, name: str, timeout: float = 60.0) -> None:
    """Delete a job and wait until it and its pods are gone."""
    try:
        CustomObjectsApi(client).delete_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, name
        )
    except ApiException as error:
        if error.status != 404:
            raise

    def gone() -> bool:
        try:
            get_job(client, namespace, name)
            return False
        except ApiException as error:
            return error.status == 404

    eventually(gone, timeout, f"deletion of {name}")
    eventually(lambda: not job_pods(client, namespace, name), timeout, f"GC of {name}'s pods")


def node_grade(client: ApiClient, node: str) -> str:
    labels = CoreV1Api(client).read_node(node).metadata.labels
    return str(labels["hetmoe.io/accelerator"])


def fail_pod(
    plane: ControlPlane, namespace: str, pod: str, exit_code: int = 1, message: str = ""
) -> None:
    """kwok chaos stage: the container of a Running pod fails with ``exit_code`` (and
    ``message`` as its termination message)."""
    key = "pod-container-running-failed.stage.kwok.x-k8s.io"
    annotations = [f"{key}/exit-code={exit_code}"]
    if message:
        # kwok pastes it into a YAML template unquoted: a JSON string is a quoted YAML one.
        annotations.append(f"{key}/message={json.dumps(message)}")
    plane.kubectl("-n", namespace, "annotate", "--overwrite", "pod", pod, *annotations)
    plane.kubectl("-n", namespace, "label", "--overwrite", "pod", pod, f"{key}=true")


def load_yaml(text: str) -> Any:
    return yaml.safe_load(text)


def metrics_port(operator: OperatorProcess) -> int:
    """The port the running operator serves /metrics on (from its own argv)."""
    assert operator.process is not None and operator.alive(), "the session operator is not up"
    args = operator.process.args
    assert isinstance(args, list), args
    argv = [str(arg) for arg in args]
    last = max(i for i, arg in enumerate(argv) if arg == "--metrics-port")  # argparse: last wins
    return int(argv[last + 1])


def operator_metric(operator: OperatorProcess, sample: str) -> float:
    """The value of one unlabelled sample (e.g. a counter's ``..._total``) on the
    operator's /metrics; 0 while the series does not exist."""
    url = f"http://127.0.0.1:{metrics_port(operator)}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    values = [
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == sample and not s.labels
    ]
    return values[0] if values else 0.0
