"""`gpu-extender agent`: the node agent's command line.

gpu-extender agent --node-name "$NODE_NAME" --port 9400                # NVML, publishes to the Node
gpu-extender agent --nvml 'fake:h100x8;util=trace' --hostname n1 --port 9401 --no-publish
gpu-extender agent --nvml real --once --no-publish                     # print one scrape and exit
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading
import time
from typing import Any

from prometheus_client.exposition import generate_latest

from scheduler.agent.agent import Agent
from scheduler.agent.exporter import MetricsServer
from scheduler.agent.model_cache import ModelCache
from scheduler.agent.nvml import open_backend
from scheduler.agent.publisher import NodePublisher

__all__ = ["add_arguments", "main", "run"]

log = logging.getLogger("gpu_extender.agent")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nvml", default="real", help="'real' (default) or 'fake:SPEC' (see scheduler/agent/fake_nvml.py)"
    )
    parser.add_argument(
        "--node-name", default=os.environ.get("NODE_NAME"), help="the Node to publish to (default: $NODE_NAME)"
    )
    parser.add_argument("--hostname", help="the Hostname label (default: the node name, else the host's name)")
    parser.add_argument("--kubeconfig", help="kubeconfig (default: in-cluster, then ~/.kube/config)")
    parser.add_argument("--no-publish", action="store_true", help="serve metrics only; never write to the Node")
    parser.add_argument("--host", default="0.0.0.0", help="address to serve /metrics, /healthz and /livez on")
    parser.add_argument("--port", type=int, default=9400)
    parser.add_argument("--interval", type=float, default=5.0, help="seconds between samples")
    parser.add_argument(
        "--resync",
        type=float,
        default=300.0,
        help="seconds between checks that the Node still holds what was published",
    )
    parser.add_argument(
        "--once",
        action="store_true",
        help="sample twice a second apart (engine activity needs an interval), print the metrics, exit",
    )
    parser.add_argument(
        "--milli-per-gpu",
        type=int,
        default=1000,
        help="gpu-extender.io/gpu-milli advertised per shareable GPU: 1000, or 1000 + the policy's "
        "overcommit.maxBorrowedMilliPerGpu when overcommit is enabled (the extender enforces the real capacity)",
    )
    parser.add_argument(
        "--model-cache-dir",
        help="Hugging Face hub cache of model weights on this node (e.g. /var/cache/huggingface/hub): the models "
        "found there are published with the inventory, so serving pods prefer this node",
    )
    parser.add_argument("--log-level", default="info")


def _api_client(kubeconfig: str | None) -> Any:
    from kubernetes import client, config

    configuration = client.Configuration()
    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    else:
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException:
            config.load_kube_config(client_configuration=configuration)
    return client.ApiClient(configuration)


_STANDARD = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}


class _PlainFormatter(logging.Formatter):
    """Text lines with the record's `extra=` fields appended (when nothing configured logging before us)."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
        return super().format(record) + "".join(f" {k}={v}" for k, v in fields.items())


def run(args: argparse.Namespace) -> int:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_PlainFormatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
        root.addHandler(handler)
        root.setLevel(args.log_level.upper())
    hostname = args.hostname or args.node_name or socket.gethostname()
    try:
        backend = open_backend(args.nvml, hostname=hostname)
    except ValueError as exc:
        log.error("invalid --nvml", extra={"error": str(exc)})
        return 2
    publisher = None
    if not args.no_publish:
        if not args.node_name:
            log.error("--node-name (or NODE_NAME) is needed to publish; use --no-publish for metrics only")
            return 2
        try:
            api = _api_client(args.kubeconfig)
        except Exception as exc:  # the kubernetes client raises several unrelated types for a bad configuration
            log.error("cannot configure the Kubernetes client", extra={"error": f"{type(exc).__name__}: {exc}"})
            return 2
        publisher = NodePublisher(api, args.node_name, resync_s=args.resync)
    if args.milli_per_gpu < 1000:
        log.error("--milli-per-gpu must be at least 1000", extra={"given": args.milli_per_gpu})
        return 2
    cache = ModelCache(args.model_cache_dir) if args.model_cache_dir else None
    agent = Agent(
        backend, hostname, publisher, interval_s=args.interval, milli_per_gpu=args.milli_per_gpu, model_cache=cache
    )
    if args.once:
        agent.step()
        time.sleep(1.0)
        agent.step()
        sys.stdout.write(generate_latest(agent.registry).decode())
        return 0 if agent.health().nvml_up else 1
    server = MetricsServer(agent.registry, agent.health, args.host, args.port).start()
    log.info("node agent serving", extra={"port": server.port, "hostname": hostname, "nvml": args.nvml})
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        agent.run(stop)
    finally:
        server.stop()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="gpu-extender agent", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
