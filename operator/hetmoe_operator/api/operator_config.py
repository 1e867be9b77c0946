"""Operator settings: one typed model filled from the command line or Helm values.

Everything the operator needs to know about the cluster's conventions lives here
instead of module constants, so tests and the chart can change it without patching.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import Field

from hetmoe_operator.api.base import ApiModel
from hetmoe_operator.api.cluster import GRADE_LABEL, POOL_LABEL

_NAME = r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$"


class CatalogSource(ApiModel):
    """Where the device catalog comes from: a file (dev) or a ConfigMap key (Helm)."""

    file: str | None = None
    """Local YAML file; wins over the ConfigMap when set."""
    config_map: str = Field(default="hetmoe-catalog", pattern=_NAME)
    """ConfigMap holding the catalog YAML."""
    config_map_namespace: str | None = None
    """Namespace of the ConfigMap; defaults to the operator's namespace."""
    key: str = "catalog.yaml"
    """Key in the ConfigMap."""


class Toleration(ApiModel):
    """A pod toleration (the fields discovery needs to decide if a taint is tolerated)."""

    key: str = Field(min_length=1, max_length=316)
    """Taint key."""
    operator: Literal["Exists", "Equal"] = "Exists"
    """``Exists`` matches any value; ``Equal`` matches ``value``."""
    value: str = ""
    """Taint value for ``Equal``."""
    effect: Literal["", "NoSchedule", "PreferNoSchedule", "NoExecute"] = ""
    """Effect to tolerate; empty tolerates every effect."""

    def tolerates(self, taint: Mapping[str, Any]) -> bool:
        """Kubernetes toleration semantics for one taint."""
        if self.effect and self.effect != taint.get("effect"):
            return False
        if self.key != taint.get("key"):
            return False
        return self.operator == "Exists" or self.value == taint.get("value", "")

    def manifest(self) -> dict[str, str]:
        """As a pod spec toleration."""
        out = {"key": self.key, "operator": self.operator}
        if self.operator == "Equal":
            out["value"] = self.value
        if self.effect:
            out["effect"] = self.effect
        return out


class WorkerPorts(ApiModel):
    """Ports every worker pod exposes."""

    rendezvous: int = Field(default=29400, ge=1, le=65535)
    """torchrun c10d rendezvous port on rank-0's pod."""
    metrics: int = Field(default=9400, ge=1, le=65535)
    """Trainer metrics and ``/progress`` HTTP port."""


class OperatorConfig(ApiModel):
    """How the operator is deployed and which labels it reads."""

    namespace_mode: Literal["namespace", "cluster"] = "cluster"
    """Watch one namespace or all of them."""
    namespace: str | None = None
    """Namespace watched in ``namespace`` mode."""
    operator_namespace: str = "hetmoe-system"
    """Namespace the operator runs in (catalog ConfigMap default)."""
    pool_label: str = POOL_LABEL
    """Node label naming a node's pool."""
    grade_label: str = GRADE_LABEL
    """Node label naming a node's accelerator grade."""
    catalog: CatalogSource = CatalogSource()
    """Device catalog source."""
    metrics_port: int = Field(default=8080, ge=0, le=65535)
    """Operator Prometheus port (0 disables)."""
    progress_poll_seconds: float = Field(default=15.0, gt=0, le=3600)
    """How often to read rank-0's ``/progress``."""
    progress_timeout_seconds: float = Field(default=2.0, gt=0, le=60)
    """Timeout of one progress read."""
    resync_seconds: float = Field(default=10.0, gt=0, le=3600)
    """Periodic reconcile of non-terminal jobs (catches missed events, ends backoff)."""
    worker_ports: WorkerPorts = WorkerPorts()
    """Ports of the worker pods."""
    worker_tolerations: list[Toleration] = Field(default_factory=list, max_length=32)
    """Extra tolerations for worker pods (e.g. a dedicated-pool taint); the device
    resource's own taint is always tolerated."""
    peering: str | None = None
    """kopf peering object name for active/standby replicas; None = standalone."""
    max_api_calls_per_reconcile: int = Field(default=64, ge=4, le=10000)
    """Upper bound on writes in one reconcile; the rest waits for the next pass."""
