"""The local kubelet: how the operator's worker Pods become local process groups."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from tests.local.conftest import TINY_JOB

from hetmoe_operator.api.cluster import POOL_LABEL, ClusterDescription
from hetmoe_operator.api.manifests import load_job
from hetmoe_operator.api.operator_config import WorkerPorts
from hetmoe_operator.desired.children import plan_config_map, rendezvous_service
from hetmoe_operator.desired.names import JobRef
from hetmoe_operator.desired.worker import PodContext, worker_pods
from hetmoe_operator.local.executor import (
    SLOWDOWN_ENV,
    THREADS_ENV,
    LocalExecutor,
    LocalPod,
    TranslationError,
    group_members,
    simulated_slowdowns,
    translate,
    write_config_maps,
)
from hetmoe_operator.plan import Plan

JOB = JobRef(name="tiny", namespace="default", uid="00000000-0000-0000-0000-000000000001")


def _hand_plan() -> Plan:
    """A 4-rank plan over the local pools: stage 0 on ``fast``, stage 1 on ``slow``.

    Written by hand so these tests exercise translation alone, whatever the planner
    would choose.
    """
    spec = load_job(TINY_JOB).spec
    ranks = [
        {
            "rank": stage * 2 + dp,
            "pool": pool,
            "grade": grade,
            "nodeSlot": 0,
            "localRank": dp,
            "stage": stage,
            "dpIndex": dp,
            "epGroup": 0,
            "epRank": dp,
            "experts": list(range(dp * 4, dp * 4 + 4)),
        }
        for stage, (pool, grade) in enumerate([("fast", "sim-fast"), ("slow", "sim-slow")])
        for dp in range(2)
    ]
    return Plan.model_validate(
        {
            "job": "tiny",
            "model": spec.model.resolve().to_wire(),
            "training": spec.training.to_wire(),
            "parallel": {"pp": 2, "dp": 2, "ep": 2},
            "stages": [
                {
                    "index": 0,
                    "layerStart": 0,
                    "layerEnd": 3,
                    "hasEmbedding": True,
                    "hasHead": False,
                },
                {
                    "index": 1,
                    "layerStart": 3,
                    "layerEnd": 6,
                    "hasEmbedding": False,
                    "hasHead": True,
                },
            ],
            "replicas": [
                {"dpIndex": i, "samplesPerStep": 8, "microbatchSize": 2, "numMicrobatches": 4}
                for i in range(2)
            ],
            "ranks": ranks,
        }
    )


def _manifests(cluster: ClusterDescription, *, generation: int = 0) -> list[dict[str, Any]]:
    """ConfigMap, Service and Pods exactly as the operator's builders make them."""
    plan = _hand_plan()
    ports = WorkerPorts()
    context = PodContext(
        job=JOB,
        spec=load_job(TINY_JOB).spec,
        generation=generation,
        plan_generation=1,
        ports=ports,
        resource_names={g.name: g.resource_name for g in cluster.catalog.grades},
        pool_label=POOL_LABEL,
        tolerations=[],
    )
    return [
        plan_config_map(JOB, plan, 1),
        rendezvous_service(JOB, ports),
        *worker_pods(plan, context),
    ]


def _flag(pod: LocalPod, name: str) -> str:
    for index, arg in enumerate(pod.argv):
        if arg == name:
            return pod.argv[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {pod.argv}")


@pytest.fixture
def translated(tmp_path: Path, local_cluster: ClusterDescription) -> list[LocalPod]:
    manifests = _manifests(local_cluster)
    write_config_maps(manifests, tmp_path)
    return translate(manifests, tmp_path, local_cluster)


def test_one_local_process_group_per_pod_with_this_interpreter(translated: list[LocalPod]) -> None:
    assert [pod.name for pod in translated] == ["tiny-g0-fast-0", "tiny-g0-slow-0"]
    for pod in translated:
        assert pod.argv[0] == sys.executable  # the image's python is this venv's
        assert "hetmoe_trainer" in pod.argv
        assert pod.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"


def test_plan_config_map_becomes_a_file_and_paths_point_at_it(
    translated: list[LocalPod], tmp_path: Path
) -> None:
    plan_file = tmp_path / "configmaps" / "tiny-plan" / "plan.json"
    assert Plan.from_json(plan_file.read_text()).world_size == 4
    for pod in translated:
        assert _flag(pod, "--plan") == str(plan_file)
        assert pod.env["HETMOE_PLAN"] == str(plan_file)


def test_checkpoint_volume_is_the_shared_run_directory(
    translated: list[LocalPod], tmp_path: Path
) -> None:
    checkpoints = tmp_path / "checkpoints"
    assert checkpoints.is_dir()
    for pod in translated:
        assert _flag(pod, "--checkpoint-dir") == str(checkpoints)
        assert pod.env["HETMOE_CHECKPOINT_DIR"] == str(checkpoints)


def test_a_pod_started_later_in_its_generation_dials_the_same_rendezvous(
    translated: list[LocalPod], tmp_path: Path, local_cluster: ClusterDescription
) -> None:
    """A pod replaced alone is translated on its own; with its generation's Service
    ports it reaches the same rendezvous endpoint (without them it would get a new one)."""
    manifests = _manifests(local_cluster)
    service, replacement = manifests[1], manifests[-1]
    again = translate(
        [service, replacement], tmp_path, local_cluster, service_ports=translated[0].service_ports
    )
    assert _flag(again[0], "--rdzv-endpoint") == _flag(translated[0], "--rdzv-endpoint")


def test_rendezvous_goes_to_one_local_port_and_names_stay(translated: list[LocalPod]) -> None:
    endpoints = {_flag(pod, "--rdzv-endpoint") for pod in translated}
    assert len(endpoints) == 1
    host, port = endpoints.pop().split(":")
    assert host == "127.0.0.1"
    assert port.isdigit()
    for pod in translated:
        assert pod.env["HETMOE_RDZV_ENDPOINT"] == f"{host}:{port}"
        # The Service is named like the job: the job name itself is not a host.
        assert pod.env["HETMOE_JOB"] == "tiny"
        assert _flag(pod, "--rdzv-id") == "tiny-g0"


def test_each_pod_gets_its_own_metrics_ports(translated: list[LocalPod]) -> None:
    all_ports = [port for pod in translated for port in pod.metrics_ports]
    assert len(all_ports) == len(set(all_ports)) == 4  # 2 pods x 2 processes
    for pod in translated:
        base = int(_flag(pod, "--metrics-port"))
        assert pod.metrics_ports == (base, base + 1)
        assert pod.env["HETMOE_METRICS_PORT"] == str(base)


def test_slowdown_comes_from_the_catalog(
    translated: list[LocalPod], local_cluster: ClusterDescription
) -> None:
    slowdowns = simulated_slowdowns(local_cluster)
    assert slowdowns["fast"] == 1.0
    assert 1.5 <= slowdowns["slow"] <= 2.0
    by_pool = {pod.env["HETMOE_POOL"]: pod.env[SLOWDOWN_ENV] for pod in translated}
    assert by_pool == {"fast": "1", "slow": f"{slowdowns['slow']:g}"}


def test_each_pod_gets_its_share_of_the_cores(
    tmp_path: Path, local_cluster: ClusterDescription, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchrun pins one thread per worker only for several workers per node; local
    pods share one machine, so every pod is given its share (2 pods x 2 workers here)."""
    manifests = _manifests(local_cluster)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert [pod.env[THREADS_ENV] for pod in translate(manifests, tmp_path, local_cluster)] == [
        "2",
        "2",
    ]
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert {pod.env[THREADS_ENV] for pod in translate(manifests, tmp_path, local_cluster)} == {"1"}
    container = next(m for m in manifests if m["kind"] == "Pod")["spec"]["containers"][0]
    container["env"].append({"name": THREADS_ENV, "value": "3"})
    assert translate(manifests, tmp_path, local_cluster)[0].env[THREADS_ENV] == "3"


def test_empty_dir_is_per_pod_and_unknown_volumes_are_refused(
    tmp_path: Path, local_cluster: ClusterDescription
) -> None:
    manifests = _manifests(local_cluster)
    pods = [m for m in manifests if m["kind"] == "Pod"]
    pods[0]["spec"]["volumes"][1] = {"name": "checkpoints", "emptyDir": {}}
    local = translate(manifests, tmp_path, local_cluster)
    assert local[0].empty_dirs == (tmp_path / "pods" / "tiny-g0-fast-0" / "checkpoints",)
    pods[0]["spec"]["volumes"][1] = {"name": "checkpoints", "csi": {"driver": "x"}}
    with pytest.raises(TranslationError, match="no local mapping"):
        translate(manifests, tmp_path, local_cluster)


def test_downward_api_env_resolves_locally(
    tmp_path: Path, local_cluster: ClusterDescription
) -> None:
    manifests = _manifests(local_cluster)
    container = manifests[2]["spec"]["containers"][0]
    container["env"].append(
        {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    )
    container["env"].append(
        {"name": "IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}
    )
    pod = translate(manifests, tmp_path, local_cluster)[0]
    assert (pod.env["POD"], pod.env["IP"]) == ("tiny-g0-fast-0", "127.0.0.1")


def _python_pod(name: str, code: str) -> LocalPod:
    return LocalPod(
        name=name, argv=(sys.executable, "-c", code), env={}, labels={}, metrics_ports=()
    )


def _wait_phase(executor: LocalExecutor, name: str, timeout: float = 10.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = next(s for s in executor.observe() if s.name == name)
        if state.phase != "Running":
            return state
        time.sleep(0.05)
    raise AssertionError(f"{name} still running")


def test_exit_codes_become_pod_phases(tmp_path: Path) -> None:
    executor = LocalExecutor(tmp_path, grace_seconds=2)
    executor.start(_python_pod("ok", "pass"), 0)
    executor.start(_python_pod("bad", "raise SystemExit(86)"), 0)
    executor.start(_python_pod("killed", "import os, signal; os.kill(os.getpid(), 9)"), 0)
    try:
        assert _wait_phase(executor, "ok").phase == "Succeeded"
        bad = _wait_phase(executor, "bad")
        assert (bad.phase, bad.exit_code) == ("Failed", 86)
        killed = _wait_phase(executor, "killed")
        assert (killed.phase, killed.exit_code) == ("Failed", 137)
    finally:
        executor.delete_all()


def test_stopping_a_pod_stops_its_whole_process_group(tmp_path: Path) -> None:
    # A parent that ignores SIGTERM and a child of its own: both must go.
    code = (
        "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
        "print('ready', flush=True); time.sleep(60)"
    )
    executor = LocalExecutor(tmp_path, grace_seconds=1)
    executor.start(_python_pod("stubborn", code), 3)
    log = tmp_path / "logs" / "stubborn.gen3.log"
    deadline = time.monotonic() + 10
    while "ready" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.05)
    (pgid,) = executor.pids()
    assert len(group_members(pgid)) == 2
    executor.delete_all()
    assert group_members(pgid) == []
    assert executor.pods() == []


def test_config_map_files_are_replaced_whole(
    tmp_path: Path, local_cluster: ClusterDescription
) -> None:
    manifests = _manifests(local_cluster)
    write_config_maps(manifests, tmp_path)
    manifests[0]["data"]["plan.json"] = json.dumps({"changed": True})
    write_config_maps(manifests, tmp_path)
    directory = tmp_path / "configmaps" / "tiny-plan"
    assert json.loads((directory / "plan.json").read_text()) == {"changed": True}
    assert sorted(p.name for p in directory.iterdir()) == ["plan.json"]


def test_image_torchrun_becomes_this_interpreters_torch_distributed_run(
    tmp_path: Path, local_cluster: ClusterDescription
) -> None:
    manifests = _manifests(local_cluster)
    container = manifests[2]["spec"]["containers"][0]
    container["command"] = ["torchrun"]
    container["args"] = container["args"][container["args"].index("--nnodes=2") :]
    pod = translate(manifests, tmp_path, local_cluster)[0]
    assert pod.argv[:4] == (sys.executable, "-m", "torch.distributed.run", "--nnodes=2")
