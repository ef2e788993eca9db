"""Rank discovery from the variables that launchers set: fp4ccl-run, torchrun, Open MPI, MPICH/Hydra, Slurm,
then torch env:// (RANK/WORLD_SIZE), in the order tried."""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass
from typing import Mapping, NamedTuple, Optional


@dataclass(frozen=True)
class RankInfo:
    """Where this process sits in the job, and who started it."""

    rank: int
    size: int
    local_rank: int
    local_size: int
    launcher: str              # "fp4ccl-run" | "torchrun" | "openmpi" | "mpich" | "slurm" | "single"
    store: Optional[str] = None  # "host:port" of the fp4ccl TCP store (fp4ccl-run)
    token: str = ""
    job_id: str = ""

    @property
    def started_by_mpi(self) -> bool:
        return self.launcher in ("openmpi", "mpich")


class _Vars(NamedTuple):
    """One launcher's variables. It counts as present when its rank variable is set (even empty)."""

    launcher: str
    title: str                      # how error messages name it
    rank: str
    size: str
    local_rank: tuple[str, ...]     # the first one set is used
    local_size: tuple[str, ...]
    job_id: tuple[str, ...]


_FP4CCL = _Vars("fp4ccl-run", "fp4ccl-run", "FP4CCL_RANK", "FP4CCL_WORLD_SIZE", ("FP4CCL_LOCAL_RANK",),
                ("FP4CCL_LOCAL_SIZE",), ("FP4CCL_JOB_ID",))
_TORCHRUN = _Vars("torchrun", "torchrun", "RANK", "WORLD_SIZE", ("LOCAL_RANK",), ("LOCAL_WORLD_SIZE",),
                  ("TORCHELASTIC_RUN_ID",))
# The same names without torchrun's agent variables: torch.distributed's env:// convention, set by a script,
# a wrapper or an outer launcher (fp4ccl-run sets them too).
_TORCH_ENV = _TORCHRUN._replace(title="torch env://")
_OMPI = _Vars("openmpi", "Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", ("OMPI_COMM_WORLD_LOCAL_RANK",),
              ("OMPI_COMM_WORLD_LOCAL_SIZE",), ("OMPI_MCA_orte_ess_jobid", "PMIX_NAMESPACE"))
# MPICH's Hydra sets MPI_LOCALRANKID; Cray MPICH (PALS) sets PMI_LOCAL_RANK; srun --mpi=pmi2 sets neither.
_PMI = _Vars("mpich", "MPICH/PMI", "PMI_RANK", "PMI_SIZE", ("MPI_LOCALRANKID", "PMI_LOCAL_RANK"),
             ("MPI_LOCALNRANKS", "PMI_LOCAL_SIZE"), ("PMI_KVSNAME", "PMI_ID"))
# srun sets SLURM_STEP_NUM_TASKS for every job step; SLURM_NTASKS may be the job's (srun --preserve-env).
_SLURM = _Vars("slurm", "Slurm", "SLURM_PROCID", "SLURM_STEP_NUM_TASKS", ("SLURM_LOCALID",), (), ())

# Launchers nest as sbatch/salloc -> srun or mpiexec -> torchrun, and each passes its own variables on to
# what it starts: the first one present here is the innermost, the one that started this process.
_NESTED = (_TORCHRUN, _OMPI, _PMI, _SLURM)
_TORCHRUN_AGENT = ("TORCHELASTIC_RUN_ID", "GROUP_RANK")   # set by torchrun, not by people exporting RANK

# fp4ccl-run gives each rank a digest of these (every variable the launchers above are read from, and what
# identifies their process or step). A rank that sees the same digest was started by fp4ccl-run itself, and
# another launcher's variables then came from outside it: `srun ... fp4ccl-run` (launch/slurm.sbatch).
# Left out: the torch env:// names, which fp4ccl-run sets for its ranks itself. A program may change them
# without any launcher having run, and a nested torchrun changes its agent variables, which are in; RANK and
# WORLD_SIZE are checked against fp4ccl-run's own values instead.
STAMP = "FP4CCL_ENV_STAMP"
_SET_BY_FP4CCL_RUN = {_TORCH_ENV.rank, _TORCH_ENV.size, *_TORCH_ENV.local_rank, *_TORCH_ENV.local_size}
_STAMPED = tuple(sorted(({n for v in _NESTED for n in (v.rank, v.size, *v.local_rank, *v.local_size, *v.job_id)} | {
    *_TORCHRUN_AGENT, "TORCHELASTIC_ERROR_FILE", "PMI_FD", "PMI_PORT", "PMI_JOBID", "PMIX_RANK", "SLURM_NTASKS",
    "SLURM_NODEID", "SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "SLURM_JOB_ID", "SLURM_STEP_ID"})
    - _SET_BY_FP4CCL_RUN))


def launcher_stamp(env: Mapping[str, str]) -> str:
    """The digest of the other launchers' variables in `env` that fp4ccl-run hands its ranks as STAMP."""
    import hashlib   # here: discover() needs it only under fp4ccl-run, and `import fp4ccl` should not pay for it
    text = "\0".join(f"{n}={env[n]}" if n in env else n for n in _STAMPED)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def size_variable(launcher: str) -> str:
    """The variable discover() reads `launcher`'s world size from (RankInfo.launcher; itself where none), for
    messages."""
    return next((v.size for v in (_FP4CCL, *_NESTED) if v.launcher == launcher), launcher)


def _int(env: Mapping[str, str], *names: str) -> Optional[int]:
    """The first of `names` that is set, as an int; None when none is. A set but non-integer value (an empty
    one included) is an error naming the variable."""
    for name in names:
        value = env.get(name)
        if value is not None:
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {name}={value!r} is not an integer") from None
    return None


def _slurm_tasks_on_node(env: Mapping[str, str]) -> Optional[int]:
    """This node's task count in the Slurm job step.

    srun lists the step's task counts in the order of the step's nodes, compressed as "2(x3),1", in
    SLURM_STEP_TASKS_PER_NODE (SLURM_TASKS_PER_NODE, read where that is missing, is the same list except
    under srun --preserve-env, which leaves the job's there). SLURM_NODEID indexes that list: slurmstepd
    takes it from this node's place among the step's nodes, not the allocation's (nodelist_find on the
    step's node list in stepd_step_rec_create), so the two agree also for a step on some of the
    allocation's nodes.
    """
    name = next((n for n in ("SLURM_STEP_TASKS_PER_NODE", "SLURM_TASKS_PER_NODE") if n in env), None)
    if name is None:
        return None
    counts: list[int] = []
    for item in env[name].split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", item)
        if not m:
            raise ValueError(f"environment variable {name}={env[name]!r} is not a task count list like '2(x3),1'")
        counts += [int(m[1])] * int(m[2] or 1)
    node = _int(env, "SLURM_NODEID")
    if node is not None and 0 <= node < len(counts):
        return counts[node]
    if len(set(counts)) == 1:
        return counts[0]
    raise ValueError(f"cannot tell this node's task count: SLURM_NODEID={env.get('SLURM_NODEID')!r} is no index "
                     f"into {name}={env[name]!r}")


def _read(env: Mapping[str, str], v: _Vars) -> Optional[RankInfo]:
    """This launcher's view of the process, or None when its variables are absent; local_rank and
    local_size are None where it does not say."""
    if v.rank not in env or (v is _SLURM and v.size not in env):
        return None   # a batch script's shell has SLURM_PROCID=0 (and the job's SLURM_NTASKS) but is no step
    if v.size not in env:
        raise ValueError(f"environment variable {v.rank} is set but {v.size} is not ({v.title} sets both): "
                         f"set {v.size} or unset {v.rank}")
    if v is _SLURM:
        local_size = _slurm_tasks_on_node(env)
        job_id = f"{env.get('SLURM_JOB_ID', '')}.{env.get('SLURM_STEP_ID', '')}"
    else:
        local_size = _int(env, *v.local_size)
        job_id = next((env[n] for n in v.job_id if env.get(n)), "")
    info = RankInfo(_int(env, v.rank), _int(env, v.size), _int(env, *v.local_rank), local_size, v.launcher,
                    job_id=job_id)
    if v is _FP4CCL:
        info = dataclasses.replace(info, store=env.get("FP4CCL_STORE") or None, token=env.get("FP4CCL_TOKEN", ""))
    return info


def _torch_env(env: Mapping[str, str], beside_launcher: bool) -> Optional[RankInfo]:
    """RANK/WORLD_SIZE read as torch env://. Beside a launcher they are only a claim to check against it, and
    a stray RANK or WORLD_SIZE alone (left by a script, or by fp4ccl-run and then unset) is no claim."""
    if beside_launcher and not (_TORCH_ENV.rank in env and _TORCH_ENV.size in env):
        return None
    return _read(env, _TORCH_ENV)


def _slurm_hint(env: Mapping[str, str]) -> Optional[RankInfo]:
    """Slurm's view, read only for a local rank that the launcher used does not give; None where unreadable,
    since Slurm may be an outer launcher whose variables are not this process's."""
    try:
        return _read(env, _SLURM)
    except ValueError:
        return None


def _placed_alike(info: RankInfo, other: Optional[RankInfo]) -> Optional[RankInfo]:
    if other and other.local_rank is not None and (other.rank, other.size) == (info.rank, info.size):
        return other
    return None


def _shown(env: Mapping[str, str], v: _Vars) -> str:
    return f"{v.rank}={env.get(v.rank)} {v.size}={env.get(v.size)} ({v.title})"


def discover(env: Mapping[str, str] = os.environ) -> RankInfo:
    """Read rank, size and local rank from the environment; a lone process is rank 0 of 1.

    The innermost launcher in _NESTED wins, and the outer ones are not read (Slurm's variables only for a
    local rank that the one found does not give, and quietly). fp4ccl-run's variables win when its STAMP
    shows that it started this process. Otherwise they, and RANK/WORLD_SIZE without torchrun's agent, say
    nothing about nesting, so they must agree on rank and size with the launcher found (or each other);
    fp4ccl-run's, when present, are the ones used, for their store. RANK/WORLD_SIZE are checked against
    fp4ccl-run's under its stamp too, and beside a launcher one of them alone is ignored."""
    own = _read(env, _FP4CCL)
    stamped = own is not None and env.get(STAMP) == launcher_stamp(env)
    found = None
    if not stamped:   # else started by fp4ccl-run itself, and whatever ran outside it is not read
        agent = any(k in env for k in _TORCHRUN_AGENT)
        # Only the innermost launcher is read: an outer one's variables, whatever state they are in, are not
        # this process's to judge.
        found = next(((v, info) for v in _NESTED if (v is not _TORCHRUN or agent) and (info := _read(env, v))),
                     None)
    # RANK/WORLD_SIZE are a claim of their own unless torchrun's agent set them; under fp4ccl-run, which sets
    # them but leaves them out of its stamp, this is where a program that changed them is caught.
    torch = None if found and found[0] is _TORCHRUN else _torch_env(env, beside_launcher=bool(own or found))
    claims = [(v, info) for v, info in ((_FP4CCL, own), found or (None, None), (_TORCH_ENV, torch)) if info]
    if not claims:
        return RankInfo(0, 1, 0, 1, "single", job_id=str(os.getpid()))
    (first, info), others = claims[0], claims[1:]
    for v, other in others:
        if (other.rank, other.size) != (info.rank, info.size):
            if stamped:
                raise ValueError(f"{_shown(env, first)} and {_shown(env, v)} disagree: fp4ccl-run set both for this "
                                 f"process, and {v.rank}/{v.size} were changed since (by the program, or by a "
                                 f"launcher started inside it that sets only those). Leave them as fp4ccl-run set "
                                 f"them, or unset both")
            raise ValueError(f"{_shown(env, first)} and {_shown(env, v)} disagree: a launcher was started inside "
                             f"another and inherited its variables. Unset the outer launcher's ({first.rank} and "
                             f"{first.size}, or {v.rank} and {v.size}) before starting the inner one")
    if info.local_rank is None:
        # srun --mpi=pmi2 gives PMI_RANK/PMI_SIZE but the local rank only in SLURM_LOCALID: take it from a
        # launcher that places this process identically.
        same = _placed_alike(info, found and found[1]) or _placed_alike(info, _slurm_hint(env))
        info = dataclasses.replace(info, local_rank=same.local_rank if same else 0,
                                   local_size=same.local_size if same else info.local_size)
    if info.local_size is None:
        info = dataclasses.replace(info, local_size=1)
    if not (0 <= info.rank < info.size):
        raise ValueError(f"launcher {info.launcher} gave rank {info.rank} outside world size {info.size}")
    if not (0 <= info.local_rank < max(info.local_size, 1)):
        raise ValueError(f"launcher {info.launcher} gave local rank {info.local_rank} "
                         f"outside local size {info.local_size}")
    return info
