"""grokxform.Optimizer (torch.optim adapter), its checkpoints, and grokxform.metrics."""

from __future__ import annotations

import io
import math
import os
import runpy
import subprocess
import sys
import textwrap
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler as L

import grokxform as gx
from grokxform import _state_io
from grokxform import tree as T

F64 = torch.float64


def make_model(seed: int = 0, dtype: torch.dtype = F64, hidden: int = 8) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, hidden), nn.Tanh(), nn.Linear(hidden, 3)).to(dtype)


def batch(t: int, dtype: torch.dtype = F64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + t)
    return torch.randn(16, 5, generator=g, dtype=dtype), torch.randn(16, 3, generator=g, dtype=dtype)


def loss_at(model: nn.Module, t: int) -> torch.Tensor:
    x, y = batch(t, next(model.parameters()).dtype)
    return nn.functional.mse_loss(model(x), y)


def backward(model: nn.Module, opt: torch.optim.Optimizer, t: int) -> torch.Tensor:
    loss = loss_at(model, t)
    opt.zero_grad()
    loss.backward()
    return loss.detach()


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


def assert_tree_equal(a: Any, b: Any, path: str = "") -> None:
    """Bit-for-bit equality of two nested containers of tensors and scalars."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), (path, list(a), list(b) if isinstance(b, dict) else b)
        for k in a:
            assert_tree_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_tree_equal(x, y, f"{path}.{i}")
    else:
        assert a == b, (path, a, b)


def roundtrip(obj: Any) -> Any:
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


# --- equality with torch.optim.AdamW under every kind of scheduler ------------------------------

SCHEDULERS: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "StepLR": lambda o: L.StepLR(o, step_size=7, gamma=0.5),
    "LambdaLR": lambda o: L.LambdaLR(o, lambda t: min(1.0, (t + 1) / 10)),
    "ReduceLROnPlateau": lambda o: L.ReduceLROnPlateau(o, factor=0.7, patience=2),
    "OneCycleLR": lambda o: L.OneCycleLR(o, max_lr=3e-2, total_steps=50),
    "CosineAnnealingWarmRestarts": lambda o: L.CosineAnnealingWarmRestarts(o, T_0=9),
    "CyclicLR": lambda o: L.CyclicLR(o, base_lr=1e-3, max_lr=2e-2, step_size_up=6),  # cycles beta1 too
    "ConstantLR": lambda o: L.ConstantLR(o, factor=0.3, total_iters=5),
    "LinearLR": lambda o: L.LinearLR(o, start_factor=0.1, total_iters=20),
    "ExponentialLR": lambda o: L.ExponentialLR(o, gamma=0.95),
    "MultiStepLR": lambda o: L.MultiStepLR(o, milestones=[5, 12, 30], gamma=0.5),
    "MultiplicativeLR": lambda o: L.MultiplicativeLR(o, lambda t: 0.97),
    "PolynomialLR": lambda o: L.PolynomialLR(o, total_iters=40, power=2.0),
    "CosineAnnealingLR": lambda o: L.CosineAnnealingLR(o, T_max=20),
    "SequentialLR": lambda o: L.SequentialLR(
        o, [L.LinearLR(o, start_factor=0.2, total_iters=5), L.ExponentialLR(o, gamma=0.9)], milestones=[5]
    ),
    "ChainedScheduler": lambda o: L.ChainedScheduler(
        [L.ConstantLR(o, factor=0.5, total_iters=8), L.ExponentialLR(o, 0.96)]
    ),
}


def run_with_scheduler(opt: torch.optim.Optimizer, model: nn.Module, kind: str, steps: int = 50) -> list[float]:
    sched = SCHEDULERS[kind](opt)
    lrs = []
    for t in range(steps):
        backward(model, opt, t)
        opt.step()
        lrs.append(opt.param_groups[0]["lr"])
        if kind == "ReduceLROnPlateau":
            sched.step(1.0)  # a loss that never improves: the lr is cut every 3 steps
        else:
            sched.step()
    return lrs


@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_adamw_equals_torch_adamw_under_schedulers(kind: str) -> None:
    ref, mine = make_model(), make_model()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    opt = gx.Optimizer(mine.parameters(), gx.adamw, lr=1e-2, weight_decay=0.1)
    ref_lrs = run_with_scheduler(ref_opt, ref, kind)
    lrs = run_with_scheduler(opt, mine, kind)
    assert lrs == ref_lrs
    assert len(set(lrs)) > 1  # the scheduler did change the learning rate
    assert max_diff(ref, mine) < 1e-12
    assert opt.param_groups[0]["lr"] == ref_opt.param_groups[0]["lr"]
    if kind in ("OneCycleLR", "CyclicLR"):  # these cycle beta1 too; it must reach the transform
        assert opt.param_groups[0]["betas"] == ref_opt.param_groups[0]["betas"] != (0.9, 0.999)
    for p, q in zip(ref.parameters(), mine.parameters()):
        assert (ref_opt.state[p]["exp_avg"] - opt.state[q]["adam.mu"]).abs().max() < 1e-12
        assert (ref_opt.state[p]["exp_avg_sq"] - opt.state[q]["adam.nu"]).abs().max() < 1e-12
        assert int(opt.state[q]["adam.count"]) == int(ref_opt.state[p]["step"]) == 50


def test_param_groups_equal_torch_adamw_groups() -> None:
    ref, mine = make_model(), make_model()

    def groups(m: nn.Module, named: bool) -> list[dict]:
        mats = [(n, p) if named else p for n, p in m.named_parameters() if p.ndim == 2]
        vecs = [(n, p) if named else p for n, p in m.named_parameters() if p.ndim == 1]
        return [{"params": mats}, {"params": vecs, "lr": 3e-2, "weight_decay": 0.0, "betas": (0.8, 0.99)}]

    ref_opt = torch.optim.AdamW(groups(ref, False), lr=1e-2, weight_decay=0.2)
    opt = gx.Optimizer(groups(mine, True), gx.adamw, lr=1e-2, weight_decay=0.2)
    assert opt.param_groups[1]["weight_decay"] == 0.0 and opt.param_groups[0]["weight_decay"] == 0.2
    sched_ref, sched = L.ExponentialLR(ref_opt, 0.95), L.ExponentialLR(opt, 0.95)
    for t in range(30):
        for m, o, s in ((ref, ref_opt, sched_ref), (mine, opt, sched)):
            backward(m, o, t)
            o.step()
            s.step()
    assert max_diff(ref, mine) < 1e-12
    assert list(opt.tx_states[0].inner_state["adam"].mu) == ["0.weight", "2.weight"]
    assert opt.tx_states[1].hyperparams["weight_decay"].item() == 0.0
    assert opt.tx_states[1].hyperparams["lr"].item() == pytest.approx(3e-2 * 0.95**29, rel=1e-15)


def test_intermittent_none_grads_equal_torch_adamw() -> None:
    """A parameter without a gradient is skipped and keeps its state (and its step count)."""
    ref, mine = make_model(), make_model()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = gx.Optimizer(mine.named_parameters(), gx.adamw, lr=1e-2)
    for t in range(20):
        for m, o in ((ref, ref_opt), (mine, opt)):
            backward(m, o, t)
            if t % 3 == 1:
                m[0].bias.grad = None
            o.step()
    assert max_diff(ref, mine) < 1e-12
    assert int(opt.state[mine[0].bias]["adam.count"]) == int(ref_opt.state[ref[0].bias]["step"]) == 13


# --- the adapter is the functional transform ----------------------------------------------------


def _assert_same(a: Any, b: Any, exact: bool, what: str) -> None:
    """``a`` equals ``b`` bit for bit, or (``exact=False``: the default engine, whose C kernels
    round every square root correctly where torch's CPU ``sqrt`` may be a bit apart) in float64
    within the last bits."""
    if exact:
        assert torch.equal(a, b), what
    else:
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14, msg=what)


@pytest.mark.parametrize("fused", ["foreach", None])
def test_optimizer_equals_functional_loop_bitwise(fused: Any) -> None:
    """Factory path == inject_hyperparams(factory) by hand; ready-tx path == the tx by hand: bit
    for bit on the engine's foreach backend (eager's ops), and on the default engine within the
    last bits of float64."""
    for make_opt, tx in (
        (lambda m: gx.Optimizer(m.named_parameters(), gx.grokadamw, lr=1e-2, fused=fused),
         gx.inject_hyperparams(gx.grokadamw)(lr=1e-2, eps=1e-8, weight_decay=1e-2, alpha_init=0.98, lamb=2.0,
                                             grokking_signal_decay_rate=0.1)),
        (lambda m: gx.Optimizer(m.named_parameters(), gx.grokfast_ma(lr=1e-2, window_size=3), fused=fused),
         gx.grokfast_ma(lr=1e-2, window_size=3)),
    ):
        model = make_model()
        opt = make_opt(model)
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        state = tx.init(params)
        for t in range(8):
            loss = backward(model, opt, t)
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            extra = {"train_loss": loss, "val_loss": loss * 1.3}
            opt.step(**extra)
            with gx.kernels(False):  # torch's own ops: the foreach backend's numbers
                updates, state = tx.update(grads, state, params, **extra)
            params = gx.apply_updates(params, updates)
        for n, p in model.named_parameters():
            _assert_same(p.detach(), params[n], fused == "foreach", n)
        if fused == "foreach":
            assert_tree_equal(_state_io.encode(opt.tx_states[0]), _state_io.encode(state))
        else:
            for x, y in zip(T.flatten(opt.tx_states[0])[0], T.flatten(state)[0]):
                _assert_same(x, y, False, "state")


@pytest.mark.parametrize("fused", ["foreach", None])
def test_gradient_clipping_zero_switches_the_clip_off(fused: Any) -> None:
    """gradient_clipping=0 must mean "no clip", not "clip to norm 0" (it stays a fixed argument)."""
    model = make_model()
    opt = gx.Optimizer(model.named_parameters(), gx.grokadamw, lr=1e-2, gradient_clipping=0.0, fused=fused)
    tx = gx.grokadamw(lr=1e-2, gradient_clipping=0.0)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = tx.init(params)
    for t in range(3):
        backward(model, opt, t)
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        opt.step()
        with gx.kernels(False):  # torch's own ops: the foreach backend's numbers
            updates, state = tx.update(grads, state, params)
        params = gx.apply_updates(params, updates)
    assert "clip" not in opt.tx_states[0].inner_state
    for n, p in model.named_parameters():
        _assert_same(p.detach(), params[n], fused == "foreach", n)


def test_ready_transform_lr_is_a_multiplier() -> None:
    ref, mine, plain = make_model(), make_model(), make_model()
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    opt = gx.Optimizer(mine.parameters(), gx.adamw(lr=1e-2))
    plain_opt = gx.Optimizer(plain.parameters(), gx.adamw(lr=1e-2))
    assert opt.param_groups[0]["lr"] == 1.0
    f = lambda t: 0.5 ** (t // 4)  # noqa: E731
    s_ref, s = L.LambdaLR(ref_opt, f), L.LambdaLR(opt, f)
    for t in range(16):
        for m, o in ((ref, ref_opt), (mine, opt), (plain, plain_opt)):
            backward(m, o, t)
            o.step()
        s_ref.step()
        s.step()
    assert max_diff(ref, mine) < 1e-12
    assert max_diff(ref, plain) > 1e-4  # without the multiplier the runs differ: the test can fail


def test_step_with_closure() -> None:
    a, b = make_model(), make_model()
    opt_a = gx.Optimizer(a.parameters(), gx.adamw, lr=1e-2)
    opt_b = gx.Optimizer(b.parameters(), gx.adamw, lr=1e-2)
    calls = []
    for t in range(5):

        def closure() -> torch.Tensor:
            calls.append(t)
            opt_a.zero_grad()
            loss = loss_at(a, t)
            loss.backward()
            return loss

        with torch.no_grad():  # step() must enable grad for the closure
            returned = opt_a.step(closure)
        expected = backward(b, opt_b, t)
        opt_b.step()
        assert torch.equal(returned.detach(), expected)
    assert calls == list(range(5))
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_extras_reach_the_grokking_signal() -> None:
    model = make_model()
    opt = gx.Optimizer(model.named_parameters(), gx.grokadamw, lr=1e-3)
    backward(model, opt, 0)
    opt.step()
    m0 = opt.metrics(floats=True)
    assert m0["grokfast/signal"] == 0.0 and m0["grokfast/alpha"] == pytest.approx(0.98, abs=1e-15)
    backward(model, opt, 1)
    opt.step(train_loss=torch.tensor(1.0), val_loss=torch.tensor(4.0))
    m1 = opt.metrics(floats=True)
    assert m1["grokfast/signal"] == pytest.approx(0.75, abs=1e-15)
    assert m1["grokfast/alpha"] == pytest.approx(0.98 * math.exp(-0.1 * 0.75), abs=1e-15)
    backward(model, opt, 2)
    opt.step(grokking_signal=0.2)
    assert opt.metrics(floats=True)["grokfast/signal"] == pytest.approx(0.2, abs=1e-15)


def test_frozen_parameters_are_left_alone() -> None:
    model = make_model()
    model[0].weight.requires_grad_(False)
    frozen = model[0].weight.detach().clone()
    opt = gx.Optimizer(model.named_parameters(), gx.grokadamw, lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for t in range(4):
        backward(model, opt, t)
        opt.step()
    assert torch.equal(model[0].weight, frozen)
    assert int(opt.state[model[0].weight]["adam.count"]) == 0
    assert not opt.state[model[0].weight]["adam.mu"].any()
    assert not opt.state[model[0].weight]["grokfast.mu"].any()
    for n, p in model.named_parameters():
        if n != "0.weight":
            assert not torch.equal(p, before[n]), n
            assert int(opt.state[p]["adam.count"]) == 4


def test_group_without_any_gradient_is_skipped() -> None:
    model = make_model()
    opt = gx.Optimizer(
        [{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}], gx.adamw, lr=1e-2
    )
    for p in model[2].parameters():
        p.requires_grad_(False)
    backward(model, opt, 0)
    opt.step()
    assert opt.tx_states[0] is not None and opt.tx_states[1] is None
    assert list(opt.metrics()) == ["group0/lr", "group0/eps", "group0/weight_decay", "group0/count"]
    assert all(not p.grad_fn and int(opt.state[p]["adam.count"]) == 1 for p in model[0].parameters())
    assert all(p not in opt.state for p in model[2].parameters())


def test_gradscaler() -> None:
    # torch >= 2.11 (the supported range) has the device-generic GradScaler, on the CPU too.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    scaled, plain = make_model(dtype=torch.float32), make_model(dtype=torch.float32)
    opt_s = gx.Optimizer(scaled.named_parameters(), gx.grokadamw, lr=1e-2)
    opt_p = gx.Optimizer(plain.named_parameters(), gx.grokadamw, lr=1e-2)
    for t in range(6):
        loss = loss_at(scaled, t)
        opt_s.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(opt_s, train_loss=loss.detach(), val_loss=2 * loss.detach())
        scaler.update()
        loss_p = backward(plain, opt_p, t)
        opt_p.step(train_loss=loss_p, val_loss=2 * loss_p)
    for p, q in zip(scaled.parameters(), plain.parameters()):
        assert torch.equal(p, q)  # power-of-two scaling is exact
    # A step with an inf gradient is skipped: nothing changes, the scale is halved.
    params = [p.detach().clone() for p in scaled.parameters()]
    state = T.tree_map(lambda x: x.clone() if isinstance(x, torch.Tensor) else x, _state_io.encode(opt_s.tx_states[0]))
    loss = loss_at(scaled, 9)
    opt_s.zero_grad()
    scaler.scale(loss).backward()
    scaled[0].weight.grad[0, 0] = float("inf")
    scaler.step(opt_s)
    scaler.update()
    assert scaler.get_scale() == 2.0**9
    assert_tree_equal(_state_io.encode(opt_s.tx_states[0]), state)
    for p, q in zip(scaled.parameters(), params):
        assert torch.equal(p, q)


def test_add_param_group_and_named_groups() -> None:
    model = make_model()
    opt = gx.Optimizer([("0.weight", model[0].weight)], gx.adamw, lr=1e-2)
    backward(model, opt, 0)
    opt.step()
    opt.add_param_group({"params": [("0.bias", model[0].bias)], "lr": 0.0})
    bias = model[0].bias.detach().clone()
    backward(model, opt, 1)
    opt.step()
    assert torch.equal(model[0].bias, bias)  # lr 0 in the new group
    assert int(opt.state[model[0].bias]["adam.count"]) == 1
    assert int(opt.state[model[0].weight]["adam.count"]) == 2


def test_state_views_are_the_state_tensors() -> None:
    model = make_model()
    opt = gx.Optimizer(model.named_parameters(), gx.grokadamw, lr=1e-2)
    backward(model, opt, 0)
    opt.step()
    inner = opt.tx_states[0].inner_state
    assert opt.state[model[2].weight]["adam.nu"] is inner["adam"].nu["2.weight"]
    assert opt.state[model[0].bias]["grokfast.mu"] is inner["grokfast"].mu["0.bias"]


def test_construction_errors() -> None:
    model = make_model()
    with pytest.raises(TypeError, match="'momentum'"):
        gx.Optimizer(model.parameters(), gx.adamw, momentum=0.9)
    with pytest.raises(ValueError, match="lr must be >= 0"):
        gx.Optimizer(model.parameters(), gx.adamw, lr=-1.0)
    with pytest.raises(ValueError, match="eps must be >= 0"):
        gx.Optimizer([{"params": [model[0].weight]}, {"params": [model[0].bias], "eps": -1.0}], gx.adamw)
    with pytest.raises(TypeError, match="'weight_decay'.*factory"):
        gx.Optimizer(model.parameters(), gx.adamw(), weight_decay=0.1)
    with pytest.raises(ValueError, match="param group 1 sets 'nesterov'"):
        gx.Optimizer([{"params": [model[0].weight]}, {"params": [model[0].bias], "nesterov": True}], gx.adamw)
    with pytest.raises(ValueError, match="sets 'weight_decay'"):
        gx.Optimizer([{"params": [model[0].weight], "weight_decay": 0.0}], gx.adamw())
    with pytest.raises(ValueError, match="'w' appears twice"):
        gx.Optimizer([{"params": [("w", model[0].weight)]}, {"params": [("w", model[0].bias)]}], gx.adamw)
    with pytest.raises(TypeError, match="tx must be"):
        gx.Optimizer(model.parameters(), 3)
    opt = gx.Optimizer(model.parameters(), gx.adamw, weight_decay=0)
    assert isinstance(opt.param_groups[0]["weight_decay"], float)  # injected, so a scheduler can change it


# --- checkpoints --------------------------------------------------------------------------------

RESUME_SCRIPT = textwrap.dedent(
    '''
    import sys
    import torch
    import grokxform as gx

    N, K = 12, 5

    def build():
        torch.manual_seed(0)
        a = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 4))
        torch.manual_seed(1)
        b = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4))
        decay = [(n, p) for n, p in a.named_parameters() if p.ndim > 1]
        rest = [(n, p) for n, p in a.named_parameters() if p.ndim <= 1]
        opt_a = gx.Optimizer([{"params": decay}, {"params": rest, "weight_decay": 0.0}], gx.grokadamw, lr=3e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt_a, lambda t: min(1.0, (t + 1) / 4))
        opt_b = gx.Optimizer(b.named_parameters(), gx.grokfast_ma(lr=1e-2, window_size=3))
        return [a, b, opt_a, opt_b, sched]

    def batch(t):
        g = torch.Generator().manual_seed(1000 + t)
        return torch.randn(32, 6, generator=g), torch.randn(32, 4, generator=g)

    def train(parts, start, stop):
        a, b, opt_a, opt_b, sched = parts
        xv, yv = batch(-1)
        for t in range(start, stop):
            x, y = batch(t)
            for m, opt in ((a, opt_a), (b, opt_b)):
                loss = torch.nn.functional.mse_loss(m(x), y)
                with torch.no_grad():
                    val = torch.nn.functional.mse_loss(m(xv), yv)
                opt.zero_grad()
                loss.backward()
                opt.step(train_loss=loss.detach(), val_loss=val)
            sched.step()

    KEYS = ("a", "b", "opt_a", "opt_b", "sched")

    def snapshot(parts):
        return {k: p.state_dict() for k, p in zip(KEYS, parts)}

    def restore(parts, ckpt):
        for k, p in zip(KEYS, parts):
            p.load_state_dict(ckpt[k])

    if __name__ == "__main__":
        torch.set_num_threads(1)
        path = sys.argv[1]
        parts = build()
        restore(parts, torch.load(path, weights_only=True))
        train(parts, K, N)
        torch.save(snapshot(parts), path + ".out")
    '''
)


def test_resume_in_a_fresh_process_is_bit_for_bit(tmp_path: Any) -> None:
    script = tmp_path / "resume.py"
    script.write_text(RESUME_SCRIPT)
    ns = runpy.run_path(str(script))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full = ns["build"]()
        ns["train"](full, 0, ns["N"])
        expected = ns["snapshot"](full)
        part = ns["build"]()
        ns["train"](part, 0, ns["K"])
        ckpt = tmp_path / "ckpt.pt"
        torch.save(ns["snapshot"](part), ckpt)
    finally:
        torch.set_num_threads(threads)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, str(script), str(ckpt)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    resumed = torch.load(str(ckpt) + ".out", weights_only=True)
    for key in ("a", "b", "opt_a", "opt_b"):
        assert_tree_equal(resumed[key], expected[key], key)
    # The state really is the trained one (not, say, two fresh optimizers).
    assert int(expected["opt_a"]["state"][0]["group.count"]) == 12
    assert sum(k.startswith("grokfast.window.") for k in expected["opt_b"]["state"][0]) == 3


def test_checkpoint_of_the_earlier_layout_still_loads() -> None:
    """A checkpoint of format 1 (one encoded state tree per group) resumes as the current one does."""
    model = make_model()
    opt = gx.Optimizer(model.named_parameters(), gx.grokadamw, lr=1e-2)
    backward(model, opt, 0)
    opt.step(train_loss=1.0, val_loss=2.0)
    group = {k: v for k, v in opt.state_dict()["param_groups"][0].items() if not k.startswith("grokxform_")}
    old = roundtrip({"state": [_state_io.encode(opt.tx_states[0])], "param_groups": [group],
                     "grokxform": {"version": 1, "transform": "grokxform.pipelines.grokadamw"}})
    twin_model = make_model()
    twin = gx.Optimizer(twin_model.named_parameters(), gx.grokadamw, lr=1e-2)
    twin.load_state_dict(old)
    twin_model.load_state_dict(model.state_dict())
    for m, o in ((model, opt), (twin_model, twin)):
        backward(m, o, 1)
        o.step(train_loss=1.0, val_loss=2.0)
    assert max_diff(model, twin_model) == 0.0
    assert_tree_equal(twin.state_dict()["state"], opt.state_dict()["state"])


@pytest.mark.parametrize("fused", [None, False])
def test_state_dict_tensors_are_the_optimizers_own_as_in_torch(fused: Any) -> None:
    """As with torch.optim: every tensor of a state dict is the optimizer's own, on every engine
    (the engine and the eager ``tx.update`` alike), counts and hyperparameters included, so a
    dict kept while training goes on is always the state of the last step; ``copy.deepcopy``
    keeps a snapshot."""
    import copy

    model, ref = make_model(), make_model()
    opt = gx.Optimizer(model.named_parameters(), gx.grokfast_ma, lr=1e-2, window_size=3, fused=fused)
    torch_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for o, m in ((opt, model), (torch_opt, ref)):
        backward(m, o, 0)
        o.step()
    sd, torch_sd = opt.state_dict(), torch_opt.state_dict()
    snap = copy.deepcopy(sd)
    for t in (1, 2):
        for o, m in ((opt, model), (torch_opt, ref)):
            backward(m, o, t)
            o.step()
    entry, kept = sd["state"][0], snap["state"][0]
    changed = {k for k in entry if not torch.equal(entry[k], kept[k])}
    moving = {"group.count", "inner_state.grokfast.count", "inner_state.adam.count", "inner_state.adam.mu",
              "inner_state.adam.nu", "inner_state.grokfast.total", "inner_state.grokfast.window.1",
              "inner_state.grokfast.window.2"}
    assert changed == moving
    now = opt.state_dict()["state"][0]
    assert all(torch.equal(entry[k], now[k]) for k in now)  # the kept dict is the state of the last step
    assert torch.equal(entry["inner_state.adam.mu"], opt.state[model[0].weight]["adam.mu"])
    assert torch.equal(torch_opt.state_dict()["state"][0]["exp_avg"], torch_sd["state"][0]["exp_avg"])  # torch: live too


def test_state_dict_is_weights_only_and_live() -> None:
    model = make_model()
    opt = gx.Optimizer(model.named_parameters(), gx.grokadamw, lr=1e-2)
    backward(model, opt, 0)
    opt.step(train_loss=1.0, val_loss=2.0)
    sd = opt.state_dict()
    loaded = roundtrip(sd)
    assert_tree_equal(loaded, sd)
    opt.param_groups[0]["lr"] = 5e-3
    backward(model, opt, 1)
    opt.step()
    assert sd["state"][0]["group.hyperparams.lr"].item() == 5e-3  # live, as the moments are
    assert sd["param_groups"][0]["lr"] == 1e-2  # group values are copies, as torch's
    fresh_model = make_model()
    fresh = gx.Optimizer(fresh_model.named_parameters(), gx.grokadamw, lr=1e-2)
    fresh.load_state_dict(loaded)
    assert fresh.param_groups[0]["lr"] == 1e-2
    assert_tree_equal(fresh.state_dict(), loaded)
    assert fresh.state[fresh_model[0].weight]["adam.mu"].abs().sum() > 0


def test_torch_hooks_run() -> None:
    model = make_model()
    opt = gx.Optimizer(model.parameters(), gx.adamw, lr=1e-2)
    seen: list[Any] = []
    opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("step", dict(kwargs))))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "note": "hooked"})
    opt.register_load_state_dict_pre_hook(lambda o, sd: {k: v for k, v in sd.items() if k != "note"})
    opt.register_load_state_dict_post_hook(lambda o: seen.append("loaded"))
    backward(model, opt, 0)
    opt.step(grokking_signal=0.5)
    sd = opt.state_dict()
    assert sd["note"] == "hooked"
    opt.load_state_dict(sd)
    assert seen == [("step", {"grokking_signal": 0.5}), "loaded"]


def test_load_before_the_first_step() -> None:
    a, b = make_model(), make_model()
    opt_a = gx.Optimizer(a.parameters(), gx.adamw, lr=1e-2)
    opt_b = gx.Optimizer(b.parameters(), gx.adamw, lr=5e-2)
    opt_b.load_state_dict(roundtrip(opt_a.state_dict()))
    assert opt_b.param_groups[0]["lr"] == 1e-2 and opt_b.tx_states == [None]
    for t in range(3):
        for m, o in ((a, opt_a), (b, opt_b)):
            backward(m, o, t)
            o.step()
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def _trained(opt_factory: Callable[[nn.Module], gx.Optimizer], hidden: int = 8, steps: int = 2) -> gx.Optimizer:
    model = make_model(hidden=hidden)
    opt = opt_factory(model)
    for t in range(steps):
        backward(model, opt, t)
        opt.step()
    return opt


@pytest.mark.parametrize(
    "source, target, message",
    [
        (lambda m: gx.Optimizer(m.named_parameters(), gx.grokadamw), dict(hidden=9),
         r"parameter '0.weight' has shape \(9, 5\) in the checkpoint, \(8, 5\) here"),
        (lambda m: gx.Optimizer(m.named_parameters(), gx.adamw), {},
         r"over 'grokxform.pipelines.adamw', this one runs 'grokxform.pipelines.grokadamw'"),
        (lambda m: gx.Optimizer(m.parameters(), gx.grokadamw, layer="index"), {},
         r"parameter 0 is '0' in the checkpoint, '0.weight' here"),
        (lambda m: gx.Optimizer(m.named_parameters(), gx.adamw()), dict(ready=True),
         r"parameter '0.weight', 'group.clip.norm': missing from the checkpoint"),
        (lambda m: gx.Optimizer(m.named_parameters(), gx.grokadamw(state_dtype=torch.float32)), dict(ready=True),
         r"parameter '0.weight', 'grokfast.mu': the checkpoint has dtype torch.float32, this optimizer torch.float64"),
        (lambda m: torch.optim.AdamW(m.parameters()), {}, r"torch.optim optimizer's state_dict"),
        (lambda m: gx.Optimizer([{"params": [p]} for p in m.parameters()], gx.grokadamw, layer="index"), {},
         r"checkpoint has 4 param groups, this optimizer 1"),
    ],
)
def test_bad_checkpoint_is_refused_and_changes_nothing(source: Callable, target: dict, message: str) -> None:
    bad = roundtrip(_trained(source, hidden=target.get("hidden", 8)).state_dict())
    if target.get("ready"):
        opt = _trained(lambda m: gx.Optimizer(m.named_parameters(), gx.grokadamw()))
    else:
        opt = _trained(lambda m: gx.Optimizer(m.named_parameters(), gx.grokadamw, lr=2e-3))
    before = roundtrip(opt.state_dict())
    groups_before = [dict(g) for g in opt.param_groups]
    views_before = {id(p): dict(v) for p, v in opt.state.items()}
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(bad)
    assert_tree_equal(opt.state_dict(), before)
    assert [dict(g) for g in opt.param_groups] == groups_before
    assert {id(p): dict(v) for p, v in opt.state.items()} == views_before


# --- metrics ------------------------------------------------------------------------------------


def _params_and_grads(seed: int = 0) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(seed)
    params = {"blocks.0.w": torch.randn(4, 4, generator=g, dtype=F64), "head": torch.randn(3, generator=g, dtype=F64)}
    grads = {k: 3 * torch.randn(v.shape, generator=g, dtype=F64) for k, v in params.items()}
    return params, grads


def test_metrics_of_an_injected_pipeline() -> None:
    params, grads = _params_and_grads()
    tx = gx.inject_hyperparams(gx.grokadamw)(lr=1e-3, lamb=2.5, gradient_clipping=1.0)
    state = tx.init(params)
    _, state = tx.update(grads, state, params, train_loss=1.0, val_loss=3.0)
    m = gx.metrics(state)
    assert set(m) == {
        "lr", "lamb", "count",
        "clip/norm", "clip/scale",
        "grokfast/alpha", "grokfast/signal", "grokfast/step", "grokfast/mu_norm", "grokfast/slow_norm",
    }
    gnorm = math.sqrt(sum(float((g**2).sum()) for g in grads.values()))
    assert m["clip/norm"].item() == pytest.approx(gnorm, rel=1e-12)
    assert m["clip/scale"].item() == pytest.approx(1.0 / (gnorm + 1e-6), rel=1e-12)
    assert m["grokfast/signal"].item() == pytest.approx(2 / 3, rel=1e-15)
    assert m["grokfast/alpha"].item() == pytest.approx(0.98 * math.exp(-0.1 * 2 / 3), rel=1e-15)
    mu = state.inner_state["grokfast"].mu
    mu_norm = math.sqrt(sum(float((v**2).sum()) for v in mu.values()))
    assert m["grokfast/mu_norm"].item() == pytest.approx(mu_norm, rel=1e-12)
    assert m["grokfast/slow_norm"].item() == pytest.approx(2.5 * mu_norm, rel=1e-12)
    assert m["lr"].item() == 1e-3 and m["lamb"].item() == 2.5 and int(m["count"]) == 1
    assert all(isinstance(v, torch.Tensor) and v.dim() == 0 for v in m.values())
    floats = gx.metrics(state, prefix="opt/", floats=True)
    assert floats["opt/lr"] == 1e-3 and isinstance(floats["opt/clip/norm"], float)
    # Values are copies: refilling a hyperparameter does not rewrite what was logged.
    state.hyperparams["lr"].fill_(5.0)
    assert m["lr"].item() == 1e-3


def test_metrics_of_plain_chains() -> None:
    params, grads = _params_and_grads()
    tx = gx.chain(gx.clip_by_global_norm(0.5), gx.amplify(gx.ema_filter(0.9), 2.0), gx.scale_by_adam())
    state = tx.init(params)
    _, state = tx.update(grads, state, params)
    m = gx.metrics(state)
    assert set(m) == {"0/norm", "0/scale", "1/alpha", "1/signal", "1/step", "1/mu_norm"}  # λ not in the state
    assert m["1/alpha"].item() == 0.9
    named = gx.named_chain(("a", gx.ema_filter(0.8)), ("lr", gx.scale_by_learning_rate(gx.linear_warmup(1.0, 4))))
    state = named.init(params)
    _, state = named.update(grads, state, params)
    assert set(gx.metrics(state)) == {"a/alpha", "a/signal", "a/step", "a/mu_norm", "lr/count"}
    with pytest.raises(TypeError, match="prefix"):
        gx.metrics(state, prefix=3)  # type: ignore[arg-type]
