"""Peak memory of one device holding one pipeline stage.

The planner never lets a device exceed ``memory x (1 - headroom)``; the estimate is
split into the same parts as :class:`~hetmoe_operator.plan.MemoryEstimate` so the
plan output shows where the bytes go.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hetmoe_operator.api.catalog import DeviceGrade
from hetmoe_operator.api.model import ModelArchitecture
from hetmoe_operator.placement.cost_model import GIB, Assumptions, layer_dense_params


@dataclass(frozen=True)
class StageMemory:
    """Bytes on one device, by cause."""

    weights: float
    gradients: float
    optimizer: float
    activations: float
    overhead: float

    @property
    def total(self) -> float:
        """All bytes, the figure compared against usable capacity."""
        return self.weights + self.gradients + self.optimizer + self.activations + self.overhead


@dataclass(frozen=True)
class StageShape:
    """What a device of a stage holds, independent of the microbatch size."""

    start: int
    end: int
    has_embedding: bool
    has_head: bool
    expert_slots: int
    """Routed experts hosted per MoE layer (including redundant replicas)."""
    dense_shards: int
    """Ranks the non-expert optimizer state is sharded over (the stage's dp)."""
    expert_shards: int
    """Ranks an expert's optimizer state is sharded over (EP groups of the stage)."""
    in_flight: int
    """Microbatches whose activations are alive at the 1F1B peak."""
    recompute: bool
    """Keep only layer inputs and recompute the rest in backward."""


class MemoryModel:
    """Per-layer parameter and activation sizes as prefix sums, for O(1) stage queries."""

    def __init__(
        self, model: ModelArchitecture, sequence_length: int, assumptions: Assumptions
    ) -> None:
        self.model = model
        self.sequence_length = sequence_length
        self.assumptions = assumptions
        act = assumptions.activation_bytes
        h = model.hidden_size
        q_width = model.num_attention_heads * model.resolved_head_dim
        kv_width = model.num_key_value_heads * model.resolved_head_dim
        attention = act * (2 * h + 2 * q_width + 2 * kv_width)
        self.dense_params = [0]
        self.moe_layers = [0]
        self.full_activation = [0.0]
        for layer in range(model.num_hidden_layers):
            self.dense_params.append(self.dense_params[-1] + layer_dense_params(model, layer))
            moe = model.is_moe_layer(layer)
            self.moe_layers.append(self.moe_layers[-1] + int(moe))
            if moe:
                routed = model.num_experts_per_tok * act * (h + 3 * model.moe_intermediate_size)
                shared = model.num_shared_experts * act * 3 * model.moe_intermediate_size
                ffn = act * 2 * h + 4 * model.num_experts + routed + shared
            else:
                ffn = act * (2 * h + 3 * (model.intermediate_size or 0))
            self.full_activation.append(self.full_activation[-1] + attention + ffn)
        self.max_layer_activation = max(
            b - a for a, b in zip(self.full_activation, self.full_activation[1:], strict=False)
        )

    def activation_bytes_per_sample(self, shape: StageShape) -> float:
        """Activation bytes per sequence of microbatch size at the schedule's peak."""
        tokens = self.sequence_length
        layers = shape.end - shape.start
        if shape.recompute:
            stored = shape.in_flight * layers * self.assumptions.activation_bytes
            stored *= self.model.hidden_size
            working = self.max_layer_activation if layers else 0.0
            per_token = stored + working
        else:
            full = self.full_activation[shape.end] - self.full_activation[shape.start]
            per_token = shape.in_flight * full
        if shape.has_embedding:
            per_token += (
                shape.in_flight * self.assumptions.activation_bytes * self.model.hidden_size
            )
        if shape.has_head:
            per_token += self.assumptions.logits_bytes_per_vocab * self.model.vocab_size
        return per_token * tokens

    def stage(self, shape: StageShape, microbatch_size: int) -> StageMemory:
        """Peak bytes of one device of the stage."""
        a = self.assumptions
        model = self.model
        dense = self.dense_params[shape.end] - self.dense_params[shape.start]
        dense += model.embedding_params * (int(shape.has_embedding) + int(shape.has_head))
        dense += model.hidden_size if shape.has_head else 0
        moe = self.moe_layers[shape.end] - self.moe_layers[shape.start]
        experts = moe * shape.expert_slots * model.expert_params
        params = dense + experts
        optimizer = a.optimizer_bytes * (
            dense / max(1, shape.dense_shards) + experts / max(1, shape.expert_shards)
        )
        return StageMemory(
            weights=a.weight_bytes * params,
            gradients=a.gradient_bytes * params,
            optimizer=optimizer,
            activations=microbatch_size * self.activation_bytes_per_sample(shape),
            overhead=a.runtime_overhead_gib * GIB,
        )

    def stage_total_fn(
        self, template: StageShape, microbatch_size: int
    ) -> Callable[[int, int], float]:
        """``(start, end) -> stage(shape, microbatch_size).total`` for shapes that differ
        from ``template`` only in their layer range: O(1) per call, for the search."""
        a = self.assumptions
        model = self.model
        tokens = self.sequence_length * microbatch_size
        per_dense = (
            a.weight_bytes + a.gradient_bytes + a.optimizer_bytes / max(1, template.dense_shards)
        )
        per_expert = (
            a.weight_bytes + a.gradient_bytes + a.optimizer_bytes / max(1, template.expert_shards)
        )
        per_moe_layer = template.expert_slots * model.expert_params * per_expert
        fixed_params = model.embedding_params * (
            int(template.has_embedding) + int(template.has_head)
        ) + (model.hidden_size if template.has_head else 0)
        fixed = fixed_params * per_dense + a.runtime_overhead_gib * GIB
        if template.has_embedding:
            fixed += template.in_flight * a.activation_bytes * model.hidden_size * tokens
        if template.has_head:
            fixed += a.logits_bytes_per_vocab * model.vocab_size * tokens
        dense, moe, full = self.dense_params, self.moe_layers, self.full_activation
        if template.recompute:
            per_layer = template.in_flight * a.activation_bytes * model.hidden_size * tokens
            working = self.max_layer_activation * tokens

            def total(start: int, end: int) -> float:
                return (
                    fixed
                    + per_dense * (dense[end] - dense[start])
                    + per_moe_layer * (moe[end] - moe[start])
                    + (per_layer * (end - start) + working if end > start else 0.0)
                )

            return total
        in_flight_tokens = template.in_flight * tokens

        def total_plain(start: int, end: int) -> float:
            return (
                fixed
                + per_dense * (dense[end] - dense[start])
                + per_moe_layer * (moe[end] - moe[start])
                + in_flight_tokens * (full[end] - full[start])
            )

        return total_plain

    def usable_bytes(self, grade: DeviceGrade) -> float:
        """Memory the planner may fill on one device of ``grade``."""
        return grade.memory_gib * GIB * (1.0 - self.assumptions.memory_headroom)

    def model_state_bytes(self) -> float:
        """Weights, gradients and optimizer state of the whole model, stored once."""
        a = self.assumptions
        per_param = a.weight_bytes + a.gradient_bytes + a.optimizer_bytes
        return float(self.model.total_params) * per_param
