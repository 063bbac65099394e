"""`plan.png`: what each used GPU (or MIG slice) of a plan holds, so a reader sees the packing at a glance.

One bar per used GPU or slice, stacked by model, twice: the share of its memory the replicas reserve, and the
share of its compute their demand takes, with the line the compute margin must stay under. Drawn from the plan's
report (the data of `plan.json`), so the picture and the file never disagree. Matplotlib is optional.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from policies.mig import MIG_TABLES, mig_table_for
from scheduler.plotting import pyplot

MAX_BARS = 80  # more bars than this are unreadable: the first ones are drawn and the title says so


def _bars(report: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]], int]]:
    """(label, replicas, memory MiB of the GPU or slice) per bar: a bar per shared GPU, a bar per MIG slice."""
    bars = []
    for gpu in report["gpus"]:
        label = f"{gpu['node']}/{gpu['gpu']}"
        shared = [r for r in gpu["replicas"] if r["mig_profile"] is None]
        if shared:
            bars.append((label, shared, gpu.get("memory_mib") or sum(r["memory_mib"] for r in shared)))
        for r in gpu["replicas"]:
            if r["mig_profile"] is not None:
                slice_mib = _slice_mib(gpu, r["mig_profile"])
                bars.append((f"{label} {r['mig_profile']}@{r['mig_start']}", [r], slice_mib or r["memory_mib"]))
    return bars


def _slice_mib(gpu: dict[str, Any], profile_name: str) -> int | None:
    table = mig_table_for(gpu["gpu_model"], gpu.get("memory_mib") or 0)
    profile = MIG_TABLES[table].profile(profile_name) if table else None
    if profile is None or not gpu.get("memory_mib"):
        return None
    return gpu["memory_mib"] * profile.memory_slices // 8


def _title(report: dict[str, Any], drawn: int, total: int) -> str:
    single = report["baselines"]["one_replica_per_gpu"]
    ffd = report["baselines"]["first_fit_decreasing"]
    title = (
        f"{report['gpus_used']} GPUs used vs {single['gpus']} with one replica per GPU "
        f"({single['gpus_saved_percent']:.0f}% saved) and {ffd['gpus']} with first-fit decreasing\n"
        f"gap to the proven lower bound {report['gap_percent']:.1f}% ({report['method']})"
    )
    if drawn < total:
        title += f"; the first {drawn} of {total} GPUs and slices"
    return title


def draw_plan(report: dict[str, Any], path: Path) -> Path | None:
    """Write the picture to `path`; None (after saying why) when matplotlib is missing or nothing is placed."""
    plt = pyplot(path.name)
    if plt is None:
        return None
    bars = _bars(report)
    if not bars:
        return None
    total = len(bars)
    bars = bars[:MAX_BARS]
    models = sorted({r["model"] for _, replicas, _ in bars for r in replicas})
    colors = {m: plt.get_cmap("tab20")(i % 20) for i, m in enumerate(models)}
    width = min(28.0, max(7.0, 0.35 * len(bars) + 2)) + 3.5  # and room for the legend
    fig, (memory_ax, load_ax) = plt.subplots(2, 1, figsize=(width, 7.5), sharex=True)
    x = range(len(bars))
    for ax, value in ((memory_ax, "memory"), (load_ax, "load")):
        bottom = [0.0] * len(bars)
        for model in models:
            heights = [
                sum(_share(r, value, capacity) for r in replicas if r["model"] == model)
                for _, replicas, capacity in bars
            ]
            ax.bar(x, heights, bottom=bottom, color=colors[model], label=model, width=0.8)
            bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    margin = report["options"]["margin"]
    memory_ax.axhline(100, color="black", linewidth=1)
    memory_ax.set_ylabel("memory reserved, % of GPU or slice")
    load_ax.axhline(100 * (1 - margin), color="red", linestyle="--", linewidth=1.2)
    load_ax.text(len(bars) - 0.5, 100 * (1 - margin), f" 1 - margin ({margin:g})", color="red", va="bottom", ha="right")
    load_ax.set_ylabel("compute load, % of GPU or slice")
    load_ax.set_ylim(0, 105)
    memory_ax.set_ylim(0, 105)
    load_ax.set_xticks(list(x), [label for label, _, _ in bars], rotation=90, fontsize=7)
    memory_ax.set_title(_title(report, len(bars), total), fontsize=10)
    memory_ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), title="model", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _share(replica: dict[str, Any], value: str, capacity: int) -> float:
    if value == "load":
        return float(replica["load_percent"])
    return 100.0 * replica["memory_mib"] / capacity if capacity else 0.0
