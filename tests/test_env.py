"""Rank discovery from each launcher's variables."""
from __future__ import annotations

import pytest

from fp4ccl.bootstrap.env import discover


@pytest.mark.parametrize("env, want", [
    ({}, (0, 1, 0, 1, "single")),
    ({"FP4CCL_RANK": "2", "FP4CCL_WORLD_SIZE": "4", "FP4CCL_LOCAL_RANK": "0", "FP4CCL_LOCAL_SIZE": "2",
      "FP4CCL_STORE": "127.0.0.1:29500", "FP4CCL_TOKEN": "ab"}, (2, 4, 0, 2, "fp4ccl-run")),
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "3",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, (3, 4, 3, 4, "openmpi")),
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}, (1, 2, 1, 2, "mpich")),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1", "SLURM_TASKS_PER_NODE": "4(x2)",
      "PMI_RANK": "5"}, (5, 8, 1, 4, "slurm")),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, (1, 2, 1, 2, "torchrun")),
])
def test_discover(env, want):
    info = discover(env)
    assert (info.rank, info.size, info.local_rank, info.local_size, info.launcher) == want


def test_fp4ccl_run_wins_over_torchrun_variables():
    env = {"FP4CCL_RANK": "0", "FP4CCL_WORLD_SIZE": "1", "RANK": "7", "WORLD_SIZE": "8"}
    assert discover(env).launcher == "fp4ccl-run"


def test_store_and_token():
    info = discover({"FP4CCL_RANK": "0", "FP4CCL_WORLD_SIZE": "1", "FP4CCL_STORE": "h:1", "FP4CCL_TOKEN": "t",
                     "FP4CCL_JOB_ID": "j"})
    assert (info.store, info.token, info.job_id) == ("h:1", "t", "j")


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="OMPI_COMM_WORLD_RANK='x' is not an integer"):
        discover({"OMPI_COMM_WORLD_RANK": "x", "OMPI_COMM_WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="rank 4 outside world size 4"):
        discover({"RANK": "4", "WORLD_SIZE": "4"})
