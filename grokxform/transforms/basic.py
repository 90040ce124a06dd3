"""Stateless element-by-element basics: a constant factor (``scale``), NaNs to zero (``zero_nans``)."""

from __future__ import annotations

from typing import Any

from grokxform import _common as C
from grokxform.base import GradientTransformation, Scalar, elementwise
from grokxform.declarations import ScalarContext
from grokxform.elements import Inputs, Outputs, isnan, where


def scale(step_size: Scalar) -> GradientTransformation:
    """``u = s·g``, as optax's ``scale``: any finite number or 0-d tensor (a negative one flips
    the sign; :func:`~grokxform.scale_by_learning_rate` is ``scale(−η)`` with schedules). Stateless.

    Examples:
        >>> tx = gx.scale(-0.5)
        >>> u, _ = tx.update({"w": torch.tensor([2.0, -1.0])}, tx.init({"w": torch.zeros(2)}))
        >>> u["w"]
        tensor([-1.0000,  0.5000])
    """
    C.check_scalar("scale", "step_size", step_size)

    def scalars(ctx: ScalarContext) -> tuple[dict[str, Any], dict[str, Any]]:
        return {"step_size": step_size}, {}

    return elementwise("scale", _scale, scalars=scalars)


def _scale(v: Inputs, sc: Inputs) -> Outputs:
    """u = g·s."""
    return {"out": v.x * sc.step_size}


def zero_nans() -> GradientTransformation:
    """Each NaN of the update replaced by +0, other values (±inf included) unchanged, as optax's
    ``zero_nans``. Stateless: optax also keeps a per-leaf flag ``found_nan`` of the last step, which
    would cost a reduction over every gradient; to detect and skip non-finite steps, wrap the
    pipeline in :func:`~grokxform.apply_if_finite` (it counts them).

    Examples:
        >>> tx = gx.zero_nans()
        >>> u, _ = tx.update({"w": torch.tensor([1.0, float("nan"), -float("inf")])}, tx.init({"w": torch.zeros(3)}))
        >>> u["w"]
        tensor([1., 0., -inf])
    """
    return elementwise("zero_nans", _zero_nans)


def _zero_nans(v: Inputs, sc: Inputs) -> Outputs:
    """u = 0 where g is NaN, else g."""
    return {"out": where(isnan(v.x), 0.0, v.x)}
