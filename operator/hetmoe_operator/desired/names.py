"""Deterministic names and labels of a job's children.

Names depend only on (job, generation, pool, node slot), so an operator restarted at
any moment computes the same names, and a create that already happened answers 409
instead of making a duplicate.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

LABEL_PREFIX = "hetmoe.io/"
JOB_LABEL = LABEL_PREFIX + "job"
GENERATION_LABEL = LABEL_PREFIX + "generation"
PLAN_GENERATION_LABEL = LABEL_PREFIX + "plan-generation"
WORKER_POOL_LABEL = LABEL_PREFIX + "pool"
NODE_SLOT_LABEL = LABEL_PREFIX + "node-slot"
ROLE_LABEL = LABEL_PREFIX + "role"
RANK0_LABEL = LABEL_PREFIX + "rank0"
MANAGED_BY = {"app.kubernetes.io/managed-by": "hetmoe"}
PLAN_KEY = "plan.json"
PLAN_GENERATION_ANNOTATION = LABEL_PREFIX + "plan-generation"


@dataclass(frozen=True)
class JobRef:
    """Identity of the owning MoEJob, enough for names and ownerReferences."""

    name: str
    namespace: str
    uid: str

    def owner_reference(self) -> dict[str, object]:
        """ownerReference making the child garbage-collected with the job.

        ``blockOwnerDeletion`` is false so deleting the job never waits on a pod stuck
        on a dead node; the operator force-deletes those itself.
        """
        return {
            "apiVersion": "hetmoe.io/v1alpha1",
            "kind": "MoEJob",
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": False,
        }


def plan_config_map_name(job: str) -> str:
    """ConfigMap holding the plan JSON."""
    return f"{job}-plan"


def pod_group_name(job: str, generation: int) -> str:
    """Gang of one generation's workers (Kueue pod group, scheduler-plugins PodGroup)."""
    return f"{job}-g{generation}"


def service_name(job: str) -> str:
    """Headless Service giving worker pods stable DNS names for rendezvous."""
    return job


def pod_name(job: str, generation: int, pool: str, node_slot: int) -> str:
    """Worker pod of one (pool, node slot) in one restart generation."""
    return f"{job}-g{generation}-{pool}-{node_slot}"


def pod_hostname(generation: int, node_index: int) -> str:
    """Short DNS label (pods' hostnames are limited to 63 characters)."""
    return f"g{generation}-n{node_index}"


def base_labels(job: str) -> Mapping[str, str]:
    """Labels every child carries."""
    return {**MANAGED_BY, JOB_LABEL: job}
