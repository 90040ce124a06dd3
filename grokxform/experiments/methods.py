"""The methods of the comparison, by name: each one's pipeline, sweepable knobs, default grid,
loss and param labelling, in one table (:data:`METHODS`) that the sweep, the comparison driver,
the ablation and the reproduction all read.

A method's ``factory(lr, <knobs>..., warmup_steps=..., matrices=...)`` returns its
:class:`~grokxform.GradientTransformation`. Its float keyword arguments are the sweepable knobs,
the peak learning rate ``lr`` included (a number or a 0-d tensor, so that
:func:`~grokxform.inject_hyperparams` can batch it under ``torch.func.vmap``); ``warmup_steps``
(the linear warm-up ``lr·min(1, t/warmup_steps)``, 0 for none) and the method's structural
arguments (:data:`STATIC_ARGS`) are fixed for all the members of a sweep. The defaults are the
settings each method's authors recommend; the Adam family keeps the Grokfast paper's β2 = 0.98.

Every default grid has 12 configurations, 3 learning rates × 4 values of the method's key knobs,
so that every method gets the same tuning budget:

==================  ==========================================  ======================================
method              pipeline (defaults)                         grid: lr × knobs
==================  ==========================================  ======================================
``adam``            Adam β = (0.9, 0.98), no decay (the          {3e-4, 1e-3, 3e-3} × b1 {0.8, 0.9,
                    paper's baseline; ``weight_decay``: L2)     0.95, 0.98}
``adamw``           AdamW β2 = 0.98, decoupled wd 0.01          lr × weight_decay {0.1, 1} × b1 {0.9, 0.98}
``grokfast_ema``    EMA α = 0.98, λ = 2, L2 wd 0.005 (paper)    lr × alpha {0.9, 0.98} × lamb {2, 5}
``grokfast_ma``     MA w = 100, λ = 5, L2 wd 0.01 (paper)       lr × lamb {1, 2, 5, 10}
``grokadamw``       GrokAdamW's own (α0 0.98, λ 2, γ 0.1,       lr × lamb {1, 2} × weight_decay
                    κ 0.1, clip 1, wd 0.01)                     {0.01, 0.1}
``orthograd``       ⊥Grad → Adam β = (0.9, 0.98), no decay,     lr × b1 {0.8, 0.9, 0.95, 0.98}
                    StableMax cross-entropy (Prieto et al.)
``muon``            Muon (μ 0.95, Nesterov, ``match_rms_        lr × momentum {0.9, 0.95} ×
                    adamw``) on the blocks' matrices, AdamW     weight_decay {0.01, 0.1}
                    β = (0.9, 0.98) on the rest, one lr and wd
``ademamix``        AdEMAMix β = (0.9, 0.98, 0.9999), α = 5,    lr × alpha {5, 8} × b3 {0.999, 0.9999}
                    no decay, no α/β3 warm-up
``lion``            Lion β = (0.9, 0.99), wd 1                  {1e-4, 3e-4, 1e-3} × weight_decay
                                                                {0.3, 1, 3, 10}
==================  ==========================================  ======================================

Why these knobs: the learning rate for every method; for the plain Adam family the one that
moves grokking most, weight decay (AdamW: the range where it groks; Lion: 3-10x AdamW's, as its
paper advises, since its learning rate is 3-10x lower), β1 where there is no decay (Adam, ⊥Grad, whose paper trains without
decay); each accelerator's own amplifier and memory (Grokfast's λ and α, GrokAdamW's λ with its
decay, AdEMAMix's α and β3, Muon's momentum with its decay). The learning rates are Adam's usual
range around the paper's 1e-3 (Lion: 3-10x lower, as its paper advises; Muon with
``match_rms_adamw`` takes AdamW's). AdEMAMix runs without its α/β3 warm-ups because their length
is the run's in its paper, which would tie a configuration to the step budget.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from grokxform import _common as C
from grokxform.base import GradientTransformation, named_chain
from grokxform.pipelines import adamw, ademamix, grokadamw, grokfast_ema, grokfast_ma, lion, muon
from grokxform.transforms.adam import scale_by_adam
from grokxform.transforms.combinators import partition
from grokxform.transforms.orthograd import orthograd
from grokxform.transforms.schedules import scale_by_learning_rate
from grokxform.transforms.weight_decay import decoupled_weight_decay

PAPER_B2 = 0.98
"""Adam's β2 in the Grokfast paper's modular runs, kept by every Adam-family method here."""

MatrixLabel = Callable[[str, torch.Tensor], bool]
"""``matrices(name, param) -> bool``: whether a leaf is one of the blocks' matrices (Muon's)."""

STATIC_ARGS = ("window_size", "gamma", "warmup_steps", "matrices", "ns_dtype")
"""Arguments held fixed for every member of a sweep (they set a pipeline's structure)."""


def warmed_up(lr: Any, warmup_steps: int) -> Any:
    """The learning rate ``lr·min(1, t/warmup_steps)`` at step count t (0 at the first update: the
    paper's ``LambdaLR``), as a schedule; ``lr`` itself when ``warmup_steps`` is 0. ``lr`` may be a
    batched 0-d tensor under ``vmap``: the schedule multiplies it, so each member keeps its own."""
    C.check_scalar("warmed_up", "lr", lr, low=0.0)
    warmup_steps = C.check_int("warmed_up", "warmup_steps", warmup_steps, low=0)
    if warmup_steps == 0:
        return lr

    def schedule(count: torch.Tensor) -> Any:
        return lr * torch.clamp(count.to(torch.float64) / warmup_steps, max=1.0)

    return schedule


def adam_l2(lr: Any = 1e-3, b1: Any = 0.9, weight_decay: Any = 0.0, warmup_steps: int = 10) -> GradientTransformation:
    """The Grokfast paper's baseline: Adam, β2 = 0.98, with coupled L2 ``g + wd·θ`` (wd 0: plain Adam)."""
    return named_chain(("weight_decay", decoupled_weight_decay(weight_decay)), ("adam", scale_by_adam(b1, PAPER_B2)),
                       ("lr", scale_by_learning_rate(warmed_up(lr, warmup_steps))))


def adamw_decoupled(lr: Any = 1e-3, b1: Any = 0.9, weight_decay: Any = 0.01,
                    warmup_steps: int = 10) -> GradientTransformation:
    """AdamW, β2 = 0.98, decoupled weight decay ``θ ← θ − η·(adam(g) + wd·θ)``."""
    return adamw(warmed_up(lr, warmup_steps), (b1, PAPER_B2), weight_decay=weight_decay)


def grokfast_ema_l2(lr: Any = 1e-3, alpha: Any = 0.98, lamb: Any = 2.0, b1: Any = 0.9, weight_decay: Any = 0.005,
                    warmup_steps: int = 10) -> GradientTransformation:
    """Grokfast-EMA with the paper's settings: Adam β2 = 0.98 and coupled L2."""
    return grokfast_ema(lr=warmed_up(lr, warmup_steps), alpha=alpha, lamb=lamb, betas=(b1, PAPER_B2),
                        weight_decay=weight_decay, weight_decay_mode="coupled")


def grokfast_ma_l2(lr: Any = 1e-3, lamb: Any = 5.0, b1: Any = 0.9, weight_decay: Any = 0.01, window_size: int = 100,
                   warmup_steps: int = 10) -> GradientTransformation:
    """Grokfast-MA with the paper's settings: Adam β2 = 0.98 and coupled L2."""
    return grokfast_ma(lr=warmed_up(lr, warmup_steps), window_size=window_size, lamb=lamb, betas=(b1, PAPER_B2),
                       weight_decay=weight_decay, weight_decay_mode="coupled")


def grokadamw_paper_b2(lr: Any = 1e-3, alpha_init: Any = 0.98, lamb: Any = 2.0, b1: Any = 0.9,
                       weight_decay: Any = 0.01, grokking_signal_decay_rate: Any = 0.1, clip: Any = 1.0,
                       gamma: float = 0.1, warmup_steps: int = 10) -> GradientTransformation:
    """:func:`~grokxform.grokadamw` with the paper's β2. ``clip`` is its ``gradient_clipping`` under
    a name a sweep may vary: 0 switches the clip off also as a (batched) tensor, whose threshold
    then becomes +∞, and ``min(1, ∞/‖g‖) = 1`` leaves g exactly as it is."""
    if isinstance(clip, torch.Tensor):
        clip = torch.where(clip > 0, clip, float("inf"))
    return grokadamw(lr=warmed_up(lr, warmup_steps), betas=(b1, PAPER_B2), alpha_init=alpha_init, lamb=lamb,
                     weight_decay=weight_decay, gamma=gamma, grokking_signal_decay_rate=grokking_signal_decay_rate,
                     gradient_clipping=clip)


def orthograd_adam(lr: Any = 1e-3, b1: Any = 0.9, warmup_steps: int = 10) -> GradientTransformation:
    """⊥Grad (:func:`~grokxform.orthograd`) before Adam β2 = 0.98, without weight decay: the
    recipe of Prieto et al. 2025, trained with StableMax's cross-entropy (the method's loss)."""
    return named_chain(("orthograd", orthograd()), ("adam", scale_by_adam(b1, PAPER_B2)),
                       ("lr", scale_by_learning_rate(warmed_up(lr, warmup_steps))))


def blocks_matrices(name: str, param: torch.Tensor) -> bool:
    """The default of :data:`MatrixLabel`: the 2-D weights inside ``layers.*`` (the transformer
    blocks of the modular decoder and of the byte-level GPT)."""
    return name.startswith("layers.") and param.ndim == 2


def muon_adamw(lr: Any = 1e-3, momentum: Any = 0.95, weight_decay: Any = 0.1, warmup_steps: int = 10,
               matrices: MatrixLabel = blocks_matrices,
               ns_dtype: torch.dtype | None = torch.bfloat16) -> GradientTransformation:
    """Muon for the leaves that ``matrices`` names, AdamW β = (0.9, 0.98) for the others, through
    :func:`~grokxform.partition`. Muon's lr is scaled to AdamW's update RMS
    (``adjust_lr_fn="match_rms_adamw"``, Liu et al. 2025), so one lr and one weight decay serve
    both, as in that paper. ``ns_dtype``: the Newton–Schulz iteration's dtype (bfloat16, as torch's)."""
    lr = warmed_up(lr, warmup_steps)
    return partition({"muon": muon(lr=lr, momentum=momentum, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw",
                                   ns_dtype=ns_dtype),
                      "adamw": adamw(lr, (0.9, PAPER_B2), weight_decay=weight_decay)},
                     lambda name, p: "muon" if matrices(name, p) else "adamw")


def ademamix_no_warmup(lr: Any = 1e-3, alpha: Any = 5.0, b3: Any = 0.9999, b1: Any = 0.9,
                       warmup_steps: int = 10) -> GradientTransformation:
    """AdEMAMix (:func:`~grokxform.ademamix`) with β2 = 0.98, no decay, no α/β3 warm-ups."""
    return ademamix(warmed_up(lr, warmup_steps), b1, PAPER_B2, b3, alpha)


def lion_decoupled(lr: Any = 3e-4, weight_decay: Any = 1.0, b1: Any = 0.9, b2: Any = 0.99,
                   warmup_steps: int = 10) -> GradientTransformation:
    """Lion (:func:`~grokxform.lion`) with its paper's betas and decoupled weight decay."""
    return lion(warmed_up(lr, warmup_steps), b1, b2, weight_decay)


ADAM_LRS = (3e-4, 1e-3, 3e-3)
"""The learning rates of every default grid but Lion's."""


@dataclass(frozen=True)
class Method:
    """A method of the comparison: its ``title`` on figures, its ``factory`` (keyword arguments:
    the knobs and :data:`STATIC_ARGS`), its default ``grid`` (knob → values), its ``loss``
    (``"stablemax"``: StableMax's cross-entropy replaces the task's cross-entropy; ``None``: the
    task's), and whether it labels the params (``partitioned``: the factory takes the task's
    ``matrices``)."""

    title: str
    factory: Callable[..., GradientTransformation]
    grid: Mapping[str, tuple[float, ...]]
    loss: str | None = None
    partitioned: bool = False
    static: Mapping[str, Any] = field(default_factory=dict)


METHODS: dict[str, Method] = {
    "adam": Method("Adam", adam_l2, {"lr": ADAM_LRS, "b1": (0.8, 0.9, 0.95, 0.98)}),
    "adamw": Method("AdamW", adamw_decoupled, {"lr": ADAM_LRS, "weight_decay": (0.1, 1.0), "b1": (0.9, 0.98)}),
    "grokfast_ema": Method("Grokfast-EMA", grokfast_ema_l2, {"lr": ADAM_LRS, "alpha": (0.9, 0.98), "lamb": (2.0, 5.0)}),
    "grokfast_ma": Method("Grokfast-MA", grokfast_ma_l2, {"lr": ADAM_LRS, "lamb": (1.0, 2.0, 5.0, 10.0)},
                          static={"window_size": 100}),
    "grokadamw": Method("GrokAdamW", grokadamw_paper_b2,
                        {"lr": ADAM_LRS, "lamb": (1.0, 2.0), "weight_decay": (0.01, 0.1)}),
    "orthograd": Method("⊥Grad + StableMax", orthograd_adam, {"lr": ADAM_LRS, "b1": (0.8, 0.9, 0.95, 0.98)},
                        loss="stablemax"),
    "muon": Method("Muon", muon_adamw, {"lr": ADAM_LRS, "momentum": (0.9, 0.95), "weight_decay": (0.01, 0.1)},
                   partitioned=True),
    "ademamix": Method("AdEMAMix", ademamix_no_warmup, {"lr": ADAM_LRS, "alpha": (5.0, 8.0), "b3": (0.999, 0.9999)}),
    "lion": Method("Lion", lion_decoupled, {"lr": (1e-4, 3e-4, 1e-3), "weight_decay": (0.3, 1.0, 3.0, 10.0)}),
}
"""Name → :class:`Method`, in the order of the comparison's tables."""


def get_method(name: str) -> Method:
    """``METHODS[name]``, or a ``ValueError`` naming the choices."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(METHODS)}") from None


def knobs(name: str) -> list[str]:
    """The sweepable knobs of method ``name``: its factory's keyword arguments but the static ones."""
    return sorted(set(inspect.signature(get_method(name).factory).parameters) - set(STATIC_ARGS))


def fixed_arguments(name: str) -> list[str]:
    """The arguments of :data:`STATIC_ARGS` that method ``name`` takes (fixed for all members)."""
    return sorted(set(inspect.signature(get_method(name).factory).parameters) & set(STATIC_ARGS))


def build(name: str, config: Mapping[str, Any], *, warmup_steps: int, matrices: MatrixLabel = blocks_matrices,
          static: Mapping[str, Any] | None = None) -> GradientTransformation:
    """Method ``name``'s transform for one configuration (knob → value), as a single run trains it."""
    method = get_method(name)
    return method.factory(**config, **fixed_call_args(name, warmup_steps, matrices, static))


def fixed_call_args(name: str, warmup_steps: int, matrices: MatrixLabel = blocks_matrices,
                    static: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The fixed arguments that method ``name``'s factory receives: the method's own static ones,
    ``static`` (which override them), the warm-up and, for a partitioned method, ``matrices``."""
    method = get_method(name)
    out = {**method.static, **(static or {}), "warmup_steps": warmup_steps}
    if method.partitioned:
        out["matrices"] = matrices
    return out


def grid_size(name: str) -> int:
    """The number of configurations of method ``name``'s default grid."""
    n = 1
    for values in get_method(name).grid.values():
        n *= len(values)
    return n


__all__ = ["ADAM_LRS", "METHODS", "PAPER_B2", "STATIC_ARGS", "MatrixLabel", "Method", "adam_l2", "adamw_decoupled",
           "ademamix_no_warmup", "blocks_matrices", "build", "fixed_arguments", "fixed_call_args", "get_method",
           "grid_size", "grokadamw_paper_b2", "grokfast_ema_l2", "grokfast_ma_l2", "knobs", "lion_decoupled",
           "muon_adamw", "orthograd_adam", "warmed_up"]
