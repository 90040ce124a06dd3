"""Gradient centralization (Yong et al. 2020, arXiv:2004.01461): each row of a matrix gradient
made zero-mean."""

from __future__ import annotations

from typing import Any

import torch

from grokxform import _common as C
from grokxform import tree as _tree
from grokxform.base import EmptyState, GradientTransformation, Params, Updates


def centralize() -> GradientTransformation:
    """Gradient centralization, as optax's ``centralize``: each leaf with two or more dimensions
    minus its mean over all dimensions but the first (one mean per output row, or per output
    channel of a convolution), ``u = g − mean_{1..n−1}(g)``; vectors and scalars pass unchanged.

    The mean and the difference are computed in float32 (float64 for float64 gradients) and
    rounded to the gradient's dtype. A per-row mean is no per-leaf sum, so this primitive is
    not one of the engine's: in ``gx.Optimizer`` and ``compile_step`` the rest of a chain still
    runs as kernels, this member by its own ``update`` between them (``opt.engines == ["c+tx.update+c"]``
    on the CPU, or ``"tx.update+c"`` when it comes first). Stateless.

    Examples:
        >>> tx = gx.centralize()
        >>> grads = {"W": torch.tensor([[1.0, 3.0], [0.0, 4.0]]), "b": torch.tensor([1.0, 2.0])}
        >>> u, _ = tx.update(grads, tx.init(grads))
        >>> u["W"], u["b"]                     # rows minus their means; the vector as it was
        (tensor([[-1.,  1.],
                [-2.,  2.]]), tensor([1., 2.]))
    """

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update(updates: Updates, state: Any, params: Params | None = None, **extra: Any) -> tuple[Updates, Any]:
        del params, extra
        C.check_gradients(updates, "centralize")
        return _tree.tree_map(_centralize, updates), state

    return GradientTransformation(init, update)


def _centralize(g: torch.Tensor | None) -> torch.Tensor | None:
    if g is None or g.dim() < 2:
        return g
    wide = g.to(torch.float64 if g.dtype == torch.float64 else torch.float32)
    return (wide - wide.mean(dim=tuple(range(1, g.dim())), keepdim=True)).to(g.dtype)
