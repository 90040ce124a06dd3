"""RMSprop's direction: the update divided by the root of a running mean of its squares
(``scale_by_rms``), or by the running standard deviation (``scale_by_stddev``, centered RMSprop)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from grokxform import _common as C
from grokxform.base import GradientTransformation, Params, Scalar, elementwise, static_hyperparams
from grokxform.declarations import ScalarContext
from grokxform.elements import Inputs, Outputs, Val


class ScaleByRmsState(NamedTuple):
    """``nu``: per-leaf running mean of the squared updates (zeros before the first step)."""

    nu: Any


class ScaleByRStdDevState(NamedTuple):
    """``mu``: per-leaf running mean of the updates; ``nu``: of their squares (zeros before the
    first step)."""

    mu: Any
    nu: Any


def _check(fn: str, decay: Scalar, eps: Scalar, eps_in_sqrt: bool) -> None:
    C.check_scalar(fn, "decay", decay, low=0.0, high=1.0)
    C.check_scalar(fn, "eps", eps, low=0.0)
    C.check_bool(fn, "eps_in_sqrt", eps_in_sqrt)


def _scalars(decay: Scalar, eps: Scalar) -> Any:
    def scalars(ctx: ScalarContext) -> tuple[dict[str, Any], dict[str, Any]]:
        return {"decay": decay, "one_minus_decay": 1.0 - decay, "eps": eps}, {}

    return scalars


@static_hyperparams("eps_in_sqrt")
def scale_by_rms(
    decay: Scalar = 0.99, eps: Scalar = 1e-8, *, eps_in_sqrt: bool = False, state_dtype: torch.dtype | None = None
) -> GradientTransformation:
    """RMSprop's direction (Tieleman & Hinton 2012): ``ν ← decay·ν + (1−decay)·g²`` from ν = 0,
    ``u = g / (√ν + ε)``, or ``u = g / √(ν + ε)`` with ``eps_in_sqrt=True``.

    The default places ε outside the root, as ``torch.optim.RMSprop`` does (``alpha`` there is
    ``decay`` here); optax's ``scale_by_rms`` places it inside by default (``eps_in_sqrt=True``
    here). No bias correction. A leaf with a ``None`` gradient keeps its ν. State:
    :class:`ScaleByRmsState`; ν in ``state_dtype`` (default: the param's dtype, float32 for 16-bit
    params). Defaults are torch's: ``decay=0.99``, ``eps=1e-8``.

    Examples:
        >>> tx = gx.scale_by_rms(decay=0.75, eps=0.0)
        >>> state = tx.init({"w": torch.zeros(2)})
        >>> u, state = tx.update({"w": torch.tensor([2.0, -4.0])}, state)
        >>> state.nu["w"]                       # 0.25·g²
        tensor([1., 4.])
        >>> u["w"]                              # g/√ν
        tensor([ 2., -2.])
    """
    _check("scale_by_rms", decay, eps, eps_in_sqrt)

    def init_fn(params: Params) -> ScaleByRmsState:
        return ScaleByRmsState(nu=C.zeros_like_tree(params, state_dtype))

    return elementwise(
        "scale_by_rms", _rms_inner if eps_in_sqrt else _rms, init=init_fn, scalars=_scalars(decay, eps),
        state_type=ScaleByRmsState, fields=("nu",), nonnegative=("nu",),
    )


@static_hyperparams("eps_in_sqrt")
def scale_by_stddev(
    decay: Scalar = 0.99, eps: Scalar = 1e-8, *, eps_in_sqrt: bool = False, state_dtype: torch.dtype | None = None
) -> GradientTransformation:
    """Centered RMSprop's direction (Graves 2013): ``μ ← decay·μ + (1−decay)·g``,
    ``ν ← decay·ν + (1−decay)·g²`` from μ = ν = 0, ``u = g / (√(ν − μ²) + ε)``, or
    ``u = g / √(ν − μ² + ε)`` with ``eps_in_sqrt=True``.

    ``torch.optim.RMSprop(centered=True)``'s direction with the default (ε outside the root);
    optax's ``scale_by_stddev`` puts ε inside by default. torch forms μ with ``lerp``
    (``μ + (1−decay)·(g − μ)``), which rounds differently from ``decay·μ + (1−decay)·g`` by an ulp.
    A leaf with a ``None`` gradient keeps μ and ν. State: :class:`ScaleByRStdDevState`; μ and ν in
    ``state_dtype`` (default: the param's dtype, float32 for 16-bit params). Defaults are torch's.

    Examples:
        >>> tx = gx.scale_by_stddev(decay=0.5, eps=0.0)
        >>> state = tx.init({"w": torch.zeros(1)})
        >>> u, state = tx.update({"w": torch.tensor([2.0])}, state)
        >>> state.mu["w"], state.nu["w"]        # 0.5·g, 0.5·g²
        (tensor([1.]), tensor([2.]))
        >>> u["w"]                              # g/√(ν − μ²)
        tensor([2.])
    """
    _check("scale_by_stddev", decay, eps, eps_in_sqrt)

    def init_fn(params: Params) -> ScaleByRStdDevState:
        return ScaleByRStdDevState(mu=C.zeros_like_tree(params, state_dtype), nu=C.zeros_like_tree(params, state_dtype))

    return elementwise(
        "scale_by_stddev", _stddev_inner if eps_in_sqrt else _stddev, init=init_fn, scalars=_scalars(decay, eps),
        state_type=ScaleByRStdDevState, fields=("mu", "nu"), nonnegative=("nu",),
    )


def _square_mean(v: Inputs, sc: Inputs) -> tuple[Val, Val]:
    """g in ν's dtype and ν = ν·decay + g·g·(1−decay)."""
    g = v.x.to(v.nu.dtype)
    return g, v.nu * sc.decay + g * g * sc.one_minus_decay


def _rms(v: Inputs, sc: Inputs) -> Outputs:
    """u = g / (√ν + ε)."""
    g, nu = _square_mean(v, sc)
    return {"out": (g / (nu.sqrt() + sc.eps)).to(v.x.dtype), "nu": nu}


def _rms_inner(v: Inputs, sc: Inputs) -> Outputs:
    """u = g / √(ν + ε)."""
    g, nu = _square_mean(v, sc)
    return {"out": (g / (nu + sc.eps).sqrt()).to(v.x.dtype), "nu": nu}


def _centered(v: Inputs, sc: Inputs) -> tuple[Val, Val, Val, Val]:
    """g, μ = μ·decay + g·(1−decay), ν and the variance ν − μ·μ."""
    g, nu = _square_mean(v, sc)
    mu = v.mu * sc.decay + g * sc.one_minus_decay
    return g, mu, nu, nu - mu * mu


def _stddev(v: Inputs, sc: Inputs) -> Outputs:
    """u = g / (√(ν − μ²) + ε)."""
    g, mu, nu, var = _centered(v, sc)
    return {"out": (g / (var.sqrt() + sc.eps)).to(v.x.dtype), "mu": mu, "nu": nu}


def _stddev_inner(v: Inputs, sc: Inputs) -> Outputs:
    """u = g / √(ν − μ² + ε)."""
    g, mu, nu, var = _centered(v, sc)
    return {"out": (g / (var + sc.eps).sqrt()).to(v.x.dtype), "mu": mu, "nu": nu}
