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
     "updated_at": float}                              # unix time
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

ANOMALY_KINDS = (
    "skipped",
    "nonfinite",
    "spike",
    "lowered_lr",
    "reinjected",
    "rollback",
    "straggler",
)


class ProgressReporter:
    """Holds the latest progress document; writes it to disk and hands it to the HTTP route."""

    def __init__(self, path: Path, total_steps: int, restarts: int) -> None:
        self.path = path
        self._lock = threading.Lock()
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
            "updated_at": time.time(),
        }

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
        tmp = self.path.with_name(f".{self.path.name}.tmp{os.getpid()}")
        tmp.write_text(text)
        os.replace(tmp, self.path)

    def route(self) -> tuple[bytes, str]:
        """``/progress`` body."""
        with self._lock:
            return json.dumps(self._doc, allow_nan=False).encode(), "application/json"
