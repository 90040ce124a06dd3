"""``benchmarks/ma_two_stage.py``: the paper's two-stage Grokfast-MA (``main.py --two_stage``) as a
λ schedule. For its first stage it is Adam; then it amplifies the window that filled meanwhile."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest
import torch

import grokxform as gx
from scripts import benchmark_script


@pytest.fixture(scope="module")
def script() -> Iterator[ModuleType]:
    yield from benchmark_script("ma_two_stage")


def test_the_first_stage_is_adam_and_the_second_amplifies_the_full_window(script: ModuleType,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(script, "FIRST_STAGE", 120)  # past the window's 100 steps, as 500 is
    g = torch.Generator().manual_seed(0)
    grads = [{"w": torch.randn(5, generator=g), "b": torch.randn(3, generator=g)} for _ in range(122)]
    params = {"w": torch.randn(5, generator=g), "b": torch.randn(3, generator=g)}
    two_stage = script.RUNS["grokfast_ma_two_stage"]()
    adam = gx.adamw(gx.transforms.schedules.linear_warmup(1e-3, 10), betas=script.PAPER_BETAS, weight_decay=0.0)
    one_stage = script.RUNS["grokfast_ma_wd0"]()
    states = [tx.init(params) for tx in (two_stage, adam, one_stage)]
    for t, grad in enumerate(grads):
        (u2, states[0]), (ua, states[1]), (u1, states[2]) = (
            tx.update(grad, s, params) for tx, s in zip((two_stage, adam, one_stage), states))
        if t < 120:
            torch.testing.assert_close(u2, ua, rtol=1e-6, atol=0)  # to the last bit or so
            assert float(states[0].hyperparams["lamb"]) == 0.0
        else:  # the 121st update: λ = 5 on the mean of the last 100 gradients
            assert float(states[0].hyperparams["lamb"]) == 5.0
            assert not torch.allclose(u2["w"], ua["w"])
        if t >= 99:  # the one-stage run amplifies from its 100th update on, as the paper's warm-up
            assert not torch.allclose(u1["w"], ua["w"])
