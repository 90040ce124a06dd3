"""Gradient centralization (Yong et al. 2020, arXiv:2004.01461): each row of a matrix gradient
made zero-mean."""

from __future__ import annotations

import torch

from grokxform.base import GradientTransformation, leafwise


def centralize() -> GradientTransformation:
    """Gradient centralization, as optax's ``centralize``: each leaf with two or more dimensions
    minus its mean over all dimensions but the first (one mean per output row, or per output
    channel of a convolution), ``u = g − mean_{1..n−1}(g)``; vectors and scalars pass unchanged.

    The mean and the difference are computed in float32 (float64 for float64 gradients) and
    rounded to the gradient's dtype. A per-row mean is no element rule: this is a whole-leaf
    stage (:func:`~grokxform.base.leafwise`), which the engine runs between the kernels of the
    members around it, leaves of one shape stacked (``opt.engines == ["c"]`` on the CPU). Stateless.

    Examples:
        >>> tx = gx.centralize()
        >>> grads = {"W": torch.tensor([[1.0, 3.0], [0.0, 4.0]]), "b": torch.tensor([1.0, 2.0])}
        >>> u, _ = tx.update(grads, tx.init(grads))
        >>> u["W"], u["b"]                     # rows minus their means; the vector as it was
        (tensor([[-1.,  1.],
                [-2.,  2.]]), tensor([1., 2.]))
    """
    return leafwise("centralize", _centralize, select=_has_rows)


def _has_rows(leaf: torch.Tensor) -> bool:
    return leaf.dim() >= 2


def _centralize(stacked: torch.Tensor) -> torch.Tensor:
    """Leaves stacked as ``[n, *shape]``: each leaf's rows (its first dimension) minus their means."""
    wide = stacked.to(torch.float64 if stacked.dtype == torch.float64 else torch.float32)
    return (wide - wide.mean(dim=tuple(range(2, stacked.dim())), keepdim=True)).to(stacked.dtype)
