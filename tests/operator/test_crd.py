"""The CRD is generated from the models, structural, documented, and committed as is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hetmoe_operator.crd import crd, crd_yaml

COMMITTED = Path(__file__).resolve().parents[2] / "crds" / "moejob.yaml"


def walk(node: dict[str, Any], path: str = "") -> list[tuple[str, dict[str, Any]]]:
    found = [(path, node)]
    for key, child in (node.get("properties") or {}).items():
        found += walk(child, f"{path}.{key}")
    if "items" in node:
        found += walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        found += walk(node["additionalProperties"], f"{path}{{}}")
    return found


def schema() -> dict[str, Any]:
    return dict(crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"])


def test_committed_crd_matches_the_models() -> None:
    assert COMMITTED.read_text() == crd_yaml(), (
        "crds/moejob.yaml is stale: run `hetmoe crd -o crds/moejob.yaml`"
    )


def test_schema_is_structural_every_node_typed_no_refs_or_unions() -> None:
    for path, node in walk(schema()):
        assert "type" in node, path
        assert not {"$ref", "anyOf", "oneOf", "allOf", "$defs"} & node.keys(), path


def test_every_spec_and_status_field_has_a_description_for_kubectl_explain() -> None:
    for path, node in walk(schema()):
        if path.startswith((".spec", ".status")) and not path.endswith(("[]", "{}")):
            assert node.get("description"), f"{path} has no description"


def test_validation_keywords_survive() -> None:
    spec = schema()["properties"]["spec"]["properties"]
    assert spec["placement"]["properties"]["objective"]["enum"] == [
        "throughput",
        "cost",
        "throughput-under-budget",
    ]
    assert spec["pools"]["maxItems"] == 64
    assert spec["pools"]["items"]["properties"]["name"]["pattern"].startswith("^[a-z0-9]")
    budget = spec["placement"]["properties"]["budgetPerHour"]
    assert (budget["minimum"], budget["exclusiveMinimum"]) == (0, True)
    grace = spec["checkpoint"]["properties"]["stopGracePeriodSeconds"]
    assert (grace["type"], grace["minimum"], grace["maximum"]) == ("integer", 5, 86400)
    assert set(schema()["properties"]["spec"]["required"]) == {"model", "training"}
    rules = (
        spec["failureRules"]
        if "failureRules" in spec
        else spec["elastic"]["properties"]["failureRules"]
    )
    assert rules["x-kubernetes-list-map-keys"] == ["name"]


def test_cel_rules_cover_cross_field_checks_and_immutability() -> None:
    spec = schema()["properties"]["spec"]
    assert spec["properties"]["model"]["x-kubernetes-validations"][-1]["rule"] == (
        "self == oldSelf"
    )
    assert spec["properties"]["training"]["x-kubernetes-validations"][-1]["rule"] == (
        "self == oldSelf"
    )
    messages = [
        r["message"] for _, n in walk(schema()) for r in n.get("x-kubernetes-validations", [])
    ]
    assert "set exactly one of model.preset and model.architecture" in messages
    assert "set exactly one of training.steps and training.tokens" in messages


def test_status_subresource_printer_columns_and_short_name() -> None:
    version = crd()["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert list(columns) == ["Phase", "Grades", "Step", "Restarts", "Tokens/s", "Age"]
    assert all("conditions" not in p for p in columns.values())
    assert crd()["spec"]["names"]["shortNames"] == ["mj"]
    conditions = schema()["properties"]["status"]["properties"]["conditions"]
    assert conditions["x-kubernetes-list-map-keys"] == ["type"]
