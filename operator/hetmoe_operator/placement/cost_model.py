"""Analytic cost model: FLOPs per layer and how long one grade needs for them.

Everything the planner predicts comes from here and from :mod:`.memory`, with every
constant in :class:`Assumptions` so that ``Prediction.assumptions`` can list it. The
model is deliberately linear in tokens: a stage's time per microbatch is
``tokens x seconds-per-token + fixed latency``, which keeps the search cheap and the
numbers explainable.
"""

from __future__ import annotations

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
        for layer in range(model.num_hidden_layers):
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
