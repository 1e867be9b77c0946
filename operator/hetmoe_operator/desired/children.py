"""The plan ConfigMap, the rendezvous Service and the coscheduling PodGroup."""

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
    pod_group_name,
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


POD_GROUP_API = "scheduling.x-k8s.io/v1alpha1"
"""scheduler-plugins' coscheduling PodGroup (only created with scheduling.gang
coscheduling; the CRD comes with scheduler-plugins, not with hetmoe)."""


def pod_group(job: JobRef, generation: int, members: int) -> dict[str, Any]:
    """The gang of one generation: the coscheduling plugin binds none of its pods until
    all ``members`` can be bound, so a half-placed job never holds devices idle.

    One per generation (the pods' ``scheduling.x-k8s.io/pod-group`` label names it),
    owned by the job so it goes with it.
    """
    return {
        "apiVersion": POD_GROUP_API,
        "kind": "PodGroup",
        "metadata": {
            "name": pod_group_name(job.name, generation),
            "namespace": job.namespace,
            "labels": dict(base_labels(job.name)),
            "ownerReferences": [job.owner_reference()],
        },
        "spec": {"minMember": members},
    }
