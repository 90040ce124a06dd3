"""``grokxform.Optimizer(..., fused=...)``: the compiled in-place step behind torch.optim's interface."""

from __future__ import annotations

import pytest
import torch
from cases import ALIASES

import grokxform as gx

F64 = torch.float64


def model64(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(F64)


def train(opt: torch.optim.Optimizer, model: torch.nn.Module, sched, steps: range) -> None:
    for t in steps:
        g = torch.Generator().manual_seed(t)
        x, y = torch.randn(16, 5, generator=g, dtype=F64), torch.randn(16, 2, generator=g, dtype=F64)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step(train_loss=loss.detach(), val_loss=loss.detach() * 2)
        sched.step()


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_fused_optimizer_equals_eager_and_never_recompiles(name: str) -> None:
    case = ALIASES[name]
    runs = {}
    for fused in (False, "aot_eager"):
        model = model64()
        opt = gx.Optimizer(model.named_parameters(), case.factory, fused=fused, **case.kwargs)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))  # a new lr every step
        train(opt, model, sched, range(8))
        runs[fused] = (model, opt)
    (m_e, o_e), (m_f, o_f) = runs[False], runs["aot_eager"]
    for a, b in zip(m_e.parameters(), m_f.parameters()):
        assert (a - b).abs().max().item() < 1e-13
    fs = o_f._fused_steps[0][1]
    assert fs.compiles == 1  # eight learning rates, eight signals, one graph
    # The group states in the eager layout (the fused step keeps MA windows as ring buffers).
    for v_e, v_f in zip(gx.tree.flatten(o_e.tx_states)[0], gx.tree.flatten(o_f.tx_states)[0]):
        assert (v_e.to(F64) - v_f.to(F64)).abs().max().item() < 1e-12
    for p_e, p_f in zip(m_e.parameters(), m_f.parameters()):
        for key, v in o_e.state[p_e].items():
            if not key.startswith("grokfast.window"):
                assert (v.to(F64) - o_f.state[p_f][key].to(F64)).abs().max().item() < 1e-12, key


def test_fused_optimizer_checkpoint_resumes_like_the_uninterrupted_run(tmp_path):
    whole = model64()
    opt = gx.Optimizer(whole.named_parameters(), gx.grokfast_ema, fused="aot_eager", lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))
    train(opt, whole, sched, range(10))

    first = model64()
    opt1 = gx.Optimizer(first.named_parameters(), gx.grokfast_ema, fused="aot_eager", lr=1e-2)
    sched1 = torch.optim.lr_scheduler.LambdaLR(opt1, lambda t: 1.0 / (1 + t))
    train(opt1, first, sched1, range(4))
    torch.save({"m": first.state_dict(), "o": opt1.state_dict(), "s": sched1.state_dict()}, tmp_path / "c.pt")

    ckpt = torch.load(tmp_path / "c.pt", weights_only=True)
    second = model64(seed=1)
    second.load_state_dict(ckpt["m"])
    opt2 = gx.Optimizer(second.named_parameters(), gx.grokfast_ema, fused="aot_eager", lr=1e-2)
    sched2 = torch.optim.lr_scheduler.LambdaLR(opt2, lambda t: 1.0 / (1 + t))
    opt2.load_state_dict(ckpt["o"])
    sched2.load_state_dict(ckpt["s"])
    train(opt2, second, sched2, range(4, 10))
    for a, b in zip(whole.parameters(), second.parameters()):
        assert (a - b).abs().max().item() < 1e-13


def test_a_ready_transformation_runs_fused_with_its_lr_multiplier():
    runs = {}
    for fused in (False, "aot_eager"):
        model = model64()
        opt = gx.Optimizer(model.named_parameters(), gx.grokadamw(lr=1e-2), fused=fused, lr=0.5)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0 / (1 + t))  # the multiplier changes
        train(opt, model, sched, range(6))
        runs[fused] = (model, opt)
    (m_e, o_e), (m_f, o_f) = runs[False], runs["aot_eager"]
    for a, b in zip(m_e.parameters(), m_f.parameters()):
        assert (a - b).abs().max().item() < 1e-13
    assert o_f.engines == ["aot_eager"] and o_f._fused_steps[0][1].compiles == 1
    assert o_e.engines == ["tx.update"]


def test_fused_takes_a_known_backend():
    with pytest.raises(ValueError, match="fused"):
        gx.Optimizer(model64().parameters(), gx.adamw, fused="tensorrt")


def test_fused_ma_steps_never_rebuild_the_eager_window(monkeypatch):
    """A fused step keeps the MA window as one ring buffer per parameter and updates it in place;
    the eager layout (w views per parameter) is built only when someone reads the state. Building
    it every step made ``grokfast_ma`` with ``fused=True`` slower than eager (37 ms a step on a
    29-tensor model with w=100)."""
    from grokxform.engine import layout

    calls = []
    real = layout._to_eager
    monkeypatch.setattr(layout, "_to_eager", lambda st, ring_order: calls.append(ring_order) or real(st, ring_order))
    model = model64()
    opt = gx.Optimizer(model.named_parameters(), gx.grokfast_ma, fused="aot_eager", lr=1e-2, window_size=100)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1.0)
    train(opt, model, sched, range(5))
    assert calls == [True]  # the ring's slots as views, once (what state_dict and opt.state hold)
    ref = model64()
    opt_e = gx.Optimizer(ref.named_parameters(), gx.grokfast_ma, fused=False, lr=1e-2, window_size=100)
    train(opt_e, ref, torch.optim.lr_scheduler.LambdaLR(opt_e, lambda t: 1.0), range(5))
    sd, sd_e = opt.state_dict(), opt_e.state_dict()  # the eager layout, on demand
    assert calls
    slots = [k for k in sd["state"][0] if k.startswith("inner_state.grokfast.window.")]
    assert len(slots) == 100
    for i in sd["state"]:
        for k in slots:
            assert (sd["state"][i][k] - sd_e["state"][i][k]).abs().max().item() < 1e-13
