"""One Ling decoder layer: pre-norm attention, then pre-norm MoE (or dense SwiGLU) FFN."""

from __future__ import annotations

import torch
from torch import nn

from hetmoe_operator.api.model import ModelArchitecture
from hetmoe_operator.api.training import TrainingConfig
from hetmoe_trainer.model.attention import Attention
from hetmoe_trainer.model.dispatch import ExpertParallel
from hetmoe_trainer.model.experts import SwiGLU
from hetmoe_trainer.model.moe import MoE
from hetmoe_trainer.model.norm import RMSNorm


class DecoderLayer(nn.Module):
    """``x + attn(norm(x))``, then ``h + mlp(norm(h))``; submodule names follow Bailing."""

    def __init__(
        self,
        arch: ModelArchitecture,
        training: TrainingConfig,
        ep: ExpertParallel,
        layer_id: int,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.input_layernorm = RMSNorm(
            arch.hidden_size, arch.rms_norm_eps, device=device, dtype=dtype
        )
        self.attention = Attention(arch, device=device, dtype=dtype)
        self.post_attention_layernorm = RMSNorm(
            arch.hidden_size, arch.rms_norm_eps, device=device, dtype=dtype
        )
        self.mlp: MoE | SwiGLU
        if arch.is_moe_layer(layer_id):
            self.mlp = MoE(arch, training, ep, layer_id, device=device, dtype=dtype)
        else:
            assert arch.intermediate_size is not None  # guaranteed by ModelArchitecture
            self.mlp = SwiGLU(arch.hidden_size, arch.intermediate_size, device=device, dtype=dtype)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: int
    ) -> torch.Tensor:
        """``x``: ``[B, S, H]``; ``cos``/``sin``: rotary tables; ``step``: global step."""
        h, normed = self._attend(x, cos, sin)
        ffn = self.mlp(normed, step) if isinstance(self.mlp, MoE) else self.mlp(normed)
        return h + ffn

    def _attend(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The attention half: residual stream after attention and its FFN-side norm."""
        h = x + self.attention(self.input_layernorm(x), cos, sin)
        return h, self.post_attention_layernorm(h)

    def compile_regions(self, backend: str = "inductor") -> None:
        """``torch.compile`` the parts of this layer free of host syncs and collectives.

        The attention half (norms, QKV, RoPE, SDPA, residual) and the dense or shared
        SwiGLU FFN; the router and the expert-parallel dispatch stay eager (they read
        token counts on the host and run all-to-alls). Every layer compiles the same
        code, whose parameters Dynamo treats as inputs, so one compilation serves all
        layers of a shape. ``backend``: a ``torch.compile`` backend (tests use the
        quick ``aot_eager``).
        """
        self._attend = torch.compile(self._attend, backend=backend)  # type: ignore[method-assign]
        ffn = self.mlp.shared_experts if isinstance(self.mlp, MoE) else self.mlp
        if ffn is not None:
            ffn.compile(backend=backend)
