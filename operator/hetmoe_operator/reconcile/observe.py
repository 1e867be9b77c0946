"""The observed snapshot a decision is made from, and parsing pods into it."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from hetmoe_operator.api.job import MoEJobSpec
from hetmoe_operator.api.status import MoEJobStatus, Progress
from hetmoe_operator.desired.names import (
    GENERATION_LABEL,
    NODE_SLOT_LABEL,
    WORKER_POOL_LABEL,
    JobRef,
)
from hetmoe_operator.discovery import Discovery
from hetmoe_operator.plan import Plan


@dataclass(frozen=True)
class PodObs:
    """What the decision needs to know about one worker pod."""

    name: str
    generation: int
    pool: str
    node_slot: int
    phase: str
    node: str = ""
    exit_code: int | None = None
    reason: str = ""
    message: str = ""
    deletion_deadline: datetime | None = None
    """deletionTimestamp (deletion requested at this moment minus the grace period)."""
    ip: str = ""
    unschedulable: str = ""
    """The scheduler's message while it cannot place the pod (PodScheduled=False,
    reason Unschedulable), e.g. ``0/8 nodes are available: 8 Insufficient cpu``."""
    unschedulable_since: datetime | None = None
    """When the scheduler first found no place for the pod (that condition's
    ``lastTransitionTime``; later failed attempts do not move it)."""
    finished_at: datetime | None = None
    """When the failed container ended (its ``terminated.finishedAt``)."""

    @property
    def deleting(self) -> bool:
        """Whether deletion was requested."""
        return self.deletion_deadline is not None


def parse_time(value: str | None) -> datetime | None:
    """RFC 3339 timestamp as the API writes it."""
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def pod_obs(pod: Mapping[str, Any]) -> PodObs | None:
    """Parse a worker pod; None for pods without hetmoe labels (not ours to judge)."""
    meta = pod.get("metadata", {})
    labels = meta.get("labels") or {}
    try:
        generation = int(labels[GENERATION_LABEL])
        slot = int(labels[NODE_SLOT_LABEL])
        pool = str(labels[WORKER_POOL_LABEL])
    except (KeyError, ValueError):
        return None
    status = pod.get("status") or {}
    exit_code, reason, message, finished_at = (
        None,
        str(status.get("reason") or ""),
        str(status.get("message") or ""),
        None,
    )
    for container in status.get("containerStatuses") or ():
        terminated = (container.get("state") or {}).get("terminated")
        if terminated and terminated.get("exitCode") not in (None, 0):
            exit_code = int(terminated["exitCode"])
            reason = str(terminated.get("reason") or reason or "Error")
            message = str(terminated.get("message") or message)
            finished_at = parse_time(terminated.get("finishedAt"))
            break
        if terminated and exit_code is None:
            exit_code = int(terminated.get("exitCode") or 0)
    unplaced = next(
        (
            c
            for c in status.get("conditions") or ()
            if c.get("type") == "PodScheduled"
            and c.get("status") == "False"
            and c.get("reason") == "Unschedulable"
        ),
        None,
    )
    return PodObs(
        name=str(meta.get("name", "")),
        generation=generation,
        pool=pool,
        node_slot=slot,
        phase=str(status.get("phase") or "Pending"),
        node=str((pod.get("spec") or {}).get("nodeName") or ""),
        exit_code=exit_code,
        reason=reason,
        message=message,
        deletion_deadline=parse_time(meta.get("deletionTimestamp")),
        ip=str(status.get("podIP") or ""),
        unschedulable=(
            str(unplaced.get("message") or "no message from the scheduler") if unplaced else ""
        ),
        unschedulable_since=parse_time(unplaced.get("lastTransitionTime")) if unplaced else None,
        finished_at=finished_at,
    )


DiscoverFunction = Callable[[Sequence[str]], Discovery | None]
"""Usable capacity for the job, given nodes to exclude; None if the catalog is missing."""


@dataclass(frozen=True)
class Observation:
    """Everything observed about one job at one moment."""

    job: JobRef
    metadata_generation: int
    spec: MoEJobSpec | None
    """None when the stored spec does not validate (``spec_error`` says why)."""
    status: MoEJobStatus
    pods: Sequence[PodObs]
    nodes: Mapping[str, bool]
    """Node name -> Ready, for every node that exists (a missing name was deleted)."""
    now: datetime
    plan: Plan | None = None
    """The plan in the job's ConfigMap, if any."""
    plan_generation: int = 0
    """Plan generation recorded on that ConfigMap."""
    spec_error: str = ""
    progress: Progress | None = None
    """Fresh progress read from rank 0, or None to keep the last one."""
    checkpoint_step: int | None = None
    """Latest checkpoint step reported with the progress."""
