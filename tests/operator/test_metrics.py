"""Operator metrics: labelled series exist from the start, and the restart causes
pre-created for the dashboard are exactly those the failure classifier can give."""

from __future__ import annotations

import itertools

from prometheus_client import generate_latest

from hetmoe_operator.api.job import FailureRule
from hetmoe_operator.api.reasons import is_known
from hetmoe_operator.api.status import PHASES
from hetmoe_operator.kube.metrics import RESTART_CAUSES, OperatorMetrics
from hetmoe_operator.plan import WorkerExit
from hetmoe_operator.reconcile.failures import (
    NODE_LOST,
    REPLACEMENT_UNSCHEDULABLE,
    SIGTERM_EXIT,
    Failure,
    classify,
)


def _samples(metrics: OperatorMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
    }


def test_every_phase_and_restart_cause_is_exported_as_zero_before_anything_happens() -> None:
    samples = _samples(OperatorMetrics())
    for phase in PHASES:
        assert samples[("hetmoe_operator_jobs", (("phase", phase),))] == 0
    for cause in RESTART_CAUSES:
        assert samples[("hetmoe_operator_restarts_total", (("cause", cause),))] == 0
    text = generate_latest(OperatorMetrics().registry).decode()
    assert 'hetmoe_operator_restarts_total{cause="WorkerFailed"} 0.0' in text


def test_restart_causes_are_exactly_what_the_classifier_returns() -> None:
    rules = [
        FailureRule(name=f"r-{action}", exit_codes=[3], reasons=["OOMKilled"], action=action)
        for action in ("restart", "replace-node", "fail")
    ]
    exit_codes = [
        None,
        1,
        3,
        WorkerExit.CONFIG_ERROR,
        WorkerExit.REPLACE_NODE,
        WorkerExit.ROLLBACK_EXHAUSTED,
        WorkerExit.STOPPED,
        WorkerExit.HUNG,
        SIGTERM_EXIT,
    ]
    reasons = ["Error", "OOMKilled", NODE_LOST, "Deleted", REPLACEMENT_UNSCHEDULABLE]
    causes = {
        classify(Failure("pod", "node", code, reason, "", orderly), rule_set).cause
        for code, reason, orderly in itertools.product(exit_codes, reasons, (False, True))
        for rule_set in ([], *([rule] for rule in rules))
    }
    assert causes == set(RESTART_CAUSES)
    assert all(is_known(cause) for cause in RESTART_CAUSES)


def test_job_phase_counts_each_job_once_and_forgets_deleted_ones() -> None:
    metrics = OperatorMetrics()
    metrics.job_phase("a", "x", "Running")
    metrics.job_phase("a", "y", "Running")
    metrics.job_phase("a", "x", "Succeeded")
    metrics.job_phase("a", "y", None)
    samples = _samples(metrics)
    assert samples[("hetmoe_operator_jobs", (("phase", "Running"),))] == 0
    assert samples[("hetmoe_operator_jobs", (("phase", "Succeeded"),))] == 1
