"""Detecting worker failures and deciding what each one means.

User failure rules are evaluated first (first match wins), then the built-in
defaults that encode the trainer's exit-code contract (``plan.WorkerExit``):
78 config error -> fail, 87 rollback exhausted -> fail, 86 replace node ->
re-plan without the node it names, 89 hung -> restart (counted); a lost node restarts
without using up a restart (the job did nothing wrong); so does a worker stopped
from outside, 88 from the trainer or 143 (128 + SIGTERM) from its torchrun agent (a
drain, an eviction, a preemption: it saved a checkpoint on the way out), and so does a
pod replaced alone that the scheduler cannot place (the failure that caused the
replacement was counted already); anything else restarts and counts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from hetmoe_operator.api.job import FailureAction, FailureRule
from hetmoe_operator.api.status import MoEJobStatus
from hetmoe_operator.plan import (
    WAITING_FOR_PEERS_MARK,
    WorkerExit,
    parse_replace_node_request,
)
from hetmoe_operator.reconcile.observe import PodObs, parse_time

NODE_LOST = "NodeLost"
DELETED = "Deleted"
SIGTERM_EXIT = 143
"""A torchrun agent that was itself SIGTERMed exits as a shell would: 128 + 15."""
STOPPED_EXITS = frozenset({WorkerExit.STOPPED, SIGTERM_EXIT})
"""Exit codes of a worker stopped from outside, which restart without being counted."""
WORKER_STOPPED = "WorkerStopped"
TELLING_EXITS = frozenset(
    {
        WorkerExit.CONFIG_ERROR,
        WorkerExit.REPLACE_NODE,
        WorkerExit.ROLLBACK_EXHAUSTED,
        WorkerExit.HUNG,
        *STOPPED_EXITS,
    }
)
"""Exit codes that are a worker's own verdict, not fallout of another's failure."""
STUCK_TERMINATING_SECONDS = 30.0
"""A pod still present this long after its deletion deadline is force-deleted."""
NOT_READY_GRACE_SECONDS = 20.0
"""A node NotReady for less than this still counts as up for the pods on it.

A kubelet (or kwok, on a loaded host) that misses one lease renewal flips its node
NotReady for a few seconds; restarting every job on it each time costs a restart
generation and a checkpoint reload for nothing. Kubernetes itself waits far longer
(node-monitor-grace-period, then 300 s taint tolerations) before evicting; a short
grace keeps node loss detection fast while riding out blips. A deleted node is lost
at once. New plans never use a NotReady node (discovery), whatever its age."""


def node_counts_as_up(ready: bool, not_ready_since: datetime | None, now: datetime) -> bool:
    """Whether the pods on a node should be treated as alive (see the grace above)."""
    if ready:
        return True
    if not_ready_since is None:
        return False
    return (now - not_ready_since).total_seconds() < NOT_READY_GRACE_SECONDS


@dataclass(frozen=True)
class Failure:
    """One observed failure of the current generation."""

    pod: str
    node: str
    exit_code: int | None
    reason: str
    message: str
    orderly: bool = False
    """Stopped from outside, with the rest of the gang stopping in order (see
    :func:`detect`): every rank saves a checkpoint after the same step on the way out."""
    finished_at: datetime | None = None
    """When the failed container ended, if it did."""

    @property
    def waited_for_peers(self) -> bool:
        """Every rank of this pod said it ended waiting for other workers (a hang inside a
        collective, or a collective broken by a peer that died): another worker is the
        likelier culprit (``plan.WAITING_FOR_PEERS_MARK``)."""
        lines = [line for line in self.message.splitlines() if line.strip()]
        return bool(lines) and all(WAITING_FOR_PEERS_MARK in line for line in lines)


@dataclass(frozen=True)
class Verdict:
    """What to do about a failure."""

    action: FailureAction
    counted: bool
    cause: str
    """Catalogue reason (``hetmoe_operator.api.reasons``)."""


def detect(
    pods: Sequence[PodObs], expected: Sequence[str], nodes: Mapping[str, bool]
) -> list[Failure]:
    """Failures among the current generation's pods, most specific first.

    A failed container (with its exit code) beats a lost node, which beats a pod that
    vanished or is being deleted by someone else.

    Orderly: a worker that exited 88 or 143, or a running pod someone else is deleting
    (a drain, an eviction, a preemption, ``kubectl delete``: its trainers got SIGTERM
    and, agreeing with the other ranks, save a checkpoint at the end of their step). A
    pod that vanished outright, or any other failure, may leave the survivors blocked
    on a dead peer.
    """
    by_name = {p.name: p for p in pods}
    exits, lost, gone = [], [], []
    for pod in pods:
        if pod.phase == "Failed":
            blamed = _node_to_replace(pod, pods)
            exits.append(
                Failure(
                    blamed.name,
                    blamed.node,
                    pod.exit_code,
                    pod.reason or "Error",
                    pod.message,
                    orderly=pod.exit_code in STOPPED_EXITS,
                    finished_at=pod.finished_at,
                )
            )
        elif pod.node and pod.phase != "Succeeded" and not nodes.get(pod.node, False):
            state = "was deleted" if pod.node not in nodes else "is NotReady"
            lost.append(Failure(pod.name, pod.node, None, NODE_LOST, f"node {pod.node} {state}"))
        elif pod.deleting and pod.phase != "Succeeded":
            gone.append(
                Failure(
                    pod.name,
                    pod.node,
                    None,
                    DELETED,
                    f"the pod was deleted while {pod.phase.lower()}",
                    orderly=pod.phase == "Running",
                )
            )
    for name in expected:
        if name not in by_name:
            gone.append(Failure(name, "", None, DELETED, "the pod disappeared"))
    # When one worker fails, the others fail too, a moment later, on the broken
    # collective: a worker that did not end waiting for others is the likelier
    # culprit, and a worker's own verdict (78, 86, 87, 89...) says more than an exit 1.
    exits.sort(key=lambda f: (f.waited_for_peers, f.exit_code not in TELLING_EXITS))
    return exits + lost + gone


REPLACEMENT_UNSCHEDULABLE = "ReplacementUnschedulable"
REPLACEMENT_UNSCHEDULABLE_SECONDS = 30.0
"""How long a pod replaced alone may stay unschedulable, once its predecessor is gone,
before the generation restarts instead.

The other workers wait for it at the rendezvous (until torchrun's join timeout, 10
minutes), so a replacement the scheduler cannot place must not hold the job. It is
not judged at once: while the failed pod still held its node's devices the scheduler
may have turned the replacement away, and retries it (backing off up to 10 s) once
they are free. Erring late costs a restart that could have been avoided, never data:
the next generation re-plans on the capacity that is left."""

PEER_WAIT_SETTLE_SECONDS = 15.0
"""How long a failure that waited for peers is held while other workers still run.

The culprit ends first (a crashed rank breaks its peers' collectives; a wedged rank's
watchdog fires at least 2 s before theirs, the trainer's
``watchdog.collective_extra_seconds``), but its pod's exit can reach the API later
than theirs (the torchrun agents' shutdowns, the kubelets' status syncs race). A few
seconds, against the restart that follows, buy the right pod on the status."""


def settle_seconds(failure: Failure, pods: Sequence[PodObs], now: datetime) -> float:
    """How long to hold ``failure`` before acting on it, 0 to act now.

    Only a failure that waited for peers is held, and only while another worker of the
    generation still runs, for up to :data:`PEER_WAIT_SETTLE_SECONDS` after its pod
    ended: the culprit's own report is probably on its way. Any other failure is acted
    on at once."""
    if not failure.waited_for_peers or failure.finished_at is None:
        return 0.0
    if not any(p.phase == "Running" and not p.deleting and p.name != failure.pod for p in pods):
        return 0.0
    held = (now - failure.finished_at).total_seconds()
    return max(0.0, PEER_WAIT_SETTLE_SECONDS - held)


def _node_to_replace(pod: PodObs, pods: Sequence[PodObs]) -> PodObs:
    """The worker a ``REPLACE_NODE`` exit is about: every rank exits with that code when
    one straggles, naming the straggler's place in the plan, so the failure (and the
    node left out of the next plan) is the named worker's, whichever pod is seen first.
    Any other exit, or a mark naming no pod of this generation, is the pod's own."""
    if pod.exit_code != WorkerExit.REPLACE_NODE:
        return pod
    named = parse_replace_node_request(pod.message)
    if named is None:
        return pod
    pool, slot = named
    return next((p for p in pods if (p.pool, p.node_slot) == (pool, slot) and p.node), pod)


def classify(failure: Failure, rules: Sequence[FailureRule]) -> Verdict:
    """Apply the job's failure rules, then the defaults (module docstring)."""
    for rule in rules:
        if (failure.exit_code is not None and failure.exit_code in rule.exit_codes) or (
            failure.reason in rule.reasons
        ):
            cause = {"fail": "FailureRuleFail", "replace-node": "ReplaceNode"}.get(
                rule.action, NODE_LOST if failure.reason == NODE_LOST else "WorkerFailed"
            )
            return Verdict(rule.action, rule.count_towards_max_restarts, cause)
    if failure.exit_code == WorkerExit.CONFIG_ERROR:
        return Verdict("fail", True, "ConfigError")
    if failure.exit_code == WorkerExit.ROLLBACK_EXHAUSTED:
        return Verdict("fail", True, "RollbackExhausted")
    if failure.exit_code == WorkerExit.REPLACE_NODE:
        return Verdict("replace-node", True, "ReplaceNode")
    if failure.exit_code == WorkerExit.HUNG:
        return Verdict("restart", True, "WorkerHung")
    if failure.reason == NODE_LOST:
        return Verdict("restart", False, NODE_LOST)
    if failure.reason == REPLACEMENT_UNSCHEDULABLE:
        return Verdict("restart", False, REPLACEMENT_UNSCHEDULABLE)
    if failure.orderly:
        return Verdict("restart", False, WORKER_STOPPED)
    return Verdict("restart", True, "WorkerFailed")


def describe(failure: Failure) -> str:
    """One sentence for conditions and events."""
    where = f" on node {failure.node}" if failure.node else ""
    code = f" exited with code {failure.exit_code}" if failure.exit_code is not None else ""
    detail = f": {failure.message}" if failure.message else ""
    return f"pod {failure.pod}{where}{code} ({failure.reason}){detail}"


def backoff_seconds(base: float, cap: float, previous_restarts: int) -> float:
    """base x 2^previous_restarts, capped (exponent bounded so it cannot overflow)."""
    return float(min(cap, base * (2 ** min(previous_restarts, 32))))


RESTART_HOLD_SECONDS = 120.0
"""How long after its backoff a restarting job that is short of nodes keeps the ones
it had (see :func:`keeps_its_nodes`)."""


def keeps_its_nodes(status: MoEJobStatus, now: datetime) -> bool:
    """Whether a restarting job's nodes stay set aside for it: through the backoff,
    and for :data:`RESTART_HOLD_SECONDS` more while it waits for capacity (a pod of
    another restarting job may have landed on the node its failed worker freed, so it
    can be a node short for a moment). Past that it lets them go, so a job that lost
    capacity for good does not starve the queue, and waits with priority instead."""
    after = parse_time(status.restart_after) if status.phase == "Restarting" else None
    return after is not None and now < after + timedelta(seconds=RESTART_HOLD_SECONDS)


def needs_force_delete(pod: PodObs, nodes: Mapping[str, bool], now: datetime) -> bool:
    """A pod that will never terminate on its own: its node is gone or NotReady, or it
    is stuck well past its deletion deadline. Grace 0 removes it from the API so it
    never blocks the next generation."""
    if pod.node and not nodes.get(pod.node, False):
        return True
    return pod.deletion_deadline is not None and now > pod.deletion_deadline + timedelta(
        seconds=STUCK_TERMINATING_SECONDS
    )
