"""Small fleets for tests."""

from __future__ import annotations

from policies.inventory import GpuDevice, NodeInventory


def node(
    name: str, gpus: int = 0, model: str = "T4", cpu: int = 32_000, mem: int = 131_072, **kw: object
) -> NodeInventory:
    devices = tuple(GpuDevice(i, model, 16_384) for i in range(gpus))
    return NodeInventory(name, cpu, mem, devices)


def mig_node(name: str, gpus: int = 1, table: str = "H100-80GB") -> NodeInventory:
    devices = tuple(GpuDevice(i, "NVIDIA-H100-80GB-HBM3", 81_920, mig_table=table) for i in range(gpus))
    return NodeInventory(name, 64_000, 262_144, devices)
