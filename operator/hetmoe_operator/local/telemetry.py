"""What a local run shows and summarises, read from the trainer's own outputs.

The trainer (plan rank 0) writes ``progress.json``, ``train_log.jsonl`` and its
checkpoints into the checkpoint directory (see ``hetmoe_trainer.progress``,
``.loop`` and ``.checkpoint`` for the formats). The operator reads the same
progress document from rank 0, so what ``hetmoe run`` shows is what the MoEJob
status would show for the same job.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from hetmoe_operator.api import status

PROGRESS_FILE = "progress.json"
TRAIN_LOG = "train_log.jsonl"
LATEST_POINTER = "latest"
CHECKPOINT_MANIFEST = "MANIFEST.json"


@dataclass(frozen=True)
class Progress:
    """One reading of the trainer's ``progress.json``."""

    state: str
    step: int
    total_steps: int
    tokens: int
    loss: float | None
    tokens_per_second: float
    eta_seconds: float | None
    last_checkpoint_step: int | None
    anomalies: Mapping[str, int] = field(default_factory=dict)
    stage_step_seconds: Mapping[int, float] = field(default_factory=dict)
    """Measured seconds of the last step, slowest rank of each stage."""
    in_place_restarts: int = 0
    last_in_place_restart: str | None = None

    def as_status(self, update_time: str) -> status.Progress:
        """The MoEJob status form of this reading (what ``kubectl get mj`` shows)."""
        return status.Progress(
            step=self.step,
            total_steps=self.total_steps,
            tokens=self.tokens,
            loss=self.loss,
            tokens_per_second=self.tokens_per_second,
            eta_seconds=self.eta_seconds,
            in_place_restarts=self.in_place_restarts,
            last_in_place_restart=(
                self.last_in_place_restart[: status.MAX_REASON_CHARS]
                if self.last_in_place_restart
                else None
            ),
            update_time=update_time,
        )


def _finite(value: object) -> float | None:
    if not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def read_progress(checkpoint_dir: Path) -> Progress | None:
    """The latest progress, or None before rank 0 wrote any."""
    try:
        doc = json.loads((checkpoint_dir / PROGRESS_FILE).read_text())
    except (OSError, ValueError):
        return None
    checkpoint = doc.get("last_checkpoint_step")
    return Progress(
        state=str(doc.get("state", "")),
        step=int(doc.get("step", 0)),
        total_steps=int(doc.get("total_steps", 0)),
        tokens=int(doc.get("tokens", 0)),
        loss=_finite(doc.get("loss")),
        tokens_per_second=_finite(doc.get("tokens_per_s")) or 0.0,
        eta_seconds=_finite(doc.get("eta_seconds")),
        last_checkpoint_step=int(checkpoint) if checkpoint is not None else None,
        anomalies={str(k): int(v) for k, v in (doc.get("anomalies") or {}).items()},
        stage_step_seconds={
            int(k): float(v) for k, v in (doc.get("stage_step_seconds") or {}).items()
        },
        in_place_restarts=int(doc.get("in_place_restarts") or 0),
        last_in_place_restart=(
            str(doc["last_in_place_restart"]) if doc.get("last_in_place_restart") else None
        ),
    )


def read_train_log(checkpoint_dir: Path) -> list[dict[str, float]]:
    """One record per step, the last line of a step winning (a resumed run trains the
    steps after its checkpoint again, and those are the values that count)."""
    try:
        lines = (checkpoint_dir / TRAIN_LOG).read_text().splitlines()
    except OSError:
        return []
    by_step: dict[int, dict[str, float]] = {}
    for line in lines:
        try:
            record = json.loads(line)
            by_step[int(record["step"])] = record
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill
    return [by_step[step] for step in sorted(by_step)]


def latest_checkpoint(checkpoint_dir: Path) -> str:
    """The checkpoint the ``latest`` pointer names ("" when there is none yet)."""
    try:
        return (checkpoint_dir / LATEST_POINTER).read_text().strip()
    except OSError:
        return ""


def list_checkpoints(checkpoint_dir: Path) -> list[str]:
    """Complete checkpoints (those with a manifest), oldest first; latest marked."""
    latest = latest_checkpoint(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    names = sorted(p.name for p in checkpoint_dir.iterdir() if (p / CHECKPOINT_MANIFEST).is_file())
    return [f"{name} (latest)" if name == latest else name for name in names]
