"""Inputs that must not corrupt a run: a negative grokking signal, one huge gradient in the MA
window, and Python-number losses under ``torch.compile``. Each holds on every engine that runs on
the CPU: eager ``tx.update``, the engine's Triton code (interpreted), its foreach backend and the
traced fallback (``aot_eager``: the graph that Inductor would compile).
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
from cases import grad_tree, param_tree

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


def _params() -> dict[str, torch.Tensor]:
    return param_tree({"h.0.w": (6, 5), "h.1.b": (7,)}, device=DEVICE)


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
    p, state = _steps(tx, params, 12, engine, lambda t: grad_tree(params, t), grokking_signal=-3.0)
    ema = state["grokfast"]
    assert float(ema.alpha) == 1.0
    biggest = max(float(grad_tree(params, t)[n].abs().max()) for t in range(12) for n in params)
    for n in params:
        assert torch.isfinite(p[n]).all()
        assert float(ema.mu[n].abs().max()) <= biggest


def test_alpha_in_range_is_not_changed_by_the_clamp() -> None:
    """A signal that keeps α_t in [0, 1] gives α_init·exp(−κ·GS_t), negative GS_t included."""
    for gs in (-0.1, 0.0, 0.4, 50.0):
        tx = gx.ema_filter(0.9, signal_decay_rate=0.5)
        params = _params()
        _, state = tx.update(grad_tree(params, 0), tx.init(params), params, grokking_signal=gs)
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
        g = grad_tree(params, t)
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


def _outputs(
    tx, params, grads: list[dict[str, torch.Tensor]], engine: str | None
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """``tx``'s output and its running sums (``state.total``, copied) at each step, on
    ``engine``. A fused step adds the output to the params, which are zero before each step, so
    the params after the step are the output itself."""
    outs, totals = [], []
    if engine is None:
        state = tx.init(params)
        for g in grads:
            u, state = tx.update(g, state, params)
            outs.append(u)
            totals.append({n: t.clone() for n, t in state.total.items()})
        return outs, totals
    fused = FusedStep(tx, {n: torch.zeros_like(p) for n, p in params.items()}, backend=engine)
    for g in grads:
        for p in fused.params.values():
            p.zero_()
        fused(g)
        outs.append({n: p.clone() for n, p in fused.params.items()})
        totals.append({n: t.clone() for n, t in fused.state.total.items()})
    return outs, totals


SPIKE_CASES = [
    *[pytest.param(e, dt, id=f"{e or 'eager'}-{dn}") for e in (None, "foreach", "aot_eager")
      for dt, dn in ((torch.float32, "fp32"), (torch.float64, "fp64"))],
    pytest.param("triton", torch.float32, id="triton-fp32", marks=NEEDS_TRITON),  # kernels: 16/32-bit floats
    pytest.param("inductor", torch.float32, id="inductor-fp32"),
]


def _fsum(values: torch.Tensor) -> torch.Tensor:
    """The exact sum over dim 0, rounded once to float64."""
    flat = values.double().reshape(values.shape[0], -1).T.tolist()
    return torch.tensor([math.fsum(c) for c in flat], dtype=torch.float64).reshape(values.shape[1:])


def _spike_grads(params: dict[str, torch.Tensor], steps: int, spike_at: int) -> list[dict[str, torch.Tensor]]:
    """Gradients near 0.01, with 1e14 (and −1e14) in some elements at step ``spike_at``."""
    gen = torch.Generator().manual_seed(7)
    grads = []
    for t in range(steps):
        g = {n: (torch.randn(p.shape, generator=gen, dtype=torch.float64) * 0.01).to(p.device, p.dtype)
             for n, p in params.items()}
        if t == spike_at:
            g["a"][::3] = 1e14
            g["b"][1] = -1e14
        grads.append(g)
    return grads


@pytest.mark.parametrize("engine, dtype", SPIKE_CASES)
def test_ma_filter_recovers_exactly_once_a_spike_leaves_the_window(engine: str | None, dtype: torch.dtype) -> None:
    """A 1e14 gradient among values near 0.01 (w = 5, at step 3). The running sum is re-summed on
    each leaf's updates 5, 10, 15, 20 (steps 4, 9, 14, 19): there it is the window's sum rounded
    once (float32 gradients: their exact sum, bit for bit; float64 ones: within 4 ulp of the
    largest gradient, the rounding of a float64 sum). The spike leaves the window at step 8; from
    step 10 on the output is the mean of the window to a few roundings of the running sum."""
    w, spike_at, steps = 5, 3, 20
    params = {"a": torch.zeros(40, dtype=dtype, device=DEVICE), "b": torch.zeros(3, 4, dtype=dtype, device=DEVICE)}
    grads = _spike_grads(params, steps, spike_at)
    outs, totals = _outputs(gx.ma_filter(w), params, grads, engine)
    eps = torch.finfo(dtype).eps
    for t in range(w - 1, steps):
        for n in params:
            window = torch.stack([grads[k][n] for k in range(t - w + 1, t + 1)]).cpu()
            exact = _fsum(window)
            if t % w == w - 1:  # re-summed: the window's sum, rounded once
                if dtype == torch.float32:  # five float32 values of this range add exactly in float64
                    assert torch.equal(totals[t][n].cpu(), exact.to(dtype)), (t, n)
                else:
                    atol = 4 * eps * float(window.abs().max())
                    torch.testing.assert_close(totals[t][n].cpu(), exact, rtol=0, atol=atol)
            if t > spike_at + 2 * w - 2:  # after the first re-sum once the spike has left
                got, want = outs[t][n].cpu().double(), exact * (1.0 / w)
                atol = 16 * eps * float(window.abs().max())  # a few roundings of a running sum
                assert (got - want).abs().max() <= atol, (t, n, (got - want).abs().max(), atol)


def test_a_plain_running_sum_does_not_recover_from_the_spike() -> None:
    """The check above can fail: the same element rule without the re-sum (a plain running sum)
    is still wrong by more than 1e-3 (a tenth of the values) ten steps after the spike left."""
    w = 5
    decl = gx.declarations.declaration_of(gx.ma_filter(w))
    plain = dataclasses.replace(decl, window=gx.declarations.WindowField("window", w))
    params = {"a": torch.zeros(40, device=DEVICE), "b": torch.zeros(3, 4, device=DEVICE)}
    grads = _spike_grads(params, 24, 3)
    state = gx.ma_filter(w).init(params)
    for g in grads:
        u, state = plain.update(g, state)
    want = torch.stack([g["a"] for g in grads[-w:]]).double().mean(0)
    assert (u["a"].double() - want).abs().max() > 1e-3


def _resum_grads(steps: int, poison: bool) -> list[dict[str, torch.Tensor | None]]:
    """Gradients whose scale changes by 10^8 from step to step, over 10^24 (so that a running sum
    rounds, a re-sum changes its bits, and a float64 re-sum itself rounds: its order counts), with
    ``None`` for "b" at step 5 and for "a" at steps 6 and 7 (the leaves' counts, and so their
    re-sum steps, part), and with ``poison`` an inf at step
    10, where "a" is due for a re-sum (its update 9): ``apply_if_finite`` skips the step, the
    re-sum with it, and "a" re-sums at step 11 instead."""
    gen = torch.Generator().manual_seed(3)
    out: list[dict[str, torch.Tensor | None]] = []
    for t in range(steps):
        scale = 10.0 ** (8 * (t % 4) - 12)
        g: dict[str, torch.Tensor | None] = {
            "a": (torch.randn(40, generator=gen) * scale).to(DEVICE),
            "b": (torch.randn(3, 4, generator=gen) * scale).to(DEVICE),
        }
        if t == 5:
            g["b"] = None
        if t in (6, 7):
            g["a"] = None
        if poison and t == 10:
            g["a"][0] = math.inf
        out.append(g)
    return out


RESUM_KINDS = {
    "fp32-sum": (lambda: gx.ma_filter(3, warmup=False), False),
    "fp64-sum": (lambda: gx.ma_filter(3, warmup=False, accumulator_dtype=torch.float64), False),
    "bf16-window": (lambda: gx.ma_filter(3, "sum", window_dtype=torch.bfloat16), False),
    "sum": (lambda: gx.ma_filter(3, "sum", warmup=False), False),  # the output is the running sum itself
    "w7": (lambda: gx.ma_filter(7, warmup=False), False),  # the kernels add slots 1..4, then 5
    "w10": (lambda: gx.ma_filter(10, warmup=False, accumulator_dtype=torch.float64), False),  # 1..8, 4 at a time
    "if-finite": (lambda: gx.apply_if_finite(gx.amplify(gx.ma_filter(3, warmup=False), 2.0)), True),
}


@pytest.mark.parametrize("engine", ["foreach", pytest.param("triton", marks=NEEDS_TRITON), "aot_eager"])
@pytest.mark.parametrize("kind", sorted(RESUM_KINDS))
def test_ma_resum_is_eager_bit_for_bit_on_every_engine(engine: str, kind: str) -> None:
    """Each leaf re-sums on its own updates 3, 6, 9...; a skipped step re-sums nothing. Params
    and state (the running sums, the windows, the counts) equal eager's bit for bit."""
    make, poison = RESUM_KINDS[kind]
    tx = make()
    grads = _resum_grads(24, poison)
    params = {"a": torch.zeros(40, device=DEVICE), "b": torch.zeros(3, 4, device=DEVICE)}
    p_e, state = dict(params), tx.init(params)
    fused = FusedStep(tx, {n: p.clone() for n, p in params.items()}, backend=engine)
    for g in grads:
        u, state = tx.update(g, state, p_e)
        p_e = gx.apply_updates(p_e, u)
        fused(g)
    for n in params:
        assert torch.equal(p_e[n], fused.params[n]), (n, (p_e[n] - fused.params[n]).abs().max())
    want, _ = torch.utils._pytree.tree_flatten(state)
    got, _ = torch.utils._pytree.tree_flatten(fused.eager_state())
    assert len(want) == len(got)
    for a, b in zip(want, got):
        assert torch.equal(a, b), (a, b)


def test_the_resum_changes_the_running_sum_here() -> None:
    """The check above can fail: in these gradients a re-sum changes a float32 running sum, and
    the float64 sum of a window depends on the order of its additions."""
    tx = gx.ma_filter(3, warmup=False)
    decl = gx.declarations.declaration_of(tx)
    plain = dataclasses.replace(decl, window=gx.declarations.WindowField("window", 3))
    params = {"a": torch.zeros(40, device=DEVICE), "b": torch.zeros(3, 4, device=DEVICE)}
    s1 = s2 = tx.init(params)
    changed = False
    grads = _resum_grads(24, False)
    for g in grads:
        _, s1 = tx.update(g, s1)
        _, s2 = plain.update(g, s2)
        changed = changed or not torch.equal(s1.total["a"], s2.total["a"])
    assert changed
    window = [g["b"].double() for g in grads[10:20]]
    forward, backward = window[0], window[-1]
    for v in window[1:]:
        forward = forward + v
    for v in reversed(window[:-1]):
        backward = backward + v
    assert not torch.equal(forward, backward)


@pytest.mark.parametrize("engine", [None, "foreach", pytest.param("triton", marks=NEEDS_TRITON), "aot_eager"])
def test_ma_filter_forgets_a_nan_at_the_first_resum_after_it_left(engine: str | None) -> None:
    """A NaN in one element at step 2 (w = 4): the output of that element is NaN until the
    re-sum at step 7 (the leaf's update 8), the first after the NaN left the window (step 6);
    from step 8 it is the window's mean again. The other elements never see it."""
    w, steps = 4, 14
    params = {"a": torch.zeros(10, device=DEVICE), "b": torch.zeros(3, device=DEVICE)}
    gen = torch.Generator().manual_seed(5)
    grads = [{n: torch.randn(p.shape, generator=gen).to(DEVICE) for n, p in params.items()} for _ in range(steps)]
    grads[2]["a"][4] = math.nan
    outs, totals = _outputs(gx.ma_filter(w), params, grads, engine)
    for t in range(w - 1, steps):
        a = outs[t]["a"].cpu()
        assert bool(a[4].isnan()) == (t < 8), t
        assert bool(torch.isfinite(torch.cat([a[:4], a[5:]])).all()) and bool(torch.isfinite(outs[t]["b"]).all())
        if t >= 8:
            want = torch.stack([grads[k]["a"] for k in range(t - w + 1, t + 1)]).cpu().double().mean(0)
            torch.testing.assert_close(a.double(), want, rtol=0, atol=1e-6)
    assert bool(totals[7]["a"].isfinite().all())
