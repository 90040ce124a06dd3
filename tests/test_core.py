"""Core contract: combinators, purity, None gradients, compile, vmap, grad, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from cases import PIPELINES, PRIMITIVES, Case, grad_tree, param_tree

import grokxform as gx
from grokxform import tree as T

F64 = torch.float64


ALL: dict[str, Case] = {**PIPELINES, **PRIMITIVES}


def run(tx: gx.GradientTransformation, params: dict, steps: int, **extra) -> tuple[dict, object]:
    state = tx.init(params)
    for t in range(steps):
        updates, state = tx.update(grad_tree(params, t), state, params, **extra)
        params = gx.apply_updates(params, updates)
    return params, state


def state_tensors(state: object) -> list[torch.Tensor]:
    return [x for x in T.flatten(state)[0] if isinstance(x, torch.Tensor)]


# ---------------------------------------------------------------- combinators


def test_chain_applies_in_order_and_nests_state():
    p = {"a": torch.ones(3)}
    tx = gx.chain(gx.scale_by_learning_rate(2.0, flip_sign=False), gx.scale_by_learning_rate(3.0))
    state = tx.init(p)
    assert isinstance(state, tuple) and len(state) == 2
    u, _ = tx.update({"a": torch.ones(3)}, state, p)
    assert torch.equal(u["a"], torch.full((3,), -6.0))


def test_named_chain_addressable_state():
    p = param_tree()
    tx = gx.named_chain(("adam", gx.scale_by_adam()), ("lr", gx.scale_by_learning_rate(1e-3)))
    _, state = run(tx, p, 2)
    assert set(state) == {"adam", "lr"}
    assert isinstance(state["adam"], gx.ScaleByAdamState)
    assert int(state["adam"].count["head"]) == 2
    with pytest.raises(ValueError, match="unique"):
        gx.named_chain(("a", gx.identity()), ("a", gx.identity()))


def test_chain_rejects_non_transforms_and_wrong_state():
    with pytest.raises(TypeError, match="argument 1"):
        gx.chain(gx.identity(), lambda x: x)  # type: ignore[arg-type]
    tx = gx.chain(gx.identity(), gx.identity())
    with pytest.raises(ValueError, match="tuple of 2"):
        tx.update({"a": torch.ones(1)}, (gx.EmptyState(),), None)


def test_extra_arguments_flow_through_and_are_ignored_when_unused():
    p = param_tree()
    seen = {}

    def spy() -> gx.GradientTransformation:
        def update(u, s, params=None, **extra):
            seen.update(extra)
            return u, s

        return gx.GradientTransformation(lambda params: gx.EmptyState(), update)

    tx = gx.named_chain(("adam", gx.scale_by_adam()), ("inner", gx.chain(gx.amplify(spy(), 0.0))))
    tx.update(grad_tree(p, 0), tx.init(p), p, train_loss=1.0, foo="bar")
    assert seen == {"train_loss": 1.0, "foo": "bar"}
    # every pipeline accepts (and ignores what it does not use of) arbitrary extras
    for case in ALL.values():
        run(case.make(), p, 1, unknown_extra=3, train_loss=torch.tensor(0.5), val_loss=torch.tensor(1.0))


def test_apply_updates_is_pure_and_skips_none():
    p = {"a": torch.ones(2), "b": torch.ones(2, dtype=F64)}
    new = gx.apply_updates(p, {"a": None, "b": torch.full((2,), 0.5, dtype=torch.float32)})
    assert new["a"] is p["a"] and new["b"].dtype == F64 and torch.equal(new["b"], torch.full((2,), 1.5, dtype=F64))
    assert torch.equal(p["b"], torch.ones(2, dtype=F64))


# ---------------------------------------------------------------- purity


@pytest.mark.parametrize("name", sorted(ALL))
def test_update_never_mutates_inputs_nor_returns_state(name):
    tx = ALL[name].make()
    params = param_tree()
    state = tx.init(params)
    for t in range(4):  # past the MA window, past EMA seeding
        grads = grad_tree(params, t)
        snapshot = [(x.clone(), x._version) for x in state_tensors((grads, state, params))]
        updates, new_state = tx.update(grads, state, params, train_loss=torch.tensor(1.0), val_loss=torch.tensor(2.0))
        after = state_tensors((grads, state, params))
        for (before, version), now in zip(snapshot, after):
            assert now._version == version, f"{name}: an input tensor was modified in place"
            assert torch.equal(before, now)
        state_ptrs = {
            x.untyped_storage().data_ptr() for x in state_tensors((state, new_state)) if x.numel() > 0
        }
        for u in T.flatten(updates)[0]:
            if u is not None and u.numel() > 0:
                assert u.untyped_storage().data_ptr() not in state_ptrs, f"{name}: an update aliases a state tensor"
        state, params = new_state, gx.apply_updates(params, updates)


@pytest.mark.parametrize("name", sorted(ALL))
def test_none_gradient_keeps_state_and_gets_no_update(name):
    tx = ALL[name].make()
    params = param_tree()
    state = tx.init(params)
    updates, state = tx.update(grad_tree(params, 0), state, params)
    params = gx.apply_updates(params, updates)
    grads = grad_tree(params, 1)
    grads["blocks.0.w"] = None
    updates, new_state = tx.update(grads, state, params)
    assert updates["blocks.0.w"] is None
    assert updates["head"] is not None
    # every per-leaf state tree keeps the exact object of the skipped leaf
    for old, new in zip(_per_leaf_trees(state), _per_leaf_trees(new_state)):
        assert new["blocks.0.w"] is old["blocks.0.w"]


def _per_leaf_trees(state: object) -> list[dict]:
    """The dicts keyed like the params inside a state."""
    found: list[dict] = []

    def walk(x: object) -> None:
        if isinstance(x, dict) and "blocks.0.w" in x:
            found.append(x)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)
        elif isinstance(x, tuple):
            for v in x:
                walk(v)

    walk(state)
    return found


def test_none_gradient_on_first_step_then_present():
    """The official EMA filter's KeyError bug: a leaf without a gradient at first must seed later."""
    p = {"a": torch.ones(2, dtype=F64), "b": torch.ones(2, dtype=F64)}
    tx = gx.ema_filter(0.5)
    s = tx.init(p)
    u, s = tx.update({"a": torch.full((2,), 2.0, dtype=F64), "b": None}, s, p)
    u, s = tx.update({"a": torch.full((2,), 4.0, dtype=F64), "b": torch.full((2,), 8.0, dtype=F64)}, s, p)
    assert torch.equal(u["b"], torch.full((2,), 8.0, dtype=F64))  # seeded with its first gradient
    assert torch.equal(u["a"], torch.full((2,), 3.0, dtype=F64))


# ---------------------------------------------------------------- compile


def _max_diff(a: object, b: object) -> float:
    return max(
        (x - y).abs().max().item()
        for x, y in zip(T.flatten(a)[0], T.flatten(b)[0])
        if isinstance(x, torch.Tensor) and x.numel() > 0 and x.is_floating_point()
    )


def test_compiled_update_matches_eager_without_recompiling():
    torch._dynamo.reset()
    params = param_tree()
    tx = gx.inject_hyperparams(gx.grokadamw)(lr=gx.warmup_cosine_decay(1e-2, 2, 10), weight_decay=0.01)

    def step(g, s, p, tl, vl):
        return tx.update(g, s, p, train_loss=tl, val_loss=vl)

    compiled = torch.compile(step, fullgraph=True, backend="inductor")
    se = sc = tx.init(params)
    pe = pc = params
    lrs, alphas = set(), set()
    with torch._dynamo.config.patch(error_on_recompile=True):
        for t in range(6):
            g = grad_tree(params, t, scale=3.0)
            tl, vl = torch.tensor(1.0 / (t + 1)), torch.tensor(1.5)
            ue, se = step(g, se, pe, tl, vl)
            uc, sc = compiled(g, sc, pc, tl, vl)
            pe, pc = gx.apply_updates(pe, ue), gx.apply_updates(pc, uc)
            lrs.add(float(sc.hyperparams["lr"]))
            alphas.add(float(sc.inner_state["grokfast"].alpha))
            if t == 3:  # a trainer changes the weight decay between steps: no recompile either
                se.hyperparams["weight_decay"].fill_(0.05)
                sc.hyperparams["weight_decay"].fill_(0.05)
    assert len(lrs) == 6 and len(alphas) == 6  # the schedule and the signal did change
    assert _max_diff(pe, pc) < 1e-6
    assert _max_diff(se, sc) < 1e-5


def test_compiled_ma_and_ema_pipelines_match_eager():
    torch._dynamo.reset()
    params = param_tree()
    for tx in (gx.grokfast_ma(lr=1e-2, window_size=3), gx.grokfast_ema(lr=1e-2, weight_decay_mode="coupled")):
        compiled = torch.compile(tx.update, fullgraph=True, backend="aot_eager")
        se = sc = tx.init(params)
        pe = pc = params
        for t in range(5):
            g = grad_tree(params, t)
            ue, se = tx.update(g, se, pe)
            uc, sc = compiled(g, sc, pc)
            pe, pc = gx.apply_updates(pe, ue), gx.apply_updates(pc, uc)
        assert _max_diff(pe, pc) < 1e-6


# ---------------------------------------------------------------- vmap and grad


def test_vmap_over_an_ensemble_with_per_member_learning_rates():
    members = [param_tree(dtype=F64, seed=s) for s in range(3)]
    lrs = [1e-3, 1e-2, 1e-1]
    make = gx.inject_hyperparams(gx.grokadamw)
    # one member at a time
    expected = []
    for p, lr in zip(members, lrs):
        tx = make(lr=lr)
        s = tx.init(p)
        for t in range(4):
            u, s = tx.update(grad_tree(p, 10 * t), s, p, train_loss=torch.tensor(0.1, dtype=F64),
                             val_loss=torch.tensor(0.5, dtype=F64))
            p = gx.apply_updates(p, u)
        expected.append(p)
    # all at once
    tx = make(lr=1e-3)
    stack = lambda trees: T.tree_map(lambda *xs: torch.stack(xs), *trees)  # noqa: E731
    params = stack(members)
    state = stack([tx.init(m) for m in members])
    state.hyperparams["lr"].copy_(torch.tensor(lrs, dtype=F64))
    update = torch.func.vmap(
        lambda g, s, p: tx.update(g, s, p, train_loss=torch.tensor(0.1, dtype=F64), val_loss=torch.tensor(0.5, dtype=F64))
    )
    for t in range(4):
        grads = stack([grad_tree(members[0], 10 * t) for _ in members])
        u, state = update(grads, state, params)
        params = gx.apply_updates(params, u)
    for i, e in enumerate(expected):
        got = {k: v[i] for k, v in params.items()}
        assert _max_diff(got, e) < 1e-13
    assert not torch.allclose(params["head"][0], params["head"][2])


def test_vmap_over_ma_members_at_different_counts(monkeypatch):
    """A vmapped MA filter re-sums each member's window on that member's own schedule (the
    members here are one step apart), as one member at a time does; on a step where no member is
    due no window is summed."""
    import grokxform._resum as R

    tx = gx.ma_filter(window_size=3)
    p = param_tree(dtype=F64, seed=0)
    states, singles = [], []
    for lag in (0, 1):
        s = tx.init(p)
        for t in range(lag):
            _, s = tx.update(grad_tree(p, 100 + t), s, p)
        states.append(s)
    stack = lambda trees: T.tree_map(lambda *xs: torch.stack(xs), *trees)  # noqa: E731
    batched = stack(states)
    calls = []
    real = R.window_sum
    monkeypatch.setattr(R, "window_sum", lambda *a, **k: calls.append(1) or real(*a, **k))
    update = torch.func.vmap(lambda g, s: tx.update(g, s, p), in_dims=(None, 0))
    for t in range(7):
        g = grad_tree(p, 10 * t)
        calls.clear()
        u, batched = update(g, batched)
        counts = [int(T.flatten(s.count)[0][0]) for s in states]  # (before this update)
        assert bool(calls) == any(c % 3 == 2 for c in counts)
        for i, s in enumerate(states):
            ui, states[i] = tx.update(g, s, p)
            assert _max_diff({k: v[i] for k, v in u.items()}, ui) == 0.0
    assert len({int(T.flatten(s.count)[0][0]) for s in states}) == 2


def test_grad_through_an_update_matches_finite_differences():
    p0 = {"w": torch.tensor([[0.3, -0.2], [0.1, 0.4]], dtype=F64), "b": torch.tensor([0.05, -0.1], dtype=F64)}
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.3, -0.7]], dtype=F64)
    y = torch.tensor([0.5, -0.2, 0.1], dtype=F64)

    def loss(p):
        return ((x @ p["w"] + p["b"]).sum(-1) - y).pow(2).mean()

    tx = gx.grokfast_ema(lr=0.1, weight_decay=0.1)

    def after_one_step(p):
        g = torch.func.grad(loss)(p)
        u, _ = tx.update(g, tx.init(p), p)
        return loss(gx.apply_updates(p, u))

    analytic = torch.func.grad(after_one_step)(p0)
    h = 1e-6
    for k in p0:
        for idx in range(p0[k].numel()):
            plus = {n: v.clone() for n, v in p0.items()}
            minus = {n: v.clone() for n, v in p0.items()}
            plus[k].view(-1)[idx] += h
            minus[k].view(-1)[idx] -= h
            fd = (after_one_step(plus) - after_one_step(minus)) / (2 * h)
            assert abs(fd.item() - analytic[k].view(-1)[idx].item()) < 1e-6


# ---------------------------------------------------------------- bad input

BAD = [
    (gx.adamw, {"lr": -1e-3}, "lr"),
    (gx.adamw, {"betas": (1.0, 0.999)}, "betas"),
    (gx.adamw, {"betas": (0.9, -0.1)}, "betas"),
    (gx.adamw, {"eps": -1.0}, "eps"),
    (gx.adamw, {"weight_decay": -0.1}, "weight_decay"),
    (gx.grokadamw, {"alpha_init": 1.0}, "alpha_init"),
    (gx.grokadamw, {"alpha_init": -0.1}, "alpha_init"),
    (gx.grokadamw, {"gamma": 1.5}, "gamma"),
    (gx.grokadamw, {"gradient_clipping": -1.0}, "gradient_clipping"),
    (gx.grokadamw, {"grokking_signal_decay_rate": -1.0}, "signal_decay_rate"),
    (gx.grokadamw, {"lr": float("nan")}, "lr"),
    (gx.grokfast_ema, {"alpha": 1.0}, "alpha"),
    (gx.grokfast_ema, {"weight_decay_mode": "both"}, "weight_decay_mode"),
    (gx.grokfast_ma, {"window_size": 0}, "window_size"),
    (gx.grokfast_ma, {"filter_type": "median"}, "filter_type"),
    (gx.ema_filter, {"alpha": 1.5}, "alpha"),
    (gx.ema_filter, {"init": "ones"}, "init"),
    (gx.ma_filter, {"window_size": -3}, "window_size"),
    (gx.clip_by_global_norm, {"max_norm": -1.0}, "max_norm"),
    (gx.clip_by_global_norm, {"max_norm": 0.0}, "max_norm"),
    (gx.clip_by_tensor_norm, {"max_norm": -1.0}, "max_norm"),
    (gx.scale_by_adam, {"b2": 1.0}, "b2"),
    (gx.scale_by_adam, {"eps_placement": "sideways"}, "eps_placement"),
    (gx.layerwise_beta, {"gamma": -0.5}, "gamma"),
    (gx.layerwise_beta, {"layer": "width"}, "layer"),
    (gx.decoupled_weight_decay, {"weight_decay": -1.0}, "weight_decay"),
    (gx.scale_by_learning_rate, {"learning_rate": -1.0}, "learning_rate"),
    (gx.linear_warmup, {"peak": 1e-3, "warmup_steps": 0}, "warmup_steps"),
    (gx.scale_by_rms, {"decay": 1.5}, "decay"),
    (gx.scale_by_stddev, {"eps": -1.0}, "eps"),
    (gx.scale_by_nadam, {"momentum_decay": -1.0}, "momentum_decay"),
    (gx.scale_by_ademamix, {"b3": 1.0}, "b3"),
    (gx.scale_by_ademamix, {"beta3_warmup": 0}, "beta3_warmup"),
    (gx.nadam, {"weight_decay_mode": "l2"}, "weight_decay_mode"),
    (gx.clip, {"max_delta": -0.5}, "max_delta"),
]


@pytest.mark.parametrize("factory,kwargs,name", BAD, ids=[f"{f.__name__}-{n}-{i}" for i, (f, _, n) in enumerate(BAD)])
def test_invalid_hyperparameters_raise_naming_the_argument(factory, kwargs, name):
    with pytest.raises(ValueError, match=name):
        factory(**kwargs)


def test_inject_hyperparams_checks_initial_values_by_name():
    with pytest.raises(ValueError, match="lr"):
        gx.inject_hyperparams(gx.adamw)(lr=-1.0)
    with pytest.raises(ValueError, match="0-d"):
        gx.inject_hyperparams(gx.adamw)(lr=torch.ones(2))


# transforms without per-leaf state accept any tree
PER_LEAF = sorted(set(ALL) - {"scale_by_learning_rate", "clip_by_tensor_norm", "clip_by_global_norm", "add_noise",
                               "centralize", "scale", "clip", "zero_nans", "orthogonalize"})  # no per-element state nor params


@pytest.mark.parametrize("name", PER_LEAF)
def test_gradient_tree_mismatch_names_the_path(name):
    tx = ALL[name].make()
    params = param_tree()
    state = tx.init(params)
    missing = grad_tree(params, 0)
    del missing["blocks.1.w"]
    with pytest.raises(ValueError, match=r"blocks\.1\.w"):
        tx.update(missing, state, params)
    wrong_shape = grad_tree(params, 0)
    wrong_shape["head"] = torch.randn(4, 2)
    with pytest.raises(ValueError, match="head"):
        tx.update(wrong_shape, state, params)


def test_missing_params_for_weight_decay_is_an_error():
    tx = gx.adamw()
    p = param_tree()
    with pytest.raises(ValueError, match="params"):
        tx.update(grad_tree(p, 0), tx.init(p))


# ---------------------------------------------------------------- the primitives' maths


def test_ema_filter_seeding_and_signal():
    p = {"a": torch.zeros(2, dtype=F64)}
    g1, g2 = torch.tensor([1.0, 2.0], dtype=F64), torch.tensor([3.0, -1.0], dtype=F64)
    first = gx.ema_filter(0.9)
    s = first.init(p)
    u, s = first.update({"a": g1}, s)
    assert torch.equal(u["a"], g1)
    u, s = first.update({"a": g2}, s)
    assert torch.allclose(u["a"], 0.9 * g1 + 0.1 * g2, rtol=0, atol=1e-15)
    zeros = gx.ema_filter(0.9, init="zeros", signal_decay_rate=0.5)
    s = zeros.init(p)
    u, s = zeros.update({"a": g1}, s, grokking_signal=torch.tensor(2.0))
    alpha = 0.9 * math.exp(-0.5 * 2.0)
    assert torch.allclose(u["a"], (1 - alpha) * g1, rtol=0, atol=1e-15)
    assert math.isclose(float(s.alpha), alpha, rel_tol=1e-15) and float(s.signal) == 2.0
    # the loss gap, and signal functions of two and three arguments
    u, s = zeros.update({"a": g1}, s, train_loss=0.5, val_loss=2.0)
    assert math.isclose(float(s.signal), 1.5 / 2.0, rel_tol=1e-15)
    with_fns = gx.ema_filter(0.9, signal_fns=[lambda tr, va: va - tr, lambda tr, va, step: step.to(F64)],
                             signal_decay_rate=1.0)
    s = with_fns.init(p)
    _, s = with_fns.update({"a": g1}, s, train_loss=1.0, val_loss=3.0)
    assert float(s.signal) == pytest.approx((2.0 + 0.0) / 2)
    _, s = with_fns.update({"a": g1}, s)  # no losses: functions of the losses are skipped, GS = 0
    assert float(s.signal) == 0.0 and float(s.alpha) == pytest.approx(0.9)
    with pytest.raises(TypeError, match="signal"):
        gx.ema_filter(0.9, signal_fns=[lambda x: x])


def test_ma_filter_window_mean_sum_and_warmup():
    p = {"a": torch.zeros(1, dtype=F64)}
    gs = [torch.tensor([float(v)], dtype=F64) for v in (1, 2, 4, 8, 16)]
    cases = {
        ("mean", False): [1, 1.5, 7 / 3, 14 / 3, 28 / 3],
        ("sum", False): [1, 3, 7, 14, 28],
        ("mean", True): [0, 0, 7 / 3, 14 / 3, 28 / 3],
    }
    for (kind, warm), want in cases.items():
        tx = gx.ma_filter(3, kind, warm)
        s = tx.init(p)
        got = []
        for g in gs:
            u, s = tx.update({"a": g}, s)
            got.append(u["a"].item())
        assert got == pytest.approx(want, rel=1e-15), (kind, warm)


@pytest.mark.slow
@pytest.mark.parametrize("acc, bound", [(None, 1e-6), (F64, 2e-7)], ids=["float32-sum", "float64-sum"])
def test_ma_filter_running_sum_does_not_drift_over_1e5_steps(acc, bound):
    """Gradients around 1000 (a large offset makes a running sum's rounding visible). A float32
    running sum alone drifts by 1.4e-5 over these steps; re-summed every w steps it stays within
    w steps of rounding (4.1e-7; the official filter's float32 sum of the window: 1.8e-7), and a
    float64 one at the float32 output's rounding."""
    n, w, steps = 64, 10, 100_000
    gen = torch.Generator().manual_seed(0)
    tx = gx.ma_filter(w, "mean", warmup=False, accumulator_dtype=acc)
    p = {"a": torch.zeros(n)}
    s = tx.init(p)
    update = tx.update
    ring = torch.zeros(w, n, dtype=F64)
    worst = 0.0
    base = 1000.0
    for t in range(steps):
        g = base + torch.randn(n, generator=gen)
        u, s = update({"a": g}, s)
        ring[t % w] = g.to(F64)
        if t >= w and t % 997 == 0:
            exact = ring.mean(0)
            worst = max(worst, ((u["a"].to(F64) - exact).abs() / exact.abs()).max().item())
    assert worst < bound


def test_layerwise_beta_layers():
    paths = ["embed.weight", "blocks.0.w", "blocks.0.b", "blocks.3.w", "head"]
    present = [True, True, False, True, True]
    lb = gx.layerwise_beta(0.9, 0.1, "index")
    assert lb.layers(paths, present) == [0, 1, 2, 2, 3]
    assert gx.layerwise_beta(0.9, 0.1, "depth").layers(paths, present) == [0, 0, 0, 3, 0]
    fn = gx.layerwise_beta(0.9, 0.5, lambda path, i: len(path))
    assert fn.values(["ab"], [True]) == [0.9 * 0.25]


def test_scale_by_adam_uses_per_leaf_beta_with_its_own_bias_correction():
    p = {"blocks.0.w": torch.zeros(2, dtype=F64), "blocks.2.w": torch.zeros(2, dtype=F64)}
    g = {k: torch.tensor([0.5, -2.0], dtype=F64) for k in p}
    tx = gx.scale_by_adam(gx.layerwise_beta(0.9, 0.5, "depth"), 0.99, 0.0)
    s = tx.init(p)
    for _ in range(3):
        u, s = tx.update(g, s)
    for k, depth in (("blocks.0.w", 0), ("blocks.2.w", 2)):
        b1 = 0.9 * 0.5**depth
        m = sum((1 - b1) * b1**i for i in range(3)) * g[k]
        v = sum((1 - 0.99) * 0.99**i for i in range(3)) * g[k] ** 2
        want = (m / (1 - b1**3)) / (v.sqrt() / math.sqrt(1 - 0.99**3))
        assert torch.allclose(u[k], want, rtol=1e-14, atol=0)


def test_schedules_and_learning_rate_state():
    c = torch.arange(0, 14)
    assert gx.linear_warmup(1e-3, 10)(c)[[0, 5, 10, 13]].tolist() == pytest.approx([0, 5e-4, 1e-3, 1e-3])
    cos = gx.warmup_cosine_decay(1.0, 2, 12, end=0.1)(c)
    assert cos[0] == 0 and cos[2] == pytest.approx(1.0) and cos[7] == pytest.approx(0.55) and cos[13] == pytest.approx(0.1)
    tx = gx.scale_by_learning_rate(gx.linear_warmup(1.0, 4))
    p = {"a": torch.ones(1, dtype=F64)}
    s = tx.init(p)
    got = []
    for _ in range(6):
        u, s = tx.update({"a": torch.ones(1, dtype=F64)}, s)
        got.append(u["a"].item())
    assert got == [0.0, -0.25, -0.5, -0.75, -1.0, -1.0]


def test_weight_decay_masks_by_pattern_function_and_tree():
    p = {"blocks.0.w": torch.ones(2), "blocks.0.b": torch.ones(2), "norm.weight": torch.ones(2)}
    zero = {k: torch.zeros(2) for k in p}
    for mask, decayed in [
        (["*.w"], {"blocks.0.w"}),
        (lambda path, t: not path.startswith("norm"), {"blocks.0.w", "blocks.0.b"}),
        ({"blocks.0.w": False, "blocks.0.b": True, "norm.weight": False}, {"blocks.0.b"}),
        (None, set(p)),
    ]:
        tx = gx.decoupled_weight_decay(0.5, mask=mask)
        u, _ = tx.update(zero, tx.init(p), p)
        assert {k for k, v in u.items() if v.abs().sum() > 0} == decayed


def test_global_and_per_tensor_clipping():
    g = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([0.0, 0.5])}
    tx = gx.clip_by_global_norm(1.0)
    u, s = tx.update(g, tx.init(g))
    norm = math.sqrt(25 + 0.25)
    assert float(s.norm) == pytest.approx(norm) and float(s.scale) == pytest.approx(1 / (norm + 1e-6))
    assert torch.allclose(u["a"], g["a"] / (norm + 1e-6))
    per = gx.clip_by_tensor_norm(1.0)
    u, _ = per.update(g, per.init(g))
    assert torch.allclose(u["a"], g["a"] / (5 + 1e-6)) and torch.equal(u["b"], g["b"])


def test_inject_hyperparams_change_between_steps_equals_rebuilding():
    p = param_tree(dtype=F64)
    tx = gx.inject_hyperparams(gx.grokfast_ema)(lr=1e-2, lamb=2.0)
    s = tx.init(p)
    assert set(s.hyperparams) == {"lr", "lamb"} and s.hyperparams["lr"].dtype == F64
    ref = gx.grokfast_ema(lr=1e-2, lamb=2.0)
    rs = ref.init(p)
    g = grad_tree(p, 0)
    u, s = tx.update(g, s, p)
    ru, rs = ref.update(g, rs, p)
    assert _max_diff(u, ru) == 0.0
    s.hyperparams["lamb"].fill_(5.0)
    ref5 = gx.grokfast_ema(lr=1e-2, lamb=5.0)
    g = grad_tree(p, 1)
    u, s = tx.update(g, s, p)
    ru, _ = ref5.update(g, rs, p)
    assert _max_diff(u, ru) < 1e-17


def test_sixteen_bit_params_keep_float32_state_by_default():
    p = {"w": torch.randn(4, 4).to(torch.bfloat16)}
    for make in (gx.grokadamw, gx.grokfast_ema, gx.adamw):
        tx = make()
        s = tx.init(p)
        dtypes = {x.dtype for x in state_tensors(s) if x.is_floating_point() and x.dim() > 0}
        assert dtypes == {torch.float32}
        u, _ = tx.update({"w": torch.randn(4, 4).to(torch.bfloat16)}, s, p)
        assert u["w"].dtype == torch.bfloat16
    s = gx.adamw(state_dtype=torch.bfloat16).init(p)
    assert {x.dtype for x in state_tensors(s) if x.dim() > 0} == {torch.bfloat16}
