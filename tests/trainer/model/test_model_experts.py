"""Grouped matmul and the per-expert loop compute the same experts."""

from __future__ import annotations

import pytest
import torch

from hetmoe_trainer.model.experts import SwiGLU, grouped_mm_supported, run_experts


def _experts(hidden: int, inter: int, n: int, dtype: torch.dtype = torch.float32) -> list[SwiGLU]:
    torch.manual_seed(0)
    return [SwiGLU(hidden, inter, dtype=dtype) for _ in range(n)]


@pytest.mark.skipif(
    not grouped_mm_supported(torch.device("cpu"), torch.float32, (64, 32)),
    reason="torch._grouped_mm has no CPU kernel in this torch",
)
def test_grouped_matches_loop_including_empty_experts():
    experts = _experts(64, 32, 4)
    counts = [5, 0, 9, 2]
    tokens = torch.randn(sum(counts), 64)
    grad = torch.randn(sum(counts), 64)
    results = {}
    for grouped in (True, False):
        for e in experts:
            e.zero_grad(set_to_none=True)
        x = tokens.clone().requires_grad_()
        out = run_experts(experts, x, counts, grouped=grouped)
        out.backward(grad)
        results[grouped] = (out, x.grad, [p.grad.clone() for e in experts for p in e.parameters()])
    torch.testing.assert_close(results[True][0], results[False][0])
    torch.testing.assert_close(results[True][1], results[False][1])
    for a, b in zip(results[True][2], results[False][2], strict=True):
        torch.testing.assert_close(a, b)
    # The empty expert gets a zero gradient, not None (gradient sync needs no holes).
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in experts[1].parameters())


def test_grouped_survives_a_stride_zero_gradient():
    experts = _experts(64, 32, 2)
    x = torch.randn(6, 64, requires_grad=True)
    run_experts(experts, x, [4, 2], grouped=True).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_loop_matches_direct_application():
    experts = _experts(12, 6, 3)
    counts = [2, 3, 1]
    tokens = torch.randn(6, 12)
    out = run_experts(experts, tokens, counts)
    expected = torch.cat([experts[0](tokens[:2]), experts[1](tokens[2:5]), experts[2](tokens[5:])])
    torch.testing.assert_close(out, expected)


def test_unaligned_shapes_fall_back_to_the_loop():
    assert not grouped_mm_supported(torch.device("cpu"), torch.bfloat16, (12, 6))
    experts = _experts(12, 6, 2, dtype=torch.bfloat16)
    tokens = torch.randn(5, 12, dtype=torch.bfloat16)
    out = run_experts(experts, tokens, [3, 2], grouped=True)
    torch.testing.assert_close(out, run_experts(experts, tokens, [3, 2], grouped=False))


def test_grouped_runs_in_the_autocast_dtype():
    experts = _experts(64, 32, 3)
    tokens = torch.randn(10, 64)
    with torch.autocast("cpu", torch.bfloat16):
        grouped = run_experts(experts, tokens, [3, 0, 7], grouped=True)
        loop = run_experts(experts, tokens, [3, 0, 7], grouped=False)
    assert grouped.dtype == loop.dtype == torch.bfloat16
    torch.testing.assert_close(grouped, loop)
