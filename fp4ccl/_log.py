"""Decision logging controlled by FP4CCL_DEBUG (like NCCL_DEBUG): WARN (default), INFO, DEBUG."""
from __future__ import annotations

import logging
import os
import sys
from typing import Mapping, Optional

_LEVELS = {"": logging.WARNING, "WARN": logging.WARNING, "INFO": logging.INFO, "DEBUG": logging.DEBUG,
           "TRACE": logging.DEBUG, "VERSION": logging.INFO}


def rank_tag(env: Mapping[str, str]) -> str:
    """The rank that log lines carry: discover()'s, under any launcher it knows; "?" for a lone process, and
    where discover() fails in any way (init() raises that error; a log line must not)."""
    try:
        # Imported here: modules call get_logger at import, and most runs log nothing.
        from fp4ccl.bootstrap.env import discover
        info = discover(env)
    except Exception:
        return "?"
    return "?" if info.launcher == "single" else str(info.rank)


class _RankFormatter(logging.Formatter):
    """Tags each line with rank_tag(), worked out on the first line formatted and then kept, so that
    importing a module that logs does no rank discovery."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s fp4ccl[%(fp4ccl_rank)s] %(levelname)s %(message)s", "%H:%M:%S")
        self._tag: Optional[str] = None

    def format(self, record: logging.LogRecord) -> str:
        if self._tag is None:
            self._tag = rank_tag(os.environ)
        record.fp4ccl_rank = self._tag
        return super().format(record)


def get_logger(name: str = "fp4ccl") -> logging.Logger:
    """The package logger; configured once from FP4CCL_DEBUG, writing rank-prefixed lines to stderr."""
    root = logging.getLogger("fp4ccl")
    if not getattr(root, "_fp4ccl_configured", False):
        level = _LEVELS.get(os.environ.get("FP4CCL_DEBUG", "").upper(), logging.WARNING)
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_RankFormatter())
        root.addHandler(handler)
        root.setLevel(level)
        root.propagate = False
        root._fp4ccl_configured = True
    return logging.getLogger(name)
