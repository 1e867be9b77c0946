"""Token-choice top-k router of the Ling MoE: fp32 softmax gate and its stability losses.

What the router does, in order:

1. logits = x W^T in fp32 (``mlp.gate.weight``), whatever the activation dtype;
2. during routing warmup (training only, ``step < routing_warmup_steps``) the logits
   used for routing are ``a * logits + (1 - a) * noise`` with ``a = step / W``; the
   noise is drawn from the mean and std of the logits it replaces (per token,
   detached), so it has the scale of the signal. Its standard-normal part depends
   only on (seed, layer, step, position, expert), never on the batch layout, so
   every pp/ep/dp split draws the same noise for the same token;
3. softmax in fp32, top-k selection (on score + bias when balancing is ``bias``),
   the k chosen probabilities renormalised to sum to one (``norm_topk_prob``; like
   the reference, a top-1 router keeps the raw probability);
4. load-balance aux loss ``coef * E * sum_e f_e * P_e`` (f_e: share of the T*k routed
   slots sent to expert e, P_e: mean router probability of e, both over this
   microbatch, Switch/Megatron style) and router z-loss
   ``coef * mean_t logsumexp(logits_t)^2``, both on the raw (un-noised) logits.
   In ``bias`` balancing the aux loss is off; the z-loss stays.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hetmoe_trainer.model.init import cpu_generator


@dataclass(frozen=True)
class Routing:
    """The routing decision for the T = B*S tokens of one microbatch."""

    expert_ids: torch.Tensor
    """``[T, k]`` global expert ids chosen per token."""
    weights: torch.Tensor
    """``[T, k]`` fp32 combine weights, each row summing to one."""
    aux_loss: torch.Tensor
    """Scalar, already multiplied by its coefficient (zero when disabled)."""
    z_loss: torch.Tensor
    """Scalar, already multiplied by its coefficient."""
    counts: torch.Tensor
    """``[E]`` int64 routed slots per global expert (detached)."""


def load_balance_loss(
    probs: torch.Tensor, expert_ids: torch.Tensor, num_experts: int
) -> torch.Tensor:
    """``E * sum_e f_e * P_e``: 1.0 under perfect balance, E under total collapse."""
    tokens, top_k = expert_ids.shape
    counts = torch.bincount(expert_ids.flatten(), minlength=num_experts).to(probs.dtype)
    slot_share = counts / (tokens * top_k)
    mean_prob = probs.mean(dim=0)
    return num_experts * torch.sum(slot_share * mean_prob)


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean squared log-partition of the router logits (ST-MoE), keeps logits small."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


class Router(nn.Module):
    """The ``mlp.gate`` of one MoE layer (see the module docstring for the maths)."""

    def __init__(
        self,
        hidden_size: int,
        num_experts: int,
        top_k: int,
        *,
        layer_id: int,
        seed: int,
        aux_loss_coef: float,
        z_loss_coef: float,
        balancing: str,
        warmup_steps: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.layer_id = layer_id
        self.seed = seed
        self.aux_loss_coef = aux_loss_coef if balancing == "aux-loss" else 0.0
        self.z_loss_coef = z_loss_coef
        self.warmup_steps = warmup_steps
        self.weight = nn.Parameter(
            torch.empty(num_experts, hidden_size, device=device, dtype=dtype)
        )
        self.expert_bias: torch.Tensor | None
        if balancing == "bias":
            self.register_buffer(
                "expert_bias", torch.zeros(num_experts, device=device, dtype=torch.float32)
            )
        else:
            self.expert_bias = None

    def warmup_weight(self, step: int) -> float:
        """Share of the real logits in the routing logits at ``step`` (1.0 after warmup)."""
        if self.warmup_steps <= 0 or step >= self.warmup_steps:
            return 1.0
        return max(step, 0) / self.warmup_steps

    def warmup_noise(self, logits: torch.Tensor, step: int) -> torch.Tensor:
        """Noise shaped like ``logits`` (``[B, S, E]``) with each token's logit mean and std.

        The standard-normal draw is ``[S, E]``, seeded by (seed, layer, step) on CPU and
        shared by every sequence, so it is identical on every device and parallel layout.
        """
        _, seq, experts = logits.shape
        gen = cpu_generator(self.seed, "routing-warmup", self.layer_id, step)
        standard = torch.randn(seq, experts, generator=gen).to(logits.device)
        detached = logits.detach()
        mean = detached.mean(dim=-1, keepdim=True)
        std = detached.std(dim=-1, keepdim=True, unbiased=False)
        return mean + std * standard

    def forward(self, x: torch.Tensor, step: int) -> Routing:
        """Route ``x`` of shape ``[B, S, H]`` at global optimizer step ``step``."""
        # Autocast would run the linear in bf16 despite the fp32 operands: opt out.
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        routing_logits = logits
        alpha = self.warmup_weight(step) if self.training else 1.0
        if alpha < 1.0:
            routing_logits = alpha * logits + (1.0 - alpha) * self.warmup_noise(logits, step)

        flat_logits = logits.flatten(0, 1)
        scores = torch.softmax(routing_logits.flatten(0, 1), dim=-1, dtype=torch.float32)
        if self.expert_bias is None:
            top_scores, expert_ids = torch.topk(scores, self.top_k, dim=-1)
        else:
            _, expert_ids = torch.topk(scores + self.expert_bias, self.top_k, dim=-1)
            top_scores = scores.gather(-1, expert_ids)
        # As the reference: top-1 keeps its probability, top-k > 1 renormalises.
        weights = (
            top_scores / top_scores.sum(dim=-1, keepdim=True) if self.top_k > 1 else top_scores
        )

        zero = flat_logits.new_zeros(())
        aux = zero
        if self.aux_loss_coef > 0 and self.training:
            probs = torch.softmax(flat_logits, dim=-1)
            aux = self.aux_loss_coef * load_balance_loss(probs, expert_ids, self.num_experts)
        zl = (
            self.z_loss_coef * z_loss(flat_logits)
            if self.z_loss_coef > 0 and self.training
            else zero
        )
        counts = torch.bincount(expert_ids.flatten(), minlength=self.num_experts)
        return Routing(expert_ids, weights, aux, zl, counts)

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, rate: float) -> None:
        """Aux-loss-free balancing step: raise the bias of under-loaded experts, lower the rest.

        ``load`` must be the same on every rank (token counts summed over the data-
        parallel group) so all replicas of the router keep the same bias.
        """
        if self.expert_bias is None:
            raise RuntimeError("update_bias needs training.balancing == 'bias'")
        load = load.to(self.expert_bias.device, torch.float32)
        self.expert_bias.add_(rate * torch.sign(load.mean() - load))
