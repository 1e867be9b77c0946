"""Expert-parallel token dispatch: tokens travel to the ranks hosting their experts and back.

One dispatch, per MoE layer and microbatch:

1. sort the T*k routed slots by expert; a slot for an expert hosted on several
   members of the EP group (a replicated hot expert) goes to one of them: that
   expert's slots are cut into contiguous, near-equal chunks, chunk j for the j-th
   host in ascending member order (deterministic, and the maths does not change
   because replicas hold identical weights);
2. exchange the ``[members, experts]`` count matrix with ``all_to_all_single`` so
   every member knows how many rows it will receive per (source, expert);
3. ``all_to_all_single`` the rows (uneven and zero-size splits are fine), regroup
   them by local expert, run the experts, undo the regrouping, send them back and
   combine the k outputs of each token with its router weights (in fp32).

Both all-to-alls are autograd functions whose backward is the transposed
all-to-all, so gradients reach the hosting ranks' experts and the senders' inputs.

Every exchange (count exchange, dispatch, combine, and their backward transposes)
adds its wall time to the :class:`ExchangeTimer` owned by the group's
:class:`ExpertParallel`, so the runtime can report all-to-all as its own step phase
without any process-global state. The time is host wall time: with gloo it is the
whole exchange; on CUDA with NCCL the collectives are asynchronous, so it covers the
launch plus the count exchange's host sync (which waits for the previous exchange),
not the exact device time (CUDA events would be needed for that).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import cached_property
from typing import Any

import torch
import torch.distributed as dist


class ExchangeTimer:
    """Accumulated wall seconds of one EP group's exchanges, read by the runtime per step.

    Monotonic: readers take differences (before/after a forward, before/after a step),
    so several readers never reset each other.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0

    @contextmanager
    def timed(self) -> Iterator[None]:
        """Add the wall time of the enclosed exchange."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start
            self.calls += 1


class ExpertParallel:
    """Who hosts which routed experts inside my expert-parallel group.

    ``rank_experts[i]`` lists the global expert ids hosted by the i-th member (EP
    rank order) of ``group``; an id may appear under several members (replicas).
    ``group=None`` means a single process, which must then host every expert to run a
    forward; a subset without a group is accepted for building, loading and saving a
    stage's shard offline (checkpoint conversion), and fails at dispatch.
    """

    def __init__(
        self,
        group: dist.ProcessGroup | None,
        rank_experts: Sequence[Sequence[int]],
        my_index: int,
        timer: ExchangeTimer | None = None,
    ) -> None:
        if not 0 <= my_index < len(rank_experts):
            raise ValueError(f"my_index {my_index} outside {len(rank_experts)} EP members")
        if group is not None:
            size, rank = dist.get_world_size(group), dist.get_rank(group)
            if (size, rank) != (len(rank_experts), my_index):
                raise ValueError(
                    f"EP group has {size} members and I am {rank}, but rank_experts has "
                    f"{len(rank_experts)} entries and my_index is {my_index}"
                )
        self.group = group
        self.rank_experts: tuple[tuple[int, ...], ...] = tuple(
            tuple(sorted(set(experts))) for experts in rank_experts
        )
        self.my_index = my_index
        self.timer = timer if timer is not None else ExchangeTimer()

    @property
    def size(self) -> int:
        """Members of the EP group."""
        return len(self.rank_experts)

    @property
    def local_experts(self) -> tuple[int, ...]:
        """Global ids of the experts this process hosts, ascending."""
        return self.rank_experts[self.my_index]

    def hosts(self, expert: int) -> tuple[int, ...]:
        """EP members hosting ``expert``, ascending."""
        return self._host_table.get(expert, ())

    @cached_property
    def _host_table(self) -> dict[int, tuple[int, ...]]:
        table: dict[int, list[int]] = {}
        for member, experts in enumerate(self.rank_experts):
            for expert in experts:
                table.setdefault(expert, []).append(member)
        return {expert: tuple(members) for expert, members in table.items()}

    def validate(self, num_experts: int) -> None:
        """Every expert must have a host, and no id may exceed the model's experts."""
        hosted = {e for experts in self.rank_experts for e in experts}
        if missing := sorted(set(range(num_experts)) - hosted):
            raise ValueError(f"experts {missing} are hosted by no member of the EP group")
        if extra := sorted(hosted - set(range(num_experts))):
            raise ValueError(f"experts {extra} do not exist (num_experts={num_experts})")


class _AllToAll(torch.autograd.Function):
    """``all_to_all_single`` along dim 0 whose backward sends gradients back the same way."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        output_splits: list[int],
        input_splits: list[int],
        group: dist.ProcessGroup,
        timer: ExchangeTimer,
    ) -> torch.Tensor:
        ctx.output_splits, ctx.input_splits, ctx.group = output_splits, input_splits, group
        ctx.timer = timer
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        with timer.timed():
            dist.all_to_all_single(out, x.contiguous(), output_splits, input_splits, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None, None]:
        back = _AllToAll.apply(
            grad.contiguous(), ctx.input_splits, ctx.output_splits, ctx.group, ctx.timer
        )
        return back, None, None, None, None


ExpertCompute = Callable[[torch.Tensor, list[int]], torch.Tensor]
"""Runs the local experts on rows grouped by local expert, given the rows per expert."""


class TokenDispatcher:
    """Sends routed token slots to their experts' hosts, computes, and combines."""

    def __init__(self, ep: ExpertParallel, num_experts: int) -> None:
        ep.validate(num_experts)
        self.ep = ep
        self.num_experts = num_experts

    def _send_counts(self, counts: list[int]) -> list[list[int]]:
        """``send[m][e]``: slots for expert e sent to member m (replicas share evenly)."""
        send = [[0] * self.num_experts for _ in range(self.ep.size)]
        for expert, count in enumerate(counts):
            hosts = self.ep.hosts(expert)
            base, extra = divmod(count, len(hosts))
            for j, member in enumerate(hosts):
                send[member][expert] = base + (1 if j < extra else 0)
        return send

    def _send_order(self, flat_ids: torch.Tensor, send: list[list[int]]) -> torch.Tensor:
        """Slot indices in send order: by destination member, then expert, then slot."""
        by_expert = torch.argsort(flat_ids, stable=True)
        chunk_dest, chunk_size = [], []
        for expert in range(self.num_experts):
            for member in self.ep.hosts(expert):
                chunk_dest.append(member)
                chunk_size.append(send[member][expert])
        device = flat_ids.device
        dest = torch.repeat_interleave(
            torch.tensor(chunk_dest, device=device), torch.tensor(chunk_size, device=device)
        )
        key = dest * self.num_experts + flat_ids[by_expert]
        return by_expert[torch.argsort(key, stable=True)]

    def _exchange_counts(self, send: list[list[int]], device: torch.device) -> list[list[int]]:
        """``recv[s][e]``: rows member s sends me for expert e."""
        if self.ep.group is None:
            return send
        send_t = torch.tensor(send, dtype=torch.int64, device=device)
        recv_t = torch.empty_like(send_t)
        with self.ep.timer.timed():
            dist.all_to_all_single(recv_t, send_t, group=self.ep.group)
            return recv_t.tolist()

    def _a2a(
        self, x: torch.Tensor, output_splits: list[int], input_splits: list[int]
    ) -> torch.Tensor:
        if self.ep.group is None:
            return x
        return _AllToAll.apply(x, output_splits, input_splits, self.ep.group, self.ep.timer)

    def __call__(
        self,
        x: torch.Tensor,
        expert_ids: torch.Tensor,
        weights: torch.Tensor,
        compute: ExpertCompute,
    ) -> torch.Tensor:
        """``x``: ``[T, H]``; ``expert_ids``/``weights``: ``[T, k]``; returns ``[T, H]``.

        Every reordering is a permutation applied with ``index_select`` (backward: an
        ``index_add`` without duplicate indices, deterministic on CUDA too); the k
        copies of a token are made by ``expand`` and summed back in slot order, so a
        token's result never depends on the order other tokens were processed in.
        """
        if self.ep.group is None and self.ep.size > 1:
            raise RuntimeError(
                "expert parallelism over several members needs a process group (group=None)"
            )
        tokens, top_k = expert_ids.shape
        flat_ids = expert_ids.flatten()
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        send = self._send_counts(counts)
        send_order = self._send_order(flat_ids, send)
        recv = self._exchange_counts(send, x.device)

        input_splits = [sum(row) for row in send]
        output_splits = [sum(row) for row in recv]
        width = x.shape[-1]  # explicit: a member may route no tokens at all
        slots = x.unsqueeze(1).expand(tokens, top_k, width).reshape(tokens * top_k, width)
        received = self._a2a(slots.index_select(0, send_order), output_splits, input_splits)

        local = self.ep.local_experts
        local_counts = [sum(recv[s][e] for s in range(self.ep.size)) for e in local]
        if self.ep.size == 1:
            # One member: rows already arrive grouped by expert.
            computed = compute(received, local_counts)
        else:
            # Received rows are grouped (source, expert); experts want (expert, source).
            by_local = self._by_local_expert(recv, x.device)
            computed = compute(received.index_select(0, by_local), local_counts)
            computed = computed.index_select(0, torch.argsort(by_local))

        returned = self._a2a(computed, input_splits, output_splits)
        per_slot = returned.index_select(0, torch.argsort(send_order)).view(tokens, top_k, width)
        combined = (per_slot.float() * weights.unsqueeze(-1).float()).sum(dim=1)
        return combined.to(x.dtype)

    def _by_local_expert(self, recv: list[list[int]], device: torch.device) -> torch.Tensor:
        """Permutation taking received rows from (source, expert) to (expert, source) order."""
        local = self.ep.local_experts
        seg_expert = [i for _ in range(self.ep.size) for i in range(len(local))]
        seg_size = [recv[s][e] for s in range(self.ep.size) for e in local]
        row_expert = torch.repeat_interleave(
            torch.tensor(seg_expert, device=device, dtype=torch.int64),
            torch.tensor(seg_size, device=device, dtype=torch.int64),
        )
        return torch.argsort(row_expert, stable=True)
