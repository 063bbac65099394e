"""Reading the openb trace files and building one seeded arrival sequence from them.

The node list (`sn,cpu_milli,memory_mib,gpu,model`) becomes `NodeInventory` records; the pod list
(`name,cpu_milli,memory_mib,num_gpu,gpu_milli[,gpu_spec,...]`) becomes `Demand`s, `gpu_spec` being the GPU models
a pod accepts (`|`-separated).

The arrival sequence follows the FGD paper's protocol: shuffle the pod list with the seed, then append copies of
pods drawn at random (with replacement) until the next draw would take the total GPU request past the target share
of the cluster's GPU capacity (130 %). A list that already asks for more than the target loses pods drawn at random
until it fits. Pods only arrive; nothing departs.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from policies.demand import Demand
from policies.inventory import MILLI_PER_GPU, GpuDevice, NodeInventory


@dataclass(frozen=True)
class PodList:
    """A pod list as read: names and demands in file order."""

    name: str
    pod_names: tuple[str, ...]
    demands: tuple[Demand, ...]

    @property
    def gpu_milli_total(self) -> int:
        return sum(d.gpu_milli_total for d in self.demands)


def read_nodes(path: str | Path, gpu_memory_mib: int = 0) -> list[NodeInventory]:
    """Nodes of an openb node list. Nodes without GPUs are kept (they can run CPU-only pods)."""
    nodes = []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            count = int(row.get("gpu") or 0)
            model = (row.get("model") or "").strip()
            gpus = tuple(GpuDevice(i, model, gpu_memory_mib) for i in range(count))
            nodes.append(NodeInventory(row["sn"], int(row["cpu_milli"]), int(row["memory_mib"]), gpus))
    return nodes


def demand_from_row(row: dict[str, str]) -> Demand:
    count = int(row.get("num_gpu") or 0)
    milli = int(row.get("gpu_milli") or 0) if count else 0
    spec = (row.get("gpu_spec") or "").strip()
    models = frozenset(m for m in spec.split("|") if m) if spec else frozenset()
    return Demand(
        cpu_milli=int(row["cpu_milli"]),
        memory_mib=int(row.get("memory_mib") or 0),
        gpu_count=count,
        gpu_milli=milli,
        allowed_models=models,
    )


def read_pods(path: str | Path) -> PodList:
    names, demands = [], []
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            names.append(row["name"])
            demands.append(demand_from_row(row))
    return PodList(Path(path).stem, tuple(names), tuple(demands))


def gpu_capacity_milli(nodes: list[NodeInventory]) -> int:
    return sum(len(n.gpus) for n in nodes) * MILLI_PER_GPU


def arrival_sequence(pods: PodList, capacity_milli: int, inflation: float, rng: np.random.Generator) -> np.ndarray:
    """Indices into `pods.demands`, in arrival order, for one seed.

    Shuffle the list, then append copies drawn with replacement until the next draw would pass
    `inflation` × capacity (or drop random pods while the list asks for more than that).
    """
    n = len(pods.demands)
    request = np.array([d.gpu_milli_total for d in pods.demands], dtype=np.int64)
    order = list(rng.permutation(n))
    target = inflation * capacity_milli
    total = int(request.sum())
    if total > target:
        while total > target and order:
            removed = order.pop(int(rng.integers(len(order))))
            total -= int(request[removed])
    else:
        while True:
            pick = int(rng.integers(n))
            if total + request[pick] > target:
                break
            order.append(pick)
            total += int(request[pick])
    return np.asarray(order, dtype=np.int64)


def node_order(nodes: list[NodeInventory], rng: np.random.Generator) -> list[NodeInventory]:
    """The nodes in a seeded random order that stays fixed for the whole run (the published simulator prefixes
    node names with a random permutation, so that its name order breaks score ties)."""
    ranked = sorted(nodes, key=lambda n: n.name)
    return [ranked[i] for i in np.argsort(rng.permutation(len(ranked)), kind="stable")]
