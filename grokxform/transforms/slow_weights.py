"""Lookahead (Zhang et al. 2019, arXiv:1907.08610): k fast steps forward, then one step back
towards slow weights kept in the state."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from grokxform import _common as C
from grokxform import tree as _tree
from grokxform.base import GradientTransformation, Params, Scalar, elementwise, named_chain
from grokxform.declarations import ScalarContext
from grokxform.elements import Inputs, Outputs, where


class LookaheadState(NamedTuple):
    """``count``: per-leaf fast steps taken (0-d int64 each); ``slow``: per-leaf slow weights φ
    (the params at ``init``, then the synchronised point)."""

    count: Any  # type: ignore[assignment]  # the field shadows tuple.count
    slow: Any


def lookahead(
    fast: GradientTransformation, sync_period: int = 6, alpha: Scalar = 0.5, *, state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Lookahead around the optimizer ``fast``, with optax's ``lookahead`` numbers
    (``slow_step_size`` is ``alpha``).

    The params are the fast weights θ (the gradients are taken there); the state keeps the slow
    weights φ. Each step u = ``fast``'s update; on every ``sync_period``-th step of a leaf, with
    d = θ + u − φ (the fast point reached), φ ← φ + α·d and the update is u − (1−α)·d, so that
    ``apply_updates`` moves θ to the new φ (to rounding): the paper's φ ← φ + α·(θ_k − φ),
    θ ← φ. The other steps return u unchanged.

    optax keeps both weight sets in the params (``LookaheadParams(fast, slow)``), its update
    moving both; a transform here cannot replace the params, so the slow weights live in
    ``state["lookahead"].slow`` (read them for evaluation between syncs; right after a sync they
    equal the params to rounding). The count is per leaf: a leaf with a ``None`` gradient takes no
    fast step, keeps its φ and syncs after its own ``sync_period`` steps. optax's
    ``reset_state`` (re-initialising the fast state at each sync) is not offered. Needs the params
    (``update(..., params)``). Chain: ``fast`` → ``lookahead``; state ``{"fast": ...,
    "lookahead": LookaheadState}``, φ in ``state_dtype`` (default: the param's dtype, float32 for
    16-bit params). Defaults: ``sync_period=6``, ``alpha=0.5``.

    Examples:
        >>> tx = gx.lookahead(gx.sgd(lr=1.0), sync_period=2, alpha=0.5)
        >>> params = {"w": torch.zeros(1)}
        >>> state = tx.init(params)
        >>> for _ in range(2):                   # θ: 0 → −1 → −2, then back halfway to φ = 0
        ...     u, state = tx.update({"w": torch.ones(1)}, state, params)
        ...     params = gx.apply_updates(params, u)
        >>> params["w"], state["lookahead"].slow["w"]
        (tensor([-1.]), tensor([-1.]))
    """
    if not isinstance(fast, GradientTransformation):
        raise TypeError(f"lookahead: fast must be a GradientTransformation, got {type(fast).__name__}")
    k = C.check_int("lookahead", "sync_period", sync_period, low=1)
    C.check_scalar("lookahead", "alpha", alpha, low=0.0, high=1.0)

    def init_fn(params: Params) -> LookaheadState:
        C.check_gradients(params, "lookahead.init", what="param")
        slow = _tree.tree_map(lambda p: p.detach().to(C.state_dtype_for(p, state_dtype), copy=True), params)
        return LookaheadState(count=C.counters_like_tree(params), slow=slow)

    def scalars(ctx: ScalarContext) -> tuple[dict[str, Any], dict[str, Any]]:
        assert ctx.counts is not None  # declared with count="count"
        return {"sync": ctx.counts % k == k - 1, "alpha": alpha, "one_minus_alpha": 1.0 - alpha}, {}

    sync = elementwise(
        "lookahead", _sync, init=init_fn, scalars=scalars, state_type=LookaheadState, fields=("slow",),
        count="count", needs_params=True,
    )
    return named_chain(("fast", fast), ("lookahead", sync))


def _sync(v: Inputs, sc: Inputs) -> Outputs:
    """d = θ + u − φ; on a sync step φ ← φ + α·d and out = u − (1−α)·d, else out = u (in φ's dtype)."""
    u = v.x.to(v.slow.dtype)
    d = v.param.to(v.slow.dtype) + u - v.slow
    out = where(sc.sync, u - d * sc.one_minus_alpha, u)
    return {"out": out.to(v.x.dtype), "slow": where(sc.sync, v.slow + d * sc.alpha, v.slow)}
