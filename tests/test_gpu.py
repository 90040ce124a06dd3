"""The pipelines on a CUDA device: the same numbers as on the CPU, eager and compiled."""

from __future__ import annotations

import pytest
import torch

import grokxform as gx
from grokxform import tree as T

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

PIPELINES = {
    "adamw": lambda: gx.adamw(lr=1e-2),
    "grokfast_ema": lambda: gx.grokfast_ema(lr=1e-2),
    "grokfast_ma": lambda: gx.grokfast_ma(lr=1e-2, window_size=4),
    "grokadamw": lambda: gx.grokadamw(lr=gx.linear_warmup(1e-2, 3)),
    "grokadamw_compat": lambda: gx.grokadamw_compat(lr=1e-2),
}


def tree(device: str, dtype: torch.dtype) -> dict:
    g = torch.Generator().manual_seed(0)
    shapes = {"embed": (50, 16), "blocks.0.w": (16, 16), "blocks.0.b": (16,), "blocks.1.w": (16, 16), "s": ()}
    return {k: torch.randn(s, generator=g, dtype=dtype).to(device) for k, s in shapes.items()}


def grads(p: dict, t: int) -> dict:
    g = torch.Generator().manual_seed(100 + t)
    return {k: torch.randn(v.shape, generator=g, dtype=v.dtype).to(v.device) for k, v in p.items()}


def run(tx: gx.GradientTransformation, p: dict, steps: int, update=None) -> dict:
    update = update or tx.update
    s = tx.init(p)
    for t in range(steps):
        u, s = update(grads(p, t), s, p, train_loss=torch.tensor(0.1 * t, device=p["s"].device),
                      val_loss=torch.tensor(1.0, device=p["s"].device))
        p = gx.apply_updates(p, u)
    return p


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_cuda_float64_matches_cpu(name):
    cpu = run(PIPELINES[name](), tree("cpu", torch.float64), 12)
    cuda = run(PIPELINES[name](), tree("cuda", torch.float64), 12)
    worst = max((cpu[k] - cuda[k].cpu()).abs().max().item() for k in cpu)
    assert worst < 1e-12


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_cuda_compiled_matches_eager(name):
    torch._dynamo.reset()
    tx = PIPELINES[name]()
    eager = run(tx, tree("cuda", torch.float32), 8)
    with torch._dynamo.config.patch(error_on_recompile=True):
        compiled = run(tx, tree("cuda", torch.float32), 8, update=torch.compile(tx.update, fullgraph=True))
    worst = max((eager[k] - compiled[k]).abs().max().item() for k in eager)
    assert worst < 1e-5
    assert all(T.first_device(v).type == "cuda" for v in compiled.values())
