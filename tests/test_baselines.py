"""The published baselines on tiny fleets whose answers can be worked out by hand."""

import numpy as np
import pytest

from policies.baselines import (
    OTHER_POLICY_NAMES,
    POLICY_NAMES,
    BestFitPolicy,
    DotProductPolicy,
    FgdPolicy,
    FirstFitPolicy,
    GpuClusteringPolicy,
    GpuPackingPolicy,
    RandomPolicy,
    fgd_score,
    make_policy,
)
from policies.demand import Demand
from policies.feasibility import Reason
from policies.fragmentation import typical_shapes
from policies.inventory import Assignment
from policies.state import ClusterState
from tests.helpers import mig_node, node

SHARE_500 = Demand(cpu_milli=1_000, memory_mib=1_024, gpu_count=1, gpu_milli=500)
WHOLE_1 = Demand(cpu_milli=1_000, memory_mib=1_024, gpu_count=1, gpu_milli=1_000)
CPU_ONLY = Demand(cpu_milli=4_000, memory_mib=1_024)


def cluster(*nodes, held=()):
    state = ClusterState(nodes)
    for i, assignment in enumerate(held):
        state.apply(f"held-{i}", assignment)
    return state, state.view()


def rows(view):
    return np.arange(view.size)


def test_fgd_score_is_a_truncated_sigmoid_of_the_fragmentation_change():
    # No change: 100 × sigmoid(0) = 50. One more GPU fragmented: 100 / (1 + e) = 26.9 -> 26. One less: 73.1 -> 73.
    assert fgd_score(np.array([0.0, 1_000.0, -1_000.0])).tolist() == [50, 26, 73]


def test_fgd_fills_the_half_used_gpu_that_whole_gpu_pods_could_not_use():
    # Typical pods want whole GPUs. On "a" the half-free GPU is fragment (500) and filling it removes it:
    # delta -500 -> score 62. On "b" a fresh GPU would be left half-used: delta +500 -> score 37.
    _state, view = cluster(
        node("a", gpus=1),
        node("b", gpus=1),
        held=[Assignment("a", 1_000, 1_024, gpus=(0,), milli=500)],
    )
    policy = FgdPolicy(shapes=typical_shapes([WHOLE_1]))
    evaluation = policy.evaluate(view, SHARE_500, rows(view))
    assert evaluation.scores.tolist() == [62, 37]
    assert view.names[evaluation.rows[policy.choose(evaluation, np.random.default_rng(0))]] == "a"


def test_fgd_ties_go_to_the_first_node_in_the_run_order():
    _state, view = cluster(node("z", gpus=2), node("a", gpus=2))
    policy = FgdPolicy(shapes=typical_shapes([WHOLE_1]))
    evaluation = policy.evaluate(view, WHOLE_1, rows(view))
    assert evaluation.scores[0] == evaluation.scores[1]
    assert policy.choose(evaluation, np.random.default_rng(0)) == 0


def test_fgd_puts_a_share_on_the_gpu_with_the_best_integer_score_lowest_index_first():
    # GPU 0 has 600 free, GPU 1 has 500 free: a 500 share leaves 100 on GPU 0 (fragment for a 500 shape) or
    # exactly fills GPU 1 (no fragment): GPU 1 wins.
    _state, view = cluster(
        node("n", gpus=3),
        held=[
            Assignment("n", 0, 0, gpus=(0,), milli=400),
            Assignment("n", 0, 0, gpus=(1,), milli=500),
        ],
    )
    policy = FgdPolicy(shapes=typical_shapes([SHARE_500]))
    evaluation = policy.evaluate(view, SHARE_500, rows(view))
    assert evaluation.choice[0] == 1
    assignment = policy.assign(view, SHARE_500, evaluation, 0, np.random.default_rng(0))
    assert assignment.gpus == (1,) and assignment.milli == 500


def test_best_fit_prefers_the_node_left_tightest():
    # Largest node: 32 cores, 2 GPUs. After a whole-GPU pod with 1 core:
    # a (2 GPUs free, 32 cores): 1 - (0.5*31/32 + 0.5*1/2) = 0.266 -> 26
    # b (1 GPU free, 8 cores):   1 - (0.5*7/32 + 0.5*0/2)  = 0.890 -> 89
    _state, view = cluster(node("a", gpus=2, cpu=32_000), node("b", gpus=1, cpu=8_000))
    evaluation = BestFitPolicy().evaluate(view, WHOLE_1, rows(view))
    assert evaluation.scores.tolist() == [26, 89]
    assert BestFitPolicy().choose(evaluation, np.random.default_rng(0)) == 1


def test_best_fit_puts_a_share_on_the_tightest_gpu():
    _state, view = cluster(
        node("n", gpus=3),
        held=[Assignment("n", 0, 0, gpus=(0,), milli=100), Assignment("n", 0, 0, gpus=(2,), milli=400)],
    )
    evaluation = BestFitPolicy().evaluate(view, SHARE_500, rows(view))
    assert evaluation.choice[0] == 2  # 600 free is the least room that still fits 500


def test_dot_product_prefers_the_smallest_alignment():
    # Largest node: 32 cores, 2 GPUs (2000). Pod (1 core, 1000 milli) normalised: (1/32, 1/2).
    # a free (32 cores, 2000): dot = 1/32 + 1/2 = 0.53125 -> 100 × (1 - 0.265625) = 73.4 -> 73
    # b free (8 cores, 1000):  dot = 8/32/32 + 0.25 = 0.2578 -> 100 × (1 - 0.1289) = 87.1 -> 87
    _state, view = cluster(node("a", gpus=2, cpu=32_000), node("b", gpus=1, cpu=8_000))
    evaluation = DotProductPolicy().evaluate(view, WHOLE_1, rows(view))
    assert evaluation.scores.tolist() == [73, 87]


def test_gpu_packing_bands():
    _state, view = cluster(
        node("idle", gpus=2),
        node("used-gpu", gpus=2),
        node("used-node", gpus=2),
        held=[
            Assignment("used-gpu", 0, 0, gpus=(0,), milli=500),
            Assignment("used-node", 0, 0, gpus=(0,), milli=1_000),
        ],
    )
    evaluation = GpuPackingPolicy().evaluate(view, SHARE_500, rows(view))
    # idle node: 33 - 2 free GPUs = 31; a partly used GPU with 500 left: 100 - (50 / 10) = 95;
    # a used node whose only room is a fully free GPU: 50 - 1 = 49.
    assert evaluation.scores.tolist() == [31, 95, 49]
    cpu = GpuPackingPolicy().evaluate(view, CPU_ONLY, rows(view))
    assert cpu.scores.tolist() == [0, 0, 0]


def test_gpu_clustering_keeps_the_same_request_class_together():
    state, view = cluster(node("idle", gpus=2), node("shares", gpus=2), node("wholes", gpus=2), node("mixed", gpus=4))
    policy = GpuClusteringPolicy()
    placed = [
        (1, SHARE_500, Assignment("shares", 1_000, 1_024, gpus=(0,), milli=500)),
        (2, WHOLE_1, Assignment("wholes", 1_000, 1_024, gpus=(0,), milli=1_000)),
        (3, SHARE_500, Assignment("mixed", 1_000, 1_024, gpus=(0,), milli=500)),
        (3, WHOLE_1, Assignment("mixed", 1_000, 1_024, gpus=(1,), milli=1_000)),
    ]
    for i, (row, demand, assignment) in enumerate(placed):
        state.apply(f"p{i}", assignment)
        policy.observe(view, row, demand, assignment)
    evaluation = policy.evaluate(view, SHARE_500, rows(view))
    # Largest node: 4 GPUs. Fullness = 25 × (4000 - GPU milli free on the node) / 4000, integer:
    # idle 25×2000/4000 = 12, shares 25×2500/4000 = 15, wholes 25×3000/4000 = 18, mixed 25×1500/4000 = 9.
    # Bands: idle 25, only the pod's class 75, only another class 0, several classes including the pod's 50.
    assert evaluation.scores.tolist() == [37, 90, 18, 59]


def test_random_picks_only_feasible_nodes_and_a_random_gpu_with_room():
    _state, view = cluster(
        node("full", gpus=1),
        node("a", gpus=4),
        held=[Assignment("full", 0, 0, gpus=(0,), milli=1_000)],
    )
    policy = RandomPolicy()
    evaluation = policy.evaluate(view, SHARE_500, rows(view))
    assert evaluation.reasons[0] == Reason.NO_GPU_SHARE
    rng = np.random.default_rng(7)
    gpus = set()
    for _ in range(40):
        index = policy.choose(evaluation, rng)
        assert index == 1
        gpus.add(policy.assign(view, SHARE_500, evaluation, index, rng).gpus[0])
    assert gpus == {0, 1, 2, 3}


def test_whole_gpu_pods_take_the_lowest_index_free_gpus():
    _state, view = cluster(node("n", gpus=4), held=[Assignment("n", 0, 0, gpus=(1,), milli=200)])
    two = Demand(cpu_milli=1_000, memory_mib=1_024, gpu_count=2, gpu_milli=1_000)
    for policy in (FgdPolicy(shapes=typical_shapes([WHOLE_1])), BestFitPolicy(), GpuPackingPolicy()):
        evaluation = policy.evaluate(view, two, rows(view))
        assert policy.assign(view, two, evaluation, 0, np.random.default_rng(0)).gpus == (0, 2)


@pytest.mark.parametrize("name", [*POLICY_NAMES, *OTHER_POLICY_NAMES])
def test_every_policy_respects_cpu_memory_and_gpu_model(name):
    _state, view = cluster(
        node("small-cpu", gpus=2, cpu=2_000),
        node("small-mem", gpus=2, mem=512),
        node("p100", gpus=2, model="P100"),
        node("t4", gpus=2, model="T4"),
    )
    demand = Demand(cpu_milli=4_000, memory_mib=1_024, gpu_count=1, gpu_milli=500, allowed_models=frozenset({"T4"}))
    policy = make_policy(name, typical_shapes([demand]))
    evaluation = policy.evaluate(view, demand, rows(view))
    assert evaluation.reasons.tolist() == [Reason.CPU, Reason.MEMORY, Reason.GPU_MODEL, Reason.FITS]
    assert policy.choose(evaluation, np.random.default_rng(0)) == 3


def test_first_fit_takes_the_lowest_free_mig_slot_on_the_first_gpu():
    _state, view = cluster(mig_node("m", gpus=2))
    demand = Demand(cpu_milli=1_000, memory_mib=1_024, mig_profile="3g.40gb")
    policy = FirstFitPolicy()
    evaluation = policy.evaluate(view, demand, rows(view))
    assignment = policy.assign(view, demand, evaluation, 0, np.random.default_rng(0))
    assert (assignment.mig.gpu, assignment.mig.start) == (0, 0)


def test_fragmentation_steps_take_fgd_integer_steps_in_gpus():
    from policies.scoring import Candidates, fragmentation_score, fragmentation_steps_score

    _, view = cluster(
        node("a", gpus=1),
        node("b", gpus=1),
        held=[Assignment("a", 1_000, 1_024, gpus=(0,), milli=500)],
    )
    c = Candidates(view, rows(view), SHARE_500, typical_shapes([WHOLE_1]))
    # Exact: -(-0.5) and -(+0.5) GPUs. Quantized: (62 - 50) / 25 = 0.48 and (37 - 50) / 25 = -0.52.
    assert fragmentation_score(c)[:, 0].tolist() == [0.5, -0.5]
    assert fragmentation_steps_score(c)[:, 0].tolist() == pytest.approx([0.48, -0.52])


def test_default_policy_breaks_fragmentation_ties_by_node_order_not_by_a_node_in_use():
    # Whole-GPU typical pods; a whole-GPU pod changes fragmentation by the same amount on every node, and packing
    # prefers GPUs in use, not nodes: the first node wins although the others are in use.
    _, view = cluster(
        node("idle", gpus=2),
        node("used", gpus=2),
        node("used-too", gpus=2),
        held=[
            Assignment("used", 1_000, 1_024, gpus=(0,), milli=1_000),
            Assignment("used-too", 1_000, 1_024, gpus=(0,), milli=1_000),
        ],
    )
    policy = make_policy("default", typical_shapes([WHOLE_1]))
    evaluation = policy.evaluate(view, WHOLE_1, rows(view))
    assert policy.choose(evaluation, np.random.default_rng(0)) == 0


def test_default_policy_sends_a_share_to_a_gpu_in_use_before_an_idle_gpu_anywhere():
    # Two 250-milli shares fill a GPU's 500 free milli exactly or leave an idle GPU at 750: with 250-milli typical
    # pods fragmentation is the same for all, and packing picks the GPU in use ("used", GPU 0). Between the
    # idle GPUs of a node in use and of an idle node, node order decides.
    share_250 = Demand(cpu_milli=1_000, memory_mib=1_024, gpu_count=1, gpu_milli=250)
    policy = make_policy("default", typical_shapes([share_250]))
    _, view = cluster(
        node("idle", gpus=2),
        node("used", gpus=2),
        held=[Assignment("used", 1_000, 1_024, gpus=(0,), milli=500)],
    )
    evaluation = policy.evaluate(view, share_250, rows(view))
    best = policy.choose(evaluation, np.random.default_rng(0))
    assert best == 1 and int(evaluation.choice[best]) == 0
    _, view = cluster(
        node("idle", gpus=2),
        node("used", gpus=2),
        held=[Assignment("used", 1_000, 1_024, gpus=(0,), milli=1_000)],
    )
    evaluation = policy.evaluate(view, share_250, rows(view))
    assert policy.choose(evaluation, np.random.default_rng(0)) == 0
