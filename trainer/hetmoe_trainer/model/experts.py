"""SwiGLU feed-forward networks: the dense FFN, shared experts and routed experts.

Routed experts stay separate modules (``mlp.experts.{e}.gate_proj`` ...) rather than
one stacked tensor: each expert's gradients are synchronised only among the ranks
hosting that expert, which needs one parameter per expert, and the names match the
reference checkpoints. The grouped-matmul path stacks the local weights on the fly.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` without biases (BailingMoeMLP)."""

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(
            hidden_size, intermediate_size, bias=False, device=device, dtype=dtype
        )
        self.up_proj = nn.Linear(
            hidden_size, intermediate_size, bias=False, device=device, dtype=dtype
        )
        self.down_proj = nn.Linear(
            intermediate_size, hidden_size, bias=False, device=device, dtype=dtype
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Apply the FFN to the last dimension of ``x``."""
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def grouped_mm_supported(device: torch.device, dtype: torch.dtype, dims: tuple[int, ...]) -> bool:
    """Whether ``torch._grouped_mm`` can run these expert shapes here.

    CUDA: bf16 on compute capability >= 9.0. CPU: the kernel exists from torch 2.9.
    Both need every inner dimension 16-byte aligned.
    """
    if not hasattr(torch, "_grouped_mm"):
        return False
    itemsize = torch.empty((), dtype=dtype).element_size()
    if any(d * itemsize % 16 for d in dims):
        return False
    if device.type == "cuda":
        return dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)
    return device.type == "cpu"


class _DenseGrad(torch.autograd.Function):
    """Identity that makes the incoming gradient dense.

    ``_grouped_mm``'s backward rejects stride-0 gradients (what ``sum()`` or
    ``expand`` produce), so its output passes through here.
    """

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


def _grouped(
    experts: list[SwiGLU], tokens: torch.Tensor, counts: list[int], dtype: torch.dtype
) -> torch.Tensor:
    offsets = torch.tensor(counts, device=tokens.device).cumsum(0).to(torch.int32)

    def stacked(weights: list[torch.Tensor]) -> torch.Tensor:
        # [G, out, in] viewed as [G, in, out]: the column-major right-hand operand
        # layout the CUDA kernel is tuned for (as in torchtitan).
        return torch.stack(weights).to(dtype).transpose(-2, -1)

    w_gate = stacked([e.gate_proj.weight for e in experts])
    w_up = stacked([e.up_proj.weight for e in experts])
    w_down = stacked([e.down_proj.weight for e in experts])
    x = tokens.to(dtype)
    gate = _DenseGrad.apply(torch._grouped_mm(x, w_gate, offs=offsets))
    up = _DenseGrad.apply(torch._grouped_mm(x, w_up, offs=offsets))
    out = torch._grouped_mm(F.silu(gate) * up, w_down, offs=offsets)
    return _DenseGrad.apply(out)


def compute_dtype(tokens: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in here: the autocast dtype when autocast is on."""
    device = tokens.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return tokens.dtype


def _loop(experts: list[SwiGLU], tokens: torch.Tensor, counts: list[int]) -> torch.Tensor:
    # Empty slices still go through their expert so every hosted expert gets a
    # (zero) gradient instead of None: gradient sync then never sees holes.
    chunks = torch.split(tokens, counts)
    return torch.cat([expert(chunk) for expert, chunk in zip(experts, chunks, strict=True)])


def run_experts(
    experts: list[SwiGLU], tokens: torch.Tensor, counts: list[int], *, grouped: bool | None = None
) -> torch.Tensor:
    """Apply ``experts[i]`` to the ``counts[i]`` consecutive rows of ``tokens`` owned by it.

    ``grouped=None`` (the default) and ``grouped=True`` use the grouped matmul where
    :func:`grouped_mm_supported` (on CPU it is about as fast as the loop, faster with
    many small experts), else the per-expert loop; ``grouped=False`` forces the
    loop. Under autocast the grouped path runs in the autocast dtype, as the loop's
    linears do. Both give the same result up to matmul rounding.
    """
    if not experts:
        return tokens.new_zeros(tokens.shape)
    inter = experts[0].gate_proj.out_features
    dtype = compute_dtype(tokens)
    supported = grouped_mm_supported(tokens.device, dtype, (tokens.shape[-1], inter))
    if grouped is None:
        grouped = supported
    if grouped and supported and tokens.shape[0] > 0:
        return _grouped(experts, tokens, counts, dtype)
    return _loop(experts, tokens, counts)
