"""The cluster model: reservations between bind and watch, batches from the watch, foreign pods."""

from __future__ import annotations

import pytest

from policies.config import PlacementPolicy
from policies.demand import Demand
from policies.fragmentation import TypicalShapes, typical_shapes
from policies.inventory import Assignment
from scheduler.model import ClusterModel, ConflictError, ModelView
from tests.helpers import node

WHOLE = Demand(cpu_milli=1000, gpu_count=1, gpu_milli=1000)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def model(clock: Clock) -> ClusterModel:
    model = ClusterModel(PlacementPolicy(), clock=clock)
    model.replace_nodes([node("a", gpus=2)])
    model.mark_ready()
    return model


def test_reservation_blocks_the_share_until_released(model: ClusterModel) -> None:
    model.reserve("p", Assignment("a", gpus=(0,), milli=700))
    with pytest.raises(ConflictError):
        model.reserve("q", Assignment("a", gpus=(0,), milli=400))
    assert model.snapshot().gpu_free[0, 0] == 300
    model.unreserve("p")
    model.reserve("q", Assignment("a", gpus=(0,), milli=400))


def test_reservation_expires_unless_the_watch_confirms_it(model: ClusterModel, clock: Clock) -> None:
    ttl = PlacementPolicy().reservations.ttl_seconds
    model.reserve("p", Assignment("a", gpus=(0,), milli=1000))
    model.reserve("q", Assignment("a", gpus=(1,), milli=1000))
    model.pod_bound("q", Assignment("a", gpus=(1,), milli=1000), WHOLE)  # the watch saw q's binding
    clock.now = ttl + 1
    assert model.expire_reservations() == ["p"]
    assert model.snapshot().gpu_free[0, :2].tolist() == [1000, 0]


def test_an_assumption_bind_takes_over_lives_for_the_bind_timeout(model: ClusterModel, clock: Clock) -> None:
    spec = PlacementPolicy().reservations
    assert spec.assumed_ttl_seconds < spec.ttl_seconds
    assert model.assume("p", Assignment("a", gpus=(0,), milli=1000))
    assert model.assume("q", Assignment("a", gpus=(1,), milli=1000))
    clock.now = 1.0
    assert model.take_assumed("p", "a") is not None  # bind came for p's node: held from now for the bind timeout
    clock.now = spec.assumed_ttl_seconds + 0.5
    assert model.expire_reservations() == ["q"]  # p's expiry as an assumption is past but no longer its own
    clock.now = 1.0 + spec.ttl_seconds - 0.5
    assert model.expire_reservations() == []
    clock.now = 1.0 + spec.ttl_seconds
    assert model.expire_reservations() == ["p"] and model.reservation_count() == 0
    assert model.snapshot().gpu_free[0, :2].tolist() == [1000, 1000]


def test_a_pod_reserved_again_after_giving_back_keeps_its_new_reservation(model: ClusterModel, clock: Clock) -> None:
    ttl = PlacementPolicy().reservations.ttl_seconds
    model.reserve("p", Assignment("a", gpus=(0,), milli=1000))
    model.unreserve("p")  # the binding failed
    clock.now = 10.0
    model.reserve("p", Assignment("a", gpus=(1,), milli=1000))  # the next attempt
    clock.now = ttl + 1
    assert model.expire_reservations() == []
    assert model.assignment_of("p") == Assignment("a", gpus=(1,), milli=1000)
    clock.now = ttl + 10
    assert model.expire_reservations() == ["p"]


def test_relist_keeps_reservations_the_watch_has_not_shown_yet(model: ClusterModel) -> None:
    model.reserve("p", Assignment("a", gpus=(0,), milli=1000))
    model.replace_pods({"old": (Assignment("a", gpus=(1,), milli=500), WHOLE)})
    assert model.snapshot().gpu_free[0, :2].tolist() == [0, 500]


def test_batch_releases_before_it_binds(model: ClusterModel) -> None:
    model.pod_bound("old", Assignment("a", gpus=(0,), milli=1000), WHOLE)
    failed = model.apply_pod_events({"new": (Assignment("a", gpus=(0,), milli=1000), WHOLE)}, gone=["old"])
    assert failed == []
    assert model.assignment_of("new") is not None and model.assignment_of("old") is None


def test_pod_bound_by_someone_else_still_holds_gpus(model: ClusterModel) -> None:
    two = Demand(cpu_milli=1000, gpu_count=2, gpu_milli=1000)
    assert model.pod_bound("foreign", Assignment("a", cpu_milli=1000), two)  # no assignment record on it
    assert model.snapshot().gpu_free[0, :2].tolist() == [0, 0]
    # No GPU left to charge: what it holds on the host still counts.
    assert model.pod_bound("another", Assignment("a", cpu_milli=1000), WHOLE)
    assert model.assignment_of("another") == Assignment("a", cpu_milli=1000)


def test_a_recorded_assignment_displaces_a_guess(model: ClusterModel) -> None:
    model.pod_bound("foreign", Assignment("a", cpu_milli=1000), WHOLE)
    guessed = model.assignment_of("foreign").gpus
    assert model.pod_bound("ours", Assignment("a", gpus=guessed, milli=1000), WHOLE)
    assert model.assignment_of("ours").gpus == guessed
    assert model.assignment_of("foreign").gpus not in ((), guessed)  # moved to the other GPU


def test_learnt_shapes_follow_pods_coming_and_going() -> None:
    policy = PlacementPolicy.model_validate({"typicalShapes": {"minObservedPods": 3, "coverage": 1.0}})
    model = ClusterModel(policy)
    model.replace_nodes([node("a", gpus=8, cpu=64_000)])
    share = Demand(cpu_milli=500, gpu_count=1, gpu_milli=500)
    pods = {"w1": WHOLE, "w2": WHOLE, "s1": share, "s2": share, "s3": share}
    for i, (key, demand) in enumerate(pods.items()):
        milli = demand.gpu_milli
        model.pod_bound(key, Assignment("a", demand.cpu_milli, 0, (i,), milli), demand)
    model.refresh_shapes()
    learnt = model.shapes()
    assert learnt.same_as(typical_shapes(list(pods.values()), coverage=1.0))
    assert sorted(learnt.weight.tolist()) == [0.4, 0.6]
    model.pod_gone("s1")
    model.pod_gone("s2")
    model.refresh_shapes()
    assert model.shapes().same_as(typical_shapes([WHOLE, WHOLE, share], coverage=1.0))
    model.pod_gone("s3")  # fewer pods than minObservedPods: the policy's default mix again
    model.refresh_shapes()
    assert model.shapes().same_as(ClusterModel(policy).shapes())


def test_a_policy_reload_publishes_the_policy_and_its_shapes_together(
    model: ClusterModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request reads policy, typical shapes and snapshot as one view: while a reload computes the new policy's
    shapes, readers still see the old policy with the old shapes, and then the new policy with the new ones."""
    before = model.view()
    fixed = PlacementPolicy.model_validate(
        {"typicalShapes": {"default": [{"cpuMilli": 16000, "gpuCount": 2, "gpuMilli": 1000, "weight": 1.0}]}}
    )
    seen_meanwhile: list[ModelView] = []
    compute = ClusterModel._compute_shapes

    def spy(self: ClusterModel, policy: PlacementPolicy) -> TypicalShapes:
        seen_meanwhile.append(self.view())  # what a request arriving right now would read
        return compute(self, policy)

    monkeypatch.setattr(ClusterModel, "_compute_shapes", spy)
    model.set_policy(fixed)
    assert seen_meanwhile == [before]
    after = model.view()
    assert after.policy is fixed and after.snapshot is before.snapshot
    assert after.shapes.same_as(compute(model, fixed)) and not after.shapes.same_as(before.shapes)
