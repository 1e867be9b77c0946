"""Expert-parallel token dispatch: tokens travel to the ranks hosting their experts and back.

One round trip, per MoE layer and microbatch (:meth:`TokenDispatcher.send`):

1. sort the T*k routed slots by expert; a slot for an expert hosted on several
   members of the EP group (a replicated hot expert) goes to one of them: that
   expert's slots are cut into contiguous, near-equal chunks, chunk j for the j-th
   host in ascending member order (deterministic, and the maths does not change
   because replicas hold identical weights);
2. exchange the ``[members, experts]`` count matrix with ``all_to_all_single`` so
   every member knows how many rows it will receive per (source, expert), while
   the slots are gathered into send order;
3. ``all_to_all_single`` the rows (uneven and zero-size splits are fine), regroup
   them by local expert, run the experts, undo the regrouping, send them back and
   combine the k outputs of each token with its router weights (in fp32).

Overlap. Each all-to-all is started (``async_op=True``) and waited for separately,
so the caller computes something independent while it is in flight: the MoE layer
runs half of its shared expert during the dispatch and the other half during the
combine (the planner's cost model hides each pass's exchanges behind its
shared-expert compute). Backward mirrors it: each exchange is two autograd
functions, :class:`_StartAllToAll` and :class:`_AwaitAllToAll`. The await's
backward *starts* the transposed all-to-all of the gradient and the start's
backward *waits* for it. The autograd engine runs ready nodes latest-created first,
and the shared-expert half computed between start and await in forward was created
after the start, so its backward runs while the transposed exchange is in flight.
``work.wait()`` is called on the stream that consumes the result: with gloo it
blocks until the data is there; with NCCL it makes the current CUDA stream wait
for the communication stream, and the in-flight record keeps the input tensor
alive until then.

Every exchange (count exchange, dispatch, combine, and their backward transposes)
reports to the :class:`ExchangeTimer` owned by the group's :class:`ExpertParallel`,
so the runtime can report all-to-all as its own step phase without any
process-global state.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch
import torch.distributed as dist


class ExchangeTimer:
    """Wall seconds of one EP group's exchanges, read by the runtime per step.

    ``seconds`` is the *exposed* time: the host was blocked launching an exchange
    or waiting for it (the count exchange's host read included), i.e. what the
    step would save if the exchanges were free; the runtime reports it as the
    ``all_to_all`` phase. ``in_flight_seconds`` is each exchange's span from launch
    to the end of its wait; the difference is the compute run while exchanges were
    in flight, an upper bound on the communication hidden (gloo progresses in a
    background thread, which needs a free core to actually overlap). With NCCL a
    wait only orders CUDA streams, so ``seconds`` is the launch cost plus the count
    exchange's host sync (which waits for the previous exchange), not device time
    (CUDA events would be needed for that).

    Monotonic: readers take differences (before/after a forward, before/after a step),
    so several readers never reset each other.
    """

    def __init__(self) -> None:
        self.seconds = 0.0
        self.in_flight_seconds = 0.0
        self.calls = 0

    @contextmanager
    def blocking(self) -> Iterator[None]:
        """Add the enclosed wall time to the exposed time (a launch or a wait)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - start

    def completed(self, launched: float) -> None:
        """One exchange launched at ``launched`` (``perf_counter``) has been waited for."""
        self.in_flight_seconds += time.perf_counter() - launched
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


class _InFlight:
    """One launched ``all_to_all_single``: the output it fills and the handle to wait on.

    Holds the input until the wait: with NCCL the communication stream reads it
    after the launch returned, so it must not go back to the allocator before.
    """

    def __init__(
        self,
        output: torch.Tensor,
        x: torch.Tensor,
        output_splits: list[int] | None,
        input_splits: list[int] | None,
        group: dist.ProcessGroup,
        timer: ExchangeTimer,
    ) -> None:
        self.output = output
        self._input: torch.Tensor | None = x.contiguous()
        self._timer = timer
        self._launched = time.perf_counter()
        with timer.blocking():
            self._work = dist.all_to_all_single(
                output, self._input, output_splits, input_splits, group=group, async_op=True
            )

    def wait(self) -> torch.Tensor:
        """Block until ``output`` may be used on the current stream; return it."""
        if self._input is None:
            raise RuntimeError("this all-to-all was already waited for")
        with self._timer.blocking():
            self._work.wait()
        self._timer.completed(self._launched)
        self._input = None
        return self.output


@dataclass
class _Exchange:
    """One routed all-to-all, shared by its start and await functions in forward and backward."""

    group: dist.ProcessGroup
    timer: ExchangeTimer
    output_splits: list[int]
    input_splits: list[int]
    flight: _InFlight | None = None

    def start(self, x: torch.Tensor, *, transposed: bool) -> torch.Tensor:
        """Launch the exchange (its transpose in backward); return the buffer it fills."""
        if self.flight is not None:
            raise RuntimeError("an all-to-all was started twice without a wait")
        out_splits, in_splits = (
            (self.input_splits, self.output_splits)
            if transposed
            else (self.output_splits, self.input_splits)
        )
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        self.flight = _InFlight(out, x, out_splits, in_splits, self.group, self.timer)
        return out

    def finish(self) -> torch.Tensor:
        """Wait for the launched exchange and return its filled buffer."""
        flight, self.flight = self.flight, None
        if flight is None:
            raise RuntimeError("an all-to-all was awaited before it was started")
        return flight.wait()


class _StartAllToAll(torch.autograd.Function):
    """Launches the exchange; backward waits for the transposed one (module docstring)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, exchange: _Exchange) -> torch.Tensor:
        ctx.exchange = exchange
        return exchange.start(x, transposed=False)

    @staticmethod
    def backward(ctx: Any, _grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        # _grad went into the transposed exchange (the await's backward started it).
        return ctx.exchange.finish(), None


class _AwaitAllToAll(torch.autograd.Function):
    """Waits for the exchange; backward launches the transposed one and returns at once."""

    @staticmethod
    def forward(ctx: Any, pending: torch.Tensor, exchange: _Exchange) -> torch.Tensor:
        ctx.exchange = exchange
        return exchange.finish().view_as(pending)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        ctx.exchange.start(grad, transposed=True)
        return grad, None


ExpertCompute = Callable[[torch.Tensor, list[int]], torch.Tensor]
"""Runs the local experts on rows grouped by local expert, given the rows per expert."""


class TokenDispatcher:
    """Sends routed token slots to their experts' hosts, computes, and combines."""

    def __init__(self, ep: ExpertParallel, num_experts: int) -> None:
        ep.validate(num_experts)
        self.ep = ep
        self.num_experts = num_experts

    def send(self, x: torch.Tensor, expert_ids: torch.Tensor) -> RoundTrip:
        """Start sending ``x``'s routed slots (``x``: ``[T, H]``, ``expert_ids``: ``[T, k]``).

        Returns with the dispatch all-to-all in flight: compute something independent,
        then call :meth:`RoundTrip.compute` and :meth:`RoundTrip.combine`.
        """
        if self.ep.group is None and self.ep.size > 1:
            raise RuntimeError(
                "expert parallelism over several members needs a process group (group=None)"
            )
        return RoundTrip(self.ep, self.num_experts, x, expert_ids)


class RoundTrip:
    """One microbatch's routed slots, from :meth:`TokenDispatcher.send` to :meth:`combine`.

    Every reordering is a permutation applied with ``index_select`` (backward: an
    ``index_add`` without duplicate indices, deterministic on CUDA too); the k
    copies of a token are made by ``expand`` and summed back in slot order, so a
    token's result never depends on the order other tokens were processed in.
    """

    def __init__(
        self, ep: ExpertParallel, num_experts: int, x: torch.Tensor, expert_ids: torch.Tensor
    ) -> None:
        self.ep = ep
        self.num_experts = num_experts
        self._tokens, self._top_k = expert_ids.shape
        self._width = x.shape[-1]  # explicit: a member may route no tokens at all
        self._dtype = x.dtype
        flat_ids = expert_ids.flatten()
        counts = torch.bincount(flat_ids, minlength=num_experts).tolist()
        send = self._send_counts(counts)
        counting = self._start_count_exchange(send, x.device)
        # The slots are gathered into send order while the counts are in flight.
        self._send_order = self._order(flat_ids, send)
        slots = x.unsqueeze(1).expand(self._tokens, self._top_k, self._width)
        slots = slots.reshape(self._tokens * self._top_k, self._width)
        slots = slots.index_select(0, self._send_order)
        self._recv = self._finish_count_exchange(counting, send)

        self._input_splits = [sum(row) for row in send]
        self._output_splits = [sum(row) for row in self._recv]
        self._pending, self._exchange = self._start(slots, self._output_splits, self._input_splits)

    def compute(self, compute: ExpertCompute) -> None:
        """Wait for the dispatch, run the local experts, start sending the results back."""
        received = self._await()
        local = self.ep.local_experts
        local_counts = [sum(self._recv[s][e] for s in range(self.ep.size)) for e in local]
        if self.ep.size == 1:
            # One member: rows already arrive grouped by expert.
            computed = compute(received, local_counts)
        else:
            # Received rows are grouped (source, expert); experts want (expert, source).
            by_local = self._by_local_expert(received.device)
            computed = compute(received.index_select(0, by_local), local_counts)
            computed = computed.index_select(0, torch.argsort(by_local))
        self._pending, self._exchange = self._start(
            computed, self._input_splits, self._output_splits
        )

    def combine(self, weights: torch.Tensor) -> torch.Tensor:
        """Wait for the results and sum each token's k of them with ``weights`` ``[T, k]``.

        Returns ``[T, H]`` in the dtype of the sent ``x``.
        """
        returned = self._await()
        per_slot = returned.index_select(0, torch.argsort(self._send_order))
        per_slot = per_slot.view(self._tokens, self._top_k, self._width)
        combined = (per_slot.float() * weights.unsqueeze(-1).float()).sum(dim=1)
        return combined.to(self._dtype)

    def _send_counts(self, counts: list[int]) -> list[list[int]]:
        """``send[m][e]``: slots for expert e sent to member m (replicas share evenly)."""
        send = [[0] * self.num_experts for _ in range(self.ep.size)]
        for expert, count in enumerate(counts):
            hosts = self.ep.hosts(expert)
            base, extra = divmod(count, len(hosts))
            for j, member in enumerate(hosts):
                send[member][expert] = base + (1 if j < extra else 0)
        return send

    def _order(self, flat_ids: torch.Tensor, send: list[list[int]]) -> torch.Tensor:
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

    def _start_count_exchange(
        self, send: list[list[int]], device: torch.device
    ) -> _InFlight | None:
        """Launch the exchange of ``send``; it yields ``recv[s][e]``, rows s sends me for e."""
        if self.ep.group is None:
            return None
        send_t = torch.tensor(send, dtype=torch.int64, device=device)
        return _InFlight(torch.empty_like(send_t), send_t, None, None, self.ep.group, self.ep.timer)

    def _finish_count_exchange(
        self, flight: _InFlight | None, send: list[list[int]]
    ) -> list[list[int]]:
        if flight is None:
            return send
        recv = flight.wait()
        with self.ep.timer.blocking():  # the host read syncs the device (NCCL)
            return recv.tolist()

    def _start(
        self, x: torch.Tensor, output_splits: list[int], input_splits: list[int]
    ) -> tuple[torch.Tensor, _Exchange | None]:
        if self.ep.group is None:
            return x, None
        exchange = _Exchange(self.ep.group, self.ep.timer, output_splits, input_splits)
        return _StartAllToAll.apply(x, exchange), exchange

    def _await(self) -> torch.Tensor:
        pending, exchange = self._pending, self._exchange
        if exchange is None:
            return pending
        self._exchange = None
        return _AwaitAllToAll.apply(pending, exchange)

    def _by_local_expert(self, device: torch.device) -> torch.Tensor:
        """Permutation taking received rows from (source, expert) to (expert, source) order."""
        local = self.ep.local_experts
        seg_expert = [i for _ in range(self.ep.size) for i in range(len(local))]
        seg_size = [self._recv[s][e] for s in range(self.ep.size) for e in local]
        row_expert = torch.repeat_interleave(
            torch.tensor(seg_expert, device=device, dtype=torch.int64),
            torch.tensor(seg_size, device=device, dtype=torch.int64),
        )
        return torch.argsort(row_expert, stable=True)
