"""`gpu-extender explain`: why a pod would go where, node by node, from a running extender or a fleet file."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import httpx
import yaml


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pod", help="Pod manifest (YAML or JSON); '-' reads standard input")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--url", help="a running extender, e.g. http://127.0.0.1:8888")
    source.add_argument("--fleet", help="a fleet file (openb node CSV or YAML Node list) to decide against")
    parser.add_argument("--policy", help="placement policy YAML (with --fleet)")
    parser.add_argument("--top", type=int, default=15, help="how many nodes to show")


def _explain(args: argparse.Namespace, pod: dict[str, Any]) -> list[dict[str, Any]]:
    if args.url:
        reply = httpx.post(f"{args.url.rstrip('/')}/explain", json={"Pod": pod, "NodeNames": None}, timeout=30)
        if reply.status_code != 200:
            raise SystemExit(f"extender answered {reply.status_code}: {reply.text}")
        return list(reply.json()["nodes"])
    from extender.serve import fleet_service
    from policies.config import PlacementPolicy, load_policy

    policy = load_policy(args.policy) if args.policy else PlacementPolicy()
    return fleet_service(args.fleet, policy).explain(pod)


def run(args: argparse.Namespace) -> int:
    text = sys.stdin.read() if args.pod == "-" else Path(args.pod).read_text()
    pod = yaml.safe_load(text)
    nodes = _explain(args, pod)
    fits = [n for n in nodes if n["fits"]]
    print(f"{len(fits)} of {len(nodes)} nodes fit; best first:")
    for node in fits[: args.top]:
        parts = "  ".join(f"{k}={v:+.3f}" for k, v in node.get("components", {}).items())
        print(f"  {node['score']:>2}  {node['node']:<24} {node['placement']}  {parts}")
    reasons: dict[str, int] = {}
    for node in nodes:
        if not node["fits"]:
            reasons[node["reason"]] = reasons.get(node["reason"], 0) + 1
    for reason, count in sorted(reasons.items(), key=lambda item: -item[1]):
        print(f"  {count:>5} nodes: {reason}")
    return 0
