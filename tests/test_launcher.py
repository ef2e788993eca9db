"""fp4ccl-run end to end on CPU: prefixed output, all-or-nothing teardown, signals, timeouts, two nodes."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from fp4ccl.launcher import _split_argv, visible_gpu_count

LAUNCHER = [sys.executable, "-m", "fp4ccl.launcher"]
TOKEN = "feedfacefeedfacefeedfacefeedface"

# Every child script starts by recording its pid (and any helper's) so tests can prove nothing survives.
PRELUDE = """
import os, sys, time, signal, subprocess
RANK = int(os.environ["FP4CCL_RANK"])
PIDS = {pids!r}
def record(pid):
    with open(os.path.join(PIDS, f"{{pid}}.pid"), "w") as f:
        f.write(str(RANK))
record(os.getpid())
"""


def script(tmp_path, body: str, name: str = "job.py") -> str:
    pids = tmp_path / "pids"
    pids.mkdir(exist_ok=True)
    path = tmp_path / name
    path.write_text(PRELUDE.format(pids=str(pids)) + textwrap.dedent(body))
    return str(path)


def recorded_pids(tmp_path) -> list[int]:
    d = tmp_path / "pids"
    return [int(p.split(".")[0]) for p in os.listdir(d)] if d.exists() else []


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def assert_no_survivors(tmp_path, expect_at_least: int = 1):
    pids = recorded_pids(tmp_path)
    assert len(pids) >= expect_at_least, f"children recorded only {pids}"
    end = time.monotonic() + 3  # a SIGKILLed process may take a moment to be reaped by init
    while any(alive(p) for p in pids) and time.monotonic() < end:
        time.sleep(0.05)
    survivors = [p for p in pids if alive(p)]
    for p in survivors:  # do not leak them into the rest of the test session
        os.kill(p, signal.SIGKILL)
    assert not survivors, f"processes outlived the launcher: {survivors}"


def launch(args, timeout=30, env=None):
    return subprocess.run(LAUNCHER + list(args), capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def wait_for_pids(tmp_path, n, timeout=15):
    end = time.monotonic() + timeout
    while len(recorded_pids(tmp_path)) < n:
        assert time.monotonic() < end, f"only {len(recorded_pids(tmp_path))} of {n} children started"
        time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STORE_ALLGATHER = """
from fp4ccl.bootstrap.store import StoreClient
c = StoreClient(os.environ["FP4CCL_STORE"], os.environ["FP4CCL_TOKEN"], timeout=20)
W = int(os.environ["FP4CCL_WORLD_SIZE"])
c.set(f"val/{RANK}", str(RANK * RANK).encode())
total = sum(int(c.get(f"val/{r}")) for r in range(W))
print(f"sum={total} world={W} local={os.environ['FP4CCL_LOCAL_RANK']}/{os.environ['FP4CCL_LOCAL_SIZE']} "
      f"node={os.environ['FP4CCL_NODE_RANK']} job={os.environ['FP4CCL_JOB_ID']} "
      f"torch={os.environ['RANK']},{os.environ['WORLD_SIZE']},{os.environ['LOCAL_RANK']},"
      f"{os.environ['LOCAL_WORLD_SIZE']} unbuffered={os.environ['PYTHONUNBUFFERED']}")
print(f"note from {RANK}", file=sys.stderr)
"""


def test_three_rank_job_computes_with_prefixed_output(tmp_path):
    path = script(tmp_path, STORE_ALLGATHER)
    logs = tmp_path / "logs"
    r = launch(["-n", "3", "--log-dir", str(logs), path])
    assert r.returncode == 0, r.stderr
    out = sorted(r.stdout.splitlines())
    assert len(out) == 3
    jobs = set()
    for i, line in enumerate(out):
        assert line.startswith(f"[rank{i}]: sum=5 world=3 local={i}/3 node=0 job="), line
        assert line.endswith(f"torch={i},3,{i},3 unbuffered=1"), line
        jobs.add(line.split("job=")[1].split()[0])
    assert len(jobs) == 1  # one job id shared by every rank
    assert sorted(r.stderr.splitlines()) == [f"[rank{i}]: note from {i}" for i in range(3)]
    # Per-rank log files hold the unprefixed lines.
    assert (logs / "rank1.out").read_text().startswith("sum=5 world=3 local=1/3")
    assert (logs / "rank2.err").read_text() == "note from 2\n"
    assert_no_survivors(tmp_path, 3)


def test_torch_variables_are_set_for_each_rank_even_when_inherited(tmp_path):
    # `RANK=0 WORLD_SIZE=2 fp4ccl-run -n 2 ptorch.py` gave both ranks RANK=0 (and one MASTER_PORT in use).
    path = script(tmp_path, 'print(*(os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", '
                            '"MASTER_ADDR")), os.environ["MASTER_PORT"] != "1")\n')
    inherited = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "9", "MASTER_ADDR": "x",
                 "MASTER_PORT": "1", "FP4CCL_DEBUG": "INFO"}
    r = launch(["-n", "2", path], env=inherited)
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == [f"[rank{i}]: {i} 2 {i} 2 127.0.0.1 True" for i in range(2)]
    assert "fp4ccl-run: setting LOCAL_RANK (inherited 0), LOCAL_WORLD_SIZE (inherited 9), MASTER_ADDR (inherited x)" \
           ", MASTER_PORT (inherited 1), RANK (inherited 0), WORLD_SIZE (inherited 2) for each rank" in r.stderr


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DISCOVER = """
import os
from fp4ccl.bootstrap.env import discover
try:
    i = discover()
    line = f"found {i.rank} {i.size} {i.local_rank} {i.local_size} {i.launcher}"
except ValueError as e:
    line = f"error {e}"
# One write of the whole line: two ranks of an inner mpiexec share the pipe, and print() writes the text and
# its newline apart (unbuffered), so two ranks' lines interleaved. A pipe write under 4 KiB is atomic.
os.write(1, (line + "\\n").encode())
"""


def test_ranks_of_fp4ccl_run_inside_a_slurm_step_are_fp4ccl_runs(tmp_path):
    # launch/slurm.sbatch: srun starts one fp4ccl-run per node, whose ranks inherit the step's variables.
    path = script(tmp_path, DISCOVER)
    step = {"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0",
            "SLURM_NODEID": "0", "SLURM_STEP_TASKS_PER_NODE": "1", "PYTHONPATH": ROOT}
    r = launch(["-n", "2", path], env=step)
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == [f"[rank{i}]: found {i} 2 {i} 2 fp4ccl-run" for i in range(2)]


def test_a_rank_under_srun_fp4ccl_run_may_change_the_torch_variables(tmp_path):
    # fp4ccl-run sets LOCAL_RANK & co. itself and leaves them out of its stamp: a program that changes them
    # still finds fp4ccl-run's ranks, and one that changes RANK is told it disagrees with FP4CCL_RANK.
    path = script(tmp_path, 'os.environ["LOCAL_RANK"] = "7"; del os.environ["LOCAL_WORLD_SIZE"]\n'
                            'if RANK == 1: os.environ["RANK"] = "0"\n' + DISCOVER)
    step = {"SLURM_PROCID": "1", "SLURM_STEP_NUM_TASKS": "2", "SLURM_NTASKS": "2", "SLURM_LOCALID": "0",
            "SLURM_NODEID": "1", "SLURM_STEP_TASKS_PER_NODE": "1(x2)", "PYTHONPATH": ROOT}
    r = launch(["-n", "2", path], env=step)
    assert r.returncode == 0, r.stderr
    lines = sorted(r.stdout.splitlines())
    assert lines[0] == "[rank0]: found 0 2 0 2 fp4ccl-run", lines
    assert lines[1].startswith("[rank1]: error FP4CCL_RANK=1 FP4CCL_WORLD_SIZE=2 (fp4ccl-run) and RANK=0 WORLD_SIZE=2 "
                               "(torch env://) disagree"), lines


def test_mpiexec_inside_fp4ccl_run_is_told_apart(tmp_path):
    # `fp4ccl-run -n 1 wrap.py` where wrap.py runs `mpiexec -n 2 python t.py` gave both MPI ranks rank 0 of 1.
    mpiexec = shutil.which("mpiexec", path=os.path.dirname(sys.executable)) or shutil.which("mpiexec")
    if mpiexec is None:
        pytest.skip("no mpiexec on PATH")
    inner = tmp_path / "t.py"
    inner.write_text(DISCOVER)
    path = script(tmp_path, f"subprocess.run([{mpiexec!r}, '-n', '2', sys.executable, {str(inner)!r}], check=True)\n")
    r = launch(["-n", "1", path], env={"PYTHONPATH": ROOT}, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 2 and all(line.startswith("[rank0]: error FP4CCL_RANK=0 FP4CCL_WORLD_SIZE=1 (fp4ccl-run)")
                                   for line in lines), lines
    assert sorted(line.split(" and ")[1].split(" (")[0] for line in lines) == \
        ["PMI_RANK=0 PMI_SIZE=2", "PMI_RANK=1 PMI_SIZE=2"]


def test_ranks_filter_hides_other_ranks(tmp_path):
    path = script(tmp_path, 'print("hi", RANK); print("e", RANK, file=sys.stderr)\n')
    r = launch(["-n", "3", "--ranks-filter", "0,2", path])
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == ["[rank0]: hi 0", "[rank2]: hi 2"]
    assert sorted(r.stderr.splitlines()) == ["[rank0]: e 0", "[rank2]: e 2"]


def test_module_mode_and_script_args(tmp_path):
    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "tool.py").write_text("import os, sys\nprint(os.environ['FP4CCL_RANK'], sys.argv[1:])\n")
    r = subprocess.run(LAUNCHER + ["-n", "2", "-m", "mypkg.tool", "--flag", "-n", "9"], capture_output=True,
                       text=True, timeout=30, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.splitlines()) == ["[rank0]: 0 ['--flag', '-n', '9']", "[rank1]: 1 ['--flag', '-n', '9']"]


def test_failing_rank_brings_job_down_with_its_exit_code(tmp_path):
    path = script(tmp_path, """
        if RANK == 0:  # a grandchild in rank 0's process group must die with it
            helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
            record(helper.pid)
        if RANK == 1:
            while len(os.listdir(PIDS)) < 4:
                time.sleep(0.05)
            print("rank one is giving up", file=sys.stderr)
            sys.exit(7)
        time.sleep(120)
    """)
    t0 = time.monotonic()
    r = launch(["-n", "3", path], timeout=60)
    elapsed = time.monotonic() - t0
    assert r.returncode == 7, r.stderr
    assert elapsed < 15
    assert "root cause: rank 1 (node 0, local rank 1)" in r.stderr
    assert "exited with code 7" in r.stderr and "| rank one is giving up" in r.stderr
    assert "pid " in r.stderr and socket.gethostname() in r.stderr
    assert_no_survivors(tmp_path, 4)


def test_rank_killed_by_signal_is_reported_by_name(tmp_path):
    path = script(tmp_path, """
        if RANK == 2:
            time.sleep(0.3)
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(120)
    """)
    r = launch(["-n", "3", path], timeout=60)
    assert r.returncode == 128 + signal.SIGKILL, r.stderr
    assert "rank 2" in r.stderr and "killed by SIGKILL" in r.stderr
    assert_no_survivors(tmp_path, 3)


def interrupt_when_ready(args, ready_files, wait: float = 15.0):
    """Start fp4ccl-run with args, send it SIGINT once every file in ready_files exists; (process, stderr)."""
    p = subprocess.Popen(LAUNCHER + args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + wait
        while not all(f.exists() for f in ready_files):
            assert time.monotonic() < end and p.poll() is None
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        _, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
    return p, err


def test_sigint_to_launcher_ends_every_rank_even_stubborn_ones(tmp_path):
    path = script(tmp_path, """
        if RANK == 1:  # ignores the polite signals: the launcher must escalate to SIGKILL
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        open(os.path.join(PIDS, "..", f"ready{RANK}"), "w").close()
        time.sleep(120)
    """)
    # once every rank has installed its handlers, or SIGINT could beat rank 1's SIG_IGN
    p, err = interrupt_when_ready(["-n", "3", "--grace-period", "1", path],
                                  [tmp_path / f"ready{i}" for i in range(3)])
    assert p.returncode == 128 + signal.SIGINT, err
    assert "SIGINT" in err
    assert_no_survivors(tmp_path, 3)


def test_sigterm_to_launcher_ends_every_rank(tmp_path):
    path = script(tmp_path, "time.sleep(120)\n")
    p = subprocess.Popen(LAUNCHER + ["-n", "2", path], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for_pids(tmp_path, 2)
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 128 + signal.SIGTERM, err
    assert_no_survivors(tmp_path, 2)


def test_timeout_ends_a_hung_job(tmp_path):
    path = script(tmp_path, 'print("stuck", file=sys.stderr)\ntime.sleep(120)\n')
    t0 = time.monotonic()
    r = launch(["-n", "2", "--timeout", "1.5", path], timeout=60)
    assert r.returncode == 124, r.stderr
    assert 1.4 < time.monotonic() - t0 < 15
    assert "timeout after 1.5 s" in r.stderr and "| stuck" in r.stderr
    assert_no_survivors(tmp_path, 2)


def _two_nodes(tmp_path, path, port, extra=(), env=None):
    env = {**os.environ, "FP4CCL_TOKEN": TOKEN, **(env or {})}
    common = ["-n", "2", "--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(port),
              "--rdzv-timeout", "20", *extra]
    # Start node 1 first: its launcher must wait for node 0's store to come up.
    n1 = subprocess.Popen(LAUNCHER + common + ["--node-rank", "1", path], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env)
    time.sleep(0.3)
    n0 = subprocess.Popen(LAUNCHER + common + ["--node-rank", "0", path], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env)
    try:
        out0, err0 = n0.communicate(timeout=40)
        out1, err1 = n1.communicate(timeout=40)
    finally:
        for p in (n0, n1):
            if p.poll() is None:
                p.kill()
    return (n0.returncode, out0, err0), (n1.returncode, out1, err1)


def test_two_launchers_on_loopback_form_one_four_rank_job(tmp_path):
    path = script(tmp_path, STORE_ALLGATHER)
    (rc0, out0, err0), (rc1, out1, err1) = _two_nodes(tmp_path, path, free_port())
    assert rc0 == 0 and rc1 == 0, err0 + err1
    lines0, lines1 = sorted(out0.splitlines()), sorted(out1.splitlines())
    assert [l.split(":")[0] for l in lines0] == ["[rank0]", "[rank1]"]
    assert [l.split(":")[0] for l in lines1] == ["[rank2]", "[rank3]"]
    for line in lines0 + lines1:
        assert "sum=14 world=4" in line  # 0 + 1 + 4 + 9 gathered through the one store
    assert all("node=0" in l for l in lines0) and all("node=1" in l for l in lines1)
    assert "local=0/2" in lines1[0] and "local=1/2" in lines1[1]
    assert len({l.split("job=")[1].split()[0] for l in lines0 + lines1}) == 1
    assert_no_survivors(tmp_path, 4)


def test_failure_on_one_node_stops_the_other(tmp_path):
    path = script(tmp_path, """
        if RANK == 3:
            time.sleep(0.5)
            sys.exit(5)
        time.sleep(120)
    """)
    t0 = time.monotonic()
    (rc0, _, err0), (rc1, _, err1) = _two_nodes(tmp_path, path, free_port(), extra=["--grace-period", "2"])
    assert rc1 == 5 and "root cause: rank 3 (node 1, local rank 1)" in err1
    assert rc0 == 5 and "rank 3 (node 1)" in err0
    assert time.monotonic() - t0 < 25
    assert_no_survivors(tmp_path, 4)


@pytest.mark.parametrize("killed", [1, 0])
def test_a_launcher_that_dies_ends_the_job_on_the_other_node(tmp_path, killed):
    """Node 1's launcher killed: node 0 notices its silent heartbeat. Node 0's (the store's host) killed: node 1
    loses the store and exits at once, instead of retrying it for the rendezvous timeout. Either way the killed
    launcher's rank dies with it (no chance to clean up) and the other node stops its own."""
    path = script(tmp_path, "time.sleep(120)\n")
    env = {**os.environ, "FP4CCL_TOKEN": TOKEN, "FP4CCL_HEARTBEAT_TIMEOUT": "2"}
    base = ["-n", "1", "--nnodes", "2", "--master-port", str(free_port()), "--grace-period", "1"]
    nodes = [subprocess.Popen(LAUNCHER + base + ["--node-rank", str(r), path], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for r in (0, 1)]
    survivor = nodes[1 - killed]
    try:
        wait_for_pids(tmp_path, 2)
        nodes[killed].kill()
        t0 = time.monotonic()
        _, err = survivor.communicate(timeout=60)
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
            p.communicate()
    why = "node 1 has not been heard from" if killed == 1 else "lost contact with the job's store"
    assert survivor.returncode == 1 and why in err, err
    assert time.monotonic() - t0 < 10
    assert_no_survivors(tmp_path, 2)


def test_a_sigkilled_launcher_takes_what_the_ranks_started_with_it(tmp_path):
    """The ranks die by their parent-death signal; the processes they started, by the launcher's guard."""
    path = script(tmp_path, """
        helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        record(helper.pid)
        time.sleep(120)
    """)
    launcher = subprocess.Popen(LAUNCHER + ["-n", "2", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_pids(tmp_path, 4)
        launcher.kill()
    finally:
        if launcher.poll() is None:
            launcher.kill()
        launcher.wait()
    assert_no_survivors(tmp_path, 4)


def test_nodes_that_disagree_on_nnodes_both_fail_at_rendezvous(tmp_path):
    """The node that finds the mismatch tells node 0, which would otherwise start its ranks for a job that
    never completes."""
    path = script(tmp_path, "time.sleep(30)\n")
    port = free_port()
    n0 = subprocess.Popen(LAUNCHER + ["-n", "1", "--nnodes", "2", "--node-rank", "0", "--master-port", str(port), path],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env={**os.environ, "FP4CCL_TOKEN": TOKEN})
    t0 = time.monotonic()
    try:
        r1 = launch(["-n", "1", "--nnodes", "3", "--node-rank", "1", "--master-port", str(port), path],
                    env={"FP4CCL_TOKEN": TOKEN})
        _, err0 = n0.communicate(timeout=30)
    finally:
        if n0.poll() is None:
            n0.kill()
            n0.communicate()
    _assert_one_line_error(r1, tmp_path, "node 0 started a job of --nnodes 2, this node says 3")
    assert n0.returncode == 1 and "node 1" in err0 and "stopped the job" in err0, err0
    assert len(err0.strip().splitlines()) == 1, err0
    assert time.monotonic() - t0 < 15


# ---- bad input: one line, non-zero exit, and no child ever started ----------------------------------

def test_log_dir_that_is_a_file(tmp_path):
    path = script(tmp_path, "print('ran')\n")
    (tmp_path / "afile").write_text("")
    _assert_one_line_error(launch(["-n", "2", "--log-dir", str(tmp_path / "afile"), path]), tmp_path, "--log-dir")


def test_log_file_that_cannot_be_opened_starts_no_rank(tmp_path):
    path = script(tmp_path, "time.sleep(30)\n")
    (tmp_path / "logs" / "rank1.out").mkdir(parents=True)
    r = launch(["-n", "3", "--log-dir", str(tmp_path / "logs"), path])
    _assert_one_line_error(r, tmp_path, "rank1.out")


def _assert_one_line_error(r, tmp_path, needle):
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fp4ccl-run: error:") and needle in lines[0], r.stderr
    assert recorded_pids(tmp_path) == []


@pytest.mark.parametrize("args, needle", [
    (["--bogus", "1"], "unrecognized arguments: --bogus"),
    (["-n", "0"], "at least 1, got 0"),
    (["-n", "two"], "invalid int value"),
    (["--nnodes", "2", "--node-rank", "2"], "--node-rank must be in [0, 1], got 2"),
    (["--timeout", "0"], "--timeout must be positive"),
    (["--ranks-filter", "a,b"], "--ranks-filter"),
    (["-n", "2", "--ranks-filter", "5"], "names rank 5, but the job has 2 ranks"),
])
def test_bad_flags(tmp_path, args, needle):
    path = script(tmp_path, "print('ran')\n")
    _assert_one_line_error(launch(args + [path]), tmp_path, needle)


def test_missing_script(tmp_path):
    script(tmp_path, "")
    _assert_one_line_error(launch(["-n", "2", str(tmp_path / "absent.py")]), tmp_path, "script not found")


def test_python_before_the_script_gets_a_hint(tmp_path):
    path = script(tmp_path, "print('ran')\n")
    _assert_one_line_error(launch(["-n", "2", "python3", path]), tmp_path, "fp4ccl-run starts Python itself")


def test_no_program(tmp_path):
    _assert_one_line_error(launch(["-n", "2"]), tmp_path, "no program given")


def test_port_in_use(tmp_path):
    path = script(tmp_path, "print('ran')\n")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = launch(["-n", "2", "--master-port", str(port), path])
    _assert_one_line_error(r, tmp_path, f"port {port} is in use")


def test_node_that_never_shows_up(tmp_path):
    path = script(tmp_path, "print('ran')\n")
    t0 = time.monotonic()
    r = launch(["-n", "1", "--nnodes", "2", "--node-rank", "0", "--master-port", str(free_port()),
                "--rdzv-timeout", "1", path], env={"FP4CCL_TOKEN": TOKEN})
    _assert_one_line_error(r, tmp_path, "node(s) 1 never joined")
    assert time.monotonic() - t0 < 10


def test_master_that_never_shows_up(tmp_path):
    path = script(tmp_path, "print('ran')\n")
    r = launch(["-n", "1", "--nnodes", "2", "--node-rank", "1", "--master-port", str(free_port()),
                "--rdzv-timeout", "1", path], env={"FP4CCL_TOKEN": TOKEN})
    _assert_one_line_error(r, tmp_path, "could not reach node 0's store")


def test_multi_node_needs_a_token(tmp_path):
    path = script(tmp_path, "print('ran')\n")
    env = {k: v for k, v in os.environ.items() if k != "FP4CCL_TOKEN"}
    r = subprocess.run(LAUNCHER + ["--nnodes", "2", "--master-port", str(free_port()), path],
                       capture_output=True, text=True, timeout=30, env=env)
    _assert_one_line_error(r, tmp_path, "FP4CCL_TOKEN")


def test_wrong_token_on_a_node(tmp_path):
    path = script(tmp_path, "time.sleep(30)\n")
    port = free_port()
    base = ["-n", "1", "--nnodes", "2", "--master-port", str(port), "--rdzv-timeout", "3"]
    n0 = subprocess.Popen(LAUNCHER + base + ["--node-rank", "0", path], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env={**os.environ, "FP4CCL_TOKEN": TOKEN})
    try:
        r = launch(base + ["--node-rank", "1", path], env={"FP4CCL_TOKEN": "wrong"})
    finally:
        n0.communicate(timeout=30)
    _assert_one_line_error(r, tmp_path, "rejected this job's token")
    assert n0.returncode != 0


def test_node_rank_collision(tmp_path):
    path = script(tmp_path, "time.sleep(30)\n")
    port = free_port()
    env = {**os.environ, "FP4CCL_TOKEN": TOKEN}
    base = ["-n", "1", "--nnodes", "3", "--master-port", str(port), "--rdzv-timeout", "3"]
    n0 = subprocess.Popen(LAUNCHER + base + ["--node-rank", "0", path], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env)
    n1 = subprocess.Popen(LAUNCHER + base + ["--node-rank", "1", path], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env)
    try:
        time.sleep(1.0)
        r = launch(base + ["--node-rank", "1", path], env={"FP4CCL_TOKEN": TOKEN})
    finally:
        for p in (n0, n1):
            p.communicate(timeout=30)
    _assert_one_line_error(r, tmp_path, "node rank 1 already joined")
    assert n0.returncode != 0 and n1.returncode != 0  # node 2 never came: they time out cleanly


def test_split_argv_stops_at_the_program():
    assert _split_argv(["-n", "2", "a.py", "-n", "3"]) == (["-n", "2"], ["a.py", "-n", "3"])
    assert _split_argv(["--timeout", "5", "-m", "pkg.mod", "-x"]) == (["--timeout", "5", "-m", "pkg.mod"], ["-x"])
    assert _split_argv(["-n", "1", "--", "-weird.py"]) == (["-n", "1"], ["-weird.py"])


def test_default_nproc_is_gpu_count_or_four(tmp_path):
    path = script(tmp_path, "print(os.environ['FP4CCL_WORLD_SIZE'])\n")
    r = launch([path])
    assert r.returncode == 0, r.stderr
    expected = visible_gpu_count() or 4
    assert sorted(r.stdout.splitlines()) == [f"[rank{i}]: {expected}" for i in range(expected)]
    assert_no_survivors(tmp_path, expected)


# ---- the report names only the ranks the launcher really stopped --------------------------------------

def _report_line(stderr: str, head: str) -> str:
    lines = [l for l in stderr.splitlines() if l.startswith(f"fp4ccl-run: {head}")]
    return lines[0] if lines else ""


def test_ranks_that_fail_by_themselves_are_not_listed_as_stopped(tmp_path):
    # Rank 0 fails; ranks 1 and 2 ignore SIGTERM and then fail by themselves within the grace period;
    # rank 3 waits and dies of the launcher's SIGTERM. Only rank 3 was stopped by the launcher.
    path = script(tmp_path, """
        failed = os.path.join(PIDS, "..", "rank0-failed")
        if RANK == 0:
            while len(os.listdir(PIDS)) < 4:
                time.sleep(0.02)
            open(failed, "w").close()
            sys.exit(7)
        if RANK in (1, 2):
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            while not os.path.exists(failed):
                time.sleep(0.02)
            time.sleep(0.5)
            print(f"rank {RANK} fails by itself", file=sys.stderr)
            sys.exit(3)
        time.sleep(120)
    """)
    r = launch(["-n", "4", "--grace-period", "10", path], timeout=60)
    assert r.returncode == 7, r.stderr
    assert "root cause: rank 0 (node 0, local rank 0)" in r.stderr
    assert _report_line(r.stderr, "ranks stopped by the launcher:") == \
        "fp4ccl-run: ranks stopped by the launcher: 3 (killed by SIGTERM)", r.stderr
    assert _report_line(r.stderr, "other failed ranks:") == \
        "fp4ccl-run: other failed ranks: 1 (exited with code 3), 2 (exited with code 3)", r.stderr
    assert_no_survivors(tmp_path, 4)


def test_every_rank_failing_quickly_is_never_reported_as_stopped(tmp_path):
    # The race of the user report (`fp4ccl-run -m nonexistent_mod`): every rank exits by itself at about the
    # same time, so some may exit between the launcher's poll and its SIGTERM.
    path = script(tmp_path, """
        while len(os.listdir(PIDS)) < 6:
            time.sleep(0.01)
        sys.exit(3)
    """)
    for _ in range(3):
        r = launch(["-n", "6", path], timeout=60)
        assert r.returncode == 3, r.stderr
        stopped = _report_line(r.stderr, "ranks stopped by the launcher:")
        assert "exited with code" not in stopped, r.stderr
        others = _report_line(r.stderr, "other failed ranks:")
        named = {int(x.split()[0]) for x in others.split(": ", 2)[2].split(", ")} if others else set()
        named |= {int(x.split()[0]) for x in stopped.split(": ", 2)[2].split(", ")} if stopped else set()
        root = int(r.stderr.split("root cause: rank ")[1].split()[0])
        assert named | {root} == set(range(6)), r.stderr   # every rank accounted for


def test_missing_module_reports_every_rank_as_failed_by_itself(tmp_path):
    r = launch(["-n", "3", "-m", "fp4ccl_no_such_module_here"], timeout=60)
    assert r.returncode == 1, r.stderr
    assert "No module named fp4ccl_no_such_module_here" in r.stderr
    assert "exited with code" not in _report_line(r.stderr, "ranks stopped by the launcher:"), r.stderr


# ---- leftover /dev/shm payload files of the job are removed at teardown --------------------------------

needs_shm = pytest.mark.skipif(not os.path.isdir("/dev/shm"), reason="no /dev/shm")

# Each rank leaves a file named like the host backend's payloads (fp4ccl-<FP4CCL_JOB_ID>-...) and says where.
SHM_PRELUDE = """
job = os.environ["FP4CCL_JOB_ID"]
leftover = f"/dev/shm/fp4ccl-{job}-test-r{RANK}"
with open(leftover, "wb") as f:
    f.write(b"x" * 4096)
with open(os.path.join(PIDS, "..", f"shm{RANK}"), "w") as f:
    f.write(leftover)
"""


@pytest.fixture
def other_job_file(tmp_path):
    """A file of another job in /dev/shm, which must survive; afterwards, remove it and whatever the test's
    ranks left (so a failing test does not leak files)."""
    path = f"/dev/shm/fp4ccl-{os.urandom(6).hex()}-not-ours"
    with open(path, "wb") as f:
        f.write(b"y")
    yield path
    for f in [path] + [p.read_text() for p in tmp_path.glob("shm*")]:
        if os.path.exists(f):
            os.unlink(f)


def _leftovers(tmp_path, n):
    files = [(tmp_path / f"shm{i}").read_text() for i in range(n)]
    assert len(set(files)) == n
    return [f for f in files if os.path.exists(f)]


@needs_shm
@pytest.mark.parametrize("how", ["fails", "killed", "ok"])
def test_job_files_in_dev_shm_are_removed_at_teardown(tmp_path, other_job_file, how):
    body = {"fails": "if RANK == 1:\n    sys.exit(3)\ntime.sleep(120)\n",
            "killed": "if RANK == 0:\n    os.kill(os.getpid(), signal.SIGKILL)\ntime.sleep(120)\n",
            "ok": ""}[how]
    path = script(tmp_path, SHM_PRELUDE + "while len(os.listdir(PIDS)) < 3:\n    time.sleep(0.02)\n" + body)
    r = launch(["-n", "3", path], timeout=60, env={"FP4CCL_DEBUG": "INFO"})
    assert r.returncode == {"fails": 3, "killed": 128 + signal.SIGKILL, "ok": 0}[how], r.stderr
    assert _leftovers(tmp_path, 3) == [], r.stderr
    assert os.path.exists(other_job_file)   # another job's file is never touched
    assert "fp4ccl-run: removed 3 leftover file(s) of job" in r.stderr, r.stderr
    assert_no_survivors(tmp_path, 3)


@needs_shm
def test_job_files_in_dev_shm_are_removed_after_ctrl_c(tmp_path, other_job_file):
    path = script(tmp_path, SHM_PRELUDE + "time.sleep(120)\n")
    p, err = interrupt_when_ready(["-n", "2", path], [tmp_path / f"shm{i}" for i in range(2)])
    assert p.returncode == 128 + signal.SIGINT, err
    assert _leftovers(tmp_path, 2) == [], err
    assert os.path.exists(other_job_file)
    assert "removed" not in err   # said only at FP4CCL_DEBUG=INFO
    assert_no_survivors(tmp_path, 2)


@needs_shm
def test_two_launchers_on_one_host_leave_job_files_until_both_are_done(tmp_path, other_job_file):
    # Node 1's ranks end at once; node 0's rank 0 still uses its file afterwards. The last launcher on the
    # host removes the job's files; the first must not pull them from under the other node's ranks.
    path = script(tmp_path, SHM_PRELUDE + textwrap.dedent("""
        if RANK == 0:
            time.sleep(2.5)   # node 1's launcher has long finished by now
            print("still there" if os.path.exists(leftover) else "gone early")
    """))
    (rc0, out0, err0), (rc1, _, err1) = _two_nodes(tmp_path, path, free_port())
    assert rc0 == 0 and rc1 == 0, err0 + err1
    assert "[rank0]: still there" in out0, out0 + err0
    assert _leftovers(tmp_path, 4) == []
    assert_no_survivors(tmp_path, 4)


# ---- launch/mpirun.sh forwards the job's settings to remote ranks --------------------------------------

def _run_mpirun_sh(tmp_path, version: str, extra_env: dict) -> list[str]:
    """Run launch/mpirun.sh against a fake mpirun/mpiexec that reports `version` and records its argv."""
    fake = tmp_path / "bin"
    fake.mkdir()
    for name in ("mpirun", "mpiexec"):
        (fake / name).write_text(f'#!/bin/sh\nif [ "$1" = "--version" ]; then echo "{version}"; exit 0; fi\n'
                                 f'printf "%s\\n" {name} "$@" > "{tmp_path}/argv"\n')
        (fake / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FP4CCL_", "NCCL_"))}
    env.update(extra_env, PATH=f"{fake}:{os.environ['PATH']}")
    r = subprocess.run(["bash", os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                             "launch", "mpirun.sh"), "job.py", "--flag"],
                       capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 0, r.stderr
    return (tmp_path / "argv").read_text().splitlines()


JOB_SETTINGS = {"FP4CCL_TIMEOUT": "30", "FP4CCL_ALGO": "ring", "FP4CCL_CHECK": "1", "NCCL_DEBUG": "INFO",
                "NCCL_PROTO": "Simple", "FP4CCL_DEBUG": "WARN", "UNRELATED_SETTING": "x"}


def test_mpirun_sh_forwards_every_fp4ccl_and_nccl_variable_under_open_mpi(tmp_path):
    argv = _run_mpirun_sh(tmp_path, "mpirun (Open MPI) 4.1.6", JOB_SETTINGS)
    assert argv[0] == "mpirun" and argv[-3:] == ["python", "job.py", "--flag"], argv
    forwarded = {argv[i + 1] for i, a in enumerate(argv) if a == "-x"}
    assert {k for k in JOB_SETTINGS if k.startswith(("FP4CCL_", "NCCL_"))} <= forwarded, argv
    assert "UNRELATED_SETTING" not in forwarded and "PYTHONUNBUFFERED=1" in forwarded
    assert "--host" not in argv   # HOSTS unset: this machine only


def test_mpirun_sh_relies_on_hydra_forwarding_under_mpich(tmp_path):
    argv = _run_mpirun_sh(tmp_path, "HYDRA build details:", {**JOB_SETTINGS, "HOSTS": "a:2,b:2"})
    assert argv[0] == "mpiexec" and "-x" not in argv, argv   # Hydra passes the whole environment itself
    assert argv[argv.index("--host") + 1] == "a:2,b:2" and argv[-3:] == ["python", "job.py", "--flag"]
