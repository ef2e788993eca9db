"""CUDA graphs of repeated overlapped-matmul calls, replayed instead of enqueued step by step.

A pipelined all_gather_matmul enqueues some forty steps (quantize, barrier, pulls, decodes, matmuls,
events): 300-420 us of host time per call at M = N = K = 8192, more than the GPU needs, so back-to-back
calls ran at the host's pace (bench/RESULTS.md runs 68-70). A call that writes its result into `out=`
(all_gather_matmul: and returns no a_full; matmul_reduce_scatter) leaves nothing behind that a replay
could overwrite, so when such a call comes again with the same tensors (addresses, shapes, dtypes,
strides), on the same stream, with the same settings and workspace slot, its steps are captured once
into a CUDA graph and every later call replays it: one launch.

The graphs' intermediates (the gathered rows, the FP4 staging) come from one memory pool per
communicator, shared by its graphs: each graph's intermediates are dead when its capture ends, and
calls of one communicator never run at once (each waits for the previous), so the graphs may reuse
the same memory. The workspace must not move under a graph: growing it drops them all.
FP4CCL_OVERLAP_GRAPHS=0 turns this off.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Any, Callable

from ._log import get_logger

log = get_logger("fp4ccl.overlap")

GRAPHS_KEPT = 16     # per communicator, least recently used dropped
KEYS_SEEN = 256      # call keys remembered, so that only a call that repeats is captured


def enabled() -> bool:
    return os.environ.get("FP4CCL_OVERLAP_GRAPHS", "1").strip().lower() not in ("0", "false", "off", "no")


class Replays:
    """One communicator's graphs of repeated calls, keyed by everything their steps depend on."""

    def __init__(self):
        self._graphs: "OrderedDict[tuple, Any]" = OrderedDict()
        self._seen: "OrderedDict[tuple, None]" = OrderedDict()
        self._pool = None
        self.captures = 0    # graphs captured, and calls served by a replay, so far (for tests and logs)
        self.replayed = 0

    def __len__(self) -> int:
        return len(self._graphs)

    def run(self, key: tuple, device: int, capture_stream, enqueue: Callable[[], Any], what: str = "call") -> bool:
        """Replay key's graph on the current stream (capturing it first if the key was seen before);
        False, with nothing done, for a key seen the first time: the caller runs the call eagerly."""
        graph = self._graphs.get(key)
        if graph is None:
            if key not in self._seen:
                self._seen[key] = None
                if len(self._seen) > KEYS_SEEN:
                    self._seen.popitem(last=False)
                return False
            graph = self._capture(key, device, capture_stream, enqueue)
            log.info("%s: captured a CUDA graph of a repeated call (%d kept)", what, len(self._graphs))
        else:
            self._graphs.move_to_end(key)
        graph.replay()
        self.replayed += 1
        return True

    def _capture(self, key: tuple, device: int, capture_stream, enqueue) -> Any:
        import torch
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.device(device):
            # torch.cuda.graph synchronizes the device before it starts, so the capture stream needs
            # no ordering after the caller's; the replay runs on the caller's stream.
            with torch.cuda.graph(graph, pool=self._pool, stream=capture_stream):
                enqueue()
        self._graphs[key] = graph
        self.captures += 1
        if len(self._graphs) > GRAPHS_KEPT:
            self._graphs.popitem(last=False)
        return graph

    def clear(self) -> None:
        """Drop every graph and forget the keys seen. The pool goes too: torch releases a pool when its
        last graph goes, and a capture into a released pool's handle fails."""
        self._graphs.clear()
        self._seen.clear()
        self._pool = None
