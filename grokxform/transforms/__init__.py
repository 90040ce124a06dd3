"""The primitives: one small module per idea."""

from grokxform.transforms.accumulate import ApplyEveryState, apply_every
from grokxform.transforms.adam import LayerwiseBeta, ScaleByAdamState, layerwise_beta, scale_by_adam
from grokxform.transforms.ademamix import ScaleByAdemamixState, scale_by_ademamix
from grokxform.transforms.basic import scale, zero_nans
from grokxform.transforms.combinators import (
    ApplyIfFiniteState,
    MultiSteps,
    MultiStepsState,
    apply_if_finite,
    masked,
    partition,
)
from grokxform.transforms.centralize import centralize
from grokxform.transforms.compress import Bf16Pair, Bf16Stochastic, CompressedState, Int8Blocks, compress_state
from grokxform.transforms.clipping import ClipByGlobalNormState, clip, clip_by_global_norm, clip_by_tensor_norm
from grokxform.transforms.filters import EmaFilterState, MaFilterState, amplify, ema_filter, ma_filter
from grokxform.transforms.slow_weights import LookaheadState, lookahead
from grokxform.transforms.lion import ScaleByLionState, scale_by_lion
from grokxform.transforms.momentum import TraceState, trace
from grokxform.transforms.noise import AddNoiseState, add_noise
from grokxform.transforms.orthograd import orthograd
from grokxform.transforms.nadam import ScaleByNadamState, scale_by_nadam
from grokxform.transforms.rms import ScaleByRmsState, ScaleByRStdDevState, scale_by_rms, scale_by_stddev
from grokxform.transforms.muon import MuonMomentumState, muon_momentum, orthogonalize
from grokxform.transforms.schedules import (
    ScaleByScheduleState,
    constant_schedule,
    cosine_decay_schedule,
    cosine_onecycle_schedule,
    exponential_decay,
    join_schedules,
    linear_warmup,
    piecewise_constant_schedule,
    scale_by_learning_rate,
    sgdr_schedule,
    warmup_cosine_decay,
)
from grokxform.transforms.trust_ratio import scale_by_trust_ratio
from grokxform.transforms.weight_decay import decoupled_weight_decay
from grokxform.transforms.wrappers import InjectHyperparamsState, inject_hyperparams

__all__ = [
    "Bf16Pair",
    "Bf16Stochastic",
    "CompressedState",
    "Int8Blocks",
    "compress_state",
    "AddNoiseState",
    "add_noise",
    "centralize",
    "orthograd",
    "scale_by_trust_ratio",
    "ApplyEveryState",
    "LookaheadState",
    "apply_every",
    "lookahead",
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
    "ScaleByAdemamixState",
    "ScaleByLionState",
    "ScaleByNadamState",
    "ScaleByRStdDevState",
    "ScaleByRmsState",
    "ScaleByScheduleState",
    "TraceState",
    "amplify",
    "clip",
    "clip_by_global_norm",
    "clip_by_tensor_norm",
    "constant_schedule",
    "cosine_decay_schedule",
    "cosine_onecycle_schedule",
    "decoupled_weight_decay",
    "ema_filter",
    "exponential_decay",
    "inject_hyperparams",
    "join_schedules",
    "layerwise_beta",
    "linear_warmup",
    "ma_filter",
    "piecewise_constant_schedule",
    "scale",
    "muon_momentum",
    "orthogonalize",
    "scale_by_adam",
    "scale_by_ademamix",
    "scale_by_learning_rate",
    "scale_by_lion",
    "sgdr_schedule",
    "scale_by_nadam",
    "scale_by_rms",
    "scale_by_stddev",
    "trace",
    "warmup_cosine_decay",
    "zero_nans",
]
