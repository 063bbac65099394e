"""Scheduling throughput through the real kube-scheduler, stock and with our extender, and the extender's scale.

    python -m e2e.bench_throughput [--nodes 500,5000] [--pods 1500] [--rounds 1] [--scale-pods 50000]

For each fleet size and round, the same number of one-GPU pods is created while no scheduler runs; then a
kube-scheduler is started and the pods are timed from the first binding to the last (bindings are seen through
a watch; the PodScheduled conditions' one-second timestamps give a second reading). Two profiles alternate:
(a) the stock profile, no extender (the extender's process is stopped meanwhile: it would otherwise spend the
shared cores following the stock scheduler's bindings, about 1 ms of CPU per pod); (b) the shipped profile and
policy (`manifests/base/`) with our extender doing filter (which passes only the best node, so prioritize is not
called) and bind. Between measurements the pods are deleted, so each starts on an empty fleet.

Then the cluster model's scale: 5,000 GPU nodes and 50,000 pods bound with our assignment annotation (created
directly with `spec.nodeName`), and a freshly started extender's time to ready and resident memory.
Targets: rate b/a >= 0.5, ready <= 15 s, RSS <= 250 MB. Everything runs on this machine, so the numbers include
the control plane competing for the same cores.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import functools
import os
import signal
import statistics
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import kubernetes.client

from e2e import fleet, helpers, stack
from e2e.controlplane import ControlPlane
from e2e.cpu import CpuSampler
from e2e.helpers import Extender, PodWatch
from policies.inventory import Assignment
from scheduler.annotations import assignment_annotations
from scheduler.kubeapi import api_request

GPU_PRODUCT = "NVIDIA-A100-SXM4-80GB"
GPUS_PER_NODE = 8
MAX_SCALE_PODS_PER_NODE = 4 + 2 * (GPUS_PER_NODE - 4)
STOCK, OURS = "stock", "extender"
TARGET_RATIO, TARGET_READY_S, TARGET_RSS_MB = 0.5, 15.0, 250.0


@dataclass
class Measurement:
    nodes: int
    variant: str
    pods: int
    seconds: float
    seconds_by_conditions: float
    verb_ms: dict[str, float] | None = None
    """The extender's mean time per call during the measurement, by verb."""
    cpu_ms: dict[str, float] | None = None
    """CPU milliseconds per pod of each process (the machine's cores are shared by all of them)."""

    @property
    def rate(self) -> float:
        return (self.pods - 1) / self.seconds if self.seconds > 0 else float("nan")

    @property
    def rate_by_conditions(self) -> float:
        return (self.pods - 1) / self.seconds_by_conditions if self.seconds_by_conditions > 0 else float("nan")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _pod(name: str, namespace: str, scheduler: str) -> dict[str, Any]:
    resources = {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": "1"}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "schedulerName": scheduler,
            "containers": [
                {
                    "name": "main",
                    "image": "registry.invalid/pause:none",
                    "resources": {"requests": resources, "limits": {"nvidia.com/gpu": "1"}},
                }
            ],
            "terminationGracePeriodSeconds": 0,
        },
    }


def _parse_time(value: str) -> float:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def grow_fleet(api: Any, have: int, want: int) -> None:
    """Add nodes bench-node-<have>..<want - 1> (8 A100s each)."""
    if want <= have:
        return
    started = time.monotonic()
    nodes = [fleet.gpu_node(f"bench-node-{i:05d}", GPUS_PER_NODE, GPU_PRODUCT) for i in range(have, want)]
    fleet.create_nodes(api, nodes, workers=16)
    log(f"created {want - have} nodes in {time.monotonic() - started:.1f}s")


def wait_extender_sees(extender: Extender, nodes: int, allocated_gpus: float, timeout_s: float = 300.0) -> None:
    def caught_up() -> bool:
        metrics = extender.metrics()
        return (
            metrics.get("gpu_extender_nodes") == nodes
            and abs(metrics.get("gpu_extender_allocated_gpus", -1.0) - allocated_gpus) < 0.01
        )

    helpers.wait_for(caught_up, f"the extender to see {nodes} nodes, {allocated_gpus} GPUs allocated", timeout_s, 0.5)


def measure(
    plane: ControlPlane,
    api: Any,
    extender: Extender,
    nodes: int,
    variant: str,
    pods: int,
    round_: int,
    percentage: int | None = None,
) -> Measurement:
    """Create the pods with no scheduler running, start one, time first to last binding, clean up."""
    namespace = f"bench-{variant}-{nodes}-{round_}"
    scheduler_name = stack.STOCK_SCHEDULER if variant == STOCK else "gpu-scheduler"
    if variant == STOCK:
        config = stack.stock_scheduler_config()
    else:
        config = stack.scheduler_config(extender.url, percentage_of_nodes_to_score=percentage)
    helpers.create_namespace(api, namespace)
    names = [f"p{i:05d}" for i in range(pods)]
    helpers.create_pods(api, [_pod(n, namespace, scheduler_name) for n in names], workers=16)
    before = extender.metrics()
    with PodWatch(api, namespace) as watch:
        watch.wait(lambda now: len(now) == pods, "every pod listed", 60)
        assert extender.component is not None
        pids = {c.name: c.pid for c in plane.components if c.name in ("etcd", "kube-apiserver")}
        if variant == OURS:
            pids["extender"] = extender.component.pid
        with contextlib.nullcontext() if variant == OURS else paused(extender.component.pid):
            scheduler = plane.start_scheduler(config, name=f"bench-{variant}")
            try:
                with CpuSampler({"kube-scheduler": scheduler.pid, **pids}) as cpu:
                    watch.bound(names, timeout_s=max(120.0, pods / 5))
            finally:
                plane.stop_scheduler(scheduler)
        times = sorted(watch.first_bound_at[n] for n in names)
        cpu_ms = {k: 1000 * v / (pods - 1) for k, v in cpu.used(times[0], times[-1]).items()}
        conditions = []
        for pod in watch.snapshot().values():
            condition = helpers.scheduled_condition(pod)
            if condition and condition.get("status") == "True":
                conditions.append(_parse_time(condition["lastTransitionTime"]))
    verb_ms = _verb_ms(before, extender.metrics()) if variant == OURS else None
    helpers.delete_namespace(api, namespace)
    # The extender counts the stock scheduler's pods too: start the next measurement from an empty fleet.
    wait_extender_sees(extender, nodes, 0.0)
    by_conditions = max(conditions) - min(conditions) if len(conditions) == pods else float("nan")
    return Measurement(nodes, variant, pods, times[-1] - times[0], by_conditions, verb_ms, cpu_ms)


@contextlib.contextmanager
def paused(pid: int) -> Iterator[None]:
    """The process stopped for the block (SIGSTOP), then resumed; its watches resume or re-list as after any
    interruption."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


def _verb_ms(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Mean milliseconds per call of each verb, the shares of prioritize answers computed ahead and of node
    evaluations reused, and the calls that failed."""
    grew = functools.partial(helpers.grown, before, after)
    out = {}
    hits, misses = (grew(f"gpu_extender_score_cache_{k}_total") for k in ("hits", "misses"))
    if hits + misses:
        out["ahead %"] = 100 * hits / (hits + misses)
    computed, reused = (grew(f'gpu_extender_node_evaluations_total{{outcome="{k}"}}') for k in ("computed", "reused"))
    if computed + reused:
        out["reused %"] = 100 * reused / (computed + reused)
    failed = sum(
        grew(f'gpu_extender_decisions_total{{outcome="{outcome}",verb="{verb}"}}')  # the exposition sorts labels
        for verb in ("filter", "prioritize", "bind")
        for outcome in ("error", "not_ready")
    )
    if failed:
        out["failed calls"] = failed
    for verb in ("filter", "prioritize", "bind"):
        key = f'gpu_extender_request_duration_seconds_{{}}{{{{verb="{verb}"}}}}'
        calls = grew(key.format("count"))
        if calls:
            out[verb] = 1000 * grew(key.format("sum")) / calls
    return out


def create_bound_pods(api: kubernetes.client.ApiClient, nodes: int, total: int, workers: int = 24) -> float:
    """``total`` pods spread over the nodes, bound at creation (``spec.nodeName``) with our assignment annotation:
    per node four whole GPUs, then pairs of 500-milli shares on the other four. Returns the seconds it took."""
    namespace = "bench-scale"
    helpers.create_namespace(api, namespace)
    per_node = max(1, total // nodes)
    if per_node > MAX_SCALE_PODS_PER_NODE:
        raise ValueError(f"{per_node} pods per node do not fit {GPUS_PER_NODE} GPUs ({MAX_SCALE_PODS_PER_NODE} do)")
    configuration = copy.deepcopy(api.configuration)
    configuration.connection_pool_maxsize = workers

    def manifest(i: int) -> dict[str, Any]:
        node, slot = f"bench-node-{i // per_node:05d}", i % per_node
        whole = slot < 4
        gpu = slot if whole else 4 + (slot - 4) // 2
        resources = {"cpu": "1", "memory": "1Gi"}
        resources["nvidia.com/gpu" if whole else "gpu-extender.io/gpu-milli"] = "1" if whole else "500"
        assignment = Assignment(node, 1000, 1024, (gpu,), 1000 if whole else 500)
        pod = _pod(f"s{i:06d}", namespace, "gpu-scheduler")
        pod["metadata"]["annotations"] = assignment_annotations(assignment)
        pod["spec"]["nodeName"] = node
        limits = {k: v for k, v in resources.items() if k not in ("cpu", "memory")}
        pod["spec"]["containers"][0]["resources"] = {"requests": resources, "limits": limits}
        return pod

    started = time.monotonic()
    with kubernetes.client.ApiClient(configuration) as client, ThreadPoolExecutor(workers) as pool:

        def one(i: int) -> None:
            resp = api_request(client, "POST", f"/api/v1/namespaces/{namespace}/pods", body=manifest(i))
            resp.data  # noqa: B018 - drain the body before the connection goes back to the pool
            resp.release_conn()

        for done, _ in enumerate(pool.map(one, range(total)), 1):
            if done % 10_000 == 0:
                log(f"  {done} bound pods created ({done / (time.monotonic() - started):.0f}/s)")
    return time.monotonic() - started


def allocated_gpus_of_scale_pods(nodes: int, total: int) -> float:
    per_node = max(1, total // nodes)
    return sum(1.0 if i % per_node < 4 else 0.5 for i in range(total))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.bench_throughput", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", default="500,5000", help="fleet sizes, comma-separated (ascending)")
    parser.add_argument("--pods", type=int, default=1500, help="pods per measurement")
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds per fleet size (medians reported)")
    parser.add_argument("--scale-pods", type=int, default=50_000, help="bound pods for the scale check (0: skip)")
    parser.add_argument(
        "--percentage-of-nodes-to-score",
        type=int,
        help="override the shipped profile's value for our variant (0: kube-scheduler's adaptive default)",
    )
    args = parser.parse_args(argv)
    sizes = sorted(int(n) for n in args.nodes.split(","))
    results: list[Measurement] = []
    with ControlPlane() as plane, plane.api_client() as api:
        extender = Extender(plane, name="gpu-extender-bench", policy=stack.SHIPPED_POLICY)
        extender.start()
        have = 0
        for size in sizes:
            grow_fleet(api, have, size)
            have = size
            wait_extender_sees(extender, size, 0.0)
            for round_ in range(args.rounds):
                order = (STOCK, OURS) if round_ % 2 == 0 else (OURS, STOCK)
                for variant in order:
                    m = measure(
                        plane, api, extender, size, variant, args.pods, round_, args.percentage_of_nodes_to_score
                    )
                    results.append(m)
                    detail = ", ".join(
                        f"{v} {ms:.1f}" + ("" if v.endswith(("%", "calls")) else " ms")
                        for v, ms in (m.verb_ms or {}).items()
                    )
                    cpu = ", ".join(f"{k} {v:.1f}" for k, v in (m.cpu_ms or {}).items())
                    log(
                        f"{size} nodes, {variant}: {m.rate:.1f} pods/s "
                        f"({m.rate_by_conditions:.1f} by conditions) {detail}; CPU ms per pod: {cpu}"
                    )
        print_throughput(results, sizes)

        if args.scale_pods:
            scale_nodes = sizes[-1]
            log(f"creating {args.scale_pods} bound pods on {scale_nodes} nodes")
            seconds = create_bound_pods(api, scale_nodes, args.scale_pods)
            expected = allocated_gpus_of_scale_pods(scale_nodes, args.scale_pods)
            wait_extender_sees(extender, scale_nodes, expected, timeout_s=600)
            running_rss, running_hwm = extender.rss_kib()
            fresh = Extender(plane, name="gpu-extender-fresh", policy=stack.SHIPPED_POLICY)
            started = time.monotonic()
            fresh.start(timeout_s=300)
            ready_s = time.monotonic() - started
            wait_extender_sees(fresh, scale_nodes, expected, timeout_s=60)
            fresh_rss, fresh_hwm = fresh.rss_kib()
            conflicts = fresh.metrics().get("gpu_extender_watch_conflicts_total", float("nan"))
            fresh.stop()
            print(
                f"\ncluster model at scale: {scale_nodes} GPU nodes, {args.scale_pods} bound pods "
                f"(created in {seconds:.0f}s, {args.scale_pods / seconds:.0f}/s)"
            )
            print(
                f"  fresh extender: ready in {ready_s:.1f}s (target <= {TARGET_READY_S:.0f}s), "
                f"RSS {fresh_rss / 1024:.0f} MB, peak {fresh_hwm / 1024:.0f} MB (target <= {TARGET_RSS_MB:.0f} MB), "
                f"{expected:.0f} GPUs allocated, {conflicts:.0f} conflicts"
            )
            print(
                f"  extender that watched them arrive: RSS {running_rss / 1024:.0f} MB, "
                f"peak {running_hwm / 1024:.0f} MB"
            )
        extender.stop()
    return 0


def print_throughput(results: list[Measurement], sizes: list[int]) -> None:
    print("\nscheduling throughput through kube-scheduler (first to last binding)")
    print(f"{'nodes':>6} {'profile':<10} {'pods':>6} {'pods/s':>8} {'by conds':>9} {'rounds':>6}  extender ms/call")
    for size in sizes:
        rates = {}
        by_round: dict[str, list[float]] = {}
        for variant in (STOCK, OURS):
            ms = [m for m in results if m.nodes == size and m.variant == variant]
            by_round[variant] = [m.rate for m in ms]
            rate = statistics.median(m.rate for m in ms)
            by_conditions = statistics.median(m.rate_by_conditions for m in ms)
            rates[variant] = rate
            verbs = ms[-1].verb_ms or {}
            detail = "  " + ", ".join(f"{v} {t:.1f}" for v, t in verbs.items()) if verbs else ""
            print(f"{size:>6} {variant:<10} {ms[0].pods:>6} {rate:>8.1f} {by_conditions:>9.1f} {len(ms):>6}{detail}")
        ratio = rates[OURS] / rates[STOCK]
        verdict = "ok" if ratio >= TARGET_RATIO else "BELOW TARGET"
        # Each round measures both profiles back to back: its own ratio shows how much the machine drifted.
        pairs = " ".join(f"{b / a:.2f}" for a, b in zip(by_round[STOCK], by_round[OURS], strict=True))
        rounds = f"; by round {pairs}" if len(by_round[STOCK]) > 1 else ""
        print(f"{size:>6} {'b/a':<10} {'':>6} {ratio:>8.2f}   (target >= {TARGET_RATIO}: {verdict}{rounds})")
    print("\nCPU milliseconds per pod between first and last binding (medians; all processes share the cores)")
    names = ("kube-scheduler", "kube-apiserver", "etcd", "extender")
    print(f"{'nodes':>6} {'profile':<10} " + " ".join(f"{n:>15}" for n in names) + f" {'total':>8}")
    for size in sizes:
        for variant in (STOCK, OURS):
            ms = [m.cpu_ms or {} for m in results if m.nodes == size and m.variant == variant]
            per = {n: statistics.median(m.get(n, 0.0) for m in ms) for n in names}
            cells = " ".join(f"{per[n]:>15.2f}" if n in ms[0] else f"{'-':>15}" for n in names)
            print(f"{size:>6} {variant:<10} {cells} {sum(per.values()):>8.2f}")


if __name__ == "__main__":
    sys.exit(main())
