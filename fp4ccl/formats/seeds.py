"""Stochastic-rounding seeds: a host int, or a one-element integer array the kernels read when they run.

A seed in device memory is what a CUDA graph needs: the value baked into a captured launch would give
every replay the same random bits, so the rounding of a value that repeats from step to step would be
biased the same way each time. With `seed=<one-element int64 tensor on x's device>` the kernels read
the seed when they run, and the caller advances it between replays (`seed.add_(1)`, captured in the
graph or not) without capturing again. The same value gives the same bytes as the same int seed.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Any, Tuple, Union

import numpy as np

from .. import _arrays

_MASK = (1 << 64) - 1
SEED_DTYPES = ("int64", "uint64")


@dataclass(frozen=True)
class DeviceSeed:
    """A seed the kernels read from `ptr` (one 64-bit word on `device`) when they run, and use as
    add + mul * value (mod 2**64): the derived seeds of a reduce-scatter's chunks share one word.
    `owner` is the caller's array: held until the kernels are enqueued, since a call that dropped the
    last reference earlier would hand the word to the next allocation of the call itself (measured:
    the amax partials landed there and became the seed). The symmetric workspace's graph cache keys
    hold it too, so an array stays alive while a cached graph reads it (until evicted, the workspace
    grows, or the communicator is destroyed)."""
    ptr: int
    device: int
    mul: int = 1
    add: int = 0
    owner: Any = field(default=None, compare=False, hash=False, repr=False)

    def derive(self, mul: int, add: int) -> "DeviceSeed":
        """The seed `mul * s + add` of this seed s (mod 2**64), still read when the kernels run."""
        return DeviceSeed(self.ptr, self.device, self.mul * mul & _MASK, (self.add * mul + add) & _MASK, self.owner)


Seed = Union[int, DeviceSeed]


def check_seed(seed: Any) -> int:
    """A stochastic-rounding seed as an int in [0, 2**64); ValueError for anything else (bools, floats and
    strings included, which int() would quietly turn into another seed)."""
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or not 0 <= int(seed) < 2**64:
        raise ValueError(f"seed: expected an int in [0, 2**64) or a one-element int64 array, got {seed!r}")
    return int(seed)


def resolve_seed(seed: Any, x: _arrays.ArrayInfo) -> Seed:
    """The seed of a call on x: an int as is (checked); a one-element int64/uint64 array as a DeviceSeed
    when x is on a GPU (it must be on x's device), or as its value, read now, when x is on the host.
    The bits of a negative int64 are taken as an unsigned 64-bit value."""
    if isinstance(seed, numbers.Integral) or not _is_array(seed):
        return check_seed(seed)
    try:
        s = _arrays.describe(seed, "seed")
    except TypeError as exc:   # a dtype or device no framework adapter takes
        raise ValueError(f"seed: a seed array must hold one int64 or uint64 element ({exc})") from None
    if s.dtype not in SEED_DTYPES or s.size != 1:
        raise ValueError(f"seed: a seed array must hold one int64 or uint64 element, got {s.dtype} of shape "
                         f"{s.shape}")
    if x.is_cuda:
        if s.device != x.device:
            raise ValueError(f"seed: on {s.where()}, but x is on {x.where()}: a seed array is read by the kernels "
                             f"and must be on x's device")
        if s.ptr % 8:   # the kernels load it as one 64-bit word; a misaligned load kills the context
            raise ValueError(f"seed: the array's element must be 8-byte aligned (address {s.ptr:#x})")
        return DeviceSeed(s.ptr, s.device, owner=seed)
    if s.is_cuda:
        raise ValueError(f"seed: on {s.where()}, but x is on the host: pass an int or a host array")
    return int(_arrays.host_view(s).reshape(-1).view(np.uint64)[0])


def call_seed(rounding: str, seed: Any, x: _arrays.ArrayInfo) -> Seed:
    """The seed a call on x hands the kernels or the reference: resolved (resolve_seed) when rounding
    stochastically, 0 otherwise (a seed changes nothing then, and is not read)."""
    if rounding != "stochastic":
        return 0
    if seed is None:
        raise ValueError("rounding='stochastic' needs seed=<int or one-element int64 array>, the same on every "
                         "rank, so that the run replays exactly")
    return resolve_seed(seed, x)


def derive(seed: Seed, mul: int, add: int) -> Seed:
    """mul * seed + add (mod 2**64), for an int or a DeviceSeed alike."""
    if isinstance(seed, DeviceSeed):
        return seed.derive(mul, add)
    return (seed * mul + add) & _MASK


def kernel_args(seed: Seed) -> Tuple[int, int, int]:
    """(seed, seed_ptr, seed_mul) as the kernels take them: they use seed + seed_mul * *seed_ptr when
    seed_ptr is set, else seed."""
    if isinstance(seed, DeviceSeed):
        return seed.add, seed.ptr, seed.mul
    return int(seed or 0) & _MASK, 0, 0


def _is_array(obj: Any) -> bool:
    mod = type(obj).__module__.split(".")[0]
    return isinstance(obj, np.ndarray) or mod in ("torch", "cupy")
