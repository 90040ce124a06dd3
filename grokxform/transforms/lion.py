"""Lion's direction: the sign of an interpolated momentum (Chen et al. 2023, arXiv:2302.06675)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from grokxform import _common as C
from grokxform.base import GradientTransformation, Params, Scalar, elementwise
from grokxform.declarations import ScalarContext
from grokxform.elements import Inputs, Outputs, sign


class ScaleByLionState(NamedTuple):
    """``mu``: per-leaf momentum m (zeros before the first step)."""

    mu: Any


def scale_by_lion(b1: Scalar = 0.9, b2: Scalar = 0.99, *, state_dtype: torch.dtype | None = None) -> GradientTransformation:
    """Lion's update direction (no learning rate, no sign flip), from the paper's pseudo-code
    ("Symbolic Discovery of Optimization Algorithms", Chen et al. 2023):

    ``c = β1·m + (1−β1)·g``, ``u = sign(c)``, ``m ← β2·m + (1−β2)·g``.

    The output is −1, 0 or +1 per element (0 where c is ±0 or NaN, as ``torch.sign``), in the
    gradient's dtype. A leaf with a ``None`` gradient keeps its m. State:
    :class:`ScaleByLionState`; m in ``state_dtype`` (default: the param's dtype, float32 for 16-bit
    params). Defaults are the paper's: ``b1=0.9``, ``b2=0.99``.

    Examples:
        >>> tx = gx.scale_by_lion(b1=0.9, b2=0.99)
        >>> state = tx.init({"w": torch.zeros(3)})
        >>> u, state = tx.update({"w": torch.tensor([0.5, -2.0, 0.0])}, state)
        >>> u["w"]                              # sign(0.9·0 + 0.1·g)
        tensor([ 1., -1.,  0.])
        >>> state.mu["w"]                       # m = 0.99·0 + 0.01·g
        tensor([ 0.0050, -0.0200,  0.0000])
    """
    C.check_scalar("scale_by_lion", "b1", b1, low=0.0, high=1.0, high_open=True)
    C.check_scalar("scale_by_lion", "b2", b2, low=0.0, high=1.0, high_open=True)

    def init_fn(params: Params) -> ScaleByLionState:
        return ScaleByLionState(mu=C.zeros_like_tree(params, state_dtype))

    def scalars(ctx: ScalarContext) -> tuple[dict[str, Any], dict[str, Any]]:
        return {"b1": b1, "one_minus_b1": 1.0 - b1, "b2": b2, "one_minus_b2": 1.0 - b2}, {}

    return elementwise(
        "scale_by_lion", _lion, init=init_fn, scalars=scalars, state_type=ScaleByLionState, fields=("mu",),
    )


def _lion(v: Inputs, sc: Inputs) -> Outputs:
    """u = sign(β1·m + (1−β1)·g), m ← β2·m + (1−β2)·g, in m's dtype."""
    g = v.x.to(v.mu.dtype)
    c = v.mu * sc.b1 + g * sc.one_minus_b1
    mu = v.mu * sc.b2 + g * sc.one_minus_b2
    return {"out": sign(c).to(v.x.dtype), "mu": mu}
