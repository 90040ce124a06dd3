"""⊥Grad: the gradient's component along the weights removed, its norm kept (Prieto et al. 2025,
arXiv:2501.04697)."""

from __future__ import annotations

from typing import Any

import torch

from grokxform import _common as C
from grokxform.base import GradientTransformation, Scalar, elementwise
from grokxform.declarations import ScalarContext
from grokxform.elements import Inputs, Outputs

PARALLEL = 4.0 * torch.finfo(torch.float32).eps
"""‖g⊥‖ at or below this share of ‖g‖: the gradient counts as parallel to θ, and its update is 0."""
RESOLVED = 64.0
"""‖g⊥‖² at or below this many ulps (of the sums' dtype) of ‖g‖² is within the sums' rounding:
the gradient counts as parallel to θ."""


def orthograd(eps: Scalar = 1e-30) -> GradientTransformation:
    """⊥Grad ("Grokking at the Edge of Numerical Stability", Prieto et al. 2025): per leaf, the
    update's component along the weights removed and its norm restored,

    ``c = ⟨θ, g⟩ / (⟨θ, θ⟩ + ε)``, ``g⊥ = g − c·θ``, ``u = g⊥ · ‖g‖ / (‖g⊥‖ + ε)``,

    as ``pytorch_optimizer.OrthoGrad`` (4.1.0; ε = 1e-30 there) projects the gradients before its
    base optimizer steps: place it first in a chain (``gx.chain(gx.orthograd(), gx.sgd(lr))`` is
    ``OrthoGrad(params, torch.optim.SGD, lr=lr)``). Like it, a leaf whose ‖g⊥‖ is at most
    ``4·ε_float32·‖g‖`` (a gradient parallel to θ: a 0-d leaf, or g = 0) gets a zero update, and
    the arithmetic is in float32 (float64 for float64 leaves), the update rounded to the gradient's
    dtype.

    The three sums ⟨θ, g⟩, ⟨θ, θ⟩ and ⟨g, g⟩ are taken in one pass over the leaf, and
    ``‖g⊥‖² = ⟨g, g⟩ − 2c·⟨θ, g⟩ + c²·⟨θ, θ⟩`` (clamped at 0) follows from them in the scalar rule:
    no second pass over g⊥. That difference cancels when g is nearly parallel to θ, so the gradient
    also counts as parallel where ‖g⊥‖² is within the sums' rounding, ``‖g⊥‖² ≤ 64·ε_s·‖g‖²``
    (ε_s the machine epsilon of the sums' dtype). The sums are of float64 values (the products of
    float32 values are exact), summed in float64 on every path, so this bound (‖g⊥‖ ≤ 1.2e-7·‖g‖)
    lies below the reference's, which then decides. For float64 leaves the threshold is ``4·ε_float32·‖g‖`` (the
    reference's ``4·ε_float64`` is below the algebraic ‖g⊥‖'s rounding). Away from parallel the
    update is the reference's to a few float32 ulps (ours is within 3 of the projection computed
    in float64; the reference's float32 sums put it farther) and to 1e-12 in float64. Stateless;
    needs ``params``.

    Examples:
        >>> tx = gx.orthograd()
        >>> params = {"w": torch.tensor([1.0, 0.0])}
        >>> u, _ = tx.update({"w": torch.tensor([3.0, 4.0])}, tx.init(params), params)
        >>> u["w"]                            # (0, 4) rescaled to ‖g‖ = 5
        tensor([0., 5.])
    """
    C.check_scalar("orthograd", "eps", eps, low=0.0)

    def scalars(ctx: ScalarContext) -> tuple[dict[str, Any], dict[str, Any]]:
        ww, wg, gg = ctx.reduced["ww"], ctx.reduced["wg"], ctx.reduced["gg"]
        c = wg / (ww + eps)
        ortho2 = (gg - 2.0 * c * wg + c * c * ww).clamp_min(0.0)
        parallel = ortho2 <= max(PARALLEL**2, RESOLVED * torch.finfo(gg.dtype).eps) * gg
        scale = torch.where(parallel, 0.0, gg.sqrt() / (ortho2.sqrt() + eps))
        return {"c": c, "scale": scale}, {}

    return elementwise("orthograd", _orthograd, scalars=scalars, sums=_sums, needs_params=True)


def _sums(v: Inputs, sc: Inputs) -> Outputs:
    """⟨θ, θ⟩, ⟨θ, g⟩, ⟨g, g⟩ in float64."""
    g, w = v.x.to(torch.float64), v.param.to(torch.float64)
    return {"ww": w * w, "wg": w * g, "gg": g * g}


def _orthograd(v: Inputs, sc: Inputs) -> Outputs:
    """(g − c·θ)·scale in float32 (float64 for float64 gradients)."""
    wide = torch.float64 if v.x.dtype == torch.float64 else torch.float32
    g, w = v.x.to(wide), v.param.to(wide)
    return {"out": ((g - w * sc.c) * sc.scale).to(v.x.dtype)}
