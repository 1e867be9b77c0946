"""Why a worker ended, in one line the operator puts on the MoEJob's status.

Kubernetes copies a container's ``terminationMessagePath`` (``/dev/termination-log``
by default) into ``status.containerStatuses[].state.terminated.message`` when it
exits; the operator already carries that message into ``status.lastFailure`` and
the failure condition. So a worker that ends with a ``WorkerExit`` code appends one
line there saying why (``plan rank 3: no progress for 1800 s ... stuck in step 41:
gradient sync``), and ``kubectl get mj -o yaml`` shows it without anyone reading
logs. Several ranks share a container, so each appends its own line (the kubelet
keeps the first 4 KiB). Local mode points ``HETMOE_TERMINATION_LOG`` at a file of its
own; elsewhere (no such file, read-only) nothing is written.
"""

from __future__ import annotations

import os
from pathlib import Path

from hetmoe_operator.plan import TERMINATION_LOG_ENV

KUBERNETES_TERMINATION_LOG = Path("/dev/termination-log")
MAX_LINE_CHARS = 512


def termination_log() -> Path | None:
    """Where to write: ``$HETMOE_TERMINATION_LOG``, else Kubernetes' file if it exists."""
    configured = os.environ.get(TERMINATION_LOG_ENV)
    if configured:
        return Path(configured)
    return KUBERNETES_TERMINATION_LOG if KUBERNETES_TERMINATION_LOG.exists() else None


def record_termination(message: str, plan_rank: int | None = None) -> None:
    """Append ``plan rank N: message`` (one line, shortened) to the termination log;
    best effort."""
    path = termination_log()
    if path is None:
        return
    prefix = "" if plan_rank is None else f"plan rank {plan_rank}: "
    line = prefix + " ".join(message.split())
    if len(line) > MAX_LINE_CHARS:
        line = line[: MAX_LINE_CHARS - 3] + "..."
    try:
        with path.open("a", encoding="utf-8") as log:
            log.write(line + "\n")
    except OSError:
        pass  # a message is a courtesy: never fail the exit path over it


def take_termination_lines() -> list[str]:
    """Read the termination log and empty it: after an in-place restart it must speak
    for the new attempt only, or a later failure would be reported with stale lines."""
    path = termination_log()
    if path is None:
        return []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        path.write_text("", encoding="utf-8")
    except OSError:
        return []
    return [line for line in lines if line.strip()]
