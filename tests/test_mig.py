"""MIG placement rules: start slots and what a placement leaves placeable."""

import pytest

from policies.mig import (
    MIG_TABLES,
    free_starts,
    max_placeable,
    mig_table_for,
    placeable_profiles,
    placement_loss,
)

H100 = "H100-80GB"


def mask(profile: str, start: int, table: str = H100) -> int:
    p = MIG_TABLES[table].profile(profile)
    assert p is not None
    return p.mask_at(start)


def test_3g_at_slot_4_leaves_room_for_everything_but_7g():
    left = placeable_profiles(H100, mask("3g.40gb", 4))
    assert left == ["1g.10gb", "1g.20gb", "2g.20gb", "3g.40gb", "4g.40gb"]


def test_4g_at_slot_0_excludes_4g_and_7g_and_the_low_slots():
    occupied = mask("4g.40gb", 0)
    assert placeable_profiles(H100, occupied) == ["1g.10gb", "1g.20gb", "2g.20gb", "3g.40gb"]
    assert free_starts(MIG_TABLES[H100].profile("3g.40gb"), occupied) == [4]
    assert free_starts(MIG_TABLES[H100].profile("1g.10gb"), occupied) == [4, 5, 6]
    assert free_starts(MIG_TABLES[H100].profile("2g.20gb"), occupied) == [4]


def test_seven_1g_instances_fit_an_empty_gpu_but_slot_7_takes_no_1g():
    assert max_placeable(H100, "1g.10gb", 0) == 7
    assert max_placeable(H100, "1g.20gb", 0) == 4
    assert max_placeable(H100, "3g.40gb", 0) == 2


def test_3g_belongs_at_slot_4():
    # Empty GPU value: 1g 7x1 + 1g.20gb 4x1 + 2g 3x2 + 3g 2x3 + 4g 1x4 + 7g 1x7 = 34.
    # 3g@4 leaves slots 0-3: 4x1 + 2x1 + 2x2 + 1x3 + 1x4 = 17 -> loss 17.
    # 3g@0 leaves slots 4-7: 3x1 + 2x1 + 1x2 + 1x3 = 10 -> loss 24.
    profile = MIG_TABLES[H100].profile("3g.40gb")
    assert placement_loss(H100, 0, profile, 4) == pytest.approx(17)
    assert placement_loss(H100, 0, profile, 0) == pytest.approx(24)


@pytest.mark.parametrize(
    ("product", "table"),
    [
        ("NVIDIA-H100-80GB-HBM3", "H100-80GB"),
        ("NVIDIA-A100-SXM4-40GB", "A100-40GB"),
        ("NVIDIA-A100-SXM4-80GB", "A100-80GB"),
        ("NVIDIA-H200", "H200-141GB"),
        ("Tesla-T4", None),
    ],
)
def test_table_from_product_name(product, table):
    assert mig_table_for(product) == table
