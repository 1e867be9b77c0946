"""Observability end to end: a real Prometheus scrapes the operator and a local run,
and every PromQL expression of the shipped Grafana dashboard returns data.

The operator is the real ``hetmoe operator`` on the real control plane (its metrics
port read from its command line); it gets a job to plan and run on kwok nodes, a
worker failure (kwok chaos stage) so a restart is counted, and a ResourceQuota that
makes the API server refuse a pod, so the API-error panel has a real error to show.
Meanwhile a real ``hetmoe run`` trains the tiny job locally and Prometheus finds its
ranks through the file-based discovery file the run keeps. A renamed metric or label
on either side, or a panel whose expression cannot return data, fails here instead
of showing an empty panel to a user.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient

from hetmoe_operator.local.supervisor import SCRAPE_TARGETS
from tests.cluster.controlplane import ControlPlane
from tests.integration.operator.conftest import (
    OperatorProcess,
    create_job,
    eventually,
    fail_pod,
    get_job,
    job_manifest,
    job_pods,
    metrics_port,
    wait_phase,
)
from tests.local.conftest import (
    LOCAL_CLUSTER,
    REPO,
    RUN_TIMEOUT,
    hetmoe_argv,
    kill_group,
    write_job,
)
from tests.local.prometheus import (
    DASHBOARD,
    Prometheus,
    dashboard_expressions,
    finite_values,
    prometheus_server,
)

pytestmark = pytest.mark.integration

METRIC = re.compile(r"\bhetmoe_[a-z0-9_]+")
API_ERRORS = "hetmoe_operator_api_errors_total"


def two_ranks(directory: Path) -> Path:
    """The shipped local cluster with one device per pool: two ranks, one per grade,
    start faster on a loaded machine than four and still feed every panel."""
    cluster = yaml.safe_load(LOCAL_CLUSTER.read_text())
    for pool in cluster["pools"]:
        pool["devicesPerNode"] = 1
    path = directory / "two-ranks.yaml"
    path.write_text(yaml.safe_dump(cluster))
    return path


def exercise_operator(
    kube_api: ApiClient, control_plane: ControlPlane, namespace: str, prometheus: Prometheus
) -> None:
    """A job planned and Running, one worker failure restarted, one refused pod create."""
    # Steps unique to this test: the operator memoises plans by spec, and the
    # planning-time panel needs a planner call after Prometheus' first scrape.
    create_job(
        kube_api,
        namespace,
        job_manifest(
            "observed", training={"steps": 37, "globalBatchSize": 8, "sequenceLength": 64}
        ),
    )
    wait_phase(kube_api, namespace, "observed", "Running", timeout=60)
    victim = job_pods(kube_api, namespace, "observed")[0]["metadata"]["name"]
    fail_pod(control_plane, namespace, victim, exit_code=3)
    wait_phase(kube_api, namespace, "observed", "Running", timeout=60, restarts=1, generation=2)
    prometheus.wait_for(
        'increase(hetmoe_operator_restarts_total{cause="WorkerFailed"}[5m]) > 0',
        30,
        "the restart counted by cause",
    )

    control_plane.kubectl("-n", namespace, "create", "quota", "no-more-pods", "--hard=pods=0")
    create_job(kube_api, namespace, job_manifest("refused"))

    def refused() -> bool:
        conditions = (get_job(kube_api, namespace, "refused").get("status") or {}).get(
            "conditions"
        ) or []
        return any(c["reason"] == "ChildCreateFailed" for c in conditions)

    eventually(refused, 60, "the quota's refusal on the job (ChildCreateFailed)")
    prometheus.wait_for(
        f'{API_ERRORS}{{verb="create",resource="pods",code="403"}} > 0',
        30,
        "the refused pod create counted as an API error",
    )


def test_every_dashboard_expression_has_data_from_the_operator_and_a_local_run(
    operator: OperatorProcess,
    kube_api: ApiClient,
    namespace: str,
    control_plane: ControlPlane,
    tmp_path: Path,
) -> None:
    expressions = dashboard_expressions(json.loads(DASHBOARD.read_text()))
    assert expressions, "the dashboard has no panel"
    run_dir = tmp_path / "run"
    targets = run_dir / SCRAPE_TARGETS
    targets.parent.mkdir(parents=True)
    targets.write_text("[]")
    scrape = [
        {
            "job_name": "hetmoe-operator",
            "static_configs": [{"targets": [f"127.0.0.1:{metrics_port(operator)}"]}],
        },
        {
            "job_name": "hetmoe-trainer",
            "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "1s"}],
        },
    ]
    with prometheus_server(tmp_path, scrape) as prometheus:
        started = time.time()
        try:  # the session operator may have been started just now (slow under load)
            prometheus.wait_for('up{job="hetmoe-operator"} == 1', 120, "the operator's scrape")
        except AssertionError as error:
            raise AssertionError(f"{error}\noperator log:\n{operator.log_tail()}") from None
        job = write_job(tmp_path, name="tiny-prom", steps=10, interval=5)
        local = subprocess.Popen(
            hetmoe_argv(job, run_dir, cluster=two_ranks(tmp_path)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
            start_new_session=True,
        )
        try:
            try:
                exercise_operator(kube_api, control_plane, namespace, prometheus)
            except AssertionError as error:
                raise AssertionError(f"{error}\noperator log:\n{operator.log_tail()}") from None
            stdout, stderr = local.communicate(timeout=RUN_TIMEOUT)
        finally:
            if local.poll() is None:
                kill_group(local.pid)
                local.communicate()
        assert local.returncode == 0, stdout + stderr
        time.sleep(2)  # the last scrape of the finished run's final values
        check_dashboard(prometheus, expressions, started, time.time(), run_dir)


def check_dashboard(
    prometheus: Prometheus, expressions: list[str], start: float, end: float, run_dir: Path
) -> None:
    """Every expression has a number over the test's span, and every metric it names
    has series (so a fallback inside an expression cannot hide a renamed metric)."""
    listed = sum(
        len(group["targets"]) for group in json.loads((run_dir / SCRAPE_TARGETS).read_text())
    )
    (ranks,) = prometheus.query_range('count(up{job="hetmoe-trainer"} == 1)', start, end)
    assert max(int(value) for _, value in ranks["values"]) == listed == 2
    results: dict[str, list[Any]] = {
        expr: prometheus.query_range(expr, start, end) for expr in expressions
    }
    names = prometheus.series_names()
    empty = [expr for expr, result in results.items() if not finite_values(result)]
    assert not empty, (
        f"dashboard expressions without data: {empty}; "
        f"hetmoe series scraped: {[n for n in names if n.startswith('hetmoe')]}"
    )
    unscraped = {n for expr in expressions for n in METRIC.findall(expr)} - set(names)
    assert not unscraped, f"the dashboard reads metrics nobody exports: {unscraped}"
    (errors,) = [expr for expr in expressions if API_ERRORS in expr]
    assert max(finite_values(results[errors])) > 0, "the refused create is not on the panel"
