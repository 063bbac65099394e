"""`make demo`: GPU pods from the Alibaba trace scheduled through a real kube-scheduler with the extender, beside
the same pods scheduled by the stock kube-scheduler on an identical fleet.

Brings up etcd, kube-apiserver and two kube-schedulers on loopback (built from Go modules on first use), creates
two identical pools of GPU nodes (H100, A100 and T4 machines, no kubelets), runs `gpu-extender serve` in live
mode, submits the same trace pods to both pools and prints where they went and what each scheduler achieved.
"""

from __future__ import annotations

import argparse
import copy
import random
import sys
import time
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import kubernetes.client
import numpy as np

from e2e.build import ensure_binaries
from e2e.controlplane import ControlPlane
from e2e.fleet import create_nodes, gpu_node
from e2e.helpers import Extender
from e2e.stack import SHIPPED_POLICY, STOCK_SCHEDULER, scheduler_config, stock_scheduler_config
from e2e.workload import SCHEDULER_NAME, TracePod, pod_manifest, read_openb_pods, shared_data
from policies.config import PlacementPolicy
from policies.engine import place_on_node
from policies.fragmentation import node_fragmentation, typical_shapes
from policies.state import ClusterState
from scheduler.annotations import assignment_from_annotations
from scheduler.kubeapi import read_json
from scheduler.nodes import inventory_from_node
from scheduler.podspec import demand_from_pod

POOL_LABEL = "demo.gpu-extender.io/pool"
POOLS = {"extender": SCHEDULER_NAME, "stock": STOCK_SCHEDULER}
# (name, count, GPUs per node, GFD product, CPU milli, memory MiB): a small inference fleet.
FLEET = (
    ("h100", 6, 8, "NVIDIA-H100-80GB-HBM3", 192_000, 2_097_152),
    ("a100", 8, 4, "NVIDIA-A100-SXM4-80GB", 96_000, 1_048_576),
    ("t4", 12, 2, "Tesla-T4", 64_000, 262_144),
)


def say(text: str) -> None:
    print(text, flush=True)


def pool_nodes(pool: str) -> list[dict[str, Any]]:
    nodes = []
    for kind, count, gpus, product, cpu, memory in FLEET:
        for i in range(count):
            nodes.append(gpu_node(f"{pool}-{kind}-{i:02d}", gpus, product, cpu, memory, labels={POOL_LABEL: pool}))
    return nodes


def workload(capacity_gpus: int, load: float, seed: int) -> list[TracePod]:
    """Trace pods drawn at random until their GPU request passes `load` × the pool's capacity."""
    trace = read_openb_pods(shared_data() / "openb" / "openb_pod_list_default.csv")
    rng = random.Random(seed)
    pods, requested = [], 0.0
    while requested < load * capacity_gpus:
        pod = rng.choice(trace)
        pods.append(pod)
        requested += pod.num_gpu * pod.gpu_milli / 1000
    return pods


def submit(api: kubernetes.client.ApiClient, pool: str, pods: Iterable[TracePod]) -> int:
    manifests = []
    for i, pod in enumerate(pods):
        manifest = pod_manifest(pod, name=f"{pool}-{i:04d}-{pod.name}", scheduler_name=POOLS[pool])
        manifest["spec"]["nodeSelector"] = {POOL_LABEL: pool}
        manifests.append(manifest)

    def create(body: dict[str, Any]) -> None:
        read_json(api, "POST", "/api/v1/namespaces/default/pods", body=body)

    with ThreadPoolExecutor(8) as threads:
        list(threads.map(create, manifests))
    return len(manifests)


def settle(api: kubernetes.client.ApiClient, expected: int, quiet_s: float = 6.0, limit_s: float = 300.0) -> None:
    """Wait until every pod is bound or marked unschedulable, and nothing has changed for `quiet_s`."""
    started = last_change = time.monotonic()
    last = (-1, -1)
    while time.monotonic() - started < limit_s:
        pods = read_json(api, "GET", "/api/v1/namespaces/default/pods")["items"]
        bound = sum(1 for p in pods if p["spec"].get("nodeName"))
        decided = bound + sum(1 for p in pods if _unschedulable(p))
        if (bound, decided) != last:
            last, last_change = (bound, decided), time.monotonic()
            say(f"  {bound} of {expected} pods bound, {decided - bound} marked unschedulable")
        if decided >= expected and time.monotonic() - last_change >= quiet_s:
            return
        time.sleep(1.0)


def _unschedulable(pod: dict[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "PodScheduled" and c.get("reason") == "Unschedulable" for c in conditions)


@dataclass
class PoolResult:
    pool: str
    pods: int
    bound: int
    pending: int
    gpus: int
    allocated_gpus: float
    overcommitted: int  # bound, but no single GPU has room for its share: the stock scheduler cannot know
    fragmented_gpus: float
    per_node: dict[str, list[tuple[str, tuple[int, ...], int]]]


def evaluate_pool(api: kubernetes.client.ApiClient, pool: str, policy: PlacementPolicy) -> PoolResult:
    """Rebuild the pool's GPU state from the API: our assignments where recorded; for pods without one (the
    stock scheduler's), in binding order, the GPUs our policy would pick on the node the scheduler chose."""
    selector = f"{POOL_LABEL}={pool}"
    node_objs = read_json(api, "GET", "/api/v1/nodes", query=[("labelSelector", selector)])["items"]
    inventories = [inv for inv in (inventory_from_node(n) for n in node_objs) if inv is not None]
    state = ClusterState(inventories)
    pods = [
        p
        for p in read_json(api, "GET", "/api/v1/namespaces/default/pods")["items"]
        if p["metadata"]["name"].startswith(f"{pool}-")
    ]
    pods.sort(key=lambda p: _bound_at(p))
    overcommitted = 0
    per_node: dict[str, list[tuple[str, tuple[int, ...], int]]] = defaultdict(list)
    demands = [demand_from_pod(p) for p in pods]
    shapes = typical_shapes(demands)
    for pod, demand in zip(pods, demands, strict=True):
        node = pod["spec"].get("nodeName")
        if not node:
            continue
        assignment = assignment_from_annotations(pod["metadata"].get("annotations") or {}, node, demand)
        if assignment is None:  # placed by the stock scheduler: give it the GPUs our policy would on that node
            assignment, _ = place_on_node(state.view(), demand, node, policy, shapes)
            if assignment is None:
                overcommitted += 1
                continue
        state.apply(pod["metadata"]["uid"], assignment)
        per_node[node].append((pod["metadata"]["name"], assignment.gpus, assignment.milli))
    view = state.view()
    fragmented = float(node_fragmentation(view, np.arange(view.size), shapes).sum()) / 1000
    bound = sum(1 for p in pods if p["spec"].get("nodeName"))
    return PoolResult(
        pool=pool,
        pods=len(pods),
        bound=bound,
        pending=len(pods) - bound,
        gpus=int(view.gpu_present.sum()),
        allocated_gpus=view.gpu_allocated_milli() / 1000,
        overcommitted=overcommitted,
        fragmented_gpus=fragmented,
        per_node=dict(per_node),
    )


def _bound_at(pod: dict[str, Any]) -> str:
    for c in (pod.get("status") or {}).get("conditions") or []:
        if c.get("type") == "PodScheduled" and c.get("status") == "True":
            return str(c.get("lastTransitionTime") or "")
    return "~"


def show_placements(result: PoolResult, nodes: int = 6) -> None:
    say(f"\nWhere the extender put them (first {nodes} nodes; GPU index: pods as milli-GPU):")
    for node in sorted(result.per_node)[:nodes]:
        gpus: dict[int, list[int]] = defaultdict(list)
        for _, indices, milli in result.per_node[node]:
            for g in indices:
                gpus[g].append(milli)
        cells = "  ".join(f"{g}:{'+'.join(map(str, gpus[g]))}" for g in sorted(gpus))
        say(f"  {node:<18} {cells}")


def show_summary(results: list[PoolResult], seconds: float) -> None:
    say(f"\n  {'':<24}{'extender':<26}stock kube-scheduler")
    rows = [
        ("pods submitted", lambda r: f"{r.pods}"),
        ("pods bound", lambda r: f"{r.bound}"),
        ("pods pending", lambda r: f"{r.pending}"),
        ("GPUs allocated", lambda r: f"{r.allocated_gpus:.1f} of {r.gpus} ({100 * r.allocated_gpus / r.gpus:.1f} %)"),
        ("bound without GPU room", lambda r: f"{r.overcommitted}"),
        ("fragmented GPUs (FGD)", lambda r: f"{r.fragmented_gpus:.1f}"),
    ]
    for label, cell in rows:
        say(f"  {label:<24}{cell(results[0]):<26}{cell(results[1])}")
    say(f"\n  scheduled both pools in {seconds:.0f} s through real kube-schedulers v1.36")
    say("  'bound without GPU room': the stock scheduler counts gpu-milli per node, not per GPU, so these pods")
    say("  were bound where no single GPU can hold their share.")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", type=float, default=1.15, help="GPU request as a multiple of a pool's capacity")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    say("Preparing kube-apiserver and kube-scheduler v1.36 (built from Go modules once, then cached)…")
    binaries = ensure_binaries(log=lambda line: say(f"  {line}"))
    with ControlPlane(binaries) as plane:
        say(f"Control plane up at {plane.server}")
        api = plane.api_client(pool_maxsize=16)
        nodes = {pool: pool_nodes(pool) for pool in POOLS}
        create_nodes(api, [n for pool_list in nodes.values() for n in pool_list])
        capacity = sum(count * gpus for _, count, gpus, *_ in FLEET)
        say(f"Created two identical pools of {len(nodes['extender'])} GPU nodes, {capacity} GPUs each")
        extender = Extender(plane, policy=SHIPPED_POLICY)
        extender.start()
        say(f"Extender serving at {extender.url} (live mode, watching the API server)")
        plane.start_scheduler(scheduler_config(extender.url), name="gpu-scheduler")
        plane.start_scheduler(stock_scheduler_config(), name="stock-scheduler")
        pods = workload(capacity, args.load, args.seed)
        started = time.monotonic()
        total = sum(submit(api, pool, copy.deepcopy(pods)) for pool in POOLS)
        say(f"Submitted {len(pods)} trace pods to each pool ({args.load:.0%} of its GPU capacity)")
        settle(api, total)
        seconds = time.monotonic() - started
        policy = PlacementPolicy()
        results = [evaluate_pool(api, pool, policy) for pool in POOLS]
    show_placements(results[0])
    show_summary(results, seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
