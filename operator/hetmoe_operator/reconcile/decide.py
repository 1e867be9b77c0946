"""The reconcile decision: observed snapshot -> creates, status, deletes, events.

Ordering contract with the executor (``kube.apply``): creates first, then the status
patch, then deletes. That makes every crash point safe:

* A generation is launched by creating its pods *before* the status records it.
  If the operator dies in between, the next pass finds pods of a generation newer
  than the status and adopts it (creates whatever is missing, same deterministic
  names), so there is never a duplicate and never an orphan.
* A failure is recorded in status (restart counted, cause, backoff) *before* the
  survivors are deleted, so a restart is never counted twice or lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

from hetmoe_operator.api.catalog import DeviceCatalog
from hetmoe_operator.api.job import MoEJobSpec
from hetmoe_operator.api.operator_config import OperatorConfig
from hetmoe_operator.api.status import TERMINAL_PHASES, FailureStatus, MoEJobStatus, Phase
from hetmoe_operator.desired.children import plan_config_map, pod_group, rendezvous_service
from hetmoe_operator.desired.names import plan_config_map_name, pod_group_name
from hetmoe_operator.desired.worker import PodContext, worker_pods
from hetmoe_operator.discovery import worker_tolerations
from hetmoe_operator.plan import Plan
from hetmoe_operator.reconcile import failures
from hetmoe_operator.reconcile.conditions import condition, rfc3339, set_condition
from hetmoe_operator.reconcile.observe import DiscoverFunction, Observation, PodObs, parse_time
from hetmoe_operator.reconcile.planning import (
    PlanFunction,
    grades_column,
    make_plan,
    plan_fits,
    plan_status,
    pool_needs,
    trim,
)

DELETE_POLL_SECONDS = 1.0
"""Re-check soon while old pods are terminating (pod events usually come first)."""
BROKEN_GANG_GRACE_SECONDS = 5
"""Grace period of a pod stopped without a checkpoint to save: old generations, a gang
broken by a failure, a failed job, an invalid spec.

Only a healthy gang can save (every rank agrees to stop after the same step), so only
suspend and a gang stopping in order get the pod's own grace
(``checkpoint.stopGracePeriodSeconds``). Elsewhere survivors may be blocked in a
collective with a dead peer until they are killed, and the scheduler keeps a
terminating pod's node booked all that time: a full grace period would hold the nodes
the next generation needs."""
REOPENABLE_REASONS = frozenset({"PlanInfeasible", "InvalidSpec"})
"""Failed for these reasons, the job is reconsidered when its spec changes."""


@dataclass(frozen=True)
class Delete:
    """Delete one pod (``grace_seconds=0`` force-deletes it) or one PodGroup."""

    name: str
    grace_seconds: int | None = None
    kind: Literal["Pod", "PodGroup"] = "Pod"


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to record on the job."""

    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Decision:
    """What to do; ``creates`` are manifests (a ConfigMap is created or replaced)."""

    creates: tuple[dict[str, Any], ...]
    status: MoEJobStatus
    deletes: tuple[Delete, ...]
    events: tuple[Event, ...]
    requeue_after: float | None


@dataclass(frozen=True)
class Environment:
    """Collaborators of a decision, injected so tests can use doubles."""

    planner: PlanFunction
    discover: DiscoverFunction
    catalog: DeviceCatalog | None
    config: OperatorConfig


@dataclass
class _Pass:
    """Mutable scratch state of one decision (never outlives ``decide``)."""

    obs: Observation
    env: Environment
    status: MoEJobStatus
    creates: list[dict[str, Any]] = field(default_factory=list)
    deletes: list[Delete] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    requeue_after: float | None = None

    def update(self, **changes: Any) -> None:
        self.status = self.status.model_copy(update=changes)

    def cond(
        self, type_: str, value: Literal["True", "False", "Unknown"], reason: str, message: str
    ) -> None:
        self.update(
            conditions=set_condition(
                self.status.conditions,
                type_,
                value,
                reason,
                message,
                observed_generation=self.obs.metadata_generation,
                now=self.obs.now,
            )
        )

    def phase(self, phase: Phase, reason: str, message: str, *, warning: bool = False) -> None:
        """Move to ``phase``, recording an event when it is a transition."""
        if self.status.phase != phase:
            self.events.append(
                Event(
                    "Warning" if warning else "Normal",
                    reason,
                    f"{self.status.phase} -> {phase}: {message}",
                )
            )
            if phase in TERMINAL_PHASES:
                self.update(completion_time=rfc3339(self.obs.now))
        self.update(phase=phase)

    def requeue(self, seconds: float) -> None:
        self.requeue_after = (
            seconds if self.requeue_after is None else min(self.requeue_after, seconds)
        )

    def stop(self, pods: Sequence[PodObs], *, save: bool = False) -> None:
        """Delete pods; pods that would never terminate on their own are forced.

        With ``save`` a pod keeps its own grace period to save a checkpoint, otherwise it
        gets :data:`BROKEN_GANG_GRACE_SECONDS`. The first deletion of a pod decides."""
        stopping = {d.name for d in self.deletes}
        for pod in pods:
            if pod.name in stopping:
                continue
            force = failures.needs_force_delete(pod, self.obs.nodes, self.obs.now)
            if force:
                self.deletes.append(Delete(pod.name, 0))
            elif not pod.deleting:
                self.deletes.append(Delete(pod.name, None if save else BROKEN_GANG_GRACE_SECONDS))
        if pods:
            self.requeue(DELETE_POLL_SECONDS)

    def decision(self) -> Decision:
        status = self.status.model_copy(
            update={"observed_generation": self.obs.metadata_generation}
        )
        return Decision(
            tuple(self.creates), status, tuple(self.deletes), tuple(self.events), self.requeue_after
        )


def decide(obs: Observation, env: Environment) -> Decision:
    """The whole reconcile decision for one job."""
    run = _Pass(obs, env, obs.status)
    _merge_progress(run)
    if obs.spec is None:
        run.cond("Failed", "True", "InvalidSpec", obs.spec_error)
        run.phase("Failed", "InvalidSpec", obs.spec_error, warning=True)
        run.stop(_live(obs.pods))
        return run.decision()
    spec = obs.spec
    if run.status.phase in TERMINAL_PHASES:
        failed = condition(run.status.conditions, "Failed")
        reopen = (
            run.status.phase == "Failed"
            and failed is not None
            and failed.reason in REOPENABLE_REASONS
            and obs.metadata_generation != run.status.observed_generation
        )
        if not reopen:
            if run.status.phase == "Failed":
                run.stop(_live(obs.pods))
            return run.decision()
        run.cond("Failed", "False", "Resumed", "the spec changed; planning again")
        run.phase("Pending", "Resumed", "the spec changed; planning again")
    if spec.suspend:
        _suspend(run)
        return run.decision()
    if run.status.phase == "Suspended":
        run.cond("Suspended", "False", "Resumed", "spec.suspend is false")
        run.phase("Pending", "Resumed", "resuming from the latest checkpoint")
        run.update(restart_after=None)
    newest = max((p.generation for p in obs.pods), default=0)
    if newest > run.status.generation and obs.plan is not None:
        _launch(run, spec, obs.plan, obs.plan_generation, newest)  # adopt a half-done launch
        return run.decision()
    if _generation_active(run):
        _watch_generation(run, spec)
        return run.decision()
    _start_next_generation(run, spec)
    return run.decision()


def _live(pods: Sequence[PodObs]) -> list[PodObs]:
    """Pods still running or waiting; finished ones are kept for their logs."""
    return [p for p in pods if p.phase not in ("Succeeded", "Failed")]


def _merge_progress(run: _Pass) -> None:
    new = run.obs.progress
    if new is not None:
        old = run.status.progress
        if new.in_place_restarts > (old.in_place_restarts if old else 0):
            why = f": {new.last_in_place_restart}" if new.last_in_place_restart else ""
            run.events.append(
                Event(
                    "Warning",
                    "RestartedInPlace",
                    f"generation {run.status.generation}: the workers restarted in their "
                    f"pods from the latest checkpoint ({new.in_place_restarts} time(s) in "
                    f"this generation){why}",
                )
            )
        run.update(progress=new)
    if run.obs.checkpoint_step is not None:
        run.update(last_checkpoint_step=run.obs.checkpoint_step)


def _suspend(run: _Pass) -> None:
    run.cond("Suspended", "True", "SuspendedByUser", "spec.suspend is true; checkpoints are kept")
    run.cond("Ready", "False", "SuspendedByUser", "workers stopped")
    run.phase("Suspended", "SuspendedByUser", "workers stopped; checkpoints kept")
    run.stop(list(run.obs.pods), save=True)


def _generation_active(run: _Pass) -> bool:
    """Whether the recorded generation is launched and its failure not yet handled."""
    status = run.status
    if status.generation == 0 or status.phase in ("Pending", "Suspended"):
        return False
    failure = status.last_failure
    return failure is None or failure.generation < status.generation or failure.replaced_alone


def _expected_pod_names(run: _Pass, spec: MoEJobSpec) -> list[str]:
    """The current generation's pod names, each under its latest replacement's name."""
    replaced = run.status.replaced_pods
    return [_latest_name(p["metadata"]["name"], replaced) for p in _plan_pods(run, spec)]


def _plan_pods(run: _Pass, spec: MoEJobSpec) -> list[dict[str, Any]]:
    """The current generation's pod manifests as the plan names them (none while the
    recorded plan is not the one observed)."""
    plan = run.obs.plan
    if plan is None or run.obs.plan_generation != run.status.plan_generation:
        return []
    return worker_pods(plan, _pod_context(run, spec, plan))


def _latest_name(name: str, replaced: Sequence[str]) -> str:
    """Pod ``name`` after its replacements: ``name``, ``name-r1``, ``name-r2``, ..."""
    latest, count = name, 0
    while latest in replaced:
        count += 1
        latest = f"{name}-r{count}"
    return latest


def _watch_generation(run: _Pass, spec: MoEJobSpec) -> None:
    """A launched generation: detect failures, success, or all-Running."""
    status, obs = run.status, run.obs
    replaced = set(status.replaced_pods)
    current = [p for p in obs.pods if p.generation == status.generation and p.name not in replaced]
    older = [p for p in obs.pods if p.generation < status.generation or p.name in replaced]
    if not current and _scaling_up(run) and obs.plan is not None:
        # A scale-up waits for the old gang to save and go (see _launch), then launches.
        _launch(run, spec, obs.plan, obs.plan_generation, status.generation, save_old=True)
        return
    run.stop(older)
    expected = _expected_pod_names(run, spec)
    found = failures.detect(current, expected, obs.nodes)
    if found:
        hold = failures.settle_seconds(found[0], current, obs.now)
        if hold > 0:
            run.requeue(hold)
            return
        _handle_failure(run, spec, found[0], current)
        return
    stuck = _unplaceable_replacement(run, current)
    if stuck is not None:
        _handle_failure(run, spec, stuck, current)
        return
    if current and all(p.phase == "Succeeded" for p in current) and len(current) >= len(expected):
        run.cond("Complete", "True", "Succeeded", "every worker exited 0")
        run.cond("Ready", "False", "Succeeded", "workers finished")
        run.phase("Succeeded", "Succeeded", "every worker exited 0")
        return
    running = sum(p.phase in ("Running", "Succeeded") for p in current)
    total = max(len(expected), len(current))
    if running == total and total:
        run.cond("Ready", "True", "WorkersRunning", f"{running}/{total} workers running")
        run.cond("Restarting", "False", "WorkersRunning", "generation running")
        run.phase(
            "Running", "WorkersRunning", f"generation {status.generation}: {total} workers running"
        )
        _maybe_scale_up(run, spec)
        return
    scheduled = sum(bool(p.node) for p in current)
    progress = f"{running}/{total} workers running, {scheduled}/{total} scheduled"
    blocked = [p for p in current if p.unschedulable and not p.node]
    if blocked:
        _unschedulable(run, blocked, progress)
    else:
        run.cond("Ready", "False", "WorkersCreating", progress)
    run.requeue(run.env.config.resync_seconds)


def _unplaceable_replacement(run: _Pass, current: Sequence[PodObs]) -> failures.Failure | None:
    """A pod replaced alone that the scheduler has turned away for
    :data:`~.failures.REPLACEMENT_UNSCHEDULABLE_SECONDS` since its predecessor was gone,
    as a failure of the generation (its peers wait for it at the rendezvous); None
    otherwise, with a pass booked for when the wait runs out."""
    replaced = run.status.replaced_pods
    observed = {p.name for p in run.obs.pods}
    for pod in current:
        if pod.node or not pod.unschedulable or pod.unschedulable_since is None:
            continue
        predecessor = _predecessor(pod.name, replaced)
        if predecessor is None or predecessor in observed:
            continue
        waited = (run.obs.now - pod.unschedulable_since).total_seconds()
        left = failures.REPLACEMENT_UNSCHEDULABLE_SECONDS - waited
        if left > 0:
            run.requeue(left)
            continue
        return failures.Failure(
            pod.name,
            "",
            None,
            failures.REPLACEMENT_UNSCHEDULABLE,
            f"it replaced {predecessor} alone but cannot be scheduled after "
            f"{waited:.0f}s: {pod.unschedulable}",
        )
    return None


def _predecessor(name: str, replaced: Sequence[str]) -> str | None:
    """The pod that ``name`` replaced alone (see :func:`_latest_name`), if any."""
    base, suffix, count = name.rpartition("-r")
    if not suffix or not count.isdigit() or int(count) < 1:
        return None
    previous = base if int(count) == 1 else f"{base}-r{int(count) - 1}"
    return previous if previous in replaced else None


def _unschedulable(run: _Pass, blocked: Sequence[PodObs], progress: str) -> None:
    """Surface the scheduler's own words: "Pending" alone never says that a taint, a
    full node or a missing resource is in the way. One event when it starts; the
    condition follows the latest message."""
    first = blocked[0]
    message = (
        f"{progress}; {len(blocked)} cannot be scheduled, e.g. {first.name}: {first.unschedulable}"
    )
    ready = condition(run.status.conditions, "Ready")
    if ready is None or ready.reason != "Unschedulable":
        run.events.append(Event("Warning", "Unschedulable", message))
    run.cond("Ready", "False", "Unschedulable", message)


def _maybe_scale_up(run: _Pass, spec: MoEJobSpec) -> None:
    """elastic.scaleUp: when more nodes are usable than the job runs on, start a new
    generation on a plan for the larger capacity.

    Rate-limited twice: the job must have been Running for the stabilisation window
    (so a job that just restarted is not restarted again), and capacity is looked at
    once per window (discovery and the planner are not free). Only a plan on strictly
    more nodes counts as growth, so the job never re-plans sideways or shrinks here.
    """
    elastic, obs = spec.elastic, run.obs
    plan, catalog = obs.plan, run.env.catalog
    if not elastic.scale_up or plan is None or catalog is None:
        return
    window = elastic.scale_up_stabilization_seconds
    ready = condition(run.status.conditions, "Ready")
    since = parse_time(ready.last_transition_time) if ready else None
    checked = parse_time(run.status.scale_up_checked_time)
    waits = [window - (obs.now - t).total_seconds() for t in (since, checked) if t is not None]
    if since is None or max(waits) > 0:
        run.requeue(max(max(waits), 0.05))
        return
    run.update(scale_up_checked_time=rfc3339(obs.now))
    run.requeue(window)
    current = sum(nodes for nodes, _ in pool_needs(plan).values())
    if elastic.max_nodes is not None and current >= elastic.max_nodes:
        return
    discovery = run.env.discover(run.status.excluded_nodes)
    if discovery is None or sum(p.nodes for p in trim(discovery.pools, elastic.max_nodes)) <= (
        current
    ):
        return
    outcome = make_plan(spec, obs.job.name, discovery, catalog, run.env.planner, previous=plan)
    if outcome.plan is None:
        return
    grown = sum(nodes for nodes, _ in pool_needs(outcome.plan).values())
    if grown <= current:
        return
    message = f"{current} -> {grown} nodes: more capacity is usable ({discovery.summary()})"
    run.cond("Restarting", "True", "ScaledUp", message)
    run.phase("Restarting", "ScaledUp", message)
    plan_generation = run.status.plan_generation + 1
    run.creates.append(plan_config_map(obs.job, outcome.plan, plan_generation))
    _launch(
        run,
        spec,
        outcome.plan,
        plan_generation,
        run.status.generation + 1,
        planned=True,
        save_old=True,
    )


def _handle_failure(
    run: _Pass, spec: MoEJobSpec, failure: failures.Failure, current: Sequence[PodObs]
) -> None:
    status, now = run.status, run.obs.now
    verdict = failures.classify(failure, spec.elastic.failure_rules)
    text = failures.describe(failure)
    record = FailureStatus(
        cause=verdict.cause,
        pod=failure.pod,
        node=failure.node,
        exit_code=failure.exit_code,
        reason=failure.reason,
        message=failure.message[:4096],
        action=verdict.action,
        counted=verdict.counted,
        generation=status.generation,
        time=rfc3339(now),
    )
    run.update(last_failure=record)
    run.cond("Ready", "False", verdict.cause, text)
    if status.phase != "Running":
        # No phase transition will say it (e.g. a replacement failing while Restarting).
        run.events.append(Event("Warning", verdict.cause, text))
    if verdict.action == "fail":
        _fail(run, verdict.cause, f"{text}; failure action is fail")
        run.stop(_live(current))
        return
    if verdict.counted and status.restarts >= spec.elastic.max_restarts:
        _fail(
            run,
            "MaxRestartsExceeded",
            f"{text}; {status.restarts} restart(s) already used of "
            f"elastic.maxRestarts={spec.elastic.max_restarts}",
        )
        run.stop(_live(current))
        return
    if _replace_alone(run, spec, failure, verdict, current, text):
        return
    previous = status.restarts + status.uncounted_restarts
    delay = failures.backoff_seconds(
        spec.elastic.backoff_seconds, spec.elastic.max_backoff_seconds, previous
    )
    excluded = list(status.excluded_nodes)
    if verdict.action == "replace-node" and failure.node and failure.node not in excluded:
        excluded.append(failure.node)
    run.update(
        restarts=status.restarts + int(verdict.counted),
        uncounted_restarts=status.uncounted_restarts + int(not verdict.counted),
        restart_after=rfc3339(now + timedelta(seconds=delay)),
        excluded_nodes=excluded[-1024:],
    )
    run.cond(
        "Restarting",
        "True",
        verdict.cause,
        f"{text}; restarting from the latest checkpoint in {delay:.0f}s",
    )
    run.phase("Restarting", verdict.cause, f"{text}; backoff {delay:.0f}s", warning=True)
    run.stop(current, save=failure.orderly)
    if delay > 0:
        run.requeue(delay)
        return
    # No backoff: the next generation starts in this same pass (its pods are created
    # while the old ones are deleted), which saves a status write and a pass round trip
    # on the path from a failure to its replacement.
    _start_next_generation(run, spec)


def _replace_alone(
    run: _Pass,
    spec: MoEJobSpec,
    failure: failures.Failure,
    verdict: failures.Verdict,
    current: Sequence[PodObs],
    text: str,
) -> bool:
    """With elastic.inPlaceRestarts, a pod that failed while every other pod runs is
    replaced alone, in this pass: the others' torchrun agents have restarted their
    workers in place (their peer is gone) and wait at the rendezvous for the new pod,
    so nothing else is stopped, rescheduled or created.

    Not for node 0 (its pod serves the rendezvous store the others would have lost),
    not for failures that ask for more (replace the node, fail, an orderly stop that
    saved a checkpoint for the next generation), not without a usable node for the new
    pod (the others would wait for it until torchrun's join timeout), and at most
    inPlaceRestarts times per generation, since each costs the other pods one in-place
    restart. Returns whether it replaced the pod."""
    status = run.status
    if (
        spec.elastic.in_place_restarts == 0
        or verdict.action != "restart"
        or failure.orderly
        or failure.reason == failures.REPLACEMENT_UNSCHEDULABLE
        or len(status.replaced_pods) >= spec.elastic.in_place_restarts
    ):
        return False
    pods = _plan_pods(run, spec)
    names = [_latest_name(p["metadata"]["name"], status.replaced_pods) for p in pods]
    if failure.pod not in names[1:]:
        return False
    others = [p for p in current if p.name != failure.pod]
    if len(others) != len(names) - 1 or any(p.phase != "Running" or p.deleting for p in others):
        return False
    discovery = run.env.discover(status.excluded_nodes)
    if discovery is None or run.obs.plan is None or not plan_fits(run.obs.plan, discovery):
        return False  # no usable node for the replacement (its own may be lost)
    replaced = [*status.replaced_pods, failure.pod]
    replacement = pods[names.index(failure.pod)]
    replacement["metadata"]["name"] = _latest_name(replacement["metadata"]["name"], replaced)
    assert status.last_failure is not None  # recorded by _handle_failure
    run.update(
        restarts=status.restarts + int(verdict.counted),
        uncounted_restarts=status.uncounted_restarts + int(not verdict.counted),
        replaced_pods=replaced[-1024:],
        last_failure=status.last_failure.model_copy(update={"replaced_alone": True}),
    )
    run.stop([p for p in run.obs.pods if p.name == failure.pod])
    run.creates.append(replacement)
    message = (
        f"{text}; replacing pod {failure.pod} alone with {replacement['metadata']['name']}: "
        "the other workers restart in place and wait for it"
    )
    run.cond("Restarting", "True", "PodReplaced", message)
    run.phase("Restarting", "PodReplaced", message, warning=True)
    run.requeue(DELETE_POLL_SECONDS)
    return True


def _fail(run: _Pass, reason: str, message: str) -> None:
    run.cond("Failed", "True", reason, message)
    run.cond("Restarting", "False", reason, message)
    run.phase("Failed", reason, message, warning=True)


def _start_next_generation(run: _Pass, spec: MoEJobSpec) -> None:
    """Nothing running: stop old pods, wait out the backoff, keep or make a plan, launch.

    A restart does not wait for the old pods to be gone: they are deleted in the same
    pass, and the scheduler keeps devices of a terminating pod booked until it is gone,
    so new workers can never share a device with old ones. Not waiting takes a kubelet
    (or kwok) round trip per restart off the recovery time, and a pod stuck
    terminating never holds up the job (it is force-deleted after its deadline).

    A resume, and a restart after an orderly stop (a drain, an eviction), do wait: the
    old workers may still be saving their checkpoint, and the next generation must
    resume from it, not from the one before.
    """
    obs = run.obs
    old = [p for p in obs.pods if p.generation <= run.status.generation]
    if _stop_old(run, old, save=_resuming(run) or _after_orderly_stop(run)):
        return
    if run.status.restart_after:
        after = parse_time(run.status.restart_after)
        wait = (after - obs.now).total_seconds() if after else 0.0
        if wait > 0:
            run.cond("Restarting", "True", "Backoff", f"next generation in {wait:.0f}s")
            run.requeue(wait)
            return
    if run.env.catalog is None:
        _wait(run, "CatalogUnavailable", "the device catalog could not be read")
        return
    discovery = run.env.discover(run.status.excluded_nodes)
    if discovery is None:
        _wait(run, "CatalogUnavailable", "the device catalog could not be read")
        return
    plan, plan_generation = obs.plan, obs.plan_generation
    reused = (
        plan is not None
        and not spec.elastic.scale_up
        and plan_generation == run.status.plan_generation
        and plan_fits(plan, discovery)
    )
    if not reused:
        outcome = make_plan(
            spec, obs.job.name, discovery, run.env.catalog, run.env.planner, previous=plan
        )
        if outcome.plan is None:
            run.cond("Planned", "False", outcome.reason, outcome.message)
            if outcome.transient:
                _wait(run, outcome.reason, outcome.message)
            else:
                _fail(run, outcome.reason, outcome.message)
            return
        plan, plan_generation = outcome.plan, run.status.plan_generation + 1
        run.creates.append(plan_config_map(obs.job, plan, plan_generation))
    assert plan is not None
    if run.status.generation > 0:
        reason = "PlanKept" if reused else "Replanned"
        run.events.append(
            Event(
                "Normal",
                reason,
                f"plan generation {plan_generation}: "
                f"{grades_column(plan)}, {plan.world_size} ranks",
            )
        )
    _launch(run, spec, plan, plan_generation, run.status.generation + 1, planned=not reused)


def _resuming(run: _Pass) -> bool:
    """Whether the job is back from a suspend and has launched nothing since: resuming
    sets Pending and Suspended=False Resumed and leaves Ready as the suspend set it (or
    WorkersStopping while the suspended workers finish saving). A launch changes Ready,
    so a job reopened after failing (Pending again, with that old Resumed condition)
    does not wait for its broken gang as if it were saving."""
    suspended = condition(run.status.conditions, "Suspended")
    ready = condition(run.status.conditions, "Ready")
    return (
        run.status.phase == "Pending"
        and suspended is not None
        and (suspended.status, suspended.reason) == ("False", "Resumed")
        and ready is not None
        and ready.reason in ("SuspendedByUser", "WorkersStopping")
    )


def _stop_old(run: _Pass, old: Sequence[PodObs], *, save: bool) -> bool:
    """Stop an older generation's pods; with ``save`` they keep their grace period to
    save a checkpoint, and the next generation waits while any still runs (it must
    resume from that save). Returns whether it waits."""
    run.stop(old, save=save)
    stopping = _live(old) if save else []
    if stopping:
        run.cond(
            "Ready",
            "False",
            "WorkersStopping",
            f"workers of generation {max(p.generation for p in stopping)} are still stopping "
            "(saving a checkpoint); the next generation starts when they are gone",
        )
        run.requeue(DELETE_POLL_SECONDS)
    return bool(stopping)


def _scaling_up(run: _Pass) -> bool:
    """Whether the recorded generation was started by a scale-up (``_maybe_scale_up``)
    and has not been running since."""
    restarting = condition(run.status.conditions, "Restarting")
    return restarting is not None and (restarting.status, restarting.reason) == (
        "True",
        "ScaledUp",
    )


def _after_orderly_stop(run: _Pass) -> bool:
    """Whether the current generation ended in an orderly stop (``failures.detect``)
    that the default rules turned into a restart."""
    failure = run.status.last_failure
    return (
        failure is not None
        and failure.generation == run.status.generation
        and failure.cause == failures.WORKER_STOPPED
    )


def _wait(run: _Pass, reason: str, message: str) -> None:
    phase: Phase = "Restarting" if run.status.phase == "Restarting" else "Pending"
    run.cond("Ready", "False", reason, message)
    run.phase(phase, reason, message, warning=True)
    run.requeue(run.env.config.resync_seconds)


def _launch(
    run: _Pass,
    spec: MoEJobSpec,
    plan: Plan,
    plan_generation: int,
    generation: int,
    *,
    planned: bool = False,
    save_old: bool = False,
) -> None:
    """Create (the missing) pods of ``generation`` and record it in status.

    ``save_old``: the older generation is a healthy gang (a scale-up), so its pods keep
    their grace period to save a checkpoint, and the new pods are created only once
    they are gone: new pods on other nodes would otherwise start at once, resume from
    the checkpoint before, and train alongside the old gang's save."""
    obs = run.obs
    run.update(plan_generation=plan_generation)
    existing = {p.name for p in obs.pods}
    run.creates.append(rendezvous_service(obs.job, run.env.config.worker_ports))
    pods = worker_pods(plan, _pod_context(run, spec, plan, generation))
    saving = _stop_old(run, [p for p in obs.pods if p.generation < generation], save=save_old)
    if not saving:
        if spec.scheduling.gang == "coscheduling":
            run.creates.append(pod_group(obs.job, generation, len(pods)))
            if generation > 1:  # the last generation's gang: its pods are bound or stopping
                previous = pod_group_name(obs.job.name, generation - 1)
                run.deletes.append(Delete(previous, kind="PodGroup"))
        run.creates.extend(p for p in pods if p["metadata"]["name"] not in existing)
    name = plan_config_map_name(obs.job.name)
    summary = f"{grades_column(plan)}: {plan.world_size} ranks on {len(pods)} nodes"
    if planned:
        run.cond("Planned", "True", "PlanReady", f"plan generation {plan_generation}: {summary}")
    elif condition(run.status.conditions, "Planned") is None:
        run.cond("Planned", "True", "PlanKept", f"plan generation {plan_generation}: {summary}")
    if not saving:
        run.cond(
            "Ready",
            "False",
            "WorkersCreating",
            f"generation {generation}: creating {len(pods)} worker pods",
        )
    progress = run.status.progress
    replaced = run.status.replaced_pods
    if generation != run.status.generation:
        replaced = []  # pod replacements and in-place restarts count per generation
        if progress is not None:
            progress = progress.model_copy(
                update={"in_place_restarts": 0, "last_in_place_restart": None}
            )
    run.update(
        generation=generation,
        progress=progress,
        replaced_pods=replaced,
        plan=plan_status(plan, name),
        grades=grades_column(plan),
        restart_after=None,
        start_time=run.status.start_time or rfc3339(obs.now),
    )
    if run.status.phase != "Restarting":
        run.phase("Planning", "PlanReady", f"generation {generation}: {summary}")
    run.requeue(run.env.config.resync_seconds)


def _pod_context(
    run: _Pass, spec: MoEJobSpec, plan: Plan, generation: int | None = None
) -> PodContext:
    catalog, config = run.env.catalog, run.env.config
    resource_names = {g.name: g.resource_name for g in catalog.grades} if catalog else {}
    for rank in plan.ranks:
        resource_names.setdefault(rank.grade, "nvidia.com/gpu")
    resource = next(iter(resource_names.values()), "nvidia.com/gpu")
    return PodContext(
        job=run.obs.job,
        spec=spec,
        generation=run.status.generation if generation is None else generation,
        plan_generation=run.status.plan_generation,
        ports=config.worker_ports,
        resource_names=resource_names,
        pool_label=config.pool_label,
        tolerations=worker_tolerations(resource, config),
        excluded_nodes=tuple(run.status.excluded_nodes),
        peak_tflops={g.name: g.peak_bf16_tflops for g in catalog.grades} if catalog else {},
    )
