"""A request to stop, from SIGTERM or SIGINT, honoured at the next step boundary.

A pod is asked to stop with SIGTERM (suspend, node drain, eviction, preemption) and
killed when its grace period is over; ``hetmoe run`` does the same on Ctrl-C. Python's
default reaction would end the worker at once, losing every step since the last
checkpoint. Instead the first signal only sets a flag: the loop folds it into the
per-step statistics all-reduce, so every rank sees it after the same step, saves one
checkpoint and exits with ``WorkerExit.STOPPED``. A rank blocked in a collective (its
peer died) never reaches the boundary; the kubelet's (or torchrun's) SIGKILL ends it,
so the flag cannot keep a broken gang alive. The first signal also restores the
previous handlers, so a second one acts as it always did (Ctrl-C twice kills now).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_Handler = Callable[[int, FrameType | None], object] | int | signal.Handlers | None


class StopRequest:
    """Whether this process has been asked to stop, and by which signal."""

    def __init__(self) -> None:
        self.signal: signal.Signals | None = None

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def request(self, sig: signal.Signals) -> None:
        """Record a stop request (what the signal handler does; tests call it directly)."""
        if self.signal is None:
            self.signal = sig


@contextmanager
def stop_on_signals(request: StopRequest) -> Iterator[StopRequest]:
    """Turn the first SIGTERM/SIGINT into ``request``; restore the handlers on exit.

    Must be entered on the main thread (the only one Python delivers signals to).
    """
    previous: dict[signal.Signals, _Handler] = {}

    def handle(signum: int, _frame: FrameType | None) -> None:
        sig = signal.Signals(signum)
        log.warning("%s received: stopping after this step, with a checkpoint", sig.name)
        request.request(sig)
        _restore(previous)

    for sig in STOP_SIGNALS:
        previous[sig] = signal.signal(sig, handle)
    try:
        yield request
    finally:
        _restore(previous)


def _restore(previous: dict[signal.Signals, _Handler]) -> None:
    for sig, handler in previous.items():
        # None: the handler was not installed from Python; the default stands in.
        signal.signal(sig, signal.SIG_DFL if handler is None else handler)
