"""`gpu-extender simulate --cold-starts --requests FILE`: every pre-warming policy on a request trace.

The first `--tune-days` of the trace choose each policy's parameters (the variant with the fewest cold starts at no
more GPU-hours than the 10-minute keep-alive; with sleep mode, the least added wait among those with 80 % fewer full
loads at no more than 1.1× its GPU-hours); the days after are the report, untouched by tuning (the forecasters still
learn from every earlier arrival, as a running pre-warmer would). Writes `coldstarts.csv` and, when matplotlib is
present, `coldstarts.png`.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from policies.forecast import CostAwarePolicy, FixedKeepAlive, Forecaster, HistogramPolicy, SeasonalPolicy
from scheduler.simulator.coldstart import LoadTimes, ReplayOptions, Result, replay
from scheduler.simulator.coldstart_bounds import clairvoyant, hindsight_windows
from scheduler.simulator.coldstart_trace import parse_columns, read_load_times, read_requests

DAY_S = 86_400.0
BASELINE_KEEP_S = 600.0
KEEP_CURVE_MIN = (0, 1, 2, 5, 10, 20, 30, 45, 60, 90, 120, 180, 240)
SLEEP_BUDGET = 1.1  # target: sleep mode at no more than 10 % more GPU-hours ...
SLEEP_LOAD_CUT = 0.8  # ... and 80 % fewer full loads
HINDSIGHT_PRICES_S = (600.0, 1200.0, 1800.0, 3600.0, 7200.0)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of the `--cold-starts` path (the flag itself and `--out` belong to `simulate`)."""
    g = parser.add_argument_group("cold starts (--cold-starts)")
    g.add_argument("--requests", help="request CSV: timestamp,model[,service_time] (the genai-serving trace as is)")
    g.add_argument("--columns", help="map the CSV's columns: timestamp=COL,model=COL,service_time=COL")
    g.add_argument("--load-times", help="load latencies CSV (default: the genai-serving base-model loads)")
    g.add_argument("--load-fixed", action="store_true", help="every load takes the latencies' median")
    g.add_argument(
        "--concurrency", type=int, default=1, help="requests one replica serves at once (default 1; 0: unlimited)"
    )
    g.add_argument(
        "--scale-down-s", type=float, default=600.0, help="an extra replica idle this long goes (default 600)"
    )
    g.add_argument("--tune-days", type=float, default=14.0, help="days that tune the policies (default 14)")
    g.add_argument("--sleep", action="store_true", help="also replay with vLLM sleep mode")
    g.add_argument("--wake-s", type=float, default=5.0, help="a sleeping replica wakes in (default 5 s)")
    g.add_argument(
        "--sleep-share", type=float, default=0.0125, help="GPU share a sleeping replica holds (default 1 GiB of 80)"
    )
    g.add_argument("--load-seed", type=int, default=0, help="seed of the drawn load times")
    g.add_argument(
        "--all-variants", action="store_true", help="also report every tuning variant on the report days (a frontier)"
    )


@dataclass(frozen=True)
class Candidate:
    family: str
    forecaster: Forecaster
    sleep_ttl_s: float | None = None  # with sleep mode: how long a replica sleeps before it unloads


def candidates() -> list[Candidate]:
    """Every variant the tuning days choose from, by family."""
    out = [Candidate("histogram", HistogramPolicy(head_pct=h, tail_pct=t)) for h in (1, 5) for t in (50, 75, 90, 99)]
    out += [
        Candidate("seasonal", SeasonalPolicy(bin_s=b, threshold=th)) for b in (1800.0, 3600.0) for th in (0.5, 0.7, 0.9)
    ]
    out += [Candidate("cost-aware", CostAwarePolicy(cold_cost_s=c)) for c in (600.0, 900.0, 1200.0, 1800.0)]
    return out


def sleep_candidates() -> list[Candidate]:
    """Sleep mode under a keep-alive or a forecaster (which then prices a start as a wake), each with a time a
    sleeper may hold its share before it unloads."""
    awake: list[Forecaster] = [FixedKeepAlive(k * 60.0) for k in (1, 2, 5, 10)]
    awake += [CostAwarePolicy(cold_cost_s=c) for c in (600.0, 1200.0)] + [SeasonalPolicy(threshold=0.9)]
    return [Candidate("sleep", f, ttl) for f in awake for ttl in (4 * 3600.0, 24 * 3600.0, math.inf)]


def _label(c: Candidate) -> str:
    if c.sleep_ttl_s is None:
        return c.forecaster.name
    ttl = "∞" if math.isinf(c.sleep_ttl_s) else f"{c.sleep_ttl_s / 3600:g} h"
    return f"{c.forecaster.name} + sleep {ttl}"


def choose(
    results: Sequence[tuple[Candidate, Result]],
    budget_h: float,
    key: Callable[[Result], float],
    admit: Callable[[Result], bool] = lambda r: True,
) -> int:
    """Index of the best result by `key` among those within the GPU-hour budget that `admit` lets in (else
    those within the budget; the cheapest when none fits)."""
    fits = [i for i, (_, r) in enumerate(results) if r.gpu_hours <= budget_h and admit(r)] or [
        i for i, (_, r) in enumerate(results) if r.gpu_hours <= budget_h
    ]
    if not fits:
        return min(range(len(results)), key=lambda i: results[i][1].gpu_hours)
    return min(fits, key=lambda i: (key(results[i][1]), results[i][1].gpu_hours))


def run(args: argparse.Namespace) -> int:
    if not args.requests:
        print("simulate --cold-starts: --requests FILE is required", file=sys.stderr)
        return 2
    try:
        trace = read_requests(args.requests, parse_columns(args.columns) if args.columns else None)
        loads = LoadTimes(read_load_times(args.load_times), fixed=args.load_fixed, seed=args.load_seed)
    except (OSError, ValueError) as exc:
        print(f"simulate --cold-starts: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    split = trace.first + args.tune_days * DAY_S
    base = ReplayOptions(concurrency=args.concurrency, scale_down_s=args.scale_down_s)
    tune = replace(base, measure_to=split)
    test = replace(base, measure_from=split)
    sleeping = {"sleep": True, "wake_s": args.wake_s, "sleep_share": args.sleep_share}
    print(
        f"{trace.requests} requests of {len(trace.by_model)} models ({trace.unnamed} without a model left out); "
        f"tuning before {split:.0f}, report after; load median {loads.median:.1f} s"
        + (" (fixed)" if loads.fixed else " (drawn)"),
        file=sys.stderr,
    )

    def play(c: Candidate, options: ReplayOptions) -> Result:
        if c.sleep_ttl_s is not None:
            options = replace(options, **sleeping, sleep_ttl_s=c.sleep_ttl_s)
        return replay(trace.by_model, c.forecaster, options, loads, name=_label(c))

    baseline = Candidate("keep-alive", FixedKeepAlive(BASELINE_KEEP_S))
    tune_base = play(baseline, tune)
    rows: list[tuple[str, str, Result]] = [("tune", "keep-alive", tune_base)]
    chosen: list[Candidate] = []
    families: dict[str, list[tuple[Candidate, Result]]] = {}
    pool = candidates() + (sleep_candidates() if args.sleep else [])
    for c in pool:
        r = play(c, tune)
        families.setdefault(c.family, []).append((c, r))
        rows.append(("tune", c.family, r))
    for family, results in families.items():
        if family == "sleep":  # the least added wait among those that cut full loads by 80 % within budget
            few = (1 - SLEEP_LOAD_CUT) * tune_base.full_loads
            budget = SLEEP_BUDGET * tune_base.gpu_hours
            i = choose(results, budget, lambda r: r.wait_mean_s, lambda r, few=few: r.full_loads <= few)
        else:
            i = choose(results, tune_base.gpu_hours, lambda r: r.waited)
        chosen.append(results[i][0])
    best = min(
        (c for c in chosen if c.family != "sleep"),
        key=lambda c: next(r for cc, r in families[c.family] if cc is c).waited,
    )
    report: list[tuple[str, str, Result]] = []
    for minutes in KEEP_CURVE_MIN:
        report.append(("test", "keep-alive", play(Candidate("keep-alive", FixedKeepAlive(minutes * 60.0)), test)))
    paper = Candidate("histogram", HistogramPolicy())
    report.append(("test", "histogram (paper's p5/p99)", play(paper, test)))
    for c in chosen:
        report.append(("test", f"{c.family} (tuned)" + (" = default" if c is best else ""), play(c, test)))
    if args.all_variants:
        report += [("test", f"{c.family} (variant)", play(c, test)) for c in pool if c not in chosen]
    for price in HINDSIGHT_PRICES_S:
        windows = hindsight_windows(trace.by_model, split, loads.median, price)
        name = f"hindsight window {price / 60:g} min/cold"
        fallback = FixedKeepAlive(BASELINE_KEEP_S)
        report.append(("test", "hindsight bound", replay(trace.by_model, fallback, test, loads, name, windows)))
    report.append(("test", "clairvoyant", clairvoyant(trace.by_model, test, loads.median)))
    rows += report
    csv_path = write_csv(rows, out / "coldstarts.csv")
    print_table(report)
    print(f"default by the tuning days: {_label(best)}")
    png = None if args.no_plot else plot(report, out / "coldstarts.png")
    print(f"wrote {csv_path}" + (f", {png}" if png else ""))
    return 0


def write_csv(rows: Sequence[tuple[str, str, Result]], path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = None
        for days, family, r in rows:
            row = {"days": days, "family": family, **r.row()}
            if writer is None:
                writer = csv.DictWriter(f, fieldnames=list(row))
                writer.writeheader()
            writer.writerow(row)
    return path


def print_table(rows: Sequence[tuple[str, str, Result]]) -> None:
    base = next((r for _, f, r in rows if r.policy == FixedKeepAlive(BASELINE_KEEP_S).name), None)
    print(
        f"{'policy':<56} {'cold':>6} {'%req':>6} {'onload':>6} {'loads':>6} {'wakes':>6} {'mean s':>7} {'p50w s':>7} "
        f"{'p99 s':>6} {'GPU-h':>8} {'asleep':>7} {'×base':>6}"
    )
    for _, family, r in rows:
        ratio = f"{r.gpu_hours / base.gpu_hours:6.2f}" if base and base.gpu_hours else "     -"
        name = r.policy if family == "keep-alive" else f"{r.policy} [{family}]"
        print(
            f"{name[:56]:<56} {r.waited:>6} {100 * r.waited_share:>6.2f} {r.waited_load:>6} {r.full_loads:>6} "
            f"{r.wakes:>6} {r.wait_mean_s:>7.2f} {r.wait_p50_s:>7.2f} {r.wait_p99_s:>6.1f} {r.gpu_hours:>8.1f} "
            f"{r.gpu_hours_sleeping:>7.1f} {ratio}"
        )


def plot(rows: Sequence[tuple[str, str, Result]], path: Path) -> Path | None:
    """Cold starts against GPU-hours: the keep-alive curve, every policy, the clairvoyant point."""
    from scheduler.plotting import pyplot

    plt = pyplot("coldstarts.png")
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(8, 5.5))
    curve = [r for _, f, r in rows if f == "keep-alive"]
    ax.plot([r.gpu_hours for r in curve], [_cold(r) for r in curve], "o-", color="grey", label="fixed keep-alive")
    for r in curve:
        ax.annotate(r.policy.removeprefix("keep-alive "), (r.gpu_hours, _cold(r)), fontsize=7, color="grey")
    markers = iter("sD^vP*Xh<>")
    bound = [r for _, f, r in rows if f == "hindsight bound"]
    if bound:
        xs, ys = [r.gpu_hours for r in bound], [_cold(r) for r in bound]
        ax.plot(xs, ys, "--", color="black", linewidth=1, label="hindsight bound: best window per model")
    variants = [r for _, f, r in rows if f.endswith("(variant)")]
    if variants:
        xs, ys = [r.gpu_hours for r in variants], [_cold(r) for r in variants]
        ax.plot(xs, ys, ".", color="silver", label="the other tuning variants")
    for _, family, r in rows:
        if family in ("keep-alive", "hindsight bound") or family.endswith("(variant)"):
            continue
        ax.plot([r.gpu_hours], [_cold(r)], next(markers, "o"), markersize=9, label=f"{r.policy} [{family}]")
    ax.set_xlabel("GPU-hours (awake + sleeping share)")
    base = next((r for r in curve if r.policy == FixedKeepAlive(BASELINE_KEEP_S).name), None)
    if base is not None:  # the target: half the cold starts of the 10-minute keep-alive at no more GPU-hours
        ax.plot([base.gpu_hours], [_cold(base) / 2], "x", color="black", markersize=10, label="target: ½ cold, ≤ GPU-h")
    ax.set_ylabel("cold starts (requests that waited, wakes apart)")
    ax.set_xscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("Cold starts against GPU-hours, report days")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _cold(r: Result) -> int:
    return r.waited - r.waited_wake
