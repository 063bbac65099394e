"""Node inventories from Node JSON, from the openb trace, or from a fleet file.

GPUs come from the node agent's inventory annotation when it is present and valid: it alone knows UUIDs and MIG
instances with their start slots. Without it the inventory falls back to the device plugin's allocatable counts
and the labels of GPU Feature Discovery. A mixed-strategy MIG node then tells only how many instances of each
profile exist, not where: its MIG GPUs are modelled with their table (so MIG pods can be matched to the node)
and with instances packed into a canonical layout (largest profile first, lowest allowed start). The counts are
exact; the slots are a stand-in, and the built-in scheduler's count check on `nvidia.com/mig-*` stays the
authority on whether a free instance exists.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

from policies.inventory import GpuDevice, MigInstance, NodeInventory
from policies.mig import MIG_TABLES, MigProfile, free_starts, mig_table_for
from scheduler.annotations import GPU_INVENTORY, NodeInventoryDoc, parse_node_inventory
from scheduler.podspec import GPU_MILLI_RESOURCE, GPU_PRODUCT_LABEL, GPU_RESOURCE, MIG_RESOURCE_PREFIX
from scheduler.quantity import to_count, to_mib, to_milli

__all__ = [
    "GPU_COUNT_LABEL",
    "GPU_MEMORY_LABEL",
    "MIG_STRATEGY_LABEL",
    "inventory_from_node",
    "inventory_from_openb_row",
    "load_fleet",
    "node_schedulable",
]

GPU_MEMORY_LABEL = "nvidia.com/gpu.memory"
GPU_COUNT_LABEL = "nvidia.com/gpu.count"
MIG_STRATEGY_LABEL = "nvidia.com/mig.strategy"
UNKNOWN_MODEL = "unknown"


def node_schedulable(node: Mapping[str, Any]) -> bool:
    """Not cordoned, and not reported unready. A node without a Ready condition (no kubelet yet) counts as ready,
    as it does for kube-scheduler, which looks at taints rather than conditions."""
    if (node.get("spec") or {}).get("unschedulable"):
        return False
    for condition in (node.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Ready":
            return condition.get("status") == "True"
    return True


def _resources(status: Mapping[str, Any]) -> Mapping[str, Any]:
    """Allocatable, or capacity for hand-written fleet nodes that give only that."""
    return status.get("allocatable") or status.get("capacity") or {}


def _count(resources: Mapping[str, Any], name: str) -> int:
    value = resources.get(name)
    if value is None:
        return 0
    try:
        return to_count(value)
    except ValueError:
        return 0


def _label_int(labels: Mapping[str, str], name: str) -> int:
    try:
        return int(labels.get(name, "0"))
    except ValueError:
        return 0


def _from_annotation(doc: NodeInventoryDoc) -> tuple[GpuDevice, ...]:
    gpus = []
    for g in sorted(doc.gpus, key=lambda g: g.index):
        mig_enabled = g.mig is not None and g.mig.enabled
        instances = tuple(MigInstance(i.profile, i.start, i.uuid) for i in g.mig.instances) if g.mig else ()
        gpus.append(
            GpuDevice(
                index=g.index,
                model=g.model,
                memory_mib=g.memory_mib,
                uuid=g.uuid,
                mig_table=mig_table_for(g.model, g.memory_mib) if mig_enabled else None,
                mig_instances=instances if mig_enabled else (),
            )
        )
    return tuple(gpus)


def _pack_instances(table_name: str, counts: Mapping[str, int], gpus: int) -> list[list[MigInstance]]:
    """A canonical layout for instance counts with unknown slots: largest profile first, lowest free start.

    Opens another GPU when none has room; profiles the table does not know are skipped.
    """
    table = MIG_TABLES[table_name]
    layout: list[list[MigInstance]] = [[] for _ in range(gpus)]
    occupied = [0] * gpus
    known: list[tuple[MigProfile, int]] = []
    for name, n in counts.items():
        profile = table.profile(name)
        if profile is not None:
            known.append((profile, n))
    for profile, n in sorted(known, key=lambda pn: -pn[0].memory_slices):
        for _ in range(n):
            for g in range(len(layout) + 1):
                if g == len(layout):
                    layout.append([])
                    occupied.append(0)
                starts = free_starts(profile, occupied[g])
                if starts:
                    occupied[g] |= profile.mask_at(starts[0])
                    layout[g].append(MigInstance(profile.name, starts[0]))
                    break
    return layout


def _from_labels(resources: Mapping[str, Any], labels: Mapping[str, str]) -> tuple[GpuDevice, ...]:
    model = labels.get(GPU_PRODUCT_LABEL) or UNKNOWN_MODEL
    memory = _label_int(labels, GPU_MEMORY_LABEL)
    # The node agent advertises shares (GPUs x 1000) next to the device plugin's count; either tells the GPUs.
    if GPU_RESOURCE in resources:
        whole = _count(resources, GPU_RESOURCE)
    else:
        whole = _count(resources, GPU_MILLI_RESOURCE) // 1000
    gpus = [GpuDevice(index=i, model=model, memory_mib=memory) for i in range(whole)]
    mig_counts = {
        name[len(MIG_RESOURCE_PREFIX) :]: _count(resources, name)
        for name in resources
        if name.startswith(MIG_RESOURCE_PREFIX)
    }
    mig_counts = {p: n for p, n in mig_counts.items() if n > 0}
    table = mig_table_for(model, memory)
    if mig_counts and table is not None:
        labelled = _label_int(labels, GPU_COUNT_LABEL) - whole
        layout = _pack_instances(table, mig_counts, max(labelled, 0))
        for instances in layout:
            gpus.append(
                GpuDevice(
                    index=len(gpus),
                    model=model,
                    memory_mib=memory,
                    mig_table=table,
                    mig_instances=tuple(sorted(instances, key=lambda i: i.start)),
                )
            )
    return tuple(gpus)


def inventory_from_node(node: Mapping[str, Any], include_unschedulable: bool = False) -> NodeInventory | None:
    """A node's inventory, or None when it is cordoned or not Ready (unless asked to include those) or malformed."""
    if not isinstance(node, dict):
        return None
    meta = node.get("metadata") or {}
    name = meta.get("name")
    if not name or (not include_unschedulable and not node_schedulable(node)):
        return None
    resources = _resources(node.get("status") or {})
    labels = meta.get("labels")
    labels = dict(labels) if isinstance(labels, dict) else {}
    annotations = meta.get("annotations")
    inventory_text = annotations.get(GPU_INVENTORY) if isinstance(annotations, dict) else None
    try:
        cpu = to_milli(resources.get("cpu", 0), round_up=False)
        memory = to_mib(resources.get("memory", 0), round_up=False)
    except ValueError:
        return None
    doc = parse_node_inventory(inventory_text)
    gpus = _from_annotation(doc) if doc is not None else _from_labels(resources, labels)
    cached = frozenset(doc.cached_models or ()) if doc is not None else frozenset()
    return NodeInventory(name=name, cpu_milli=cpu, memory_mib=memory, gpus=gpus, labels=labels, cached_models=cached)


def inventory_from_openb_row(row: Mapping[str, str]) -> NodeInventory:
    """One row of the openb node list (`sn,cpu_milli,memory_mib,gpu,model`)."""
    count = int(row.get("gpu") or 0)
    model = (row.get("model") or "").strip()
    gpus = tuple(GpuDevice(index=i, model=model) for i in range(count))
    labels = {GPU_PRODUCT_LABEL: model} if count else {}
    return NodeInventory(
        name=row["sn"], cpu_milli=int(row["cpu_milli"]), memory_mib=int(row["memory_mib"]), gpus=gpus, labels=labels
    )


def _node_objects(documents: Iterable[Any]) -> list[Mapping[str, Any]]:
    nodes: list[Mapping[str, Any]] = []
    for doc in documents:
        if doc is None:
            continue
        if isinstance(doc, list):
            nodes.extend(_node_objects(doc))
        elif isinstance(doc, Mapping) and isinstance(doc.get("items"), list):
            nodes.extend(_node_objects(doc["items"]))
        elif isinstance(doc, Mapping) and doc.get("kind", "Node") == "Node":
            nodes.append(doc)
        else:
            raise ValueError(f"expected Node objects, a list of them or a NodeList, got {str(doc)[:80]!r}")
    return nodes


def load_fleet(path: str | Path) -> list[NodeInventory]:
    """Nodes of a static fleet: an openb-style CSV, or YAML/JSON with Node objects (a list, a List or a NodeList)."""
    path = Path(path)
    with path.open(newline="") as fh:
        head = fh.readline()
        fh.seek(0)
        if path.suffix.lower() == ".csv" or head.strip().startswith("sn,"):
            return [inventory_from_openb_row(row) for row in csv.DictReader(fh)]
        try:
            objects = _node_objects(yaml.safe_load_all(fh))
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: not valid YAML: {exc}") from None
    fleet = []
    for obj in objects:
        inventory = inventory_from_node(obj, include_unschedulable=True)
        if inventory is None:
            raise ValueError(f"{path}: node {(obj.get('metadata') or {}).get('name')!r} has no usable inventory")
        fleet.append(inventory)
    return fleet
