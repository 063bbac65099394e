"""The policy file: defaults, validation errors that name the field, and bad documents."""

from pathlib import Path

import pytest

from policies.config import PlacementPolicy, PolicyError, load_policy, parse_policy


def test_empty_document_gives_defaults():
    assert parse_policy("") == PlacementPolicy()


def test_weights_and_shapes_parse():
    policy = parse_policy(
        """
apiVersion: gpu-extender.io/v1alpha1
kind: PlacementPolicy
weights: {fragmentation: 2, bestFit: 0.5, migFit: 0}
typicalShapes:
  learnFromCluster: false
  default:
    - {cpuMilli: 4000, gpuCount: 1, gpuMilli: 500, weight: 3}
"""
    )
    assert policy.weights.fragmentation == 2 and policy.weights.best_fit == 0.5
    assert policy.typical_shapes.default[0].demand().gpu_milli == 500


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("weights: {fragmentaton: 1}", "weights.fragmentaton: Extra inputs are not permitted"),
        ("weights: {packing: -1}", "weights.packing: Input should be greater than or equal to 0"),
        ("kind: Policy", "kind: Input should be 'PlacementPolicy'"),
        ("overcommit: {declaredBusy: 1.5}", "overcommit.declaredBusy: Input should be less than or equal to 1"),
        ("typicalShapes: {default: [{gpuCount: 2, gpuMilli: 500}]}", "typicalShapes.default.0"),
        ("weights: [1, 2", "not valid YAML"),
        ("- a list", "expected a mapping"),
        ("prices: {gpuHourly: {H100: -1}}", "prices.gpuHourly.H100: Input should be greater than or equal to 0"),
        ("prices: {gpuHourly: {'': 1}}", "prices.gpuHourly: Value error, GPU type names must not be empty"),
    ],
)
def test_errors_name_the_bad_field(text, needle):
    with pytest.raises(PolicyError, match=None) as info:
        parse_policy(text, "policy.yaml")
    assert needle in str(info.value)
    assert str(info.value).startswith("policy.yaml")


def test_missing_file(tmp_path):
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "absent.yaml")


def test_prices_match_the_most_specific_gpu_name():
    prices = parse_policy("prices: {gpuHourly: {A100: 1.2, A100-80GB: 1.6, L4: 0.5}}").prices
    assert prices.hourly("NVIDIA-A100-SXM4-80GB") == 1.6
    assert prices.hourly("NVIDIA-A100-SXM4-40GB") == 1.2
    assert prices.hourly("NVIDIA-L40S") is None  # "L4" is not a part of "L40S"
    assert PlacementPolicy().prices.hourly("NVIDIA-H100-80GB-HBM3") is None


def test_shipped_policy_prices_the_common_gpus_and_names_the_pool_label():
    shipped = load_policy(Path(__file__).resolve().parents[1] / "manifests" / "base" / "policy.yaml")
    assert shipped.prices.hourly("NVIDIA-H100-80GB-HBM3") == 2.5
    assert shipped.prices.hourly("NVIDIA-A100-SXM4-80GB") == 1.6
    assert shipped.accounting.pool_label == "gpu-extender.io/pool"
