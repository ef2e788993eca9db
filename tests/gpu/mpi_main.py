"""Run the collective checks under mpirun: `mpirun -n 4 python tests/gpu/mpi_main.py [seed]`.

Each rank prints one line per check; the exit code is non-zero if any check failed on this rank.
"""
from __future__ import annotations

import os
import sys
import traceback

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import collective_checks as cc  # noqa: E402
import fp4ccl  # noqa: E402


def main() -> int:
    seed = int(sys.argv[1]) if len(sys.argv) > 1 else 1234
    comm = fp4ccl.init()
    exchange = type(comm._exchange).__name__
    failures = 0
    checks = [("all_reduce", cc.check_all_reduce, {"exact": False}), ("broadcast", cc.check_broadcast, {}),
              ("reduce", cc.check_reduce, {"exact": False}), ("all_gather", cc.check_all_gather, {}),
              ("reduce_scatter", cc.check_reduce_scatter, {"exact": False}), ("all_to_all", cc.check_all_to_all, {}),
              ("send_recv_ring", cc.check_send_recv_ring, {}), ("group_batch", cc.check_group_batch, {}),
              ("all_gatherv", cc.check_all_gatherv, {}), ("reduce_scatterv", cc.check_reduce_scatterv, {"exact": False})]
    for framework in ("torch", "cupy"):
        for name, fn, kw in checks:
            if framework == "cupy" and name in ("group_batch", "send_recv_ring"):
                kw = {}
            try:
                fn(comm, seed, framework, **kw)
                print(f"[rank{comm.rank}] PASS {name} {framework} backend={comm.backend} exchange={exchange}", flush=True)
            except Exception:  # noqa: BLE001 - report and go on to the next check
                failures += 1
                print(f"[rank{comm.rank}] FAIL {name} {framework} seed={seed}\n{traceback.format_exc()}", flush=True)
    comm.destroy()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
