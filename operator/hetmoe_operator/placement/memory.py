"""Peak memory of one device holding one pipeline stage.

The planner never lets a device exceed ``memory x (1 - headroom)``; the estimate is
split into the same parts as :class:`~hetmoe_operator.plan.MemoryEstimate` so the
plan output shows where the bytes go.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from hetmoe_operator.api.catalog import DeviceGrade
from hetmoe_operator.api.model import ModelArchitecture
from hetmoe_operator.placement.cost_model import (
    FORWARD,
    GIB,
    INPUT_GRAD,
    Action,
    Assumptions,
    layer_dense_params,
    zb1p_actions,
    zbv_actions,
)


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
    """Microbatches whose activations are alive at the 1F1B peak (one chunk)."""
    recompute: bool
    """Keep only layer inputs and recompute the rest in backward."""
    chunks: tuple[tuple[int, int], ...] = ()
    """Interleaved 1F1B: the layer range of each chunk (virtual stage) the device
    holds, in schedule order; empty means one chunk, [start, end)."""
    peaks: tuple[tuple[int, ...], ...] = ()
    """Interleaved 1F1B: microbatches alive per chunk at each moment that may be the
    activation peak (see :func:`interleaved_peaks`); empty means ``(in_flight,)``."""

    deferred_weight_grad: bool = False
    """Split backward (ZB-V, ZB1P / ZB-H1): each vector of ``peaks`` lists, after the microbatches
    alive per chunk (forward done, input gradient not), those whose input gradient
    ran but whose weight gradient is still deferred; those hold the chunk's full
    activations (recomputed ones too) plus the gradient of every weighted matmul's
    output, which the weight gradient needs (see :func:`split_backward_peaks`)."""

    @property
    def ranges(self) -> tuple[tuple[int, int], ...]:
        """Layer ranges of the device's chunks."""
        return self.chunks or ((self.start, self.end),)

    @property
    def alive(self) -> tuple[tuple[int, ...], ...]:
        """Per candidate peak: microbatches alive per chunk."""
        return self.peaks or ((self.in_flight,),)


def interleaved_peaks(
    pp: int, virtual: int, position: int, microbatches: int
) -> tuple[tuple[int, ...], ...]:
    """Microbatches whose activations each chunk of pipeline ``position`` holds, at
    every moment that may be its activation peak, under (interleaved) 1F1B.

    Replays the order torch's ``ScheduleInterleaved1F1B`` (as Megatron-LM's interleaved
    schedule) runs one rank's forwards and backwards in: ``(v - 1) x round + 2 (pp - 1
    - position)`` warm-up forwards (capped at ``v m``; ``round`` = ``m / (m // pp)``
    microbatches, i.e. ``pp`` when ``m`` is a multiple of it) cycling through the
    chunks ``round`` microbatches at a time, then one forward and one backward (chunks
    in reverse order) per step. Activations peak right after a forward; the candidate
    count vectors that no other one dominates are returned. With v = 1 this is
    ``min(pp - position, m)`` for the single chunk, 1F1B's figure; position 0 of an
    interleaved pipeline holds ``pp + (pp - 1) / v`` stage-equivalents (Korthikanti et
    al., 2022), more than 1F1B's ``pp``.
    """
    if virtual == 1:
        return ((min(pp - position, microbatches),),)
    rounds = max(1, microbatches // pp)
    per_round = microbatches // rounds
    total = microbatches * virtual
    warmup = min((virtual - 1) * per_round + 2 * (pp - 1 - position), total)
    counts = [0] * virtual
    for op in range(warmup):
        counts[(op // per_round) % virtual] += 1
    if warmup == total:  # all forwards first: counts only grow, then only shrink
        return (tuple(counts),)
    # In the steady phase every step adds one forward and removes one backward, so the
    # vectors seen right after a forward all hold warmup + 1 microbatches (none
    # dominates another); warm-up and cool-down vectors are dominated by them.
    seen: dict[tuple[int, ...], None] = {}
    for op in range(warmup, total):
        counts[(op // per_round) % virtual] += 1
        seen[tuple(counts)] = None
        counts[virtual - 1 - ((op - warmup) // per_round) % virtual] -= 1
    return tuple(seen)


def zbv_peaks(pp: int, position: int, microbatches: int) -> tuple[tuple[int, ...], ...]:
    """Candidate activation peaks of pipeline ``position`` under ZB-V: vectors
    ``(alive0, alive1, deferred0, deferred1)`` (see ``StageShape.deferred_weight_grad``)
    after every forward or input gradient of :func:`~.cost_model.zbv_actions`, those no
    other one dominates. Position r keeps up to ``2 (pp - r) - 1`` (+1 in the steady
    state) microbatches of chunk 0 and about ``r + 1`` of chunk 1 alive: about ``pp``
    stage-equivalents on every position, which is 1F1B's first stage (Qi et al., 2024),
    not 1F1B's ``pp - r``."""
    # From 2 pp microbatches on, more only repeat the steady state's vectors.
    return split_backward_peaks(zbv_actions(pp, position, min(microbatches, 2 * pp)), 2)


def zb1p_peaks(
    pp: int, virtual: int, position: int, microbatches: int
) -> tuple[tuple[int, ...], ...]:
    """Candidate activation peaks of pipeline ``position`` under ZB1P (ZB-H1 for
    ``virtual`` = 1), replaying :func:`~.cost_model.zb1p_actions`: vectors of alive
    microbatches per chunk, then deferred ones per chunk. With one chunk, position r
    keeps ``pp - r`` alive and ``r`` deferred in the steady state: ``pp`` microbatches
    not yet weight-gradient'ed on EVERY position (torch defers r W's on position r to
    fill its drain), so the later positions hold more than 1F1B's ``pp - r``; only the
    peak over positions (position 0's ``pp``) matches 1F1B's (Qi et al., 2024)."""
    return split_backward_peaks(zb1p_actions(pp, virtual, position, microbatches), virtual)


def split_backward_peaks(actions: Sequence[Action], virtual: int) -> tuple[tuple[int, ...], ...]:
    """Vectors ``(alive per chunk..., deferred per chunk...)`` after every forward or
    input gradient of ``actions``, those no other one dominates: a chunk-microbatch is
    alive from its F to its B, deferred from its B to its W."""
    state = [0] * (2 * virtual)
    seen: set[tuple[int, ...]] = set()
    for kind, chunk, _ in actions:
        if kind == FORWARD:
            state[chunk] += 1
        elif kind == INPUT_GRAD:
            state[chunk] -= 1
            state[virtual + chunk] += 1
        else:
            state[virtual + chunk] -= 1
            continue
        seen.add(tuple(state))
    # A vector that dominates another has a larger sum, so it is kept before it.
    kept: list[tuple[int, ...]] = []
    for v in sorted(seen, key=lambda v: (-sum(v), v)):
        if not any(all(a >= b for a, b in zip(o, v, strict=True)) for o in kept):
            kept.append(v)
    return tuple(kept)


def split_chunk(start: int, end: int, virtual: int) -> tuple[tuple[int, int], ...]:
    """Layers [start, end) as ``virtual`` contiguous chunks, the larger ones first."""
    base, extra = divmod(end - start, virtual)
    chunks = []
    for k in range(virtual):
        size = base + (1 if k < extra else 0)
        chunks.append((start, start + size))
        start += size
    return tuple(chunks)


def _peak(per_chunk: list[float], alive: tuple[tuple[int, ...], ...]) -> float:
    """Largest sum of chunk activations over the candidate peak moments."""
    if len(alive) == 1 and len(per_chunk) == 1:
        return alive[0][0] * per_chunk[0]
    best = 0.0
    for counts in alive:  # the search's hot loop: plain loops beat generators here
        total = 0.0
        for k, count in enumerate(counts):
            total += count * per_chunk[k]
        if total > best:
            best = total
    return best


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
        self.output_grads = [0.0]
        """Cumulative bytes per token of the gradients of every weighted matmul's output
        (what a deferred weight gradient needs besides the activations)."""
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
            grads = q_width + 2 * kv_width + h  # q, k, v and output projections
            if moe:
                experts = model.num_experts_per_tok + model.num_shared_experts
                grads += 4 * model.num_experts + experts * (2 * model.moe_intermediate_size + h)
            else:
                grads += 2 * (model.intermediate_size or 0) + h
            self.output_grads.append(self.output_grads[-1] + act * grads)
        self.max_layer_activation = max(
            b - a for a, b in zip(self.full_activation, self.full_activation[1:], strict=False)
        )

    def activation_bytes_per_sample(self, shape: StageShape) -> float:
        """Activation bytes per sequence of microbatch size at the schedule's peak."""
        act = float(self.assumptions.activation_bytes * self.model.hidden_size)
        per_chunk: list[float] = []
        for k, (start, end) in enumerate(shape.ranges):
            stored: float
            if shape.recompute:
                stored = (end - start) * act
            else:
                stored = self.full_activation[end] - self.full_activation[start]
            if shape.has_embedding and k == 0:
                stored += act
            per_chunk.append(stored)
        if shape.deferred_weight_grad:
            full, grads = self.full_activation, self.output_grads
            per_chunk += [
                full[end] - full[start] + grads[end] - grads[start] for start, end in shape.ranges
            ]
        per_token = _peak(per_chunk, shape.alive)
        if shape.recompute and any(end > start for start, end in shape.ranges):
            per_token += self.max_layer_activation
        if shape.has_head:
            per_token += self.assumptions.logits_bytes_per_vocab * self.model.vocab_size
        return per_token * self.sequence_length

    def stage(self, shape: StageShape, microbatch_size: int) -> StageMemory:
        """Peak bytes of one device of the stage."""
        a = self.assumptions
        model = self.model
        ranges = shape.ranges
        dense = sum(self.dense_params[end] - self.dense_params[start] for start, end in ranges)
        dense += model.embedding_params * (int(shape.has_embedding) + int(shape.has_head))
        dense += model.hidden_size if shape.has_head else 0
        moe = sum(self.moe_layers[end] - self.moe_layers[start] for start, end in ranges)
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
        from ``template`` only in their layer range: O(1) per call, for the search.

        With interleaving (``template.peaks`` per chunk) the range is cut into that many
        contiguous chunks of near-equal layer counts (:func:`split_chunk`), which is
        how the planner's positions are chunked, only without the other positions'
        chunks in between: layers differ little, and :func:`~.layout.evaluate` checks
        the true chunks."""
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
        if template.has_head:
            fixed += a.logits_bytes_per_vocab * model.vocab_size * tokens
        dense, moe, full = self.dense_params, self.moe_layers, self.full_activation
        grads = self.output_grads
        layer_input = a.activation_bytes * model.hidden_size * tokens
        embedding = layer_input if template.has_embedding else 0.0
        working = self.max_layer_activation * tokens
        alive = template.alive
        deferred = template.deferred_weight_grad
        virtual = len(alive[0]) // 2 if deferred else len(alive[0])
        if virtual > 1 or deferred:

            def total_chunked(start: int, end: int) -> float:
                chunks = split_chunk(start, end, virtual)
                per_chunk = [
                    (layer_input * (e - s) if template.recompute else tokens * (full[e] - full[s]))
                    + (embedding if k == 0 else 0.0)
                    for k, (s, e) in enumerate(chunks)
                ]
                if deferred:
                    per_chunk += [
                        tokens * (full[e] - full[s] + grads[e] - grads[s]) for s, e in chunks
                    ]
                return (
                    fixed
                    + per_dense * (dense[end] - dense[start])
                    + per_moe_layer * (moe[end] - moe[start])
                    + _peak(per_chunk, alive)
                    + (working if template.recompute and end > start else 0.0)
                )

            return total_chunked
        fixed += template.in_flight * embedding
        if template.recompute:
            per_layer = template.in_flight * layer_input

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
