"""The learning rate, ``u = −η_t·u``, and schedules of the step written as tensor maths.

A schedule is a function of the 0-d int64 step count t (0 at the first update) that returns a
0-d tensor; being tensor maths, a compiled step does not recompile as η_t changes.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Union

import torch

from grokxform import _common as C
from grokxform import tree as _tree
from grokxform.base import EmptyState, GradientTransformation, Params, Scalar, Schedule, elementwise
from grokxform.declarations import ScalarContext
from grokxform.elements import Inputs, Outputs


class ScaleByScheduleState(NamedTuple):
    """``count``: updates done (0-d int64), the argument of the schedule."""

    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count


def scale_by_learning_rate(
    learning_rate: Union[Scalar, Schedule], *, flip_sign: bool = True
) -> GradientTransformation:
    """``u = −η_t·u`` (``+η_t·u`` with ``flip_sign=False``).

    ``learning_rate`` is a number, a 0-d tensor, or a schedule ``η(t)`` of the step count t = 0, 1,
    ... (state :class:`ScaleByScheduleState`; stateless otherwise). For a learning rate that a
    trainer changes between steps, or one per member of a vmapped ensemble, wrap the pipeline in
    :func:`grokxform.inject_hyperparams`.

    Examples:
        >>> tx = gx.scale_by_learning_rate(gx.linear_warmup(1.0, 2))
        >>> state = tx.init({"w": torch.zeros(1)})
        >>> for _ in range(3):
        ...     u, state = tx.update({"w": torch.ones(1)}, state)
        ...     print(u["w"])
        tensor([-0.])
        tensor([-0.5000])
        tensor([-1.])
    """
    is_schedule = callable(learning_rate) and not isinstance(learning_rate, torch.Tensor)
    if not is_schedule:
        C.check_scalar("scale_by_learning_rate", "learning_rate", learning_rate, low=0.0)
    sign = -1.0 if flip_sign else 1.0

    def init_fn(params: Params) -> ScaleByScheduleState | EmptyState:
        return ScaleByScheduleState(C.counter(_tree.first_device(params))) if is_schedule else EmptyState()

    def scalars(ctx: ScalarContext) -> tuple[dict[str, Any], dict[str, Any]]:
        if is_schedule:
            count = ctx.state.count
            return {"factor": sign * learning_rate(count)}, {"count": count + 1}  # type: ignore[operator]
        return {"factor": sign * learning_rate}, {}  # type: ignore[operator]

    return elementwise(
        "scale_by_learning_rate", _scale, init=init_fn, scalars=scalars,
        state_type=ScaleByScheduleState if is_schedule else None,
    )


def _scale(v: Inputs, sc: Inputs) -> Outputs:
    """u·(∓η_t)."""
    return {"out": v.x * sc.factor}


def constant_schedule(value: float) -> Schedule:
    """η(t) = value.

    Examples:
        >>> gx.constant_schedule(0.1)(torch.tensor(7))
        tensor(0.1000, dtype=torch.float64)
    """
    C.check_scalar("constant_schedule", "value", value, low=0.0)

    def schedule(count: torch.Tensor) -> torch.Tensor:
        return torch.full((), float(value), dtype=torch.float64, device=count.device)

    return schedule


def linear_warmup(peak: float, warmup_steps: int) -> Schedule:
    """η(t) = peak·min(1, t / warmup_steps): the Grokfast paper's ``LambdaLR(min(1, t/10))``
    (t = 0 gives 0).

    Examples:
        >>> lr = gx.linear_warmup(1e-3, warmup_steps=10)
        >>> [float(lr(torch.tensor(t))) for t in (0, 5, 10, 20)]
        [0.0, 0.0005, 0.001, 0.001]
    """
    C.check_scalar("linear_warmup", "peak", peak, low=0.0)
    warmup_steps = C.check_int("linear_warmup", "warmup_steps", warmup_steps, low=1)

    def schedule(count: torch.Tensor) -> torch.Tensor:
        return float(peak) * torch.clamp(count.to(torch.float64) / warmup_steps, max=1.0)

    return schedule


def warmup_cosine_decay(peak: float, warmup_steps: int, decay_steps: int, end: float = 0.0) -> Schedule:
    """Linear warm-up to ``peak`` over ``warmup_steps``, then cosine decay to ``end`` at
    ``decay_steps`` (total), constant after: η(t) = end + (peak−end)·(1+cos(π·p))/2.

    Examples:
        >>> lr = gx.warmup_cosine_decay(1.0, warmup_steps=2, decay_steps=4)
        >>> [round(float(lr(torch.tensor(t))), 2) for t in range(6)]
        [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
    """
    C.check_scalar("warmup_cosine_decay", "peak", peak, low=0.0)
    C.check_scalar("warmup_cosine_decay", "end", end, low=0.0)
    warmup_steps = C.check_int("warmup_cosine_decay", "warmup_steps", warmup_steps, low=0)
    decay_steps = C.check_int("warmup_cosine_decay", "decay_steps", decay_steps, low=1)
    if not warmup_steps < decay_steps:
        raise ValueError(
            f"warmup_cosine_decay: need ints 0 <= warmup_steps < decay_steps, got {warmup_steps!r}, {decay_steps!r}"
        )

    def schedule(count: torch.Tensor) -> torch.Tensor:
        t = count.to(torch.float64)
        warm = float(peak) * t / max(warmup_steps, 1)
        frac = torch.clamp((t - warmup_steps) / (decay_steps - warmup_steps), min=0.0, max=1.0)
        cos = end + (peak - end) * 0.5 * (1.0 + torch.cos(math.pi * frac))
        return torch.where(t < warmup_steps, warm, cos)

    return schedule
