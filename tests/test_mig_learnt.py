"""MIG slice fit against the learnt demand mix: values, start slots, GPU choice, and the tracker's decay."""

from dataclasses import replace

import numpy as np
import pytest

from policies.config import PlacementPolicy
from policies.demand import Demand
from policies.engine import assign, evaluate
from policies.fragmentation import TypicalShapes, typical_shapes
from policies.inventory import Assignment, MigPlacement
from policies.mig import MIG_TABLES, learnt_placeable_value, learnt_placement_loss
from policies.mig_demand import MigDemandTracker, MigMix
from policies.scoring import OPEN_EMPTY_GPU
from policies.state import ClusterState
from tests.helpers import mig_node

H100 = "H100-80GB"
POLICY = PlacementPolicy()


def mig(profile: str) -> Demand:
    return Demand(gpu_count=1, gpu_milli=1000, mig_profile=profile)


SHAPES = typical_shapes([mig("1g.10gb"), mig("3g.40gb")])


def learnt(weights: dict[str, float]) -> TypicalShapes:
    return replace(SHAPES, mig_mix=MigMix.of(weights))


def decide(layout: list[tuple[int, str, int]], profile: str, shapes: TypicalShapes) -> MigPlacement:
    """Where `profile` goes on one node with two H100s holding the instances of `layout` (gpu, profile, start)."""
    state = ClusterState([mig_node("m", gpus=2)])
    for i, (gpu, name, start) in enumerate(layout):
        state.apply(f"p{i}", Assignment("m", mig=MigPlacement(gpu, name, start)))
    snap = state.view()
    ev = evaluate(snap, mig(profile), np.arange(1), POLICY, shapes)
    placement = assign(snap, mig(profile), ev, 0).mig
    assert placement is not None
    return placement


def test_learnt_value_counts_only_profiles_asked_for():
    # Only 2g.20gb asked: worth 2² = 4 per instance still placeable. An empty H100 takes three (slots 0, 2, 4).
    mix = MigMix.of({"2g.20gb": 3.0})
    assert learnt_placeable_value(H100, 0, mix) == pytest.approx(12)
    # A 1g.10gb at slot 6 leaves all three 2g slots; at slot 0 it takes one.
    one = MIG_TABLES[H100].profile("1g.10gb")
    assert learnt_placement_loss(H100, 0, one, 6, mix) == pytest.approx(0)
    assert learnt_placement_loss(H100, 0, one, 0, mix) == pytest.approx(4)


def test_learnt_mix_moves_the_start_slot():
    # A 1g.10gb at slot 0; a 1g.20gb comes. Fixed values: slots 2 and 6 both lose 5 (slots 1-7 are worth 16;
    # after slot 2: 1g 4 + 1g.20gb 2 + 2g 1x2 + 3g 1x3 = 11; after slot 6: 5 + 2 + 2x2 = 11), tie to slot 2.
    layout = [(0, "1g.10gb", 0), (1, "7g.80gb", 0)]
    assert decide(layout, "1g.20gb", SHAPES) == MigPlacement(0, "1g.20gb", 2)
    # Learnt: only 2g.20gb asked. Slot 6 keeps both 2g slots (2, 4): loss 0; slot 2 or 4 loses one (4).
    assert decide(layout, "1g.20gb", learnt({"2g.20gb": 1.0})) == MigPlacement(0, "1g.20gb", 6)


def test_learnt_mix_moves_the_gpu():
    # GPU 0: a 1g.10gb at slot 6; GPU 1: a 3g.40gb at slot 0. A 1g.10gb comes.
    # Fixed values: GPU 0 (free 0-5, 7: worth 22) loses 4 at slot 4; GPU 1 (free 4-7: worth 10) loses 5 at slot 6.
    layout = [(0, "1g.10gb", 6), (1, "3g.40gb", 0)]
    assert decide(layout, "1g.10gb", SHAPES) == MigPlacement(0, "1g.10gb", 4)
    # Only 2g.20gb asked: GPU 0 keeps three 2g slots (0, 2, 4), any 1g there takes one (loss 4); GPU 1's one
    # 2g slot (4) survives a 1g at slot 6 (loss 0).
    assert decide(layout, "1g.10gb", learnt({"2g.20gb": 1.0})) == MigPlacement(1, "1g.10gb", 6)


def test_used_gpu_before_an_empty_one_unless_the_whole_gpu():
    # Only 1g.10gb asked: a 1g loses just its own slot on GPU 0 (empty) and on GPU 1 (3g at 0), a tie that the
    # GPU order would give to the empty GPU 0; opening it costs OPEN_EMPTY_GPU more.
    shapes = learnt({"1g.10gb": 1.0})
    assert decide([(1, "3g.40gb", 0)], "1g.10gb", shapes) == MigPlacement(1, "1g.10gb", 4)
    assert OPEN_EMPTY_GPU > 7
    # The whole-GPU profile is not charged for opening the only GPU it can use.
    state = ClusterState([mig_node("m", gpus=2)])
    state.apply("p", Assignment("m", mig=MigPlacement(1, "1g.10gb", 0)))
    ev = evaluate(state.view(), mig("7g.80gb"), np.arange(1), POLICY, learnt({"7g.80gb": 1.0}), components=True)
    assert ev.components["mig_fit"][0] == pytest.approx(-49)  # its own value, 1 x 7², nothing more


def test_tracker_weights_recent_requests_more():
    tracker = MigDemandTracker(half_life_s=10.0)
    for _ in range(3):
        tracker.observe("1g.10gb", 0.0)
    tracker.observe("7g.80gb", 20.0)  # the three 1g requests are two half-lives old: they count 3/4
    assert tracker.mix().share("7g.80gb") == pytest.approx(1 / 1.75, abs=0.01)
    assert tracker.mix().share("1g.10gb") == pytest.approx(0.75 / 1.75, abs=0.01)
    assert MigMix.of({}).shares == ()


def test_tracker_keeps_its_reading_until_a_share_moves_past_the_tolerance():
    tracker = MigDemandTracker(half_life_s=1e9, tolerance=0.1)
    for profile in ("1g.10gb", "3g.40gb"):
        tracker.observe(profile, 0.0)
    first = tracker.mix()  # 1/2 each
    tracker.observe("1g.10gb", 0.0)  # 2/3 against 1/2: within 0.2 but past 0.1
    moved = tracker.mix()
    assert moved is not first and moved.share("1g.10gb") == pytest.approx(0.67)
    tracker.observe("1g.10gb", 0.0)
    assert tracker.mix() is moved  # 3/4 against 2/3: within 0.1, the same reading
