"""The cold-start replay on tiny traces computed by hand, and `simulate --cold-starts` on a small CSV."""

from __future__ import annotations

import csv
import importlib.util
import math
from pathlib import Path

import pytest

from policies.forecast import FixedKeepAlive, ModelHistory, WarmPlan
from scheduler.simulator.cli import main
from scheduler.simulator.coldstart import LoadTimes, ReplayOptions, Request, replay
from scheduler.simulator.coldstart_bounds import clairvoyant
from scheduler.simulator.coldstart_trace import parse_columns, read_requests

LOAD = LoadTimes((10.0,), fixed=True)


def reqs(*pairs: tuple[float, float]) -> dict[str, list[Request]]:
    return {"m": [Request(a, s) for a, s in pairs]}


def test_cold_start_then_warm_hit_then_cold_again() -> None:
    """Load 10 s, keep-alive 60 s. t=0 loads (ready 10, runs to 15); t=30 is a warm hit (runs to 35, kept to 95);
    t=200 loads again (ready 210, runs to 215, kept to 275). GPU time: 0..95 and 200..275 = 170 s."""
    r = replay(reqs((0, 5), (30, 5), (200, 5)), FixedKeepAlive(60), ReplayOptions(), LOAD)
    assert (r.requests, r.waited, r.waited_load, r.full_loads, r.wakes) == (3, 2, 2, 2, 0)
    assert r.wait_mean_s == pytest.approx(20 / 3)
    assert r.wait_p50_s == pytest.approx(10.0)
    assert r.gpu_hours_awake * 3600 == pytest.approx(170.0)
    assert r.gpu_hours_sleeping == 0.0


def test_scale_up_under_concurrency() -> None:
    """One request per replica. t=0 loads and runs 10..110; t=50 finds it busy: a second replica loads (ready
    60) and takes the request (wait 10, runs to 70); idle for the scale-down delay (30 s) while the first stays up,
    it goes at 100. The first goes 60 s after the model is idle (110): 0..170 + 50..100 = 220 s."""
    options = ReplayOptions(concurrency=1, scale_down_s=30)
    r = replay(reqs((0, 100), (50, 10)), FixedKeepAlive(60), options, LOAD)
    assert (r.waited, r.waited_load, r.full_loads) == (2, 2, 2)
    assert sorted(w for w in [r.wait_mean_s * 2 - 10]) == [pytest.approx(10.0)]
    assert r.gpu_hours_awake * 3600 == pytest.approx(220.0)
    # two requests at once fit one replica of concurrency 2: no scale-up, the second request does not wait
    two = replay(reqs((0, 100), (50, 10)), FixedKeepAlive(60), ReplayOptions(concurrency=2), LOAD)
    assert (two.waited, two.full_loads) == (1, 1)
    assert two.gpu_hours_awake * 3600 == pytest.approx(170.0)


def test_a_busy_slot_that_frees_first_takes_the_request_but_the_scale_up_still_loads() -> None:
    """t=0 runs 10..12; t=11 finds the slot busy until 12, sooner than a new replica (21): it waits 1 s on the
    busy slot, and the new replica loads all the same (the autoscaler saw the queue)."""
    options = ReplayOptions(concurrency=1, scale_down_s=30)
    r = replay(reqs((0, 2), (11, 1)), FixedKeepAlive(60), options, LOAD)
    assert r.full_loads == 2
    assert (r.waited, r.waited_load) == (2, 1)
    assert r.wait_mean_s == pytest.approx((10 + 1) / 2)


def test_sleep_and_wake_are_counted_apart() -> None:
    """Sleep mode, wake 2 s, a sleeper holds half a GPU. t=0 loads (ready 10, runs to 15), sleeps at 75; t=1000
    wakes it (wait 2, runs 1002..1007), it sleeps at 1067 until the replay stops at 1100. Awake 75 + 67 s;
    asleep 925 + 33 s at half a GPU."""
    options = ReplayOptions(sleep=True, wake_s=2.0, sleep_share=0.5, stop_after_s=100.0)
    r = replay(reqs((0, 5), (1000, 5)), FixedKeepAlive(60), options, LOAD)
    assert (r.full_loads, r.wakes, r.waited_load, r.waited_wake) == (1, 1, 1, 1)
    assert r.gpu_hours_awake * 3600 == pytest.approx(142.0)
    assert r.gpu_hours_sleeping * 3600 == pytest.approx(958 * 0.5)
    # a sleeper unloads after its time to live (100 s): the second request is a full load again, and each
    # sleep (75..175 and 1075..1175) holds a default 1/80 of a GPU
    short = replay(reqs((0, 5), (1000, 5)), FixedKeepAlive(60), ReplayOptions(sleep=True, sleep_ttl_s=100.0), LOAD)
    assert (short.full_loads, short.wakes) == (2, 0)
    assert short.gpu_hours_sleeping * 3600 == pytest.approx(200 * 0.0125)


class _Prewarm:
    """Lets go at once; a replica is ready 100 s after the model went idle and kept 100 s more."""

    name = "test prewarm"

    def plan(self, history: ModelHistory, idle_since: float, now: float, start_s: float) -> WarmPlan:
        if now > idle_since:
            return WarmPlan(keep_until=now)
        return WarmPlan(keep_until=idle_since, prewarm_at=idle_since + 100, prewarm_until=idle_since + 200)


def test_prewarm_loads_ahead_of_the_window_and_the_request_finds_it_warm() -> None:
    """t=0 loads (ready 10, no service): let go at 10; the pre-warm loads at 100 to be ready at 110; t=150 finds
    it warm; let go at 150; the next pre-warm loads at 240 and runs until the replay stops at 250.
    GPU time 10 + 50 + 10 s; 3 loads, 2 of them pre-warms."""
    r = replay(reqs((0, 0), (150, 0)), _Prewarm(), ReplayOptions(stop_after_s=100.0), LOAD)
    assert (r.waited, r.full_loads, r.prewarm_loads) == (1, 3, 2)
    assert r.gpu_hours_awake * 3600 == pytest.approx(70.0)


def test_measure_window_counts_only_its_requests_and_hours() -> None:
    """The same trace as the first test, measured from t=100: only t=200 counts; GPU time 200..275."""
    r = replay(reqs((0, 5), (30, 5), (200, 5)), FixedKeepAlive(60), ReplayOptions(measure_from=100.0), LOAD)
    assert (r.requests, r.waited, r.full_loads) == (1, 1, 1)
    assert r.gpu_hours_awake * 3600 == pytest.approx(75.0)


def test_clairvoyant_loads_just_in_time_and_keeps_warm_only_below_break_even() -> None:
    """Busy 0..13 (two overlapping requests on one replica) and 100..105; load 10: spans -10..13 and 90..105."""
    options = ReplayOptions(concurrency=0)
    r = clairvoyant(reqs((0, 5), (8, 5), (100, 5)), options, 10.0)
    assert (r.waited, r.full_loads) == (0, 2)
    assert r.gpu_hours_awake * 3600 == pytest.approx(38.0)
    # a gap shorter than a load is kept warm: busy 0..5 and 12..15 -> one span -10..15
    near = clairvoyant(reqs((0, 5), (12, 3)), options, 10.0)
    assert near.full_loads == 1 and near.gpu_hours_awake * 3600 == pytest.approx(25.0)
    # with one request per replica, overlapping requests need two replicas
    two = clairvoyant(reqs((0, 5), (2, 5)), ReplayOptions(concurrency=1), 10.0)
    assert two.full_loads == 2 and two.gpu_hours_awake * 3600 == pytest.approx(15.0 + 15.0)


def test_drawn_load_times_are_seeded_per_model() -> None:
    loads = LoadTimes((1.0, 2.0, 3.0, 50.0), seed=7)
    assert loads.median == 2.5
    a, b = loads.sampler("m"), loads.sampler("m")
    assert [a() for _ in range(20)] == [b() for _ in range(20)]
    with pytest.raises(ValueError):
        LoadTimes(())


# --- reading and the CLI -----------------------------------------------------------------------------------------


def test_reader_maps_the_genai_layout_and_leaves_unnamed_requests_out(tmp_path: Path) -> None:
    path = tmp_path / "genai.csv"
    path.write_text(
        "gmt_create,predict_type,exec_time_seconds,checkpoint_model_version_id\n"
        "2024-11-15 16:57:50,TXT_2_IMG,32.0,M0\n"
        "2024-11-15 16:57:40,TXT_2_IMG,3.0,M0\n"
        "2024-11-15 16:58:00,TXT_2_IMG,5.0,\n"
    )
    trace = read_requests(path)
    assert trace.unnamed == 1
    assert [r.service_s for r in trace.by_model["M0"]] == [3.0, 32.0]  # sorted by arrival
    generic = tmp_path / "generic.csv"
    generic.write_text("when,name\n10,a\n5,a\n")
    mapped = read_requests(generic, parse_columns("timestamp=when,model=name"))
    assert [r.arrival for r in mapped.by_model["a"]] == [5.0, 10.0]
    with pytest.raises(ValueError, match="lacks"):
        read_requests(generic)
    bad = tmp_path / "bad.csv"
    bad.write_text("timestamp,model,service_time\n1,a,-3\n")
    with pytest.raises(ValueError, match=":2"):
        read_requests(bad)


def test_cli_writes_its_table_and_csv(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Three days of two models (one busy each morning, one every 40 minutes); tuning on the first two."""
    requests = tmp_path / "requests.csv"
    with requests.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["timestamp", "model", "service_time"])
        for day in range(3):
            for minute in range(0, 120, 7):
                w.writerow([day * 86400 + 9 * 3600 + minute * 60, "morning", 20])
            for minute in range(0, 1440, 40):
                w.writerow([day * 86400 + minute * 60, "periodic", 5])
    loads = tmp_path / "loads.csv"
    loads.write_text("timestamp_anon,value,container_ip\n1,20000,a\n2,25000,b\n3,30000,a\n")
    out = tmp_path / "out"
    args = ["--cold-starts", "--requests", str(requests), "--load-times", str(loads), "--tune-days", "2"]
    code = main([*args, "--sleep", "--out", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "keep-alive 10 min" in printed and "clairvoyant" in printed and "default by the tuning days" in printed
    with (out / "coldstarts.csv").open() as f:
        rows = list(csv.DictReader(f))
    test_rows = [r for r in rows if r["days"] == "test"]
    assert {r["family"] for r in test_rows} >= {"keep-alive", "clairvoyant", "sleep (tuned)"}
    clair = next(r for r in test_rows if r["family"] == "clairvoyant")
    assert clair["cold_starts"] == "0" and int(clair["requests"]) > 0
    assert all(math.isfinite(float(r["gpu_hours"])) for r in rows)
    assert (out / "coldstarts.png").exists() == (importlib.util.find_spec("matplotlib") is not None)


def test_cli_refuses_without_requests(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert main(["--cold-starts", "--out", str(tmp_path)]) == 2
    assert "--requests" in capsys.readouterr().err


def test_hindsight_window_fits_each_model_on_the_measured_days() -> None:
    """A model called every hour from t=0: its idle times from t=3h on are all about an hour; the window fitted to
    them pre-warms before the hour. Measured from 3 h on: the request at 3 h ends a gap begun before (the 10-minute
    keep-alive's, a cold start); the six after it find a pre-warmed replica."""
    from scheduler.simulator.coldstart_bounds import hindsight_windows, idle_gaps

    trace = {"m": [Request(h * 3600.0, 5.0) for h in range(10)]}
    assert list(idle_gaps(trace["m"], 3 * 3600.0)) == [3595.0] * 7
    windows = hindsight_windows(trace, 3 * 3600.0, 10.0, cold_cost_s=600.0)
    assert 0 < windows["m"].head_s <= 3595.0 <= windows["m"].tail_s
    options = ReplayOptions(measure_from=3 * 3600.0)
    r = replay(trace, FixedKeepAlive(600), options, LOAD, per_model=windows)
    assert (r.requests, r.waited) == (7, 1)
    assert r.full_loads == 8 and r.prewarm_loads == 7  # and one more after the last request, unused
