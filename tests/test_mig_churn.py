"""The MIG churn scenario: its no-fragmentation bound, its replay with departures, and its table."""

import pytest

from scheduler.simulator.mig_churn import (
    Arrival,
    ChurnScenario,
    churn_table,
    format_churn_table,
    run_bound,
    run_policy,
)

# One H100 (7 compute, 8 memory slices), measured from time 0.
ONE_GPU = ChurnScenario(gpus=1, warmup_lifetimes=0.0)
ARRIVALS = [
    Arrival(0.0, "4g.40gb", 10.0),  # 4 compute, 4 memory: placed
    Arrival(1.0, "1g.20gb", 10.0),  # 5, 6: placed
    Arrival(2.0, "1g.20gb", 1.0),  # 6, 8: placed, leaves at 3.0
    Arrival(2.5, "1g.10gb", 1.0),  # memory full: refused
    Arrival(3.5, "1g.10gb", 2.0),  # after the departure: 6, 7: placed
    Arrival(4.0, "3g.40gb", 5.0),  # 3 compute more than the 1 left: refused
]
# Compute slices x lifetime: placed 4x10 + 1x10 + 1x1 + 1x2 = 53; offered adds 1x1 + 3x5 = 69.


def test_bound_pools_compute_and_memory_slices():
    result = run_bound(ONE_GPU, ARRIVALS)
    assert (result.placed, result.requests) == (4, 6)
    assert result.carried_slice_s == pytest.approx(53)
    assert result.offered_slice_s == pytest.approx(69)
    assert result.by_profile["1g.10gb"] == (1, 2)
    assert result.by_profile["3g.40gb"] == (0, 1)


def test_first_fit_replay_releases_departed_instances():
    # First-fit: 4g at slot 0, 1g.20gb at 4 and 6, the 1g.10gb at 2.5 finds no slot; once the 1g.20gb at 6 has
    # left, the next 1g.10gb takes slot 6. The same as the bound on this list.
    result = run_policy("first-fit", ONE_GPU, ARRIVALS)
    assert (result.placed, result.requests) == (4, 6)
    assert result.carried_slice_s == pytest.approx(53)


def test_carving_loses_what_the_pool_keeps():
    # First-fit puts the 2g.20gb at slot 0, where the 4g.40gb must start; the pool has 7 - 2 compute and
    # 8 - 2 memory slices left, room for the 4g.
    arrivals = [Arrival(0.0, "2g.20gb", 10.0), Arrival(1.0, "4g.40gb", 10.0)]
    assert run_bound(ONE_GPU, arrivals).placed == 2
    assert run_policy("first-fit", ONE_GPU, arrivals).placed == 1


def test_measurement_skips_the_warm_up():
    scenario = ChurnScenario(gpus=1, warmup_lifetimes=1.0, mean_lifetime_s=2.0)  # measured from t = 2
    result = run_bound(scenario, ARRIVALS)
    # Counted: the 1g.20gb at 2.0 (placed), 1g.10gb at 2.5 (refused), 1g.10gb at 3.5 (placed), 3g at 4.0 (refused).
    assert (result.placed, result.requests) == (2, 4)
    assert (result.carried_slice_s, result.offered_slice_s) == pytest.approx((3, 19))


def test_churn_table_is_deterministic_and_reads_against_the_bound():
    rows = churn_table(loads=(1.1,), gpus=8, seeds=1)
    again = churn_table(loads=(1.1,), gpus=8, seeds=1)
    strip = [{k: v for k, v in r.items() if k != "elapsed_s"} for r in rows]
    assert strip == [{k: v for k, v in r.items() if k != "elapsed_s"} for r in again]
    by_policy = {r["policy"]: r for r in rows}
    assert set(by_policy) == {"first-fit", "mig-fit", "mig-fit-learnt", "bound"}
    assert by_policy["first-fit"]["gap_closed_pct"] == 0.0
    assert by_policy["bound"]["gap_closed_pct"] == 100.0
    assert 0 < by_policy["first-fit"]["carried_pct"] < by_policy["bound"]["carried_pct"] <= 100
    assert "| 1.1 | bound |" in format_churn_table(rows)


def test_arrivals_offer_the_load_asked():
    scenario = ChurnScenario(gpus=100, load=1.0, seed=3)
    arrivals = scenario.arrivals()
    horizon = (scenario.warmup_lifetimes + scenario.measured_lifetimes) * scenario.mean_lifetime_s
    compute = {"1g.10gb": 1, "1g.20gb": 1, "2g.20gb": 2, "3g.40gb": 3, "4g.40gb": 4, "7g.80gb": 7}
    offered = sum(compute[a.profile] * a.lifetime_s for a in arrivals) / horizon
    assert offered == pytest.approx(700, rel=0.05)  # slices in use on average = load x 7 x 100
    assert arrivals == scenario.arrivals()


def test_simulate_mig_churn_prints_and_writes_the_table(tmp_path, capsys):
    import argparse

    from scheduler.simulator import cli

    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    churn = ["--mig", "--mig-churn", "--mig-gpus", "4", "--mig-loads", "1.2", "--policy", "mig-fit-learnt"]
    args = parser.parse_args([*churn, "--out", str(tmp_path)])
    assert cli.run(args) == 0
    printed = capsys.readouterr().out
    assert "| 1.2 | first-fit |" in printed and "| 1.2 | mig-fit-learnt |" in printed
    assert "| 1.2 | mig-fit |" not in printed
    assert (tmp_path / "mig_churn_summary.csv").read_text().startswith("load,policy,carried_pct")
