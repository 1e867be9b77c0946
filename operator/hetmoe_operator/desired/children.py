"""The plan ConfigMap and the rendezvous Service."""

from __future__ import annotations

from typing import Any

from hetmoe_operator.api.operator_config import WorkerPorts
from hetmoe_operator.desired.names import (
    JOB_LABEL,
    PLAN_GENERATION_ANNOTATION,
    PLAN_KEY,
    ROLE_LABEL,
    JobRef,
    base_labels,
    plan_config_map_name,
    service_name,
)
from hetmoe_operator.plan import Plan


def plan_config_map(job: JobRef, plan: Plan, plan_generation: int) -> dict[str, Any]:
    """The plan as the versioned JSON contract, mounted by every worker.

    The plan generation is an annotation so the operator can tell, after a restart,
    whether the stored plan is the one its status refers to.
    """
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": plan_config_map_name(job.name),
            "namespace": job.namespace,
            "labels": dict(base_labels(job.name)),
            "annotations": {PLAN_GENERATION_ANNOTATION: str(plan_generation)},
            "ownerReferences": [job.owner_reference()],
        },
        "data": {PLAN_KEY: plan.to_json()},
    }


def rendezvous_service(job: JobRef, ports: WorkerPorts) -> dict[str, Any]:
    """Headless Service: DNS for ``<hostname>.<service>`` of every worker pod.

    ``publishNotReadyAddresses`` because torchrun rendezvous happens before any
    worker is Ready.
    """
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": service_name(job.name),
            "namespace": job.namespace,
            "labels": dict(base_labels(job.name)),
            "ownerReferences": [job.owner_reference()],
        },
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {JOB_LABEL: job.name, ROLE_LABEL: "worker"},
            "ports": [
                {"name": "rendezvous", "port": ports.rendezvous, "targetPort": ports.rendezvous},
                {"name": "metrics", "port": ports.metrics, "targetPort": ports.metrics},
            ],
        },
    }
