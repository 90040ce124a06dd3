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

    The three sums ⟨θ, g⟩, ⟨θ, θ⟩ and ⟨g, g⟩ are taken in one pass over the leaf (in float64, so the
    products of float32 values are exact), and ``‖g⊥‖² = ⟨g, g⟩ − 2c·⟨θ, g⟩ + c²·⟨θ, θ⟩`` (clamped
    at 0) follows from them in the scalar rule: no second pass over g⊥. It cancels when g is nearly
    parallel to θ: its error is about 1e-16·‖g‖², ~1e-8·‖g‖ on ‖g⊥‖. For float32 and 16-bit leaves
    that lies below the parallel threshold, as the reference decides it; for float64 leaves the
    threshold stays ``4·ε_float32·‖g‖`` (the reference uses ``4·ε_float64``), so a float64 gradient
    within 5e-7 (relative) of parallel to θ gets a zero update. Away from parallel the update is
    the reference's to a few ulps (float32) and 1e-12 (float64). Stateless; needs ``params``.

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
        ortho = (gg - 2.0 * c * wg + c * c * ww).clamp_min(0.0).sqrt()
        norm = gg.sqrt()
        scale = torch.where(ortho <= PARALLEL * norm, 0.0, norm / (ortho + eps))
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
