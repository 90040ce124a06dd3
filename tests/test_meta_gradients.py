"""Differentiating through the optimizer: the gradient of the loss after K unrolled steps with
respect to the learning rate or Grokfast's λ, from autograd, equals central finite differences."""

from __future__ import annotations

from typing import Any

import pytest
import torch

import grokxform as gx

F64 = torch.float64


def _problem() -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 4, generator=g, dtype=F64)
    y = x @ torch.randn(4, 1, generator=g, dtype=F64) + 0.1 * torch.randn(32, 1, generator=g, dtype=F64)
    return x, y, {"w": torch.zeros(4, 1, dtype=F64), "b": torch.zeros(1, dtype=F64)}


def _loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return ((x @ p["w"] + p["b"] - y) ** 2).mean()


def _unrolled(tx: gx.GradientTransformation, steps: int = 6, state: Any = None) -> torch.Tensor:
    x, y, params = _problem()
    state = tx.init(params) if state is None else state
    for _ in range(steps):
        grads = torch.func.grad(_loss)(params, x, y)
        updates, state = tx.update(grads, state, params)
        params = gx.apply_updates(params, updates)
    return _loss(params, x, y)


def _grokfast(lr: torch.Tensor, lamb: torch.Tensor) -> gx.GradientTransformation:
    return gx.chain(gx.amplify(gx.ema_filter(0.9), lamb), gx.scale_by_adam(),
                    gx.decoupled_weight_decay(0.01), gx.scale_by_learning_rate(lr))


def _central(f: Any, x: float, h: float = 1e-6) -> float:
    return float((f(x + h) - f(x - h)) / (2 * h))


@pytest.mark.parametrize("wrt", ["lr", "lamb"])
def test_meta_gradient_through_unrolled_grokfast_matches_finite_differences(wrt: str) -> None:
    hp = {"lr": torch.tensor(0.05, dtype=F64, requires_grad=True),
          "lamb": torch.tensor(2.0, dtype=F64, requires_grad=True)}
    (autograd,) = torch.autograd.grad(_unrolled(_grokfast(hp["lr"], hp["lamb"])), hp[wrt])

    def at(v: float) -> torch.Tensor:
        vals = {k: t.detach() for k, t in hp.items()} | {wrt: torch.tensor(v, dtype=F64)}
        return _unrolled(_grokfast(vals["lr"], vals["lamb"]))

    fd = _central(at, float(hp[wrt]))
    assert abs(float(autograd)) > 1e-4  # the loss does depend on it: the check is not vacuous
    assert float(autograd) == pytest.approx(fd, rel=1e-6, abs=1e-10)


def test_meta_gradient_of_an_injected_learning_rate_matches_finite_differences() -> None:
    def loss_at(lr: torch.Tensor) -> torch.Tensor:
        tx = gx.inject_hyperparams(gx.grokfast_ema)(lr=0.05, alpha=0.9, lamb=2.0)
        _, _, params = _problem()
        state = tx.init(params)
        state.hyperparams["lr"] = lr
        return _unrolled(tx, state=state)

    lr = torch.tensor(0.05, dtype=F64, requires_grad=True)
    (autograd,) = torch.autograd.grad(loss_at(lr), lr)
    fd = _central(lambda v: loss_at(torch.tensor(v, dtype=F64)), 0.05)
    assert abs(float(autograd)) > 1e-4
    assert float(autograd) == pytest.approx(fd, rel=1e-6, abs=1e-10)


def test_a_gradient_step_on_the_learning_rate_lowers_the_unrolled_loss() -> None:
    lr = torch.tensor(0.01, dtype=F64, requires_grad=True)
    before = _unrolled(_grokfast(lr, torch.tensor(2.0, dtype=F64)))
    (g,) = torch.autograd.grad(before, lr)
    after = _unrolled(_grokfast(lr.detach() - 1e-3 * g.sign(), torch.tensor(2.0, dtype=F64)))
    assert float(after) < float(before)
