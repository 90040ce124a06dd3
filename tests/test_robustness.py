"""Inputs that must not corrupt a run: a negative grokking signal, one huge gradient in the MA
window, and Python-number losses under ``torch.compile``. Each holds on every engine that runs on
the CPU: eager ``tx.update``, the engine's Triton code (interpreted), its foreach backend and the
traced fallback (``aot_eager``: the graph that Inductor would compile).
"""

from __future__ import annotations

import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import grokxform as gx
from grokxform.fused import FusedStep

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _has_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


NEEDS_TRITON = pytest.mark.skipif(not _has_triton(), reason="needs triton")
ENGINES = [
    None,  # eager tx.update
    pytest.param("triton", marks=NEEDS_TRITON),
    "foreach",
    "aot_eager",
]


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"h.0.w": torch.randn(6, 5, generator=g).to(DEVICE), "h.1.b": torch.randn(7, generator=g).to(DEVICE)}


def _grads(params: dict[str, torch.Tensor], t: int, scale: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + t)
    return {n: (torch.randn(p.shape, generator=g) * scale).to(DEVICE) for n, p in params.items()}


def _steps(tx, params, steps: int, engine: str | None, grads_at, **extra):
    """``steps`` updates of ``params`` by ``tx`` on ``engine``; returns the last step's params and
    the state in the eager layout."""
    if engine is None:
        state = tx.init(params)
        for t in range(steps):
            u, state = tx.update(grads_at(t), state, params, **extra)
            params = gx.apply_updates(params, u)
        return params, state
    fused = FusedStep(tx, {n: p.clone() for n, p in params.items()}, backend=engine)
    for t in range(steps):
        fused(grads_at(t), **extra)
    return fused.params, fused.eager_state()


# --------------------------------------------------------------------------------------------
# A negative grokking signal: α_t is clamped to [0, 1].


@pytest.mark.parametrize("engine", ENGINES, ids=lambda e: e or "eager")
def test_a_negative_grokking_signal_cannot_push_alpha_past_one(engine: str | None) -> None:
    """grokadamw with GS_t = −3 (α_init·exp(0.3) = 1.32 unclamped): α_t is 1, so μ stays a convex
    combination of gradients (here μ_0 = 0 and α = 1 keep it 0) and the params stay finite."""
    params = _params()
    tx = gx.grokadamw(lr=1e-2)
    p, state = _steps(tx, params, 12, engine, lambda t: _grads(params, t), grokking_signal=-3.0)
    ema = state["grokfast"]
    assert float(ema.alpha) == 1.0
    biggest = max(float(_grads(params, t)[n].abs().max()) for t in range(12) for n in params)
    for n in params:
        assert torch.isfinite(p[n]).all()
        assert float(ema.mu[n].abs().max()) <= biggest


def test_alpha_in_range_is_not_changed_by_the_clamp() -> None:
    """A signal that keeps α_t in [0, 1] gives α_init·exp(−κ·GS_t), negative GS_t included."""
    for gs in (-0.1, 0.0, 0.4, 50.0):
        tx = gx.ema_filter(0.9, signal_decay_rate=0.5)
        params = _params()
        _, state = tx.update(_grads(params, 0), tx.init(params), params, grokking_signal=gs)
        assert float(state.alpha) == 0.9 * math.exp(-0.5 * gs)


def test_hyperparameters_that_leave_alpha_range_are_refused() -> None:
    with pytest.raises(ValueError, match="signal_decay_rate"):
        gx.ema_filter(0.9, signal_decay_rate=-0.1)
    with pytest.raises(ValueError, match="alpha_init"):
        gx.grokadamw(alpha_init=1.5)
    with pytest.raises(ValueError, match="alpha"):
        gx.ema_filter(-0.2)


# --------------------------------------------------------------------------------------------
# Python-number losses and signals under torch.compile.


def _compile_counter():
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    return CompileCounterWithBackend("aot_eager")


@pytest.mark.parametrize("kind", ["losses", "signal"])
def test_python_float_losses_do_not_recompile_tx_update(kind: str) -> None:
    """A compiled step given ``loss.item()``-style floats: Dynamo compiles at most twice (the
    first value static, then a dynamic float, as it does for shapes), never once per value, and
    α_t follows the values (they are graph inputs, not constants)."""
    params = _params()
    tx = gx.named_chain(("grokfast", gx.amplify(gx.ema_filter(0.9, init="zeros", signal_decay_rate=0.5), 2.0)))
    cnt = _compile_counter()

    @torch.compile(fullgraph=True, backend=cnt)
    def step(grads, state, train, val):
        extra = {"grokking_signal": train} if kind == "signal" else {"train_loss": train, "val_loss": val}
        return tx.update(grads, state, params, **extra)

    state_c = state_e = tx.init(params)
    for t in range(5):
        train, val = 0.05 + 0.01 * t, 0.3 + 0.02 * t
        extra = {"grokking_signal": train} if kind == "signal" else {"train_loss": train, "val_loss": val}
        g = _grads(params, t)
        _, state_c = step(g, state_c, train, val)
        _, state_e = tx.update(g, state_e, params, **extra)
        assert float(state_c["grokfast"].alpha) == float(state_e["grokfast"].alpha)
    assert cnt.frame_count <= 2


def test_python_float_losses_do_not_recompile_optimizer_step() -> None:
    """``Optimizer.step(train_loss=float, val_loss=float)`` inside ``torch.compile`` (the default
    engine steps as ``tx.update`` there: the compiler fuses it): compiles stop after the second step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    ema = gx.ema_filter(0.9, init="zeros", signal_decay_rate=0.5)
    opt = gx.Optimizer(model.named_parameters(), gx.named_chain(
        ("grokfast", gx.amplify(ema, 2.0)), ("lr", gx.scale_by_learning_rate(1e-2))))
    cnt = _compile_counter()
    step = torch.compile(lambda tl, vl: opt.step(train_loss=tl, val_loss=vl), fullgraph=True, backend=cnt)
    counts = []
    for t in range(4):
        model(torch.randn(8, 4)).pow(2).mean().backward()
        step(0.05 + 0.01 * t, 0.3 + 0.02 * t)
        opt.zero_grad()
        counts.append(cnt.frame_count)
    assert counts[-1] == counts[1], counts
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_ready_chain_steps_inside_torch_compile() -> None:
    """A ready ``gx.chain`` (its state a tuple) under ``torch.compile(fullgraph=True)``: the state
    views of ``opt.state`` are refreshed inside the graph, and the run equals the eager one."""
    def run(compiled: bool) -> torch.Tensor:
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 3)
        opt = gx.Optimizer(model.named_parameters(), gx.chain(gx.amplify(gx.ema_filter(0.9), 2.0),
                                                               gx.scale_by_learning_rate(1e-2)), fused=False)
        step = lambda tl: opt.step(train_loss=tl, val_loss=0.3)  # noqa: E731
        if compiled:
            step = torch.compile(step, fullgraph=True, backend=_compile_counter())
        for t in range(3):
            model(torch.randn(8, 4)).pow(2).mean().backward()
            step(0.05 + 0.01 * t)
            opt.zero_grad()
        assert torch.equal(opt.state[model.weight]["0.mu"], opt.tx_states[0][0].mu["weight"])
        return model.weight.detach().clone()

    torch.testing.assert_close(run(True), run(False), rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------------------------
# One huge but finite gradient in the MA window.


def _outputs(tx, params, grads: list[dict[str, torch.Tensor]], engine: str | None) -> list[dict[str, torch.Tensor]]:
    """``tx``'s output at each step, on ``engine``. A fused step adds it to the params, which are
    zero before each step, so the params after the step are the output itself."""
    outs = []
    if engine is None:
        state = tx.init(params)
        for g in grads:
            u, state = tx.update(g, state, params)
            outs.append(u)
        return outs
    fused = FusedStep(tx, {n: torch.zeros_like(p) for n, p in params.items()}, backend=engine)
    for g in grads:
        for p in fused.params.values():
            p.zero_()
        fused(g)
        outs.append({n: p.clone() for n, p in fused.params.items()})
    return outs


SPIKE_CASES = [
    *[pytest.param(e, dt, id=f"{e or 'eager'}-{dn}") for e in (None, "foreach", "aot_eager")
      for dt, dn in ((torch.float32, "fp32"), (torch.float64, "fp64"))],
    pytest.param("triton", torch.float32, id="triton-fp32", marks=NEEDS_TRITON),  # kernels: 16/32-bit floats
    pytest.param("inductor", torch.float32, id="inductor-fp32"),  # Inductor's C++ must not reassociate TwoSum
]


@pytest.mark.parametrize("engine, dtype", SPIKE_CASES)
def test_ma_filter_recovers_exactly_once_a_spike_leaves_the_window(engine: str | None, dtype: torch.dtype) -> None:
    """A 1e14 gradient among values near 0.01 (w = 5): from the step it leaves the window, the
    output is the mean of the window's values computed directly: for float32 gradients bit for
    bit fl32(exact sum · fl64(1/w)); for float64 ones within 4 ulp of the largest gradient (the
    rounding of a float64 sum). A plain running sum stays wrong by ~1e-2 here, for ever."""
    w, spike_at, steps = 5, 3, 13
    params = {"a": torch.zeros(40, dtype=dtype, device=DEVICE), "b": torch.zeros(3, 4, dtype=dtype, device=DEVICE)}
    gen = torch.Generator().manual_seed(7)
    grads = []
    for t in range(steps):
        g = {n: (torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.01).to(DEVICE, dtype)
             for n, p in params.items()}
        if t == spike_at:
            g["a"][::3] = 1e14
            g["b"][1] = -1e14
        grads.append(g)
    outs = _outputs(gx.ma_filter(w), params, grads, engine)
    for t in range(spike_at + w, steps):
        for n in params:
            window = torch.stack([grads[k][n] for k in range(t - w + 1, t + 1)]).double()
            if dtype == torch.float32:  # a sum of 5 float32 values of this range is exact in float64
                want = (window.sum(0) * (1.0 / w)).to(dtype)
                assert torch.equal(outs[t][n], want), (t, n, (outs[t][n] - want).abs().max())
            else:
                exact = torch.tensor([math.fsum(c) for c in window.reshape(w, -1).T.tolist()], dtype=torch.float64)
                want = exact.reshape(window.shape[1:]).to(DEVICE) * (1.0 / w)
                atol = 4 * torch.finfo(torch.float64).eps * float(window.abs().max())
                torch.testing.assert_close(outs[t][n], want, rtol=0, atol=atol)
