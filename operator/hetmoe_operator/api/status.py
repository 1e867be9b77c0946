"""The MoEJob status: what the operator observed and decided, in explicit fields.

Printer columns read explicit fields (``phase``, ``grades``, ``progress.step``,
``restarts``, ``progress.tokensPerSecond``), never the last condition, so ``kubectl
get mj`` cannot show a stale or misleading state. Conditions follow the standard
Kubernetes shape and are listed by type (one entry per type).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from hetmoe_operator.api.base import ApiModel

Phase = Literal["Pending", "Planning", "Running", "Restarting", "Suspended", "Succeeded", "Failed"]
PHASES: tuple[Phase, ...] = (
    "Pending",
    "Planning",
    "Running",
    "Restarting",
    "Suspended",
    "Succeeded",
    "Failed",
)
TERMINAL_PHASES: frozenset[str] = frozenset({"Succeeded", "Failed"})

_CAMEL = r"^[A-Z][A-Za-z0-9]*$"


class Condition(ApiModel):
    """A standard Kubernetes condition (metav1.Condition shape)."""

    type: str = Field(pattern=_CAMEL, max_length=316)
    """Condition type, e.g. ``Planned`` or ``Ready`` (see hetmoe_operator.api.reasons)."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: str = Field(pattern=_CAMEL, max_length=1024)
    """CamelCase reason from the documented catalogue."""
    message: str = Field(default="", max_length=32768)
    """Human-readable detail: what happened and what to change."""
    observed_generation: int | None = Field(default=None, ge=0)
    """metadata.generation of the spec this condition was computed from."""
    last_transition_time: str
    """RFC 3339 time the status last changed."""


class PoolPlanStatus(ApiModel):
    """What the current plan does with one pool."""

    pool: str
    """Pool name."""
    grade: str
    """Accelerator grade."""
    nodes: int = Field(ge=0)
    """Nodes used."""
    devices: int = Field(ge=0)
    """Devices used."""
    stages: list[int] = Field(default_factory=list, max_length=1024)
    """Pipeline stages (partly) served by the pool."""
    layers: str = ""
    """Layer ranges, e.g. ``0-11,40-47``."""
    experts_per_device: float = Field(default=0, ge=0)
    """Average routed expert slots per device."""
    predicted_tokens_per_second: float = Field(default=0, ge=0)
    """Predicted tokens/s through this pool."""
    predicted_cost_per_1t_tokens: float = Field(default=0, ge=0)
    """This pool's share of the predicted cost of 10^12 tokens."""


class PlanStatus(ApiModel):
    """Summary of the plan the workers follow (the full plan is in the plan ConfigMap)."""

    config_map: str
    """Name of the ConfigMap holding the plan JSON."""
    world_size: int = Field(ge=1)
    """Worker processes."""
    parallel: str
    """Degrees, e.g. ``pp=2 dp=4 ep=4 tp=1``."""
    predicted_tokens_per_second: float = Field(default=0, ge=0)
    """Predicted training throughput."""
    predicted_cost_per_1t_tokens: float = Field(default=0, ge=0)
    """Predicted cost of 10^12 tokens."""
    currency: str = ""
    """Currency of the cost figures."""
    pools: list[PoolPlanStatus] = Field(default_factory=list, max_length=256)
    """Per-pool summary."""


class FailureStatus(ApiModel):
    """The last failure that started a restart generation, replaced a pod, or failed the job."""

    cause: str
    """Reason from the catalogue, e.g. ``WorkerFailed``, ``NodeLost``, ``ReplaceNode``."""
    pod: str = ""
    """Pod that failed (empty for node events without a pod)."""
    node: str = ""
    """Node it ran on."""
    exit_code: int | None = None
    """Container exit code, when there was one."""
    reason: str = ""
    """Kubernetes reason, e.g. ``Error``, ``OOMKilled``, ``Evicted``, ``NodeLost``."""
    message: str = Field(default="", max_length=4096)
    """Detail."""
    action: Literal["restart", "replace-node", "fail"] = "restart"
    """What the operator did about it."""
    counted: bool = True
    """Whether it used up one of elastic.maxRestarts."""
    generation: int = Field(default=0, ge=0)
    """Restart generation the failure happened in."""
    replaced_alone: bool = False
    """Only the failed pod was replaced (elastic.inPlaceRestarts); its generation goes on."""
    time: str = ""
    """RFC 3339 time of detection."""


MAX_REASON_CHARS = 2048


class Progress(ApiModel):
    """Training progress as last reported by the rank-0 worker."""

    step: int = Field(default=0, ge=0)
    """Optimizer steps done."""
    total_steps: int = Field(default=0, ge=0)
    """Steps of the whole run."""
    tokens: int = Field(default=0, ge=0)
    """Tokens consumed."""
    loss: float | None = None
    """Latest training loss."""
    tokens_per_second: float = Field(default=0, ge=0)
    """Measured throughput."""
    eta_seconds: float | None = Field(default=None, ge=0)
    """Estimated seconds to completion at the measured throughput."""
    in_place_restarts: int = Field(default=0, ge=0)
    """Times the workers of the current generation restarted inside their pods
    (elastic.inPlaceRestarts), each resuming from the latest checkpoint."""
    last_in_place_restart: str | None = Field(default=None, max_length=MAX_REASON_CHARS)
    """Why the last of them happened: the failed worker's seat and its own words."""
    update_time: str = ""
    """RFC 3339 time of the last successful read."""


class MoEJobStatus(ApiModel):
    """Observed state of a MoEJob."""

    phase: Phase = "Pending"
    """Pending (waiting for capacity or the catalog), Planning (a plan was made and the
    first workers are being created and scheduled), Running (every worker Running),
    Restarting (a failure stopped the workers; the next generation is on its way),
    Suspended, Succeeded or Failed."""
    observed_generation: int = Field(default=0, ge=0)
    """metadata.generation last acted on."""
    conditions: list[Condition] = Field(default_factory=list, max_length=16)
    """Standard conditions, one per type."""
    generation: int = Field(default=0, ge=0)
    """Restart generation: bumped each time the workers are recreated; pods carry it."""
    plan_generation: int = Field(default=0, ge=0)
    """Bumped each time a new plan is computed."""
    plan: PlanStatus | None = None
    """Current plan summary."""
    grades: str = ""
    """Grades in use with their node counts, e.g. ``A:2,D:1`` (printer column)."""
    restarts: int = Field(default=0, ge=0)
    """Restarts counted towards elastic.maxRestarts."""
    uncounted_restarts: int = Field(default=0, ge=0)
    """Restarts matched by rules that do not count."""
    last_failure: FailureStatus | None = None
    """Cause of the last restart or of the final failure."""
    restart_after: str | None = None
    """RFC 3339 time before which the next generation is not started (backoff)."""
    replaced_pods: list[str] = Field(default_factory=list, max_length=1024)
    """Pods of the current generation that failed alone and were replaced alone
    (elastic.inPlaceRestarts), oldest first; pod P's k-th replacement is named P-rk."""
    excluded_nodes: list[str] = Field(default_factory=list, max_length=1024)
    """Nodes a worker asked to replace; never planned on again by this job."""
    scale_up_checked_time: str | None = None
    """RFC 3339 time the operator last looked for capacity to grow onto
    (elastic.scaleUp); looks are spaced by elastic.scaleUpStabilizationSeconds."""
    progress: Progress | None = None
    """Training progress."""
    last_checkpoint_step: int | None = Field(default=None, ge=0)
    """Step of the latest completed checkpoint reported by the trainer."""
    start_time: str | None = None
    """RFC 3339 time the first workers were created."""
    completion_time: str | None = None
    """RFC 3339 time the job reached Succeeded or Failed."""
