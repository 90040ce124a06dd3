"""A transformation factory's arguments as the hyperparameters of param groups.

``Optimizer(params, factory, **given)`` reads ``factory``'s signature: every argument with a
default is a hyperparameter of each param group, ``given`` sets the defaults. The float ones are
injected as state tensors (``inject_hyperparams``); the others are fixed in the transformation,
which is built again when one of them changes. A ready transformation has one hyperparameter,
``lr``, a multiplier of its updates.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from grokxform import _common as C


def factory_name(factory: Callable[..., Any]) -> str:
    """The dotted name of a factory (``"grokxform.pipelines.adamw"``): what a checkpoint records.

    Args:
        factory: a function (or any callable) that returns a transformation.
    """
    module = getattr(factory, "__module__", None) or ""
    name = getattr(factory, "__qualname__", None) or getattr(factory, "__name__", None) or type(factory).__name__
    return f"{module}.{name}" if module else name


@dataclass(frozen=True)
class Hyperparameters:
    """The hyperparameters of every param group: their ``names``, and the ``floats`` among them
    (an int given for one of those is that float)."""

    names: tuple[str, ...]
    floats: frozenset[str]

    def coerce(self, name: str, value: Any) -> Any:
        """``value`` as hyperparameter ``name`` takes it: a NumPy scalar as a Python number, an int
        given for a float hyperparameter (``weight_decay=0``) as that float, so that it is injected
        as a tensor like the others.

        Args:
            name: the hyperparameter.
            value: its value in a param group.
        """
        value = C.plain_number(value)
        if name in self.floats and C.is_number(value) and not isinstance(value, float):
            return float(value)
        return value

    def of(self, group: Mapping[str, Any]) -> dict[str, Any]:
        """The hyperparameters that ``group`` sets, coerced (:meth:`coerce`).

        Args:
            group: a param group.
        """
        return {n: self.coerce(n, group[n]) for n in self.names if n in group}


MULTIPLIER = Hyperparameters(("lr",), frozenset({"lr"}))
"""The hyperparameters of a ready transformation: ``lr``, a multiplier of its updates."""


def read_factory(factory: Callable[..., Any], given: dict[str, Any]) -> tuple[Hyperparameters, dict[str, Any]]:
    """The hyperparameters of ``factory`` and their defaults: every argument that has a default,
    overridden by ``given``. An argument it does not take, or a required one not given, raises
    ``TypeError``.

    Args:
        factory: a function that returns a transformation.
        given: the keyword arguments given for it.
    """
    try:
        sig = inspect.signature(factory)
    except (TypeError, ValueError) as e:
        raise TypeError(f"Optimizer: cannot read the arguments of the factory {factory_name(factory)}: {e}") from e
    named = {n: p for n, p in sig.parameters.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    unknown = [k for k in given if k not in named and not takes_any]
    if unknown:
        raise TypeError(f"Optimizer: {factory_name(factory)} has no argument {unknown[0]!r} (it takes {list(named)})")
    missing = [n for n, p in named.items() if p.default is p.empty and n not in given]
    if missing:
        raise TypeError(f"Optimizer: {factory_name(factory)} needs the argument {missing[0]!r}")
    defaults = {n: p.default for n, p in named.items() if p.default is not p.empty}
    defaults.update(given)
    hp = Hyperparameters(
        tuple(defaults),
        frozenset(n for n, p in named.items() if isinstance(p.default, float) or isinstance(given.get(n), float)),
    )
    return hp, {n: hp.coerce(n, v) for n, v in defaults.items()}


def check_multiplier(value: Any) -> None:
    """Refuse an lr multiplier that is not a finite number >= 0 or a 1-element tensor.

    Args:
        value: a param group's ``lr`` over a ready transformation.
    """
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(
                f"Optimizer: the lr multiplier 'lr' must be a number or a 1-element tensor, got shape"
                f" {tuple(value.shape)}"
            )
    elif not C.is_number(value):
        raise TypeError(f"Optimizer: the lr multiplier 'lr' must be a number, got {type(value).__name__}")
    elif not (math.isfinite(value) and value >= 0):
        raise ValueError(f"Optimizer: the lr multiplier 'lr' must be a finite number >= 0, got {value}")


def numbers(args: Mapping[str, Any]) -> dict[str, Any]:
    """The hyperparameters in ``args`` that are numbers (what the factory checks when they change).

    Args:
        args: hyperparameter values by name.
    """
    return {n: v for n, v in args.items() if C.is_number(v)}


def _same(a: Any, b: Any) -> bool:
    """Whether a fixed hyperparameter kept its value (tensors: only the very same object)."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False
    try:
        return bool(a == b)
    except Exception:  # an object whose == does not give a bool
        return False


def still_serves(args: Mapping[str, Any], built: Mapping[str, Any], injected: set[str]) -> bool:
    """Whether the transformation built from ``built`` runs ``args``: the same names, and every
    value that is fixed in it (not injected, or a function) unchanged.

    Args:
        args: the group's hyperparameters now.
        built: those the transformation was built from.
        injected: the names its state holds as tensors.
    """
    changed = [
        n for n, v in args.items()
        if (n not in injected or callable(v) or callable(built.get(n))) and not _same(v, built.get(n))
    ]
    return not changed and set(args) == set(built)
