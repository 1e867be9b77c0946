"""Cost-model pieces: FLOPs per layer, per-grade speed, collectives."""

from __future__ import annotations

from dataclasses import replace

import pytest

from hetmoe_operator.api.model import PRESETS
from hetmoe_operator.placement.cost_model import (
    Assumptions,
    GradeProfile,
    class_flops_per_token,
    head_flops,
    layer_dense_params,
    layer_flops,
    ring_seconds,
    step_overhead_seconds,
)

from .helpers import grade


def test_moe_layer_flops_count_top_k_experts_shared_and_router() -> None:
    model = PRESETS["tiny"]
    flops = layer_flops(model, 1, sequence_length=128)
    routed = model.num_experts_per_tok * model.expert_params
    assert flops.expert_ffn == 2 * (routed + model.shared_expert_params + model.router_params)
    assert flops.dense_ffn == 0
    attention_weights = model.attention_params - model.hidden_size
    scores = 2 * 128 * model.num_attention_heads * model.resolved_head_dim
    assert flops.attention == 2 * attention_weights + scores


def test_dense_layer_has_no_expert_flops() -> None:
    model = PRESETS["tiny"]
    flops = layer_flops(model, 0, sequence_length=128)
    assert flops.expert_ffn == 0
    assert flops.dense_ffn == 2 * model.dense_ffn_params


def test_forward_flops_match_two_per_active_parameter() -> None:
    model = PRESETS["ling-plus"]
    totals = class_flops_per_token(model, sequence_length=1)
    # With a one-token sequence the attention scores vanish (up to a few FLOPs).
    weights = sum(totals.values()) / 2
    non_weights = model.num_hidden_layers * model.hidden_size * 2 + model.embedding_params
    assert weights == pytest.approx(model.active_params - non_weights, rel=1e-3)
    assert head_flops(model) == 2 * model.embedding_params


def test_dense_params_exclude_routed_experts() -> None:
    model = PRESETS["tiny"]
    assert layer_dense_params(model, 1) == model.layer_params(1) - 8 * model.expert_params
    assert layer_dense_params(model, 0) == model.layer_params(0)


def test_grade_profile_uses_peak_times_efficiency() -> None:
    model = PRESETS["tiny"]
    fast = grade("fast", 200.0, 80.0, 1.0)
    slow = grade("slow", 100.0, 80.0, 1.0)
    a = GradeProfile(model, fast, 128, Assumptions())
    b = GradeProfile(model, slow, 128, Assumptions())
    assert b.forward_seconds(0, 6)[0] == pytest.approx(2 * a.forward_seconds(0, 6)[0])
    assert b.forward_seconds(0, 6)[1] == pytest.approx(2 * a.forward_seconds(0, 6)[1])
    dense, expert = a.forward_seconds(1, 2)
    flops = layer_flops(model, 1, 128)
    assert dense == pytest.approx(flops.attention / (200e12 * fast.efficiency.attention))
    assert expert == pytest.approx(flops.expert_ffn / (200e12 * fast.efficiency.expert_ffn))
    assert a.passes == 3.0


def test_ring_collective_moves_twice_the_payload_asymptotically() -> None:
    assert ring_seconds(1, 1e9, 10, 0.0) == 0.0
    assert ring_seconds(2, 1e9, 10, 0.0) == pytest.approx(0.1)
    assert ring_seconds(1000, 1e9, 10, 1e-3) == pytest.approx(0.2 * 999 / 1000 + 1e-3)


def test_assumptions_are_listed() -> None:
    text = "\n".join(Assumptions().describe())
    assert "ZeRO-1" in text and "headroom" in text and "1F1B" in text


@pytest.mark.parametrize(
    ("world", "dp", "moe_stage", "collectives"),
    [(1, 1, True, 0), (2, 1, True, 1), (2, 2, False, 1), (2, 2, True, 2), (4, 2, True, 2)],
)
def test_step_overhead_counts_the_trainers_per_step_collectives(
    world: int, dp: int, moe_stage: bool, collectives: int
) -> None:
    """The statistics all-reduce needs a second process; the expert-load all-reduce a
    MoE stage with a second replica."""
    a = replace(Assumptions(), step_fixed_s=4e-3, collective_latency_s=1e-3)
    fixed, latency = step_overhead_seconds(a, world, dp, moe_stage)
    assert fixed == pytest.approx(4e-3)
    assert latency == pytest.approx(collectives * 1e-3)


def test_default_assumptions_charge_no_per_step_fixed_time() -> None:
    assert step_overhead_seconds(Assumptions(), 1, 1, True) == (0.0, 0.0)
    assert any("per step on every rank: 0 ms" in line for line in Assumptions().describe())
