"""The migration guide's preset for GrokFastAdamW (``grokfast-pytorch==0.0.11``), built from the
public primitives, against the package itself (float64, 30 steps). The other presets of the guide
(``grokadamw_compat``, ``grokfast_ema``/``grokfast_ma`` with coupled weight decay) are checked in
``tests/test_references.py``."""

from __future__ import annotations

import pytest
import torch

import grokxform as gx

grokfast_pytorch = pytest.importorskip("grokfast_pytorch")


def grokfast_adamw_preset(lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                          weight_decay: float = 0.0, eps: float = 1e-8, grokfast_alpha: float = 0.98,
                          grokfast_lamb: float = 2.0, normalize_lr: bool = True) -> gx.GradientTransformation:
    """The preset of docs/migrating.md, verbatim."""
    if normalize_lr:
        lr = lr / (1 + grokfast_lamb)
    return gx.named_chain(
        ("grokfast", gx.amplify(gx.ema_filter(grokfast_alpha, init="first"), grokfast_lamb)),
        ("adam", gx.scale_by_adam(betas[0], betas[1], eps)),
        ("weight_decay", gx.decoupled_weight_decay(weight_decay / lr)),  # θ·(1 − wd) per step
        ("lr", gx.scale_by_learning_rate(lr)),
    )


@pytest.mark.parametrize("kwargs", [{}, {"lr": 1e-3, "weight_decay": 0.01, "grokfast_lamb": 5.0},
                                    {"normalize_lr": False, "grokfast_alpha": 0.9, "betas": (0.8, 0.95)}])
def test_grokfast_adamw_preset_matches_grokfast_pytorch(kwargs: dict) -> None:
    g = torch.Generator().manual_seed(0)
    shapes = {"a": (4, 3), "b": (3,), "c": (2, 2, 2)}
    init = {k: torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
    grads = [{k: 0.1 * torch.randn(s, generator=g, dtype=torch.float64) for k, s in shapes.items()}
             for _ in range(30)]

    ref = {k: torch.nn.Parameter(v.clone()) for k, v in init.items()}
    opt = grokfast_pytorch.GrokFastAdamW(list(ref.values()), **kwargs)
    tx = grokfast_adamw_preset(**kwargs)
    params = {k: v.clone() for k, v in init.items()}
    state = tx.init(params)
    for step in grads:
        for k, p in ref.items():
            p.grad = step[k].clone()
        opt.step()
        updates, state = tx.update(step, state, params)
        params = gx.apply_updates(params, updates)
    moved = max(float((ref[k].detach() - init[k]).abs().max()) for k in shapes)
    assert moved > 1e-4
    for k in shapes:  # the package clamps √v̂ at ε where Adam adds ε: equal to ~ε/√v̂
        torch.testing.assert_close(params[k], ref[k].detach(), rtol=1e-6, atol=1e-9)
