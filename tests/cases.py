"""The transforms that the generic tests run, in one table, and the trees the tests feed them.

Each entry names a transform, how to build it (a factory and its keyword arguments: small MA
windows, learning rates that move the params in a few steps) and the facts about it that tests
need. The generic tests take their transforms from here, so a pipeline added to :data:`ALIASES`
runs in every one of them.

- :data:`ALIASES`: one entry per public pipeline, built by its factory from plain numbers, so that
  every way of running a transform takes it (``factory(**kwargs)``, ``gx.Optimizer(params,
  factory, **kwargs)``, DCP checkpoints). The tests of many steps or processes run these: the
  random-tree properties, ``gx.Optimizer`` == ``tx.update``, the fused optimizer, and (those of
  :data:`SHARDABLE`) sharded training and its checkpoints.
- :data:`VARIANTS`: other settings of those pipelines (coupled decay, an MA sum without warm-up, a
  bfloat16 window, schedules, β1 rules, injected hyperparameters). :data:`PIPELINES`, both tables,
  is what the tests of the step run: purity and ``None`` gradients, eager == engine == fused, the
  GPU, bad input, non-finite gradients.
- :data:`PRIMITIVES`: the primitives on their own, for the functional contract.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch

import grokxform as gx


@dataclasses.dataclass(frozen=True)
class Case:
    """A transform under test.

    ``signal``: it reads the losses (its EMA's α follows the grokking signal), so a test gives it
    ``train_loss=`` / ``val_loss=``. ``bad_leaf_state``: the state paths that turn non-finite when
    leaf ``head`` of :func:`param_tree` gets a NaN or ±inf on the third step (docs/reliability.md,
    "Without apply_if_finite"); every other state tensor stays finite. ``bad_param``: what that
    element of the param becomes: ``"nan"`` (Adam's m/√v), ``"nonfinite"`` (±inf or NaN, as the
    gradient: a step proportional to it), ``"finite"`` (a sign step: the param never sees it) or
    ``"leaf"`` (NaN over the whole leaf: a per-leaf sum, a trust ratio's norm or ⊥Grad's projection,
    reads the bad element).
    ``"nan_leaf"`` (the whole leaf turns NaN: Muon's orthogonalization mixes a matrix's elements).
    ``matrices``: it maps whole matrices in bfloat16 (Muon's Newton–Schulz iteration): a step
    that Inductor compiles may round one value of the iteration otherwise than eager, and the
    iteration spreads that rounding over the matrix.
    ``shardable``: it takes FSDP2's sharded (DTensor) params; the distributed tests train the
    aliases that do (:data:`SHARDABLE`). ``draws_normals``: it draws normal random numbers, whose
    log and cos agree across backends (torch's, a C library's, CUDA's) to a few float32 ulps, not
    bit for bit.
    """

    factory: Callable[..., gx.GradientTransformation]
    kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    signal: bool = False
    bad_leaf_state: frozenset[str] = frozenset()
    bad_param: str = "nan"
    matrices: bool = False
    shardable: bool = True
    draws_normals: bool = False

    def make(self) -> gx.GradientTransformation:
        return self.factory(**self.kwargs)


_ADAM = frozenset({"adam.mu.head", "adam.nu.head"})
_EMA = _ADAM | {"grokfast.mu.head"}


_TRACE = frozenset({"momentum.trace.head"})
_LION = frozenset({"lion.mu.head"})
_RMS = frozenset({"rms.nu.head"})
_ADEMAMIX = _ADAM | {"adam.mu_slow.head"}


def orthograd_sgd(lr: float) -> gx.GradientTransformation:
    """⊥Grad in front of SGD with momentum (``OrthoGrad(params, torch.optim.SGD, momentum=0.9)``)."""
    return gx.named_chain(("orthograd", gx.orthograd()), ("sgd", gx.sgd(lr, momentum=0.9)))


def noisy_adamw(lr: float, eta: float) -> gx.GradientTransformation:
    """Annealed gradient noise in front of AdamW."""
    return gx.named_chain(("noise", gx.add_noise(eta, seed=5)), ("adamw", gx.adamw(lr)))
_MUON = frozenset({"momentum.momentum_buffer.head"})


def _ma(window_size: int) -> frozenset[str]:
    """Adam's moments, the MA's running sum and the newest gradient (the last slot of the window)."""
    return _ADAM | {f"grokfast.window.{window_size - 1}.head", "grokfast.total.head"}


ALIASES: dict[str, Case] = {
    "adamw": Case(gx.adamw, {"lr": 1e-2, "weight_decay": 0.1}, bad_leaf_state=_ADAM),
    "grokfast_ema": Case(gx.grokfast_ema, {"lr": 1e-2, "alpha": 0.9}, bad_leaf_state=_EMA),
    "grokfast_ma": Case(gx.grokfast_ma, {"lr": 1e-2, "window_size": 2}, bad_leaf_state=_ma(2)),
    # a clip threshold well below the gradients' norm: the clip acts at every step (the norm is
    # logged, never read back)
    "grokadamw": Case(gx.grokadamw, {"lr": 1e-2, "gradient_clipping": 0.05}, signal=True,
                      bad_leaf_state=_EMA | {"clip.norm"}),
    "grokadamw_compat": Case(gx.grokadamw_compat, {"lr": 1e-2, "gradient_clipping": 0.3}, signal=True,
                             bad_leaf_state=_EMA),
    "sgd": Case(gx.sgd, {"lr": 1e-2, "momentum": 0.9, "weight_decay": 0.01}, bad_leaf_state=_TRACE,
                bad_param="nonfinite"),
    "lion": Case(gx.lion, {"lr": 1e-2, "weight_decay": 0.1}, bad_leaf_state=_LION, bad_param="finite"),
    "lamb": Case(gx.lamb, {"lr": 1e-2, "weight_decay": 0.01}, bad_leaf_state=_ADAM, bad_param="leaf"),
    "adam": Case(gx.adam, {"lr": 1e-2}, bad_leaf_state=_ADAM),
    "nadam": Case(gx.nadam, {"lr": 1e-2, "weight_decay": 0.01}, bad_leaf_state=_ADAM),
    # without momentum: torch.sqrt (op by op) is not correctly rounded on every CPU build (torch
    # 2.13, AVX512: 1 in 5 float32 roots an ulp off), the kernels' root is, and a momentum buffer
    # of g/√ν (≈ ±10 per step) cancels that ulp into more than test_engine's state tolerance where
    # it nears 0; rmsprop's momentum is tested against torch.optim.RMSprop in test_vocabulary_adam
    "rmsprop": Case(gx.rmsprop, {"lr": 1e-2, "weight_decay": 0.01}, bad_leaf_state=_RMS),
    "ademamix": Case(gx.ademamix, {"lr": 1e-2, "alpha_warmup": 5, "beta3_warmup": 5, "weight_decay": 0.01},
                     bad_leaf_state=_ADEMAMIX),
    # the tree's vectors, 0-d and empty leaves skip the orthogonalization; the NaN spreads over
    # the bad matrix
    "muon": Case(gx.muon, {"lr": 1e-2, "weight_decay": 0.1}, bad_leaf_state=_MUON, bad_param="nan_leaf",
                 matrices=True, shardable=False),  # Newton–Schulz needs each matrix whole: a DTensor raises
}


SHARDABLE: dict[str, Case] = {name: case for name, case in ALIASES.items() if case.shardable}
"""The aliases that the distributed tests train (FSDP2, DDP, DCP checkpoints)."""

# optax's schedules, one after another: a few steps of each
_OPTAX_SCHEDULES = gx.join_schedules([
    gx.cosine_onecycle_schedule(3, 1e-2, pct_start=0.4),
    gx.sgdr_schedule([dict(init_value=1e-3, peak_value=1e-2, warmup_steps=1, decay_steps=2, end_value=1e-3)] * 2),
    gx.piecewise_constant_schedule(1e-2, {1: 0.5}),
    gx.exponential_decay(5e-3, 2, 0.7, staircase=True, end_value=1e-3),
    gx.cosine_decay_schedule(5e-3, 4, alpha=0.2),
], [3, 7, 9, 11])

_INJECTED = frozenset(f"inner_state.{p}" for p in _EMA)

VARIANTS: dict[str, Case] = {
    "adamw_masked": Case(gx.adamw, {"lr": gx.linear_warmup(1e-2, 3), "weight_decay_mask": ["*.w"]},
                         bad_leaf_state=_ADAM),
    "grokfast_ema_coupled": Case(gx.grokfast_ema, {"lr": gx.linear_warmup(1e-2, 3), "weight_decay": 0.005,
                                                   "weight_decay_mode": "coupled"}, bad_leaf_state=_EMA),
    "grokfast_ma_sum": Case(gx.grokfast_ma, {"lr": 1e-2, "window_size": 4, "filter_type": "sum", "warmup": False},
                            bad_leaf_state=_ma(4)),
    "grokfast_ma_bf16_window": Case(gx.grokfast_ma, {"lr": 1e-2, "window_size": 3, "window_dtype": torch.bfloat16},
                                    bad_leaf_state=_ma(3)),
    "grokfast_ma_coupled": Case(gx.grokfast_ma, {"lr": 1e-2, "window_size": 3, "weight_decay_mode": "coupled"},
                                bad_leaf_state=_ma(3)),
    "grokadamw_schedule": Case(gx.grokadamw, {"lr": gx.warmup_cosine_decay(1e-2, 2, 20), "gradient_clipping": 0.5},
                               signal=True, bad_leaf_state=_EMA | {"clip.norm"}),
    "grokadamw_noclip": Case(gx.grokadamw, {"lr": 1e-2, "gradient_clipping": 0.0}, signal=True, bad_leaf_state=_EMA),
    "grokadamw_index": Case(gx.grokadamw, {"lr": 1e-2, "layer": "index", "weight_decay_mask": ["h.*", "blocks.*"]},
                            signal=True, bad_leaf_state=_EMA | {"clip.norm"}),
    "grokadamw_layer_fn": Case(gx.grokadamw, {"lr": 1e-2, "layer": lambda path, i: i % 3}, signal=True,
                               bad_leaf_state=_EMA | {"clip.norm"}),
    "inject_grokadamw": Case(gx.inject_hyperparams(gx.grokadamw), {"lr": gx.warmup_cosine_decay(1e-2, 2, 20),
                                                                   "lamb": 1.5, "weight_decay": 0.05},
                             signal=True, bad_leaf_state=_INJECTED | {"inner_state.clip.norm"}),
    "sgd_nesterov": Case(gx.sgd, {"lr": gx.linear_warmup(1e-2, 3), "momentum": 0.9, "nesterov": True,
                                  "weight_decay_mask": ["*.w"], "weight_decay": 0.1}, bad_leaf_state=_TRACE,
                         bad_param="nonfinite"),
    "lion_schedule": Case(gx.lion, {"lr": gx.warmup_cosine_decay(1e-2, 2, 20), "b1": 0.95, "b2": 0.98,
                                    "weight_decay": 0.5, "weight_decay_mask": ["*.w"]},
                          bad_leaf_state=_LION, bad_param="finite"),
    "inject_lion": Case(gx.inject_hyperparams(gx.lion), {"lr": 1e-2, "b1": 0.9, "b2": 0.99, "weight_decay": 0.1},
                        bad_leaf_state=frozenset(f"inner_state.{p}" for p in _LION), bad_param="finite"),
    "lamb_pytorch_optimizer": Case(gx.lamb, {"lr": gx.linear_warmup(1e-2, 3), "weight_decay": 0.1,
                                             "bias_correction": False, "trust_ratio_eps": 1e-6,
                                             "weight_decay_mask": ["*.w"]}, bad_leaf_state=_ADAM, bad_param="leaf"),
    "orthograd_sgd": Case(orthograd_sgd, {"lr": 1e-2}, bad_leaf_state=frozenset({"sgd.momentum.trace.head"}),
                          bad_param="leaf"),
    "noisy_adamw": Case(noisy_adamw, {"lr": 1e-2, "eta": 1e-3}, draws_normals=True,
                        bad_leaf_state=frozenset({"adamw.adam.mu.head", "adamw.adam.nu.head"})),
    "lookahead_adamw": Case(gx.lookahead, {"fast": gx.adamw(lr=1e-2, weight_decay=0.1), "sync_period": 3, "alpha": 0.5},
                            bad_leaf_state=frozenset({*(f"fast.{p}" for p in _ADAM), "lookahead.slow.head"})),
    "adamw_optax_schedules": Case(gx.adamw, {"lr": _OPTAX_SCHEDULES, "weight_decay": 0.1}, bad_leaf_state=_ADAM),
    "rmsprop_centered": Case(gx.rmsprop, {"lr": gx.linear_warmup(1e-2, 3), "centered": True,
                                          "weight_decay": 0.1, "weight_decay_mask": ["*.w"]},
                             bad_leaf_state=frozenset({"rms.nu.head", "rms.mu.head"})),
    "nadam_decoupled": Case(gx.nadam, {"lr": gx.warmup_cosine_decay(1e-2, 2, 20), "weight_decay": 0.1,
                                       "weight_decay_mode": "decoupled"}, bad_leaf_state=_ADAM),
    "ademamix_decoupled": Case(gx.ademamix, {"lr": 1e-2, "alpha": 8.0, "b3": 0.999, "weight_decay": 0.1,
                                             "weight_decay_mode": "decoupled"}, bad_leaf_state=_ADEMAMIX),
    "inject_ademamix": Case(gx.inject_hyperparams(gx.ademamix), {"lr": 1e-2, "b1": 0.9, "b3": 0.999, "alpha": 5.0,
                                                                 "beta3_warmup": 4},
                            bad_leaf_state=frozenset(f"inner_state.{p}" for p in _ADEMAMIX)),
    "inject_grokfast_ema": Case(gx.inject_hyperparams(gx.grokfast_ema), {"lr": 1e-2, "alpha": 0.95, "eps": 1e-6},
                                bad_leaf_state=_INJECTED),
}

PIPELINES: dict[str, Case] = {**ALIASES, **VARIANTS}

PRIMITIVES: dict[str, Case] = {
    "ema_filter": Case(gx.ema_filter, {"alpha": 0.9}),
    "ema_filter_zeros": Case(gx.ema_filter, {"alpha": 0.9, "init": "zeros"}),
    "ma_filter": Case(gx.ma_filter, {"window_size": 3, "warmup": False}),
    "amplify": Case(gx.amplify, {"filter": gx.ema_filter(0.9), "lamb": 2.0}),
    "clip_by_global_norm": Case(gx.clip_by_global_norm, {"max_norm": 0.5}),
    "clip_by_tensor_norm": Case(gx.clip_by_tensor_norm, {"max_norm": 0.5}),
    "scale_by_adam": Case(gx.scale_by_adam),
    "trace": Case(gx.trace, {"decay": 0.9}),
    "trace_nesterov": Case(gx.trace, {"decay": 0.5, "nesterov": True}),
    "scale_by_lion": Case(gx.scale_by_lion, {"b1": 0.9, "b2": 0.99}),
    "scale_by_rms": Case(gx.scale_by_rms, {"decay": 0.9}),
    "scale_by_rms_eps_in_sqrt": Case(gx.scale_by_rms, {"decay": 0.9, "eps": 1e-6, "eps_in_sqrt": True}),
    "scale_by_stddev": Case(gx.scale_by_stddev, {"decay": 0.9}),
    "scale_by_nadam": Case(gx.scale_by_nadam),
    "scale_by_ademamix": Case(gx.scale_by_ademamix, {"alpha_warmup": 3, "beta3_warmup": 4}),
    "scale": Case(gx.scale, {"step_size": -0.5}),
    "clip": Case(gx.clip, {"max_delta": 0.5}),
    "zero_nans": Case(gx.zero_nans),
    "muon_momentum": Case(gx.muon_momentum, {"momentum": 0.9}),
    "muon_momentum_plain": Case(gx.muon_momentum, {"momentum": 0.3, "nesterov": False}),
    "orthogonalize": Case(gx.orthogonalize, {"adjust_lr_fn": "match_rms_adamw"}),
    "decoupled_weight_decay": Case(gx.decoupled_weight_decay, {"weight_decay": 0.1}),
    "apply_every": Case(gx.apply_every, {"k": 2}),
    "scale_by_learning_rate": Case(gx.scale_by_learning_rate, {"learning_rate": gx.linear_warmup(0.1, 2)}),
    "orthograd": Case(gx.orthograd),
    "scale_by_trust_ratio": Case(gx.scale_by_trust_ratio, {"min_norm": 0.5, "trust_coefficient": 0.1, "eps": 1e-6}),
    "add_noise": Case(gx.add_noise, {"eta": 0.1, "seed": 3}, draws_normals=True),
    "centralize": Case(gx.centralize),
}


# ---------------------------------------------------------------- trees

# A small model's params, with a 0-d and an empty leaf; β1 by depth reads the block numbers.
TREE: dict[str, tuple[int, ...]] = {
    "embed.weight": (6, 4),
    "blocks.0.w": (4, 4),
    "blocks.0.b": (4,),
    "blocks.1.w": (4, 4),
    "scalar": (),
    "empty": (0, 3),
    "head": (2, 4),
}


def param_tree(shapes: Mapping[str, tuple[int, ...]] = TREE, *, dtype: torch.dtype = torch.float32, seed: int = 0,
               device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Random params of these shapes, drawn in float64 on the CPU whatever the dtype and device."""
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g, dtype=torch.float64).to(device, dtype) for n, s in shapes.items()}


def grad_tree(params: Mapping[str, torch.Tensor], step: int, *, scale: float = 1.0,
              none: Collection[str] = ()) -> dict[str, torch.Tensor | None]:
    """Step ``step``'s random gradients for ``params`` (their dtypes and devices), ``None`` for
    the leaves named in ``none`` (the other leaves get the same values either way)."""
    g = torch.Generator().manual_seed(1000 + step)
    drawn = {n: scale * torch.randn(p.shape, generator=g, dtype=torch.float64) for n, p in params.items()}
    return {n: None if n in none else x.to(params[n].device, params[n].dtype) for n, x in drawn.items()}


# ---------------------------------------------------------------- special values

ROUNDS_TWICE = {torch.bfloat16: 1 + 2**-8 + 2**-30, torch.float16: 1 + 2**-11 + 2**-40}
"""Per 16-bit dtype, a number that rounds to it differently through float32 (first to the tie
between 1 and the next value, then to even: 1.0) than directly (up): what a rule's number becomes
when compared with a value of that dtype shows which way it was rounded."""


def special_values(dtype: torch.dtype, subnormals: bool = True) -> list[float]:
    """Values of ``dtype`` (as floats) that every element op must get right: NaN of either sign,
    ±inf, ±0, ±1 and the next value above 1, numbers that are not exact in binary, the largest
    finite values, the values next to a :data:`ROUNDS_TWICE` number, and (unless ``subnormals`` is
    false) subnormals and the smallest normals, whose products with small numbers are subnormal."""
    fi = torch.finfo(dtype)
    tiny = fi.smallest_normal
    base = [float("nan"), -float("nan"), float("inf"), -float("inf"), 0.0, -0.0,
            1.0, -1.0, 1.0 + fi.eps, 0.1, -0.1, 0.5, -0.5, 2.5, fi.max, -fi.max, 1 + 2**-7, 1 + 2**-10]
    if subnormals:
        base += [tiny, -tiny, tiny / 4, -tiny / 4, tiny * (1 - fi.eps)]
    return torch.tensor(base, dtype=torch.float64).to(dtype).tolist()


def special_pairs(dtype: torch.dtype, subnormals: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Two 1-d tensors of ``dtype`` that hold every pair of :func:`special_values` (ties of ±0 and
    of NaNs included) at many positions of a vectorised loop."""
    v = torch.tensor(special_values(dtype, subnormals), dtype=torch.float64).to(dtype)
    return v.repeat_interleave(len(v)), v.repeat(len(v))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` hold the same values bit for bit (the sign of zeros included), with
    NaNs in the same places (of any sign and payload: torch's own ops give different NaNs for one
    operation, depending on where in the tensor it lies)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point():
        return torch.equal(a, b)
    nan_a, nan_b = torch.isnan(a), torch.isnan(b)
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(nan_a, nan_b) and torch.equal(a.view(ints)[~nan_a], b.view(ints)[~nan_b])
