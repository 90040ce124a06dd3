"""Property: ``grokxform.Optimizer`` == the functional API on random parameter sets: bit for bit on
the engine's foreach backend (eager's ops), and on the default engine (on the CPU its C kernels,
whose square roots are correctly rounded where torch's CPU ``sqrt`` may be a bit apart) within the
rounding of the dtype."""

from __future__ import annotations

import pytest
import torch
from cases import ALIASES, grad_tree, param_tree
from hypothesis import given, settings
from hypothesis import strategies as st

import grokxform as gx

shape = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)
leaf = st.tuples(shape, st.sampled_from([torch.float32, torch.float64]))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    leaves=st.lists(leaf, min_size=1, max_size=5),
    name=st.sampled_from(sorted(ALIASES)),
    missing=st.lists(st.lists(st.booleans(), min_size=5, max_size=5), min_size=4, max_size=4),
    seed=st.integers(0, 2**16),
)
def test_optimizer_equals_functional(leaves, name, missing, seed):
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=d) for s, d in leaves]
    grads = [[torch.randn(s, generator=gen, dtype=d) for s, d in leaves] for _ in missing]

    # functional
    tx = ALIASES[name].make()
    names = [f"blocks.{i}.w" for i in range(len(init))]  # module paths: grokadamw's β1 is by depth
    params = {n: p.clone() for n, p in zip(names, init)}
    state = tx.init(params)
    for t, skip in enumerate(missing):
        g = {n: (None if skip[i] else grads[t][i]) for i, n in enumerate(names)}
        with gx.kernels(False):  # torch's own ops: the foreach backend's numbers
            u, state = tx.update(g, state, params, train_loss=torch.tensor(0.5), val_loss=torch.tensor(1.0 + t))
        params = gx.apply_updates(params, u)

    # the same transform behind torch.optim's interface
    for fused in ("foreach", None):
        tensors = [torch.nn.Parameter(p.clone()) for p in init]
        opt = gx.Optimizer(list(zip(names, tensors)), ALIASES[name].make(), fused=fused)
        for t, skip in enumerate(missing):
            for i, p in enumerate(tensors):
                p.grad = None if skip[i] else grads[t][i].clone()
            opt.step(train_loss=torch.tensor(0.5), val_loss=torch.tensor(1.0 + t))
        for i, p in enumerate(tensors):
            _assert_same(p.detach(), params[names[i]], fused == "foreach", f"{name} ({fused}): leaf {i} differs")


def _assert_same(a: torch.Tensor, b: torch.Tensor, exact: bool, what: str) -> None:
    if exact:
        assert torch.equal(a, b), what
    else:
        torch.testing.assert_close(a, b, rtol=1e-5 if a.dtype == torch.float32 else 1e-12, atol=1e-6, msg=what)


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_optimizer_factory_path_equals_functional(name: str) -> None:
    case = ALIASES[name]
    init = param_tree({"blocks.0.w": (3, 3), "blocks.1.w": (3,)})
    tx = gx.inject_hyperparams(case.factory)(**case.kwargs)
    params, state = dict(init), tx.init(init)
    exact = "foreach"
    runs = {fused: [(k, torch.nn.Parameter(v.clone())) for k, v in init.items()] for fused in (exact, None)}
    opts = {fused: gx.Optimizer(ps, case.factory, fused=fused, **case.kwargs) for fused, ps in runs.items()}
    for t in range(5):
        g = grad_tree(init, t)
        with gx.kernels(False):  # torch's own ops: the foreach backend's numbers
            u, state = tx.update(g, state, params)
        params = gx.apply_updates(params, u)
        for fused, model_params in runs.items():
            for k, p in model_params:
                p.grad = g[k].clone()
            opts[fused].step()
    for fused, model_params in runs.items():
        for k, p in model_params:
            _assert_same(p.detach(), params[k], fused == exact, f"{name} ({fused}): {k}")
