"""Node pools as the planner sees them: how many nodes of which grade are usable.

On Kubernetes, pools are discovered from Node labels; locally and in ``hetmoe plan``
they come from a cluster file. Either way the planner gets a ``ClusterDescription``.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from hetmoe_operator.api.base import ApiModel
from hetmoe_operator.api.catalog import DeviceCatalog

POOL_LABEL = "hetmoe.io/pool"
"""Node label naming the pool a node belongs to."""
GRADE_LABEL = "hetmoe.io/accelerator"
"""Default Node label carrying the accelerator grade (configurable in the operator)."""


class NodePool(ApiModel):
    """A set of identical nodes of one grade sharing one interconnect domain."""

    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
    """Pool name (a DNS label)."""
    grade: str
    """Accelerator grade, a name from the device catalog."""
    nodes: int = Field(ge=0, le=100000)
    """Usable nodes in the pool right now."""
    devices_per_node: int = Field(ge=1, le=64)
    """Accelerators per node."""
    node_names: list[str] = Field(default_factory=list, max_length=100000)
    """Names of the usable nodes when known (Kubernetes); empty for abstract pools."""

    @model_validator(mode="after")
    def _names_match_count(self) -> NodePool:
        if self.node_names and len(self.node_names) != self.nodes:
            raise ValueError(
                f"pool {self.name}: {len(self.node_names)} node names for {self.nodes} nodes"
            )
        return self

    @property
    def devices(self) -> int:
        """Total accelerators in the pool."""
        return self.nodes * self.devices_per_node


class ClusterDescription(ApiModel):
    """Everything the planner needs to know about the hardware."""

    catalog: DeviceCatalog
    """Grades and their properties."""
    pools: list[NodePool] = Field(min_length=1, max_length=256)
    """Usable pools, unique by name."""

    @model_validator(mode="after")
    def _known_grades_unique_pools(self) -> ClusterDescription:
        names = [p.name for p in self.pools]
        if len(set(names)) != len(names):
            raise ValueError("pool names must be unique")
        known = {g.name for g in self.catalog.grades}
        for pool in self.pools:
            if pool.grade not in known:
                raise ValueError(
                    f"pool {pool.name}: unknown accelerator grade {pool.grade!r}; "
                    f"the catalog knows: {', '.join(sorted(known))}"
                )
        return self
