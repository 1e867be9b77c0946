"""Stacked routed experts: grouped matmul and per-expert loop agree; per-expert views."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hetmoe_trainer.model.experts import (
    RoutedExperts,
    grouped_mm_supported,
    per_expert_tensors,
)


def _experts(
    hidden: int, inter: int, ids: list[int], dtype: torch.dtype = torch.float32
) -> RoutedExperts:
    torch.manual_seed(0)
    experts = RoutedExperts(hidden, inter, ids, dtype=dtype)
    with torch.no_grad():
        for param in experts.parameters():
            param.normal_(0.0, 0.1)
    return experts


def _reference(experts: RoutedExperts, tokens: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Each expert as three plain linears on its rows, from the per-expert state_dict."""
    sd = experts.state_dict()
    outs = []
    for e, chunk in zip(experts.expert_ids, torch.split(tokens, counts), strict=True):
        gate, up, down = (sd[f"{e}.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
        outs.append((torch.nn.functional.silu(chunk @ gate.T) * (chunk @ up.T)) @ down.T)
    return torch.cat(outs)


@pytest.mark.skipif(
    not grouped_mm_supported(torch.device("cpu"), torch.float32, (64, 32)),
    reason="torch._grouped_mm has no CPU kernel in this torch",
)
def test_grouped_matches_loop_including_empty_experts():
    experts = _experts(64, 32, [0, 3, 5, 9])
    counts = [5, 0, 9, 2]
    tokens = torch.randn(sum(counts), 64)
    grad = torch.randn(sum(counts), 64)
    results = {}
    for grouped in (True, False):
        experts.zero_grad(set_to_none=True)
        x = tokens.clone().requires_grad_()
        out = experts(x, counts, grouped=grouped)
        out.backward(grad)
        results[grouped] = (out, x.grad, [p.grad.clone() for p in experts.parameters()])
    torch.testing.assert_close(results[True][0], results[False][0])
    torch.testing.assert_close(results[True][1], results[False][1])
    for a, b in zip(results[True][2], results[False][2], strict=True):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(results[True][0], _reference(experts, tokens, counts))
    # The empty expert (slot 1) gets a zero gradient, not None (gradient sync needs no holes).
    for grouped in (True, False):
        assert all(g[1].abs().sum() == 0 for g in results[grouped][2])
        assert all(g[0].abs().sum() > 0 for g in results[grouped][2])


def test_grouped_survives_a_stride_zero_gradient():
    experts = _experts(64, 32, [0, 1])
    x = torch.randn(6, 64, requires_grad=True)
    experts(x, [4, 2], grouped=True).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_loop_matches_per_expert_linears():
    experts = _experts(12, 6, [2, 4, 7])
    counts = [2, 3, 1]
    tokens = torch.randn(6, 12)
    torch.testing.assert_close(
        experts(tokens, counts, grouped=False), _reference(experts, tokens, counts)
    )


def test_loop_calls_each_expert_module():
    experts = _experts(12, 6, [2, 4])
    seen = []
    for e in ("2", "4"):
        experts.get_submodule(e).register_forward_hook(lambda m, i, o, e=e: seen.append(e))
    experts(torch.randn(3, 12), [1, 2], grouped=False)
    assert seen == ["2", "4"]


def test_unaligned_shapes_fall_back_to_the_loop():
    assert not grouped_mm_supported(torch.device("cpu"), torch.bfloat16, (12, 6))
    experts = _experts(12, 6, [0, 1], dtype=torch.bfloat16)
    tokens = torch.randn(5, 12, dtype=torch.bfloat16)
    out = experts(tokens, [3, 2], grouped=True)
    torch.testing.assert_close(out, experts(tokens, [3, 2], grouped=False))


def test_grouped_runs_in_the_autocast_dtype():
    experts = _experts(64, 32, [0, 1, 2])
    tokens = torch.randn(10, 64)
    with torch.autocast("cpu", torch.bfloat16):
        grouped = experts(tokens, [3, 0, 7], grouped=True)
        loop = experts(tokens, [3, 0, 7], grouped=False)
    assert grouped.dtype == loop.dtype == torch.bfloat16
    torch.testing.assert_close(grouped, loop)


def test_state_dict_is_per_expert_views_by_global_id():
    experts = _experts(8, 4, [3, 6])
    sd = experts.state_dict()
    assert list(sd) == [
        "3.gate_proj.weight",
        "3.up_proj.weight",
        "6.gate_proj.weight",
        "6.up_proj.weight",
        "3.down_proj.weight",
        "6.down_proj.weight",
    ]
    assert sd["6.up_proj.weight"].shape == (4, 8) and sd["6.down_proj.weight"].shape == (8, 4)
    torch.testing.assert_close(sd["6.up_proj.weight"], experts.gate_up_proj[1, 4:].detach())
    # Views: writing through the state dict fills the stacks (how checkpoints load).
    sd["6.down_proj.weight"].fill_(2.0)
    assert torch.equal(experts.down_proj[1].detach(), torch.full((8, 4), 2.0))


def test_load_state_dict_accepts_per_expert_names():
    source, target = _experts(8, 4, [3, 6]), RoutedExperts(8, 4, [3, 6])
    target.load_state_dict(source.state_dict())
    for a, b in zip(source.parameters(), target.parameters(), strict=True):
        assert torch.equal(a, b)
    partial = {k: v for k, v in source.state_dict().items() if not k.startswith("6.up")}
    with pytest.raises(RuntimeError, match=r"6\.up_proj\.weight"):
        RoutedExperts(8, 4, [3, 6]).load_state_dict(partial)


def test_per_expert_tensors_splits_moments_and_shares_step():
    model = nn.Module()
    model.experts = _experts(8, 4, [1, 5])
    model.other = nn.Linear(2, 2, bias=False)
    moment = torch.arange(model.experts.gate_up_proj.numel(), dtype=torch.float32)
    moment = moment.view_as(model.experts.gate_up_proj)
    views = dict(per_expert_tensors(model, "experts.gate_up_proj", moment))
    assert list(views) == [
        "experts.1.gate_proj.weight",
        "experts.1.up_proj.weight",
        "experts.5.gate_proj.weight",
        "experts.5.up_proj.weight",
    ]
    assert torch.equal(views["experts.5.gate_proj.weight"], moment[1, :4])
    step = torch.tensor(7.0)
    assert all(t is step for _, t in per_expert_tensors(model, "experts.down_proj", step))
    dense = torch.zeros(2, 2)
    assert per_expert_tensors(model, "other.weight", dense) == [("other.weight", dense)]


def test_expert_ids_must_be_ascending_and_distinct():
    with pytest.raises(ValueError, match="ascending"):
        RoutedExperts(8, 4, [2, 1])
