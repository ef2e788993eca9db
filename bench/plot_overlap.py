"""Plot bench_overlap.py's table: time against M for each op, fp4ccl beside torch's fused ops.

    python bench/plot_overlap.py RESULTS.json|bench.log out.png [--title TEXT]

Reads the JSON that `bench_overlap.py --json` writes, or the table it prints (rank 0's lines of a
launcher log). One panel per op (ag+mm, ag+mm nvfp4, mm+rs): the matmul alone, NCCL-then-matmul
(seq), torch's fused op, fp4ccl's sequential path and each pipelined column, ms on a log scale.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Dict, List

# printed column -> row key (bench_overlap names fp4ccl's sequential path "seqpath" in its table)
_PRINTED = {"seqpath": "fp4ccl_seqpath"}
_STYLE = {"mm": ("k", ":"), "seq": ("C7", "--"), "torch": ("C3", "-"), "fp4ccl_seqpath": ("C1", "--")}
_FREE_COLORS = ["C0", "C2", "C4", "C6", "C8", "C9", "C5"]   # the pipelined columns


def read_rows(path: str) -> List[dict]:
    """The bench's rows from its JSON or from the table in a log."""
    with open(path) as fh:
        text = fh.read()
    if text.lstrip().startswith("{"):
        return json.loads(text)["rows"]
    rows, columns = [], None
    for line in text.splitlines():
        line = re.sub(r"^(\[rank\d+\]: )+", "", line).strip()
        fields = line.split()
        if fields[:2] == ["op", "M"] and "mm" in fields:
            columns = [_PRINTED.get(c, c) for c in fields]
            continue
        if columns is None or not fields or fields[0].startswith("#"):
            if line.startswith("# best"):
                columns = None   # the summary table has other columns
            continue
        # an op name may hold a space ("ag+mm nvfp4"): the numbers are the last len(columns) - 1 fields
        n = len(columns) - 1
        if len(fields) < n + 1:
            continue
        try:
            values = [float(v) for v in fields[-n:]]
        except ValueError:
            continue
        row = {"op": " ".join(fields[:-n])}
        row.update(zip(columns[1:], values))
        row["M"] = int(row["M"])
        rows.append(row)
    if not rows:
        raise SystemExit(f"{path}: no bench_overlap rows found")
    return rows


def plot(rows: List[dict], path: str, title: str = "") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    ops: Dict[str, List[dict]] = {}
    for r in rows:
        ops.setdefault(r["op"], []).append(r)
    fig, axes = plt.subplots(1, len(ops), figsize=(5.2 * len(ops), 4.6), squeeze=False)
    for ax, (op, rs) in zip(axes[0], ops.items()):
        rs = sorted(rs, key=lambda r: r["M"])
        keys = [k for k in rs[0] if k not in ("op", "M", "comm")]
        free = iter(_FREE_COLORS * 4)
        for key in keys:
            pts = [(r["M"], r[key]) for r in rs if key in r and r[key] == r[key] and r[key] > 0]   # no NaN
            if not pts:
                continue
            color, style = _STYLE.get(key) or (next(free), "-")
            label = {"mm": "matmul alone", "seq": "NCCL then matmul", "torch": "torch fused",
                     "fp4ccl_seqpath": "fp4ccl sequential"}.get(key, f"fp4ccl {key}")
            ax.plot(*zip(*pts), style, color=color, marker="o", ms=3, label=label)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("M")
        ax.set_ylabel("ms per call")
        ax.set_title(op)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="bench_overlap --json output, or a log holding its table")
    ap.add_argument("png")
    ap.add_argument("--title", default="")
    args = ap.parse_args(argv)
    plot(read_rows(args.source), args.png, args.title)
    return 0


if __name__ == "__main__":
    sys.exit(main())
