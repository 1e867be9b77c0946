"""The operator's reading of the trainer's /progress document."""

from __future__ import annotations

from hetmoe_operator.api.status import MAX_REASON_CHARS
from hetmoe_operator.kube.progress import parse_progress
from tests.operator.fakes import NOW


def test_trainer_schema_v1_maps_onto_status_progress() -> None:
    doc = {
        "version": 1,
        "state": "running",
        "step": 12,
        "total_steps": 40,
        "tokens": 6144,
        "loss": 5.5,
        "tokens_per_s": 812.5,
        "eta_seconds": 30.0,
        "last_checkpoint_step": 10,
        "restarts": 1,
    }
    parsed = parse_progress(doc, NOW)
    assert parsed is not None
    progress, checkpoint = parsed
    assert (progress.step, progress.total_steps, progress.tokens) == (12, 40, 6144)
    assert (progress.tokens_per_second, progress.eta_seconds, checkpoint) == (812.5, 30.0, 10)
    assert progress.to_wire()["tokensPerSecond"] == 812.5


def test_garbage_keeps_the_old_progress() -> None:
    assert parse_progress(["not", "a", "dict"], NOW) is None
    assert parse_progress({"step": -3}, NOW) is None
    parsed = parse_progress({"step": 1, "loss": None, "last_checkpoint_step": None}, NOW)
    assert parsed is not None and parsed[1] is None


def test_in_place_restarts_and_their_reason_reach_the_status() -> None:
    reason = "pool a node slot 1: plan rank 3: RuntimeError in forward: " + "x" * 5000
    parsed = parse_progress(
        {"step": 7, "in_place_restarts": 2, "last_in_place_restart": reason}, NOW
    )
    assert parsed is not None
    progress = parsed[0]
    assert progress.in_place_restarts == 2
    assert progress.last_in_place_restart == reason[:MAX_REASON_CHARS]
    assert progress.to_wire()["inPlaceRestarts"] == 2
