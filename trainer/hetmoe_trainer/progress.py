"""Training progress for the operator: ``progress.json`` and the ``/progress`` endpoint.

Plan rank 0 rewrites ``<checkpoint dir>/progress.json`` atomically (tmp file +
``os.replace``) after every step and serves the same JSON at ``/progress`` on its
metrics port. Why a file and an endpoint rather than writing to the MoEJob status
itself: the trainer must not need the Kubernetes client or RBAC (an import contract
forbids it), the operator already reaches the pod network, and local mode (no
cluster) just reads the file. Schema (all keys always present)::

    {"version": 1, "state": "running" | "finished" | "stopped" | "failed" | "straggler"
              | "rollback-exhausted",
     "step": int, "total_steps": int, "tokens": int, "consumed_samples": int,
     "loss": float | null, "grad_norm": float | null, "lr": float,
     "tokens_per_s": float, "eta_seconds": float | null,
     "last_checkpoint_step": int | null, "restarts": int,
     "anomalies": {"skipped": int, "nonfinite": int, "spike": int, "lowered_lr": int,
                   "reinjected": int, "rollback": int, "straggler": int},
     "events": [{"step", "kind", "detail", "time"}],   # newest last, at most 50
     "stage_step_seconds": {"<stage>": float},         # slowest rank of each stage
     "phase_seconds": {"<phase>": float},              # plan rank 0's last step by phase
     "straggler": null | {"plan_rank", "pool", "node_slot", "local_rank", "score"},
     "launch_id": str, "started_at": float,           # this attempt's launch and start
     "in_place_restarts": int,                         # attempts of this launch before it
     "last_in_place_restart": null | str,              # why the last one happened
     "updated_at": float}                              # unix time

In-place restarts (``elastic.inPlaceRestarts``): torchrun restarts the whole gang of
workers inside the same pods, so the only process that sees every attempt is the one
that outlives them, node 0's launch wrapper (which hosts plan rank 0). It sets
``$HETMOE_LAUNCH_ID`` once; a rank 0 that finds the previous document of the same
launch is the next attempt and counts one more. The agent whose own worker failed
first (its termination-log lines are not marked as waiting for others) writes why to
``in_place_restart.json`` in the checkpoint directory before it restarts, and the
next attempt's rank 0 reports that line. Progress itself (step, loss, ...) carries
over from the previous document until the new attempt's first step.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

ANOMALY_KINDS = (
    "skipped",
    "nonfinite",
    "spike",
    "lowered_lr",
    "reinjected",
    "rollback",
    "straggler",
)


LAUNCH_ID_ENV: Final = "HETMOE_LAUNCH_ID"
"""Set by the launch wrapper, once per pod start; every in-place attempt inherits it."""
IN_PLACE_RESTART_FILE: Final = "in_place_restart.json"
_CARRIED_OVER = ("step", "tokens", "consumed_samples", "loss", "last_checkpoint_step")
"""What a restarted rank 0 reports from the previous document until its first step."""


def _write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}


def record_in_place_restart(checkpoint_dir: Path, seat: str, lines: Sequence[str]) -> None:
    """Say why the gang is about to restart in place (called by the agent of the worker
    that failed first); best effort, like the termination log it comes from."""
    doc = {"time": time.time(), "seat": seat, "lines": list(lines)}
    with contextlib.suppress(OSError):
        _write_atomically(checkpoint_dir / IN_PLACE_RESTART_FILE, json.dumps(doc))


def _in_place_restart_reason(checkpoint_dir: Path, since: float) -> str | None:
    """The reason recorded after ``since`` (the previous attempt's start), if any."""
    doc = _read_json(checkpoint_dir / IN_PLACE_RESTART_FILE)
    if not doc or not isinstance(doc.get("time"), int | float) or doc["time"] < since:
        return None
    lines = "; ".join(str(line) for line in doc.get("lines") or [])
    return f"{doc.get('seat', '?')}: {lines}" if lines else str(doc.get("seat", "?"))


class ProgressReporter:
    """Holds the latest progress document; writes it to disk and hands it to the HTTP route."""

    def __init__(self, path: Path, total_steps: int, restarts: int, launch_id: str = "") -> None:
        self.path = path
        self._lock = threading.Lock()
        previous = _read_json(path)
        same_launch = bool(launch_id) and previous.get("launch_id") == launch_id
        in_place = int(previous.get("in_place_restarts", 0)) + 1 if same_launch else 0
        started = previous.get("started_at")
        reason = (
            _in_place_restart_reason(path.parent, float(started))
            if same_launch and isinstance(started, int | float)
            else None
        )
        now = time.time()
        self._doc: dict = {
            "version": 1,
            "state": "running",
            "step": 0,
            "total_steps": total_steps,
            "tokens": 0,
            "consumed_samples": 0,
            "loss": None,
            "grad_norm": None,
            "lr": 0.0,
            "tokens_per_s": 0.0,
            "eta_seconds": None,
            "last_checkpoint_step": None,
            "restarts": restarts,
            "anomalies": dict.fromkeys(ANOMALY_KINDS, 0),
            "events": [],
            "stage_step_seconds": {},
            "phase_seconds": {},
            "straggler": None,
            "launch_id": launch_id,
            "started_at": now,
            "in_place_restarts": in_place,
            "last_in_place_restart": reason,
            "updated_at": now,
        }
        self._doc.update({key: previous[key] for key in _CARRIED_OVER if key in previous})
        # Written at once, so an attempt that fails before its first step still counts.
        self.update()

    def update(self, **fields: object) -> None:
        """Merge ``fields`` into the document and write it."""
        with self._lock:
            if "anomalies" in fields:
                counts = dict.fromkeys(ANOMALY_KINDS, 0)
                counts.update(fields.pop("anomalies"))  # type: ignore[arg-type]
                self._doc["anomalies"] = counts
            self._doc.update(fields)
            self._doc["updated_at"] = time.time()
            text = json.dumps(self._doc, indent=1, allow_nan=False, default=str)
        _write_atomically(self.path, text)

    def route(self) -> tuple[bytes, str]:
        """``/progress`` body."""
        with self._lock:
            return json.dumps(self._doc, allow_nan=False).encode(), "application/json"
