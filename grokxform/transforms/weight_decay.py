"""Weight decay as a transform: ``u = u + wd·θ``."""

from __future__ import annotations

from typing import Any


from grokxform import _common as C
from grokxform import tree as _tree
from grokxform.base import EmptyState, GradientTransformation, Params, Scalar, Updates
from grokxform.transforms.masks import Mask, mask_selector

def decoupled_weight_decay(weight_decay: Scalar = 1e-2, *, mask: Mask = None) -> GradientTransformation:
    """``u = u + wd·θ`` on the leaves selected by ``mask``; the others pass unchanged. Stateless.

    Placed after :func:`scale_by_adam` and before the learning rate, this is AdamW's decoupled
    decay, ``θ ← θ − η·(adam + wd·θ)``; placed before Adam it is coupled L2 (``torch.optim.Adam``'s
    ``weight_decay``: ĝ = g + wd·θ), as the Grokfast paper ran it. Needs ``params``.

    Example::

        no_norms = lambda path, p: p.ndim >= 2          # decay matrices only
        tx = chain(scale_by_adam(), decoupled_weight_decay(0.01, mask=no_norms), scale_by_learning_rate(1e-3))
    """
    C.check_scalar("decoupled_weight_decay", "weight_decay", weight_decay, low=0.0)
    selection = mask_selector(mask, "decoupled_weight_decay")

    def init_fn(params: Params) -> EmptyState:
        selection(params)
        return EmptyState()

    def update_fn(
        updates: Updates, state: EmptyState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, EmptyState]:
        del extra
        if params is None:
            raise ValueError("decoupled_weight_decay: update needs params (pass params=...)")
        spec = _tree.check_structure(updates, params, "params", "gradient")
        C.check_gradients(updates, "decoupled_weight_decay", params, like_name="param")
        selected = selection(params)
        u_leaves, _ = _tree.flatten(updates)
        p_leaves, _ = _tree.flatten(params)
        out = [
            u if u is None or not sel else u + p.to(u.dtype) * C.scalar_for(weight_decay, u)
            for u, p, sel in zip(u_leaves, p_leaves, selected)
        ]
        return _tree.unflatten(out, spec), state

    return GradientTransformation(init_fn, update_fn)
