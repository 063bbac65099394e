"""The watcher and binder against a real kube-apiserver: the model converges, and again after a restart."""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import kubernetes.client
import pytest

from e2e import fleet
from policies.config import PlacementPolicy
from policies.inventory import Assignment, MigPlacement
from scheduler.annotations import GPU_INVENTORY, assignment_annotations
from scheduler.binder import BindError, KubernetesBinder
from scheduler.kubeapi import read_json
from scheduler.model import ClusterModel
from scheduler.watch import ClusterWatcher

pytestmark = pytest.mark.e2e

NS = "watch-live"
PREFIX = "wl-"
MERGE = {"Content-Type": "application/merge-patch+json"}


def eventually(check: Callable[[], Any], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def pod(name: str, resources: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "schedulerName": "nobody",  # stays pending until bound by hand
            "containers": [
                {
                    "name": "c",
                    "image": "registry.k8s.io/pause:3.10",
                    "resources": {"requests": resources, "limits": resources},
                }
            ],
        },
    }


def create_pod(api: Any, name: str, **resources: str) -> str:
    body = pod(name, {"cpu": "1", "memory": "1Gi", **resources})
    return str(read_json(api, "POST", f"/api/v1/namespaces/{NS}/pods", body=body)["metadata"]["uid"])


def ours(model: ClusterModel) -> dict[str, Assignment]:
    return {k: a for k, a in model.assignments().items() if a.node.startswith(PREFIX)}


@pytest.fixture(scope="module")
def cluster(api_client: kubernetes.client.ApiClient) -> Iterator[kubernetes.client.ApiClient]:
    inventory = {
        "v": 1,
        "gpus": [
            {
                "index": 0,
                "uuid": "GPU-0",
                "model": "NVIDIA-H100-80GB-HBM3",
                "memoryMiB": 81559,
                "mig": {"enabled": True, "instances": [{"profile": "3g.40gb", "start": 4, "uuid": "MIG-4"}]},
            },
            {"index": 1, "uuid": "GPU-1", "model": "NVIDIA-H100-80GB-HBM3", "memoryMiB": 81559},
        ],
    }
    nodes = [fleet.gpu_node(f"{PREFIX}a{i}", 8, "NVIDIA-A100-SXM4-80GB") for i in range(20)]
    nodes.append(
        fleet.gpu_node(f"{PREFIX}mig", 4, "NVIDIA-A100-SXM4-40GB", mig_profiles={"3g.20gb": 2, "1g.5gb": 7}, mig_gpus=2)
    )
    nodes.append(
        fleet.gpu_node(f"{PREFIX}agent", 2, "NVIDIA-H100-80GB-HBM3", annotations={GPU_INVENTORY: json.dumps(inventory)})
    )
    nodes.append(fleet.gpu_node(f"{PREFIX}cpu", 0, "none"))
    fleet.create_nodes(api_client, nodes)
    read_json(api_client, "POST", "/api/v1/namespaces", body={"metadata": {"name": NS}})
    yield api_client
    read_json(api_client, "DELETE", f"/api/v1/namespaces/{NS}")
    for node in nodes:
        read_json(api_client, "DELETE", f"/api/v1/nodes/{node['metadata']['name']}")


def test_watch_converges_and_relists_after_restart(cluster: kubernetes.client.ApiClient) -> None:
    api = cluster
    binder = KubernetesBinder(api)
    # Before the watcher starts: pods bound by us (annotated) and by "someone else" (no annotation), one pending.
    uids = {f"w{i}": create_pod(api, f"w{i}", **{"nvidia.com/gpu": "2"}) for i in range(40)}
    for i in range(40):
        a = Assignment(f"{PREFIX}a{i % 20}", 1000, 1024, (2 * (i // 20), 2 * (i // 20) + 1), 1000)
        binder.bind(NS, f"w{i}", uids[f"w{i}"], a.node, assignment_annotations(a))
    foreign = create_pod(api, "foreign", **{"nvidia.com/gpu": "1"})
    binder.bind(NS, "foreign", foreign, f"{PREFIX}a0", {})
    create_pod(api, "pending", **{"nvidia.com/gpu": "1"})

    model = ClusterModel(PlacementPolicy())
    watcher = ClusterWatcher(api, model, page_size=7)
    with watcher:
        assert watcher.wait_ready(30)
        snap = model.snapshot()
        names = {n for n in snap.names if n.startswith(PREFIX)}
        assert names == {f"{PREFIX}a{i}" for i in range(20)} | {f"{PREFIX}mig", f"{PREFIX}agent"}  # no CPU node
        agent = snap.inventories[snap.index[f"{PREFIX}agent"]]
        assert agent.gpus[0].mig_table == "H100-80GB" and agent.gpus[0].mig_instances[0].uuid == "MIG-4"
        mig = snap.inventories[snap.index[f"{PREFIX}mig"]]
        assert [g.mig_table for g in mig.gpus] == [None, None, "A100-40GB", "A100-40GB"]
        placed = ours(model)
        assert len(placed) == 41 and placed[uids["w21"]].gpus == (2, 3)
        # Bound without our record: charged one GPU that no recorded pod holds.
        assert len(placed[foreign].gpus) == 1 and placed[foreign].gpus[0] not in (0, 1, 2, 3)
        assert watcher.stats.unknown_gpu_pods >= 1

        # Live changes: a MIG pod bound, a pod deleted, a node cordoned, a retried bind.
        mig_uid = create_pod(api, "m0", **{"nvidia.com/mig-3g.20gb": "1"})
        mig_a = Assignment(f"{PREFIX}mig", 1000, 1024, mig=MigPlacement(2, "3g.20gb", 4))
        binder.bind(NS, "m0", mig_uid, mig_a.node, assignment_annotations(mig_a))
        binder.bind(NS, "m0", mig_uid, mig_a.node, assignment_annotations(mig_a))  # kube-scheduler retried
        with pytest.raises(BindError, match="already bound"):
            binder.bind(NS, "m0", mig_uid, f"{PREFIX}a5", {})
        read_json(api, "DELETE", f"/api/v1/namespaces/{NS}/pods/w0", query=[("gracePeriodSeconds", "0")])
        read_json(api, "PATCH", f"/api/v1/nodes/{PREFIX}a19", body={"spec": {"unschedulable": True}}, headers=MERGE)
        eventually(lambda: ours(model).get(mig_uid) == mig_a, "the MIG pod")
        eventually(lambda: uids["w0"] not in ours(model), "the deleted pod to go")
        eventually(lambda: f"{PREFIX}a19" not in model.snapshot().index, "the cordoned node to leave")
        assert uids["w19"] not in ours(model)  # it lived on the cordoned node
        events = watcher.stats.events
        cpu = watcher.stats.event_cpu_s
    print(
        f"\nlive watch: {events} events, {cpu / max(events, 1) * 1e6:.0f} us CPU each (decode + project); "
        f"lists {watcher.stats.last_list_s}"
    )

    # While no watcher runs: more changes. A fresh watcher must list them all.
    read_json(api, "PATCH", f"/api/v1/nodes/{PREFIX}a19", body={"spec": {"unschedulable": False}}, headers=MERGE)
    read_json(api, "DELETE", f"/api/v1/namespaces/{NS}/pods/w1", query=[("gracePeriodSeconds", "0")])
    late = create_pod(api, "late", **{"gpu-extender.io/gpu-milli": "250"})
    share = Assignment(f"{PREFIX}a3", 1000, 1024, (7,), 250)
    binder.bind(NS, "late", late, share.node, assignment_annotations(share))
    model2 = ClusterModel(PlacementPolicy())
    with ClusterWatcher(api, model2) as watcher2:
        assert watcher2.wait_ready(30)
        placed = ours(model2)
        assert f"{PREFIX}a19" in model2.snapshot().index
        assert uids["w0"] not in placed and uids["w1"] not in placed
        assert uids["w19"] in placed and placed[late] == share and placed[mig_uid] == mig_a
        assert len(placed) == 41  # 40 + foreign + m0 + late - w0 - w1


def test_binder_verifies_the_api_server_as_the_client_would(cluster: kubernetes.client.ApiClient) -> None:
    """The binder's own connections check the serving certificate against the configured CA and TLS server name,
    and present the client certificate; a mismatch is an unreachable API server, not a bind."""
    api = cluster
    uid = create_pod(api, "tls", **{"nvidia.com/gpu": "1"})

    def bind_with(**settings: Any) -> None:
        config = copy.copy(api.configuration)
        for key, value in settings.items():
            setattr(config, key, value)
        KubernetesBinder(kubernetes.client.ApiClient(config), timeout_s=5.0).bind(NS, "tls", uid, f"{PREFIX}a0", {})

    try:
        with pytest.raises(BindError, match="unreachable"):
            bind_with(tls_server_name="not-the-api-server")
        with pytest.raises(BindError, match="unreachable"):
            bind_with(ssl_ca_cert=None)  # the public roots (certifi) do not sign this API server
        with pytest.raises(BindError, match="HTTP 403"):
            bind_with(cert_file=None, key_file=None)  # anonymous
        bind_with(tls_server_name="kubernetes.default.svc")  # a name the serving certificate carries
        assert read_json(api, "GET", f"/api/v1/namespaces/{NS}/pods/tls")["spec"]["nodeName"] == f"{PREFIX}a0"
    finally:
        read_json(api, "DELETE", f"/api/v1/namespaces/{NS}/pods/tls", query=[("gracePeriodSeconds", "0")])
