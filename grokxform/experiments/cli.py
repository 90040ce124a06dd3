"""The ``grokxform`` command line: ``grokxform demo`` (more subcommands plug in the same way).

``grokxform demo`` trains the paper's modular-arithmetic decoder (x·y mod 97, 50 % of the
equations; ``--task`` picks another operation) with the four optimizers of
:data:`~grokxform.experiments.optimizers.MODULAR_OPTIMIZERS`, each from the same seed (same
init, split and batch order), each stopped at 95 % validation accuracy or at ``--steps``. It
prints the steps and seconds each took to reach 95 %, and writes the train/val accuracy curves
to a PNG (needs matplotlib: ``pip install grokxform[demo]``; without it the plot is skipped).

Every subcommand is a :class:`Command` in :data:`COMMANDS`: ``register`` adds its arguments to
an ``argparse`` sub-parser, ``run(args)`` returns the exit status.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple, TextIO

import torch

from grokxform.experiments.modular import TASKS, paper_setup, task_name
from grokxform.experiments.optimizers import MODULAR_OPTIMIZERS
from grokxform.experiments.train import EvalRecord, TrainResult, train

DEMO_STEPS = 1800
"""Default step budget of each demo run (the baseline needs ~40k and is reported as not reached)."""
DEMO_TARGET = 0.95
"""Validation accuracy that counts as generalised."""


# --------------------------------------------------------------------------- progress


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


# --------------------------------------------------------------------------- report


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


# --------------------------------------------------------------------------- demo


def _run_names(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODULAR_OPTIMIZERS]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"--runs: unknown run(s) {unknown or [text]}; choose from {', '.join(MODULAR_OPTIMIZERS)}"
        )
    if len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"--runs: a run is named twice in {text!r}")
    return names


def _int_at_least(low: int, what: str) -> Callable[[str], int]:
    """An argparse type: an integer >= ``low``, refused as ``expected {what}, got ...``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_seed = _int_at_least(0, "a seed (an integer >= 0)")


def seeds_arg(text: str) -> list[int]:
    parts = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated seeds such as 0,1,2, got {text!r}")
    seeds = [_seed(t) for t in parts]
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"a seed is named twice in {text!r}")
    return seeds


def _check_writable(folder: Path) -> None:
    """Create ``folder`` (and its parents) and write and remove a temporary file in it, so that a
    run cannot fail only at its end, on writing its results; ``argparse.ArgumentTypeError`` naming
    the folder when that fails."""
    try:
        existing = next(p for p in (folder, *folder.parents) if p.exists())
        if not existing.is_dir():
            raise argparse.ArgumentTypeError(f"cannot write in {folder}: {existing} is a file, not a folder")
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise argparse.ArgumentTypeError(
            f"cannot write in the folder {folder}: {err.strerror or err}; name a folder you can write to"
        ) from None


def output_folder(text: str) -> Path:
    """An argparse type: a folder the run writes its files in, created now and checked writable."""
    folder = Path(text)
    _check_writable(folder)
    return folder


def output_path(default_name: str) -> Callable[[str], Path]:
    """An argparse type: the path of an output (a file, or a prefix of files), or ``default_name``
    inside the text when it names an existing folder or ends with a path separator. Its folder is
    created now and checked writable."""

    def parse(text: str) -> Path:
        path = Path(text)
        if text.endswith((os.sep, os.altsep or os.sep)) or path.is_dir():
            path = path / default_name
        _check_writable(path.parent)
        return path

    return parse


def _threads(text: str) -> int | str:
    return "auto" if text == "auto" else _positive_int(text)


def auto_threads() -> int:
    """torch's default thread count, or 1 when the 1-minute load average says at least one other
    job is already running.

    torch's OpenMP threads spin at every barrier; when they share cores with other busy
    processes, each of the many small ops of this model waits for a descheduled partner. On
    the 2-core machine of ``docs/experiments.md`` a training step took 37 ms with 2 threads on an
    idle CPU, 70 ms with 1 thread, and 0.9-2.9 s with 2 threads beside other jobs (1 thread:
    0.07-0.36 s).
    """
    default = torch.get_num_threads()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # not on this platform
        return default
    return 1 if default > 1 and load >= 1.0 else default


def _register_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--steps", type=_positive_int, default=DEMO_STEPS, help=f"step budget of each run (default {DEMO_STEPS})"
    )
    parser.add_argument("--seed", type=_seed, default=0, help="seed of the init, split and batch order (default 0)")
    _add_task(parser)
    parser.add_argument(
        "--out", type=output_path("grokxform_demo.png"), default="grokxform_demo.png",
        help="PNG of the curves, or a folder to write grokxform_demo.png in (default ./grokxform_demo.png)",
    )
    parser.add_argument("--device", default="cpu", help="torch device (default cpu)")
    parser.add_argument(
        "--runs",
        type=_run_names,
        default=list(MODULAR_OPTIMIZERS),
        help=f"comma-separated runs to train (default all: {','.join(MODULAR_OPTIMIZERS)})",
    )
    _add_threads_and_progress(parser)


def _add_task(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="mul", choices=TASKS,
                        help="the operation x∘y mod 97: mul (the paper's, default), add, sub or div")


def _add_threads_and_progress(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=_threads,
        default="auto",
        help="CPU threads for torch; 'auto' (default): torch's own choice (one per core), or 1 when"
        " the CPU is already busy with other jobs",
    )
    parser.add_argument(
        "--no-progress-bar", action="store_true", help="print progress lines instead of a tqdm bar"
    )


def _set_threads(device: torch.device, threads: int | str) -> int:
    """Set torch's CPU threads for a run on ``device``; returns the count to restore afterwards."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(auto_threads() if threads == "auto" else int(threads))
    return before


def _run_demo(args: argparse.Namespace) -> int:
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        print(f"grokxform demo: device {args.device!r} is not usable: {err}", file=sys.stderr)
        return 2
    threads_before = _set_threads(device, args.threads)
    try:
        return _demo(args, device)
    finally:
        torch.set_num_threads(threads_before)


def _demo(args: argparse.Namespace, device: torch.device) -> int:
    out, err = sys.stdout, sys.stderr
    print(
        f"grokxform demo: {task_name(args.task)}, 50% train split, seed {args.seed}, device {device},"
        f" {torch.get_num_threads()} CPU thread(s){' (auto)' if args.threads == 'auto' else ''},"
        f" budget {args.steps} steps per run,"
        f" stop at {DEMO_TARGET:.0%} val accuracy",
        file=out,
        flush=True,
    )
    results: dict[str, TrainResult] = {}
    start = time.perf_counter()
    for name in args.runs:
        setup = paper_setup(args.seed, device, task=args.task)
        bar = _progress(name, args.steps, err, use_tqdm=not args.no_progress_bar)
        try:
            results[name] = train(
                setup.model,
                MODULAR_OPTIMIZERS[name](),
                setup.data,
                steps=args.steps,
                generator=setup.generator,
                target_accuracy=DEMO_TARGET,
                stop_at_target=True,
                on_eval=bar.update,
            )
        finally:
            bar.close()
    total = time.perf_counter() - start
    print(file=out)
    print(format_table(results, args.steps), file=out)
    print(f"\ntotal wall time {total:.1f} s", file=out)
    title = f"{task_name(args.task)}, seed {args.seed}: train (dashed) and val (solid) accuracy"
    if plot_curves(results, args.out, title):
        print(f"curves written to {args.out}", file=out)
    else:
        print("matplotlib is not installed: no plot (pip install 'grokxform[demo]')", file=out)
    return 0


# --------------------------------------------------------------------------- sweep

SWEEP_AXES = {
    "alpha": "alpha",
    "lamb": "lamb",
    "weight_decay": "weight_decay",
    "b1": "b1",
    "alpha_init": "alpha_init",
    "kappa": "grokking_signal_decay_rate",
    "clip": "clip",
}
"""Sweep option (``--weight-decay``) → the pipeline's hyperparameter it sets."""


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


def _register_sweep(parser: argparse.ArgumentParser) -> None:
    from grokxform.experiments.sweep import SWEEP_FACTORIES

    parser.add_argument("--pipeline", default="grokfast_ema", choices=sorted(SWEEP_FACTORIES),
                        help="what every member trains with (default grokfast_ema, the paper's settings)")
    helps = {"kappa": "grokadamw's grokking_signal_decay_rate κ (0: α fixed)", "clip": "grokadamw's global-norm clip (0: off)"}
    for axis in SWEEP_AXES:
        parser.add_argument(f"--{axis.replace('_', '-')}", type=_floats, default=None,
                            help=f"comma-separated values of {helps.get(axis, axis)} to sweep")
    parser.add_argument("--gamma", type=float, default=None,
                        help="grokadamw's β1 decay with depth γ, fixed for all members (default 0.1)")
    parser.add_argument("--seeds", type=seeds_arg, default=[0, 1], help="comma-separated seeds (default 0,1)")
    parser.add_argument("--steps", type=_positive_int, default=3000, help="step budget (default 3000)")
    _add_task(parser)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="torch.compile the vmapped step")
    parser.add_argument("--out", type=output_path("grokxform_sweep"), default="grokxform_sweep",
                        help="prefix of the outputs: PREFIX.json and PREFIX.png, or a folder to write"
                             " grokxform_sweep.json and .png in (default ./grokxform_sweep)")
    _add_threads_and_progress(parser)


def _cell_label(value: float, reached: int, of: int, budget: int) -> str:
    if reached == 0:
        return f"none in\n{budget}\n(0/{of})"
    return f"{value:.0f}\n({reached}/{of})"


def plot_heatmap(members: list[dict[str, float]], steps: list[int | None], budget: int, path: Path,
                 title: str) -> bool:
    """Write :func:`heatmap_figure` to ``path``; False, writing nothing, when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig = heatmap_figure(members, steps, budget, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def heatmap_figure(members: list[dict[str, float]], steps: list[int | None], budget: int, title: str) -> Any:
    """Median steps to the target of each configuration (over the seeds that reached it; the
    count reached/seeds in each cell), as a matplotlib figure. The first swept axis runs along x,
    the others together along y, so every configuration has a cell named on the axes. A cell no
    seed brought to the target is hatched grey and reads "none in <budget>"; text is dark or
    light to suit its cell."""
    import textwrap

    import matplotlib.pyplot as plt

    names = [k for k in members[0] if k != "seed"]
    xk, yks = names[0], names[1:]
    xs = sorted({m[xk] for m in members})
    ys = sorted({tuple(m[k] for k in yks) for m in members})
    cells = [[float("nan")] * len(xs) for _ in ys]
    counts = [[(0, 0)] * len(xs) for _ in ys]
    for j, yv in enumerate(ys):
        for i, xv in enumerate(xs):
            mine = [s for m, s in zip(members, steps) if m[xk] == xv and tuple(m[k] for k in yks) == yv]
            got = sorted(s for s in mine if s is not None)
            counts[j][i] = (len(got), len(mine))
            if got:
                cells[j][i] = float(got[len(got) // 2])
    fig, ax = plt.subplots(figsize=(1.3 * len(xs) + 3.2, 0.75 * len(ys) + 2.2))
    ax.set_facecolor("0.88")
    cmap = plt.get_cmap("viridis_r")
    im = ax.imshow(cells, cmap=cmap, vmin=0, vmax=budget, aspect="auto")
    for j in range(len(ys)):
        for i in range(len(xs)):
            v, (reached, of) = cells[j][i], counts[j][i]
            if of == 0:
                continue
            if reached == 0:
                ax.add_patch(plt.Rectangle((i - 0.5, j - 0.5), 1, 1, facecolor="0.88", hatch="//", edgecolor="0.7"))
                color = "k"
            else:
                r, g, b, _ = cmap(v / budget)
                color = "k" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "w"
            ax.text(i, j, _cell_label(v, reached, of, budget), ha="center", va="center", color=color, fontsize=8)
    ax.set_xticks(range(len(xs)), [f"{xk}={x:g}" for x in xs])
    ax.set_yticks(range(len(ys)), [", ".join(f"{k}={v:g}" for k, v in zip(yks, y)) or "-" for y in ys])
    ax.set_xlabel(xk)
    ax.set_ylabel(", ".join(yks))
    ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=9)
    fig.colorbar(im, ax=ax, label="median steps to target (seeds that reached it)")
    fig.tight_layout()
    return fig


class _SweepProgress:
    """A tqdm bar over the step budget (or a line every ~10 %), with the best val accuracy and
    how many members are at the target."""

    def __init__(self, total: int, stream: TextIO, use_tqdm: bool) -> None:
        self.total, self.stream, self.done, self.use_tqdm = total, stream, 0, use_tqdm
        self.bar: Any = None
        self.every = max(1, total // 10)
        self.next_at = self.every

    def update(self, step: int, accs: list[float]) -> None:
        at = sum(a >= DEMO_TARGET for a in accs)
        if self.use_tqdm and self.bar is None:  # opened at the first evaluation: errors come first, alone
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=self.total, desc="sweep", unit="step", file=self.stream, dynamic_ncols=True)
            except ImportError:
                self.use_tqdm = False
        if self.bar is not None:
            self.bar.update(step - self.done)
            self.bar.set_postfix(best_val=f"{max(accs):.3f}", at_target=f"{at}/{len(accs)}", refresh=False)
        elif step >= self.next_at or step >= self.total:
            print(f"  step {step:>6}/{self.total}: val acc max {max(accs):.3f}, {at}/{len(accs)} at target",
                  file=self.stream, flush=True)
            while self.next_at <= step:
                self.next_at += self.every
        self.done = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run_sweep(args: argparse.Namespace) -> int:
    import json

    from grokxform.experiments.sweep import sweep

    grid = {SWEEP_AXES[axis]: getattr(args, axis) for axis in SWEEP_AXES if getattr(args, axis) is not None}
    static = {} if args.gamma is None else {"gamma": args.gamma}
    try:
        device = torch.device(args.device)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        print(f"grokxform sweep: device {args.device!r} is not usable: {err}", file=sys.stderr)
        return 2
    seeds = args.seeds
    n = len(seeds)
    for values in grid.values():
        n *= len(values)
    threads_before = _set_threads(device, args.threads)
    print(f"grokxform sweep: {args.pipeline} on {task_name(args.task)}, {n} members"
          f" ({' x '.join(f'{k} {v}' for k, v in grid.items())} x seeds {seeds}) as one vmapped program on {device}"
          f" ({torch.get_num_threads()} CPU thread(s)), budget {args.steps} steps", flush=True)
    bar = _SweepProgress(args.steps, sys.stderr, use_tqdm=not args.no_progress_bar)
    try:
        result = sweep(args.pipeline, grid, seeds=seeds, steps=args.steps, device=device, task=args.task,
                       static=static, compile=args.compile, on_eval=bar.update)
    except ValueError as err:
        print(f"grokxform sweep: {err}", file=sys.stderr)
        return 2
    finally:
        bar.close()
        torch.set_num_threads(threads_before)
    print(result.table())
    print(f"{result.member_steps_per_second:.1f} member-steps/s over {result.steps} steps, {result.seconds:.1f} s")
    payload = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               **result.to_json()}
    Path(f"{args.out}.json").write_text(json.dumps(payload, indent=1))
    title = f"{args.pipeline} on {task_name(args.task)}: median steps to {DEMO_TARGET:.0%} val acc, seeds {seeds}"
    if len(result.members[0]) >= 2 and plot_heatmap(result.members, result.steps_to_target, result.steps,
                                                     Path(f"{args.out}.png"), title):
        print(f"heatmap written to {args.out}.png, results to {args.out}.json")
    else:
        print(f"results written to {args.out}.json (no heatmap: matplotlib missing or nothing swept)")
    return 0


# --------------------------------------------------------------------------- entry point

class Command(NamedTuple):
    """A subcommand: ``register`` adds its arguments to its sub-parser, ``run(args)`` returns the
    exit status."""

    name: str
    help: str
    register: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]


COMMANDS: list[Command] = [
    Command(
        "demo",
        "train baseline / Grokfast-EMA / Grokfast-MA / GrokAdamW on x*y mod 97 and compare",
        _register_demo,
        _run_demo,
    ),
    Command(
        "sweep",
        "train a hyperparameter grid x seeds of the modular task as one vmapped program; heatmap of steps to 95%",
        _register_sweep,
        _run_sweep,
    ),
]
"""The subcommands; a new one (``sweep``...) is added by appending a :class:`Command` here."""


def build_parser() -> argparse.ArgumentParser:
    """The ``grokxform`` parser with one sub-parser per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(prog="grokxform", description="grokxform experiments")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for cmd in COMMANDS:
        # argparse %-formats help strings: a literal % ("95%") must be doubled.
        p = sub.add_parser(cmd.name, help=cmd.help.replace("%", "%%"), description=cmd.help)
        cmd.register(p)
        p.set_defaults(_run=cmd.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the chosen subcommand; returns its exit status."""
    args: Any = build_parser().parse_args(argv)
    return int(args._run(args))


if __name__ == "__main__":
    sys.exit(main())
