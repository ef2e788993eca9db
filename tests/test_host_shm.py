"""The host backend's shared-memory files: private to the user, named after the job, removed by their writer.

Files are `fp4ccl-<FP4CCL_JOB_ID or nojob>-<communicator id>-...` (fp4ccl-run removes a killed job's
leftovers by that prefix), created with mode 0600, and each rank removes the ones it wrote at
destroy() or, failing that, when the interpreter exits.
"""
from __future__ import annotations

import glob
import os
import stat
import subprocess
import sys

import numpy as np
import pytest

from fp4ccl.bootstrap.exchange import Exchange
from harness import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class LonelyExchange(Exchange):
    """Rank 0 of a 2-rank job whose peer never shows up (the bootstrap itself needs no peer)."""

    rank, size = 0, 2

    def all_gather_bytes(self, data):
        return [bytes(data)] * self.size

    def broadcast_bytes(self, data, root):
        return bytes(data)

    def barrier(self):
        pass


# In a process of its own: rank 0 of a lonely job sends a message that is never received.
LONELY_SEND = r"""
import sys
import numpy as np
from fp4ccl._arrays import describe
from fp4ccl.backends.host import HostBackend
from fp4ccl.errors import CommTimeoutError
from test_host_shm import LonelyExchange

backend = HostBackend(LonelyExchange())
backend.send(describe(np.ones(1000, np.float32)), 1)
print(backend.transport.blobs.prefix)
if sys.argv[1] == "destroy":
    try:
        backend.destroy()   # waits FP4CCL_TIMEOUT for a reader that never comes
    except CommTimeoutError:
        pass
"""


def _lonely_send(tmp_path, how, job):
    os.makedirs(tmp_path, exist_ok=True)
    environ = {k: v for k, v in os.environ.items() if k not in ("FP4CCL_JOB_ID", "PYTHONPATH")}
    environ.update(FP4CCL_SHM_DIR=str(tmp_path), PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]),
                   FP4CCL_TIMEOUT="1")
    if job is not None:
        environ["FP4CCL_JOB_ID"] = job
    proc = subprocess.run([sys.executable, "-c", LONELY_SEND, how], env=environ, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout.strip()


@pytest.mark.parametrize("job, name", [("job42", "job42"), (None, "nojob")])
def test_files_are_named_after_the_job(tmp_path, job, name):
    prefix = _lonely_send(tmp_path, "destroy", job)
    assert os.path.dirname(prefix) == str(tmp_path)
    base = os.path.basename(prefix)
    assert base.startswith(f"fp4ccl-{name}-") and len(base) > len(f"fp4ccl-{name}-") + 16, base


def test_unread_files_go_at_destroy_and_stay_for_their_reader_at_exit(tmp_path):
    """destroy() gives up on a reader that never comes (after FP4CCL_TIMEOUT) and removes the send; exit
    without destroy() does not wait, and leaves the unread send for its reader (who deletes what it reads;
    fp4ccl-run removes what is left by the job's prefix)."""
    _lonely_send(tmp_path / "destroy", "destroy", "leftovers")
    assert os.listdir(tmp_path / "destroy") == []
    prefix = _lonely_send(tmp_path / "exit", "exit", "leftovers")
    assert [os.path.join(tmp_path / "exit", f) for f in os.listdir(tmp_path / "exit")] == [prefix + "p0.1.0"]


def test_job_id_with_a_slash_is_refused(tmp_path, monkeypatch):
    from fp4ccl.backends.host import HostBackend
    monkeypatch.setenv("FP4CCL_SHM_DIR", str(tmp_path))
    monkeypatch.setenv("FP4CCL_JOB_ID", "../etc")
    with pytest.raises(ValueError, match="FP4CCL_JOB_ID='../etc'"):
        HostBackend(LonelyExchange())


def _files_while_in_flight(comm):
    """Rank 0 sends, and rank 1 looks at the job's files before receiving."""
    job = os.environ["FP4CCL_JOB_ID"]
    prefix = comm._backend.transport.blobs.prefix
    base = os.path.dirname(prefix)
    assert os.path.basename(prefix).startswith(f"fp4ccl-{job}-"), prefix
    if comm.rank == 0:
        comm.send(np.ones(64, np.float32), 1)
    comm.barrier()
    modes = {}
    if comm.rank == 1:
        for path in glob.glob(glob.escape(prefix) + "*"):
            modes[os.path.basename(path)] = stat.S_IMODE(os.stat(path).st_mode)
        comm.recv(np.empty(64, np.float32), 0)
    comm.barrier()
    left = glob.glob(os.path.join(glob.escape(base), f"fp4ccl-{job}-*"))
    return modes, left


def test_files_are_private_while_in_flight():
    (_, left0), (modes, left1) = run_ranks(2, _files_while_in_flight)
    assert modes and set(modes.values()) == {0o600}, modes
    assert left0 == [] and left1 == []


FORKED_CHILD_EXITS = r"""
import os, sys
import numpy as np
from fp4ccl._arrays import describe
from fp4ccl.backends.host import HostBackend
from test_host_shm import LonelyExchange

backend = HostBackend(LonelyExchange())
backend.send(describe(np.ones(10, np.float32)), 1)
pid = os.fork()
if pid == 0:
    sys.exit(0)  # a normal exit runs the atexit handlers inherited from the parent
os.waitpid(pid, 0)
print(len(os.listdir(os.environ["FP4CCL_SHM_DIR"])))
backend.abort()
"""


def test_a_forked_child_leaves_the_parents_files_alone(tmp_path):
    environ = dict(os.environ, FP4CCL_SHM_DIR=str(tmp_path),
                   PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]))
    proc = subprocess.run([sys.executable, "-c", FORKED_CHILD_EXITS], env=environ, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.strip() == "1", "the child's exit removed the parent's in-flight message"
    assert os.listdir(tmp_path) == []
