"""AdamW: fused where supported, same update as PyTorch's per-tensor AdamW, global clip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hetmoe_trainer.checkpoint import ensure_optimizer_state
from hetmoe_trainer.optim import BETAS, EPS, build_optimizer, clip_gradients, set_learning_rate


def _params(seed: int = 0) -> list[tuple[str, nn.Parameter]]:
    gen = torch.Generator().manual_seed(seed)
    shapes = {"stack": (4, 6, 8), "matrix": (8, 8), "norm": (8,)}
    return [(n, nn.Parameter(torch.randn(s, generator=gen))) for n, s in shapes.items()]


def _step(optimizer: torch.optim.Optimizer, params: list[nn.Parameter], steps: int) -> None:
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        optimizer.step()


def test_fused_on_cpu_matches_the_per_tensor_reference():
    ours = _params()
    optimizer = build_optimizer(ours, weight_decay=0.1)
    assert all(group["fused"] for group in optimizer.param_groups)
    # Matrices (and stacked experts) decay, 1-D tensors do not.
    assert [len(g["params"]) for g in optimizer.param_groups] == [2, 1]
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.1, 0.0]
    set_learning_rate(optimizer, 1e-2)

    reference = _params()
    ref_params = [p for _, p in reference]
    ref_opt = torch.optim.AdamW(
        [
            {"params": ref_params[:2], "weight_decay": 0.1},
            {"params": ref_params[2:], "weight_decay": 0.0},
        ],
        lr=1e-2,
        betas=BETAS,
        eps=EPS,
        foreach=False,
    )
    initial = [p.detach().clone() for _, p in ours]
    _step(optimizer, [p for _, p in ours], 5)
    _step(ref_opt, ref_params, 5)
    for (name, a), b, before in zip(ours, ref_params, initial, strict=True):
        assert not torch.equal(a, before), name
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_ensured_state_steps_like_lazily_created_state():
    """Checkpoints create AdamW state before the first step; it must suit the fused kernel."""
    eager, lazy = _params(), _params()
    eager_opt = build_optimizer(eager, weight_decay=0.1)
    lazy_opt = build_optimizer(lazy, weight_decay=0.1)
    ensure_optimizer_state(eager_opt)
    step = eager_opt.state[eager[0][1]]["step"]
    assert step.dtype == torch.float32 and step.device == eager[0][1].device
    for opt in (eager_opt, lazy_opt):
        set_learning_rate(opt, 1e-2)
    _step(eager_opt, [p for _, p in eager], 2)
    _step(lazy_opt, [p for _, p in lazy], 2)
    for (name, a), (_, b) in zip(eager, lazy, strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(("norm", "factor"), [(0.5, 1.0), (4.0, 0.25)])
def test_clip_scales_every_gradient_by_one_factor(norm: float, factor: float):
    params = [p for _, p in _params()]
    for p in params:
        p.grad = torch.ones_like(p)
    assert clip_gradients(params, norm, 1.0) == pytest.approx(factor, rel=1e-5)
    for p in params:
        torch.testing.assert_close(p.grad, torch.full_like(p, factor), rtol=1e-5, atol=0)
