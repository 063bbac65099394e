"""Node inventories from Node JSON (agent annotation, GFD labels, MIG fallback), openb rows and fleet files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from e2e.workload import shared_data
from scheduler.annotations import GPU_INVENTORY
from scheduler.nodes import inventory_from_node, inventory_from_openb_row, load_fleet, node_schedulable

OPENB = shared_data() / "openb" / "openb_node_list_gpu_node.csv"
WIRE_FLEET = Path(__file__).parent / "data" / "wire-fleet.yaml"


def node(
    name: str = "n1",
    allocatable: dict[str, str] | None = None,
    labels: dict[str, str] | None = None,
    annotations: dict[str, str] | None = None,
    ready: str | None = "True",
    unschedulable: bool = False,
) -> dict[str, Any]:
    status: dict[str, Any] = {"allocatable": {"cpu": "63900m", "memory": "515880Mi", **(allocatable or {})}}
    if ready is not None:
        status["conditions"] = [{"type": "MemoryPressure", "status": "False"}, {"type": "Ready", "status": ready}]
    return {
        "metadata": {"name": name, "labels": labels or {}, "annotations": annotations or {}},
        "spec": {"unschedulable": True} if unschedulable else {},
        "status": status,
    }


GFD_A100 = {
    "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB",
    "nvidia.com/gpu.memory": "40960",
    "nvidia.com/gpu.count": "4",
}


def test_gfd_labels_and_allocatable() -> None:
    inv = inventory_from_node(node(allocatable={"nvidia.com/gpu": "4"}, labels=GFD_A100))
    assert inv is not None
    assert (inv.name, inv.cpu_milli, inv.memory_mib) == ("n1", 63900, 515880)
    assert [g.index for g in inv.gpus] == [0, 1, 2, 3]
    assert {(g.model, g.memory_mib, g.mig_table) for g in inv.gpus} == {("NVIDIA-A100-SXM4-40GB", 40960, None)}
    assert inv.labels["nvidia.com/gpu.count"] == "4"


def test_allocatable_counts_not_labels() -> None:
    """The device plugin's allocatable is what pods can get (an unhealthy GPU is withdrawn from it)."""
    inv = inventory_from_node(node(allocatable={"nvidia.com/gpu": "3"}, labels=GFD_A100))
    assert inv is not None and len(inv.gpus) == 3


def test_share_capacity_alone_tells_the_gpus() -> None:
    inv = inventory_from_node(node(allocatable={"gpu-extender.io/gpu-milli": "2000"}, labels=GFD_A100))
    assert inv is not None and len(inv.gpus) == 2
    inv = inventory_from_node(node(allocatable={"nvidia.com/gpu": "1", "gpu-extender.io/gpu-milli": "2000"}))
    assert inv is not None and len(inv.gpus) == 1  # the device plugin's count wins


def test_node_without_gpus_or_labels() -> None:
    inv = inventory_from_node(node())
    assert inv is not None and inv.gpus == ()
    inv = inventory_from_node(node(allocatable={"nvidia.com/gpu": "2"}))
    assert inv is not None and {g.model for g in inv.gpus} == {"unknown"}


def test_capacities_round_down() -> None:
    inv = inventory_from_node(node(allocatable={"cpu": "1.5m", "memory": "1G"}))
    assert inv is not None and (inv.cpu_milli, inv.memory_mib) == (1, 953)


def test_agent_annotation_wins() -> None:
    doc = {
        "v": 1,
        "gpus": [
            {
                "index": 0,
                "uuid": "GPU-0",
                "model": "NVIDIA-H100-80GB-HBM3",
                "memoryMiB": 81559,
                "mig": {"enabled": True, "instances": [{"profile": "3g.40gb", "start": 4, "uuid": "MIG-a"}]},
            },
            {
                "index": 1,
                "uuid": "GPU-1",
                "model": "NVIDIA-H100-80GB-HBM3",
                "memoryMiB": 81559,
                "mig": {"enabled": False},
            },
        ],
    }
    inv = inventory_from_node(
        node(allocatable={"nvidia.com/gpu": "8"}, labels=GFD_A100, annotations={GPU_INVENTORY: json.dumps(doc)})
    )
    assert inv is not None and len(inv.gpus) == 2
    mig, plain = inv.gpus
    assert (mig.uuid, mig.mig_table, mig.memory_mib) == ("GPU-0", "H100-80GB", 81559)
    assert [(i.profile, i.start, i.uuid) for i in mig.mig_instances] == [("3g.40gb", 4, "MIG-a")]
    assert (plain.uuid, plain.mig_table, plain.mig_instances) == ("GPU-1", None, ())


def test_invalid_annotation_falls_back_to_labels() -> None:
    inv = inventory_from_node(
        node(allocatable={"nvidia.com/gpu": "4"}, labels=GFD_A100, annotations={GPU_INVENTORY: '{"v": 9, "gpus": []}'})
    )
    assert inv is not None and len(inv.gpus) == 4 and inv.gpus[0].uuid == ""


def test_mig_mixed_without_annotation_packs_instances() -> None:
    labels = {**GFD_A100, "nvidia.com/mig.strategy": "mixed"}
    allocatable = {"nvidia.com/gpu": "1", "nvidia.com/mig-3g.20gb": "2", "nvidia.com/mig-1g.5gb": "9"}
    inv = inventory_from_node(node(allocatable=allocatable, labels=labels))
    assert inv is not None
    whole = [g for g in inv.gpus if g.mig_table is None]
    migs = [g for g in inv.gpus if g.mig_table is not None]
    assert len(whole) == 1 and whole[0].index == 0
    # 2x 3g fill one GPU; 9x 1g need two more (7 + 2): three MIG GPUs, the labels' count of 4 agrees.
    assert [g.index for g in migs] == [1, 2, 3]
    assert {g.mig_table for g in migs} == {"A100-40GB"}
    counts: dict[str, int] = {}
    for g in migs:
        for inst in g.mig_instances:
            counts[inst.profile] = counts.get(inst.profile, 0) + 1
    assert counts == {"3g.20gb": 2, "1g.5gb": 9}
    assert [(i.profile, i.start) for i in migs[0].mig_instances] == [("3g.20gb", 0), ("3g.20gb", 4)]


def test_mig_gpus_without_instances_still_count() -> None:
    labels = {**GFD_A100, "nvidia.com/mig.strategy": "mixed"}
    inv = inventory_from_node(node(allocatable={"nvidia.com/gpu": "2", "nvidia.com/mig-7g.40gb": "1"}, labels=labels))
    assert inv is not None
    assert [g.mig_table is not None for g in inv.gpus] == [False, False, True, True]
    assert [len(g.mig_instances) for g in inv.gpus] == [0, 0, 1, 0]


def test_mig_single_strategy_is_whole_gpus_of_the_slice() -> None:
    labels = {
        "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-40GB-MIG-1g.5gb",
        "nvidia.com/gpu.memory": "4864",
        "nvidia.com/mig.strategy": "single",
    }
    inv = inventory_from_node(node(allocatable={"nvidia.com/gpu": "28"}, labels=labels))
    assert inv is not None and len(inv.gpus) == 28
    assert inv.gpus[0].memory_mib == 4864 and inv.gpus[0].mig_table is None


@pytest.mark.parametrize(
    ("kwargs", "schedulable"),
    [
        ({}, True),
        ({"ready": "False"}, False),
        ({"ready": "Unknown"}, False),
        ({"ready": None}, True),
        ({"unschedulable": True}, False),
    ],
)
def test_unschedulable_and_unready_nodes(kwargs: dict[str, Any], schedulable: bool) -> None:
    obj = node(allocatable={"nvidia.com/gpu": "1"}, **kwargs)
    assert node_schedulable(obj) is schedulable
    assert (inventory_from_node(obj) is not None) is schedulable
    assert inventory_from_node(obj, include_unschedulable=True) is not None


def test_malformed_nodes() -> None:
    assert inventory_from_node({"metadata": {}}) is None
    assert inventory_from_node("node") is None  # type: ignore[arg-type]
    assert inventory_from_node(node(allocatable={"cpu": "lots"})) is None
    inv = inventory_from_node(node(allocatable={"nvidia.com/gpu": "x"}))
    assert inv is not None and inv.gpus == ()


def test_openb_row_and_csv() -> None:
    inv = inventory_from_openb_row(
        {"sn": "a", "cpu_milli": "64000", "memory_mib": "262144", "gpu": "2", "model": "V100M16"}
    )
    assert (inv.name, inv.cpu_milli, inv.memory_mib, len(inv.gpus), inv.gpu_model) == ("a", 64000, 262144, 2, "V100M16")
    cpu_only = inventory_from_openb_row({"sn": "b", "cpu_milli": "1", "memory_mib": "1", "gpu": "0", "model": ""})
    assert cpu_only.gpus == ()
    fleet = load_fleet(OPENB)
    assert len(fleet) == 1213 and sum(len(n.gpus) for n in fleet) == 6212


def test_yaml_fleet(tmp_path: Path) -> None:
    fleet = load_fleet(WIRE_FLEET)
    assert [n.name for n in fleet][:2] == ["gpu-a", "gpu-b"]
    assert len(fleet[0].gpus) == 4 and fleet[0].gpus[0].model == "NVIDIA-A100-SXM4-80GB"
    # a bare list, several documents and a NodeList all work; capacity stands in for allocatable
    n1 = {
        "kind": "Node",
        "metadata": {"name": "x"},
        "status": {"capacity": {"cpu": "8", "memory": "16Gi", "nvidia.com/gpu": "1"}},
    }
    n2 = {**n1, "metadata": {"name": "y"}}
    (tmp_path / "list.yaml").write_text(json.dumps([n1, n2]))
    (tmp_path / "docs.yaml").write_text(json.dumps(n1) + "\n---\n" + json.dumps(n2))
    (tmp_path / "nodelist.json").write_text(json.dumps({"kind": "NodeList", "items": [n1, n2]}))
    for name in ("list.yaml", "docs.yaml", "nodelist.json"):
        loaded = load_fleet(tmp_path / name)
        assert [(n.name, n.cpu_milli, n.memory_mib, len(n.gpus)) for n in loaded] == [
            ("x", 8000, 16384, 1),
            ("y", 8000, 16384, 1),
        ]
    (tmp_path / "bad.yaml").write_text(json.dumps({"kind": "Pod", "metadata": {"name": "p"}}))
    with pytest.raises(ValueError, match="expected Node objects"):
        load_fleet(tmp_path / "bad.yaml")


def test_broken_fleet_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "fleet.yaml"
    path.write_text("garbage: [\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_fleet(path)
