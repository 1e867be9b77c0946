"""Grouped-query causal self-attention with RoPE and no biases (Bailing layout)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hetmoe_operator.api.model import ModelArchitecture
from hetmoe_trainer.model.rope import apply_rope


class Attention(nn.Module):
    """GQA attention whose q, k and v projections are fused like the reference.

    Keeping ``query_key_value`` fused (rows: all query heads, then key heads, then
    value heads) makes published Ling weights load without reshuffling and costs a
    single matmul instead of three.
    """

    def __init__(
        self,
        arch: ModelArchitecture,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.num_heads = arch.num_attention_heads
        self.num_kv_heads = arch.num_key_value_heads
        self.head_dim = arch.resolved_head_dim
        qkv_width = (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        self.query_key_value = nn.Linear(
            arch.hidden_size, qkv_width, bias=False, device=device, dtype=dtype
        )
        self.dense = nn.Linear(
            self.num_heads * self.head_dim, arch.hidden_size, bias=False, device=device, dtype=dtype
        )

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``x``: ``[B, S, H]``; ``cos``/``sin``: ``[S, head_dim]`` rotary tables."""
        batch, seq, _ = x.shape
        qkv = self.query_key_value(x).view(
            batch, seq, self.num_heads + 2 * self.num_kv_heads, self.head_dim
        )
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=self.num_kv_heads != self.num_heads
        )
        return self.dense(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))
