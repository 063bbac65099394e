"""The model catalog: memory by hand, throughput lookup and its MIG fallback, validation errors, the shipped default."""

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from policies.catalog import (
    CatalogError,
    ModelCatalog,
    default_catalog,
    gpu_matches,
    gpu_memory_mib,
    load_catalog,
    parse_catalog,
)
from policies.documents import API_VERSION
from policies.mig import MIG_TABLES, mig_table_for

REPO = Path(__file__).resolve().parents[1]
MIB = 1 << 20

LLAMA_8B: dict[str, Any] = {
    "name": "meta-llama/Llama-3.1-8B-Instruct",
    "aliases": ["llama-8b"],
    "parametersBillion": 8.03,
    "layers": 32,
    "kvHeads": 8,
    "headDim": 128,
    "contextTokens": 4096,
    "concurrency": 32,
    "promptTokens": 1000,
    "outputTokens": 200,
    "source": "config.json",
    "throughput": [
        {"gpu": "A100", "requestsPerSecond": 1.0, "source": "test"},
        {"gpu": "A100-80GB", "requestsPerSecond": 2.0, "source": "test"},
        {"gpu": "H100-80GB", "requestsPerSecond": 10.0, "source": "test"},
        {"gpu": "H100-80GB", "migProfile": "3g.40gb", "requestsPerSecond": 4.5, "source": "test"},
    ],
}


def _document(*models: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": API_VERSION, "kind": "ModelCatalog", "models": [copy.deepcopy(m) for m in models]}


def _parse(document: Any) -> ModelCatalog:
    return parse_catalog(yaml.safe_dump(document), "catalog.yaml")


def _small(name: str = "tiny") -> dict[str, Any]:
    """A 1B model that fits every slice, for lookups that memory must not decide."""
    return {**copy.deepcopy(LLAMA_8B), "name": name, "aliases": [], "parametersBillion": 1.0, "concurrency": 4}


# --- memory, by hand -------------------------------------------------------------------------------------------


def test_llama_8b_memory_by_hand():
    spec = _parse(_document(LLAMA_8B)).models[0]
    assert spec.kv_bytes_per_token == 2 * 32 * 8 * 128 * 2 == 131_072
    # 8.03e9 parameters × 2 bytes = 16,060,000,000 bytes = 15,316.01 MiB, rounded up.
    assert spec.weights_mib == 15_317
    # 131,072 bytes × 4096 tokens × 32 sequences = 16 GiB.
    assert spec.kv_reserve_mib == 131_072 * 4096 * 32 // MIB == 16_384
    assert spec.memory_mib == 15_317 + 16_384 + 1024 == 32_725


def test_quantized_weights_and_kv_halve_their_share():
    spec = _parse(_document({**LLAMA_8B, "bytesPerParameter": 1, "kvBytes": 1, "contextTokens": 2000})).models[0]
    assert spec.kv_bytes_per_token == 65_536
    assert spec.weights_mib == 7659  # 8,030,000,000 bytes = 7,658.0 MiB and a bit
    assert spec.kv_reserve_mib == 4000  # 65,536 × 2000 × 32 bytes, exactly
    assert spec.memory_mib == 7659 + 4000 + 1024


def test_defaults():
    spec = _parse(_document(LLAMA_8B)).models[0]
    assert (spec.bytes_per_parameter, spec.kv_bytes, spec.overhead_mib) == (2, 2, 1024)
    assert (spec.latency_class, spec.min_replicas) == ("interactive", 1)
    assert spec.throughput[0].mig_profile is None


# --- throughput lookup -------------------------------------------------------------------------------------------


def test_gpu_names_match_by_whole_parts():
    assert gpu_matches("A100-80GB", "NVIDIA-A100-SXM4-80GB")
    assert gpu_matches("h100-80gb", "NVIDIA H100 80GB HBM3")
    assert gpu_matches("H200", "NVIDIA-H200")
    assert not gpu_matches("L4", "NVIDIA-L40S")  # a substring, not a part
    assert not gpu_matches("A100-80GB", "NVIDIA-A100-SXM4-40GB")
    assert not gpu_matches("", "NVIDIA-H200")


def test_the_most_specific_gpu_entry_wins():
    spec = _parse(_document(LLAMA_8B)).models[0]
    assert spec.requests_per_second("NVIDIA-A100-SXM4-80GB") == 2.0  # "A100-80GB" beats "A100"
    assert spec.requests_per_second("NVIDIA-H100-80GB-HBM3") == 10.0
    assert spec.requests_per_second("nvidia h100 80gb hbm3") == 10.0
    assert spec.requests_per_second("NVIDIA-L4") is None  # a GPU type this model has no figure for


def test_the_exact_mig_entry_beats_scaling():
    spec = _parse(_document(LLAMA_8B)).models[0]
    assert spec.requests_per_second("NVIDIA-H100-80GB-HBM3", "3g.40gb") == 4.5


def test_a_mig_slice_without_an_entry_scales_the_whole_gpu():
    tiny = _parse(_document(_small())).models[0]
    # min(compute/7, memory/8): 2g.20gb is 2 of 7 compute and 2 of 8 memory slices; 3g.40gb 3 of 7 and 4 of 8.
    assert tiny.requests_per_second("NVIDIA-H100-80GB-HBM3", "2g.20gb") == pytest.approx(10.0 * 2 / 8)
    assert tiny.requests_per_second("NVIDIA-A100-SXM4-80GB", "3g.40gb") == pytest.approx(2.0 * 3 / 7)
    assert tiny.requests_per_second("NVIDIA-A100-SXM4-80GB", "1g.10gb") == pytest.approx(2.0 * 1 / 8)
    assert tiny.requests_per_second("NVIDIA-H100-80GB-HBM3", "7g.80gb") == pytest.approx(10.0)
    assert tiny.requests_per_second("NVIDIA-A100-SXM4-40GB", "3g.20gb") == pytest.approx(1.0 * 3 / 7)


def test_no_figure_where_the_slice_is_unknown_or_too_small():
    spec = _parse(_document(LLAMA_8B)).models[0]  # needs 32,725 MiB
    assert spec.requests_per_second("NVIDIA-H100-80GB-HBM3", "2g.20gb") is None  # 19,073 MiB: does not fit
    assert spec.requests_per_second("NVIDIA-H100-80GB-HBM3", "3g.71gb") is None  # an H200 profile
    assert spec.requests_per_second("NVIDIA-L40S", "1g.10gb") is None  # no MIG, no figure
    assert spec.requests_per_second("NVIDIA-A100-SXM4-40GB") == 1.0  # fits 40 GB


def test_no_figure_where_the_whole_gpu_is_too_small():
    big = {**LLAMA_8B, "concurrency": 64, "throughput": LLAMA_8B["throughput"][:3]}  # 49,109 MiB: not in 40 GB
    spec = _parse(_document(big)).models[0]
    assert spec.requests_per_second("NVIDIA-A100-SXM4-80GB") == 2.0
    assert spec.requests_per_second("NVIDIA-A100-SXM4-40GB") is None


def test_gpu_memory():
    assert gpu_memory_mib("NVIDIA-H100-80GB-HBM3") == 80 * 10**9 // MIB
    assert gpu_memory_mib("NVIDIA-A100-SXM4-40GB") == 40 * 10**9 // MIB
    assert gpu_memory_mib("NVIDIA-H200", "3g.71gb") == 71 * 10**9 // MIB
    assert gpu_memory_mib("NVIDIA-B200") is None


def test_model_by_name_or_alias():
    catalog = _parse(_document(LLAMA_8B, _small()))
    assert catalog.model("meta-llama/Llama-3.1-8B-Instruct") is catalog.models[0]
    assert catalog.model("llama-8b") is catalog.models[0]
    assert catalog.model("tiny") is catalog.models[1]
    assert catalog.model("Llama-8B") is None  # exact names only
    assert catalog.model("absent") is None


def test_the_catalog_is_frozen():
    catalog = _parse(_document(LLAMA_8B))
    with pytest.raises(ValidationError):
        catalog.models[0].concurrency = 1  # type: ignore[misc]


# --- validation ------------------------------------------------------------------------------------------------


def _with_model(**changes: Any) -> dict[str, Any]:
    return _document({**LLAMA_8B, **changes})


def _with_entry(entry: dict[str, Any]) -> dict[str, Any]:
    return _with_model(throughput=[entry])


MODEL = "models[0] (meta-llama/Llama-3.1-8B-Instruct)"


@pytest.mark.parametrize(
    ("document", "needle"),
    [
        (_with_model(contextToken=4096), f"{MODEL}.contextToken: Extra inputs are not permitted"),
        (
            _with_entry({"gpu": "H100-80GB", "requestPerSecond": 1, "source": "x"}),
            f"{MODEL}.throughput[0].requestPerSecond: Extra inputs are not permitted",
        ),
        ({**_document(), "model": []}, "model: Extra inputs are not permitted"),
        (_with_model(layers=0), f"{MODEL}.layers: Input should be greater than 0"),
        (_with_model(parametersBillion=-8), f"{MODEL}.parametersBillion: Input should be greater than 0"),
        (_with_model(concurrency=0), f"{MODEL}.concurrency: Input should be greater than 0"),
        (_with_model(kvBytes=0), f"{MODEL}.kvBytes: Input should be greater than 0"),
        (_with_model(outputTokens=-1), f"{MODEL}.outputTokens: Input should be greater than 0"),
        (
            _with_entry({"gpu": "H100-80GB", "requestsPerSecond": 0, "source": "x"}),
            f"{MODEL}.throughput[0].requestsPerSecond: Input should be greater than 0",
        ),
        (
            _with_entry({"gpu": "H100-80GB", "migProfile": "3g.71gb", "requestsPerSecond": 1, "source": "x"}),
            f"{MODEL}.throughput[0]: migProfile '3g.71gb' is not a profile of 'H100-80GB' (table H100-80GB",
        ),
        (
            _with_entry({"gpu": "L4", "migProfile": "1g.10gb", "requestsPerSecond": 1, "source": "x"}),
            f"{MODEL}.throughput[0]: migProfile '1g.10gb': no MIG table knows GPU 'L4'",
        ),
        (
            _with_entry({"gpu": "H100-80GB", "requestsPerSecond": 1}),
            f"{MODEL}.throughput[0].source: Field required",
        ),
        (_with_model(throughput=[]), f"{MODEL}.throughput: a model needs at least one throughput entry"),
        (
            _with_model(throughput=[LLAMA_8B["throughput"][2], {**LLAMA_8B["throughput"][2], "gpu": "h100-80gb"}]),
            f"{MODEL}.throughput: throughput[1]: h100-80gb (whole GPU) is listed twice",
        ),
        (
            _with_entry({"gpu": "L4", "requestsPerSecond": 1, "source": "x"}),
            f"{MODEL}: throughput[0]: a replica needs 32725 MiB (weights 15317 + KV 16384 + overhead 1024) but L4",
        ),
        (
            _document(LLAMA_8B, {**LLAMA_8B, "aliases": []}),
            "models: name 'meta-llama/Llama-3.1-8B-Instruct' of models[1] (meta-llama/Llama-3.1-8B-Instruct) is "
            "already used by models[0]",
        ),
        (_document(LLAMA_8B, _small("llama-8b")), "models: name 'llama-8b' of models[1] (llama-8b) is already used"),
        (_document(_small("twice") | {"aliases": ["twice"]}), "name 'twice' of models[0] (twice) is already used"),
        ({**_document(), "apiVersion": "v1"}, "apiVersion: Input should be 'gpu-extender.io/v1alpha1'"),
        ({**_document(), "kind": "PlacementPolicy"}, "kind: Input should be 'ModelCatalog'"),
        ({"apiVersion": API_VERSION, "models": []}, "kind: Field required"),
    ],
)
def test_errors_name_the_field_and_the_model(document, needle):
    with pytest.raises(CatalogError) as info:
        _parse(document)
    assert needle in str(info.value)
    assert str(info.value).startswith("catalog.yaml: ")


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("- a list", "expected a ModelCatalog mapping at the top level, got list"),
        ("", "expected a ModelCatalog mapping at the top level, got an empty document"),
        ("just text", "expected a ModelCatalog mapping at the top level, got str"),
        ("models: [1, 2", "not valid YAML"),
    ],
)
def test_documents_that_are_not_a_catalog(text, needle):
    with pytest.raises(CatalogError) as info:
        parse_catalog(text, "models.yaml")
    assert str(info.value).startswith("models.yaml: ") and needle in str(info.value)


def test_load_from_a_file(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump(_document(LLAMA_8B)))
    assert load_catalog(path).model("llama-8b") is not None
    with pytest.raises(CatalogError, match="cannot read"):
        load_catalog(tmp_path / "absent.yaml")


def test_an_empty_catalog_is_valid():
    assert _parse(_document()).models == []


# --- the shipped default -----------------------------------------------------------------------------------------

# Whole-GPU memory in decimal GB (datasheets), checked here independently of policies.catalog's own table.
SHIPPED_GPU_GB = {"H100-80GB": 80, "H200": 141, "A100-80GB": 80, "L40S": 48, "L4": 24}
# Each shipped GPU name as a node reports it (GPU feature discovery's product label).
PRODUCT = {
    "H100-80GB": "NVIDIA-H100-80GB-HBM3",
    "H200": "NVIDIA-H200",
    "A100-80GB": "NVIDIA-A100-SXM4-80GB",
    "L40S": "NVIDIA-L40S",
    "L4": "NVIDIA-L4",
}


def _capacity_mib(gpu: str, profile: str | None) -> int:
    if profile is None:
        return SHIPPED_GPU_GB[gpu] * 10**9 // MIB
    table = MIG_TABLES[mig_table_for(gpu)]  # type: ignore[index]
    assert table.profile(profile) is not None, (gpu, profile)
    return int(profile.split(".")[1].removesuffix("gb")) * 10**9 // MIB


def test_the_default_catalog_loads_and_spans_1b_to_70b():
    catalog = default_catalog()
    assert catalog is default_catalog()  # parsed once
    assert len(catalog.models) >= 12
    sizes = [m.parameters_billion for m in catalog.models]
    assert min(sizes) <= 1.5 and max(sizes) >= 70
    assert {"interactive", "batch"} == {m.latency_class for m in catalog.models}
    assert catalog.model("meta-llama/Llama-3.1-8B-Instruct").memory_mib == 32_725  # the hand-computed one


def test_every_shipped_model_and_figure_has_a_source():
    for spec in default_catalog().models:
        assert "huggingface.co/" in spec.source and "config.json" in spec.source, spec.name
        for entry in spec.throughput:
            assert entry.source.startswith("derived: ") or "https://" in entry.source, (spec.name, entry)
            if entry.source.startswith("derived: "):
                assert "TB/s" in entry.source or "GB/s" in entry.source, (spec.name, entry)


def test_every_shipped_entry_fits_its_gpu():
    for spec in default_catalog().models:
        for entry in spec.throughput:
            capacity = _capacity_mib(entry.gpu, entry.mig_profile)
            assert spec.memory_mib <= capacity, (spec.name, entry.gpu, entry.mig_profile, spec.memory_mib, capacity)


def test_shipped_figures_are_found_by_product_name_and_are_consistent():
    for spec in default_catalog().models:
        by_gpu = {(t.gpu, t.mig_profile): t.requests_per_second for t in spec.throughput}
        for (gpu, profile), rps in by_gpu.items():
            assert spec.requests_per_second(PRODUCT[gpu], profile) == rps, (spec.name, gpu, profile)
            if profile is not None and (gpu, None) in by_gpu:
                assert rps < by_gpu[gpu, None], (spec.name, gpu, profile)  # a slice serves less than its GPU
        if ("H100-80GB", None) in by_gpu and ("H200", None) in by_gpu:
            assert by_gpu["H200", None] >= by_gpu["H100-80GB", None], spec.name  # same compute, more bandwidth


def test_the_configmap_holds_the_shipped_catalog():
    manifest = yaml.safe_load((REPO / "manifests" / "base" / "model-catalog.yaml").read_text())
    assert manifest["kind"] == "ConfigMap"
    assert manifest["metadata"]["name"] == "gpu-extender-models"
    assert manifest["metadata"]["namespace"] == "gpu-extender-system"
    shipped = (REPO / "policies" / "models.yaml").read_text()
    assert yaml.safe_load(manifest["data"]["models.yaml"]) == yaml.safe_load(shipped)
    parse_catalog(manifest["data"]["models.yaml"], "model catalog ConfigMap")
    kustomization = yaml.safe_load((REPO / "manifests" / "base" / "kustomization.yaml").read_text())
    assert "model-catalog.yaml" in kustomization["resources"]
