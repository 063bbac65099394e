"""The node-agent inventory and bind-time assignment annotations: schema, round trip, and distrust of bad data."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from policies.demand import Demand
from policies.inventory import Assignment, GpuDevice, MigInstance, MigPlacement, NodeInventory
from scheduler.annotations import (
    ASSIGNMENT,
    GPU_INDICES,
    GPU_MEMORY_FRACTION,
    GPU_UUIDS,
    assignment_annotations,
    assignment_from_annotations,
    bound_assignment,
    parse_node_inventory,
)

INVENTORY = {
    "v": 1,
    "gpus": [
        {
            "index": 0,
            "uuid": "GPU-aaa",
            "model": "NVIDIA-H100-80GB-HBM3",
            "memoryMiB": 81559,
            "mig": {
                "enabled": True,
                "instances": [
                    {"profile": "3g.40gb", "start": 4, "uuid": "MIG-111"},
                    {"profile": "1g.10gb", "start": 0, "uuid": "MIG-222"},
                ],
            },
        },
        {"index": 1, "uuid": "GPU-bbb", "model": "NVIDIA-H100-80GB-HBM3", "memoryMiB": 81559},
    ],
    "observedAt": "2026-11-28T02:04:18Z",
}

NODE = NodeInventory(
    "n1",
    64_000,
    262_144,
    (
        GpuDevice(0, "NVIDIA-H100-80GB-HBM3", 81559, "GPU-aaa", "H100-80GB", (MigInstance("3g.40gb", 4, "MIG-111"),)),
        GpuDevice(1, "NVIDIA-H100-80GB-HBM3", 81559, "GPU-bbb"),
        GpuDevice(2, "NVIDIA-H100-80GB-HBM3", 81559, "GPU-ccc"),
    ),
)


def test_inventory_schema_accepts_the_documented_example() -> None:
    doc = parse_node_inventory(json.dumps(INVENTORY))
    assert doc is not None
    assert [g.index for g in doc.gpus] == [0, 1]
    assert doc.gpus[0].mig is not None and doc.gpus[0].mig.instances[0].uuid == "MIG-111"
    assert doc.observed_at is not None and doc.observed_at.year == 2026


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(v=2),
        lambda d: d.update(extra=1),
        lambda d: d["gpus"][1].update(memoryMib=1),  # misspelt field
        lambda d: d["gpus"][1].update(index=0),  # duplicate index
        lambda d: d["gpus"][0]["mig"]["instances"].append({"profile": "3g.40gb", "start": 2}),  # not a placement
        lambda d: d["gpus"][0]["mig"]["instances"].append({"profile": "2g.20gb", "start": 4}),  # overlaps 3g@4
        lambda d: d["gpus"][1].update(model="Tesla-T4", mig={"enabled": True}),  # T4 has no MIG
        lambda d: d.pop("gpus"),
    ],
)
def test_inventory_schema_refuses_bad_documents(mutate: Callable[[dict[str, Any]], Any]) -> None:
    doc = json.loads(json.dumps(INVENTORY))
    mutate(doc)
    assert parse_node_inventory(json.dumps(doc)) is None


def test_inventory_absent_or_not_json() -> None:
    assert parse_node_inventory(None) is None
    assert parse_node_inventory("") is None
    assert parse_node_inventory("{not json") is None


def test_whole_gpu_round_trip() -> None:
    demand = Demand(cpu_milli=4000, memory_mib=8192, gpu_count=2, gpu_milli=1000)
    assignment = Assignment("n1", 4000, 8192, (1, 2), 1000, guarded=True)  # an exclusive GPU forbids borrowing
    out = assignment_annotations(assignment, NODE)
    assert json.loads(out[ASSIGNMENT]) == {"v": 1, "node": "n1", "gpus": [1, 2], "milli": 1000, "gpuMemoryMiB": 0}
    assert out[GPU_INDICES] == "1,2"
    assert out[GPU_UUIDS] == "GPU-bbb,GPU-ccc"
    assert GPU_MEMORY_FRACTION not in out
    assert assignment_from_annotations(out, "n1", demand) == assignment
    assert bound_assignment(out, "n1", demand) == (assignment, True)


def test_share_fraction_from_milli_or_memory() -> None:
    demand = Demand(cpu_milli=1000, memory_mib=1024, gpu_count=1, gpu_milli=335)
    assignment = Assignment("n1", 1000, 1024, (1,), 335)
    out = assignment_annotations(assignment, NODE)
    assert out[GPU_MEMORY_FRACTION] == "0.33"  # rounded down: never more than was given
    assert assignment_from_annotations(out, "n1", demand) == assignment
    with_memory = Assignment("n1", 1000, 1024, (1,), 335, gpu_memory_mib=20480)
    assert assignment_annotations(with_memory, NODE)[GPU_MEMORY_FRACTION] == "0.25"
    # Without the node's inventory the compute share is all there is to go on.
    assert assignment_annotations(with_memory)[GPU_MEMORY_FRACTION] == "0.33"
    assert GPU_UUIDS not in assignment_annotations(with_memory)


def test_mig_round_trip_names_the_instance() -> None:
    demand = Demand(cpu_milli=500, memory_mib=512, mig_profile="3g.40gb")
    assignment = Assignment("n1", 500, 512, mig=MigPlacement(0, "3g.40gb", 4))
    out = assignment_annotations(assignment, NODE)
    assert json.loads(out[ASSIGNMENT])["mig"] == {"gpu": 0, "profile": "3g.40gb", "start": 4}
    assert out[GPU_UUIDS] == "MIG-111" and out[GPU_INDICES] == "0"
    assert assignment_from_annotations(out, "n1", demand) == assignment
    # No instance there yet (it will be created): no UUID to announce.
    other = Assignment("n1", 500, 512, mig=MigPlacement(0, "3g.40gb", 0))
    assert GPU_UUIDS not in assignment_annotations(other, NODE)


@pytest.mark.parametrize(
    ("text", "node", "demand"),
    [
        ('{"v":1,"node":"n1","gpus":[0],"milli":1000}', "n2", Demand(gpu_count=1, gpu_milli=1000)),  # other node
        ('{"v":2,"node":"n1","gpus":[0],"milli":1000}', "n1", Demand(gpu_count=1, gpu_milli=1000)),  # version
        ('{"v":1,"node":"n1","gpus":[0],"milli":1000,"x":1}', "n1", Demand(gpu_count=1, gpu_milli=1000)),
        ('{"v":1,"node":"n1","gpus":[0],"milli":1000}', "n1", Demand(gpu_count=2, gpu_milli=1000)),  # count
        ('{"v":1,"node":"n1","gpus":[0,0],"milli":1000}', "n1", Demand(gpu_count=2, gpu_milli=1000)),  # dup
        ('{"v":1,"node":"n1","gpus":[0],"milli":500}', "n1", Demand(gpu_count=1, gpu_milli=250)),  # share size
        ('{"v":1,"node":"n1","mig":{"gpu":0,"profile":"1g.10gb","start":0}}', "n1", Demand(mig_profile="3g.40gb")),
        ('{"v":1,"node":"n1","gpus":[0],"milli":1000}', "n1", Demand(mig_profile="3g.40gb")),
        ('{"v":1,"node":"n1","gpus":[0],"milli":1000}', "n1", Demand(cpu_milli=1)),  # CPU-only pod
        ("not json", "n1", Demand(gpu_count=1, gpu_milli=1000)),
    ],
)
def test_untrusted_assignments(text: str, node: str, demand: Demand) -> None:
    assert assignment_from_annotations({ASSIGNMENT: text}, node, demand) is None


def test_bound_pod_without_our_record_counts_host_resources_only() -> None:
    gpu_pod = Demand(cpu_milli=2000, memory_mib=4096, gpu_count=1, gpu_milli=1000)
    assignment, known = bound_assignment({}, "n1", gpu_pod)
    assert assignment == Assignment("n1", 2000, 4096) and known is False
    assignment, known = bound_assignment(None, "n1", Demand(cpu_milli=100))
    assert assignment == Assignment("n1", 100, 0) and known is True  # nothing unknown about a CPU-only pod
