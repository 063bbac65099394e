"""The policy file: defaults, validation errors that name the field, and bad documents."""

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
