"""masked, partition, MultiSteps, apply_if_finite: against references and their own contracts."""

from __future__ import annotations

import pytest
import torch
from cases import grad_tree, param_tree

import grokxform as gx
from grokxform import tree as T

F64 = torch.float64


SHAPES = {"l1.weight": (5, 4), "l1.bias": (5,), "norm.weight": (5,), "l2.weight": (3, 5)}


def params64() -> dict[str, torch.Tensor]:
    return param_tree(SHAPES, dtype=F64)


def tensors_equal(a: object, b: object) -> bool:
    la, sa = T.flatten(a)
    lb, sb = T.flatten(b)
    if sa != sb:
        return False
    return all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(la, lb))


def test_masked_applies_inner_to_selected_leaves_only():
    p = params64()
    tx = gx.masked(gx.scale_by_adam(), ["*.weight"])
    s = tx.init(p)
    assert s.mu["l1.bias"] is None and s.mu["l1.weight"] is not None
    g = grad_tree(p, 0)
    u, s = tx.update(g, s, p)
    assert u["l1.bias"] is g["l1.bias"]
    ref = gx.scale_by_adam()
    ru, _ = ref.update(g, ref.init(p), p)
    assert torch.equal(u["l2.weight"], ru["l2.weight"])


def test_partition_equals_torch_adamw_with_two_param_groups():
    p = params64()
    labels = lambda path, t: "decay" if t.ndim >= 2 else "plain"  # noqa: E731
    tx = gx.partition({"decay": gx.adamw(lr=1e-2, weight_decay=0.1), "plain": gx.adamw(lr=3e-2, weight_decay=0.0)}, labels)
    mats = {k: v.clone().requires_grad_() for k, v in p.items()}
    opt = torch.optim.AdamW(
        [
            {"params": [mats["l1.weight"], mats["l2.weight"]], "lr": 1e-2, "weight_decay": 0.1},
            {"params": [mats["l1.bias"], mats["norm.weight"]], "lr": 3e-2, "weight_decay": 0.0},
        ]
    )
    s = tx.init(p)
    for t in range(30):
        g = grad_tree(p, t)
        u, s = tx.update(g, s, p)
        p = gx.apply_updates(p, u)
        for k, v in mats.items():
            v.grad = g[k].clone()
        opt.step()
    worst = max((p[k] - mats[k].detach()).abs().max().item() for k in p)
    assert worst < 1e-12
    with pytest.raises(ValueError, match="label"):
        bad = gx.partition({"decay": gx.adamw()}, labels)
        bad.init(params64())


def test_multisteps_equals_inner_on_mean_gradients():
    p = params64()
    k = 3
    tx = gx.MultiSteps(gx.adamw(lr=1e-2), k)
    ref = gx.adamw(lr=1e-2)
    s, rs = tx.init(p), ref.init(p)
    rp = p
    for big in range(4):
        micro = [grad_tree(p, 10 * big + i) for i in range(k)]
        for i, g in enumerate(micro):
            u, s = tx.update(g, s, p)
            if i < k - 1:
                assert all(torch.equal(x, torch.zeros_like(x)) for x in u.values())
            p = gx.apply_updates(p, u)
        mean = {n: sum(g[n] for g in micro) / k for n in micro[0]}
        ru, rs = ref.update(mean, rs, rp)
        rp = gx.apply_updates(rp, ru)
    assert int(s.steps) == 4 and int(s.mini_step) == 0
    assert max((p[n] - rp[n]).abs().max().item() for n in p) < 1e-14


def test_multisteps_compiles_without_recompiling():
    torch._dynamo.reset()
    p = params64()
    tx = gx.MultiSteps(gx.grokadamw(lr=1e-2), 2)
    compiled = torch.compile(tx.update, fullgraph=True, backend="aot_eager")
    s = sc = tx.init(p)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for t in range(5):
            g = grad_tree(p, t)
            u, s = tx.update(g, s, p)
            uc, sc = compiled(g, sc, p)
            assert all(torch.allclose(u[n], uc[n], rtol=1e-12, atol=0) for n in u)


def test_apply_if_finite_skips_and_counts_non_finite_steps():
    p = params64()
    tx = gx.apply_if_finite(gx.grokadamw(lr=1e-2))
    s = tx.init(p)
    u, s = tx.update(grad_tree(p, 0), s, p)
    p = gx.apply_updates(p, u)
    for bad_value in (float("nan"), float("inf"), -float("inf")):
        g = grad_tree(p, 1)
        g["l1.bias"][2] = bad_value
        u, s2 = tx.update(g, s, p)
        p2 = gx.apply_updates(p, u)
        assert tensors_equal(p2, p)
        assert tensors_equal(s2.inner_state, s.inner_state)
        assert not bool(s2.last_finite)
        s = s2
    assert int(s.notfinite_count) == 3 and int(s.total_notfinite) == 3
    u, s = tx.update(grad_tree(p, 2), s, p)
    assert bool(s.last_finite) and int(s.notfinite_count) == 0 and int(s.total_notfinite) == 3
    assert not tensors_equal(gx.apply_updates(p, u), p)


def test_wrappers_reject_bad_arguments():
    with pytest.raises(ValueError, match="every_k_schedule"):
        gx.MultiSteps(gx.adamw(), 0)
    with pytest.raises(TypeError, match="inner"):
        gx.apply_if_finite(lambda: None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="inner"):
        gx.masked(None, ["*"])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="empty"):
        gx.partition({}, lambda p, t: "a")
