"""fp4ccl.init() on real GPUs under torchrun and fp4ccl-run, beside torch.distributed's NCCL group (either
one first), with two communicators from init() used in turn: the store each one bootstraps through
(torch's default store, or the launcher's) must keep their NCCL ids and symmetric-memory handles apart."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import need_gpus

pytestmark = pytest.mark.gpu

ROOT = str(Path(__file__).resolve().parents[2])

RANK_MAIN = textwrap.dedent("""
    import os, torch, torch.distributed as dist, fp4ccl
    order = os.environ["ORDER"]
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    def torch_group():
        dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    if order == "torch-first":
        torch_group()
    a = fp4ccl.init()
    if order == "fp4ccl-first":
        torch_group()
    b = fp4ccl.init()
    r, n = a.rank, a.size
    assert a.backend == b.backend == "nccl", (a.backend, b.backend)
    assert (b.rank, b.size) == (r, n) and n == int(os.environ["WORLD_SIZE"])
    if dist.is_initialized():
        assert (dist.get_rank(), dist.get_world_size()) == (r, n)
    for i in range(20):   # the two communicators (and torch's group) in turn
        for c, k in ((a, 1.0), (b, 2.0)):
            x = torch.full((1000,), (r + 1) * k, device="cuda")
            c.all_reduce(x, out=x)
            assert torch.all(x == k * n * (n + 1) / 2), (i, k, x[:4])
        if dist.is_initialized():
            y = torch.full((4,), float(r), device="cuda")
            dist.all_reduce(y)
            assert torch.all(y == n * (n - 1) / 2)
    # the FP4 gather runs over each communicator's symmetric memory: each rank's rows must come back as
    # every rank's own quantize -> dequantize of them, from both communicators
    g = torch.Generator(device="cuda").manual_seed(1234 + r)
    for c in (a, b):
        rows = torch.randn(64, 256, device="cuda", dtype=torch.bfloat16, generator=g)
        got = c.all_gatherv(rows, [64] * n, compress="nvfp4")
        mine = fp4ccl.quantize(rows, "nvfp4").dequantize()
        assert torch.equal(got[64 * r:64 * (r + 1)], mine)
    torch.cuda.synchronize()
    a.destroy()
    b.destroy()
    if dist.is_initialized():
        dist.destroy_process_group()
    print(f"OK {r}", flush=True)
""")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(tmp_path, launcher, order, nranks=2):
    need_gpus(nranks)
    script = tmp_path / "rank_main.py"
    script.write_text(RANK_MAIN)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FP4CCL_", "SLURM_", "PMI_", "OMPI_"))}
    env.update(PYTHONPATH=ROOT, ORDER=order, FP4CCL_TIMEOUT="120")
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nranks}",
               f"--master_port={_free_port()}", str(script)]
    else:
        cmd = [sys.executable, "-m", "fp4ccl.launcher", "-n", str(nranks), str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=str(tmp_path))
    oks = sorted(line.split("OK ")[-1] for line in proc.stdout.splitlines() if "OK " in line)
    assert proc.returncode == 0 and oks == [str(r) for r in range(nranks)], \
        f"{launcher} {order}: rc {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


@pytest.mark.parametrize("order", ["torch-first", "fp4ccl-first"])
def test_init_under_torchrun_beside_torch_nccl(tmp_path, order):
    _run(tmp_path, "torchrun", order)


@pytest.mark.parametrize("order", ["alone", "torch-first"])
def test_init_under_fp4ccl_run(tmp_path, order):
    _run(tmp_path, "fp4ccl-run", order)
