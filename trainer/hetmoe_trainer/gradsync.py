"""Data-parallel gradient synchronisation for parameters with different holder sets.

Every parameter has a *holder set*: the processes holding a copy of it. Dense
parameters of a stage are held by all data-parallel replicas of that stage; a routed
expert only by the ranks of the stage hosting that expert (one per EP group, more for
a replicated hot expert). The correct gradient of the global loss is the **sum** of
the holders' local gradients, because every microbatch loss is already weighted by
its share of the global batch (``tokens / global tokens``, see :mod:`pipeline`), so
replicas with uneven batches need no extra factor and the result equals the
single-process mean loss.

Why not DDP or FSDP2: both reduce all parameters of a module over one group with a
fixed average, while here each expert has its own holder set (a DDP/FSDP group per
expert would mean a wrapper per expert and averaging factors that differ per holder
set), and the pipeline schedule runs several backwards per step. One bucketed
all-reduce per holder set after the schedule's last backward is simple, exact and
communication-minimal for this layout; overlapping it with the backward is future work.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from hetmoe_trainer.distributed import ParallelContext
from hetmoe_trainer.model import Stage

DEFAULT_BUCKET_BYTES = 25 << 20


@dataclass
class Bucket:
    """Gradients reduced together in one flat all-reduce."""

    group: dist.ProcessGroup | None
    params: list[nn.Parameter]


class GradientSync:
    """Sums gradients over each parameter's holder set and counts each parameter once for norms."""

    def __init__(
        self, stage: Stage, context: ParallelContext, bucket_bytes: int = DEFAULT_BUCKET_BYTES
    ) -> None:
        by_holders: dict[tuple[int, ...], list[tuple[str, nn.Parameter]]] = {}
        for name, param in stage.named_parameters():
            owner = stage.expert_param_owner(name)
            holders = context.dense_holders if owner is None else context.expert_holders[owner]
            by_holders.setdefault(holders, []).append((name, param))

        self.params = [p for _, p in stage.named_parameters()]
        self.buckets: list[Bucket] = []
        self.counted: list[nn.Parameter] = []
        """Parameters whose gradient this rank contributes to the global norm."""
        for holders in sorted(by_holders):
            # Names are global (layer and expert ids), so sorting by name gives every
            # holder the same order and bucket layout.
            named = sorted(by_holders[holders], key=lambda item: item[0])
            if holders[0] == context.rank:
                self.counted.extend(p for _, p in named)
            if len(holders) == 1:
                continue
            group = (
                context.dp_group
                if holders == context.dense_holders
                else context.expert_groups[holders]
            )
            current: list[nn.Parameter] = []
            size = 0
            for _, param in named:
                current.append(param)
                size += param.numel() * param.element_size()
                if size >= bucket_bytes:
                    self.buckets.append(Bucket(group, current))
                    current, size = [], 0
            if current:
                self.buckets.append(Bucket(group, current))

    def materialize(self) -> None:
        """Give every parameter a zero gradient if it has none, so bucket layouts always match."""
        for param in self.params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)

    @torch.no_grad()
    def sync(self) -> None:
        """Sum every bucket over its holders; all buckets are in flight at once."""
        self.materialize()
        pending = []
        for bucket in self.buckets:
            flat = torch.cat([p.grad.reshape(-1) for p in bucket.params])
            work = dist.all_reduce(flat, group=bucket.group, async_op=True)
            pending.append((bucket, flat, work))
        for bucket, flat, work in pending:
            work.wait()
            for param, chunk in zip(
                bucket.params, flat.split([p.numel() for p in bucket.params]), strict=True
            ):
                param.grad.copy_(chunk.view_as(param.grad))

    @torch.no_grad()
    def local_norm_sq(self) -> torch.Tensor:
        """Sum of squared gradients of the parameters this rank counts (fp32 scalar)."""
        total = torch.zeros((), dtype=torch.float32, device=self.params[0].device)
        for param in self.counted:
            total += param.grad.float().pow(2).sum()
        return total
