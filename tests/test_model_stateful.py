"""The cluster model under random interleavings of what the extender lives through: filter, prioritize and bind of
whole-GPU, shared and MIG pods, pods deleted, nodes changed or shrunk, holds expiring, and the extender restarted
(its model rebuilt from the bound pods' annotations, as the watch rebuilds it). Whatever the order, no GPU, no GPU's
milli and no MIG slice is given to more than it holds.

Each step is checked three ways: the `ClusterState` columns the decisions read (free milli, MIG slices, CPU,
memory) against the sum of the model's assignments; those assignments against each node's inventory; and an
independent ledger of what bind said it assigned against the model and against the inventory.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, rule

from policies.config import PlacementPolicy
from policies.inventory import MILLI_PER_GPU, Assignment, GpuDevice, NodeInventory
from policies.mig import MIG_TABLES
from scheduler.annotations import bound_assignment
from scheduler.binder import MemoryBinder
from scheduler.model import ClusterModel
from scheduler.podspec import demand_from_pod
from scheduler.service import BindError, PlacementService

NS = "default"
MIG_MODEL = "NVIDIA-H100-80GB-HBM3"
POLICIES = {
    "default": PlacementPolicy(),
    # the shipped scoring: filter shortlists one node and holds it until bind
    "shortlist": PlacementPolicy.model_validate({"extenderScoring": {"shortlist": 1, "assumeBest": True}}),
}


def _node(name: str, gpus: int, mig: int = 0, cpu: int = 16_000, mem: int = 65_536) -> NodeInventory:
    devices = [GpuDevice(i, "T4", 16_384) for i in range(gpus)]
    devices += [GpuDevice(gpus + i, MIG_MODEL, 81_920, mig_table="H100-80GB") for i in range(mig)]
    return NodeInventory(name, cpu, mem, tuple(devices))


FULL = {
    "t4-1": _node("t4-1", 1),
    "t4-2": _node("t4-2", 2),
    "t4-4": _node("t4-4", 4, cpu=8_000),
    "mig-1": _node("mig-1", 0, mig=1),
    "mix": _node("mix", 2, mig=1),
}
SHRUNK = {"t4-4": _node("t4-4", 2, cpu=8_000), "mix": _node("mix", 1, mig=1), "t4-2": _node("t4-2", 1)}
NAMES = list(FULL)

REQUESTS = st.one_of(
    st.builds(lambda n: {"nvidia.com/gpu": str(n)}, st.integers(1, 3)),
    st.builds(lambda m: {"gpu-extender.io/gpu-milli": str(m)}, st.sampled_from([100, 250, 300, 500, 700, 999])),
    st.builds(lambda p: {f"nvidia.com/mig-{p}": "1"}, st.sampled_from(["1g.10gb", "1g.20gb", "2g.20gb", "3g.40gb"])),
    st.builds(lambda p: {f"nvidia.com/mig-{p}": "1"}, st.sampled_from(["4g.40gb", "7g.80gb"])),
)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FleetMachine(RuleBasedStateMachine):
    pods = Bundle("pods")

    def __init__(self) -> None:
        super().__init__()
        self.clock = Clock()
        self.policy = POLICIES["default"]
        self.nodes = dict(FULL)
        self.binder = MemoryBinder()
        self.ledger: dict[str, Assignment] = {}  # uid -> what bind assigned, while the pod lives
        self.specs: dict[str, dict[str, Any]] = {}
        self.count = 0
        self.service = self._fresh_service()

    def _fresh_service(self) -> PlacementService:
        model = ClusterModel(self.policy, clock=self.clock)
        model.replace_nodes(self.nodes.values())
        model.mark_ready()
        return PlacementService(model, self.binder, confirm_on_bind=True)

    @property
    def model(self) -> ClusterModel:
        return self.service.model

    # -- rules -------------------------------------------------------------------------------------------------
    @rule(target=pods, requests=REQUESTS, cpu=st.sampled_from(["500m", "2", "6"]))
    def new_pod(self, requests: dict[str, str], cpu: str) -> str:
        self.count += 1
        uid = f"u{self.count}"
        resources = {"cpu": cpu, "memory": "1Gi", **requests}
        pod = {
            "metadata": {"name": f"p{self.count}", "namespace": NS, "uid": uid},
            "spec": {"containers": [{"name": "c", "resources": {"requests": resources, "limits": resources}}]},
        }
        self.specs[uid] = pod
        self.binder.add_pod(pod)
        return uid

    @rule(uid=pods, subset=st.lists(st.sampled_from(NAMES), min_size=1, max_size=5, unique=True))
    def filter_and_prioritize(self, uid: str, subset: list[str]) -> None:
        """What kube-scheduler asks before a bind, with the work each answer leaves for after it is sent."""
        pod = self.specs[uid]
        outcome = self.service.filter(pod, subset)
        self.service.after_filter(pod, outcome)
        if len(outcome.passed) > 1:
            self.service.prioritize(pod, outcome.passed)

    @rule(uid=pods, subset=st.lists(st.sampled_from(NAMES), min_size=1, max_size=5, unique=True))
    def schedule(self, uid: str, subset: list[str]) -> None:
        """kube-scheduler's whole cycle: filter, prioritize when more than one node passed, bind the best."""
        pod = self.specs[uid]
        outcome = self.service.filter(pod, subset)
        self.service.after_filter(pod, outcome)
        best = outcome.passed[:1]
        if len(outcome.passed) > 1:
            scores = self.service.prioritize(pod, outcome.passed)
            best = [max(scores, key=lambda hs: hs[1])[0]]
        if best:
            self.bind(uid, best[0])

    @rule(uid=pods, node=st.sampled_from(NAMES))
    def bind_anywhere(self, uid: str, node: str) -> None:
        self.bind(uid, node)

    def bind(self, uid: str, node: str) -> None:
        """Bind wherever kube-scheduler says, fitting or not: a refusal is fine, a double booking is not."""
        pod = self.specs[uid]
        try:
            assignment = self.service.bind(NS, pod["metadata"]["name"], uid, node)
        except BindError:
            if uid not in self.ledger:  # refused: nothing was bound
                assert f"{NS}/{pod['metadata']['name']}" not in self.binder.bindings
            return
        assert assignment.node == node
        if uid in self.ledger:
            assert self.ledger[uid] == assignment, "a repeated bind must write the same decision"
        self.ledger[uid] = assignment

    @rule(uid=consumes(pods))
    def delete(self, uid: str) -> None:
        """The watch reports the pod gone."""
        self.model.pod_gone(uid)
        self.binder.unbind(NS, self.specs[uid]["metadata"]["name"])
        self.ledger.pop(uid, None)

    @rule(name=st.sampled_from(NAMES), change=st.sampled_from(["remove", "shrink", "restore"]))
    def change_node(self, name: str, change: str) -> None:
        """A node leaves, loses GPUs, or comes back whole; pods whose GPUs are gone are dropped by the model."""
        if change == "remove":
            self.nodes.pop(name, None)
        elif change == "shrink" and name in SHRUNK:
            self.nodes[name] = SHRUNK[name]
        else:
            self.nodes[name] = FULL[name]
        dropped = self.model.replace_nodes(self.nodes.values())
        for uid in dropped:
            if uid in self.ledger:
                del self.ledger[uid]
                self.binder.unbind(NS, self.specs[uid]["metadata"]["name"])  # its node is gone: so is the pod
        for uid, assignment in self.ledger.items():
            assert self.model.assignment_of(uid) == assignment, f"{uid} lost its GPUs though its node stayed"

    @rule(seconds=st.sampled_from([1.0, 31.0, 200.0]))
    def time_passes(self, seconds: float) -> None:
        """Holds without a bind expire; bound pods stay."""
        self.clock.now += seconds
        self.model.expire_reservations()

    @rule(policy=st.sampled_from(list(POLICIES)))
    def restart(self, policy: str) -> None:
        """A new extender process: the model is rebuilt from the bound pods' annotations, holds are gone."""
        self.policy = POLICIES[policy]
        self.service = self._fresh_service()
        bound = {}
        for key, binding in self.binder_bound().items():
            uid = binding.uid
            demand = demand_from_pod(self.specs[uid])
            assignment, known = bound_assignment(binding.annotations, binding.node, demand)
            assert known, f"the annotations of {key} do not say which GPUs it holds"
            bound[uid] = (assignment, demand)
        failed = self.model.replace_pods(bound)
        assert not failed, f"bound pods that no longer fit after a restart: {failed}"

    def binder_bound(self) -> dict[str, Any]:
        return {k: b for k, b in self.binder.bindings.items() if b.uid in self.ledger}

    # -- invariants --------------------------------------------------------------------------------------------
    @invariant()
    def ledger_matches_model(self) -> None:
        for uid, assignment in self.ledger.items():
            assert self.model.assignment_of(uid) == assignment, f"{uid}: model holds {self.model.assignment_of(uid)}"

    @invariant()
    def ledger_never_overbooks(self) -> None:
        """Independent of the model: what bind handed out fits each node's inventory."""
        _check_fits(self.ledger.values(), self.nodes)

    @invariant()
    def model_never_overbooks(self) -> None:
        """Everything the model holds (bound, reserved and assumed) fits, and its columns say exactly that."""
        assignments = self.model.assignments()
        _check_fits(assignments.values(), self.nodes)
        snapshot = self.model.snapshot()
        assert set(snapshot.names) == set(self.nodes)
        milli: defaultdict[tuple[str, int], int] = defaultdict(int)
        slices: defaultdict[tuple[str, int], int] = defaultdict(int)
        cpu: defaultdict[str, int] = defaultdict(int)
        mem: defaultdict[str, int] = defaultdict(int)
        for a in assignments.values():
            cpu[a.node] += a.cpu_milli
            mem[a.node] += a.memory_mib
            for g in a.gpus:
                milli[a.node, g] += 0 if a.borrowed else a.milli
            if a.mig is not None:
                slices[a.node, a.mig.gpu] |= _mask(a)
        for i, name in enumerate(snapshot.names):
            inventory = self.nodes[name]
            assert snapshot.cpu_free[i] == inventory.cpu_milli - cpu[name]
            assert snapshot.mem_free[i] == inventory.memory_mib - mem[name]
            for device in inventory.gpus:
                g = device.index
                if device.mig_table is None:
                    assert snapshot.gpu_free[i, g] == MILLI_PER_GPU - milli[name, g], (name, g)
                else:
                    assert int(snapshot.mig_occupied[i, g]) == slices[name, g], (name, g)
        assert (snapshot.gpu_free >= 0).all() and (snapshot.cpu_free >= 0).all()


def _mask(a: Assignment) -> int:
    assert a.mig is not None
    profile = MIG_TABLES["H100-80GB"].profile(a.mig.profile)
    assert profile is not None and a.mig.start in profile.starts, a.mig
    return profile.mask_at(a.mig.start)


def _check_fits(assignments: Any, nodes: dict[str, NodeInventory]) -> None:
    """No GPU gets more than 1000 milli or a whole GPU beside anything; no MIG slice is given twice; no node's CPU
    or memory is overdrawn; every GPU named exists and is of the kind the assignment needs."""
    milli: defaultdict[tuple[str, int], int] = defaultdict(int)
    holders: defaultdict[tuple[str, int], int] = defaultdict(int)
    slices: defaultdict[tuple[str, int], int] = defaultdict(int)
    cpu: defaultdict[str, int] = defaultdict(int)
    for a in assignments:
        inventory = nodes[a.node]
        devices = {d.index: d for d in inventory.gpus}
        cpu[a.node] += a.cpu_milli
        assert len(set(a.gpus)) == len(a.gpus), a
        for g in a.gpus:
            assert g in devices and devices[g].mig_table is None, f"{a} names a GPU {a.node} does not share"
            milli[a.node, g] += 0 if a.borrowed else a.milli
            holders[a.node, g] += 1
            if a.milli == MILLI_PER_GPU:
                assert holders[a.node, g] == 1 or milli[a.node, g] == MILLI_PER_GPU, f"GPU {g} on {a.node} shared"
            assert milli[a.node, g] <= MILLI_PER_GPU, f"GPU {g} on {a.node} over-given: {milli[a.node, g]} milli"
        if a.mig is not None:
            assert a.mig.gpu in devices and devices[a.mig.gpu].mig_table is not None, a
            mask = _mask(a)
            assert mask < 1 << 8
            assert not slices[a.node, a.mig.gpu] & mask, f"MIG slices of {a} already given"
            slices[a.node, a.mig.gpu] |= mask
    for node, used in cpu.items():
        assert used <= nodes[node].cpu_milli, f"{node}: {used} milli CPU given, {nodes[node].cpu_milli} exist"


FleetMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=50,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
TestFleetMachine = FleetMachine.TestCase
