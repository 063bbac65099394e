"""Quantities and pod demands: what a pod's API JSON asks for, as kube-scheduler would count it."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Any

import pytest

from e2e.workload import shared_data
from policies.demand import DemandKind, LatencyClass
from scheduler.podspec import (
    ANNOTATION_GPU_MEMORY,
    ANNOTATION_GPU_TYPES,
    ANNOTATION_LATENCY_CLASS,
    ANNOTATION_MODEL,
    GPU_MILLI_RESOURCE,
    GPU_PRODUCT_LABEL,
    PodSpecError,
    cached_demand,
    demand_from_pod,
    managed_resources,
    pod_key,
)
from scheduler.quantity import parse_quantity, to_count, to_mib, to_milli

WIRE = shared_data().parent / "wire"


# -- quantities ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "milli"),
    [
        ("100m", 100),
        ("2", 2000),
        ("1.5", 1500),
        ("1e3", 1_000_000),
        ("500k", 500_000_000),
        (".5", 500),
        ("1.5m", 2),
        (4, 4000),
        (0.25, 250),
        ("+1", 1000),
        ("1E-3", 1),
    ],
)
def test_to_milli(text: Any, milli: int) -> None:
    assert to_milli(text) == milli


@pytest.mark.parametrize(
    ("text", "mib"),
    [("64Mi", 64), ("1.5Gi", 1536), ("1Ti", 1 << 20), ("1G", 954), ("1048576", 1), ("1", 1), ("0", 0)],
)
def test_to_mib_rounds_requests_up(text: str, mib: int) -> None:
    assert to_mib(text) == mib


def test_capacities_round_down() -> None:
    assert to_mib("1G", round_up=False) == 953
    assert to_milli("1.5m", round_up=False) == 1


def test_parse_is_exact() -> None:
    assert parse_quantity("1.5Gi") == Decimal(1610612736)
    assert parse_quantity("100m") == Decimal("0.1")
    assert parse_quantity("1E") == Decimal(10) ** 18  # the exa suffix, not an exponent


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        " 1",
        "1 ",
        "NaN",
        "Infinity",
        "1_000",
        "1e3Mi",
        "1ki",
        "1Mi5",
        "e3",
        "abc",
        "1.2.3",
        "--1",
        None,
        True,
        [1],
        "1e99999",
    ],
)
def test_garbage_is_refused(garbage: Any) -> None:
    with pytest.raises(ValueError, match="invalid quantity"):
        to_milli(garbage)


def test_negative_and_fractional_counts_are_refused() -> None:
    with pytest.raises(ValueError, match="negative"):
        to_mib("-1Gi")
    with pytest.raises(ValueError, match="whole"):
        to_count("1.5")
    assert to_count("2") == 2


# -- pods ----------------------------------------------------------------------------------------------
def pod(
    containers: list[dict[str, Any]] | None = None,
    init: list[dict[str, Any]] | None = None,
    annotations: dict[str, str] | None = None,
    **spec: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {"containers": containers or [], **spec}
    if init is not None:
        body["initContainers"] = init
    return {"metadata": {"name": "p", "namespace": "ns", "annotations": annotations or {}}, "spec": body}


def c(requests: dict[str, Any] | None = None, limits: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    resources: dict[str, Any] = {}
    if requests is not None:
        resources["requests"] = requests
    if limits is not None:
        resources["limits"] = limits
    return {"name": "c", "resources": resources, **kw}


def test_wire_pods() -> None:
    for path in sorted(WIRE.glob("*.request.json")):
        body = json.loads(path.read_text())
        if "Pod" not in body:
            continue
        demand = demand_from_pod(body["Pod"])
        assert demand.kind is DemandKind.WHOLE
        assert demand.gpu_count >= 1 and demand.gpu_milli == 1000
        assert demand.cpu_milli > 0 and demand.memory_mib > 0


def test_wire_pod_exact() -> None:
    body = json.loads((WIRE / "filter-001.request.json").read_text())
    demand = demand_from_pod(body["Pod"])
    assert (demand.cpu_milli, demand.memory_mib, demand.gpu_count, demand.gpu_milli) == (100, 64, 1, 1000)
    assert demand.latency_class is LatencyClass.BATCH and demand.allowed_models == frozenset()
    assert pod_key(body["Pod"]) == "default/p2"


def test_containers_add_up_and_limits_stand_in_for_requests() -> None:
    d = demand_from_pod(pod([c({"cpu": "500m", "memory": "1Gi"}), c(limits={"cpu": "1", "nvidia.com/gpu": 2})]))
    assert (d.cpu_milli, d.memory_mib, d.gpu_count, d.gpu_milli) == (1500, 1024, 2, 1000)


def test_init_containers_take_the_max_and_sidecars_add() -> None:
    init = [c({"cpu": "4"}), c({"cpu": "1", "memory": "2Gi"}, restartPolicy="Always")]
    d = demand_from_pod(pod([c({"cpu": "2", "memory": "1Gi"})], init=init))
    # regular init 4 CPU alone; afterwards containers (2) plus the running sidecar (1) = 3; memory 1Gi + 2Gi.
    assert (d.cpu_milli, d.memory_mib) == (4000, 3072)
    init_after_sidecar = [c({"cpu": "1"}, restartPolicy="Always"), c({"cpu": "4"})]
    d = demand_from_pod(pod([c({"cpu": "2"})], init=init_after_sidecar))
    assert d.cpu_milli == 5000  # the regular init container runs next to the sidecar started before it


def test_init_container_gpu_counts_as_max() -> None:
    d = demand_from_pod(pod([c({"nvidia.com/gpu": "1"})], init=[c({"nvidia.com/gpu": "2"})]))
    assert d.gpu_count == 2


def test_overhead_and_pod_level_resources() -> None:
    d = demand_from_pod(pod([c({"cpu": "1", "memory": "1Gi"})], overhead={"cpu": "250m", "memory": "64Mi"}))
    assert (d.cpu_milli, d.memory_mib) == (1250, 1088)
    d = demand_from_pod(pod([c({"cpu": "1", "nvidia.com/gpu": 1})], resources={"requests": {"cpu": "3"}}))
    assert d.cpu_milli == 3000 and d.gpu_count == 1


def test_gpu_milli_share_and_whole() -> None:
    d = demand_from_pod(pod([c({GPU_MILLI_RESOURCE: "460"})]))
    assert (d.kind, d.gpu_count, d.gpu_milli) == (DemandKind.SHARE, 1, 460)
    d = demand_from_pod(pod([c({GPU_MILLI_RESOURCE: "2000"})]))
    assert (d.kind, d.gpu_count, d.gpu_milli) == (DemandKind.WHOLE, 2, 1000)
    with pytest.raises(PodSpecError, match="multiple of 1000"):
        demand_from_pod(pod([c({GPU_MILLI_RESOURCE: "1500"})]))
    with pytest.raises(PodSpecError, match="whole number"):
        demand_from_pod(pod([c({GPU_MILLI_RESOURCE: "10.5"})]))


def test_mig() -> None:
    d = demand_from_pod(pod([c({"nvidia.com/mig-3g.40gb": 1}, {"nvidia.com/mig-3g.40gb": 1})]))
    assert d.kind is DemandKind.MIG and d.mig_profile == "3g.40gb" and d.gpu_count == 0
    with pytest.raises(PodSpecError, match="one MIG instance"):
        demand_from_pod(pod([c({"nvidia.com/mig-3g.40gb": 2})]))
    with pytest.raises(PodSpecError, match="more than one kind"):
        demand_from_pod(pod([c({"nvidia.com/mig-3g.40gb": 1}), c({"nvidia.com/mig-1g.10gb": 1})]))
    with pytest.raises(PodSpecError, match="unknown MIG profile"):
        demand_from_pod(pod([c({"nvidia.com/mig-5g.50gb": 1})]))


def test_two_gpu_kinds_are_refused() -> None:
    with pytest.raises(PodSpecError, match=r"nvidia.com/gpu, gpu-extender.io/gpu-milli"):
        demand_from_pod(pod([c({"nvidia.com/gpu": 1, GPU_MILLI_RESOURCE: 500})]))


def test_zero_gpu_is_no_gpu() -> None:
    d = demand_from_pod(pod([c({"cpu": "1", "nvidia.com/gpu": "0"})]))
    assert d.kind is DemandKind.NONE


def test_annotations() -> None:
    annotations = {
        ANNOTATION_GPU_MEMORY: "20Gi",
        ANNOTATION_MODEL: " llama-3-8b ",
        ANNOTATION_LATENCY_CLASS: "Interactive",
        ANNOTATION_GPU_TYPES: "A100 | H100,,",
    }
    d = demand_from_pod(pod([c({GPU_MILLI_RESOURCE: 500})], annotations=annotations))
    assert d.gpu_memory_mib == 20480
    assert d.model_name == "llama-3-8b"
    assert d.latency_class is LatencyClass.INTERACTIVE
    assert d.allowed_models == frozenset({"A100", "H100"})


@pytest.mark.parametrize(
    ("annotations", "message"),
    [
        ({ANNOTATION_GPU_MEMORY: "lots"}, "gpu-memory"),
        ({ANNOTATION_GPU_MEMORY: "20000"}, "write a unit"),
        ({ANNOTATION_LATENCY_CLASS: "urgent"}, "latency-class"),
        ({ANNOTATION_GPU_TYPES: 7}, "must be a string"),
    ],
)
def test_bad_annotations(annotations: dict[str, Any], message: str) -> None:
    with pytest.raises(PodSpecError, match=message):
        demand_from_pod(pod([c({"nvidia.com/gpu": 1})], annotations=annotations))


def test_node_selector_and_affinity_restrict_models() -> None:
    d = demand_from_pod(pod([c({"nvidia.com/gpu": 1})], nodeSelector={GPU_PRODUCT_LABEL: "NVIDIA-A100-SXM4-80GB"}))
    assert d.allowed_models == frozenset({"NVIDIA-A100-SXM4-80GB"})
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": GPU_PRODUCT_LABEL, "operator": "In", "values": ["A", "B"]}]},
                    {
                        "matchExpressions": [
                            {"key": GPU_PRODUCT_LABEL, "operator": "In", "values": ["C"]},
                            {"key": "zone", "operator": "In", "values": ["z1"]},
                        ]
                    },
                ]
            }
        }
    }
    d = demand_from_pod(pod([c({"nvidia.com/gpu": 1})], affinity=affinity))
    assert d.allowed_models == frozenset({"A", "B", "C"})
    # One term without a product constraint lets every product through.
    terms = affinity["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
    terms.append({"matchExpressions": [{"key": "zone", "operator": "In", "values": ["z2"]}]})
    assert demand_from_pod(pod([c({"nvidia.com/gpu": 1})], affinity=affinity)).allowed_models == frozenset()


def test_annotation_narrows_selector_and_contradiction_is_refused() -> None:
    spec = {
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {
                            "matchExpressions": [
                                {
                                    "key": GPU_PRODUCT_LABEL,
                                    "operator": "In",
                                    "values": ["NVIDIA-A100-SXM4-80GB", "NVIDIA-H100-80GB-HBM3"],
                                }
                            ]
                        }
                    ]
                }
            }
        }
    }
    d = demand_from_pod(pod([c({"nvidia.com/gpu": 1})], annotations={ANNOTATION_GPU_TYPES: "H100"}, **spec))
    assert d.allowed_models == frozenset({"NVIDIA-H100-80GB-HBM3"})
    with pytest.raises(PodSpecError, match="excludes every GPU product"):
        demand_from_pod(pod([c({"nvidia.com/gpu": 1})], annotations={ANNOTATION_GPU_TYPES: "T4"}, **spec))


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        ("not a pod", "JSON object"),
        ({"metadata": {}}, "no spec"),
        ({"spec": {"containers": {"c": 1}}}, "must be a list"),
        ({"spec": {"containers": ["x"]}}, r"containers\[0\] must be an object"),
        ({"spec": {"containers": [{"resources": []}]}}, "resources must be an object"),
        ({"spec": {"containers": [c({"cpu": "lots"})]}}, r"spec.containers\[0\].resources.requests\[cpu\]"),
        ({"spec": {"containers": [c({"memory": "-1Gi"})]}}, "negative"),
        ({"spec": {"containers": [c({"nvidia.com/gpu": "0.5"})]}}, "whole number"),
        ({"metadata": {"annotations": ["x"]}, "spec": {"containers": []}}, "annotations"),
    ],
)
def test_malformed_pods(bad: Any, message: str) -> None:
    with pytest.raises(PodSpecError, match=message):
        demand_from_pod(bad)


def test_unrelated_resources_are_ignored() -> None:
    d = demand_from_pod(pod([c({"cpu": "1", "ephemeral-storage": "garbage?", "example.com/foo": "x"})]))
    assert d.cpu_milli == 1000


def test_managed_resources_and_key() -> None:
    names = managed_resources()
    assert names[:2] == ["nvidia.com/gpu", GPU_MILLI_RESOURCE]
    assert "nvidia.com/mig-3g.40gb" in names and "nvidia.com/mig-1g.5gb" in names
    assert len(names) == len(set(names))
    assert pod_key({"metadata": {"name": "a", "namespace": "b"}}) == "b/a"
    assert pod_key({"metadata": {"name": "a"}}) == "default/a"
    with pytest.raises(PodSpecError):
        pod_key({"metadata": {}})


def test_cached_demand_matches_and_is_shared() -> None:
    base = pod([c({"cpu": "1", "nvidia.com/gpu": 1})], annotations={ANNOTATION_MODEL: "m"})
    twin = pod([c({"cpu": "1", "nvidia.com/gpu": 1})], annotations={ANNOTATION_MODEL: "m", "unrelated": "x"})
    twin["metadata"]["name"] = "other"
    first = cached_demand(base)
    assert first == demand_from_pod(base)
    assert cached_demand(twin) is first  # replicas share one Demand
    different = [
        pod([c({"cpu": "2", "nvidia.com/gpu": 1})], annotations={ANNOTATION_MODEL: "m"}),
        pod([c({"cpu": "1", "nvidia.com/gpu": 1})], annotations={ANNOTATION_MODEL: "n"}),
        pod(
            [c({"cpu": "1", "nvidia.com/gpu": 1})],
            annotations={ANNOTATION_MODEL: "m"},
            nodeSelector={GPU_PRODUCT_LABEL: "X"},
        ),
        pod([c({"cpu": "1", "nvidia.com/gpu": 1}), c({"memory": "1Gi"})], annotations={ANNOTATION_MODEL: "m"}),
        pod([c({"cpu": "1", "nvidia.com/gpu": 1})], init=[c({"cpu": "3"})], annotations={ANNOTATION_MODEL: "m"}),
    ]
    for other in different:
        assert cached_demand(other) == demand_from_pod(other) != first
    with pytest.raises(PodSpecError):
        cached_demand(pod([c({"cpu": "1"}), "x"]))  # type: ignore[list-item]
    bad_annotations = pod([c({"cpu": "1", "nvidia.com/gpu": 1})])
    bad_annotations["metadata"]["annotations"] = ["x"]
    with pytest.raises(PodSpecError):
        cached_demand(bad_annotations)
