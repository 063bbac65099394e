"""The scheduler-extender wire types, field for field as `k8s.io/kube-scheduler/extender/v1` defines them.

The Go structs have no json tags, so every field is PascalCase on the wire and kube-scheduler sends every field,
`null` when empty. Pods and Nodes inside are ordinary API JSON and stay plain dicts: decoding them into models
would cost more than the whole decision.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

JsonObject = dict[str, Any]
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]  # Go's int64: a larger number could not be sent back


def _kind(value: Any) -> str:
    """A JSON value's type in words, never its text (which may be huge or nested a thousand levels deep)."""
    return "null" if value is None else type(value).__name__


def identified_pod(pod: JsonObject) -> JsonObject:
    """Check the pod's identity fields, which every verb reads before the decision core reads the rest: a wrong
    type there makes the body malformed (400), where a bad resource request is a pod that fits nowhere."""
    meta = pod.get("metadata")
    if meta is None:
        return pod
    if not isinstance(meta, dict):
        raise ValueError(f"metadata must be an object, not {_kind(meta)}")
    for key in ("name", "namespace", "uid"):
        value = meta.get(key)
        if value is not None and not isinstance(value, str):
            raise ValueError(f"metadata.{key} must be a string, not {_kind(value)}")
    return pod


def _item_names(nodes: JsonObject) -> list[str]:
    """The names of `Nodes.items` (nodeCacheCapable: false), or ValueError naming the first item without one."""
    items = nodes.get("items")
    if items is None:
        return []
    if not isinstance(items, list):
        raise ValueError(f"Nodes.items must be a list, not {_kind(items)}")
    names = []
    for i, item in enumerate(items):
        meta = item.get("metadata") if isinstance(item, dict) else None
        name = meta.get("name") if isinstance(meta, dict) else None
        if not isinstance(name, str) or not name:
            raise ValueError(f"Nodes.items[{i}] must be a Node with a metadata.name string")
        names.append(name)
    return names


class _Wire(BaseModel):
    # Unknown fields are ignored so that a newer kube-scheduler adding one does not break scheduling.
    model_config = ConfigDict(extra="ignore", frozen=True)


class ExtenderArgs(_Wire):
    """filter and prioritize request. With nodeCacheCapable only `NodeNames` is set."""

    Pod: JsonObject
    Nodes: JsonObject | None = None
    NodeNames: list[str] | None = None

    _pod = field_validator("Pod")(identified_pod)

    @model_validator(mode="after")
    def _nodes_named(self) -> ExtenderArgs:
        if self.NodeNames is None and self.Nodes is not None:
            _item_names(self.Nodes)  # every answer names nodes: one without a name is a malformed body
        return self

    def node_names(self) -> list[str]:
        if self.NodeNames is not None:
            return self.NodeNames
        return _item_names(self.Nodes or {})


class ExtenderFilterResult(_Wire):
    Nodes: JsonObject | None = None
    NodeNames: list[str] = Field(default_factory=list)  # never null: null means "no node passes"
    FailedNodes: dict[str, str] = Field(default_factory=dict)
    FailedAndUnresolvableNodes: dict[str, str] = Field(default_factory=dict)
    Error: str = ""


def filter_result(
    passed: list[str],
    failed: dict[str, str] | None = None,
    unresolvable: dict[str, str] | None = None,
    error: str = "",
) -> JsonObject:
    """`ExtenderFilterResult(...).model_dump()` without validating and copying hundreds of names on every call."""
    return {
        "Nodes": None,
        "NodeNames": passed,
        "FailedNodes": failed or {},
        "FailedAndUnresolvableNodes": unresolvable or {},
        "Error": error,
    }


class HostPriority(_Wire):
    Host: str
    Score: int


class ExtenderBindingArgs(_Wire):
    PodName: str
    PodNamespace: str
    PodUID: str
    Node: str


class ExtenderBindingResult(_Wire):
    Error: str = ""


class MetaPod(_Wire):
    UID: str


class MetaVictims(_Wire):
    Pods: list[MetaPod] | None = None
    NumPDBViolations: Int64 = 0


class Victims(_Wire):
    Pods: list[JsonObject] | None = None
    NumPDBViolations: Int64 = 0

    @field_validator("Pods")
    @classmethod
    def _identified(cls, pods: list[JsonObject] | None) -> list[JsonObject] | None:
        for pod in pods or ():
            identified_pod(pod)
        return pods

    def meta(self) -> MetaVictims:
        uids = [MetaPod(UID=(p.get("metadata") or {}).get("uid") or "") for p in self.Pods or []]
        return MetaVictims(Pods=uids, NumPDBViolations=self.NumPDBViolations)


class ExtenderPreemptionArgs(_Wire):
    Pod: JsonObject
    NodeNameToVictims: dict[str, Victims] | None = None
    NodeNameToMetaVictims: dict[str, MetaVictims] | None = None

    _pod = field_validator("Pod")(identified_pod)

    def candidates(self) -> dict[str, MetaVictims]:
        if self.NodeNameToMetaVictims is not None:
            return self.NodeNameToMetaVictims
        return {node: victims.meta() for node, victims in (self.NodeNameToVictims or {}).items()}


class ExtenderPreemptionResult(_Wire):
    NodeNameToMetaVictims: dict[str, MetaVictims] = Field(default_factory=dict)
