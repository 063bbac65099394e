"""Writes what the scheduler must know about this node onto its Node object, and only when it changed.

Two merge PATCHes: the inventory annotation (`gpu-extender.io/gpu-inventory`) on the Node, and the fractional
extended resource `gpu-extender.io/gpu-milli` (shareable GPUs × 1000) on its status capacity and allocatable.
Every node watcher in the cluster receives each write, so an unchanged inventory is never written again: the
content is compared without `observedAt`, first with what this agent last wrote (no request at all), and against
the Node itself at start and every `resync_s` (one GET).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import orjson

from scheduler.annotations import GPU_INVENTORY, NodeInventoryDoc, parse_node_inventory
from scheduler.backoff import Backoff
from scheduler.kubeapi import read_json
from scheduler.quantity import to_count

__all__ = ["GPU_MILLI_RESOURCE", "NodePublisher", "inventory_key"]

log = logging.getLogger("gpu_extender.agent")

GPU_MILLI_RESOURCE = "gpu-extender.io/gpu-milli"
_MERGE = {"Content-Type": "application/merge-patch+json"}


def inventory_key(doc: NodeInventoryDoc | None) -> bytes:
    """The content of an inventory, without its timestamp, in a canonical form for comparison."""
    if doc is None:
        return b""
    content = doc.model_dump(mode="json", by_alias=True, exclude={"observed_at"})
    return orjson.dumps(content, option=orjson.OPT_SORT_KEYS)


def _count(value: Any) -> int | None:
    """A quantity as the API server returns it (`2k` for 2000), or None when absent or unreadable."""
    if value is None:
        return None
    try:
        return to_count(value)
    except ValueError:
        return None


class NodePublisher:
    """Publishes one node's inventory and `gpu-milli`. `publish` never raises: failures are logged and retried."""

    def __init__(
        self,
        api_client: Any,
        node_name: str,
        resync_s: float = 300.0,
        clock: Callable[[], float] = time.monotonic,
        timeout_s: float = 10.0,
    ) -> None:
        self._api = api_client
        self._node = node_name
        self._resync_s = resync_s
        self._clock = clock
        self._timeout = timeout_s
        self._backoff = Backoff(initial_s=1.0, max_s=120.0)
        self._written: tuple[bytes, int] | None = None  # what the Node holds, as far as we know
        self._verified_at = float("-inf")
        self._retry_at = float("-inf")
        self._failing = False
        self.patches = {"annotation": 0, "resources": 0}
        self.errors = 0

    def publish(self, doc: NodeInventoryDoc, milli: int) -> bool:
        """Bring the Node in line with `doc` and `milli`; True when it is (whether or not a write was needed)."""
        now = self._clock()
        wanted = (inventory_key(doc), milli)
        if wanted == self._written and now - self._verified_at < self._resync_s:
            return True
        if now < self._retry_at:
            return False
        try:
            self._sync(doc, milli)
        except Exception as exc:  # any failure is retried: the agent must keep sampling
            self.errors += 1
            self._retry_at = now + self._backoff.next()
            if not self._failing:
                log.warning(
                    "cannot update the Node; retrying with backoff",
                    extra={"node": self._node, "error": f"{type(exc).__name__}: {exc}"},
                )
            self._failing = True
            return False
        if self._failing:
            log.info("Node updates work again", extra={"node": self._node})
        self._failing = False
        self._backoff.reset()
        self._written = wanted
        self._verified_at = now
        return True

    def _sync(self, doc: NodeInventoryDoc, milli: int) -> None:
        path = f"/api/v1/nodes/{self._node}"
        node = read_json(self._api, "GET", path, timeout=self._timeout) or {}
        meta = node.get("metadata") or {}
        current = parse_node_inventory((meta.get("annotations") or {}).get(GPU_INVENTORY))
        if inventory_key(current) != inventory_key(doc):
            stamped = doc.model_copy(update={"observed_at": datetime.now(UTC).replace(microsecond=0)})
            text = stamped.model_dump_json(by_alias=True, exclude_none=True)
            read_json(
                self._api,
                "PATCH",
                path,
                body={"metadata": {"annotations": {GPU_INVENTORY: text}}},
                headers=_MERGE,
                timeout=self._timeout,
            )
            self.patches["annotation"] += 1
            log.info("published the GPU inventory", extra={"node": self._node, "gpus": len(doc.gpus)})
        status = node.get("status") or {}
        value = str(milli)
        have = [_count((status.get(field) or {}).get(GPU_MILLI_RESOURCE)) for field in ("capacity", "allocatable")]
        if have != [milli, milli] and not (milli == 0 and have == [None, None]):
            body = {"status": {"capacity": {GPU_MILLI_RESOURCE: value}, "allocatable": {GPU_MILLI_RESOURCE: value}}}
            read_json(self._api, "PATCH", f"{path}/status", body=body, headers=_MERGE, timeout=self._timeout)
            self.patches["resources"] += 1
            log.info("advertised fractional GPUs", extra={"node": self._node, GPU_MILLI_RESOURCE: value})
