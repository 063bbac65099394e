"""Each forecaster on hand-made arrival series: a daily pattern, a one-off spike, a model that goes silent."""

from __future__ import annotations

import numpy as np
import pytest

from policies.forecast import CostAwarePolicy, FixedKeepAlive, HistogramPolicy, ModelHistory, SeasonalPolicy, WarmPlan
from policies.forecast.costaware import best_window
from policies.forecast.histogram import percentile_sorted

DAY = 86_400.0
HOUR = 3600.0
LOAD = 20.0


def history_with_gaps(gaps: list[float], service: float = 0.0) -> tuple[ModelHistory, float]:
    """A history whose idle times are `gaps` (each request ends `service` after it arrives); returns it and
    when the model went idle after its last request."""
    h = ModelHistory()
    t = 0.0
    h.arrive(t, None)
    for gap in gaps:
        idle_since = t + service
        t = idle_since + gap
        h.arrive(t, idle_since)
    return h, t + service


def daily_history(hours: tuple[float, float], days: int, every_s: float = 300.0) -> ModelHistory:
    """Requests every `every_s` between the two hours of each of `days` days."""
    h = ModelHistory()
    for d in range(days):
        t = d * DAY + hours[0] * HOUR
        while t < d * DAY + hours[1] * HOUR:
            h.arrive(t, None)
            t += every_s
    return h


def test_history_records_idle_times_and_rejects_time_travel() -> None:
    h = ModelHistory()
    h.arrive(10.0, None)
    h.arrive(50.0, 20.0)
    h.arrive(60.0, None)
    assert h.idle_times == [30.0] and h.idle_sorted == [30.0]
    assert h.count_between(0.0, 60.0) == 2
    with pytest.raises(ValueError):
        h.arrive(5.0, None)


def test_warm_plan_needs_both_prewarm_bounds() -> None:
    with pytest.raises(ValueError):
        WarmPlan(keep_until=1.0, prewarm_at=5.0)
    with pytest.raises(ValueError):
        WarmPlan(keep_until=1.0, prewarm_at=5.0, prewarm_until=4.0)


def test_fixed_keep_alive_keeps_for_its_time_and_never_prewarms() -> None:
    h, idle = history_with_gaps([30.0] * 20)
    plan = FixedKeepAlive(600.0).plan(h, idle, idle, LOAD)
    assert plan == WarmPlan(keep_until=idle + 600.0)


# --- histogram (Serverless in the Wild) ------------------------------------------------------------------------


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile_sorted(values, 5) == 5.0
    assert percentile_sorted(values, 99) == 99.0
    assert percentile_sorted(values, 100) == 100.0


def test_histogram_prewarms_a_periodic_model_just_before_its_period() -> None:
    """A model called every hour (a daily-like pattern at a shorter period): let go at once, ready again before
    the hour, kept a little after it."""
    h, idle = history_with_gaps([HOUR] * 30)
    plan = HistogramPolicy().plan(h, idle, idle, LOAD)
    assert plan.keep_until == idle
    assert plan.prewarm_at is not None and plan.prewarm_until is not None
    assert idle + 0.85 * HOUR <= plan.prewarm_at < idle + HOUR
    assert idle + HOUR < plan.prewarm_until <= idle + 1.15 * HOUR


def test_histogram_keeps_a_bursty_model_warm_and_ignores_a_one_off_spike() -> None:
    """Idle times of about 30 s with one 10-hour outlier: the head is shorter than a load, so the replica stays
    warm to the tail, and the one-off long gap (1 % of samples, beyond the range) does not stretch the tail."""
    h, idle = history_with_gaps([30.0] * 99 + [10 * HOUR])
    policy = HistogramPolicy()
    assert policy.representative(h)
    plan = policy.plan(h, idle, idle, LOAD)
    assert plan.prewarm_at is None
    assert idle + 60.0 <= plan.keep_until <= idle + 2 * 66.0


def test_histogram_falls_back_when_not_representative() -> None:
    few, idle = history_with_gaps([HOUR] * 5)
    assert HistogramPolicy().plan(few, idle, idle, LOAD) == WarmPlan(keep_until=idle + 600.0)
    beyond, idle = history_with_gaps([10 * HOUR] * 20 + [60.0] * 5)
    policy = HistogramPolicy(fallback_keep_s=300.0)
    assert not policy.representative(beyond)
    assert policy.plan(beyond, idle, idle, LOAD) == WarmPlan(keep_until=idle + 300.0)


def test_histogram_lets_a_silent_model_go_once_its_window_lapsed() -> None:
    h, idle = history_with_gaps([HOUR] * 30)
    first = HistogramPolicy().plan(h, idle, idle, LOAD)
    assert first.prewarm_until is not None
    again = HistogramPolicy().plan(h, idle, first.prewarm_until, LOAD)
    assert again == WarmPlan(keep_until=first.prewarm_until)


# --- seasonal ----------------------------------------------------------------------------------------------------


def test_seasonal_prewarms_ahead_of_the_daily_busy_hours() -> None:
    """Busy 09:00-11:00 every day for a week: idle at 03:00 on day 7, a replica is ready again at 09:00 and kept
    to 11:00."""
    h = daily_history((9.0, 11.0), days=7)
    now = 7 * DAY + 3 * HOUR
    plan = SeasonalPolicy().plan(h, now, now, LOAD)
    assert plan.keep_until == now + 600.0
    assert plan.prewarm_at == 7 * DAY + 9 * HOUR
    assert plan.prewarm_until == 7 * DAY + 11 * HOUR


def test_seasonal_keeps_warm_through_the_busy_hours() -> None:
    h = daily_history((9.0, 11.0), days=7)
    now = 7 * DAY + 9.25 * HOUR
    h.arrive(now - 60.0, None)
    plan = SeasonalPolicy().plan(h, now, now, LOAD)
    assert plan.keep_until == 7 * DAY + 11 * HOUR
    assert plan.prewarm_at == 8 * DAY + 9 * HOUR  # the next day's busy hours


def test_seasonal_ignores_a_one_off_spike() -> None:
    """Busy 09:00-11:00 daily, plus one burst at 15:00 on one day: 15:00 is not a hot bin."""
    h = ModelHistory()
    for d in range(7):
        for t in np.arange(d * DAY + 9 * HOUR, d * DAY + 11 * HOUR, 300.0):
            h.arrive(float(t), None)
        if d == 3:
            for t in np.arange(d * DAY + 15 * HOUR, d * DAY + 15.5 * HOUR, 60.0):
                h.arrive(float(t), None)
    policy = SeasonalPolicy()
    now = 7 * DAY + 12 * HOUR
    assert policy.occupancy(h, 7 * DAY + 15 * HOUR, now) == pytest.approx(1 / 7)
    plan = policy.plan(h, now, now, LOAD)
    assert plan.prewarm_at == 8 * DAY + 9 * HOUR  # tomorrow morning, not 15:00 today


def test_seasonal_stops_prewarming_a_model_that_went_silent() -> None:
    h = daily_history((9.0, 11.0), days=7)
    policy = SeasonalPolicy()
    after_three = 10 * DAY + 3 * HOUR  # silent for three days: 4 of 7 days still busy at 09:00
    assert policy.plan(h, after_three, after_three, LOAD).prewarm_at is not None
    after_week = 14 * DAY + 3 * HOUR  # silent for a week: nothing is hot any more
    assert policy.plan(h, after_week, after_week, LOAD) == WarmPlan(keep_until=after_week + 600.0)


def test_seasonal_new_model_gets_the_fallback() -> None:
    h = daily_history((9.0, 11.0), days=1)
    now = 1 * DAY + 3 * HOUR
    assert SeasonalPolicy(min_days=2).plan(h, now, now, LOAD) == WarmPlan(keep_until=now + 600.0)


def test_seasonal_rejects_bins_that_do_not_divide_a_day() -> None:
    with pytest.raises(ValueError):
        SeasonalPolicy(bin_s=7000.0)


# --- cost-aware histogram ---------------------------------------------------------------------------------------


def test_cost_aware_prewarms_a_periodic_model() -> None:
    h, idle = history_with_gaps([HOUR] * 30)
    plan = CostAwarePolicy(cold_cost_s=600.0).plan(h, idle, idle, LOAD)
    assert plan.keep_until == idle
    assert plan.prewarm_at is not None and plan.prewarm_until is not None
    assert plan.prewarm_at <= idle + HOUR <= plan.prewarm_until
    assert plan.prewarm_until - plan.prewarm_at <= 0.25 * HOUR  # warm only around the period, not through it


def test_cost_aware_keeps_a_bursty_model_warm_through_its_short_gaps() -> None:
    h, idle = history_with_gaps([20.0, 30.0, 40.0] * 10 + [HOUR])
    plan = CostAwarePolicy(cold_cost_s=600.0).plan(h, idle, idle, LOAD)
    assert plan.prewarm_at is None
    assert idle + 40.0 <= plan.keep_until < idle + HOUR  # covers the bursts, not the one-off hour


def test_cost_aware_price_moves_it_along_the_frontier() -> None:
    """Idle times spread evenly over 1 min..2 h: a cheap cold start lets the replica go at once, a dear one
    covers every idle time (ready by the shortest, warm to the longest)."""
    idle = np.linspace(60.0, 2 * HOUR, 50)
    cheap = best_window(idle, LOAD, cold_cost_s=1.0)
    dear = best_window(idle, LOAD, cold_cost_s=100 * HOUR)
    assert cheap == (0.0, 0.0)
    assert dear[0] <= 60.0 and dear[1] >= 2 * HOUR


def test_cost_aware_silent_model_is_let_go() -> None:
    h, idle = history_with_gaps([HOUR] * 30)
    later = idle + 5 * HOUR
    assert CostAwarePolicy().plan(h, idle, later, LOAD) == WarmPlan(keep_until=later)
