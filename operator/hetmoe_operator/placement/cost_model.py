"""Analytic cost model: FLOPs per layer and how long one grade needs for them.

Everything the planner predicts comes from here and from :mod:`.memory`, with every
constant in :class:`Assumptions` so that ``Prediction.assumptions`` can list it. The
model is deliberately linear in tokens: a stage's time per microbatch is
``tokens x seconds-per-token + fixed latency``, which keeps the search cheap and the
numbers explainable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hetmoe_operator.api.catalog import DeviceCatalog, DeviceGrade
from hetmoe_operator.api.model import ModelArchitecture

GIB = float(1 << 30)
TIB = float(1 << 40)


@dataclass(frozen=True)
class Assumptions:
    """Constants of the cost and memory model that no catalog states."""

    backward_factor: float = 2.0
    """Backward FLOPs per forward FLOP."""
    activation_bytes: int = 2
    """bf16 activations and all-to-all payloads."""
    weight_bytes: int = 2
    """bf16 working weights."""
    gradient_bytes: int = 4
    """fp32 gradient accumulation buffers (kept whole on every rank)."""
    optimizer_bytes: int = 12
    """fp32 master weights plus Adam m and v, sharded over data parallelism (ZeRO-1)."""
    sync_bytes_per_param: int = 6
    """Gradient reduce-scatter in fp32 (4 B) plus bf16 parameter all-gather (2 B)."""
    optimizer_flops_per_param: float = 12.0
    """AdamW update work per parameter, run at the catalog's optimizer efficiency."""
    p2p_latency_s: float = 30e-6
    """Fixed cost of one point-to-point activation transfer."""
    collective_latency_s: float = 50e-6
    """Fixed cost of one all-to-all or one all-reduce."""
    memory_headroom: float = 0.10
    """Fraction of device memory never planned (fragmentation, allocator caching)."""
    runtime_overhead_gib: float = 1.5
    """Per-device runtime memory (framework context, communication buffers)."""
    logits_bytes_per_vocab: int = 6
    """Last stage: bf16 logits plus fp32 softmax copy per token and vocabulary entry."""
    overlap_communication: bool = True
    """Model a runtime that overlaps communication with compute (see ``describe``);
    False charges every transfer fully exposed."""
    step_fixed_s: float = 0.0
    """Seconds per step every rank spends outside microbatches beyond the optimizer's
    per-parameter time (gradient norm, anomaly detector, bookkeeping); 0 unless a
    profile measured it (``profile.step_fixed_seconds``)."""

    def _overlap_lines(self) -> list[str]:
        if not self.overlap_communication:
            return [
                "no overlap: gradient sync is exposed after the last microbatch; all-to-all "
                "and stage-to-stage transfers are not overlapped with compute"
            ]
        return [
            "overlap (assumed runtime behaviour): gradient sync runs per layer bucket "
            "during the last microbatch's backward and the later stages' drain; only what "
            "exceeds that window, and at least the last bucket (one layer's share), is exposed",
            "overlap: each MoE layer's all-to-all is hidden behind its shared-expert compute "
            "of the same pass; only the excess (and the latency) is exposed",
            "overlap: stage-to-stage transfers are asynchronous in 1F1B's steady state "
            "(a stage costs max(compute, transfer)); they are exposed in fill and drain",
        ]

    def describe(self) -> list[str]:
        """Human-readable list for ``Prediction.assumptions``."""
        return [
            f"backward = {self.backward_factor:g} x forward FLOPs; recomputation adds one forward",
            f"memory per parameter: {self.weight_bytes} B bf16 weights + {self.gradient_bytes} B "
            f"fp32 gradients + {self.optimizer_bytes} B fp32 master/Adam sharded over data "
            "parallelism (ZeRO-1; experts over the replicas of their EP group)",
            f"device memory headroom {self.memory_headroom:.0%} plus "
            f"{self.runtime_overhead_gib:g} GiB runtime overhead",
            f"gradient sync: {self.sync_bytes_per_param} B per parameter (reduce-scatter + "
            "all-gather) over a ring, hierarchical across pools",
            *self._overlap_lines(),
            f"latency: {self.p2p_latency_s * 1e6:g} us per p2p transfer, "
            f"{self.collective_latency_s * 1e6:g} us per collective",
            f"optimizer: {self.optimizer_flops_per_param:g} FLOPs per parameter at the "
            "catalog's optimizer efficiency",
            f"per step on every rank: {self.step_fixed_s * 1e3:g} ms fixed (measured) plus "
            "one statistics all-reduce over the world and one expert-load all-reduce over a "
            "MoE stage's data-parallel group, each at the collective latency",
            "1F1B schedule: stage i keeps min(pp - i, microbatches) microbatches in flight",
            "FLOPs: 2 x parameters touched per token, plus causal attention scores",
        ]


@dataclass(frozen=True)
class LayerFlops:
    """Forward FLOPs per token of one transformer block, by operation class."""

    attention: float
    expert_ffn: float
    dense_ffn: float


def layer_flops(model: ModelArchitecture, layer: int, sequence_length: int) -> LayerFlops:
    """Forward FLOPs per token: 2 per weight touched plus causal attention scores."""
    q_width = model.num_attention_heads * model.resolved_head_dim
    scores = 2.0 * sequence_length * q_width  # QK^T and AV, 2 FLOPs each, halved by causality
    attention = 2.0 * (model.attention_params - model.hidden_size) + scores
    if model.is_moe_layer(layer):
        routed = model.num_experts_per_tok * model.expert_params
        expert = 2.0 * (routed + model.shared_expert_params + model.router_params)
        return LayerFlops(attention=attention, expert_ffn=expert, dense_ffn=0.0)
    return LayerFlops(attention=attention, expert_ffn=0.0, dense_ffn=2.0 * model.dense_ffn_params)


def head_flops(model: ModelArchitecture) -> float:
    """Forward FLOPs per token of the LM head (the input embedding is a lookup)."""
    return 2.0 * model.embedding_params


def layer_dense_params(model: ModelArchitecture, layer: int) -> int:
    """Parameters of a layer that every rank of the stage holds (all but routed experts)."""
    routed = model.num_experts * model.expert_params if model.is_moe_layer(layer) else 0
    return model.layer_params(layer) - routed


def class_flops_per_token(model: ModelArchitecture, sequence_length: int) -> dict[str, float]:
    """Forward FLOPs per token of the whole model by operation class (for the bound)."""
    totals = {"attention": 0.0, "expert_ffn": 0.0, "dense_ffn": 0.0}
    for layer in range(model.num_hidden_layers):
        flops = layer_flops(model, layer, sequence_length)
        totals["attention"] += flops.attention
        totals["expert_ffn"] += flops.expert_ffn
        totals["dense_ffn"] += flops.dense_ffn
    totals["embedding"] = head_flops(model)
    return totals


class GradeProfile:
    """Seconds per token of every layer on one grade, as prefix sums.

    Built once per grade and model; a stage's time is then two subtractions, which is
    what makes searching thousands of layouts affordable.
    """

    def __init__(
        self,
        model: ModelArchitecture,
        grade: DeviceGrade,
        sequence_length: int,
        assumptions: Assumptions,
    ) -> None:
        self.grade = grade
        passes = 1.0 + assumptions.backward_factor
        attention_speed = grade.effective_tflops("attention") * 1e12
        expert_speed = grade.effective_tflops("expert_ffn") * 1e12
        dense_speed = grade.effective_tflops("dense_ffn") * 1e12
        self.head_seconds = (
            passes * head_flops(model) / (grade.effective_tflops("embedding") * 1e12)
        )
        """Forward + backward seconds per token of the LM head."""
        self.dense_prefix = [0.0]
        """Cumulative forward seconds per token of attention and dense FFN, per layer."""
        self.expert_prefix = [0.0]
        """Cumulative forward seconds per token of expert FFNs (routed, shared, router)."""
        self.weightless_prefix = [0.0]
        """Cumulative forward seconds per token of the attention core (scores and their
        product with values): matmuls without weights, so their backward has no
        weight-gradient part."""
        q_width = model.num_attention_heads * model.resolved_head_dim
        for layer in range(model.num_hidden_layers):
            self.weightless_prefix.append(
                self.weightless_prefix[-1] + 2.0 * sequence_length * q_width / attention_speed
            )
            flops = layer_flops(model, layer, sequence_length)
            self.dense_prefix.append(
                self.dense_prefix[-1]
                + flops.attention / attention_speed
                + flops.dense_ffn / dense_speed
            )
            self.expert_prefix.append(self.expert_prefix[-1] + flops.expert_ffn / expert_speed)
        self.passes = passes
        fixed = grade.measured
        self.fixed_prefix = [0.0]
        """Cumulative fixed forward + backward seconds per microbatch, per layer (only
        measured profiles have them)."""
        self.head_fixed_seconds = fixed.embedding_fixed_seconds if fixed else 0.0
        for layer in range(model.num_hidden_layers):
            per_layer = 0.0
            if fixed is not None:
                ffn = (
                    fixed.expert_ffn_fixed_seconds
                    if model.is_moe_layer(layer)
                    else fixed.dense_ffn_fixed_seconds
                )
                per_layer = fixed.attention_fixed_seconds + ffn
            self.fixed_prefix.append(self.fixed_prefix[-1] + per_layer)
        self.shared_forward_seconds = 2.0 * model.shared_expert_params / expert_speed
        """Forward seconds per token of one MoE layer's shared experts (what an
        overlapped all-to-all can hide behind)."""
        self.optimizer_seconds_per_param = assumptions.optimizer_flops_per_param / (
            grade.effective_tflops("optimizer") * 1e12
        )

    def forward_seconds(self, start: int, end: int) -> tuple[float, float]:
        """Forward seconds per token of layers [start, end): (attention+dense, experts)."""
        return (
            self.dense_prefix[end] - self.dense_prefix[start],
            self.expert_prefix[end] - self.expert_prefix[start],
        )


def step_overhead_seconds(
    assumptions: Assumptions, world: int, dp: int, moe_stage: bool
) -> tuple[float, float]:
    """(fixed seconds, collective seconds) every rank spends once per step besides its
    microbatches, gradient sync and optimizer: the measured per-step fixed time, and the
    trainer's per-step collectives at the collective latency. The statistics all-reduce
    runs when there is more than one process; the expert-load all-reduce when a stage
    with MoE layers has more than one data-parallel replica."""
    collectives = int(world > 1) + int(dp > 1 and moe_stage)
    return assumptions.step_fixed_s, collectives * assumptions.collective_latency_s


def ring_seconds(participants: int, payload_bytes: float, gbps: float, latency: float) -> float:
    """Ring all-reduce style collective: each rank moves 2 (n-1)/n of the payload."""
    if participants <= 1 or payload_bytes <= 0:
        return 0.0
    return 2.0 * (participants - 1) / participants * payload_bytes / (gbps * 1e9) + latency


def price_performance(catalog: DeviceCatalog, grade_name: str) -> float:
    """Price per effective expert-FFN PFLOP-hour: lower is a better deal."""
    grade = catalog.grade(grade_name)
    return grade.price_per_hour / grade.effective_tflops("expert_ffn")


FORWARD, INPUT_GRAD, WEIGHT_GRAD = 0, 1, 2
"""Action kinds of a zero-bubble schedule: forward, backward for inputs (B), backward
for weights (W)."""

Action = tuple[int, int, int]
"""``(kind, chunk, microbatch)``; the chunk is local to the position: under ZB-V chunk 0
is stage ``r`` and chunk 1 stage ``2 pp - 1 - r``, under ZB1P chunk k is stage ``k pp +
r``."""


def zbv_actions(pp: int, position: int, microbatches: int) -> tuple[Action, ...]:
    """The order in which pipeline ``position`` runs its actions under ZB-V.

    The same order torch's ``ScheduleZBVZeroBubble._calculate_single_rank_operations``
    generates (Qi et al., 2024, section 6): ``2 (pp - r) - 1`` forwards of chunk 0;
    ``r`` pairs F1 F0; ``pp - r`` triples F1 B1 W1; then per step F0 B0 W0 F1 B1 W1
    until every forward ran; a cool-down of ``r`` pairs B0 B1 (their W deferred) and
    ``pp - r`` pairs B0 W0, then the deferred W1s and W0s. Like torch it plans at
    least ``2 pp - 1`` microbatches and drops the actions of microbatches beyond
    ``microbatches``.
    """
    n = max(2 * pp - 1, microbatches)
    ops: list[Action] = []
    f = [0, 0]
    b = [0, 0]

    def forward(chunk: int) -> None:
        ops.append((FORWARD, chunk, f[chunk]))
        f[chunk] += 1

    def backward(chunk: int, weight: bool = True) -> None:
        ops.append((INPUT_GRAD, chunk, b[chunk]))
        if weight:
            ops.append((WEIGHT_GRAD, chunk, b[chunk]))
        b[chunk] += 1

    for _ in range(2 * (pp - position) - 1):
        forward(0)
    for _ in range(position):
        forward(1)
        forward(0)
    for _ in range(pp - position):
        forward(1)
        backward(1)
    while f[1] < f[0] or f[0] < n:
        if f[0] < n:
            forward(0)
        backward(0)
        forward(1)
        backward(1)
    w = list(b)
    for _ in range(position):
        backward(0, weight=False)
        backward(1, weight=False)
    for _ in range(pp - position):
        ops.append((INPUT_GRAD, 0, b[0]))
        b[0] += 1
        ops.append((WEIGHT_GRAD, 0, w[0]))
        w[0] += 1
    ops.extend((WEIGHT_GRAD, 1, i) for i in range(w[1], b[1]))
    ops.extend((WEIGHT_GRAD, 0, i) for i in range(w[0], b[0]))
    return tuple(op for op in ops if op[2] < microbatches)


def zb1p_actions(pp: int, virtual: int, position: int, microbatches: int) -> tuple[Action, ...]:
    """The order in which pipeline ``position`` runs its actions under ZB1P (loop shape,
    backward split; with ``virtual`` = 1 this is ZB-H1).

    The same order torch's ``ScheduleInterleavedZeroBubble._calculate_single_rank_operations``
    generates (Qi et al., 2024, ZB-1p; ``chunk`` k is stage ``k pp + position``): with
    ``round`` = ``m / max(1, m // pp)`` microbatches, ``(v - 1) round + pp - 1 -
    position`` warm-up forwards (capped at ``v m``) cycling through the chunks a round
    at a time; then per step one F and one B (chunks in reverse order), each B followed
    by the W of the oldest B still owed from the ``position + 1``-th step on (so
    position r defers r W's, which fill its share of the drain); then the remaining
    B's, each with a W, and the owed W's. Raises ValueError for a microbatch count
    torch refuses (not a multiple of its number of rounds)."""
    rounds = max(1, microbatches // pp)
    if microbatches % rounds:
        raise ValueError(
            f"ZB1P needs the microbatch count to be a multiple of max(1, m // pp) = {rounds}, "
            f"got {microbatches}"
        )
    per_round = microbatches // rounds
    total = virtual * microbatches
    warmup = min((virtual - 1) * per_round + pp - 1 - position, total)
    ops: list[Action] = []
    done = [[0] * virtual for _ in range(3)]  # next microbatch per kind and chunk

    def run(kind: int, chunk: int) -> None:
        ops.append((kind, chunk, done[kind][chunk]))
        done[kind][chunk] += 1

    def backward_chunk(step: int) -> int:
        return virtual - 1 - ((step - warmup) // per_round) % virtual

    backward_steps: list[int] = []
    for step in range(total + warmup):
        if step < total:
            run(FORWARD, (step // per_round) % virtual)
        if step >= warmup:
            run(INPUT_GRAD, backward_chunk(step))
            backward_steps.append(step)
            if step - warmup >= position:
                run(WEIGHT_GRAD, backward_chunk(backward_steps[sum(done[WEIGHT_GRAD])]))
    for step in backward_steps[sum(done[WEIGHT_GRAD]) :]:
        run(WEIGHT_GRAD, backward_chunk(step))
    return tuple(ops)


@dataclass(frozen=True)
class ChunkTimes:
    """Seconds one microbatch's forward, input-gradient and weight-gradient passes take
    on one chunk, plus the one-way transfer of its output (activation forward,
    gradient backward) to the neighbouring position."""

    forward: float
    input_grad: float
    weight_grad: float

    @property
    def total(self) -> float:
        """F + B + W."""
        return self.forward + self.input_grad + self.weight_grad


def simulate_pipeline(
    times: Sequence[Sequence[ChunkTimes]],
    stages: Sequence[tuple[int, int]],
    links: Sequence[float],
    actions: Sequence[Sequence[Action]],
) -> list[float]:
    """When each position finishes its last action (seconds from the start), for any
    schedule with a split backward (ZB-V, ZB1P / ZB-H1).

    ``times[r][k]`` are position r's chunk k's passes; ``stages[s]`` = ``(position,
    chunk)`` of stage s; ``links[s]`` the one-way transfer between stages s and s + 1
    (asynchronous: it delays the receiver, not the sender; 0 on one position); and
    ``actions[r]`` position r's order. Every position runs its actions in that order,
    each as soon as its input is there: F of stage s after F of s - 1 plus the link, B
    of s after B of s + 1 plus the link (the last stage's after its own F), W after its
    B. This is what torch's runtime does (it blocks on receives, sends
    asynchronously), so the bubble follows from the stage times.
    """
    pp = len(times)
    last = len(stages) - 1
    stage_of = [[0] * len(times[r]) for r in range(pp)]
    for s, (r, k) in enumerate(stages):
        stage_of[r][k] = s
    microbatches = 1 + max((op[2] for op in actions[0]), default=0)
    forward_done = [[-1.0] * microbatches for _ in stages]
    input_done = [[-1.0] * microbatches for _ in stages]
    clock = [0.0] * pp
    cursor = [0] * pp
    pending = sum(len(a) for a in actions)
    while pending:
        progressed = False
        for r in range(pp):
            ops = actions[r]
            i = cursor[r]
            now = clock[r]
            while i < len(ops):  # the search's hot loop: kept flat on purpose
                kind, chunk, mb = ops[i]
                stage = stage_of[r][chunk]
                if kind == FORWARD:
                    if stage == 0:
                        ready = 0.0
                    else:
                        ready = forward_done[stage - 1][mb]
                        if ready < 0:
                            break
                        ready += links[stage - 1]
                    now = max(now, ready) + times[r][chunk].forward
                    forward_done[stage][mb] = now
                elif kind == INPUT_GRAD:
                    if stage == last:
                        ready = forward_done[stage][mb]
                    else:
                        ready = input_done[stage + 1][mb]
                        if ready < 0:
                            break
                        ready += links[stage]
                    now = max(now, ready) + times[r][chunk].input_grad
                    input_done[stage][mb] = now
                else:
                    now += times[r][chunk].weight_grad
                i += 1
            if i != cursor[r]:
                pending -= i - cursor[r]
                cursor[r] = i
                clock[r] = now
                progressed = True
        if not progressed:
            raise RuntimeError("pipeline simulation deadlocked: the action order is inconsistent")
    return clock


def v_stages(pp: int) -> list[tuple[int, int]]:
    """``(position, chunk)`` of every stage in the V shape: down chunk 0, back up chunk 1."""
    return [(r, 0) for r in range(pp)] + [(r, 1) for r in reversed(range(pp))]


def loop_stages(pp: int, virtual: int) -> list[tuple[int, int]]:
    """``(position, chunk)`` of every stage in the loop shape: stage s on s mod pp."""
    return [(s % pp, s // pp) for s in range(pp * virtual)]


def simulate_zbv(
    chunks: Sequence[tuple[ChunkTimes, ChunkTimes]],
    hops: Sequence[float],
    actions: Sequence[Sequence[Action]],
) -> list[float]:
    """:func:`simulate_pipeline` for ZB-V: ``chunks[r]`` are position r's two chunks
    (chunk 0 stage r, chunk 1 stage 2 pp - 1 - r), ``hops[r]`` the one-way transfer
    between positions r and r + 1, ``actions[r]`` the order of :func:`zbv_actions`.
    The V's tip (stage pp - 1 to pp) stays on position pp - 1."""
    pp = len(chunks)
    links = [*hops, 0.0, *reversed(hops)]
    return simulate_pipeline(chunks, v_stages(pp), links, actions)
