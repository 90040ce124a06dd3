"""grokxform: optax-style composable gradient transformations for PyTorch, with the Grokfast family
(Lee et al. 2024, arXiv:2405.20233) rebuilt from primitives.

    import grokxform as gx
    tx = gx.grokadamw(lr=1e-3)
    state = tx.init(params)
    updates, state = tx.update(grads, state, params, train_loss=loss, val_loss=val_loss)
    params = gx.apply_updates(params, updates)
"""

from grokxform import signals, tree
from grokxform.base import (
    EmptyState,
    GradientTransformation,
    Params,
    Schedule,
    State,
    Updates,
    apply_updates,
    chain,
    identity,
    named_chain,
    with_extra_args_support,
)
from grokxform.declarations import kernels
from grokxform.pipelines import *  # noqa: F403
from grokxform.pipelines import __all__ as _pipelines_all
from grokxform.metrics import metrics
from grokxform.optim import Optimizer
from grokxform.transforms import *  # noqa: F403
from grokxform.transforms import __all__ as _transforms_all

__version__ = "0.1.0"

__all__ = [
    "EmptyState",
    "Optimizer",
    "metrics",
    "GradientTransformation",
    "Params",
    "Schedule",
    "State",
    "Updates",
    "apply_updates",
    "chain",
    "identity",
    "kernels",
    "named_chain",
    "signals",
    "tree",
    "with_extra_args_support",
    *_pipelines_all,
    *_transforms_all,
]
