"""The plan: the one versioned contract between the operator (planner) and the trainer.

The planner writes it, the operator ships it to every worker in a ConfigMap (or a
file in local mode), and the trainer follows it to the letter. It imports only
pydantic so the trainer image never needs kopf or the Kubernetes client.

Rank identity: a worker knows its pool, node slot and local rank (from its pod) and
looks up its *plan rank* with :meth:`Plan.rank_at`. torchrun's global rank may differ
(rendezvous order is not guaranteed), so the trainer maps plan ranks to process ranks
after ``init_process_group``.
"""

from __future__ import annotations

import re
from typing import Final, Literal

from pydantic import Field, model_validator

from hetmoe_operator.api.base import ApiModel
from hetmoe_operator.api.model import ModelArchitecture
from hetmoe_operator.api.training import TrainingConfig

PLAN_API_VERSION: Final = "hetmoe.io/plan/v1"

Objective = Literal["throughput", "cost", "throughput-under-budget"]

PipelineShape = Literal["loop", "v"]
"""How a pipeline position's chunks are chosen when ``Plan.virtual_stages`` > 1."""


class ParallelDegrees(ApiModel):
    """How the world is factored: world = pp x dp x tp; ep divides dp x tp."""

    pp: int = Field(ge=1)
    """Pipeline stages."""
    dp: int = Field(ge=1)
    """Data-parallel replicas of every stage."""
    ep: int = Field(ge=1)
    """Ranks of one stage that share one copy of the routed experts (an EP group)."""
    tp: int = Field(default=1, ge=1)
    """Tensor-parallel ranks inside a node."""


class StagePlan(ApiModel):
    """One pipeline stage: a contiguous range of global layer ids.

    With ``Plan.virtual_stages`` = v > 1 this is one *virtual* stage (a chunk): pipeline
    position ``r`` holds stages ``r, r + pp, ..., r + (v - 1) pp`` (``loop`` shape), or
    ``r`` and ``2 pp - 1 - r`` (``v`` shape); see :meth:`Plan.stages_at`.
    """

    index: int = Field(ge=0)
    """Stage position, 0 = first (the virtual stage index when interleaving)."""
    layer_start: int = Field(ge=0)
    """First global layer id (inclusive)."""
    layer_end: int = Field(ge=0)
    """Last global layer id (exclusive); may equal layer_start for an embedding-only stage."""
    has_embedding: bool
    """Whether the stage holds the input embedding (the first stage)."""
    has_head: bool
    """Whether the stage holds the final norm and LM head (the last stage)."""
    recompute_activations: bool = False
    """Keep only each layer's input during forward and recompute the rest in backward
    (the planner sets it where 1F1B's in-flight activations would not fit)."""

    @classmethod
    def whole_model(cls, model: ModelArchitecture, *, recompute: bool = False) -> StagePlan:
        """The one stage of an unpipelined plan: every layer, embedding and head."""
        return cls(
            index=0,
            layer_start=0,
            layer_end=model.num_hidden_layers,
            has_embedding=True,
            has_head=True,
            recompute_activations=recompute,
        )

    @property
    def layers(self) -> range:
        """Global layer ids of this stage."""
        return range(self.layer_start, self.layer_end)


class ReplicaPlan(ApiModel):
    """One data-parallel replica's share of the global batch."""

    dp_index: int = Field(ge=0)
    """Replica index."""
    samples_per_step: int = Field(ge=0)
    """Sequences this replica processes per optimizer step (proportional to its speed)."""
    microbatch_size: int = Field(ge=1)
    """Sequences per microbatch."""
    num_microbatches: int = Field(ge=1)
    """Microbatches per step (the same within an EP group so all-to-alls pair up)."""

    @model_validator(mode="after")
    def _batch_adds_up(self) -> ReplicaPlan:
        if self.samples_per_step != self.microbatch_size * self.num_microbatches:
            raise ValueError(
                f"replica {self.dp_index}: samples_per_step {self.samples_per_step} != "
                f"microbatch_size {self.microbatch_size} x num_microbatches {self.num_microbatches}"
            )
        return self


class RankPlan(ApiModel):
    """Everything one worker process needs to know about its place in the job."""

    rank: int = Field(ge=0)
    """Plan rank, 0..world_size-1."""
    pool: str
    """Pool the rank runs in."""
    grade: str
    """Accelerator grade of that pool."""
    node_slot: int = Field(ge=0)
    """Index of the node within the nodes this plan uses from ``pool``."""
    local_rank: int = Field(ge=0)
    """Device index on that node."""
    stage: int = Field(ge=0)
    """Pipeline stage index."""
    dp_index: int = Field(ge=0)
    """Data-parallel replica index."""
    ep_group: int = Field(ge=0)
    """Expert-parallel group within the stage."""
    ep_rank: int = Field(ge=0)
    """Position inside the EP group."""
    experts: list[int] = Field(default_factory=list)
    """Routed expert ids hosted in every MoE layer of the stage (hot experts may appear
    on several ranks of a group: redundant replicas share that expert's tokens)."""


class StepTimeBreakdown(ApiModel):
    """Predicted seconds per optimizer step, by cause."""

    compute: float = Field(ge=0)
    """Forward + backward compute on the critical path."""
    bubble: float = Field(ge=0)
    """Pipeline fill and drain."""
    communication: float = Field(ge=0)
    """Exposed (not overlapped) communication: p2p, all-to-all, gradient sync."""
    imbalance: float = Field(ge=0)
    """Waiting caused by uneven stage or expert load."""
    optimizer: float = Field(ge=0)
    """Optimizer step."""
    total: float = Field(gt=0)
    """Predicted step time."""


class MemoryEstimate(ApiModel):
    """Predicted peak memory of one device class within the plan (one stage on one grade)."""

    pool: str
    """Pool."""
    stage: int = Field(ge=0)
    """Stage."""
    weights_gib: float = Field(ge=0)
    """Parameters resident on the device (including redundant expert slots)."""
    gradients_gib: float = Field(ge=0)
    """Gradients."""
    optimizer_gib: float = Field(ge=0)
    """Optimizer state (after sharding over data parallelism, when enabled)."""
    activations_gib: float = Field(ge=0)
    """Activations in flight at the schedule's peak."""
    total_gib: float = Field(ge=0)
    """Sum of the above plus runtime overhead."""
    capacity_gib: float = Field(gt=0)
    """Device memory."""


class PoolSummary(ApiModel):
    """What the plan does with one pool, for status and humans."""

    pool: str
    """Pool name."""
    grade: str
    """Its grade."""
    nodes: int = Field(ge=0)
    """Nodes used."""
    devices: int = Field(ge=0)
    """Devices used."""
    stages: list[int] = Field(default_factory=list)
    """Stages (partly) served by the pool."""
    layers: str = ""
    """Human-readable layer ranges, e.g. ``0-11,40-47``."""
    experts_per_device: float = Field(default=0, ge=0)
    """Average routed expert slots per device."""
    predicted_tokens_per_s: float = Field(default=0, ge=0)
    """Tokens per second flowing through this pool's replicas."""
    cost_per_hour: float = Field(default=0, ge=0)
    """Price of the devices used."""


class StagePrediction(ApiModel):
    """Predicted time of one pipeline stage on one pool, for the replicas that share
    its pipeline kind and microbatch count (so local mode can show predicted vs
    measured per stage)."""

    stage: int = Field(ge=0)
    """Stage index."""
    pool: str
    """Pool serving the stage for these replicas."""
    grade: str
    """Its grade."""
    replicas: list[int] = Field(default_factory=list)
    """Data-parallel indices this entry describes."""
    microbatches: int = Field(default=1, ge=1)
    """Microbatches each of those replicas runs per step."""
    microbatch_seconds: float = Field(default=0, ge=0)
    """Forward + backward of one microbatch in 1F1B's steady state (compute, expert
    imbalance and exposed communication)."""
    busy_seconds: float = Field(default=0, ge=0)
    """Seconds per step the stage computes: ``microbatches x microbatch_seconds``
    plus its exposed fill/drain transfers."""
    step_seconds: float = Field(default=0, ge=0)
    """Seconds from the start of a step until the stage finishes its last backward
    (before gradient sync), pipeline waits included: what the trainer reports as the
    stage's step time."""


class Prediction(ApiModel):
    """What the cost model expects from the plan, with every input visible."""

    step_time: StepTimeBreakdown
    """Seconds per step, broken down."""
    tokens_per_s: float = Field(gt=0)
    """Predicted training throughput."""
    cost_per_hour: float = Field(ge=0)
    """Price of all devices used."""
    cost_per_1t_tokens: float = Field(ge=0)
    """Cost of training on 10^12 tokens at the predicted speed."""
    ideal_tokens_per_s: float = Field(gt=0)
    """Linear-programming upper bound on the same devices."""
    fraction_of_ideal: float = Field(gt=0)
    """tokens_per_s / ideal_tokens_per_s."""
    memory: list[MemoryEstimate] = Field(default_factory=list)
    """Peak memory per (pool, stage)."""
    assumptions: list[str] = Field(default_factory=list)
    """Inputs of the cost model a reader should know about (efficiencies, bandwidths)."""
    stages: list[StagePrediction] = Field(default_factory=list)
    """Per stage and pool: predicted microbatch and step time (absent in plans written
    before this field existed)."""


class Plan(ApiModel):
    """A complete, self-contained placement of one training job."""

    api_version: Literal["hetmoe.io/plan/v1"] = PLAN_API_VERSION
    """Contract version; a trainer refuses plans of a version it does not know."""
    job: str = "local"
    """Name of the job the plan was made for."""
    objective: Objective = "throughput"
    """What the planner optimised."""
    currency: str = "RMB"
    """Currency of every cost figure."""
    model: ModelArchitecture
    """Architecture to build."""
    training: TrainingConfig
    """Training settings."""
    parallel: ParallelDegrees
    """Parallel degrees."""
    stages: list[StagePlan] = Field(min_length=1)
    """Pipeline stages in order; every layer exactly once (pp x virtual_stages entries)."""
    virtual_stages: int = Field(default=1, ge=1)
    """Stages (layer chunks) per pipeline position: 1 runs 1F1B; v > 1 runs interleaved
    1F1B, position ``r`` holding stages ``r + k pp`` for k < v (smaller bubble, more
    point-to-point transfers). Plans written before this field existed mean 1."""
    pipeline_shape: PipelineShape = "loop"
    """With ``virtual_stages`` > 1, which stages a position holds. ``loop``: position
    ``r`` holds ``r + k pp`` and runs interleaved 1F1B. ``v`` (``virtual_stages`` = 2):
    position ``r`` holds ``r`` and ``2 pp - 1 - r`` and runs the zero-bubble V schedule
    (ZB-V), whose weight-gradient work fills the fill/drain bubble at 1F1B's activation
    memory; position 0 then holds both the embedding and the LM head. Plans written
    before this field existed mean ``loop``."""
    split_backward: bool = False
    """Split each backward into its input-gradient and weight-gradient parts and let the
    weight work fill the fill/drain bubble (zero-bubble schedules). With the ``loop``
    shape this runs ZB1P (torch ``ScheduleInterleavedZeroBubble``; with one stage per
    position that is ZB-H1, at about 1F1B's activation memory). The ``v`` shape always
    splits (ZB-V) whatever this says. Plans written before this field existed mean False."""
    replicas: list[ReplicaPlan] = Field(min_length=1)
    """Data-parallel replicas; their samples add up to the global batch."""
    ranks: list[RankPlan] = Field(min_length=1)
    """One entry per worker process, ordered by plan rank."""
    pools: list[PoolSummary] = Field(default_factory=list)
    """Per-pool summary."""
    prediction: Prediction | None = None
    """Cost-model prediction (absent for hand-written plans)."""

    @model_validator(mode="after")
    def _consistent(self) -> Plan:
        degrees = self.parallel
        world = degrees.pp * degrees.dp * degrees.tp
        if len(self.ranks) != world:
            raise ValueError(f"{len(self.ranks)} ranks but pp x dp x tp = {world}")
        if [r.rank for r in self.ranks] != list(range(world)):
            raise ValueError("ranks must be listed in order 0..world_size-1")
        count = degrees.pp * self.virtual_stages
        if len(self.stages) != count or [s.index for s in self.stages] != list(range(count)):
            raise ValueError(
                f"stages must be listed in order, pp x virtual_stages = {count} of them"
            )
        covered = [layer for s in self.stages for layer in s.layers]
        if covered != list(range(self.model.num_hidden_layers)):
            raise ValueError("stages must cover every layer once, in order")
        if not self.stages[0].has_embedding or not self.stages[-1].has_head:
            raise ValueError("the first stage holds the embedding and the last the LM head")
        if self.virtual_stages > 1 and (
            any(s.has_embedding for s in self.stages[1:])
            or any(s.has_head for s in self.stages[:-1])
        ):
            raise ValueError("only the first stage holds the embedding, only the last the LM head")
        if self.pipeline_shape == "v" and self.virtual_stages != 2:
            raise ValueError(
                f"the v pipeline shape holds 2 stages per position, not {self.virtual_stages}"
            )
        if len(self.replicas) != degrees.dp:
            raise ValueError(f"{len(self.replicas)} replicas but dp = {degrees.dp}")
        batch = sum(r.samples_per_step for r in self.replicas)
        if batch != self.training.global_batch_size:
            raise ValueError(
                f"replica samples add up to {batch}, not the global batch "
                f"{self.training.global_batch_size}"
            )
        if (degrees.dp * degrees.tp) % degrees.ep:
            raise ValueError(f"ep {degrees.ep} must divide dp x tp {degrees.dp * degrees.tp}")
        seats = {(r.pool, r.node_slot, r.local_rank) for r in self.ranks}
        if len(seats) != world:
            raise ValueError("two ranks share the same (pool, node slot, local rank)")
        return self

    @classmethod
    def single_process(
        cls, model: ModelArchitecture, training: TrainingConfig, microbatch_size: int
    ) -> Plan:
        """One worker holding the whole model and every expert: what ``hetmoe profile``
        times and the one-process benchmarks run (no planner, no cluster)."""
        batch = training.global_batch_size
        return cls(
            model=model,
            training=training,
            parallel=ParallelDegrees(pp=1, dp=1, ep=1),
            stages=[StagePlan.whole_model(model)],
            replicas=[
                ReplicaPlan(
                    dp_index=0,
                    samples_per_step=batch,
                    microbatch_size=microbatch_size,
                    num_microbatches=batch // microbatch_size,
                )
            ],
            ranks=[
                RankPlan(
                    rank=0,
                    pool="local",
                    grade="cpu",
                    node_slot=0,
                    local_rank=0,
                    stage=0,
                    dp_index=0,
                    ep_group=0,
                    ep_rank=0,
                    experts=list(range(model.num_experts)),
                )
            ],
        )

    @property
    def world_size(self) -> int:
        """Number of worker processes."""
        return len(self.ranks)

    @property
    def splits_backward(self) -> bool:
        """Whether the pipeline runs a zero-bubble schedule (backward split in two)."""
        return self.parallel.pp > 1 and (self.split_backward or self.pipeline_shape == "v")

    @property
    def schedule_name(self) -> str:
        """The pipeline schedule this plan runs, named for people."""
        if self.parallel.pp == 1:
            return "no pipeline"
        if self.pipeline_shape == "v":
            return "zero-bubble V"
        if self.split_backward:
            return "ZB-H1" if self.virtual_stages == 1 else "ZB1P"
        return "1F1B" if self.virtual_stages == 1 else "interleaved 1F1B"

    def stages_at(self, position: int) -> list[StagePlan]:
        """The stages (chunks) pipeline position ``position`` holds, in schedule order."""
        if self.pipeline_shape == "v":
            return [self.stages[position], self.stages[2 * self.parallel.pp - 1 - position]]
        return self.stages[position :: self.parallel.pp]

    def position_of(self, stage_index: int) -> int:
        """The pipeline position that holds stage (chunk) ``stage_index``."""
        pp = self.parallel.pp
        if self.pipeline_shape == "v" and stage_index >= pp:
            return 2 * pp - 1 - stage_index
        return stage_index % pp

    def rank_at(self, pool: str, node_slot: int, local_rank: int) -> RankPlan:
        """The rank seated at device ``local_rank`` of node ``node_slot`` of ``pool``."""
        for rank in self.ranks:
            if (rank.pool, rank.node_slot, rank.local_rank) == (pool, node_slot, local_rank):
                return rank
        raise KeyError(f"no rank at pool={pool} node_slot={node_slot} local_rank={local_rank}")

    def nodes(self) -> list[tuple[str, int, int]]:
        """``(pool, node_slot, processes on that node)`` for every node the plan uses."""
        counts: dict[tuple[str, int], int] = {}
        for rank in self.ranks:
            key = (rank.pool, rank.node_slot)
            counts[key] = counts.get(key, 0) + 1
        return [(pool, slot, n) for (pool, slot), n in counts.items()]

    def to_json(self) -> str:
        """Serialise for a ConfigMap or a file."""
        return self.model_dump_json(by_alias=True, exclude_none=True, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        """Parse a plan; a plan of another contract version is rejected by name."""
        return cls.model_validate_json(text)


class WorkerExit:
    """Exit codes the trainer uses to tell the operator what went wrong.

    Codes below 64 are ordinary failures (restart from checkpoint). These are chosen
    outside the range shells and signals use (126-165) so they cannot be confused.
    """

    OK = 0
    CONFIG_ERROR = 78
    """The plan or settings are invalid: restarting cannot help (EX_CONFIG)."""
    REPLACE_NODE = 86
    """A rank's device is persistently slow or faulty: re-plan without its node.

    The verdict is collective, so every rank exits with it; the one-line reason each
    writes names the node to replace (:func:`replace_node_request`), so whichever
    worker the operator sees first points at the same node. Without that mark, the
    node of the worker that exited is meant."""
    ROLLBACK_EXHAUSTED = 87
    """Repeated anomalies persisted across rollbacks: needs a human."""
    HUNG = 89
    """No step finished within the hang timeout (a collective or a kernel never
    returned): restart from the latest checkpoint (``hetmoe_trainer.watchdog``)."""
    STOPPED = 88
    """Asked to stop (SIGTERM or SIGINT): finished its step, saved a checkpoint, exited.

    The job did nothing wrong (a drain, an eviction, a preemption), so a restart
    resumes from that checkpoint without using up a restart. A torchrun agent that is
    itself signalled exits with the shell's 128 + signal (143 for SIGTERM) instead."""


_REPLACE_NODE_MARK = re.compile(r"\(replace node: pool=([A-Za-z0-9_.-]+) slot=(\d+)\)")


def replace_node_request(pool: str, node_slot: int) -> str:
    """The mark a ``WorkerExit.REPLACE_NODE`` reason carries to name the node to replace
    by its place in the plan (the trainer does not know node names)."""
    return f"(replace node: pool={pool} slot={node_slot})"


def parse_replace_node_request(message: str) -> tuple[str, int] | None:
    """The (pool, node slot) a reason's :func:`replace_node_request` mark names, if any."""
    found = _REPLACE_NODE_MARK.search(message)
    return (found.group(1), int(found.group(2))) if found else None


CHECKPOINT_DIR_ENV: Final = "HETMOE_CHECKPOINT_DIR"
"""The checkpoint directory as every worker pod's environment names it (the launch
wrapper records in-place restarts there)."""

TERMINATION_LOG_ENV: Final = "HETMOE_TERMINATION_LOG"
"""Where a worker writes why it ended when not at Kubernetes' ``/dev/termination-log``
(``hetmoe_trainer.termination``; local mode sets it per pod)."""

WAITING_FOR_PEERS_MARK: Final = "(waiting for other ranks)"
"""Carried by the reason of a worker that ended waiting for others: a hang inside a
collective, or a collective or transfer broken by a peer that died. Another worker is
the likelier culprit, so the operator names one without the mark when it sees one
(``reconcile.failures``)."""
