"""Our stage computes what the Bailing reference computes, from the same named tensors.

The oracle below is written independently from the reference model's definition
(inclusionAI/Ling ``modeling_bailing_moe.py``): plain matmuls, eager softmax
attention with ``repeat_kv``, rotate-half RoPE on positions 0..S-1, a per-expert
masked loop for the MoE, shared experts of width k * I, and NormHead normalising
``lm_head.weight`` over dim 0. It reads the reference-named state dict, so it also
checks that every name carries the tensor the reference expects under it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hetmoe_operator.api.model import ModelArchitecture
from hetmoe_trainer.weights import reference_state


def _rms(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def _mlp(x: torch.Tensor, sd: dict[str, torch.Tensor], p: str) -> torch.Tensor:
    gate, up, down = (sd[f"{p}.{n}.weight"] for n in ("gate_proj", "up_proj", "down_proj"))
    return (F.silu(x @ gate.t()) * (x @ up.t())) @ down.t()


def _rotate(x: torch.Tensor, theta: float) -> torch.Tensor:
    seq, dim = x.shape[-2], x.shape[-1]
    inv = 1.0 / theta ** (torch.arange(0, dim, 2).float() / dim)
    freqs = torch.outer(torch.arange(seq).float(), inv)
    emb = torch.cat([freqs, freqs], -1)
    rotated = torch.cat([-x[..., dim // 2 :], x[..., : dim // 2]], -1)
    return x * emb.cos() + rotated * emb.sin()


def _attention(x: torch.Tensor, sd: dict[str, torch.Tensor], p: str, arch: ModelArchitecture):
    b, s, _ = x.shape
    nh, nkv, hd = arch.num_attention_heads, arch.num_key_value_heads, arch.resolved_head_dim
    qkv = (x @ sd[f"{p}.query_key_value.weight"].t()).view(b, s, nh + 2 * nkv, hd)
    q, k, v = (t.transpose(1, 2) for t in qkv.split([nh, nkv, nkv], dim=2))
    q, k = _rotate(q, arch.rope_theta), _rotate(k, arch.rope_theta)
    k = k.repeat_interleave(nh // nkv, dim=1)
    v = v.repeat_interleave(nh // nkv, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.softmax(scores, -1) @ v
    return out.transpose(1, 2).reshape(b, s, nh * hd) @ sd[f"{p}.dense.weight"].t()


def _moe(x: torch.Tensor, sd: dict[str, torch.Tensor], p: str, arch: ModelArchitecture):
    flat = x.reshape(-1, x.shape[-1])
    scores = torch.softmax(flat @ sd[f"{p}.gate.weight"].t(), -1)
    weights, ids = torch.topk(scores, arch.num_experts_per_tok, -1)
    weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros_like(flat)
    for e in range(arch.num_experts):
        for slot in range(arch.num_experts_per_tok):
            mask = ids[:, slot] == e
            if mask.any():
                expert_out = _mlp(flat[mask], sd, f"{p}.experts.{e}")
                out[mask] += weights[mask, slot, None] * expert_out
    out = out.view_as(x)
    if arch.num_shared_experts:
        out = out + _mlp(x, sd, f"{p}.shared_experts")
    return out


def reference_logits(
    arch: ModelArchitecture, sd: dict[str, torch.Tensor], tokens: torch.Tensor
) -> torch.Tensor:
    """Logits of the Bailing reference forward (eval, no cache) from named tensors."""
    x = sd["model.word_embeddings.weight"][tokens]
    eps = arch.rms_norm_eps
    for i in range(arch.num_hidden_layers):
        p = f"model.layers.{i}"
        x = x + _attention(
            _rms(x, sd[f"{p}.input_layernorm.weight"], eps), sd, f"{p}.attention", arch
        )
        h = _rms(x, sd[f"{p}.post_attention_layernorm.weight"], eps)
        x = x + (_moe(h, sd, f"{p}.mlp", arch) if arch.is_moe_layer(i) else _mlp(h, sd, f"{p}.mlp"))
    x = _rms(x, sd["model.norm.weight"], eps)
    head = sd["lm_head.weight"]
    if arch.norm_head:
        head = head / (head.norm(p=2, dim=0, keepdim=True) + 1e-7)
    return x @ head.t()


def test_stage_matches_reference_forward(make_stage, tiny):
    model = make_stage().eval()
    tokens = torch.randint(0, tiny.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens, step=100)
        theirs = reference_logits(tiny, reference_state(model), tokens)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


def test_stage_matches_reference_without_norm_head_and_with_wide_heads(make_stage, tiny):
    arch = tiny.model_copy(update={"norm_head": False, "head_dim": 32, "num_shared_experts": 2})
    model = make_stage(arch=arch).eval()
    tokens = torch.randint(0, arch.vocab_size, (1, 7), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(tokens, step=0)
        theirs = reference_logits(arch, reference_state(model), tokens)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
