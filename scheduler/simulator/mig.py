"""MIG scenario: a stream of MIG profile requests onto a fleet of H100s in MIG mode.

The request mix is an assumption built from public descriptions of inference serving on MIG, by the memory a
model needs (weights plus a KV cache / activation margin):
- 1g.10gb, 35 %: small models, many replicas: encoders and classifiers (BERT, ResNet-50 — NVIDIA's MIG guide
  shows seven such inference servers per GPU), embedding and reranking models, 7-8B LLMs quantised to 4 bits.
- 1g.20gb, 15 %: small models that need more memory than compute: 7-8B LLMs in 8 bits, long-context small
  models, Stable-Diffusion-class image generation.
- 2g.20gb, 20 %: the same memory with twice the compute, for latency-bound small LLM replicas.
- 3g.40gb, 15 %: 7-8B LLMs in FP16/BF16 (about 15 GB of weights) with a KV cache, 13B quantised.
- 4g.40gb, 5 %: the same memory with more compute (13B in 8 bits, higher-throughput 7B replicas).
- 7g.80gb, 10 %: 13B in FP16 and 30-34B in 8 bits: a whole GPU.
Requests arrive one at a time, drawn from the mix with the seed, until the compute slices requested reach
`inflation` × the fleet's (7 per GPU); nothing departs; a request that fits nowhere fails and the stream goes on.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from policies.baselines import make_policy
from policies.config import PlacementPolicy
from policies.demand import Demand
from policies.fragmentation import typical_shapes
from policies.inventory import GpuDevice, NodeInventory
from policies.mig import MIG_TABLES
from scheduler.simulator.metrics import write_csv
from scheduler.simulator.replay import KubeSchedulerOptions, Replay

TABLE = "H100-80GB"
COMPUTE_SLICES_PER_GPU = 7

INFERENCE_MIX: dict[str, float] = {
    "1g.10gb": 0.35,
    "1g.20gb": 0.15,
    "2g.20gb": 0.20,
    "3g.40gb": 0.15,
    "4g.40gb": 0.05,
    "7g.80gb": 0.10,
}


def h100_fleet(nodes: int, gpus_per_node: int = 8) -> list[NodeInventory]:
    return [
        NodeInventory(
            f"h100-{i:04d}",
            cpu_milli=256_000,
            memory_mib=2_097_152,
            gpus=tuple(GpuDevice(g, "NVIDIA-H100-80GB-HBM3", 81_559, mig_table=TABLE) for g in range(gpus_per_node)),
        )
        for i in range(nodes)
    ]


def mig_demand(profile: str) -> Demand:
    p = MIG_TABLES[TABLE].profile(profile)
    assert p is not None
    return Demand(cpu_milli=2_000 * p.compute_slices, memory_mib=16_384 * p.compute_slices, mig_profile=profile)


def request_stream(
    fleet_slices: int, rng: np.random.Generator, inflation: float = 1.3, mix: dict[str, float] | None = None
) -> list[str]:
    mix = mix or INFERENCE_MIX
    names = list(mix)
    weights = np.array([mix[n] for n in names], dtype=np.float64)
    weights /= weights.sum()
    slices = {n: MIG_TABLES[TABLE].profile(n).compute_slices for n in names}  # type: ignore[union-attr]
    stream, total = [], 0
    while True:
        pick = names[int(rng.choice(len(names), p=weights))]
        if total + slices[pick] > inflation * fleet_slices:
            return stream
        stream.append(pick)
        total += slices[pick]


@dataclass
class MigResult:
    policy: str
    mode: str
    seed: int
    requests: int
    placed: int
    slices_requested: int
    slices_placed: int
    fleet_slices: int
    first_failure_pct: float  # arrived compute slices (% of the fleet's) at the first failed request
    placed_by_profile: dict[str, tuple[int, int]]
    elapsed_s: float


def run_mig(
    policy_name: str,
    seed: int,
    nodes: int = 64,
    inflation: float = 1.3,
    mode: str = "sim",
    kube: KubeSchedulerOptions | None = None,
    placement: PlacementPolicy | None = None,
) -> MigResult:
    started = time.perf_counter()
    fleet = h100_fleet(nodes)
    fleet_slices = nodes * 8 * COMPUTE_SLICES_PER_GPU
    rng = np.random.default_rng(seed)
    profiles = request_stream(fleet_slices, rng, inflation)
    order = rng.permutation(len(fleet))
    fleet = [fleet[i] for i in order]
    demands = [mig_demand(p) for p in profiles]
    shapes = typical_shapes(demands)
    policy = make_policy(policy_name, shapes, placement)
    sim = Replay(fleet, policy, shapes, np.random.default_rng([seed, 1]), mode=mode, kube=kube, frag_window=None)
    placed = 0
    slices_asked = slices_placed = 0
    first_failure = math.nan
    by_profile: dict[str, list[int]] = {p: [0, 0] for p in INFERENCE_MIX}
    for i, (profile, demand) in enumerate(zip(profiles, demands, strict=True)):
        size = MIG_TABLES[TABLE].profile(profile).compute_slices  # type: ignore[union-attr]
        slices_asked += size
        by_profile[profile][1] += 1
        if sim.place(f"mig-{i}", demand) is not None:
            placed += 1
            slices_placed += size
            by_profile[profile][0] += 1
        elif math.isnan(first_failure):
            first_failure = 100.0 * slices_asked / fleet_slices
    return MigResult(
        policy=policy.label,
        mode=mode,
        seed=seed,
        requests=len(profiles),
        placed=placed,
        slices_requested=slices_asked,
        slices_placed=slices_placed,
        fleet_slices=fleet_slices,
        first_failure_pct=first_failure,
        placed_by_profile={k: (v[0], v[1]) for k, v in by_profile.items()},
        elapsed_s=time.perf_counter() - started,
    )


def write_mig_summary(results: list[MigResult], out: Path) -> list[dict[str, object]]:
    """`mig_summary.csv`: per policy (mean over seeds) the share of requests and of compute slices placed."""
    groups: dict[tuple[str, str], list[MigResult]] = {}
    for r in results:
        groups.setdefault((r.policy, r.mode), []).append(r)
    rows = []
    for (policy, mode), runs in sorted(groups.items()):
        row: dict[str, object] = {
            "policy": policy if mode == "sim" else f"{policy}@{mode}",
            "n_seeds": len(runs),
            "requests": round(float(np.mean([r.requests for r in runs])), 1),
            "placed_pct_of_requests": round(float(np.mean([100 * r.placed / r.requests for r in runs])), 2),
            "fleet_slices_used_pct": round(float(np.mean([100 * r.slices_placed / r.fleet_slices for r in runs])), 2),
            "first_failure_at_arrived_pct": round(float(np.nanmean([r.first_failure_pct for r in runs])), 1),
        }
        for profile in INFERENCE_MIX:
            placed = sum(r.placed_by_profile[profile][0] for r in runs)
            asked = sum(r.placed_by_profile[profile][1] for r in runs)
            row[f"placed_pct_{profile}"] = round(100 * placed / asked, 1) if asked else ""
        rows.append(row)
    write_csv(out / "mig_summary.csv", rows)
    return rows
