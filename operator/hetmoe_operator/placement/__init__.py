"""Heterogeneity- and cost-aware placement of MoE training jobs.

Pure Python (no kopf, Kubernetes client or torch): used by the operator, by
``hetmoe plan`` and by local mode. Entry points:

* :func:`plan_job` - the best :class:`~hetmoe_operator.plan.Plan` for a job on a cluster;
* :func:`compare_baselines` - that plan next to a type-blind even split and the best
  plan on each single grade;
* :class:`PlanningError` - raised for infeasible requests, naming the binding constraint.
"""

from hetmoe_operator.placement.baselines import Alternative, Comparison, compare_baselines
from hetmoe_operator.placement.errors import PlanningError
from hetmoe_operator.placement.planner import plan_job

__all__ = ["Alternative", "Comparison", "PlanningError", "compare_baselines", "plan_job"]
