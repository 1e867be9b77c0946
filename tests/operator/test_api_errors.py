"""API error accounting: answers the operator expects (404 lookups, 409 idempotent
creates) are requests but not errors, so the dashboard's error panel means trouble."""

from __future__ import annotations

import pytest
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from hetmoe_operator.kube.apply import KubeApi
from hetmoe_operator.kube.metrics import OperatorMetrics


def _failing(status: int):
    def fn() -> None:
        raise ApiException(status=status)

    return fn


def _errors(metrics: OperatorMetrics) -> dict[str, float]:
    return {
        sample.labels["code"]: sample.value
        for family in metrics.registry.collect()
        for sample in family.samples
        if sample.name == "hetmoe_operator_api_errors_total"
    }


def test_expected_statuses_are_counted_as_requests_but_not_errors() -> None:
    metrics = OperatorMetrics()
    api = KubeApi(ApiClient(), metrics)
    with pytest.raises(ApiException):
        api.call("create", "pods", _failing(409), expected=(409,))
    with pytest.raises(ApiException):
        api.call("create", "pods", _failing(403), expected=(409,))
    assert _errors(metrics) == {"403": 1.0}
    requests = metrics.registry.get_sample_value(
        "hetmoe_operator_api_requests_total", {"verb": "create", "resource": "pods"}
    )
    assert requests == 2
