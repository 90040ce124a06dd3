"""Muon's pieces (Jordan et al. 2024; Liu et al. 2025, "Muon is Scalable for LLM Training"):
its momentum, as ``torch.optim.Muon`` writes it, and the Newton–Schulz orthogonalization of each
matrix's update."""

from __future__ import annotations

import math
from typing import Any, Literal, NamedTuple

import torch

from grokxform import _common as C
from grokxform.base import GradientTransformation, Params, Scalar, elementwise, leafwise, static_hyperparams
from grokxform.declarations import ScalarContext
from grokxform.elements import Inputs, Outputs, where

AdjustLR = Literal["original", "match_rms_adamw"] | None

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
"""Keller Jordan's quintic Newton–Schulz coefficients (a, b, c), ``torch.optim.Muon``'s default."""


class MuonMomentumState(NamedTuple):
    """``momentum_buffer``: per-leaf buffer b (zeros before the first step)."""

    momentum_buffer: Any


@static_hyperparams("nesterov")
def muon_momentum(
    momentum: Scalar = 0.95, nesterov: bool = True, *, state_dtype: torch.dtype | None = None
) -> GradientTransformation:
    """Muon's momentum, as ``torch.optim.Muon`` computes it: ``b ← lerp(b, g, 1−μ) = μ·b + (1−μ)·g``
    (``b_0 = 0``); the output is ``lerp(g, b, μ) = (1−μ)·g + μ·b`` with ``nesterov=True``, else b.

    This is the exponential-average form of torch's code (``buf.lerp_(grad, 1 − μ)``), not the
    heavy-ball trace ``b ← μ·b + g`` that its documentation and Jordan's post write
    (:func:`~grokxform.trace`): the two differ by the factor 1−μ, which the orthogonalization that
    follows removes, but not in every use. Each lerp is torch's scalar formula
    ``s + w·(e − s)`` for ``|w| < 0.5``, else ``e − (e − s)·(1 − w)``, rounded after each op (torch's
    vectorised CPU loop fuses its multiply-add, so float32 can differ from torch's by an ulp).
    A leaf with a ``None`` gradient keeps its buffer. State: :class:`MuonMomentumState`; the buffer
    in ``state_dtype`` (default: the param's dtype, float32 for 16-bit params; torch keeps it in
    the gradient's dtype). Defaults are torch's: ``momentum=0.95``, ``nesterov=True``.

    Examples:
        >>> tx = gx.muon_momentum(momentum=0.5, nesterov=False)
        >>> state = tx.init({"w": torch.zeros(1)})
        >>> u, state = tx.update({"w": torch.tensor([2.0])}, state)      # b_1 = 0.5·0 + 0.5·2
        >>> u, state = tx.update({"w": torch.tensor([1.0])}, state)      # b_2 = 0.5·1 + 0.5·1
        >>> u["w"], state.momentum_buffer["w"]
        (tensor([1.]), tensor([1.]))
    """
    C.check_scalar("muon_momentum", "momentum", momentum, low=0.0, high=1.0)
    C.check_bool("muon_momentum", "nesterov", nesterov)

    def init_fn(params: Params) -> MuonMomentumState:
        return MuonMomentumState(momentum_buffer=C.zeros_like_tree(params, state_dtype))

    def scalars(ctx: ScalarContext) -> tuple[dict[str, Any], dict[str, Any]]:
        w = 1.0 - momentum  # the buffer's lerp weight
        return {
            "w": w, "one_minus_w": 1.0 - w, "w_small": _small(w, ctx.device),
            "mu": momentum, "one_minus_mu": 1.0 - momentum, "mu_small": _small(momentum, ctx.device),
        }, {}

    return elementwise(
        "muon_momentum", _nesterov if nesterov else _plain, init=init_fn, scalars=scalars,
        state_type=MuonMomentumState, fields=("momentum_buffer",),
    )


def _small(w: Scalar, device: torch.device) -> torch.Tensor:
    """torch's choice of lerp formula, ``|w| < 0.5``: a 0-d flag of the element rule."""
    if isinstance(w, torch.Tensor):
        return w.abs() < 0.5
    return torch.full((), abs(w) < 0.5, dtype=torch.bool, device=device)  # (filled on the device: capturable)


def _lerp(s: Any, e: Any, w: Any, one_minus_w: Any, small: Any) -> Any:
    """torch's ``lerp(s, e, w)``: ``s + w·(e − s)`` when ``small``, else ``e − (e − s)·(1 − w)``."""
    d = e - s
    return where(small, s + d * w, e - d * one_minus_w)


def _plain(v: Inputs, sc: Inputs) -> Outputs:
    """b = lerp(b, g, 1−μ) in the buffer's dtype; the output is b in the gradient's dtype."""
    b = _lerp(v.momentum_buffer, v.x.to(v.momentum_buffer.dtype), sc.w, sc.one_minus_w, sc.w_small)
    return {"out": b.to(v.x.dtype), "momentum_buffer": b}


def _nesterov(v: Inputs, sc: Inputs) -> Outputs:
    """b = lerp(b, g, 1−μ); the output is lerp(g, b, μ)."""
    g = v.x.to(v.momentum_buffer.dtype)
    b = _lerp(v.momentum_buffer, g, sc.w, sc.one_minus_w, sc.w_small)
    out = _lerp(g, b, sc.mu, sc.one_minus_mu, sc.mu_small)
    return {"out": out.to(v.x.dtype), "momentum_buffer": b}


def _ratio(adjust_lr_fn: AdjustLR, rows: int, cols: int) -> float:
    """torch's ``_adjust_lr`` factor: √max(1, rows/cols) ("original"), or 0.2·√max(rows, cols)."""
    if adjust_lr_fn == "match_rms_adamw":
        return 0.2 * math.sqrt(max(rows, cols))
    return math.sqrt(max(1, rows / cols)) if cols else 1.0


@static_hyperparams("ns_steps", "coefficients", "eps", "adjust_lr_fn", "ns_dtype")
def orthogonalize(
    ns_steps: int = 5,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    *,
    adjust_lr_fn: AdjustLR = None,
    ns_dtype: torch.dtype | None = torch.bfloat16,
) -> GradientTransformation:
    """Muon's orthogonalization: each matrix's update ``G`` becomes ``r·NS(G)``, where ``NS`` is
    ``torch.optim.Muon``'s quintic Newton–Schulz iteration, step for step:

    ``X = G`` in ``ns_dtype`` (default bfloat16, as torch), transposed when it has more rows than
    columns; ``X ← X / max(‖X‖_F, eps)``; then ``ns_steps`` times ``A = X·Xᵀ``,
    ``X ← a·X + (b·A + c·A²)·X`` (torch's two ``addmm``); transposed back and cast to the update's
    dtype. ``r`` is torch's learning-rate adjustment by the shape (rows × cols):
    ``adjust_lr_fn=None`` or ``"original"`` (Jordan): ``√max(1, rows/cols)``;
    ``"match_rms_adamw"`` (Moonshot: the update's RMS of AdamW's, so AdamW's lr and weight decay
    carry over): ``0.2·√max(rows, cols)``. NS(G) ≈ U·S'·Vᵀ with S' roughly in (0.5, 1.5) (Jordan) for
    G = U·S·Vᵀ: the coefficients trade exactness for speed.

    Only matrices (``ndim == 2``) are orthogonalized; leaves of any other ndim (biases, gains,
    scalars, convolution kernels) pass through unchanged, and ``None`` stays ``None``. Leaves of
    one shape and dtype are stacked and iterated together (one batched Newton–Schulz per shape,
    ``torch.baddbmm``): for each leaf the same numbers as torch's iteration on it alone. Works under
    ``torch.func.vmap``: each member's numbers, up to the rounding of a bfloat16 element where the
    batched product sums its float32 terms in another order (bit for bit for small matrices; at
    64×64 about a quarter of the elements differ by a bfloat16 ulp; ``ns_dtype=torch.float32``
    for members that match to float32 rounding). ``ns_dtype=None`` iterates in the update's own dtype (torch always uses
    bfloat16; float32 or float64 for a reference). Stateless; defaults are torch's.

    A whole-leaf stage (:func:`grokxform.base.leafwise`: matrix products are not element
    operations): the engine runs it inside any declared chain, wherever it sits (a chain, a
    ``partition``, ``masked``, ``inject_hyperparams``, ``MultiSteps``): the kernels of the members
    before it write its input into buffers the engine keeps, one ``[n, rows, cols]`` stack per
    shape, the iteration runs on them with torch's ops, and the kernels of the members after it
    read the result (``gx.Optimizer(params, gx.muon(...)).engines``: ``["c"]`` on the CPU; a CUDA
    step is captured in a CUDA graph whole). DTensor (sharded) leaves raise ``TypeError`` (the
    engine refuses them): each matrix would have to be gathered whole.

    Examples:
        >>> tx = gx.orthogonalize(ns_dtype=torch.float64)
        >>> g = {"W": torch.tensor([[3.0, 0.0], [0.0, 0.5]], dtype=torch.float64), "b": torch.ones(2)}
        >>> u, _ = tx.update(g, tx.init(g))
        >>> u["W"].diagonal().round(decimals=2)     # singular values 3 and 0.5 → near 1
        tensor([0.7100, 1.0400], dtype=torch.float64)
        >>> u["b"]                                   # not a matrix: unchanged
        tensor([1., 1.])
    """
    C.check_int("orthogonalize", "ns_steps", ns_steps, low=0)
    if ns_steps >= 100:
        raise ValueError(f"orthogonalize: ns_steps must be below 100 (as torch.optim.Muon), got {ns_steps}")
    if not isinstance(coefficients, (tuple, list)) or len(coefficients) != 3 or not all(
        C.is_number(c) for c in coefficients
    ):
        raise ValueError(f"orthogonalize: coefficients must be three numbers (a, b, c), got {coefficients!r}")
    C.check_scalar("orthogonalize", "eps", eps, low=0.0)
    if adjust_lr_fn not in (None, "original", "match_rms_adamw"):
        raise ValueError(
            f"orthogonalize: adjust_lr_fn must be None, 'original' or 'match_rms_adamw', got {adjust_lr_fn!r}"
        )
    if ns_dtype is not None and (not isinstance(ns_dtype, torch.dtype) or not ns_dtype.is_floating_point):
        raise TypeError(f"orthogonalize: ns_dtype must be a floating-point torch.dtype or None, got {ns_dtype!r}")
    a, b, c = (float(x) for x in coefficients)

    def newton_schulz(x: torch.Tensor) -> torch.Tensor:
        """r·NS of each matrix of the stack ``x`` ([n, rows, cols]), in ``x``'s dtype."""
        # contiguous, as the gradients (a tall matrix's result is a transposed view)
        ortho = _newton_schulz(x.to(ns_dtype or x.dtype), a, b, c, ns_steps, eps).to(x.dtype).contiguous()
        ratio = _ratio(adjust_lr_fn, *x.shape[-2:])
        return ortho * ratio if ratio != 1.0 else ortho

    return leafwise("orthogonalize", newton_schulz, select=_is_matrix)


def _is_matrix(leaf: torch.Tensor) -> bool:
    return leaf.ndim == 2


def _newton_schulz(x: torch.Tensor, a: float, b: float, c: float, steps: int, eps: float) -> torch.Tensor:
    """torch's ``_zeropower_via_newtonschulz`` on a stack of matrices ``[n, rows, cols]``.

    Under ``torch.func.vmap`` a 16-bit ``baddbmm`` is taken apart into a product and a sum, each
    rounded to 16 bits; there each ``baddbmm`` runs on float32 copies of its 16-bit operands and
    is rounded once, as torch's 16-bit ``addmm`` accumulates in float32 and rounds once."""
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = x.mT
    x = x / torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True).clamp(min=eps)
    wide = x.dtype in (torch.bfloat16, torch.float16) and torch._C._functorch.is_batchedtensor(x)
    for _ in range(steps):
        gram = x @ x.mT
        if wide:
            g32 = gram.float()
            poly = torch.baddbmm(g32, g32, g32, beta=b, alpha=c).to(x.dtype).float()
            x32 = x.float()
            x = torch.baddbmm(x32, poly, x32, beta=a).to(x.dtype)
        else:
            poly = torch.baddbmm(gram, gram, gram, beta=b, alpha=c)
            x = torch.baddbmm(x, poly, x, beta=a)
    return x.mT if tall else x
