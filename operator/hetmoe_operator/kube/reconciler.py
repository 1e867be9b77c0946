"""One reconcile pass for one job: observe, decide, apply.

Blocking (kubernetes client); the kopf daemon runs it in a worker thread. A pass
observes through watch-fed caches (``kube.state``): the job, its pods and the nodes
are never fetched per pass, and the plan ConfigMap only once per process and job
(then it is known from our own writes). Under load a GET costs seconds, and passes
that only read used to spend most of their time waiting on three of them.
"""

from __future__ import annotations

import json
import logging
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
from hetmoe_operator.kube.apply import Applier, Conflict, KindNotInstalled, KubeApi
from hetmoe_operator.kube.capacity_lock import CapacityLock
from hetmoe_operator.kube.catalog_source import CatalogLoader
from hetmoe_operator.kube.metrics import OperatorMetrics
from hetmoe_operator.kube.progress import read_progress
from hetmoe_operator.kube.state import JobCache, NodeCache, PodIndex, Wakeups
from hetmoe_operator.plan import Plan
from hetmoe_operator.reconcile.conditions import set_condition
from hetmoe_operator.reconcile.decide import Decision, Environment, decide
from hetmoe_operator.reconcile.observe import Observation, pod_obs
from hetmoe_operator.reconcile.planning import PlanFunction, restart_hold

log = logging.getLogger(__name__)

IDLE_SECONDS = 300.0
"""Resync of terminal jobs (they only wake up on events)."""
CONFLICT_RETRY_SECONDS = 0.2
PLAN_MEMO_SIZE = 64


SLOW_PASS_SECONDS = 2.0
"""Passes slower than this are logged with where their time went."""


@dataclass
class _Held:
    """Whether this pass holds the capacity lock, and where the pass spent its time."""

    locked: bool = False
    marks: list[tuple[str, float]] = field(default_factory=list)

    def mark(self, what: str) -> None:
        """Record that ``what`` just finished (for the slow-pass log line)."""
        self.marks.append((what, time.monotonic()))

    def breakdown(self, started: float) -> str:
        parts, last = [], started
        for what, at in self.marks:
            parts.append(f"{what} {at - last:.2f}s")
            last = at
        return ", ".join(parts)


@dataclass
class Reconciler:
    """Everything a pass needs; one instance per operator process."""

    config: OperatorConfig
    api: KubeApi
    catalog: CatalogLoader
    jobs: JobCache
    nodes: NodeCache
    pods: PodIndex
    wakeups: Wakeups
    metrics: OperatorMetrics
    planner: PlanFunction
    create_executor: Executor
    """Threads for concurrent pod creation within one pass."""
    _plans: dict[tuple[str, str], tuple[Plan | None, int]] = field(default_factory=dict)
    """Job -> its plan and plan generation, from one GET, then from our own writes."""
    _plan_memo: dict[str, Plan] = field(default_factory=dict)
    _capacity: CapacityLock = field(default_factory=CapacityLock)
    """Held from discovery until the pods are created: passes that plan run one at a
    time, so each sees the pods of the job planned before it (no double booking)."""
    _progress_at: dict[tuple[str, str], float] = field(default_factory=dict)

    def reconcile(self, namespace: str, name: str) -> float | None:
        """Run one pass; returns seconds until the next one is wanted, or None once the
        job is gone (or being deleted): its daemon then ends."""
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
            message = (
                f"API server answered {error.status} {error.reason}: "
                + str(error.body or "")[:1000]
            )
            self._record_refusal(namespace, name, "ChildCreateFailed", message)
            return min(self.config.resync_seconds, 5.0)
        except KindNotInstalled as error:
            self._record_refusal(namespace, name, "PodGroupUnavailable", str(error))
            return self.config.resync_seconds
        finally:
            if held.locked:
                self._capacity.release()
            elapsed = time.monotonic() - started
            self.metrics.reconcile_seconds.observe(elapsed)
            if elapsed > SLOW_PASS_SECONDS:
                log.info(
                    "%s/%s: slow pass %.2fs (%s)", namespace, name, elapsed, held.breakdown(started)
                )

    def _record_refusal(self, namespace: str, name: str, reason: str, message: str) -> None:
        """Best effort: put a refused write on the job (condition Ready=False with
        ``reason``), so a quota, admission or missing-CRD problem is visible instead of
        a silent retry loop."""
        try:
            job = self.api.get_job(namespace, name)
            if job is None:
                return
            status = MoEJobStatus.model_validate(job.get("status") or {})
            conditions = set_condition(
                status.conditions,
                "Ready",
                "False",
                reason,
                message,
                observed_generation=int(job["metadata"].get("generation", 1)),
                now=datetime.now(UTC),
            )
            patched = status.model_copy(update={"conditions": conditions}).to_wire()
            result = Applier(self.api, 1, self.create_executor).apply(
                job, Decision((), MoEJobStatus.model_validate(patched), (), (), None)
            )
            if result.job is not None:
                self.jobs.put(result.job)
        except (ApiException, ValidationError, Conflict):
            log.warning("%s/%s: could not record the API error on the job", namespace, name)

    def forget(self, namespace: str, name: str) -> None:
        """Drop per-job memory when the job is gone."""
        self._plans.pop((namespace, name), None)
        self._progress_at.pop((namespace, name), None)
        if self.pods.hold((namespace, name), ()):
            self.wakeups.capacity_may_be_back()
        self.metrics.job_phase(namespace, name, None)

    def _reconcile(self, namespace: str, name: str, held: _Held) -> float | None:
        key = (namespace, name)
        job = self.jobs.get(key)
        if job is None:  # not seen by the watch yet, or deleted: ask once
            job = self.api.get_job(namespace, name)
            if job is not None:
                self.jobs.put(job)
        if job is None or job["metadata"].get("deletionTimestamp"):
            self.forget(namespace, name)
            return None
        raw_pods = self.pods.job_pods(key)
        observation = self._observe(job, raw_pods)
        catalog = self.catalog.load()
        held.mark("read")
        environment = Environment(
            planner=self._timed_planner,
            discover=self._discoverer(
                job, catalog, held, urgent=takes_capacity_first(observation.status)
            ),
            catalog=catalog,
            config=self.config,
        )
        decision = decide(observation, environment)
        held.mark("decide")
        created = [m for m in decision.creates if m["kind"] == "Pod"]
        for manifest in created:  # book the nodes before the slow part, then let others plan
            self.pods.book(manifest)
        if self.pods.hold(key, restart_hold(observation, decision.status)) and not created:
            self.wakeups.capacity_may_be_back()  # given up, not taken over by new pods
        if held.locked:
            self._capacity.release()
            held.locked = False
        try:
            result = Applier(
                self.api, self.config.max_api_calls_per_reconcile, self.create_executor
            ).apply(job, decision)
        except BaseException:
            for manifest in created:
                self.pods.unbook(manifest)
            self._plans.pop(key, None)  # a plan ConfigMap write may or may not have landed
            raise
        held.mark(f"apply {result.calls} calls")
        if result.job is not None:
            self.jobs.put(result.job)
        for manifest in decision.creates:
            if manifest["kind"] == "ConfigMap" and result.complete:
                self._remember_plan(key, manifest)
        self.wakeups.record_nodes(
            (namespace, name), frozenset(p.node for p in observation.pods if p.node)
        )
        self.wakeups.set_waiting(key, _waits_for_capacity(decision.status))
        self._count_restart(key, observation.status, decision.status)
        self.metrics.job_phase(namespace, name, decision.status.phase)
        if not result.complete:
            return 0.0
        if decision.requeue_after is not None:
            delay = decision.requeue_after
            if decision.status.phase == "Running":  # progress is polled meanwhile
                delay = min(delay, self.config.resync_seconds, self.config.progress_poll_seconds)
            return max(delay, 0.05)
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
            nodes=self.nodes.readiness(now),
            now=now,
            plan=plan,
            plan_generation=plan_generation,
            progress=progress,
            checkpoint_step=checkpoint,
        )

    def _plan(self, namespace: str, name: str) -> tuple[Plan | None, int]:
        """The job's plan: from memory, else its ConfigMap (one GET per process and job)."""
        cached = self._plans.get((namespace, name))
        if cached is not None:
            return cached
        config_map = self.api.get_plan_config_map(namespace, name)
        if config_map is None:  # remembered too: a job waiting for capacity asks once
            self._plans[(namespace, name)] = (None, 0)
            return None, 0
        return self._remember_plan((namespace, name), config_map)

    def _remember_plan(
        self, key: tuple[str, str], config_map: dict[str, Any]
    ) -> tuple[Plan | None, int]:
        generation = int(
            (config_map["metadata"].get("annotations") or {}).get(PLAN_GENERATION_ANNOTATION, 0)
        )
        try:
            plan = Plan.from_json((config_map.get("data") or {}).get(PLAN_KEY, ""))
        except ValidationError:
            log.warning("%s/%s: plan ConfigMap unreadable; re-planning", *key)
            return None, generation
        self._plans[key] = (plan, generation)
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

    def _discoverer(self, job: dict[str, Any], catalog: Any, held: _Held, *, urgent: bool) -> Any:
        """Discovery for this pass, under the capacity lock (``urgent`` unless the job
        was already waiting for capacity: see ``kube.capacity_lock``)."""

        def discover_now(excluded: Sequence[str]) -> Discovery | None:
            if catalog is None:
                return None
            if not held.locked:
                held.mark("plan-free decide")
                self._capacity.acquire(urgent=urgent)
                held.locked = True
                held.mark("capacity lock wait")
            spec = MoEJobSpec.model_validate(job["spec"])
            found = discover(
                self.nodes.snapshot(),
                self.pods.snapshot(),
                catalog,
                self.config,
                refs=spec.pools,
                excluded=excluded,
                ignore_owner_uid=job["metadata"]["uid"],
            )
            held.mark("discovery")
            return found

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

    def _count_restart(self, key: tuple[str, str], old: MoEJobStatus, new: MoEJobStatus) -> None:
        replaced = set(new.replaced_pods) - set(old.replaced_pods)
        if replaced:
            self.metrics.pods_replaced.inc(len(replaced))
        failure = new.last_failure
        if failure is not None and failure != old.last_failure:
            self.metrics.restarts.labels(failure.cause).inc()
            log.info(
                "%s/%s -> %s: %s of pod %s on node %s (%s): %s",
                *key,
                new.phase,
                failure.cause,
                failure.pod,
                failure.node or "-",
                failure.reason,
                failure.message[:200],
            )


def _waits_for_capacity(status: MoEJobStatus) -> bool:
    """Whether the pass ended waiting for nodes (so capacity events should wake it)."""
    if status.phase not in ("Pending", "Restarting"):
        return False
    ready = next((c for c in status.conditions if c.type == "Ready"), None)
    return ready is not None and ready.reason == "WaitingForCapacity"


def takes_capacity_first(status: MoEJobStatus) -> bool:
    """Whether this pass goes before waiting jobs at the capacity lock.

    Launching and restarting passes do (``kube.capacity_lock``); so does a restarting
    job that is itself waiting: the nodes its restart freed are woken for every
    waiting job at once, and a job that already ran keeps its claim on them ahead of
    jobs that have never started.
    """
    return status.phase == "Restarting" or not _waits_for_capacity(status)
