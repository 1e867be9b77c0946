"""One reconcile pass for one job: observe through the API, decide, apply.

Blocking (kubernetes client); the kopf daemon runs it in a worker thread. Reads per
pass: the job, its pods, its plan ConfigMap; discovery (a LIST of bound pods) only
when a plan is being made.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from hetmoe_operator.api.cluster import ClusterDescription
from hetmoe_operator.api.job import MoEJobSpec
from hetmoe_operator.api.operator_config import OperatorConfig
from hetmoe_operator.api.status import TERMINAL_PHASES, MoEJobStatus
from hetmoe_operator.desired.names import (
    GENERATION_LABEL,
    PLAN_GENERATION_ANNOTATION,
    PLAN_KEY,
    RANK0_LABEL,
    JobRef,
)
from hetmoe_operator.discovery import Discovery, discover
from hetmoe_operator.errors import describe_validation_error
from hetmoe_operator.kube.apply import Applier, Conflict, KubeApi
from hetmoe_operator.kube.catalog_source import CatalogLoader
from hetmoe_operator.kube.metrics import OperatorMetrics
from hetmoe_operator.kube.progress import read_progress
from hetmoe_operator.kube.state import NodeCache, PodIndex, Wakeups
from hetmoe_operator.plan import Plan
from hetmoe_operator.reconcile.conditions import set_condition
from hetmoe_operator.reconcile.decide import Decision, Environment, decide
from hetmoe_operator.reconcile.observe import Observation, pod_obs
from hetmoe_operator.reconcile.planning import PlanFunction

log = logging.getLogger(__name__)

IDLE_SECONDS = 300.0
"""Resync of terminal jobs (they only wake up on events)."""
CONFLICT_RETRY_SECONDS = 0.2
PLAN_MEMO_SIZE = 64


@dataclass
class _Held:
    """Whether this pass holds the capacity lock."""

    locked: bool = False


@dataclass
class Reconciler:
    """Everything a pass needs; one instance per operator process."""

    config: OperatorConfig
    api: KubeApi
    catalog: CatalogLoader
    nodes: NodeCache
    pods: PodIndex
    wakeups: Wakeups
    metrics: OperatorMetrics
    planner: PlanFunction
    create_executor: Executor
    """Threads for concurrent pod creation within one pass."""
    _plans: dict[tuple[str, str], tuple[str, Plan]] = field(default_factory=dict)
    _plan_memo: dict[str, Plan] = field(default_factory=dict)
    _capacity: threading.Lock = field(default_factory=threading.Lock)
    """Held from discovery until the pods are created: passes that plan run one at a
    time, so each sees the pods of the job planned before it (no double booking)."""
    _progress_at: dict[tuple[str, str], float] = field(default_factory=dict)

    def reconcile(self, namespace: str, name: str) -> float:
        """Run one pass; returns seconds until the next one is wanted."""
        started = time.monotonic()
        held = _Held()
        try:
            return self._reconcile(namespace, name, held)
        except Conflict:
            return CONFLICT_RETRY_SECONDS
        except ApiException as error:
            log.warning(
                "%s/%s: API error %s %s; retrying", namespace, name, error.status, error.reason
            )
            self._report_api_error(namespace, name, error)
            return min(self.config.resync_seconds, 5.0)
        finally:
            if held.locked:
                self._capacity.release()
            self.metrics.reconcile_seconds.observe(time.monotonic() - started)

    def _report_api_error(self, namespace: str, name: str, error: ApiException) -> None:
        """Best effort: put a refused write on the job (condition ChildCreateFailed), so
        a quota or admission problem is visible instead of a silent retry loop."""
        try:
            job = self.api.get_job(namespace, name)
            if job is None:
                return
            status = MoEJobStatus.model_validate(job.get("status") or {})
            message = (
                f"API server answered {error.status} {error.reason}: "
                + str(error.body or "")[:1000]
            )
            conditions = set_condition(
                status.conditions,
                "Ready",
                "False",
                "ChildCreateFailed",
                message,
                observed_generation=int(job["metadata"].get("generation", 1)),
                now=datetime.now(UTC),
            )
            patched = status.model_copy(update={"conditions": conditions}).to_wire()
            Applier(self.api, 1, self.create_executor).apply(
                job, Decision((), MoEJobStatus.model_validate(patched), (), (), None)
            )
        except (ApiException, ValidationError, Conflict):
            log.warning("%s/%s: could not record the API error on the job", namespace, name)

    def forget(self, namespace: str, name: str) -> None:
        """Drop per-job memory when the job is gone."""
        self._plans.pop((namespace, name), None)
        self._progress_at.pop((namespace, name), None)
        self.metrics.job_phase(namespace, name, None)

    def _reconcile(self, namespace: str, name: str, held: _Held) -> float:
        job = self.api.get_job(namespace, name)
        if job is None or job["metadata"].get("deletionTimestamp"):
            self.forget(namespace, name)
            return IDLE_SECONDS
        raw_pods = self.api.list_job_pods(namespace, name)
        observation = self._observe(job, raw_pods)
        catalog = self.catalog.load()
        environment = Environment(
            planner=self._timed_planner,
            discover=self._discoverer(job, catalog, held),
            catalog=catalog,
            config=self.config,
        )
        decision = decide(observation, environment)
        created = [m for m in decision.creates if m["kind"] == "Pod"]
        for manifest in created:  # book the nodes before the slow part, then let others plan
            self.pods.upsert(manifest)
        if held.locked:
            self._capacity.release()
            held.locked = False
        try:
            result = Applier(
                self.api, self.config.max_api_calls_per_reconcile, self.create_executor
            ).apply(job, decision)
        except BaseException:
            for manifest in created:  # the watch re-adds those that do exist
                self.pods.remove(namespace, manifest["metadata"]["name"])
            raise
        self.wakeups.record_nodes(
            (namespace, name), frozenset(p.node for p in observation.pods if p.node)
        )
        self._count_restart(observation.status, decision.status)
        self.metrics.job_phase(namespace, name, decision.status.phase)
        if not result.complete:
            return 0.0
        if decision.requeue_after is not None:
            return max(decision.requeue_after, 0.05)
        if decision.status.phase in TERMINAL_PHASES:
            return IDLE_SECONDS
        if decision.status.phase == "Running":
            return min(self.config.resync_seconds, self.config.progress_poll_seconds)
        return self.config.resync_seconds

    def _observe(self, job: dict[str, Any], raw_pods: list[dict[str, Any]]) -> Observation:
        meta = job["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        spec, spec_error = None, ""
        try:
            spec = MoEJobSpec.model_validate(job.get("spec") or {})
        except ValidationError as error:
            spec_error = describe_validation_error(error, "spec")
        try:
            status = MoEJobStatus.model_validate(job.get("status") or {})
        except ValidationError:
            log.warning("%s/%s: unreadable status; rebuilding it from children", namespace, name)
            status = MoEJobStatus()
        plan, plan_generation = self._plan(namespace, name)
        now = datetime.now(UTC)
        progress, checkpoint = self._progress(namespace, name, status, raw_pods, now)
        return Observation(
            job=JobRef(name=name, namespace=namespace, uid=meta["uid"]),
            metadata_generation=int(meta.get("generation", 1)),
            spec=spec,
            spec_error=spec_error,
            status=status,
            pods=[o for o in (pod_obs(p) for p in raw_pods) if o is not None],
            nodes=self.nodes.readiness(),
            now=now,
            plan=plan,
            plan_generation=plan_generation,
            progress=progress,
            checkpoint_step=checkpoint,
        )

    def _plan(self, namespace: str, name: str) -> tuple[Plan | None, int]:
        """The plan ConfigMap, parsed once per resourceVersion."""
        config_map = self.api.get_plan_config_map(namespace, name)
        if config_map is None:
            self._plans.pop((namespace, name), None)
            return None, 0
        generation = int(
            (config_map["metadata"].get("annotations") or {}).get(PLAN_GENERATION_ANNOTATION, 0)
        )
        version = config_map["metadata"]["resourceVersion"]
        cached = self._plans.get((namespace, name))
        if cached and cached[0] == version:
            return cached[1], generation
        try:
            plan = Plan.from_json((config_map.get("data") or {}).get(PLAN_KEY, ""))
        except ValidationError:
            log.warning("%s/%s: plan ConfigMap unreadable; re-planning", namespace, name)
            return None, generation
        self._plans[(namespace, name)] = (version, plan)
        return plan, generation

    def _progress(
        self,
        namespace: str,
        name: str,
        status: MoEJobStatus,
        raw_pods: Sequence[dict[str, Any]],
        now: datetime,
    ) -> tuple[Any, int | None]:
        if status.phase != "Running":
            return None, None
        key = (namespace, name)
        if time.monotonic() - self._progress_at.get(key, -1e18) < self.config.progress_poll_seconds:
            return None, None
        self._progress_at[key] = time.monotonic()
        rank0 = next(
            (
                p
                for p in raw_pods
                if (p["metadata"].get("labels") or {}).get(RANK0_LABEL) == "true"
                and p["metadata"]["labels"].get(GENERATION_LABEL) == str(status.generation)
            ),
            None,
        )
        if rank0 is None:
            return None, None
        read = read_progress(
            (rank0.get("status") or {}).get("podIP", ""),
            self.config.worker_ports.metrics,
            self.config.progress_timeout_seconds,
            now,
        )
        return read if read is not None else (None, None)

    def _discoverer(self, job: dict[str, Any], catalog: Any, held: _Held) -> Any:
        def discover_now(excluded: Sequence[str]) -> Discovery | None:
            if catalog is None:
                return None
            if not held.locked:
                self._capacity.acquire()
                held.locked = True
            spec = MoEJobSpec.model_validate(job["spec"])
            return discover(
                self.nodes.snapshot(),
                self.pods.snapshot(),
                catalog,
                self.config,
                refs=spec.pools,
                excluded=excluded,
                ignore_owner_uid=job["metadata"]["uid"],
            )

        return discover_now

    def _timed_planner(
        self,
        model: Any,
        training: Any,
        cluster: ClusterDescription,
        placement: Any,
        *,
        job_name: str,
        previous: Plan | None = None,
    ) -> Plan:
        """The planner, memoised on its inputs minus node names and the job name.

        Planning is deterministic and plans never name nodes (only pool and slot), so
        jobs with the same spec on same-shaped capacity share one planner run: a burst
        of identical jobs costs one plan, not one each. A re-plan searches near the
        job's ``previous`` plan, so its result is the job's own and is not memoised.
        """
        if previous is not None:
            return self._call_planner(
                model, training, cluster, placement, job_name=job_name, previous=previous
            )
        key = json.dumps(
            [
                model.to_wire(),
                training.to_wire(),
                placement.to_wire(),
                cluster.catalog.to_wire(),
                [(p.name, p.grade, p.nodes, p.devices_per_node) for p in cluster.pools],
            ],
            sort_keys=True,
        )
        cached = self._plan_memo.get(key)
        if cached is not None:
            return cached.model_copy(update={"job": job_name})
        plan = self._call_planner(model, training, cluster, placement, job_name=job_name)
        self._plan_memo[key] = plan
        while len(self._plan_memo) > PLAN_MEMO_SIZE:
            self._plan_memo.pop(next(iter(self._plan_memo)))
        return plan

    def _call_planner(self, *args: Any, **kwargs: Any) -> Plan:
        """The planner, with its run time recorded in the planning-duration metric."""
        started = time.monotonic()
        try:
            return self.planner(*args, **kwargs)
        finally:
            self.metrics.planning_seconds.observe(time.monotonic() - started)

    def _count_restart(self, old: MoEJobStatus, new: MoEJobStatus) -> None:
        if new.last_failure is not None and new.last_failure != old.last_failure:
            self.metrics.restarts.labels(new.last_failure.cause).inc()
