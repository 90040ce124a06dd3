"""What a kernel step needs to know about a pipeline: its hyperparameters, by role.

A pipeline built by :mod:`grokxform.pipelines` is an ordinary ``named_chain``; next to it, the
factory records an :class:`AdamFamilySpec` (a registry keyed by the chain's ``update`` function,
so the transform itself stays a plain ``(init, update)`` pair). :func:`spec_of` finds it again,
through :func:`grokxform.inject_hyperparams` too. A chain without a spec (any user's own chain,
``grokadamw_compat``) has no kernel step; :class:`grokxform.fused.FusedStep` compiles it with
Inductor instead.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Union

import torch

from grokxform.base import GradientTransformation, Scalar

if TYPE_CHECKING:  # the transforms import this module
    from grokxform.transforms.adam import LayerwiseBeta
    from grokxform.transforms.masks import Mask


@dataclass(frozen=True)
class EmaSpec:
    """``ema_filter(alpha, init=..., signal_fns=..., signal_decay_rate=...)`` (checked signal fns)."""

    alpha: Scalar
    init: str
    signal_fns: tuple[tuple[Callable[..., Any], int], ...]
    signal_decay_rate: Scalar


@dataclass(frozen=True)
class MaSpec:
    """``ma_filter(window_size, filter_type, warmup, accumulator_dtype=...)``."""

    window_size: int
    filter_type: str
    warmup: bool
    accumulator_dtype: torch.dtype


@dataclass(frozen=True)
class AdamFamilySpec:
    """``[clip] → [amplify(filter, lamb)] → [L2] → adam → [decay] → lr``, the chain of
    :func:`~grokxform.adamw`, :func:`~grokxform.grokfast_ema`, :func:`~grokxform.grokfast_ma` and
    :func:`~grokxform.grokadamw`, with the state under the chain's names ``clip``, ``grokfast``,
    ``weight_decay``, ``adam``, ``lr``."""

    lr: Union[Scalar, Callable[[torch.Tensor], torch.Tensor]]
    b1: Union[Scalar, "LayerwiseBeta"]
    b2: Scalar
    eps: Scalar
    weight_decay: Scalar
    weight_decay_mask: "Mask"
    coupled: bool
    clip: Scalar | None = None
    filter: Union[EmaSpec, MaSpec, None] = None
    lamb: Scalar = 0.0

    @property
    def names(self) -> tuple[str, ...]:
        """The chain's step names, in order (the keys of its state)."""
        pre = (("clip",) if self.clip is not None else ()) + (("grokfast",) if self.filter is not None else ())
        core = ("weight_decay", "adam") if self.coupled else ("adam", "weight_decay")
        return (*pre, *core, "lr")


@dataclass(frozen=True)
class InjectedSpec:
    """``inject_hyperparams(factory)(...)``: rebuild the inner transform from the state's
    hyperparameter tensors (``current(count, stored)``) and take its spec."""

    factory: Callable[..., GradientTransformation]
    static: dict[str, Any]
    current: Callable[[torch.Tensor, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    schedules: tuple[str, ...]

    def inner(self, count: torch.Tensor, stored: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
        """``(hyperparameters, spec of the inner transform)`` for this step (spec ``None``: no kernel)."""
        hp = self.current(count, stored)
        return hp, spec_of(self.factory(**self.static, **hp))


Spec = Union[AdamFamilySpec, InjectedSpec]

_SPECS: "weakref.WeakKeyDictionary[Callable[..., Any], Spec]" = weakref.WeakKeyDictionary()


def register(tx: GradientTransformation, spec: Spec) -> GradientTransformation:
    """Record that ``tx`` computes what ``spec`` says (a kernel step may run it); returns ``tx``.
    Inside ``torch.compile`` (a pipeline built in a traced function) nothing is recorded."""
    if not torch.compiler.is_compiling():
        _SPECS[tx.update] = spec
    return tx


def spec_of(tx: GradientTransformation) -> Spec | None:
    """The spec recorded for ``tx``, or ``None``."""
    try:
        return _SPECS.get(tx.update)
    except TypeError:  # an update that cannot be weakly referenced was never registered
        return None
