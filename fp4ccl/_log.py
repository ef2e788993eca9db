"""Decision logging controlled by FP4CCL_DEBUG (like NCCL_DEBUG): WARN (default), INFO, DEBUG."""
from __future__ import annotations

import logging
import os
import sys
from typing import Mapping

from fp4ccl.bootstrap.env import discover

_LEVELS = {"": logging.WARNING, "WARN": logging.WARNING, "INFO": logging.INFO, "DEBUG": logging.DEBUG,
           "TRACE": logging.DEBUG, "VERSION": logging.INFO}


def rank_tag(env: Mapping[str, str]) -> str:
    """The rank that log lines carry: discover()'s, under any launcher it knows; "?" for a lone process, and
    where discover() refuses the environment (init() raises that error; a log line must not)."""
    try:
        info = discover(env)
    except ValueError:
        return "?"
    return "?" if info.launcher == "single" else str(info.rank)


def get_logger(name: str = "fp4ccl") -> logging.Logger:
    """The package logger; configured once from FP4CCL_DEBUG, writing rank-prefixed lines to stderr."""
    root = logging.getLogger("fp4ccl")
    if not getattr(root, "_fp4ccl_configured", False):
        level = _LEVELS.get(os.environ.get("FP4CCL_DEBUG", "").upper(), logging.WARNING)
        handler = logging.StreamHandler(sys.stderr)
        tag = rank_tag(os.environ)
        handler.setFormatter(logging.Formatter(f"%(asctime)s fp4ccl[{tag}] %(levelname)s %(message)s", "%H:%M:%S"))
        root.addHandler(handler)
        root.setLevel(level)
        root.propagate = False
        root._fp4ccl_configured = True
    return logging.getLogger(name)
