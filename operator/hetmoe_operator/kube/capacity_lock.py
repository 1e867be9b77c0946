"""The capacity lock: one pass at a time from discovery until its pods are booked.

Passes that plan must see the pods of the job planned just before them, or two jobs
would book the same nodes; so discovery, planning and booking run under one lock.
Most passes that take it are jobs waiting for capacity that find none again: when
capacity may be back (a restart deleted its pods, a node returned) every waiting job
looks, and a plain lock queued a restarting job behind all of them (2.2 s of lock
wait per restart with 36 waiting jobs on the loaded bench host). Here a pass of a job
that is launching or restarting goes first; waiting jobs take the lock only while no
such pass is queued.
"""

from __future__ import annotations

import threading


class CapacityLock:
    """A lock with two priorities: urgent passes are served before waiting ones."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._held = False
        self._urgent_queued = 0

    @property
    def urgent_queued(self) -> int:
        """Urgent passes blocked on the lock right now."""
        with self._changed:
            return self._urgent_queued

    def acquire(self, *, urgent: bool) -> None:
        """Block until the lock is ours; a non-urgent caller also lets urgent ones by."""
        with self._changed:
            if urgent:
                self._urgent_queued += 1
                try:
                    self._changed.wait_for(lambda: not self._held)
                finally:
                    self._urgent_queued -= 1
            else:
                self._changed.wait_for(lambda: not self._held and not self._urgent_queued)
            self._held = True

    def release(self) -> None:
        with self._changed:
            self._held = False
            self._changed.notify_all()
