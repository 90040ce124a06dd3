"""Triton helpers that the generated kernels call (Triton is imported here, and only when the
engine builds a step)."""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

_LIBDEVICE = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")
"""Whether the kernels are compiled (libdevice's functions), not interpreted (numpy's)."""


@triton.jit
def cast_to(x, DT: tl.constexpr):
    """A float32 value stored as ``DT``, rounded to nearest even (written out for bfloat16, whose
    conversion the Triton interpreter truncates)."""
    if DT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True)).to(DT)
    else:
        return x.to(DT)


@triton.jit
def round_to(x, DT: tl.constexpr):
    """A float32 value rounded to ``DT`` and back: what an eager op computing in ``DT`` stores."""
    return cast_to(x, DT).to(tl.float32)


@triton.jit
def pointer(table, leaf, DT: tl.constexpr, ALIGNED: tl.constexpr):
    """The address of leaf ``leaf`` in an int64 address table, as a pointer to ``DT``. ``ALIGNED``:
    every address of the table is a multiple of 16 bytes, so a thread's consecutive elements may
    move as one vector load or store."""
    at = tl.load(table + leaf).to(tl.pointer_type(DT))
    if ALIGNED:
        at = tl.multiple_of(at, 16)
    return at


@triton.jit
def max_nan(a, b):
    """The larger of ``a`` and ``b``, NaN where either is (a reduction's combine: ``torch.amax``)."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def log_f32(x):
    """ln x of a float32 ``x``: libdevice's ``logf`` (within 1 ulp) when compiled (``tl.log`` may
    lower to a faster approximation); numpy's in the interpreter (which has no libdevice)."""
    if _LIBDEVICE:
        return libdevice.log(x)
    else:
        return tl.log(x)


@triton.jit
def cos_f32(x):
    """cos x of a float32 ``x``: libdevice's ``cosf`` (within 2 ulp) when compiled (``tl.cos`` may
    lower to a faster approximation); numpy's in the interpreter (which has no libdevice)."""
    if _LIBDEVICE:
        return libdevice.cos(x)
    else:
        return tl.cos(x)


@triton.jit
def fourth_root_guess(x):
    """x^¼ of a float32 ``x`` in [0, 1], approximately: two approximate reciprocal square roots
    when compiled (rsqrt(0) = ∞, rsqrt(∞) = 0); numpy's square roots in the interpreter (whose
    reciprocal square root of 0 warns). Only a guess: the int8 code compares its result exactly."""
    if _LIBDEVICE:
        return tl.rsqrt(tl.rsqrt(x))
    else:
        return tl.sqrt(tl.sqrt(x))
