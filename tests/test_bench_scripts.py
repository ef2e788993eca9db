"""The benches that run without a GPU keep running: each is started the way bench/README.md says, with
tiny iteration counts, and must finish cleanly and print every row it promises."""
import json
import os
import subprocess
import sys

import pytest

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


def test_profile_timeline_keeps_the_last_step_and_parses_variants(tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import _profile
    finally:
        sys.path.pop(0)
    ev = [{"ph": "X", "cat": "kernel", "ts": 0.0, "dur": 10.0, "name": "a", "args": {"stream": 7}},
          {"ph": "X", "cat": "kernel", "ts": 9000.0, "dur": 5.0, "name": "b", "args": {"stream": 7}},
          {"ph": "X", "cat": "gpu_memcpy", "ts": 9003.0, "dur": 20.0, "name": "c", "args": {"stream": 9}},
          {"ph": "X", "cat": "cpu_op", "ts": 9004.0, "dur": 1.0, "name": "host"}]
    path = tmp_path / "trace.json"
    path.write_text(json.dumps({"traceEvents": ev}))
    # events 5 ms apart start a new step; host events are not GPU work
    assert _profile.timeline(str(path), 5000.0) == [(7, 0.0, 5.0, "b"), (9, 3.0, 23.0, "c")]
    assert _profile.parse_variants("a=,b=X=1;Y=2") == [("a", "", {}), ("b", "X=1;Y=2", {"X": "1", "Y": "2"})]


@pytest.mark.parametrize("script", ["profile_collectives.py", "profile_overlap.py"])
def test_profile_scripts_describe_their_options(script):
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", script), "--help"], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and "--all-ranks" in out.stdout and "--loop" in out.stdout
