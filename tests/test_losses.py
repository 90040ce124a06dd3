"""StableMax's cross-entropy against the paper's definition (Prieto et al. 2025, arXiv:2501.04697)."""

from __future__ import annotations

import math

import pytest
import torch

from grokxform.experiments import stablemax, stablemax_cross_entropy


def _definition(logits: list[float], target: int) -> float:
    """−log(s(z_y) / Σ s(z_j)), s(x) = x + 1 (x ≥ 0), 1/(1 − x) (x < 0), in Python floats."""
    s = [x + 1.0 if x >= 0 else 1.0 / (1.0 - x) for x in logits]
    return -math.log(s[target] / sum(s))


def test_the_loss_is_the_papers_definition() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 11, generator=g, dtype=torch.float64) * 30  # large logits: exp would collapse
    targets = torch.randint(0, 11, (16,), generator=g)
    want = [_definition(row.tolist(), int(t)) for row, t in zip(logits, targets)]
    got = stablemax_cross_entropy(logits, targets, reduction="none")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-13, atol=0)
    assert math.isclose(float(stablemax_cross_entropy(logits, targets)), sum(want) / 16, rel_tol=1e-13)
    assert math.isclose(float(stablemax_cross_entropy(logits, targets, reduction="sum")), sum(want), rel_tol=1e-13)
    f32 = stablemax_cross_entropy(logits.float(), targets, reduction="none")
    assert f32.dtype == torch.float32
    torch.testing.assert_close(f32.double(), got, rtol=1e-6, atol=1e-6)


def test_stablemax_is_continuous_at_zero_and_positive() -> None:
    x = torch.tensor([-1e6, -1.0, -1e-12, 0.0, 1e-12, 1.0, 1e6], dtype=torch.float64)
    s = stablemax(x)
    assert bool((s > 0).all())
    torch.testing.assert_close(s, torch.tensor([1 / (1 + 1e6), 0.5, 1 / (1 + 1e-12), 1.0, 1 + 1e-12, 2.0, 1e6 + 1],
                                               dtype=torch.float64))


def test_gradients_do_not_vanish_where_softmax_collapses() -> None:
    """Logits whose softmax rounds to one-hot in float32 (zero loss, zero gradient): StableMax's
    cross-entropy still has a gradient, and autograd agrees with finite differences."""
    logits = torch.tensor([[120.0, 0.0, -5.0]], requires_grad=True)
    target = torch.tensor([0])
    soft = torch.nn.functional.cross_entropy(logits, target)
    (g_soft,) = torch.autograd.grad(soft, logits)
    assert float(soft.detach()) == 0.0 and float(g_soft.abs().max()) == 0.0
    stable = stablemax_cross_entropy(logits, target)
    (g_stable,) = torch.autograd.grad(stable, logits)
    assert float(stable.detach()) > 0 and float(g_stable.abs().max()) > 1e-4
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda z: stablemax_cross_entropy(z, torch.tensor([0, 1, 2, 4])), (x,))


def test_bad_input_is_named() -> None:
    with pytest.raises(ValueError, match="do not index logits"):
        stablemax_cross_entropy(torch.zeros(3, 4), torch.zeros(4, dtype=torch.int64))
    with pytest.raises(ValueError, match="reduction"):
        stablemax_cross_entropy(torch.zeros(3, 4), torch.zeros(3, dtype=torch.int64), reduction="avg")


def test_a_classifier_learns_with_it() -> None:
    """As the loss of a small classifier trained with ``gx.Optimizer``, it goes down."""
    import grokxform as gx

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 8, generator=g)
    y = (x @ torch.randn(8, 5, generator=g)).argmax(-1)  # separable classes
    model = torch.nn.Linear(8, 5)
    opt = gx.Optimizer(model.parameters(), gx.adamw(1e-2, weight_decay=0.0))
    losses = []
    for _ in range(100):
        loss = stablemax_cross_entropy(model(x), y)
        losses.append(float(loss.detach()))
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.6 * losses[0], losses
