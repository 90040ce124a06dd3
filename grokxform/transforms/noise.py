"""Annealed Gaussian gradient noise (Neelakantan et al. 2015, arXiv:1511.06807)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from grokxform import _common as C
from grokxform.base import GradientTransformation, Params, Scalar, elementwise
from grokxform.declarations import ScalarContext
from grokxform.elements import Inputs, Outputs, leaf_keys, normal


class AddNoiseState(NamedTuple):
    """``count``: per-leaf steps (0-d int64), which also pick each step's random numbers."""

    count: Any


def add_noise(eta: Scalar = 0.01, gamma: Scalar = 0.55, seed: int = 0) -> GradientTransformation:
    """Gradient noise, as optax's ``add_noise``: ``u = g + σ_t·z``, z standard normal, with
    ``σ_t² = η / (1 + t)^γ`` and t the leaf's step count (0 at its first step, so ``σ² = η`` then).

    The normal numbers are counter-based (:func:`grokxform.elements.normal`): a function of
    ``seed``, the leaf's position, its step count and the element's index, drawn anew for each leaf
    at each step, and the same numbers op by op, on the foreach backend and on the engine's kernels
    (within a few ulps: the backends' log and cos differ in rounding). σ_t is computed in float64;
    ``g + σ_t·z`` in float32 (float64 for float64 gradients), rounded to the gradient's dtype. A
    leaf with a ``None`` gradient keeps its count. State: :class:`AddNoiseState`. Defaults:
    ``eta=0.01`` and ``gamma=0.55`` (the paper's), ``seed=0``.

    Examples:
        >>> tx = gx.add_noise(eta=0.01, gamma=0.55, seed=0)
        >>> state = tx.init({"w": torch.zeros(1000)})
        >>> u, state = tx.update({"w": torch.zeros(1000)}, state)
        >>> round(u["w"].std().item(), 1)   # σ_0 = √0.01
        0.1
        >>> int(state.count["w"])
        1
    """
    C.check_scalar("add_noise", "eta", eta, low=0.0)
    C.check_scalar("add_noise", "gamma", gamma, low=0.0)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"add_noise: seed must be an int in [0, 2**64), got {seed!r}")

    def init_fn(params: Params) -> AddNoiseState:
        return AddNoiseState(count=C.counters_like_tree(params))

    def scalars(ctx: ScalarContext) -> tuple[dict[str, Any], dict[str, Any]]:
        t = ctx.counts.to(torch.float64)  # type: ignore[union-attr]
        sigma = torch.sqrt(eta / (t + 1.0) ** gamma)
        return {"key": leaf_keys(seed, ctx.counts, ctx.index), "sigma": sigma}, {}  # type: ignore[arg-type]

    return elementwise(
        "add_noise", _noise, init=init_fn, scalars=scalars, state_type=AddNoiseState, count="count",
    )


def _noise(v: Inputs, sc: Inputs) -> Outputs:
    """g + σ·z in float32 (float64 for float64 gradients)."""
    wide = torch.float64 if v.x.dtype == torch.float64 else torch.float32
    return {"out": (v.x.to(wide) + normal(sc.key).to(wide) * sc.sigma).to(v.x.dtype)}
