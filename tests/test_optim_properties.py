"""Property: ``grokxform.Optimizer`` == the functional API, bit for bit, on random parameter sets."""

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
        u, state = tx.update(g, state, params, train_loss=torch.tensor(0.5), val_loss=torch.tensor(1.0 + t))
        params = gx.apply_updates(params, u)

    # the same transform behind torch.optim's interface
    tensors = [torch.nn.Parameter(p.clone()) for p in init]
    opt = gx.Optimizer(list(zip(names, tensors)), ALIASES[name].make())
    for t, skip in enumerate(missing):
        for i, p in enumerate(tensors):
            p.grad = None if skip[i] else grads[t][i].clone()
        opt.step(train_loss=torch.tensor(0.5), val_loss=torch.tensor(1.0 + t))

    for i, p in enumerate(tensors):
        assert torch.equal(p.detach(), params[names[i]]), f"{name}: leaf {i} differs"


@pytest.mark.parametrize("name", sorted(ALIASES))
def test_optimizer_factory_path_equals_functional(name: str) -> None:
    case = ALIASES[name]
    init = param_tree({"blocks.0.w": (3, 3), "blocks.1.w": (3,)})
    tx = gx.inject_hyperparams(case.factory)(**case.kwargs)
    params, state = dict(init), tx.init(init)
    model_params = [(k, torch.nn.Parameter(v.clone())) for k, v in init.items()]
    opt = gx.Optimizer(model_params, case.factory, **case.kwargs)
    for t in range(5):
        g = grad_tree(init, t)
        u, state = tx.update(g, state, params)
        params = gx.apply_updates(params, u)
        for k, p in model_params:
            p.grad = g[k].clone()
        opt.step()
    for k, p in model_params:
        assert torch.equal(p.detach(), params[k])
