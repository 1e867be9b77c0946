"""Pure reconcile decisions: an observed snapshot in, actions and a status out.

The Kubernetes handlers (``hetmoe_operator.kube``) and local mode gather the
snapshot, call :func:`~hetmoe_operator.reconcile.decide.decide`, and apply the
result. Nothing here performs I/O, so every transition is unit-tested.
"""
