"""AdamW with the Ling recipe and a global gradient-norm clip across all ranks.

Weight decay applies to matrices only (norm weights and other 1-D tensors are not
decayed, as in Megatron and torchtitan). The clip needs the norm of the *whole*
model's gradient: each rank contributes the squares of the gradients it is the
designated counter for (:meth:`GradientSync.norm_counted`, one holder per replicated
parameter), the contributions are summed with one all-reduce, and every rank then
scales by the same factor.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

BETAS = (0.9, 0.95)
EPS = 1e-8


def build_optimizer(
    named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float
) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95, eps 1e-8); decay on parameters with two or more dimensions."""
    decay, no_decay = [], []
    for _, param in named_params:
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # PyTorch's default implementation choice (foreach on CUDA, per-tensor on CPU):
    # both are elementwise per parameter, so a parameter's update does not depend on
    # which other parameters a rank holds and every layout steps identically.
    return torch.optim.AdamW(groups, lr=0.0, betas=BETAS, eps=EPS)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Use ``lr`` for the next step in every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def clip_gradients(params: Iterable[nn.Parameter], total_norm: float, max_norm: float) -> float:
    """Scale gradients so the global norm is at most ``max_norm``; returns the factor used."""
    factor = min(1.0, max_norm / (total_norm + 1e-6))
    if factor < 1.0:
        for param in params:
            if param.grad is not None:
                param.grad.mul_(factor)
    return factor
