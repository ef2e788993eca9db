"""Side-by-side table of bench_fp4_kernels.py JSON files (one per variant, as kernel_variants.sh writes).

    python3 bench/compare_variants.py DIR NAME [NAME ...]     # reads DIR/NAME.json

One row per (size, dtype, kernel), one column per variant: kernel time in µs (CUDA-graph replay) / % of
the fastest copy measured by that variant's own run. The copy rows other than the fastest are left out.
"""
from __future__ import annotations

import json
import os
import sys


def table(directory: str, names) -> str:
    rows = {}
    for name in names:
        with open(os.path.join(directory, name + ".json")) as fh:
            for r in json.load(fh):
                if "pct_copy" in r:
                    rows.setdefault((r["size"], r["dtype"], r["kernel"]), {})[name] = r
    out = [f"{'size(B)':>12} {'dtype':>9} {'kernel':>12} " + " ".join(f"{n:>13}" for n in names) + "  #wrong"]
    for (size, dtype, kernel), by in rows.items():
        if kernel in ("copy-s", "copy-k", "write-k"):
            continue
        cells = [f"{by[n]['time_us']:6.1f}/{by[n]['pct_copy']:5.1f}" if n in by else " " * 12 for n in names]
        out.append(f"{size:>12} {dtype:>9} {kernel:>12} " + " ".join(f"{c:>13}" for c in cells)
                   + f"  {sum(by[n]['wrong'] for n in by):>6}")
    return "\n".join(out)


if __name__ == "__main__":
    if len(sys.argv) < 3:
        sys.exit(__doc__)
    print(table(sys.argv[1], sys.argv[2:]))
