"""Hypothesis fuzz of MoEJob specs against the real API server and operator.

Every generated spec is either rejected at admission (with a field path) or accepted
and then handled: the operator stays up, the job gets a phase, and it never has a
half-created generation (either no pods, or exactly one per planned node).
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kubernetes.client import ApiClient
from kubernetes.client.exceptions import ApiException

from tests.integration.operator.conftest import (
    OperatorProcess,
    create_job,
    delete_job,
    eventually,
    get_job,
    job_pods,
)

pytestmark = pytest.mark.integration

PHASES = {"Pending", "Planning", "Running", "Restarting", "Suspended", "Succeeded", "Failed"}
COUNTER = itertools.count()

specs = st.fixed_dictionaries(
    {
        "model": st.one_of(
            st.fixed_dictionaries(
                {"preset": st.sampled_from(["tiny", "ling-lite", "ling-plus", "bogus"])}
            ),
            st.fixed_dictionaries(
                {
                    "architecture": st.fixed_dictionaries(
                        {
                            "num_hidden_layers": st.integers(0, 8),
                            "hidden_size": st.sampled_from([64, 96]),
                            "num_attention_heads": st.sampled_from([2, 3, 4]),
                            "num_key_value_heads": st.sampled_from([1, 2]),
                            "num_experts": st.integers(1, 16),
                            "num_experts_per_tok": st.integers(1, 4),
                            "moe_intermediate_size": st.sampled_from([16, 32]),
                            "vocab_size": st.just(256),
                        }
                    )
                }
            ),
        ),
        "training": st.fixed_dictionaries(
            {"globalBatchSize": st.integers(-1, 64), "sequenceLength": st.sampled_from([1, 64])},
            optional={"steps": st.integers(0, 50), "tokens": st.integers(1, 10**6)},
        ),
        "checkpoint": st.just({"volume": {"emptyDir": True}}),
    },
    optional={
        "pools": st.lists(
            st.one_of(
                st.fixed_dictionaries(
                    {"name": st.sampled_from(["pool-a", "pool-b", "pool-d", "nope", "BAD"])}
                ),
                st.fixed_dictionaries({"selector": st.just({"hetmoe.io/accelerator": "B"})}),
            ),
            max_size=3,
        ),
        "placement": st.fixed_dictionaries(
            {},
            optional={
                "objective": st.sampled_from(["throughput", "cost", "throughput-under-budget"]),
                "expertParallel": st.integers(1, 5),
                "pipelineParallel": st.integers(1, 4),
                "timeLimitSeconds": st.sampled_from([0.5, 2]),
            },
        ),
        "elastic": st.fixed_dictionaries(
            {},
            optional={
                "maxRestarts": st.integers(-1, 3),
                "inPlaceRestarts": st.integers(-1, 101),
                "minNodes": st.integers(1, 9),
                "maxNodes": st.integers(1, 9),
            },
        ),
        "suspend": st.booleans(),
    },
)


@settings(
    max_examples=12,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(spec=specs)
def test_fuzzed_specs_never_crash_the_operator_or_leave_half_created_jobs(
    operator: OperatorProcess, kube_api: ApiClient, namespace: str, spec: dict[str, Any]
) -> None:
    name = f"fuzz-{next(COUNTER)}"
    manifest = {
        "apiVersion": "hetmoe.io/v1alpha1",
        "kind": "MoEJob",
        "metadata": {"name": name},
        "spec": spec,
    }
    try:
        create_job(kube_api, namespace, manifest)
    except ApiException as error:
        assert error.status == 422, error.body
        assert "spec" in error.body
        return
    try:

        def settled() -> dict[str, Any] | None:
            status = get_job(kube_api, namespace, name).get("status") or {}
            return status if status.get("phase") in PHASES else None

        try:
            status = eventually(settled, 30, f"{name} to get a phase")
        except AssertionError as error:
            raise AssertionError(f"{error}\noperator log:\n{operator.log_tail(80)}") from None
        pods = job_pods(kube_api, namespace, name)
        if pods:

            def complete() -> bool:
                current = get_job(kube_api, namespace, name)["status"]
                gen = str(current.get("generation"))
                live = [
                    p
                    for p in job_pods(kube_api, namespace, name)
                    if p["metadata"]["labels"]["hetmoe.io/generation"] == gen
                ]
                planned = sum(p["nodes"] for p in (current.get("plan") or {}).get("pools", []))
                return len(live) == planned

            eventually(complete, 30, f"{name}: every planned pod created")
        assert status["phase"] in PHASES
        assert operator.alive(), operator.log_tail()
    finally:
        delete_job(kube_api, namespace, name)
    assert operator.alive(), operator.log_tail()
