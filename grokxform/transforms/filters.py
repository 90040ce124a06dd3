"""Gradient filters (the slow component of the gradient stream) and ``amplify``.

A filter maps the gradient g_t to a slow component s_t; ``amplify(filter, λ)`` adds it back:
ĝ_t = g_t + λ·s_t. This is Grokfast (Lee et al. 2024, arXiv:2405.20233) as composable pieces.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal, NamedTuple

import torch

from grokxform import _common as C
from grokxform import _memory
from grokxform import signals as _signals
from grokxform import tree as _tree
from grokxform.base import (
    GradientTransformation, Params, Scalar, Updates, elementwise, static_hyperparams, with_extra_args_support,
)
from grokxform.declarations import (
    Amplify,
    RingWindow,  # noqa: F401 - the fused layout of MaFilterState.window, re-exported
    ScalarContext,
    WindowField,
    declaration_of,
    declare,
    run_rule,
    windowed_state,
)
from grokxform.elements import Inputs, Outputs, Scalars, TracedRule, where


class EmaFilterState(NamedTuple):
    """``step``: updates done (0-d int64); ``count``: per-leaf updates (0-d int64 each);
    ``mu``: per-leaf EMA μ; ``alpha``: the α_t of the last step; ``signal``: its GS_t (0-d f64)."""

    step: torch.Tensor
    count: Any
    mu: Any
    alpha: torch.Tensor
    signal: torch.Tensor

    def metrics(self, hyperparams: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """What :func:`grokxform.metrics` logs of this state: ``alpha``, ``signal``, ``step``,
        ``mu_norm`` (‖μ_t‖ over all leaves, float64) and ``slow_norm`` (|λ|·‖μ_t‖, the amplified
        slow component), which needs λ: the ``lamb`` of an enclosing ``inject_hyperparams``.

        Args:
            hyperparams: the injected hyperparameters of the states that enclose this one.
        """
        out = {"alpha": self.alpha, "signal": self.signal, "step": self.step}
        mu_norm = _tree_norm(self.mu)
        if mu_norm is not None:
            out["mu_norm"] = mu_norm
            lamb = hyperparams.get("lamb")
            if lamb is not None:
                out["slow_norm"] = lamb.detach().to(mu_norm.device, torch.float64).abs() * mu_norm
        return out


def _tree_norm(tree: Any) -> torch.Tensor | None:
    """√(Σ_leaves ‖leaf‖²) in float64 over the tensor leaves of ``tree``; ``None`` without any."""
    leaves = [x for x in _leaves(tree) if isinstance(x, torch.Tensor) and x.numel() > 0]
    if not leaves:
        return None
    dev = leaves[0].device
    norms = torch.stack([torch.linalg.vector_norm(x, dtype=torch.float64).to(dev) for x in leaves])
    return torch.linalg.vector_norm(norms)


def _leaves(tree: Any) -> list[Any]:
    if isinstance(tree, dict):
        return [leaf for v in tree.values() for leaf in _leaves(v)]
    if isinstance(tree, (list, tuple)):
        return [leaf for v in tree for leaf in _leaves(v)]
    return [tree]


@static_hyperparams("signal_fns")
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
    - α_t = clamp(α·exp(−κ·GS_t), 0, 1) with κ = ``signal_decay_rate`` and GS_t the grokking
      signal (:func:`grokxform.signals.compute_signal`: ``grokking_signal=``, the ``signal_fns``,
      or the loss gap of ``train_loss=``/``val_loss=`` passed to ``update``). κ = 0: α_t = α.
      The signal is data, so it is clamped, never refused: a negative GS_t (which would give
      α_t > 1 and an EMA that grows without bound) holds μ at α_t = 1; a NaN or infinite one
      counts as 0. Hyperparameters are refused instead: α outside [0, 1), κ < 0.
    - State: :class:`EmaFilterState`; μ in ``state_dtype`` (default: the gradient's dtype,
      promoted to float32 for 16-bit gradients). A leaf with a ``None`` gradient keeps its μ.

    Examples:
        >>> tx = gx.ema_filter(alpha=0.5)
        >>> state = tx.init({"w": torch.zeros(1)})
        >>> s, state = tx.update({"w": torch.tensor([2.0])}, state)     # μ_1 = g_1
        >>> s, state = tx.update({"w": torch.tensor([4.0])}, state)     # μ_2 = 0.5·2 + 0.5·4
        >>> s["w"]
        tensor([3.])
        >>> official_gradfilter_ema = gx.amplify(gx.ema_filter(alpha=0.98), lamb=2.0)
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

    fixed = not any(isinstance(x, torch.Tensor) for x in (alpha, signal_decay_rate))

    def scalars(ctx: ScalarContext) -> tuple[dict[str, Any], dict[str, Any]]:
        st = ctx.state
        if fixed and not _signals.has_signal(fns, ctx.extra):  # GS_t = 0: α_t = α, without the maths
            gs = torch.zeros((), dtype=torch.float64, device=ctx.device)
            a = torch.full((), float(alpha), dtype=torch.float64, device=ctx.device)
            values: dict[str, Any] = {"alpha": a, "one_minus_alpha": torch.full_like(a, 1.0 - float(alpha))}
        else:
            gs = _signals.compute_signal(fns, st.step, ctx.device, ctx.extra)
            a = _signals.adapted_alpha(alpha, signal_decay_rate, gs)
            values = {"alpha": a, "one_minus_alpha": 1.0 - a}
        if init == "first":
            values["first"] = ctx.counts == 0
        return values, {"step": st.step + 1, "alpha": a, "signal": gs}

    return elementwise(
        "ema_filter", _ema_first if init == "first" else _ema, init=init_fn, scalars=scalars,
        state_type=EmaFilterState, fields=("mu",), count="count",
        unsupported="its grokking signal functions run Python each step" if fns else None,
        extras=_signals.SIGNAL_INPUTS,
    )


def _ema(v: Inputs, sc: Inputs) -> Outputs:
    """μ_t = α_t·μ + (1−α_t)·g; the output is μ_t in the gradient's dtype."""
    g = v.x.to(v.mu.dtype)
    mu = v.mu * sc.alpha + g * sc.one_minus_alpha
    return {"out": mu.to(v.x.dtype), "mu": mu}


def _ema_first(v: Inputs, sc: Inputs) -> Outputs:
    """As :func:`_ema`, with μ_1 = g_1 on a leaf's first step."""
    g = v.x.to(v.mu.dtype)
    mu = where(sc.first, g, v.mu * sc.alpha + g * sc.one_minus_alpha)
    return {"out": mu.to(v.x.dtype), "mu": mu}


@windowed_state(window="window", count="count")
class MaFilterState(NamedTuple):
    """``count``: per-leaf updates; ``window``: a tuple of w trees shaped like the params, oldest
    first (zeros until filled; each leaf rotates on its own steps); ``total``: per leaf, the
    running sum of the window, in the accumulator dtype."""

    count: Any
    window: tuple[Any, ...]
    total: Any


def ma_filter(
    window_size: int = 100,
    filter_type: Literal["mean", "sum"] = "mean",
    warmup: bool = True,
    *,
    window_dtype: torch.dtype | None = None,
    accumulator_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Windowed moving average (or sum) of the last w gradients: the slow component of Grokfast-MA.

    ``A_t = (1/n_t)·Σ_{k=t−n_t+1..t} g_k`` with n_t = min(t, w) for ``"mean"`` (the sum for
    ``"sum"``). The window includes g_t. With ``warmup=True`` the output is 0 until a leaf has
    seen w gradients (official ``gradfilter_ma``: steps 1..w−1 unfiltered); with ``warmup=False``
    the mean is over the n_t gradients seen so far.

    A ring buffer plus a running sum, ``S_t = S_{t−1} − g_{t−w} + g_t``: O(1) work per step
    whatever w is (on average: every w steps the sum is re-summed from the window, below). The
    window rotates (the new state shares w−1 tensors with the old one, nothing is mutated, each
    stored gradient is a copy). ``window_dtype=torch.bfloat16`` halves the
    window's memory. State: :class:`MaFilterState`.

    The running sum is re-summed exactly every w steps: on each leaf's updates w, 2w, 3w, ... its
    ``total`` becomes the sum of the window, its w values added in order in float64 and rounded
    once to ``accumulator_dtype`` (float32, or float64 for float64 gradients, by default). A
    running sum alone keeps every rounding error it ever made: it drifts over long runs, and one
    huge gradient (1e14 among values near 0.01) leaves its errors behind when it leaves the
    window, so the output stays wrong by 100% and more for ever; a NaN never leaves it. With the
    re-sum the output is the mean of the window's values again (to the rounding of the
    accumulator) from the first re-sum after the value left: at most w steps later. Between
    re-sums a float32 sum is as accurate as the official filter's float32 sum of the window;
    ``accumulator_dtype=torch.float64`` keeps it to float64 rounding, for 8 more bytes per
    parameter and step. The re-sum reads the window once every w steps; to know when, an eager
    ``update`` reads the step counts on the host (on a GPU, one synchronisation per update; the
    fused step's kernels read them on the device).

    Examples:
        >>> tx = gx.ma_filter(window_size=2)
        >>> state = tx.init({"w": torch.zeros(1)})
        >>> for g in (1.0, 2.0, 6.0):
        ...     s, state = tx.update({"w": torch.tensor([g])}, state)
        >>> s["w"]                              # the mean of the last two gradients
        tensor([4.])
        >>> official_gradfilter_ma = gx.amplify(gx.ma_filter(window_size=100), lamb=5.0)
    """
    window_size = C.check_int("ma_filter", "window_size", window_size, low=1)
    C.check_bool("ma_filter", "warmup", warmup)
    if filter_type not in ("mean", "sum"):
        raise ValueError(f"ma_filter: filter_type must be 'mean' or 'sum', got {filter_type!r}")
    if accumulator_dtype is not None and accumulator_dtype not in (torch.float32, torch.float64):
        error = ValueError if isinstance(accumulator_dtype, torch.dtype) else TypeError
        raise error(f"ma_filter: accumulator_dtype must be torch.float32, torch.float64 or None, got {accumulator_dtype!r}")
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

    def scalars(ctx: ScalarContext) -> tuple[dict[str, Any], dict[str, Any]]:
        assert ctx.counts is not None  # declared with count="count"
        c1 = ctx.counts + 1
        values: dict[str, Any] = {}
        if filter_type == "mean":  # 1/n_t, n_t = min(t, w), in float64 (rounded to the sum's dtype)
            values["inv_n"] = 1.0 / torch.clamp(c1, max=w).to(torch.float64)
        if warmup:
            values["on"] = c1 >= w
        return values, {}

    def rule(v: Inputs, sc: Inputs) -> Outputs:
        """S_t = S − g_{t−w} + g_t in the accumulator dtype; A_t = S_t·(1/n_t); 0 during warm-up.
        (Every w steps the engines replace the stored S_t by the window's exact sum.)"""
        stored = v.x.to(v.window.dtype)
        acc = v.total.dtype
        total = v.total - v.window.to(acc) + stored.to(acc)
        out = (total * sc.inv_n if filter_type == "mean" else total).to(v.x.dtype)
        if warmup:
            out = where(sc.on, out, 0.0)
        return {"out": out, "total": total, "window": stored}

    return elementwise(
        "ma_filter", rule, init=init_fn, scalars=scalars, state_type=MaFilterState, fields=("total",), count="count",
        window=WindowField("window", w, total="total"),
    )


def amplify(filter: GradientTransformation, lamb: Scalar = 2.0) -> GradientTransformation:
    """ĝ = g + λ·filter(g): amplify the slow component found by any filter.

    The state is the filter's own (``state.mu`` for an EMA filter). Leaves with a ``None``
    gradient stay ``None``.

    Examples:
        >>> tx = gx.amplify(gx.ema_filter(0.98), lamb=2.0)
        >>> state = tx.init({"w": torch.zeros(1)})
        >>> u, state = tx.update({"w": torch.tensor([1.0])}, state)    # g + 2·μ_1 = 1 + 2·1
        >>> u["w"]
        tensor([3.])
    """
    if not isinstance(filter, GradientTransformation):
        raise TypeError(f"amplify: filter must be a GradientTransformation, got {type(filter).__name__}")
    C.check_scalar("amplify", "lamb", lamb)
    filter = with_extra_args_support(filter)  # (a filter without **extra gets what it names)

    traced = TracedRule(_amplify)

    def update_fn(updates: Updates, state: Any, params: Params | None = None, **extra: Any) -> tuple[Updates, Any]:
        slow, new_state = filter.update(updates, state, params, **extra)
        spec = _tree.check_structure(slow, updates, "gradient", "filter output")
        g_leaves, _ = _tree.flatten(updates)
        s_leaves, _ = _tree.flatten(slow)
        index = [i for i, g in enumerate(g_leaves) if g is not None]
        got = run_rule(
            traced,
            {"x": [g_leaves[i] for i in index], "slow": [s_leaves[i] for i in index]},
            Scalars({"lamb": lamb}, len(index)),
        )
        out = list(g_leaves)
        for k, i in enumerate(index):
            out[i] = got["out"][k]
        return _tree.unflatten(out, spec), new_state

    tx = GradientTransformation(filter.init, update_fn)
    return declare(tx, Amplify(declaration_of(filter), traced, lamb))


def _amplify(v: Inputs, sc: Inputs) -> Outputs:
    """ĝ = g + λ·s in the gradient's dtype."""
    return {"out": v.x + v.slow.to(v.x.dtype) * sc.lamb}
