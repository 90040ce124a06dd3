"""The primitives beyond Adam and their aliases, against their references (CPU).

- ``trace`` (momentum) and ``sgd`` == ``torch.optim.SGD`` (momentum 0 / 0.9, Nesterov on / off,
  weight decay 0 / 1e-2): to 1e-12 over 50 steps in float64 (``None`` gradients included); in
  float32 each step, started from torch's params and buffer, within 2 ulps of the step's operands
  (torch fuses ``g + wd·θ``, ``g + μ·b`` and ``θ − η·d`` into multiply-adds, one rounding where
  the element rule has two), and the 50-step trajectories to 1e-5.
- ``scale_by_lion`` and ``lion`` == ``pytorch_optimizer.Lion`` (4.1.0): without weight decay the
  params bit for bit in float32 over 50 steps (the signs agree); its momentum, which torch forms
  with ``lerp`` (a multiply-add), within 2 ulps per step; with weight decay (torch: ``θ·(1 − η·wd)``
  with the factor rounded to float32, here ``θ − η·(u + wd·θ)``) within 2 ulps per step and to
  1e-12 over 50 steps in float64.

Each through the pure API (``tx.update`` on the kernels, and op by op under ``gx.kernels(False)``),
``gx.Optimizer`` (the C kernels, and ``fused=False``) and a ``gx.partition`` of two settings.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import grokxform as gx


def _reference_lion(*args: Any, **kwargs: Any) -> torch.optim.Optimizer:
    """``pytorch_optimizer.Lion`` (a test dependency; the test skips where it is not installed)."""
    return pytest.importorskip("pytorch_optimizer").Lion(*args, **kwargs)


F32, F64 = torch.float32, torch.float64

# A 0-d and an empty leaf; 37 and 9 elements leave a remainder after any vector width.
SHAPES: dict[str, tuple[int, ...]] = {"scalar": (), "empty": (0,), "vector": (37,), "matrix": (8, 9), "wide": (3, 64)}
STEPS = 50


def params_of(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g, dtype=F64).to(dtype) for n, s in SHAPES.items()}


def missing(t: int, name: str) -> bool:
    """``vector`` gets no gradient every third step, ``matrix`` on its first two."""
    return (name == "vector" and t % 3 == 1) or (name == "matrix" and t < 2)


def grads_of(dtype: torch.dtype, t: int, skip: Callable[[int, str], bool] | None = None) -> dict[str, Any]:
    g = torch.Generator().manual_seed(1000 + t)
    drawn = {n: torch.randn(s, generator=g, dtype=F64).to(dtype) for n, s in SHAPES.items()}
    return {n: None if skip is not None and skip(t, n) else x for n, x in drawn.items()}


class Reference:
    """A torch optimizer over copies of ``params``, stepped with given gradients."""

    def __init__(self, make: Callable[[list[torch.Tensor]], torch.optim.Optimizer], params: dict[str, torch.Tensor],
                 buffer: str) -> None:
        self.tensors = {n: p.clone().requires_grad_() for n, p in params.items()}
        self.opt = make(list(self.tensors.values()))
        self.buffer = buffer

    def step(self, grads: dict[str, Any]) -> None:
        for n, p in self.tensors.items():
            p.grad = None if grads[n] is None else grads[n].clone()
        self.opt.step()

    def params(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.tensors.items()}

    def buffers(self) -> dict[str, torch.Tensor | None]:
        """Copies of the optimizer's buffers (``None`` where it has none yet)."""
        bufs = {n: self.opt.state.get(p, {}).get(self.buffer) for n, p in self.tensors.items()}
        return {n: None if b is None else b.clone() for n, b in bufs.items()}


def ulps(ours: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor) -> float:
    """max |ours − ref| in units of eps·scale (element by element)."""
    if ours.numel() == 0:
        return 0.0
    eps = torch.finfo(ref.dtype).eps
    return ((ours.to(F64) - ref.to(F64)).abs() / (eps * scale.to(F64).clamp_min(1e-300))).max().item()


def worst(a: dict[str, torch.Tensor], b: dict[str, Any]) -> float:
    return max(((a[n].to(F64) - b[n].to(F64)).abs().max().item() for n in a if b[n] is not None and a[n].numel()),
               default=0.0)


def follow_in_float64(make: Callable[[list[torch.Tensor]], torch.optim.Optimizer], tx: gx.GradientTransformation,
                      kernels: bool, *, buffer: str = "", buffer_of: Callable[[Any], Any] | None = None,
                      skip: Callable[[int, str], bool] | None = missing, default_float64: bool = False,
                      steps: int = STEPS) -> None:
    """``steps`` float64 steps of ``tx`` (on the kernels or op by op) beside the reference
    optimizer ``make`` from the same params (``skip``: the leaves without a gradient at a step):
    the params within 1e-12 of the reference's at every step, and ``buffer_of(state)`` of its
    state buffer ``buffer``. ``default_float64``: the reference runs with float64 as torch's
    default dtype (NAdam keeps its running product in the default dtype)."""
    p = params_of(F64)
    old = torch.get_default_dtype()
    torch.set_default_dtype(F64 if default_float64 else old)
    try:
        ref = Reference(make, p, buffer)
        state = tx.init(p)
        for t in range(steps):
            g = grads_of(F64, t, skip)
            ref.step(g)
            with gx.kernels(kernels):
                u, state = tx.update(g, state, p)
            p = gx.apply_updates(p, u)
            assert worst(p, ref.params()) < 1e-12, t
            if buffer_of is not None:
                assert worst(buffer_of(state), ref.buffers()) < 1e-12, t
    finally:
        torch.set_default_dtype(old)


# ---------------------------------------------------------------- trace and sgd

SGD_SETTINGS = [(m, n, wd) for m, n, wd in itertools.product((0.0, 0.9), (False, True), (0.0, 1e-2)) if m or not n]
SGD_IDS = [f"mom{m}-{'nesterov' if n else 'heavy'}-wd{wd}" for m, n, wd in SGD_SETTINGS]
LR = 1e-2


def torch_sgd(momentum: float, nesterov: bool, wd: float, lr: float = LR) -> Callable[[list], torch.optim.Optimizer]:
    return lambda ps: torch.optim.SGD(ps, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=wd)


def test_trace_is_optax_trace() -> None:
    """t = decay·t + g from t = 0 (so t_1 = g_1, torch's first buffer); Nesterov: g + decay·t."""
    g1, g2 = torch.tensor([2.0, -1.0]), torch.tensor([1.0, 3.0])
    for nesterov in (False, True):
        tx = gx.trace(0.5, nesterov=nesterov)
        s = tx.init({"w": torch.zeros(2)})
        assert isinstance(s, gx.TraceState) and torch.equal(s.trace["w"], torch.zeros(2))
        u1, s = tx.update({"w": g1}, s)
        u2, s = tx.update({"w": g2}, s)
        t2 = 0.5 * g1 + g2
        assert torch.equal(s.trace["w"], t2)
        assert torch.equal(u1["w"], g1 + 0.5 * g1 if nesterov else g1)
        assert torch.equal(u2["w"], g2 + 0.5 * t2 if nesterov else t2)


def test_trace_hyperparameters() -> None:
    with pytest.raises(ValueError, match="trace: decay"):
        gx.trace(-0.1)
    with pytest.raises(TypeError, match="nesterov"):
        gx.trace(0.9, nesterov=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="sgd: Nesterov"):
        gx.sgd(0.1, momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="sgd: momentum"):
        gx.sgd(0.1, momentum=-0.5)
    # a 0-d tensor decay (injected) gives the numbers of a Python one, bit for bit
    injected = gx.inject_hyperparams(gx.trace)(decay=0.9, nesterov=True)
    plain = gx.trace(0.9, nesterov=True)
    p = params_of(F32)
    si, sp = injected.init(p), plain.init(p)
    assert sorted(si.hyperparams) == ["decay"]
    for t in range(3):
        ui, si = injected.update(grads_of(F32, t), si)
        up, sp = plain.update(grads_of(F32, t), sp)
        assert all(torch.equal(ui[n], up[n]) for n in p)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "op_by_op"])
@pytest.mark.parametrize("momentum,nesterov,wd", SGD_SETTINGS, ids=SGD_IDS)
def test_sgd_equals_torch_sgd_float64(momentum: float, nesterov: bool, wd: float, kernels: bool) -> None:
    follow_in_float64(torch_sgd(momentum, nesterov, wd), gx.sgd(LR, momentum, nesterov, wd), kernels,
                      buffer="momentum_buffer", buffer_of=(lambda s: s["momentum"].trace) if momentum else None)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "op_by_op"])
@pytest.mark.parametrize("momentum,nesterov,wd", SGD_SETTINGS, ids=SGD_IDS)
def test_sgd_float32_steps_are_within_2_ulps_of_torch(momentum: float, nesterov: bool, wd: float,
                                                         kernels: bool) -> None:
    """Each step starts from torch's params and momentum buffer; the 50-step trajectories stay
    within 1e-5 of each other."""
    p0 = params_of(F32)
    ref = Reference(torch_sgd(momentum, nesterov, wd), p0, "momentum_buffer")
    tx = gx.sgd(LR, momentum, nesterov, wd)
    alone = Reference(torch_sgd(momentum, nesterov, wd), p0, "momentum_buffer")
    p_alone, s_alone = p0, tx.init(p0)
    state = tx.init(p0)
    for t in range(STEPS):
        g = grads_of(F32, t)
        before = ref.params()
        if momentum and t:
            state = dict(state, momentum=gx.TraceState(ref.buffers()))
        ref.step(g)
        after = ref.params()
        with gx.kernels(kernels):
            u, state = tx.update(g, state, before)
            ua, s_alone = tx.update(g, s_alone, p_alone)
        ours = gx.apply_updates(before, u)
        for n in ours:
            assert ulps(ours[n], after[n], before[n].abs() + (after[n] - before[n]).abs()) <= 2.0, (t, n)
        p_alone = gx.apply_updates(p_alone, ua)
        alone.step(g)
    assert worst(p_alone, alone.params()) < 1e-5


def test_sgd_state_and_chain() -> None:
    tx = gx.sgd(0.1, momentum=0.9, nesterov=True, weight_decay=1e-2)
    s = tx.init({"w": torch.ones(2)})
    assert list(s) == ["weight_decay", "momentum", "lr"] and isinstance(s["momentum"], gx.TraceState)
    assert list(gx.sgd(0.1).init({"w": torch.ones(2)})) == ["weight_decay", "lr"]  # no buffer at momentum 0
    hp = gx.inject_hyperparams(gx.sgd)(lr=0.1, momentum=0.9, weight_decay=0.01).init({"w": torch.ones(2)}).hyperparams
    assert sorted(hp) == ["lr", "weight_decay"]  # momentum decides the chain: it stays fixed


def model_of(dtype: torch.dtype, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int) -> None:
    dtype = next(model.parameters()).dtype
    for t in range(steps):
        g = torch.Generator().manual_seed(100 + t)
        x, y = torch.randn(16, 5, generator=g, dtype=dtype), torch.randn(16, 3, generator=g, dtype=dtype)
        opt.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        opt.step()


def max_param_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


@pytest.mark.parametrize("fused", [None, False], ids=["engine", "op_by_op"])
@pytest.mark.parametrize("momentum,nesterov,wd", [(0.0, False, 1e-2), (0.9, True, 1e-2), (0.9, False, 0.0)],
                         ids=["plain-wd", "nesterov-wd", "heavy"])
def test_sgd_optimizer_equals_torch_sgd(momentum: float, nesterov: bool, wd: float, fused: bool | None) -> None:
    mine, theirs = model_of(F64), model_of(F64)
    opt = gx.Optimizer(mine.parameters(), gx.sgd, lr=5e-2, momentum=momentum, nesterov=nesterov, weight_decay=wd,
                       fused=fused)
    train(mine, opt, STEPS)
    train(theirs, torch.optim.SGD(theirs.parameters(), lr=5e-2, momentum=momentum, nesterov=nesterov,
                                  weight_decay=wd), STEPS)
    assert opt.engines == (["c"] if fused is None else ["tx.update"])
    assert max_param_diff(mine, theirs) < 1e-12


def follow_two_groups(p: dict[str, torch.Tensor], tx: gx.GradientTransformation,
                      make: Callable[[list[torch.Tensor], list[torch.Tensor]], torch.optim.Optimizer]) -> None:
    """30 float64 steps of ``tx`` from ``p`` beside the reference optimizer with two param groups,
    ``make(matrices, the other leaves)``: the params within 1e-12."""
    ts = {n: v.clone().requires_grad_() for n, v in p.items()}
    opt = make([v for v in ts.values() if v.ndim >= 2], [v for v in ts.values() if v.ndim < 2])
    s = tx.init(p)
    for t in range(30):
        g = grads_of(F64, t, missing)
        u, s = tx.update(g, s, p)
        p = gx.apply_updates(p, u)
        for n, v in ts.items():
            v.grad = None if g[n] is None else g[n].clone()
        opt.step()
    assert worst(p, {n: v.detach() for n, v in ts.items()}) < 1e-12


def test_sgd_partition_equals_torch_sgd_with_two_param_groups() -> None:
    p = params_of(F64)
    labels = lambda path, t: "decay" if t.ndim >= 2 else "plain"  # noqa: E731
    tx = gx.partition({"decay": gx.sgd(1e-2, 0.9, weight_decay=0.1), "plain": gx.sgd(3e-2, 0.9, nesterov=True)},
                      labels)
    follow_two_groups(p, tx, lambda matrices, others: torch.optim.SGD([
        {"params": matrices, "lr": 1e-2, "momentum": 0.9, "weight_decay": 0.1},
        {"params": others, "lr": 3e-2, "momentum": 0.9, "nesterov": True},
    ]))


# ---------------------------------------------------------------- scale_by_lion and lion

LION_LR = 1e-2


def reference_lion(wd: float, lr: float = LION_LR, betas: tuple[float, float] = (0.9, 0.99)
                   ) -> Callable[[list], torch.optim.Optimizer]:
    return lambda ps: _reference_lion(ps, lr=lr, betas=betas, weight_decay=wd)


def test_scale_by_lion_is_the_papers_update() -> None:
    """u = sign(β1·m + (1−β1)·g), m ← β2·m + (1−β2)·g, from m = 0."""
    tx = gx.scale_by_lion(0.5, 0.75)
    s = tx.init({"w": torch.zeros(3)})
    assert isinstance(s, gx.ScaleByLionState) and torch.equal(s.mu["w"], torch.zeros(3))
    u, s = tx.update({"w": torch.tensor([1.0, -2.0, 0.0])}, s)
    assert torch.equal(u["w"], torch.tensor([1.0, -1.0, 0.0])) and torch.equal(s.mu["w"], torch.tensor([0.25, -0.5, 0.0]))
    u, s = tx.update({"w": torch.tensor([-0.5, -1.0, float("nan")])}, s)
    # c = 0.5·m + 0.5·g = (−0.125, −0.75, NaN): torch.sign's 0 for NaN
    assert torch.equal(u["w"], torch.tensor([-1.0, -1.0, 0.0]))
    assert torch.equal(s.mu["w"][:2], torch.tensor([0.0625, -0.625])) and s.mu["w"][2].isnan()
    with pytest.raises(ValueError, match="scale_by_lion: b1"):
        gx.scale_by_lion(b1=1.5)
    with pytest.raises(ValueError, match="lion: weight_decay"):
        gx.lion(weight_decay=-1.0)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "op_by_op"])
def test_lion_without_decay_is_pytorch_optimizer_lion_bit_for_bit(kernels: bool) -> None:
    """float32, 50 steps: the same params bit for bit; m within 2 ulps a step of torch's lerp."""
    p = params_of(F32)
    ref = Reference(reference_lion(0.0), p, "exp_avg")
    tx = gx.lion(LION_LR)
    state = tx.init(p)
    for t in range(STEPS):
        g = grads_of(F32, t, missing)
        mu_before = ref.buffers()
        if t:  # each step's m from torch's
            state = dict(state, lion=gx.ScaleByLionState({n: state["lion"].mu[n] if b is None else b
                                                          for n, b in mu_before.items()}))
        ref.step(g)
        with gx.kernels(kernels):
            u, state = tx.update(g, state, p)
        p = gx.apply_updates(p, u)
        ref_p, ref_mu = ref.params(), ref.buffers()
        for n in p:
            assert torch.equal(p[n], ref_p[n]), (t, n)
            if g[n] is not None and ref_mu[n] is not None:
                before = mu_before[n] if mu_before[n] is not None else torch.zeros_like(g[n])
                assert ulps(state["lion"].mu[n], ref_mu[n], before.abs() + g[n].abs()) <= 2.0, (t, n)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "op_by_op"])
@pytest.mark.parametrize("wd", [1e-2, 0.5])
def test_lion_with_decay_equals_pytorch_optimizer_lion(wd: float, kernels: bool) -> None:
    """float64: 1e-12 over 50 steps; float32: each step from torch's params within 2 ulps."""
    tx = gx.lion(LION_LR, weight_decay=wd)
    follow_in_float64(reference_lion(wd), tx, kernels, buffer="exp_avg", buffer_of=lambda s: s["lion"].mu)

    p32 = params_of(F32)
    ref = Reference(reference_lion(wd), p32, "exp_avg")
    state = tx.init(p32)
    for t in range(STEPS):
        g = grads_of(F32, t)
        before = ref.params()
        ref.step(g)
        after = ref.params()
        with gx.kernels(kernels):
            u, state = tx.update(g, state, before)  # (m: 2 ulps a step, above; the signs agree)
        ours = gx.apply_updates(before, u)
        for n in ours:
            assert ulps(ours[n], after[n], before[n].abs() + (after[n] - before[n]).abs()) <= 2.0, (t, n)


@pytest.mark.parametrize("fused", [None, False], ids=["engine", "op_by_op"])
@pytest.mark.parametrize("dtype,wd", [(F32, 0.0), (F64, 0.1)], ids=["f32", "f64-wd"])
def test_lion_optimizer_equals_pytorch_optimizer_lion(dtype: torch.dtype, wd: float, fused: bool | None) -> None:
    mine, theirs = model_of(dtype), model_of(dtype)
    opt = gx.Optimizer(mine.parameters(), gx.lion, lr=1e-3, weight_decay=wd, fused=fused)
    train(mine, opt, STEPS)
    train(theirs, _reference_lion(theirs.parameters(), lr=1e-3, weight_decay=wd), STEPS)
    assert opt.engines == (["c"] if fused is None else ["tx.update"])
    if wd == 0.0:
        assert all(torch.equal(a, b) for a, b in zip(mine.parameters(), theirs.parameters()))
    else:
        assert max_param_diff(mine, theirs) < 1e-12


def test_lion_partition_equals_pytorch_optimizer_lion_with_two_param_groups() -> None:
    p = params_of(F64)
    labels = lambda path, t: "decay" if t.ndim >= 2 else "plain"  # noqa: E731
    tx = gx.partition({"decay": gx.lion(1e-2, weight_decay=0.3), "plain": gx.lion(3e-2, b1=0.95, b2=0.98)}, labels)
    follow_two_groups(p, tx, lambda matrices, others: _reference_lion([
        {"params": matrices, "lr": 1e-2, "weight_decay": 0.3},
        {"params": others, "lr": 3e-2, "betas": (0.95, 0.98)},
    ]))
