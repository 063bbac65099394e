"""Model-cache locality: the node agent finds complete downloads in a Hugging Face hub cache and lists them in the
node's inventory; the extender reads them back and sends serving pods to nodes that hold their model's weights
(below the co-location plan, which still decides first)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from policies.config import PlacementPolicy
from policies.inventory import NodeInventory
from policies.plan_targets import PlannedSlot, PlanTargets
from scheduler.agent.agent import Agent
from scheduler.agent.fake_nvml import FakeNvml
from scheduler.agent.model_cache import ModelCache, cached_models
from scheduler.annotations import GPU_INVENTORY, NodeInventoryDoc
from scheduler.binder import MemoryBinder
from scheduler.model import ClusterModel
from scheduler.nodes import inventory_from_node
from scheduler.service import PlacementService
from tests.test_plan_following import SMALL, h100_node, schedule, serving_pod


def download(root: Path, model: str, weights: bool = True, complete: bool = True, config: bool = True) -> None:
    """A model as `huggingface_hub` leaves it: blobs, and a snapshot of links to them."""
    repo = root / f"models--{model.replace('/', '--')}"
    blobs, snapshot = repo / "blobs", repo / "snapshots" / "0123abc"
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    files = {"config.json": "cfg"} if config else {}
    if weights:
        files["model.safetensors"] = "weights"
    for i, (name, content) in enumerate(files.items()):
        blob = blobs / (f"b{i}" + ("" if complete or name == "config.json" else ".incomplete"))
        blob.write_text(content)
        (snapshot / name).symlink_to(blob)


def test_only_complete_downloads_count(tmp_path: Path) -> None:
    download(tmp_path, "meta-llama/Llama-3.2-1B-Instruct")
    download(tmp_path, "Qwen/Qwen2.5-7B-Instruct", complete=False)
    download(tmp_path, "google/gemma-2-9b-it", weights=False)
    download(tmp_path, "mistralai/Mistral-7B-Instruct-v0.3", config=False)
    (tmp_path / "datasets--some--data").mkdir()
    assert cached_models(tmp_path) == ["meta-llama/Llama-3.2-1B-Instruct"]
    assert cached_models(tmp_path / "absent") == []


def test_the_cache_is_scanned_again_only_after_its_interval(tmp_path: Path) -> None:
    now = [0.0]
    cache = ModelCache(tmp_path, rescan_s=60, clock=lambda: now[0])
    assert cache.models() == []
    download(tmp_path, SMALL)
    assert cache.models() == []
    now[0] = 61.0
    assert cache.models() == [SMALL]


class _Recorder:
    def __init__(self) -> None:
        self.docs: list[NodeInventoryDoc] = []

    def publish(self, doc: NodeInventoryDoc, milli: int) -> bool:
        self.docs.append(doc)
        return True


def test_the_agent_lists_cached_models_in_the_inventory_and_the_extender_reads_them(tmp_path: Path) -> None:
    download(tmp_path, SMALL)
    recorder = _Recorder()
    agent = Agent(FakeNvml.from_spec("h100x2;util=const:10"), "n1", recorder, model_cache=ModelCache(tmp_path))  # type: ignore[arg-type]
    agent.step()
    (doc,) = recorder.docs
    assert doc.cached_models == [SMALL]
    text = doc.model_dump_json(by_alias=True, exclude_none=True)
    node: dict[str, Any] = {
        "metadata": {"name": "n1", "annotations": {GPU_INVENTORY: text}},
        "status": {
            "allocatable": {"cpu": "8", "memory": "64Gi"},
            "conditions": [{"type": "Ready", "status": "True"}],
        },
    }
    inventory = inventory_from_node(node)
    assert inventory is not None and inventory.cached_models == frozenset({SMALL})
    assert len(inventory.gpus) == 2


def test_serving_pods_prefer_nodes_holding_their_weights_and_the_plan_comes_first() -> None:
    nodes = [h100_node("h-0"), h100_node("h-1"), h100_node("h-2")]
    cached = NodeInventory("h-2", 64_000, 524_288, nodes[2].gpus, cached_models=frozenset({SMALL}))
    model = ClusterModel(PlacementPolicy())
    model.replace_nodes([nodes[0], nodes[1], cached])
    model.mark_ready()
    service = PlacementService(model, MemoryBinder(), confirm_on_bind=True)
    assert schedule(service, serving_pod("a", SMALL)).node == "h-2"
    other = service.explain(serving_pod("q", "Qwen/Qwen2.5-7B-Instruct"))
    assert all(e["components"]["model_cache"] == 0 for e in other if e["fits"])
    service.model.set_plan(PlanTargets.of([PlannedSlot(SMALL, "h-1", 0)]))
    assert schedule(service, serving_pod("b", SMALL)).node == "h-1"
    # Without a plan slot open, the cache decides again.
    assert schedule(service, serving_pod("c", SMALL)).node == "h-2"


def test_the_preference_is_the_share_of_the_pull_the_local_weights_save() -> None:
    def service_with(policy: dict[str, Any]) -> PlacementService:
        cached = NodeInventory("h-1", 64_000, 524_288, h100_node("h-1").gpus, cached_models=frozenset({SMALL}))
        model = ClusterModel(PlacementPolicy.model_validate(policy))
        model.replace_nodes([h100_node("h-0"), cached])
        model.mark_ready()
        return PlacementService(model, MemoryBinder(), confirm_on_bind=True)

    times = {"modelStart": {"localWeightsSeconds": 30, "remotePullSeconds": 120}}
    verdicts = {e["node"]: e["components"]["model_cache"] for e in service_with(times).explain(serving_pod("p", SMALL))}
    assert verdicts == {"h-1": 0.75, "h-0": 0.0}
    same = {"modelStart": {"localWeightsSeconds": 60, "remotePullSeconds": 60}}  # nothing saved: no preference
    assert all(e["components"]["model_cache"] == 0 for e in service_with(same).explain(serving_pod("p", SMALL)))


def test_a_pull_faster_than_a_local_load_is_refused() -> None:
    with pytest.raises(ValidationError, match="remotePullSeconds"):
        PlacementPolicy.model_validate({"modelStart": {"localWeightsSeconds": 60, "remotePullSeconds": 30}})
