"""The shipped system on the local control plane: our extender in live mode and kube-scheduler with the
profile from `manifests/base/kube-scheduler-config.yaml` (only the extender's URL is changed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

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
