"""The fleet as the co-location planner sees it: one priced `FleetGpu` per GPU of the scheduler's node inventory,
so a plan is made on the same nodes `gpu-extender serve --fleet` or a live cluster schedules on."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from policies.catalog import gpu_memory_mib, most_specific_match
from policies.colocation.types import FleetGpu
from policies.inventory import GpuDevice, NodeInventory
from policies.mig import mig_table_for

DEFAULT_PRICE_PER_HOUR = 1.0

__all__ = ["DEFAULT_PRICE_PER_HOUR", "fleet_gpu", "fleet_gpus", "parse_prices", "price_of"]


def parse_prices(text: str) -> dict[str, float]:
    """`H100=2.5,A100=1.6`: a part of a GPU model name and its price per hour. Raises `ValueError` naming the bad
    entry (a typo must not silently price a GPU at the default)."""
    prices: dict[str, float] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        name, sep, value = entry.partition("=")
        try:
            price = float(value)
        except ValueError:
            price = math.nan
        if not sep or not name.strip() or not math.isfinite(price) or price < 0:
            raise ValueError(f"price {entry!r}: expected GPU=dollars-per-hour, e.g. H100=2.5")
        prices[name.strip()] = price
    return prices


def price_of(gpu_model: str, prices: Mapping[str, float]) -> float:
    """The price of the most specific entry whose parts all name `gpu_model` ("L4" is not "L40S")."""
    name = most_specific_match(prices, gpu_model)
    return DEFAULT_PRICE_PER_HOUR if name is None else prices[name]


def fleet_gpu(node: str, device: GpuDevice, prices: Mapping[str, float], allow_mig: bool = False) -> FleetGpu:
    """One GPU for the planner. A GPU in MIG mode keeps its table and, when it has instances, their layout (the
    planner fills them; re-carving a GPU in use is not its call). `allow_mig` lets the planner carve a MIG-capable
    GPU that is not in MIG mode. A GPU whose memory the inventory does not know (the openb CSV) takes its
    datasheet memory, or 0 when unknown, so that no model is planned onto it."""
    memory = device.memory_mib or gpu_memory_mib(device.model) or 0
    table = device.mig_table
    layout = None
    if table is not None and device.mig_instances:
        layout = tuple(sorted(((i.profile, i.start) for i in device.mig_instances), key=lambda p: p[1]))
    elif table is None and allow_mig:
        table = mig_table_for(device.model, memory)
    return FleetGpu(
        node=node,
        index=device.index,
        model=device.model,
        memory_mib=memory,
        price_per_hour=price_of(device.model, prices),
        mig_table=table,
        mig_layout=layout,
    )


def fleet_gpus(
    nodes: Iterable[NodeInventory], prices: Mapping[str, float] | None = None, allow_mig: bool = False
) -> list[FleetGpu]:
    """Every GPU of every node, in node then GPU order."""
    prices = prices or {}
    return [fleet_gpu(node.name, device, prices, allow_mig) for node in nodes for device in node.gpus]
