"""The trace simulator: arrival protocol, invariants of a replay, reproducibility, outputs."""

import argparse
import csv
from pathlib import Path

import numpy as np
import pytest

from policies.baselines import OTHER_POLICY_NAMES, POLICY_NAMES, make_policy
from policies.demand import Demand
from policies.fragmentation import typical_shapes
from policies.inventory import MILLI_PER_GPU, Assignment
from scheduler.simulator import cli
from scheduler.simulator.metrics import SUMMARY_COLUMNS, binned, seed_metrics
from scheduler.simulator.replay import (
    KubeSchedulerOptions,
    Replay,
    balanced_allocation,
    least_allocated,
    num_feasible_nodes_to_find,
    replay,
)
from scheduler.simulator.trace import PodList, arrival_sequence, node_order, read_nodes, read_pods
from tests.helpers import node

OPENB = Path(__file__).resolve().parents[2] / "shared" / "data" / "openb"
needs_openb = pytest.mark.skipif(not OPENB.is_dir(), reason="shared openb trace not available")


def pod_list(*demands: Demand) -> PodList:
    return PodList("t", tuple(f"p{i}" for i in range(len(demands))), tuple(demands))


def gpu(milli: int, count: int = 1, cpu: int = 1_000) -> Demand:
    return Demand(cpu_milli=cpu, memory_mib=1_024, gpu_count=count, gpu_milli=milli)


# -- arrival protocol ----------------------------------------------------------------------------------------


def test_arrivals_keep_every_pod_then_append_copies_up_to_the_target():
    pods = pod_list(gpu(1_000), gpu(500), gpu(250), Demand(cpu_milli=1_000))
    capacity = 4 * MILLI_PER_GPU
    order = arrival_sequence(pods, capacity, 1.3, np.random.default_rng(3))
    assert sorted(order[:4].tolist()) == [0, 1, 2, 3]  # the list itself, shuffled
    total = sum(pods.demands[i].gpu_milli_total for i in order)
    assert total <= 1.3 * capacity
    assert total > 1.3 * capacity - MILLI_PER_GPU  # stopped at the first draw that would pass
    again = arrival_sequence(pods, capacity, 1.3, np.random.default_rng(3))
    assert np.array_equal(order, again)


def test_a_list_asking_more_than_the_target_loses_random_pods():
    pods = pod_list(*[gpu(1_000)] * 10)
    order = arrival_sequence(pods, 5 * MILLI_PER_GPU, 1.3, np.random.default_rng(0))
    assert len(order) == 6 and len(set(order.tolist())) == 6


def test_node_order_is_a_seeded_permutation():
    nodes = [node(f"n{i}", gpus=1) for i in range(20)]
    a = [n.name for n in node_order(nodes, np.random.default_rng(1))]
    b = [n.name for n in node_order(nodes, np.random.default_rng(1))]
    c = [n.name for n in node_order(nodes, np.random.default_rng(2))]
    assert a == b and a != c and sorted(a) == sorted(n.name for n in nodes)


def test_reads_openb_csvs(tmp_path):
    (tmp_path / "nodes.csv").write_text("sn,cpu_milli,memory_mib,gpu,model\nn0,64000,262144,2,P100\nn1,32000,1024,0,\n")
    (tmp_path / "pods.csv").write_text(
        "name,cpu_milli,memory_mib,num_gpu,gpu_milli,gpu_spec\n"
        "p0,1000,2048,1,460,\np1,2000,4096,0,0,\np2,8000,1024,2,1000,P100|T4\n"
    )
    nodes = read_nodes(tmp_path / "nodes.csv")
    assert [len(n.gpus) for n in nodes] == [2, 0] and nodes[0].gpu_model == "P100"
    pods = read_pods(tmp_path / "pods.csv")
    assert pods.demands[0] == Demand(cpu_milli=1_000, memory_mib=2_048, gpu_count=1, gpu_milli=460)
    assert pods.demands[1].gpu_count == 0
    assert pods.demands[2].allowed_models == frozenset({"P100", "T4"})


def test_published_baselines_and_the_reported_fragmentation_leave_memory_out_of_shapes(tmp_path, monkeypatch):
    from scheduler.simulator import runner

    (tmp_path / "nodes.csv").write_text("sn,cpu_milli,memory_mib,gpu,model\nn0,64000,262144,2,P100\n")
    (tmp_path / "pods.csv").write_text(
        "name,cpu_milli,memory_mib,num_gpu,gpu_milli\np0,1000,2048,1,500\np1,1000,4096,1,500\n"
    )
    decided, reported = {}, {}
    make_policy, replay = runner.make_policy, runner.replay

    def spy_make_policy(name, shapes, placement):
        decided[name] = shapes
        return make_policy(name, shapes, placement)

    def spy_replay(workload, nodes, demands, policy, shapes, *args, **kwargs):
        reported[policy.label] = shapes
        return replay(workload, nodes, demands, policy, shapes, *args, **kwargs)

    monkeypatch.setattr(runner, "make_policy", spy_make_policy)
    monkeypatch.setattr(runner, "replay", spy_replay)
    for name in ("fgd", "default"):
        runner.run_task(runner.Task(str(tmp_path / "nodes.csv"), str(tmp_path / "pods.csv"), name, "sim", 0))
    assert decided["fgd"].memory_mib.tolist() == [0] and decided["fgd"].weight.tolist() == [1.0]
    assert sorted(decided["default"].memory_mib.tolist()) == [2048, 4096]
    assert len(reported) == 2 and all(shapes.memory_mib.tolist() == [0] for shapes in reported.values())


# -- metrics -------------------------------------------------------------------------------------------------


def test_binning_rounds_arrivals_and_averages_each_bin():
    arrived = np.array([0.4, 0.6, 1.4, 3.0])
    values = np.array([10.0, 20.0, 30.0, 50.0])
    curve = binned(values, arrived, max_bin=4)
    assert curve[0] == 10.0 and curve[1] == 25.0 and curve[3] == 50.0
    assert curve[2] == pytest.approx((20 + 30 + 50) / 3)  # empty bin: events within one point
    assert curve[4] == 50.0  # no event at 4: those at 3 stand in


# -- kube-scheduler scoring ----------------------------------------------------------------------------------


def test_builtin_scores_follow_kube_scheduler():
    from policies.state import ClusterState

    state = ClusterState([node("a", gpus=1, cpu=10_000, mem=10_000)])
    demand = Demand(cpu_milli=2_000, memory_mib=6_000)
    rows = np.array([0])
    # LeastAllocated: cpu (10000-2000)*100/10000 = 80, memory 40 -> (80 + 40) / 2 = 60.
    assert least_allocated(state, rows, demand).tolist() == [60]
    # MostAllocated: cpu 20, memory 60 -> 40.
    assert least_allocated(state, rows, demand, most=True).tolist() == [40]
    # Balanced: fractions 0.2 and 0.6 -> std 0.2 -> 80.
    assert balanced_allocation(state, rows, demand).tolist() == [80]
    assert num_feasible_nodes_to_find(0, 1_213) == 497
    assert num_feasible_nodes_to_find(100, 1_213) == 1_213
    assert num_feasible_nodes_to_find(0, 50) == 50


def test_kube_scheduler_mode_with_a_dominant_weight_follows_the_extender():
    nodes = [node(f"n{i}", gpus=2) for i in range(6)]
    demands = [gpu(500), gpu(1_000), gpu(250), gpu(500)] * 3
    shapes = typical_shapes(demands)
    runs = {}
    for mode in ("sim", "kube-scheduler"):
        sim = Replay(
            nodes,
            make_policy("default", shapes),
            shapes,
            np.random.default_rng(0),
            mode=mode,
            kube=KubeSchedulerOptions(extender_weight=30),
        )
        runs[mode] = [sim.place(f"p{i}", d) for i, d in enumerate(demands)]
    assert runs["sim"] == runs["kube-scheduler"]


def test_with_kube_schedulers_default_weight_built_in_scores_can_overrule_the_extender():
    from policies.baselines import BasePolicy, _evaluation
    from policies.feasibility import feasibility

    class Preference(BasePolicy):
        """Prefers the nodes in list order: raw scores 3, 2, 1 -> prioritize answers 10, 4, 0."""

        def evaluate(self, snapshot, demand, rows):
            reasons = feasibility(snapshot, rows, demand)
            return _evaluation(rows, reasons, np.flatnonzero(reasons == 0), 3.0 - rows, 0)

    chosen = {}
    for weight, shortlist in ((1, 0), (30, 0), (1, 1), (1, 2)):
        sim = Replay(
            [node("loaded", gpus=2), node("idle", gpus=2), node("idle-too", gpus=2)],
            Preference(),
            typical_shapes([gpu(1_000)]),
            np.random.default_rng(0),
            mode="kube-scheduler",
            kube=KubeSchedulerOptions(extender_weight=weight, shortlist=shortlist),
        )
        # "loaded" has almost no CPU or memory left: LeastAllocated + BalancedAllocation give it about 100,
        # "idle" about 195. With weight 1 our lead (10 - 4) × 10 = 60 does not make up for it; with 30 it does.
        # A shortlist of one leaves the scheduler nothing else to choose. Over a shortlist of two our answers are
        # 10 and 0: a lead of 100 that the built-in scores cannot make up either.
        sim.state.apply("held", Assignment("loaded", 31_000, 129_000, gpus=(0,), milli=1_000))
        chosen[weight, shortlist] = sim.place("pod", gpu(1_000)).node
    assert chosen == {(1, 0): "idle", (30, 0): "loaded", (1, 1): "loaded", (1, 2): "loaded"}


def sampled_replay(typical: Demand, sample_retries: int = 0) -> Replay:
    """200 one-GPU nodes in kube-scheduler mode, sampled 120 at a time (percentageOfNodesToScore 60)."""
    nodes = [node(f"n{i:03d}", gpus=1) for i in range(200)]
    shapes = typical_shapes([typical])
    return Replay(
        nodes,
        make_policy("default", shapes),
        shapes,
        np.random.default_rng(0),
        mode="kube-scheduler",
        kube=KubeSchedulerOptions(percentage_of_nodes_to_score=60, sample_retries=sample_retries),
    )


def test_the_node_sample_skips_nodes_whose_gpus_pods_ask_for_whole():
    """kube-scheduler's own filter counts nvidia.com/gpu: nodes held whole fail it and do not fill the sample, so a
    whole-GPU pod always finds the last free nodes past them (a sample of full nodes would turn it away)."""
    sim = sampled_replay(gpu(1_000))
    placed = [sim.place(f"p{i}", gpu(1_000)) for i in range(200)]
    assert all(placed) and len({a.node for a in placed}) == 200


def test_a_pod_its_node_sample_turns_away_is_placed_on_a_retry():
    """Shares leave room on the last node only, and kube-scheduler's own filter (which ignores gpu-milli) passes
    every node: the first sample of 120 nodes holds no room, the next one does."""
    placed = {}
    for retries in (0, 1):
        sim = sampled_replay(gpu(600), sample_retries=retries)
        for i in range(199):
            sim.state.apply(f"held{i}", Assignment(f"n{i:03d}", gpus=(0,), milli=600))
        placed[retries] = sim.place("pod", gpu(600))
    assert placed[0] is None
    assert placed[1] is not None and placed[1].node == "n199"


def test_kube_scheduler_mode_answers_as_the_policy_file_says():
    from policies.config import PlacementPolicy

    scoring = PlacementPolicy.model_validate({"extenderScoring": {"mode": "linear", "shortlist": 3}}).extender_scoring
    options = KubeSchedulerOptions(extender_weight=5).serving(scoring)
    assert (options.scoring_mode, options.shortlist, options.extender_weight) == ("linear", 3, 5)


# -- replays -------------------------------------------------------------------------------------------------


def small_fleet():
    models = ["T4", "P100", "V100M16"]
    return [node(f"n{i:02d}", gpus=(1, 2, 4, 8)[i % 4], model=models[i % 3], cpu=64_000) for i in range(24)]


def small_workload(seed: int):
    rng = np.random.default_rng(100)
    kinds = [gpu(1_000), gpu(500), gpu(250), gpu(1_000, count=2, cpu=8_000), Demand(cpu_milli=6_000, memory_mib=4)]
    base = [kinds[k] for k in rng.integers(len(kinds), size=60)]
    base.append(Demand(cpu_milli=1_000, memory_mib=1_024, gpu_count=1, gpu_milli=300, allowed_models=frozenset({"T4"})))
    pods = pod_list(*base)
    nodes = small_fleet()
    capacity = sum(len(n.gpus) for n in nodes) * MILLI_PER_GPU
    seeded = np.random.default_rng(seed)
    order = arrival_sequence(pods, capacity, 1.3, seeded)
    return node_order(nodes, seeded), [pods.demands[i] for i in order], typical_shapes(pods.demands)


@pytest.mark.parametrize("name", [*POLICY_NAMES, *OTHER_POLICY_NAMES])
@pytest.mark.parametrize("mode", ["sim", "kube-scheduler"])
def test_replay_invariants_and_reuse_of_evaluations(name, mode):
    nodes, demands, shapes = small_workload(5)
    sim = Replay(nodes, make_policy(name, shapes), shapes, np.random.default_rng(1), mode=mode, verify=True)
    out = sim.run(demands)
    view = sim.snapshot
    assert (view.gpu_free >= 0).all() and (view.gpu_free <= MILLI_PER_GPU).all()
    assert (view.cpu_free >= 0).all() and (view.mem_free >= 0).all()
    assert (out["allocated"] <= out["arrived"]).all()
    assert out["allocated"][-1] == view.gpu_allocated_milli()
    assert (np.diff(out["arrived"]) >= 0).all() and (np.diff(out["allocated"]) >= 0).all()
    assert not out["placed"].all()  # 130 % of capacity cannot all fit
    for key, assignment in sim.state.assignments.items():
        demand = demands[int(key.split("-")[1])]
        placed_on = view.inventories[view.index[assignment.node]]
        if demand.allowed_models:
            assert placed_on.gpu_model in demand.allowed_models


@pytest.mark.parametrize("name", ["random", "fgd", "default"])
def test_replay_is_reproducible_for_a_seed(name):
    results = []
    for _ in range(2):
        nodes, demands, shapes = small_workload(9)
        results.append(replay("t", nodes, demands, make_policy(name, shapes), shapes, 9, np.random.default_rng([9, 1])))
    assert np.array_equal(results[0].allocated_milli, results[1].allocated_milli)
    assert np.array_equal(results[0].placed, results[1].placed)


def test_seed_metrics_on_a_replay():
    nodes, demands, shapes = small_workload(3)
    result = replay("t", nodes, demands, make_policy("fgd", shapes), shapes, 3, np.random.default_rng(0))
    metrics = seed_metrics(result)
    assert 0 < metrics.alloc130 <= 100 and metrics.alloc100 <= 100
    assert metrics.alloc130 >= metrics.alloc100 - 1e-9


# -- the command line, end to end on a slice of the openb trace ----------------------------------------------


@needs_openb
def test_simulate_end_to_end_on_openb_slice(tmp_path):
    nodes_csv = tmp_path / "openb_node_list_gpu_node.csv"
    with open(OPENB / "openb_node_list_gpu_node.csv") as f:
        lines = f.readlines()
    nodes_csv.write_text("".join(lines[:1] + lines[1::20]))  # every 20th node: 61 nodes
    pods_csv = tmp_path / "openb_pod_list_default.csv"
    with open(OPENB / "openb_pod_list_default.csv") as f:
        lines = f.readlines()
    pods_csv.write_text("".join(lines[:1] + lines[1::20]))
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    out = tmp_path / "out"
    args = parser.parse_args(
        [
            "--nodes",
            str(nodes_csv),
            "--pods",
            str(pods_csv),
            "--policy",
            "random,fgd,default",
            "--seeds",
            "2",
            "--mode",
            "both",
            "--out",
            str(out),
            "--reference",
            str(OPENB / "fgd_reference_results.csv"),
            "--quiet",
        ]
    )
    assert cli.run(args) == 0
    with open(out / "summary.csv") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    with open(OPENB / "fgd_reference_results.csv") as f:
        assert reader.fieldnames == next(csv.reader(f)) == list(SUMMARY_COLUMNS)
    assert {r["policy"] for r in rows} == {"01-Random", "06-FGD", "default", "default@kube-scheduler"}
    for r in rows:
        assert float(r["alloc_pct_at_arrival130"]) <= 100
    assert (out / "alloc_openb_pod_list_default.png").stat().st_size > 10_000
    steps = list((out / "steps" / "openb_pod_list_default").glob("*.csv.gz"))
    assert len(steps) == 8

    # The same seed gives the same curve.
    again = tmp_path / "again"
    args.out = str(again)
    args.mode = "sim"
    args.policy = ["fgd"]
    assert cli.run(args) == 0
    first = (out / "steps" / "openb_pod_list_default" / "06-FGD-seed42.csv.gz").read_bytes()
    second = (again / "steps" / "openb_pod_list_default" / "06-FGD-seed42.csv.gz").read_bytes()
    import gzip

    assert gzip.decompress(first) == gzip.decompress(second)


def test_mig_scenario_runs_and_never_overbooks():
    from scheduler.simulator.mig import run_mig

    first = run_mig("first-fit", seed=1, nodes=4)
    ours = run_mig("default", seed=1, nodes=4)
    for r in (first, ours):
        assert 0 < r.placed < r.requests
        assert r.slices_placed <= r.fleet_slices
    assert ours.slices_placed >= first.slices_placed
