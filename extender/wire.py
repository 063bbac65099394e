"""The scheduler-extender wire types, field for field as `k8s.io/kube-scheduler/extender/v1` defines them.

The Go structs have no json tags, so every field is PascalCase on the wire and kube-scheduler sends every field,
`null` when empty. Pods and Nodes inside are ordinary API JSON and stay plain dicts: decoding them into models
would cost more than the whole decision.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

JsonObject = dict[str, Any]


class _Wire(BaseModel):
    # Unknown fields are ignored so that a newer kube-scheduler adding one does not break scheduling.
    model_config = ConfigDict(extra="ignore", frozen=True)


class ExtenderArgs(_Wire):
    """filter and prioritize request. With nodeCacheCapable only `NodeNames` is set."""

    Pod: JsonObject
    Nodes: JsonObject | None = None
    NodeNames: list[str] | None = None

    def node_names(self) -> list[str]:
        if self.NodeNames is not None:
            return self.NodeNames
        items = (self.Nodes or {}).get("items") or []
        return [item.get("metadata", {}).get("name", "") for item in items if isinstance(item, dict)]


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
    NumPDBViolations: int = 0


class Victims(_Wire):
    Pods: list[JsonObject] | None = None
    NumPDBViolations: int = 0

    def meta(self) -> MetaVictims:
        uids = [MetaPod(UID=str(p.get("metadata", {}).get("uid", ""))) for p in self.Pods or []]
        return MetaVictims(Pods=uids, NumPDBViolations=self.NumPDBViolations)


class ExtenderPreemptionArgs(_Wire):
    Pod: JsonObject
    NodeNameToVictims: dict[str, Victims] | None = None
    NodeNameToMetaVictims: dict[str, MetaVictims] | None = None

    def candidates(self) -> dict[str, MetaVictims]:
        if self.NodeNameToMetaVictims is not None:
            return self.NodeNameToMetaVictims
        return {node: victims.meta() for node, victims in (self.NodeNameToVictims or {}).items()}


class ExtenderPreemptionResult(_Wire):
    NodeNameToMetaVictims: dict[str, MetaVictims] = Field(default_factory=dict)
