"""The shipped system on the local control plane: our extender in live mode and kube-scheduler with the
profile from `manifests/base/kube-scheduler-config.yaml` (only the extender's URL is changed)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from e2e import procs
from e2e.controlplane import ControlPlane

REPO = Path(__file__).resolve().parents[1]
SCHEDULER_CONFIG = REPO / "manifests" / "base" / "kube-scheduler-config.yaml"
SHIPPED_POLICY = REPO / "manifests" / "base" / "policy.yaml"
STOCK_SCHEDULER = "default-scheduler"


def scheduler_config(
    extender_url: str, percentage_of_nodes_to_score: int | None = None, **extender_overrides: Any
) -> str:
    """The shipped KubeSchedulerConfiguration, pointed at `extender_url`, leader election off (and, to measure
    the trade-off, another `percentageOfNodesToScore`: 0 is kube-scheduler's adaptive default)."""
    config = yaml.safe_load(SCHEDULER_CONFIG.read_text())
    config.pop("leaderElection", None)
    if percentage_of_nodes_to_score is not None:
        config["percentageOfNodesToScore"] = percentage_of_nodes_to_score
    (extender,) = config["extenders"]
    extender["urlPrefix"] = extender_url
    extender.update(extender_overrides)
    return yaml.safe_dump(config, sort_keys=False)


def stock_scheduler_config() -> str:
    """kube-scheduler's defaults, as a cluster without this project schedules GPU pods."""
    return yaml.safe_dump(
        {
            "apiVersion": "kubescheduler.config.k8s.io/v1",
            "kind": "KubeSchedulerConfiguration",
            "clientConnection": {"qps": 200, "burst": 400},
            "profiles": [{"schedulerName": STOCK_SCHEDULER}],
        }
    )


def start_extender(
    plane: ControlPlane, name: str = "gpu-extender", policy: Path | None = SHIPPED_POLICY, timeout_s: float = 60.0
) -> procs.Component:
    """`gpu-extender serve` against the control plane (with the shipped policy unless told otherwise); returns once
    /readyz answers (first full list in)."""
    (port,) = procs.free_ports(1)
    argv = [sys.executable, "-m", "extender.cli", "serve", "--kubeconfig", str(plane.kubeconfig), "--port", str(port)]
    if policy is not None:
        argv += ["--policy", str(policy)]
    component = procs.spawn(name, argv, plane.workdir / f"{name}.log")
    component.port = port
    procs.wait_until(component, lambda: procs.http_ok(f"http://127.0.0.1:{port}/readyz"), "/readyz", timeout_s)
    plane.components.append(component)
    return component


def extender_url(component: procs.Component) -> str:
    return f"http://127.0.0.1:{component.port}"
