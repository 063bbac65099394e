"""The harness works for real: apiserver, node fleet, a stock kube-scheduler binding GPU pods, clean teardown."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import kubernetes.client
import pytest
import yaml
from kubernetes.client import CoreV1Api
from kubernetes.utils import parse_quantity

from e2e import fleet, procs
from e2e.build import BIN_ENV, Binaries
from e2e.controlplane import ETCD_DIR_PREFIX, ControlPlane, sweep_stale_etcd_dirs
from e2e.procs import ComponentError

pytestmark = pytest.mark.e2e

DEFAULT_PROFILE = """\
apiVersion: kubescheduler.config.k8s.io/v1
kind: KubeSchedulerConfiguration
profiles:
  - schedulerName: default-scheduler
"""
FLEET_SIZE = 20
T = TypeVar("T")


def wait_for(fetch: Callable[[], T | None], what: str, timeout_s: float = 30.0) -> T:
    """Poll until ``fetch`` returns something truthy."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = fetch()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s:.0f}s waiting for {what}")


def gpu_pod(name: str, gpus: int) -> dict[str, object]:
    """A pod asking whole GPUs; it is never run (no kubelets), only scheduled."""
    resources = {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": str(gpus)}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "containers": [
                {
                    "name": "main",
                    "image": "registry.k8s.io/pause:3.10",
                    "resources": {"requests": resources, "limits": resources},
                }
            ]
        },
    }


@pytest.fixture(scope="module")
def gpu_fleet(api_client: kubernetes.client.ApiClient) -> Iterator[set[str]]:
    """FLEET_SIZE openb nodes (at most 8 GPUs each), removed afterwards: the control plane is shared."""
    nodes = fleet.nodes_from_openb_csv(fraction=FLEET_SIZE / 1213, seed=7)
    assert len(nodes) == FLEET_SIZE
    names = set(fleet.create_nodes(api_client, nodes))
    yield names
    core = CoreV1Api(api_client)
    for name in names:
        core.delete_node(name)


@pytest.fixture
def namespace(api_client: kubernetes.client.ApiClient) -> Iterator[str]:
    """A namespace of the test's own, deleted with its pods afterwards."""
    core = CoreV1Api(api_client)
    name = "controlplane-test"
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_collection_namespaced_pod(name, grace_period_seconds=0)
    core.delete_namespace(name)


@pytest.fixture
def scheduler(control_plane: ControlPlane) -> Iterator[procs.Component]:
    """A stock kube-scheduler with only the default profile."""
    handle = control_plane.start_scheduler(DEFAULT_PROFILE, name="default-scheduler")
    yield handle
    control_plane.stop_scheduler(handle)


def test_apiserver_answers(
    control_plane: ControlPlane, api_client: kubernetes.client.ApiClient, k8s_binaries: Binaries
) -> None:
    version = kubernetes.client.VersionApi(api_client).get_code()
    assert version.git_version == k8s_binaries.version
    assert control_plane.server.startswith("https://127.0.0.1:")
    namespaces = {ns.metadata.name for ns in CoreV1Api(api_client).list_namespace().items}
    assert {"default", "kube-system"} <= namespaces


def test_fleet_nodes_are_ready_gpu_nodes(api_client: kubernetes.client.ApiClient, gpu_fleet: set[str]) -> None:
    nodes = [n for n in CoreV1Api(api_client).list_node().items if n.metadata.name in gpu_fleet]
    assert len(nodes) == FLEET_SIZE
    for node in nodes:
        ready = [c for c in node.status.conditions if c.type == "Ready"]
        assert ready and ready[0].status == "True"
        gpus = int(node.status.allocatable["nvidia.com/gpu"])
        assert gpus >= 1
        assert parse_quantity(node.status.allocatable["gpu-extender.io/gpu-milli"]) == gpus * 1000  # "8k"
        assert node.metadata.labels["nvidia.com/gpu.count"] == str(gpus)
        assert node.metadata.labels["nvidia.com/gpu.product"]
        assert not node.spec.taints


def test_stock_scheduler_binds_gpu_pod_and_rejects_oversized(
    api_client: kubernetes.client.ApiClient, gpu_fleet: set[str], namespace: str, scheduler: procs.Component
) -> None:
    core = CoreV1Api(api_client)
    core.create_namespaced_pod(namespace, gpu_pod("one-gpu", 1))
    core.create_namespaced_pod(namespace, gpu_pod("too-many-gpus", 16))

    bound = wait_for(lambda: core.read_namespaced_pod("one-gpu", namespace).spec.node_name, "one-gpu bound")
    assert bound in gpu_fleet
    node = core.read_node(bound)
    assert int(node.status.allocatable["nvidia.com/gpu"]) >= 1

    def failed_event() -> str | None:
        events = core.list_namespaced_event(
            namespace, field_selector="involvedObject.name=too-many-gpus,reason=FailedScheduling"
        ).items
        return events[0].message if events else None

    message = wait_for(failed_event, "FailedScheduling event")
    assert "Insufficient nvidia.com/gpu" in message
    pending = core.read_namespaced_pod("too-many-gpus", namespace)
    assert pending.status.phase == "Pending" and not pending.spec.node_name


def test_teardown_leaves_no_process(k8s_binaries: Binaries) -> None:
    with ControlPlane(k8s_binaries) as plane:
        handle = plane.start_scheduler(DEFAULT_PROFILE, name="short-lived")
        pids, workdir, etcd_dir = plane.pids(), plane.workdir, plane.etcd_dir
        assert len(pids) == 3 and all(procs.pid_alive(pid) for pid in pids)
        plane.stop_scheduler(handle)
        assert not procs.pid_alive(handle.pid)
    assert not any(procs.pid_alive(pid) for pid in pids)
    assert not workdir.exists()
    assert etcd_dir is not None and not etcd_dir.exists()


def test_start_failure_reports_log_tail(k8s_binaries: Binaries) -> None:
    plane = ControlPlane(k8s_binaries, apiserver_args=["--no-such-flag"], ready_timeout_s=30)
    with pytest.raises(ComponentError, match="unknown flag: --no-such-flag"), plane:
        pass
    assert not plane.components


def test_cluster_up_down_cli(k8s_binaries: Binaries, tmp_path: Path) -> None:
    env = dict(os.environ, XDG_CACHE_HOME=str(tmp_path), **{BIN_ENV: str(k8s_binaries.kube_apiserver.parent)})

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "e2e.controlplane", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
            cwd=Path(__file__).resolve().parent.parent,
        )

    up = cli("up")
    assert up.returncode == 0, up.stderr
    state = json.loads((tmp_path / "kube-gpu-extender" / "cluster" / "state.json").read_text())
    pids = [c["pid"] for c in state["components"]]
    try:
        assert state["kubeconfig"] in up.stdout and state["server"] in up.stdout
        assert all(procs.pid_alive(pid) for pid in pids)
        kubeconfig = yaml.safe_load(Path(state["kubeconfig"]).read_text())
        assert kubeconfig["clusters"][0]["cluster"]["server"] == state["server"]
        assert "running" in cli("status").stdout
    finally:
        down = cli("down")
    assert down.returncode == 0, down.stderr
    wait_for(lambda: not any(procs.pid_alive(pid) for pid in pids), "detached processes gone", 15)
    assert not Path(state["workdir"]).exists()


def test_sweep_removes_only_unused_etcd_dirs(tmp_path: Path) -> None:
    stale = tmp_path / f"{ETCD_DIR_PREFIX}stale"
    (stale / "data" / "member" / "snap").mkdir(parents=True)
    (stale / "data" / "member" / "snap" / "db").write_bytes(b"")
    busy = tmp_path / f"{ETCD_DIR_PREFIX}busy"
    (busy / "member" / "snap").mkdir(parents=True)
    with open(busy / "member" / "snap" / "db", "wb") as db:
        fcntl.flock(db, fcntl.LOCK_EX)  # as a running etcd holds it
        young = tmp_path / f"{ETCD_DIR_PREFIX}starting"
        young.mkdir()
        sweep_stale_etcd_dirs(tmp_path)
    assert not stale.exists() and busy.exists() and young.exists()
