"""The combined decision: scores, the 0..10 answer for kube-scheduler, and the concrete assignment."""

import numpy as np
import pytest

from policies.config import PlacementPolicy
from policies.demand import Demand
from policies.engine import assign, evaluate, extender_scores
from policies.fragmentation import typical_shapes
from policies.inventory import Assignment, MigPlacement
from policies.state import ClusterState
from tests.helpers import mig_node, node

POLICY = PlacementPolicy()
SHARE = Demand(cpu_milli=1000, gpu_count=1, gpu_milli=500)
WHOLE = Demand(cpu_milli=1000, gpu_count=1, gpu_milli=1000)
SHAPES = typical_shapes([SHARE, SHARE, WHOLE])


def test_share_goes_where_it_completes_a_gpu():
    state = ClusterState([node("idle", gpus=2), node("half", gpus=2)])
    state.apply("p", Assignment("half", gpus=(1,), milli=500))
    snap = state.view()
    ev = evaluate(snap, SHARE, np.arange(2), POLICY, SHAPES)
    best = ev.best()
    assert snap.names[ev.rows[best]] == "half"
    assert assign(snap, SHARE, ev, best) == Assignment("half", cpu_milli=1000, gpus=(1,), milli=500)


def test_extender_scores_have_a_unique_ten_and_zero_for_infeasible():
    state = ClusterState([node(f"n{i}", gpus=2) for i in range(4)] + [node("cpu")])
    snap = state.view()
    ev = evaluate(snap, WHOLE, np.arange(5), POLICY, SHAPES)
    scores = extender_scores(ev)
    assert list(scores).count(10) == 1
    assert scores[4] == 0 and scores.min() >= 0 and scores.max() == 10


def test_whole_gpus_take_lowest_free_indices():
    state = ClusterState([node("a", gpus=4)])
    state.apply("p", Assignment("a", gpus=(0,), milli=300))
    snap = state.view()
    pod = Demand(gpu_count=2, gpu_milli=1000)
    ev = evaluate(snap, pod, np.arange(1), POLICY, SHAPES)
    assert assign(snap, pod, ev, 0).gpus == (1, 2)


def test_mig_goes_to_the_slot_that_keeps_most_placeable():
    state = ClusterState([mig_node("m", gpus=2)])
    state.apply("p", Assignment("m", mig=MigPlacement(1, "4g.40gb", 0)))
    snap = state.view()
    pod = Demand(gpu_count=1, gpu_milli=1000, mig_profile="3g.40gb")
    ev = evaluate(snap, pod, np.arange(1), POLICY, SHAPES)
    # GPU1 already has a 4g at 0: the 3g completes it at slot 4 with no further loss of large profiles.
    assert assign(snap, pod, ev, 0).mig == MigPlacement(1, "3g.40gb", 4)


def test_unscored_evaluation_only_filters():
    state = ClusterState([node("a", gpus=1)])
    ev = evaluate(state.view(), WHOLE, np.arange(1), POLICY, SHAPES, score=False)
    assert ev.feasible.all() and np.isneginf(ev.scores).all()


def test_equal_placements_go_to_the_node_with_fewer_gpus():
    """A one-GPU pod changes neither node's fragmentation for one-GPU typical pods, and both are idle: the tie goes
    to the two-GPU node, keeping the eight-GPU one whole; without the small-node weight, to the first node."""
    from policies.scoring import Candidates, small_node_score

    state = ClusterState([node("eight", gpus=8), node("two", gpus=2), node("cpu")])
    snap = state.view()
    shapes = typical_shapes([WHOLE])
    width = snap.gpu_present.shape[1]
    values = small_node_score(Candidates(snap, np.arange(3), WHOLE, shapes))[:, 0]
    assert values.tolist() == [1 - 8 / width, 1 - 2 / width, 1.0]

    ev = evaluate(snap, WHOLE, np.arange(2), POLICY, shapes)
    assert snap.names[ev.rows[ev.best()]] == "two"
    no_tie_break = PlacementPolicy.model_validate({"weights": {"smallNodes": 0}})
    ev = evaluate(snap, WHOLE, np.arange(2), no_tie_break, shapes)
    assert snap.names[ev.rows[ev.best()]] == "eight"


def test_a_share_goes_to_the_gpu_it_fills_most_tightly_when_all_else_is_equal():
    """GPUs 1 and 2 are both partly used (packing's level 1); the 300-milli share leaves GPU 1 at 700 milli and
    GPU 2 at 900, so GPU 2 wins by the tight-fit bonus (without it, the tie goes to GPU 1), which stays far below
    one packing level."""
    from policies.scoring import TIGHT_FIT, Candidates, packing_score

    share = Demand(cpu_milli=1000, gpu_count=1, gpu_milli=300)
    state = ClusterState([node("n", gpus=3)])
    state.apply("a", Assignment("n", gpus=(1,), milli=400))
    state.apply("b", Assignment("n", gpus=(2,), milli=600))
    snap = state.view()
    values = packing_score(Candidates(snap, np.arange(1), share, typical_shapes([share])))[0, :3]
    fills = np.array([0.3, 0.4 + 0.3, 0.6 + 0.3])  # each GPU's allocation after the share
    np.testing.assert_allclose(values, [0, 1, 1] + TIGHT_FIT * fills)

    no_fragmentation = PlacementPolicy.model_validate({"weights": {"fragmentation": 0}})
    ev = evaluate(snap, share, np.arange(1), no_fragmentation, typical_shapes([share]))
    assert int(ev.choice[0]) == 2


def test_memory_headroom_scores_measured_free_memory_per_gpu_for_shares_and_per_node_otherwise():
    from policies.scoring import Candidates, memory_headroom_score

    state = ClusterState([node("a", gpus=2), node("b", gpus=2)])  # 16 GiB GPUs
    free = np.full(state.gpu_util.shape, np.nan)
    free[0, :2] = 4_096.0, 16_384.0  # node b has no reading
    state.set_utilization(np.zeros(state.gpu_util.shape), memory_free_mib=free)
    snap = state.view()
    per_gpu = memory_headroom_score(Candidates(snap, np.arange(2), SHARE, SHAPES))
    np.testing.assert_allclose(per_gpu[:, :2], [[0.25, 1.0], [0.5, 0.5]])  # unknown: neutral
    per_node = memory_headroom_score(Candidates(snap, np.arange(2), WHOLE, SHAPES))
    np.testing.assert_allclose(per_node, [[0.625], [0.5]])

    by_memory = PlacementPolicy.model_validate({"weights": {"fragmentation": 0, "memoryHeadroom": 1}})
    ev = evaluate(snap, SHARE, np.arange(2), by_memory, SHAPES)
    assert snap.names[ev.rows[ev.best()]] == "a" and int(ev.choice[ev.best()]) == 1


def test_a_cpu_hungry_pod_goes_where_its_cpu_strands_no_gpus():
    """Both nodes still fit a typical pod (8 cores, one GPU) after a 20-core GPU pod, so FGD alone is indifferent
    and the fixed order picks `tight`; there the pod leaves 20 cores for 3 GPUs, half a GPU the CPU cannot feed."""
    state = ClusterState([node("tight", gpus=4, cpu=40_000), node("roomy", gpus=4, cpu=96_000)])
    shapes = typical_shapes([Demand(cpu_milli=8000, gpu_count=1, gpu_milli=1000)])
    hungry = Demand(cpu_milli=20_000, gpu_count=1, gpu_milli=1000)
    snap = state.view()
    fgd_alone = PlacementPolicy.model_validate({"fragmentationScoring": {"cpuStranding": 0}})
    for policy, expected in ((fgd_alone, "tight"), (PlacementPolicy(), "roomy")):
        ev = evaluate(snap, hungry, np.arange(2), policy, shapes, components=True)
        assert snap.names[ev.rows[ev.best()]] == expected
    # Half a GPU stranded: 37 of FGD's 100 points, against 50 for no change.
    assert ev.components["fragmentation"].tolist() == pytest.approx([(37 - 50) / 25, 0.0])
