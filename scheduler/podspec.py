"""A pod's API JSON reduced to the `Demand` a placement decision needs.

The effective request follows kube-scheduler's own accounting (`resourcehelper.PodRequests`): containers add up,
init containers run one at a time (but restartable "sidecar" init containers stay running), pod overhead is
added, and pod-level `spec.resources` replaces the container totals for CPU and memory. Quantities are summed as
exact integers of nano-units, the API server's own precision. A pod the extender would mis-read is refused with a
`PodSpecError` naming the field, rather than placed on a guess.
"""

from __future__ import annotations

import math
from typing import Any

import orjson

from policies.demand import Demand, LatencyClass, model_allowed
from policies.inventory import MILLI_PER_GPU
from policies.mig import MIG_TABLES, find_profile
from scheduler.quantity import NANO, shown, to_nano

__all__ = [
    "ANNOTATION_GPU_MEMORY",
    "ANNOTATION_GPU_TYPES",
    "ANNOTATION_LATENCY_CLASS",
    "ANNOTATION_MODEL",
    "GPU_MILLI_RESOURCE",
    "GPU_PRODUCT_LABEL",
    "GPU_RESOURCE",
    "MIG_RESOURCE_PREFIX",
    "PodSpecError",
    "cached_demand",
    "demand_from_pod",
    "effective_requests",
    "host_demand",
    "managed_resources",
    "pod_key",
]

GPU_RESOURCE = "nvidia.com/gpu"
MIG_RESOURCE_PREFIX = "nvidia.com/mig-"
GPU_MILLI_RESOURCE = "gpu-extender.io/gpu-milli"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"

ANNOTATION_GPU_MEMORY = "gpu-extender.io/gpu-memory"
ANNOTATION_MODEL = "gpu-extender.io/model"
ANNOTATION_LATENCY_CLASS = "gpu-extender.io/latency-class"
ANNOTATION_GPU_TYPES = "gpu-extender.io/gpu-types"
ANNOTATION_EXPECTED_BUSY = "gpu-extender.io/expected-busy"

_HOST_RESOURCES = ("cpu", "memory")
_NANO_MILLI = NANO // 1000
_NANO_MIB = NANO << 20
MAX_NANO = (2**63 - 1) * 10**6
"""The largest request the extender reads (nano-units): 2^63-1 thousandths, the most kube-scheduler's own int64
accounting can count. A larger one could still be written (the quantity grammar has no bound) and would overflow
the decision's integer and float arithmetic."""


class PodSpecError(ValueError):
    """The pod cannot be read as a GPU request; the message names the offending field."""


def managed_resources() -> list[str]:
    """Every resource name that should route a pod to the extender (exact names: kube-scheduler has no wildcards)."""
    profiles = sorted({p for table in MIG_TABLES.values() for p in table.profile_names})
    return [GPU_RESOURCE, GPU_MILLI_RESOURCE, *(MIG_RESOURCE_PREFIX + p for p in profiles)]


def pod_key(pod: dict[str, Any]) -> str:
    """`namespace/name`, the key the cluster model uses."""
    meta = pod.get("metadata") if isinstance(pod, dict) else None
    if not isinstance(meta, dict) or not meta.get("name"):
        raise PodSpecError("pod has no metadata.name")
    return f"{meta.get('namespace') or 'default'}/{meta['name']}"


def _relevant(name: str) -> bool:
    return name in _HOST_RESOURCES or name in (GPU_RESOURCE, GPU_MILLI_RESOURCE) or name.startswith(MIG_RESOURCE_PREFIX)


def _resource_list(value: Any, where: str) -> dict[str, int]:
    """Relevant quantities of a ResourceList in nano-units (exact integers: sums and maxima stay cheap)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PodSpecError(f"{where} must be a map of resource names to quantities")
    out: dict[str, int] = {}
    for name, quantity in value.items():
        if not _relevant(name):
            continue
        out[name] = _non_negative(quantity, f"{where}[{name}]")
    return out


def _container_requests(container: Any) -> dict[str, int]:
    """Requests, with limits standing in where a request is unset (what API defaulting does on create)."""
    if not isinstance(container, dict):
        raise PodSpecError("must be an object")
    resources = container.get("resources")
    if resources is None:
        return {}
    if not isinstance(resources, dict):
        raise PodSpecError("resources must be an object")
    limits, requests = resources.get("limits"), resources.get("requests")
    merged = _resource_list(limits, "resources.limits") if limits else {}
    if requests:
        merged.update(_resource_list(requests, "resources.requests"))
    return merged


def _add(into: dict[str, int], other: dict[str, int]) -> None:
    for name, value in other.items():
        into[name] = into.get(name, 0) + value


def _max(into: dict[str, int], other: dict[str, int]) -> None:
    for name, value in other.items():
        if value > into.get(name, 0):
            into[name] = value


def _list(spec: dict[str, Any], field: str) -> list[Any]:
    value = spec.get(field) or []
    if not isinstance(value, list):
        raise PodSpecError(f"spec.{field} must be a list")
    return value


def _each_container(spec: dict[str, Any], field: str) -> list[tuple[dict[str, Any], dict[str, int]]]:
    out = []
    for i, container in enumerate(_list(spec, field)):
        try:
            out.append((container, _container_requests(container)))
        except PodSpecError as exc:
            raise PodSpecError(
                f"spec.{field}[{i}] {exc}" if str(exc).startswith("must") else f"spec.{field}[{i}].{exc}"
            ) from None
    return out


def effective_requests(pod: dict[str, Any]) -> dict[str, int]:
    """The pod's effective request per relevant resource, in nano-units, as kube-scheduler computes it."""
    if not isinstance(pod, dict):
        raise PodSpecError(f"pod must be a JSON object, not {type(pod).__name__}")
    spec = pod.get("spec")
    if not isinstance(spec, dict):
        raise PodSpecError("pod has no spec")
    total: dict[str, int] = {}
    for _, requests in _each_container(spec, "containers"):
        _add(total, requests)
    if spec.get("initContainers"):
        sidecars: dict[str, int] = {}
        init_peak: dict[str, int] = {}
        for container, requests in _each_container(spec, "initContainers"):
            if container.get("restartPolicy") == "Always":
                _add(sidecars, requests)
                _max(init_peak, sidecars)
            else:
                running = dict(sidecars)
                _add(running, requests)
                _max(init_peak, running)
        _add(total, sidecars)
        _max(total, init_peak)
    pod_level = spec.get("resources")
    if isinstance(pod_level, dict):
        level = _resource_list(pod_level.get("limits"), "spec.resources.limits")
        level.update(_resource_list(pod_level.get("requests"), "spec.resources.requests"))
        total.update({name: level[name] for name in _HOST_RESOURCES if name in level})
    if spec.get("overhead"):
        _add(total, _resource_list(spec["overhead"], "spec.overhead"))
    for name, value in total.items():
        if value > MAX_NANO:  # each part was in range, their sum is not
            raise PodSpecError(f"the pod's total {name} request is beyond what any node can hold")
    return total


def _whole(value: int, name: str) -> int:
    if value % NANO:
        raise PodSpecError(f"{name}: {value / NANO:g} must be a whole number")
    return value // NANO


def _gpu_fields(requests: dict[str, int]) -> dict[str, Any]:
    """gpu_count / gpu_milli / mig_profile from the GPU resources; exactly one kind of GPU may be asked for."""
    whole = _whole(requests.get(GPU_RESOURCE, 0), GPU_RESOURCE)
    milli = _whole(requests.get(GPU_MILLI_RESOURCE, 0), GPU_MILLI_RESOURCE)
    migs = {n: v for n, v in requests.items() if v > 0 and n.startswith(MIG_RESOURCE_PREFIX)}
    if not (whole or milli or migs):
        return {}
    kinds = [name for name, asked in ((GPU_RESOURCE, whole), (GPU_MILLI_RESOURCE, milli)) if asked] + sorted(migs)
    if len(kinds) > 1:
        raise PodSpecError(f"pod asks for more than one kind of GPU ({', '.join(kinds)}); ask for exactly one")
    if whole:
        return {"gpu_count": whole, "gpu_milli": MILLI_PER_GPU}
    if milli:
        if milli < MILLI_PER_GPU:
            return {"gpu_count": 1, "gpu_milli": milli, "shareable": True}
        if milli % MILLI_PER_GPU:
            raise PodSpecError(
                f"{GPU_MILLI_RESOURCE}: {milli} is more than one GPU but not whole GPUs; "
                f"ask below {MILLI_PER_GPU} for a share or a multiple of {MILLI_PER_GPU}"
            )
        return {"gpu_count": milli // MILLI_PER_GPU, "gpu_milli": MILLI_PER_GPU, "shareable": True}
    name, count = next(iter(migs.items()))
    if count != NANO:
        raise PodSpecError(f"{name}: {count / NANO:g} instances asked; a pod may hold one MIG instance")
    profile = name[len(MIG_RESOURCE_PREFIX) :]
    if not find_profile(profile):
        raise PodSpecError(f"{name}: unknown MIG profile {profile!r}")
    return {"mig_profile": profile}


def _split_models(text: str) -> frozenset[str]:
    return frozenset(part.strip() for part in text.replace("|", ",").split(",") if part.strip())


def _selector_models(spec: dict[str, Any]) -> frozenset[str] | None:
    """GPU products the pod's nodeSelector and required node affinity allow; None when they do not constrain it."""
    allowed: frozenset[str] | None = None
    selector = spec.get("nodeSelector")
    if isinstance(selector, dict) and selector.get(GPU_PRODUCT_LABEL):
        allowed = frozenset([_label_value(selector[GPU_PRODUCT_LABEL], f"spec.nodeSelector[{GPU_PRODUCT_LABEL}]")])
    required = _path(spec, "affinity", "nodeAffinity", "requiredDuringSchedulingIgnoredDuringExecution")
    terms = _path(required, "nodeSelectorTerms") or []
    if not isinstance(terms, list):
        raise PodSpecError("spec.affinity.nodeAffinity...nodeSelectorTerms must be a list")
    from_terms: set[str] = set()
    for term in terms:
        values = _term_models(term)
        if values is None:  # one term that does not constrain the product lets every product through
            return allowed
        from_terms |= values
    if terms:
        allowed = frozenset(from_terms) if allowed is None else allowed & from_terms
    return allowed


def _path(value: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def _term_models(term: Any) -> frozenset[str] | None:
    """Products one nodeSelectorTerm admits (`In` expressions on the product label, ANDed), None if unconstrained."""
    if not isinstance(term, dict):
        return None
    result: frozenset[str] | None = None
    expressions = term.get("matchExpressions") or []
    if not isinstance(expressions, list):
        raise PodSpecError("a nodeSelectorTerm's matchExpressions must be a list")
    for expr in expressions:
        if isinstance(expr, dict) and expr.get("key") == GPU_PRODUCT_LABEL and expr.get("operator") == "In":
            listed = expr.get("values") or []
            if not isinstance(listed, list):
                raise PodSpecError(f"matchExpressions on {GPU_PRODUCT_LABEL}: values must be a list of strings")
            values = frozenset(_label_value(v, f"matchExpressions on {GPU_PRODUCT_LABEL}") for v in listed)
            result = values if result is None else result & values
    return result


def _label_value(value: Any, where: str) -> str:
    """A label value as the pod wrote it; anything but a string is refused, not turned into text."""
    if not isinstance(value, str):
        raise PodSpecError(f"{where}: a label value must be a string, not {type(value).__name__}")
    return value


def _allowed_models(spec: dict[str, Any], annotations: dict[str, str]) -> frozenset[str]:
    declared = _split_models(annotations.get(ANNOTATION_GPU_TYPES, ""))
    selected = _selector_models(spec) if spec.get("nodeSelector") or spec.get("affinity") else None
    if selected is None:
        return declared
    narrowed = frozenset(m for m in selected if model_allowed(m, declared))
    if not narrowed:
        raise PodSpecError(
            f"{ANNOTATION_GPU_TYPES} {sorted(declared)} excludes every GPU product the node selector allows "
            f"({sorted(selected)})"
        )
    return narrowed


def _annotations(pod: dict[str, Any]) -> dict[str, str]:
    meta = pod.get("metadata")
    annotations = meta.get("annotations") if isinstance(meta, dict) else None
    if annotations is None:
        return {}
    if not isinstance(annotations, dict):
        raise PodSpecError("metadata.annotations must be a map of strings")
    for key in _POD_ANNOTATIONS:
        if key in annotations and not isinstance(annotations[key], str):
            raise PodSpecError(f"annotation {key} must be a string, not {type(annotations[key]).__name__}")
    return annotations


def _non_negative(quantity: Any, where: str) -> int:
    """A quantity in nano-units, or a PodSpecError that says where the bad value was."""
    try:
        number = to_nano(quantity)
    except ValueError as exc:
        raise PodSpecError(f"{where}: {exc}") from None
    if number < 0:
        raise PodSpecError(f"{where}: {shown(quantity)} must not be negative")
    if number > MAX_NANO:
        raise PodSpecError(f"{where}: {shown(quantity)} is beyond what any node can hold")
    return number


def _gpu_memory(annotations: dict[str, str]) -> int:
    text = annotations.get(ANNOTATION_GPU_MEMORY)
    if text is None or text == "":
        return 0
    exact = _non_negative(text, f"annotation {ANNOTATION_GPU_MEMORY}")
    if 0 < exact < _NANO_MIB:
        raise PodSpecError(f"annotation {ANNOTATION_GPU_MEMORY}: {text!r} is under 1Mi; write a unit, e.g. '20Gi'")
    return _ceil_div(exact, _NANO_MIB)


def _latency(annotations: dict[str, str]) -> LatencyClass:
    text = annotations.get(ANNOTATION_LATENCY_CLASS)
    if not text:
        return LatencyClass.BATCH
    try:
        return LatencyClass(text.strip().lower())
    except ValueError:
        choices = ", ".join(c.value for c in LatencyClass)
        raise PodSpecError(f"annotation {ANNOTATION_LATENCY_CLASS}: {shown(text)} is not one of {choices}") from None


def _expected_busy(annotations: dict[str, str]) -> float | None:
    text = annotations.get(ANNOTATION_EXPECTED_BUSY)
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0.0 <= value <= 1.0:  # also refuses NaN
        raise PodSpecError(f"annotation {ANNOTATION_EXPECTED_BUSY}: {shown(text)} is not a busy fraction from 0 to 1")
    return value


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def demand_from_pod(pod: dict[str, Any]) -> Demand:
    """The pod's `Demand`. Raises `PodSpecError` for a pod the extender cannot place as written."""
    requests = effective_requests(pod)
    annotations = _annotations(pod)
    gpu = _gpu_fields(requests)
    model = (annotations.get(ANNOTATION_MODEL) or "").strip() or None
    return Demand(
        cpu_milli=_ceil_div(requests.get("cpu", 0), _NANO_MILLI),
        memory_mib=_ceil_div(requests.get("memory", 0), _NANO_MIB),
        gpu_memory_mib=_gpu_memory(annotations),
        allowed_models=_allowed_models(pod["spec"], annotations),
        model_name=model,
        latency_class=_latency(annotations),
        expected_busy=_expected_busy(annotations),
        **gpu,
    )


def host_demand(pod: dict[str, Any]) -> Demand:
    """CPU and memory only, for a bound pod whose GPU request cannot be read but still occupies its node."""
    requests = effective_requests(pod)
    return Demand(
        cpu_milli=_ceil_div(requests.get("cpu", 0), _NANO_MILLI),
        memory_mib=_ceil_div(requests.get("memory", 0), _NANO_MIB),
    )


_POD_ANNOTATIONS = (
    ANNOTATION_GPU_MEMORY,
    ANNOTATION_MODEL,
    ANNOTATION_LATENCY_CLASS,
    ANNOTATION_GPU_TYPES,
    ANNOTATION_EXPECTED_BUSY,
)
_CACHE_LIMIT = 4096
_demand_cache: dict[bytes, Demand] = {}


def _demand_key(pod: dict[str, Any]) -> bytes | None:
    """Everything `demand_from_pod` reads, serialised: replicas of one workload share the key and the `Demand`."""
    spec = pod.get("spec")
    if not isinstance(spec, dict) or not isinstance(spec.get("containers"), list):
        return None
    annotations = _path(pod, "metadata", "annotations")
    if annotations is not None and not isinstance(annotations, dict):
        return None
    ours = [annotations.get(k) for k in _POD_ANNOTATIONS] if annotations else None
    try:
        return orjson.dumps(
            [
                [c.get("resources") for c in spec["containers"] if isinstance(c, dict)],
                [(c.get("resources"), c.get("restartPolicy")) for c in spec.get("initContainers") or ()],
                len(spec["containers"]),
                spec.get("overhead"),
                spec.get("resources"),
                spec.get("nodeSelector"),
                spec.get("affinity"),
                ours,
            ],
            option=orjson.OPT_SORT_KEYS,
        )
    except (TypeError, AttributeError):
        return None


def cached_demand(pod: dict[str, Any]) -> Demand:
    """`demand_from_pod`, remembered per distinct request: the watch reads thousands of pods of a few shapes.

    The `Demand` is immutable, so identical pods share one object, which also keeps the cache of bound pods small.
    """
    key = _demand_key(pod)
    if key is None:
        return demand_from_pod(pod)
    demand = _demand_cache.get(key)
    if demand is None:
        demand = demand_from_pod(pod)
        if len(_demand_cache) >= _CACHE_LIMIT:
            _demand_cache.clear()
        _demand_cache[key] = demand
    return demand
