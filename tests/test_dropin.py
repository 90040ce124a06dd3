"""The drop-in path does what a torch user means: names and depth, reductions across param
groups, and clear errors for bad input (hyperparameters, trees, flags)."""

from __future__ import annotations

import collections
import math
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import grokxform as gx
from grokxform import declarations as D

ENGINES = [False, None]  # eager tx.update; the default engine (its C kernels on the CPU)


def _stack(n: int = 30, width: int = 4) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[nn.Linear(width, width) for _ in range(n)])


def _train(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 4, *, scale: float = 10.0) -> None:
    torch.manual_seed(1)
    width = next(model.parameters()).shape[-1]
    for _ in range(steps):
        loss = (model(torch.randn(8, width)) ** 2).sum() * scale
        opt.zero_grad()
        loss.backward()
        opt.step()


def _params(model: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# -- names and depth --------------------------------------------------------------------------


@pytest.mark.parametrize("fused", ENGINES)
def test_depth_refuses_parameters_named_by_position(fused: Any) -> None:
    model = _stack(3)
    opt = gx.Optimizer(model.parameters(), gx.grokadamw, fused=fused)
    with pytest.raises(ValueError, match=r"named by its position.*module=model"):
        _train(model, opt, 1)


def test_depth_refuses_a_list_tree() -> None:
    params = [torch.ones(3), torch.ones(3)]
    tx = gx.grokadamw()
    state = tx.init(params)
    with pytest.raises(ValueError, match="named by its position"):
        tx.update([torch.ones(3), torch.ones(3)], state, params)
    # The other layer rules need no names.
    for layer in ("index", lambda path, i: i):
        tx = gx.grokadamw(layer=layer)
        tx.update([torch.ones(3), torch.ones(3)], tx.init(params), params)


@pytest.mark.parametrize("fused", ENGINES)
def test_module_names_unnamed_parameters(fused: Any) -> None:
    """``module=`` gives ``model.parameters()`` the names ``named_parameters()`` would: the same
    run, bit for bit, and β1 by depth (tensor 40 of a 30-layer stack is block 20: 0.9·0.9^20)."""
    named, unnamed = _stack(), _stack()
    opt_a = gx.Optimizer(named.named_parameters(), gx.grokadamw, lr=1e-2, fused=fused)
    opt_b = gx.Optimizer(unnamed.parameters(), gx.grokadamw, lr=1e-2, fused=fused, module=unnamed)
    _train(named, opt_a)
    _train(unnamed, opt_b)
    for a, b in zip(named.parameters(), unnamed.parameters()):
        assert torch.equal(a, b)
    names = [n for n, _ in unnamed.named_parameters()]
    assert opt_b._names == [names]
    beta = gx.layerwise_beta(0.9, 0.1, "depth").values(names, [True] * len(names))
    assert [round(beta[i], 3) for i in (1, 40, 59)] == [0.9, 0.109, 0.042]


def test_module_must_hold_the_parameters() -> None:
    model, other = _stack(2), _stack(2)
    with pytest.raises(ValueError, match="not a parameter of the module"):
        gx.Optimizer(other.parameters(), gx.grokadamw, module=model)
    with pytest.raises(TypeError, match="module must be a torch.nn.Module"):
        gx.Optimizer(model.parameters(), gx.grokadamw, module={"a": 1})


# -- one reduction across param groups ----------------------------------------------------------


def _decay(name: str) -> bool:
    return name.endswith("weight")


def _two_groups(model: nn.Module, fused: Any, tx: Any = gx.grokadamw, **kw: Any) -> gx.Optimizer:
    """transformers' Trainer's layout: a decay and a no-decay group of unnamed parameters."""
    decay = [p for n, p in model.named_parameters() if _decay(n)]
    rest = [p for n, p in model.named_parameters() if not _decay(n)]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    return gx.Optimizer(groups, tx, module=model, lr=1e-2, fused=fused, **kw)


@pytest.mark.parametrize("fused", ENGINES)
def test_two_groups_equal_one_group_with_a_mask(fused: Any) -> None:
    """Groups change hyperparameters, not the scope of the clip: a decay/no-decay split as two
    groups equals one group with the split as ``weight_decay_mask`` (the norm summed in another
    leaf order: a rounding apart), and every group logs the one norm."""
    a, b = _stack(6), _stack(6)
    opt_a = _two_groups(a, fused)
    opt_b = gx.Optimizer(b.named_parameters(), gx.grokadamw, lr=1e-2, weight_decay=0.1, fused=fused,
                         weight_decay_mask=lambda n, p: _decay(n))
    for _ in range(3):
        _train(a, opt_a, 1, scale=100.0)
        _train(b, opt_b, 1, scale=100.0)
        ma, mb = opt_a.metrics(floats=True), opt_b.metrics(floats=True)
        assert ma["group0/clip/norm"] == ma["group1/clip/norm"]
        assert ma["group0/clip/norm"] == pytest.approx(mb["clip/norm"], rel=1e-6)
        assert mb["clip/scale"] < 0.1  # the clip is active
    for x, y in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("fused", ENGINES)
def test_groups_in_model_order_equal_one_group_bit_for_bit(fused: Any) -> None:
    """Split in model order, the norm is summed in the same order: bit for bit."""
    a, b = _stack(4), _stack(4)
    ps = list(a.parameters())
    opt_a = gx.Optimizer([{"params": ps[:3]}, {"params": ps[3:]}], gx.grokadamw, module=a, lr=1e-2, fused=fused)
    opt_b = gx.Optimizer(b.named_parameters(), gx.grokadamw, lr=1e-2, fused=fused)
    _train(a, opt_a, 3, scale=100.0)
    _train(b, opt_b, 3, scale=100.0)
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


@pytest.mark.parametrize("fused", ENGINES)
def test_apply_if_finite_skips_every_group(fused: Any) -> None:
    """A non-finite gradient in one group skips the step of all of them, as with one group."""
    model = _stack(2)
    ps = list(model.parameters())
    opt = gx.Optimizer([{"params": ps[:2]}, {"params": ps[2:]}], gx.apply_if_finite(gx.adamw(lr=1e-2)), fused=fused)
    _train(model, opt, 1)
    before = _params(model)
    for p in ps:
        p.grad = torch.ones_like(p)
    ps[-1].grad[0] = float("nan")
    opt.step()
    for x, y in zip(before, model.parameters()):
        assert torch.equal(x, y)
    assert [s.total_notfinite.item() for s in opt.tx_states] == [1, 1]


def test_a_reduction_that_cannot_span_groups_is_refused() -> None:
    model = _stack(2)
    ps = list(model.parameters())
    tx = gx.chain(gx.ema_filter(0.9), gx.clip_by_global_norm(1.0), gx.scale_by_learning_rate(1e-2))
    opt = gx.Optimizer([{"params": ps[:2]}, {"params": ps[2:]}], tx)
    with pytest.raises(ValueError, match="cannot span several param groups"):
        _train(model, opt, 1)
    one = gx.Optimizer(model.parameters(), tx)  # one group: the reduction is over all of it
    _train(model, one, 1)


def test_a_reduction_of_ones_own_is_not_split_across_groups() -> None:
    """A user's primitive that reduces over the tree: several groups cannot share it, so they are
    refused rather than reduced per group."""
    def rule(v: Any, sc: Any) -> Any:
        return {"out": v.x * sc.scale}

    def scalars(ctx: Any) -> Any:
        return {"scale": 1.0 / (1.0 + torch.linalg.vector_norm(ctx.reduced["norm"]))}, {}

    tx = gx.chain(gx.base.elementwise("normalise", rule, scalars=scalars, reduce=("norm",)),
                  gx.scale_by_learning_rate(1e-2))
    model = _stack(2)
    ps = list(model.parameters())
    with pytest.raises(ValueError, match=r"\(normalise\) that several param groups cannot share"):
        _train(model, gx.Optimizer([{"params": ps[:2]}, {"params": ps[2:]}], tx), 1)
    _train(model, gx.Optimizer(model.parameters(), tx), 1)


def test_clip_takes_the_norm_of_the_whole_gradient() -> None:
    """The functional API: two halves of a tree clipped with the whole's norm give the whole's
    clip; ``whole_gradient_reductions`` computes it as the clip does."""
    torch.manual_seed(0)
    g = {f"w{i}": torch.randn(5) * 3 for i in range(4)}
    g["w2"][1] = float("inf")
    clip = gx.clip_by_global_norm(1.0)
    whole_u, whole_s = clip.update(g, clip.init(g))
    extra = D.whole_gradient_reductions(list(g.values()))
    halves = [{k: g[k] for k in ("w0", "w1")}, {k: g[k] for k in ("w2", "w3")}]
    for half in halves:
        u, s = clip.update(half, clip.init(half), global_grad_norm=extra[D.GLOBAL_NORM])
        for k in half:
            assert torch.equal(u[k], whole_u[k])
        assert torch.equal(s.scale, whole_s.scale) and torch.equal(s.norm, whole_s.norm)
    assert not bool(extra[D.GLOBAL_FINITE])


def test_tree_reductions_say_what_reads_the_gradient() -> None:
    assert D.tree_reductions(D.declaration_of(gx.grokadamw())) == [("clip_by_global_norm", True)]
    assert D.tree_reductions(D.declaration_of(gx.grokadamw_compat())) == []  # per tensor
    wrapped = gx.apply_if_finite(gx.inject_hyperparams(gx.grokadamw)(lr=1e-3))
    assert D.tree_reductions(D.declaration_of(wrapped)) == [("apply_if_finite", True), ("clip_by_global_norm", True)]
    late = gx.chain(gx.ema_filter(0.9), gx.clip_by_global_norm(1.0))
    assert D.tree_reductions(D.declaration_of(late)) == [("clip_by_global_norm", False)]
    masked = gx.masked(gx.clip_by_global_norm(1.0), lambda n, p: True)
    assert D.tree_reductions(D.declaration_of(masked)) == [("clip_by_global_norm", False)]


# -- clear errors -------------------------------------------------------------------------------


def test_tree_mismatch_says_why() -> None:
    params = {"a": torch.ones(3), "b": torch.ones(2)}
    tx = gx.adamw()
    state = tx.init(params)
    with pytest.raises(ValueError, match=r"the keys are the same but in another order \(\['b', 'a'\] vs \['a', 'b'\]\)"):
        tx.update({"b": torch.ones(2), "a": torch.ones(3)}, state, params)
    with pytest.raises(ValueError, match="container types differ: OrderedDict in the gradient, dict in the"):
        tx.update(collections.OrderedDict(a=torch.ones(3), b=torch.ones(2)), state, params)
    nested = {"x": [torch.ones(2), torch.ones(2)]}
    with pytest.raises(ValueError, match="at path 'x' the container types differ: tuple in the gradient, list"):
        tx.update({"x": (torch.ones(2), torch.ones(2))}, tx.init(nested), nested)


def test_a_leaf_without_state_is_named() -> None:
    tx = gx.scale_by_adam()
    state = tx.init({"a": torch.ones(3), "b": None})
    with pytest.raises(ValueError, match=r"path 'b' has no state \(its param was None at init\)"):
        tx.update({"a": torch.ones(3), "b": torch.ones(2)}, state)


@pytest.mark.parametrize("make", [
    lambda: gx.grokfast_ma(warmup="no"),
    lambda: gx.ma_filter(warmup=0),
])
def test_flags_must_be_bools(make: Any) -> None:
    with pytest.raises(TypeError, match="warmup must be True or False"):
        make()


@pytest.mark.parametrize("lr", [-1.0, math.inf, -math.inf, math.nan])
def test_the_lr_multiplier_is_a_finite_number_at_least_zero(lr: float) -> None:
    model = _stack(1)
    with pytest.raises(ValueError, match="lr multiplier 'lr' must be a finite number >= 0"):
        gx.Optimizer(model.parameters(), gx.adamw(), lr=lr)
    with pytest.raises(ValueError, match="lr multiplier"):
        gx.Optimizer([{"params": list(model.parameters()), "lr": lr}], gx.adamw())
    for fused in ENGINES:  # a scheduler or a user that sets it later
        opt = gx.Optimizer(model.parameters(), gx.adamw(), fused=fused)
        opt.param_groups[0]["lr"] = lr
        with pytest.raises(ValueError, match="lr multiplier"):
            _train(model, opt, 1)


def _run(tx: gx.GradientTransformation, steps: int = 4) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    params = {"blocks.0.w": torch.randn(4, 3), "blocks.1.w": torch.randn(3)}
    state = tx.init(params)
    for _ in range(steps):
        grads = {k: torch.randn_like(v) for k, v in params.items()}
        updates, state = tx.update(grads, state, params, train_loss=0.5, val_loss=0.7)
        params = gx.apply_updates(params, updates)
    return params


@pytest.mark.parametrize("make", [
    lambda f, i: gx.adamw(lr=f(1e-2), weight_decay=f(0.1), eps=f(1e-8), betas=(f(0.9), f(0.99))),
    lambda f, i: gx.grokadamw(lr=f(1e-2), alpha_init=f(0.9), lamb=f(2.0), gradient_clipping=f(0.5)),
    lambda f, i: gx.grokfast_ema(lr=f(1e-2), alpha=f(0.9), lamb=f(3.0)),
    lambda f, i: gx.grokfast_ma(lr=f(1e-2), window_size=i(3), lamb=f(3.0)),
    lambda f, i: gx.MultiSteps(gx.adamw(lr=f(1e-2)), every_k_schedule=i(2)),
    lambda f, i: gx.inject_hyperparams(gx.adamw)(lr=f(1e-2), weight_decay=f(0.1)),
], ids=["adamw", "grokadamw", "grokfast_ema", "grokfast_ma", "MultiSteps", "inject_hyperparams"])
def test_numpy_scalars_are_numbers(make: Any) -> None:
    """NumPy's float32 and int64 are taken as the Python numbers of the same value (float64 is a
    Python float already)."""
    plain = _run(make(lambda x: float(np.float32(x)), int))
    given = _run(make(np.float32, np.int64))
    for k in plain:
        assert torch.equal(plain[k], given[k])


@pytest.mark.parametrize("fused", ENGINES)
def test_numpy_hyperparameters_in_the_optimizer(fused: Any) -> None:
    a, b = _stack(2), _stack(2)
    opt_a = gx.Optimizer(a.named_parameters(), gx.grokadamw, lr=float(np.float32(1e-2)), weight_decay=0.1, fused=fused)
    opt_b = gx.Optimizer(b.named_parameters(), gx.grokadamw, lr=np.float32(1e-2), weight_decay=np.float64(0.1),
                         fused=fused)
    assert type(opt_b.param_groups[0]["lr"]) is float
    _train(a, opt_a, 2)
    _train(b, opt_b, 2)
    for x, y in zip(a.parameters(), b.parameters()):
        assert torch.equal(x, y)


@pytest.mark.parametrize("make, message", [
    (lambda: gx.ma_filter(window_size=2.0), "window_size must be an int, got float"),
    (lambda: gx.ma_filter(window_size=0), "window_size must be an int >= 1"),
    (lambda: gx.MultiSteps(gx.adamw(), every_k_schedule="2"), "every_k_schedule must be an int, got str"),
    (lambda: gx.linear_warmup(1e-3, True), "warmup_steps must be an int, got bool"),
    (lambda: gx.warmup_cosine_decay(1e-3, 10, 5), "0 <= warmup_steps < decay_steps"),
])
def test_counts_must_be_ints(make: Any, message: str) -> None:
    with pytest.raises((TypeError, ValueError), match=message):
        make()
