"""The MoE feed-forward block: router, routed experts (expert parallel) and shared experts.

Balancing losses never pass through the pipeline's loss function: each block attaches
its aux + z loss to its own output with :class:`AttachAuxLoss` (Megatron's
MoEAuxLossAutoScaler idea). Forward is the identity; backward additionally feeds
``scale`` as the gradient of the attached loss, so whichever stage holds the layer
backpropagates the balancing losses when its output gradient arrives.

Aux-loss scale convention: the attached loss receives gradient ``scale``, read at
forward time from :meth:`MoE.set_aux_loss_scale` (default 1.0). Set it to the factor
the microbatch's language-model loss carries into backward, so both losses are
weighted alike:

- equal microbatches, mean loss per microbatch: ``1 / num_microbatches`` (or 1.0
  when the pipeline schedule divides gradients afterwards, ``scale_grads=True``);
- data-parallel replicas of uneven batch size with gradients *summed* over
  replicas: ``microbatch_size / global_batch_size`` (times the dp world size when
  gradients are *averaged* instead, as DDP does).

The balancing losses are computed per microbatch (their f_e * P_e product is not
additive over tokens), so a run is layout-independent when its microbatch
partition is; ``bias`` balancing has no aux loss and no such constraint.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hetmoe_operator.api.model import ModelArchitecture
from hetmoe_operator.api.training import TrainingConfig
from hetmoe_trainer.model.dispatch import ExpertParallel, TokenDispatcher
from hetmoe_trainer.model.experts import RoutedExperts, SwiGLU, compute_dtype
from hetmoe_trainer.model.router import Router


class AttachAuxLoss(torch.autograd.Function):
    """Identity on ``output``; backward also sends gradient ``scale`` into ``aux_loss``."""

    @staticmethod
    def forward(
        ctx: Any,
        output: torch.Tensor,
        aux_loss: torch.Tensor,
        scale: float,
    ) -> torch.Tensor:
        ctx.save_for_backward(aux_loss)
        ctx.scale = scale
        return output.view_as(output)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, None]:
        (aux_loss,) = ctx.saved_tensors
        return grad, torch.full_like(aux_loss, ctx.scale), None


class MoE(nn.Module):
    """``mlp`` of a Ling MoE layer: ``shared_experts(x) + sum_k w_k * expert_k(x)``."""

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
        self.gate = Router(
            arch.hidden_size,
            arch.num_experts,
            arch.num_experts_per_tok,
            layer_id=layer_id,
            seed=training.seed,
            aux_loss_coef=training.aux_loss_coef,
            z_loss_coef=training.z_loss_coef,
            balancing=training.balancing,
            warmup_steps=training.routing_warmup_steps,
            device=device,
            dtype=dtype,
        )
        self.experts = RoutedExperts(
            arch.hidden_size,
            arch.moe_intermediate_size,
            ep.local_experts,
            device=device,
            dtype=dtype,
        )
        # The reference fuses all shared experts into one SwiGLU of width k * I.
        self.shared_experts = (
            SwiGLU(
                arch.hidden_size,
                arch.moe_intermediate_size * arch.num_shared_experts,
                device=device,
                dtype=dtype,
            )
            if arch.num_shared_experts
            else None
        )
        self.dispatcher = TokenDispatcher(ep, arch.num_experts)
        self.grouped_mm: bool | None = None
        """None/True: grouped matmul where supported; False: per-expert loop (alignment)."""
        self.aux_loss_scale = 1.0
        self.num_experts = arch.num_experts
        # Accumulated on the routing device without host syncs; popped by the runtime.
        self._load: torch.Tensor | None = None
        self.record_stats = True
        """False while activation recompute re-runs this block's forward in backward."""
        self._aux_sum: torch.Tensor | None = None
        self._aux_calls = 0

    def set_aux_loss_scale(self, scale: float) -> None:
        """Gradient given to this layer's attached aux + z loss (see the module docstring)."""
        self.aux_loss_scale = scale

    def pop_expert_load(self) -> torch.Tensor:
        """Routed slots per global expert since the last call (this rank's tokens only)."""
        load, self._load = self._load, None
        if load is None:
            return torch.zeros(self.num_experts, dtype=torch.int64, device=self.gate.weight.device)
        return load

    def pop_aux_losses(self) -> dict[str, float]:
        """Mean aux and z loss (coefficient included) per forward since the last call."""
        total, calls = self._aux_sum, self._aux_calls
        self._aux_sum, self._aux_calls = None, 0
        if total is None:
            return {"aux_loss": 0.0, "z_loss": 0.0}
        aux, z = (total / calls).tolist()
        return {"aux_loss": aux, "z_loss": z}

    def _compute(self, tokens: torch.Tensor, counts: list[int]) -> torch.Tensor:
        return self.experts(tokens, counts, grouped=self.grouped_mm)

    def _record(self, counts: torch.Tensor, losses: torch.Tensor) -> None:
        if not self.record_stats:  # activation recompute re-runs forward: count once
            return
        self._load = counts if self._load is None else self._load + counts
        self._aux_sum = losses if self._aux_sum is None else self._aux_sum + losses
        self._aux_calls += 1

    def forward(self, x: torch.Tensor, step: int) -> torch.Tensor:
        """``x``: ``[B, S, H]`` normalised hidden states; ``step``: global optimizer step.

        The shared expert runs in two halves of the tokens, each while one of the
        round trip's all-to-alls is in flight (and, in backward, each half's gradient
        while that exchange's transpose is): the overlap the planner's cost model
        assumes. Halves of the tokens, not of the FFN, so the shared expert stays a
        module called whole (hooks, regional compile and the align tool, which names
        the second call ``#2``, still see it).
        """
        routing = self.gate(x, step)
        shared = self.shared_experts
        halves = x.flatten(0, 1).tensor_split(2)
        # Under autocast the experts compute in bf16 anyway: send bf16, not fp32.
        trip = self.dispatcher.send(x.flatten(0, 1).to(compute_dtype(x)), routing.expert_ids)
        first = shared(halves[0]) if shared is not None else None  # hides the dispatch
        trip.compute(self._compute)
        second = shared(halves[1]) if shared is not None else None  # hides the combine
        out = trip.combine(routing.weights).view_as(x)
        if first is not None and second is not None:
            out = out + torch.cat([first, second]).view_as(x)

        self._record(routing.counts, torch.stack([routing.aux_loss, routing.z_loss]).detach())
        if self.training and out.requires_grad:
            out = AttachAuxLoss.apply(out, routing.aux_loss + routing.z_loss, self.aux_loss_scale)
        return out
