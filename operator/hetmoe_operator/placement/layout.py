"""A candidate layout and its predicted step time, memory and cost.

The planner's search, the baselines and the benchmark's exhaustive search all score
layouts with :func:`evaluate`, so they can only differ in *which* layouts they try.

A layout is a list of EP groups of ``ep`` data-parallel replicas each; a group's
stage ``s`` runs on ``ep`` devices of pool ``groups[g][s]`` (so an EP group never
leaves a pool). Within a pool, each group's devices are seated contiguously, stage
after stage, ``ep`` devices per stage block.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from hetmoe_operator.api.catalog import DeviceGrade
from hetmoe_operator.api.cluster import ClusterDescription, NodePool
from hetmoe_operator.api.model import ModelArchitecture
from hetmoe_operator.api.training import TrainingConfig
from hetmoe_operator.placement.cost_model import (
    Action,
    Assumptions,
    ChunkTimes,
    GradeProfile,
    loop_stages,
    simulate_pipeline,
    step_overhead_seconds,
    v_stages,
    zb1p_actions,
    zbv_actions,
)
from hetmoe_operator.placement.experts import ExpertPlacement, balanced_placement
from hetmoe_operator.placement.memory import (
    MemoryModel,
    StageMemory,
    StageShape,
    interleaved_peaks,
    split_chunk,
    zb1p_peaks,
    zbv_peaks,
)
from hetmoe_operator.plan import PipelineShape

ZBV_SIMULATED_ROUNDS = 4
"""Zero-bubble (ZB-V, ZB1P) step times simulate at most this many x pp microbatches and
extrapolate at the slowest position's per-microbatch time (the unit tests bound the
error, < 1%, pessimistic)."""

REDUNDANT_FRACTION = 0.125
"""At most this fraction of extra expert slots per EP group (EPLB's published setting)."""


@dataclass(frozen=True)
class PoolInfo:
    """A usable pool with its grade and per-grade speed profile."""

    pool: NodePool
    grade: DeviceGrade
    profile: GradeProfile
    usable_bytes: float


class Problem:
    """Everything fixed for one planning request, with caches for repeated queries."""

    def __init__(
        self,
        model: ModelArchitecture,
        training: TrainingConfig,
        cluster: ClusterDescription,
        loads: Sequence[float],
        assumptions: Assumptions | None = None,
    ) -> None:
        self.model = model
        self.training = training
        self.cluster = cluster
        self.assumptions = assumptions or Assumptions()
        self.memory = MemoryModel(model, training.sequence_length, self.assumptions)
        total = sum(loads)
        self.loads = tuple(load / total for load in loads)
        profiles: dict[str, GradeProfile] = {}
        self.pools: dict[str, PoolInfo] = {}
        for pool in cluster.pools:
            if pool.devices == 0:
                continue
            grade = cluster.catalog.grade(pool.grade)
            if grade.name not in profiles:
                profiles[grade.name] = GradeProfile(
                    model, grade, training.sequence_length, self.assumptions
                )
            self.pools[pool.name] = PoolInfo(
                pool, grade, profiles[grade.name], self.memory.usable_bytes(grade)
            )
        self._placements: dict[tuple[int, int], ExpertPlacement] = {}
        self._stage_vectors: dict[tuple, _StageVector] = {}
        self._peaks: dict[tuple[int, int, str, bool, int, int], tuple[tuple[int, ...], ...]]
        self._peaks = {}
        self._chunks: dict[
            tuple[tuple[int, ...], int, str], tuple[tuple[tuple[int, int], ...], ...]
        ]
        self._chunks = {}
        self._actions: dict[tuple[int, int, str, int], list[tuple[Action, ...]]] = {}

    @property
    def tokens_per_step(self) -> int:
        """Tokens of one optimizer step."""
        return self.training.tokens_per_step

    def position_chunks(self, layout: Layout) -> tuple[tuple[tuple[int, int], ...], ...]:
        """Per pipeline position: the layer ranges of its chunks (cached)."""
        key = (layout.bounds, layout.virtual, layout.shape)
        if key not in self._chunks:
            chunks = layout.chunks()
            pp = layout.pp
            if layout.shape == "v":
                self._chunks[key] = tuple((chunks[r], chunks[2 * pp - 1 - r]) for r in range(pp))
            else:
                self._chunks[key] = tuple(chunks[r::pp] for r in range(pp))
        return self._chunks[key]

    def peaks(
        self,
        pp: int,
        virtual: int,
        position: int,
        microbatches: int,
        shape: str = "loop",
        split_backward: bool = False,
    ) -> tuple[tuple[int, ...], ...]:
        """:func:`~.memory.interleaved_peaks` (or :func:`~.memory.zbv_peaks` for the
        ``v`` shape, :func:`~.memory.zb1p_peaks` for a split loop), cached."""
        split = split_backward or shape == "v"
        if shape == "v":  # from 2 pp microbatches on the peaks repeat
            microbatches = min(microbatches, 2 * pp)
        key = (pp, virtual, shape, split, position, microbatches)
        if key not in self._peaks:
            if shape == "v":
                self._peaks[key] = zbv_peaks(pp, position, microbatches)
            elif split:
                self._peaks[key] = zb1p_peaks(pp, virtual, position, microbatches)
            else:
                self._peaks[key] = interleaved_peaks(pp, virtual, position, microbatches)
        return self._peaks[key]

    def actions(
        self, pp: int, virtual: int, shape: str, microbatches: int
    ) -> list[tuple[Action, ...]]:
        """Every position's action order under a split backward: :func:`~.cost_model.
        zbv_actions` for the ``v`` shape, :func:`~.cost_model.zb1p_actions` for a loop
        (cached)."""
        key = (pp, virtual, shape, microbatches)
        if key not in self._actions:
            if shape == "v":
                orders = [zbv_actions(pp, r, microbatches) for r in range(pp)]
            else:
                orders = [zb1p_actions(pp, virtual, r, microbatches) for r in range(pp)]
            self._actions[key] = orders
        return self._actions[key]

    def placement(self, ep: int, redundant: bool) -> ExpertPlacement:
        """Expert placement for an EP group of ``ep`` equal devices."""
        key = (ep, int(redundant))
        if key not in self._placements:
            extra = int(REDUNDANT_FRACTION * self.model.num_experts) if redundant else 0
            self._placements[key] = balanced_placement(self.loads, [1.0] * ep, extra)
        return self._placements[key]


def chunk_ranges(
    bounds: Sequence[int], virtual: int, shape: str = "loop"
) -> tuple[tuple[int, int], ...]:
    """Layer range of each of the ``pp x virtual`` stages, in schedule order.

    ``bounds`` give each pipeline position's layer count (position r holds
    ``bounds[r + 1] - bounds[r]`` layers, the uneven split balancing grades); that
    share is cut into ``virtual`` near-equal chunks, the larger first. Virtual stage
    ``s`` is chunk ``s // pp`` of position ``s % pp`` (``loop`` shape) or, in the ``v``
    shape (two chunks), chunk 0 of position ``s`` for ``s < pp`` and chunk 1 of
    position ``2 pp - 1 - s`` after that; layers are numbered in stage order, so with
    ``virtual`` = 1 the ranges are ``bounds`` themselves.
    """
    pp = len(bounds) - 1
    sizes = [
        [end - start for start, end in split_chunk(bounds[r], bounds[r + 1], virtual)]
        for r in range(pp)
    ]
    ranges = []
    cursor = 0
    for stage in range(pp * virtual):
        if shape == "v":
            size = sizes[stage][0] if stage < pp else sizes[2 * pp - 1 - stage][1]
        else:
            size = sizes[stage % pp][stage // pp]
        ranges.append((cursor, cursor + size))
        cursor += size
    return tuple(ranges)


@dataclass(frozen=True)
class Layout:
    """One way to lay the job out (see the module docstring)."""

    pp: int
    ep: int
    bounds: tuple[int, ...]
    """Stage boundaries: stage s holds layers [bounds[s], bounds[s+1])."""
    groups: tuple[tuple[str, ...], ...]
    """Per EP group: the pool serving each stage."""
    microbatch_size: int
    """Sequences per microbatch, the same for every replica."""
    microbatches: tuple[int, ...]
    """Microbatches per step, per EP group (its replicas' share of the batch)."""
    recompute: tuple[bool, ...]
    """Per stage: recompute activations in backward (store only layer inputs)."""
    redundant_experts: bool
    """Whether EP groups carry redundant replicas of hot experts."""
    virtual: int = 1
    """Chunks (virtual stages) per pipeline position: 1 runs 1F1B, v > 1 interleaved
    1F1B, each position's layer share cut into v chunks (see :func:`chunk_ranges`);
    ``bounds`` and ``recompute`` stay per position."""
    shape: PipelineShape = "loop"
    """``v``: two chunks per position in V order, run as ZB-V (``virtual`` = 2); see
    :func:`chunk_ranges`."""
    split_backward: bool = False
    """Loop shape: split each backward into input and weight gradients and run ZB1P
    (torch ``ScheduleInterleavedZeroBubble``; ZB-H1 with ``virtual`` = 1). The ``v``
    shape always splits."""

    @property
    def zero_bubble(self) -> bool:
        """Whether the schedule splits the backward (ZB-V or ZB1P): step time simulated,
        deferred weight gradients in memory."""
        return self.shape == "v" or self.split_backward

    @property
    def schedule_name(self) -> str:
        """Human-readable schedule, as torch names it."""
        if self.shape == "v":
            return "ZB-V"
        if self.split_backward:
            return "ZB-H1" if self.virtual == 1 else f"ZB1P v={self.virtual}"
        if self.virtual > 1:
            return f"interleaved 1F1B v={self.virtual}"
        return "1F1B"

    @property
    def head_position(self) -> int:
        """The pipeline position holding the final norm and LM head."""
        return 0 if self.shape == "v" else self.pp - 1

    @property
    def dp(self) -> int:
        """Data-parallel replicas."""
        return len(self.groups) * self.ep

    def chunks(self) -> tuple[tuple[int, int], ...]:
        """Layer range of every (virtual) stage, in schedule order."""
        return chunk_ranges(self.bounds, self.virtual, self.shape)

    def devices_per_pool(self) -> dict[str, int]:
        """Devices the layout takes from each pool."""
        used: dict[str, int] = {}
        for template in self.groups:
            for pool in template:
                used[pool] = used.get(pool, 0) + self.ep
        return used


@dataclass(frozen=True)
class MemoryCheck:
    """Peak memory of the devices of one stage in one pool."""

    pool: str
    stage: int
    usage: StageMemory
    usable_bytes: float
    capacity_bytes: float


@dataclass(frozen=True)
class Breakdown:
    """Seconds per step by cause, as in ``StepTimeBreakdown``."""

    compute: float
    bubble: float
    communication: float
    imbalance: float
    optimizer: float

    @property
    def total(self) -> float:
        """Predicted step time."""
        return self.compute + self.bubble + self.communication + self.imbalance + self.optimizer


@dataclass(frozen=True)
class Evaluation:
    """What the cost model predicts for one layout."""

    step: Breakdown
    tokens_per_s: float
    cost_per_hour: float
    memory: tuple[MemoryCheck, ...]

    @property
    def fits(self) -> bool:
        """Whether every device stays within its usable memory."""
        return all(m.usage.total <= m.usable_bytes for m in self.memory)

    @property
    def worst_memory_ratio(self) -> float:
        """Largest usage / usable over all devices (> 1 means out of memory)."""
        return max(m.usage.total / m.usable_bytes for m in self.memory)

    @property
    def cost_per_1t_tokens(self) -> float:
        """Price of 10^12 tokens at the predicted speed."""
        return self.cost_per_hour * 1e12 / self.tokens_per_s / 3600.0


@dataclass(frozen=True)
class _StageVector:
    """Per-token seconds of one stage of one template, split by cause."""

    compute: float
    expert_excess: float
    fixed: float
    """Per-microbatch compute overhead independent of tokens (measured profiles only)."""
    communication: float
    """Exposed all-to-all (after hiding behind shared-expert compute, when overlapped)."""
    latency: float
    """Fixed all-to-all latency per microbatch."""
    p2p: float
    """One stage-to-stage transfer of activations and their gradients, per token."""
    p2p_latency: float
    """Fixed latency of that transfer per microbatch."""
    hops: int
    """Transfers to the next position per microbatch: 1 under 1F1B (0 on the last
    stage); v under interleaving (v - 1 from the last position back to the first)."""
    virtual: int
    """Chunks per position (1 under 1F1B)."""
    backward_share: float
    """Fraction of compute that is backward (recomputation counts as backward)."""

    def work(self, tokens: int) -> float:
        """Compute and exposed all-to-all of one microbatch (all chunks)."""
        return (
            tokens * (self.compute + self.expert_excess + self.communication)
            + self.fixed
            + self.latency
        )

    def transfer(self, tokens: int) -> float:
        """Seconds of one stage-to-stage transfer (activation and its gradient)."""
        return tokens * self.p2p + self.p2p_latency

    def steady(self, tokens: int, overlap: bool) -> float:
        """Seconds per microbatch in (interleaved) 1F1B's steady state."""
        work = self.work(tokens)
        transfer = self.hops * self.transfer(tokens)
        return max(work, transfer) if overlap else work + transfer

    def fill(self, tokens: int) -> float:
        """This position's share of fill and drain: one chunk's work and one hop to the
        next position (exposed), none on the last position."""
        hop = self.transfer(tokens) if self.hops >= self.virtual else 0.0
        return self.work(tokens) / self.virtual + hop

    def last_backward(self, tokens: int) -> float:
        """The last microbatch's backward on this position's first chunk (drain)."""
        backward = (tokens * (self.compute + self.expert_excess) + self.fixed) * self.backward_share
        return backward / self.virtual


def _spans_intra_node(layout: Layout, problem: Problem) -> dict[str, bool]:
    """Per pool: whether every group's stage blocks share one node (p2p stays intra-node)."""
    spans: dict[str, set[int]] = {}
    for template in layout.groups:
        counts: dict[str, int] = {}
        for pool in template:
            counts[pool] = counts.get(pool, 0) + layout.ep
        for pool, span in counts.items():
            spans.setdefault(pool, set()).add(span)
    result = {}
    for pool, sizes in spans.items():
        per_node = problem.pools[pool].pool.devices_per_node
        span = next(iter(sizes))
        result[pool] = len(sizes) == 1 and span <= per_node and per_node % span == 0
    return result


def _stage_vector(
    problem: Problem,
    layout: Layout,
    template: tuple[str, ...],
    stage: int,
    p2p_intra: dict[str, bool],
) -> _StageVector:
    recompute = layout.recompute[stage]
    pp = layout.pp
    v_shape = layout.shape == "v"
    # The neighbour it sends to (in the v shape: the next position; the last position
    # sends only back to the one before it).
    if v_shape:
        nxt = template[stage + 1] if stage + 1 < pp else template[max(0, stage - 1)]
    else:
        nxt = template[(stage + 1) % pp]
    key = (
        template,
        stage,
        layout.bounds,
        layout.virtual,
        layout.shape,
        layout.ep,
        recompute,
        layout.redundant_experts,
        p2p_intra.get(template[stage], False),
        p2p_intra.get(nxt, False),
    )
    cached = problem._stage_vectors.get(key)
    if cached is not None:
        return cached
    model = problem.model
    a = problem.assumptions
    info = problem.pools[template[stage]]
    profile = info.profile
    chunks = problem.position_chunks(layout)[stage]
    dense = expert = fixed = 0.0
    moe_layers = 0
    for start, end in chunks:
        d, e = profile.forward_seconds(start, end)
        dense += d
        expert += e
        fixed += profile.fixed_prefix[end] - profile.fixed_prefix[start]
        moe_layers += problem.memory.moe_layers[end] - problem.memory.moe_layers[start]
    passes = profile.passes + (1.0 if recompute else 0.0)
    imbalance = problem.placement(layout.ep, layout.redundant_experts).imbalance
    compute = passes * (dense + expert)
    fixed *= passes / profile.passes
    if stage == layout.head_position:
        compute += profile.head_seconds
        fixed += profile.head_fixed_seconds
    expert_excess = passes * expert * (imbalance - 1.0)
    # Per MoE layer and microbatch: dispatch and combine forward and backward carry the
    # tokens (again forward when recomputing); a count exchange before each forward
    # dispatch costs a collective's latency but no bandwidth worth charging.
    exchanges = moe_layers * (6 if recompute else 4)
    count_exchanges = moe_layers * (2 if recompute else 1)
    communication = 0.0
    latency = 0.0
    if layout.ep > 1 and exchanges:
        per_node = info.pool.devices_per_node
        intra = layout.ep <= per_node and per_node % layout.ep == 0
        gbps = info.grade.intra_node_gbps if intra else info.grade.inter_node_gbps
        payload = model.num_experts_per_tok * model.hidden_size * a.activation_bytes
        communication += exchanges * payload * (layout.ep - 1) / layout.ep / (gbps * 1e9)
        latency += (exchanges + count_exchanges) * a.collective_latency_s
        if a.overlap_communication:
            # Each pass's exchanges hide behind that pass's shared-expert compute.
            hidden = passes * moe_layers * profile.shared_forward_seconds
            communication = max(0.0, communication - hidden)
    # Each chunk but the very last sends its output on (and gets its gradient back):
    # to the next position, or from the last position back to the first.
    hops = layout.virtual if stage + 1 < pp else layout.virtual - 1
    if v_shape:  # one send each way, none from the last chunk or across the V's tip
        hops = int(stage + 1 < pp) + int(stage > 0)
    p2p = 0.0
    p2p_latency = 0.0
    if pp > 1 and hops:
        if nxt != template[stage]:
            gbps = problem.cluster.catalog.cross_pool_gbps
        elif p2p_intra.get(nxt, False):
            gbps = info.grade.intra_node_gbps
        else:
            gbps = info.grade.inter_node_gbps
        p2p = 2 * model.hidden_size * a.activation_bytes / (gbps * 1e9)
        p2p_latency = 2 * a.p2p_latency_s
    backward_share = (passes - 1.0) / passes
    vector = _StageVector(
        compute,
        expert_excess,
        fixed,
        communication,
        latency,
        p2p,
        p2p_latency,
        hops,
        layout.virtual,
        backward_share,
    )
    problem._stage_vectors[key] = vector
    return vector


def _split_chunk_times(
    problem: Problem,
    layout: Layout,
    template: tuple[str, ...],
    vectors: list[_StageVector],
    tokens: int,
) -> tuple[list[tuple[ChunkTimes, ...]], list[tuple[int, int]], list[float]]:
    """Per position: F, B (input gradient) and W (weight gradient) seconds of one
    microbatch on each of its chunks; ``(position, chunk)`` of every stage; and the
    one-way transfer between consecutive stages (0 on one position).

    A position's work (:meth:`_StageVector.work`) is shared between its chunks by
    forward time (the LM head's on the last stage's chunk). Within a chunk the
    forward is ``1 / passes`` of it; the weight gradient is ``backward_factor / 2``
    forwards of everything but the attention core (a weighted matmul's backward is one
    matmul for its input and one for its weight; the attention core has no weights);
    the rest, with recomputation's extra forward, is the input gradient. Exposed
    all-to-all splits between F and B by exchanges (W has none). Without overlap a
    chunk's sends are charged to the pass that sends.
    """
    pp = layout.pp
    overlap = problem.assumptions.overlap_communication
    stages = v_stages(pp) if layout.shape == "v" else loop_stages(pp, layout.virtual)
    last = len(stages) - 1
    links: list[float] = []
    for s in range(last):
        here, there = stages[s][0], stages[s + 1][0]
        # The sender's vector prices the hop (the V's way back: the lower position's).
        sender = min(here, there) if layout.shape == "v" else here
        links.append(0.0 if here == there else vectors[sender].transfer(tokens) / 2)
    stage_of = {pc: s for s, pc in enumerate(stages)}
    backward_factor = problem.assumptions.backward_factor
    moe = problem.memory.moe_layers
    result = []
    for r, (vector, ranges) in enumerate(
        zip(vectors, problem.position_chunks(layout), strict=True)
    ):
        profile = problem.pools[template[r]].profile
        recompute = layout.recompute[r]
        passes = profile.passes + (1.0 if recompute else 0.0)
        forward, weightless, moe_layers = [], [], []
        for k, (start, end) in enumerate(ranges):
            dense, expert = profile.forward_seconds(start, end)
            head = profile.head_seconds / profile.passes if stage_of[(r, k)] == last else 0.0
            forward.append(dense + expert + head)
            weightless.append(profile.weightless_prefix[end] - profile.weightless_prefix[start])
            moe_layers.append(moe[end] - moe[start])
        exchange = tokens * vector.communication + vector.latency
        compute = vector.work(tokens) - exchange
        to_forward = 1.0 / 3.0 if recompute else 0.5
        even = 1.0 / len(ranges)
        chunks = []
        for k in range(len(ranges)):
            stage = stage_of[(r, k)]
            share = forward[k] / sum(forward) if sum(forward) > 0 else even
            comm = exchange * (moe_layers[k] / sum(moe_layers) if sum(moe_layers) else even)
            work = compute * share
            f = work / passes
            w = f * backward_factor / 2 * (1.0 - weightless[k] / forward[k] if forward[k] else 0)
            b = work - f - w + comm * (1.0 - to_forward)
            f += comm * to_forward
            if not overlap:  # F sends its activation on, B its gradient back
                f += links[stage] if stage < last else 0.0
                b += links[stage - 1] if stage > 0 else 0.0
            chunks.append(ChunkTimes(f, b, w))
        result.append(tuple(chunks))
    return result, stages, links


def _split_ends(
    problem: Problem,
    layout: Layout,
    template: tuple[str, ...],
    vectors: list[_StageVector],
    tokens: int,
    microbatches: int,
) -> tuple[list[float], list[tuple[ChunkTimes, ...]]]:
    """When each position finishes its last action under a split backward (ZB-V or
    ZB1P), by simulating torch's action order (:func:`~.cost_model.simulate_pipeline`)
    for at most ``ZBV_SIMULATED_ROUNDS x pp`` microbatches (a count torch's ZB1P
    accepts; with one chunk its order does not depend on the rounds, with more the
    planner's counts are multiples of pp, whose rounds are pp long either way); the
    rest run at the slowest position's pace. Also returns the chunk times."""
    chunks, stages, links = _split_chunk_times(problem, layout, template, vectors, tokens)
    simulated = min(microbatches, ZBV_SIMULATED_ROUNDS * layout.pp)
    actions = problem.actions(layout.pp, layout.virtual, layout.shape, simulated)
    ends = simulate_pipeline(chunks, stages, links, actions)
    slowest = max(sum(c.total for c in position) for position in chunks)
    extra = (microbatches - simulated) * slowest
    return [end + extra for end in ends], chunks


def _sync_seconds(problem: Problem, members: dict[str, int], params: float, span: int) -> float:
    """Gradient sync of ``params`` over ``members`` ranks per pool.

    One pool: a ring at intra-node speed if the pool's share of the job (``span``
    devices) fits on one node, else at inter-node speed. Several pools: hierarchical,
    a ring inside each pool, then each rank exchanges its 1/n shard across pools.
    """
    a = problem.assumptions
    total = sum(members.values())
    if total <= 1 or params <= 0:
        return 0.0
    payload = params * a.sync_bytes_per_param
    inner = 0.0
    for pool, count in members.items():
        if count <= 1:
            continue
        info = problem.pools[pool]
        one_node = len(members) == 1 and span <= info.pool.devices_per_node
        gbps = info.grade.intra_node_gbps if one_node else info.grade.inter_node_gbps
        inner = max(inner, (count - 1) / count * payload / (gbps * 1e9))
    latency = 2 * a.collective_latency_s
    if len(members) == 1:
        return inner + latency
    shard = payload / min(members.values())
    outer = (
        (len(members) - 1) / len(members) * shard / (problem.cluster.catalog.cross_pool_gbps * 1e9)
    )
    return inner + outer + 2 * latency


def _sync_and_optimizer(problem: Problem, layout: Layout) -> tuple[list[float], float]:
    """Gradient sync seconds per stage and optimizer time (slowest device)."""
    model = problem.model
    memory = problem.memory
    placement = problem.placement(layout.ep, layout.redundant_experts)
    slots = max(len(e) for e in placement.experts)
    expert_holders = len(layout.groups)
    templates = Counter(layout.groups)
    used = layout.devices_per_pool()
    sync: list[float] = []
    optimizer = 0.0
    for stage, chunks in enumerate(problem.position_chunks(layout)):
        dense = sum(memory.dense_params[end] - memory.dense_params[start] for start, end in chunks)
        head = stage == layout.head_position
        dense += model.embedding_params * (int(stage == 0) + int(head))
        dense += model.hidden_size if head else 0  # final norm
        moe = sum(memory.moe_layers[end] - memory.moe_layers[start] for start, end in chunks)
        experts = moe * slots * model.expert_params
        groups_per_pool: dict[str, int] = {}
        for template, count in templates.items():
            pool = template[stage]
            groups_per_pool[pool] = groups_per_pool.get(pool, 0) + count
        span = max(used[p] for p in groups_per_pool)
        ranks = {p: n * layout.ep for p, n in groups_per_pool.items()}
        seconds = _sync_seconds(problem, ranks, dense, span)
        seconds += _sync_seconds(problem, groups_per_pool, experts, span)
        sync.append(seconds)
        local = dense / layout.dp + experts / expert_holders
        for pool in groups_per_pool:
            profile = problem.pools[pool].profile
            optimizer = max(optimizer, local * profile.optimizer_seconds_per_param)
    return sync, optimizer


def _memory(problem: Problem, layout: Layout) -> tuple[MemoryCheck, ...]:
    placement = problem.placement(layout.ep, layout.redundant_experts)
    slots = max(len(e) for e in placement.experts)
    per_template: dict[tuple[str, ...], int] = {}
    for template, count in zip(layout.groups, layout.microbatches, strict=True):
        per_template[template] = max(per_template.get(template, 0), count)
    most: dict[tuple[str, int], int] = {}
    for template, count in per_template.items():
        for stage, pool in enumerate(template):
            most[(pool, stage)] = max(most.get((pool, stage), 0), count)
    checks = []
    for (pool, stage), count in sorted(most.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        per_chunk = layout.virtual > 1 or layout.zero_bubble
        shape = StageShape(
            start=layout.bounds[stage],
            end=layout.bounds[stage + 1],
            has_embedding=stage == 0,
            has_head=stage == layout.head_position,
            expert_slots=slots,
            dense_shards=layout.dp,
            expert_shards=len(layout.groups),
            in_flight=min(layout.pp - stage, count),
            recompute=layout.recompute[stage],
            chunks=problem.position_chunks(layout)[stage] if per_chunk else (),
            peaks=problem.peaks(
                layout.pp, layout.virtual, stage, count, layout.shape, layout.split_backward
            )
            if per_chunk
            else (),
            deferred_weight_grad=layout.zero_bubble,
        )
        info = problem.pools[pool]
        checks.append(
            MemoryCheck(
                pool=pool,
                stage=stage,
                usage=problem.memory.stage(shape, layout.microbatch_size),
                usable_bytes=info.usable_bytes,
                capacity_bytes=info.grade.memory_gib * float(1 << 30),
            )
        )
    return tuple(checks)


def _exposed_sync(
    problem: Problem, layout: Layout, sync: list[float], vectors: list[_StageVector], tokens: int
) -> float:
    """Gradient sync left on the critical path after the last microbatch.

    Without overlap: the slowest stage's sync. With it: stage ``s`` syncs during its
    own last backward and while the earlier stages drain theirs; what exceeds that
    window is exposed, and never less than its last bucket (one layer's share). Under
    interleaving only the first chunk's last backward counts (the others' gradients
    are ready earlier, which this ignores: a pessimistic window).
    """
    if not problem.assumptions.overlap_communication:
        return max(sync)
    exposed = 0.0
    drain = 0.0
    for stage, (seconds, v) in enumerate(zip(sync, vectors, strict=True)):
        backward = v.last_backward(tokens)
        layers = max(1, layout.bounds[stage + 1] - layout.bounds[stage])
        exposed = max(exposed, seconds / layers, seconds - backward - drain)
        drain += backward
    return exposed


def _split_exposed_sync(
    problem: Problem,
    layout: Layout,
    sync: list[float],
    chunks: list[tuple[ChunkTimes, ...]],
    ends: list[float],
) -> float:
    """Gradient sync left on the critical path under a split backward (ZB-V, ZB1P).

    With overlap, position r's sync runs during its last weight gradients (the last
    microbatch's W on every chunk, which finish its gradients) and while slower
    positions are still running (``max(ends) - ends[r]``); what exceeds that window is
    exposed, and never less than one layer's bucket. Without overlap: the slowest.
    """
    if not problem.assumptions.overlap_communication:
        return max(sync)
    finish = max(ends)
    exposed = 0.0
    for r, (seconds, position) in enumerate(zip(sync, chunks, strict=True)):
        window = sum(c.weight_grad for c in position) + finish - ends[r]
        layers = max(1, layout.bounds[r + 1] - layout.bounds[r])
        exposed = max(exposed, seconds / layers, seconds - window)
    return exposed


def _step_overhead(problem: Problem, layout: Layout) -> tuple[float, float]:
    """(fixed, collective) seconds every rank spends once per step outside its
    microbatches, gradient sync and optimizer (see ``step_overhead_seconds``)."""
    moe = problem.memory.moe_layers
    moe_stage = any(moe[layout.bounds[s + 1]] > moe[layout.bounds[s]] for s in range(layout.pp))
    return step_overhead_seconds(problem.assumptions, layout.pp * layout.dp, layout.dp, moe_stage)


def evaluate(problem: Problem, layout: Layout) -> Evaluation:
    """Predicted step time, throughput, cost and memory of ``layout``.

    1F1B with ``m`` microbatches: every stage once in fill and drain (transfers
    exposed) plus ``m - 1`` times the slowest stage's steady-state time. Interleaved
    1F1B with v chunks per position (Narayanan et al., 2021): fill and drain pass
    through one chunk per position, ``1 / v`` of its work (plus one exposed hop), so
    the bubble shrinks v-fold to ``(pp - 1) / (v m)`` of the step, while the steady
    state carries v transfers per microbatch and position instead of one. ZB-V (the
    ``v`` shape) and ZB1P / ZB-H1 (a split loop): simulated in torch's action order
    (:func:`_split_ends`); the bubble is
    what the pipeline takes beyond ``m`` times the slowest position's F + B + W.
    """
    seq = problem.training.sequence_length
    overlap = problem.assumptions.overlap_communication
    p2p_intra = _spans_intra_node(layout, problem)
    tokens = layout.microbatch_size * seq
    split = layout.zero_bubble
    worst: tuple[float, int, list[_StageVector], tuple] | None = None
    vectors_of: dict[tuple[str, ...], list[_StageVector]] = {}
    known: dict[tuple[tuple[str, ...], int], tuple[float, tuple]] = {}
    for template, m in zip(layout.groups, layout.microbatches, strict=True):
        if template not in vectors_of:
            vectors_of[template] = [
                _stage_vector(problem, layout, template, s, p2p_intra) for s in range(layout.pp)
            ]
        vectors = vectors_of[template]
        found = known.get((template, m))
        if found is None:
            if split:
                ends, chunks = _split_ends(problem, layout, template, vectors, tokens, m)
                found = (max(ends), (ends, chunks))
            else:
                slowest = max(v.steady(tokens, overlap) for v in vectors)
                fill_time = sum(v.fill(tokens) for v in vectors)
                found = (fill_time + (m - 1 / layout.virtual) * slowest, ())
            known[(template, m)] = found
        if worst is None or found[0] > worst[0]:
            worst = (found[0], m, vectors, found[1])
    assert worst is not None
    sync, optimizer = _sync_and_optimizer(problem, layout)
    step_fixed, step_collectives = _step_overhead(problem, layout)
    seconds, m, vectors, simulated = worst
    steady = [v.steady(tokens, overlap) for v in vectors]
    fill = [v.fill(tokens) for v in vectors]
    if split:
        ends, chunks = simulated
        steady = [sum(c.total for c in position) for position in chunks]
        exposed_sync = _split_exposed_sync(problem, layout, sync, chunks, ends)
        bubble = max(0.0, seconds - m * max(steady))
        fill_transfers = 0.0
    else:
        exposed_sync = _exposed_sync(problem, layout, sync, vectors, tokens)
        bubble = (sum(steady) - max(steady)) / layout.virtual
        fill_transfers = max(0.0, sum(fill) - sum(steady) / layout.virtual)
    total_s = sum(steady)
    mean_s = total_s / len(steady)
    compute = sum(tokens * v.compute + v.fixed for v in vectors)
    excess = tokens * sum(v.expert_excess for v in vectors)
    # Exposed all-to-all and steady-state transfers (rounding must not go below zero).
    communication = max(0.0, total_s - compute - excess)
    work = m * mean_s
    step = Breakdown(
        compute=work * compute / total_s,
        bubble=bubble,
        communication=work * communication / total_s
        + fill_transfers
        + exposed_sync
        + step_collectives,
        imbalance=work * excess / total_s + m * (max(steady) - mean_s),
        optimizer=optimizer + step_fixed,
    )
    used = layout.devices_per_pool()
    cost = sum(problem.pools[p].grade.price_per_hour * n for p, n in used.items())
    return Evaluation(
        step=step,
        tokens_per_s=problem.tokens_per_step / step.total,
        cost_per_hour=cost,
        memory=_memory(problem, layout),
    )


@dataclass(frozen=True)
class StageTime:
    """Predicted time of one stage for the EP groups of one (template, microbatches)."""

    stage: int
    pool: str
    groups: tuple[int, ...]
    microbatches: int
    microbatch_seconds: float
    busy_seconds: float
    step_seconds: float


def stage_times(problem: Problem, layout: Layout) -> list[StageTime]:
    """Per stage and distinct (template, microbatch count): the steady-state
    microbatch time, busy time and time until the stage's last backward ends.

    Stage ``s`` finishes before the pipeline does by the last microbatch's backward
    on the stages before it (the drain), the same model as :func:`evaluate`'s; under
    ZB-V and ZB1P each position's end comes from the simulation (``stage`` is the
    position).
    """
    overlap = problem.assumptions.overlap_communication
    p2p_intra = _spans_intra_node(layout, problem)
    tokens = layout.microbatch_size * problem.training.sequence_length
    members: dict[tuple[tuple[str, ...], int], list[int]] = {}
    for group, key in enumerate(zip(layout.groups, layout.microbatches, strict=True)):
        members.setdefault(key, []).append(group)
    result = []
    for (template, m), groups in members.items():
        vectors = [_stage_vector(problem, layout, template, s, p2p_intra) for s in range(layout.pp)]
        if layout.zero_bubble:
            ends, chunks = _split_ends(problem, layout, template, vectors, tokens, m)
            for stage, position in enumerate(chunks):
                per_microbatch = sum(c.total for c in position)
                result.append(
                    StageTime(
                        stage=stage,
                        pool=template[stage],
                        groups=tuple(groups),
                        microbatches=m,
                        microbatch_seconds=per_microbatch,
                        busy_seconds=m * per_microbatch,
                        step_seconds=ends[stage],
                    )
                )
            continue
        steady = [v.steady(tokens, overlap) for v in vectors]
        fill = [v.fill(tokens) for v in vectors]
        pipeline = sum(fill) + (m - 1 / layout.virtual) * max(steady)
        drain = 0.0
        for stage, v in enumerate(vectors):
            result.append(
                StageTime(
                    stage=stage,
                    pool=template[stage],
                    groups=tuple(groups),
                    microbatches=m,
                    microbatch_seconds=steady[stage],
                    busy_seconds=fill[stage] + (m - 1 / layout.virtual) * steady[stage],
                    step_seconds=pipeline - drain,
                )
            )
            drain += v.last_backward(tokens)
    return sorted(result, key=lambda t: (t.stage, t.groups))
