"""Reading training progress from the rank-0 worker.

Why pull instead of the trainer patching the MoEJob: workers then need no API
credentials or RBAC (a compromised training image cannot touch cluster objects),
the operator stays the single writer of status, and the poll rate is bounded by the
operator's setting however many ranks there are. Plan rank 0 serves
``GET /progress`` on its metrics port (schema in ``hetmoe_trainer.progress``); the
operator reads ``step``, ``total_steps``, ``tokens``, ``loss``, ``tokens_per_s``,
``eta_seconds``, ``in_place_restarts``, ``last_in_place_restart`` and
``last_checkpoint_step``.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from datetime import datetime
from typing import Any

from pydantic import ValidationError

from hetmoe_operator.api.status import MAX_REASON_CHARS, Progress
from hetmoe_operator.reconcile.conditions import rfc3339

_FIELDS = {
    # trainer key (hetmoe_trainer.progress, schema version 1) -> Progress field
    "step": "step",
    "total_steps": "total_steps",
    "tokens": "tokens",
    "loss": "loss",
    "tokens_per_s": "tokens_per_second",
    "eta_seconds": "eta_seconds",
    "in_place_restarts": "in_place_restarts",
}


def parse_progress(data: Any, now: datetime) -> tuple[Progress, int | None] | None:
    """Progress and last checkpoint step from the trainer's JSON; None if unusable."""
    if not isinstance(data, dict):
        return None
    fields = {
        ours: data[theirs] for theirs, ours in _FIELDS.items() if data.get(theirs) is not None
    }
    reason = data.get("last_in_place_restart")
    if isinstance(reason, str):
        fields["last_in_place_restart"] = reason[:MAX_REASON_CHARS]
    try:
        progress = Progress(**fields, update_time=rfc3339(now))
    except (ValidationError, TypeError):
        return None
    checkpoint = data.get("last_checkpoint_step")
    valid = isinstance(checkpoint, int) and not isinstance(checkpoint, bool) and checkpoint >= 0
    return progress, checkpoint if valid else None


def read_progress(
    ip: str, port: int, timeout: float, now: datetime
) -> tuple[Progress, int | None] | None:
    """GET the progress of rank 0; unreachable or malformed -> None (keep the old one)."""
    if not ip:
        return None
    try:
        with urllib.request.urlopen(f"http://{ip}:{port}/progress", timeout=timeout) as answer:
            return parse_progress(json.loads(answer.read(1 << 16)), now)
    except (OSError, urllib.error.URLError, ValueError):
        return None
