"""Data-parallel gradient synchronisation for parameters with different holder sets.

Every parameter has a *holder set*: the processes holding a copy of it. Dense
parameters of a stage are held by all data-parallel replicas of that stage; a routed
expert only by the ranks of the stage hosting that expert (one per EP group, more for
a replicated hot expert). Routed experts are stored stacked per layer, so the unit
of synchronisation is a :class:`GradSlice`: a whole dense parameter, or one expert's
slice of a stacked one (each slice with its own expert's holder set). The correct
gradient of the global loss is the **sum** of the holders' local gradients, because
every microbatch loss is already weighted by its share of the global batch
(``tokens / global tokens``, see :mod:`pipeline`), so replicas with uneven batches
need no extra factor and the result equals the single-process mean loss.

Why not DDP or FSDP2: both reduce all parameters of a module over one group with a
fixed average, while here each expert has its own holder set (a DDP/FSDP group per
expert would mean a wrapper per expert and averaging factors that differ per holder
set), and the pipeline schedule runs several backwards per step.

Overlap with backward (``overlap=True``): slices are bucketed per holder set in
roughly reverse forward order (head, last layer ... first layer, embedding), and a
``register_post_accumulate_grad_hook`` counts each parameter's accumulations. A
parameter (and with it each of its slices) is final once it has accumulated
``accumulations`` times (one per microbatch); a bucket whose slices are all final
launches its async all-reduce right away, while backward continues. Buckets of one
holder set always launch in bucket order, so every holder issues the same collective
sequence on the group even when routing left an expert without gradient in some
microbatch on one rank (such a bucket, and everything after it in that group,
launches in :meth:`sync` instead). :meth:`sync` launches what is left and waits for
everything before the optimizer. Each bucket is the same flat tensor reduced by the
same collective either way, so the result is bit-identical to ``overlap=False``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from hetmoe_trainer.distributed import ParallelContext
from hetmoe_trainer.model import Stage

DEFAULT_BUCKET_BYTES = 25 << 20
_LAYER = re.compile(r"^layers\.(\d+)\.")


def backward_order(name: str) -> tuple[int, str]:
    """Sort key putting parameters in roughly the order backward finishes them.

    Head and final norm first, then layers from the last to the first, the embedding
    last; ties by name. Names are global (layer and expert ids), so every holder
    computes the same order and therefore the same bucket layout.
    """
    if name.startswith(("head.", "norm.")):
        return (-1, name)
    match = _LAYER.match(name)
    if match:
        return (1 << 30) - int(match.group(1)), name
    return (1 << 31, name)


@dataclass(frozen=True, eq=False)
class GradSlice:
    """A whole parameter (``index=None``) or one expert's slice ``[index]`` of a stacked one."""

    param: nn.Parameter
    index: int | None = None

    @property
    def grad(self) -> torch.Tensor:
        """The slice's gradient (a view into ``param.grad``; contiguous)."""
        assert self.param.grad is not None
        return self.param.grad if self.index is None else self.param.grad[self.index]

    @property
    def nbytes(self) -> int:
        """Bytes of the slice's gradient."""
        size = self.param.numel() if self.index is None else self.param[0].numel()
        return size * self.param.element_size()


@dataclass(eq=False)
class Bucket:
    """Gradients reduced together in one flat all-reduce."""

    group: dist.ProcessGroup | None
    slices: list[GradSlice]
    final: int = 0
    """Slices whose gradient is final this step (overlap only)."""
    work: tuple[torch.Tensor, dist.Work] | None = None
    """The flat gradient in flight and its pending all-reduce, once launched."""
    lane: list[Bucket] = field(default_factory=list, repr=False)
    """The buckets of this bucket's holder set, in launch order (shared list)."""


def _named_slices(
    stage: Stage, context: ParallelContext
) -> list[tuple[tuple[int, ...], str, GradSlice]]:
    """``(holder set, name, slice)`` for every dense parameter and every hosted expert slice."""
    expert = {id(p) for p in stage.expert_parameters()}
    found = [
        (context.dense_holders, name, GradSlice(param))
        for name, param in stage.named_parameters()
        if id(param) not in expert
    ]
    found += [
        (context.expert_holders[e], name, GradSlice(param, index))
        for e, name, param, index in stage.expert_slices()
    ]
    return found


class GradientSync:
    """Sums gradients over each slice's holder set and counts each slice once for norms."""

    def __init__(
        self,
        stage: Stage,
        context: ParallelContext,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        *,
        overlap: bool = False,
        accumulations: int = 1,
    ) -> None:
        by_holders: dict[tuple[int, ...], list[tuple[str, GradSlice]]] = {}
        for holders, name, piece in _named_slices(stage, context):
            by_holders.setdefault(holders, []).append((name, piece))

        self.params = [p for _, p in stage.named_parameters()]
        self.buckets: list[Bucket] = []
        self.counted: list[GradSlice] = []
        """Slices whose gradient this rank contributes to the global norm."""
        self.lanes: list[list[Bucket]] = []
        """Buckets per holder set, each in launch order."""
        for holders in sorted(by_holders):
            named = sorted(by_holders[holders], key=lambda item: backward_order(item[0]))
            if holders[0] == context.rank:
                self.counted.extend(piece for _, piece in named)
            if len(holders) == 1:
                continue
            group = (
                context.dp_group
                if holders == context.dense_holders
                else context.expert_groups[holders]
            )
            lane: list[Bucket] = []
            current: list[GradSlice] = []
            size = 0
            for _, piece in named:
                current.append(piece)
                size += piece.nbytes
                if size >= bucket_bytes:
                    lane.append(Bucket(group, current, lane=lane))
                    current, size = [], 0
            if current:
                lane.append(Bucket(group, current, lane=lane))
            self.lanes.append(lane)
            self.buckets.extend(lane)

        self.overlap = overlap
        self.accumulations = accumulations
        self.launched_in_backward = 0
        """Buckets of the last step launched by the hooks (during backward)."""
        self._counts: dict[nn.Parameter, int] = {}
        if overlap:
            # A stacked parameter's slices may sit in several buckets (of several lanes).
            homes: dict[nn.Parameter, list[Bucket]] = {}
            for bucket in self.buckets:
                for piece in bucket.slices:
                    homes.setdefault(piece.param, []).append(bucket)
            for param, buckets in homes.items():
                param.register_post_accumulate_grad_hook(self._hook(buckets))

    def _hook(self, buckets: list[Bucket]) -> Callable[[nn.Parameter], None]:
        def on_grad(param: nn.Parameter) -> None:
            count = self._counts.get(param, 0) + 1
            self._counts[param] = count
            if count > self.accumulations:
                raise RuntimeError(
                    f"a parameter accumulated {count} gradients in one step, more than the "
                    f"{self.accumulations} microbatches: its bucket was already reduced"
                )
            if count == self.accumulations:
                for bucket in buckets:  # one entry per slice of param in that bucket
                    bucket.final += 1
                for bucket in buckets:
                    self._launch_ready(bucket.lane)

        return on_grad

    def _launch_ready(self, lane: list[Bucket]) -> None:
        for bucket in lane:
            if bucket.work is None:
                if bucket.final < len(bucket.slices):
                    return
                self._launch(bucket)

    @torch.no_grad()
    def _launch(self, bucket: Bucket) -> None:
        flat = torch.cat([piece.grad.reshape(-1) for piece in bucket.slices])
        bucket.work = (flat, dist.all_reduce(flat, group=bucket.group, async_op=True))

    def materialize(self) -> None:
        """Give every parameter a zero gradient if it has none, so bucket layouts always match."""
        for param in self.params:
            if param.grad is None:
                param.grad = torch.zeros_like(param)

    @torch.no_grad()
    def sync(self) -> None:
        """Sum every bucket over its holders: launch what backward did not, wait for all."""
        self.materialize()
        self.launched_in_backward = sum(b.work is not None for b in self.buckets)
        for lane in self.lanes:
            for bucket in lane:
                if bucket.work is None:
                    self._launch(bucket)
        for bucket in self.buckets:
            assert bucket.work is not None
            flat, work = bucket.work
            work.wait()
            sizes = [piece.grad.numel() for piece in bucket.slices]
            for piece, chunk in zip(bucket.slices, flat.split(sizes), strict=True):
                piece.grad.copy_(chunk.view_as(piece.grad))
            bucket.work, bucket.final = None, 0
        self._counts.clear()

    @torch.no_grad()
    def local_norm_sq(self) -> torch.Tensor:
        """Sum of squared gradients of the slices this rank counts (fp32 scalar)."""
        if not self.counted:
            return torch.zeros((), dtype=torch.float32, device=self.params[0].device)
        norms = torch._foreach_norm([piece.grad for piece in self.counted], dtype=torch.float32)
        return torch.stack(norms).square().sum()
