"""The primitives on per-leaf sums and counter-based random numbers, against their references (CPU).

- ``orthograd`` == ``pytorch_optimizer.OrthoGrad`` (4.1.0) wrapping ``torch.optim.SGD``: to 1e-12
  over 30 steps in float64 (``None`` gradients included, both of its code paths); in float32 each
  step's projected gradient within a few ulps of the reference's; a gradient parallel and nearly
  parallel to θ against the reference with the tolerance its own rounding allows.
- ``scale_by_trust_ratio`` == a float64 re-derivation of optax's formula (min_norm, κ, ε, zero norms).
- ``lamb`` == ``pytorch_optimizer.Lamb(weight_decouple=False, adam_debias=True)`` (``clamp`` lifted)
  with ``bias_correction=False, trust_ratio_eps=eps``: 1e-12 in float64 over 30 steps, each float32
  step within a few ulps; the default (bias-corrected) ``lamb`` == a float64 re-derivation of optax's.
- ``add_noise``: the same numbers op by op, on the kernels (``tx.update``), through ``gx.Optimizer``
  (C kernels) and its foreach backend; the noise's mean and variance match N(0, η/(1+t)^γ).
- ``centralize`` == a float64 re-derivation of gradient centralization.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from test_vocabulary import (
    F32, F64, Reference, follow_in_float64, grads_of, missing, params_of, ulps, worst,
)

import grokxform as gx


def _po() -> Any:
    return pytest.importorskip("pytorch_optimizer")


STEPS = 30


# ---------------------------------------------------------------- orthograd


def _reference_projection(p: dict[str, torch.Tensor], g: dict[str, Any], foreach: bool) -> dict[str, Any]:
    """OrthoGrad's projection of ``g`` at ``p``: its foreach code, or the per-tensor code of its base."""
    ts = {n: v.clone().requires_grad_() for n, v in p.items()}
    for n, v in ts.items():
        v.grad = None if g[n] is None else g[n].clone()
    wrapper = _po().OrthoGrad(torch.optim.SGD, params=list(ts.values()), lr=0.0, foreach=foreach)
    wrapper.apply_orthogonal_gradients(list(ts.values()))
    return {n: None if v.grad is None else v.grad.clone() for n, v in ts.items()}


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "op_by_op"])
def test_orthograd_sgd_equals_pytorch_optimizer_orthograd_float64(kernels: bool, foreach: bool) -> None:
    follow_in_float64(
        lambda ps: _po().OrthoGrad(torch.optim.SGD, params=ps, lr=1e-2, momentum=0.9, foreach=foreach),
        gx.chain(gx.orthograd(), gx.sgd(1e-2, momentum=0.9)), kernels, steps=STEPS,
    )


def _f32_ulps(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor) -> float:
    """max |a − b| in float32 ulps of ``scale`` (element by element)."""
    return ((a.double() - b.double()).abs() / (torch.finfo(F32).eps * scale)).max().item()


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "op_by_op"])
def test_orthograd_float32_is_within_a_few_ulps_of_the_exact_projection(kernels: bool) -> None:
    """Random θ and g, 10 draws: the update within 3 float32 ulps (of s·(|g| + |c·θ|)) of the
    projection computed in float64 from the same float32 inputs; the reference's float32 sums put it
    up to ~50 such ulps away, and ours is never farther from the reference than that plus 3."""
    tx = gx.orthograd()
    for t in range(10):
        p, g = params_of(F32, seed=t), grads_of(F32, t)
        with gx.kernels(kernels):
            u, _ = tx.update(g, tx.init(p), p)
        for foreach in (False, True):
            ref = _reference_projection(p, g, foreach)
            for n in p:
                if not p[n].numel() or p[n].dim() == 0:
                    assert torch.equal(u[n], torch.zeros_like(u[n])) and torch.equal(ref[n], u[n]), n  # parallel
                    continue
                gg, ww = g[n].double(), p[n].double()
                c = (gg * ww).sum() / (ww * ww).sum()
                ortho = gg - c * ww
                exact = ortho * (gg.norm() / ortho.norm())
                scale = gg.norm() / ortho.norm() * (gg.abs() + (c * ww).abs())
                assert _f32_ulps(u[n], exact, scale) <= 3.0, (t, n)
                assert _f32_ulps(u[n], ref[n], scale) <= _f32_ulps(ref[n], exact, scale) + 3.0, (t, n, foreach)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "op_by_op"])
@pytest.mark.parametrize("dtype", [F32, F64])
def test_orthograd_parallel_and_nearly_parallel_gradients(dtype: torch.dtype, kernels: bool) -> None:
    """g = 2θ: a zero update, as the reference's. g = 2θ + δ·r, ‖δr‖ = δ·‖g‖: the reference's
    update within the error its own rounding and the algebraic ‖g⊥‖² allow: δ = 1e-3 in float32
    (1e-3·‖g‖: the reference's float32 ⟨θ, g⟩ is off by ~1e-6, amplified by ‖g‖/‖g⊥‖), 1e-5 in
    float64 (1e-6·‖g‖). The sums are float64 on the kernels as op by op: the same bounds."""
    w = torch.randn(64, 33, generator=torch.Generator().manual_seed(3), dtype=F64)
    r = torch.randn(64, 33, generator=torch.Generator().manual_seed(4), dtype=F64)
    r = r - (r * w).sum() / (w * w).sum() * w
    delta, tol = (1e-3, 1e-3) if dtype == F32 else (1e-5, 1e-6)
    tx = gx.orthograd()
    p = {"w": w.to(dtype)}
    with gx.kernels(kernels):
        assert torch.equal(tx.update({"w": 2 * p["w"]}, tx.init(p), p)[0]["w"], torch.zeros_like(p["w"]))
        g = 2 * w + delta * r * (2 * w.norm() / r.norm())
        ours = tx.update({"w": g.to(dtype)}, tx.init(p), p)[0]["w"]
        for foreach in (False, True):
            ref = _reference_projection(p, {"w": g.to(dtype)}, foreach)["w"]
            assert (ours.double() - ref.double()).norm().item() <= tol * g.norm().item(), foreach


def test_orthograd_keeps_the_norm_and_removes_the_component() -> None:
    p, g = params_of(F64), grads_of(F64, 0)
    u, _ = gx.orthograd().update(g, gx.orthograd().init(p), p)
    for n in ("vector", "matrix", "wide"):
        assert abs((u[n] * p[n]).sum().item()) < 1e-12
        assert math.isclose(u[n].norm().item(), g[n].norm().item(), rel_tol=1e-13)
    with pytest.raises(ValueError, match="orthograd: eps"):
        gx.orthograd(eps=-1.0)
    with pytest.raises(ValueError, match="params"):
        gx.orthograd().update(g, gx.orthograd().init(p))


def test_orthograd_optimizer_tracks_the_reference_in_float32() -> None:
    from test_vocabulary import max_param_diff, model_of, train

    mine, theirs = model_of(F32), model_of(F32)
    opt = gx.Optimizer(mine.parameters(), gx.chain(gx.orthograd(), gx.sgd(5e-2, momentum=0.9)))
    train(mine, opt, 50)
    train(theirs, _po().OrthoGrad(torch.optim.SGD, params=list(theirs.parameters()), lr=5e-2, momentum=0.9), 50)
    assert opt.engines == ["c"]
    assert max_param_diff(mine, theirs) < 1e-5


# ---------------------------------------------------------------- scale_by_trust_ratio and lamb


def _trust_ratio_f64(u: torch.Tensor, p: torch.Tensor, min_norm: float, coef: float, eps: float) -> torch.Tensor:
    """optax's ``scale_by_trust_ratio``, in float64."""
    pn, un = max(p.double().norm().item(), min_norm), max(u.double().norm().item(), min_norm)
    ratio = 1.0 if pn == 0.0 or un == 0.0 else coef * pn / (un + eps)
    return u.double() * ratio


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "op_by_op"])
@pytest.mark.parametrize("min_norm,coef,eps", [(0.0, 1.0, 0.0), (2.0, 0.5, 1e-3)], ids=["optax", "min_norm"])
def test_scale_by_trust_ratio_is_optaxs(min_norm: float, coef: float, eps: float, kernels: bool) -> None:
    p, g = params_of(F64), grads_of(F64, 0)
    p["matrix"] = torch.zeros_like(p["matrix"])  # ‖θ‖ = 0
    g["wide"] = torch.zeros_like(g["wide"])  # ‖u‖ = 0
    p["vector"] = p["vector"] * 1e-3  # ‖θ‖ below min_norm
    tx = gx.scale_by_trust_ratio(min_norm, coef, eps)
    with gx.kernels(kernels):
        u, _ = tx.update(g, tx.init(p), p)
    for n in p:
        assert torch.allclose(u[n], _trust_ratio_f64(g[n], p[n], min_norm, coef, eps), rtol=1e-14, atol=0), n
    u32, _ = tx.update({n: x.float() for n, x in g.items()}, tx.init(p), {n: x.float() for n, x in p.items()})
    for n in p:
        assert u32[n].dtype == F32 and torch.allclose(u32[n].double(), u[n], rtol=1e-6, atol=0), n


def _reference_lamb(lr: float, wd: float, foreach: bool) -> Any:
    def make(ps: list[torch.Tensor]) -> torch.optim.Optimizer:
        opt = _po().Lamb(ps, lr=lr, weight_decay=wd, weight_decouple=False, adam_debias=True, eps=1e-6,
                         foreach=foreach)
        opt.clamp = math.inf  # ‖θ‖ uncapped (its class default caps it at 10)
        return opt

    return make


LAMB_SETTINGS = [(1e-2, 0.0, False), (1e-2, 0.1, True), (3e-2, 0.01, False)]


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "op_by_op"])
@pytest.mark.parametrize("lr,wd,foreach", LAMB_SETTINGS, ids=["plain", "wd-foreach", "wd"])
def test_lamb_equals_pytorch_optimizer_lamb_float64(lr: float, wd: float, foreach: bool, kernels: bool) -> None:
    tx = gx.lamb(lr, weight_decay=wd, bias_correction=False, trust_ratio_eps=1e-6)
    follow_in_float64(_reference_lamb(lr, wd, foreach), tx, kernels, buffer="exp_avg",
                      buffer_of=lambda s: s["adam"].mu, steps=STEPS)


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
def test_lamb_float32_steps_are_within_a_few_ulps_of_pytorch_optimizer(foreach: bool) -> None:
    """Each step starts from the reference's params and moments; the 30-step trajectories agree to 1e-5."""
    p0 = params_of(F32)
    ref = Reference(_reference_lamb(1e-2, 0.1, foreach), p0, "exp_avg")
    tx = gx.lamb(1e-2, weight_decay=0.1, bias_correction=False, trust_ratio_eps=1e-6)
    alone = Reference(_reference_lamb(1e-2, 0.1, foreach), p0, "exp_avg")
    p_alone, s_alone, state = p0, tx.init(p0), tx.init(p0)
    for t in range(STEPS):
        g = grads_of(F32, t)
        before = ref.params()
        if t:
            nu = {n: ref.opt.state[v]["exp_avg_sq"].clone() for n, v in ref.tensors.items()}
            state = dict(state, adam=state["adam"]._replace(mu=ref.buffers(), nu=nu))
        ref.step(g)
        after = ref.params()
        u, state = tx.update(g, state, before)
        ours = gx.apply_updates(before, u)
        for n in ours:
            assert ulps(ours[n], after[n], before[n].abs() + 4 * (after[n] - before[n]).abs()) <= 2.0, (t, n)
        ua, s_alone = tx.update(g, s_alone, p_alone)
        p_alone = gx.apply_updates(p_alone, ua)
        alone.step(g)
    assert worst(p_alone, alone.params()) < 1e-5


def test_lamb_is_optaxs_lamb_in_float64() -> None:
    """Bias-corrected Adam, + wd·θ, × ‖θ‖/‖r‖, × −η: re-derived in float64 over 10 steps."""
    b1, b2, eps, wd, lr = 0.9, 0.999, 1e-6, 0.05, 1e-2
    p = params_of(F64)
    mine, ref = dict(p), dict(p)
    m = {n: torch.zeros_like(x) for n, x in p.items()}
    v = {n: torch.zeros_like(x) for n, x in p.items()}
    tx = gx.lamb(lr, b1, b2, eps, wd)
    state = tx.init(p)
    for t in range(1, 11):
        g = grads_of(F64, t)
        u, state = tx.update(g, state, mine)
        mine = gx.apply_updates(mine, u)
        for n in ref:
            m[n] = b1 * m[n] + (1 - b1) * g[n]
            v[n] = b2 * v[n] + (1 - b2) * g[n] ** 2
            r = (m[n] / (1 - b1**t)) / ((v[n] / (1 - b2**t)).sqrt() + eps) + wd * ref[n]
            ref[n] = ref[n] - lr * _trust_ratio_f64(r, ref[n], 0.0, 1.0, 0.0)
        assert worst(mine, ref) < 1e-12, t
    assert list(state) == ["adam", "weight_decay", "trust_ratio", "lr"]
    with pytest.raises(ValueError, match="lamb: weight_decay"):
        gx.lamb(weight_decay=-1.0)
    with pytest.raises(TypeError, match="bias_correction"):
        gx.scale_by_adam(bias_correction=1)  # type: ignore[arg-type]


# ---------------------------------------------------------------- add_noise


def test_add_noise_gives_the_same_numbers_on_every_path() -> None:
    """Op by op, the pure update on the kernels, gx.Optimizer (C kernels), its foreach backend."""
    tx = gx.add_noise(eta=0.3, gamma=0.55, seed=7)
    p = params_of(F32)
    paths: dict[str, list[dict[str, Any]]] = {"op_by_op": [], "kernels": []}
    for kernels, name in ((False, "op_by_op"), (True, "kernels")):
        s = tx.init(p)
        for t in range(3):
            with gx.kernels(kernels):
                u, s = tx.update(grads_of(F32, t, missing), s, p)
            paths[name].append(u)
    for fused in (None, "foreach"):
        ts = {n: x.clone().requires_grad_() for n, x in p.items()}
        opt = gx.Optimizer(list(ts.items()), gx.chain(tx, gx.scale_by_learning_rate(1.0, flip_sign=False)), fused=fused)
        got = []
        for t in range(3):
            before = {n: x.detach().clone() for n, x in ts.items()}
            g = grads_of(F32, t, missing)
            for n, x in ts.items():
                x.grad = None if g[n] is None else g[n].clone()
            opt.step()
            got.append({n: None if g[n] is None else ts[n].detach() - before[n] for n in ts})
        assert opt.engines == (["c"] if fused is None else ["foreach"])
        paths[str(fused)] = got
    reference = paths["op_by_op"]
    for name, steps in paths.items():
        for t, (u, r) in enumerate(zip(steps, reference)):
            for n in p:
                if r[n] is None:
                    assert u[n] is None or not u[n].any(), (name, t, n)
                    continue
                scale = grads_of(F32, t)[n].abs() + 4.0
                assert ulps(u[n], r[n], scale) <= 4.0, (name, t, n)


def test_add_noise_has_the_annealed_variance() -> None:
    eta, gamma, n = 0.5, 0.55, 200_000
    tx = gx.add_noise(eta, gamma, seed=3)
    zeros = {"a": torch.zeros(n), "b": torch.zeros(n // 2, 2, dtype=F64)}
    s = tx.init(zeros)
    draws = []
    for t in range(4):
        u, s = tx.update(zeros, s)
        var = eta / (1 + t) ** gamma
        for x in u.values():
            z = x.double().flatten() / math.sqrt(var)
            # 6 standard errors: the mean's 1/√n, the variance's √(2/n)
            assert abs(z.mean().item()) < 6 / math.sqrt(n)
            assert abs(z.var().item() - 1.0) < 6 * math.sqrt(2 / n), t
        draws.append(u["a"] / math.sqrt(var))
    assert [int(c) for c in s.count.values()] == [4, 4]
    # a new draw at each step and for each leaf
    assert abs(torch.corrcoef(torch.stack([draws[0], draws[1]]))[0, 1].item()) < 6 / math.sqrt(n)
    assert abs(torch.corrcoef(torch.stack([u["a"], u["b"].flatten().float()]))[0, 1].item()) < 6 / math.sqrt(n)
    with pytest.raises(ValueError, match="add_noise: seed"):
        gx.add_noise(seed=-1)
    with pytest.raises(ValueError, match="add_noise: eta"):
        gx.add_noise(eta=-1.0)


# ---------------------------------------------------------------- centralize


def test_centralize_is_gradient_centralization() -> None:
    shapes = {"conv": (4, 3, 2, 2), "matrix": (5, 7), "vector": (6,), "scalar": (), "empty": (0, 3)}
    gen = torch.Generator().manual_seed(0)
    g64 = {n: torch.randn(s, generator=gen, dtype=F64) + 3.0 for n, s in shapes.items()}
    tx = gx.centralize()
    for dtype, tol in ((F64, 1e-15), (F32, 1e-6), (torch.bfloat16, 1e-2)):
        g = {n: x.to(dtype) for n, x in g64.items()}
        u, _ = tx.update(g, tx.init(g))
        for n, x in g.items():
            x64 = x.double()
            want = x64 - x64.mean(dim=tuple(range(1, x.dim())), keepdim=True) if x.dim() > 1 else x64
            assert u[n].dtype == dtype and torch.allclose(u[n].double(), want, rtol=0, atol=tol * 4), (dtype, n)
    assert tx.update({"v": None, "w": g64["matrix"]}, tx.init(g64))[0]["v"] is None
    chain = gx.chain(gx.centralize(), gx.scale_by_adam(), gx.scale_by_learning_rate(0.1))
    models = [torch.nn.Linear(4, 3, dtype=F64) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [gx.Optimizer(m.parameters(), chain, fused=f) for m, f in zip(models, (None, False))]
    for t in range(3):
        for m, opt in zip(models, opts):
            m(torch.full((2, 4), float(t + 1), dtype=F64)).pow(2).sum().backward()
            opt.step()
            opt.zero_grad()
    assert opts[0].engines == ["c"] and opts[1].engines == ["tx.update"]  # the stage on the engine
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-15)
