"""The sweep (fp4ccl-sweep) on the host backend: flags, table, JSON, plot, and that #wrong is real."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fp4ccl import sweep
from fp4ccl._arrays import numpy_dtype
from harness import run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_LAUNCHER = os.path.exists(os.path.join(ROOT, "fp4ccl", "launcher.py"))
COLS = ("size", "count", "type", "redop", "root", "impl", "|", "time", "algbw", "busbw", "wrong")


def parse_table(text: str) -> list:
    """Rows of the sweep's table (launcher prefixes stripped), each a dict keyed like the columns."""
    rows = []
    for line in text.splitlines():
        if line.startswith("[rank"):
            line = line.split(": ", 1)[1]
        if not line.strip() or line.startswith("#") or line.startswith("fp4ccl"):
            continue
        tok = line.split()
        assert tok[6] == "|", f"not a table row: {line!r}"
        row = dict(zip(COLS, tok))
        row.update(size=int(row["size"]), count=int(row["count"]), root=int(row["root"]),
                   time=float(row["time"]), algbw=float(row["algbw"]), busbw=float(row["busbw"]))
        row["wrong"] = None if row["wrong"] == "N/A" else int(row["wrong"])
        row["extra"] = tok[11:]
        rows.append(row)
    return rows


def launch(n: int, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "fp4ccl.launcher", "-n", str(n), "-m", "fp4ccl.sweep", *args]
    env = dict(os.environ, FP4CCL_BACKEND="host")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


# -- flags ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,value", [("1K", 1024), ("16M", 16 << 20), ("1G", 1 << 30), ("4096", 4096),
                                        ("1.5M", 3 << 19), ("64KiB", 65536), ("2GB", 2 << 30), ("8k", 8192)])
def test_parse_size(text, value):
    assert sweep.parse_size(text) == value


@pytest.mark.parametrize("text", ["", "K", "1X", "-1K", "1.3", "one"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        sweep.parse_size(text)


def test_size_steps():
    assert sweep.size_steps(1024, 16384, 4, None) == [1024, 4096, 16384]
    assert sweep.size_steps(1024, 4000, 2, 1024) == [1024, 2048, 3072]
    assert sweep.size_steps(1000, 1000, 4, None) == [1000]


@pytest.mark.parametrize("n,factor", [(1, 0.0), (2, 5 / 8), (3, 3 / 4), (4, 13 / 16), (8, 29 / 32)])
def test_uneven_busbw_factor(n, factor):
    # the split alternates 1.25x and 0.75x of the mean: the busiest rank moves the total less 0.75 means
    assert sweep.uneven_busbw_factor(n) == pytest.approx(factor)
    assert sweep.uneven_busbw_factor(n) >= (n - 1) / n   # never below the even op's share
    for op in ("all_gatherv", "reduce_scatterv"):
        assert sweep.OPS[op].busbw_factor(n) == pytest.approx(factor)


@pytest.mark.parametrize("argv,words", [
    (["--bogus"], "unrecognized arguments: --bogus"),
    (["-b", "2X"], "-b/--minbytes"),
    (["-n", "0"], "-n/--iters"),
    (["-f", "nan"], "-f/--stepfactor"),
    (["-f", "inf"], "-f/--stepfactor"),
    (["-b", "0"], "-b/--minbytes"),
    (["-i", "0"], "-i/--stepbytes"),
    (["-d", "complex64"], "-d/--datatype"),
    (["--ops", "all_gather,frobnicate"], "frobnicate"),
    (["-r", "first"], "-r/--root"),
    (["-b", "1M", "-e", "1K"], "larger than"),
    (["-c", "2"], "-c/--check"),
    (["--baselines", "gloo"], "--baselines"),
    (["-o", "avg", "-d", "int32"], "floating"),
    (["--json", "/nonexistent-fp4ccl-dir/x.json"], "--json: directory /nonexistent-fp4ccl-dir does not exist"),
    (["--plot", "/nonexistent-fp4ccl-dir/x.png"], "--plot: directory /nonexistent-fp4ccl-dir does not exist"),
    (["--json", "/"], "--json: / is a directory"),
])
def test_bad_flags_one_line(argv, words, capsys):
    assert sweep.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("fp4ccl-sweep: error:") and words in err, err


def test_backend_that_cannot_start_is_one_line(monkeypatch, capsys):
    import fp4ccl

    def refuse(backend=None, **kw):
        raise RuntimeError(f"backend={backend!r} needs CUDA GPUs")
    monkeypatch.setattr(fp4ccl, "init", refuse)
    assert sweep.main(["--backend", "nccl", "-e", "4K"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot start the nccl backend" in err and "needs CUDA GPUs" in err, err


def test_parse_args_canonical():
    a = sweep.parse_args(["-b", "1K", "-e", "1G", "-f", "4", "-n", "20", "-w", "5", "-d", "bf16",
                          "--ops", "all_gather,reduce_scatter", "-r", "all", "--baselines", "nccl,torch"])
    assert (a.minbytes, a.maxbytes, a.stepfactor, a.iters, a.warmup_iters) == (1024, 1 << 30, 4.0, 20, 5)
    assert a.datatype == "bfloat16" and a.ops == ["all_gather", "reduce_scatter"] and a.root == "all"
    assert a.baselines == ["nccl", "torch"]
    assert sweep.parse_args(["--ops", "all"]).ops == list(sweep.OPS)


# -- values --------------------------------------------------------------------------------------------

def _rank_values(vs, n, size=4096, seed=7, salt=3):
    idx = np.arange(size, dtype=np.int64)
    return np.stack([vs.of(sweep.case_key(seed, r, salt), idx, r, sweep.case_key(seed, -1, salt)) for r in range(n)])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float8_e4m3fn", "float8_e5m2",
                                   "int8", "uint8", "int32", "int64"])
@pytest.mark.parametrize("redop", [None, "sum", "prod", "max", "min"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 8, 9, 17, 300])
def test_values_exact_in_dtype(dtype, redop, n):
    """Inputs, and their sum/product over n ranks in any order, are exact in the type; inputs are never 0
    (sums over more ranks than the type counts exactly excepted), and the reduction over all ranks differs
    from any one rank's inputs, so a collective that ignored its peers leaves wrong elements."""
    vs = sweep.value_set(dtype, redop, n)
    vals = _rank_values(vs, n)
    assert vals.min() >= (0 if vs.spread else 1)
    dt = numpy_dtype(dtype)
    f = np.float64 if dtype.startswith(("float", "bfloat")) else np.int64
    partial = {"sum": np.cumsum, "prod": np.cumprod}.get(redop)
    for v in [vals] + ([partial(vals, axis=0)] if partial else []):
        assert np.array_equal(v.astype(f).astype(dt).astype(f), v.astype(f)), (dtype, redop, n)
    assert not np.array_equal(vals[0], vals[-1]) or n == 1 or vs.top == 1
    if partial and n > 1:
        total = partial(vals, axis=0)[-1]
        assert all(not np.array_equal(total, vals[r]) for r in range(n)), (dtype, redop, n)


def test_values_differ_per_rank_and_salt():
    vs = sweep.value_set("bfloat16", None, 4)
    idx = np.arange(1000, dtype=np.int64)
    a, b, c = (vs.of(sweep.case_key(0, r, s), idx) for r, s in ((0, 0), (1, 0), (0, 1)))
    assert not np.array_equal(a, b) and not np.array_equal(a, c)
    assert len(np.unique(a)) > 100  # not a constant fill


def test_values_same_in_torch():
    torch = pytest.importorskip("torch")
    vs = sweep.value_set("bfloat16", "sum", 4)
    key = sweep.case_key(3, 2, 9)
    ref = vs.of(key, np.arange(5000, dtype=np.int64))
    got = vs.of(key, torch.arange(5000, dtype=torch.int64)).numpy()
    assert np.array_equal(ref, got)


# -- through the launcher ----------------------------------------------------------------------------------

needs_launcher = pytest.mark.skipif(not HAVE_LAUNCHER, reason="fp4ccl/launcher.py not present")


@needs_launcher
@pytest.mark.parametrize("n", [2, 4])
def test_sweep_launcher_all_ops(n, tmp_path):
    out = tmp_path / "rows.json"
    p = launch(n, "-b", "1K", "-e", "16K", "-f", "4", "-n", "3", "-w", "1", "--ops", "all", "-r", "all",
               "--json", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    rows = parse_table(p.stdout)
    sizes = [1024, 4096, 16384]
    # Ops skip sizes too small for them (an FP4 op needs a whole 1024-wide row per rank); bf16 is the default.
    expect = sum((n if op.rooted else 1) * sum(op.sizing(b, 2, n) is not None for b in sizes)
                 for op in sweep.OPS.values())
    assert len(rows) == expect, p.stdout
    assert all(r["wrong"] == 0 and r["impl"] == "fp4ccl" and r["time"] > 0 for r in rows)
    ag = [r for r in rows if r["redop"] == "none" and r["root"] == -1][:3]
    assert [r["size"] for r in ag] == sizes and [r["count"] for r in ag] == [512, 2048, 8192]
    doc = json.loads(out.read_text())
    assert doc["meta"]["world_size"] == n and doc["meta"]["backend"] == "host" and "date" in doc["meta"]
    assert "fp4ccl.sweep" in doc["meta"]["command"] or "-b 1K" in doc["meta"]["command"]
    assert len(doc["rows"]) == len(rows)
    for j, t in zip(doc["rows"], rows):
        assert (j["size"], j["count"], j["impl"], j["root"], j["wrong"]) == (t["size"], t["count"], t["impl"],
                                                                             t["root"], t["wrong"])
        split = sweep.uneven_rows(1 << 20, n)   # the v-collectives' busiest rank moves all but the least
        factor = {"all_reduce": 2 * (n - 1) / n, "broadcast": 1, "reduce": 1,
                  "all_gatherv": 1 - min(split) / sum(split), "reduce_scatterv": 1 - min(split) / sum(split),
                  }.get(j["op"], (n - 1) / n)
        assert j["busbw"] == pytest.approx(j["algbw"] * factor)
        assert j["algbw"] == pytest.approx(j["size"] / j["time_us"] / 1e3)
    assert "# Wrong elements : 0 OK" in p.stdout
    assert "host backend: no baseline" in p.stdout


@needs_launcher
def test_sweep_launcher_detects_fault():
    p = launch(2, "-b", "1K", "-e", "4K", "-n", "2", "-w", "0", "--ops", "all_gather,reduce", "--inject-fault")
    assert p.returncode != 0
    rows = parse_table(p.stdout)
    assert rows and all(r["wrong"] == 1 for r in rows), p.stdout
    assert "FAILED" in p.stdout


@needs_launcher
def test_sweep_default_sizes_finish(tmp_path):
    """The README's main job shape (default sizes) at 2 ranks, fewer iterations to keep CI short."""
    p = launch(2, "-n", "2", "-w", "0", "--plot", str(tmp_path / "s.png"))
    assert p.returncode == 0, p.stdout + p.stderr
    rows = parse_table(p.stdout)
    assert {r["size"] for r in rows} == {1 << k for k in range(10, 25, 2)}  # 1K..16M by 4
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_single_process(tmp_path):
    env = dict(os.environ, FP4CCL_BACKEND="host")
    for k in ("FP4CCL_RANK", "RANK", "WORLD_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID"):
        env.pop(k, None)
    p = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "sweep.py"), "-e", "4K", "-n", "2", "-c", "0"],
                       capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 0, p.stderr
    rows = parse_table(p.stdout)
    assert len(rows) == 6 and all(r["wrong"] is None for r in rows)   # 3 ops x (1K, 4K), check off
    assert all(r["busbw"] == 0 for r in rows)  # factor (n-1)/n and 2(n-1)/n vanish at one rank


# -- through the multi-rank harness ----------------------------------------------------------------------

class _CorruptingComm:
    """A communicator whose all_gather writes one wrong element on the last rank."""

    def __init__(self, comm):
        self._comm = comm

    def __getattr__(self, name):
        return getattr(self._comm, name)

    def all_gather(self, x, *, out=None, stream=None):
        res = self._comm.all_gather(x, out=out, stream=stream)
        if self._comm.rank == self._comm.size - 1 and res.size > 3:
            res[3] = res[3] + 1
        return res


def _run_sweep(comm, argv, faulty=False, extra_op=False):
    if extra_op:
        _register_half_gather()
    out = io.StringIO()
    status = sweep.run(_CorruptingComm(comm) if faulty else comm, argv, out=out, err=io.StringIO())
    return status, out.getvalue()


class _HalfGather(sweep.AllGather):
    """A stand-in for an FP4 op: moves half the bytes of the bf16 all_gather it stands for."""

    name = "all_gather_half"
    impls = ("fp4ccl",)
    baseline_op = "all_gather"

    def bind(self, impl, case):
        return impl.all_gather(case)

    def sizing(self, nbytes, itemsize, n):
        sz = super().sizing(nbytes // 2, itemsize, n)
        if sz is not None:
            sz.logical_bytes = sz.nbytes * 2
        return sz


def _register_half_gather():
    sweep.register_op(_HalfGather())


@pytest.mark.parametrize("n", [1, 3])
def test_sweep_harness_clean(n):
    results = run_ranks(n, _run_sweep, ["-b", "256", "-e", "4K", "-n", "2", "-w", "1", "--ops", "all", "-d", "float32"])
    assert [s for s, _ in results] == [0] * n
    rows = parse_table(results[0][1])
    assert rows and all(r["wrong"] == 0 for r in rows)
    assert all(text == "" for _, text in results[1:])  # only rank 0 prints


@pytest.mark.parametrize("n", [2, 4])
def test_sweep_harness_detects_corrupt_all_gather(n):
    results = run_ranks(n, _run_sweep, ["-b", "1K", "-e", "4K", "-n", "2", "-w", "0",
                                        "--ops", "all_gather,all_reduce"], True)
    assert [s for s, _ in results] == [1] * n   # every rank exits non-zero
    rows = parse_table(results[0][1])
    assert [r["wrong"] for r in rows if r["redop"] == "none"] == [1, 1]
    assert [r["wrong"] for r in rows if r["redop"] == "sum"] == [0, 0]


def test_sweep_logical_bytes_and_speedup():
    results = run_ranks(2, _run_sweep, ["-b", "1K", "-e", "16K", "-n", "2", "-w", "0",
                                        "--ops", "all_gather,all_gather_half"], False, True)
    text = results[0][1]
    assert "logical(B)" in text and "speedup" in text
    rows = parse_table(text)
    half = rows[3:]
    assert len(rows) == 6 and [r["size"] for r in half] == [512, 2048, 8192]
    assert [int(r["extra"][0]) for r in half] == [1024, 4096, 16384]
    base = {r["size"]: r["time"] for r in rows[:3]}
    for r in half:
        logical = int(r["extra"][0])
        assert r["extra"][1].endswith("x")
        assert float(r["extra"][1][:-1]) == pytest.approx(base[logical] / r["time"], abs=0.011)
    assert all(r["extra"] == ["-", "-"] for r in rows[:3])


def test_output_directory_must_be_writable(tmp_path, capsys, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    if os.access(ro, os.W_OK):   # root writes anywhere: pretend it cannot
        monkeypatch.setattr(sweep.os, "access", lambda path, mode: False)
    assert sweep.main(["--json", str(ro / "rows.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--json: directory {ro} is not writable" in err, err


def _sweep_with_broken_plot(comm, argv):
    def broken_plot(*args, **kwargs):
        raise RuntimeError("plot failed")
    saved, sweep.plot_rows = sweep.plot_rows, broken_plot
    try:
        sweep.run(comm, argv, out=io.StringIO(), err=io.StringIO())
    except RuntimeError as e:
        return str(e)
    finally:
        sweep.plot_rows = saved
    return "no error"


def test_json_is_written_before_a_failing_plot(tmp_path):
    """A plot that fails at the end (matplotlib, a full disk) must not cost the JSON of the whole sweep."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "rows.json"
    argv = ["-b", "1K", "-e", "1K", "-n", "1", "-w", "0", "--ops", "all_gather", "--json", str(out),
            "--plot", str(tmp_path / "p.png")]
    assert run_ranks(1, _sweep_with_broken_plot, argv) == ["plot failed"]
    assert json.loads(out.read_text())["rows"][0]["op"] == "all_gather"


def test_plot_needs_matplotlib(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert sweep.main(["--plot", "x.png"]) == 2
    assert "--plot needs matplotlib" in capsys.readouterr().err


def test_plot_rows(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [dict(op=o, impl=i, size=s, time_us=s / 1e3 + 5, busbw=s / 1e4, root=-1)
            for o in ("all_gather", "all_reduce") for i in ("fp4ccl", "nccl") for s in (1024, 4096, 16384)]
    path = tmp_path / "p.png"
    sweep.plot_rows(rows, str(path), title="t")
    assert path.stat().st_size > 10000


# -- FP4 rows at 3 ranks: redop, speedup against the plain op of the same logical tensor, small sizes -----

FP4_OPS = "all_gather,reduce_scatter,all_gatherv_nvfp4,reduce_scatterv_nvfp4"


def _sections(text: str) -> dict:
    """op name -> (its rows, its '#' note lines) from the table, in order."""
    out, name = {}, None
    for line in text.splitlines():
        if line.startswith("# ") and "(busbw factor" in line:
            name = line.split()[1]
            out[name] = ([], [])
        elif name and line.startswith("#") and not line.startswith("#     size(B)") and line.strip() != "#":
            out[name][1].append(line)
        elif name and not line.startswith("#") and line.strip():
            out[name][0].extend(parse_table(line))
    return out


def _sweep_rows(n, argv, tmp_path):
    path = str(tmp_path / "rows.json")
    results = run_ranks(n, _run_sweep, argv + ["--json", path])
    assert [s for s, _ in results] == [0] * n, results[0][1]
    return results[0][1], json.loads(open(path).read())


@pytest.mark.parametrize("op", ["reduce_scatterv_nvfp4", "reduce_scatterv_mxfp4"])
def test_fp4_reduce_scatter_rows_say_sum(tmp_path, op):
    text, doc = _sweep_rows(3, ["-b", "16K", "-e", "64K", "-n", "1", "-w", "0", "--ops", op], tmp_path)
    rows = _sections(text)[op][0]
    assert rows and all(r["redop"] == "sum" for r in rows), text
    assert {r["redop"] for r in doc["rows"]} == {"sum"}
    assert [r["wrong"] for r in doc["rows"]] == [0] * len(doc["rows"]), text


def test_fp4_reduce_scatter_skips_other_redops_with_a_note():
    results = run_ranks(3, _run_sweep, ["-b", "16K", "-e", "16K", "-n", "1", "-w", "0", "-o", "max",
                                        "--ops", "reduce_scatterv_nvfp4"])
    assert [s for s, _ in results] == [0] * 3
    rows, notes = _sections(results[0][1])["reduce_scatterv_nvfp4"]
    assert rows == [] and any("skipped" in n and "sum" in n for n in notes), results[0][1]


@pytest.mark.parametrize("ops", [FP4_OPS, "all_gatherv_nvfp4,reduce_scatterv_nvfp4,all_gather,reduce_scatter",
                                 "all_gatherv_nvfp4,reduce_scatterv_nvfp4"])
def test_fp4_speedup_at_three_ranks_against_the_same_logical_tensor(tmp_path, ops):
    # At 3 ranks with the default -b/-f, the plain ops round their sizes to a multiple of 3 elements
    # (1020, 4092, 16380 B ...) and the FP4 ops to whole 1024-element rows per rank (12288 B ...): no
    # plain row has the FP4 row's logical size, whatever the order of --ops, or with no plain op at all.
    text, doc = _sweep_rows(3, ["-e", "64K", "-n", "1", "-w", "0", "--ops", ops], tmp_path)
    table = _sections(text)
    for name, base in (("all_gatherv_nvfp4", "all_gather"), ("reduce_scatterv_nvfp4", "reduce_scatter")):
        rows = [r for r in doc["rows"] if r["op"] == name]
        assert rows and all(r["speedup"] is not None for r in rows), text
        assert all(r["extra"][1].endswith("x") for r in table[name][0]), text
        for r in rows:
            assert r["baseline_impl"] == "fp4ccl"    # the host backend's own plain op: no NCCL here
            assert r["speedup"] == pytest.approx(r["baseline_us"] / r["time_us"])
            plain = [p for p in doc["rows"] if p["op"] == base and p["size"] == r["logical_bytes"]]
            if plain:   # the table has the plain op at exactly this size: that row is the reference
                assert r["baseline_us"] == plain[0]["time_us"]
        assert any(base in line and "speedup" in line for line in table[name][1]), text
    # the references timed beside the FP4 rows are not rows of the table
    assert all(p["size"] % 3 == 0 for p in doc["rows"] if p["op"] in ("all_gather", "reduce_scatter"))


def test_fp4_small_sizes_are_skipped_with_a_note():
    results = run_ranks(3, _run_sweep, ["-e", "16K", "-n", "1", "-w", "0", "--ops", FP4_OPS])
    table = _sections(results[0][1])
    assert [r["size"] for r in table["all_gather"][0]] == [1020, 4092, 16380]
    for name in ("all_gatherv_nvfp4", "reduce_scatterv_nvfp4"):
        rows, notes = table[name]
        assert [int(r["extra"][0]) for r in rows] == [6144 * 2], results[0][1]   # 16K -> 2 rows per rank
        skip = [n for n in notes if "skipped" in n]
        assert len(skip) == 1 and "1024, 4096 B" in skip[0] and "1024-element row per rank" in skip[0], notes
        assert "6144 B" in skip[0], notes
