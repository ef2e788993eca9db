"""FP4CCL_TIMEOUT: the one parser for every layer that waits on peers (NCCL watchdog, host backend,
bootstrap store, device-side barriers). Each layer keeps its own default for the unset case."""
from __future__ import annotations

import os

ENV_TIMEOUT = "FP4CCL_TIMEOUT"


def env_timeout(unset: float) -> float:
    """FP4CCL_TIMEOUT in seconds (0 = wait forever), or `unset` when the variable is empty or missing.

    A value that is not a non-negative number raises ValueError naming the variable, so a typo such as
    "30s" fails at the first call instead of silently disabling the timeout."""
    raw = os.environ.get(ENV_TIMEOUT, "").strip()
    if not raw:
        return unset
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{ENV_TIMEOUT}={raw!r} is not a number of seconds (0 waits forever)") from None
    if not value >= 0:
        raise ValueError(f"{ENV_TIMEOUT}={raw!r} must be a number of seconds >= 0 (0 waits forever)")
    return value
