"""Rank discovery from each launcher's variables."""
from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from fp4ccl._log import rank_tag
from fp4ccl.bootstrap.env import discover, launcher_stamp

# A job step carries the allocation's Slurm variables, and whatever a launcher inherited reaches the
# processes it starts: sbatch/salloc -> srun or mpiexec -> torchrun.
LEFTOVER_SLURM = {"SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1", "SLURM_LOCALID": "0",
                  "SLURM_STEP_TASKS_PER_NODE": "1", "SLURM_NODEID": "0"}
TORCHRUN_AGENT = {"TORCHELASTIC_RUN_ID": "r1", "GROUP_RANK": "0"}


@pytest.mark.parametrize("env, want", [
    ({}, (0, 1, 0, 1, "single")),
    ({"FP4CCL_RANK": "2", "FP4CCL_WORLD_SIZE": "4", "FP4CCL_LOCAL_RANK": "0", "FP4CCL_LOCAL_SIZE": "2",
      "FP4CCL_STORE": "127.0.0.1:29500", "FP4CCL_TOKEN": "ab"}, (2, 4, 0, 2, "fp4ccl-run")),
    ({"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_LOCAL_RANK": "3",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, (3, 4, 3, 4, "openmpi")),
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}, (1, 2, 1, 2, "mpich")),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
      "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_NODEID": "1"},
     (5, 8, 1, 4, "slurm")),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, (1, 2, 1, 2, "torchrun")),
    # a batch script's own shell (sbatch -n 4): SLURM_PROCID=0 and the job's SLURM_NTASKS, but no job step
    ({"SLURM_PROCID": "0", "SLURM_JOB_ID": "7", "SLURM_LOCALID": "0", "SLURM_NTASKS": "4",
      "SLURM_TASKS_PER_NODE": "4"}, (0, 1, 0, 1, "single")),
])
def test_discover(env, want):
    info = discover(env)
    assert (info.rank, info.size, info.local_rank, info.local_size, info.launcher) == want


def test_fp4ccl_run_variables_are_used_when_another_launcher_agrees():
    # fp4ccl-run's variables carry the store, so they are the ones used where another launcher's agree.
    env = {"FP4CCL_RANK": "1", "FP4CCL_WORLD_SIZE": "2", "FP4CCL_LOCAL_RANK": "1", "FP4CCL_LOCAL_SIZE": "2",
           "FP4CCL_STORE": "h:1", "RANK": "1", "WORLD_SIZE": "2", "PMI_RANK": "1", "PMI_SIZE": "2"}
    info = discover(env)
    assert (info.launcher, info.rank, info.size, info.store) == ("fp4ccl-run", 1, 2, "h:1")


@pytest.mark.parametrize("inner, names", [
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}, "PMI_RANK=1 PMI_SIZE=2"),
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_RANK=1 OMPI_COMM_WORLD_SIZE=2"),
    ({**TORCHRUN_AGENT, "RANK": "1", "WORLD_SIZE": "2"}, "RANK=1 WORLD_SIZE=2"),
    ({"RANK": "7", "WORLD_SIZE": "8"}, "RANK=7 WORLD_SIZE=8"),
])
def test_fp4ccl_run_variables_that_disagree_with_another_launcher_are_an_error(inner, names):
    # `fp4ccl-run -n 1 wrap.py` where wrap.py runs `mpiexec -n 2 ...`: the MPI ranks inherit FP4CCL_RANK=0
    # FP4CCL_WORLD_SIZE=1. Which launcher is inner cannot be told from these variables, so say so.
    env = {"FP4CCL_RANK": "0", "FP4CCL_WORLD_SIZE": "1", "FP4CCL_LOCAL_RANK": "0", "FP4CCL_LOCAL_SIZE": "1", **inner}
    with pytest.raises(ValueError) as e:
        discover(env)
    assert "FP4CCL_RANK=0 FP4CCL_WORLD_SIZE=1 (fp4ccl-run)" in str(e.value) and names in str(e.value)
    assert "disagree" in str(e.value) and "Unset the outer launcher's" in str(e.value)


def test_store_and_token():
    info = discover({"FP4CCL_RANK": "0", "FP4CCL_WORLD_SIZE": "1", "FP4CCL_STORE": "h:1", "FP4CCL_TOKEN": "t",
                     "FP4CCL_JOB_ID": "j"})
    assert (info.store, info.token, info.job_id) == ("h:1", "t", "j")


def test_bad_values_are_named():
    with pytest.raises(ValueError, match="OMPI_COMM_WORLD_RANK='x' is not an integer"):
        discover({"OMPI_COMM_WORLD_RANK": "x", "OMPI_COMM_WORLD_SIZE": "2"})
    with pytest.raises(ValueError, match="rank 4 outside world size 4"):
        discover({"RANK": "4", "WORLD_SIZE": "4"})


# -- nested launchers: the innermost one's variables win -------------------------------------------
@pytest.mark.parametrize("env, want", [
    ({**LEFTOVER_SLURM, "PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"},
     (1, 2, 1, 2, "mpich")),
    ({**LEFTOVER_SLURM, "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, (1, 2, 1, 2, "openmpi")),
    ({**LEFTOVER_SLURM, **TORCHRUN_AGENT, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"},
     (1, 2, 1, 2, "torchrun")),
    # mpirun starting one torchrun per node
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "0",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "1", **TORCHRUN_AGENT, "RANK": "5", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
      "LOCAL_WORLD_SIZE": "4"}, (5, 8, 1, 4, "torchrun")),
    # Cray MPICH / PALS name the local rank PMI_LOCAL_RANK
    ({"PMI_RANK": "3", "PMI_SIZE": "4", "PMI_LOCAL_RANK": "1", "PMI_LOCAL_SIZE": "2"}, (3, 4, 1, 2, "mpich")),
])
def test_innermost_launcher_wins(env, want):
    info = discover(env)
    assert (info.rank, info.size, info.local_rank, info.local_size, info.launcher) == want


def test_srun_with_pmi2_takes_the_local_rank_from_slurm():
    # srun --mpi=pmi2 sets PMI_RANK/PMI_SIZE (agreeing with Slurm's) but no MPI_LOCALRANKID.
    env = {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1",
           "SLURM_STEP_TASKS_PER_NODE": "4(x2)", "SLURM_TASKS_PER_NODE": "4(x2)", "SLURM_NODEID": "1",
           "PMI_RANK": "5", "PMI_SIZE": "8", "PMI_FD": "7"}
    info = discover(env)
    assert (info.rank, info.size, info.local_rank, info.local_size) == (5, 8, 1, 4)


def test_torch_env_variables_set_by_hand_must_agree_with_the_launcher():
    # RANK/WORLD_SIZE without torchrun's agent variables: torch.distributed's env:// convention, set by a
    # script or an outer launcher; nothing says which launcher is inner, so they must agree.
    agree = {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2",
             "RANK": "1", "WORLD_SIZE": "2"}
    assert discover(agree).launcher == "mpich"
    with pytest.raises(ValueError) as e:
        discover({**agree, "RANK": "0", "WORLD_SIZE": "1"})
    assert "RANK=0 WORLD_SIZE=1 (torch env://)" in str(e.value) and "PMI_RANK=1 PMI_SIZE=2" in str(e.value)


@pytest.mark.parametrize("env, needle", [
    ({"OMPI_COMM_WORLD_RANK": "1"}, "OMPI_COMM_WORLD_RANK is set but OMPI_COMM_WORLD_SIZE is not"),
    ({"PMI_RANK": "1"}, "PMI_RANK is set but PMI_SIZE is not"),
    ({"FP4CCL_RANK": "1"}, "FP4CCL_RANK is set but FP4CCL_WORLD_SIZE is not"),
    ({"RANK": "1"}, "RANK is set but WORLD_SIZE is not"),
    ({"FP4CCL_RANK": "", "FP4CCL_WORLD_SIZE": "2"}, "FP4CCL_RANK='' is not an integer"),
    ({"PMI_RANK": "0", "PMI_SIZE": ""}, "PMI_SIZE='' is not an integer"),
])
def test_partial_or_empty_launcher_variables_are_named(env, needle):
    with pytest.raises(ValueError, match=needle):
        discover(env)


# -- Slurm job steps -------------------------------------------------------------------------------
def slurm_step(procid, ntasks, nodeid, localid, per_node, **more):
    """The variables srun gives a task of a job step."""
    return {"SLURM_PROCID": str(procid), "SLURM_NTASKS": str(ntasks), "SLURM_STEP_NUM_TASKS": str(ntasks),
            "SLURM_NODEID": str(nodeid), "SLURM_LOCALID": str(localid), "SLURM_STEP_TASKS_PER_NODE": per_node,
            "SLURM_TASKS_PER_NODE": per_node, "SLURM_JOB_ID": "42", "SLURM_STEP_ID": "3", **more}


@pytest.mark.parametrize("env, want", [
    # srun -n3 -N2: two tasks on the first node, one on the second
    (slurm_step(1, 3, 0, 1, "2,1"), (1, 3, 1, 2)),
    (slurm_step(2, 3, 1, 0, "2,1"), (2, 3, 0, 1)),
    (slurm_step(9, 10, 2, 1, "4(x2),2"), (9, 10, 1, 2)),
    # a step of 2 tasks per node inside an allocation of 8 per node: the step's counts, not the job's
    (slurm_step(3, 4, 1, 1, "2(x2)", SLURM_TASKS_PER_NODE="8(x2)", SLURM_NTASKS_PER_NODE="8"), (3, 4, 1, 2)),
    # srun --preserve-env keeps the job's SLURM_NTASKS; SLURM_STEP_NUM_TASKS is the step's
    (slurm_step(3, 4, 1, 1, "2(x2)", SLURM_NTASKS="16"), (3, 4, 1, 2)),
    # no SLURM_NODEID: every node runs as many tasks, so any entry will do
    ({**slurm_step(3, 4, 0, 1, "2(x2)"), "SLURM_NODEID": None}, (3, 4, 1, 2)),
])
def test_slurm_step(env, want):
    info = discover({k: v for k, v in env.items() if v is not None})
    assert (info.rank, info.size, info.local_rank, info.local_size, info.launcher, info.job_id) == \
        (*want, "slurm", "42.3")


@pytest.mark.parametrize("env, needle", [
    ({**slurm_step(2, 3, 1, 0, "2,1"), "SLURM_STEP_TASKS_PER_NODE": "2(x"}, "SLURM_STEP_TASKS_PER_NODE='2(x'"),
    (slurm_step(2, 3, 5, 0, "2,1"), "SLURM_NODEID='5' is no index into SLURM_STEP_TASKS_PER_NODE='2,1'"),
])
def test_slurm_task_counts_that_cannot_be_read_are_named(env, needle):
    with pytest.raises(ValueError, match=re.escape(needle)):
        discover(env)


# -- fp4ccl-run inside another launcher -----------------------------------------------------------
def fp4ccl_child(outer: dict, rank=5, size=8, local=1, nproc=4) -> dict:
    """What fp4ccl-run hands rank `rank` when it was itself started with the variables `outer`."""
    env = {**outer, "FP4CCL_RANK": str(rank), "FP4CCL_WORLD_SIZE": str(size), "FP4CCL_LOCAL_RANK": str(local),
           "FP4CCL_LOCAL_SIZE": str(nproc), "RANK": str(rank), "WORLD_SIZE": str(size), "LOCAL_RANK": str(local),
           "LOCAL_WORLD_SIZE": str(nproc)}
    return {**env, "FP4CCL_ENV_STAMP": launcher_stamp(env)}


@pytest.mark.parametrize("outer", [
    slurm_step(1, 2, 1, 0, "1(x2)"),   # launch/slurm.sbatch: srun starts one fp4ccl-run per node
    {"PMI_RANK": "0", "PMI_SIZE": "1", "MPI_LOCALRANKID": "0", "MPI_LOCALNRANKS": "1", "PMI_FD": "9"},
    {"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"},
    {**TORCHRUN_AGENT, "RANK": "0", "WORLD_SIZE": "2"},
])
def test_fp4ccl_run_inside_another_launcher_wins(outer):
    info = discover(fp4ccl_child(outer))
    assert (info.rank, info.size, info.local_rank, info.local_size, info.launcher) == (5, 8, 1, 4, "fp4ccl-run")


@pytest.mark.parametrize("inner", [
    {"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2", "PMI_FD": "9"},
    {**TORCHRUN_AGENT, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"},
    slurm_step(1, 2, 0, 1, "2"),
])
def test_a_launcher_inside_fp4ccl_run_changes_the_stamp(inner):
    # fp4ccl-run -n 1 wrap.py, where wrap.py starts another launcher: the stamp no longer matches, and the
    # two launchers' ranks disagree.
    env = {**fp4ccl_child({}, rank=0, size=1, local=0, nproc=1), **inner}
    with pytest.raises(ValueError, match="FP4CCL_RANK=0 FP4CCL_WORLD_SIZE=1 .*disagree"):
        discover(env)


@pytest.mark.parametrize("change", [{"LOCAL_RANK": "0"}, {"LOCAL_WORLD_SIZE": None}, {"LOCAL_RANK": None},
                                    {"WORLD_SIZE": None}, {"RANK": None}])
def test_a_program_under_srun_fp4ccl_run_may_change_the_torch_variables(change):
    # srun -N2 ... fp4ccl-run -n 4: fp4ccl-run sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE itself,
    # so the stamp leaves them out; a program that changes them (or a partial pair) is no nested launcher.
    env = fp4ccl_child(slurm_step(1, 2, 1, 0, "1(x2)"), rank=6, size=8, local=2, nproc=4)
    env = {k: v for k, v in {**env, **change}.items() if v is not None}
    info = discover(env)
    assert (info.rank, info.size, info.local_rank, info.local_size, info.launcher) == (6, 8, 2, 4, "fp4ccl-run")


def test_rank_changed_under_fp4ccl_run_is_named_against_fp4ccl_rank():
    # The stamp still matches, but RANK is no longer the one fp4ccl-run set: name those two, not Slurm's.
    env = {**fp4ccl_child(slurm_step(1, 2, 1, 0, "1(x2)"), rank=6, size=8, local=2, nproc=4), "RANK": "0"}
    with pytest.raises(ValueError) as e:
        discover(env)
    assert "FP4CCL_RANK=6 FP4CCL_WORLD_SIZE=8 (fp4ccl-run)" in str(e.value)
    assert "RANK=0 WORLD_SIZE=8 (torch env://)" in str(e.value) and "SLURM" not in str(e.value)


def test_the_stamp_leaves_out_what_fp4ccl_run_sets_itself():
    from fp4ccl.bootstrap.env import _STAMPED
    from fp4ccl.launcher import _TORCH_NAMES
    assert not set(_STAMPED) & set(_TORCH_NAMES)
    assert {"TORCHELASTIC_RUN_ID", "GROUP_RANK"} <= set(_STAMPED)   # a torchrun inside fp4ccl-run sets these


# -- only the innermost launcher's variables are read ----------------------------------------------
@pytest.mark.parametrize("env, want", [
    # Open MPI inside a Slurm step whose task list this node cannot be found in
    ({**slurm_step(1, 3, 5, 0, "1,2"), "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2",
      "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}, (1, 2, 1, 2, "openmpi")),
    ({**slurm_step(1, 3, 0, 0, "2(x"), "PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1",
      "MPI_LOCALNRANKS": "2"}, (1, 2, 1, 2, "mpich")),
    # an outer launcher's partial variables
    ({**TORCHRUN_AGENT, "RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "PMI_RANK": "0"},
     (1, 2, 1, 2, "torchrun")),
    # a stray RANK (or WORLD_SIZE) beside a launcher is not half of a torch env:// claim
    ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "1",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "2", "RANK": "0"}, (1, 2, 1, 2, "openmpi")),
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2", "WORLD_SIZE": "4"},
     (1, 2, 1, 2, "mpich")),
    ({"FP4CCL_RANK": "1", "FP4CCL_WORLD_SIZE": "2", "FP4CCL_LOCAL_RANK": "1", "FP4CCL_LOCAL_SIZE": "2", "RANK": "0"},
     (1, 2, 1, 2, "fp4ccl-run")),
])
def test_outer_launchers_variables_are_not_read(env, want):
    info = discover(env)
    assert (info.rank, info.size, info.local_rank, info.local_size, info.launcher) == want
    assert rank_tag(env) == str(want[0])


def test_slurm_read_for_the_local_rank_only_as_a_hint():
    # srun --mpi=pmi2 under a task list that cannot be read: the PMI ranks stand, local rank unknown (0).
    env = {**slurm_step(5, 8, 1, 1, "4(x"), "PMI_RANK": "5", "PMI_SIZE": "8", "PMI_FD": "7"}
    info = discover(env)
    assert (info.rank, info.size, info.local_rank, info.local_size, info.launcher) == (5, 8, 0, 1, "mpich")


@pytest.mark.parametrize("env, needle", [
    ({**LEFTOVER_SLURM, "PMI_RANK": "1"}, "PMI_RANK is set but PMI_SIZE is not"),
    ({**TORCHRUN_AGENT, "RANK": "1", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"},
     "RANK is set but WORLD_SIZE is not"),
    ({**LEFTOVER_SLURM, "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_LOCAL_RANK": "z"},
     "OMPI_COMM_WORLD_LOCAL_RANK='z' is not an integer"),
])
def test_the_launcher_used_must_still_be_complete(env, needle):
    with pytest.raises(ValueError, match=needle):
        discover(env)


# -- log lines carry the rank discover() finds ------------------------------------------------------
@pytest.mark.parametrize("env, tag", [
    ({"PMI_RANK": "1", "PMI_SIZE": "2", "MPI_LOCALRANKID": "1", "MPI_LOCALNRANKS": "2"}, "1"),   # mpiexec (MPICH)
    (slurm_step(2, 3, 1, 0, "2,1"), "2"),
    ({"FP4CCL_RANK": "3", "FP4CCL_WORLD_SIZE": "4"}, "3"),
    ({}, "?"),
    ({"PMI_RANK": "1"}, "?"),                                                  # discover() refuses it
    ({"FP4CCL_RANK": "0", "FP4CCL_WORLD_SIZE": "1", "PMI_RANK": "1", "PMI_SIZE": "2"}, "?"),
])
def test_rank_tag(env, tag):
    assert rank_tag(env) == tag


def test_log_lines_are_tagged_with_the_mpich_rank():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FP4CCL_", "SLURM_", "OMPI_", "PMI_"))}
    env.update(FP4CCL_DEBUG="INFO", PMI_RANK="1", PMI_SIZE="2", MPI_LOCALRANKID="1", MPI_LOCALNRANKS="2",
               PYTHONPATH=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env.pop("RANK", None)
    r = subprocess.run([sys.executable, "-c", "from fp4ccl._log import get_logger; get_logger('fp4ccl.t').info('hi')"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stderr.rstrip().endswith("fp4ccl[1] INFO hi"), r.stderr


def test_importing_fp4ccl_modules_does_no_discovery(tmp_path):
    # Modules call get_logger at import; the rank tag is worked out on the first log line, and then kept.
    code = """
import os, sys
calls = []
def watch(frame, event, arg):
    if event == "call" and frame.f_code.co_name == "discover" and frame.f_code.co_filename.endswith("env.py"):
        calls.append(1)
sys.setprofile(watch)
import fp4ccl, fp4ccl._log
log = fp4ccl._log.get_logger("fp4ccl.t")
assert not calls and "fp4ccl.bootstrap.env" not in sys.modules, calls
import fp4ccl.bootstrap.env
assert "hashlib" not in sys.modules   # only launcher_stamp needs it
os.environ.update(PMI_RANK="1", PMI_SIZE="2", MPI_LOCALRANKID="1", MPI_LOCALNRANKS="2")
log.warning("one")
os.environ["PMI_RANK"] = "0"
log.warning("two")
sys.setprofile(None)
print(len(calls))
"""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("FP4CCL_", "SLURM_", "OMPI_", "PMI_", "MPI_", "TORCHELASTIC_"))}
    for k in ("RANK", "WORLD_SIZE", "GROUP_RANK"):
        env.pop(k, None)
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"
    lines = r.stderr.splitlines()
    assert lines[0].endswith("fp4ccl[1] WARNING one") and lines[1].endswith("fp4ccl[1] WARNING two"), r.stderr


def test_rank_tag_never_raises(monkeypatch):
    import fp4ccl.bootstrap.env as env_mod

    def broken(env):
        raise KeyError("x")
    monkeypatch.setattr(env_mod, "discover", broken)
    assert rank_tag({"PMI_RANK": "1", "PMI_SIZE": "2"}) == "?"
