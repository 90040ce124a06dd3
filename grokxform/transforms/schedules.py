"""The learning rate, ``u = −η_t·u``, and schedules of the step written as tensor maths.

A schedule is a function of the 0-d int64 step count t (0 at the first update) that returns a
0-d tensor; being tensor maths, a compiled step does not recompile as η_t changes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
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


def _number(fn: str, name: str, value: Any, **bounds: Any) -> float:
    """``value`` as a float: a Python (or NumPy) number in the range ``bounds`` gives (a schedule is
    built once, from numbers; its value at a step is tensor maths)."""
    if isinstance(value, torch.Tensor) or not C.is_number(value):
        raise TypeError(f"{fn}: {name} must be a number, got {type(value).__name__}")
    C.check_scalar(fn, name, value, **bounds)
    return float(value)


def cosine_decay_schedule(init_value: float, decay_steps: int, alpha: float = 0.0, exponent: float = 1.0) -> Schedule:
    """Cosine decay, as optax's ``cosine_decay_schedule``: with t' = min(t, decay_steps),
    η(t) = init_value·((1−α)·c^exponent + α), c = (1 + cos(π·t'/decay_steps))/2; η = α·init_value
    from ``decay_steps`` on. Defaults: ``alpha=0.0``, ``exponent=1.0``.

    Examples:
        >>> lr = gx.cosine_decay_schedule(1.0, decay_steps=4, alpha=0.1)
        >>> [round(float(lr(torch.tensor(t))), 4) for t in (0, 2, 4, 9)]
        [1.0, 0.55, 0.1, 0.1]
    """
    fn = "cosine_decay_schedule"
    init = _number(fn, "init_value", init_value)
    decay_steps = C.check_int(fn, "decay_steps", decay_steps, low=1)
    a = _number(fn, "alpha", alpha)
    p = _number(fn, "exponent", exponent)

    def schedule(count: torch.Tensor) -> torch.Tensor:
        t = torch.clamp(count.to(torch.float64), max=float(decay_steps))
        cosine = 0.5 * (1.0 + torch.cos(math.pi * t / decay_steps))
        return init * ((1.0 - a) * cosine**p + a)

    return schedule


def exponential_decay(
    init_value: float,
    transition_steps: int,
    decay_rate: float,
    transition_begin: int = 0,
    staircase: bool = False,
    end_value: float | None = None,
) -> Schedule:
    """Exponential decay, as optax's ``exponential_decay``: η(t) = init_value for
    t ≤ transition_begin, else init_value·decay_rate^p with p = (t − transition_begin) /
    transition_steps (⌊p⌋ with ``staircase=True``); with ``end_value``, clipped to it from below
    (``decay_rate < 1``) or above (``decay_rate > 1``). Defaults: ``transition_begin=0``,
    ``staircase=False``, ``end_value=None``.

    optax turns a non-positive ``transition_steps`` or a zero ``decay_rate`` into a constant
    schedule and a negative ``transition_begin`` into 0, logging it; here they raise
    ``ValueError`` (``decay_rate`` must be > 0).

    Examples:
        >>> lr = gx.exponential_decay(1.0, transition_steps=2, decay_rate=0.5, staircase=True)
        >>> [float(lr(torch.tensor(t))) for t in range(5)]
        [1.0, 1.0, 0.5, 0.5, 0.25]
    """
    fn = "exponential_decay"
    init = _number(fn, "init_value", init_value)
    transition_steps = C.check_int(fn, "transition_steps", transition_steps, low=1)
    rate = _number(fn, "decay_rate", decay_rate, low=0.0, low_open=True)
    begin = C.check_int(fn, "transition_begin", transition_begin, low=0)
    C.check_bool(fn, "staircase", staircase)
    end = None if end_value is None else _number(fn, "end_value", end_value)

    def schedule(count: torch.Tensor) -> torch.Tensor:
        since = count - begin
        p = since.to(torch.float64) / transition_steps
        if staircase:
            p = torch.floor(p)
        value = torch.where(since <= 0, init, init * torch.pow(rate, p))
        if end is not None:
            value = torch.clamp(value, min=end) if rate < 1.0 else torch.clamp(value, max=end)
        return value

    return schedule


def piecewise_constant_schedule(init_value: float, boundaries_and_scales: dict[int, float] | None = None) -> Schedule:
    """A constant scaled at steps, as optax's ``piecewise_constant_schedule``: η(t) =
    init_value·∏ s_i over the boundaries b_i ≤ t of ``{b_i: s_i}`` (scales ≥ 0).

    Examples:
        >>> lr = gx.piecewise_constant_schedule(1.0, {2: 0.5, 4: 0.1})
        >>> [float(lr(torch.tensor(t))) for t in range(6)]
        [1.0, 1.0, 0.5, 0.5, 0.05, 0.05]
    """
    fn = "piecewise_constant_schedule"
    init = _number(fn, "init_value", init_value)
    if not isinstance(boundaries_and_scales, (Mapping, type(None))):
        raise TypeError(
            f"{fn}: boundaries_and_scales must be a dict {{step: scale}}, got {type(boundaries_and_scales).__name__}"
        )
    pairs = sorted(
        (C.check_int(fn, "a boundary", b, low=0), _number(fn, f"the scale at {b}", s, low=0.0))
        for b, s in (boundaries_and_scales or {}).items()
    )

    def schedule(count: torch.Tensor) -> torch.Tensor:
        value = torch.full((), init, dtype=torch.float64, device=count.device)
        for boundary, scale in pairs:
            value = torch.where(count < boundary, value, value * scale)
        return value

    return schedule


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """One schedule after another, as optax's ``join_schedules``: ``schedules[i]`` from
    ``boundaries[i−1]`` on, given the steps since that boundary (``len(boundaries) ==
    len(schedules) − 1``, ascending). Every schedule is evaluated at every step (tensor maths, no
    branch), so each must accept a count before its boundary (negative): the result there is not used.

    Examples:
        >>> lr = gx.join_schedules([gx.constant_schedule(0.1), gx.linear_warmup(1.0, 2)], [3])
        >>> [float(lr(torch.tensor(t))) for t in range(6)]
        [0.1, 0.1, 0.1, 0.0, 0.5, 1.0]
    """
    fn = "join_schedules"
    schedules, boundaries = list(schedules), list(boundaries)
    if not schedules or not all(callable(s) for s in schedules):
        raise TypeError(f"{fn}: schedules must be a non-empty sequence of functions of the step count")
    if len(boundaries) != len(schedules) - 1:
        raise ValueError(f"{fn}: need len(boundaries) == len(schedules) - 1, got {len(boundaries)} and {len(schedules)}")
    bounds = [C.check_int(fn, "a boundary", b, low=0) for b in boundaries]
    if bounds != sorted(bounds):
        raise ValueError(f"{fn}: boundaries must be ascending, got {bounds}")

    def schedule(count: torch.Tensor) -> torch.Tensor:
        value = schedules[0](count)
        for boundary, later in zip(bounds, schedules[1:]):
            value = torch.where(count < boundary, value, later(count - boundary))
        return value

    return schedule


def cosine_onecycle_schedule(
    transition_steps: int,
    peak_value: float,
    pct_start: float = 0.3,
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
) -> Schedule:
    """The one-cycle schedule with cosine phases (Smith & Topin), as optax's
    ``cosine_onecycle_schedule``: from v₀ = peak_value/div_factor up to v₁ = v₀·div_factor over
    the first b₁ = ⌊pct_start·transition_steps⌋ steps, then down to v₂ = v₁/(div_factor·
    final_div_factor) at ``transition_steps``, constant after. Each phase from a to b over
    steps [s, e): η = b + (a − b)·(cos(π·(t−s)/max(e−s, 1)) + 1)/2. Defaults: ``pct_start=0.3``,
    ``div_factor=25.0``, ``final_div_factor=1e4``.

    Examples:
        >>> lr = gx.cosine_onecycle_schedule(10, peak_value=1.0, pct_start=0.2, div_factor=10.0, final_div_factor=10.0)
        >>> [round(float(lr(torch.tensor(t))), 4) for t in (0, 1, 2, 6, 10, 12)]
        [0.1, 0.55, 1.0, 0.505, 0.01, 0.01]
    """
    fn = "cosine_onecycle_schedule"
    transition_steps = C.check_int(fn, "transition_steps", transition_steps, low=1)
    peak = _number(fn, "peak_value", peak_value)
    pct = _number(fn, "pct_start", pct_start, low=0.0, high=1.0)
    div = _number(fn, "div_factor", div_factor, low=0.0, low_open=True)
    final_div = _number(fn, "final_div_factor", final_div_factor, low=0.0, low_open=True)
    # optax's piecewise_interpolate_schedule over {⌊pct·T⌋: div, T: 1/(div·final_div)} (one
    # boundary when the two coincide: the later scale wins, as in a dict)
    scales = {int(pct * transition_steps): div, transition_steps: 1.0 / (div * final_div)}
    bounds = [0, *sorted(scales)]
    values = [peak / div]
    for b in bounds[1:]:
        values.append(values[-1] * scales[b])

    def schedule(count: torch.Tensor) -> torch.Tensor:
        t = count.to(torch.float64)
        value = torch.full((), values[-1], dtype=torch.float64, device=count.device)
        for i in reversed(range(len(bounds) - 1)):
            start, end, size = values[i], values[i + 1], max(bounds[i + 1] - bounds[i], 1)
            phase = end + (start - end) / 2.0 * (torch.cos(math.pi * ((t - bounds[i]) / size)) + 1.0)
            value = torch.where((bounds[i] <= count) & (count < bounds[i + 1]), phase, value)
        return value

    return schedule


_SGDR_KEYS = ("init_value", "peak_value", "warmup_steps", "decay_steps", "end_value", "exponent")


def sgdr_schedule(cosine_kwargs: Sequence[Mapping[str, Any]]) -> Schedule:
    """SGD with warm restarts (Loshchilov & Hutter), as optax's ``sgdr_schedule``: cycles joined
    end to end, each optax's ``warmup_cosine_decay_schedule(**kwargs)`` of one dict of
    ``cosine_kwargs``: a line from ``init_value`` to ``peak_value`` over ``warmup_steps``, then
    :func:`cosine_decay_schedule` of ``peak_value`` over ``decay_steps − warmup_steps`` steps
    to ``end_value`` (α = end_value/peak_value, 0 for a zero peak) with ``exponent``;
    ``decay_steps`` is the cycle's length. Keys: ``init_value``, ``peak_value``, ``warmup_steps``,
    ``decay_steps`` (needed), ``end_value`` (0.0) and ``exponent`` (1.0).

    Examples:
        >>> cycle = dict(init_value=0.0, peak_value=1.0, warmup_steps=1, decay_steps=3)
        >>> lr = gx.sgdr_schedule([cycle, cycle])
        >>> [round(float(lr(torch.tensor(t))), 4) for t in range(7)]
        [0.0, 1.0, 0.5, 0.0, 1.0, 0.5, 0.0]
    """
    fn = "sgdr_schedule"
    cycles = list(cosine_kwargs)
    if not cycles:
        raise ValueError(f"{fn}: cosine_kwargs must name at least one cycle")
    schedules, boundaries, step = [], [], 0
    for i, kwargs in enumerate(cycles):
        if not isinstance(kwargs, Mapping):
            raise TypeError(f"{fn}: cosine_kwargs[{i}] must be a dict, got {type(kwargs).__name__}")
        unknown = sorted(set(kwargs) - set(_SGDR_KEYS))
        missing = [k for k in _SGDR_KEYS[:4] if k not in kwargs]
        if unknown or missing:
            raise TypeError(f"{fn}: cosine_kwargs[{i}] takes the keys {list(_SGDR_KEYS)}"
                            + (f"; unknown: {unknown}" if unknown else f"; missing: {missing}"))
        schedules.append(_warmup_cosine(fn, **kwargs))
        step += kwargs["decay_steps"]
        boundaries.append(step)
    return join_schedules(schedules, boundaries[:-1])


def _warmup_cosine(
    fn: str, init_value: float, peak_value: float, warmup_steps: int, decay_steps: int, end_value: float = 0.0,
    exponent: float = 1.0,
) -> Schedule:
    """optax's ``warmup_cosine_decay_schedule``: a line from ``init_value`` to ``peak_value`` over
    ``warmup_steps`` (none for 0), then the cosine decay to ``end_value`` until ``decay_steps``."""
    init = _number(fn, "init_value", init_value)
    peak = _number(fn, "peak_value", peak_value)
    end = _number(fn, "end_value", end_value)
    warmup_steps = C.check_int(fn, "warmup_steps", warmup_steps, low=0)
    decay_steps = C.check_int(fn, "decay_steps", decay_steps, low=warmup_steps + 1)
    decay = cosine_decay_schedule(peak, decay_steps - warmup_steps, 0.0 if peak == 0.0 else end / peak, exponent)
    if warmup_steps == 0:  # optax's constant init_value before step 0: never reached
        return decay

    def warmup(count: torch.Tensor) -> torch.Tensor:
        frac = 1.0 - torch.clamp(count, 0, warmup_steps).to(torch.float64) / warmup_steps
        return (init - peak) * frac + peak

    return join_schedules([warmup, decay], [warmup_steps])
