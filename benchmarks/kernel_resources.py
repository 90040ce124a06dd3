"""What the engine's Triton kernels cost the GPU besides bytes: registers per thread, spilled
bytes and shared memory of every kernel that the default ``gx.Optimizer`` step of each pipeline ×
state format compiles (GPT-2 small's parameter shapes by default), with the kernel's tile.

A kernel that spills (``n_spills`` > 0) or holds many registers per thread runs fewer programs
per SM at once, and a bandwidth-bound step then leaves bandwidth unused.

    python benchmarks/kernel_resources.py --out resources.json                 # CUDA only
    python benchmarks/kernel_resources.py --block 512 --warps 4 --pipelines grokadamw --formats int8
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import grokxform as gx  # noqa: E402
from bench_step import SETS  # noqa: E402
from grokxform.engine import step as engine_step  # noqa: E402

PIPELINES = {
    "adamw": lambda: gx.adamw(1e-3, weight_decay=0.01),
    "grokadamw": lambda: gx.grokadamw(1e-3),
    "grokfast_ema": lambda: gx.grokfast_ema(1e-3),
    "grokfast_ma": lambda: gx.grokfast_ma(1e-3, window_size=100),
}


def compiled_kernels(fn: Any) -> list[Any]:
    """The compiled kernels of a Triton ``JITFunction`` (whatever the Triton version keeps them in)."""
    out = []
    for entry in getattr(fn, "device_caches", {}).values():
        cache = entry[0] if isinstance(entry, tuple) else entry
        out += list(cache.values())
    for cache in getattr(fn, "cache", {}).values():
        out += list(cache.values())
    return out


def resources(kernel: Any) -> dict[str, Any]:
    if hasattr(kernel, "_init_handles"):
        kernel._init_handles()
    meta = getattr(kernel, "metadata", None)
    return {"n_regs": getattr(kernel, "n_regs", None), "n_spills": getattr(kernel, "n_spills", None),
            "shared": getattr(meta, "shared", None), "num_warps": getattr(meta, "num_warps", None)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--set", default="gpt2", choices=list(SETS))
    ap.add_argument("--pipelines", default=",".join(PIPELINES))
    ap.add_argument("--formats", default="none,bf16,int8", help="comma list of none, bf16, bf16_sr, int8")
    ap.add_argument("--block", type=int, default=None)
    ap.add_argument("--warps", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("kernel_resources: needs CUDA (the interpreter compiles nothing)")
    if args.block is not None:
        engine_step.BLOCK = args.block
    if args.warps is not None:
        engine_step.NUM_WARPS = args.warps
    shapes = SETS[args.set]()
    rows = []
    for name in args.pipelines.split(","):
        for fmt in args.formats.split(","):
            params = [(n, torch.zeros(s, device="cuda", requires_grad=True)) for n, s in shapes]
            for _, p in params:
                p.grad = torch.randn_like(p) * 1e-3
            opt = gx.Optimizer(params, PIPELINES[name](), state_format=None if fmt == "none" else fmt)
            before = set(engine_step._MODULES)
            opt.step()
            torch.cuda.synchronize()
            for mod_name in sorted(set(engine_step._MODULES) - before):
                mod = engine_step._MODULES[mod_name]
                for attr in dir(mod):
                    if not attr.startswith("step_pass"):
                        continue
                    source = Path(mod.__file__).read_text()
                    for k in compiled_kernels(getattr(mod, attr)):
                        row = {"pipeline": name, "format": fmt, "kernel": attr, "engines": opt.engines,
                               "tile_2d": "[:, None] * " in source.split("offs = ", 1)[1].split("\n", 1)[0],
                               **resources(k)}
                        rows.append(row)
                        print(row, flush=True)
            del opt, params
            torch.cuda.empty_cache()
    if args.out:
        Path(args.out).write_text(json.dumps({
            "device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
            "block": engine_step.BLOCK, "warps": engine_step.NUM_WARPS, "set": args.set, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
