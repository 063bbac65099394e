"""`gpu-extender explain`: why a pod would go where, node by node, from a running extender or a fleet file."""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson
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
        return _ask(args.url, pod)
    from extender.serve import fleet_service
    from policies.config import PlacementPolicy, load_policy

    policy = load_policy(args.policy) if args.policy else PlacementPolicy()
    return fleet_service(args.fleet, policy).explain(pod)


def _ask(url: str, pod: dict[str, Any]) -> list[dict[str, Any]]:
    """POST the pod to a running extender's `/explain` (the standard library suffices for one request)."""
    request = urllib.request.Request(
        f"{url.rstrip('/')}/explain",
        data=orjson.dumps({"Pod": pod, "NodeNames": None}),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            body = reply.read()
    except urllib.error.HTTPError as exc:
        raise SystemExit(f"extender answered {exc.code}: {exc.read(2000).decode(errors='replace')}") from None
    except (urllib.error.URLError, TimeoutError, OSError) as exc:
        raise SystemExit(f"cannot reach the extender at {url}: {getattr(exc, 'reason', exc)}") from None
    return list(orjson.loads(body)["nodes"])


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
