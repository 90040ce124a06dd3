"""AdEMAMix's direction: Adam's plus a slow EMA of the gradients (Pagliardini et al. 2024,
arXiv:2409.03137)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from grokxform import _common as C
from grokxform.base import GradientTransformation, Params, Scalar, elementwise, static_hyperparams
from grokxform.declarations import ScalarContext
from grokxform.elements import Inputs, Outputs
from grokxform.transforms.adam import _moments, _pow


class ScaleByAdemamixState(NamedTuple):
    """``count``: per-leaf steps (0-d int64); ``mu``: Adam's fast first moments m1; ``nu``: second
    moments; ``mu_slow``: the slow EMA m2."""

    count: Any
    mu: Any
    nu: Any
    mu_slow: Any


@static_hyperparams("alpha_warmup", "beta3_warmup")
def scale_by_ademamix(
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    b3: Scalar = 0.9999,
    alpha: Scalar = 5.0,
    eps: Scalar = 1e-8,
    alpha_warmup: int | None = None,
    beta3_warmup: int | None = None,
    *,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """AdEMAMix's direction ("The AdEMAMix Optimizer: Better, Faster, Older", Pagliardini, Ablin
    and Grangier 2024), no learning rate, no sign flip. With per-leaf step t:

    ``m1 ← β1·m1 + (1−β1)·g``, ``ν ← β2·ν + (1−β2)·g²``, ``m2 ← β3_t·m2 + (1−β3_t)·g`` and
    ``u = (m1/(1−β1^t) + α_t·m2) / (√ν/√(1−β2^t) + ε)`` (m2 has no bias correction).

    The paper's warm-ups: ``α_t = min(t·α/T_α, α)`` with ``T_α = alpha_warmup``, and
    ``β3_t = min(exp(ln β1·ln β3 / ((1 − t/T)·ln β3 + (t/T)·ln β1)), β3)`` with
    ``T = beta3_warmup`` (β3_t rises from β1 to β3 along a linear path in the half-life); ``None``
    keeps α and β3 fixed. ``pytorch_optimizer.AdEMAMix``'s ``t_alpha_beta3=T`` is
    ``alpha_warmup=beta3_warmup=T``; its step count is one per param group (a param without a
    gradient still advances it), here one per leaf, as Adam's. The scalars are computed in float64.
    State: :class:`ScaleByAdemamixState`; moments in ``state_dtype`` (default: the param's dtype,
    float32 for 16-bit params). Defaults are the paper's (α=5, β3=0.9999).

    Examples:
        >>> tx = gx.scale_by_ademamix(alpha=5.0, alpha_warmup=10, beta3_warmup=10)
        >>> state = tx.init({"w": torch.zeros(1)})
        >>> u, state = tx.update({"w": torch.tensor([1.0])}, state)
        >>> u["w"]                      # 1 + α_1·(1−β3_1)·g with α_1 = 0.5, β3_1 ≈ 0.99901
        tensor([1.0005])
    """
    C.check_scalar("scale_by_ademamix", "b1", b1, low=0.0, high=1.0, high_open=True)
    C.check_scalar("scale_by_ademamix", "b2", b2, low=0.0, high=1.0, high_open=True)
    C.check_scalar("scale_by_ademamix", "b3", b3, low=0.0, high=1.0, high_open=True)
    C.check_scalar("scale_by_ademamix", "alpha", alpha, low=0.0)
    C.check_scalar("scale_by_ademamix", "eps", eps, low=0.0)
    if alpha_warmup is not None:
        alpha_warmup = C.check_int("scale_by_ademamix", "alpha_warmup", alpha_warmup, low=1)
    if beta3_warmup is not None:
        beta3_warmup = C.check_int("scale_by_ademamix", "beta3_warmup", beta3_warmup, low=1)
        C.check_scalar("scale_by_ademamix", "b1 (with beta3_warmup)", b1, low=0.0, low_open=True)
        C.check_scalar("scale_by_ademamix", "b3 (with beta3_warmup)", b3, low=0.0, low_open=True)

    def init_fn(params: Params) -> ScaleByAdemamixState:
        return ScaleByAdemamixState(
            count=C.counters_like_tree(params),
            mu=C.zeros_like_tree(params, state_dtype),
            nu=C.zeros_like_tree(params, state_dtype),
            mu_slow=C.zeros_like_tree(params, state_dtype),
        )

    def scalars(ctx: ScalarContext) -> tuple[dict[str, Any], dict[str, Any]]:
        t = ctx.counts.to(torch.float64) + 1.0  # type: ignore[union-attr]
        alpha_t: Any = alpha
        if alpha_warmup is not None:
            alpha_t = torch.minimum(t * C.device_f64(alpha, t.device) / alpha_warmup, C.device_f64(alpha, t.device))
        b3_t: Any = b3
        if beta3_warmup is not None:
            log_b1, log_b3 = torch.log(C.device_f64(b1, t.device)), torch.log(C.device_f64(b3, t.device))
            x = t / beta3_warmup
            b3_t = torch.minimum(torch.exp(log_b1 * log_b3 / ((1.0 - x) * log_b3 + x * log_b1)), C.device_f64(b3, t.device))
        values = {
            "b1": b1, "one_minus_b1": 1.0 - b1, "b2": b2, "one_minus_b2": 1.0 - b2,
            "b3": b3_t, "one_minus_b3": 1.0 - b3_t, "alpha": alpha_t, "eps": eps,
            "bc1": 1.0 - _pow([b1], t), "bc2_sqrt": torch.sqrt(1.0 - _pow([b2], t)),
        }
        return values, {}

    return elementwise(
        "scale_by_ademamix", _ademamix, init=init_fn, scalars=scalars, state_type=ScaleByAdemamixState,
        fields=("mu", "nu", "mu_slow"), count="count", nonnegative=("nu",),
    )


def _ademamix(v: Inputs, sc: Inputs) -> Outputs:
    """u = (m1/(1−β1^t) + α_t·m2) / (√ν/√(1−β2^t) + ε)."""
    g, m, nu = _moments(v, sc)
    slow = v.mu_slow * sc.b3 + g * sc.one_minus_b3
    u = (m / sc.bc1 + slow * sc.alpha) / (nu.sqrt() / sc.bc2_sqrt + sc.eps)
    return {"out": u.to(v.x.dtype), "mu": m, "nu": nu, "mu_slow": slow}
