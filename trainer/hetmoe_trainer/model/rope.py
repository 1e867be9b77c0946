"""Rotary position embedding in the Bailing (GPT-NeoX "rotate half") layout.

The layout matters for loading published weights: the query/key projections were
trained with the two halves of each head rotated against each other, not with
interleaved pairs.
"""

from __future__ import annotations

import torch


def rope_tables(
    seq_len: int, head_dim: int, theta: float, *, device: torch.device, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos`` and ``sin`` tables of shape ``[seq_len, head_dim]`` for positions 0..seq_len-1.

    Computed in fp32 on every call (cheap next to attention) instead of cached in a
    buffer, so meta-device construction and ``to_empty`` never leave a stale table.
    """
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim)
    )
    positions = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``[B, heads, S, head_dim]`` by the tables of :func:`rope_tables`."""
    return x * cos + _rotate_half(x) * sin
