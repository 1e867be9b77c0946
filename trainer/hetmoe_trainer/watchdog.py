"""Ends a worker whose step never finishes, so a hang becomes a restart.

A collective that never returns (a peer wedged in a kernel, a lost NCCL message, a
switch that drops one flow) leaves every rank of the job blocked with its pod still
Running: nothing fails, so nothing restarts, and the job reports "Running" forever.
The watchdog is a deadline re-armed at every step boundary. When it passes, it logs
how long the step has run and the phase it is stuck in, dumps every thread's stack
(where it is blocked), and exits with ``WorkerExit.HUNG``; the torchrun agent stops
the other local workers and the operator restarts the job from the latest checkpoint.

A rank waiting in a collective is given a little longer
(:func:`collective_extra_seconds`) than one stuck anywhere else: when one rank wedges
in a kernel, the others wait for it in their next collective, and the wedged rank,
reporting first, is the failure the job's status names (pod and node). A rank that
gives up inside a collective says so (``plan.WAITING_FOR_PEERS_MARK``), so the
operator can tell it from the culprit even when it sees that pod first.

The check runs in a Python thread, which needs the GIL: collectives and kernel waits
release it, a wedged C extension might not. ``faulthandler.dump_traceback_later`` is
armed as well, a little later, because it needs no GIL: it dumps the stacks and exits
(with code 1) even then.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import sys
import threading
import time
from collections.abc import Callable

from hetmoe_operator.plan import WAITING_FOR_PEERS_MARK, WorkerExit
from hetmoe_trainer.termination import record_termination

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0
FALLBACK_DELAY_SECONDS = 60.0
"""How much later than the watchdog the GIL-free fallback fires."""


def collective_extra_seconds(timeout_s: float) -> float:
    """How much longer a rank waiting in a collective waits before it reports a hang."""
    return max(2.0, 0.1 * timeout_s)


def exit_hung(message: str, plan_rank: int | None = None) -> None:
    """Log, dump every thread's stack to stderr, record why for the pod's status
    (:mod:`hetmoe_trainer.termination`), exit with ``WorkerExit.HUNG``."""
    log.error("%s", message)
    record_termination(message, plan_rank)
    faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
    sys.stderr.flush()
    os._exit(WorkerExit.HUNG)


class HangWatchdog:
    """A per-step deadline; ``timeout_s`` 0 turns it off (no thread, nothing armed)."""

    def __init__(self, timeout_s: float, on_hang: Callable[[str], None] = exit_hung) -> None:
        self.timeout_s = timeout_s
        self._on_hang = on_hang
        self._lock = threading.Lock()
        self._deadline = 0.0
        self._since = 0.0
        self._phase = "start-up"
        self._collective = False
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> HangWatchdog:
        if self.timeout_s > 0:
            self.beat("start-up")
            self._thread = threading.Thread(target=self._watch, name="hang-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
            faulthandler.cancel_dump_traceback_later()

    def beat(self, phase: str) -> None:
        """Progress: a new deadline, ``timeout_s`` from now, for ``phase``."""
        now = time.monotonic()
        with self._lock:
            self._deadline, self._since, self._phase = now + self.timeout_s, now, phase
            self._collective = False
        if self.timeout_s > 0:
            faulthandler.dump_traceback_later(self.timeout_s + FALLBACK_DELAY_SECONDS, exit=True)

    def phase(self, phase: str, *, collective: bool = False) -> None:
        """Name what the step is doing now, without a new deadline; ``collective``: it
        waits for the other ranks (see the module docstring)."""
        with self._lock:
            self._phase, self._collective = phase, collective

    def where(self) -> tuple[str, bool]:
        """The phase the step is in now, and whether it waits for other ranks there
        (tracked even with the deadline off: a crash report names it too)."""
        with self._lock:
            return self._phase, self._collective

    def _watch(self) -> None:
        while not self._done.wait(min(POLL_SECONDS, self.timeout_s)):
            with self._lock:
                now = time.monotonic()
                extra = collective_extra_seconds(self.timeout_s) if self._collective else 0.0
                late = now > self._deadline + extra
                waiting = f" {WAITING_FOR_PEERS_MARK}" if self._collective else ""
                message = (
                    f"no progress for {now - self._since:.0f} s (hang timeout "
                    f"{self.timeout_s:.0f} s), stuck in {self._phase}{waiting}: exiting "
                    f"with {WorkerExit.HUNG} so the job restarts from its latest checkpoint"
                )
            if late:
                self._on_hang(message)
                return
