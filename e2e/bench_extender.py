"""Latency of the extender's hot path over HTTP, as kube-scheduler would see it.

Serves `gpu-extender serve --fleet` for the openb fleet (1,213 nodes) and a generated fleet of 5,000 nodes,
fills each to about half its GPU capacity through filter/prioritize/bind, then times filter and prioritize
calls with 500 and 5,000 candidate node names from the client side on loopback. Prioritize gets the names filter
let through and is skipped when only one passed, as kube-scheduler does (`--prioritize all` sends it every
candidate name instead). Prints p50/p99/max per verb and per pod (filter and prioritize together, what the
scheduling loop waits for) and the server's peak resident memory. Each timed pod is then bound to its best node,
untimed, as kube-scheduler would. The server runs the default policy, whose filter passes every feasible node;
`--policy manifests/base/policy.yaml` times the shipped one, whose filter passes only the best.

    python -m e2e.bench_extender [--calls 400] [--fleet openb|5000|both] [--prioritize passed|all] [--policy FILE]
"""

from __future__ import annotations

import argparse
import csv
import http.client
import random
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import orjson
from prometheus_client.parser import text_string_to_metric_families

from e2e.procs import free_ports
from e2e.workload import TracePod, pod_manifest, read_openb_pods, shared_data


def _generated_fleet(source: Path, size: int, out: Path, seed: int = 7) -> Path:
    """`size` nodes drawn with replacement from the openb GPU node list, renamed."""
    rng = random.Random(seed)
    with open(source, newline="") as handle:
        rows = list(csv.DictReader(handle))
    with open(out, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        for i in range(size):
            writer.writerow({**rng.choice(rows), "sn": f"gen-node-{i:05d}"})
    return out


def _pod(trace: TracePod) -> dict[str, Any]:
    pod = pod_manifest(trace, name=f"{trace.name}-{uuid.uuid4().hex[:8]}")
    pod["metadata"]["uid"] = str(uuid.uuid4())
    pod.pop("apiVersion"), pod.pop("kind")
    return pod


class Client:
    """A keep-alive HTTP/1.1 client on one connection, JSON through orjson: the measurement should show the
    server, not a Python client library (httpx alone adds about half a millisecond per call)."""

    def __init__(self, port: int) -> None:
        self._conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        payload = orjson.dumps(body) if body is not None else None
        headers = {"Content-Type": "application/json"} if payload is not None else {}
        self._conn.request(method, path, body=payload, headers=headers)
        response = self._conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{method} {path}: HTTP {response.status}: {data[:200]!r}")
        return orjson.loads(data) if response.getheader("Content-Type", "").startswith("application/json") else data

    def close(self) -> None:
        self._conn.close()


def _serve(fleet: Path, port: int, policy: Path | None) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "extender.cli", "serve", "--fleet", str(fleet), "--port", str(port)]
    argv += ["--log-level", "warning", *(["--policy", str(policy)] if policy else [])]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("extender did not become ready")


def _peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _fill(client: Client, names: list[str], pods: list[TracePod], target: float, rng: random.Random) -> int:
    """Schedule pods the way kube-scheduler would until `target` of the GPU capacity is allocated."""
    bound = 0
    while True:
        families = text_string_to_metric_families(client.call("GET", "/metrics").decode())
        values = {f.name: f.samples[0].value for f in families if f.name.startswith("gpu_extender") and f.samples}
        if values["gpu_extender_allocated_gpus"] >= target * values["gpu_extender_gpus"]:
            return bound
        for _ in range(200):
            pod = _pod(rng.choice(pods))
            candidates = rng.sample(names, min(500, len(names)))
            passed = client.call("POST", "/filter", {"Pod": pod, "Nodes": None, "NodeNames": candidates})
            if not passed["NodeNames"]:
                continue
            scores = client.call("POST", "/prioritize", {"Pod": pod, "Nodes": None, "NodeNames": passed["NodeNames"]})
            bound += _bind(client, pod, max(scores, key=lambda h: h["Score"])["Host"])


def _percentiles(samples: list[float]) -> str:
    ms = np.array(samples) * 1000
    return f"p50 {np.percentile(ms, 50):6.2f} ms  p99 {np.percentile(ms, 99):6.2f} ms  max {ms.max():6.2f} ms"


def _time_pod(client: Client, body: dict[str, Any], prioritize_all: bool, timings: dict[str, list[float]]) -> int:
    """One pod's filter and prioritize calls, each and together (what the scheduling loop waits for); returns how
    many names prioritize got (0: not called)."""
    start = time.perf_counter()
    passed = client.call("POST", "/filter", body)["NodeNames"]
    filtered = time.perf_counter()
    timings["filter"].append(filtered - start)
    names = body["NodeNames"] if prioritize_all else passed
    if len(passed) < 2 and not prioritize_all:
        timings["per pod"].append(filtered - start)
        return 0
    scores = client.call("POST", "/prioritize", {**body, "NodeNames": names})
    end = time.perf_counter()
    timings["prioritize"].append(end - filtered)
    timings["per pod"].append(end - start)
    _bind(client, body["Pod"], max(scores, key=lambda h: h["Score"])["Host"])
    return len(names)


def _bind(client: Client, pod: dict[str, Any], node: str) -> bool:
    """Bind as kube-scheduler does next (not timed: it runs beside the scheduling loop, not in it)."""
    meta = pod["metadata"]
    reply = client.call(
        "POST", "/bind", {"PodName": meta["name"], "PodNamespace": "default", "PodUID": meta["uid"], "Node": node}
    )
    return not reply["Error"]


def bench(
    fleet: Path,
    candidates: int,
    calls: int,
    pods: list[TracePod],
    fill: float,
    prioritize_all: bool = False,
    policy: Path | None = None,
) -> None:
    with open(fleet, newline="") as handle:
        names = [row["sn"] for row in csv.DictReader(handle)]
    rng = random.Random(42)
    port = free_ports(1)[0]
    proc = _serve(fleet, port, policy)
    try:
        client = Client(port)
        try:
            bound = _fill(client, names, pods, fill, rng)
            timings: dict[str, list[float]] = {"filter": [], "prioritize": [], "per pod": []}
            sizes = []
            for _ in range(calls):
                pod = _pod(rng.choice(pods))
                body = {"Pod": pod, "Nodes": None, "NodeNames": rng.sample(names, min(candidates, len(names)))}
                sizes.append(_time_pod(client, body, prioritize_all, timings))
        finally:
            client.close()
        asked = [n for n in sizes if n]
        print(
            f"{fleet.name}: {len(names)} nodes, {bound} pods bound first (~{fill:.0%} of GPUs), "
            f"{candidates} candidate names, {calls} pods; prioritize called {len(asked)} times with "
            f"{'every candidate' if prioritize_all else 'the passed'} names (median {np.median(asked or [0]):.0f})"
        )
        for verb, samples in timings.items():
            if samples:
                print(f"  {verb:<10} {_percentiles(samples)}")
        print(f"  server peak RSS {_peak_rss_mib(proc.pid):.0f} MiB")
    finally:
        proc.terminate()
        proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--fill", type=float, default=0.5, help="share of GPU capacity allocated before timing")
    parser.add_argument(
        "--fleet", choices=("openb", "5000", "both"), default="both", help="which fleet(s) to time (default both)"
    )
    parser.add_argument(
        "--prioritize",
        choices=("passed", "all"),
        default="passed",
        help="names sent to prioritize: those filter passed, as kube-scheduler does (default), or every candidate",
    )
    parser.add_argument("--policy", type=Path, help="placement policy file for the server (default: built-in defaults)")
    args = parser.parse_args(argv)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]  # progress when piped to a file
    openb = shared_data() / "openb"
    pods = read_openb_pods(openb / "openb_pod_list_default.csv")
    openb_fleet = openb / "openb_node_list_gpu_node.csv"
    with tempfile.TemporaryDirectory() as tmp:
        if args.fleet in ("openb", "both"):
            bench(openb_fleet, 500, args.calls, pods, args.fill, args.prioritize == "all", args.policy)
        if args.fleet in ("5000", "both"):
            big = _generated_fleet(openb_fleet, 5000, Path(tmp) / "fleet-5000.csv")
            bench(big, 5000, args.calls, pods, args.fill, args.prioritize == "all", args.policy)
    return 0


if __name__ == "__main__":
    sys.exit(main())
