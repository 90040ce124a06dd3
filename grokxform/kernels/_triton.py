"""The Triton kernels of the kernel path: multi-tensor, one launch over every leaf of a group.

Work is cut into items, one per ``BLOCK`` elements of a leaf; item k handles elements
``[start_k, start_k + BLOCK)`` of leaf ``leaf_k``. Tensors are reached through tables of their
addresses (``int64``), so one launch covers tensors of any sizes anywhere in memory, and nothing
is copied into a flat buffer. Per-leaf scalars come from a ``[n_leaves, N_COLS]`` float32 table
(:data:`COLS`), already rounded as the eager code rounds them.

Importing this module imports Triton; :mod:`grokxform.kernels` imports it only when a kernel
step is built.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

COLS = (
    "clip_scale",  # global clip factor, rounded to the gradient dtype
    "alpha", "one_minus_alpha",  # EMA α_t and 1−α_t, rounded to the EMA dtype
    "ema_first",  # 1.0 where the EMA is seeded with this gradient (init="first", count 0)
    "lamb",  # λ of amplify, rounded to the gradient dtype
    "ma_slot", "ma_divisor", "ma_on",  # ring slot count % w, min(count+1, w) (or 1), warm-up flag
    "wd",  # weight decay (coupled or decoupled), rounded to the gradient dtype
    "wd_on",  # 1.0 where the mask selects the leaf
    "b1", "one_minus_b1", "b2", "one_minus_b2", "eps",  # rounded to the moment dtype
    "bc1", "bc2_sqrt",  # 1 − β1^t and √(1 − β2^t), float64 maths rounded to the moment dtype
    "neg_lr",  # −η_t, rounded to the gradient dtype
)
N_COLS = len(COLS)
C = {name: i for i, name in enumerate(COLS)}

_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float64: tl.float64}


def tl_dtype(dtype: torch.dtype) -> tl.dtype:
    return _TL[dtype]


@triton.jit
def _cast(x, DT: tl.constexpr):
    """A float32 value in ``DT``, rounded to nearest even (written out for bfloat16, whose
    conversion the Triton interpreter truncates)."""
    if DT == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(x != x, x, bits.to(tl.float32, bitcast=True)).to(DT)
    else:
        return x.to(DT)


@triton.jit
def _rnd(x, DT: tl.constexpr):
    """Round a float32 value to ``DT`` and back: what the eager op in dtype ``DT`` stores."""
    if DT == tl.float32:
        return x
    else:
        return _cast(x, DT).to(tl.float32)


@triton.jit
def _ptr(table, leaf, DT: tl.constexpr):
    return tl.load(table + leaf).to(tl.pointer_type(DT))


@triton.jit
def sumsq_kernel(G, NUMEL, ITEM_LEAF, ITEM_START, ITEM_SLOT, SQ, BAD, G_DT: tl.constexpr, BLOCK: tl.constexpr):
    """Per item: Σ g² (float32) and the number of non-finite elements, at ``ITEM_SLOT[item]``."""
    item = tl.program_id(0)
    leaf = tl.load(ITEM_LEAF + item)
    start = tl.load(ITEM_START + item)
    n = tl.load(NUMEL + leaf)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    m = offs < n
    g = tl.load(_ptr(G, leaf, G_DT) + offs, mask=m, other=0.0).to(tl.float32)
    bad = (g != g) | (tl.abs(g) == float("inf"))
    slot = tl.load(ITEM_SLOT + item)
    tl.store(SQ + slot, tl.sum(g * g, axis=0))
    tl.store(BAD + slot, tl.sum(bad.to(tl.int32), axis=0))


@triton.jit
def adam_family_kernel(
    P, G, MU, M, V, BUF, TOT, NUMEL, ITEM_LEAF, ITEM_START, SC,
    P_DT: tl.constexpr, G_DT: tl.constexpr, E_DT: tl.constexpr, S_DT: tl.constexpr, W_DT: tl.constexpr,
    HAS_CLIP: tl.constexpr, FILTER: tl.constexpr, COUPLED: tl.constexpr, N_COLS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One step of ``[clip →] [amplify(filter) →] [L2 →] adam [→ decay] → −lr`` and ``θ ← θ + u``.

    FILTER: 0 none, 1 EMA (state MU), 2 MA (ring BUF ``[w, numel]``, float64 running sum TOT).
    Each line rounds where the eager transform rounds (``_rnd`` to the dtype it computes in).
    """
    item = tl.program_id(0)
    leaf = tl.load(ITEM_LEAF + item)
    start = tl.load(ITEM_START + item)
    n = tl.load(NUMEL + leaf)
    offs = start + tl.arange(0, BLOCK).to(tl.int64)
    msk = offs < n
    row = SC + leaf * N_COLS

    p_ptr = _ptr(P, leaf, P_DT) + offs
    p = tl.load(p_ptr, mask=msk, other=0.0).to(tl.float32)
    g = tl.load(_ptr(G, leaf, G_DT) + offs, mask=msk, other=0.0).to(tl.float32)
    if HAS_CLIP:  # g·scale
        g = _rnd(g * tl.load(row + 0), G_DT)
    if FILTER == 1:  # μ ← α·μ + (1−α)·g (or g on the seeding step); ĝ = g + λ·μ
        mu_ptr = _ptr(MU, leaf, E_DT) + offs
        mu = tl.load(mu_ptr, mask=msk, other=0.0).to(tl.float32)
        ge = _rnd(g, E_DT)
        blended = _rnd(_rnd(mu * tl.load(row + 1), E_DT) + _rnd(ge * tl.load(row + 2), E_DT), E_DT)
        new_mu = tl.where(tl.load(row + 3) != 0.0, ge, blended)
        tl.store(mu_ptr, _cast(new_mu, E_DT), mask=msk)
        g = _rnd(g + _rnd(_rnd(new_mu, G_DT) * tl.load(row + 4), G_DT), G_DT)
    if FILTER == 2:  # S ← S − g_{t−w} + g_t; ĝ = g + λ·S/n (0 until the window is full)
        slot = tl.load(row + 5).to(tl.int64)
        w_ptr = _ptr(BUF, leaf, W_DT) + slot * n + offs
        oldest = tl.load(w_ptr, mask=msk, other=0.0).to(tl.float64)
        stored = _cast(g, W_DT)
        t_ptr = _ptr(TOT, leaf, tl.float64) + offs
        total = (tl.load(t_ptr, mask=msk, other=0.0) - oldest) + stored.to(tl.float64)
        tl.store(t_ptr, total, mask=msk)
        tl.store(w_ptr, stored, mask=msk)
        avg = _rnd((total / tl.load(row + 6).to(tl.float64)).to(tl.float32), G_DT)  # as c10: via float
        avg = tl.where(tl.load(row + 7) != 0.0, avg, 0.0)
        g = _rnd(g + _rnd(avg * tl.load(row + 4), G_DT), G_DT)
    if COUPLED:  # ĝ + wd·θ
        g = tl.where(tl.load(row + 9) != 0.0, _rnd(g + _rnd(_rnd(p, G_DT) * tl.load(row + 8), G_DT), G_DT), g)
    # Adam: m, v in S_DT; u = (m/bc1) / (√v/√bc2 + ε)
    m_ptr = _ptr(M, leaf, S_DT) + offs
    v_ptr = _ptr(V, leaf, S_DT) + offs
    m = tl.load(m_ptr, mask=msk, other=0.0).to(tl.float32)
    v = tl.load(v_ptr, mask=msk, other=0.0).to(tl.float32)
    gs = _rnd(g, S_DT)
    m = _rnd(_rnd(m * tl.load(row + 10), S_DT) + _rnd(gs * tl.load(row + 11), S_DT), S_DT)
    v = _rnd(_rnd(v * tl.load(row + 12), S_DT) + _rnd(_rnd(gs * gs, S_DT) * tl.load(row + 13), S_DT), S_DT)
    tl.store(m_ptr, _cast(m, S_DT), mask=msk)
    tl.store(v_ptr, _cast(v, S_DT), mask=msk)
    denom = _rnd(_rnd(tl.sqrt_rn(v), S_DT) / tl.load(row + 16), S_DT)
    u = _rnd(_rnd(m / tl.load(row + 15), S_DT) / _rnd(denom + tl.load(row + 14), S_DT), S_DT)
    u = _rnd(u, G_DT)
    if not COUPLED:  # u + wd·θ
        u = tl.where(tl.load(row + 9) != 0.0, _rnd(u + _rnd(_rnd(p, G_DT) * tl.load(row + 8), G_DT), G_DT), u)
    u = _rnd(u * tl.load(row + 17), G_DT)
    tl.store(p_ptr, _cast(p + _rnd(u, P_DT), P_DT), mask=msk)


@triton.jit
def fetch_add_kernel(TABLE, OUT, N, BLOCK: tl.constexpr):
    """``OUT[i] = *TABLE[i]; *TABLE[i] += 1`` for the int64 step counters the table points to."""
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = i < N
    ptrs = tl.load(TABLE + i, mask=m, other=0).to(tl.pointer_type(tl.int64))
    old = tl.load(ptrs, mask=m, other=0)
    tl.store(OUT + i, old, mask=m)
    tl.store(ptrs, old + 1, mask=m)
