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

Interleaved 1F1B (``plan.virtual_stages`` = v > 1): the rank at pipeline position
``r`` runs v ``PipelineStage`` objects, virtual stages ``r, r + pp, ...``, each a view
(:class:`ChunkCompute`) of one chunk of the rank's single :class:`Stage` module, under
``ScheduleInterleaved1F1B``. The stage module, its parameter names and everything
after the backward (gradient sync, optimizer, checkpoint) are the same as with 1F1B.
That schedule places virtual stage ``s`` on pp-group rank ``s % pp``; the pp group's
ranks follow the pipeline positions whatever order torchrun numbered the processes in
(``build_context`` keeps the mesh's rank order).

Zero-bubble V (``plan.pipeline_shape == "v"``, two chunks per position): position ``r``
holds stages ``r`` and ``2 pp - 1 - r`` (:meth:`Plan.stages_at`) under
``ScheduleZBVZeroBubble``, which places them on pp-group rank ``r`` itself. Position 0
then holds both the embedding and the LM head, so "reads inputs" and "needs targets /
reports the loss" are decided by the stage indices a position holds, never by the
position alone. ZBV splits each backward into an input-gradient action (I) and a
weight-gradient action (W) that runs later (``torch.autograd.grad`` on saved graph
nodes, not ``.backward()``); what that means for the rest of the step:

- gradients still accumulate into ``param.grad`` once per microbatch, so the sum over
  microbatches and the gradient sync after the schedule are unchanged;
- ``register_post_accumulate_grad_hook`` does not fire for W's direct ``.grad``
  writes (only stage 0, whose W is a full backward, fires it), so overlapped gradient
  sync launches little or nothing during backward and :meth:`GradientSync.sync` sends
  the rest: correct, with less overlap;
- expert-parallel all-to-alls run in I (they lie between a stage's output and input);
  every member of an EP group runs the same action sequence, so they still pair up;
- activation recompute re-runs a checkpointed layer in I and again in W (a second
  autograd pass over the same graph): correct, roughly one extra layer forward per
  recomputed layer and microbatch;
- regional ``torch.compile`` is rejected (torch does not support the I/W split of
  compiled regions).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from hetmoe_trainer.distributed import ParallelContext, PlanError
from hetmoe_trainer.model import Stage
from hetmoe_trainer.model.dispatch import ExchangeTimer

if TYPE_CHECKING:
    # Imported where a pipeline is built (pp > 1): torch.distributed.pipelining pulls
    # in torch._dynamo, about 1.6 s of every worker's start that pp=1 plans never use.
    from torch.distributed.pipelining import (
        PipelineStage,
        Schedule1F1B,
        ScheduleInterleaved1F1B,
        ScheduleInterleavedZeroBubble,
        ScheduleZBVZeroBubble,
    )

    _Schedule = (
        Schedule1F1B
        | ScheduleInterleaved1F1B
        | ScheduleInterleavedZeroBubble
        | ScheduleZBVZeroBubble
    )


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

    def forward(self, inputs: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        """Run the stage (or one chunk of it) at the step set with ``Stage.set_step``."""
        start, exchanged = time.perf_counter(), self.exchanges.seconds
        with torch.autocast(self._device_type, self._compute_dtype, enabled=self._autocast):
            out = self.stage(inputs, chunk=chunk)
        self.forward_seconds += time.perf_counter() - start
        self.forward_exchange_seconds += self.exchanges.seconds - exchanged
        if self.nan_gradients and out.requires_grad:
            out = _NaNGradient.apply(out)
        output = self.stage.output if chunk is None else self.stage.chunk_output(chunk)
        return out.to(output.dtype)


class ChunkCompute(nn.Module):
    """One chunk of the stage as its own module: the submodule of one virtual pipeline stage.

    It only forwards to the shared :class:`StageCompute`, so the parameters stay those
    of the one stage module (no copies, global names) and timing accumulates in one place.
    """

    def __init__(self, compute: StageCompute, chunk: int) -> None:
        super().__init__()
        self.compute = compute
        self.chunk = chunk

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Run chunk ``self.chunk``."""
        return self.compute(inputs, chunk=self.chunk)


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
        self.stage_indices = [chunk.index for chunk in plan.stages_at(context.me.stage)]
        """The (virtual) stages my position holds, in schedule order."""
        self.is_first = 0 in self.stage_indices
        """I hold the embedding (stage 0): I read the input tokens."""
        self.is_last = len(plan.stages) - 1 in self.stage_indices
        """I hold the LM head (last stage): I need the targets and report the loss."""
        self._schedule: _Schedule | None = None
        if plan.parallel.pp > 1:
            self._schedule = self._build_schedule()

    def loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Token-summed cross-entropy over the global batch's token count."""
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="sum")
        return loss * (self._token_weight * self.loss_scale)

    def _build_schedule(self) -> _Schedule:
        from torch.distributed.pipelining import (
            Schedule1F1B,
            ScheduleInterleaved1F1B,
            ScheduleInterleavedZeroBubble,
            ScheduleZBVZeroBubble,
        )

        plan, context = self.context.plan, self.context
        pp, virtual = plan.parallel.pp, plan.virtual_stages
        # The pp group orders members by process rank, not by stage: tell each stage
        # which group rank holds each (virtual) stage of my replica.
        column = [context.mesh.mesh[s][context.me.dp_index].item() for s in range(pp)]
        group_rank = [dist.get_group_rank(context.pp_group, process) for process in column]
        if virtual == 1 and not plan.splits_backward:
            pipe = self._pipeline_stage(0, context.me.stage, pp, self.compute)
            pipe.stage_index_to_group_rank = {s: group_rank[s] for s in range(pp)}
            return Schedule1F1B(
                pipe, self.num_microbatches, loss_fn=self.loss_fn, scale_grads=False
            )
        if group_rank != list(range(pp)):
            raise PlanError(
                f"{plan.schedule_name} needs the pp group's ranks in stage order "
                f"(replica {context.me.dp_index} has processes {column} for stages 0..{pp - 1} "
                f"at group ranks {group_rank}); build the mesh with preserve_rank_order"
            )
        if virtual == 1:  # ZB-H1: the whole stage module, as under 1F1B
            pipes = [self._pipeline_stage(0, context.me.stage, pp, self.compute)]
        else:
            pipes = [
                self._pipeline_stage(k, index, pp * virtual, ChunkCompute(self.compute, k))
                for k, index in enumerate(self.stage_indices)
            ]
        schedule = (
            ScheduleZBVZeroBubble
            if plan.pipeline_shape == "v"
            else ScheduleInterleavedZeroBubble
            if plan.splits_backward
            else ScheduleInterleaved1F1B
        )
        return schedule(pipes, self.num_microbatches, loss_fn=self.loss_fn, scale_grads=False)

    def _pipeline_stage(
        self, chunk: int, index: int, num_stages: int, module: nn.Module
    ) -> PipelineStage:
        """The ``PipelineStage`` of (virtual) stage ``index``, with buffers declared up front."""
        from torch.distributed.pipelining import PipelineStage

        context = self.context
        seq, hidden = context.plan.training.sequence_length, context.plan.model.hidden_size
        shape = (self.microbatch_size, seq)
        if index == 0:
            inputs = torch.empty(shape, dtype=torch.long, device="meta")
        else:
            inputs = torch.empty((*shape, hidden), dtype=self.stage_input_dtype(), device="meta")
            inputs.requires_grad_(True)
        output = self.stage.chunk_output(chunk)
        outputs = torch.empty(output.shape(*shape), dtype=output.dtype, device="meta")
        return PipelineStage(
            module,
            index,
            num_stages,
            context.device.device,
            input_args=(inputs,),
            output_args=(outputs.requires_grad_(True),),
            group=context.pp_group,
        )

    def stage_input_dtype(self) -> torch.dtype:
        """Dtype of the hidden states received from the previous stage (its parameter dtype)."""
        return next(self.stage.parameters()).dtype

    def run(
        self, inputs: torch.Tensor | None, targets: torch.Tensor | None, step: int
    ) -> torch.Tensor:
        """Forward + backward of all microbatches; returns this rank's share of the loss.

        ``inputs`` is needed where stage 0 lives, ``targets`` where the last stage lives
        (both on position 0 with the v shape); the returned scalar is the replica's
        contribution to the global mean loss (0 where the last stage does not live).
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
        args = (inputs,) if self.is_first else ()
        if self.is_last:
            self._schedule.step(*args, target=targets, losses=losses, return_outputs=False)
        else:
            self._schedule.step(*args)
        for loss in losses:
            total += loss.detach().float()
        return total
