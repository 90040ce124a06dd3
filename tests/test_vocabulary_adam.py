"""The Adam family, RMSprop and the element-by-element basics, against their references (CPU).

- ``scale_by_rms`` / ``scale_by_stddev`` and ``rmsprop`` == ``torch.optim.RMSprop`` (momentum
  0 / 0.9, centered or not, weight decay 0 / 1e-2): to 1e-12 over 50 steps in float64 (``None``
  gradients included); in float32 each step, started from torch's params and buffers, within
  4 ulps of the step's operands (torch's ``addcmul``, ``lerp`` and ``addcdiv`` round once where the
  element rule rounds twice), and the 50-step trajectories to 1e-5.
- ``adam`` == ``torch.optim.Adam`` (no weight decay), the same way.
- ``scale_by_nadam`` and ``nadam`` == ``torch.optim.NAdam`` (coupled and decoupled decay): to 1e-12
  in float64 (torch's running product Π μ_k is a 0-d tensor of the default dtype: the reference
  runs with float64 as the default dtype, else its float32 product alone is off by 4e-11); in
  float32 each step within 4 ulps.
- ``scale_by_ademamix`` and ``ademamix`` == ``pytorch_optimizer.AdEMAMix`` (4.1.0) with and
  without the α/β3 warm-ups, coupled and decoupled decay: to 1e-12 in float64; float32 each step
  within 4 ulps. Every leaf has a gradient at every step (that package counts steps per param
  group, this one per leaf).
- ``scale``, ``clip``, ``zero_nans``: optax's semantics on every pair of special values.

Each through the pure API (``tx.update`` on the kernels, and op by op under ``gx.kernels(False)``)
and ``gx.Optimizer`` (the C kernels, and ``fused=False``).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from cases import same_bits, special_pairs
from test_vocabulary import (
    F32,
    F64,
    STEPS,
    Reference,
    follow_in_float64,
    grads_of,
    max_param_diff,
    model_of,
    params_of,
    train,
    ulps,
    worst,
)

import grokxform as gx
from grokxform.transforms.nadam import _log_mu_product, _momentum

ULPS = 4.0
"""The most a float32 step may differ from the reference's, in ulps of its operands."""

Make = Callable[[list], torch.optim.Optimizer]
StateOf = Callable[[Reference, Any], Any]
"""``state_of(ref, ours)``: our state with the reference's buffers in it (for a step from torch's)."""


def _po() -> Any:
    """``pytorch_optimizer`` (a test dependency; the tests skip where it is not installed)."""
    return pytest.importorskip("pytorch_optimizer")


def check_float32_steps(make: Make, tx: gx.GradientTransformation, state_of: StateOf, kernels: bool) -> None:
    """Each step from torch's params and buffers within :data:`ULPS` of torch's; the 50-step
    trajectories within 1e-5."""
    p0 = params_of(F32)
    ref, alone = Reference(make, p0, ""), Reference(make, p0, "")
    state, s_alone, p_alone = tx.init(p0), tx.init(p0), p0
    for t in range(STEPS):
        g = grads_of(F32, t)
        before = ref.params()
        if t:
            state = state_of(ref, state)
        ref.step(g)
        after = ref.params()
        with gx.kernels(kernels):
            u, state = tx.update(g, state, before)
            ua, s_alone = tx.update(g, s_alone, p_alone)
        ours = gx.apply_updates(before, u)
        for n in ours:
            assert ulps(ours[n], after[n], before[n].abs() + (after[n] - before[n]).abs()) <= ULPS, (t, n)
        p_alone = gx.apply_updates(p_alone, ua)
        alone.step(g)
    assert worst(p_alone, alone.params()) < 1e-5


def buffers(ref: Reference, name: str) -> dict[str, torch.Tensor]:
    ref.buffer = name
    return ref.buffers()  # type: ignore[return-value]


def counts(ref: Reference) -> dict[str, torch.Tensor]:
    """torch's per-param steps as our 0-d int64 counts."""
    return {n: torch.tensor(int(s), dtype=torch.int64) for n, s in buffers(ref, "step").items()}


KERNELS = pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "op_by_op"])


# ---------------------------------------------------------------- scale_by_rms, scale_by_stddev, rmsprop

RMS_SETTINGS = list(itertools.product((0.0, 0.9), (False, True), (0.0, 1e-2)))
RMS_IDS = [f"mom{m}-{'centered' if c else 'plain'}-wd{wd}" for m, c, wd in RMS_SETTINGS]


def torch_rmsprop(momentum: float, centered: bool, wd: float, lr: float = 1e-2) -> Make:
    return lambda ps: torch.optim.RMSprop(ps, lr=lr, alpha=0.99, eps=1e-8, momentum=momentum, centered=centered,
                                          weight_decay=wd)


def rms_state_of(ref: Reference, state: Any) -> Any:
    nu = buffers(ref, "square_avg")
    rms = (gx.ScaleByRStdDevState(buffers(ref, "grad_avg"), nu) if isinstance(state["rms"], gx.ScaleByRStdDevState)
           else gx.ScaleByRmsState(nu))
    new = dict(state, rms=rms)
    if "momentum" in state:
        new["momentum"] = gx.TraceState(buffers(ref, "momentum_buffer"))
    return new


@KERNELS
@pytest.mark.parametrize("momentum,centered,wd", RMS_SETTINGS, ids=RMS_IDS)
def test_rmsprop_equals_torch_rmsprop(momentum: float, centered: bool, wd: float, kernels: bool) -> None:
    tx = gx.rmsprop(1e-2, 0.99, 1e-8, momentum, centered, wd)
    follow_in_float64(torch_rmsprop(momentum, centered, wd), tx, kernels)
    check_float32_steps(torch_rmsprop(momentum, centered, wd), tx, rms_state_of, kernels)


def test_scale_by_rms_and_stddev() -> None:
    """The equations from ν = μ = 0, ε outside or inside the root; the chain of ``rmsprop``."""
    g1, g2 = torch.tensor([2.0, -1.0], dtype=F64), torch.tensor([1.0, 3.0], dtype=F64)
    for eps_in_sqrt, centered in itertools.product((False, True), (False, True)):
        tx = (gx.scale_by_stddev if centered else gx.scale_by_rms)(0.5, 0.25, eps_in_sqrt=eps_in_sqrt)
        s = tx.init({"w": torch.zeros(2, dtype=F64)})
        mu = nu = torch.zeros(2, dtype=F64)
        for g in (g1, g2):
            u, s = tx.update({"w": g}, s)
            nu, mu = 0.5 * nu + 0.5 * g * g, 0.5 * mu + 0.5 * g
            var = nu - mu * mu if centered else nu
            expected = g / ((var + 0.25).sqrt() if eps_in_sqrt else var.sqrt() + 0.25)
            assert torch.allclose(u["w"], expected, rtol=1e-15, atol=0), (eps_in_sqrt, centered)
        assert torch.allclose(s.nu["w"], nu, rtol=1e-15, atol=0)
        if centered:
            assert torch.allclose(s.mu["w"], mu, rtol=1e-15, atol=0)
    assert list(gx.rmsprop(0.1).init({"w": torch.ones(1)})) == ["weight_decay", "rms", "lr"]
    for bad, match in [(lambda: gx.scale_by_rms(decay=1.5), "scale_by_rms: decay"),
                       (lambda: gx.scale_by_stddev(eps=-1.0), "scale_by_stddev: eps"),
                       (lambda: gx.rmsprop(momentum=-0.1), "rmsprop: momentum")]:
        with pytest.raises(ValueError, match=match):
            bad()
    with pytest.raises(TypeError, match="centered"):
        gx.rmsprop(centered=1)  # type: ignore[arg-type]


# ---------------------------------------------------------------- adam

def adam_state_of(ref: Reference, state: Any) -> Any:
    return dict(state, adam=gx.ScaleByAdamState(counts(ref), buffers(ref, "exp_avg"), buffers(ref, "exp_avg_sq")))


@KERNELS
def test_adam_equals_torch_adam(kernels: bool) -> None:
    make: Make = lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.9, 0.99), eps=1e-8)  # noqa: E731
    tx = gx.adam(1e-2, 0.9, 0.99, 1e-8)
    follow_in_float64(make, tx, kernels)
    check_float32_steps(make, tx, adam_state_of, kernels)
    assert list(tx.init({"w": torch.ones(1)})) == ["adam", "lr"]


# ---------------------------------------------------------------- scale_by_nadam and nadam

NADAM_SETTINGS = [(0.0, False), (1e-2, False), (1e-2, True)]
NADAM_IDS = ["plain", "coupled", "decoupled"]


def torch_nadam(wd: float, decoupled: bool) -> Make:
    return lambda ps: torch.optim.NAdam(ps, lr=1e-2, weight_decay=wd, decoupled_weight_decay=decoupled)


def nadam_state_of(ref: Reference, state: Any) -> Any:
    return dict(state, adam=gx.ScaleByNadamState(counts(ref), buffers(ref, "exp_avg"), buffers(ref, "exp_avg_sq")))


@KERNELS
@pytest.mark.parametrize("wd,decoupled", NADAM_SETTINGS, ids=NADAM_IDS)
def test_nadam_equals_torch_nadam(wd: float, decoupled: bool, kernels: bool) -> None:
    tx = gx.nadam(1e-2, weight_decay=wd, weight_decay_mode="decoupled" if decoupled else "coupled")
    follow_in_float64(torch_nadam(wd, decoupled), tx, kernels, default_float64=True)
    check_float32_steps(torch_nadam(wd, decoupled), tx, nadam_state_of, kernels)


def test_nadam_momentum_product_in_closed_form() -> None:
    """Π μ_k in closed form == the running product (in float64) over 3,000 steps, for several ψ
    (0 included: μ_k = β1/2): within 1e-15 (NAdam reads 1 − Π), and relatively within 1e-13
    while Π is above 1e-6 (both forms err by about t ulps, relatively)."""
    t = torch.arange(1, 3001, dtype=F64)
    for psi in (0.0, 4e-3, 0.05):
        running = torch.cumprod(_momentum(0.9, psi, t), 0)
        closed = torch.exp(_log_mu_product(0.9, psi, t))
        assert (closed - running).abs().max() < 1e-15, psi
        large = running > 1e-6
        assert ((closed - running).abs()[large] <= 1e-13 * running[large]).all(), psi


# ---------------------------------------------------------------- scale_by_ademamix and ademamix

ADEMAMIX_SETTINGS = [(None, 0.0, False), (20, 0.0, False), (20, 1e-2, False), (20, 1e-2, True)]
ADEMAMIX_IDS = ["fixed", "warmup", "warmup-coupled", "warmup-decoupled"]


def reference_ademamix(warmup: int | None, wd: float, decoupled: bool) -> Make:
    return lambda ps: _po().AdEMAMix(ps, lr=1e-2, betas=(0.9, 0.999, 0.9999), alpha=5.0, t_alpha_beta3=warmup,
                                     weight_decay=wd, weight_decouple=decoupled)


def ademamix_state_of(ref: Reference, state: Any) -> Any:
    count = state["adam"].count  # the package counts per group: every leaf has a gradient here
    return dict(state, adam=gx.ScaleByAdemamixState(count, buffers(ref, "exp_avg"), buffers(ref, "exp_avg_sq"),
                                                      buffers(ref, "exp_avg_slow")))


@KERNELS
@pytest.mark.parametrize("warmup,wd,decoupled", ADEMAMIX_SETTINGS, ids=ADEMAMIX_IDS)
def test_ademamix_equals_pytorch_optimizer_ademamix(warmup: int | None, wd: float, decoupled: bool,
                                                     kernels: bool) -> None:
    tx = gx.ademamix(1e-2, weight_decay=wd, alpha_warmup=warmup, beta3_warmup=warmup,
                     weight_decay_mode="decoupled" if decoupled else "coupled")
    follow_in_float64(reference_ademamix(warmup, wd, decoupled), tx, kernels, skip=None)
    check_float32_steps(reference_ademamix(warmup, wd, decoupled), tx, ademamix_state_of, kernels)


def test_ademamix_warmups_are_the_papers() -> None:
    """α_t = min(t·α/T_α, α); β3_t from β1 (t = 0) to β3 (t = T), its half-life linear in t; each
    warm-up on its own."""
    po = _po()
    tx = gx.scale_by_ademamix(0.9, 0.999, 0.999, 4.0, 0.0, alpha_warmup=4, beta3_warmup=8)
    s = tx.init({"w": torch.zeros(1, dtype=F64)})
    m2 = torch.zeros(1, dtype=F64)
    for t in range(1, 12):
        g = torch.tensor([1.0 + t], dtype=F64)
        _, s = tx.update({"w": g}, s)
        b3 = po.AdEMAMix.schedule_beta3(8, t, 0.9, 0.999)
        m2 = b3 * m2 + (1 - b3) * g
        assert torch.allclose(s.mu_slow["w"], m2, rtol=1e-14, atol=0), t
        assert po.AdEMAMix.schedule_alpha(4, t, 4.0) == min(t * 4.0 / 4, 4.0)
    half_life = lambda b: torch.log(torch.tensor(0.5)) / torch.log(torch.tensor(b))  # noqa: E731
    assert abs(po.AdEMAMix.schedule_beta3(8, 4, 0.9, 0.999) - 0.5 ** (1 / ((half_life(0.9) + half_life(0.999)) / 2))
               ) < 1e-6
    with pytest.raises(ValueError, match="alpha_warmup"):
        gx.scale_by_ademamix(alpha_warmup=0)
    with pytest.raises(ValueError, match="b1 \\(with beta3_warmup\\)"):
        gx.scale_by_ademamix(b1=0.0, beta3_warmup=10)
    with pytest.raises(ValueError, match="ademamix: weight_decay_mode"):
        gx.ademamix(weight_decay_mode="l2")  # type: ignore[arg-type]


def test_injected_ademamix_is_the_plain_one_bit_for_bit() -> None:
    """0-d tensor β1, β3 and α (injected) give the numbers of Python ones, warm-ups included."""
    kw = {"lr": 1e-2, "b1": 0.9, "b3": 0.999, "alpha": 5.0, "alpha_warmup": 5, "beta3_warmup": 5}
    injected, plain = gx.inject_hyperparams(gx.ademamix)(**kw), gx.ademamix(**kw)
    p = params_of(F32)
    si, sp = injected.init(p), plain.init(p)
    assert sorted(si.hyperparams) == ["alpha", "b1", "b3", "lr"]
    for t in range(6):
        ui, si = injected.update(grads_of(F32, t), si, p)
        up, sp = plain.update(grads_of(F32, t), sp, p)
        assert all(torch.equal(ui[n], up[n]) for n in p), t


# ---------------------------------------------------------------- gx.Optimizer

OPTIMIZERS = {
    "rmsprop": (lambda ps, f: gx.Optimizer(ps, gx.rmsprop, lr=1e-3, momentum=0.9, centered=True, weight_decay=1e-2,
                                          fused=f),
                lambda ps: torch.optim.RMSprop(ps, lr=1e-3, momentum=0.9, centered=True, weight_decay=1e-2)),
    "adam": (lambda ps, f: gx.Optimizer(ps, gx.adam, lr=1e-3, fused=f), lambda ps: torch.optim.Adam(ps, lr=1e-3)),
    "nadam": (lambda ps, f: gx.Optimizer(ps, gx.nadam, lr=1e-3, weight_decay=1e-2, fused=f),
              lambda ps: torch.optim.NAdam(ps, lr=1e-3, weight_decay=1e-2)),
    "ademamix": (lambda ps, f: gx.Optimizer(ps, gx.ademamix, lr=1e-3, alpha_warmup=20, beta3_warmup=20, fused=f),
                 lambda ps: _po().AdEMAMix(ps, lr=1e-3, t_alpha_beta3=20)),
}


@pytest.mark.parametrize("fused", [None, False], ids=["engine", "op_by_op"])
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_equals_the_reference(name: str, fused: bool | None) -> None:
    """float64 MLP, 50 steps: the C kernels and ``fused=False`` within 1e-12 of the reference."""
    mine, theirs = model_of(F64), model_of(F64)
    ours, reference = OPTIMIZERS[name]
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64)  # NAdam's running product in float64
    try:
        opt = ours(mine.parameters(), fused)
        train(mine, opt, STEPS)
        train(theirs, reference(theirs.parameters()), STEPS)
    finally:
        torch.set_default_dtype(old)
    assert opt.engines == (["c"] if fused is None else ["tx.update"])
    assert max_param_diff(mine, theirs) < 1e-12


# ---------------------------------------------------------------- scale, clip, zero_nans

@KERNELS
@pytest.mark.parametrize("dtype", [F32, F64, torch.bfloat16], ids=["f32", "f64", "bf16"])
def test_basics_follow_optax_on_special_values(dtype: torch.dtype, kernels: bool) -> None:
    """``scale``: g·s; ``clip``: ``torch.clamp(g, −δ, δ)`` (NaN stays NaN); ``zero_nans``: NaN → +0."""
    a, b = special_pairs(dtype)
    tree = {"a": a, "b": b}
    expected = {
        gx.scale(-0.5): {n: x * -0.5 for n, x in tree.items()},
        gx.clip(0.5): {n: torch.clamp(x, -0.5, 0.5) for n, x in tree.items()},
        gx.zero_nans(): {n: torch.where(x.isnan(), torch.zeros_like(x), x) for n, x in tree.items()},
    }
    for tx, want in expected.items():
        with gx.kernels(kernels):
            u, s = tx.update(tree, tx.init(tree))
        assert s == gx.EmptyState()
        for n in tree:
            assert same_bits(u[n], want[n]), (tx, n)
    with pytest.raises(ValueError, match="clip: max_delta"):
        gx.clip(-1.0)
    with pytest.raises(ValueError, match="scale: step_size"):
        gx.scale(float("inf"))
