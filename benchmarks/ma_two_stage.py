"""The Grokfast paper's Table 1 Grokfast-MA runs on x·y mod 97, from the start and in two stages.

Grokfast-MA (w 100, λ 5) without weight decay, from the first step (the paper: 2,940 iterations to
95% validation accuracy) and in two stages (its ``main.py --two_stage``: the window fills from the
first step but amplifies nothing for the first 500 updates; the paper: 1,920). The paper's model,
split, Adam β = (0.9, 0.98) and learning-rate warm-up
(:func:`~grokxform.experiments.modular.paper_setup`, the reproduction's training loop); the second
stage is a schedule of λ through ``gx.inject_hyperparams``: 0 for the first 500 updates, then 5. Per
run and seed the steps (evaluated every epoch of 10 steps) and seconds to 95% in
``OUT/<run>__seed<k>.json``.

    python benchmarks/ma_two_stage.py --seeds 0,1,2,3,4 --out benchmarks/results/ma_two_stage
    python benchmarks/ma_two_stage.py --summarize --out benchmarks/results/ma_two_stage   # summary.md
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

import grokxform as gx
from grokxform.experiments.modular import paper_setup
from grokxform.experiments.optimizers import PAPER_BETAS
from grokxform.experiments.sweep import environment
from grokxform.experiments.train import train
from grokxform.transforms.schedules import linear_warmup

FIRST_STAGE = 500
"""Updates before the filter amplifies, in the two-stage run (``main.py``: ``trigger = i < 500``)."""
LAMB = 5.0


def second_stage(count: torch.Tensor) -> torch.Tensor:
    """λ at step count ``count`` (0 at the first update): 0 for :data:`FIRST_STAGE` updates, then 5."""
    return (count >= FIRST_STAGE).to(torch.float64) * LAMB


def _grokfast_ma(lamb: Any) -> gx.GradientTransformation:
    return gx.inject_hyperparams(gx.grokfast_ma)(lr=linear_warmup(1e-3, 10), window_size=100, lamb=lamb,
                                                 betas=PAPER_BETAS, weight_decay=0.0)


RUNS: dict[str, Callable[[], gx.GradientTransformation]] = {
    "grokfast_ma_wd0": lambda: _grokfast_ma(LAMB),
    "grokfast_ma_two_stage": lambda: _grokfast_ma(second_stage),
}
PAPER = {"grokfast_ma_wd0": 2940, "grokfast_ma_two_stage": 1920}
"""The paper's iterations to 95% validation accuracy (Table 1)."""


def run(name: str, seed: int, steps: int) -> dict[str, Any]:
    setup = paper_setup(seed)
    result = train(setup.model, RUNS[name](), setup.data, steps=steps, generator=setup.generator,
                   stop_at_target=True)
    curves = result.curves()
    return {**environment(torch.device("cpu")), "run": name, "seed": seed, "threads": torch.get_num_threads(),
            "steps_to_95": result.steps_to_target, "seconds_to_95": result.seconds_to_target,
            "steps": result.steps, "seconds": result.seconds, "paper_steps_to_95": PAPER[name],
            "curves": {k: curves[k] for k in ("step", "train_acc", "val_acc", "train_loss", "val_loss")}}


def summarize(out: Path) -> str:
    """``out/summary.md``: per run, the steps to 95% over its seeds beside the paper's."""
    docs = [json.loads(p.read_text()) for p in sorted(out.glob("*__seed*.json"))]
    lines = ["| run | seeds | steps to 95%, median [min–max] (reached/seeds) | per seed | paper |",
             "|---|---|---|---|---|"]
    for name in RUNS:
        mine = sorted((d for d in docs if d["run"] == name), key=lambda d: d["seed"])
        if not mine:
            continue
        got = [d["steps_to_95"] for d in mine if d["steps_to_95"] is not None]
        cell = (f"{statistics.median(got):,.0f} [{min(got):,}–{max(got):,}] ({len(got)}/{len(mine)})" if got
                else f"not reached in {mine[0]['steps']:,} (0/{len(mine)})")
        per_seed = ", ".join("—" if d["steps_to_95"] is None else f"{d['steps_to_95']:,}" for d in mine)
        lines.append(f"| {name} | {','.join(str(d['seed']) for d in mine)} | {cell} | {per_seed} |"
                     f" {PAPER[name]:,} |")
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default=",".join(RUNS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=10_000, help="the budget of each run (it stops at 95%%)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--summarize", action="store_true", help="only write OUT/summary.md from OUT's JSON")
    args = ap.parse_args()
    if args.summarize:
        if not list(args.out.glob("*__seed*.json")):
            ap.error(f"{args.out} holds no run JSON (<run>__seed<k>.json)")
        print(summarize(args.out), end="")
        return
    names = args.runs.split(",")
    unknown = sorted(set(names) - set(RUNS))
    if unknown:
        ap.error(f"unknown runs {unknown}; choose from {sorted(RUNS)}")
    args.out.mkdir(parents=True, exist_ok=True)
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in names:
            doc = run(name, seed, args.steps)
            (args.out / f"{name}__seed{seed}.json").write_text(json.dumps(doc))
            print(name, seed, doc["steps_to_95"], f"{doc['seconds']:.0f} s", flush=True)
    print(summarize(args.out), end="")


if __name__ == "__main__":
    main()
