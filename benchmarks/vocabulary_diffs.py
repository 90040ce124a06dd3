"""The largest difference between each optimizer beside the Grokfast family, as users run it
(``gx.Optimizer`` with default arguments: the engine's kernels), and its reference, over 30 steps.

A two-layer MLP (two weight matrices, two bias vectors) trained on fixed random data, the same
initial params and batches for both; after every step the largest ``|θ_ours − θ_reference|`` over
all params, in float64 and in float32 (the float32 figure is relative to the largest param).
Prints a table and writes JSON.

    python benchmarks/vocabulary_diffs.py --out benchmarks/results/cpu_vocabulary_diffs.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import platform
from collections.abc import Callable
from importlib.metadata import version
from typing import Any

import pytorch_optimizer as po
import torch

import grokxform as gx

STEPS = 30
Make = Callable[[list[tuple[str, torch.nn.Parameter]]], torch.optim.Optimizer]


def _lamb(ps: Any) -> torch.optim.Optimizer:
    opt = po.Lamb([p for _, p in ps], lr=1e-2, weight_decay=0.1, weight_decouple=False, adam_debias=True, eps=1e-6)
    opt.clamp = math.inf  # ‖θ‖ uncapped, as in the paper (its class default caps it at 10)
    return opt


def _matrices(ps: Any) -> list[Any]:
    return [p for _, p in ps if p.ndim == 2]


METHODS: dict[str, tuple[str, Make, Make]] = {
    # name: (reference, ours, theirs)
    "sgd (momentum 0.9, wd 1e-2)": ("torch.optim.SGD", lambda ps: gx.Optimizer(ps, gx.sgd, lr=1e-2, momentum=0.9, weight_decay=1e-2),
                                    lambda ps: torch.optim.SGD([p for _, p in ps], lr=1e-2, momentum=0.9, weight_decay=1e-2)),
    "sgd (nesterov)": ("torch.optim.SGD", lambda ps: gx.Optimizer(ps, gx.sgd, lr=1e-2, momentum=0.9, nesterov=True),
                       lambda ps: torch.optim.SGD([p for _, p in ps], lr=1e-2, momentum=0.9, nesterov=True)),
    "rmsprop (centered, momentum)": (
        "torch.optim.RMSprop",
        lambda ps: gx.Optimizer(ps, gx.rmsprop, lr=1e-3, momentum=0.9, centered=True, weight_decay=1e-2),
        lambda ps: torch.optim.RMSprop([p for _, p in ps], lr=1e-3, momentum=0.9, centered=True, weight_decay=1e-2)),
    "adam": ("torch.optim.Adam", lambda ps: gx.Optimizer(ps, gx.adam, lr=1e-3),
             lambda ps: torch.optim.Adam([p for _, p in ps], lr=1e-3)),
    "nadam (wd 1e-2)": ("torch.optim.NAdam", lambda ps: gx.Optimizer(ps, gx.nadam, lr=1e-3, weight_decay=1e-2),
                        lambda ps: torch.optim.NAdam([p for _, p in ps], lr=1e-3, weight_decay=1e-2)),
    "ademamix (warm-up 20)": (
        f"pytorch_optimizer {version('pytorch_optimizer')} AdEMAMix",
        lambda ps: gx.Optimizer(ps, gx.ademamix, lr=1e-3, alpha_warmup=20, beta3_warmup=20),
        lambda ps: po.AdEMAMix([p for _, p in ps], lr=1e-3, t_alpha_beta3=20)),
    "lion": (f"pytorch_optimizer {version('pytorch_optimizer')} Lion", lambda ps: gx.Optimizer(ps, gx.lion, lr=1e-3),
             lambda ps: po.Lion([p for _, p in ps], lr=1e-3)),
    "lion (wd 0.1)": (f"pytorch_optimizer {version('pytorch_optimizer')} Lion",
                      lambda ps: gx.Optimizer(ps, gx.lion, lr=1e-3, weight_decay=0.1),
                      lambda ps: po.Lion([p for _, p in ps], lr=1e-3, weight_decay=0.1)),
    "lamb (wd 0.1, as its adam_debias)": (
        f"pytorch_optimizer {version('pytorch_optimizer')} Lamb (no clamp)",
        lambda ps: gx.Optimizer(ps, gx.lamb, lr=1e-2, weight_decay=0.1, bias_correction=False, trust_ratio_eps=1e-6),
        _lamb),
    "orthograd + sgd (momentum 0.9)": (
        f"pytorch_optimizer {version('pytorch_optimizer')} OrthoGrad(SGD)",
        lambda ps: gx.Optimizer(ps, gx.chain(gx.orthograd(), gx.sgd(1e-2, momentum=0.9))),
        lambda ps: po.OrthoGrad(torch.optim.SGD, params=[p for _, p in ps], lr=1e-2, momentum=0.9)),
    "muon (matrices)": ("torch.optim.Muon", lambda ps: gx.Optimizer([(n, p) for n, p in ps if p.ndim == 2], gx.muon, lr=0.02),
                        lambda ps: torch.optim.Muon(_matrices(ps), lr=0.02)),
}


def model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(dtype)


def follow(ours: Make, theirs: Make, dtype: torch.dtype) -> tuple[float, float, list[str]]:
    """(largest param difference over the steps, largest |param|, our engines)."""
    torch.set_default_dtype(dtype)  # (NAdam keeps its running product in the default dtype)
    a, b = model(dtype), model(dtype)
    opt_a, opt_b = ours(list(a.named_parameters())), theirs(list(b.named_parameters()))
    gen = torch.Generator().manual_seed(1)
    worst = 0.0
    for _ in range(STEPS):
        x = torch.randn(64, 16, generator=gen, dtype=torch.float64).to(dtype)
        y = torch.randn(64, 4, generator=gen, dtype=torch.float64).to(dtype)
        for m, opt in ((a, opt_a), (b, opt_b)):
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()
        worst = max(worst, max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters())))
    torch.set_default_dtype(torch.float32)
    scale = max(p.abs().max().item() for p in b.parameters())
    return worst, scale, list(opt_a.engines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=None, help="JSON path")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    print(f"{'method':34} {'reference':48} {'float64':>10} {'float32 (rel)':>14}  engines")
    for name, (ref, ours, theirs) in METHODS.items():
        d64, _, engines = follow(ours, theirs, torch.float64)
        d32, scale, _ = follow(ours, theirs, torch.float32)
        rows.append({"method": name, "reference": ref, "steps": STEPS, "max_abs_diff_float64": d64,
                     "max_abs_diff_float32": d32, "max_abs_param_float32": scale, "engines": engines})
        print(f"{name:34} {ref:48} {d64:10.2e} {d32 / scale:14.2e}  {','.join(engines)}")
    doc = {"device": platform.processor() or "cpu", "torch": torch.__version__, "python": platform.python_version(),
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "steps": STEPS,
           "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
