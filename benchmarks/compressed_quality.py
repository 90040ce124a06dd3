"""Does grokking survive compressed optimizer state? Grokfast-EMA, Grokfast-MA and GrokAdamW at
their recommended settings, trained with float32 state and with ``gx.compress_state``'s formats
(int8, bf16, bf16_sr), same seeds, same data order: steps to 95% validation accuracy on x·y mod 97
(10 seeds), x−y and x/y mod 97 (3 seeds), and the byte-level language model's validation loss at
its step budget (2 seeds).

Each (task, method, format) is one vmapped sweep over its seeds (``grokxform.experiments.sweep``
with ``state_format=``), written to ``OUT/<task>__<method>__<format>.json``; a file that exists is
skipped, so an interrupted run resumes. Sweeps run in ``--jobs`` processes side by side (one GPU
holds several of these small models). ``--formats`` narrows the formats; ``--block-size N`` (other
than the default 256) runs the int8 format with blocks of N as the format ``int8_bN`` (and
float32); ``--seeds N`` runs every task with seeds 0..N-1 (into another OUT). Then
``OUT/summary.json`` and ``OUT/summary.md`` put each compressed format beside float32.

Usage:
    python benchmarks/compressed_quality.py --device cuda --out benchmarks/results/compress_quality --jobs 8
    python benchmarks/compressed_quality.py --summarize --out benchmarks/results/compress_quality
    python benchmarks/compressed_quality.py --device cpu --tasks lm --methods grokfast_ma --block-size 128 --out OUT
    python benchmarks/compressed_quality.py --device cuda --tasks div --formats float32,int8 --seeds 10 --out OUT
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import signal
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from grokxform.transforms.compress import FORMATS as COMPRESSED

FORMATS = ("float32", *COMPRESSED)
"""float32 (the state as the method keeps it), then every format of ``gx.compress_state``."""
METHODS: dict[str, dict[str, float]] = {
    "grokfast_ema": {"lr": 1e-3},  # α 0.98, λ 2, L2 wd 0.005: the paper's
    "grokfast_ma": {"lr": 1e-3},  # w 100, λ 5, L2 wd 0.01: the paper's
    "grokadamw": {"lr": 1e-3, "weight_decay": 1.0, "alpha_init": 0.9},  # grokadamw's starting point for grokking
}
TASKS: dict[str, tuple[list[int], int]] = {
    "mul": (list(range(10)), 5000),
    "sub": ([0, 1, 2], 5000),
    "div": ([0, 1, 2], 5000),
    "lm": ([0, 1], 2000),
}
"""Task → (seeds, step budget). The accuracy tasks stop when every seed has reached 95%."""


def job_path(out: Path, task: str, method: str, fmt: str) -> Path:
    return out / f"{task}__{method}__{fmt}.json"


def parse_label(label: str) -> tuple[str, int]:
    """The format and the block size a label of a file or table names: ``int8_bN`` (``--block-size
    N``) is int8 in blocks of N; any other label is its format at the default 256."""
    fmt, _, block = label.partition("_b")
    return (fmt, int(block)) if fmt == "int8" and block else (label, 256)


def labels_in(out: Path, task: str, method: str) -> list[str]:
    """The formats with a result in ``out`` for ``task`` and ``method``: float32 and the formats
    in :data:`FORMATS` order, then any other int8 block sizes, smallest block last."""
    prefix = f"{task}__{method}__"
    found = {p.name[len(prefix):-len(".json")] for p in out.glob(f"{prefix}*.json")}
    extra = sorted((f for f in found if f not in FORMATS), key=lambda f: -parse_label(f)[1])
    return [f for f in FORMATS if f in found] + extra


def run_job(job: tuple[str, str, str, str, str, int | None, int | None]) -> str:
    task, method, label, device, out, cap, n_seeds = job
    fmt, block_size = parse_label(label)
    import torch

    from grokxform.experiments.sweep import environment, sweep

    torch.set_num_threads(2)
    seeds, steps = TASKS[task]
    seeds = seeds if n_seeds is None else list(range(n_seeds))
    steps = steps if cap is None else min(steps, cap)
    config = METHODS[method]
    t0 = time.perf_counter()
    res = sweep(method, {k: [v] for k, v in config.items()}, seeds=seeds, steps=steps, task=task, device=device,
                state_format=None if fmt == "float32" else fmt, state_block_size=block_size)
    payload = {**environment(torch.device(device)), **res.to_json(), "config": config, "format": label}
    path = job_path(Path(out), task, method, label)
    path.write_text(json.dumps(payload))
    return f"{path.name}: {res.steps} steps, {time.perf_counter() - t0:.0f} s, to 95%: {res.steps_to_target}"


def _spread(values: list[float]) -> str:
    return f"{statistics.median(values):g} [{min(values):g}–{max(values):g}]"


def summarize(out: Path) -> dict[str, Any]:
    """Per (task, method): float32's steps to 95% (or final validation loss) and each format's,
    with whether the format's median lies within float32's [min, max] (loss: within 1%)."""
    rows: list[dict[str, Any]] = []
    lines = ["| task | method | state | bytes/member | reached | steps to 95%: median [min–max] | vs float32 |",
             "|---|---|---|---:|---:|---|---|"]
    for task in TASKS:
        for method in METHODS:
            runs = {f: json.loads(job_path(out, task, method, f).read_text()) for f in labels_in(out, task, method)}
            if "float32" not in runs:
                continue
            base = runs["float32"]
            for fmt, r in runs.items():
                row: dict[str, Any] = {"task": task, "method": method, "format": fmt, "state_bytes": r["state_bytes"],
                                       "seeds": [m["seed"] for m in r["members"]], "device": r["device"]}
                if task == "lm":
                    loss, ref = r["val_loss"][-1], base["val_loss"][-1]
                    rel = [a / b - 1 for a, b in zip(loss, ref)]
                    row |= {"val_loss": loss, "relative_to_float32": rel, "within_1pct": all(abs(x) <= 0.01 for x in rel)}
                    shown = ", ".join(f"{x:.4f}" for x in loss)
                    verdict = "" if fmt == "float32" else ", ".join(f"{100 * x:+.2f}%" for x in rel)
                    lines.append(f"| {task} | {method} | {fmt} | {r['state_bytes']:,} | | val loss at"
                                 f" {r['steps']} steps: {shown} | {verdict} |")
                else:
                    steps = r["steps_to_target"]
                    got = [s for s in steps if s is not None]
                    lo = [s for s in base["steps_to_target"] if s is not None]
                    inside = bool(got) and len(got) == len(steps) and bool(lo) and min(lo) <= statistics.median(got) <= max(lo)
                    row |= {"steps_to_target": steps, "median": statistics.median(got) if got else None,
                            "float32_range": [min(lo), max(lo)] if lo else None, "median_within_float32_range": inside,
                            "seeds_within_float32_range": sum(1 for s in got if lo and min(lo) <= s <= max(lo))}
                    verdict = "" if fmt == "float32" else ("median within" if inside else "median outside") + (
                        f"; {row['seeds_within_float32_range']}/{len(steps)} seeds within")
                    lines.append(f"| {task} | {method} | {fmt} | {r['state_bytes']:,} | {len(got)}/{len(steps)} |"
                                 f" {_spread(got) if got else '—'} | {verdict} |")
                rows.append(row)
    (out / "summary.json").write_text(json.dumps(rows, indent=1))
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return {"rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--jobs", type=int, default=8, help="sweeps run side by side, each in its own process")
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated, of " + ", ".join(TASKS))
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated, of " + ", ".join(METHODS))
    ap.add_argument("--formats", default=",".join(FORMATS), help="comma-separated, of " + ", ".join(FORMATS))
    ap.add_argument("--steps", type=int, default=None, help="cap every budget (a smoke test)")
    ap.add_argument("--seeds", type=int, default=None,
                    help="run every task with seeds 0..N-1 instead of its own (write to another OUT)")
    ap.add_argument("--block-size", type=int, default=256,
                    help="the int8 format's block size (default 256; another runs only float32 and int8_bN)")
    ap.add_argument("--summarize", action="store_true", help="only write the summary of what OUT holds")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summarize:
        tasks, methods = args.tasks.split(","), args.methods.split(",")
        unknown = sorted(set(tasks) - set(TASKS))
        if unknown:
            ap.error(f"unknown task(s) {', '.join(unknown)}; choose from {', '.join(TASKS)}")
        unknown = sorted(set(methods) - set(METHODS))
        if unknown:
            ap.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
        formats = args.formats.split(",")
        unknown = sorted(set(formats) - set(FORMATS))
        if unknown:
            ap.error(f"unknown format(s) {', '.join(unknown)}; choose from {', '.join(FORMATS)}")
        if args.seeds is not None and args.seeds < 1:
            ap.error(f"--seeds must be >= 1, got {args.seeds}")
        if args.block_size < 1:
            ap.error(f"--block-size must be >= 1, got {args.block_size}")
        labels = formats if args.block_size == 256 else [
            f if f != "int8" else f"int8_b{args.block_size}" for f in formats if f in ("float32", "int8")]
        # by task (x·y, the one with 10 seeds, first), the MA window's first within a task
        jobs = sorted(((t, m, f, args.device, str(args.out), args.steps, args.seeds)
                       for t in tasks for m in methods for f in labels if not job_path(args.out, t, m, f).exists()),
                      key=lambda j: (list(TASKS).index(j[0]), j[1] != "grokfast_ma"))
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # (a time limit: the pool's workers end too)
        print(f"{len(jobs)} sweeps to run, {args.jobs} at a time", flush=True)
        with mp.get_context("spawn").Pool(args.jobs, maxtasksperchild=1) as pool:
            for line in pool.imap_unordered(run_job, jobs):
                print(line, flush=True)
    summarize(args.out)


if __name__ == "__main__":
    main()
