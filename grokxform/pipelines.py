"""Ready-made optimizers: each is a ``named_chain`` of the public primitives, nothing else, so a
user can rebuild any of them by hand (the tests do, bit for bit) and ablate one piece.

================  ===========================================================================
``adamw``          torch.optim.AdamW (to 1e-12 in float64)
``grokfast_ema``   official ``gradfilter_ema`` in front of AdamW (or of Adam + coupled L2)
``grokfast_ma``    official ``gradfilter_ma`` in front of AdamW (or of Adam + coupled L2)
``grokadamw``      GrokAdamW as its README describes it: global clip, signal of the losses
``grokadamw_compat``  the numbers of the ``grokadamw==0.1.2`` package
``sgd``            torch.optim.SGD (momentum, Nesterov, coupled weight decay)
``lion``           Lion (Chen et al. 2023), as ``pytorch_optimizer.Lion``
``lamb``           LAMB (You et al. 2020), as optax's; ``pytorch_optimizer.Lamb``'s numbers too
``adam``           torch.optim.Adam without weight decay (optax's ``adam``)
``nadam``          torch.optim.NAdam (Dozat's momentum schedule, coupled or decoupled decay)
``rmsprop``        torch.optim.RMSprop (centered, momentum, coupled weight decay)
``ademamix``       AdEMAMix (Pagliardini et al. 2024), as ``pytorch_optimizer.AdEMAMix``
``muon``           torch.optim.Muon (matrices; pair it with ``adamw`` through ``partition``)
================  ===========================================================================

The Grokfast paper's setting (``torch.optim.Adam(weight_decay=wd)`` after the filter, β=(0.9,
0.98), ``LambdaLR(min(1, t/10))``) is ``grokfast_ema(lr=linear_warmup(1e-3, 10), betas=(0.9, 0.98),
weight_decay=0.005, weight_decay_mode="coupled")`` (λ=2, α=0.98), and likewise for MA.
"""

from __future__ import annotations

from typing import Any, Literal, Union, cast

import torch

from grokxform import _common as C
from grokxform.base import GradientTransformation, Scalar, Schedule, named_chain, static_hyperparams
from grokxform.signals import SignalFn
from grokxform.transforms.adam import LayerFn, layerwise_beta, scale_by_adam
from grokxform.transforms.ademamix import scale_by_ademamix
from grokxform.transforms.clipping import clip_by_global_norm, clip_by_tensor_norm
from grokxform.transforms.filters import amplify, ema_filter, ma_filter
from grokxform.transforms.lion import scale_by_lion
from grokxform.transforms.schedules import scale_by_learning_rate
from grokxform.transforms.masks import Mask
from grokxform.transforms.momentum import trace
from grokxform.transforms.trust_ratio import scale_by_trust_ratio
from grokxform.transforms.nadam import scale_by_nadam
from grokxform.transforms.rms import scale_by_rms, scale_by_stddev
from grokxform.transforms.muon import NS_COEFFICIENTS, AdjustLR, muon_momentum, orthogonalize
from grokxform.transforms.weight_decay import decoupled_weight_decay

LearningRate = Union[Scalar, Schedule]
WeightDecayMode = Literal["decoupled", "coupled"]


def _betas(fn: str, betas: Any) -> tuple[Scalar, Scalar]:
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"{fn}: betas must be a pair (beta1, beta2), got {betas!r}")
    C.check_scalar(fn, "betas[0]", betas[0], low=0.0, high=1.0, high_open=True)
    C.check_scalar(fn, "betas[1]", betas[1], low=0.0, high=1.0, high_open=True)
    return betas[0], betas[1]


def _adam_with_decay(
    fn: str,
    pre: list[tuple[str, GradientTransformation]],
    adam: GradientTransformation,
    lr: LearningRate,
    weight_decay: Scalar,
    mode: WeightDecayMode,
    mask: Mask,
) -> GradientTransformation:
    """``pre`` → (L2 →) Adam (→ decoupled decay) → −lr."""
    if mode not in ("decoupled", "coupled"):
        raise ValueError(f"{fn}: weight_decay_mode must be 'decoupled' or 'coupled', got {mode!r}")
    C.check_scalar(fn, "weight_decay", weight_decay, low=0.0)
    decay = ("weight_decay", decoupled_weight_decay(weight_decay, mask=mask))
    steps = [*pre]
    if mode == "coupled":
        steps.append(decay)
    steps.append(("adam", adam))
    if mode == "decoupled":
        steps.append(decay)
    steps.append(("lr", _lr(fn, lr)))
    return named_chain(*steps)


def _lr(fn: str, lr: LearningRate) -> GradientTransformation:
    if not callable(lr) or isinstance(lr, torch.Tensor):
        C.check_scalar(fn, "lr", lr, low=0.0)
    return scale_by_learning_rate(lr)


@static_hyperparams("weight_decay_mask")
def adamw(
    lr: LearningRate = 1e-3,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 1e-2,
    *,
    weight_decay_mask: Mask = None,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """AdamW (Loshchilov & Hutter), as torch.optim.AdamW: ``θ ← θ − η·(adam(g) + wd·θ)``.

    Chain: ``adam`` → ``weight_decay`` → ``lr``. Defaults are torch's.

    Examples:
        >>> tx = gx.adamw(lr=0.1, weight_decay=0.0)
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> state = tx.init(params)
        >>> grads = {"w": torch.tensor([0.5, -0.5])}
        >>> updates, state = tx.update(grads, state, params)
        >>> updates["w"]                       # Adam's first step: −lr·sign(g)
        tensor([-0.1000,  0.1000])
    """
    b1, b2 = _betas("adamw", betas)
    adam = scale_by_adam(b1, b2, eps, state_dtype=state_dtype)
    return _adam_with_decay("adamw", [], adam, lr, weight_decay, "decoupled", weight_decay_mask)


@static_hyperparams("weight_decay_mask")
def grokfast_ema(
    lr: LearningRate = 1e-3,
    alpha: Scalar = 0.98,
    lamb: Scalar = 2.0,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 1e-2,
    *,
    weight_decay_mode: WeightDecayMode = "decoupled",
    weight_decay_mask: Mask = None,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Grokfast-EMA (official ``gradfilter_ema``) in front of AdamW.

    ``μ ← α·μ + (1−α)·g`` (μ seeded with the first gradient), ``ĝ = g + λ·μ``, then AdamW; with
    ``weight_decay_mode="coupled"``, Adam with L2 ``ĝ + wd·θ`` as the paper ran it.
    Chain: ``grokfast`` → ``adam`` → ``weight_decay`` → ``lr`` (``weight_decay`` before ``adam``
    when coupled). α=0.98, λ=2 are ``gradfilter_ema``'s defaults; the paper's modular runs use
    them with wd 0.005 (coupled).

    Examples:
        >>> tx = gx.grokfast_ema(lr=1e-3, alpha=0.98, lamb=2.0, weight_decay=0.005, weight_decay_mode="coupled")
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> state = tx.init(params)
        >>> grads = {"w": torch.tensor([0.5, -0.5])}
        >>> updates, state = tx.update(grads, state, params)
        >>> state["grokfast"].mu["w"]         # the EMA starts at the first gradient
        tensor([ 0.5000, -0.5000])
    """
    b1, b2 = _betas("grokfast_ema", betas)
    pre = [("grokfast", amplify(ema_filter(alpha, init="first", state_dtype=state_dtype), lamb))]
    adam = scale_by_adam(b1, b2, eps, state_dtype=state_dtype)
    return _adam_with_decay("grokfast_ema", pre, adam, lr, weight_decay, weight_decay_mode, weight_decay_mask)


@static_hyperparams("weight_decay_mask")
def grokfast_ma(
    lr: LearningRate = 1e-3,
    window_size: int = 100,
    lamb: Scalar = 5.0,
    filter_type: Literal["mean", "sum"] = "mean",
    warmup: bool = True,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 1e-2,
    *,
    weight_decay_mode: WeightDecayMode = "decoupled",
    weight_decay_mask: Mask = None,
    window_dtype: torch.dtype | None = None,
    accumulator_dtype: torch.dtype | None = None,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Grokfast-MA (official ``gradfilter_ma``) in front of AdamW.

    ``ĝ = g + λ·mean(last w gradients)`` (after w−1 unfiltered steps with ``warmup``), then AdamW;
    ``weight_decay_mode="coupled"`` gives Adam with L2 as in the paper. w=100, λ=5, ``"mean"``,
    warm-up on are ``gradfilter_ma``'s defaults. ``window_dtype=torch.bfloat16`` halves the
    window's memory (w copies of the gradients); ``accumulator_dtype`` is the running sum's
    (:func:`~grokxform.ma_filter`: float32 by default, float64 for float64 params).
    Chain: ``grokfast`` → ``adam`` → ``weight_decay`` → ``lr``.

    Examples:
        >>> tx = gx.grokfast_ma(lr=1e-3, window_size=100, lamb=5.0, weight_decay=0.01, weight_decay_mode="coupled")
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> state = tx.init(params)
        >>> grads = {"w": torch.tensor([0.5, -0.5])}
        >>> updates, state = tx.update(grads, state, params)
        >>> updates["w"].shape
        torch.Size([2])
    """
    b1, b2 = _betas("grokfast_ma", betas)
    filt = ma_filter(window_size, filter_type, warmup, window_dtype=window_dtype, accumulator_dtype=accumulator_dtype)
    pre = [("grokfast", amplify(filt, lamb))]
    adam = scale_by_adam(b1, b2, eps, state_dtype=state_dtype)
    return _adam_with_decay("grokfast_ma", pre, adam, lr, weight_decay, weight_decay_mode, weight_decay_mask)


def _clip_enabled(fn: str, gradient_clipping: Scalar) -> bool:
    C.check_scalar(fn, "gradient_clipping", gradient_clipping, low=0.0)
    return isinstance(gradient_clipping, torch.Tensor) or gradient_clipping > 0


@static_hyperparams("grokking_signal_fns", "gamma", "layer", "gradient_clipping", "weight_decay_mask")
def grokadamw(
    lr: LearningRate = 1e-3,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 1e-2,
    alpha_init: Scalar = 0.98,
    lamb: Scalar = 2.0,
    gamma: float = 0.1,
    grokking_signal_fns: list[SignalFn] | SignalFn | None = None,
    grokking_signal_decay_rate: Scalar = 0.1,
    gradient_clipping: Scalar = 1.0,
    *,
    layer: Union[Literal["index", "depth"], LayerFn] = "depth",
    weight_decay_mask: Mask = None,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """GrokAdamW as its README states the maths, done right.

    1. ``clip``: one global norm, ``g ← g·min(1, c/(‖g‖+1e−6))`` (``clip_grad_norm_(parameters)``);
       off when ``gradient_clipping`` is 0.
    2. ``grokfast``: ``α_t = clamp(α_init·exp(−κ·GS_t), 0, 1)`` (a negative signal cannot push
       α_t past 1), ``μ ← α_t·μ + (1−α_t)·g`` (μ_0 = 0),
       ``ĝ = g + λ·μ``. GS_t: ``grokking_signal=`` passed to ``update``, else the mean of
       ``grokking_signal_fns(train_loss, val_loss[, step])``, else the loss gap
       ``max(0, L_val−L_train)/max(L_val, L_train)`` of ``train_loss=``/``val_loss=``, else 0.
    3. ``adam``: β1_l = β1·(1−γ)^l per layer l (``layer="depth"``: the block number in the path;
       ``"index"``: GrokAdamW's tensor index), each bias-corrected with its own β1.
    4. ``weight_decay``: decoupled, ``+wd·θ``.   5. ``lr``: ``−η``.

    Starting point for grokking: ``weight_decay=1.0, alpha_init=0.9`` with the other defaults.
    The default ``weight_decay=0.01`` did not grok x·y mod 97 in 3,000 steps (2 of 39 runs);
    with 1.0 every run did, median 780 steps at ``alpha_init=0.9`` (890 at 0.98), and it held on
    x−y and x/y mod 97 (lr 1e-3 with a 10-step warm-up, β = (0.9, 0.98); ``docs/results.md``).

    Examples:
        >>> tx = gx.grokadamw(lr=1e-3)
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> state = tx.init(params)
        >>> grads = {"w": torch.tensor([0.5, -0.5])}
        >>> updates, state = tx.update(grads, state, params, train_loss=torch.tensor(0.1), val_loss=torch.tensor(2.0))
        >>> params = gx.apply_updates(params, updates)
        >>> params["w"]
        tensor([ 0.9990, -1.9990])
    """
    b1, b2 = _betas("grokadamw", betas)
    C.check_scalar("grokadamw", "alpha_init", alpha_init, low=0.0, high=1.0, high_open=True)
    C.check_scalar("grokadamw", "gamma", gamma, low=0.0, high=1.0)
    steps: list[tuple[str, GradientTransformation]] = []
    if _clip_enabled("grokadamw", gradient_clipping):
        steps.append(("clip", clip_by_global_norm(gradient_clipping)))
    ema = ema_filter(
        alpha_init,
        init="zeros",
        signal_fns=grokking_signal_fns,
        signal_decay_rate=grokking_signal_decay_rate,
        state_dtype=state_dtype,
    )
    steps.append(("grokfast", amplify(ema, lamb)))
    beta1 = layerwise_beta(cast(float, b1), gamma, layer) if gamma != 0 else b1
    adam = scale_by_adam(beta1, b2, eps, state_dtype=state_dtype)
    return _adam_with_decay("grokadamw", steps, adam, lr, weight_decay, "decoupled", weight_decay_mask)


@static_hyperparams("grokking_signal_fns", "gamma", "gradient_clipping")
def grokadamw_compat(
    lr: LearningRate = 1e-3,
    betas: tuple[Scalar, Scalar] = (0.9, 0.999),
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 1e-2,
    alpha_init: Scalar = 0.98,
    lamb: Scalar = 2.0,
    gamma: float = 0.1,
    grokking_signal_fns: list[SignalFn] | SignalFn | None = None,
    grokking_signal_decay_rate: Scalar = 0.1,
    gradient_clipping: Scalar = 1.0,
) -> GradientTransformation:
    """The numbers of ``grokadamw==0.1.2``'s ``GrokAdamW`` (its code, not its README).

    Differences from :func:`grokadamw`, all kept on purpose for reproduction: the clip is per
    tensor; β1_i = β1·(1−γ)^i with i the index of the tensor among those with a gradient;
    the bias correction uses the base β1 and ε is added before it,
    ``θ ← θ − η·√(1−β2^t)/(1−β1^t)·m/(√v+ε)``; signal functions are called with no argument
    (functions of the losses work too). One param group: the index runs over the whole tree.

    Examples:
        >>> tx = gx.grokadamw_compat(lr=1e-3)
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> state = tx.init(params)
        >>> grads = {"w": torch.tensor([0.5, -0.5])}
        >>> updates, state = tx.update(grads, state, params, train_loss=0.1, val_loss=2.0)
        >>> updates["w"].shape
        torch.Size([2])
    """
    b1, b2 = _betas("grokadamw_compat", betas)
    C.check_scalar("grokadamw_compat", "alpha_init", alpha_init, low=0.0, high=1.0, high_open=True)
    C.check_scalar("grokadamw_compat", "gamma", gamma, low=0.0, high=1.0)
    steps: list[tuple[str, GradientTransformation]] = []
    if _clip_enabled("grokadamw_compat", gradient_clipping):
        steps.append(("clip", clip_by_tensor_norm(gradient_clipping)))
    ema = ema_filter(
        alpha_init, init="zeros", signal_fns=grokking_signal_fns, signal_decay_rate=grokking_signal_decay_rate
    )
    steps.append(("grokfast", amplify(ema, lamb)))
    adam = scale_by_adam(layerwise_beta(cast(float, b1), gamma, "index"), b2, eps, eps_placement="raw", bias_correction_b1=b1)
    return _adam_with_decay("grokadamw_compat", steps, adam, lr, weight_decay, "decoupled", None)


@static_hyperparams("momentum", "nesterov", "weight_decay_mask")
def sgd(
    lr: LearningRate = 1e-3,
    momentum: Scalar = 0.0,
    nesterov: bool = False,
    weight_decay: Scalar = 0.0,
    *,
    weight_decay_mask: Mask = None,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Stochastic gradient descent, as ``torch.optim.SGD(lr, momentum, weight_decay=wd,
    nesterov=nesterov)`` (``dampening=0``): ``g ← g + wd·θ`` (coupled L2), ``b ← μ·b + g``
    (``b_1 = g_1``), ``d = g + μ·b`` with Nesterov else ``b``, ``θ ← θ − η·d``.

    Chain: ``weight_decay`` (:func:`~grokxform.decoupled_weight_decay` placed before the momentum,
    which makes it torch's coupled decay) → ``momentum`` (:func:`~grokxform.trace`; left out when
    ``momentum`` is 0, as torch keeps no buffer then) → ``lr``. ``momentum`` decides the chain, so
    :func:`~grokxform.inject_hyperparams` (and :class:`~grokxform.Optimizer`'s param groups) keep
    it fixed. Defaults are torch's. Each step's ops are torch's, rounded after each op; torch
    fuses ``g + wd·θ``, ``g + μ·b`` and ``θ − η·d`` into one multiply-add each on the CPU, so a
    float32 step can differ from torch's by an ulp.

    Examples:
        >>> tx = gx.sgd(lr=0.1, momentum=0.9)
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> state = tx.init(params)
        >>> for _ in range(2):
        ...     updates, state = tx.update({"w": torch.tensor([1.0, 1.0])}, state, params)
        >>> state["momentum"].trace["w"]       # b = 0.9·1 + 1
        tensor([1.9000, 1.9000])
        >>> updates["w"]
        tensor([-0.1900, -0.1900])
    """
    C.check_scalar("sgd", "momentum", momentum, low=0.0)
    C.check_bool("sgd", "nesterov", nesterov)
    C.check_scalar("sgd", "weight_decay", weight_decay, low=0.0)
    with_momentum = isinstance(momentum, torch.Tensor) or momentum > 0
    if nesterov and not with_momentum:
        raise ValueError("sgd: Nesterov momentum requires a momentum above 0")
    steps: list[tuple[str, GradientTransformation]] = [
        ("weight_decay", decoupled_weight_decay(weight_decay, mask=weight_decay_mask))
    ]
    if with_momentum:
        steps.append(("momentum", trace(momentum, nesterov, state_dtype=state_dtype)))
    steps.append(("lr", _lr("sgd", lr)))
    return named_chain(*steps)


@static_hyperparams("weight_decay_mask")
def lion(
    lr: LearningRate = 1e-4,
    b1: Scalar = 0.9,
    b2: Scalar = 0.99,
    weight_decay: Scalar = 0.0,
    *,
    weight_decay_mask: Mask = None,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms"):
    ``θ ← θ − η·(sign(β1·m + (1−β1)·g) + wd·θ)``, ``m ← β2·m + (1−β2)·g``.

    Chain: ``lion`` (:func:`~grokxform.scale_by_lion`) → ``weight_decay`` (decoupled,
    :func:`~grokxform.decoupled_weight_decay`) → ``lr``. Defaults are the paper's and
    ``pytorch_optimizer.Lion``'s; the paper pairs Lion with a learning rate 3-10x below AdamW's
    and a weight decay 3-10x above. Without weight decay the params are ``pytorch_optimizer.Lion``'s
    bit for bit (float32); with it, that package scales θ by ``1 − η·wd`` rounded to the
    param's dtype, which makes float32 steps differ by an ulp or two.

    Examples:
        >>> tx = gx.lion(lr=1e-4, weight_decay=0.1)
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, 0.5])}, state, params)
        >>> updates["w"]                       # −η·(sign(g) + wd·θ)
        tensor([-1.1000e-04, -8.0000e-05])
        >>> state["lion"].mu["w"]
        tensor([0.0050, 0.0050])
    """
    C.check_scalar("lion", "weight_decay", weight_decay, low=0.0)
    return named_chain(
        ("lion", scale_by_lion(b1, b2, state_dtype=state_dtype)),
        ("weight_decay", decoupled_weight_decay(weight_decay, mask=weight_decay_mask)),
        ("lr", _lr("lion", lr)),
    )


@static_hyperparams("weight_decay_mask", "bias_correction")
def lamb(
    lr: LearningRate = 1e-3,
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    eps: Scalar = 1e-6,
    weight_decay: Scalar = 0.0,
    *,
    bias_correction: bool = True,
    trust_ratio_eps: Scalar = 0.0,
    weight_decay_mask: Mask = None,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """LAMB (You et al. 2020, "Large Batch Optimization for Deep Learning", arXiv:1904.00962), as
    optax's ``lamb``: per leaf, ``r = adam(g) + wd·θ`` and ``θ ← θ − η·(‖θ‖/‖r‖)·r`` (a ratio of 1
    where ‖θ‖ or ‖r‖ is 0).

    Chain: ``adam`` (:func:`~grokxform.scale_by_adam`, bias-corrected as in the paper's Algorithm
    2) → ``weight_decay`` (:func:`~grokxform.decoupled_weight_decay`, added to the update before
    the ratio) → ``trust_ratio`` (:func:`~grokxform.scale_by_trust_ratio`, with ``eps=trust_ratio_eps``)
    → ``lr``. Defaults are optax's (``eps=1e-6``, no weight decay).

    ``pytorch_optimizer.Lamb`` (4.1.0) computes this chain with ``weight_decouple=False`` (its
    default, ``True``, shrinks θ by ``1 − η·wd`` outside the ratio) and ``adam_debias=True`` (its
    default divides the step by ``1 − β1^t`` after the ratio), without bias correction and with its
    ``eps`` in the ratio's denominator, and it caps ‖θ‖ at ``Lamb.clamp = 10``: ``lamb(...,
    bias_correction=False, trust_ratio_eps=eps)`` gives its numbers wherever ‖θ‖ ≤ 10 (to 1e-12 in
    float64, a few ulps a step in float32).

    Examples:
        >>> tx = gx.lamb(lr=0.1, weight_decay=0.01)
        >>> params = {"w": torch.tensor([3.0, 4.0])}
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"w": torch.tensor([0.5, -0.5])}, state, params)
        >>> updates["w"]                       # −η·(‖θ‖/‖r‖)·r, r = sign(g) + wd·θ
        tensor([-0.3658,  0.3409])
    """
    C.check_scalar("lamb", "weight_decay", weight_decay, low=0.0)
    return named_chain(
        ("adam", scale_by_adam(b1, b2, eps, bias_correction=bias_correction, state_dtype=state_dtype)),
        ("weight_decay", decoupled_weight_decay(weight_decay, mask=weight_decay_mask)),
        ("trust_ratio", scale_by_trust_ratio(eps=trust_ratio_eps)),
        ("lr", _lr("lamb", lr)),
    )


def adam(
    lr: LearningRate = 1e-3,
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    eps: Scalar = 1e-8,
    *,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Adam (Kingma & Ba), as ``torch.optim.Adam`` without weight decay and as optax's ``adam``:
    ``θ ← θ − η·m̂/(√v̂ + ε)``.

    Chain: ``adam`` (:func:`~grokxform.scale_by_adam`) → ``lr``. Adam with weight decay is
    :func:`adamw` (decoupled), or ``weight_decay_mode="coupled"`` of the Grokfast pipelines and
    :func:`nadam`. Defaults are torch's.

    Examples:
        >>> tx = gx.adam(lr=0.1)
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> updates, state = tx.update({"w": torch.tensor([0.5, -0.5])}, tx.init(params), params)
        >>> updates["w"]                       # the first step: −lr·sign(g)
        tensor([-0.1000,  0.1000])
    """
    return named_chain(("adam", scale_by_adam(b1, b2, eps, state_dtype=state_dtype)), ("lr", _lr("adam", lr)))


@static_hyperparams("weight_decay_mask")
def nadam(
    lr: LearningRate = 2e-3,
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0.0,
    momentum_decay: Scalar = 4e-3,
    *,
    weight_decay_mode: WeightDecayMode = "coupled",
    weight_decay_mask: Mask = None,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """NAdam, as ``torch.optim.NAdam(lr, betas=(b1, b2), eps, weight_decay, momentum_decay)``:
    :func:`~grokxform.scale_by_nadam`'s direction with Dozat's momentum schedule, then −η.

    Chain: ``weight_decay`` (coupled L2, ``g + wd·θ``: torch's default) → ``adam``
    (:func:`~grokxform.scale_by_nadam`) → ``lr``; ``weight_decay_mode="decoupled"`` (torch's
    ``decoupled_weight_decay=True``, ``θ·(1 − η·wd)``) puts the decay after ``adam``. Defaults
    are torch's.

    Examples:
        >>> tx = gx.nadam(lr=2e-3, weight_decay=1e-2)
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> updates, state = tx.update({"w": torch.tensor([0.5, -0.5])}, tx.init(params), params)
        >>> list(state)
        ['weight_decay', 'adam', 'lr']
    """
    adam_ = scale_by_nadam(b1, b2, eps, momentum_decay, state_dtype=state_dtype)
    return _adam_with_decay("nadam", [], adam_, lr, weight_decay, weight_decay_mode, weight_decay_mask)


@static_hyperparams("momentum", "centered", "weight_decay_mask")
def rmsprop(
    lr: LearningRate = 1e-2,
    decay: Scalar = 0.99,
    eps: Scalar = 1e-8,
    momentum: Scalar = 0.0,
    centered: bool = False,
    weight_decay: Scalar = 0.0,
    *,
    weight_decay_mask: Mask = None,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """RMSprop, as ``torch.optim.RMSprop(lr, alpha=decay, eps, weight_decay, momentum, centered)``:
    ``g ← g + wd·θ``, ``ν ← decay·ν + (1−decay)·g²`` (and ``μ ← decay·μ + (1−decay)·g`` when
    centered), ``d = g/(√ν + ε)`` (``g/(√(ν − μ²) + ε)``), with momentum ``b ← m·b + d``,
    ``θ ← θ − η·b`` (else ``θ ← θ − η·d``).

    Chain: ``weight_decay`` (coupled: placed before the root) → ``rms``
    (:func:`~grokxform.scale_by_rms`, or :func:`~grokxform.scale_by_stddev` when ``centered``) →
    ``momentum`` (:func:`~grokxform.trace`; left out at momentum 0, as torch keeps no buffer then)
    → ``lr``. ``momentum`` and ``centered`` decide the chain, so
    :func:`~grokxform.inject_hyperparams` keeps them fixed. Defaults are torch's (ε outside the
    root, ν from 0; optax's ``rmsprop`` puts ε inside).

    Examples:
        >>> tx = gx.rmsprop(lr=0.01, momentum=0.9, centered=True)
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> updates, state = tx.update({"w": torch.tensor([0.5, -0.5])}, tx.init(params), params)
        >>> list(state), type(state["rms"]).__name__
        (['weight_decay', 'rms', 'momentum', 'lr'], 'ScaleByRStdDevState')
    """
    C.check_scalar("rmsprop", "momentum", momentum, low=0.0)
    C.check_bool("rmsprop", "centered", centered)
    C.check_scalar("rmsprop", "weight_decay", weight_decay, low=0.0)
    rms = (scale_by_stddev if centered else scale_by_rms)(decay, eps, state_dtype=state_dtype)
    steps: list[tuple[str, GradientTransformation]] = [
        ("weight_decay", decoupled_weight_decay(weight_decay, mask=weight_decay_mask)), ("rms", rms)
    ]
    if isinstance(momentum, torch.Tensor) or momentum > 0:
        steps.append(("momentum", trace(momentum, state_dtype=state_dtype)))
    steps.append(("lr", _lr("rmsprop", lr)))
    return named_chain(*steps)


@static_hyperparams("alpha_warmup", "beta3_warmup", "weight_decay_mask")
def ademamix(
    lr: LearningRate = 1e-3,
    b1: Scalar = 0.9,
    b2: Scalar = 0.999,
    b3: Scalar = 0.9999,
    alpha: Scalar = 5.0,
    eps: Scalar = 1e-8,
    weight_decay: Scalar = 0.0,
    alpha_warmup: int | None = None,
    beta3_warmup: int | None = None,
    *,
    weight_decay_mode: WeightDecayMode = "coupled",
    weight_decay_mask: Mask = None,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """AdEMAMix (Pagliardini, Ablin and Grangier 2024), as ``pytorch_optimizer.AdEMAMix(lr,
    betas=(b1, b2, b3), weight_decay, alpha=alpha, t_alpha_beta3=T, eps)`` with
    ``alpha_warmup=beta3_warmup=T``: ``θ ← θ − η·(m̂1 + α_t·m2)/(√v̂ + ε)``.

    Chain: ``weight_decay`` → ``adam`` (:func:`~grokxform.scale_by_ademamix`) → ``lr``. The decay
    is coupled L2 (``g + wd·θ``) by default, as ``pytorch_optimizer``'s default
    (``weight_decouple=False``); the paper's Algorithm 1 decays the weights decoupled, AdamW's
    way: ``weight_decay_mode="decoupled"`` (``weight_decouple=True`` there) puts the decay after
    ``adam``. The paper pairs α=5…10 and β3=0.9999 with warm-ups as long as the run.

    Examples:
        >>> tx = gx.ademamix(lr=1e-3, alpha_warmup=1000, beta3_warmup=1000)
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> updates, state = tx.update({"w": torch.tensor([0.5, -0.5])}, tx.init(params), params)
        >>> state["adam"].mu_slow["w"]         # (1 − β3_1)·g: β3_1 ≈ 0.95, half-lives from β1's to β3's
        tensor([ 0.0250, -0.0250])
    """
    adam_ = scale_by_ademamix(b1, b2, b3, alpha, eps, alpha_warmup, beta3_warmup, state_dtype=state_dtype)
    return _adam_with_decay("ademamix", [], adam_, lr, weight_decay, weight_decay_mode, weight_decay_mask)


@static_hyperparams("nesterov", "ns_steps", "adjust_lr_fn", "coefficients", "eps", "ns_dtype", "weight_decay_mask")
def muon(
    lr: LearningRate = 0.02,
    momentum: Scalar = 0.95,
    nesterov: bool = True,
    weight_decay: Scalar = 0.1,
    ns_steps: int = 5,
    adjust_lr_fn: AdjustLR = None,
    *,
    coefficients: tuple[float, float, float] = NS_COEFFICIENTS,
    eps: float = 1e-7,
    ns_dtype: torch.dtype | None = torch.bfloat16,
    weight_decay_mask: Mask = None,
    state_dtype: torch.dtype | None = None,
) -> GradientTransformation:
    """Muon (Jordan et al. 2024) for the matrices of a network, as ``torch.optim.Muon``:
    ``b ← μ·b + (1−μ)·g``, ``d = (1−μ)·g + μ·b`` with Nesterov else ``b``,
    ``θ ← θ − η·(r·NS(d) + wd·θ)``, NS the Newton–Schulz orthogonalization (bfloat16, 5 steps) and
    r torch's lr adjustment by the shape (``adjust_lr_fn``: ``None``/``"original"``
    √max(1, rows/cols), ``"match_rms_adamw"`` 0.2·√max(rows, cols)).

    Chain: ``momentum`` (:func:`~grokxform.muon_momentum`, torch's ``lerp`` form) →
    ``orthogonalize`` (:func:`~grokxform.orthogonalize`) → ``weight_decay`` (decoupled,
    torch's ``θ·(1 − η·wd)``) → ``lr``. Defaults are torch's except ``lr=0.02`` (Jordan's; torch's is
    1e-3). Matrices only: torch refuses other params, here a leaf that is not 2-D skips the
    orthogonalization (momentum, decay and lr still apply); give biases, gains and embeddings to
    AdamW (the Muon papers do) with :func:`~grokxform.partition`, below. ``"match_rms_adamw"``
    (Liu et al. 2025, "Muon is Scalable for LLM Training") lets Muon take AdamW's lr and weight
    decay. The whole chain runs on the engine: the momentum and the decay as kernels, the
    orthogonalization between two of their passes on buffers the engine keeps, batched by shape
    (``gx.Optimizer(params, gx.muon(...)).engines``: ``["c"]`` on the CPU, ``["triton"]`` on CUDA,
    captured in a CUDA graph), alone, inside a ``partition``, and as a factory
    (``gx.Optimizer(params, gx.muon, lr=...)``, which wraps it in ``inject_hyperparams``). The step's
    time is the iteration's: on one CPU thread
    ``gx.Optimizer(params, gx.muon())`` takes what ``torch.optim.Muon`` takes.
    The Newton–Schulz iteration runs in bfloat16, so a step matches torch's to bfloat16 rounding of
    the orthogonalized update (``ns_dtype=torch.float32`` for a finer one, which torch lacks).

    Examples:
        >>> tx = gx.muon(lr=0.02, weight_decay=0.0)
        >>> params = {"W": torch.eye(2)}
        >>> state = tx.init(params)
        >>> updates, state = tx.update({"W": torch.tensor([[1.0, 0.0], [0.0, 1.0]])}, state, params)
        >>> updates["W"].diagonal()                    # −η·NS(g), the identity's singular values 1 → 1.12
        tensor([-0.0225, -0.0225])

        Muon for the matrices, AdamW for the rest, as the papers train (two torch optimizers in
        torch: ``torch.optim.Muon`` and ``torch.optim.AdamW``):

        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> tx = gx.partition({"muon": gx.muon(lr=0.02), "adamw": gx.adamw(lr=3e-4, weight_decay=0.01)},
        ...                   lambda path, p: "muon" if p.ndim == 2 else "adamw")
        >>> opt = gx.Optimizer(model.named_parameters(), tx)
        >>> model(torch.randn(3, 4)).square().mean().backward()
        >>> opt.step()
    """
    C.check_scalar("muon", "weight_decay", weight_decay, low=0.0)
    return named_chain(
        ("momentum", muon_momentum(momentum, nesterov, state_dtype=state_dtype)),
        ("orthogonalize", orthogonalize(ns_steps, coefficients, eps, adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype)),
        ("weight_decay", decoupled_weight_decay(weight_decay, mask=weight_decay_mask)),
        ("lr", _lr("muon", lr)),
    )


__all__ = ["adam", "adamw", "ademamix", "grokadamw", "grokadamw_compat", "grokfast_ema", "grokfast_ma", "lamb",
           "lion", "muon", "nadam", "rmsprop", "sgd"]
