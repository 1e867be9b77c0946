"""Fixtures for the Helm chart tests: a helm binary and `helm template` as parsed objects."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.controlplane import ensure_built

REPO_ROOT = Path(__file__).resolve().parents[2]
CHART_DIR = REPO_ROOT / "charts" / "hetmoe"
HELM_ENV = "HETMOE_HELM"

RenderFn = Callable[..., list[dict[str, Any]]]

# The metric families the dashboard reads, as the operator (kube/metrics.py) and the
# trainer (hetmoe_trainer/metrics.py) export them. The names first agreed were
# hetmoe_operator_* / hetmoe_trainer_*; the code landed with these, so the dashboard
# follows the code, and test_dashboard_metrics_are_exported_by_the_operator_and_trainer_code
# fails as soon as either side renames one.
OPERATOR_METRICS = {
    "hetmoe_operator_jobs": "gauge",  # {phase}
    "hetmoe_operator_reconcile_duration_seconds": "histogram",
    "hetmoe_operator_restarts_total": "counter",  # {cause}
    "hetmoe_operator_pods_replaced_total": "counter",
    "hetmoe_operator_planning_duration_seconds": "histogram",
    "hetmoe_operator_api_errors_total": "counter",  # {verb, resource, code}
}
TRAINER_METRICS = {  # every one labelled {rank, stage}
    "hetmoe_tokens_per_second": "gauge",  # global, the same on every rank
    "hetmoe_step_seconds": "gauge",  # {phase}
    "hetmoe_loss": "gauge",
    "hetmoe_grad_norm": "gauge",
    "hetmoe_anomalies": "gauge",  # {kind}: kind="skipped" counts skipped steps
    "hetmoe_expert_load_max": "gauge",  # {layer}
    "hetmoe_expert_load_mean": "gauge",  # {layer}
    "hetmoe_checkpoint_blocking_seconds": "gauge",
    "hetmoe_straggler_score": "gauge",
    "hetmoe_mfu": "gauge",
}
KNOWN_METRICS = {**OPERATOR_METRICS, **TRAINER_METRICS}


def family_name(series: str, kind: str) -> str:
    """The metric family of a series name as PromQL sees it (counters drop `_total`)."""
    return series.removesuffix("_total") if kind == "counter" else series


def find_helm() -> Path:
    """$HETMOE_HELM, else `helm` on PATH, else the one build.sh caches (built if needed)."""
    override = os.environ.get(HELM_ENV)
    if override:
        return Path(override)
    on_path = shutil.which("helm")
    if on_path:
        return Path(on_path)
    return ensure_built() / "helm"


@pytest.fixture(scope="session")
def helm_bin() -> Path:
    helm = find_helm()
    if not os.access(helm, os.X_OK):
        pytest.fail(f"no helm binary at {helm} (set {HELM_ENV} or run tests/cluster/build.sh)")
    return helm


def run_helm(
    helm: Path, *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run helm with an isolated config/cache so no user state leaks into the tests."""
    result = subprocess.run(
        [str(helm), *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=300,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"helm {' '.join(args)} failed ({result.returncode}):\n{result.stderr}{result.stdout}"
        )
    return result


def value_args(values: dict[str, Any] | None, tmp_path: Path) -> list[str]:
    """`-f FILE` for a values dict (written as YAML), or nothing."""
    if not values:
        return []
    path = tmp_path / f"values-{len(list(tmp_path.glob('values-*.yaml')))}.yaml"
    path.write_text(yaml.safe_dump(values))
    return ["-f", str(path)]


def parse_manifests(text: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(text) if doc]


@pytest.fixture
def render(helm_bin: Path, tmp_path: Path) -> RenderFn:
    """`render(values=None, namespace=..., extra=[...])` -> the objects `helm template` emits."""

    def _render(
        values: dict[str, Any] | None = None,
        namespace: str = "hetmoe-system",
        release: str = "hetmoe",
        extra: Sequence[str] = (),
    ) -> list[dict[str, Any]]:
        result = run_helm(
            helm_bin,
            "template",
            release,
            str(CHART_DIR),
            "--namespace",
            namespace,
            *value_args(values, tmp_path),
            *extra,
        )
        return parse_manifests(result.stdout)

    return _render


def find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The single object of ``kind`` (and ``name``); fails listing what was rendered."""
    matches = [
        o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)
    ]
    rendered = sorted(f"{o['kind']}/{o['metadata']['name']}" for o in objects)
    assert len(matches) == 1, f"expected one {kind} {name or ''}, rendered: {rendered}"
    return matches[0]


def kinds(objects: list[dict[str, Any]]) -> list[str]:
    return sorted(o["kind"] for o in objects)
