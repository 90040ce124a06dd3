"""Reliability: non-finite gradients, bad input, a window too large for the device, bfloat16 state.

The random-tree properties are in ``tests/test_properties.py``; this file pins the documented
behaviour of docs/reliability.md case by case.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from cases import PIPELINES, grad_tree, param_tree

import grokxform as gx
from grokxform import _memory
from grokxform import tree as T
from grokxform.transforms.combinators import MultiSteps, apply_if_finite, masked, partition

F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16
NAN, INF = float("nan"), float("inf")

NAMES = sorted(PIPELINES)


def tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in T.flatten(tree)[0] if isinstance(x, torch.Tensor)]


_INT_OF = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def same_bits(a: Any, b: Any) -> bool:
    la, sa = T.flatten(a)
    lb, sb = T.flatten(b)
    if sa != sb:
        return False
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            if x.dtype != y.dtype or x.shape != y.shape:
                return False
            if x.dtype != torch.bool and not torch.equal(x.view(_INT_OF[x.element_size()]), y.view(_INT_OF[y.element_size()])):
                return False
            if x.dtype == torch.bool and not torch.equal(x, y):
                return False
    return True


def nonfinite_paths(tree: Any) -> set[str]:
    return {
        n
        for n, x in zip(T.path_names(tree), T.flatten(tree)[0])
        if isinstance(x, torch.Tensor) and x.is_floating_point() and not bool(torch.isfinite(x).all())
    }


def warmed(tx: gx.GradientTransformation, params: dict, steps: int = 2, **extra: Any) -> tuple[dict, Any]:
    state = tx.init(params)
    for t in range(steps):
        u, state = tx.update(grad_tree(params, t), state, params, **extra)
        params = gx.apply_updates(params, u)
    return params, state


def snapshot(*trees: Any) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    return [(x, x.clone(), x._version) for x in tensors(trees)]


def assert_untouched(snap: list[tuple[torch.Tensor, torch.Tensor, int]]) -> None:
    for x, copy, version in snap:
        assert x._version == version, "an input was modified in place"
        assert x.is_meta or same_bits(x, copy), "an input was modified"


# ================================================================ non-finite gradients

@pytest.mark.parametrize("value", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("name", NAMES)
def test_without_apply_if_finite_only_the_bad_leaf_is_hit(name: str, value: float) -> None:
    tx = PIPELINES[name].make()
    params, state = warmed(tx, param_tree())
    grads = grad_tree(params, 7)
    grads["head"] = grads["head"].clone()
    grads["head"][1, 2] = value
    updates, new_state = tx.update(grads, state, params)
    new_params = gx.apply_updates(params, updates)
    hit = set() if PIPELINES[name].bad_param == "finite" else {"head"}  # a sign step stays finite
    assert nonfinite_paths(new_params) == hit
    assert nonfinite_paths(new_state) == PIPELINES[name].bad_leaf_state
    head = new_params["head"]
    if (name == "grokadamw_compat" and math.isnan(value)) or PIPELINES[name].bad_param in ("leaf", "nan_leaf"):
        # per-tensor clip: the NaN norm scales the whole tensor; a per-leaf sum (a norm, a
        # projection) reads the bad element; Muon: the iteration mixes the matrix
        assert bool(head.isnan().all())
    elif hit:
        bad = torch.zeros_like(head, dtype=torch.bool)
        bad[1, 2] = True
        became = head[bad].isnan() if PIPELINES[name].bad_param == "nan" else ~torch.isfinite(head[bad])
        assert bool(became.all()) and bool(torch.isfinite(head[~bad]).all())
    # The damage is permanent for that leaf (Adam's m and v keep the NaN; so does the MA running sum)
    # and, on its own, contained: five more finite steps leave the other leaves finite.
    for t in range(5):
        updates, new_state = tx.update(grad_tree(params, 20 + t), new_state, new_params)
        new_params = gx.apply_updates(new_params, updates)
    assert nonfinite_paths(new_params) == hit
    assert all(path.endswith(".head") for path in nonfinite_paths(new_state))


def test_global_clip_takes_its_norm_over_the_finite_leaves() -> None:
    g = {"a": torch.tensor([3.0, 4.0]), "b": torch.tensor([1.0, NAN]), "c": torch.tensor([0.0, 12.0])}
    tx = gx.clip_by_global_norm(1.0)
    u, s = tx.update(g, tx.init(g))
    scale = 1.0 / (13.0 + 1e-6)  # ‖(a, c)‖ = 13; b does not count
    assert torch.allclose(u["a"], g["a"] * scale) and torch.allclose(u["c"], g["c"] * scale)
    assert u["b"][0].item() == pytest.approx(scale) and math.isnan(u["b"][1].item())
    assert math.isnan(float(s.norm)) and float(s.scale) == pytest.approx(scale)  # the plain norm is logged
    # ±inf keeps its sign; the other leaves are clipped exactly as if the bad leaf were zero
    g["b"] = torch.tensor([1.0, -INF])
    u, s = tx.update(g, tx.init(g))
    assert u["b"][1].item() == -INF and float(s.norm) == INF
    zero = dict(g, b=torch.zeros(2))
    uz, _ = tx.update(zero, tx.init(g))
    assert torch.equal(u["a"], uz["a"]) and torch.equal(u["c"], uz["c"])
    # all finite: the plain clip_grad_norm_ formula, bit for bit as before
    finite = dict(g, b=torch.tensor([1.0, 2.0]))
    u, s = tx.update(finite, tx.init(g))
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in finite.values()]))
    assert torch.equal(s.norm, norm) and torch.equal(u["a"], finite["a"] * torch.clamp(1.0 / (norm + 1e-6), max=1.0))


def test_global_clip_with_every_leaf_non_finite_leaves_the_values_non_finite() -> None:
    g = {"a": torch.tensor([NAN]), "b": torch.tensor([INF])}
    tx = gx.clip_by_global_norm(1.0)
    u, s = tx.update(g, tx.init(g))
    assert math.isnan(u["a"].item()) and u["b"].item() == INF and float(s.scale) == 1.0


@pytest.mark.parametrize("name", NAMES)
def test_apply_if_finite_counts_consecutive_skips_and_keeps_minus_zero(name: str) -> None:
    tx = apply_if_finite(PIPELINES[name].make())
    params, state = warmed(tx, param_tree())
    params = dict(params, **{"blocks.0.b": torch.tensor([-0.0, 0.0, -1.5, 2.0])})
    for k, value in enumerate([NAN, INF, -INF], start=1):
        grads = grad_tree(params, 30 + k)
        grads["blocks.0.w"] = grads["blocks.0.w"].clone()
        grads["blocks.0.w"][0, 0] = value
        updates, new_state = tx.update(grads, state, params)
        new_params = gx.apply_updates(params, updates)
        assert same_bits(new_params, params) and same_bits(new_state.inner_state, state.inner_state)
        assert int(new_state.notfinite_count) == k and int(new_state.total_notfinite) == k
        assert not bool(new_state.last_finite)
        params, state = new_params, new_state
    assert math.copysign(1.0, params["blocks.0.b"][0].item()) == -1.0  # −0.0 kept its sign
    updates, state = tx.update(grad_tree(params, 40), state, params)
    assert int(state.notfinite_count) == 0 and int(state.total_notfinite) == 3 and bool(state.last_finite)
    assert not same_bits(gx.apply_updates(params, updates), params)


def test_apply_if_finite_under_vmap_skips_per_member() -> None:
    members = [param_tree(dtype=F64, seed=s) for s in range(2)]
    tx = apply_if_finite(gx.grokadamw(lr=1e-2))
    stack = lambda trees: T.tree_map(lambda *xs: torch.stack(xs), *trees)  # noqa: E731
    params = stack(members)
    state = stack([tx.init(m) for m in members])
    grads = stack([grad_tree(m, 0) for m in members])
    grads["head"][0, 0, 0] = NAN  # member 0 only
    updates, new_state = torch.func.vmap(tx.update)(grads, state, params)
    new_params = gx.apply_updates(params, updates)
    assert new_state.total_notfinite.tolist() == [1, 0]
    assert all(torch.equal(new_params[k][0], params[k][0]) for k in params)
    alone = gx.grokadamw(lr=1e-2)
    u1, _ = alone.update(grad_tree(members[1], 0), alone.init(members[1]), members[1])
    for k in params:
        assert torch.allclose(new_params[k][1], gx.apply_updates(members[1], u1)[k], rtol=0, atol=1e-14)


@pytest.mark.parametrize(
    "extra",
    [
        {"train_loss": torch.tensor(1.0), "val_loss": torch.tensor(INF)},
        {"train_loss": torch.tensor(NAN), "val_loss": torch.tensor(1.0)},
        {"grokking_signal": torch.tensor(NAN)},
        {"grokking_signal": torch.tensor(-INF)},
    ],
    ids=["val_inf", "train_nan", "signal_nan", "signal_-inf"],
)
def test_a_non_finite_loss_or_signal_falls_back_to_alpha_init(extra: dict) -> None:
    """apply_if_finite checks gradients only; a bad loss must not turn every leaf's EMA into NaN."""
    tx = apply_if_finite(gx.grokadamw(lr=1e-2))
    params, state = warmed(tx, param_tree())
    updates, state = tx.update(grad_tree(params, 9), state, params, **extra)
    assert float(state.inner_state["grokfast"].alpha) == pytest.approx(0.98)
    assert not nonfinite_paths(gx.apply_updates(params, updates))
    assert not (nonfinite_paths(state) - {"inner_state.grokfast.signal"})
    assert int(state.total_notfinite) == 0


def test_multisteps_keeps_minus_zero_and_carries_a_sum_past_a_missing_last_gradient() -> None:
    p = {"a": torch.tensor([-0.0, 2.0], dtype=F64), "b": torch.tensor([1.0], dtype=F64)}
    tx = MultiSteps(gx.scale_by_learning_rate(1.0, flip_sign=False), every_k_schedule=2)
    s = tx.init(p)
    u, s = tx.update({"a": torch.tensor([1.0, 1.0], dtype=F64), "b": torch.tensor([4.0], dtype=F64)}, s, p)
    q = gx.apply_updates(p, u)
    assert same_bits(q, p)  # a micro-step leaves the params bit for bit, −0.0 included
    u, s = tx.update({"a": torch.tensor([3.0, 3.0], dtype=F64), "b": None}, s, p)
    assert u["b"] is None and s.acc["b"].tolist() == [4.0]  # b's sum is kept, not dropped
    assert u["a"].tolist() == [2.0, 2.0]
    u, s = tx.update({"a": torch.tensor([1.0, 1.0], dtype=F64), "b": torch.tensor([2.0], dtype=F64)}, s, p)
    u, s = tx.update({"a": torch.tensor([1.0, 1.0], dtype=F64), "b": torch.tensor([2.0], dtype=F64)}, s, p)
    assert u["b"].tolist() == [4.0]  # (4 + 2 + 2) / 2: nothing lost


def test_apply_if_finite_around_and_inside_multisteps() -> None:
    p = {"a": torch.zeros(2, dtype=F64)}
    one = lambda v: {"a": torch.full((2,), v, dtype=F64)}  # noqa: E731
    sgd = gx.scale_by_learning_rate(1.0, flip_sign=False)
    around = apply_if_finite(MultiSteps(sgd, every_k_schedule=2))
    s = around.init(p)
    outs = []
    for v in (1.0, NAN, 3.0, 5.0):  # the bad micro-batch is dropped; the window is (1, 3)
        u, s = around.update(one(v), s, p)
        outs.append(u["a"][0].item())
    assert outs[2] == 2.0 and int(s.total_notfinite) == 1
    inside = MultiSteps(apply_if_finite(sgd), every_k_schedule=2)
    s = inside.init(p)
    outs = []
    for v in (1.0, NAN, 3.0, 5.0):  # the window (1, NaN) is skipped and cleared; the next is (3, 5)
        u, s = inside.update(one(v), s, p)
        outs.append(u["a"][0].item())
    assert outs[1] == 0.0 and outs[3] == 4.0 and int(s.inner_state.total_notfinite) == 1
    assert s.acc["a"].tolist() == [0.0, 0.0]


def test_masked_apply_if_finite_only_guards_the_selected_leaves() -> None:
    """Documented: the check sees what the wrapped transform sees. Wrap the whole chain instead."""
    p = param_tree()
    inner_guard = gx.chain(masked(apply_if_finite(gx.scale_by_adam()), ["blocks.*"]), gx.scale_by_learning_rate(0.1))
    g = grad_tree(p, 0)
    g["head"] = g["head"].clone()
    g["head"][0, 0] = NAN
    u, s = inner_guard.update(g, inner_guard.init(p), p)
    assert int(s[0].total_notfinite) == 0 and math.isnan(u["head"][0, 0].item())
    outer_guard = apply_if_finite(gx.chain(masked(gx.scale_by_adam(), ["blocks.*"]), gx.scale_by_learning_rate(0.1)))
    u, s = outer_guard.update(g, outer_guard.init(p), p)
    assert int(s.total_notfinite) == 1 and same_bits(gx.apply_updates(p, u), p)


# ================================================================ bad hyperparameters

BAD_HYPERPARAMETERS: list[tuple[Callable[..., Any], dict[str, Any], type[Exception], str]] = [
    (gx.adamw, {"lr": INF}, ValueError, "lr"),
    (gx.adamw, {"eps": INF}, ValueError, "eps"),
    (gx.adamw, {"weight_decay": INF}, ValueError, "weight_decay"),
    (gx.adamw, {"betas": (0.9,)}, ValueError, "betas"),
    (gx.adamw, {"betas": (0.9, NAN)}, ValueError, "betas"),
    (gx.adamw, {"lr": "1e-3"}, TypeError, "lr"),
    (gx.adamw, {"weight_decay": None}, TypeError, "weight_decay"),
    (gx.grokfast_ema, {"lamb": INF}, ValueError, "lamb"),
    (gx.grokfast_ema, {"lamb": NAN}, ValueError, "lamb"),
    (gx.grokfast_ema, {"alpha": -0.5}, ValueError, "alpha"),
    (gx.grokfast_ma, {"window_size": 2.0}, TypeError, "window_size"),
    (gx.grokfast_ma, {"window_size": True}, TypeError, "window_size"),
    (gx.grokfast_ma, {"lamb": -INF}, ValueError, "lamb"),
    (gx.grokadamw, {"gradient_clipping": INF}, ValueError, "gradient_clipping"),
    (gx.grokadamw, {"gamma": NAN}, ValueError, "gamma"),
    (gx.grokadamw, {"grokking_signal_fns": [3]}, TypeError, "grokking_signal_fns"),
    (gx.grokadamw, {"layer": "width"}, ValueError, "layer"),
    (gx.grokadamw_compat, {"alpha_init": 1.0}, ValueError, "alpha_init"),
    (gx.grokadamw_compat, {"lr": -1.0}, ValueError, "lr"),
    (gx.ema_filter, {"alpha": "0.9"}, TypeError, "alpha"),
    (gx.ema_filter, {"signal_decay_rate": INF}, ValueError, "signal_decay_rate"),
    (gx.ma_filter, {"window_size": None}, TypeError, "window_size"),
    (gx.ma_filter, {"accumulator_dtype": torch.bfloat16}, ValueError, "accumulator_dtype"),
    (gx.ma_filter, {"accumulator_dtype": "float64"}, TypeError, "accumulator_dtype"),
    (gx.amplify, {"filter": gx.ema_filter(), "lamb": INF}, ValueError, "lamb"),
    (gx.amplify, {"filter": lambda g: g}, TypeError, "filter"),
    (gx.clip_by_global_norm, {"max_norm": INF}, ValueError, "max_norm"),
    (gx.clip_by_global_norm, {"max_norm": torch.ones(2)}, ValueError, "max_norm"),
    (gx.clip_by_tensor_norm, {"max_norm": NAN}, ValueError, "max_norm"),
    (gx.scale_by_adam, {"bias_correction_b1": 1.0}, ValueError, "bias_correction_b1"),
    (gx.scale_by_adam, {"b1": 1.5}, ValueError, "b1"),
    (gx.layerwise_beta, {"b1": torch.tensor(0.9)}, TypeError, "b1"),
    (gx.decoupled_weight_decay, {"weight_decay": NAN}, ValueError, "weight_decay"),
    (gx.scale_by_learning_rate, {"learning_rate": INF}, ValueError, "learning_rate"),
    (gx.constant_schedule, {"value": -1.0}, ValueError, "value"),
    (gx.linear_warmup, {"peak": INF, "warmup_steps": 3}, ValueError, "peak"),
    (gx.warmup_cosine_decay, {"peak": 1.0, "warmup_steps": 5, "decay_steps": 5}, ValueError, "warmup_steps"),
    (MultiSteps, {"inner": gx.identity(), "every_k_schedule": 0}, ValueError, "every_k_schedule"),
    (MultiSteps, {"inner": gx.identity(), "every_k_schedule": 1.5}, TypeError, "every_k_schedule"),
    (MultiSteps, {"inner": None, "every_k_schedule": 2}, TypeError, "inner"),
    (apply_if_finite, {"inner": gx.adamw}, TypeError, "inner"),
    (masked, {"inner": "adam", "mask": ["*"]}, TypeError, "inner"),
    (partition, {"transforms": {}, "labels": lambda path, p: "a"}, ValueError, "transforms"),
    (partition, {"transforms": {"a": None}, "labels": lambda path, p: "a"}, TypeError, "transforms"),
    (gx.inject_hyperparams(gx.adamw), {"lr": -1.0}, ValueError, "lr"),
    (gx.inject_hyperparams(gx.adamw), {"learning_rate": 1e-3}, TypeError, "learning_rate"),
    (gx.inject_hyperparams(gx.grokadamw), {"lamb": torch.tensor([1.0, 2.0])}, ValueError, "lamb"),
]


@pytest.mark.parametrize(
    "factory,kwargs,error,name",
    BAD_HYPERPARAMETERS,
    ids=[f"{getattr(f, '__name__', 'f')}-{n}-{i}" for i, (f, _, _, n) in enumerate(BAD_HYPERPARAMETERS)],
)
def test_bad_hyperparameters_raise_naming_the_argument(
    factory: Callable[..., Any], kwargs: dict, error: type[Exception], name: str
) -> None:
    with pytest.raises(error, match=name):
        factory(**kwargs)


def test_partition_label_outside_the_transforms_names_the_leaf() -> None:
    tx = partition({"a": gx.scale_by_adam()}, lambda path, p: "a" if path != "head" else "b")
    with pytest.raises(ValueError, match=r"'head'.*'b'"):
        tx.init(param_tree())


# ================================================================ mismatched trees and states


def _wrong_inputs(name: str) -> list[tuple[str, Callable[[], tuple[Any, Any, Any]], Any, str]]:
    """(case, make (grads, state, params), error, what the message must name)."""
    p = param_tree()

    def renamed() -> tuple[Any, Any, Any]:
        other = {k.replace("head", "out"): v for k, v in p.items()}
        return grad_tree(p, 0), PIPELINES[name].make().init(other), p

    def reshaped() -> tuple[Any, Any, Any]:
        other = dict(p, head=torch.randn(3, 2))
        return grad_tree(p, 0), PIPELINES[name].make().init(other), p

    def other_pipeline() -> tuple[Any, Any, Any]:  # a state of another structure
        other = "adamw" if name.startswith("grokfast_ma") else "grokfast_ma"
        return grad_tree(p, 0), PIPELINES[other].make().init(p), p

    def extra_leaf() -> tuple[Any, Any, Any]:
        return dict(grad_tree(p, 0), extra=torch.ones(2)), PIPELINES[name].make().init(p), p

    def list_for_dict() -> tuple[Any, Any, Any]:
        return list(grad_tree(p, 0).values()), PIPELINES[name].make().init(p), p

    return [
        ("state of a tree with other names", renamed, ValueError, "'out'"),
        ("state of a tree with other shapes", reshaped, ValueError, "head"),
        ("state of another pipeline", other_pipeline, (TypeError, ValueError), "state"),
        ("gradient with an extra leaf", extra_leaf, ValueError, "extra"),
        ("gradient as a list", list_for_dict, ValueError, "tree"),
    ]


MISMATCH_CASES = [(n, c) for n in NAMES for c in range(5)]


@pytest.mark.parametrize("name,case", MISMATCH_CASES, ids=[f"{n}-{c}" for n, c in MISMATCH_CASES])
def test_mismatched_trees_raise_naming_the_path_and_mutate_nothing(name: str, case: int) -> None:
    label, make, error, needle = _wrong_inputs(name)[case]
    grads, state, params = make()
    snap = snapshot(grads, state, params)
    with pytest.raises(error, match=needle):
        PIPELINES[name].make().update(grads, state, params)
    assert_untouched(snap)


def test_ma_filter_state_with_another_window_size_is_refused() -> None:
    p = param_tree()
    with pytest.raises(ValueError, match="window"):
        gx.ma_filter(3).update(grad_tree(p, 0), gx.ma_filter(2).init(p))


# ================================================================ dtypes and devices


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "dtype,what",
    [(torch.int64, "int64"), (torch.complex64, "complex64"), (torch.bool, "bool")],
    ids=["int", "complex", "bool"],
)
def test_non_float_gradients_raise_naming_the_path(name: str, dtype: torch.dtype, what: str) -> None:
    tx = PIPELINES[name].make()
    p = param_tree()
    state = tx.init(p)
    grads = grad_tree(p, 0)
    grads["blocks.0.b"] = torch.ones(4).to(dtype)
    snap = snapshot(grads, state, p)
    with pytest.raises(TypeError, match=rf"blocks\.0\.b.*{what}"):
        tx.update(grads, state, p)
    assert_untouched(snap)


@pytest.mark.parametrize("name", NAMES)
def test_a_python_number_as_a_gradient_leaf_names_the_path(name: str) -> None:
    tx = PIPELINES[name].make()
    p = param_tree()
    with pytest.raises(TypeError, match=r"head.*float"):
        tx.update(dict(grad_tree(p, 0), head=0.5), tx.init(p), p)


@pytest.mark.parametrize("name", NAMES)
def test_integer_params_are_refused_at_init(name: str) -> None:
    with pytest.raises(TypeError, match=r"steps.*int64"):
        PIPELINES[name].make().init(dict(param_tree(), steps=torch.zeros(3, dtype=torch.int64)))


@pytest.mark.parametrize("name", NAMES)
def test_float64_gradients_on_float32_params_are_cast_to_the_state(name: str) -> None:
    """Documented: a gradient is cast to its state's dtype; the params keep theirs."""
    tx = PIPELINES[name].make()
    p = param_tree()
    s64 = s32 = tx.init(p)
    p64 = p32 = p
    for t in range(3):
        g = grad_tree(param_tree(dtype=F64), t, scale=5.0)
        u64, s64 = tx.update(g, s64, p64)
        u32, s32 = tx.update({k: v.float() for k, v in g.items()}, s32, p32)
        p64, p32 = gx.apply_updates(p64, u64), gx.apply_updates(p32, u32)
    assert {v.dtype for v in p64.values()} == {F32}
    assert [x.dtype for x in tensors(s64)] == [x.dtype for x in tensors(s32)]
    for k in p:
        assert torch.allclose(p64[k], p32[k], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_bfloat16_gradients_on_float32_params(name: str) -> None:
    tx = PIPELINES[name].make()
    p = param_tree()
    u, s = tx.update({k: v.to(BF16) for k, v in grad_tree(p, 0).items()}, tx.init(p), p)
    assert all(x.dtype == BF16 for x in u.values())
    assert {v.dtype for v in gx.apply_updates(p, u).values()} == {F32}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("where", ["gradient", "param", "state"])
def test_a_leaf_on_another_device_names_the_path_and_both_devices(name: str, where: str) -> None:
    """``meta`` stands in for a second device (cuda vs cpu behaves the same)."""
    tx = PIPELINES[name].make()
    p = param_tree()
    state = tx.init(p)
    grads = grad_tree(p, 0)
    if where == "gradient":
        grads["blocks.0.w"] = grads["blocks.0.w"].to("meta")
    elif where == "param":
        p = dict(p, **{"blocks.0.w": p["blocks.0.w"].to("meta")})
    else:
        state = tx.init({k: v.to("meta") for k, v in p.items()})
    snap = snapshot(grads, state, p)
    path = r"embed\.weight" if where == "state" else r"blocks\.0\.w"  # the whole state is elsewhere: its first leaf
    with pytest.raises(ValueError, match=path + r".*(meta.*cpu|cpu.*meta)"):
        tx.update(grads, state, p)
    assert_untouched(snap)


def test_apply_updates_names_the_path_of_an_update_on_another_device() -> None:
    p = param_tree()
    u = {k: torch.zeros_like(v) for k, v in p.items()}
    u["head"] = u["head"].to("meta")
    with pytest.raises(ValueError, match=r"head.*meta.*cpu"):
        gx.apply_updates(p, u)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta state")
@pytest.mark.parametrize("name", ["adamw", "grokfast_ema", "grokfast_ma"])
@pytest.mark.parametrize("layout", ["sparse_coo", "sparse_csr", "mkldnn"])
def test_a_sparse_or_other_non_strided_gradient_names_the_path(name: str, layout: str) -> None:
    tx = PIPELINES[name].make()
    p = param_tree()
    state = tx.init(p)
    grads = grad_tree(p, 0)
    grads["blocks.0.w"] = getattr(grads["blocks.0.w"], f"to_{layout}")()
    snap = snapshot(state, p)
    with pytest.raises(TypeError, match=rf"the gradient at path 'blocks\.0\.w' must be a dense \(strided\) tensor,"
                                        rf" got layout torch\._?{layout}; densify it with \.to_dense\(\)"):
        tx.update(grads, state, p)
    assert_untouched(snap)


def test_clip_by_global_norm_refuses_a_sparse_gradient_naming_the_path() -> None:
    tx = gx.clip_by_global_norm(1.0)
    p = param_tree()
    grads = dict(grad_tree(p, 0), head=grad_tree(p, 0)["head"].to_sparse())
    with pytest.raises(TypeError, match=r"^clip_by_global_norm: the gradient at path 'head' must be a dense"):
        tx.update(grads, tx.init(p), p)


# ================================================================ the grokking signal's inputs


def _signal_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))


def _signal_grads(model: torch.nn.Module, t: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(500 + t)
    return {n: torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}


def _signal_run(path: str, steps_extra: list[dict[str, Any]], tx: Callable[[], gx.GradientTransformation]
                ) -> dict[str, torch.Tensor]:
    """The params after one step per entry of ``steps_extra`` (its ``update`` keyword arguments),
    on ``path``: ``tx.update`` (on the kernels), ``"op by op"`` (``tx.update`` under
    ``gx.kernels(False)``), ``compile_step`` (the engine's foreach backend: eager's
    numbers), ``engine`` (``compile_step(backend="engine")``: the engine's kernels where they run)
    or ``gx.Optimizer`` (its default engine, or ``fused=False``: eager)."""
    from grokxform.fused import compile_step

    model = _signal_model()
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    if path in ("tx.update", "op by op"):
        t_ = tx()
        state = t_.init(params)
        with gx.kernels(path == "tx.update"):
            for t, extra in enumerate(steps_extra):
                u, state = t_.update(_signal_grads(model, t), state, params, **extra)
                params = gx.apply_updates(params, u)
        return params
    if path in ("compile_step", "engine"):
        step = compile_step(tx(), params, backend="foreach" if path == "compile_step" else "engine")
        for t, extra in enumerate(steps_extra):
            step(_signal_grads(model, t), **extra)
        return params
    opt = gx.Optimizer(model.named_parameters(), tx(), fused=None if path == "Optimizer" else False)
    for t, extra in enumerate(steps_extra):
        for n, p in model.named_parameters():
            p.grad = _signal_grads(model, t)[n]
        opt.step(**extra)
    return {n: p.detach() for n, p in model.named_parameters()}


SIGNAL_PATHS = ["op by op", "compile_step", "Optimizer(fused=False)", "engine", "Optimizer", "tx.update"]
"""Eager's numbers, then the default engine's (on the CPU its C kernels, whose square roots are
correctly rounded where torch's CPU ``sqrt`` may be a bit apart): in place, and out of place
(``tx.update``)."""
_GROKADAMW = lambda: gx.grokadamw(lr=1e-2, grokking_signal_decay_rate=0.5)  # noqa: E731


@pytest.mark.parametrize("arg", ["train_loss", "val_loss", "grokking_signal"])
@pytest.mark.parametrize("value, error, got", [
    ("0.5", TypeError, "got str '0.5'"),
    (True, TypeError, "got bool True"),
    (object(), TypeError, "got object <object object at"),
    ([0.5], TypeError, "got list [0.5]"),
    (torch.tensor(0.5 + 0.5j), TypeError, "got a torch.complex64 tensor"),
    (torch.tensor(True), TypeError, "got a torch.bool tensor"),
    (torch.ones(8), ValueError, "got a tensor of shape [8]; reduce it first, e.g. loss.mean()"),
    (torch.ones(0), ValueError, "got a tensor of shape [0]"),
], ids=["str", "bool", "object", "list", "complex", "bool-tensor", "vector", "empty"])
def test_a_bad_signal_input_is_refused_alike_on_every_path(arg: str, value: Any, error: type, got: str) -> None:
    """Each path refuses the value with the same exception and message, naming the argument."""
    extra = {"train_loss": 1.0, "val_loss": 2.0, arg: value}
    seen = set()
    for path in SIGNAL_PATHS:
        with pytest.raises(error) as err:
            _signal_run(path, [extra], _GROKADAMW)
        seen.add((type(err.value), str(err.value)))
    assert len(seen) == 1, seen
    message = seen.pop()[1]
    assert message.startswith(f"{arg}= must be ") and got in message, message


def test_accepted_signal_inputs_give_the_same_run_on_every_path() -> None:
    """Numbers (NumPy's included) and one-element real tensors of any shape and dtype, changing
    from step to step, give the op-by-op params on every eager path and the foreach engine bit
    for bit, and the default engine's through the optimizer and ``tx.update`` bit for bit (within
    the rounding of a square root of the op-by-op ones)."""
    steps = [
        {"train_loss": torch.tensor([0.4]), "val_loss": torch.tensor([[1.5]], dtype=F64)},
        {"train_loss": 0.3, "val_loss": torch.tensor(2)},
        {"train_loss": torch.tensor(0.2, dtype=BF16), "val_loss": 1},
        {"train_loss": np.float32(0.3), "val_loss": np.int64(2)},
        {"grokking_signal": torch.tensor([0.7])},
        {"grokking_signal": 0.25, "train_loss": torch.tensor([0.1]), "val_loss": 0.9},
        {"train_loss": torch.tensor(0.1), "val_loss": torch.tensor([1.2])},
    ]
    want = _signal_run("op by op", steps, _GROKADAMW)
    plain = _signal_run("op by op", steps[:3], lambda: gx.adamw(lr=1e-2))  # the signal moved the params
    assert not torch.equal(_signal_run("op by op", steps[:3], _GROKADAMW)["0.weight"], plain["0.weight"])
    for path in SIGNAL_PATHS[1:3]:
        got = _signal_run(path, steps, _GROKADAMW)
        for n in want:
            assert torch.equal(got[n], want[n]), (path, n)
    engine = _signal_run("engine", steps, _GROKADAMW)
    for path in SIGNAL_PATHS[4:]:
        got = _signal_run(path, steps, _GROKADAMW)
        for n in want:
            assert torch.equal(got[n], engine[n]), (path, n)
    for n in want:
        torch.testing.assert_close(engine[n], want[n], rtol=1e-6, atol=1e-7)


def test_signal_inputs_beside_the_whole_gradient_reductions_of_two_groups() -> None:
    """Two param groups: the optimizer passes ``global_grad_norm=`` and ``global_grad_finite=``
    with the losses; the engine's run equals the eager one."""
    runs = []
    for fused in (None, False):
        model = _signal_model()
        named = list(model.named_parameters())
        groups = [{"params": [(n, p) for n, p in named if n.endswith("weight")], "weight_decay": 0.1},
                  {"params": [(n, p) for n, p in named if n.endswith("bias")], "weight_decay": 0.0}]
        opt = gx.Optimizer(groups, gx.grokadamw, lr=1e-2, gradient_clipping=0.1, fused=fused)
        for t in range(3):
            for p, g in zip(model.parameters(), _signal_grads(model, t).values()):
                p.grad = g
            opt.step(train_loss=torch.tensor([0.5]), val_loss=1.0 + t)
        assert float(opt.metrics()["group0/clip/scale"]) < 1.0
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# ================================================================ an MA window too large for the device


@pytest.fixture
def no_allocation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any state allocation fail loudly, so a missing check cannot exhaust the machine."""

    def refuse(*args: Any, **kwargs: Any) -> torch.Tensor:
        raise AssertionError("ma_filter allocated its state before checking that it fits")

    monkeypatch.setattr(torch, "zeros_like", refuse)


def test_ma_window_larger_than_the_ram_fails_before_allocating(no_allocation: None) -> None:
    have = _memory.available_bytes(torch.device("cpu"))
    assert have is not None and have > 0
    n = 1000
    w = max(10**7, 2 * have // (n * 4) + 1)  # float32 window: needs twice the available RAM, or more
    needed = w * n * 4 + n * 4  # the window plus the float32 running sum
    for tx in (gx.ma_filter(w), gx.grokfast_ma(window_size=w)):
        with pytest.raises(MemoryError) as err:
            tx.init({"w": torch.ones(n)})
        msg = str(err.value)
        assert f"{needed:,} bytes" in msg and "available" in msg and "cpu" in msg, msg
        assert f"{w:,} gradients of {n:,} elements" in msg and "window_size" in msg


def test_ma_window_bytes_count_the_window_dtype_and_every_leaf(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_memory, "available_bytes", lambda device: 5_000)
    p = {"a": torch.ones(10), "b": torch.ones(3, 5, dtype=F64)}
    # float32 a: 100·10·4, float64 b: 100·15·8, running sums in their dtypes: 10·4 + 15·8
    with pytest.raises(_memory.StateTooLargeError, match=f"{100 * 10 * 4 + 100 * 15 * 8 + 160:,} bytes"):
        gx.ma_filter(100).init(p)
    with pytest.raises(MemoryError, match=f"{100 * 25 * 2 + 160:,} bytes"):
        gx.ma_filter(100, window_dtype=BF16).init(p)
    with pytest.raises(MemoryError, match=f"{100 * 10 * 4 + 100 * 15 * 8 + 25 * 8:,} bytes"):
        gx.ma_filter(100, accumulator_dtype=F64).init(p)
    state = gx.ma_filter(11).init(p)  # 11·40 + 11·120 + 160 = 1920 bytes: fits
    assert len(state.window) == 11


def test_available_bytes_falls_back_to_sysconf(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_proc(*args: Any, **kwargs: Any) -> Any:
        raise OSError("no /proc here")

    monkeypatch.setattr("builtins.open", no_proc)
    have = _memory.available_bytes(torch.device("cpu"))
    assert have is None or have > 0
    assert _memory.available_bytes(torch.device("meta")) is None


# ================================================================ bfloat16 parameters


def test_bfloat16_ema_state_is_float32_by_default_and_does_not_stall() -> None:
    """μ ← α·μ + (1−α)·g with α = 0.98, g = 1e-3 constant, μ_0 = 0: μ_t → g. Near μ ≈ 0.9·g the
    increment (1−α)(g−μ) falls below half a bfloat16 ulp of μ (2⁻⁹·μ), so a bfloat16 μ stops
    there; the default float32 μ follows the float64 one."""
    p = {"w": torch.zeros(8, dtype=BF16)}
    g = {"w": torch.full((8,), 1e-3, dtype=BF16)}
    mus = {}
    for label, dtype in (("default", None), ("bf16", BF16), ("f64", F64)):
        tx = gx.ema_filter(0.98, init="zeros", state_dtype=dtype)
        s = tx.init(p)
        for _ in range(1000):
            u, s = tx.update(g, s)
        assert u["w"].dtype == BF16
        mus[label] = s.mu["w"].double()
    assert gx.ema_filter(0.98).init(p).mu["w"].dtype == F32
    target = g["w"].double()
    rel = lambda mu: ((mu - target).abs() / target).max().item()  # noqa: E731
    assert rel(mus["bf16"]) > 0.05  # stalled about 12% short of g
    assert rel(mus["f64"]) < 1e-8  # 0.98¹⁰⁰⁰ ≈ 2e-9
    assert ((mus["default"] - mus["f64"]).abs() / target).max().item() < 2e-5  # float32 rounding, 1000 steps


@pytest.mark.parametrize("name", ["grokfast_ema", "grokadamw", "adamw"])
def test_bfloat16_pipelines_keep_float32_moments_unless_asked(name: str) -> None:
    make = {"grokfast_ema": gx.grokfast_ema, "grokadamw": gx.grokadamw, "adamw": gx.adamw}[name]
    p = {"w": torch.zeros(4, dtype=BF16)}
    default = make().init(p)
    forced = make(state_dtype=BF16).init(p)
    floats = lambda s: {x.dtype for x in tensors(s) if x.is_floating_point() and x.dim() > 0}  # noqa: E731
    assert floats(default) == {F32} and floats(forced) == {BF16}
