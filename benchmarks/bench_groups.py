"""What two param groups cost: ``gx.Optimizer`` over a decay and a no-decay group (the layout
transformers' Trainer builds) against one group with the same split as ``weight_decay_mask``,
beside ``torch.optim.AdamW(fused=True)`` over the same two groups, all timed in one run.

With several groups, a reduction over the tree (the clip's global norm) spans them: the optimizer
computes the whole gradient's norm once a step and passes it to every group.

    python benchmarks/bench_groups.py --set gpt2 --steps 100 --out benchmarks/results/h200_groups.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
from typing import Any

import torch

import grokxform as gx
from bench_step import SETS, Clock, make_tree


def _decay(name: str) -> bool:
    return name.endswith("weight") and "ln" not in name


def _time(opt: torch.optim.Optimizer, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        opt.step()
    clock = Clock(device)
    for _ in range(steps):
        clock.time(opt.step)
    return clock.median_ms()


def run(set_name: str, steps: int, warmup: int, device: torch.device) -> dict[str, Any]:
    shapes = SETS[set_name]()
    rows: dict[str, float] = {}
    for label in ("torch-fused-2groups", "gx-grokadamw-1group-mask", "gx-grokadamw-2groups",
                  "gx-adamw-1group-mask", "gx-adamw-2groups"):
        params, grads = make_tree(shapes, torch.float32, device, seed=0)
        ps = {n: torch.nn.Parameter(p) for n, p in params.items()}
        for n, p in ps.items():
            p.grad = grads[n]
        decay = [p for n, p in ps.items() if _decay(n)]
        rest = [p for n, p in ps.items() if not _decay(n)]
        names = {id(p): n for n, p in ps.items()}
        split = [{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}]
        split_names = [{**g, "param_names": [names[id(p)] for p in g["params"]]} for g in split]
        factory = gx.grokadamw if "grokadamw" in label else gx.adamw
        if label.startswith("torch"):
            opt: torch.optim.Optimizer = torch.optim.AdamW(split, lr=1e-3, fused=device.type == "cuda")
        elif label.endswith("mask"):
            opt = gx.Optimizer(list(ps.items()), factory, lr=1e-3, weight_decay=0.01,
                               weight_decay_mask=lambda n, p: _decay(n))
        else:
            opt = gx.Optimizer(split_names, factory, lr=1e-3)
        rows[label] = _time(opt, steps, warmup, device)
        print(f"{set_name} {label:28s} {rows[label]:8.3f} ms", flush=True)
    base = rows["torch-fused-2groups"]
    return {
        "set": set_name,
        "params": sum(torch.Size(s).numel() for _, s in shapes),
        "tensors": len(shapes),
        "median_ms": rows,
        "vs_torch_fused_2groups": {k: round(v / base, 3) for k, v in rows.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="gpt2", choices=sorted(SETS))
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device(args.device)
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "steps": args.steps,
        **run(args.set, args.steps, args.warmup, device),
    }
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
