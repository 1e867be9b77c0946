"""Operator metrics (Prometheus): one registry per operator instance, no globals.

Labelled series are created at start for every label value known in advance (each
phase, each restart cause) with value 0. Without that, a healthy operator exports no
``hetmoe_operator_restarts_total`` series at all, and ``rate()``/``increase()`` panels
show "No data" -- indistinguishable from an operator that is not scraped.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from hetmoe_operator.api.status import PHASES

RESTART_CAUSES: Final = (
    "WorkerFailed",
    "NodeLost",
    "WorkerStopped",
    "WorkerHung",
    "ReplaceNode",
    "FailureRuleFail",
    "ConfigError",
    "RollbackExhausted",
    "ReplacementUnschedulable",
)
"""Every cause ``reconcile.failures.classify`` can return (a test keeps them in sync)."""


@dataclass
class OperatorMetrics:
    """Everything the dashboard shows about the operator itself."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.jobs = Gauge("hetmoe_operator_jobs", "MoEJobs by phase", ["phase"], registry=r)
        self.reconcile_seconds = Histogram(
            "hetmoe_operator_reconcile_duration_seconds",
            "Time of one reconcile pass",
            registry=r,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.planning_seconds = Histogram(
            "hetmoe_operator_planning_duration_seconds",
            "Time of one planner call",
            registry=r,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.restarts = Counter(
            "hetmoe_operator_restarts",
            "Worker failures acted on (a new generation, or one pod replaced alone), by cause",
            ["cause"],
            registry=r,
        )
        self.pods_replaced = Counter(
            "hetmoe_operator_pods_replaced",
            "Worker pods replaced alone in their generation (elastic.inPlaceRestarts)",
            registry=r,
        )
        self.api_requests = Counter(
            "hetmoe_operator_api_requests",
            "Kubernetes API requests",
            ["verb", "resource"],
            registry=r,
        )
        self.api_errors = Counter(
            "hetmoe_operator_api_errors",
            "Failed Kubernetes API requests",
            ["verb", "resource", "code"],
            registry=r,
        )
        self._phases: dict[tuple[str, str], str] = {}
        for phase in PHASES:
            self.jobs.labels(phase).set(0)
        for cause in RESTART_CAUSES:
            self.restarts.labels(cause)

    def job_phase(self, namespace: str, name: str, phase: str | None) -> None:
        """Record a job's phase (None when it is gone) and refresh the gauge."""
        key = (namespace, name)
        if phase is None:
            self._phases.pop(key, None)
        else:
            self._phases[key] = phase
        for each in PHASES:
            self.jobs.labels(each).set(sum(1 for p in self._phases.values() if p == each))

    def serve(self, port: int) -> None:
        """Expose /metrics on ``port`` (0 disables)."""
        if port:
            start_http_server(port, registry=self.registry)
