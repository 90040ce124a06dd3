"""Apply the updates every k steps: their sum on the k-th, nothing in between (optax's ``apply_every``)."""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from grokxform import _common as C
from grokxform.base import GradientTransformation, Params, elementwise
from grokxform.declarations import ScalarContext
from grokxform.elements import Inputs, Outputs, where


class ApplyEveryState(NamedTuple):
    """``count``: per-leaf updates seen (0-d int64 each); ``grad_acc``: per-leaf sum of the updates
    since the last emitted one (zeros before the first step)."""

    count: Any  # type: ignore[assignment]  # the field shadows tuple.count
    grad_acc: Any


def apply_every(k: int = 1, *, state_dtype: torch.dtype | None = None) -> GradientTransformation:
    """Accumulate the updates and emit their sum every ``k`` steps, as optax's ``apply_every``:
    on a leaf's step n (0, 1, ...), ``a = u`` when n mod k = 0, else ``a = a + u``; the output is
    ``a`` when n mod k = k − 1, else −0.0 (so ``apply_updates`` leaves the param bit for bit).

    Unlike :func:`~grokxform.MultiSteps`, the members before it in a chain update their state at
    every step (optax's note: ``k=2`` with half batches is not one step of full batches), and it
    emits the sum, not the mean. Differences from optax: the count is per leaf, so a leaf with a
    ``None`` gradient keeps its sum and its place in the cycle (optax has one count and no
    ``None``); a new cycle starts from u itself (optax computes 0·a + u, which is NaN after a
    non-finite sum); the steps between emit −0.0 where optax emits 0·a. State:
    :class:`ApplyEveryState`; the sum in ``state_dtype`` (default: the param's dtype, float32 for
    16-bit params). Default: ``k=1`` (every update passes through).

    Examples:
        >>> tx = gx.chain(gx.scale_by_learning_rate(0.1), gx.apply_every(k=2))
        >>> state = tx.init({"w": torch.zeros(1)})
        >>> for g in (1.0, 3.0, 5.0):
        ...     u, state = tx.update({"w": torch.tensor([g])}, state)
        ...     print(u["w"])
        tensor([-0.])
        tensor([-0.4000])
        tensor([-0.])
    """
    k = C.check_int("apply_every", "k", k, low=1)

    def init_fn(params: Params) -> ApplyEveryState:
        return ApplyEveryState(count=C.counters_like_tree(params), grad_acc=C.zeros_like_tree(params, state_dtype))

    def scalars(ctx: ScalarContext) -> tuple[dict[str, Any], dict[str, Any]]:
        assert ctx.counts is not None  # declared with count="count"
        phase = ctx.counts % k
        return {"accumulate": phase != 0, "emit": phase == k - 1}, {}

    return elementwise(
        "apply_every", _apply_every, init=init_fn, scalars=scalars, state_type=ApplyEveryState,
        fields=("grad_acc",), count="count",
    )


def _apply_every(v: Inputs, sc: Inputs) -> Outputs:
    """a = a + u (a = u on a cycle's first step) in the sum's dtype; out = a on its last, else −0.0."""
    u = v.x.to(v.grad_acc.dtype)
    acc = where(sc.accumulate, v.grad_acc + u, u)
    return {"out": where(sc.emit, acc.to(v.x.dtype), -0.0), "grad_acc": acc}
