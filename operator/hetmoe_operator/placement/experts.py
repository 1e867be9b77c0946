"""Expert placement inside one EP group, with redundant replicas of hot experts.

EPLB-style (DeepSeek): spare slots go one by one to the expert with the largest load
per replica; replicas are then packed heaviest-first onto the device that would finish
earliest. Unlike EPLB the devices may differ in speed: slots are handed out in
proportion to speed (capped by what fits in memory), and "earliest" means smallest
load / speed. A short swap pass then trims the slowest device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

_SWAP_ROUNDS = 64


@dataclass(frozen=True)
class ExpertPlacement:
    """Which experts each device of an EP group hosts, and the resulting balance."""

    experts: tuple[tuple[int, ...], ...]
    """Sorted expert ids per device."""
    device_load: tuple[float, ...]
    """Expected load per device (sum of its replicas' shares)."""
    imbalance: float
    """max(load / speed) over the ideal total load / total speed (1.0 = perfect)."""
    redundant_slots: int
    """Slots beyond one per expert."""


def slots_for_speeds(
    num_experts: int,
    speeds: Sequence[float],
    redundant: int,
    capacity: Sequence[int] | None = None,
) -> list[int]:
    """Slots per device proportional to speed, at least one each, within ``capacity``.

    Raises ValueError when the devices cannot host every expert once.
    """
    devices = len(speeds)
    caps = list(capacity) if capacity is not None else [num_experts + redundant] * devices
    caps = [min(c, num_experts) for c in caps]  # a device never needs an expert twice
    total = min(num_experts + redundant, sum(caps))
    if total < num_experts or min(caps) < 1 or total < devices:
        raise ValueError(
            f"{devices} devices with at most {sum(caps)} expert slots cannot host "
            f"{num_experts} experts"
        )
    slots = [1] * devices
    speed_sum = sum(speeds)
    # Largest-remainder apportionment of the rest, respecting capacities.
    while sum(slots) < total:
        best = -1
        best_gap = 0.0
        for device in range(devices):
            if slots[device] >= caps[device]:
                continue
            gap = total * speeds[device] / speed_sum - slots[device]
            if best < 0 or gap > best_gap:
                best, best_gap = device, gap
        slots[best] += 1
    return slots


def _replica_counts(loads: Sequence[float], total_slots: int, max_copies: int) -> list[int]:
    counts = [1] * len(loads)
    for _ in range(total_slots - len(loads)):
        best = -1
        for expert, load in enumerate(loads):
            if counts[expert] >= max_copies:
                continue
            if best < 0 or load / counts[expert] > loads[best] / counts[best]:
                best = expert
        if best < 0:
            break
        counts[best] += 1
    return counts


def place_experts(
    loads: Sequence[float],
    speeds: Sequence[float],
    slots: Sequence[int],
    limit: Sequence[int] | None = None,
) -> ExpertPlacement:
    """Assign ``sum(slots)`` expert replicas to devices balancing load / speed.

    Device ``d`` takes at most ``limit[d]`` replicas (default ``slots[d]``): a little
    slack lets a device with one very hot replica hold fewer, lighter neighbours.
    """
    devices = len(speeds)
    total_slots = sum(slots)
    counts = _replica_counts(loads, total_slots, devices)
    replicas = sorted(
        ((loads[e] / counts[e], e) for e in range(len(loads)) for _ in range(counts[e])),
        key=lambda item: (-item[0], item[1]),
    )
    hosted: list[set[int]] = [set() for _ in range(devices)]
    shares: list[dict[int, float]] = [{} for _ in range(devices)]
    load = [0.0] * devices
    free = list(limit if limit is not None else slots)
    for index, (share, expert) in enumerate(replicas):
        candidates = [d for d in range(devices) if free[d] > 0 and expert not in hosted[d]]
        empty = [d for d in candidates if not hosted[d]]
        if empty and len(replicas) - index <= sum(1 for h in hosted if not h):
            candidates = empty  # every device must end up with at least one expert
        if not candidates:  # every free slot sits next to this expert: skip the copy
            continue
        target = min(candidates, key=lambda d: ((load[d] + share) / speeds[d], d))
        hosted[target].add(expert)
        shares[target][expert] = share
        load[target] += share
        free[target] -= 1
    _rebalance_shares(loads, shares, hosted)
    _swap_pass(shares, hosted, speeds)
    load = [sum(s.values()) for s in shares]
    ideal = sum(loads) / sum(speeds) if sum(loads) > 0 else 0.0
    worst = max(load[d] / speeds[d] for d in range(devices))
    return ExpertPlacement(
        experts=tuple(tuple(sorted(h)) for h in hosted),
        device_load=tuple(load),
        imbalance=worst / ideal if ideal > 0 else 1.0,
        redundant_slots=sum(len(h) for h in hosted) - len(loads),
    )


def _rebalance_shares(
    loads: Sequence[float], shares: list[dict[int, float]], hosted: list[set[int]]
) -> None:
    """Split each expert's load equally over the copies that were actually placed."""
    copies = [0] * len(loads)
    for host in hosted:
        for expert in host:
            copies[expert] += 1
    for share in shares:
        for expert in share:
            share[expert] = loads[expert] / copies[expert]


def _swap_pass(
    shares: list[dict[int, float]], hosted: list[set[int]], speeds: Sequence[float]
) -> None:
    """Swap one replica of the slowest device with one elsewhere while that helps."""
    devices = len(speeds)
    for _ in range(_SWAP_ROUNDS):
        load = [sum(s.values()) for s in shares]
        worst = max(range(devices), key=lambda d: (load[d] / speeds[d], -d))
        peak = load[worst] / speeds[worst]
        best_move: tuple[float, int, int, int] | None = None
        for other in range(devices):
            if other == worst:
                continue
            for mine, my_share in shares[worst].items():
                if mine in hosted[other]:
                    continue
                for theirs, their_share in shares[other].items():
                    if their_share >= my_share or theirs in hosted[worst]:
                        continue
                    delta = my_share - their_share
                    new_peak = max(
                        (load[worst] - delta) / speeds[worst],
                        (load[other] + delta) / speeds[other],
                    )
                    if new_peak < peak - 1e-12 and (best_move is None or new_peak < best_move[0]):
                        best_move = (new_peak, other, mine, theirs)
        if best_move is None:
            return
        _, other, mine, theirs = best_move
        my_share = shares[worst].pop(mine)
        their_share = shares[other].pop(theirs)
        hosted[worst].remove(mine)
        hosted[other].remove(theirs)
        shares[worst][theirs] = their_share
        shares[other][mine] = my_share
        hosted[worst].add(theirs)
        hosted[other].add(mine)


def balanced_placement(
    loads: Sequence[float],
    speeds: Sequence[float],
    max_redundant: int,
    capacity: Sequence[int] | None = None,
    tolerance: float = 0.01,
) -> ExpertPlacement:
    """The placement with the fewest redundant slots whose imbalance is within
    ``tolerance`` of the best achievable with up to ``max_redundant`` extra slots."""
    options: list[ExpertPlacement] = []
    for redundant in range(max_redundant + 1):
        try:
            slots = slots_for_speeds(len(loads), speeds, redundant, capacity)
        except ValueError:
            if redundant == 0:
                raise
            break
        caps = capacity if capacity is not None else [len(loads)] * len(speeds)
        exact = place_experts(loads, speeds, slots)
        slack = [min(n + 1, c, len(loads)) for n, c in zip(slots, caps, strict=True)]
        loose = place_experts(loads, speeds, slots, slack)
        # Slack may cost one more slot of memory on some device: take it only if it helps.
        options.append(loose if loose.imbalance < exact.imbalance - 1e-9 else exact)
    best = min(p.imbalance for p in options)
    return next(p for p in options if p.imbalance <= best + tolerance)
