"""The local control loop: observe processes as pods, let the operator decide, apply.

This is the operator's reconcile loop with the Kubernetes API replaced by this
machine. Each pass builds the same :class:`Observation` the operator builds (pods
with phases and exit codes, nodes, the plan ConfigMap, rank 0's progress), calls the
same :func:`~hetmoe_operator.reconcile.decide.decide` with the real planner, and
applies the :class:`Decision`: deleted Pods are stopped by the :class:`LocalExecutor`,
created Pods are started. Deletes go first, unlike the operator's order (creates,
status, deletes): a decision may start the next generation in the pass that stops
the last one, and on a cluster the scheduler keeps a terminating pod's devices
booked until it is gone, which here means waiting for its processes to exit.
Restart generations, backoff, maxRestarts and failure rules are therefore exactly
the operator's.

What stands in for the cluster: the local cluster file's pools become Node objects
(one per node, all Ready, every device free), discovered by the operator's own
:func:`~hetmoe_operator.discovery.discover`; a pod is "scheduled" onto the node of
its pool and slot; a pod's status is its process group's (Running, or Succeeded /
Failed with the exit code). The status lives in memory: a rerun is a fresh MoEJob
whose trainer resumes from the checkpoints left in the run directory.

Local-only additions, none of which changes a decision: ``--inject-fault`` sets the
trainer's ``HETMOE_INJECT_FAULT`` hook on the first generation's pods, and the pods'
metrics endpoints are listed for Prometheus in ``prometheus/targets.json``.
"""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any, Literal

from hetmoe_operator.api.cluster import ClusterDescription
from hetmoe_operator.api.job import MoEJob
from hetmoe_operator.api.operator_config import OperatorConfig
from hetmoe_operator.api.status import TERMINAL_PHASES, MoEJobStatus
from hetmoe_operator.desired.names import (
    GENERATION_LABEL,
    NODE_SLOT_LABEL,
    PLAN_GENERATION_ANNOTATION,
    PLAN_KEY,
    WORKER_POOL_LABEL,
    JobRef,
    plan_config_map_name,
)
from hetmoe_operator.desired.worker import CHECKPOINT_DIR
from hetmoe_operator.discovery import Discovery, discover
from hetmoe_operator.errors import UserError
from hetmoe_operator.local.capacity import check_fits_machine
from hetmoe_operator.local.display import RunView
from hetmoe_operator.local.executor import (
    LocalExecutor,
    PodState,
    TranslationError,
    host_path,
    translate,
    write_config_maps,
)
from hetmoe_operator.local.telemetry import Progress, read_progress
from hetmoe_operator.placement import plan_job
from hetmoe_operator.plan import Plan
from hetmoe_operator.reconcile.conditions import rfc3339
from hetmoe_operator.reconcile.decide import Decision, Environment, decide
from hetmoe_operator.reconcile.observe import Observation, pod_obs
from hetmoe_operator.reconcile.planning import make_plan

FAULT_ENV = "HETMOE_INJECT_FAULT"
"""The trainer's fault-injection hook (``hetmoe_trainer.__main__``)."""
POLL_SECONDS = 0.5
"""How often process exits are noticed: the local stand-in for a pod watch."""
NAMESPACE = "default"
DEFAULT_GRACE_SECONDS = 30.0
"""Kubernetes' default terminationGracePeriodSeconds."""
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
SCRAPE_TARGETS = "prometheus/targets.json"
"""Run-directory file listing the trainer metrics endpoints (Prometheus file_sd format)."""


FaultKind = Literal["crash", "hang", "slow"]


@dataclass(frozen=True)
class FaultInjection:
    """Crash, hang or slow down one plan rank from one step on, in the first generation
    this run starts only."""

    rank: int
    step: int
    kind: FaultKind = "crash"
    seconds: float = 1.0
    """``slow``: the delay added to each of the rank's steps."""

    def trainer_spec(self) -> str:
        """The trainer's fault syntax."""
        delay = f",seconds={self.seconds:g}" if self.kind == "slow" else ""
        return f"kind={self.kind},step={self.step},rank={self.rank}{delay}"


@dataclass
class _Pod:
    """A created worker pod: its manifest and the node it was bound to."""

    manifest: Mapping[str, Any]
    node: str


def local_nodes(cluster: ClusterDescription, config: OperatorConfig) -> list[dict[str, Any]]:
    """Node objects for the cluster file's pools, as discovery expects to find them."""
    nodes = []
    for pool in cluster.pools:
        grade = cluster.catalog.grade(pool.grade)
        names = pool.node_names or [f"{pool.name}-{index}" for index in range(pool.nodes)]
        for name in names:
            nodes.append(
                {
                    "metadata": {
                        "name": name,
                        "labels": {config.pool_label: pool.name, config.grade_label: grade.name},
                    },
                    "spec": {},
                    "status": {
                        "allocatable": {grade.resource_name: str(pool.devices_per_node)},
                        "conditions": [{"type": "Ready", "status": "True"}],
                    },
                }
            )
    return nodes


def _pod_view(pod: _Pod, state: PodState | None) -> dict[str, Any]:
    """The pod as the API would return it, with status from its process group."""
    phase = state.phase if state else "Pending"
    container_status: dict[str, Any] = {"name": "trainer", "state": {"running": {}}}
    if state and state.exit_code is not None:
        container_status["state"] = {
            "terminated": {
                "exitCode": state.exit_code,
                "reason": state.reason,
                "message": state.message,
                "finishedAt": rfc3339(state.finished_at) if state.finished_at else None,
            }
        }
    return {
        "metadata": pod.manifest["metadata"],
        "spec": {**pod.manifest["spec"], "nodeName": pod.node},
        "status": {"phase": phase, "podIP": "127.0.0.1", "containerStatuses": [container_status]},
    }


class Supervisor:
    """Runs one MoEJob to Succeeded or Failed on this machine."""

    def __init__(
        self,
        job: MoEJob,
        cluster: ClusterDescription,
        run_dir: Path,
        *,
        fault: FaultInjection | None = None,
        config: OperatorConfig | None = None,
    ) -> None:
        self.job = job
        self.cluster = cluster
        self.run_dir = run_dir
        self.config = config or OperatorConfig()
        self.ref = JobRef(
            name=job.metadata.name,
            namespace=job.metadata.namespace or NAMESPACE,
            uid=f"local-{job.metadata.name}",
        )
        self.status = MoEJobStatus()
        self.events: list[str] = []
        self.executor = LocalExecutor(run_dir)
        self._fault = fault
        self._nodes = local_nodes(cluster, self.config)
        self._config_maps: dict[str, Mapping[str, Any]] = {}
        self._services: dict[str, Mapping[str, Any]] = {}
        self._service_ports: dict[int, Mapping[int, int]] = {}
        """The latest generation's Service ports (container port -> local port)."""
        self._pods: dict[str, _Pod] = {}
        self.checkpoint_dir = run_dir / "checkpoints"
        """Refined from the first pod's checkpoint volume once pods exist."""

    # -- what the operator would be given -------------------------------------------

    def discover(self, excluded: Sequence[str]) -> Discovery:
        """Usable pools: the operator's discovery over the local Node objects."""
        return discover(
            self._nodes,
            [],
            self.cluster.catalog,
            self.config,
            refs=self.job.spec.pools,
            excluded=excluded,
        )

    def environment(self) -> Environment:
        """The real planner and discovery, and the local cluster's catalog."""
        return Environment(
            planner=plan_job,
            discover=self.discover,
            catalog=self.cluster.catalog,
            config=self.config,
        )

    def plan(self) -> tuple[Plan | None, int]:
        """The plan in the job's ConfigMap and its plan generation."""
        config_map = self._config_maps.get(plan_config_map_name(self.ref.name))
        if config_map is None:
            return None, 0
        annotations = config_map["metadata"].get("annotations", {})
        return (
            Plan.from_json(config_map["data"][PLAN_KEY]),
            int(annotations.get(PLAN_GENERATION_ANNOTATION, "0")),
        )

    def progress(self) -> Progress | None:
        """Rank 0's latest progress document."""
        return read_progress(self.checkpoint_dir)

    def observe(self) -> Observation:
        """The snapshot the operator's decision is made from."""
        states = {state.name: state for state in self.executor.observe()}
        pods = [pod_obs(_pod_view(pod, states.get(name))) for name, pod in self._pods.items()]
        plan, plan_generation = self.plan()
        now = datetime.now(UTC)
        progress = self.progress()
        return Observation(
            job=self.ref,
            metadata_generation=1,
            spec=self.job.spec,
            status=self.status,
            pods=[pod for pod in pods if pod is not None],
            nodes={node["metadata"]["name"]: True for node in self._nodes},
            now=now,
            plan=plan,
            plan_generation=plan_generation,
            progress=progress.as_status(rfc3339(now)) if progress else None,
            checkpoint_step=progress.last_checkpoint_step if progress else None,
        )

    def view(self) -> RunView:
        """What the display shows now."""
        plan, _ = self.plan()
        return RunView(
            job=self.ref.name,
            phase=self.status.phase,
            generation=self.status.generation,
            restarts=self.status.restarts + self.status.uncounted_restarts,
            progress=self.progress(),
            plan=plan,
            events=tuple(self.events),
        )

    # -- applying a decision --------------------------------------------------------

    def apply(self, decision: Decision) -> None:
        """Deletes (waiting for the processes to exit), then creates, then status."""
        grace = {
            delete.name: float(
                self._grace_seconds(delete.name)
                if delete.grace_seconds is None
                else delete.grace_seconds
            )
            for delete in decision.deletes
            if delete.kind == "Pod"  # no scheduler, so no gangs, runs locally
        }
        self.executor.delete(grace)
        for name in grace:
            self._pods.pop(name, None)
        pods = [m for m in decision.creates if m["kind"] == "Pod"]
        for manifest in decision.creates:
            name = manifest["metadata"]["name"]
            if manifest["kind"] == "ConfigMap":
                self._config_maps[name] = manifest
                write_config_maps([manifest], self.run_dir)
            elif manifest["kind"] == "Service":
                self._services[name] = manifest
        if pods:
            self._start(pods)
        self.status = decision.status
        self.events.extend(f"{event.reason}: {event.message}" for event in decision.events)

    def _grace_seconds(self, name: str) -> float:
        """The pod's own terminationGracePeriodSeconds, as a kubelet honours it."""
        pod = self._pods.get(name)
        spec = pod.manifest["spec"] if pod else {}
        return float(spec.get("terminationGracePeriodSeconds", DEFAULT_GRACE_SECONDS))

    def _bind(self, manifest: Mapping[str, Any]) -> str:
        """The local scheduler: the slot-th usable node of the pod's pool."""
        labels = manifest["metadata"]["labels"]
        usable = next(
            (
                p
                for p in self.discover(self.status.excluded_nodes).pools
                if p.name == labels[WORKER_POOL_LABEL]
            ),
            None,
        )
        slot = int(labels[NODE_SLOT_LABEL])
        return usable.node_names[slot] if usable and slot < len(usable.node_names) else ""

    def _start(self, manifests: Sequence[Mapping[str, Any]]) -> None:
        """Mount volumes, bind and start created pods: what scheduler and kubelet do."""
        try:
            generation = max(int(m["metadata"]["labels"][GENERATION_LABEL]) for m in manifests)
            local = translate(
                [*self._services.values(), *manifests],
                self.run_dir,
                self.cluster,
                namespace=self.ref.namespace,
                service_ports=self._service_ports.get(generation),
            )
            # A pod replaced alone later in this generation dials the same rendezvous.
            self._service_ports = {generation: local[0].service_ports}
            self.checkpoint_dir = host_path(manifests[0], CHECKPOINT_DIR, self.run_dir)
            for manifest, pod in zip(manifests, local, strict=True):
                self._pods[pod.name] = _Pod(manifest, self._bind(manifest))
                if self._fault is not None:
                    pod = pod.with_env({FAULT_ENV: self._fault.trainer_spec()})
                self.executor.start(pod, generation)
        except TranslationError as error:
            raise UserError(f"local mode cannot run this job's pods: {error}") from None
        self._fault = None  # once: the restarted generation must get past that step
        self._write_scrape_targets()

    def _write_scrape_targets(self) -> None:
        """Prometheus file-based discovery of the running pods' metrics ports.

        On Kubernetes the chart's PodMonitor finds the workers; locally a Prometheus
        started with ``file_sd_configs`` on this file follows every generation's new
        ports. The target labels are the ones the PodMonitor's relabelings produce, so
        the shipped dashboard's queries work unchanged on both.
        """
        groups = [
            {
                "targets": [f"127.0.0.1:{port}" for port in pod.metrics_ports],
                "labels": {
                    "moejob": self.ref.name,
                    "pool": pod.labels[WORKER_POOL_LABEL],
                    "namespace": self.ref.namespace,
                    "pod": pod.name,
                },
            }
            for pod in self.executor.pods()
            if pod.metrics_ports
        ]
        path = self.run_dir / SCRAPE_TARGETS
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{path.name}.partial")
        partial.write_text(json.dumps(groups, indent=1))
        partial.replace(path)

    # -- the loop -------------------------------------------------------------------

    def preflight(self) -> Plan:
        """Plan once before starting anything, so impossible jobs fail with one message."""
        discovery = self.discover(())
        outcome = make_plan(self.job.spec, self.ref.name, discovery, self.cluster.catalog, plan_job)
        if outcome.plan is None:
            raise UserError(
                f"cannot plan job {self.ref.name} on the local cluster: {outcome.message}"
            )
        check_fits_machine(outcome.plan)
        return outcome.plan

    def run(
        self, on_tick: Callable[[Supervisor], None], on_stop: Callable[[], None] = lambda: None
    ) -> MoEJobStatus:
        """Reconcile until the job is Succeeded or Failed; every process is gone after.

        SIGINT (Ctrl-C) and SIGTERM only set a flag that the loop checks between
        passes, so a decision is never half-applied (no pod started but unrecorded);
        the loop then calls ``on_stop``, stops every pod as a kubelet would (SIGTERM,
        then the pod's grace period, in which the trainers finish their step and save
        a checkpoint) and raises KeyboardInterrupt. A second signal kills them at once.
        """
        stop, kill_now = threading.Event(), threading.Event()

        def request_stop(_signum: int, _frame: FrameType | None) -> None:
            (kill_now if stop.is_set() else stop).set()

        previous = {sig: signal.signal(sig, request_stop) for sig in STOP_SIGNALS}
        environment = self.environment()
        try:
            while not stop.is_set():
                decision = decide(self.observe(), environment)
                self.apply(decision)
                on_tick(self)
                if self.status.phase in TERMINAL_PHASES:
                    return self.status
                wait = decision.requeue_after
                stop.wait(POLL_SECONDS if wait is None else min(max(wait, 0.05), POLL_SECONDS))
            raise KeyboardInterrupt
        finally:
            if stop.is_set() and self.executor.pods():
                on_stop()
            running = [pod.name for pod in self.executor.pods()]
            self.executor.delete(
                {name: self._grace_seconds(name) for name in running}, kill_now=kill_now
            )
            for sig, handler in previous.items():
                signal.signal(sig, handler)
