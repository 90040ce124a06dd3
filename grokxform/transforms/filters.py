"""Gradient filters (the slow component of the gradient stream) and ``amplify``.

A filter maps the gradient g_t to a slow component s_t; ``amplify(filter, λ)`` adds it back:
ĝ_t = g_t + λ·s_t. This is Grokfast (Lee et al. 2024, arXiv:2405.20233) as composable pieces.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch

from grokxform import _common as C
from grokxform import _memory
from grokxform import signals as _signals
from grokxform import tree as _tree
from grokxform.base import GradientTransformation, Params, Scalar, Updates


class EmaFilterState(NamedTuple):
    """``step``: updates done (0-d int64); ``count``: per-leaf updates (0-d int64 each);
    ``mu``: per-leaf EMA μ; ``alpha``: the α_t of the last step; ``signal``: its GS_t (0-d f64)."""

    step: torch.Tensor
    count: Any
    mu: Any
    alpha: torch.Tensor
    signal: torch.Tensor


def ema_filter(
    alpha: Scalar = 0.98,
    *,
    init: Literal["first", "zeros"] = "first",
    signal_fns: Any = None,
    signal_decay_rate: Scalar = 0.0,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Exponential moving average of the gradients: the slow component of Grokfast-EMA.

    ``μ_t = α_t·μ_{t-1} + (1−α_t)·g_t`` and the output is μ_t (a fresh tensor, never the state).

    - ``init="first"`` (official Grokfast): each leaf's μ is seeded with its first gradient, so
      step 1 gives μ_1 = g_1 (no bias correction). ``init="zeros"`` (GrokAdamW): μ_0 = 0.
    - α_t = α·exp(−κ·GS_t) with κ = ``signal_decay_rate`` and GS_t the grokking signal
      (:func:`grokxform.signals.compute_signal`: ``grokking_signal=``, the ``signal_fns``, or
      the loss gap of ``train_loss=``/``val_loss=`` passed to ``update``). κ = 0: α_t = α.
    - State: :class:`EmaFilterState`; μ in ``state_dtype`` (default: the gradient's dtype,
      promoted to float32 for 16-bit gradients). A leaf with a ``None`` gradient keeps its μ.

    Example::

        tx = amplify(ema_filter(alpha=0.98), lamb=2.0)   # official gradfilter_ema
    """
    C.check_scalar("ema_filter", "alpha", alpha, low=0.0, high=1.0, high_open=True)
    C.check_scalar("ema_filter", "signal_decay_rate", signal_decay_rate, low=0.0)
    if init not in ("first", "zeros"):
        raise ValueError(f"ema_filter: init must be 'first' or 'zeros', got {init!r}")
    fns = _signals.check_signal_fns(signal_fns)

    def init_fn(params: Params) -> EmaFilterState:
        dev = _tree.first_device(params)
        return EmaFilterState(
            step=C.counter(dev),
            count=C.counters_like_tree(params),
            mu=C.zeros_like_tree(params, state_dtype),
            alpha=C.f64(alpha, dev),
            signal=torch.zeros((), dtype=torch.float64, device=dev),
        )

    def update_fn(
        updates: Updates, state: EmaFilterState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, EmaFilterState]:
        del params
        C.check_state(state, EmaFilterState, "ema_filter")
        dev = state.step.device
        gs = _signals.compute_signal(fns, state.step, dev, extra)
        a = _signals.adapted_alpha(alpha, signal_decay_rate, gs)
        one_minus_a = 1.0 - a

        def leaf(i: int, g: torch.Tensor, c: torch.Tensor, mu: torch.Tensor) -> tuple[Any, ...]:
            gs_ = g.to(mu.dtype)
            blended = mu * a.to(mu.dtype) + gs_ * one_minus_a.to(mu.dtype)
            new_mu = torch.where(c == 0, gs_, blended) if init == "first" else blended
            return new_mu.to(g.dtype, copy=True), c + 1, new_mu

        out, count, mu = C.map_present(leaf, updates, (state.count, state.mu), "ema_filter")
        return out, EmaFilterState(state.step + 1, count, mu, a, gs)

    return GradientTransformation(init_fn, update_fn)


class MaFilterState(NamedTuple):
    """``count``: per-leaf updates; ``window``: a tuple of w trees shaped like the params, oldest
    first (zeros until filled; each leaf rotates on its own steps); ``total``: per-leaf running
    sum of the window, in the accumulator dtype."""

    count: Any
    window: tuple[Any, ...]
    total: Any


class MaRingWindow(NamedTuple):
    """Another layout of :class:`MaFilterState`'s window, used by :mod:`grokxform.fused`: one
    ``[w, *shape]`` buffer per leaf whose slot ``count % w`` holds the oldest gradient. Same
    numbers; the update writes one slot, so a compiled step can do it in place."""

    buffers: Any


def ma_filter(
    window_size: int = 100,
    filter_type: Literal["mean", "sum"] = "mean",
    warmup: bool = True,
    *,
    window_dtype: torch.dtype | None = None,
    accumulator_dtype: torch.dtype = torch.float64,
) -> GradientTransformation:
    """Windowed moving average (or sum) of the last w gradients: the slow component of Grokfast-MA.

    ``A_t = (1/n_t)·Σ_{k=t−n_t+1..t} g_k`` with n_t = min(t, w) for ``"mean"`` (the sum for
    ``"sum"``). The window includes g_t. With ``warmup=True`` the output is 0 until a leaf has
    seen w gradients (official ``gradfilter_ma``: steps 1..w−1 unfiltered); with ``warmup=False``
    the mean is over the n_t gradients seen so far.

    A ring buffer plus a running sum, ``S_t = S_{t−1} − g_{t−w} + g_t``: O(1) work per step
    whatever w is. The window rotates (the new state shares w−1 tensors with the old one, nothing
    is mutated, each stored gradient is a copy); the running sum is kept in ``accumulator_dtype``
    (float64 by default), so it does not drift over 10^5 steps. ``window_dtype=torch.bfloat16``
    halves the window's memory. State: :class:`MaFilterState`.

    Example::

        tx = amplify(ma_filter(window_size=100), lamb=5.0)   # official gradfilter_ma
    """
    if isinstance(window_size, bool) or not isinstance(window_size, int):
        raise TypeError(f"ma_filter: window_size must be an int, got {type(window_size).__name__}")
    if window_size < 1:
        raise ValueError(f"ma_filter: window_size must be >= 1, got {window_size}")
    if filter_type not in ("mean", "sum"):
        raise ValueError(f"ma_filter: filter_type must be 'mean' or 'sum', got {filter_type!r}")
    w = window_size

    def init_fn(params: Params) -> MaFilterState:
        _memory.check_ma_window(params, w, window_dtype, accumulator_dtype)  # raises before allocating
        return MaFilterState(
            count=C.counters_like_tree(params),
            window=tuple(
                _tree.tree_map(lambda p: None if p is None else torch.zeros_like(p, dtype=window_dtype or p.dtype), params)
                for _ in range(w)
            ),
            total=C.zeros_like_tree(params, accumulator_dtype),
        )

    def update_fn(
        updates: Updates, state: MaFilterState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, MaFilterState]:
        del params, extra
        C.check_state(state, MaFilterState, "ma_filter")
        ring = isinstance(state.window, MaRingWindow)
        if not ring and (not isinstance(state.window, tuple) or len(state.window) != w):
            raise ValueError(f"ma_filter: the state's window must be a tuple of {w} trees")
        spec = _tree.check_structure(updates, state.total, "ma_filter state", "gradient")
        slots = [] if ring else [_tree.flatten(t)[0] for t in state.window]  # slots[k][i]: slot k of leaf i

        def leaf(i: int, g: torch.Tensor, c: torch.Tensor, total: torch.Tensor, buf: Any) -> tuple[Any, ...]:
            slot = torch.remainder(c, w).reshape(1) if ring else None
            oldest = buf.index_select(0, slot).squeeze(0) if ring else slots[0][i]
            stored = g.to(oldest.dtype, copy=True)
            new_total = total - oldest.to(total.dtype) + stored.to(total.dtype)
            c1 = c + 1
            avg = new_total / torch.clamp(c1, max=w).to(total.dtype) if filter_type == "mean" else new_total
            out = avg.to(g.dtype)
            if warmup:
                out = torch.where(c1 >= w, out, torch.zeros_like(out))
            if ring:  # the ring buffer with the oldest slot overwritten (in place once compiled)
                stored = buf.index_put((slot,), stored.unsqueeze(0))
            return out, c1, new_total, stored

        # The third tree stands in for the stored copies (leaves without a gradient store nothing).
        third = state.window.buffers if ring else state.count
        out, count, total, stored = C.map_present(leaf, updates, (state.count, state.total, third), "ma_filter")
        if ring:
            return out, MaFilterState(count, MaRingWindow(stored), total)
        # Rotate the window of each leaf that got a gradient; the others keep their slots.
        present = [g is not None for g in _tree.flatten(updates)[0]]
        stored_leaves = _tree.flatten(stored)[0]
        new_slots = [
            [slots[k + 1][i] if ok else slots[k][i] for i, ok in enumerate(present)] for k in range(w - 1)
        ]
        new_slots.append([stored_leaves[i] if ok else slots[w - 1][i] for i, ok in enumerate(present)])
        window = tuple(_tree.unflatten(leaves, spec) for leaves in new_slots)
        return out, MaFilterState(count, window, total)

    return GradientTransformation(init_fn, update_fn)


def amplify(filter: GradientTransformation, lamb: Scalar = 2.0) -> GradientTransformation:
    """ĝ = g + λ·filter(g): amplify the slow component found by any filter.

    The state is the filter's own (``state.mu`` for an EMA filter). Leaves with a ``None``
    gradient stay ``None``.

    Example::

        tx = chain(amplify(ema_filter(0.98), lamb=2.0), scale_by_adam(), scale_by_learning_rate(1e-3))
    """
    if not isinstance(filter, GradientTransformation):
        raise TypeError(f"amplify: filter must be a GradientTransformation, got {type(filter).__name__}")
    C.check_scalar("amplify", "lamb", lamb)

    def update_fn(updates: Updates, state: Any, params: Params | None = None, **extra: Any) -> tuple[Updates, Any]:
        slow, new_state = filter.update(updates, state, params, **extra)
        spec = _tree.check_structure(slow, updates, "gradient", "filter output")
        g_leaves, _ = _tree.flatten(updates)
        s_leaves, _ = _tree.flatten(slow)
        out = [
            None if g is None else g + s.to(g.dtype) * C.scalar_for(lamb, g)
            for g, s in zip(g_leaves, s_leaves)
        ]
        return _tree.unflatten(out, spec), new_state

    return GradientTransformation(filter.init, update_fn)
