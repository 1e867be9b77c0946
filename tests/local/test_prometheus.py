"""Observability end to end: a real Prometheus scrapes a local run, the dashboard shows data.

Every PromQL expression of the shipped Grafana dashboard that concerns trainer
metrics must return data from a real scrape of a real ``hetmoe run``: a renamed
metric or label on either side fails here, not on a user's empty panel. Prometheus
finds the workers through the file-based discovery file ``hetmoe run`` keeps in the
run directory (Debian's ``prometheus`` package, installed by
``tests/local/install_prometheus.sh``).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from tests.local.conftest import REPO, hetmoe_argv, run_hetmoe, write_job

from hetmoe_operator.kube.metrics import OperatorMetrics
from hetmoe_operator.local.executor import free_port_blocks
from hetmoe_operator.local.supervisor import SCRAPE_TARGETS

DASHBOARD = REPO / "charts" / "hetmoe" / "dashboards" / "hetmoe.json"
INSTALL = Path(__file__).with_name("install_prometheus.sh")
READY_TIMEOUT = 60
INSTALL_TIMEOUT = 600
METRIC = re.compile(r"\bhetmoe_[a-z0-9_]+")


def dashboard_expressions(dashboard: Any) -> list[str]:
    """Every ``expr`` of every panel target, in dashboard order, without duplicates."""
    found: list[str] = []
    stack = [dashboard]
    while stack:
        item = stack.pop(0)
        if isinstance(item, dict):
            if isinstance(item.get("expr"), str) and item["expr"] not in found:
                found.append(item["expr"])
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return found


def operator_metric_names() -> set[str]:
    """Series names the operator exports (from its own registry), suffixes included."""
    families = OperatorMetrics().registry.collect()
    suffixes = ("", "_total", "_bucket", "_sum", "_count", "_created")
    return {family.name + suffix for family in families for suffix in suffixes}


def trainer_expressions(expressions: list[str]) -> list[str]:
    """Expressions over hetmoe metrics that are not all the operator's own.

    Classified by the operator's registry rather than by a name prefix, so a metric
    renamed on one side only still lands here and fails for lack of data.
    """
    operator = operator_metric_names()
    return [
        expr
        for expr in expressions
        if METRIC.search(expr) and not set(METRIC.findall(expr)) <= operator
    ]


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as response:
        return json.loads(response.read())


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A Prometheus on 127.0.0.1 scraping every second what the run dir lists."""
    if shutil.which("prometheus") is None:
        installed = subprocess.run(
            ["bash", str(INSTALL)], capture_output=True, text=True, timeout=INSTALL_TIMEOUT
        )
        if installed.returncode != 0:
            pytest.skip(f"prometheus is not installed and cannot be: {installed.stderr.strip()}")
    run_dir = tmp_path / "run"
    targets = run_dir / SCRAPE_TARGETS
    targets.parent.mkdir(parents=True)
    targets.write_text("[]")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {
                "job_name": "hetmoe-trainer",
                "scrape_interval": "1s",
                "scrape_timeout": "1s",
                "file_sd_configs": [{"files": [str(targets)], "refresh_interval": "1s"}],
            }
        ],
    }
    config_file = tmp_path / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    (port,) = free_port_blocks([1])
    url = f"http://127.0.0.1:{port}"
    with (tmp_path / "prometheus.log").open("wb") as log:
        server = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config_file}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "prometheus.log").read_text()
                assert time.monotonic() < deadline, "prometheus did not become ready"
                time.sleep(0.5)
        yield url, run_dir
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def test_every_trainer_panel_of_the_dashboard_has_data(
    prometheus: tuple[str, Path], tmp_path: Path
) -> None:
    url, run_dir = prometheus
    expressions = trainer_expressions(dashboard_expressions(json.loads(DASHBOARD.read_text())))
    assert expressions, "the dashboard has no trainer panel"
    started = time.time()
    job = write_job(tmp_path, name="tiny-prom", steps=16, interval=5)
    result = run_hetmoe(hetmoe_argv(job, run_dir), run_dir)
    assert result.returncode == 0, result.stdout + result.stderr

    def query_range(expr: str) -> list[Any]:
        query = urllib.parse.urlencode(
            {"query": expr, "start": started, "end": time.time(), "step": "1"}
        )
        answer = _get(f"{url}/api/v1/query_range?{query}")
        assert answer["status"] == "success", (expr, answer)
        return list(answer["data"]["result"])

    # Every rank's endpoint (one per trainer process, all pods) was scraped at once.
    listed = sum(
        len(group["targets"]) for group in json.loads((run_dir / SCRAPE_TARGETS).read_text())
    )
    (series,) = query_range('count(up{job="hetmoe-trainer"} == 1)')
    assert max(int(value) for _, value in series["values"]) == listed == 4
    empty = [expr for expr in expressions if not query_range(expr)]
    names = _get(f"{url}/api/v1/label/__name__/values")["data"]
    assert not empty, (
        f"dashboard expressions without data: {empty}; "
        f"hetmoe series scraped: {[n for n in names if n.startswith('hetmoe')]}"
    )
