"""A real Prometheus server for tests, and the shipped dashboard's PromQL expressions.

Debian's ``prometheus`` package (installed by ``tests/local/install_prometheus.sh``,
which ``make test`` runs first) is started on a free loopback port with the scrape
configs a test gives, scraping every second, and stopped (then killed if need be)
when the test ends.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from hetmoe_operator.local.executor import free_port_blocks

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "charts" / "hetmoe" / "dashboards" / "hetmoe.json"
INSTALL = Path(__file__).with_name("install_prometheus.sh")
READY_TIMEOUT = 60
INSTALL_TIMEOUT = 600


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


def finite_values(result: list[Any]) -> list[float]:
    """The numbers of a query_range answer, without NaN/Inf (an empty panel line)."""
    values = [float(value) for series in result for _, value in series["values"]]
    return [value for value in values if math.isfinite(value)]


@dataclass(frozen=True)
class Prometheus:
    """A running server and how to query it."""

    url: str
    log: Path

    def get(self, path: str, **params: Any) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as response:
            answer = json.loads(response.read())
        assert answer["status"] == "success", (path, params, answer)
        return answer["data"]

    def query(self, expr: str) -> list[Any]:
        return list(self.get("/api/v1/query", query=expr)["result"])

    def query_range(self, expr: str, start: float, end: float) -> list[Any]:
        return list(
            self.get("/api/v1/query_range", query=expr, start=start, end=end, step=1)["result"]
        )

    def series_names(self) -> list[str]:
        return [str(name) for name in self.get("/api/v1/label/__name__/values")]

    def wait_for(self, expr: str, timeout: float, what: str) -> list[Any]:
        """Poll an instant query until it returns a series."""
        deadline = time.monotonic() + timeout
        while True:
            result = self.query(expr)
            if result:
                return result
            assert time.monotonic() < deadline, f"timed out waiting for {what}: {expr}"
            time.sleep(0.5)


def ensure_installed() -> None:
    """Install the Debian package when missing; skip (with the reason) if that fails."""
    if shutil.which("prometheus") is not None:
        return
    installed = subprocess.run(
        ["bash", str(INSTALL)], capture_output=True, text=True, timeout=INSTALL_TIMEOUT
    )
    if installed.returncode != 0:
        pytest.skip(f"prometheus is not installed and cannot be: {installed.stderr.strip()}")


@contextmanager
def prometheus_server(
    directory: Path, scrape_configs: list[dict[str, Any]]
) -> Iterator[Prometheus]:
    """A Prometheus on 127.0.0.1 scraping ``scrape_configs`` every second."""
    ensure_installed()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [
            {"scrape_interval": "1s", "scrape_timeout": "1s", **job} for job in scrape_configs
        ],
    }
    config_file = directory / "prometheus.yml"
    config_file.write_text(yaml.safe_dump(config))
    (port,) = free_port_blocks([1])
    log = directory / "prometheus.log"
    with log.open("wb") as out:
        server = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config_file}",
                f"--storage.tsdb.path={directory / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                urllib.request.urlopen(f"{url}/-/ready", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None, log.read_text()
                assert time.monotonic() < deadline, "prometheus did not become ready"
                time.sleep(0.5)
        yield Prometheus(url, log)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
