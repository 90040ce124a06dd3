"""The pipelines on a CUDA device: the same numbers as on the CPU, eager and compiled."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from cases import PIPELINES, grad_tree, param_tree

import grokxform as gx
from grokxform import tree as T

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def run(tx: gx.GradientTransformation, p: dict[str, torch.Tensor], steps: int,
        update: Callable[..., Any] | None = None) -> dict[str, torch.Tensor]:
    update = update or tx.update
    s = tx.init(p)
    for t in range(steps):
        u, s = update(grad_tree(p, t), s, p, train_loss=torch.tensor(0.1 * t, device=p["scalar"].device),
                      val_loss=torch.tensor(1.0, device=p["scalar"].device))
        p = gx.apply_updates(p, u)
    return p


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_cuda_float64_matches_cpu(name: str) -> None:
    cpu = run(PIPELINES[name].make(), param_tree(dtype=torch.float64), 12)
    cuda = run(PIPELINES[name].make(), param_tree(dtype=torch.float64, device="cuda"), 12)
    worst = max((cpu[k] - cuda[k].cpu()).abs().max().item() for k in cpu if cpu[k].numel())
    assert worst < (1e-8 if PIPELINES[name].draws_normals else 1e-12)  # (normals: float32 log/cos ulps)


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_cuda_compiled_matches_eager(name: str) -> None:
    torch._dynamo.reset()
    tx = PIPELINES[name].make()
    eager = run(tx, param_tree(device="cuda"), 8)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = run(tx, param_tree(device="cuda"), 8, update=torch.compile(tx.update, fullgraph=True))
    worst = max((eager[k] - compiled[k]).abs().max().item() for k in eager if eager[k].numel())
    # A bfloat16 window: Inductor may keep a value in float32 that eager rounds to bfloat16 first
    # (2^-9 of a gradient, times the learning rate, in a few steps); Muon's bfloat16 Newton–Schulz
    # iteration likewise (one bfloat16 rounding of an orthogonalized matrix, times the learning rate).
    case = PIPELINES[name]
    assert worst < (2e-3 if case.matrices else 2e-4 if case.kwargs.get("window_dtype") == torch.bfloat16 else 1e-5)
    assert all(T.first_device(v).type == "cuda" for v in compiled.values())
