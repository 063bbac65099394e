"""Shared fixtures: one real control plane per test session (start-up costs seconds, the build only once)."""

from __future__ import annotations

from collections.abc import Iterator

import kubernetes.client
import pytest

from e2e.build import Binaries, ensure_binaries
from e2e.controlplane import ControlPlane


@pytest.fixture(scope="session")
def k8s_binaries() -> Binaries:
    """etcd, kube-apiserver and kube-scheduler (built into the cache on first use)."""
    return ensure_binaries()


@pytest.fixture(scope="session")
def control_plane(k8s_binaries: Binaries) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver on loopback for the whole session; schedulers are started per test."""
    with ControlPlane(k8s_binaries) as plane:
        yield plane


@pytest.fixture(scope="session")
def api_client(control_plane: ControlPlane) -> Iterator[kubernetes.client.ApiClient]:
    """An admin client of the session's control plane."""
    with control_plane.api_client() as client:
        yield client
