"""The layer-wise trust ratio of LARS and LAMB: each leaf's update scaled by ‖θ‖ / ‖u‖."""

from __future__ import annotations

from typing import Any

import torch

from grokxform import _common as C
from grokxform.base import GradientTransformation, Scalar, elementwise
from grokxform.declarations import ScalarContext
from grokxform.elements import Inputs, Outputs


def scale_by_trust_ratio(min_norm: Scalar = 0.0, trust_coefficient: Scalar = 1.0,
                         eps: Scalar = 0.0) -> GradientTransformation:
    """The trust ratio of LAMB (You et al. 2020, arXiv:1904.00962), as optax's
    ``scale_by_trust_ratio``: per leaf,

    ``r = κ·max(‖θ‖, m) / (max(‖u‖, m) + ε)``, ``u ← r·u``, with ``r = 1`` where either of
    ``max(‖θ‖, m)`` and ``max(‖u‖, m)`` is 0 (a leaf of zeros, or a zero update, with ``m = 0``),

    ``m`` the ``min_norm``, ``κ`` the ``trust_coefficient``. The norms are summed in float32 (float64
    for float64 leaves) in one pass over the leaf; ``r·u`` is computed in float32 (float64) and
    rounded to the update's dtype. Stateless; needs ``params``. Defaults are optax's: ``min_norm=0``,
    ``trust_coefficient=1``, ``eps=0``.

    Examples:
        >>> tx = gx.scale_by_trust_ratio()
        >>> params = {"w": torch.tensor([3.0, 4.0]), "b": torch.zeros(2)}
        >>> grads = {"w": torch.tensor([0.0, 0.5]), "b": torch.tensor([1.0, 1.0])}
        >>> u, _ = tx.update(grads, tx.init(params), params)
        >>> u["w"], u["b"]                   # ‖θ‖/‖u‖ = 10 for w; 1 for b (‖θ‖ = 0)
        (tensor([0., 5.]), tensor([1., 1.]))
    """
    C.check_scalar("scale_by_trust_ratio", "min_norm", min_norm, low=0.0)
    C.check_scalar("scale_by_trust_ratio", "trust_coefficient", trust_coefficient, low=0.0)
    C.check_scalar("scale_by_trust_ratio", "eps", eps, low=0.0)

    def scalars(ctx: ScalarContext) -> tuple[dict[str, Any], dict[str, Any]]:
        param_norm = ctx.reduced["pp"].sqrt().clamp_min(min_norm)
        update_norm = ctx.reduced["uu"].sqrt().clamp_min(min_norm)
        ratio = trust_coefficient * param_norm / (update_norm + eps)
        return {"ratio": torch.where((param_norm == 0) | (update_norm == 0), 1.0, ratio)}, {}

    return elementwise("scale_by_trust_ratio", _scale, scalars=scalars, sums=_sums, needs_params=True)


def _sums(v: Inputs, sc: Inputs) -> Outputs:
    """θ² and u², in float32 (float64 for float64 values)."""
    wide = torch.float64 if torch.float64 in (v.x.dtype, v.param.dtype) else torch.float32
    u, w = v.x.to(wide), v.param.to(wide)
    return {"pp": w * w, "uu": u * u}


def _scale(v: Inputs, sc: Inputs) -> Outputs:
    """r·u in float32 (float64 for float64 updates), in the update's dtype."""
    wide = torch.float64 if v.x.dtype == torch.float64 else torch.float32
    return {"out": (v.x.to(wide) * sc.ratio).to(v.x.dtype)}
