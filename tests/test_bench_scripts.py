"""The benches that run without a GPU keep running: each is started the way bench/README.md says, with
tiny iteration counts, and must finish cleanly and print every row it promises."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_host_overhead_bench_runs_every_row(tmp_path):
    out = tmp_path / "host.json"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_host_overhead.py"), "-n", "20", "-r", "1",
                           "-j", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["us_per_call"]
    names = " | ".join(rows)
    for what in ("all_reduce", "all_gatherv", "vcoll", "nccl backend"):
        assert any(what in n for n in rows), f"no '{what}' row in {names}"
    assert all(v > 0 for v in rows.values()), rows
