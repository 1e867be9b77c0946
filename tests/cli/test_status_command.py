"""``hetmoe status`` renders what the MoEJob's status says."""

from __future__ import annotations

from hetmoe_operator.cli.status_command import render


def _job(progress: dict) -> dict:
    return {
        "metadata": {"namespace": "ns", "name": "tiny"},
        "status": {"phase": "Running", "restarts": 0, "progress": progress},
    }


def test_in_place_restarts_are_shown_with_their_reason() -> None:
    reason = "pool fast node slot 0: local rank 1 exited with code 137"
    text = render(
        _job({"step": 9, "totalSteps": 16, "inPlaceRestarts": 2, "lastInPlaceRestart": reason})
    )
    assert f"in place   2 restart(s) this generation; last: {reason}" in text
    assert "in place" not in render(_job({"step": 9, "totalSteps": 16}))
