"""``grokxform demo``: Adam against Grokfast-EMA on the paper's modular task (``--full``: the four
optimizers of its comparison).

It trains the paper's modular-arithmetic decoder (x·y mod 97, 50 % of the equations; ``task``
picks another operation) with the optimizers of
:data:`~grokxform.experiments.optimizers.MODULAR_OPTIMIZERS`, each from the same seed (same init,
split and batch order), each stopped at 95 % validation accuracy or at the step budget. It prints
the steps and seconds each took to reach 95 %, and writes the train/val accuracy curves to a PNG
(needs matplotlib: ``pip install grokxform[demo]``; without it the plot is skipped).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import torch

from grokxform.experiments.modular import paper_setup, task_name
from grokxform.experiments.optimizers import MODULAR_OPTIMIZERS
from grokxform.experiments.train import EvalRecord, TrainResult, train

DEMO_RUNS = ("baseline", "grokfast_ema")
"""The runs of the default demo: the paper's Adam baseline and its Grokfast-EMA."""
DEMO_STEPS = 1200
"""Default step budget of each demo run: Grokfast-EMA reaches 95% in 960–970 steps with seed 0;
the baseline needs ~40k and is reported as not reached."""
FULL_STEPS = 1800
"""Step budget of each run of ``--full`` (all four; Grokfast-MA needs 1,650–1,690 steps)."""
DEMO_TARGET = 0.95
"""Validation accuracy that counts as generalised."""


class _PrintProgress:
    """A plain progress line every ~10 % of the budget, for when tqdm is not installed."""

    def __init__(self, name: str, total: int, stream: TextIO) -> None:
        self.name, self.total, self.stream = name, total, stream
        self.every = max(1, total // 10)
        self.next_at = self.every

    def update(self, record: EvalRecord) -> None:
        if record.step >= self.next_at or record.val_acc >= DEMO_TARGET:
            print(
                f"  [{self.name}] step {record.step:>6}/{self.total}  train acc {record.train_acc:.3f}"
                f"  val acc {record.val_acc:.3f}  {record.seconds:6.1f} s",
                file=self.stream,
                flush=True,
            )
            while self.next_at <= record.step:
                self.next_at += self.every

    def close(self) -> None:
        pass


class _TqdmProgress:
    """A tqdm bar over the step budget, with the last train and val accuracy."""

    def __init__(self, name: str, total: int, stream: TextIO) -> None:
        from tqdm import tqdm

        self.bar = tqdm(total=total, desc=f"{name:<13}", unit="step", file=stream, dynamic_ncols=True, leave=True)
        self.done = 0

    def update(self, record: EvalRecord) -> None:
        self.bar.update(record.step - self.done)
        self.done = record.step
        self.bar.set_postfix(train=f"{record.train_acc:.3f}", val=f"{record.val_acc:.3f}", refresh=False)

    def close(self) -> None:
        self.bar.close()


def _progress(name: str, total: int, stream: TextIO, use_tqdm: bool) -> _PrintProgress | _TqdmProgress:
    if use_tqdm:
        try:
            return _TqdmProgress(name, total, stream)
        except ImportError:
            pass
    return _PrintProgress(name, total, stream)


def format_table(results: dict[str, TrainResult], budget: int, target: float = DEMO_TARGET) -> str:
    """A plain-text table: per run, steps and seconds to ``target`` val accuracy (or "not
    reached in N steps"), the final val accuracy, and the mean wall time per step."""
    head = ("run", f"steps to {target:.0%} val acc", "seconds to it", "final val acc", "ms / step")
    rows = [head]
    for name, r in results.items():
        last = r.history[-1] if r.history else None
        if r.reached:
            steps, secs = str(r.steps_to_target), f"{r.seconds_to_target:.1f}"
        else:
            steps, secs = f"not reached in {budget} steps", "-"
        rows.append(
            (
                name,
                steps,
                secs,
                "-" if last is None else f"{last.val_acc:.3f}",
                "-" if r.steps == 0 else f"{1000 * r.seconds / r.steps:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_curves(results: dict[str, TrainResult], path: Path, title: str, target: float = DEMO_TARGET) -> bool:
    """Write train (dashed) and val (solid) accuracy against steps (log scale) to ``path``.

    Returns False, writing nothing, when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=True)
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, r) in enumerate(results.items()):
        c = r.curves()
        color = colors[i % len(colors)]
        ax.plot(c["step"], c["train_acc"], linestyle="--", color=color, alpha=0.7, label=f"{name} train")
        ax.plot(c["step"], c["val_acc"], linestyle="-", color=color, label=f"{name} val")
    ax.axhline(target, color="grey", linewidth=0.8, linestyle=":")
    ax.set_xscale("log")
    ax.set_xlabel("optimization steps")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0.0, 1.02)
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, ncol=2, loc="center left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return True


def run_demo(runs: Sequence[str], *, steps: int, seed: int, task: str, device: torch.device, out: Path,
             progress_bar: bool = True, threads_auto: bool = False) -> dict[str, TrainResult]:
    """Train each of ``runs`` (names of :data:`MODULAR_OPTIMIZERS`) from ``seed`` for at most
    ``steps`` steps, stopping at :data:`DEMO_TARGET`; print the table and write the curves to
    ``out``. Progress goes to stderr (a tqdm bar, or lines without ``progress_bar`` or tqdm);
    ``threads_auto`` only marks the thread count of the header as chosen by ``--threads auto``."""
    print(
        f"grokxform demo: {task_name(task)}, 50% train split, seed {seed}, device {device},"
        f" {torch.get_num_threads()} CPU thread(s){' (auto)' if threads_auto else ''},"
        f" budget {steps} steps per run,"
        f" stop at {DEMO_TARGET:.0%} val accuracy",
        flush=True,
    )
    results: dict[str, TrainResult] = {}
    start = time.perf_counter()
    for name in runs:
        setup = paper_setup(seed, device, task=task)
        bar = _progress(name, steps, sys.stderr, use_tqdm=progress_bar)
        try:
            results[name] = train(
                setup.model,
                MODULAR_OPTIMIZERS[name](),
                setup.data,
                steps=steps,
                generator=setup.generator,
                target_accuracy=DEMO_TARGET,
                stop_at_target=True,
                on_eval=bar.update,
            )
        finally:
            bar.close()
    total = time.perf_counter() - start
    print()
    print(format_table(results, steps))
    print(f"\ntotal wall time {total:.1f} s")
    title = f"{task_name(task)}, seed {seed}: train (dashed) and val (solid) accuracy"
    if plot_curves(results, out, title):
        print(f"curves written to {out}")
    else:
        print("matplotlib is not installed: no plot (pip install 'grokxform[demo]')")
    return results
