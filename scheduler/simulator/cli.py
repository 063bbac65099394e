"""`gpu-extender simulate`: replay openb traces (or a MIG request stream) through the placement policies.

Examples:
  gpu-extender simulate --nodes openb_node_list_gpu_node.csv --pods openb_pod_list_default.csv \\
      --policy random,best-fit,fgd,default --seeds 10 --jobs 2 --out results/
  gpu-extender simulate --mig --policy first-fit,default --seeds 5 --out results-mig/
  gpu-extender simulate --mig --mig-churn --seeds 1 --out results-mig-churn/
  gpu-extender simulate --cold-starts --requests lora_request_trace.csv [--sleep] --out results-coldstarts/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from policies.baselines import OTHER_POLICY_NAMES, POLICY_NAMES
from scheduler.simulator.replay import KubeSchedulerOptions

MODES = ("sim", "kube-scheduler", "both")
DEFAULT_REFERENCE = "fgd_reference_results.csv"


def _split(values: list[str]) -> list[str]:
    return [v for value in values for v in value.split(",") if v]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nodes", help="node list CSV (sn,cpu_milli,memory_mib,gpu,model)")
    parser.add_argument(
        "--pods", action="append", default=[], help="pod list CSV (repeat or comma-separate for several lists)"
    )
    parser.add_argument(
        "--policy",
        action="append",
        default=[],
        help=f"policies, comma-separated: {', '.join(POLICY_NAMES + OTHER_POLICY_NAMES)}, or 'all' (default: all)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="number of seeds (default 10; 1 for --mig-churn, each seed's run is long)",
    )
    parser.add_argument("--seed-base", type=int, default=42, help="first seed (default 42)")
    parser.add_argument("--inflation", type=float, default=1.3, help="GPU request to replay, × capacity (1.3)")
    parser.add_argument("--mode", choices=MODES, default="sim", help="sim, kube-scheduler or both (default sim)")
    parser.add_argument(
        "--kube-policies", default="default", help="with --mode both: the policies also run in kube-scheduler mode"
    )
    parser.add_argument(
        "--extender-weight",
        type=int,
        default=100,
        help="the extender's weight in the scheduler profile (default 100, as shipped in manifests/base; above 20 no "
        "built-in score can overturn our best node)",
    )
    parser.add_argument(
        "--percentage-of-nodes-to-score",
        type=int,
        default=0,
        help="kube-scheduler's percentageOfNodesToScore (default 0: its adaptive default, as shipped in "
        "manifests/base)",
    )
    parser.add_argument(
        "--builtin-scores",
        action="store_true",
        help="kube-scheduler mode adds the built-in NodeResourcesFit score (the shipped profile disables the "
        "built-in scorers; at weight 100 they cannot overturn our unique best node either way)",
    )
    parser.add_argument(
        "--fit-strategy",
        choices=("LeastAllocated", "MostAllocated"),
        default="LeastAllocated",
        help="NodeResourcesFit scoring strategy with --builtin-scores (default LeastAllocated, kube-scheduler's)",
    )
    parser.add_argument(
        "--balanced-allocation",
        action="store_true",
        help="with --builtin-scores, NodeResourcesBalancedAllocation too (kube-scheduler's default profile)",
    )
    parser.add_argument(
        "--sample-retries",
        type=int,
        default=0,
        help="kube-scheduler mode: a pod that no node of kube-scheduler's node sample can take, while another node "
        "could, is tried again on the next sample up to this many times, as a running scheduler requeues it "
        "(default 0: counted as failed, as the FGD protocol and the end-to-end replay do)",
    )
    parser.add_argument("--policy-file", help="placement policy YAML for the 'default' policy")
    parser.add_argument("--jobs", type=int, default=1, help="parallel worker processes")
    parser.add_argument("--out", default="simulation-results", help="output folder")
    parser.add_argument("--reference", help="published results CSV to compare with (default: beside --pods)")
    parser.add_argument("--no-steps", action="store_true", help="do not write per-arrival curves")
    parser.add_argument("--no-plot", action="store_true", help="do not draw PNG plots")
    parser.add_argument("--quiet", action="store_true", help="no progress display")
    parser.add_argument("--verify", action="store_true", help="check every reused evaluation against a full one")
    parser.add_argument("--mig", action="store_true", help="run the MIG scenario instead of a trace")
    parser.add_argument("--mig-nodes", type=int, default=64, help="H100 nodes (8 GPUs each) in the MIG scenario")
    parser.add_argument(
        "--mig-churn",
        action="store_true",
        help="the MIG scenario with departures (Poisson arrivals, exponential lifetimes, dynamic carving) at "
        "several loads, against the no-fragmentation bound (implies --mig)",
    )
    parser.add_argument("--mig-gpus", type=int, default=100, help="H100-80GB GPUs in the MIG churn scenario")
    parser.add_argument(
        "--mig-loads",
        default="0.7,0.8,0.9,1.0,1.1,1.2",
        help="offered loads (compute slices in use on average over the fleet's) of the MIG churn scenario",
    )
    parser.add_argument(
        "--cold-starts", action="store_true", help="replay a request trace through the pre-warming policies instead"
    )
    from scheduler.simulator import coldstart_cli

    coldstart_cli.add_arguments(parser)


def _policies(args: argparse.Namespace, default: list[str]) -> list[str]:
    names = _split(args.policy) or default
    if "all" in names:
        names = list(POLICY_NAMES) + [n for n in names if n != "all" and n not in POLICY_NAMES]
    for name in names:
        if name not in POLICY_NAMES + OTHER_POLICY_NAMES:
            raise SystemExit(f"unknown policy {name!r}; known: {', '.join(POLICY_NAMES + OTHER_POLICY_NAMES)}")
    return names


def _kube(args: argparse.Namespace) -> KubeSchedulerOptions:
    return KubeSchedulerOptions(
        extender_weight=args.extender_weight,
        percentage_of_nodes_to_score=args.percentage_of_nodes_to_score,
        builtin_scores=args.builtin_scores,
        fit_strategy=args.fit_strategy,
        balanced_allocation=args.balanced_allocation,
        sample_retries=args.sample_retries,
    )


def _run_mig(args: argparse.Namespace, out: Path) -> int:
    from scheduler.simulator.mig import run_mig, write_mig_summary
    from scheduler.simulator.runner import Progress

    policies = _policies(args, ["first-fit", "default"])
    modes = ["sim", "kube-scheduler"] if args.mode == "both" else [args.mode]
    runs = [(p, m, args.seed_base + s) for p in policies for m in modes for s in range(args.seeds)]
    bar = Progress(len(runs), enabled=not args.quiet)
    results = []
    for policy, mode, seed in runs:
        results.append(run_mig(policy, seed, args.mig_nodes, args.inflation, mode, _kube(args)))
        bar.update(f"{policy} {mode} seed {seed}")
    rows = write_mig_summary(results, out)
    for row in rows:
        print(
            f"{row['policy']:>24}: {row['placed_pct_of_requests']:6.2f} % of requests placed, "
            f"{row['fleet_slices_used_pct']:6.2f} % of slices used, first failure at "
            f"{row['first_failure_at_arrived_pct']} % arrived"
        )
    print(f"wrote {out / 'mig_summary.csv'}")
    return 0


def _run_mig_churn(args: argparse.Namespace, out: Path) -> int:
    from scheduler.simulator.metrics import write_csv
    from scheduler.simulator.mig_churn import CHURN_POLICIES, churn_table, format_churn_table

    names = tuple(_split(args.policy)) or CHURN_POLICIES
    unknown = [n for n in names if n not in CHURN_POLICIES]
    if unknown:
        raise SystemExit(f"unknown MIG churn policy {unknown[0]!r}; known: {', '.join(CHURN_POLICIES)}")
    if "first-fit" not in names:
        names = ("first-fit", *names)  # the gap is measured from first-fit
    loads = tuple(float(v) for v in args.mig_loads.split(",") if v)
    rows = churn_table(loads, names, args.mig_gpus, args.seeds or 1, args.seed_base)
    print(format_churn_table(rows))
    write_csv(out / "mig_churn_summary.csv", rows)
    print(f"wrote {out / 'mig_churn_summary.csv'}")
    return 0


def run(args: argparse.Namespace) -> int:
    from scheduler.simulator.runner import (
        Task,
        plot_curves,
        read_reference,
        run_tasks,
        write_comparison,
        write_curves,
        write_steps,
        write_summary,
    )

    if args.cold_starts:
        from scheduler.simulator import coldstart_cli

        return coldstart_cli.run(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.mig_churn:
        return _run_mig_churn(args, out)
    args.seeds = args.seeds or 10
    if args.mig:
        return _run_mig(args, out)
    pods = _split(args.pods)
    if not args.nodes or not pods:
        print("simulate: --nodes and --pods are required (or --mig)", file=sys.stderr)
        return 2
    policies = _policies(args, list(POLICY_NAMES))
    kube = _kube(args)
    modes = ["sim", "kube-scheduler"] if args.mode == "both" else [args.mode]
    kube_policies = set(_split([args.kube_policies])) if args.mode == "both" else set(policies)
    seeds = [args.seed_base + i for i in range(args.seeds)]
    tasks = [
        Task(args.nodes, p, policy, mode, seed, args.inflation, kube, args.policy_file, args.verify)
        for p in pods
        for policy in policies
        for mode in modes
        if mode == "sim" or policy in kube_policies
        for seed in seeds
    ]
    # Longest first keeps both workers busy to the end.
    tasks.sort(key=lambda t: (t.policy not in ("default", "fgd"), t.mode == "sim"))

    def keep(result) -> None:
        if not args.no_steps:
            write_steps(result, out)

    results = run_tasks(tasks, args.jobs, keep, progress=not args.quiet)
    rows = write_summary(results, out)
    curves = write_curves(results, out)
    reference = Path(args.reference) if args.reference else Path(pods[0]).with_name(DEFAULT_REFERENCE)
    write_comparison(rows, reference, out)
    plots: list[Path] = []
    if not args.no_plot:
        published = {k: v for k, v in read_reference(reference).items() if k[0] in {w for w, _ in curves}}
        plots = plot_curves(curves, out, published)
    times = [r.elapsed_s for r in results]
    print(f"{len(results)} runs, {sum(times):.0f}s of replay, {max(times):.1f}s the longest")
    _print_table(rows)
    print(f"wrote {out}/summary.csv, curves.csv, vs_published.csv" + "".join(f", {p.name}" for p in plots))
    return 0


def _print_table(rows: list[dict[str, object]]) -> None:
    print(f"{'workload':<28} {'policy':<26} {'@100%':>7} {'@130%':>7} {'frag90':>7} {'lag>1':>6}")
    for r in rows:
        print(
            f"{r['workload']!s:<28} {r['policy']!s:<26} {r['alloc_pct_at_arrival100']!s:>7} "
            f"{r['alloc_pct_at_arrival130']!s:>7} {r['frag_pct_at_arrival90']!s:>7} "
            f"{r['first_arrival_pct_alloc_lags_gt1pt']!s:>6}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu-extender simulate", description=__doc__)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
