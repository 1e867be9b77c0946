"""A real, local Kubernetes control plane for integration tests.

etcd, kube-apiserver, kube-controller-manager, kube-scheduler (all from the
``hetmoe-k8s`` binary built by ``tests/cluster/build.sh``) and kwok run as
separate processes on 127.0.0.1. No Docker is needed, and nothing is mocked:
tests see the same scheduler, garbage collector and admission chain as a real
cluster, with kwok playing the kubelets of fake nodes.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from kubernetes.client import ApiClient
from kubernetes.config import new_client_from_config

REPO_ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO_ROOT / "tests" / "cluster" / "build.sh"
#: Set to an existing bin dir to skip running build.sh (e.g. in CI images).
BIN_DIR_ENV = "HETMOE_K8S_BIN"
PIDS_FILE = "pids.json"
KUBECONFIG_FILE = "admin.kubeconfig"
#: Annotation kwok selects its fake nodes by (see kwok's --manage-nodes-with-annotation-selector).
KWOK_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
LOG_TAIL_LINES = 40
CLIENT_RATE_ARGS = ("--kube-api-qps=200", "--kube-api-burst=400")
"""Client rate limits of the controller-manager and scheduler. The defaults (20 and 50
requests/s) are sized for small clusters: on the 1,050-node reference topology the
controller-manager then needed minutes to lift the ``not-ready`` taint of fresh nodes,
and the scheduler bound pods at 50/s. Large clusters raise them the same way."""
PR_SET_PDEATHSIG = 1  # linux/prctl.h
#: kwok defaults to 4 workers per stage kind (1,000 nodes take minutes) and a /24
#: pod CIDR (254 pods); the pod range must not overlap the 10.0.0.0/24 services.
KWOK_CONFIGURATION = """\
apiVersion: config.kwok.x-k8s.io/v1alpha1
kind: KwokConfiguration
options:
  cidr: 10.64.0.0/12
  nodePlayStageParallelism: 16
  nodeLeaseParallelism: 16
  podPlayStageParallelism: 16
"""


class ControlPlaneError(RuntimeError):
    """The stack failed to start; the message carries the culprit's log tail."""


def cache_root() -> Path:
    """The per-machine cache shared by build.sh and the dev cluster."""
    return Path(os.environ.get("HETMOE_CACHE", Path.home() / ".cache" / "hetmoe"))


def k8s_version() -> str:
    """The Kubernetes release pinned in tests/cluster/k8s/go.mod (what /version reports)."""
    for line in (REPO_ROOT / "tests" / "cluster" / "k8s" / "go.mod").read_text().splitlines():
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "k8s.io/kubernetes" and parts[1].startswith("v"):
            return parts[1]
    raise ControlPlaneError("k8s.io/kubernetes not required in tests/cluster/k8s/go.mod")


def ensure_built() -> Path:
    """Return the bin dir, running build.sh (a no-op when cached) if needed."""
    override = os.environ.get(BIN_DIR_ENV)
    if override:
        return Path(override)
    result = subprocess.run(
        ["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True, check=True
    )
    return Path(result.stdout.strip().splitlines()[-1])


def free_port() -> int:
    """Ask the kernel for an unused loopback port."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """Last lines of a component log, for error messages."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "<no log>"


def pid_alive(pid: int) -> bool:
    """True while a pid exists and is not a zombie awaiting its parent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def die_with_parent() -> None:
    """In the child before exec: get SIGKILL if the starting process dies.

    Covers what ``stop`` cannot: a test runner killed by SIGTERM/SIGKILL or a
    crashed interpreter would otherwise leave a whole cluster running.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def is_component(pid: int) -> bool:
    """Guard against pid reuse: only hetmoe-k8s and kwok processes are ours to stop."""
    try:
        argv0 = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return Path(argv0.decode(errors="replace")).name in {"hetmoe-k8s", "kwok"}


def stop_pids(pids: Sequence[int], grace_seconds: float = 10.0) -> None:
    """Stop processes in reverse start order and verify every one is gone.

    Clients go first: the apiserver exits in about a second once nothing watches
    it, but SIGTERM-ing everything at once leaves it and etcd waiting on each
    other for many seconds. Works for processes this interpreter did not start
    (``down`` after ``up``); each component leads its own session, so pid == pgid.
    """
    for pid in reversed(pids):
        _stop_group(pid, grace_seconds)
    leftover = [p for p in pids if pid_alive(p)]
    if leftover:
        raise ControlPlaneError(f"processes survived SIGKILL: {leftover}")


def _stop_group(pgid: int, grace_seconds: float) -> None:
    """SIGTERM a process group, then SIGKILL it if its leader outlives the grace."""
    for sig, wait in ((signal.SIGTERM, grace_seconds), (signal.SIGKILL, 5.0)):
        if not pid_alive(pgid):
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait
        while pid_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)


def http_ok(
    url: str, headers: dict[str, str] | None = None, context: ssl.SSLContext | None = None
) -> bool:
    """True if a GET answers 200; any connection error just means "not yet"."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=2, context=context) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _run_openssl(args: Sequence[str], cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(directory: Path) -> None:
    """CA, apiserver serving cert (SAN 127.0.0.1/localhost) and service-account key.

    P-256 keys: generating RSA keys costs seconds of a 2-core machine's warm start.
    """
    _run_openssl(
        [
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "3650",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-subj",
            "/CN=hetmoe-test-ca",
        ],
        directory,
    )
    (directory / "apiserver.ext").write_text(
        "subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes,"
        "DNS:kubernetes.default,DNS:kubernetes.default.svc,IP:10.0.0.1\n"
        "extendedKeyUsage=serverAuth\n"
    )
    _run_openssl(
        [
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "apiserver.key",
            "-out",
            "apiserver.csr",
            "-subj",
            "/CN=kube-apiserver",
        ],
        directory,
    )
    _run_openssl(
        [
            "x509",
            "-req",
            "-in",
            "apiserver.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "3650",
            "-extfile",
            "apiserver.ext",
            "-out",
            "apiserver.crt",
        ],
        directory,
    )
    _run_openssl(
        ["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "sa.key"], directory
    )


def kubeconfig_yaml(server: str, ca_file: Path, token: str) -> str:
    """An admin kubeconfig (JSON is valid YAML, and needs no yaml dependency)."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "hetmoe", "cluster": {"server": server, "certificate-authority": str(ca_file)}}
        ],
        "users": [{"name": "admin", "user": {"token": token}}],
        "contexts": [{"name": "hetmoe", "context": {"cluster": "hetmoe", "user": "admin"}}],
        "current-context": "hetmoe",
    }
    return json.dumps(config, indent=2)


@dataclass
class Component:
    """One started process and where its log goes."""

    name: str
    process: subprocess.Popen[bytes]
    log: Path


@dataclass
class ControlPlane:
    """etcd + kube-apiserver + controller-manager + scheduler + kwok, on loopback.

    Use as a context manager; ``stop`` kills every process it started even when
    startup failed halfway, and unless ``detached`` the kernel kills them if
    this process dies first. ``workdir`` defaults to a fresh temp dir, removed on
    stop; pass a directory to keep logs, certs and the kubeconfig around.
    """

    bin_dir: Path
    workdir: Path | None = None
    startup_timeout: float = 120.0
    detached: bool = False
    components: list[Component] = field(default_factory=list, init=False)
    token: str = field(default_factory=lambda: secrets.token_hex(24), init=False)
    apiserver_port: int = field(default=0, init=False)
    _owns_workdir: bool = field(default=False, init=False)

    @property
    def stages_file(self) -> Path:
        """kwok stage definitions that build.sh stores next to the bin dir."""
        return self.bin_dir.parent / "stages.yaml"

    @property
    def kubeconfig(self) -> Path:
        return self._dir / KUBECONFIG_FILE

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.apiserver_port}"

    @property
    def pids(self) -> list[int]:
        return [c.process.pid for c in self.components]

    @property
    def _dir(self) -> Path:
        if self.workdir is None:
            raise ControlPlaneError("control plane not started")
        return self.workdir

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> ControlPlane:
        """Start all components and block until the API answers and controllers run."""
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="hetmoe-cp-"))
            self._owns_workdir = True
        self._dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_all()
        except BaseException:
            self.stop()
            raise
        return self

    def _start_all(self) -> None:
        make_pki(self._dir)
        (self._dir / "tokens.csv").write_text(f'{self.token},admin,admin-uid,"system:masters"\n')
        etcd_port = free_port()
        self._spawn("etcd", self._etcd_args(etcd_port))
        self._wait("etcd", lambda: http_ok(f"http://127.0.0.1:{etcd_port}/health"))
        self.apiserver_port = free_port()
        self._spawn("kube-apiserver", self._apiserver_args(etcd_port))
        self._wait("kube-apiserver", lambda: self._api_ok("/readyz"))
        self.kubeconfig.write_text(kubeconfig_yaml(self.server, self._dir / "ca.crt", self.token))
        self._spawn("kube-controller-manager", self._controller_manager_args())
        self._spawn("kube-scheduler", self._scheduler_args())
        self._spawn("kwok", self._kwok_args(), binary=self.bin_dir / "kwok")
        self._wait(
            "kube-controller-manager",
            lambda: self._api_ok("/api/v1/namespaces/default/serviceaccounts/default"),
        )
        self._write_pids()

    def stop(self) -> None:
        """Stop every started process (TERM, then KILL) and reap it."""
        stop_pids(self.pids)
        for component in self.components:
            component.process.wait(timeout=5)
        self.components.clear()
        if self._owns_workdir and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster, capturing text output."""
        return subprocess.run(
            ["kubectl", "--kubeconfig", str(self.kubeconfig), *args],
            input=input,
            capture_output=True,
            text=True,
            check=check,
        )

    def api_client(self) -> ApiClient:
        """A fresh kubernetes-client ApiClient authenticated as the admin."""
        client: ApiClient = new_client_from_config(config_file=str(self.kubeconfig))
        return client

    def _etcd_args(self, client_port: int) -> list[str]:
        peer = f"http://127.0.0.1:{free_port()}"
        client = f"http://127.0.0.1:{client_port}"
        return [
            "--name",
            "n0",
            "--data-dir",
            str(self._dir / "etcd"),
            "--unsafe-no-fsync",
            "--listen-client-urls",
            client,
            "--advertise-client-urls",
            client,
            "--listen-peer-urls",
            peer,
            "--initial-advertise-peer-urls",
            peer,
            "--initial-cluster",
            f"n0={peer}",
            "--log-level",
            "warn",
        ]

    def _apiserver_args(self, etcd_port: int) -> list[str]:
        d = self._dir
        return [
            "--etcd-servers",
            f"http://127.0.0.1:{etcd_port}",
            "--bind-address",
            "127.0.0.1",
            "--secure-port",
            str(self.apiserver_port),
            "--tls-cert-file",
            str(d / "apiserver.crt"),
            "--tls-private-key-file",
            str(d / "apiserver.key"),
            "--client-ca-file",
            str(d / "ca.crt"),
            "--token-auth-file",
            str(d / "tokens.csv"),
            "--authorization-mode",
            "Node,RBAC",
            "--service-account-issuer",
            "https://kubernetes.default.svc",
            "--service-account-key-file",
            str(d / "sa.key"),
            "--service-account-signing-key-file",
            str(d / "sa.key"),
            "--service-cluster-ip-range",
            "10.0.0.0/24",
            "--endpoint-reconciler-type",
            "none",
            "--allow-privileged",
            "--profiling=false",
        ]

    def _controller_manager_args(self) -> list[str]:
        d = self._dir
        return [
            "--kubeconfig",
            str(self.kubeconfig),
            "--leader-elect=false",
            "--secure-port",
            "0",
            "--service-account-private-key-file",
            str(d / "sa.key"),
            "--root-ca-file",
            str(d / "ca.crt"),
            "--profiling=false",
            *CLIENT_RATE_ARGS,
        ]

    def _scheduler_args(self) -> list[str]:
        return [
            "--kubeconfig",
            str(self.kubeconfig),
            "--leader-elect=false",
            "--secure-port",
            "0",
            "--profiling=false",
            *CLIENT_RATE_ARGS,
        ]

    def _kwok_args(self) -> list[str]:
        key, value = KWOK_NODE_ANNOTATION
        config = self._dir / "kwok.yaml"
        config.write_text(KWOK_CONFIGURATION)
        return [
            "--kubeconfig",
            str(self.kubeconfig),
            "--config",
            str(self.stages_file),
            "--config",
            str(config),
            "--manage-all-nodes=false",
            "--manage-nodes-with-annotation-selector",
            f"{key}={value}",
            "--node-lease-duration-seconds",
            "40",
            # Per-object INFO lines cost real CPU with 1,000+ nodes; errors still show.
            "--v",
            "WARN",
        ]

    def _spawn(self, name: str, args: list[str], binary: Path | None = None) -> None:
        """Start a component in its own session so its whole group can be killed."""
        log = self._dir / f"{name}.log"
        argv = [str(binary), *args] if binary else [str(self.bin_dir / "hetmoe-k8s"), name, *args]
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self._dir,
                preexec_fn=None if self.detached else die_with_parent,
            )
        self.components.append(Component(name, process, log))
        self._write_pids()

    def _write_pids(self) -> None:
        """Persist pids so ``python -m tests.cluster down`` can stop a detached stack."""
        pids = {c.name: c.process.pid for c in self.components}
        (self._dir / PIDS_FILE).write_text(json.dumps(pids, indent=2))

    def _wait(self, name: str, ready: Callable[[], bool]) -> None:
        """Poll ``ready`` until true; fail fast with a log tail if any component dies."""
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            self._raise_if_exited()
            if ready():
                return
            time.sleep(0.1)
        log = self._dir / f"{name}.log"
        raise ControlPlaneError(
            f"{name} not ready after {self.startup_timeout:.0f}s; tail of {log}:\n{log_tail(log)}"
        )

    def _raise_if_exited(self) -> None:
        for component in self.components:
            code = component.process.poll()
            if code is not None:
                raise ControlPlaneError(
                    f"{component.name} exited with code {code}; tail of {component.log}:\n"
                    f"{log_tail(component.log)}"
                )

    def _api_ok(self, path: str) -> bool:
        context = ssl.create_default_context(cafile=str(self._dir / "ca.crt"))
        return http_ok(self.server + path, {"Authorization": f"Bearer {self.token}"}, context)


def stop_detached(workdir: Path) -> list[int]:
    """Stop a stack started by ``python -m tests.cluster up`` from its pid file."""
    pid_file = workdir / PIDS_FILE
    if not pid_file.exists():
        return []
    pids = [p for p in json.loads(pid_file.read_text()).values() if is_component(p)]
    stop_pids(pids)
    pid_file.unlink()
    return pids
