"""The catalogue of condition types and reasons a MoEJob's status can carry.

Reasons are part of the API: tools and alerts match on them, so they are constants
with a documented meaning rather than strings invented at each call site. Every
reason is CamelCase as Kubernetes conventions require.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Final

# Condition types (one condition per type, listed by type in status.conditions).
PLANNED: Final = "Planned"
"""True once a plan exists for the current capacity; False with the planner's message."""
READY: Final = "Ready"
"""True while every worker pod of the current generation is Running."""
SUSPENDED: Final = "Suspended"
"""True while spec.suspend stops the workers."""
RESTARTING: Final = "Restarting"
"""True between a failure and the creation of the next generation's pods."""
COMPLETE: Final = "Complete"
"""True when every worker exited 0 (terminal)."""
FAILED: Final = "Failed"
"""True when the job will not run again (terminal); the reason says why."""

CONDITION_TYPES: Final = (PLANNED, READY, SUSPENDED, RESTARTING, COMPLETE, FAILED)

REASONS: Final = MappingProxyType(
    {
        # Planning.
        "PlanReady": "The planner produced a plan that fits the eligible capacity.",
        "PlanKept": "After a failure the previous plan still fits; it is reused unchanged.",
        "Replanned": "Capacity changed; a new plan was computed on what is left.",
        "ScaledUp": "More usable nodes appeared and elastic.scaleUp is set: a new generation "
        "re-plans onto them (the message gives the node counts).",
        "WaitingForCapacity": "No feasible plan on the current capacity; the job waits "
        "for nodes (the message says what is missing).",
        "PlanInfeasible": "No plan can ever satisfy the spec (the message says what to change).",
        "UnknownGrade": "A node or pool refers to an accelerator grade missing from the catalog.",
        "CatalogUnavailable": "The device catalog could not be read; the job waits.",
        # Running.
        "WorkersCreating": "Worker pods of the current generation are being created or scheduled.",
        "WorkersRunning": "Every worker pod of the current generation is Running.",
        "WorkersStopping": "Workers of the previous generation are still stopping (saving a "
        "checkpoint) after a suspend or an orderly stop; the next generation starts when "
        "they are gone.",
        "ChildCreateFailed": "The API server refused to create a child object; retried.",
        "PodGroupUnavailable": "scheduling.gang is coscheduling but the scheduler-plugins "
        "PodGroup CRD is not installed; no pods are created until it is.",
        "Unschedulable": "Worker pods are Pending because the scheduler cannot place them; "
        "the message quotes the scheduler (taints, insufficient resources, affinity).",
        # Failures and restarts.
        "WorkerFailed": "A worker pod failed; a restart generation follows.",
        "NodeLost": "A node running a worker was deleted or became NotReady.",
        "ReplaceNode": "A worker asked for its node to be replaced (exit code 86).",
        "Backoff": "Waiting before starting the next generation (exponential backoff).",
        "MaxRestartsExceeded": "More counted restarts than elastic.maxRestarts.",
        "FailureRuleFail": "A failure rule with action fail matched.",
        "ConfigError": "A worker exited with 78: the plan or settings are invalid.",
        "RollbackExhausted": "A worker exited with 87: anomalies persisted across rollbacks.",
        "WorkerHung": "A worker exited with 89: no training step finished within "
        "elastic.hangTimeoutSeconds (its log has every thread's stack); a restart follows.",
        "WorkerStopped": "A running worker was stopped from outside (deleted, drained, "
        "evicted or preempted; or it exited 88 or 143): its trainers save a checkpoint at the "
        "end of their step before exiting, and the restart does not count towards "
        "elastic.maxRestarts.",
        "PodReplaced": "With elastic.inPlaceRestarts, a worker pod failed while the others ran: "
        "it alone was replaced (named POD-rK) and the others' workers restarted in place to "
        "wait for it; counted like the failure's rule says.",
        "ReplacementUnschedulable": "A pod replaced alone (PodReplaced) could not be "
        "scheduled for 30 s after its predecessor was gone: the generation restarts on the "
        "capacity that is left, and the restart does not count towards elastic.maxRestarts "
        "(the failure that caused the replacement already did).",
        "RestartedInPlace": "The workers restarted inside their pods (elastic.inPlaceRestarts) "
        "and resumed from the latest checkpoint; no pod was replaced and maxRestarts is not "
        "used (an event; status.progress.inPlaceRestarts counts them per generation).",
        "BelowMinNodes": "Fewer usable nodes than elastic.minNodes and none can come back.",
        # Lifecycle.
        "SuspendedByUser": "spec.suspend is true: pods are stopped, checkpoints are kept.",
        "Resumed": "spec.suspend was cleared; the job resumes from its latest checkpoint.",
        "Succeeded": "Every worker exited 0.",
        "InvalidSpec": "The stored spec does not validate (e.g. written by a newer operator).",
    }
)
"""Every reason the operator sets, with its meaning (the catalogue users can rely on)."""


def is_known(reason: str) -> bool:
    """Whether ``reason`` is in the catalogue (tests assert every emitted reason is)."""
    return reason in REASONS
