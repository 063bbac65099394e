"""Leader election against a fake Lease API and a fake monotonic clock: who may decide, and when."""

from __future__ import annotations

import random
from dataclasses import replace
from typing import Any

import orjson
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from extender.leadership import LeaderGate
from scheduler.leader import LEADER_LABEL, LeaderConfig, LeaderElector, LeaseConflict, LeaseRecord, PodLabeller


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class FakeLeaseApi:
    """One Lease with compare-and-swap writes; ``down`` makes every call of the named candidate fail."""

    def __init__(self) -> None:
        self.record: LeaseRecord | None = None
        self.version = 0
        self.down: set[str] = set()
        self.calls = 0

    def view(self, identity: str) -> CandidateApi:
        return CandidateApi(self, identity)

    def _commit(self, record: LeaseRecord) -> LeaseRecord:
        self.version += 1
        self.record = replace(record, resource_version=str(self.version))
        return self.record


class CandidateApi:
    def __init__(self, store: FakeLeaseApi, identity: str) -> None:
        self.store = store
        self.identity = identity

    def _check(self) -> None:
        self.store.calls += 1
        if self.identity in self.store.down:
            raise ConnectionError("API server unreachable")

    def get(self, timeout: float) -> LeaseRecord | None:
        self._check()
        return self.store.record

    def create(self, record: LeaseRecord, timeout: float) -> LeaseRecord:
        self._check()
        if self.store.record is not None:
            raise LeaseConflict("exists")
        return self.store._commit(record)

    def update(self, record: LeaseRecord, timeout: float) -> LeaseRecord:
        self._check()
        current = self.store.record
        if current is None or record.resource_version != current.resource_version:
            raise LeaseConflict("resourceVersion changed")
        return self.store._commit(record)


CONFIG = LeaderConfig("ns", "lease", "a", lease_seconds=15, renew_seconds=10.0, retry_seconds=2.0)


def candidate(store: FakeLeaseApi, clock: Clock, identity: str, **kwargs: Any) -> LeaderElector:
    return LeaderElector(store.view(identity), replace(CONFIG, identity=identity), clock=clock, **kwargs)


def test_timings_must_leave_a_margin() -> None:
    with pytest.raises(ValueError, match="retry < renew deadline < lease duration"):
        LeaderConfig("ns", "lease", "a", lease_seconds=10, renew_seconds=10.0, retry_seconds=2.0)
    with pytest.raises(ValueError):
        LeaderConfig("ns", "lease", "", lease_seconds=15)


def test_first_candidate_creates_the_lease_and_renews_it() -> None:
    store, clock = FakeLeaseApi(), Clock()
    changes: list[bool] = []
    a = candidate(store, clock, "a", on_change=changes.append)
    assert not a.is_leader()
    assert a.step()
    assert a.is_leader() and changes == [True]
    assert store.record is not None and store.record.holder == "a" and store.record.lease_seconds == 15
    first_renew = store.record.renew_time
    clock.advance(2)
    assert a.step()
    assert store.record.transitions == 0 and store.record.renew_time >= first_renew
    assert changes == [True]  # renewing is no change
    assert a.transitions == {"leader": 1, "follower": 0}


def test_candidate_waits_while_the_lease_is_held() -> None:
    store, clock = FakeLeaseApi(), Clock()
    a, b = candidate(store, clock, "a"), candidate(store, clock, "b")
    assert a.step()
    for _ in range(20):
        clock.advance(2)
        assert a.step()
        assert not b.step()
        assert a.is_leader() and not b.is_leader()
    assert b.holder == "a"


def test_failed_renewals_stop_decisions_at_the_renew_deadline_before_the_lease_expires() -> None:
    store, clock = FakeLeaseApi(), Clock()
    a, b = candidate(store, clock, "a"), candidate(store, clock, "b")
    assert a.step()
    renewed_at = clock.now
    assert not b.step()  # b sees a's record now
    store.down.add("a")
    while clock.now < renewed_at + 9.9:
        clock.advance(0.5)
        a.step()
        b.step()
        assert a.is_leader() is (clock.now < renewed_at + 10)
        assert not b.is_leader()
    clock.advance(0.2)  # past the renew deadline: a stops, though its lease still runs for 5 s
    assert not a.is_leader()
    assert not b.step()
    clock.advance(4.5)
    assert not b.step(), "the lease has not expired on b's clock yet"
    clock.advance(0.6)
    assert b.step() and b.is_leader()
    assert not a.is_leader()
    assert store.record is not None and store.record.holder == "b" and store.record.transitions == 1
    # a's API comes back: a sees b's lease and stays a follower.
    store.down.clear()
    assert not a.step() and not a.is_leader()


def test_expiry_is_measured_from_when_the_record_was_seen_not_from_its_timestamps() -> None:
    store, clock = FakeLeaseApi(), Clock()
    a = candidate(store, clock, "a")
    assert a.step()
    a.stop(release=False)  # crashed: the lease stays with a
    clock.advance(3600)  # a candidate that starts much later...
    b = candidate(store, clock, "b")
    assert not b.step()  # ...still waits a whole lease duration from its first look
    clock.advance(14.9)
    assert not b.step()
    clock.advance(0.2)
    assert b.step()


def test_a_candidate_whose_view_is_not_ready_does_not_take_the_lease() -> None:
    store, clock = FakeLeaseApi(), Clock()
    ready = [False]
    a = candidate(store, clock, "a", eligible=lambda: ready[0])
    assert not a.step() and store.record is None
    ready[0] = True
    assert a.step()


def test_release_on_stop_lets_a_successor_take_over_at_once() -> None:
    store, clock = FakeLeaseApi(), Clock()
    changes: list[bool] = []
    a, b = candidate(store, clock, "a", on_change=changes.append), candidate(store, clock, "b")
    assert a.step()
    assert not b.step()
    a.stop()
    assert not a.is_leader() and changes == [True, False]
    assert store.record is not None and store.record.holder == "" and store.record.lease_seconds == 1
    assert b.step() and b.is_leader()  # no waiting for the lease to run out
    assert store.record.holder == "b" and store.record.transitions == 1


def test_release_leaves_a_lease_that_is_no_longer_ours_alone() -> None:
    store, clock = FakeLeaseApi(), Clock()
    a, b = candidate(store, clock, "a"), candidate(store, clock, "b")
    assert a.step()
    store.down.add("a")
    clock.advance(30)
    assert not b.step()
    clock.advance(16)
    assert b.step()
    store.down.clear()
    assert not a.release()
    assert store.record is not None and store.record.holder == "b"


def test_conflicting_writes_elect_one_candidate() -> None:
    """b reads, then a takes the lease before b writes: b's write loses the compare-and-swap."""
    for initial in ("none", "expired", "released"):
        store, clock = FakeLeaseApi(), Clock()
        if initial != "none":
            old = candidate(store, clock, "old")
            assert old.step()
            old.stop(release=initial == "released")
            clock.advance(16)
        a, b = candidate(store, clock, "a"), candidate(store, clock, "b")
        if initial == "expired":  # both have watched the old record run out
            assert not a.step() and not b.step()
            clock.advance(16)
        api = b.api
        read = api.get

        def racing_get(timeout: float, read: Any = read, a: LeaderElector = a) -> LeaseRecord | None:
            record = read(timeout)
            assert a.step()
            return record

        api.get = racing_get  # type: ignore[method-assign]
        assert not b.step(), initial
        assert a.is_leader() and not b.is_leader()
        assert store.record is not None and store.record.holder == "a"


def test_never_two_leaders_under_random_interleavings() -> None:
    """Candidates step in random order, clocks advance by random amounts, API calls fail at random, a leader
    stops (releasing or not) and comes back: at every instant at most one candidate may decide."""
    for seed in range(40):
        rng = random.Random(seed)
        store, clock = FakeLeaseApi(), Clock()
        names = ["a", "b", "c"]
        electors = {name: candidate(store, clock, name) for name in names}
        leaders_seen = set()
        for _ in range(400):
            name = rng.choice(names)
            roll = rng.random()
            if roll < 0.08:
                store.down.symmetric_difference_update({name})
            elif roll < 0.1:
                electors[name].stop(release=rng.random() < 0.5)
                electors[name] = candidate(store, clock, f"{name}{rng.randrange(1000)}")
            else:
                electors[name].step()
            clock.advance(rng.choice([0.0, 0.1, 0.5, 1.0, 2.0, 4.0]))
            leading = [n for n, e in electors.items() if e.is_leader()]
            assert len(leading) <= 1, (seed, leading, clock.now)
            leaders_seen.update(electors[n].identity for n in leading)
        assert len(leaders_seen) > 1, f"seed {seed}: the leadership never moved"


def test_gate_refuses_the_verbs_on_a_follower_and_reports_leadership() -> None:
    store, clock = FakeLeaseApi(), Clock()
    a, b = candidate(store, clock, "a"), candidate(store, clock, "b")
    assert a.step()
    assert not b.step()
    inner = FastAPI()
    served: list[str] = []

    @inner.post("/filter")
    async def filter_() -> dict[str, str]:
        served.append("filter")
        return {"Error": ""}

    @inner.post("/explain")
    async def explain() -> dict[str, str]:
        served.append("explain")
        return {}

    with TestClient(LeaderGate(inner, a)) as leader, TestClient(LeaderGate(inner, b)) as follower:
        assert leader.post("/filter", json={}).status_code == 200
        assert leader.get("/readyz/leader").status_code == 200
        refused = follower.post("/bind", json={})
        assert refused.status_code == 503
        assert refused.headers["connection"] == "close"
        assert "not the leader" in orjson.loads(refused.content)["Error"]
        assert "held by a" in orjson.loads(refused.content)["Error"]
        for verb in ("/filter", "/prioritize", "/preempt"):
            assert follower.post(verb, json={}).status_code == 503
        assert follower.post("/explain", json={}).status_code == 200  # read-only: any replica answers
        assert follower.get("/readyz/leader").status_code == 503
        assert served == ["filter", "explain"]
        # The leader's renewals fail: past its renew deadline it refuses too.
        store.down.add("a")
        clock.advance(10.01)
        assert leader.post("/filter", json={}).status_code == 503
        assert leader.get("/readyz/leader").json()["leader"] is False


def test_pod_label_follows_leadership(monkeypatch: pytest.MonkeyPatch) -> None:
    """The leader labels its pod and unlabels every other; a replica that stops leading unlabels its own, even
    when that is the last thing it is told before stopping."""
    import scheduler.kubeapi

    calls: list[tuple[str, str, Any]] = []

    def fake_read_json(api: Any, method: str, path: str, **kwargs: Any) -> Any:
        calls.append((method, path, kwargs.get("body")))
        if method == "GET":
            assert kwargs["query"] == [("labelSelector", f"{LEADER_LABEL}=true")]
            return {"items": [{"metadata": {"name": "ext-1"}}, {"metadata": {"name": "ext-old"}}]}
        assert kwargs["headers"]["Content-Type"] == "application/merge-patch+json"
        return {}

    monkeypatch.setattr(scheduler.kubeapi, "read_json", fake_read_json)
    labeller = PodLabeller(object(), "sys", "ext-1")
    labeller.apply(True)
    base = "/api/v1/namespaces/sys/pods"
    assert calls == [
        ("PATCH", f"{base}/ext-1", {"metadata": {"labels": {LEADER_LABEL: "true"}}}),
        ("GET", base, None),
        ("PATCH", f"{base}/ext-old", {"metadata": {"labels": {LEADER_LABEL: None}}}),
    ]
    calls.clear()
    labeller.start()  # unlabels its own pod first: a restarted container keeps its pod's labels
    labeller(True)
    labeller(False)
    labeller.stop()
    assert calls[0] == ("PATCH", f"{base}/ext-1", {"metadata": {"labels": {LEADER_LABEL: None}}})
    assert calls[-1] == ("PATCH", f"{base}/ext-1", {"metadata": {"labels": {LEADER_LABEL: None}}})


def test_serve_flags() -> None:
    from extender.cli import build_parser
    from extender.leadership import leadership_from_args
    from scheduler.leader import config_from_args

    parser = build_parser()
    plain = parser.parse_args(["serve"])
    assert config_from_args(plain) is None and leadership_from_args(plain, None, None) is None  # type: ignore[arg-type]
    flags = "serve --leader-elect --leader-elect-namespace ns --leader-elect-name l --leader-elect-lease-seconds 3"
    flags += " --leader-elect-renew-seconds 2 --leader-elect-retry-seconds 0.5 --leader-elect-identity me"
    args = parser.parse_args(flags.split())
    config = config_from_args(args)
    assert config == LeaderConfig("ns", "l", "me", lease_seconds=3, renew_seconds=2.0, retry_seconds=0.5)
    with pytest.raises(ValueError, match="live cluster"):
        leadership_from_args(args, None, None)  # type: ignore[arg-type]
    defaults = config_from_args(parser.parse_args(["serve", "--leader-elect"]))
    assert defaults is not None
    assert (defaults.lease_seconds, defaults.renew_seconds, defaults.retry_seconds) == (15, 10.0, 2.0)
    assert defaults.identity.count("_") >= 1  # host or pod name, and a random suffix
    assert config_from_args(parser.parse_args(["serve", "--leader-elect"])).identity != defaults.identity  # type: ignore[union-attr]
    bad = parser.parse_args(["serve", "--leader-elect", "--leader-elect-renew-seconds", "20"])
    with pytest.raises(ValueError):
        config_from_args(bad)
