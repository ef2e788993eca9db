"""FP4-aware all_gatherv / reduce_scatterv on the host backend (the numpy reference codec), 1..4 ranks."""
from __future__ import annotations

import pytest

import fp4_collective_checks as fc
from harness import run_ranks


@pytest.mark.parametrize("nranks", [1, 2, 4])
@pytest.mark.parametrize("fmt, global_scale", [("nvfp4", "per_rank"), ("nvfp4", "shared"), ("mxfp4", "per_rank"),
                                               ("mxfp4", "shared")])
def test_fp4_all_gatherv_is_bit_exact(fmt, global_scale, nranks, seed):
    assert all(run_ranks(nranks, fc.check_fp4_all_gatherv, seed, "numpy", fmt, global_scale))


@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_gather_of_an_fp4tensor(fmt, seed):
    assert all(run_ranks(3, fc.check_fp4_gather_tensor_as_is, seed, "numpy", fmt))


@pytest.mark.parametrize("nranks", [1, 3])
@pytest.mark.parametrize("framework", ["numpy", "torch_cpu"])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
@pytest.mark.parametrize("check", [fc.check_fp4_gather_tensor_options, fc.check_fp4_seed_arrays],
                         ids=["gather_of_an_fp4tensor_options", "reduce_scatterv_with_a_seed_array"])
def test_fp4_options_in_each_framework(check, fmt, framework, nranks, seed):
    """An FP4Tensor gathered with its options; the FP4 reduce-scatter with seed arrays (host arrays, read
    at the call): numpy and CPU torch, 1 and 3 ranks."""
    if framework == "torch_cpu":
        pytest.importorskip("torch", reason="torch is not installed")
    assert all(run_ranks(nranks, check, seed, framework, fmt))


@pytest.mark.parametrize("nranks", [1, 3, 4])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_reduce_scatterv(fmt, nranks, seed):
    assert all(run_ranks(nranks, fc.check_fp4_reduce_scatterv, seed, "numpy", fmt))


def test_fp4_stochastic_rounding_is_unbiased_and_replays(seed):
    assert all(run_ranks(2, fc.check_fp4_stochastic_rounding, seed, "numpy", "nvfp4"))


@pytest.mark.parametrize("nranks", [1, 2])
def test_fp4_bad_input(nranks, seed):
    assert all(run_ranks(nranks, fc.check_fp4_bad_input, seed, "numpy"))


@pytest.mark.parametrize("nranks", [1, 3])
def test_fp4_gather_into_a_bad_out(nranks, seed):
    assert all(run_ranks(nranks, fc.check_fp4_gather_out_errors, seed, "numpy"))


@pytest.mark.parametrize("framework", ["numpy", "torch_cpu"])
@pytest.mark.parametrize("fmt", ["nvfp4", "mxfp4"])
def test_fp4_results_come_in_the_input_framework(fmt, framework, seed):
    if framework == "torch_cpu":
        pytest.importorskip("torch", reason="torch is not installed")
    assert all(run_ranks(2, fc.check_fp4_results_in_input_framework, seed, framework, fmt))


@pytest.mark.parametrize("check,nranks", [("ranks_disagree", 2), ("ranks_disagree", 3),
                                          ("tensor_bad_input", 1), ("tensor_bad_input", 3)])
@pytest.mark.parametrize("framework", ["numpy", "torch_cpu"])
def test_fp4_bad_input_on_every_rank(check, framework, nranks, seed):
    """Ranks that disagree on sizes or K; FP4Tensors that do not fit their shape, are 1-D or lack a scale."""
    if framework == "torch_cpu":
        pytest.importorskip("torch", reason="torch is not installed")
    assert all(run_ranks(nranks, getattr(fc, f"check_fp4_{check}"), seed, framework))


@pytest.mark.parametrize("nranks", [2, 3])
def test_fp4_gpu_path_compares_under_fp4ccl_check(nranks):
    assert all(run_ranks(nranks, fc.check_fp4_gpu_agreement_under_fp4ccl_check))
