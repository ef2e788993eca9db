"""The variable-size algorithm choice (pure logic; the algorithms themselves run in tests/gpu)."""
from __future__ import annotations

import pytest

from fp4ccl.vcollectives import GROUPED_FROM_BYTES, choose


def test_equal_sizes_use_the_native_op():
    assert choose("all_gatherv", [5, 5, 5], 2) == "native"
    assert choose("reduce_scatterv", [0, 0], 4) == "native"


def test_mid_size_modest_imbalance_pads():
    assert choose("all_gatherv", [1000, 900, 800, 1000], 2) == "padded"
    assert choose("reduce_scatterv", [1000, 900, 800, 1000], 2) == "padded"


def test_large_or_very_uneven_use_grouped():
    big = GROUPED_FROM_BYTES // 2 // 4 + 1
    assert choose("all_gatherv", [big, big, big, big - 1], 2) == "bcast"
    assert choose("reduce_scatterv", [big, big, big, big - 1], 2) == "reduce"
    assert choose("all_gatherv", [1000, 0, 0, 0], 2) == "bcast"  # padding would quadruple the bytes


def test_inside_a_group_only_nccl_only_algorithms(monkeypatch):
    monkeypatch.setenv("FP4CCL_ALGO", "padded")
    assert choose("all_gatherv", [3, 4], 2, in_group=True) == "bcast"
    assert choose("reduce_scatterv", [3, 4], 2, in_group=True) == "reduce"
    assert choose("all_gatherv", [4, 4], 2, in_group=True) == "native"


def test_forced_algorithm(monkeypatch):
    monkeypatch.setenv("FP4CCL_ALGO", "p2p")
    assert choose("all_gatherv", [1, 2], 2) == "p2p"
    with pytest.raises(ValueError, match="FP4CCL_ALGO='p2p' is not valid for reduce_scatterv"):
        choose("reduce_scatterv", [1, 2], 2)
    monkeypatch.setenv("FP4CCL_ALGO", "native")
    with pytest.raises(ValueError, match="needs equal sizes"):
        choose("all_gatherv", [1, 2], 2)
