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


def test_a_pod_replaced_alone_is_named_with_the_failure_that_replaced_it() -> None:
    job = _job({"step": 9, "totalSteps": 16})
    job["status"] |= {
        "replacedPods": ["tiny-g1-pool-d-0"],
        "lastFailure": {
            "cause": "WorkerFailed",
            "pod": "tiny-g1-pool-d-0",
            "node": "d0",
            "exitCode": 137,
            "reason": "Error",
            "action": "restart",
            "replacedAlone": True,
        },
    }
    text = render(job)
    assert "pod tiny-g1-pool-d-0 on d0 exit 137 (Error) -> restart (the pod alone)" in text
    assert "replaced   tiny-g1-pool-d-0 alone in this generation" in text
    del job["status"]["replacedPods"], job["status"]["lastFailure"]["replacedAlone"]
    text = render(job)
    assert "alone" not in text
