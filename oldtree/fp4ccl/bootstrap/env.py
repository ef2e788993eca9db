"""Rank discovery from the variables that launchers set: fp4ccl-run, Open MPI, MPICH/Hydra, Slurm, torchrun."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Mapping, Optional


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the job, and who started it."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    launcher: str              # "fp4ccl-run" | "openmpi" | "mpich" | "slurm" | "torchrun" | "single"
    store: Optional[str] = None  # "host:port" of the fp4ccl TCP store (fp4ccl-run)
    token: str = ""
    job_id: str = ""

    @property
    def started_by_mpi(self) -> bool:
        return self.launcher in ("openmpi", "mpich")


def _int(env: Mapping[str, str], *names: str, default: Optional[int] = None) -> Optional[int]:
    for name in names:
        value = env.get(name)
        if value not in (None, ""):
            try:
                return int(value.split("(")[0])  # SLURM_TASKS_PER_NODE looks like "4(x2)"
            except ValueError:
                raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
    return default


def discover(env: Mapping[str, str] = os.environ) -> RankInfo:
    """Read rank, size and local rank from the environment; a lone process is rank 0 of 1."""
    if "FP4CCL_RANK" in env:
        info = RankInfo(
            rank=_int(env, "FP4CCL_RANK"), size=_int(env, "FP4CCL_WORLD_SIZE", default=1),
            local_rank=_int(env, "FP4CCL_LOCAL_RANK", default=0),
            local_size=_int(env, "FP4CCL_LOCAL_SIZE", default=1), launcher="fp4ccl-run",
            store=env.get("FP4CCL_STORE") or None, token=env.get("FP4CCL_TOKEN", ""),
            job_id=env.get("FP4CCL_JOB_ID", ""))
    elif "OMPI_COMM_WORLD_RANK" in env:
        info = RankInfo(
            rank=_int(env, "OMPI_COMM_WORLD_RANK"), size=_int(env, "OMPI_COMM_WORLD_SIZE"),
            local_rank=_int(env, "OMPI_COMM_WORLD_LOCAL_RANK", default=0),
            local_size=_int(env, "OMPI_COMM_WORLD_LOCAL_SIZE", default=1), launcher="openmpi",
            job_id=env.get("OMPI_MCA_orte_ess_jobid", "") or env.get("PMIX_NAMESPACE", ""))
    elif "PMI_RANK" in env and "SLURM_PROCID" not in env:
        info = RankInfo(
            rank=_int(env, "PMI_RANK"), size=_int(env, "PMI_SIZE"),
            local_rank=_int(env, "MPI_LOCALRANKID", default=0),
            local_size=_int(env, "MPI_LOCALNRANKS", default=1), launcher="mpich",
            job_id=env.get("PMI_KVSNAME", "") or env.get("PMI_ID", ""))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        info = RankInfo(
            rank=_int(env, "SLURM_PROCID"), size=_int(env, "SLURM_NTASKS"),
            local_rank=_int(env, "SLURM_LOCALID", default=0),
            local_size=_int(env, "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE", default=1),
            launcher="slurm", job_id=f"{env.get('SLURM_JOB_ID', '')}.{env.get('SLURM_STEP_ID', '')}")
    elif "RANK" in env and "WORLD_SIZE" in env:
        info = RankInfo(
            rank=_int(env, "RANK"), size=_int(env, "WORLD_SIZE"),
            local_rank=_int(env, "LOCAL_RANK", default=0),
            local_size=_int(env, "LOCAL_WORLD_SIZE", default=1), launcher="torchrun",
            job_id=env.get("TORCHELASTIC_RUN_ID", ""))
    else:
        info = RankInfo(0, 1, 0, 1, "single", job_id=str(os.getpid()))
    if not (0 <= info.rank < info.size):
        raise ValueError(f"launcher {info.launcher} gave rank {info.rank} outside world size {info.size}")
    if not (0 <= info.local_rank < max(info.local_size, 1)):
        raise ValueError(f"launcher {info.launcher} gave local rank {info.local_rank} "
                         f"outside local size {info.local_size}")
    return info
