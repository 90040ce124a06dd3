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


@triton.jit
def low_byte(bits):
    """The low byte (0 to 255) of int32 ``bits``, by an integer instruction when compiled. An int8
    code is the low byte of a float32's bits; truncated straight from them, the byte can reach a
    shared-memory store of the float's own register, which the ptxas of Triton 3.6 compiles as a
    saturating float-to-u8 conversion (every code 255)."""
    if _LIBDEVICE:
        return tl.inline_asm_elementwise("and.b32 $0, $1, 255;", "=r,r", [bits], dtype=tl.int32, is_pure=True,
                                         pack=1)
    else:
        return bits & 0xFF


@triton.jit
def sqrt_f32(x):
    """√x of a float32 ``x``, correctly rounded, with no branch when compiled: the compiler's own
    sequence for ``sqrt.rn`` on its fast range [2⁻¹⁰¹, max] (r = rsqrt.approx(x), y = x·r, then
    y + (x − y²)·r/2 by two fused multiply-adds), with an x below 2⁻¹⁰⁰ scaled by 2⁶⁴ into that
    range and its root back by 2⁻³² (both exact), and ±0 and +∞ (where the sequence gives NaN)
    passed through. (``tl.sqrt_rn`` compiles to a branch around each element's slow path.)
    numpy's correctly rounded root in the interpreter."""
    if _LIBDEVICE:
        tiny = x < 7.888609052210118e-31  # 2⁻¹⁰⁰
        s = tl.where(tiny, x * 18446744073709551616.0, x)  # ·2⁶⁴
        r = tl.inline_asm_elementwise("rsqrt.approx.ftz.f32 $0, $1;", "=f,f", [s], dtype=tl.float32,
                                      is_pure=True, pack=1)
        y = s * r
        y = tl.fma(tl.fma(-y, y, s), r * 0.5, y)
        y = tl.where(tiny, y * 2.3283064365386963e-10, y)  # ·2⁻³²
        return tl.where((y != y) & (x >= 0.0), x, y)
    else:
        return tl.sqrt_rn(x)


@triton.jit
def div_f32(a, b):
    """a / b of float32 tensors, correctly rounded. Compiled: where every |a| (or a = ±0) and |b|
    of the tile lie in [2⁻⁶⁰, 2⁶⁰), the compiler's own fast sequence for ``div.rn`` (r = rcp(b),
    one Newton step, q = a·r, one correction by the remainder; a = ±0 gives a·b) for every
    element with no branch each; otherwise ``tl.div_rn``, which compiles to a branch around each
    element's slow path. ``tl.div_rn`` in the interpreter."""
    if _LIBDEVICE:
        fa = a.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
        fb = b.to(tl.uint32, bitcast=True) & 0x7FFFFFFF
        # (an exponent field in [67, 187): |x| in [2⁻⁶⁰, 2⁶⁰))
        fast = ((fb - 0x21800000) < 0x3C000000) & (((fa - 0x21800000) < 0x3C000000) | (fa == 0))
        if tl.min(fast.to(tl.int32)) == 1:
            r = tl.inline_asm_elementwise("rcp.approx.ftz.f32 $0, $1;", "=f,f", [b], dtype=tl.float32,
                                          is_pure=True, pack=1)
            r = tl.fma(tl.fma(-b, r, 1.0), r, r)
            q = tl.fma(a, r, 0.0)
            q = tl.fma(tl.fma(-b, q, a), r, q)
            q = tl.where(fa == 0, a * b, q)
        else:
            q = tl.div_rn(a, b)
        return q
    else:
        return tl.div_rn(a, b)
