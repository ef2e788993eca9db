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


def test_plot_overlap_reads_the_printed_table(tmp_path):
    """bench/plot_overlap.py takes bench_overlap's table out of a launcher log (rank prefixes, op names
    with a space, NaN cells, the summary table after it) and draws it."""
    log = tmp_path / "bench.log"
    log.write_text("""[rank0]: # overlap bench: 4 x GPU, N=8192 K=8192, bf16, ms (median batch, slowest rank)
[rank0]: op               M      mm    comm     seq   torch seqpath    pipe  replay
[rank0]: ag+mm          256   0.035   0.062   0.087   0.358   0.152   0.336   0.098
[rank0]: ag+mm nvfp4    256   0.035   0.172   0.087     nan   0.277   0.420   0.114
[rank1]: noise from another rank
[rank0]: mm+rs         1024   0.051   0.080   0.137   0.296   0.135   0.253     nan
[rank0]: # best fp4ccl per row; eff = (comm + mm - t) / min(comm, mm)
[rank0]: op               M     best      ms   torch     seq    eff eff torch vs torch  vs seq
[rank0]: ag+mm          256   replay   0.098   0.358   0.087  -0.05     -7.47    3.64x   0.88x
""")
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import plot_overlap
    finally:
        sys.path.pop(0)
    rows = plot_overlap.read_rows(str(log))
    assert [(r["op"], r["M"]) for r in rows] == [("ag+mm", 256), ("ag+mm nvfp4", 256), ("mm+rs", 1024)]
    assert rows[0]["fp4ccl_seqpath"] == 0.152 and rows[0]["replay"] == 0.098 and rows[2]["replay"] != rows[2]["replay"]
    pytest.importorskip("matplotlib")
    png = tmp_path / "overlap.png"
    assert plot_overlap.main([str(log), str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
