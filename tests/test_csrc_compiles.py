"""Syntax gate for csrc/: every .cu compiles with nvcc for sm_90 and sm_100 (CI has nvcc, no GPU), and
exports every kernel the launchers name."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SOURCES = sorted((REPO / "csrc").glob("*.cu"))


def _nvcc():
    path = shutil.which("nvcc") or ("/usr/local/bin/nvcc" if Path("/usr/local/bin/nvcc").exists() else None)
    if path is None:
        pytest.skip("nvcc is not on PATH (nor at /usr/local/bin/nvcc): cannot compile csrc/*.cu here")
    return path


def test_there_are_sources():
    assert SOURCES, "csrc/ holds no .cu files"


@pytest.mark.parametrize("arch", ["sm_90", "sm_100"])
@pytest.mark.parametrize("src", SOURCES, ids=[p.name for p in SOURCES])
def test_compiles(tmp_path, src, arch):
    nvcc = _nvcc()
    ptx = tmp_path / (src.stem + ".ptx")
    # the same language options the NVRTC loader uses (fp4ccl/jit.py OPTIONS)
    cmd = [nvcc, "-std=c++17", "--fmad=false", f"-arch={arch}", "-ptx", str(src), "-o", str(ptx), "-I", str(src.parent)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0, f"{' '.join(cmd)}\n{r.stderr}"
    assert "warning" not in r.stderr.lower(), r.stderr
    if src.name == "fp4.cu":
        from fp4ccl.formats import kernels
        entries = set(re.findall(r"\.entry\s+(\w+)", ptx.read_text()))
        missing = set(kernels.kernel_names()) - entries
        assert not missing, f"kernels named by fp4ccl/formats/kernels.py but not in {src.name}: {sorted(missing)}"
