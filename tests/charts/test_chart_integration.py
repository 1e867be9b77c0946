"""The Helm chart against the real control plane (tests/cluster).

kwok's fake nodes run no containers, so the chart's operator Deployment is installed
with zero replicas and the operator runs as a local subprocess authenticated as the
chart's ServiceAccount (a token from `kubectl create token`): a MoEJob reaching
Running then proves the chart's RBAC is sufficient, and `kubectl auth can-i` proves
it is not more than that.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.charts.conftest import (
    CHART_DIR,
    OPERATOR_METRICS,
    REPO_ROOT,
    family_name,
    parse_manifests,
    run_helm,
)
from tests.cluster.controlplane import ControlPlane, free_port

pytestmark = pytest.mark.integration

HETMOE = Path(sys.executable).with_name("hetmoe")
RUNNING_TIMEOUT = 300.0


@pytest.fixture(scope="module")
def helm(control_plane: ControlPlane) -> Path:
    """The helm built next to the control plane (build.sh), stamped for its version."""
    helm = control_plane.bin_dir / "helm"
    assert os.access(helm, os.X_OK), f"{helm} missing: tests/cluster/build.sh builds it"
    return helm


def helm_env(control_plane: ControlPlane, tmp: Path) -> dict[str, str]:
    return {
        "KUBECONFIG": str(control_plane.kubeconfig),
        "HELM_CONFIG_HOME": str(tmp / "helm-config"),
        "HELM_CACHE_HOME": str(tmp / "helm-cache"),
        "HELM_DATA_HOME": str(tmp / "helm-data"),
    }


def kubectl_as(kubeconfig: Path, *args: str, input: str | None = None, check: bool = True) -> str:
    result = subprocess.run(
        ["kubectl", "--kubeconfig", str(kubeconfig), *args],
        input=input,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)}: {result.stderr}{result.stdout}")
    return result.stdout


def ensure_namespace(control_plane: ControlPlane, name: str) -> None:
    manifest = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    control_plane.kubectl("apply", "-f", "-", input=json.dumps(manifest))


def render(helm: Path, namespace: str, *args: str) -> list[dict[str, Any]]:
    out = run_helm(helm, "template", "hetmoe", str(CHART_DIR), "--namespace", namespace, *args)
    return parse_manifests(out.stdout)


def install_crds(control_plane: ControlPlane, helm: Path) -> None:
    """What Helm does before the templates: create every CRD under crds/, wait Established."""
    crds = [
        o
        for o in render(helm, "default", "--include-crds")
        if o["kind"] == "CustomResourceDefinition"
    ]
    body = "\n---\n".join(yaml.safe_dump(c) for c in crds)
    control_plane.kubectl("apply", "--server-side", "--force-conflicts", "-f", "-", input=body)
    names = [f"crd/{c['metadata']['name']}" for c in crds]
    control_plane.kubectl("wait", "--for=condition=Established", "--timeout=60s", *names)


@pytest.mark.parametrize(
    "args",
    [[], ["--set", "operator.scope=namespace", "--set", "operator.watchNamespace=team-dry"]],
    ids=["cluster", "namespace"],
)
def test_rendered_chart_passes_server_side_dry_run(
    control_plane: ControlPlane, helm: Path, args: list[str]
) -> None:
    install_crds(control_plane, helm)
    ensure_namespace(control_plane, "hetmoe-dry")
    ensure_namespace(control_plane, "team-dry")
    objects = render(helm, "hetmoe-dry", *args)
    body = "\n---\n".join(yaml.safe_dump(o) for o in objects)
    result = control_plane.kubectl("apply", "--dry-run=server", "-f", "-", input=body, check=False)
    assert result.returncode == 0, result.stderr
    applied = [line for line in result.stdout.splitlines() if "(server dry run)" in line]
    assert len(applied) == len(objects), result.stdout


# --- installs ----------------------------------------------------------------------


def sa_kubeconfig(control_plane: ControlPlane, namespace: str, sa: str, path: Path) -> Path:
    """A kubeconfig that authenticates as ``namespace/sa`` with a fresh bound token."""
    token = control_plane.kubectl(
        "create", "token", sa, "-n", namespace, "--duration=3600s"
    ).stdout.strip()
    config = yaml.safe_load(control_plane.kubeconfig.read_text())
    config["users"] = [{"name": sa, "user": {"token": token}}]
    for context in config["contexts"]:
        context["context"]["user"] = sa
    path.write_text(json.dumps(config))
    who = kubectl_as(path, "auth", "whoami", "-o", "jsonpath={.status.userInfo.username}")
    assert who == f"system:serviceaccount:{namespace}:{sa}"
    return path


def can_i(kubeconfig: Path, *args: str) -> bool:
    out = kubectl_as(kubeconfig, "auth", "can-i", *args, check=False).strip()
    return out == "yes"


@pytest.fixture
def namespaced_release(
    control_plane: ControlPlane, helm: Path, tmp_path: Path
) -> Iterator[tuple[str, str]]:
    release_ns, watch_ns = "hetmoe-team", "team-b"
    ensure_namespace(control_plane, watch_ns)
    env = helm_env(control_plane, tmp_path)
    run_helm(
        helm,
        "install",
        "hetmoe-ns",
        str(CHART_DIR),
        "-n",
        release_ns,
        "--create-namespace",
        "--set",
        "replicaCount=0",
        "--set",
        "operator.scope=namespace",
        "--set",
        f"operator.watchNamespace={watch_ns}",
        env=env,
    )
    try:
        yield release_ns, watch_ns
    finally:
        run_helm(helm, "uninstall", "hetmoe-ns", "-n", release_ns, "--wait", env=env, check=False)


def test_namespace_mode_grants_the_operator_exactly_its_namespace(
    control_plane: ControlPlane, namespaced_release: tuple[str, str], tmp_path: Path
) -> None:
    release_ns, ns = namespaced_release
    sa = sa_kubeconfig(control_plane, release_ns, "hetmoe-ns", tmp_path / "sa.kubeconfig")
    allowed = [
        ("create", "pods", "-n", ns),
        ("delete", "pods", "-n", ns),
        ("watch", "moejobs.hetmoe.io", "-n", ns),
        ("patch", "moejobs.hetmoe.io", "--subresource=status", "-n", ns),
        ("create", "configmaps", "-n", ns),
        ("create", "services", "-n", ns),
        ("create", "events", "-n", ns),
        ("patch", "kopfpeerings.kopf.dev/hetmoe", "-n", ns),
        ("watch", "kopfpeerings.kopf.dev", "-n", ns),
        ("list", "nodes"),
        ("watch", "nodes"),
        ("list", "customresourcedefinitions.apiextensions.k8s.io"),
        ("list", "pods", "--all-namespaces"),
        ("update", "configmaps", "-n", ns),
    ]
    denied = [
        ("create", "pods", "-n", "default"),
        ("watch", "pods", "--all-namespaces"),
        ("delete", "pods", "-n", "default"),
        ("update", "services", "-n", ns),
        ("list", "moejobs.hetmoe.io", "-n", "default"),
        ("list", "moejobs.hetmoe.io", "--all-namespaces"),
        ("get", "secrets", "-n", ns),
        ("update", "moejobs.hetmoe.io", "-n", ns),
        ("delete", "moejobs.hetmoe.io", "-n", ns),
        ("patch", "kopfpeerings.kopf.dev/someone-else", "-n", ns),
        ("patch", "nodes"),
        ("delete", "nodes"),
        ("create", "clusterkopfpeerings.kopf.dev"),
        ("create", "rolebindings.rbac.authorization.k8s.io", "-n", ns),
    ]
    assert [a for a in allowed if not can_i(sa, *a)] == []
    assert [d for d in denied if can_i(sa, *d)] == []
    peering = control_plane.kubectl(
        "get", "kopfpeerings.kopf.dev", "hetmoe", "-n", ns, "-o", "name"
    )
    assert peering.stdout.strip() == "kopfpeering.kopf.dev/hetmoe"


# --- helm install + a MoEJob that reaches Running -----------------------------------


def moejob(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "hetmoe.io/v1alpha1",
        "kind": "MoEJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"preset": "tiny"},
            "training": {"steps": 1000, "globalBatchSize": 8, "sequenceLength": 64},
            "elastic": {"maxRestarts": 2, "backoffSeconds": 1},
            "checkpoint": {"volume": {"emptyDir": True}, "intervalSteps": 100},
        },
    }


class LocalOperator:
    """`hetmoe operator` as a subprocess with its own session (stopped by its pid)."""

    def __init__(self, args: list[str], kubeconfig: Path, log: Path) -> None:
        self.log = log
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "POD_ID": "hetmoe-chart-test",
            "PYTHONUNBUFFERED": "1",
        }
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [str(HETMOE), "operator", *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=REPO_ROOT,
            )

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def stop(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except OSError as error:
        return 0, str(error)


@dataclass(frozen=True)
class Install:
    """One way to install the chart: release, namespaces, and its ServiceAccount."""

    release: str
    namespace: str
    job_namespace: str
    values: tuple[str, ...] = ()

    @property
    def service_account(self) -> str:
        return self.release  # fullname: the release name already contains "hetmoe"


INSTALLS = [
    Install("hetmoe", "hetmoe-system", "team-a"),
    # Single-namespace mode watching its own release namespace (the default).
    Install("hetmoe-solo", "ml-solo", "ml-solo", ("--set", "operator.scope=namespace")),
]


@pytest.mark.parametrize("install", INSTALLS, ids=["cluster", "namespace"])
def test_helm_install_then_moejob_runs_with_the_charts_rbac(
    control_plane: ControlPlane, helm: Path, tmp_path: Path, install: Install
) -> None:
    release, release_ns, job_ns, job_name = (
        install.release,
        install.namespace,
        install.job_namespace,
        "chart-smoke",
    )
    env = helm_env(control_plane, tmp_path)
    assert HETMOE.exists(), f"{HETMOE} missing: the operator CLI is not installed in the venv"
    # Zero replicas: kwok nodes run no containers; the operator runs locally below.
    run_helm(
        helm,
        "install",
        release,
        str(CHART_DIR),
        "-n",
        release_ns,
        "--create-namespace",
        "--set",
        "replicaCount=0",
        *install.values,
        env=env,
    )
    operator: LocalOperator | None = None
    try:
        status = run_helm(helm, "status", release, "-n", release_ns, "-o", "json", env=env)
        assert json.loads(status.stdout)["info"]["status"] == "deployed"
        for crd in ("moejobs.hetmoe.io", "clusterkopfpeerings.kopf.dev", "kopfpeerings.kopf.dev"):
            control_plane.kubectl("get", "crd", crd)

        # The catalog exactly as the Deployment would mount it.
        catalog = tmp_path / "catalog.yaml"
        catalog.write_text(
            control_plane.kubectl(
                "get",
                "configmap",
                f"{release}-catalog",
                "-n",
                release_ns,
                "-o",
                "jsonpath={.data.catalog\\.yaml}",
            ).stdout
        )
        sa = sa_kubeconfig(
            control_plane, release_ns, install.service_account, tmp_path / "sa.kubeconfig"
        )
        port = free_port()
        # The Deployment's own command line, with a free local port and the catalog file.
        objects = parse_manifests(
            run_helm(
                helm, "template", release, str(CHART_DIR), "-n", release_ns, *install.values
            ).stdout
        )
        deployment = next(o for o in objects if o["kind"] == "Deployment")
        main = deployment["spec"]["template"]["spec"]["containers"][0]
        assert main["command"][:2] == ["hetmoe", "operator"]
        args = list(main["command"][2:])
        args[args.index("--metrics-port") + 1] = str(port)
        args[args.index("--catalog") + 1] = str(catalog)
        operator = LocalOperator(args, sa, tmp_path / "operator.log")

        ensure_namespace(control_plane, job_ns)
        control_plane.kubectl("apply", "-n", job_ns, "-f", "-", input=json.dumps(moejob(job_name)))

        deadline = time.monotonic() + RUNNING_TIMEOUT
        phase = None
        while time.monotonic() < deadline:
            assert operator.process.poll() is None, f"operator exited:\n{operator.tail()}"
            out = control_plane.kubectl(
                "get", "moejob", job_name, "-n", job_ns, "-o", "jsonpath={.status.phase}"
            )
            phase = out.stdout.strip()
            if phase == "Running":
                break
            time.sleep(2)
        job = control_plane.kubectl("get", "moejob", job_name, "-n", job_ns, "-o", "yaml").stdout
        assert phase == "Running", f"phase {phase!r}\n{job}\noperator log:\n{operator.tail()}"

        pods = json.loads(control_plane.kubectl("get", "pods", "-n", job_ns, "-o", "json").stdout)[
            "items"
        ]
        owned = [
            p
            for p in pods
            if any(r.get("name") == job_name for r in p["metadata"].get("ownerReferences", []))
        ]
        assert owned, f"no worker pods owned by {job_name}"
        assert {p["status"].get("phase") for p in owned} == {"Running"}
        assert all(p["spec"].get("nodeName") for p in owned)

        # Not a single request was refused: the chart's RBAC covers what the operator does.
        denials = [
            line
            for line in operator.log.read_text(errors="replace").splitlines()
            if "forbidden" in line.lower() or " 403" in line
        ]
        assert not denials, "RBAC denials in the operator log:\n" + "\n".join(denials[:10])

        # The Deployment's probes and the metrics Service point at this port.
        code, body = http_get(f"http://127.0.0.1:{port}/metrics")
        assert code == 200, body[:500]
        missing = [
            name
            for name, kind in OPERATOR_METRICS.items()
            # Text format 0.0.4 names counters with their _total suffix, OpenMetrics without.
            if f"# TYPE {name} {kind}" not in body
            and f"# TYPE {family_name(name, kind)} {kind}" not in body
        ]
        assert not missing, f"operator metrics the dashboard uses are not served: {missing}"
        for probe in ("livenessProbe", "readinessProbe"):
            code, body = http_get(f"http://127.0.0.1:{port}{main[probe]['httpGet']['path']}")
            assert code == 200, f"{probe}: {code} {body[:300]}"
    finally:
        control_plane.kubectl(
            "delete",
            "moejob",
            job_name,
            "-n",
            job_ns,
            "--ignore-not-found",
            "--wait=true",
            "--timeout=60s",
            check=False,
        )
        if operator is not None:
            operator.stop()
        run_helm(helm, "uninstall", release, "-n", release_ns, "--wait", env=env, check=False)
    # CRDs under crds/ survive `helm uninstall` (and so would every MoEJob).
    control_plane.kubectl("get", "crd", "moejobs.hetmoe.io")
