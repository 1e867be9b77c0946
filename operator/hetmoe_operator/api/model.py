"""MoE model architectures, named as in the public Bailing MoE ``config.json``.

Field names deliberately stay snake_case on the wire so that a user can paste the
architecture block of a published Ling config into a MoEJob unchanged.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Literal

from pydantic import ConfigDict, Field, model_validator

from hetmoe_operator.api.base import ApiModel

PresetName = Literal["tiny", "ling-lite", "ling-plus"]


class ModelArchitecture(ApiModel):
    """Architecture of a Ling (Bailing) MoE decoder: RMSNorm, GQA + RoPE, SwiGLU experts."""

    model_config = ConfigDict(alias_generator=None)

    num_hidden_layers: int = Field(ge=1, le=1024)
    """Number of transformer blocks."""
    hidden_size: int = Field(ge=8, le=65536)
    """Model width."""
    num_attention_heads: int = Field(ge=1, le=1024)
    """Query heads."""
    num_key_value_heads: int = Field(ge=1, le=1024)
    """Key/value heads (grouped-query attention); must divide num_attention_heads."""
    head_dim: int | None = Field(default=None, ge=4, le=1024)
    """Per-head width; defaults to hidden_size / num_attention_heads."""
    num_experts: int = Field(ge=1, le=4096)
    """Routed experts per MoE layer."""
    num_shared_experts: int = Field(default=0, ge=0, le=64)
    """Always-active shared experts per MoE layer."""
    num_experts_per_tok: int = Field(ge=1, le=64)
    """Top-k: routed experts chosen per token."""
    moe_intermediate_size: int = Field(ge=1, le=1 << 20)
    """Hidden width of one routed (and each shared) SwiGLU expert."""
    intermediate_size: int | None = Field(default=None, ge=1, le=1 << 20)
    """Hidden width of the dense FFN used by the first ``first_k_dense_replace`` layers."""
    first_k_dense_replace: int = Field(default=0, ge=0)
    """The first k layers use a dense FFN instead of experts."""
    vocab_size: int = Field(ge=2, le=1 << 22)
    """Vocabulary size (untied input embedding and LM head)."""
    max_position_embeddings: int = Field(default=4096, ge=1)
    """Longest sequence the rotary embedding is built for."""
    rope_theta: float = Field(default=600000.0, gt=0)
    """RoPE base."""
    rms_norm_eps: float = Field(default=1e-6, gt=0, lt=1)
    """RMSNorm epsilon."""
    norm_head: bool = True
    """L2-normalise LM-head rows before computing logits (NormHead)."""
    initializer_range: float = Field(default=0.006, gt=0)
    """Standard deviation of the normal weight initialisation."""

    @model_validator(mode="after")
    def _consistent(self) -> ModelArchitecture:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(
                f"num_experts_per_tok ({self.num_experts_per_tok}) cannot exceed "
                f"num_experts ({self.num_experts})"
            )
        if self.first_k_dense_replace > self.num_hidden_layers:
            raise ValueError("first_k_dense_replace cannot exceed num_hidden_layers")
        if self.first_k_dense_replace and self.intermediate_size is None:
            raise ValueError("intermediate_size is required when first_k_dense_replace > 0")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError("set head_dim: hidden_size is not divisible by num_attention_heads")
        return self

    @property
    def resolved_head_dim(self) -> int:
        """head_dim, or hidden_size / num_attention_heads when unset."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    def is_moe_layer(self, layer: int) -> bool:
        """Whether global layer ``layer`` uses experts (not one of the first dense layers)."""
        return layer >= self.first_k_dense_replace

    @property
    def num_moe_layers(self) -> int:
        """Number of layers with routed experts."""
        return self.num_hidden_layers - self.first_k_dense_replace

    @property
    def attention_params(self) -> int:
        """Parameters of one attention block (q, k, v, o projections and its norm)."""
        q_and_o = 2 * self.hidden_size * self.num_attention_heads * self.resolved_head_dim
        k_and_v = 2 * self.hidden_size * self.num_key_value_heads * self.resolved_head_dim
        return q_and_o + k_and_v + self.hidden_size

    @property
    def expert_params(self) -> int:
        """Parameters of one routed SwiGLU expert (gate, up and down projections)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    @property
    def shared_expert_params(self) -> int:
        """Parameters of all shared experts of one layer."""
        return self.num_shared_experts * self.expert_params

    @property
    def router_params(self) -> int:
        """Parameters of one layer's router (gate)."""
        return self.hidden_size * self.num_experts

    @property
    def dense_ffn_params(self) -> int:
        """Parameters of one dense FFN layer (0 when the model has none)."""
        return 3 * self.hidden_size * (self.intermediate_size or 0)

    @property
    def embedding_params(self) -> int:
        """Parameters of the input embedding (the LM head has as many)."""
        return self.vocab_size * self.hidden_size

    def layer_params(self, layer: int) -> int:
        """All parameters of global layer ``layer`` (every routed expert counted once)."""
        ffn = (
            self.router_params + self.num_experts * self.expert_params + self.shared_expert_params
            if self.is_moe_layer(layer)
            else self.dense_ffn_params
        )
        return self.attention_params + self.hidden_size + ffn

    def layer_active_params(self, layer: int) -> int:
        """Parameters one token touches in global layer ``layer``."""
        ffn = (
            self.router_params
            + self.num_experts_per_tok * self.expert_params
            + self.shared_expert_params
            if self.is_moe_layer(layer)
            else self.dense_ffn_params
        )
        return self.attention_params + self.hidden_size + ffn

    @property
    def total_params(self) -> int:
        """All parameters: layers, embedding, LM head and final norm."""
        layers = sum(self.layer_params(i) for i in range(self.num_hidden_layers))
        return layers + 2 * self.embedding_params + self.hidden_size

    @property
    def active_params(self) -> int:
        """Parameters used per token."""
        layers = sum(self.layer_active_params(i) for i in range(self.num_hidden_layers))
        return layers + 2 * self.embedding_params + self.hidden_size


PRESETS: MappingProxyType[str, ModelArchitecture] = MappingProxyType(
    {
        # Small enough for CPU tests with several gloo processes, still every feature:
        # GQA, shared experts, a dense first layer, top-k > 1.
        "tiny": ModelArchitecture(
            num_hidden_layers=6,
            hidden_size=64,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts=8,
            num_shared_experts=1,
            num_experts_per_tok=2,
            moe_intermediate_size=32,
            intermediate_size=128,
            first_k_dense_replace=1,
            vocab_size=512,
            max_position_embeddings=512,
            rope_theta=10000.0,
            rms_norm_eps=1e-6,
            initializer_range=0.02,
        ),
        "ling-lite": ModelArchitecture(
            num_hidden_layers=28,
            hidden_size=2048,
            num_attention_heads=16,
            num_key_value_heads=4,
            head_dim=128,
            num_experts=64,
            num_shared_experts=2,
            num_experts_per_tok=6,
            moe_intermediate_size=1408,
            vocab_size=126464,
            max_position_embeddings=16384,
            rms_norm_eps=1e-6,
        ),
        "ling-plus": ModelArchitecture(
            num_hidden_layers=88,
            hidden_size=5376,
            num_attention_heads=56,
            num_key_value_heads=8,
            head_dim=96,
            num_experts=64,
            num_shared_experts=1,
            num_experts_per_tok=4,
            moe_intermediate_size=3072,
            vocab_size=126464,
            max_position_embeddings=16384,
            rms_norm_eps=1e-6,
        ),
    }
)
"""Shipped architectures; ling-lite and ling-plus follow the public Bailing configs."""
