"""The Grokfast paper's two MNIST runs (``main_mnist.py``, its Omnigrok setup) as it describes them:
AdamW lr 1e-3, weight decay 0.01 (the baseline), and Grokfast-EMA α 0.8, λ 0.1 before AdamW with
weight decay 2.0 (:data:`~grokxform.experiments.optimizers.MNIST_OPTIMIZERS`); the MLP with every
parameter ×8, MSE on one-hot targets, batch 200, the first 1,000 training images; and
``baseline_wd2``, the baseline with the Grokfast run's weight decay (2.0) and no filter, which
separates the filter's share of the speed-up from the weight decay's. Per run and seed:
the validation accuracy every ``--eval-every`` epochs of 5 steps (default: every 500 steps), the steps to each accuracy of ``--marks``
and the wall time, in ``OUT/<run>__seed<k>.json``. The paper reports 44,022 steps (baseline) and
2,001 (Grokfast-EMA) to its accuracy mark: 22×.

    python benchmarks/mnist_paper.py --data-root .data/mnist --runs baseline --seeds 0,1,2 \\
        --steps 100000 --out benchmarks/results/mnist_paper
    python benchmarks/mnist_paper.py --data-root .data/mnist --runs grokfast_ema,baseline_wd2 --seeds 0,1,2 \\
        --steps 20000 --out benchmarks/results/mnist_paper
    python benchmarks/mnist_paper.py --summarize --out benchmarks/results/mnist_paper   # summary.md
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from grokxform import adamw
from grokxform.experiments.mnist import mnist_setup, mse_one_hot
from grokxform.experiments.optimizers import MNIST_OPTIMIZERS
from grokxform.experiments.sweep import environment
from grokxform.experiments.train import train

RUNS = {**MNIST_OPTIMIZERS, "baseline_wd2": lambda: adamw(lr=1e-3, weight_decay=2.0)}
"""The paper's two runs, and its baseline at the Grokfast run's weight decay."""


def run(name: str, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    model, data = mnist_setup(args.data_root, seed=seed)
    t0 = time.perf_counter()
    result = train(model, RUNS[name](), data, steps=args.steps, batch_size=200, loss_fn=mse_one_hot,
                   seed=seed, eval_every=args.eval_every, target_accuracy=max(args.marks))
    curves = result.curves()
    marks = {f"{m:g}": next((s for s, a in zip(curves["step"], curves["val_acc"]) if a >= m), None) for m in args.marks}
    return {**environment(torch.device("cpu")), "run": name, "seed": seed, "steps": result.steps,
            "eval_every_epochs": args.eval_every,
            "seconds": time.perf_counter() - t0, "threads": torch.get_num_threads(),
            "train_points": len(data[1]),
            "val_points": len(data[3]), "steps_to_mark": marks,
            "final_val_acc": curves["val_acc"][-1], "max_val_acc": max(curves["val_acc"]),
            "curves": {k: curves[k] for k in ("step", "train_acc", "val_acc", "train_loss", "val_loss")}}


def summarize(out: Path) -> str:
    """``out/summary.md``: per run, the steps to each mark over its seeds and the final accuracy."""
    docs = [json.loads(p.read_text()) for p in sorted(out.glob("*__seed*.json"))]
    marks = sorted({m for d in docs for m in d["steps_to_mark"]}, key=float)
    lines = ["| run | seeds | steps | " + " | ".join(f"steps to {float(m):.0%}" for m in marks) + " | final val acc |",
             "|---|---|---|" + "---|" * len(marks) + "---|"]
    for name in RUNS:
        mine = [d for d in docs if d["run"] == name]
        if not mine:
            continue
        cells = []
        for m in marks:
            got = [d["steps_to_mark"][m] for d in mine if d["steps_to_mark"][m] is not None]
            cells.append(f"{statistics.median(got):,.0f} [{min(got):,}–{max(got):,}] ({len(got)}/{len(mine)})" if got
                         else f"not reached (0/{len(mine)})")
        finals = [d["final_val_acc"] for d in mine]
        lines.append(f"| {name} | {', '.join(str(d['seed']) for d in mine)} | {mine[0]['steps']:,} | "
                     + " | ".join(cells) + f" | {min(finals):.3f}–{max(finals):.3f} |")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data-root", help="the MNIST files, or the npm package mnist")
    ap.add_argument("--runs", default="baseline,grokfast_ema", help=f"comma list of {', '.join(RUNS)}")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--steps", type=int, default=100_000)
    ap.add_argument("--eval-every", type=int, default=100, help="epochs (5 steps each) between evaluations")
    ap.add_argument("--marks", default="0.8,0.85,0.9", help="validation accuracies to count steps to")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--summarize", action="store_true", help="only write OUT/summary.md from the JSON there")
    args = ap.parse_args()
    if args.summarize:
        if not any(args.out.glob("*__seed*.json")):
            ap.error(f"--summarize: no run JSON (<run>__seed<k>.json) in {args.out}")
        print(summarize(args.out), end="")
        return
    if args.data_root is None:
        ap.error("--data-root is required to train")
    args.marks = [float(m) for m in args.marks.split(",")]
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.runs.split(","):
        if name not in RUNS:
            ap.error(f"--runs: unknown run {name!r}; choose from {', '.join(RUNS)}")
        for seed in (int(s) for s in args.seeds.split(",")):
            doc = run(name, seed, args)
            (args.out / f"{name}__seed{seed}.json").write_text(json.dumps(doc, indent=1))
            print(f"{name} seed {seed}: steps to {doc['steps_to_mark']}, final val acc {doc['final_val_acc']:.4f},"
                  f" {doc['seconds']:.0f} s", flush=True)


if __name__ == "__main__":
    main()
