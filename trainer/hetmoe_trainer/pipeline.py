"""Forward and backward of one optimizer step for this rank's replica.

Choice: ``torch.distributed.pipelining`` (``PipelineStage`` + ``Schedule1F1B``), not a
hand-written schedule. It fits because

- uneven replicas: each replica is its own pipeline (one ``pp`` row of the mesh), so
  each builds its ``PipelineStage`` with its own microbatch shape and count; the
  buffers are declared up front (``input_args``/``output_args`` as meta tensors that
  require grad), so no shape-inference forward runs, which matters because a MoE
  forward contains expert-parallel all-to-alls;
- the balancing losses ride on the activations' autograd graph (``AttachAuxLoss``),
  so they need no second loss output through the pipeline;
- expert-parallel all-to-alls inside a stage pair up across replicas because replicas
  of one EP group have the same microbatch count and therefore run the identical
  1F1B action sequence.

Loss scaling: ``scale_grads=False``, and each microbatch's loss is the *sum* of its
token losses divided by the global batch's token count, so the gradients summed over
microbatches and replicas equal those of the single-process mean loss even with
uneven replicas. The balancing losses get the same factor
(``microbatch_size / global_batch_size``) through ``set_aux_loss_scale``.

With one stage (pp = 1) a plain gradient-accumulation loop runs the same maths
without pipeline machinery.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B

from hetmoe_trainer.distributed import ParallelContext
from hetmoe_trainer.model import Stage
from hetmoe_trainer.model.dispatch import ExchangeTimer


class _NaNGradient(torch.autograd.Function):
    """Identity whose backward turns the gradient into NaN (the ``nan`` fault's injection)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, float("nan"))


class StageCompute(nn.Module):
    """The stage under autocast (bf16 on CUDA), returning its declared output dtype.

    Parameters stay fp32 (the optimizer's master weights); only compute is lowered.
    Also accumulates the wall time spent in forward, and the part of it spent in
    expert-parallel exchanges (read from ``exchanges``, the EP group's timer), for the
    per-phase metrics: the exchanges' time in backward is the timer's rest.
    """

    def __init__(
        self,
        stage: Stage,
        device: torch.device,
        compute_dtype: torch.dtype,
        exchanges: ExchangeTimer,
    ) -> None:
        super().__init__()
        self.stage = stage
        self._device_type = device.type
        self._autocast = compute_dtype != torch.float32
        self._compute_dtype = compute_dtype
        self.exchanges = exchanges
        self.forward_seconds = 0.0
        self.forward_exchange_seconds = 0.0
        self.nan_gradients = False
        """Fault injection: make this stage's backward produce NaN gradients."""

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Run the stage at the step set with ``Stage.set_step``."""
        start, exchanged = time.perf_counter(), self.exchanges.seconds
        with torch.autocast(self._device_type, self._compute_dtype, enabled=self._autocast):
            out = self.stage(inputs)
        self.forward_seconds += time.perf_counter() - start
        self.forward_exchange_seconds += self.exchanges.seconds - exchanged
        if self.nan_gradients and out.requires_grad:
            out = _NaNGradient.apply(out)
        return out.to(self.stage.output.dtype)


class StepRunner:
    """Runs the microbatches of one step through my stage (and the pipeline, if any)."""

    def __init__(self, stage: Stage, context: ParallelContext) -> None:
        plan = context.plan
        replica = context.replica
        training = plan.training
        self.stage = stage
        self.context = context
        self.num_microbatches = replica.num_microbatches
        self.microbatch_size = replica.microbatch_size
        self._token_weight = 1.0 / (training.global_batch_size * training.sequence_length)
        self.loss_scale = 1.0
        """Extra factor on the loss (fault injection of a loss spike); 1.0 normally."""
        stage.set_aux_loss_scale(replica.microbatch_size / training.global_batch_size)
        self.compute = StageCompute(
            stage,
            context.device.device,
            context.device.compute_dtype,
            context.expert_parallel.timer,
        )
        self.is_first = context.me.stage == 0
        self.is_last = context.me.stage == plan.parallel.pp - 1
        self._schedule: Schedule1F1B | None = None
        if plan.parallel.pp > 1:
            self._schedule = self._build_schedule()

    def loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Token-summed cross-entropy over the global batch's token count."""
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
        return loss * (self._token_weight * self.loss_scale)

    def _build_schedule(self) -> Schedule1F1B:
        plan, context = self.context.plan, self.context
        seq, hidden = plan.training.sequence_length, plan.model.hidden_size
        device = context.device.device
        shape = (self.microbatch_size, seq)
        if self.is_first:
            inputs = torch.empty(shape, dtype=torch.long, device="meta")
        else:
            inputs = torch.empty((*shape, hidden), dtype=self.stage_input_dtype(), device="meta")
            inputs.requires_grad_(True)
        output = torch.empty(
            self.stage.output.shape(*shape), dtype=self.stage.output.dtype, device="meta"
        ).requires_grad_(True)
        pipe = PipelineStage(
            self.compute,
            context.me.stage,
            plan.parallel.pp,
            device,
            input_args=(inputs,),
            output_args=(output,),
            group=context.pp_group,
        )
        # The pp group orders members by process rank, not by stage: tell the stage
        # which group rank holds each stage of my replica.
        column = [context.mesh.mesh[s][context.me.dp_index].item() for s in range(plan.parallel.pp)]
        pipe.stage_index_to_group_rank = {
            s: dist.get_group_rank(context.pp_group, process) for s, process in enumerate(column)
        }
        return Schedule1F1B(pipe, self.num_microbatches, loss_fn=self.loss_fn, scale_grads=False)

    def stage_input_dtype(self) -> torch.dtype:
        """Dtype of the hidden states received from the previous stage (its parameter dtype)."""
        return next(self.stage.parameters()).dtype

    def run(
        self, inputs: torch.Tensor | None, targets: torch.Tensor | None, step: int
    ) -> torch.Tensor:
        """Forward + backward of all microbatches; returns this rank's share of the loss.

        ``inputs`` is needed on the first stage, ``targets`` on the last; the returned
        scalar is the replica's contribution to the global mean loss (0 off the last stage).
        """
        self.stage.set_step(step)
        self.stage.train()
        total = torch.zeros((), dtype=torch.float32, device=self.context.device.device)
        if self._schedule is None:
            assert inputs is not None and targets is not None
            for x, y in zip(
                inputs.split(self.microbatch_size), targets.split(self.microbatch_size), strict=True
            ):
                loss = self.loss_fn(self.compute(x), y)
                loss.backward()
                total += loss.detach()
            return total
        losses: list[torch.Tensor] = []
        if self.is_first:
            self._schedule.step(inputs)
        elif self.is_last:
            self._schedule.step(target=targets, losses=losses)
        else:
            self._schedule.step()
        for loss in losses:
            total += loss.detach().float()
        return total
