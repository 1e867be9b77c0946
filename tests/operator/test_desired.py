"""Desired-state builders: the worker pod contract, plan ConfigMap and Service."""

from __future__ import annotations

import dataclasses

import pytest

from hetmoe_operator.api.cluster import ClusterDescription, NodePool
from hetmoe_operator.api.operator_config import OperatorConfig
from hetmoe_operator.desired.children import plan_config_map, rendezvous_service
from hetmoe_operator.desired.names import JobRef
from hetmoe_operator.desired.worker import PodContext, worker_launches, worker_pods
from hetmoe_operator.discovery import worker_tolerations
from hetmoe_operator.plan import Plan
from tests.operator.fakes import catalog, fake_planner, spec

JOB = JobRef(name="job", namespace="ns", uid="uid-1")


def plan() -> Plan:
    s = spec()
    cluster = ClusterDescription(
        catalog=catalog(),
        pools=[
            NodePool(name="pool-a", grade="A", nodes=2, devices_per_node=8),
            NodePool(name="pool-d", grade="D", nodes=1, devices_per_node=8),
        ],
    )
    return fake_planner(
        s.model.resolve(), s.training, cluster, s.placement, job_name="job", nodes_per_pool=2
    )


def context(**spec_overrides: object) -> PodContext:
    config = OperatorConfig()
    return PodContext(
        job=JOB,
        spec=spec(**spec_overrides),
        generation=3,
        plan_generation=2,
        ports=config.worker_ports,
        resource_names={"A": "nvidia.com/gpu", "D": "example.com/npu"},
        pool_label="hetmoe.io/pool",
        tolerations=worker_tolerations("nvidia.com/gpu", config),
        excluded_nodes=("bad-node",),
    )


def test_one_pod_per_plan_node_with_the_contract() -> None:
    pods = worker_pods(plan(), context())
    assert [p["metadata"]["name"] for p in pods] == [
        "job-g3-pool-a-0",
        "job-g3-pool-a-1",
        "job-g3-pool-d-0",
    ]
    first = pods[0]
    labels = first["metadata"]["labels"]
    assert labels["hetmoe.io/job"] == "job" and labels["hetmoe.io/generation"] == "3"
    assert labels["hetmoe.io/pool"] == "pool-a" and labels["hetmoe.io/node-slot"] == "0"
    assert (
        labels["hetmoe.io/rank0"] == "true"
        and "hetmoe.io/rank0" not in pods[1]["metadata"]["labels"]
    )
    assert first["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
    container = first["spec"]["containers"][0]
    assert container["command"] == ["python"]
    assert container["args"][:2] == ["-m", "hetmoe_trainer.launch"]
    assert "--rdzv-endpoint=g3-n0.job.ns.svc:29400" in container["args"]
    assert container["args"][-14:] == [
        "-m",
        "hetmoe_trainer",
        "--plan",
        "/etc/hetmoe/plan.json",
        "--checkpoint-dir",
        "/checkpoints",
        "--checkpoint-interval",
        "100",
        "--keep-checkpoints",
        "3",
        "--metrics-port",
        "9400",
        "--hang-timeout",
        "1800",
    ]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["HETMOE_POOL"] == "pool-a" and env["HETMOE_NODE_SLOT"] == "0"
    assert env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    assert container["resources"]["limits"] == {"nvidia.com/gpu": "2"}
    assert [(p["name"], p["containerPort"]) for p in container["ports"]] == [
        ("rendezvous", 29400),
        ("metrics", 9400),
        ("metrics-1", 9401),
    ]
    assert pods[2]["spec"]["containers"][0]["resources"]["limits"] == {"example.com/npu": "2"}
    affinity = first["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"
    ]["nodeSelectorTerms"][0]
    assert affinity["matchExpressions"][1]["values"] == ["bad-node"]
    assert first["spec"]["restartPolicy"] == "Never"
    assert first["spec"]["hostname"] == "g3-n0" and first["spec"]["subdomain"] == "job"


def test_user_strings_stay_single_argv_elements() -> None:
    hostile = "/data; rm -rf / #"
    pods = worker_pods(plan(), context(image="img:1", checkpoint={"volume": {"hostPath": hostile}}))
    container = pods[0]["spec"]["containers"][0]
    assert all(hostile not in arg for arg in container["args"])
    assert pods[0]["spec"]["volumes"][1]["hostPath"]["path"] == hostile
    assert container["command"] == ["python"]


def test_launches_are_executor_agnostic() -> None:
    launches = worker_launches(
        plan(),
        job_name="job",
        generation=1,
        plan_generation=1,
        rendezvous_endpoint="127.0.0.1:29400",
        metrics_port=9400,
        stop_grace_seconds=60,
        plan_path="/tmp/plan.json",
        checkpoint_dir="/tmp/ck",
    )
    assert [launch.node_index for launch in launches] == [0, 1, 2]
    assert "--rdzv-conf=is_host=true" in launches[0].argv
    assert "--rdzv-conf=is_host=false" in launches[1].argv
    assert sum(launch.nproc for launch in launches) == plan().world_size


@pytest.mark.parametrize("grace,timeout", [(None, 55), (600, 595), (5, 1)])
def test_stop_grace_period_bounds_the_pod_and_the_torchrun_agent(
    grace: int | None, timeout: int
) -> None:
    checkpoint = {} if grace is None else {"stopGracePeriodSeconds": grace}
    for pod in worker_pods(plan(), context(checkpoint=checkpoint)):
        assert pod["spec"]["terminationGracePeriodSeconds"] == (grace or 60)
        args = pod["spec"]["containers"][0]["args"]
        # A torchrun option: before the trainer module, not passed on to the trainer.
        assert f"--shutdown-timeout={timeout}" in args[: args.index("hetmoe_trainer")]


@pytest.mark.parametrize("elastic,timeout", [({}, "1800"), ({"hangTimeoutSeconds": 0}, "0")])
def test_the_hang_timeout_reaches_the_trainer(elastic: dict, timeout: str) -> None:
    for pod in worker_pods(plan(), context(elastic=elastic)):
        args = pod["spec"]["containers"][0]["args"]
        trainer_args = args[args.index("hetmoe_trainer") :]
        assert trainer_args[trainer_args.index("--hang-timeout") + 1] == timeout


@pytest.mark.parametrize("elastic,restarts", [({}, 0), ({"inPlaceRestarts": 2}, 2)])
def test_in_place_restarts_are_the_torchrun_agents_restarts(elastic: dict, restarts: int) -> None:
    for pod in worker_pods(plan(), context(elastic=elastic)):
        args = pod["spec"]["containers"][0]["args"]
        assert f"--max-restarts={restarts}" in args[: args.index("hetmoe_trainer")]
        conf = next(a for a in args if a.startswith("--rdzv-conf="))
        # Faster rendezvous heartbeats only where a lost pod may be replaced alone.
        assert ("keep_alive_interval=2,keep_alive_max_attempt=3" in conf) == bool(restarts)


def test_the_catalogs_peaks_of_the_plans_grades_reach_the_trainer() -> None:
    ctx = dataclasses.replace(context(), peak_tflops={"A": 370.0, "D": 989.5, "E": 147.0})
    for pod in worker_pods(plan(), ctx):
        args = pod["spec"]["containers"][0]["args"]
        trainer_args = args[args.index("hetmoe_trainer") :]
        assert trainer_args[trainer_args.index("--grade-peak-tflops") + 1] == "A=370,D=989.5"
    for pod in worker_pods(plan(), context()):  # no catalog: the trainer measures
        assert "--grade-peak-tflops" not in pod["spec"]["containers"][0]["args"]


def test_plan_config_map_round_trips_and_service_is_headless() -> None:
    config_map = plan_config_map(JOB, plan(), 2)
    assert Plan.from_json(config_map["data"]["plan.json"]) == plan()
    assert config_map["metadata"]["annotations"]["hetmoe.io/plan-generation"] == "2"
    service = rendezvous_service(JOB, OperatorConfig().worker_ports)
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True


def test_gang_scheduling_labels() -> None:
    kueue = worker_pods(plan(), context(scheduling={"gang": "kueue", "queueName": "q"}))[0]
    assert kueue["metadata"]["labels"]["kueue.x-k8s.io/pod-group-name"] == "job-g3"
    assert kueue["metadata"]["annotations"]["kueue.x-k8s.io/pod-group-total-count"] == "3"
