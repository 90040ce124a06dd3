"""Weight decay as a transform: ``u = u + wd·θ``."""

from __future__ import annotations

from typing import Any


from grokxform import _common as C
from grokxform.base import EmptyState, GradientTransformation, Params, Scalar, elementwise, static_hyperparams
from grokxform.declarations import ScalarContext
from grokxform.elements import Inputs, Outputs
from grokxform.transforms.masks import Mask, mask_selector


@static_hyperparams("mask")
def decoupled_weight_decay(weight_decay: Scalar = 1e-2, *, mask: Mask = None) -> GradientTransformation:
    """``u = u + wd·θ`` on the leaves selected by ``mask``; the others pass unchanged. Stateless.

    Placed after :func:`scale_by_adam` and before the learning rate, this is AdamW's decoupled
    decay, ``θ ← θ − η·(adam + wd·θ)``; placed before Adam it is coupled L2 (``torch.optim.Adam``'s
    ``weight_decay``: ĝ = g + wd·θ), as the Grokfast paper ran it. Needs ``params``.

    Examples:
        >>> matrices = lambda path, p: p.ndim >= 2            # decay matrices only
        >>> tx = gx.decoupled_weight_decay(0.5, mask=matrices)
        >>> params = {"W": torch.ones(1, 1), "b": torch.ones(1)}
        >>> u, _ = tx.update({"W": torch.zeros(1, 1), "b": torch.zeros(1)}, tx.init(params), params)
        >>> u["W"], u["b"]                                     # u + wd·θ on W only
        (tensor([[0.5000]]), tensor([0.]))
    """
    C.check_scalar("decoupled_weight_decay", "weight_decay", weight_decay, low=0.0)
    selection = mask_selector(mask, "decoupled_weight_decay")

    def init_fn(params: Params) -> EmptyState:
        selection(params)
        return EmptyState()

    def scalars(ctx: ScalarContext) -> tuple[dict[str, Any], dict[str, Any]]:
        return {"wd": weight_decay}, {}

    return elementwise(
        "decoupled_weight_decay", _decay, init=init_fn, scalars=scalars, needs_params=True, select=selection
    )


def _decay(v: Inputs, sc: Inputs) -> Outputs:
    """u + wd·θ in the update's dtype."""
    return {"out": v.x + v.param.to(v.x.dtype) * sc.wd}
