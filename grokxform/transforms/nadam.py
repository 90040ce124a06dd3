"""NAdam's direction: Adam with Nesterov momentum and Dozat's momentum schedule, as ``torch.optim.NAdam``."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from grokxform import _common as C
from grokxform.base import GradientTransformation, Params, Scalar, elementwise
from grokxform.declarations import ScalarContext
from grokxform.elements import Inputs, Outputs
from grokxform.transforms.adam import _moments, _pow

_TERMS = 48
"""Terms of the series of ``log Π μ_k`` (:func:`_log_mu_product`): the tail is below 2⁻⁴⁸/48 of
the first term."""


class ScaleByNadamState(NamedTuple):
    """``count``: per-leaf steps (0-d int64); ``mu``: first moments; ``nu``: second moments."""

    count: Any
    mu: Any
    nu: Any


def _momentum(b1: Scalar, psi: Scalar, t: torch.Tensor) -> torch.Tensor:
    """μ_t = β1·(1 − ½·0.96^(t·ψ)), in float64."""
    return b1 * (1.0 - 0.5 * torch.pow(0.96, t * psi))


def _log_mu_product(b1: Scalar, psi: Scalar, t: torch.Tensor) -> torch.Tensor:
    """``log Π_{k=1..t} μ_k`` for the float64 vector t, in closed form:
    ``t·log β1 + Σ_k log(1 − ½q^k)`` with ``q = 0.96^ψ``, and, by ``log(1−x) = −Σ_j x^j/j``,
    ``Σ_{k=1..t} log(1 − ½q^k) = −Σ_j (½^j/j)·q^j·(1 − q^{jt})/(1 − q^j)`` (``t`` terms of the
    geometric sum where ``q = 1``)."""
    j = C.constant_vector(tuple(float(k) for k in range(1, _TERMS + 1)), t.device).unsqueeze(1)
    weights = C.constant_vector(tuple(0.5**k / k for k in range(1, _TERMS + 1)), t.device).unsqueeze(1)
    log_q = psi * math.log(0.96)
    jl = j * log_q
    geometric = torch.exp(jl) * torch.expm1(jl * t) / torch.expm1(jl)
    if isinstance(log_q, torch.Tensor) or log_q == 0.0:
        geometric = torch.where(jl == 0.0, t, geometric)
    return t * torch.log(C.device_f64(b1, t.device)) - (weights * geometric).sum(0)


def scale_by_nadam(
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    eps: Scalar = 1e-8,
    momentum_decay: Scalar = 4e-3,
    *,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """NAdam's direction (Dozat 2016, "Incorporating Nesterov Momentum into Adam"), as
    ``torch.optim.NAdam`` computes it (no learning rate, no sign flip):

    ``m_t = β1·m + (1−β1)·g``, ``v_t = β2·v + (1−β2)·g²``, the momentum schedule
    ``μ_t = β1·(1 − ½·0.96^(t·ψ))`` (ψ: ``momentum_decay``) and, with ``Π_t = μ_1···μ_t``,

    ``u = (1−μ_t)/(1−Π_t) · g/d + μ_{t+1}/(1−Π_{t+1}) · m_t/d`` with ``d = √(v_t/(1−β2^t)) + ε``.

    The scalars are computed per step from the leaf's step count t in float64: torch keeps Π_t as
    a running product (a 0-d tensor of the default dtype, float32 unless it is float64); here it
    is ``exp(log Π_t)`` from a closed-form series, so no state but the count and the moments.
    A leaf with a ``None`` gradient keeps m, v and t, as in torch. State:
    :class:`ScaleByNadamState`; moments in ``state_dtype`` (default: the param's dtype, float32
    for 16-bit params). Defaults are torch's.

    Examples:
        >>> tx = gx.scale_by_nadam()
        >>> state = tx.init({"w": torch.zeros(2)})
        >>> u, state = tx.update({"w": torch.tensor([1.0, -1.0])}, state)
        >>> u["w"]                      # g/|g| + μ2/(1−μ1μ2)·(1−β1)·g/|g|, μ1 ≈ μ2 ≈ 0.45
        tensor([ 1.0565, -1.0565])
    """
    C.check_scalar("scale_by_nadam", "b1", b1, low=0.0, high=1.0, low_open=True, high_open=True)
    C.check_scalar("scale_by_nadam", "b2", b2, low=0.0, high=1.0, high_open=True)
    C.check_scalar("scale_by_nadam", "eps", eps, low=0.0)
    C.check_scalar("scale_by_nadam", "momentum_decay", momentum_decay, low=0.0)

    def init_fn(params: Params) -> ScaleByNadamState:
        return ScaleByNadamState(
            count=C.counters_like_tree(params),
            mu=C.zeros_like_tree(params, state_dtype),
            nu=C.zeros_like_tree(params, state_dtype),
        )

    def scalars(ctx: ScalarContext) -> tuple[dict[str, Any], dict[str, Any]]:
        t = ctx.counts.to(torch.float64) + 1.0  # type: ignore[union-attr]
        mu_t = _momentum(b1, momentum_decay, t)
        mu_next = _momentum(b1, momentum_decay, t + 1.0)
        product = torch.exp(_log_mu_product(b1, momentum_decay, t))
        values = {
            "b1": b1, "one_minus_b1": 1.0 - b1, "b2": b2, "one_minus_b2": 1.0 - b2, "eps": eps,
            "bc2": 1.0 - _pow([b2], t),
            "c_g": (1.0 - mu_t) / (1.0 - product),
            "c_m": mu_next / (1.0 - product * mu_next),
        }
        return values, {}

    return elementwise(
        "scale_by_nadam", _nadam, init=init_fn, scalars=scalars, state_type=ScaleByNadamState, fields=("mu", "nu"),
        count="count", nonnegative=("nu",),
    )


def _nadam(v: Inputs, sc: Inputs) -> Outputs:
    """u = (g/d)·c_g + (m_t/d)·c_m with d = √(v_t/(1−β2^t)) + ε."""
    g, m, nu = _moments(v, sc)
    d = (nu / sc.bc2).sqrt() + sc.eps
    return {"out": ((g / d) * sc.c_g + (m / d) * sc.c_m).to(v.x.dtype), "mu": m, "nu": nu}
