"""The planner's search over layouts.

Search space (every point is scored by :func:`~.layout.evaluate`):

* which grades take part: prefixes of the grades ranked by speed and by price per
  effective FLOP, plus every single grade (so the plan is never worse than the best
  single-grade plan, and a straggler or poor-value grade can be left out);
* pipeline degree ``pp`` and expert-parallel degree ``ep``: the full grid for a single
  grade; for a mix, the best degrees of its members (and of the best plan so far),
  also with 2x and 4x deeper pipelines, which keeps the search linear in the grades;
* EP groups of ``ep`` replicas, each group inside one pool; every pool of a chosen
  grade contributes as many groups as fit (fewer under a pinned dp or a budget);
* mixed pipelines: the stages of one replica on two grades (the first k stages on
  one, the rest on the other, each grade's largest pool), both orders, for the three
  grades that did best alone; every EP group of such a layout shares that grade
  order, with the (pp, ep) of the best plan so far and 2x deeper (or the full grid
  when nothing else fits);
* one uneven layer split shared by all replicas, balancing the slowest stage over the
  grades in use (and, if that overflows memory, a memory-aware split);
* microbatch size, with each EP group's microbatch count proportional to its speed;
* for pp > 1, ZB-H1 (1F1B with the backward split), ZB-V, and interleaved 1F1B and
  ZB1P with v = 2, 4, ... chunks per position (while each position holds v layers
  and every count is a multiple of pp), a larger v only while it helps and while
  removing the whole bubble could still beat the best plan so far;
* activation recomputation and redundant expert slots, only when memory allows or
  requires.

Given the previous plan (a re-plan after losing or gaining nodes), the search first
looks only near it: its grades and its degrees halved or doubled; the full search
runs only if nothing near it fits.

Candidates are visited in a fixed order and ties broken by a fixed key, so the same
input always yields the same plan (unless the time limit cuts the search short).
"""

from __future__ import annotations

import heapq
import itertools
import time
from bisect import bisect_right
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

from hetmoe_operator.api.job import PlacementSpec
from hetmoe_operator.placement.cost_model import GradeProfile, price_performance
from hetmoe_operator.placement.layout import Evaluation, Layout, Problem, evaluate
from hetmoe_operator.placement.memory import StageShape
from hetmoe_operator.placement.stages import split_layers
from hetmoe_operator.plan import PipelineShape, Plan

_PP_LADDER = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)
_STALE_MICROBATCH_OPTIONS = 1
"""Stop trying larger microbatch sizes after this many non-improving ones in a row."""
Schedule = tuple[int, PipelineShape, bool]
"""(chunks per position, pipeline shape, split backward) of a pipeline schedule."""
_FAVOURITES = 2
"""(pp, ep) pairs per grade that mixes of grades are tried with."""
_MIXED_GRADES = 3
"""Grades (those best on their own) whose ordered pairs are tried as mixed pipelines."""


class StageBalance:
    """Stage times of several pipeline kinds, so one split suits every kind in use.

    A kind is the grade serving each stage: ``(A, A, A)`` for a homogeneous pipeline
    on A, ``(A, A, D)`` for a mixed one. Each kind's times are relative to its
    whole-model time on its first stage's grade, so homogeneous pipelines of grades
    of different speed weigh alike, while inside a mixed pipeline the stages compare
    in absolute terms (a slower grade's stage gets fewer layers). Prefix sums make
    ``reach`` a bisection.
    """

    def __init__(self, kinds: Sequence[Sequence[GradeProfile]], head: int | None = None) -> None:
        self.last = len(kinds[0]) - 1 if head is None else head
        """The stage holding the LM head (the last one, or the first in the v shape)."""
        self.stage_prefixes: list[list[list[float]]] = []
        """Per kind, per stage: relative cumulative time of layers on that stage's grade."""
        self.heads: list[float] = []
        """Per kind: relative time of the LM head on its last stage."""
        for profiles in kinds:
            whole = self._whole(profiles[0])
            cache: dict[int, list[float]] = {}
            prefixes = []
            for profile in profiles:
                if id(profile) not in cache:
                    cache[id(profile)] = [
                        profile.passes * (d + e) / whole
                        for d, e in zip(profile.dense_prefix, profile.expert_prefix, strict=True)
                    ]
                prefixes.append(cache[id(profile)])
            self.stage_prefixes.append(prefixes)
            self.heads.append(profiles[self.last].head_seconds / whole)

    @staticmethod
    def _whole(profile: GradeProfile) -> float:
        layers = len(profile.dense_prefix) - 1
        return profile.passes * sum(profile.forward_seconds(0, layers)) + profile.head_seconds

    def cost(self, stage: int, start: int, end: int) -> float:
        """The worst kind's relative time for layers [start, end) on ``stage``."""
        return max(
            prefixes[stage][end] - prefixes[stage][start] + (head if stage == self.last else 0.0)
            for prefixes, head in zip(self.stage_prefixes, self.heads, strict=True)
        )

    def reach(self, stage: int, start: int, bound: float) -> int:
        """Largest end with ``cost(stage, start, end) <= bound``."""
        end = len(self.stage_prefixes[0][0]) - 1
        for prefixes, head in zip(self.stage_prefixes, self.heads, strict=True):
            prefix = prefixes[stage]
            target = prefix[start] + bound - (head if stage == self.last else 0.0)
            end = min(end, bisect_right(prefix, target * (1 + 1e-12)) - 1)
        return max(end, start - 1)


Kinds = tuple[tuple[str, ...], ...]
"""The distinct pipeline kinds of a layout: per kind, the grade serving each stage."""


@dataclass(frozen=True)
class Scored:
    """A feasible layout with its evaluation."""

    layout: Layout
    evaluation: Evaluation


def divisors(n: int) -> list[int]:
    """All divisors of ``n`` in increasing order."""
    small, large = [], []
    d = 1
    while d * d <= n:
        if n % d == 0:
            small.append(d)
            if d != n // d:
                large.append(n // d)
        d += 1
    return small + large[::-1]


def apportion(total: int, weights: Sequence[float]) -> list[int] | None:
    """Split ``total`` into positive integers proportional to ``weights`` (largest
    remainder); None when ``total`` is smaller than the number of parts."""
    parts = len(weights)
    if total < parts:
        return None
    spare = total - parts
    weight_sum = sum(weights)
    exact = [spare * w / weight_sum for w in weights]
    shares = [int(x) for x in exact]
    order = sorted(range(parts), key=lambda i: (-(exact[i] - shares[i]), i))
    for i in order[: spare - sum(shares)]:
        shares[i] += 1
    return [s + 1 for s in shares]


def fill_pipelines(
    stage_seconds: Sequence[float],
    pp: int,
    total: int,
    virtual: int = 1,
    shape: str = "loop",
    split_backward: bool = False,
) -> list[int] | None:
    """Split ``total`` microbatches over pipelines whose slowest stage takes
    ``stage_seconds`` each, so that ``(count + fill) x stage_seconds`` is as equal as
    possible, ``fill`` = ``(pp - 1) / virtual`` for (interleaved) 1F1B, ``(pp - 1)
    / 6`` for ZB-V (one chunk's forward per position, F = B = W) and ``(pp - 1) / (3
    virtual)`` for ZB1P (F + B - W per position, F = B = W).

    Every pipeline gets at least ``pp`` microbatches: 1F1B (torch's ``Schedule1F1B``)
    refuses fewer microbatches than stages, so a plan with fewer could not run. With
    ``virtual`` > 1 in the loop shape every count is a multiple of ``pp`` (interleaved
    1F1B and ZB1P need whole rounds of ``pp`` microbatches); None when ``total`` is
    not. ZB-H1 (split, one chunk) takes any count torch's ZB1P accepts (a multiple of
    ``max(1, m // pp)``): the proportional split if all its counts are, else whole
    rounds of ``pp``. ZB-V takes any count.
    """
    times = [max(t, 1e-30) for t in stage_seconds]
    if shape == "v":
        return _fill(times, pp, total, 1, (pp - 1) / 6)
    if not split_backward:
        return _fill(times, pp, total, pp if virtual > 1 else 1, (pp - 1) / virtual)
    fill = (pp - 1) / (3 * virtual)
    if virtual == 1:
        counts = _fill(times, pp, total, 1, fill)
        if counts is not None and all(c % max(1, c // pp) == 0 for c in counts):
            return counts
    return _fill(times, pp, total, pp, fill)


def _fill(times: list[float], pp: int, total: int, step: int, fill: float) -> list[int] | None:
    """:func:`fill_pipelines` for one granularity: counts are multiples of ``step``."""
    if total < len(times) * pp or total % step:
        return None
    one_f_one_b = step == 1 and fill == pp - 1

    def counts_at(limit: float) -> list[int]:
        if one_f_one_b:  # the hot case, so no float division by the step
            return [max(pp, int(limit / t) - (pp - 1)) for t in times]
        return [max(pp, int(max(0.0, limit / t - fill) / step) * step) for t in times]

    low, high = 0.0, (total + pp) * max(times)
    for _ in range(100):
        middle = (low + high) / 2
        if sum(counts_at(middle)) <= total:
            low = middle
        else:
            high = middle
    counts = counts_at(low)
    heap = [((c + step + fill) * t, i) for i, (c, t) in enumerate(zip(counts, times, strict=True))]
    heapq.heapify(heap)
    for _ in range((total - sum(counts)) // step):
        _, i = heapq.heappop(heap)
        counts[i] += step
        heapq.heappush(heap, ((counts[i] + step + fill) * times[i], i))
    return counts


def score(evaluation: Evaluation, placement: PlacementSpec) -> float:
    """Lower is better: seconds per token, or cost per token under the cost objective."""
    if placement.objective == "cost":
        return evaluation.cost_per_1t_tokens
    return 1.0 / evaluation.tokens_per_s


class Searcher:
    """One planning run: fixed inputs, a deadline, the best layout so far."""

    def __init__(
        self,
        problem: Problem,
        placement: PlacementSpec,
        previous: Plan | None = None,
        *,
        mixed_pipelines: bool = True,
        zero_bubble: bool = True,
    ) -> None:
        self.problem = problem
        self.mixed_pipelines = mixed_pipelines
        self.zero_bubble = zero_bubble
        """Whether ZB-V layouts are tried (False: 1F1B and interleaved 1F1B only, for
        comparisons)."""
        self.placement = placement
        self.previous = previous
        self.best: Scored | None = None
        self.best_key: tuple | None = None
        self.closest_misfit: Evaluation | None = None
        self.over_budget: Evaluation | None = None
        self.cheapest_blocked = float("inf")
        """Price per hour of the cheapest EP group the budget did not allow."""
        self._splits: dict[tuple, tuple[int, ...] | None] = {}
        self._balances: dict[tuple, StageBalance] = {}
        self._balanced: dict[tuple, tuple[tuple[int, ...], tuple[bool, ...]]] = {}
        grades: dict[str, list[str]] = {}
        for name, info in problem.pools.items():
            grades.setdefault(info.grade.name, []).append(name)
        self.grade_pools = grades

    # -- enumeration -------------------------------------------------------------

    def grade_subsets(self) -> list[tuple[str, ...]]:
        """Grade sets worth trying, in a fixed order (see the module docstring)."""
        catalog = self.problem.cluster.catalog
        names = sorted(self.grade_pools)
        by_speed = sorted(
            names, key=lambda g: (-catalog.grade(g).effective_tflops("expert_ffn"), g)
        )
        by_value = sorted(names, key=lambda g: (price_performance(catalog, g), g))
        subsets: list[tuple[str, ...]] = []
        for ranking in (by_value, by_speed):
            for k in range(len(ranking), 0, -1):
                subsets.append(tuple(sorted(ranking[:k])))
        subsets += [(g,) for g in names]
        return list(dict.fromkeys(subsets))

    def pp_options(self) -> list[int]:
        """Pipeline degrees to try."""
        if self.placement.pipeline_parallel is not None:
            return [self.placement.pipeline_parallel]
        layers = self.problem.model.num_hidden_layers
        return [p for p in _PP_LADDER if p <= layers]

    def ep_options(self) -> list[int]:
        """Expert-parallel degrees to try: divisors of the expert count."""
        if self.placement.expert_parallel is not None:
            return [self.placement.expert_parallel]
        return divisors(self.problem.model.num_experts)

    def groups_for(
        self, subset: tuple[str, ...], pp: int, ep: int
    ) -> tuple[tuple[str, ...], ...] | None:
        """EP groups (each a pool per stage) for grades ``subset``, or None if none fit."""
        catalog = self.problem.cluster.catalog
        capacity: list[tuple[float, str, int]] = []
        for grade in subset:
            for pool in self.grade_pools[grade]:
                count = self.problem.pools[pool].pool.devices // (pp * ep)
                if count:
                    rank = (
                        price_performance(catalog, grade)
                        if self.placement.objective != "throughput"
                        else -catalog.grade(grade).effective_tflops("expert_ffn")
                    )
                    capacity.append((rank, pool, count))
        capacity.sort()
        wanted: int | None = None
        if self.placement.data_parallel is not None:
            if self.placement.data_parallel % ep:
                return None
            wanted = self.placement.data_parallel // ep
        # Each group needs pp microbatches of at least one sequence per EP member, so
        # the batch feeds at most this many groups; devices beyond it stay unused.
        most = wanted if wanted is not None else self.feedable_groups(pp, ep)
        budget = self.placement.budget_per_hour
        groups: list[tuple[str, ...]] = []
        spent = 0.0
        for _, pool, count in capacity:
            price = self.problem.pools[pool].grade.price_per_hour * pp * ep
            for _ in range(count):
                if len(groups) >= most:
                    break
                if (
                    self.placement.objective == "throughput-under-budget"
                    and budget is not None
                    and spent + price > budget
                ):
                    if not groups:
                        self.cheapest_blocked = min(self.cheapest_blocked, price)
                    break
                groups.append((pool,) * pp)
                spent += price
        if not groups or (wanted is not None and len(groups) != wanted):
            return None
        # Seat groups pool by pool in cluster order, so ranks of a pool are contiguous.
        order = {name: i for i, name in enumerate(self.problem.pools)}
        return tuple(sorted(groups, key=lambda t: order[t[0]]))

    def feedable_groups(self, pp: int, ep: int) -> int:
        """How many EP groups the global batch can feed: 1F1B needs ``pp`` microbatches
        per replica, each at least one sequence."""
        return self.problem.training.global_batch_size // (pp * ep)

    def mixed_groups(
        self, order: tuple[str, str], first_stages: int, pp: int, ep: int
    ) -> tuple[tuple[str, ...], ...] | None:
        """EP groups of one mixed pipeline kind: the first ``first_stages`` stages on
        grade ``order[0]``, the rest on ``order[1]``, each grade's stages served by its
        largest pool; as many groups as both pools hold (fewer under a pinned dp or a
        budget). None if not even one fits."""
        pools = []
        for grade in order:
            names = self.grade_pools[grade]
            pools.append(max(names, key=lambda n: (self.problem.pools[n].pool.devices, n)))
        template = (pools[0],) * first_stages + (pools[1],) * (pp - first_stages)
        count = min(
            self.problem.pools[pool].pool.devices // (template.count(pool) * ep) for pool in pools
        )
        if self.placement.data_parallel is not None:
            if self.placement.data_parallel % ep or count < self.placement.data_parallel // ep:
                return None
            count = self.placement.data_parallel // ep
        count = min(count, self.feedable_groups(pp, ep))
        if count < 1:
            return None
        budget = self.placement.budget_per_hour
        if self.placement.objective == "throughput-under-budget" and budget is not None:
            price = sum(self.problem.pools[p].grade.price_per_hour for p in template) * ep
            affordable = int(budget * (1 + 1e-9) // price) if price > 0 else count
            if affordable < 1:
                self.cheapest_blocked = min(self.cheapest_blocked, price)
            count = min(count, affordable)
        return (template,) * count if count >= 1 else None

    def _search_mixed(
        self,
        grades: Sequence[str],
        grid: Sequence[tuple[int, int]],
        deadline: float,
        options: list[int],
    ) -> None:
        """Mixed pipelines: every ordered pair of ``grades``, each (pp, ep) of ``grid``
        with pp >= 2, and a few stage counts for the first grade (all of them for
        short pipelines; else the two that use both pools in proportion to their
        size)."""
        pairs = [(a, b) for a in grades for b in grades if a != b]
        for pp, ep in grid:
            if pp < 2:
                continue
            for order in pairs:
                sizes = [
                    max(self.problem.pools[n].pool.devices for n in self.grade_pools[g])
                    for g in order
                ]
                if pp <= 4:
                    splits = list(range(1, pp))
                else:
                    share = pp * sizes[0] / (sizes[0] + sizes[1])
                    splits = sorted({int(share), int(share) + 1} & set(range(1, pp)))
                for first in splits:
                    if time.monotonic() > deadline:
                        return
                    groups = self.mixed_groups(order, first, pp, ep)
                    if groups is not None and self.state_can_fit(groups, pp, ep):
                        self._try_microbatches(groups, pp, ep, options)

    # -- layer split -------------------------------------------------------------

    def kinds_of(self, groups: tuple[tuple[str, ...], ...]) -> Kinds:
        """The distinct pipeline kinds (grade per stage) of ``groups``, sorted."""
        pools = self.problem.pools
        return tuple(sorted({tuple(pools[p].grade.name for p in t) for t in groups}))

    def balance(self, kinds: Kinds, head: int | None = None) -> StageBalance:
        """Normalised stage times of the pipeline kinds in use, the LM head on stage
        ``head`` (default the last) (cached)."""
        key = (kinds, head)
        if key not in self._balances:
            profile = {
                g: self.problem.pools[pools[0]].profile for g, pools in self.grade_pools.items()
            }
            self._balances[key] = StageBalance([[profile[g] for g in k] for k in kinds], head)
        return self._balances[key]

    def time_split(self, kinds: Kinds, head: int | None = None) -> tuple[int, ...] | None:
        """Split minimising the slowest stage over the pipeline kinds in use (cached)."""
        key = (kinds, head)
        if key not in self._splits:
            balance = self.balance(kinds, head)
            layers = self.problem.model.num_hidden_layers
            pp = len(kinds[0])
            high = max(balance.cost(s, 0, layers) for s in range(pp))
            self._splits[key] = split_layers(layers, pp, balance.reach, high)
        return self._splits[key]

    def memory_split(
        self, layout: Layout, kinds: Kinds
    ) -> tuple[tuple[int, ...], tuple[bool, ...]] | None:
        """Split that never overflows a device, recomputing activations only on the
        stages that need it (early 1F1B stages hold the most microbatches) and giving
        those stages fewer layers to pay for the extra forward pass."""
        problem = self.problem
        pp = layout.pp
        placement = problem.placement(layout.ep, layout.redundant_experts)
        slots = max(len(e) for e in placement.experts)
        most: list[dict[str, int]] = [{} for _ in range(pp)]
        for template, count in set(zip(layout.groups, layout.microbatches, strict=True)):
            for stage, pool in enumerate(template):
                most[stage][pool] = max(most[stage].get(pool, 0), count)
        checks: dict[tuple[int, bool], list[tuple[Callable[[int, int], float], float]]] = {}

        def fits_with(stage: int, start: int, end: int, recompute: bool) -> bool:
            key = (stage, recompute)
            if key not in checks:
                checks[key] = []
                for pool, count in most[stage].items():
                    shape = StageShape(
                        start=0,
                        end=0,
                        has_embedding=stage == 0,
                        has_head=stage == layout.head_position,
                        expert_slots=slots,
                        dense_shards=layout.dp,
                        expert_shards=len(layout.groups),
                        in_flight=min(pp - stage, count),
                        recompute=recompute,
                        peaks=problem.peaks(
                            pp, layout.virtual, stage, count, layout.shape, layout.split_backward
                        )
                        if layout.virtual > 1 or layout.zero_bubble
                        else (),
                        deferred_weight_grad=layout.zero_bubble,
                    )
                    total = problem.memory.stage_total_fn(shape, layout.microbatch_size)
                    checks[key].append((total, problem.pools[pool].usable_bytes))
            return all(total(start, end) <= usable for total, usable in checks[key])

        layers = problem.model.num_hidden_layers
        limits: dict[tuple[int, int, bool], int] = {}

        def max_end(stage: int, start: int, recompute: bool) -> int:
            """Last layer end that still fits (start - 1 if not even an empty stage)."""
            key = (stage, start, recompute)
            if key not in limits:
                if not fits_with(stage, start, start, recompute):
                    limits[key] = start - 1
                else:
                    low, high = start, layers
                    while low < high:
                        middle = (low + high + 1) // 2
                        if fits_with(stage, start, middle, recompute):
                            low = middle
                        else:
                            high = middle - 1
                    limits[key] = low
            return limits[key]

        head = 0 if layout.shape == "v" else None
        balance = self.balance(kinds, head)
        passes = 1.0 + problem.assumptions.backward_factor
        slowdown = (passes + 1.0) / passes

        def reach(stage: int, start: int, bound: float) -> int:
            plain = min(balance.reach(stage, start, bound), max_end(stage, start, False))
            slow = min(balance.reach(stage, start, bound / slowdown), max_end(stage, start, True))
            return max(plain, slow)

        floor = self.time_split(kinds, head)
        low = max(balance.cost(st, floor[st], floor[st + 1]) for st in range(pp)) if floor else 0.0
        high = max(balance.cost(st, 0, layers) for st in range(pp)) * slowdown
        bounds = split_layers(layers, pp, reach, high, low=low)
        if bounds is None:
            return None
        recompute = tuple(bounds[s + 1] > max_end(s, bounds[s], False) for s in range(pp))
        return bounds, recompute

    # -- scoring -------------------------------------------------------------------

    def consider(self, layout: Layout) -> Evaluation:
        """Evaluate ``layout`` and keep it if it is feasible and the best so far."""
        evaluation = evaluate(self.problem, layout)
        if not evaluation.fits:
            if (
                self.closest_misfit is None
                or evaluation.worst_memory_ratio < self.closest_misfit.worst_memory_ratio
            ):
                self.closest_misfit = evaluation
            return evaluation
        budget = self.placement.budget_per_hour
        if budget is not None and evaluation.cost_per_hour > budget * (1 + 1e-9):
            if (
                self.over_budget is None
                or evaluation.cost_per_hour < self.over_budget.cost_per_hour
            ):
                self.over_budget = evaluation
            return evaluation
        key = (
            score(evaluation, self.placement),
            1.0 / evaluation.tokens_per_s,
            sum(layout.devices_per_pool().values()),
            layout.pp,
            layout.ep,
            layout.virtual,
            layout.shape == "v",
            layout.split_backward,
            layout.microbatch_size,
            sum(layout.recompute),
        )
        if self.best_key is None or key < self.best_key:
            self.best_key = key
            self.best = Scored(layout, evaluation)
        return evaluation

    def layouts_for(
        self,
        groups: tuple[tuple[str, ...], ...],
        pp: int,
        ep: int,
        microbatch_size: int,
        virtual: int = 1,
        shape: PipelineShape = "loop",
        split_backward: bool = False,
    ) -> Iterator[Layout]:
        """Variants of one configuration, cheapest in compute first (with ``virtual``
        chunks per position: only splits that give every position that many layers)."""
        kinds = self.kinds_of(groups)
        head = 0 if shape == "v" else None
        bounds = self.time_split(kinds, head)
        if bounds is None:
            return
        counts = self.microbatch_counts(
            groups, bounds, ep, microbatch_size, virtual, shape, split_backward
        )
        if counts is None:
            return
        plain = (False,) * pp
        with_copies = self.problem.placement(ep, True)
        same = with_copies.experts == self.problem.placement(ep, False).experts

        def chunkable(split: tuple[int, ...]) -> bool:
            return all(b - a >= virtual for a, b in itertools.pairwise(split))

        for redundant in (True,) if same else (True, False):
            layout = Layout(
                pp,
                ep,
                bounds,
                groups,
                microbatch_size,
                counts,
                plain,
                redundant,
                virtual,
                shape,
                split_backward,
            )
            if chunkable(bounds):
                yield layout
            # A memory-aware split found for another microbatch size often fits too.
            key = (kinds, ep, redundant, virtual, shape, split_backward)
            previous = self._balanced.get(key)
            if previous is not None and chunkable(previous[0]):
                yield replace(layout, bounds=previous[0], recompute=previous[1])
            balanced = self.memory_split(layout, kinds)
            if balanced is not None and balanced != (bounds, plain) and balanced != previous:
                self._balanced[key] = balanced
                if chunkable(balanced[0]):
                    yield replace(layout, bounds=balanced[0], recompute=balanced[1])

    def microbatch_counts(
        self,
        groups: tuple[tuple[str, ...], ...],
        bounds: tuple[int, ...],
        ep: int,
        microbatch_size: int,
        virtual: int = 1,
        shape: PipelineShape = "loop",
        split_backward: bool = False,
    ) -> tuple[int, ...] | None:
        """Microbatches per EP group so that all groups finish together; None when the
        batch cannot give every replica a whole microbatch (or, interleaved, whole
        rounds of ``pp``)."""
        units = self.problem.training.global_batch_size // microbatch_size
        if units % ep:
            return None
        pp = len(bounds) - 1
        head_stage = 0 if shape == "v" else pp - 1
        seconds: dict[tuple[str, ...], float] = {}
        for template in set(groups):
            slowest = 0.0
            for stage, pool in enumerate(template):
                profile = self.problem.pools[pool].profile
                dense, expert = profile.forward_seconds(bounds[stage], bounds[stage + 1])
                head = profile.head_seconds if stage == head_stage else 0.0
                slowest = max(slowest, profile.passes * (dense + expert) + head)
            seconds[template] = slowest
        counts = fill_pipelines(
            [seconds[t] for t in groups], pp, units // ep, virtual, shape, split_backward
        )
        return tuple(counts) if counts is not None else None

    def run(self, deadline: float) -> None:
        """Visit the search space until done or past ``deadline`` (a monotonic time).

        Single grades get the full (pp, ep) grid; a mix of grades only tries the
        degrees that ranked best for its members alone, which keeps the search
        linear in the number of grades.
        """
        microbatch_options = divisors(self.problem.training.global_batch_size)
        if self.previous is not None:
            self._search_near(self.previous, deadline, microbatch_options)
            if self.best is not None:
                return
        favourites: dict[str, list[tuple[float, int, int]]] = {}
        subsets = self.grade_subsets()
        singles = [s for s in subsets if len(s) == 1]
        mixes = [s for s in subsets if len(s) > 1]
        full_grid = [(pp, ep) for pp in self.pp_options() for ep in self.ep_options()]
        for subset in singles + mixes:
            if len(subset) == 1:
                grid = full_grid
            else:
                # A mix has more replicas than any member: deeper pipelines may be
                # needed to keep every replica busy with the same batch.
                ranked = sorted(x for g in subset for x in favourites.get(g, []))
                if self.best is not None:  # and the degrees of the best plan so far
                    ranked.insert(0, (0.0, self.best.layout.pp, self.best.layout.ep))
                deeper = [(pp * k, ep) for _, pp, ep in ranked for k in (1, 2, 4)]
                grid = [x for x in dict.fromkeys(deeper) if x[0] in self.pp_options()]
            results = []
            for pp, ep in grid:
                if time.monotonic() > deadline:
                    return
                groups = self.groups_for(subset, pp, ep)
                if groups is None or not self.state_can_fit(groups, pp, ep):
                    continue
                found = self._try_microbatches(groups, pp, ep, microbatch_options)
                if found < float("inf"):
                    results.append((found, pp, ep))
            if len(subset) == 1:
                favourites[subset[0]] = sorted(results)[:_FAVOURITES]
        if len(self.grade_pools) < 2 or not self.mixed_pipelines:
            return
        # Mixed pipelines: the _MIXED_GRADES grades that did best alone, with the
        # degrees of the best plan so far (and 2x deeper); the full grid when no
        # plan was found (no single grade could hold the model on its own).
        ranked = sorted(x for found in favourites.values() for x in found)[:1]
        if self.best is not None:
            ranked = [(0.0, self.best.layout.pp, self.best.layout.ep)]
        deeper = [(pp * k, ep) for _, pp, ep in ranked for k in (1, 2)]
        grid = [x for x in dict.fromkeys(deeper) if x[0] in self.pp_options()] or full_grid
        catalog = self.problem.cluster.catalog
        by_result = sorted(
            self.grade_pools,
            key=lambda g: (
                favourites[g][0][0] if favourites.get(g) else float("inf"),
                -catalog.grade(g).effective_tflops("expert_ffn"),
                g,
            ),
        )
        grades = sorted(by_result[:_MIXED_GRADES])
        self._search_mixed(grades, grid, deadline, microbatch_options)

    def _search_near(self, previous: Plan, deadline: float, options: list[int]) -> None:
        """Re-plan after a capacity change: the previous plan's grades (those still
        present) and degrees, and their neighbours (pp and ep halved or doubled)."""
        grades = tuple(sorted({r.grade for r in previous.ranks} & set(self.grade_pools)))
        if not grades:
            return
        pp, ep = previous.parallel.pp, previous.parallel.ep
        near = [(pp, ep), (pp * 2, ep), (pp // 2, ep), (pp, ep * 2), (pp, ep // 2)]
        allowed_pp, allowed_ep = set(self.pp_options()), set(self.ep_options())
        for subset in dict.fromkeys([grades, *((g,) for g in grades)]):
            for p, e in near:
                if p not in allowed_pp or e not in allowed_ep or time.monotonic() > deadline:
                    continue
                groups = self.groups_for(subset, p, e)
                if groups is not None and self.state_can_fit(groups, p, e):
                    self._try_microbatches(groups, p, e, options)
        replica_grades: dict[int, set[str]] = {}
        for rank in previous.ranks:
            replica_grades.setdefault(rank.dp_index, set()).add(rank.grade)
        mixed = any(len(g) > 1 for g in replica_grades.values())
        if self.mixed_pipelines and len(grades) > 1 and mixed:
            near_ok = [(p, e) for p, e in near if p in allowed_pp and e in allowed_ep]
            self._search_mixed(grades, near_ok, deadline, options)

    def state_can_fit(self, groups: tuple[tuple[str, ...], ...], pp: int, ep: int) -> bool:
        """Necessary condition: weights, gradients and sharded optimizer state, spread
        perfectly over a group's stages, fit the roomiest device in use."""
        problem = self.problem
        model = problem.model
        memory = problem.memory
        a = problem.assumptions
        dp = len(groups) * ep
        layers = model.num_hidden_layers
        dense = memory.dense_params[layers] + 2 * model.embedding_params
        experts = memory.moe_layers[layers] * model.num_experts * model.expert_params / ep
        per_device = (
            dense * (a.weight_bytes + a.gradient_bytes + a.optimizer_bytes / dp)
            + experts * (a.weight_bytes + a.gradient_bytes + a.optimizer_bytes / len(groups))
        ) / pp
        roomiest = max(problem.pools[p].usable_bytes for template in set(groups) for p in template)
        return per_device <= roomiest

    def virtual_options(self, pp: int) -> list[Schedule]:
        """Schedules to try as (chunks per position, shape, split backward): 1F1B; for
        pp > 1 ZB-H1 (1F1B's order with the backward split), ZB-V (two chunks in V
        order) and, for powers of two up to the layers per position, interleaved 1F1B
        and ZB1P with that many chunks (the trainer orders each pipeline's process group
        by position, so any seating of stages on pools can interleave)."""
        if pp == 1:
            return [(1, "loop", False)]
        layers = self.problem.model.num_hidden_layers
        options: list[Schedule] = [(1, "loop", False)]
        if self.zero_bubble:
            options.append((1, "loop", True))
            if 2 * pp <= layers:
                options.append((2, "v", True))
        virtual = 2
        while virtual * pp <= layers:
            options.append((virtual, "loop", False))
            if self.zero_bubble:
                options.append((virtual, "loop", True))
            virtual *= 2
        return options

    def _try_microbatches(
        self,
        groups: tuple[tuple[str, ...], ...],
        pp: int,
        ep: int,
        options: list[int],
    ) -> float:
        """Best score over microbatch sizes, smallest first, and schedules: ZB-H1, ZB-V,
        and interleaved 1F1B / ZB1P with more chunks per position only while that helps;
        inf if nothing fits.

        They are tried only where they can pay: they need more activation memory than
        1F1B (so not where 1F1B does not fit, zero-bubble ones not where 1F1B must
        recompute, and ZB1P with v chunks only where interleaved 1F1B with v fits) and
        save at most the bubble (so not where 1F1B without its bubble would still lose
        to the best plan so far)."""
        batch = self.problem.training.global_batch_size
        virtuals = self.virtual_options(pp)
        best = float("inf")
        stale = 0
        for size in options:
            if batch // size < len(groups) * ep:
                break
            found = float("inf")
            plain: Evaluation | None = None
            recomputes = False
            chunks_fit = gained = False  # interleaved 1F1B with the current chunk count
            for virtual, shape, split in virtuals:
                if shape == "loop" and not split and virtual > 2 and not gained:
                    break  # more chunks only add transfers and memory
                if (virtual > 1 or split) and (plain is None or not self._may_gain(found, plain)):
                    break
                if (shape == "v" or split) and recomputes:
                    # Zero-bubble schedules hold at least 1F1B's activations on every
                    # position (and a deferred W keeps recomputed ones): where 1F1B has
                    # to recompute, they would recompute at least as much, which costs
                    # more than the bubble they save (checked on Ling-Plus; see
                    # bench/planner/README).
                    continue
                if split and shape == "loop" and virtual > 1 and not chunks_fit:
                    continue
                with_virtual = float("inf")
                for layout in self.layouts_for(groups, pp, ep, size, virtual, shape, split):
                    evaluation = self.consider(layout)
                    if evaluation.fits:
                        with_virtual = score(evaluation, self.placement)
                        if virtual == 1 and not split:
                            plain = evaluation
                            recomputes = any(layout.recompute)
                        break
                if shape == "loop" and virtual > 1:
                    if not split:
                        chunks_fit = with_virtual < float("inf")
                        gained = with_virtual < found
                    else:
                        gained = gained or with_virtual < found
                found = min(found, with_virtual)
            if found < best:
                best, stale = found, 0
            else:
                stale += 1
                if stale >= _STALE_MICROBATCH_OPTIONS:
                    break
        return best

    def _may_gain(self, plain_score: float, plain: Evaluation) -> bool:
        """Whether interleaving the fitting 1F1B layout ``plain`` (scored
        ``plain_score``) could beat the best plan so far: at best it removes the bubble.
        For ZB-V this is a heuristic, not a bound: it re-splits the layers (the LM head
        moves to the first position), which on a mixed-grade pipeline changes the
        compute itself; trying ZB-V regardless cost 1.3-1.6x the planning time of the
        8,192-device case and closed 1 of the 5 worst gaps of item 1 (the others are
        mixed pipelines at degrees the mixed search does not try)."""
        if self.best_key is None:
            return True
        step = plain.step
        return plain_score * (step.total - step.bubble) / step.total < self.best_key[0]
