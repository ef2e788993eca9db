"""Decision logging controlled by FP4CCL_DEBUG (like NCCL_DEBUG): WARN (default), INFO, DEBUG."""
from __future__ import annotations

import logging
import os
import sys

_LEVELS = {"": logging.WARNING, "WARN": logging.WARNING, "INFO": logging.INFO, "DEBUG": logging.DEBUG,
           "TRACE": logging.DEBUG, "VERSION": logging.INFO}


def get_logger(name: str = "fp4ccl") -> logging.Logger:
    """The package logger; configured once from FP4CCL_DEBUG, writing rank-prefixed lines to stderr."""
    root = logging.getLogger("fp4ccl")
    if not getattr(root, "_fp4ccl_configured", False):
        level = _LEVELS.get(os.environ.get("FP4CCL_DEBUG", "").upper(), logging.WARNING)
        handler = logging.StreamHandler(sys.stderr)
        rank = os.environ.get("FP4CCL_RANK") or os.environ.get("RANK") or os.environ.get("OMPI_COMM_WORLD_RANK") or "?"
        handler.setFormatter(logging.Formatter(f"%(asctime)s fp4ccl[{rank}] %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(level)
        root.propagate = False
        root._fp4ccl_configured = True
    return logging.getLogger(name)
