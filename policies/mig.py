"""NVIDIA MIG profile tables and placement rules.

A MIG-capable GPU has eight memory slices. A GPU instance of a profile occupies a contiguous run of slices
that must start at one of the profile's allowed start slots (NVIDIA's "placements", as listed by
`nvidia-smi mig -lgipp`). We model a GPU's MIG state as a bitmask of occupied slices, which makes every
question the scheduler asks ("can a 3g go here?", "what does placing it cost?") a table lookup.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from policies.mig_demand import MigMix

SLICES = 8
FULL_MASK = (1 << SLICES) - 1


@dataclass(frozen=True)
class MigProfile:
    """One GPU-instance profile: its name as the device plugin advertises it and where it may start."""

    name: str
    compute_slices: int
    memory_slices: int
    starts: tuple[int, ...]

    def mask_at(self, start: int) -> int:
        return ((1 << self.memory_slices) - 1) << start


@dataclass(frozen=True)
class MigTable:
    """The profiles of one GPU model, in the order NVIDIA lists them (small to large)."""

    gpu_model: str
    profiles: tuple[MigProfile, ...]

    def profile(self, name: str) -> MigProfile | None:
        for p in self.profiles:
            if p.name == name:
                return p
        return None

    @property
    def profile_names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.profiles)


def _table(model: str, mem_per_slice_gb: tuple[str, str, str, str, str, str]) -> MigTable:
    """All current data-center MIG GPUs share one geometry; only the memory in the names differs."""
    one, one_double, two, three, four, seven = mem_per_slice_gb
    return MigTable(
        model,
        (
            MigProfile(f"1g.{one}", 1, 1, (0, 1, 2, 3, 4, 5, 6)),
            MigProfile(f"1g.{one_double}", 1, 2, (0, 2, 4, 6)),
            MigProfile(f"2g.{two}", 2, 2, (0, 2, 4)),
            MigProfile(f"3g.{three}", 3, 4, (0, 4)),
            MigProfile(f"4g.{four}", 4, 4, (0,)),
            MigProfile(f"7g.{seven}", 7, 8, (0,)),
        ),
    )


# Source: NVIDIA MIG user guide, "Supported MIG Profiles" (A100, H100, H200 tables).
MIG_TABLES: dict[str, MigTable] = {
    "A100-40GB": _table("A100-40GB", ("5gb", "10gb", "10gb", "20gb", "20gb", "40gb")),
    "A100-80GB": _table("A100-80GB", ("10gb", "20gb", "20gb", "40gb", "40gb", "80gb")),
    "H100-80GB": _table("H100-80GB", ("10gb", "20gb", "20gb", "40gb", "40gb", "80gb")),
    "H100-94GB": _table("H100-94GB", ("12gb", "24gb", "24gb", "47gb", "47gb", "94gb")),
    "H200-141GB": _table("H200-141GB", ("18gb", "35gb", "35gb", "71gb", "71gb", "141gb")),
}

# How much the scheduler values keeping one more instance of each profile size placeable. Larger instances are
# rarer to assemble once a GPU is carved up, so they weigh more; the default follows their compute share.
DEFAULT_PROFILE_VALUE: dict[int, float] = {1: 1.0, 2: 2.0, 3: 3.0, 4: 4.0, 7: 7.0}


def free_starts(profile: MigProfile, occupied: int) -> list[int]:
    """Start slots where `profile` fits into the free slices of a GPU with `occupied` slices taken."""
    return [s for s in profile.starts if not profile.mask_at(s) & occupied]


@cache
def max_placeable(table_name: str, profile_name: str, occupied: int) -> int:
    """Most instances of one profile that could be created at once in the free slices (exact search)."""
    profile = MIG_TABLES[table_name].profile(profile_name)
    assert profile is not None
    best = 0
    for start in free_starts(profile, occupied):
        best = max(best, 1 + max_placeable(table_name, profile_name, occupied | profile.mask_at(start)))
    return best


@cache
def placeable_value(table_name: str, occupied: int) -> float:
    """Value of a GPU's free slices: for each profile, how many instances it could still take, weighted."""
    table = MIG_TABLES[table_name]
    return sum(
        DEFAULT_PROFILE_VALUE.get(p.compute_slices, float(p.compute_slices))
        * max_placeable(table_name, p.name, occupied)
        for p in table.profiles
    )


def placement_loss(table_name: str, occupied: int, profile: MigProfile, start: int) -> float:
    """How much placeable value a new instance at `start` destroys beyond what it uses itself."""
    return placeable_value(table_name, occupied) - placeable_value(table_name, occupied | profile.mask_at(start))


def learnt_placeable_value(table_name: str, occupied: int, mix: MigMix) -> float:
    """Value of a GPU's free slices under the demand actually seen: for each profile, the instances it could still
    take, weighted by its share of recent requests and by its compute slices squared (the compute an instance
    carries, times how much harder a larger one is to assemble again). A profile nobody asks for is worth nothing
    to keep placeable, however large.

    On the MIG churn scenario (load 1.0, seeds 0-2, 10 lifetimes measured) the exponent of the size closed 26 %
    (0), 34 % (1), 37 % (2) and 38 % (3) of the gap between first-fit and the no-fragmentation bound."""
    shares = mix.shares_of(MIG_TABLES[table_name].profile_names)
    return sum(share * worth for share, worth in zip(shares, _sized_counts(table_name, occupied), strict=True))


@cache
def _sized_counts(table_name: str, occupied: int) -> tuple[int, ...]:
    """Per profile of the table: instances still placeable × compute slices squared."""
    return tuple(
        p.compute_slices**2 * max_placeable(table_name, p.name, occupied) for p in MIG_TABLES[table_name].profiles
    )


def learnt_placement_loss(table_name: str, occupied: int, profile: MigProfile, start: int, mix: MigMix) -> float:
    """`placement_loss` with the values of `learnt_placeable_value`."""
    after = occupied | profile.mask_at(start)
    return learnt_placeable_value(table_name, occupied, mix) - learnt_placeable_value(table_name, after, mix)


def placeable_profiles(table_name: str, occupied: int) -> list[str]:
    """Names of the profiles that could still be created on a GPU with `occupied` slices taken."""
    return [p.name for p in MIG_TABLES[table_name].profiles if free_starts(p, occupied)]


def mig_table_for(model: str, memory_mib: int = 0) -> str | None:
    """The MIG table of a GPU model name as GFD or NVML report it (e.g. `NVIDIA-H100-80GB-HBM3`)."""
    upper = model.upper()
    if "H200" in upper:
        return "H200-141GB"
    if "H100" in upper:
        if "94GB" in upper or "NVL" in upper:
            return "H100-94GB"
        return "H100-80GB"
    if "A100" in upper:
        if "80GB" in upper or memory_mib > 50_000:
            return "A100-80GB"
        return "A100-40GB"
    return None


def find_profile(profile_name: str) -> list[str]:
    """The MIG tables that know a profile name (several GPU models share names such as `3g.40gb`)."""
    return [name for name, table in MIG_TABLES.items() if table.profile(profile_name) is not None]
