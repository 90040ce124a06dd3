"""Bytes of optimizer state per parameter, measured from the state tensors, with and without
``gx.compress_state``; and the codecs' round-trip errors on an Adam state.

    python benchmarks/state_memory.py [--out benchmarks/results/cpu_state_memory.json]

Memory: the state of each pipeline for a model of 2·1024·1024 float32 params (two 1024×1024
leaves), made by ``tx.init`` on the CPU, every tensor's ``nbytes`` summed (counters and 0-d values
included) and divided by the number of params. Codec errors: a 64→256→1 MLP trained 500 steps
with float32 Adam (lr 1e-3, batches of 64); its final m and v coded and decoded: the relative
2-norm error of m, of √v, and of Adam's direction m/(√v + 1e-8). Trajectories: the same MLP
trained 500 steps by ``gx.adamw`` (lr 1e-3, no weight decay) with float32 state and with each
format (``gx.compress_state``), from the same init and batches: the distance of the final params
from the float32 run's, relative to how far the float32 run moved them.
"""

from __future__ import annotations

import argparse
import json
import platform

import torch

import grokxform as gx
from grokxform.experiments.sweep import environment
from grokxform.transforms.compress import FORMATS, decode, encode


def state_bytes(state: object) -> int:
    return sum(x.nbytes for x in torch.utils._pytree.tree_leaves(state) if isinstance(x, torch.Tensor))


def memory() -> dict[str, dict[str, float]]:
    params = {"a": torch.zeros(1024, 1024), "b": torch.zeros(1024, 1024)}
    n = sum(p.numel() for p in params.values())
    pipelines = {
        "adamw": lambda: gx.adamw(1e-3),
        "grokadamw": lambda: gx.grokadamw(1e-3),
        "grokfast_ema (adamw)": lambda: gx.grokfast_ema(1e-3),
        "grokfast_ma(100) (adamw)": lambda: gx.grokfast_ma(1e-3, window_size=100),
        "lion": lambda: gx.lion(1e-4),
        "sgd momentum": lambda: gx.sgd(1e-2, momentum=0.9),
    }
    out: dict[str, dict[str, float]] = {}
    for name, make in pipelines.items():
        row = {"float32": state_bytes(make().init(params)) / n}
        for fmt in FORMATS:
            row[fmt] = state_bytes(gx.compress_state(make(), fmt).init(params)) / n
        out[name] = row
        print(name, {k: round(v, 3) for k, v in row.items()})
    return out


def adam_state(steps: int = 500) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2048, 64)
    y = torch.tanh(x @ torch.randn(64, 1) / 8 * 3) + 0.1 * torch.randn(2048, 1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(5)
    for _ in range(steps):
        idx = torch.randint(0, 2048, (64,), generator=g)
        loss = torch.nn.functional.mse_loss(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    st = opt.state[model[0].weight]
    return st["exp_avg"].clone(), st["exp_avg_sq"].clone()


def _data() -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    x = torch.randn(2048, 64)
    return x, torch.tanh(x @ torch.randn(64, 1) / 8 * 3) + 0.1 * torch.randn(2048, 1)


def trajectories(steps: int = 500) -> dict[str, float]:
    x, y = _data()
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
    start = {n: p.detach().clone() for n, p in model.named_parameters()}

    def run(fmt: str | None) -> dict[str, torch.Tensor]:
        params = {n: p.clone() for n, p in start.items()}
        tx = gx.adamw(1e-3, weight_decay=0.0)
        tx = tx if fmt is None else gx.compress_state(tx, fmt, min_size=1)
        state = tx.init(params)
        g = torch.Generator().manual_seed(5)
        for _ in range(steps):
            idx = torch.randint(0, 2048, (64,), generator=g)

            def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
                return torch.nn.functional.mse_loss(torch.func.functional_call(model, p, (x[idx],)), y[idx])

            grads = torch.func.grad(loss)(params)
            u, state = tx.update(grads, state, params)
            params = gx.apply_updates(params, u)
        return params

    def flat(t: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([v.reshape(-1) for v in t.values()])

    ref = flat(run(None))
    moved = (ref - flat(start)).norm()
    out = {}
    for fmt in FORMATS:
        out[fmt] = ((flat(run(fmt)) - ref).norm() / moved).item()
        print("trajectory", fmt, f"{out[fmt]:.2e}")
    return out


def codec_errors() -> dict[str, dict[str, float]]:
    m, v = adam_state()

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return ((a - b).norm() / b.norm()).item()

    direction = m / (v.sqrt() + 1e-8)
    out = {}
    for fmt in FORMATS:
        dm = decode(encode(m, fmt, key=1))
        dv = decode(encode(v, fmt, nonnegative=True, key=2))
        out[fmt] = {"m": rel(dm, m), "sqrt_v": rel(dv.sqrt(), v.sqrt()), "direction": rel(dm / (dv.sqrt() + 1e-8), direction)}
        print(fmt, {k: f"{e:.2e}" for k, e in out[fmt].items()})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/cpu_state_memory.json")
    args = ap.parse_args()
    result = {
        **environment(torch.device("cpu")),
        "machine": platform.machine(),
        "params": 2 * 1024 * 1024,
        "block_size": 256,
        "bytes_per_param": memory(),
        "codec_errors": codec_errors(),
        "trajectory_distance": trajectories(),
    }
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
