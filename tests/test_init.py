"""init()'s bootstrap under each launcher's environment.

Most cases start fresh interpreters with a launcher's variables; each finishes in seconds, and a bug
makes it fail within its own timeout instead of hanging the suite.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every variable that makes discover() see a launcher, or changes the bootstrap: none leaks in from outside.
_LAUNCHER_PREFIXES = ("FP4CCL_", "OMPI_", "PMI_", "PMIX_", "SLURM_", "TORCHELASTIC_", "MPI_LOCAL")
_LAUNCHER_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
                   "GROUP_RANK", "ROLE_RANK")


def _environ(**values) -> dict:
    """os.environ without any launcher's variables, plus `values`, importing fp4ccl from this checkout."""
    out = {k: v for k, v in os.environ.items()
           if not k.startswith(_LAUNCHER_PREFIXES) and k not in _LAUNCHER_NAMES}
    out.update(PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), **values)
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _python(code: str, timeout: float, **values) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], env=_environ(**values), capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


# -- connecting to the store ------------------------------------------------------------------------

def test_connecting_to_the_store_gives_up_after_fp4ccl_timeout():
    address = f"127.0.0.1:{_free_port()}"   # nothing listens there
    proc = _python("import fp4ccl; fp4ccl.init('host')", timeout=60, FP4CCL_RANK="0", FP4CCL_WORLD_SIZE="2",
                   FP4CCL_STORE=address, FP4CCL_TIMEOUT="1")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"TimeoutError: could not connect to the fp4ccl store at {address} within 1 s"), last
    assert "FP4CCL_STORE" in last and "FP4CCL_TIMEOUT" in last, last
