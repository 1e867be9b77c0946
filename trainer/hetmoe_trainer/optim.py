"""AdamW with the Ling recipe and a global gradient-norm clip across all ranks.

Weight decay applies to matrices only (norm weights and other 1-D tensors are not
decayed, as in Megatron and torchtitan). The clip needs the norm of the *whole*
model's gradient: each rank contributes the squares of the gradients it is the
designated counter for (:meth:`GradientSync.local_norm_sq`, one holder per
replicated parameter), the contributions are summed with one all-reduce, and every rank then
scales by the same factor.

The update is PyTorch's fused AdamW kernel wherever it exists (CPU and CUDA in
torch >= 2.4): one kernel call per parameter group instead of a Python loop of
about ten elementwise ops per tensor, which is what made the optimizer 12% of a
small model's CPU step. It stays elementwise per parameter, so a parameter's update
does not depend on which other parameters a rank holds and every layout steps alike.

ZeRO-1 (:class:`ShardedParameters`): each rank keeps AdamW state only for the
parameters and expert slices it owns within their holder set, steps only those, and
broadcasts them to the other holders afterwards, as the planner's memory model assumes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from hetmoe_trainer.distributed import ParallelContext
from hetmoe_trainer.model import Stage
from hetmoe_trainer.model.experts import per_expert_tensors

BETAS = (0.9, 0.95)
EPS = 1e-8
FUSED_DEVICES = ("cpu", "cuda")
"""Device types whose fused AdamW kernel the trainer uses (the ones it runs on)."""


def fused_supported(params: Iterable[torch.Tensor]) -> bool:
    """Whether ``torch.optim.AdamW(fused=True)`` accepts every one of ``params``."""
    return all(p.device.type in FUSED_DEVICES and torch.is_floating_point(p) for p in params)


def build_optimizer(
    named_params: Iterable[tuple[str, nn.Parameter]], weight_decay: float
) -> torch.optim.AdamW:
    """AdamW (0.9, 0.95, eps 1e-8); decay on parameters with two or more dimensions.

    Fused where supported, else PyTorch's default (foreach on CUDA, a per-tensor loop
    elsewhere).
    """
    decay, no_decay = [], []
    for _, param in named_params:
        (decay if param.ndim >= 2 else no_decay).append(param)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = fused_supported(decay + no_decay) or None
    return torch.optim.AdamW(groups, lr=0.0, betas=BETAS, eps=EPS, fused=fused)


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Use ``lr`` for the next step in every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr


@torch.no_grad()
def clip_gradients(params: Iterable[nn.Parameter], total_norm: float, max_norm: float) -> float:
    """Scale gradients so the global norm is at most ``max_norm``; returns the factor used."""
    factor = min(1.0, max_norm / (total_norm + 1e-6))
    if factor < 1.0:
        grads = [p.grad for p in params if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, factor)
    return factor


@dataclass(frozen=True, eq=False)
class Shard:
    """One unit of optimizer ownership: a dense parameter, or one expert's slice of a stack."""

    name: str
    """The parameter's name in the stage (the stacked name for an expert slice)."""
    param: nn.Parameter
    index: int | None = None
    """Index in dim 0 of the stacked parameter (None: the whole parameter)."""
    expert: int | None = None
    """Global expert id of a slice."""
    key: str = ""
    """Global name used for the stable order (the expert's own name for a slice)."""

    @property
    def data(self) -> torch.Tensor:
        """The unit's values (a view into the parameter)."""
        return self.param.data if self.index is None else self.param.data[self.index]


def assign_owners(holders: tuple[int, ...], shards: Sequence[Shard]) -> dict[int, list[Shard]]:
    """Deterministic greedy partition by size: the biggest unit goes to the least loaded holder.

    Every holder computes it from the same global names and sizes, so all agree on who
    owns what without communicating; ties break by name and by process rank.
    """
    load = dict.fromkeys(holders, 0)
    owned: dict[int, list[Shard]] = {h: [] for h in holders}
    for shard in sorted(shards, key=lambda s: (-s.data.numel(), s.key)):
        owner = min(holders, key=lambda h: (load[h], h))
        load[owner] += shard.data.numel()
        owned[owner].append(shard)
    for members in owned.values():
        members.sort(key=lambda s: s.key)
    return owned


@dataclass(eq=False)
class _Lane:
    """A holder set with more than one member: who owns which of its units."""

    group: dist.ProcessGroup | None
    owned: dict[int, list[Shard]]


class ShardedParameters:
    """ZeRO-1 at parameter granularity: which tensors this rank's AdamW steps, and the broadcast.

    The planner budgets fp32 moments sharded over each parameter's holders (dense
    parameters over the stage's dp replicas, a routed expert over the ranks hosting
    it), so each holder set's units are partitioned among its members
    (:func:`assign_owners`). A rank's optimizer holds only what it owns; an owned
    expert slice of a stack whose other slices belong to other ranks is optimized
    through an alias parameter sharing the slice's storage (gradient: a view of the
    stack's gradient). Since AdamW is elementwise, stepping a unit alone gives the same
    numbers as stepping the whole model. After the step each owner broadcasts its
    updated units to its group (one flat tensor per owner and holder set), in the
    same global order of holder sets on every rank, as :class:`GradientSync` does.

    With ``enabled=False`` every rank owns everything (full AdamW state per rank, no
    broadcast).
    """

    def __init__(self, stage: Stage, context: ParallelContext, *, enabled: bool = True) -> None:
        names = {id(p): n for n, p in stage.named_parameters()}
        expert = {id(p) for p in stage.expert_parameters()}
        by_holders: dict[tuple[int, ...], list[Shard]] = {}
        for name, param in stage.named_parameters():
            if id(param) not in expert:
                by_holders.setdefault(context.dense_holders, []).append(
                    Shard(name, param, key=name)
                )
        for e, key, param, index in stage.expert_slices():
            shard = Shard(names[id(param)], param, index, e, key)
            by_holders.setdefault(context.expert_holders[e], []).append(shard)

        me = self.me = context.rank
        self.lanes: list[_Lane] = []
        mine: list[Shard] = []
        for holders in sorted(by_holders):
            if not enabled or len(holders) == 1:
                mine.extend(by_holders[holders])
                continue
            owned = assign_owners(holders, by_holders[holders])
            mine.extend(owned[me])
            group = (
                context.dp_group
                if holders == context.dense_holders
                else context.expert_groups[holders]
            )
            self.lanes.append(_Lane(group, owned))

        # A stack whose every slice is mine is stepped whole (fewer, larger kernel inputs).
        slices: dict[nn.Parameter, list[Shard]] = {}
        whole: list[Shard] = []
        for shard in mine:
            if shard.index is None:
                whole.append(shard)
            else:
                slices.setdefault(shard.param, []).append(shard)
        self.aliases: dict[nn.Parameter, Shard] = {}
        """Alias parameter -> the expert slice it stands for."""
        self.named: list[tuple[str, nn.Parameter]] = [(s.name, s.param) for s in whole]
        for param, pieces in slices.items():
            if len(pieces) == param.shape[0]:
                self.named.append((pieces[0].name, param))
                continue
            for shard in pieces:
                alias = nn.Parameter(shard.data)
                self.aliases[alias] = shard
                self.named.append((shard.name, alias))
        self._names = {param: name for name, param in self.named}

    def numel(self) -> int:
        """Elements this rank's optimizer steps (its moments are twice that in fp32)."""
        return sum(p.numel() for _, p in self.named)

    def attach_grads(self) -> None:
        """Point every alias's gradient at its slice of the stack's (synced, clipped) gradient."""
        for alias, shard in self.aliases.items():
            grad = shard.param.grad
            alias.grad = None if grad is None else grad[shard.index]

    @torch.no_grad()
    def broadcast(self) -> None:
        """Send every owner's updated units to the other holders (after the optimizer step)."""
        for lane in self.lanes:
            for owner, shards in lane.owned.items():
                if not shards:
                    continue
                sizes = [s.data.numel() for s in shards]
                if owner == self.me:
                    flat = torch.cat([s.data.reshape(-1) for s in shards])
                else:
                    flat = shards[0].data.new_empty(sum(sizes))
                dist.broadcast(flat, src=owner, group=lane.group)
                if owner != self.me:
                    for shard, chunk in zip(shards, flat.split(sizes), strict=True):
                        shard.data.copy_(chunk.view_as(shard.data))

    def checkpoint_tensors(
        self, module: nn.Module, tensor: nn.Parameter, value: torch.Tensor
    ) -> list[tuple[str, torch.Tensor]]:
        """Global per-expert names and views of optimizer state ``value`` of ``tensor``.

        A whole parameter maps as the model's state dict does; an alias's state (shaped
        like one expert's slice) is expanded to the stack's shape without copying, and
        only its own expert's names are kept, so the keys equal those of full state.
        """
        shard = self.aliases.get(tensor)
        if shard is None:
            return per_expert_tensors(module, self._names[tensor], value)
        count = shard.param.shape[0]
        stacked = value if value.ndim == 0 else value.expand(count, *value.shape)
        owner = shard.name.rpartition(".")[0]
        prefix = f"{owner}.{shard.expert}." if owner else f"{shard.expert}."
        return [
            (n, v)
            for n, v in per_expert_tensors(module, shard.name, stacked)
            if n.startswith(prefix)
        ]
