"""Peak GPU memory of an optimizer's first step (the one that makes its state): ``gx.Optimizer``
with default arguments on a GPT-2 parameter tree (124M parameters, float32), beside the memory its
state holds afterwards. Prints one line per pipeline; ``--out`` writes JSON.

    python benchmarks/first_step_peak.py --pipelines adamw,grokfast_ma --out first_step_peak.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

import torch

import grokxform as gx

sys.path.insert(0, os.path.dirname(__file__))
from bench_step import gpt_shapes  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipelines", default="adamw,grokfast_ma")
    parser.add_argument("--window", type=int, default=100)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    dev = torch.device("cuda")
    rows = {}
    for name in args.pipelines.split(","):
        params = [(n, torch.nn.Parameter(torch.randn(s, device=dev) * 0.02))
                  for n, s in gpt_shapes(50257, 1024, 768, 12)]
        for _, p in params:
            p.grad = torch.randn_like(p) * 1e-3
        kwargs = {"window_size": args.window} if name == "grokfast_ma" else {}
        opt = gx.Optimizer(params, getattr(gx, name), lr=1e-4, **kwargs)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        opt.step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(dev) - base
        held = torch.cuda.memory_allocated(dev) - base
        rows[name] = {"first_step_peak_MiB": peak / 2**20, "state_MiB": held / 2**20, "engine": opt.engines[0]}
        print(f"{name:12s} first-step peak {peak / 2**20:9.0f} MiB, state {held / 2**20:9.0f} MiB ({opt.engines[0]})")
        del opt, params
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                       "command": " ".join(["python", *sys.argv]), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
