"""Desired state: pure builders of the objects a MoEJob owns, as plain dicts.

Nothing here talks to an API server. The Kubernetes executor applies the manifests;
local mode (``hetmoe run``) reuses :func:`~hetmoe_operator.desired.worker.worker_launches`
to start processes with the same argv and environment the pods get.
"""
