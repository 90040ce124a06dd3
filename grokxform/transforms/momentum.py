"""Momentum: the trace of the updates, ``t = decay·t + g`` (heavy ball, or Nesterov's)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from grokxform import _common as C
from grokxform.base import GradientTransformation, Params, Scalar, elementwise, static_hyperparams
from grokxform.declarations import ScalarContext
from grokxform.elements import Inputs, Outputs


class TraceState(NamedTuple):
    """``trace``: per-leaf momentum t (zeros before the first step)."""

    trace: Any


@static_hyperparams("nesterov")
def trace(decay: Scalar = 0.9, nesterov: bool = False, *, state_dtype: torch.dtype | None = None) -> GradientTransformation:
    """Momentum, as optax's ``trace``: ``t_k = decay·t_{k−1} + g_k`` with ``t_0 = 0``; the output
    is ``t_k``, or ``g_k + decay·t_k`` with ``nesterov=True``.

    This is ``torch.optim.SGD``'s momentum buffer with ``dampening=0``: torch seeds the buffer with
    the first gradient (``b_1 = g_1``), which is the trace's ``t_1 = decay·0 + g_1`` (a zero
    gradient element differs only in the sign of the zero it stores: torch keeps −0, the trace +0).
    With dampening (``b ← μ·b + (1−τ)·g`` after a first step ``b_1 = g_1``) the two would differ;
    the trace has none. Each element computes ``t·decay`` then adds g, as torch's
    ``buf.mul_(μ).add_(g)`` does. A leaf with a ``None`` gradient keeps its trace.
    State: :class:`TraceState`; the trace in ``state_dtype`` (default: the param's dtype, float32
    for 16-bit params). Defaults: ``decay=0.9``, ``nesterov=False``.

    Examples:
        >>> tx = gx.trace(decay=0.5)
        >>> state = tx.init({"w": torch.zeros(1)})
        >>> u, state = tx.update({"w": torch.tensor([2.0])}, state)      # t_1 = g_1
        >>> u, state = tx.update({"w": torch.tensor([1.0])}, state)      # t_2 = 0.5·2 + 1
        >>> u["w"], state.trace["w"]
        (tensor([2.]), tensor([2.]))
        >>> sgd_momentum = gx.chain(gx.trace(0.9, nesterov=True), gx.scale_by_learning_rate(0.1))
    """
    C.check_scalar("trace", "decay", decay, low=0.0)
    C.check_bool("trace", "nesterov", nesterov)

    def init_fn(params: Params) -> TraceState:
        return TraceState(trace=C.zeros_like_tree(params, state_dtype))

    def scalars(ctx: ScalarContext) -> tuple[dict[str, Any], dict[str, Any]]:
        return {"decay": decay}, {}

    return elementwise(
        "trace", _nesterov if nesterov else _heavy_ball, init=init_fn, scalars=scalars, state_type=TraceState,
        fields=("trace",),
    )


def _heavy_ball(v: Inputs, sc: Inputs) -> Outputs:
    """t = t·decay + g in the trace's dtype; the output is t in the gradient's dtype."""
    t = v.trace * sc.decay + v.x.to(v.trace.dtype)
    return {"out": t.to(v.x.dtype), "trace": t}


def _nesterov(v: Inputs, sc: Inputs) -> Outputs:
    """t = t·decay + g; the output is g + t·decay."""
    g = v.x.to(v.trace.dtype)
    t = v.trace * sc.decay + g
    return {"out": (g + t * sc.decay).to(v.x.dtype), "trace": t}
