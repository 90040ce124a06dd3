"""Per-leaf sums of element values (``elementwise(..., sums=...)``): what a primitive's scalar rule
reads beyond the input's norm (a projection's ⟨g, θ⟩ and ‖θ‖², a trust ratio's norms), on every
path: op by op, the foreach backend, the C kernels, the Triton kernels (Triton's interpreter on a
machine without CUDA), the pure ``tx.update`` on the kernels, and under ``torch.func.vmap``.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from cases import grad_tree, param_tree  # noqa: E402

import grokxform as gx  # noqa: E402
from grokxform import tree as T  # noqa: E402
from grokxform.base import elementwise  # noqa: E402
from grokxform.engine import native  # noqa: E402
from grokxform.fused import FusedStep  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = {"wte.weight": (37, 5), "h.0.w": (5000,), "h.0.b": (4, 4), "h.1.w": (2100,), "ln.w": (1,)}
"""Leaves of one element, of several reduction blocks, and matrices."""


def _project_rule(v, sc):
    return {"out": v.x - v.param * sc.c}


def _project_sums(v, sc):
    wide = torch.float64 if v.x.dtype == torch.float64 else torch.float32  # (16-bit values summed in float32)
    x, p = v.x.to(wide), v.param.to(wide)
    return {"xw": x * p, "ww": p * p}


def _project(share: float = 1.0) -> gx.GradientTransformation:
    """The gradient with ``share`` of its component along the weights removed, per leaf:
    g − share·(⟨g, θ⟩/‖θ‖²)·θ."""

    def scalars(ctx):
        return {"c": share * ctx.reduced["xw"] / (ctx.reduced["ww"] + 1e-30)}, {}

    return elementwise("project", _project_rule, scalars=scalars, sums=_project_sums, needs_params=True)


def _tx() -> gx.GradientTransformation:
    """Half the projection (a one-element leaf keeps a well-conditioned update), then Adam."""
    return gx.chain(_project(0.5), gx.scale_by_adam(), gx.scale_by_learning_rate(1e-2))


def _reference(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    g64, p64 = g.double(), p.double()
    return g64 - (g64 * p64).sum() / (p64 * p64).sum() * p64


def _params(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return param_tree(SHAPES, dtype=dtype, device=DEVICE, seed=3)


def test_the_scalar_rule_reads_each_sum_per_leaf() -> None:
    """Op by op, the projection removes the component along the weights: equal to a float64
    re-derivation, and the projected gradient is orthogonal to the weights."""
    params = _params(torch.float32)
    grads = grad_tree(params, 5)
    tx = _project()
    with gx.kernels(False):
        u, _ = tx.update(grads, tx.init(params), params)
    for name in SHAPES:
        torch.testing.assert_close(u[name].double(), _reference(grads[name], params[name]), rtol=1e-5, atol=1e-6)
        assert abs(float((u[name].double() * params[name].double()).sum())) < 1e-4 * float(
            params[name].double().norm() * grads[name].double().norm()) + 1e-12


def test_a_sum_reads_no_scalar() -> None:
    bad = elementwise("bad", _project_rule, scalars=lambda ctx: ({"c": 1.0}, {}), needs_params=True,
                      sums=lambda v, sc: {"xw": v.x * sc.c})
    params = _params(torch.float32)
    with gx.kernels(False), pytest.raises(ValueError, match="scalar 'c'"):
        bad.update(grad_tree(params, 1), bad.init(params), params)


def test_sums_must_be_a_rule() -> None:
    with pytest.raises(TypeError, match="sums must be an element rule"):
        elementwise("bad", _project_rule, sums={"xw": 1})


def _eager_run(tx: gx.GradientTransformation, params: dict, steps: int, none_at: dict | None = None):
    p, s = dict(params), tx.init(params)
    for t in range(steps):
        g = grad_tree(params, 10 + t)
        for name in (none_at or {}).get(t, ()):
            g[name] = None
        with gx.kernels(False):
            u, s = tx.update(g, s, p)
        p = gx.apply_updates(p, u)
    return p, s


_C = pytest.mark.skipif(DEVICE != "cpu" or not native.compiler()[0], reason="the C kernels run on the CPU, with a compiler")


@pytest.mark.parametrize("backend, dtype", [
    ("foreach", torch.float32), ("foreach", torch.float64), ("foreach", torch.bfloat16),
    pytest.param("c", torch.float32, marks=_C), pytest.param("c", torch.float64, marks=_C),
    pytest.param("c", torch.bfloat16, marks=_C),
    ("triton", torch.float32), ("triton", torch.bfloat16),
], ids=lambda v: {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float64: "fp64"}.get(v, v))
def test_every_engine_takes_the_sums(backend: str, dtype: torch.dtype) -> None:
    """Five steps with a leaf without a gradient on one: the engine's params and state equal op by
    op's (bit for bit on the foreach backend, which sums as op by op does; within the rounding of
    another summation order on the kernels)."""
    params = _params(dtype)
    none_at = {2: ("h.1.w",)}
    p_e, s_e = _eager_run(_tx(), params, 5, none_at)
    p_f = {n: t.clone() for n, t in params.items()}
    fused = FusedStep(_tx(), p_f, backend=backend)
    for t in range(5):
        g = grad_tree(params, 10 + t)
        for name in none_at.get(t, ()):
            g[name] = None
        fused(g)
    assert fused.engine == backend
    exact = backend == "foreach"
    tol = {"rtol": 2e-2, "atol": 1e-2} if dtype == torch.bfloat16 else {"rtol": 1e-5, "atol": 1e-6}
    for a, b in ((p_e, p_f), (s_e, fused.eager_state())):
        for x, y in zip(T.flatten(a)[0], T.flatten(b)[0]):
            if not isinstance(x, torch.Tensor):
                continue
            if exact:
                assert torch.equal(x, y), (x - y).abs().max()
            else:
                torch.testing.assert_close(y, x, **tol)


def test_the_pure_update_on_the_kernels_takes_the_sums() -> None:
    params = _params(torch.float32)
    tx = _tx()
    state = tx.init(params)
    grads = grad_tree(params, 7)
    with gx.kernels(False):
        ref, ref_state = tx.update(grads, state, params)
    got, got_state = tx.update(grads, state, params)
    for a, b in ((ref, got), (ref_state, got_state)):
        for x, y in zip(T.flatten(a)[0], T.flatten(b)[0]):
            if isinstance(x, torch.Tensor):
                torch.testing.assert_close(y, x, rtol=1e-5, atol=1e-7)


def test_the_optimizer_takes_the_sums() -> None:
    """``gx.Optimizer`` with its default engine against the pure update op by op."""
    params = _params(torch.float32)
    p_e, _ = _eager_run(_tx(), params, 4)
    model_params = [torch.nn.Parameter(t.clone()) for t in params.values()]
    opt = gx.Optimizer(model_params, _tx())
    for t in range(4):
        g = grad_tree(params, 10 + t)
        for p, name in zip(model_params, params):
            p.grad = g[name].clone()
        opt.step()
    for p, name in zip(model_params, params):
        torch.testing.assert_close(p.detach(), p_e[name], rtol=1e-5, atol=1e-6)


def test_sums_under_vmap() -> None:
    """A batch of parameter sets under ``torch.func.vmap``: each member's sums are its own."""
    tx = _project()
    params = {"w": torch.randn(4, 30, dtype=torch.float64), "b": torch.randn(4, 3, dtype=torch.float64)}
    grads = {"w": torch.randn(4, 30, dtype=torch.float64), "b": torch.randn(4, 3, dtype=torch.float64)}

    def one(p, g):
        return tx.update(g, tx.init(p), p)[0]

    got = torch.func.vmap(one)(params, grads)
    for name in params:
        for k in range(4):
            torch.testing.assert_close(got[name][k], _reference(grads[name][k], params[name][k]))


def test_per_leaf_sums_let_param_groups_step_apart() -> None:
    """A primitive with per-leaf sums (and no ``reduce``) reduces nothing over the tree: an
    optimizer with two param groups steps each group as the pure update of its own tree does."""
    params = _params(torch.float32)
    names = list(params)
    first, second = names[:2], names[2:]
    model_params = {n: torch.nn.Parameter(t.clone()) for n, t in params.items()}
    opt = gx.Optimizer([{"params": [model_params[n] for n in first]}, {"params": [model_params[n] for n in second]}],
                       _tx())
    g = grad_tree(params, 3)
    for n, p in model_params.items():
        p.grad = g[n].clone()
    opt.step()
    for group in (first, second):
        sub = {n: params[n] for n in group}
        with gx.kernels(False):
            u, _ = _tx().update({n: g[n] for n in group}, _tx().init(sub), sub)
        for n in group:
            torch.testing.assert_close(model_params[n].detach(), params[n] + u[n], rtol=1e-5, atol=1e-6)


class _TotalState(NamedTuple):
    total: torch.Tensor


def _total() -> gx.GradientTransformation:
    """Keeps Σ of the update's values, summed in float64, in a 0-d float64 state field."""

    def scalars(ctx):
        return {}, {"total": ctx.reduced["s"].sum()}

    def init(params):
        return _TotalState(torch.zeros((), dtype=torch.float64, device=next(iter(params.values())).device))

    return elementwise("total", lambda v, sc: {"out": v.x}, init=init, scalars=scalars,
                       sums=lambda v, sc: {"s": v.x.to(torch.float64)}, state_type=_TotalState)


@pytest.mark.parametrize("backend", ["foreach", pytest.param("c", marks=_C), "triton"])
def test_float64_sums_of_float32_values_stay_float64(backend: str) -> None:
    """Values cast to float64 are summed in float64 on every engine (a float32 sum of these
    values would be off by about 1e-7 of the total)."""
    params = {"a": torch.zeros(5000, device=DEVICE), "b": torch.zeros(3, device=DEVICE)}
    g = {"a": (torch.linspace(1.0, 2.0, 5000) + 1e-3 * torch.arange(5000) % 7).to(DEVICE),
         "b": torch.tensor([1e7, 1.0, -1e7], device=DEVICE)}
    exact = sum(float(t.double().sum()) for t in g.values())
    tx = gx.chain(_total(), gx.scale_by_learning_rate(1e-3))
    fused = FusedStep(tx, params, backend=backend)
    fused(g)
    assert fused.engine == backend
    total = float(fused.eager_state()[0].total)
    assert abs(total - exact) <= 1e-12 * abs(exact), (total, exact)
