"""The MoEJob resource spec (``hetmoe.io/v1alpha1``): what an ML engineer writes.

Conventions follow Kubernetes API guidance: camelCase fields, lists keyed by name,
bounds on every list, and a spec-level ``suspend`` so queueing systems can hold a job.
Status lives in :mod:`hetmoe_operator.api.status`.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from hetmoe_operator.api.base import ApiModel
from hetmoe_operator.api.model import PRESETS, ModelArchitecture, PresetName
from hetmoe_operator.api.training import TrainingConfig

GROUP = "hetmoe.io"
VERSION = "v1alpha1"
KIND = "MoEJob"
PLURAL = "moejobs"
SHORT_NAME = "mj"
DEFAULT_IMAGE = "hetmoe/trainer:0.1.0"


class ModelSpec(ApiModel):
    """A shipped preset or an explicit architecture, plus optional initial weights."""

    preset: PresetName | None = None
    """Shipped architecture: ``tiny`` (CPU tests), ``ling-lite`` or ``ling-plus``."""
    architecture: ModelArchitecture | None = None
    """Explicit architecture, field names as in the public Bailing MoE config.json."""
    initial_weights: str | None = Field(default=None, max_length=4096)
    """Directory of Hugging Face-style safetensors to start from, as seen by workers."""

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.preset is None) == (self.architecture is None):
            raise ValueError("set exactly one of model.preset and model.architecture")
        return self

    def resolve(self) -> ModelArchitecture:
        """The architecture to train."""
        if self.architecture is not None:
            return self.architecture
        assert self.preset is not None
        return PRESETS[self.preset]


class PoolRef(ApiModel):
    """A pool the job may use, by name or by Node labels, with optional node bounds."""

    name: str | None = Field(default=None, pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    """Pool name (value of the ``hetmoe.io/pool`` Node label)."""
    selector: dict[str, str] | None = Field(default=None, max_length=16)
    """Node labels that must all match (matchLabels semantics)."""
    min_nodes: int | None = Field(default=None, ge=0)
    """Use at least this many nodes of the pool (the job waits otherwise)."""
    max_nodes: int | None = Field(default=None, ge=1)
    """Use at most this many nodes of the pool."""

    @model_validator(mode="after")
    def _name_or_selector(self) -> PoolRef:
        if (self.name is None) == (self.selector is None):
            raise ValueError("a pool entry sets exactly one of name and selector")
        if (
            self.min_nodes is not None
            and self.max_nodes is not None
            and self.min_nodes > self.max_nodes
        ):
            raise ValueError("minNodes cannot exceed maxNodes")
        return self


class PlacementSpec(ApiModel):
    """What the planner optimises, and degrees the user wants fixed."""

    objective: Literal["throughput", "cost", "throughput-under-budget"] = "throughput"
    """Maximise tokens/s, minimise cost per token, or maximise tokens/s under a price cap."""
    budget_per_hour: float | None = Field(default=None, gt=0)
    """Price cap per hour (catalog currency); required for throughput-under-budget."""
    pipeline_parallel: int | None = Field(default=None, ge=1, le=1024)
    """Pin the pipeline-parallel degree."""
    data_parallel: int | None = Field(default=None, ge=1, le=100000)
    """Pin the data-parallel degree."""
    expert_parallel: int | None = Field(default=None, ge=1, le=4096)
    """Pin the expert-parallel degree."""
    time_limit_seconds: float = Field(default=10.0, gt=0, le=600)
    """Upper bound on planning time."""

    @model_validator(mode="after")
    def _budget(self) -> PlacementSpec:
        if self.objective == "throughput-under-budget" and self.budget_per_hour is None:
            raise ValueError("objective throughput-under-budget needs budgetPerHour")
        return self


FailureAction = Literal["restart", "replace-node", "fail"]


class FailureRule(ApiModel):
    """Maps a worker exit code or a pod failure reason to an action."""

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    """Rule name (rules are a list keyed by name)."""
    exit_codes: list[int] = Field(default_factory=list, max_length=64)
    """Container exit codes this rule matches."""
    reasons: list[str] = Field(default_factory=list, max_length=16)
    """Pod/container reasons this rule matches, e.g. ``OOMKilled``, ``Evicted``, ``NodeLost``."""
    action: FailureAction
    """``restart`` from the latest checkpoint, ``replace-node`` (avoid the node), or ``fail``."""
    count_towards_max_restarts: bool = True
    """Whether a match uses up one of ``maxRestarts``."""

    @model_validator(mode="after")
    def _matches_something(self) -> FailureRule:
        if not self.exit_codes and not self.reasons:
            raise ValueError(f"failure rule {self.name} must list exitCodes or reasons")
        return self


class ElasticSpec(ApiModel):
    """Restarts, backoff and how far the job may shrink or grow."""

    max_restarts: int = Field(default=3, ge=0, le=1000)
    """Restarts counted by failure rules before the job is Failed."""
    backoff_seconds: float = Field(default=10.0, ge=0, le=3600)
    """Delay before the first restart; doubles each time up to maxBackoffSeconds."""
    max_backoff_seconds: float = Field(default=300.0, ge=0, le=86400)
    """Upper bound on the restart delay."""
    min_nodes: int | None = Field(default=None, ge=1)
    """Fewest nodes the job may run on after losing capacity."""
    max_nodes: int | None = Field(default=None, ge=1)
    """Most nodes the job may use."""
    scale_up: bool = False
    """Grow a Running job when more usable nodes appear (below maxNodes): a new
    generation re-plans onto them and resumes from the latest checkpoint."""
    scale_up_stabilization_seconds: float = Field(default=60.0, ge=0, le=86400)
    """With scaleUp, a job must have been Running this long before it grows, and looks
    for capacity at most this often: growth never flaps."""
    hang_timeout_seconds: int = Field(default=1800, ge=0, le=604800)
    """A worker whose training step has not finished after this many seconds (a
    collective or a kernel that never returns) prints every thread's stack and exits 89,
    which restarts the job from its latest checkpoint. Cover the slowest step, the first
    one after a restart included (checkpoint load, compilation). 0 turns it off."""
    in_place_restarts: int = Field(default=0, ge=0, le=100)
    """How often the workers may restart inside their pods, per generation, before a
    failure reaches the operator: torchrun stops every worker of the gang, the same pods
    rendezvous again and resume from the latest checkpoint, with no pod deleted,
    scheduled or created. For crashes and hangs of worker processes (not counted
    towards maxRestarts; shown in status.progress.inPlaceRestarts). Also up to this many
    times per generation, a pod that fails while every other pod runs (its node lost,
    its container killed) is replaced alone and the others wait for it (counted as its
    failure rule says; not the first pod, which serves the rendezvous). Exits that ask
    the operator for something (78 config error, 86 replace the node, 87 rollbacks
    exhausted) and a pod asked to stop restart the generation. 0 turns it off."""
    failure_rules: list[FailureRule] = Field(default_factory=list, max_length=32)
    """Evaluated in order before the built-in defaults; first match wins."""

    @model_validator(mode="after")
    def _bounds(self) -> ElasticSpec:
        if self.min_nodes and self.max_nodes and self.min_nodes > self.max_nodes:
            raise ValueError("elastic.minNodes cannot exceed elastic.maxNodes")
        names = [r.name for r in self.failure_rules]
        if len(set(names)) != len(names):
            raise ValueError("failure rule names must be unique")
        return self


class CheckpointVolume(ApiModel):
    """Where checkpoints live: a PVC in production, emptyDir or hostPath for tests."""

    persistent_volume_claim: str | None = Field(default=None, max_length=253)
    """Name of an existing PersistentVolumeClaim (never deleted by hetmoe)."""
    host_path: str | None = Field(default=None, max_length=4096)
    """Node-local directory (tests and single-node setups)."""
    empty_dir: bool = False
    """Scratch space that dies with the pod (tests only: resume will not work)."""

    @model_validator(mode="after")
    def _exactly_one(self) -> CheckpointVolume:
        chosen = [
            self.persistent_volume_claim is not None,
            self.host_path is not None,
            self.empty_dir,
        ]
        if sum(chosen) != 1:
            raise ValueError(
                "checkpoint.volume sets exactly one of persistentVolumeClaim, hostPath, emptyDir"
            )
        return self


class CheckpointSpec(ApiModel):
    """How often to save, how many to keep, and how long a stopped worker has to save."""

    volume: CheckpointVolume = CheckpointVolume(empty_dir=True)
    """Storage for checkpoints."""
    interval_steps: int = Field(default=100, ge=1)
    """Save every N optimizer steps."""
    keep: int = Field(default=3, ge=1, le=1000)
    """Checkpoints kept; older ones are pruned only by the trainer, never by deletion of the job."""
    stop_grace_period_seconds: int = Field(default=60, ge=5, le=86400)
    """Seconds a worker gets after SIGTERM (suspend, node drain, eviction, preemption) to
    finish its current step and save a checkpoint before it is killed; large models need
    minutes to save. A broken gang (a worker failed) is stopped with a few seconds instead."""


class ResourceOverrides(ApiModel):
    """Per-worker-pod CPU and memory requests (devices come from the plan)."""

    cpu: str | None = Field(default=None, pattern=r"^[0-9]+(\.[0-9]+)?m?$")
    """CPU request, e.g. ``8`` or ``500m``."""
    memory: str | None = Field(default=None, pattern=r"^[0-9]+(Ki|Mi|Gi|Ti|K|M|G|T)?$")
    """Memory request, e.g. ``64Gi``."""


class SchedulingSpec(ApiModel):
    """Optional gang scheduling; the default works with the default scheduler."""

    gang: Literal["none", "kueue", "coscheduling"] = "none"
    """Gang-scheduling integration to label pods for."""
    queue_name: str | None = Field(default=None, max_length=253)
    """Kueue LocalQueue name (gang=kueue)."""
    priority_class_name: str | None = Field(default=None, max_length=253)
    """PriorityClass for worker pods."""

    @model_validator(mode="after")
    def _queue(self) -> SchedulingSpec:
        if self.gang == "kueue" and not self.queue_name:
            raise ValueError("scheduling.gang kueue needs scheduling.queueName")
        return self


class MoEJobSpec(ApiModel):
    """Desired state of a MoE training job."""

    model: ModelSpec
    """Architecture (preset or explicit) and optional initial weights."""
    training: TrainingConfig
    """Budget, batch, schedule, data."""
    pools: list[PoolRef] = Field(default_factory=list, max_length=64)
    """Pools the job may use; empty means every pool the operator can see."""
    placement: PlacementSpec = PlacementSpec()
    """Planner objective and pins."""
    elastic: ElasticSpec = ElasticSpec()
    """Fault tolerance and elasticity."""
    checkpoint: CheckpointSpec = CheckpointSpec()
    """Checkpoint storage and cadence, and how long a stopped worker has to save."""
    image: str = Field(default=DEFAULT_IMAGE, min_length=1, max_length=512)
    """Trainer container image."""
    resources: ResourceOverrides = ResourceOverrides()
    """Worker CPU/memory requests."""
    suspend: bool = False
    """Stop workers (keeping checkpoints) until set back to false."""
    scheduling: SchedulingSpec = SchedulingSpec()
    """Gang scheduling and priority."""


class ObjectMeta(ApiModel):
    """The part of Kubernetes metadata a manifest file needs (the rest is ignored)."""

    model_config = ApiModel.model_config | {"extra": "ignore"}

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    """Job name (a DNS label: it prefixes pod names)."""
    namespace: str | None = None
    """Namespace."""


class MoEJob(ApiModel):
    """A MoEJob manifest as read from a file (local mode, ``hetmoe plan``)."""

    api_version: Literal["hetmoe.io/v1alpha1"] = "hetmoe.io/v1alpha1"
    """API group and version."""
    kind: Literal["MoEJob"] = "MoEJob"
    """Kind."""
    metadata: ObjectMeta
    """Name and namespace."""
    spec: MoEJobSpec
    """Desired state."""
