"""Every shipped example manifest is valid against the API models (what a user copies)."""

from __future__ import annotations

from pathlib import Path

import pytest

from hetmoe_operator.api.manifests import load_catalog, load_cluster, load_job

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("moejob-*.yaml")), ids=lambda p: p.name)
def test_example_jobs_load(path: Path) -> None:
    job = load_job(path)
    assert job.metadata.name


@pytest.mark.parametrize(
    "path", sorted((EXAMPLES / "clusters").glob("*.yaml")), ids=lambda p: p.name
)
def test_example_clusters_load(path: Path) -> None:
    assert load_cluster(path).pools


def test_the_reference_catalog_has_the_five_report_grades() -> None:
    catalog = load_catalog(EXAMPLES / "catalogs" / "reference-5-grades.yaml")
    assert sorted(g.name for g in catalog.grades) == ["A", "B", "C", "D", "E"]
