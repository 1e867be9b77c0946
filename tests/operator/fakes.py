"""Test doubles: a deterministic fake planner and builders for observed objects."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from hetmoe_operator.api.catalog import DeviceCatalog
from hetmoe_operator.api.cluster import ClusterDescription
from hetmoe_operator.api.job import MoEJobSpec, PlacementSpec
from hetmoe_operator.api.manifests import load_catalog
from hetmoe_operator.api.model import ModelArchitecture
from hetmoe_operator.api.training import TrainingConfig
from hetmoe_operator.placement.errors import PlanningError
from hetmoe_operator.plan import (
    ParallelDegrees,
    Plan,
    PoolSummary,
    RankPlan,
    ReplicaPlan,
    StagePlan,
)
from hetmoe_operator.reconcile.conditions import rfc3339

DATA = Path(__file__).parent / "data"
NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def catalog() -> DeviceCatalog:
    return load_catalog(DATA / "catalog-small.yaml")


def spec(**overrides: Any) -> MoEJobSpec:
    raw: dict[str, Any] = {
        "model": {"preset": "tiny"},
        "training": {"steps": 10, "globalBatchSize": 8, "sequenceLength": 64},
        "elastic": {"maxRestarts": 2, "backoffSeconds": 1, "maxBackoffSeconds": 4},
    }
    raw.update(overrides)
    return MoEJobSpec.model_validate(raw)


def fake_planner(
    model: ModelArchitecture,
    training: TrainingConfig,
    cluster: ClusterDescription,
    placement: PlacementSpec,
    *,
    job_name: str,
    expert_load: Any = None,
    previous: Plan | None = None,
    nodes_per_pool: int = 1,
    procs_per_node: int = 2,
) -> Plan:
    """One pipeline stage, pure data parallelism: ``procs_per_node`` ranks on the first
    ``nodes_per_pool`` nodes of every pool (at most the global batch)."""
    seats = [
        (p.name, p.grade, slot, local)
        for p in cluster.pools
        for slot in range(min(nodes_per_pool, p.nodes))
        for local in range(min(procs_per_node, p.devices_per_node))
    ]
    seats = seats[: training.global_batch_size]
    if not seats:
        raise PlanningError("devices", "no devices")
    world = len(seats)
    base, extra = divmod(training.global_batch_size, world)
    replicas = [
        ReplicaPlan(
            dp_index=i,
            samples_per_step=base + (i < extra),
            microbatch_size=base + (i < extra),
            num_microbatches=1,
        )
        for i in range(world)
    ]
    ranks = [
        RankPlan(
            rank=i,
            pool=pool,
            grade=grade,
            node_slot=slot,
            local_rank=local,
            stage=0,
            dp_index=i,
            ep_group=0,
            ep_rank=0,
            experts=list(range(model.num_experts)),
        )
        for i, (pool, grade, slot, local) in enumerate(seats)
    ]
    pools = sorted({(pool, grade) for pool, grade, _, _ in seats})
    return Plan(
        job=job_name,
        model=model,
        training=training,
        parallel=ParallelDegrees(pp=1, dp=world, ep=1),
        stages=[StagePlan.whole_model(model)],
        replicas=replicas,
        ranks=ranks,
        pools=[
            PoolSummary(
                pool=p,
                grade=g,
                nodes=len({s for q, _, s, _ in seats if q == p}),
                devices=sum(1 for q, *_ in seats if q == p),
                stages=[0],
                layers=f"0-{model.num_hidden_layers - 1}",
            )
            for p, g in pools
        ],
    )


def node(
    name: str,
    pool: str,
    grade: str,
    *,
    devices: int = 8,
    ready: bool = True,
    unschedulable: bool = False,
    taints: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": name,
            "labels": {"hetmoe.io/pool": pool, "hetmoe.io/accelerator": grade},
        },
        "spec": {"unschedulable": unschedulable, "taints": taints or []},
        "status": {
            "allocatable": {"nvidia.com/gpu": str(devices)},
            "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
        },
    }


class World:
    """A tiny in-memory cluster that applies decisions the way ``kube.apply`` does.

    ``drop_status`` simulates an operator killed after its creates and before its
    status patch; ``kwok`` moves scheduled pods along (bind, Running). With ``linger``
    a graceful delete only marks a scheduled pod terminating, as a kubelet does while
    the trainer saves; ``finish_terminating`` lets those pods go.
    """

    def __init__(
        self, job_spec: MoEJobSpec, nodes: list[dict[str, Any]], planner: Any = fake_planner
    ) -> None:
        from hetmoe_operator.api.operator_config import OperatorConfig
        from hetmoe_operator.api.status import MoEJobStatus
        from hetmoe_operator.desired.names import JobRef

        self.spec = job_spec
        self.metadata_generation = 1
        self.nodes = {n["metadata"]["name"]: n for n in nodes}
        self.pods: dict[str, dict[str, Any]] = {}
        self.config_map: dict[str, Any] | None = None
        self.services = 0
        self.pod_groups: set[str] = set()
        self.status = MoEJobStatus()
        self.now = NOW
        self.job = JobRef(name="job", namespace="ns", uid="uid-1")
        self.config = OperatorConfig()
        self.catalog = catalog()
        self.planner = planner
        self.events: list[Any] = []
        self.pod_creates = 0
        self.last_decision: Any = None
        self.linger = False
        self.progress: Any = None
        """What rank 0 reports at the next pass (None: nothing new)."""

    def observation(self) -> Any:
        from hetmoe_operator.desired.names import PLAN_GENERATION_ANNOTATION, PLAN_KEY
        from hetmoe_operator.discovery import is_ready
        from hetmoe_operator.reconcile.observe import Observation, pod_obs

        plan, plan_gen = None, 0
        if self.config_map is not None:
            plan = Plan.from_json(self.config_map["data"][PLAN_KEY])
            plan_gen = int(self.config_map["metadata"]["annotations"][PLAN_GENERATION_ANNOTATION])
        pods = [o for o in (pod_obs(p) for p in self.pods.values()) if o is not None]
        return Observation(
            job=self.job,
            metadata_generation=self.metadata_generation,
            spec=self.spec,
            status=self.status,
            pods=pods,
            nodes={n: is_ready(v) for n, v in self.nodes.items()},
            now=self.now,
            plan=plan,
            plan_generation=plan_gen,
            progress=self.progress,
        )

    def environment(self) -> Any:
        from hetmoe_operator.discovery import discover
        from hetmoe_operator.reconcile.decide import Environment

        def discover_fn(excluded: Any) -> Any:
            return discover(
                self.nodes.values(),
                self.pods.values(),
                self.catalog,
                self.config,
                refs=self.spec.pools,
                excluded=excluded,
                ignore_owner_uid=self.job.uid,
            )

        return Environment(
            planner=self.planner, discover=discover_fn, catalog=self.catalog, config=self.config
        )

    def reconcile(self, *, drop_status: bool = False) -> Any:
        from hetmoe_operator.reconcile.decide import decide

        decision = decide(self.observation(), self.environment())
        self.last_decision = decision
        for manifest in decision.creates:
            kind, name = manifest["kind"], manifest["metadata"]["name"]
            if kind == "ConfigMap":
                self.config_map = manifest
            elif kind == "Service":
                self.services = 1
            elif kind == "PodGroup":
                self.pod_groups.add(name)
            elif name not in self.pods:
                self.pods[name] = {**manifest, "status": {"phase": "Pending"}}
                self.pod_creates += 1
        if drop_status:
            return decision
        self.status = decision.status
        self.events.extend(decision.events)
        for delete in decision.deletes:
            if delete.kind == "PodGroup":
                self.pod_groups.discard(delete.name)
                continue
            pod = self.pods.get(delete.name)
            if pod is None:
                continue
            node_ok = self.nodes.get(pod["spec"].get("nodeName", ""))
            if (
                delete.grace_seconds == 0
                or (node_ok and _ready(node_ok) and not self.linger)
                or not pod["spec"].get("nodeName")
            ):
                del self.pods[delete.name]
            elif self.linger:
                grace = delete.grace_seconds
                if grace is None:
                    grace = pod["spec"]["terminationGracePeriodSeconds"]
                pod["metadata"]["deletionTimestamp"] = _timestamp(self.now, grace)
            else:
                pod["metadata"]["deletionTimestamp"] = _timestamp(self.now, 0)
        return decision

    def finish_terminating(self) -> None:
        """Terminating pods exit and are removed (their trainers finished saving)."""
        for name in [n for n, p in self.pods.items() if "deletionTimestamp" in p["metadata"]]:
            del self.pods[name]

    def kwok(self) -> None:
        """Bind pending pods to free nodes of their pool and mark them Running."""
        used = {
            p["spec"].get("nodeName")
            for p in self.pods.values()
            if p["status"]["phase"] not in ("Succeeded", "Failed")
        }
        for pod in self.pods.values():
            if pod["spec"].get("nodeName"):
                if pod["status"]["phase"] == "Pending":
                    pod["status"]["phase"] = "Running"
                continue
            terms = pod["spec"]["affinity"]["nodeAffinity"][
                "requiredDuringSchedulingIgnoredDuringExecution"
            ]["nodeSelectorTerms"][0]
            pool = terms["matchExpressions"][0]["values"][0]
            excluded = set()
            for expr in terms["matchExpressions"][1:]:
                excluded |= set(expr["values"])
            for name, node_obj in sorted(self.nodes.items()):
                labels = node_obj["metadata"]["labels"]
                if (
                    labels["hetmoe.io/pool"] == pool
                    and name not in used
                    and _ready(node_obj)
                    and name not in excluded
                ):
                    pod["spec"]["nodeName"] = name
                    pod["status"] = {"phase": "Running", "podIP": "10.1.0.1"}
                    used.add(name)
                    break

    def fail_pod(
        self, name: str, exit_code: int = 1, reason: str = "Error", message: str = ""
    ) -> None:
        terminated = {
            "exitCode": exit_code,
            "reason": reason,
            "message": message,
            "finishedAt": rfc3339(self.now),
        }
        self.pods[name]["status"] = {
            "phase": "Failed",
            "containerStatuses": [{"state": {"terminated": terminated}}],
        }

    def succeed_all(self) -> None:
        for pod in self.pods.values():
            pod["status"] = {
                "phase": "Succeeded",
                "containerStatuses": [
                    {"state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}
                ],
            }

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)

    def settle(self, rounds: int = 12) -> None:
        """Reconcile, schedule and let time pass until nothing changes."""
        for _ in range(rounds):
            self.reconcile()
            self.kwok()
            self.advance(5)

    def live_pods(self) -> list[str]:
        return sorted(n for n, p in self.pods.items() if "deletionTimestamp" not in p["metadata"])


def _timestamp(now: datetime, seconds_later: float) -> str:
    return (now + timedelta(seconds=seconds_later)).strftime("%Y-%m-%dT%H:%M:%SZ")


def _ready(node_obj: dict[str, Any]) -> bool:
    from hetmoe_operator.discovery import is_ready

    return is_ready(node_obj)


def small_nodes() -> list[dict[str, Any]]:
    return [
        node("a0", "pool-a", "A"),
        node("a1", "pool-a", "A"),
        node("d0", "pool-d", "D"),
        node("d1", "pool-d", "D"),
    ]
