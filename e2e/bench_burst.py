"""A burst of GPU pods through the real kube-scheduler with the extender: all submitted at once, to a fleet of openb
nodes, with the shipped profile and policy.

    python -m e2e.bench_burst [--nodes 1000] [--pods 10000] [--seed 1]

Prints the wall time from the first pod created to the last one decided, pods bound per second, the extender's
decision latency per verb from its own histogram (p50, p99 and the largest bucket used; the histogram's buckets
bound what it can say), extender calls that failed on either side (the extender's `outcome` counter, and
kube-scheduler's log lines about its extender), pods bound, pods that fit nowhere (their PodScheduled condition says
Unschedulable), and a double-booking check over the final assignments (`helpers.book`). Targets (issue 21): no
extender errors or timeouts, no double booking.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import Counter
from typing import Any

from e2e import fleet, helpers
from e2e.controlplane import ControlPlane
from e2e.helpers import PodWatch, Stack
from e2e.workload import pod_manifest, read_openb_pods, shared_data
from scheduler.kubeapi import read_json

NS = "burst"
SETTLE_S = 20.0  # no pod decided for this long: the burst is over


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def histogram(metrics: dict[str, float], verb: str) -> tuple[float, float, float, int]:
    """(p50, p99, largest bucket used, calls) of a verb's latency histogram, in milliseconds, as bucket bounds."""
    prefix = "gpu_extender_request_duration_seconds_bucket{"
    buckets = []
    for key, value in metrics.items():
        if key.startswith(prefix) and f'verb="{verb}"' in key:
            le = key.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float("inf") if le == "+Inf" else float(le), value))
    buckets.sort()
    total = buckets[-1][1] if buckets else 0.0
    if not total:
        return float("nan"), float("nan"), float("nan"), 0

    def quantile(q: float) -> float:
        return next(le for le, count in buckets if count >= q * total) * 1000

    largest = next(le for le, count in buckets if count >= total) * 1000
    return quantile(0.5), quantile(0.99), largest, int(total)


def failure_reasons(lines: list[str]) -> Counter[str]:
    """The extender's logged call failures, by their message with pod and node names taken out."""
    out: Counter[str] = Counter()
    for line in lines:
        if '"level":"warning"' not in line and '"level":"error"' not in line:
            continue
        try:
            record = json.loads(line)
        except ValueError:
            continue
        text = f"{record.get('msg', '')}: {record.get('error', '')}"
        out[re.sub(r"[\w.-]+/p\d{5}|\b[\w-]*\d{3,}[\w-]*\b", "…", text)[:160]] += 1
    return out


def scheduler_errors(lines: list[str]) -> Counter[str]:
    """kube-scheduler's "Error scheduling pod" lines (a failed extender call among them: a timeout, an error
    answer), by their error with addresses and names taken out."""
    out: Counter[str] = Counter()
    for line in lines:
        if "Error scheduling pod" in line:
            error = line.split(' err="', 1)[-1].split('" ', 1)[0]
            out[re.sub(r"127\.0\.0\.1:\d+|p\d{5}", "…", error)[:160]] += 1
    return out


def decided(pod: dict[str, Any]) -> bool:
    """Bound, or found to fit nowhere (for now)."""
    if helpers.node_name(pod):
        return True
    return helpers.unschedulable(pod)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.bench_burst", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=1000, help="openb GPU nodes in the fleet (a seeded sample)")
    parser.add_argument("--pods", type=int, default=10_000, help="pods of the openb default mix, all at once")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    all_nodes = fleet.nodes_from_openb_csv()
    rng = random.Random(args.seed)
    nodes = sorted(rng.sample(all_nodes, min(args.nodes, len(all_nodes))), key=lambda n: n["metadata"]["name"])
    trace = read_openb_pods(shared_data() / "openb" / "openb_pod_list_default.csv")
    pods = [pod_manifest(rng.choice(trace), f"p{i:05d}", NS) for i in range(args.pods)]
    with ControlPlane() as plane, plane.api_client(pool_maxsize=32) as api:
        fleet.create_nodes(api, nodes)
        helpers.create_namespace(api, NS)
        system = Stack.start(plane, api)
        helpers.wait_for(
            lambda: system.extender.metrics().get("gpu_extender_nodes", 0) >= len(nodes) or None,
            "the extender to see the fleet",
            120,
        )
        assert system.scheduler is not None
        before = system.extender.metrics()
        with PodWatch(api, NS) as watch:
            started = time.monotonic()
            helpers.create_pods(api, pods, workers=16)
            created = time.monotonic() - started
            log(f"{len(pods)} pods created in {created:.1f}s")
            last_change, last_count = time.monotonic(), -1
            while True:
                count = sum(decided(p) for p in watch.snapshot().values())
                if count != last_count:
                    last_change, last_count = time.monotonic(), count
                if count >= len(pods) or time.monotonic() - last_change > SETTLE_S:
                    break
                time.sleep(0.5)
            wall = last_change - started
            final = list(read_json(api, "GET", f"/api/v1/namespaces/{NS}/pods")["items"])
        after = system.extender.metrics()
        scheduler_log = system.scheduler.log_path.read_text(errors="replace").splitlines()
        extender_log = system.extender.log_path.read_text(errors="replace").splitlines()
        system.stop()
    bound = sum(1 for p in final if helpers.node_name(p))
    nowhere = sum(1 for p in final if not helpers.node_name(p) and helpers.unschedulable(p))
    book = helpers.book(final)
    failed = sum(
        helpers.grown(before, after, f'gpu_extender_decisions_total{{outcome="{outcome}",verb="{verb}"}}')
        for verb in ("filter", "prioritize", "bind", "preempt")
        for outcome in ("error", "not_ready")
    )
    scheduler_side = scheduler_errors(scheduler_log)
    print(f"\nburst of {len(pods)} openb pods on {len(nodes)} nodes through kube-scheduler with the extender")
    print(f"  wall time (first created to last decided): {wall:.1f}s; bound {bound} ({bound / wall:.1f} pods/s)")
    print(f"  fit nowhere (Unschedulable): {nowhere}; undecided: {len(pods) - bound - nowhere}")
    for verb in ("filter", "prioritize", "bind", "preempt"):
        p50, p99, top, calls = histogram(after, verb)
        if calls:
            print(f"  {verb:<10} {calls:>6} calls  p50 <= {p50:.1f} ms  p99 <= {p99:.1f} ms  max <= {top:.1f} ms")
    print(
        f"  extender calls failed (extender side): {failed:.0f}; kube-scheduler's scheduling errors: "
        f"{sum(scheduler_side.values())}"
    )
    for reason, count in scheduler_side.most_common(5):
        print(f"    {count:>6} x {reason}")
    for reason, count in failure_reasons(extender_log).most_common(5):
        print(f"    {count:>6} x {reason}")
    print(f"  double booking: {len(book.problems)} problems over {bound} bound pods")
    for problem in book.problems[:5]:
        print(f"    {problem}")
    return 0 if not book.problems and not failed and not scheduler_side else 1


if __name__ == "__main__":
    sys.exit(main())
