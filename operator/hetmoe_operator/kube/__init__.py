"""The Kubernetes executor: the only package that uses kopf or the kubernetes client.

Handlers are thin: gather an observation, call the pure core
(``hetmoe_operator.reconcile``), apply the decision.
"""
