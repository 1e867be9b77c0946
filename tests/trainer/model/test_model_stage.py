"""Whole-model and stage behaviour on one process: shapes, counts, determinism, pipelining."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from hetmoe_operator.api.model import ModelArchitecture
from hetmoe_trainer.model import StageOutput


def _tokens(arch: ModelArchitecture, batch: int = 2, seq: int = 16, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, arch.vocab_size, (batch, seq), generator=gen)


def test_forward_backward_shapes_and_finite(make_stage, tiny):
    model = make_stage()
    tokens = _tokens(tiny)
    logits = model(tokens, step=0)
    assert logits.shape == (2, 16, tiny.vocab_size)
    assert logits.dtype == torch.float32
    assert model.output == StageOutput("logits", tiny.vocab_size, torch.float32)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())
    loss.backward()
    assert torch.isfinite(loss)
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
    # An untrained model predicts roughly uniformly.
    assert abs(loss.item() - torch.log(torch.tensor(float(tiny.vocab_size))).item()) < 0.5


def test_parameter_count_matches_architecture(make_stage, tiny):
    model = make_stage()
    assert sum(p.numel() for p in model.parameters()) == tiny.total_params


def test_stage_attributes_follow_the_plan(make_stage, tiny):
    first, last = make_stage(0, 3), make_stage(3, 6)
    assert list(first.layers) == ["0", "1", "2"] and list(last.layers) == ["3", "4", "5"]
    assert hasattr(first, "embed") and not hasattr(first, "head") and not hasattr(first, "norm")
    assert hasattr(last, "head") and hasattr(last, "norm") and not hasattr(last, "embed")
    assert first.output.shape(2, 16) == (2, 16, tiny.hidden_size)


def test_init_is_independent_of_stage_split_and_expert_hosting(make_stage):
    # state_dict: routed experts per expert under their global ids (views of the stacks).
    full = make_stage(0, 6).state_dict()
    tail = make_stage(3, 6).state_dict()
    middle = make_stage(3, 4, experts=[4, 5, 6, 7]).state_dict()
    for name, value in tail.items():
        torch.testing.assert_close(value, full[name], rtol=0, atol=0, msg=name)
    for name, value in middle.items():
        torch.testing.assert_close(value, full[name], rtol=0, atol=0, msg=name)
    assert "layers.3.mlp.experts.5.up_proj.weight" in middle
    assert "layers.3.mlp.experts.1.up_proj.weight" not in middle
    # Different tensors really differ (no accidental shared seed).
    assert not torch.equal(
        full["layers.3.mlp.experts.5.up_proj.weight"], full["layers.3.mlp.experts.6.up_proj.weight"]
    )
    assert not torch.equal(
        full["layers.3.attention.dense.weight"], full["layers.4.attention.dense.weight"]
    )


def test_init_depends_on_seed(make_stage, training):
    other = training.model_copy(update={"seed": training.seed + 1})
    a = make_stage(0, 6).layers["2"].attention.dense.weight
    b = make_stage(0, 6, config=other).layers["2"].attention.dense.weight
    assert not torch.equal(a, b)


def test_pipeline_of_stages_equals_the_whole_model(make_stage, tiny):
    full, first, second = make_stage(0, 6), make_stage(0, 2), make_stage(2, 6)
    tokens = _tokens(tiny)
    hidden = first(tokens, step=3)
    assert hidden.shape == (2, 16, tiny.hidden_size)
    torch.testing.assert_close(second(hidden, step=3), full(tokens, step=3))


def test_aux_losses_backpropagate_without_a_loss_on_routing(make_stage, tiny):
    stage = make_stage(1, 2)  # one MoE layer, hidden in and out
    x = torch.randn(2, 8, tiny.hidden_size)
    gate = stage.layers["1"].mlp.gate.weight
    (stage(x, step=0) * 0).sum().backward()
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    full_scale = gate.grad.clone()

    stage.zero_grad()
    stage.set_aux_loss_scale(0.5)
    (stage(x, step=0) * 0).sum().backward()
    torch.testing.assert_close(gate.grad, 0.5 * full_scale)
    losses = stage.pop_aux_losses()[1]
    assert losses["aux_loss"] == pytest.approx(0.015, rel=0.5)
    assert losses["z_loss"] > 0


def test_expert_load_and_parameter_partition(make_stage, tiny):
    stage = make_stage()
    stage(_tokens(tiny, batch=3), step=0)
    stage(_tokens(tiny, batch=1), step=1)
    load = stage.pop_expert_load()
    assert sorted(load) == list(range(tiny.first_k_dense_replace, tiny.num_hidden_layers))
    for counts in load.values():
        assert counts.shape == (tiny.num_experts,)
        assert counts.sum().item() == 4 * 16 * tiny.num_experts_per_tok
    assert all(c.sum() == 0 for c in stage.pop_expert_load().values())

    expert = {id(p) for p in stage.expert_parameters()}
    dense = {id(p) for p in stage.dense_parameters()}
    assert not expert & dense
    assert len(expert) + len(dense) == len(list(stage.parameters()))
    # Stacked: gate+up and down per MoE layer, one slice per hosted expert each.
    assert len(expert) == tiny.num_moe_layers * 2
    slices = list(stage.expert_slices())
    assert len(slices) == tiny.num_moe_layers * tiny.num_experts * 2
    assert slices[0][:2] == (0, f"layers.{tiny.first_k_dense_replace}.mlp.experts.0.gate_up_proj")
    assert stage.expert_param_owner("layers.4.mlp.experts.6.down_proj.weight") == 6
    assert stage.expert_param_owner("module.layers.4.mlp.experts.6.down_proj.weight") == 6
    assert stage.expert_param_owner("layers.4.mlp.shared_experts.down_proj.weight") is None
    assert stage.expert_param_owner("layers.4.mlp.gate.weight") is None


def test_bias_balancing_updates_only_in_bias_mode(make_stage, training, tiny):
    with pytest.raises(RuntimeError):
        make_stage(1, 2).update_balancing_bias({1: torch.ones(tiny.num_experts)})
    stage = make_stage(1, 2, config=training.model_copy(update={"balancing": "bias"}))
    bias = stage.layers["1"].mlp.gate.expert_bias
    assert torch.equal(bias, torch.zeros(tiny.num_experts))
    load = torch.tensor([10, 0, 0, 0, 0, 0, 0, 6])
    stage.update_balancing_bias({1: load}, rate=0.01)
    assert bias[0] < 0 and bias[7] < 0 and bias[1] > 0
    # Aux loss is off in bias mode; z-loss stays.
    stage(torch.randn(1, 4, tiny.hidden_size), step=0)
    losses = stage.pop_aux_losses()[1]
    assert losses["aux_loss"] == 0.0 and losses["z_loss"] > 0


def test_bf16_stage_runs(make_stage, tiny):
    stage = make_stage(dtype=torch.bfloat16)
    logits = stage(_tokens(tiny), step=0)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert stage.layers["2"].attention.dense.weight.dtype == torch.bfloat16


def test_fp32_stage_under_bf16_autocast(make_stage, tiny):
    stage = make_stage()
    tokens = _tokens(tiny)
    with torch.autocast("cpu", torch.bfloat16):
        logits = stage(tokens, step=0)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in stage.parameters())
    # Same model, same batch: within bf16 rounding of the fp32 result.
    torch.testing.assert_close(logits, stage(tokens, step=0), rtol=0.1, atol=0.1)


def test_a_subset_without_group_builds_but_does_not_run(make_stage, tiny):
    stage = make_stage(1, 2, experts=[0, 1])
    assert stage.layers["1"].mlp.experts.expert_ids == (0, 1)
    assert stage.layers["1"].mlp.experts.gate_up_proj.shape[0] == 2
    with pytest.raises(RuntimeError, match="process group"):
        stage(torch.randn(1, 4, tiny.hidden_size), step=0)


def test_compiled_regions_match_eager(make_stage, tiny):
    """Regional compile changes no result (aot_eager: Dynamo + AOTAutograd, no codegen)."""
    tokens = _tokens(tiny, batch=2, seq=8)
    results = []
    counters.clear()
    for compiled in (False, True):
        stage = make_stage()
        if compiled:
            stage.compile_regions(backend="aot_eager")
        logits = stage(tokens, step=5)
        F.cross_entropy(logits.flatten(0, 1), tokens.flatten()).backward()
        results.append((logits.detach(), [p.grad for p in stage.parameters()]))
    (eager, eager_grads), (comp, comp_grads) = results
    torch.testing.assert_close(comp, eager, rtol=1e-5, atol=1e-6)
    for a, b in zip(comp_grads, eager_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert len(stage.pop_expert_load()) == tiny.num_moe_layers
    # Really compiled: the attention half and the two FFN widths (dense, shared expert).
    assert counters["stats"]["unique_graphs"] >= 3
