"""The primitives: one small module per idea."""

from grokxform.transforms.adam import LayerwiseBeta, ScaleByAdamState, layerwise_beta, scale_by_adam
from grokxform.transforms.combinators import (
    ApplyIfFiniteState,
    MultiSteps,
    MultiStepsState,
    apply_if_finite,
    masked,
    partition,
)
from grokxform.transforms.clipping import ClipByGlobalNormState, clip_by_global_norm, clip_by_tensor_norm
from grokxform.transforms.filters import EmaFilterState, MaFilterState, amplify, ema_filter, ma_filter
from grokxform.transforms.lion import ScaleByLionState, scale_by_lion
from grokxform.transforms.momentum import TraceState, trace
from grokxform.transforms.muon import MuonMomentumState, muon_momentum, orthogonalize
from grokxform.transforms.schedules import (
    ScaleByScheduleState,
    constant_schedule,
    linear_warmup,
    scale_by_learning_rate,
    warmup_cosine_decay,
)
from grokxform.transforms.weight_decay import decoupled_weight_decay
from grokxform.transforms.wrappers import InjectHyperparamsState, inject_hyperparams

__all__ = [
    "ApplyIfFiniteState",
    "MultiSteps",
    "MultiStepsState",
    "apply_if_finite",
    "masked",
    "partition",
    "ClipByGlobalNormState",
    "EmaFilterState",
    "InjectHyperparamsState",
    "LayerwiseBeta",
    "MaFilterState",
    "MuonMomentumState",
    "ScaleByAdamState",
    "ScaleByLionState",
    "ScaleByScheduleState",
    "TraceState",
    "amplify",
    "clip_by_global_norm",
    "clip_by_tensor_norm",
    "constant_schedule",
    "decoupled_weight_decay",
    "ema_filter",
    "inject_hyperparams",
    "layerwise_beta",
    "linear_warmup",
    "ma_filter",
    "muon_momentum",
    "orthogonalize",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_lion",
    "trace",
    "warmup_cosine_decay",
]
