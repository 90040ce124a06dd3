"""Wrappers that change how a transform is driven: hyperparameters as state tensors."""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch

from grokxform import _common as C
from grokxform import tree as _tree
from grokxform.base import STATIC_ATTR, GradientTransformation, Params, Updates
from grokxform.declarations import Injected, declare


class InjectHyperparamsState(NamedTuple):
    """``count``: updates done (0-d int64, the argument of schedules); ``hyperparams``: name ->
    0-d float64 tensor, the values used by the last step (or the next one, before any step);
    ``inner_state``: the wrapped transform's state."""

    count: torch.Tensor  # type: ignore[assignment]  # the field shadows tuple.count
    hyperparams: dict[str, torch.Tensor]
    inner_state: Any


def inject_hyperparams(
    factory: Callable[..., GradientTransformation], *, static_args: Iterable[str] = ()
) -> Callable[..., GradientTransformation]:
    """Make the numeric hyperparameters of ``factory`` tensors in the state.

    ``inject_hyperparams(adamw)(lr=1e-3, weight_decay=0.01)`` is ``adamw`` whose ``lr`` and
    ``weight_decay`` live in ``state.hyperparams`` as 0-d float64 tensors: change them between
    steps (``state.hyperparams["lr"].fill_(3e-4)`` or a new state), batch them under
    ``torch.func.vmap`` (one value per ensemble member), log them; a compiled step does not
    recompile. A callable argument is a schedule ``η(t)`` of the step count, evaluated in-graph
    each step (its value is recorded in ``hyperparams``). Only the float / 0-d tensor / schedule
    arguments passed in the call are injected; ints, bools, strings, non-schedule callables, those
    in ``static_args`` and those the factory marks (:func:`grokxform.base.static_hyperparams`:
    ``grokadamw``'s ``gradient_clipping``, ``layer``, ``gamma``...) stay fixed.

    Examples:
        >>> tx = gx.inject_hyperparams(gx.grokadamw)(lr=1e-3, lamb=2.0)
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> state = tx.init(params)
        >>> _ = state.hyperparams["lr"].fill_(5e-4)      # takes effect at the next update
        >>> grads = {"w": torch.tensor([0.5, -0.5])}
        >>> updates, state = tx.update(grads, state, params)
        >>> updates["w"]
        tensor([-0.0005,  0.0005])
    """
    if not callable(factory):
        raise TypeError("inject_hyperparams: factory must be callable")
    sig = inspect.signature(factory)
    static_names = set(static_args) | getattr(factory, STATIC_ATTR, frozenset())

    def wrapped(*args: Any, **kwargs: Any) -> GradientTransformation:
        bound = sig.bind(*args, **kwargs)
        given = dict(bound.arguments)
        numeric, schedules, static = {}, {}, {}
        for name, value in given.items():
            if name in static_names:
                static[name] = value
            elif isinstance(value, float) or (isinstance(value, torch.Tensor) and value.is_floating_point()):
                numeric[name] = value
            elif C.is_number(value) and not isinstance(value, numbers.Integral):  # NumPy's float32...
                numeric[name] = float(value)
            elif callable(value) and not isinstance(value, (GradientTransformation, torch.Tensor, type)):
                schedules[name] = value
            else:
                static[name] = value
        for name, value in numeric.items():
            if isinstance(value, torch.Tensor) and value.dim() != 0:
                raise ValueError(f"inject_hyperparams: {name} must be a 0-d tensor, got shape {tuple(value.shape)}")
        zero = torch.zeros((), dtype=torch.int64)
        def example() -> GradientTransformation:
            return factory(
                **static,
                **{n: float(v) for n, v in numeric.items()},
                **{n: float(s(zero)) for n, s in schedules.items()},
            )

        example()  # built once with plain values, so that invalid hyperparameters fail here, by name

        def current(state_count: torch.Tensor, stored: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            hp = {n: stored[n] for n in numeric}
            for n, s in schedules.items():
                hp[n] = C.f64(s(state_count), state_count.device)
            return hp

        def init_fn(params: Params) -> InjectHyperparamsState:
            dev = _tree.first_device(params)
            count = C.counter(dev)
            stored = {n: C.f64(v, dev) for n, v in numeric.items()}
            hp = current(count, stored)
            return InjectHyperparamsState(count, hp, factory(**static, **hp).init(params))

        def update_fn(
            updates: Updates, state: InjectHyperparamsState, params: Params | None = None, **extra: Any
        ) -> tuple[Updates, InjectHyperparamsState]:
            C.check_state(state, InjectHyperparamsState, "inject_hyperparams")
            missing = [n for n in numeric if n not in state.hyperparams]
            if missing:
                raise ValueError(f"inject_hyperparams: the state has no hyperparameter {missing[0]!r}")
            hp = current(state.count, state.hyperparams)
            updates, inner = factory(**static, **hp).update(updates, state.inner_state, params, **extra)
            return updates, InjectHyperparamsState(state.count + 1, hp, inner)

        def build(hp: dict[str, torch.Tensor]) -> GradientTransformation:
            return factory(**static, **hp)

        return declare(GradientTransformation(init_fn, update_fn), Injected(build, current, tuple(schedules), example))

    wrapped.__name__ = f"inject_hyperparams({getattr(factory, '__name__', 'factory')})"
    wrapped.__doc__ = factory.__doc__
    return wrapped
