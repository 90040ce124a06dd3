"""The optimizers of the reproduction runs, as factories of :class:`~grokxform.GradientTransformation`.

One table shared by the demo, the tests and the GPU reproduction, so that every run of a name
means the same pipeline.

Modular arithmetic (the paper's ``main.py``: Adam with coupled L2, β = (0.9, 0.98), learning
rate ``1e-3·min(1, t/10)``):

=================  ========================================================================
``baseline``        Adam, weight decay 0 (= ``adamw`` with wd 0)
``grokfast_ema``    official EMA filter α = 0.98, λ = 2, L2 weight decay 0.005
``grokfast_ma``     official MA filter w = 100, λ = 5, L2 weight decay 0.01
``grokadamw``       :func:`grokxform.grokadamw` with the same lr and betas, its other defaults
                    (decoupled wd 0.01, global clip 1.0, γ = 0.1), fed ``train_loss``/``val_loss``
=================  ========================================================================

MNIST (the paper's ``main_mnist.py``, Omnigrok's setting; AdamW β = (0.9, 0.999), lr 1e-3,
no schedule): ``baseline`` (wd 0.01) and ``grokfast_ema`` (α = 0.8, λ = 0.1, wd 2.0).
"""

from __future__ import annotations

from collections.abc import Callable

from grokxform.base import GradientTransformation, Schedule
from grokxform.pipelines import adamw, grokadamw, grokfast_ema, grokfast_ma
from grokxform.transforms.schedules import linear_warmup

OptimizerFactory = Callable[[], GradientTransformation]

PAPER_BETAS = (0.9, 0.98)
"""Adam's betas in the paper's modular runs."""


def _paper_lr() -> Schedule:
    """``1e-3·min(1, t/10)``, t = 0 at the first update (the paper's ``LambdaLR``)."""
    return linear_warmup(1e-3, 10)


MODULAR_OPTIMIZERS: dict[str, OptimizerFactory] = {
    "baseline": lambda: adamw(lr=_paper_lr(), betas=PAPER_BETAS, weight_decay=0.0),
    "grokfast_ema": lambda: grokfast_ema(
        lr=_paper_lr(),
        alpha=0.98,
        lamb=2.0,
        betas=PAPER_BETAS,
        weight_decay=0.005,
        weight_decay_mode="coupled",
    ),
    "grokfast_ma": lambda: grokfast_ma(
        lr=_paper_lr(),
        window_size=100,
        lamb=5.0,
        betas=PAPER_BETAS,
        weight_decay=0.01,
        weight_decay_mode="coupled",
    ),
    "grokadamw": lambda: grokadamw(lr=_paper_lr(), betas=PAPER_BETAS),
}
"""Name → factory of the four modular-arithmetic runs (order: the demo's order)."""

MNIST_OPTIMIZERS: dict[str, OptimizerFactory] = {
    "baseline": lambda: adamw(lr=1e-3, weight_decay=0.01),
    "grokfast_ema": lambda: grokfast_ema(lr=1e-3, alpha=0.8, lamb=0.1, weight_decay=2.0),
}
"""Name → factory of the paper's MNIST runs (AdamW, decoupled weight decay)."""


def modular_optimizer(name: str) -> GradientTransformation:
    """A fresh transform of :data:`MODULAR_OPTIMIZERS` by name."""
    try:
        return MODULAR_OPTIMIZERS[name]()
    except KeyError:
        raise ValueError(
            f"modular_optimizer: unknown name {name!r}; choose from {sorted(MODULAR_OPTIMIZERS)}"
        ) from None
