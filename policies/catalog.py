"""The model catalog: what each served LLM needs of a GPU and what one replica of it serves there.

A versioned, validated YAML document like the placement policy (usually the `gpu-extender-models` ConfigMap; the
shipped default is `policies/models.yaml`). The co-location planner sizes replicas by `memory_mib` and spreads load
by `requests_per_second`; both come from here, so a wrong number must fail loudly at load, not mislead a plan.

Memory follows a model's `config.json`: weights = parameters × bytes per parameter; KV cache per token =
2 (K and V) × layers × KV heads × head dim × bytes per value, reserved for `concurrency` sequences of
`contextTokens`; plus a fixed overhead for the CUDA context, graphs and activations.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator

from policies.documents import StrictModel, read_text, yaml_mapping
from policies.mig import MIG_TABLES, find_profile, mig_table_for

MIB = 1 << 20

# Memory of whole GPUs as their datasheets state it, in decimal GB. A name matches a GPU model by its parts
# (see `gpu_matches`): "A100-80GB" matches "NVIDIA-A100-SXM4-80GB". MIG slices take the GB of their profile name.
GPU_MEMORY_GB: dict[str, int] = {
    "A100-40GB": 40,
    "A100-80GB": 80,
    "H100-80GB": 80,
    "H100-PCIe": 80,
    "H100-NVL": 94,
    "H200": 141,
    "L40S": 48,
    "L40": 48,
    "L4": 24,
    "A10G": 24,
}


def _parts(name: str) -> frozenset[str]:
    return frozenset(part for part in re.split(r"[^a-z0-9]+", name.lower()) if part)


def gpu_matches(gpu: str, gpu_model: str) -> bool:
    """Whether a catalog GPU name (`H100-80GB`) names the GPU model a node reports (`NVIDIA-H100-80GB-HBM3`).

    Every dash- or space-separated part of `gpu` must be a whole part of `gpu_model`, case-insensitive. A plain
    substring test would let "L4" match "L40S" and miss "A100-80GB" in "NVIDIA-A100-SXM4-80GB".
    """
    parts = _parts(gpu)
    return bool(parts) and parts <= _parts(gpu_model)


def most_specific_match(names: Iterable[str], gpu_model: str) -> str | None:
    """The name among `names` that names `gpu_model` most specifically ("A100-80GB", two parts, says more than
    "A100"), or None when none names it: how a table keyed by GPU names is looked up."""
    matching = [name for name in names if gpu_matches(name, gpu_model)]
    return max(matching, key=lambda name: (len(_parts(name)), len(name))) if matching else None


def _profile_gb(profile: str) -> int | None:
    match = re.fullmatch(r"\d+g\.(\d+)gb", profile.lower())
    return int(match.group(1)) if match else None


def _gb_to_mib(gb: int) -> int:
    return gb * 10**9 // MIB


def gpu_memory_mib(gpu_model: str, mig_profile: str | None = None) -> int | None:
    """Memory of a GPU model or of one of its MIG slices, in MiB; None when not known here.

    Decimal GB as datasheets and MIG profile names state them, rounded down: slightly less than `nvidia-smi`
    reports (an H100-80GB shows 81,559 MiB, this says 76,293), so a model that fits by this measure fits for real.
    """
    if mig_profile is not None:
        gb = _profile_gb(mig_profile)
        return None if gb is None else _gb_to_mib(gb)
    known = most_specific_match(GPU_MEMORY_GB, gpu_model)
    return None if known is None else _gb_to_mib(GPU_MEMORY_GB[known])


class CatalogError(ValueError):
    """A catalog document that cannot be used; the message names every bad field and the model it belongs to."""


class Throughput(StrictModel):
    """Requests per second one replica sustains on a GPU type (or MIG slice), within the model's latency SLO,
    for the model's typical request. `source` cites the measurement, or gives the formula as `derived: ...`."""

    gpu: str = Field(min_length=1)
    mig_profile: str | None = Field(None, alias="migProfile")
    requests_per_second: float = Field(gt=0, allow_inf_nan=False, alias="requestsPerSecond")
    source: str = Field(min_length=1)

    @model_validator(mode="after")
    def _known_profile(self) -> Throughput:
        if self.mig_profile is None:
            return self
        table_name = mig_table_for(self.gpu)
        if table_name is None:
            known = ", ".join(MIG_TABLES)
            raise ValueError(f"migProfile {self.mig_profile!r}: no MIG table knows GPU {self.gpu!r} (tables: {known})")
        table = MIG_TABLES[table_name]
        if table.profile(self.mig_profile) is None:
            elsewhere = find_profile(self.mig_profile)
            hint = f"; {self.mig_profile} belongs to {', '.join(elsewhere)}" if elsewhere else ""
            raise ValueError(
                f"migProfile {self.mig_profile!r} is not a profile of {self.gpu!r} (table {table_name}: "
                f"{', '.join(table.profile_names)}){hint}"
            )
        return self


class ModelSpec(StrictModel):
    """One served model: its architecture (from its `config.json`), the memory a replica reserves, and what a
    replica serves on each GPU type it is listed for."""

    name: str = Field(min_length=1)
    aliases: list[str] = Field(default_factory=list)
    parameters_billion: float = Field(gt=0, allow_inf_nan=False, alias="parametersBillion")
    bytes_per_parameter: float = Field(2.0, gt=0, le=4, alias="bytesPerParameter")  # 2 bf16, 1 fp8/int8, 0.5 int4
    layers: int = Field(gt=0)
    kv_heads: int = Field(gt=0, alias="kvHeads")
    head_dim: int = Field(gt=0, alias="headDim")
    kv_bytes: float = Field(2.0, gt=0, le=4, alias="kvBytes")  # bytes per KV-cache value (1 with an fp8 KV cache)
    context_tokens: int = Field(gt=0, alias="contextTokens")  # context reserved per sequence
    concurrency: int = Field(gt=0)  # sequences the KV reserve holds at once
    overhead_mib: int = Field(1024, gt=0, alias="overheadMib")  # CUDA context, graphs, activations
    prompt_tokens: int = Field(gt=0, alias="promptTokens")  # the typical request the throughput refers to
    output_tokens: int = Field(gt=0, alias="outputTokens")
    latency_class: Literal["interactive", "batch"] = Field("interactive", alias="latencyClass")
    min_replicas: int = Field(1, ge=0, alias="minReplicas")  # 0: the model may be scaled to zero
    throughput: list[Throughput]
    source: str = Field(min_length=1)  # where the architecture numbers come from

    @field_validator("throughput")
    @classmethod
    def _some_throughput(cls, entries: list[Throughput]) -> list[Throughput]:
        # A model the planner cannot place anywhere is a catalog mistake, not an empty plan.
        if not entries:
            raise ValueError("a model needs at least one throughput entry (GPU type and requests per second)")
        seen: set[tuple[frozenset[str], str | None]] = set()
        for i, entry in enumerate(entries):
            key = (_parts(entry.gpu), entry.mig_profile)
            if key in seen:
                raise ValueError(f"throughput[{i}]: {entry.gpu} {entry.mig_profile or '(whole GPU)'} is listed twice")
            seen.add(key)
        return entries

    @model_validator(mode="after")
    def _fits_where_listed(self) -> ModelSpec:
        # A throughput figure for a GPU the replica does not fit in would send replicas where they cannot start.
        for i, entry in enumerate(self.throughput):
            available = gpu_memory_mib(entry.gpu, entry.mig_profile)
            if available is not None and self.memory_mib > available:
                where = f"{entry.gpu} {entry.mig_profile}" if entry.mig_profile else entry.gpu
                raise ValueError(
                    f"throughput[{i}]: a replica needs {self.memory_mib} MiB (weights {self.weights_mib} + KV "
                    f"{self.kv_reserve_mib} + overhead {self.overhead_mib}) but {where} has {available} MiB"
                )
        return self

    @property
    def weights_mib(self) -> int:
        weight_bytes = round(self.parameters_billion * 1e9 * self.bytes_per_parameter)
        return -(-weight_bytes // MIB)

    @property
    def kv_bytes_per_token(self) -> int:
        return round(2 * self.layers * self.kv_heads * self.head_dim * self.kv_bytes)

    @property
    def kv_reserve_mib(self) -> int:
        return -(-self.kv_bytes_per_token * self.context_tokens * self.concurrency // MIB)

    @property
    def memory_mib(self) -> int:
        """GPU memory one replica needs: weights, the KV reserve and the fixed overhead."""
        return self.weights_mib + self.kv_reserve_mib + self.overhead_mib

    def _best(self, gpu_model: str, mig_profile: str | None) -> Throughput | None:
        # GPU names are unique per profile (validated), so the most specific name finds one entry.
        entries = {t.gpu: t for t in self.throughput if t.mig_profile == mig_profile}
        best = most_specific_match(entries, gpu_model)
        return None if best is None else entries[best]

    def requests_per_second(self, gpu_model: str, mig_profile: str | None = None) -> float | None:
        """Requests per second one replica sustains on `gpu_model` (a whole GPU, or its `mig_profile` slice).

        The entry for exactly this GPU and profile wins; among entries whose `gpu` names `gpu_model`, the most
        specific ("A100-80GB" beats "A100"). A MIG slice without an entry of its own gets the whole-GPU figure
        scaled by min(compute slices / 7, memory slices / 8): decode is memory-bandwidth bound and a slice gets
        the bandwidth of its memory slices, while prefill is compute bound and gets its compute slices; the
        smaller share bounds the rate. That scaling is optimistic for large models on small slices (the weights
        are read once per decode step whatever the slice), which is why the catalog lists such slices itself.

        None when this model has no figure for the GPU type, the GPU has no such MIG profile, or the replica does
        not fit in the GPU or slice.
        """
        available = gpu_memory_mib(gpu_model, mig_profile)
        if available is not None and self.memory_mib > available:
            return None
        exact = self._best(gpu_model, mig_profile)
        if exact is not None:
            return exact.requests_per_second
        if mig_profile is None:
            return None
        whole = self._best(gpu_model, None)
        table_name = mig_table_for(gpu_model)
        profile = MIG_TABLES[table_name].profile(mig_profile) if table_name is not None else None
        if whole is None or profile is None:
            return None
        share = min(profile.compute_slices / 7, profile.memory_slices / 8)
        return whole.requests_per_second * share


class ModelCatalog(StrictModel):
    """The served models, each found by its name or an alias (vLLM's `model_name` label)."""

    api_version: Literal["gpu-extender.io/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["ModelCatalog"]
    models: list[ModelSpec] = Field(default_factory=list)
    _index: dict[str, ModelSpec] = PrivateAttr(default_factory=dict)

    @field_validator("models")
    @classmethod
    def _unique_names(cls, models: list[ModelSpec]) -> list[ModelSpec]:
        # vLLM's model_name label finds the entry; a name that means two entries would pick one at random.
        owner: dict[str, int] = {}
        for i, spec in enumerate(models):
            for name in (spec.name, *spec.aliases):
                if name in owner:
                    raise ValueError(
                        f"name {name!r} of models[{i}] ({spec.name}) is already used by models[{owner[name]}] "
                        f"({models[owner[name]].name})"
                    )
                owner[name] = i
        return models

    @model_validator(mode="after")
    def _build_index(self) -> ModelCatalog:
        self._index = {name: spec for spec in self.models for name in (spec.name, *spec.aliases)}
        return self

    def model(self, name: str) -> ModelSpec | None:
        """The entry served under `name` (its name or one of its aliases, exactly)."""
        return self._index.get(name)


def _where(loc: tuple[int | str, ...], document: dict[str, Any]) -> str:
    """A pydantic error location with the model's name where it points into `models`."""
    parts: list[str] = []
    models = document.get("models")
    for i, part in enumerate(loc):
        if isinstance(part, int) and parts:
            parts[-1] += f"[{part}]"
            if i == 1 and loc[0] == "models" and isinstance(models, list) and part < len(models):
                name = models[part].get("name") if isinstance(models[part], dict) else None
                if name:
                    parts[-1] += f" ({name})"
        else:
            parts.append(str(part))
    return ".".join(parts) or "(document)"


def _describe(error: ValidationError, document: dict[str, Any]) -> str:
    lines = []
    for e in error.errors():
        message = e["msg"].removeprefix("Value error, ")
        lines.append(f"{_where(tuple(e['loc']), document)}: {message}")
    return "; ".join(lines)


def parse_catalog(text: str, origin: str = "<catalog>") -> ModelCatalog:
    document = yaml_mapping(text, origin, CatalogError, what="a ModelCatalog mapping")
    try:
        return ModelCatalog.model_validate(document)
    except ValidationError as exc:
        raise CatalogError(f"{origin}: {_describe(exc, document)}") from exc


def load_catalog(path: str | Path) -> ModelCatalog:
    return parse_catalog(read_text(path, CatalogError), str(path))


@cache
def default_catalog() -> ModelCatalog:
    """The shipped `policies/models.yaml`, parsed once (the catalog is frozen, so sharing it is safe)."""
    text = resources.files("policies").joinpath("models.yaml").read_text()
    return parse_catalog(text, "policies/models.yaml")
