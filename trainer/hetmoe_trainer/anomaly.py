"""Anomaly handling as the Ling report describes it, plus fault injection to test it.

Reactions (every rank computes them from the same all-reduced loss and gradient
norm, so all ranks decide together without an extra vote):

- NaN/Inf loss or gradient norm -> skip the update;
- loss spike (z-score above ``spike_zscore`` over the last ``window`` accepted
  losses) -> skip the update and set the batch aside; it is re-injected a
  pseudo-random (seeded, so reproducible) 2..window/4+2 steps later. If the batch
  spikes again when re-injected, the spike is persistent: it is applied with the
  learning rate lowered by ``LOWERED_LR_FACTOR`` for that step;
- ``max_consecutive_skips`` skips in a row -> roll back to the last checkpoint and
  skip the sample range consumed since the streak began (the loop does it);
- stragglers: each rank's time to be ready for gradient sync divided by the median
  of the other ranks' is its score; a score above ``straggler_factor`` for
  ``straggler_patience`` steps in a row saves a checkpoint and ends the job with
  ``WorkerExit.REPLACE_NODE`` on every rank, each naming the straggler's node.

A skipped step never calls ``optimizer.step()``, so the optimizer state (moments and
step counts) is untouched; gradients are simply zeroed.
"""

from __future__ import annotations

import math
import os
import signal
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from enum import Enum
from typing import Literal

from hetmoe_operator.api.training import AnomalyPolicy

LOWERED_LR_FACTOR = 0.1
MIN_HISTORY = 8
"""Accepted losses needed before spikes are judged."""
MAX_EVENTS = 50
"""Anomaly events kept in state (and in progress.json)."""


class Action(Enum):
    """What the step does with its gradients."""

    APPLY = "apply"
    SKIP = "skip"
    LOWER_LR = "lower_lr"
    ROLLBACK = "rollback"


@dataclass(frozen=True)
class Verdict:
    """The decision for one step."""

    action: Action
    reason: str = ""
    lr_factor: float = 1.0


def _mix(seed: int, step: int) -> int:
    """splitmix64 of (seed, step): a reproducible pseudo-random integer."""
    x = (seed * 0x9E3779B97F4A7C15 + step + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


@dataclass
class AnomalyDetector:
    """Loss-spike and NaN judge with the set-aside queue; its state is checkpointed."""

    policy: AnomalyPolicy
    seed: int
    window: deque[float] = field(default_factory=deque)
    consecutive_skips: int = 0
    streak_start: int | None = None
    """Stream position where the current streak of skips began."""
    set_aside: list[tuple[int, list[int]]] = field(default_factory=list)
    """(step at which to re-inject, sample indices) of spiked batches."""
    counts: dict[str, int] = field(default_factory=dict)
    events: list[dict] = field(default_factory=list)

    def due_batch(self, step: int) -> list[int] | None:
        """A set-aside batch to re-inject at ``step``, if one is due (removed from the queue)."""
        for position, (due, samples) in enumerate(self.set_aside):
            if due <= step:
                del self.set_aside[position]
                self.count("reinjected")
                return samples
        return None

    def count(self, kind: str) -> None:
        """Increment the counter of anomaly ``kind``."""
        self.counts[kind] = self.counts.get(kind, 0) + 1

    def record(self, step: int, kind: str, detail: str) -> None:
        """Count and remember an anomaly event (newest last, bounded)."""
        self.count(kind)
        self.events.append({"step": step, "kind": kind, "detail": detail, "time": time.time()})
        del self.events[:-MAX_EVENTS]

    def zscore(self, loss: float) -> float:
        """How many standard deviations ``loss`` lies above the window mean (0 if too few)."""
        if len(self.window) < MIN_HISTORY:
            return 0.0
        mean = statistics.fmean(self.window)
        std = statistics.pstdev(self.window)
        return (loss - mean) / max(std, 1e-3 * abs(mean), 1e-12)

    def judge(
        self,
        step: int,
        loss: float,
        grad_norm: float,
        *,
        nonfinite: bool,
        reinjected: bool,
        position: int,
    ) -> Verdict:
        """Decide what step ``step`` does.

        ``nonfinite``: some rank saw a NaN/Inf loss or gradient (an all-reduced flag);
        ``position``: the stream position before the step's batch was taken.
        """
        if nonfinite or not (math.isfinite(loss) and math.isfinite(grad_norm)):
            self.record(step, "nonfinite", f"loss={loss} grad_norm={grad_norm}")
            return self._skip(step, "nonfinite", position)
        z = self.zscore(loss)
        if z > self.policy.spike_zscore:
            if reinjected:
                self.record(step, "lowered_lr", f"re-injected batch spiked again (z={z:.1f})")
                self._accepted(loss)
                return Verdict(Action.LOWER_LR, "persistent spike", LOWERED_LR_FACTOR)
            self.record(step, "spike", f"loss={loss:.4f} z={z:.1f}")
            return self._skip(step, "spike", position)
        self._accepted(loss)
        return Verdict(Action.APPLY)

    def _accepted(self, loss: float) -> None:
        self.window.append(loss)
        while len(self.window) > self.policy.window:
            self.window.popleft()
        self.consecutive_skips = 0
        self.streak_start = None

    def _skip(self, step: int, reason: str, position: int) -> Verdict:
        self.count("skipped")
        if self.consecutive_skips == 0:
            self.streak_start = position
        self.consecutive_skips += 1
        if self.consecutive_skips >= self.policy.max_consecutive_skips:
            return Verdict(
                Action.ROLLBACK, f"{self.consecutive_skips} consecutive skips ({reason})"
            )
        return Verdict(Action.SKIP, reason)

    def set_batch_aside(self, step: int, samples: list[int]) -> int:
        """Queue a spiked batch for re-injection; returns the step it comes back at."""
        delay = 2 + _mix(self.seed, step) % max(1, self.policy.window // 4)
        self.set_aside.append((step + delay, samples))
        return step + delay

    def end_streak(self) -> None:
        """Forget the current streak of skips (after a rollback)."""
        self.consecutive_skips = 0
        self.streak_start = None

    def state_dict(self) -> dict:
        """JSON-serialisable state (the window, queue, counters and events)."""
        return {
            "window": list(self.window),
            "consecutive_skips": self.consecutive_skips,
            "streak_start": self.streak_start,
            "set_aside": [[due, samples] for due, samples in self.set_aside],
            "counts": dict(self.counts),
            "events": list(self.events),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore from :meth:`state_dict`."""
        self.window = deque(float(v) for v in state["window"])
        self.consecutive_skips = int(state["consecutive_skips"])
        self.streak_start = state["streak_start"]
        self.set_aside = [
            (int(due), [int(s) for s in samples]) for due, samples in state["set_aside"]
        ]
        self.counts = {k: int(v) for k, v in state["counts"].items()}
        self.events = list(state["events"])


@dataclass
class StragglerMonitor:
    """Per-rank step time against the median; remembers how long each rank has straggled."""

    factor: float
    patience: int
    ignore_first: int = 2
    """Steps ignored at start (and after a restart): lazy initialisation skews them."""
    streaks: dict[int, int] = field(default_factory=dict)
    seen: int = 0

    def update(self, times: list[float]) -> list[float]:
        """Score of every process for one step: its time over the median of the others.

        Excluding the rank itself keeps the score meaningful in small worlds: with two
        ranks the plain median is the mean, which caps any score below 2.
        """
        scores = []
        for rank, mine in enumerate(times):
            others = times[:rank] + times[rank + 1 :]
            median = statistics.median(others) if others else mine
            scores.append(mine / median if median > 0 else 1.0)
        self.seen += 1
        if self.seen <= self.ignore_first:
            return scores
        for rank, score in enumerate(scores):
            self.streaks[rank] = self.streaks.get(rank, 0) + 1 if score > self.factor else 0
        return scores

    def persistent(self) -> int | None:
        """A process rank that straggled ``patience`` steps in a row, if any."""
        for rank, streak in sorted(self.streaks.items()):
            if streak >= self.patience:
                return rank
        return None


FaultKind = Literal["nan", "spike", "slow", "crash", "term", "hang"]


@dataclass(frozen=True)
class Fault:
    """One injected fault, parsed from ``kind=nan,step=5,rank=1``.

    Steps are 0-based step indices (the step that completes as step ``step + 1`` in
    the log). nan, spike and crash faults fire once per process.

    Keys: ``kind`` (nan | spike | slow | crash | term: the process sends itself SIGTERM,
    as a pod being stopped gets it | hang: forward never returns), ``step`` (the step it
    fires at; for ``slow`` the first slowed step, default 0), ``rank`` (plan rank,
    default all), ``seconds`` (slow: delay per step), ``scale`` (spike: loss factor),
    ``sticky`` (spike: the batch's samples stay poisoned, so a re-injection spikes
    again; nan: a NaN gradient at every step from ``step`` on, e.g. broken hardware, so
    rollbacks cannot clear it and ``ROLLBACK_EXHAUSTED`` follows), ``when`` (crash:
    ``step`` or ``save`` = right after starting that step's checkpoint), ``attempt``
    (crash, term, hang: only on this torchrun restart attempt).
    """

    kind: FaultKind
    step: int = 0
    rank: int | None = None
    seconds: float = 1.0
    scale: float = 50.0
    sticky: bool = False
    when: Literal["step", "save"] = "step"
    attempt: int = 0

    @classmethod
    def parse(cls, text: str) -> Fault:
        """Parse ``key=value,...``; raises ValueError naming the bad part."""
        fields: dict[str, str] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            if not sep:
                raise ValueError(f"fault {text!r}: {part!r} is not key=value")
            fields[key.strip()] = value.strip()
        kind = fields.pop("kind", "")
        if kind not in ("nan", "spike", "slow", "crash", "term", "hang"):
            raise ValueError(f"fault {text!r}: kind must be nan, spike, slow, crash, term or hang")
        when = fields.pop("when", "step")
        if when not in ("step", "save"):
            raise ValueError(f"fault {text!r}: when must be step or save")
        rank = fields.pop("rank", None)
        try:
            fault = cls(
                kind=kind,  # type: ignore[arg-type]
                step=int(fields.pop("step", "0")),
                rank=None if rank is None else int(rank),
                seconds=float(fields.pop("seconds", "1.0")),
                scale=float(fields.pop("scale", "50")),
                sticky=fields.pop("sticky", "0") in ("1", "true", "yes"),
                when=when,  # type: ignore[arg-type]
                attempt=int(fields.pop("attempt", "0")),
            )
        except ValueError as error:
            raise ValueError(f"fault {text!r}: {error}") from None
        if fields:
            raise ValueError(f"fault {text!r}: unknown keys {sorted(fields)}")
        return fault


@dataclass
class FaultInjector:
    """Applies the faults aimed at this rank; test hooks, inert when the list is empty."""

    faults: list[Fault]
    plan_rank: int
    attempt: int = 0
    poisoned: set[int] = field(default_factory=set)
    fired: set[Fault] = field(default_factory=set)
    """Step-triggered faults fire once per process, so a rollback replays those steps cleanly."""

    def _fires(self, fault: Fault, step: int) -> bool:
        if fault.step != step or fault in self.fired:
            return False
        self.fired.add(fault)
        return True

    def _mine(self, kind: FaultKind) -> list[Fault]:
        return [f for f in self.faults if f.kind == kind and f.rank in (None, self.plan_rank)]

    def loss_scale(self, step: int, samples: list[int]) -> float:
        """Factor on this step's loss (a spike), 1.0 normally."""
        scale = 1.0
        for fault in self._mine("spike"):
            if self._fires(fault, step) or (fault.sticky and self.poisoned.intersection(samples)):
                scale = fault.scale
                if fault.sticky:
                    self.poisoned.update(samples)
        return scale

    def nan_gradients(self, step: int) -> bool:
        """Whether this step's backward must produce NaN gradients (every step if sticky).

        The NaN enters in backward, as a real one would, so it travels through the
        gradient all-reduces (overlapped with backward or not) to every holder.
        """
        faults = self._mine("nan")
        return any([self._fires(f, step) or (f.sticky and step >= f.step) for f in faults])

    def delay(self, step: int) -> None:
        """Sleep like a slow device before gradient sync."""
        for fault in self._mine("slow"):
            if step >= fault.step:
                time.sleep(fault.seconds)

    def crash(self, step: int, when: Literal["step", "save"]) -> None:
        """Die abruptly (as if the node vanished) at a ``crash`` fault's step."""
        for fault in self._mine("crash"):
            if fault.when == when and fault.attempt == self.attempt and self._fires(fault, step):
                os._exit(137)

    def hang(self, step: int) -> None:
        """Block forever at a ``hang`` fault's step, as a collective that never returns."""
        for fault in self._mine("hang"):
            if fault.attempt == self.attempt and self._fires(fault, step):
                threading.Event().wait()

    def terminate(self, step: int) -> None:
        """Send this process SIGTERM at a ``term`` fault's step (a stop request)."""
        for fault in self._mine("term"):
            if fault.attempt == self.attempt and self._fires(fault, step):
                os.kill(os.getpid(), signal.SIGTERM)
