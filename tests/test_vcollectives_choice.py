"""The variable-size algorithm choice and the padded algorithms' plan of copies and NCCL calls, on the
CPU (NCCL primitives and the copy launcher replaced by recorders); tests/gpu runs them for real."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest

from fp4ccl import vcollectives as vc
from fp4ccl._arrays import ArrayInfo
from fp4ccl.vcollectives import (BCAST_BELOW_BYTES, BCAST_FROM_BYTES, MAX_PADDING_RATIO, NEAR_EVEN_RATIO,
                                 REDUCE_BELOW_BYTES, REDUCE_FROM_BYTES, choose)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _no_forced_algo(monkeypatch):
    monkeypatch.delenv("FP4CCL_ALGO", raising=False)


def uneven(total_bytes: int, itemsize: int = 2, n: int = 4):
    """The sweep's split: ranks alternate 1.25x and 0.75x of the mean, `total_bytes` in all."""
    total = total_bytes // itemsize
    mean = total // n
    counts = [mean + (mean // 4 if r % 2 == 0 else -(mean // 4)) for r in range(n)]
    counts[-1] += total - sum(counts)
    return counts


def test_equal_sizes_use_the_native_op():
    assert choose("all_gatherv", [5, 5, 5], 2) == "native"
    assert choose("reduce_scatterv", [0, 0], 4) == "native"
    assert choose("all_gatherv", [1 << 30] * 4, 2) == "native"


def test_small_totals_use_the_grouped_form():
    # Latency-bound: the grouped call has no copy launches at all.
    for total in (8 << 10, 64 << 10, 1 << 20):
        assert choose("all_gatherv", uneven(total), 2) == "bcast", total
        assert choose("reduce_scatterv", uneven(total), 2) == "reduce", total
    assert choose("all_gatherv", [1000, 900, 800, 1000], 2) == "bcast"


def test_mid_size_gathers_go_point_to_point_unless_nearly_even():
    # 1.25x / 0.75x imbalance: p2p measured fastest for the gather between the two thresholds.
    for total in (8 << 20, 32 << 20):
        assert choose("all_gatherv", uneven(total), 2) == "p2p", total
    q = (8 << 20) // 4
    nearly_even = [q, q, q, q - 64]
    assert 4 * q / sum(nearly_even) <= NEAR_EVEN_RATIO
    assert choose("all_gatherv", nearly_even, 1) == "padded"


def test_reduce_scatterv_pads_only_in_its_band():
    assert choose("reduce_scatterv", uneven(8 << 20), 2) == "reduce"
    assert choose("reduce_scatterv", uneven(32 << 20), 2) == "padded"


def test_large_totals_use_the_grouped_form():
    for total in (64 << 20, 128 << 20, 1 << 30):
        assert choose("all_gatherv", uneven(total), 2) == "bcast", total
        assert choose("reduce_scatterv", uneven(total), 2) == "reduce", total


@pytest.mark.parametrize("kind,grouped,middle,below,above", [
    ("all_gatherv", "bcast", "padded", BCAST_BELOW_BYTES, BCAST_FROM_BYTES),
    ("reduce_scatterv", "reduce", "padded", REDUCE_BELOW_BYTES, REDUCE_FROM_BYTES),
])
def test_thresholds_are_where_the_constants_say(kind, grouped, middle, below, above):
    assert below < above
    # 4 ranks of 1-byte items, one rank one item short: padding is negligible.
    def counts(total):
        q = total // 4
        return [q, q, q, total - 3 * q - 1]
    assert choose(kind, counts(below - 4), 1) == grouped
    assert choose(kind, counts(below + 4), 1) == middle
    assert choose(kind, counts(above - 4), 1) == middle
    assert choose(kind, counts(above + 4), 1) == grouped


def test_heavy_padding_never_pads():
    total = 32 << 20
    lopsided = [total // 2, total // 6, total // 6, total - total // 2 - 2 * (total // 6)]
    assert 4 * max(lopsided) > MAX_PADDING_RATIO * total
    assert choose("all_gatherv", lopsided, 1) == "p2p"
    assert choose("reduce_scatterv", lopsided, 1) == "reduce"
    assert choose("all_gatherv", [total, 0, 0, 0], 1) == "p2p"  # padding would quadruple the bytes


def test_inside_a_group_only_nccl_only_algorithms(monkeypatch):
    monkeypatch.setenv("FP4CCL_ALGO", "padded")
    assert choose("all_gatherv", [3, 4], 2, in_group=True) == "bcast"
    assert choose("reduce_scatterv", [3, 4], 2, in_group=True) == "reduce"
    assert choose("all_gatherv", [4, 4], 2, in_group=True) == "native"
    mid = uneven(8 << 20)
    assert choose("all_gatherv", mid, 2, in_group=True) == "bcast"


def test_forced_algorithm(monkeypatch):
    monkeypatch.setenv("FP4CCL_ALGO", "p2p")
    assert choose("all_gatherv", [1, 2], 2) == "p2p"
    with pytest.raises(ValueError, match="FP4CCL_ALGO='p2p' is not valid for reduce_scatterv"):
        choose("reduce_scatterv", [1, 2], 2)
    monkeypatch.setenv("FP4CCL_ALGO", " Padded ")
    assert choose("all_gatherv", [1, 2], 2) == "padded"  # forced even where the sizes say grouped
    monkeypatch.setenv("FP4CCL_ALGO", "native")
    with pytest.raises(ValueError, match="needs equal sizes"):
        choose("all_gatherv", [1, 2], 2)


def test_forced_algorithm_is_read_on_every_call(monkeypatch):
    counts = uneven(64 << 10)
    assert choose("all_gatherv", counts, 2) == "bcast"
    monkeypatch.setenv("FP4CCL_ALGO", "padded")
    assert choose("all_gatherv", counts, 2) == "padded"
    monkeypatch.setenv("FP4CCL_ALGO", "  ")  # blank: no choice forced
    assert choose("all_gatherv", counts, 2) == "bcast"
    monkeypatch.delenv("FP4CCL_ALGO")
    assert choose("all_gatherv", counts, 2) == "bcast"


def test_symm_is_taken_only_where_symmetric_memory_can_serve(monkeypatch):
    counts = uneven(64 << 10)
    monkeypatch.setattr(vc, "SYMM_GATHER_BELOW_BYTES", 1 << 20)
    monkeypatch.setattr(vc, "SYMM_SCATTER_BELOW_BYTES", 32 << 10)
    assert vc.symm_candidate("all_gatherv", counts, 2)
    assert choose("all_gatherv", counts, 2, symm_ok=True) == "symm"
    assert choose("all_gatherv", counts, 2, symm_ok=False) == "bcast"
    assert choose("all_gatherv", [4, 4], 2, symm_ok=True) == "native"  # even: ncclAllGather
    assert not vc.symm_candidate("all_gatherv", [4, 4], 2)
    # above "symm", the copy-engine form up to its own threshold, then NCCL's
    monkeypatch.setattr(vc, "CE_GATHER_BELOW_BYTES", 8 << 20)
    monkeypatch.setattr(vc, "CE_SCATTER_BELOW_BYTES", 64 << 10)
    mid = uneven(2 << 20)
    assert vc.symm_candidate("all_gatherv", mid, 2) and choose("all_gatherv", mid, 2, symm_ok=True) == "ce"
    assert choose("all_gatherv", mid, 2, symm_ok=False) == "bcast"
    big = uneven(8 << 20)
    assert not vc.symm_candidate("all_gatherv", big, 2) and choose("all_gatherv", big, 2, symm_ok=True) == "p2p"
    # the reduce-scatter has its own thresholds
    assert not vc.symm_candidate("reduce_scatterv", counts, 2)
    assert choose("reduce_scatterv", counts, 2, symm_ok=True) == "reduce"
    small = uneven(16 << 10)
    assert vc.symm_candidate("reduce_scatterv", small, 2)
    assert choose("reduce_scatterv", small, 2, symm_ok=True) == "symm"
    assert choose("reduce_scatterv", uneven(32 << 10), 2, symm_ok=True) == "ce"


def test_the_default_bands_of_the_symmetric_memory_algorithms():
    """The bands fitted to bench/RESULTS.md run 30 (4 x H200, ranks at 1.25x / 0.75x of the mean)."""
    def both(total):
        c = uneven(total)
        return choose("all_gatherv", c, 2, symm_ok=True), choose("reduce_scatterv", c, 2, symm_ok=True)
    assert both(1 << 20) == ("symm", "symm")
    assert both(4 << 20) == ("ce", "symm")
    assert both(16 << 20) == ("ce", "ce")
    assert both(128 << 20) == ("ce", "ce")
    assert both(256 << 20) == ("bcast", "reduce")


@pytest.mark.parametrize("forced", ["symm", "ce"])
def test_forced_symm_falls_back_to_the_size_rule_where_it_cannot_run(forced, monkeypatch, caplog):
    monkeypatch.setenv("FP4CCL_ALGO", forced)
    counts = uneven(64 << 10)
    assert vc.symm_candidate("all_gatherv", counts, 2) and vc.symm_candidate("reduce_scatterv", [4, 4], 2)
    assert choose("all_gatherv", counts, 2, symm_ok=True) == forced
    assert choose("all_gatherv", [4, 4], 2, symm_ok=True) == forced  # forced even for equal sizes
    assert choose("reduce_scatterv", counts, 2, symm_ok=True) == forced
    with caplog.at_level("INFO", logger="fp4ccl.vcollectives"):
        assert choose("all_gatherv", counts, 2, symm_ok=False) == "bcast"
        assert choose("reduce_scatterv", counts, 2, symm_ok=False) == "reduce"
    assert "cannot serve" in caplog.text
    assert choose("all_gatherv", counts, 2, in_group=True, symm_ok=True) == "bcast"


# -- what the padded algorithms enqueue ---------------------------------------------------------------

class RecordingBackend:
    """NCCL primitives that record (name, send ptr, count, recv ptr) instead of running."""

    device = 0

    def __init__(self):
        self.calls = []
        self._depth = 0

    def all_gather(self, send, recv, stream):
        self.calls.append(("all_gather", send.ptr, send.size, recv.ptr, recv.size))

    def reduce_scatter(self, send, recv, op, stream):
        self.calls.append(("reduce_scatter", send.ptr, send.size, recv.ptr, recv.size))

    def broadcast(self, send, recv, root, stream):
        self.calls.append(("broadcast", root, recv.ptr, recv.size))

    def reduce(self, send, recv, op, root, stream):
        self.calls.append(("reduce", root, send.ptr, send.size))

    def group_start(self):
        self._depth += 1
        self.calls.append(("group_start",))

    def group_end(self, abandon=False):
        self._depth -= 1
        self.calls.append(("group_end",))


class FixedWorkspace:
    device = 0

    def __init__(self, base):
        self.base = base
        self.asked = []

    def get(self, nbytes):
        self.asked.append(nbytes)
        return self.base


def _variable(rank, size, monkeypatch):
    v = vc.NcclVariable.__new__(vc.NcclVariable)
    v.backend, v.rank, v.size, v.comm = RecordingBackend(), rank, size, None
    v.workspace = FixedWorkspace(0x100000)
    log = []
    monkeypatch.setattr(vc, "copy", lambda dst, src, n, stream: log.append(("copy", dst, src, n)))
    monkeypatch.setattr(vc, "copy_segments", lambda dev, segs, stream: log.append(("segments", list(segs))))
    return v, log


def _info(ptr, count, dtype="float32"):
    return ArrayInfo(None, "cupy", ptr, (count,), dtype, 0, True)


def test_padded_gather_compacts_with_one_segmented_copy(monkeypatch):
    monkeypatch.setenv("FP4CCL_ALGO", "padded")
    counts = [5, 3, 0, 4]
    v, log = _variable(1, 4, monkeypatch)
    send, recv = _info(0x2000, 3), _info(0x9000, 12)
    v.all_gatherv(send, recv, counts, 7)
    base, slot = 0x100000, 5 * 4
    # rank 1 is short of the widest part: staged into its slot, then an in-place all_gather
    assert log[0] == ("copy", base + slot, 0x2000, 12)
    assert v.backend.calls == [("all_gather", base + slot, 5, base, 20)]
    assert log[1] == ("segments", [(0x9000, base, 20), (0x9000 + 20, base + slot, 12),
                                   (0x9000 + 32, base + 2 * slot, 0), (0x9000 + 32, base + 3 * slot, 16)])
    assert len(log) == 2
    assert v.workspace.asked == [4 * slot]


def test_padded_gather_of_the_widest_rank_needs_no_staging(monkeypatch):
    monkeypatch.setenv("FP4CCL_ALGO", "padded")
    v, log = _variable(0, 4, monkeypatch)
    v.all_gatherv(_info(0x2000, 5), _info(0x9000, 12), [5, 3, 0, 4], 7)
    assert v.backend.calls == [("all_gather", 0x2000, 5, 0x100000, 20)]  # out of place from x itself
    assert [entry[0] for entry in log] == ["segments"]


def test_padded_reduce_scatter_pads_with_one_segmented_copy(monkeypatch):
    monkeypatch.setenv("FP4CCL_ALGO", "padded")
    counts = [5, 3, 0, 4]
    v, log = _variable(3, 4, monkeypatch)
    send, recv = _info(0x4000, 12), _info(0x8000, 4)
    v.reduce_scatterv(send, recv, counts, "sum", 0)
    base, slot = 0x100000, 20
    assert log[0] == ("segments", [(base, 0x4000, 20), (base + slot, 0x4000 + 20, 12),
                                   (base + 2 * slot, 0x4000 + 32, 0), (base + 3 * slot, 0x4000 + 32, 16)])
    # rank 3 gets 4 of the 5 padded elements: NCCL writes a scratch slot, one copy takes the 4
    assert v.backend.calls == [("reduce_scatter", base, 20, base + 4 * slot, 5)]
    assert log[1] == ("copy", 0x8000, base + 4 * slot, 16)
    assert v.workspace.asked == [5 * slot]


def test_padded_reduce_scatter_of_the_widest_rank_writes_straight_into_out(monkeypatch):
    monkeypatch.setenv("FP4CCL_ALGO", "padded")
    v, log = _variable(0, 4, monkeypatch)
    v.reduce_scatterv(_info(0x4000, 12), _info(0x8000, 5), [5, 3, 0, 4], "sum", 0)
    assert v.backend.calls == [("reduce_scatter", 0x100000, 20, 0x8000, 5)]
    assert [entry[0] for entry in log] == ["segments"]
    assert v.workspace.asked == [4 * 20]


def test_grouped_forms_skip_empty_ranks_and_copy_nothing(monkeypatch):
    v, log = _variable(2, 4, monkeypatch)
    counts = [5, 0, 3, 4]
    v.all_gatherv(_info(0x2000, 3), _info(0x9000, 12), counts, 0)
    assert v.backend.calls == [("group_start",), ("broadcast", 0, 0x9000, 5), ("broadcast", 2, 0x9000 + 20, 3),
                               ("broadcast", 3, 0x9000 + 32, 4), ("group_end",)]
    v.backend.calls.clear()
    v.reduce_scatterv(_info(0x4000, 12), _info(0x8000, 3), counts, "sum", 0)
    assert v.backend.calls == [("group_start",), ("reduce", 0, 0x4000, 5), ("reduce", 2, 0x4000 + 20, 3),
                               ("reduce", 3, 0x4000 + 32, 4), ("group_end",)]
    assert log == []


def test_choice_is_logged_only_at_info(monkeypatch, caplog):
    v, _ = _variable(0, 2, monkeypatch)
    with caplog.at_level(logging.WARNING, logger="fp4ccl"):
        v.all_gatherv(_info(0x2000, 3), _info(0x9000, 4), [3, 1], 0)
    assert not [r for r in caplog.records if "all_gatherv" in r.getMessage()]
    with caplog.at_level(logging.INFO, logger="fp4ccl"):
        v.all_gatherv(_info(0x2000, 3), _info(0x9000, 4), [3, 1], 0)
    assert any("all_gatherv counts=[3, 1] dtype=float32 -> bcast" in r.getMessage() for r in caplog.records)


# -- the segmented-copy launcher ----------------------------------------------------------------------

def test_python_mirrors_the_kernel_defines():
    text = (REPO / "csrc" / "vcopy.cu").read_text()
    defines = dict(re.findall(r"#define\s+(VCOPY_\w+)\s+(\d+)", text))
    assert int(defines["VCOPY_MAXSEG"]) == vc.VCOPY_MAXSEG
    assert int(defines["VCOPY_THREADS"]) == vc.VCOPY_THREADS
    assert int(defines["VCOPY_UNROLL"]) == vc.VCOPY_UNROLL
    assert re.search(r'extern "C" __global__ void __launch_bounds__\(VCOPY_THREADS\)\s+' + vc.VCOPY_KERNEL + r"\(", text)


class FakeLauncher:
    """kernels.launcher()'s object: a reusable by-value table, and launches recorded with a copy of it."""

    def __init__(self):
        self.table = np.zeros(3 * vc.VCOPY_MAXSEG, np.uint64)
        self.launches = []

    def __call__(self, device, gx, gy, stream, *scalars):
        self.launches.append((device, (gx, gy), self.table.copy(), stream))


def test_launch_packs_the_table_and_splits_at_maxseg(monkeypatch):
    from fp4ccl.formats import kernels
    la = FakeLauncher()
    got = []

    def launcher(device, name, kind, load_function, block):
        got.append((device, name, kind, load_function(), block))
        return la
    monkeypatch.setattr(kernels, "launcher", launcher)
    monkeypatch.setitem(vc._vcopy, 1, ("fn", 1056))
    n = vc.VCOPY_MAXSEG + 3
    segs = [(0x10_0000_0000 + 64 * i, 0x20_0000_0000 + 32 * i, i % 5) for i in range(n)]
    segs[7] = (segs[7][0], segs[7][1], 1 << 20)
    assert vc.launch_vcopy(1, segs, 0xABC)
    assert got == [(1, vc.VCOPY_KERNEL, "vcopy", "fn", vc.VCOPY_THREADS)]
    assert len(la.launches) == 2
    (d0, g0, t0, s0), (d1, g1, t1, s1) = la.launches
    assert d0 == d1 == 1 and s0 == s1 == 0xABC
    assert g0 == (min(-(-(1 << 20) // (vc.VCOPY_THREADS * 16 * vc.VCOPY_UNROLL)), 1056 // vc.VCOPY_MAXSEG),
                  vc.VCOPY_MAXSEG)
    assert g1 == (1, 3)
    m = vc.VCOPY_MAXSEG
    for table, chunk in ((t0, segs[:m]), (t1, segs[m:])):
        k = len(chunk)   # entries past k are stale: the kernel reads only blockIdx.y < k
        assert list(table[m:m + k]) == [s[0] for s in chunk]            # dst
        assert list(table[:k]) == [s[1] for s in chunk]                 # src
        assert list(table[2 * m:2 * m + k]) == [s[2] for s in chunk]    # nbytes


def test_copy_segments_uses_one_launch_one_memcpy_or_the_fallback(monkeypatch):
    launched, copied = [], []
    monkeypatch.setattr(vc, "copy", lambda dst, src, n, stream: copied.append((dst, src, n)))
    monkeypatch.setattr(vc, "launch_vcopy", lambda dev, segs, stream: launched.append(list(segs)) or True)
    vc.copy_segments(0, [(1, 2, 0), (3, 4, 5), (6, 7, 0), (8, 9, 10)], 0)
    assert launched == [[(3, 4, 5), (8, 9, 10)]] and copied == []  # empty segments never launched
    vc.copy_segments(0, [(1, 2, 0), (3, 4, 5)], 0)
    assert copied == [(3, 4, 5)] and len(launched) == 1            # one segment: a plain memcpy
    vc.copy_segments(0, [(1, 2, 0)], 0)
    assert copied == [(3, 4, 5)] and len(launched) == 1            # nothing at all
    monkeypatch.setattr(vc, "launch_vcopy", lambda dev, segs, stream: False)
    vc.copy_segments(0, [(3, 4, 5), (8, 9, 10)], 0)
    assert copied == [(3, 4, 5), (3, 4, 5), (8, 9, 10)]            # kernel unavailable: one per segment


def test_kernel_that_cannot_load_falls_back_and_says_so_once(monkeypatch, caplog):
    from fp4ccl import jit
    tries = []

    def broken(name, device):
        tries.append((name, device))
        raise RuntimeError("NVRTC failed to compile vcopy.cu for sm_90")
    monkeypatch.setattr(jit, "load_module", broken)
    monkeypatch.delitem(vc._vcopy, 5, raising=False)
    try:
        with caplog.at_level(logging.INFO, logger="fp4ccl"):
            assert vc.launch_vcopy(5, [(16, 32, 8)], 0) is False
            assert vc.launch_vcopy(5, [(16, 32, 8)], 0) is False
        assert tries == [("vcopy.cu", 5)]
        msgs = [r.getMessage() for r in caplog.records if "segmented-copy kernel" in r.getMessage()]
        assert len(msgs) == 1 and "cuda:5" in msgs[0] and "NVRTC failed" in msgs[0]
    finally:
        vc._vcopy.pop(5, None)
