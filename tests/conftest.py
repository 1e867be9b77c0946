"""Shared pytest wiring: the `integration` marker and the real control plane.

Kept generic on purpose; feature-specific fixtures belong in the conftest.py of
their own test subdirectory.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from kubernetes.client import ApiClient

from tests.cluster.controlplane import ControlPlane, ensure_built
from tests.cluster.topology import Topology, apply_topology, load_topology

DEFAULT_TOPOLOGY = "small-mixed"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "integration: needs the real local control plane (tests/cluster)"
    )


@pytest.fixture(scope="session")
def cluster_topology() -> Topology:
    """The topology whose fake nodes the session cluster carries."""
    return load_topology(DEFAULT_TOPOLOGY)


@pytest.fixture(scope="session")
def control_plane(cluster_topology: Topology) -> Iterator[ControlPlane]:
    """One real stack per session with the default topology's nodes Ready.

    Builds the binaries first if the cache is cold (slow once per machine).
    Exposes ``.kubeconfig``, ``.bin_dir``, ``.kubectl(...)`` and ``.api_client()``.
    """
    with ControlPlane(bin_dir=ensure_built()) as plane:
        with plane.api_client() as client:
            apply_topology(client, cluster_topology)
        yield plane


@pytest.fixture(scope="session")
def kube_api(control_plane: ControlPlane) -> Iterator[ApiClient]:
    """A kubernetes-client ApiClient logged in as cluster admin."""
    with control_plane.api_client() as client:
        yield client
