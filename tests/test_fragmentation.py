"""FGD's fragmentation measure on nodes small enough to work out by hand."""

import numpy as np
import pytest

from policies.demand import Demand
from policies.fragmentation import (
    cpu_stranding,
    cpu_stranding_delta,
    fragmentation_delta,
    node_fragmentation,
    typical_shapes,
)
from policies.inventory import Assignment
from policies.state import ClusterState
from tests.helpers import node

SHARE = Demand(cpu_milli=1000, gpu_count=1, gpu_milli=500)
WHOLE = Demand(cpu_milli=1000, gpu_count=1, gpu_milli=1000)
CPU_ONLY = Demand(cpu_milli=1000)


@pytest.fixture
def shapes():
    # weights 0.5 / 0.25 / 0.25
    return typical_shapes([SHARE, SHARE, WHOLE, CPU_ONLY], coverage=1.0)


def test_typical_shapes_keep_the_most_common_until_coverage():
    pods = [SHARE] * 6 + [WHOLE] * 3 + [CPU_ONLY]
    shapes = typical_shapes(pods, coverage=0.9)
    assert list(shapes.gpu_milli) == [500, 1000]
    np.testing.assert_allclose(shapes.weight, [6 / 9, 3 / 9])


def test_memory_is_part_of_the_shape_unless_asked_as_fgd_defines_it():
    pods = [Demand(cpu_milli=1000, memory_mib=m, gpu_count=1, gpu_milli=500) for m in (1, 2, 2, 3)]
    assert typical_shapes(pods, coverage=1.0).memory_mib.tolist() == [2, 1, 3]
    fgd = typical_shapes(pods, coverage=0.5, memory=False)
    assert fgd.size == 1 and fgd.memory_mib.tolist() == [0] and fgd.gpu_milli.tolist() == [500]


def test_a_node_out_of_memory_strands_its_gpus():
    shapes = typical_shapes([Demand(cpu_milli=1000, memory_mib=8192, gpu_count=1, gpu_milli=1000)])
    state = ClusterState([node("roomy", gpus=2), node("tight", gpus=2, mem=4096)])
    np.testing.assert_allclose(node_fragmentation(state.view(), np.arange(2), shapes), [0.0, 2000.0])
    # A CPU-only pod that would take the memory a GPU pod needs strands both GPUs of the node it lands on.
    hungry = Demand(cpu_milli=1000, memory_mib=131_072 - 4096)
    np.testing.assert_allclose(fragmentation_delta(state.view(), np.arange(2), hungry, shapes), [[2000.0], [0.0]])


def test_fragmentation_by_hand(shapes):
    # Node a: GPU0 idle, GPU1 has 400 milli left. Node b: both idle but too little CPU for any GPU shape.
    state = ClusterState([node("a", gpus=2), node("b", gpus=2, cpu=500)])
    state.apply("p", Assignment("a", gpus=(1,), milli=600))
    snap = state.view()
    frag = node_fragmentation(snap, np.arange(2), shapes)
    # a: share fits (GPU0) -> 400 stranded; whole fits (GPU0) -> 400; CPU-only -> all 1400 idle.
    #    0.5*400 + 0.25*400 + 0.25*1400 = 650.  b: nothing GPU fits (CPU) -> 2000 for every shape.
    np.testing.assert_allclose(frag, [650.0, 2000.0])


def test_share_placement_prefers_the_gpu_that_strands_least(shapes):
    state = ClusterState([node("a", gpus=2)])
    state.apply("p", Assignment("a", gpus=(1,), milli=600))
    pod = Demand(cpu_milli=0, gpu_count=1, gpu_milli=300)
    delta = fragmentation_delta(state.view(), np.arange(1), pod, shapes)
    # On GPU1 (400 -> 100): 0.5*100 + 0.25*100 + 0.25*1100 = 350, delta -300.
    # On GPU0 (1000 -> 700): share still fits (stranded 400), whole no longer fits (1100 idle), CPU-only 1100:
    #    0.5*400 + 0.25*1100 + 0.25*1100 = 750, delta +100.
    np.testing.assert_allclose(delta[0, :2], [100.0, -300.0])
    assert np.isinf(delta[0, 2:]).all()  # GPUs the node does not have


def test_whole_gpu_placement(shapes):
    state = ClusterState([node("a", gpus=2)])
    delta = fragmentation_delta(state.view(), np.arange(1), WHOLE, shapes)
    # Before: everything fits, nothing stranded but CPU-only sees 2000 -> 500.
    # After one whole GPU: 1000 idle on a full GPU; all shapes fit; CPU-only 1000 -> 250. Delta -250.
    np.testing.assert_allclose(delta, [[-250.0]])


def test_gpu_model_constraint_strands_capacity():
    shapes = typical_shapes([Demand(gpu_count=1, gpu_milli=1000, allowed_models=frozenset({"V100"}))])
    state = ClusterState([node("t4", gpus=1, model="T4"), node("v100", gpus=1, model="V100M16")])
    np.testing.assert_allclose(node_fragmentation(state.view(), np.arange(2), shapes), [1000.0, 0.0])


def test_identical_nodes_are_evaluated_once_with_the_same_result():
    from policies.fragmentation import DEDUPLICATE_FROM, _delta

    nodes = [node(f"n{i}", gpus=2, cpu=1000 * (i % 7), mem=1024 * (i % 5)) for i in range(DEDUPLICATE_FROM + 40)]
    state = ClusterState(nodes)
    for i in range(0, len(nodes), 3):
        state.apply(f"p{i}", Assignment(f"n{i}", gpus=(i % 2,), milli=100 * (i % 10)))
    rows = np.arange(len(nodes))
    shapes = typical_shapes([SHARE, WHOLE, Demand(cpu_milli=1000, memory_mib=2048, gpu_count=1, gpu_milli=1000)])
    for pod in (Demand(cpu_milli=500, memory_mib=1024, gpu_count=1, gpu_milli=300), WHOLE, CPU_ONLY):
        expected = _delta(state.view(), rows, pod, shapes)
        np.testing.assert_array_equal(fragmentation_delta(state.view(), rows, pod, shapes), expected)


def test_cpu_stranding_counts_the_gpus_free_cpu_cannot_feed():
    shapes = typical_shapes([Demand(cpu_milli=8000, gpu_count=1, gpu_milli=1000), Demand(cpu_milli=4000)])
    assert shapes.cpu_per_gpu_milli == 8.0  # CPU-only shapes ask no GPU: not part of the ratio
    state = ClusterState([node("a", gpus=4, cpu=32_000), node("b", gpus=4, cpu=4_000)])
    snap, rows = state.view(), np.arange(2)
    assert cpu_stranding(snap, rows, shapes).tolist() == [0.0, 3500.0]  # b's 4 cores feed half a GPU
    greedy = Demand(cpu_milli=20_000, gpu_count=1, gpu_milli=1000)  # 12 cores left for 3 GPUs: 1.5 GPUs unfed
    frugal = Demand(cpu_milli=2_000, gpu_count=1, gpu_milli=1000)
    cpu_only = Demand(cpu_milli=16_000)
    assert cpu_stranding_delta(snap, rows[:1], greedy, shapes).tolist() == [1500.0]
    assert cpu_stranding_delta(snap, rows[:1], frugal, shapes).tolist() == [0.0]
    assert cpu_stranding_delta(snap, rows[:1], cpu_only, shapes).tolist() == [2000.0]
    # On b a GPU pod asking less CPU per GPU than the ratio takes a GPU the CPU could not feed anyway.
    assert cpu_stranding_delta(snap, rows[1:], frugal, shapes).tolist() == [(3000 - 2000 / 8) - 3500.0]
    assert cpu_stranding(snap, rows, typical_shapes([Demand(cpu_milli=4000)])).tolist() == [0.0, 0.0]
