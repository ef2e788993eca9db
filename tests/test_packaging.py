"""pyproject.toml's extras: each CUDA extra is everything a driver-only host needs for one CUDA major
version (CuPy, NVRTC for the JIT, NCCL), and no other extra drags in a CUDA package of its own."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parent.parent


def _project():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _names(reqs):
    return {re.match(r"[A-Za-z0-9_.\-]+", r).group(0).lower(): r for r in reqs}


@pytest.mark.parametrize("extra, cupy, nvrtc, nccl", [
    ("cuda12", "cupy-cuda12x", "nvidia-cuda-nvrtc-cu12", "nvidia-nccl-cu12"),
    ("cuda13", "cupy-cuda13x", "nvidia-cuda-nvrtc", "nvidia-nccl-cu13"),
])
def test_a_cuda_extra_brings_cupy_nvrtc_and_nccl_of_one_major_version(extra, cupy, nvrtc, nccl):
    reqs = _names(_project()["optional-dependencies"][extra])
    assert set(reqs) == {cupy, nvrtc, nccl}, reqs
    # CuPy finds libnvrtc in the nvidia wheels through cuda-pathfinder from 14 on; 13.x does not
    assert re.search(r">=\s*14", reqs[cupy]), reqs[cupy]
    if nvrtc == "nvidia-cuda-nvrtc":       # the unsuffixed name spans CUDA majors: keep it to 13.x
        assert ">=13" in reqs[nvrtc].replace(" ", "") and "<14" in reqs[nvrtc].replace(" ", ""), reqs[nvrtc]


def test_no_other_extra_brings_a_cuda_package():
    # test + cuda12 must not install CUDA 13's NCCL (both wheels write nvidia/nccl/lib/libnccl.so.2)
    for extra, reqs in _project()["optional-dependencies"].items():
        if extra in ("cuda12", "cuda13"):
            continue
        for name, req in _names(reqs).items():
            assert not name.startswith(("nvidia-", "cupy", "cuda-")), f"extra {extra} has {req}"
            assert not name.startswith("fp4ccl"), f"extra {extra} pulls in another extra: {req}"


def test_license_is_an_spdx_expression_with_its_file():
    project = _project()
    assert project["license"] == "Apache-2.0"
    for name in project["license-files"]:
        assert "Apache License" in (ROOT / name).read_text()
