"""Which cluster the CLI talks to, and one clear error when there is none.

The kubernetes client reads ``KUBECONFIG`` once, when it is imported; reading it
again here keeps a changed environment (a test, an embedding program) honoured.
"""

from __future__ import annotations

import os

from kubernetes import config as kube_config

from hetmoe_operator.errors import UserError

NO_CLUSTER_HINT = "to train on this machine without a cluster, use hetmoe run"


def kubeconfig_path() -> str:
    """``KUBECONFIG`` as set now, else the client's default file."""
    return os.environ.get("KUBECONFIG", "~/.kube/config")


def load_kubeconfig() -> str:
    """Load the kubeconfig's current context; returns its namespace ("default" when
    the context names none)."""
    path = kubeconfig_path()
    try:
        kube_config.load_kube_config(config_file=path)
        _, current = kube_config.list_kube_config_contexts(config_file=path)
        return str((current.get("context") or {}).get("namespace") or "default")
    except (kube_config.ConfigException, OSError, KeyError, TypeError) as error:
        raise UserError(
            f"no usable kubeconfig at {path} ({error}); set KUBECONFIG to a cluster's "
            f"kubeconfig; {NO_CLUSTER_HINT}"
        ) from None


def load_in_cluster_or_kubeconfig() -> None:
    """The service account's credentials inside a pod, else the kubeconfig."""
    try:
        kube_config.load_incluster_config()
    except kube_config.ConfigException:
        load_kubeconfig()
