"""Process groups from the plan: who talks to whom, for which purpose.

torchrun's global rank is whatever the rendezvous produced, so ranks are first
re-identified by their *plan rank* (from the pod's pool, node slot and local rank)
and every group below is built from plan positions mapped to process ranks:

- one ``DeviceMesh`` of shape ``(pp, dp)``: entry ``[s][j]`` is the process holding
  stage ``s`` of replica ``j``; its ``dp`` dimension gives the stage's dense
  gradient-sync group, its ``pp`` dimension the replica's pipeline group;
- one expert-parallel group per (stage, ``ep_group``), members in ``ep_rank`` order;
- one *expert-replica* group per distinct set of ranks of a stage hosting the same
  routed expert (the ranks whose copies of that expert's gradient must be summed);
  a set equal to the stage's dp group reuses it;
- a separate gloo group for checkpoint collectives, so background (async) saves
  never share a communicator with training collectives.

``new_group`` is collective over the whole world, so every rank creates every group
in the same deterministic order, including groups it is not part of.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh

from hetmoe_operator.plan import Plan, RankPlan, ReplicaPlan
from hetmoe_trainer.model import ExpertParallel


class PlanError(ValueError):
    """The plan or the launch environment cannot work: restarting will not help."""


_LOST_PEER_SIGNS = (
    "Connection closed by peer",  # gloo, the peer's process is gone
    "Connection reset by peer",
    "remote process exited",  # NCCL
    "communicator was aborted",
)


def lost_a_peer(error: BaseException) -> bool:
    """Whether ``error`` is how a collective or a point-to-point transfer fails when
    another rank died (gloo's and NCCL's wording), rather than this rank's own fault."""
    return isinstance(error, dist.DistNetworkError) or any(
        sign in str(error) for sign in _LOST_PEER_SIGNS
    )


@dataclass(frozen=True)
class DeviceChoice:
    """Where this worker computes and which backend its collectives use."""

    device: torch.device
    backend: str
    compute_dtype: torch.dtype


def pick_device(local_rank: int, dtype: str = "auto") -> DeviceChoice:
    """CUDA device ``local_rank`` with NCCL and bf16 compute if present, else CPU, gloo, fp32.

    Parameters and optimizer state stay fp32 either way (bf16 is used through
    autocast), so ``dtype`` only selects the compute precision.
    """
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
        return DeviceChoice(device, "nccl", names.get(dtype, torch.bfloat16))
    return DeviceChoice(torch.device("cpu"), "gloo", names.get(dtype, torch.float32))


def plan_rank_from_env(plan: Plan, env: Mapping[str, str]) -> int:
    """My plan rank: the seat (``HETMOE_POOL``, ``HETMOE_NODE_SLOT``, ``LOCAL_RANK``).

    Without ``HETMOE_POOL`` (a local single-node run) the plan rank is torchrun's ``RANK``.
    """
    if "HETMOE_POOL" not in env:
        rank = int(env.get("RANK", "0"))
        if rank >= plan.world_size:
            raise PlanError(f"RANK {rank} is outside the plan's {plan.world_size} ranks")
        return rank
    pool, slot, local = (
        env["HETMOE_POOL"],
        env.get("HETMOE_NODE_SLOT", "0"),
        env.get("LOCAL_RANK", "0"),
    )
    try:
        return plan.rank_at(pool, int(slot), int(local)).rank
    except (KeyError, ValueError) as error:
        raise PlanError(f"this worker has no seat in the plan: {error}") from None


def validate_plan(plan: Plan) -> None:
    """Checks the runtime needs beyond the plan's own validation."""
    degrees = plan.parallel
    if degrees.tp != 1:
        raise PlanError(f"tensor parallelism (tp={degrees.tp}) is not supported by this trainer")
    seats = {(r.stage, r.dp_index) for r in plan.ranks}
    if len(seats) != plan.world_size or any(s >= degrees.pp or j >= degrees.dp for s, j in seats):
        raise PlanError("every (stage, dp_index) pair must be held by exactly one rank")
    if sorted(r.dp_index for r in plan.replicas) != list(range(degrees.dp)):
        raise PlanError("replicas must be numbered 0..dp-1")
    replicas = {r.dp_index: r for r in plan.replicas}
    schedule = plan.schedule_name
    for replica in plan.replicas:
        if degrees.pp > 1 and replica.num_microbatches < degrees.pp:
            raise PlanError(
                f"replica {replica.dp_index}: {schedule} needs at least one microbatch per "
                f"stage (pp {degrees.pp}), got {replica.num_microbatches}; use smaller "
                "microbatches or a shallower pipeline"
            )
    # ZB-V accepts any count (it plans max(2 pp - 1, n) microbatches and drops the
    # missing ones); ZB1P runs max(1, n // pp) equal rounds; interleaved 1F1B runs
    # rounds of pp.
    for replica in plan.replicas if degrees.pp > 1 else ():
        count = replica.num_microbatches
        if plan.splits_backward and plan.pipeline_shape == "loop":
            rounds = max(1, count // degrees.pp)
            if count % rounds:
                raise PlanError(
                    f"replica {replica.dp_index}: {schedule} runs num_microbatches in "
                    f"{rounds} equal rounds (num_microbatches // pp), so {count} does not "
                    "divide; use a multiple of pp"
                )
        elif plan.virtual_stages > 1 and plan.pipeline_shape == "loop" and count % degrees.pp:
            raise PlanError(
                f"replica {replica.dp_index}: interleaved 1F1B (virtual_stages="
                f"{plan.virtual_stages}) needs num_microbatches to be a multiple of "
                f"pp {degrees.pp}, got {count}"
            )
    for stage in range(degrees.pp):
        groups: dict[int, list[RankPlan]] = {}
        for rank in plan.ranks:
            if rank.stage == stage:
                groups.setdefault(rank.ep_group, []).append(rank)
        for group_id, members in groups.items():
            if sorted(m.ep_rank for m in members) != list(range(len(members))):
                raise PlanError(f"stage {stage} EP group {group_id}: ep_rank must be 0..n-1")
            if len({replicas[m.dp_index].num_microbatches for m in members}) != 1:
                raise PlanError(
                    f"stage {stage} EP group {group_id}: replicas differ in num_microbatches, "
                    "so their all-to-alls cannot pair up"
                )
            if any(
                chunk.layer_end > plan.model.first_k_dense_replace
                for chunk in plan.stages_at(stage)
            ):
                hosted = {e for m in members for e in m.experts}
                missing = set(range(plan.model.num_experts)) - hosted
                if missing:
                    raise PlanError(
                        f"stage {stage} EP group {group_id} hosts no copy of "
                        f"experts {sorted(missing)}"
                    )


@dataclass
class ParallelContext:
    """This worker's place in the job and the process groups it uses."""

    plan: Plan
    me: RankPlan
    device: DeviceChoice
    process_of: list[int]
    """Plan rank -> process rank."""
    mesh: DeviceMesh
    dp_group: dist.ProcessGroup
    pp_group: dist.ProcessGroup
    expert_parallel: ExpertParallel
    expert_groups: dict[tuple[int, ...], dist.ProcessGroup | None] = field(default_factory=dict)
    """Process ranks holding an expert of my stage (including me) -> their group."""
    expert_holders: dict[int, tuple[int, ...]] = field(default_factory=dict)
    """Expert id -> process ranks of my stage hosting it (only experts I host)."""
    checkpoint_group: dist.ProcessGroup | None = None

    @property
    def replica(self) -> ReplicaPlan:
        """My data-parallel replica's batch plan."""
        return next(r for r in self.plan.replicas if r.dp_index == self.me.dp_index)

    @property
    def rank(self) -> int:
        """My process rank."""
        return self.process_of[self.me.rank]

    @property
    def world_size(self) -> int:
        """Number of processes."""
        return len(self.process_of)

    def stage_processes(self, stage: int) -> list[int]:
        """Process ranks of ``stage`` in dp_index order."""
        ranks = sorted((r for r in self.plan.ranks if r.stage == stage), key=lambda r: r.dp_index)
        return [self.process_of[r.rank] for r in ranks]

    @property
    def dense_holders(self) -> tuple[int, ...]:
        """Process ranks holding a copy of my stage's dense parameters."""
        return tuple(sorted(self.stage_processes(self.me.stage)))


def _gather_plan_ranks(plan_rank: int) -> list[int]:
    ranks: list[int | None] = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, plan_rank)
    if sorted(r for r in ranks if r is not None) != list(range(len(ranks))):
        raise PlanError(
            f"workers claim plan ranks {ranks}: two workers share a seat or one is missing"
        )
    process_of = [0] * len(ranks)
    for process, rank in enumerate(ranks):
        assert rank is not None
        process_of[rank] = process
    return process_of


def build_context(plan: Plan, plan_rank: int, device: DeviceChoice) -> ParallelContext:
    """Create every process group of the plan; the default group must exist already."""
    if dist.get_world_size() != plan.world_size:
        raise PlanError(
            f"{dist.get_world_size()} processes started for a plan of {plan.world_size}"
        )
    process_of = _gather_plan_ranks(plan_rank)
    me = plan.ranks[plan_rank]
    degrees = plan.parallel
    grid = [[0] * degrees.dp for _ in range(degrees.pp)]
    for rank in plan.ranks:
        grid[rank.stage][rank.dp_index] = process_of[rank.rank]
    # Group ranks follow the mesh (pp group rank = pipeline position), not process
    # ranks: torchrun's c10d rendezvous numbers processes in arrival order, and the
    # interleaved schedule places virtual stage s on pp-group rank s % pp (ZB-V on
    # rank s or 2 pp - 1 - s).
    mesh = DeviceMesh(
        device.device.type,
        torch.tensor(grid),
        mesh_dim_names=("pp", "dp"),
        preserve_rank_order=True,
    )
    dp_group, pp_group = mesh.get_group("dp"), mesh.get_group("pp")

    expert_parallel: ExpertParallel | None = None
    for stage in range(degrees.pp):
        by_group: dict[int, list[RankPlan]] = {}
        for rank in plan.ranks:
            if rank.stage == stage:
                by_group.setdefault(rank.ep_group, []).append(rank)
        for group_id in sorted(by_group):
            members = sorted(by_group[group_id], key=lambda r: r.ep_rank)
            processes = [process_of[m.rank] for m in members]
            group = dist.new_group(processes) if len(members) > 1 else None
            if me in members:
                ordered = _member_order(members, processes, group)
                expert_parallel = ExpertParallel(
                    group, [m.experts for m in ordered], ordered.index(me)
                )
    assert expert_parallel is not None

    expert_groups: dict[tuple[int, ...], dist.ProcessGroup | None] = {}
    expert_holders: dict[int, tuple[int, ...]] = {}
    for stage in range(degrees.pp):
        holder_sets = _holder_sets(plan, stage, process_of)
        for holders in sorted(set(holder_sets.values())):
            stage_dense = tuple(sorted(process_of[r.rank] for r in plan.ranks if r.stage == stage))
            if len(holders) == 1:
                group = None
            elif holders == stage_dense:
                group = dp_group if stage == me.stage else None
            else:
                group = dist.new_group(list(holders))
            if stage == me.stage and process_of[me.rank] in holders:
                expert_groups[holders] = group
        if stage == me.stage:
            expert_holders = {e: h for e, h in holder_sets.items() if process_of[me.rank] in h}
    checkpoint_group = dist.new_group(backend="gloo")
    return ParallelContext(
        plan=plan,
        me=me,
        device=device,
        process_of=process_of,
        mesh=mesh,
        dp_group=dp_group,
        pp_group=pp_group,
        expert_parallel=expert_parallel,
        expert_groups=expert_groups,
        expert_holders=expert_holders,
        checkpoint_group=checkpoint_group,
    )


def _member_order(
    members: list[RankPlan], processes: list[int], group: dist.ProcessGroup | None
) -> list[RankPlan]:
    """EP members in the order of their rank inside ``group`` (new_group sorts by process rank).

    The dispatcher addresses members by group rank, so ``rank_experts`` must follow it.
    """
    if group is None:
        return members
    return [m for _, m in sorted(zip(processes, members, strict=True), key=lambda x: x[0])]


def _holder_sets(plan: Plan, stage: int, process_of: list[int]) -> dict[int, tuple[int, ...]]:
    """Expert id -> sorted process ranks of ``stage`` hosting it."""
    holders: dict[int, list[int]] = {}
    for rank in plan.ranks:
        if rank.stage == stage:
            for expert in set(rank.experts):
                holders.setdefault(expert, []).append(process_of[rank.rank])
    return {e: tuple(sorted(p)) for e, p in holders.items()}


def init_default_group(backend: str) -> None:
    """Join torchrun's rendezvous (env://); a no-op when a group already exists (tests)."""
    if dist.is_initialized():
        return
    dist.init_process_group(backend=backend)
