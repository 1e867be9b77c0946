"""Local mode: run a MoEJob on this machine with processes instead of pods.

The planner, the desired-state builder and the reconcile decisions are the
operator's own; only the executor differs (local process groups instead of the
Kubernetes API). See :mod:`hetmoe_operator.local.executor` for the translation.
"""
