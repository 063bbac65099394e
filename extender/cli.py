"""`gpu-extender`: one command line for the service, the simulator and the local cluster."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _serve(args: argparse.Namespace) -> int:
    from extender.serve import run

    return run(args)


def _simulate(args: argparse.Namespace) -> int:
    from scheduler.simulator.cli import run

    return run(args)


def _agent(args: argparse.Namespace) -> int:
    from extender.logs import configure
    from scheduler.agent.cli import run

    configure(args.log_level)
    return run(args)


def _explain(args: argparse.Namespace) -> int:
    from extender.explain import run

    return run(args)


def _plan(args: argparse.Namespace) -> int:
    from scheduler.planner.cli import run

    return run(args)


def _cluster(args: argparse.Namespace) -> int:
    try:
        from e2e.controlplane import main
    except ImportError as exc:  # the control plane's PKI needs the `cluster` extra
        print(f"cluster: {exc.name} is missing: pip install 'kube-gpu-extender[cluster]'", file=sys.stderr)
        return 2

    return main([args.action])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gpu-extender", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the scheduler extender over HTTP")
    source = serve.add_mutually_exclusive_group()
    source.add_argument("--fleet", help="static fleet: openb node CSV or a YAML list of Node objects")
    source.add_argument("--kubeconfig", help="kubeconfig for live mode (default: in-cluster, then ~/.kube/config)")
    serve.add_argument("--policy", help="placement policy YAML (reloaded when it changes)")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8888)
    serve.add_argument("--log-level", default="info")
    serve.add_argument("--tls-cert", help="serve HTTPS with this certificate (PEM)")
    serve.add_argument("--tls-key", help="private key for --tls-cert")
    from scheduler.telemetry import add_arguments as add_telemetry_arguments

    add_telemetry_arguments(serve)
    from scheduler.planner.serve import add_arguments as add_planner_arguments

    add_planner_arguments(serve)
    from scheduler.prewarm.serve import add_arguments as add_prewarm_arguments

    add_prewarm_arguments(serve)
    from scheduler.leader import add_arguments as add_leader_arguments

    add_leader_arguments(serve)
    serve.set_defaults(func=_serve)

    simulate = sub.add_parser("simulate", help="replay a trace through the placement policies")
    try:
        from scheduler.simulator.cli import add_arguments
    except ImportError:  # the simulator's optional parts are missing
        pass
    else:
        add_arguments(simulate)
    simulate.set_defaults(func=_simulate)

    explain = sub.add_parser("explain", help="why a pod would go where: every node's verdict and score")
    from extender.explain import add_arguments as add_explain_arguments

    add_explain_arguments(explain)
    explain.set_defaults(func=_explain)

    plan = sub.add_parser("plan", help="co-locate model-serving replicas on a fleet at the least cost")
    from scheduler.planner.cli import add_arguments as add_plan_arguments

    add_plan_arguments(plan)
    plan.set_defaults(func=_plan)

    cluster = sub.add_parser("cluster", help="a local control plane (etcd, kube-apiserver, kube-scheduler)")
    cluster.add_argument("action", choices=["up", "down"])
    cluster.set_defaults(func=_cluster)

    agent = sub.add_parser("agent", help="node agent: DCGM-compatible GPU metrics, health, the node's GPU inventory")
    from scheduler.agent.cli import add_arguments as add_agent_arguments

    add_agent_arguments(agent)
    agent.set_defaults(func=_agent)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
