"""The comparison of grokking accelerators with the same tuning budget per method
(``grokxform compare``, :func:`run_compare`).

For every method × task of the lists given, in two vmapped sweeps (:func:`~grokxform.experiments.sweep.sweep`):

1. the method's default grid (:data:`~grokxform.experiments.methods.METHODS`: 12 configurations
   each) over ``grid_seeds``, at the task's step budget; on an accuracy task it stops as soon as
   the best configuration is known (:func:`ranking_decided`);
2. the best configuration rerun over ``seeds`` (five or more): on an accuracy task the one whose
   seeds reached the target most often, then in the fewest median steps, then with the highest
   median validation accuracy where the grid stopped; on the language model the lowest median
   validation loss at the budget. The rerun stops when every seed has reached the target.

Each pair writes ``OUT/<method>__<task>.json`` (the environment, both sweeps' members and results,
the chosen configuration, the rerun's steps and seconds to the target per seed, final validation
accuracy and loss, the state's bytes per member and the curves); a pair whose file exists is
skipped, so an interrupted run resumes where it stopped. The grid's outcome is kept in
``OUT/<method>__<task>.grid.json`` until its pair is written: a pair interrupted during its rerun
resumes there, without training its grid again. Then ``OUT/summary.md`` tabulates every
pair found in ``OUT`` and ``OUT/<task>.png`` draws each task's methods side by side.

Example::

    grokxform compare --methods adamw,grokfast_ema,lion --tasks mul,parity --out results/compare --device cuda
    grokxform compare --methods adam,lion --tasks mul,lm --out /tmp/smoke --small    # a few steps of everything
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from grokxform.experiments.lm import CONTEXT
from grokxform.experiments.methods import METHODS, get_method, grid_size
from grokxform.experiments.sweep import SweepResult, environment, grid_members, median_and_spread, sweep
from grokxform.experiments.tasks import TASKS, get_task

SMALL_STEPS = 2
"""The step budget of each sweep with ``small=True`` (a smoke test of every stage)."""
SMALL_BATCH = 4
"""The batch size of every task with ``small=True``."""
SMALL_VAL_POINTS = 16
"""The validation rows of every task with ``small=True``."""

OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000", "#999999")
"""Okabe and Ito's colour-blind-safe palette, one colour per method in :data:`METHODS` order."""


def result_path(out: Path, method: str, task: str) -> Path:
    """Where the pair's JSON goes: ``out/<method>__<task>.json``."""
    return out / f"{method}__{task}.json"


def grid_path(out: Path, method: str, task: str) -> Path:
    """Where a pair's grid outcome waits for its rerun: ``out/<method>__<task>.grid.json``."""
    return out / f"{method}__{task}.grid.json"


def _config_key(member: dict[str, float]) -> tuple[tuple[str, float], ...]:
    return tuple((k, v) for k, v in member.items() if k != "seed")


def config_table(res: SweepResult) -> list[dict[str, Any]]:
    """One row per configuration of a sweep: the configuration, steps to the target over its seeds
    (:func:`~grokxform.experiments.sweep.median_and_spread`), and the medians of the final
    validation accuracy and loss."""
    rows: dict[tuple, dict[str, Any]] = {}
    for i, m in enumerate(res.members):
        row = rows.setdefault(_config_key(m), {"config": dict(_config_key(m)), "steps": [], "acc": [], "loss": []})
        row["steps"].append(res.steps_to_target[i])
        row["acc"].append(res.val_acc[-1][i])
        row["loss"].append(res.val_loss[-1][i])
    return [{"config": r["config"], **median_and_spread(r["steps"]), "final_val_acc": _median(r["acc"]),
             "final_val_loss": _median(r["loss"])} for r in rows.values()]


def _median(values: Sequence[float]) -> float:
    got = sorted(float(v) for v in values)
    mid = len(got) // 2
    return got[mid] if len(got) % 2 else 0.5 * (got[mid - 1] + got[mid])


def ranking_decided(members: Sequence[dict[str, float]]) -> Callable[[list[int | None], int], bool]:
    """A ``stop_when`` for :func:`~grokxform.experiments.sweep.sweep` over ``members`` (a grid ×
    seeds) that stops once :func:`best_config` can no longer change: some configuration has reached
    the target on every seed, and every configuration still short of it on some seed would have a
    larger median even if those seeds reached it at the next evaluation. A configuration that
    reaches the target on all its seeds outranks one that does not, so the choice is the one the
    whole budget would make, except that a tie in median steps is broken by the accuracy where
    the grid stopped rather than at the budget."""
    configs: dict[tuple, list[int]] = {}
    for i, m in enumerate(members):
        configs.setdefault(_config_key(m), []).append(i)

    def decided(steps_to_target: list[int | None], step: int) -> bool:
        complete, pending = [], []
        for idx in configs.values():
            got = [steps_to_target[i] for i in idx]
            if all(s is not None for s in got):
                complete.append(_median(got))
            else:  # the soonest its other seeds can reach the target: after this step
                pending.append(_median([step + 1 if s is None else s for s in got]))
        return bool(complete) and all(low > min(complete) for low in pending)

    return decided


def best_config(table: list[dict[str, Any]], metric: str) -> dict[str, Any]:
    """The row of ``table`` (:func:`config_table`) that the comparison reruns: see the module's
    docstring. A NaN loss (a diverged configuration) ranks last."""
    if metric == "loss":
        return min(table, key=lambda r: (r["final_val_loss"] != r["final_val_loss"], r["final_val_loss"]))
    return min(table, key=lambda r: (-r["reached"], float("inf") if r["median"] is None else r["median"],
                                     -r["final_val_acc"]))


CURVE_POINTS = 250
"""The most evaluations of a curve a pair's JSON keeps (evenly spaced, the last one included)."""


def thin_curves(result: dict[str, Any], points: int = CURVE_POINTS) -> dict[str, Any]:
    """``result`` (a sweep's JSON, or a pair's) with its per-evaluation curves (``eval_steps`` and
    the ``val_acc`` / ``val_loss`` / ``train_acc`` rows beside it) cut to at most ``points``
    evaluations, evenly spaced and the last kept, their values rounded to 5 significant digits:
    the figures and the steps to the target are read elsewhere, and a 10,000-step grid would
    otherwise write megabytes."""
    steps = result.get("eval_steps") or []
    if len(steps) <= points:
        keep = list(range(len(steps)))
    else:
        stride = -(-len(steps) // points)
        keep = sorted({*range(len(steps) - 1, -1, -stride)})
    out = dict(result, eval_steps=[steps[i] for i in keep])
    for name in ("val_acc", "val_loss", "train_acc"):
        if name in result and result[name] is not None and len(result[name]) == len(steps):
            out[name] = [[float(f"{v:.5g}") for v in result[name][i]] for i in keep]
    return out


def _grid_key(method: str, task: str, steps: int, grid: dict[str, list[float]], grid_seeds: Sequence[int],
              small: bool) -> dict[str, Any]:
    """What a kept grid outcome must match to stand for the grid sweep a pair would train now."""
    return {"method": method, "task": task, "steps_budget": steps, "grid": grid, "grid_seeds": list(grid_seeds),
            "small": small}


def _kept_grid(path: Path | None, key: dict[str, Any]) -> dict[str, Any] | None:
    """The grid outcome kept at ``path`` when it was trained for ``key``; otherwise ``None``."""
    if path is None or not path.is_file():
        return None
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return kept if isinstance(kept, dict) and kept.get("key") == json.loads(json.dumps(key)) else None


def compare_pair(method: str, task: str, *, steps: int, grid_seeds: Sequence[int], seeds: Sequence[int],
                 device: torch.device, data_root: str | None = None, compile: bool = False, small: bool = False,
                 grid_file: Path | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The two sweeps of one (method, task) pair; returns the payload of its JSON. ``small``:
    batches of :data:`SMALL_BATCH` rows, :data:`SMALL_VAL_POINTS` validation rows. ``grid_file``:
    where the grid's outcome is kept once trained (written whole, or not at all), and read instead
    of training the grid again when it holds the same grid of the same method, task, budget, seeds
    and size; the payload then says so (``grid_resumed``, and the environment that trained it)."""
    t = get_task(task)
    grid = {k: list(v) for k, v in get_method(method).grid.items()}
    shrink: dict[str, Any] = {"batch_size": SMALL_BATCH, "val_points": SMALL_VAL_POINTS} if small else {}
    batch = SMALL_BATCH if small else t.batch_size
    key = _grid_key(method, task, steps, grid, grid_seeds, small)
    kept = _kept_grid(grid_file, key)
    if kept is None:
        log(f"[{method} / {task}] grid: {grid_size(method)} configurations x seeds {list(grid_seeds)}, {steps} steps")
        tried = grid_members(grid, grid_seeds)
        first = sweep(method, {}, members=tried, steps=steps, task=task, device=device, data_root=data_root,
                      compile=compile, stop_when=ranking_decided(tried), **shrink)
        table = config_table(first)
        kept = {"key": key, "environment": environment(device), "grid_steps": first.steps, "grid_table": table,
                "best": best_config(table, t.metric)["config"],
                "grid_result": thin_curves({k: v for k, v in first.to_json().items() if k not in ("train_acc",)})}
        if grid_file is not None:
            _write_whole(grid_file, kept)
        resumed = False
    else:
        log(f"[{method} / {task}] grid kept in {grid_file}")
        resumed = True
    best = kept["best"]
    log(f"[{method} / {task}] best {best} (grid stopped at step {kept['grid_steps']}):"
        f" rerun over seeds {list(seeds)}")
    members = [{**best, "seed": int(s)} for s in seeds]
    final = sweep(method, {}, members=members, steps=steps, task=task, device=device, data_root=data_root,
                  compile=compile, **shrink)
    raw = final.to_json()
    return {
        "method": method, "task": task, "title": get_method(method).title, "task_title": t.title, "metric": t.metric,
        "target": t.target, **environment(device), "steps_budget": steps, "grid": grid, "grid_seeds": list(grid_seeds),
        "seeds": list(seeds), "static": raw["static"], "grid_steps": kept["grid_steps"],
        "grid_table": kept["grid_table"], "best": best, "grid_result": kept["grid_result"],
        "grid_resumed": resumed, **({"grid_environment": kept["environment"]} if resumed else {}),
        "steps_to_target": final.steps_to_target, "seconds_to_target": final.seconds_to_target,
        "summary": median_and_spread(final.steps_to_target),
        "final_val_acc": final.val_acc[-1], "final_val_loss": final.val_loss[-1],
        "state_bytes": final.state_bytes, "seconds": final.seconds,
        "member_steps_per_second": final.member_steps_per_second,
        **thin_curves({"eval_steps": final.eval_steps, "val_acc": final.val_acc, "val_loss": final.val_loss}),
        "batch_size": batch, "small": small, "tokens_budget": steps * batch * CONTEXT if task == "lm" else None,
    }


class PairsFailed(RuntimeError):
    """Raised by :func:`run_compare` after every other pair ran: which pairs failed, and why."""


def run_compare(methods: Sequence[str], tasks: Sequence[str], out: Path, *, device: torch.device,
                grid_seeds: Sequence[int] = (0, 1), seeds: Sequence[int] = (0, 1, 2, 3, 4), steps: int | None = None,
                small: bool = False, data_root: str | None = None, compile: bool = False, jobs: int = 1,
                log: Callable[[str], None] = print) -> list[str]:
    """Every pair of ``methods`` × ``tasks`` not yet in ``out`` (:func:`compare_pair`), then the
    summary and figures of all the pairs in ``out``; returns the summary's lines. ``steps``: the
    budget of every task (default: each task's own, :data:`~grokxform.experiments.tasks.TASKS`);
    ``small``: :data:`SMALL_STEPS` steps of small batches (:func:`compare_pair`); ``jobs``: pairs
    trained side by side, each pair in a process of its own (one GPU holds several of these small models;
    their wall times then share it, which each pair's JSON records as ``jobs``). A pair that fails
    does not stop the others: the summary covers those written, then :class:`PairsFailed` names the
    failed pairs."""
    for name in methods:
        get_method(name)
    for name in tasks:
        get_task(name)
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"run_compare: jobs must be an int >= 1, got {jobs!r}")
    out.mkdir(parents=True, exist_ok=True)
    pending = []
    for task in tasks:
        budget = SMALL_STEPS if small else steps if steps is not None else get_task(task).steps
        for method in methods:
            path = result_path(out, method, task)
            if path.is_file():
                log(f"[{method} / {task}] done already: {path}")
                continue
            pending.append(_PairJob(method, task, budget, tuple(grid_seeds), tuple(seeds), str(device), data_root,
                                    compile, small, str(out), jobs))
    failed: list[str] = []

    def finish(job: _PairJob, result: Callable[[], str]) -> None:
        """Log the pair's closing line, or keep its failure (the other pairs still run)."""
        try:
            log(result())
        except Exception as err:
            failed.append(f"{job.method} / {job.task}: {type(err).__name__}: {err}")
            log(f"[{job.method} / {job.task}] failed: {type(err).__name__}: {err}")

    if jobs == 1:
        for job in pending:
            finish(job, lambda job=job: _run_pair(job, log))
    else:
        threads = max(1, (os.cpu_count() or 1) // jobs)
        # a process per pair: each starts with a bare device (no memory the pair before it cached)
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=torch.set_num_threads,
                                 initargs=(threads,), max_tasks_per_child=1) as pool:
            futures = {pool.submit(_run_pair_in_worker, job): job for job in pending}
            for future in as_completed(futures):
                finish(futures[future], future.result)
    lines = report(out)
    if failed:
        raise PairsFailed(f"compare: {len(failed)} pair(s) failed (the others are in {out}): " + "; ".join(failed))
    return lines


@dataclass(frozen=True)
class _PairJob:
    method: str
    task: str
    steps: int
    grid_seeds: tuple[int, ...]
    seeds: tuple[int, ...]
    device: str
    data_root: str | None
    compile: bool
    small: bool
    out: str
    jobs: int


def _run_pair(job: _PairJob, log: Callable[[str], None] | None = None) -> str:
    """One pair's sweeps, its JSON written (whole, or not at all); returns the closing log line
    (``log``: the progress lines; none from a worker process)."""
    t0 = time.perf_counter()
    grid_file = grid_path(Path(job.out), job.method, job.task)
    payload = compare_pair(job.method, job.task, steps=job.steps, grid_seeds=job.grid_seeds, seeds=job.seeds,
                           device=torch.device(job.device), data_root=job.data_root, compile=job.compile,
                           small=job.small, grid_file=grid_file, log=log or (lambda line: None))
    payload["jobs"], payload["compiled"] = job.jobs, job.compile
    path = result_path(Path(job.out), job.method, job.task)
    _write_whole(path, payload)  # a file is there only when its pair is complete
    grid_file.unlink(missing_ok=True)  # the pair's JSON holds the grid's outcome now
    return f"[{job.method} / {job.task}] wrote {path} ({time.perf_counter() - t0:.1f} s)"


class PairError(RuntimeError):
    """A pair's failure in a worker process, as text: the worker's exception may hold objects
    that cannot cross to the parent (a compiled function's closure), its message and traceback can."""


def _run_pair_in_worker(job: _PairJob) -> str:
    """:func:`_run_pair` in a worker process, any failure re-raised as a :class:`PairError` that
    names the original exception and carries its traceback."""
    try:
        return _run_pair(job)
    except Exception as err:
        raise PairError(f"{type(err).__name__}: {err}\n{traceback.format_exc()}") from None


def _write_whole(path: Path, payload: dict[str, Any]) -> None:
    """``payload`` as JSON at ``path``, through a temporary file: the file is whole or absent."""
    tmp = path.with_suffix(f".json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(payload, separators=(",", ":")))
    os.replace(tmp, path)


def load_results(out: Path) -> list[dict[str, Any]]:
    """Every pair's JSON in ``out``, in :data:`METHODS` × :data:`TASKS` order."""
    found = []
    for task in TASKS:
        for method in METHODS:
            path = result_path(out, method, task)
            if path.is_file():
                found.append(json.loads(path.read_text()))
    return found


def _cell(p: dict[str, Any]) -> str:
    if p["metric"] == "loss":
        losses = sorted(p["final_val_loss"])
        return f"{_median(losses):.3f} [{losses[0]:.3f}–{losses[-1]:.3f}]"
    s = p["summary"]
    if s["median"] is None:
        return f"not reached ({s['reached']}/{s['of']}; val acc {_median(p['final_val_acc']):.2f})"
    return f"{s['median']:g} [{s['min']:g}–{s['max']:g}] ({s['reached']}/{s['of']})"


def _seconds(p: dict[str, Any]) -> str:
    """The wall seconds to the target (median over seeds), or of the whole rerun in parentheses;
    marked where the sweeps were compiled (their seconds then include the compile)."""
    got = [s for s in p["seconds_to_target"] if s is not None]
    text = f"{_median(got):.1f}" if got and p["metric"] == "accuracy" else f"({p['seconds']:.1f})"
    return text + (", compiled" if p.get("compiled") else "")


def summary_lines(payloads: Sequence[dict[str, Any]]) -> list[str]:
    """The markdown of ``summary.md``: per task, one row per method."""
    lines = ["# Comparison of grokking accelerators", ""]
    by_task: dict[str, list[dict[str, Any]]] = {}
    for p in payloads:
        by_task.setdefault(p["task"], []).append(p)
    for task, rows in by_task.items():
        first = rows[0]
        what = ("validation loss at the budget, median [min–max] over seeds" if first["metric"] == "loss"
                else f"steps to {first.get('target', 0.95):.0%} validation accuracy, median [min–max]"
                     " (reached/seeds)")
        lines += [f"## {first['task_title']} ({task}), budget {first['steps_budget']} steps", "",
                  f"| method | best configuration | {what} | wall s to target (vmapped seeds) | state MiB |",
                  "| --- | --- | --- | --- | --- |"]
        for p in rows:
            config = ", ".join(f"{k}={v:g}" for k, v in p["best"].items())
            lines.append(f"| {p['title']} | {config} | {_cell(p)} | {_seconds(p)} |"
                         f" {p['state_bytes'] / 2**20:.2f} |")
        envs = sorted({f"{p['device_name']}, torch {p['torch']}, commit {p['git_commit']}"
                       + (f", {p['jobs']} pairs at a time" if p.get("jobs", 1) > 1 else "") for p in rows})
        lines += ["", "Ran on: " + "; ".join(envs) + ". Wall seconds in parentheses: the whole rerun (no target).",
                  ""]
    return lines


def task_figure(payloads: Sequence[dict[str, Any]]) -> Any:
    """One task's methods side by side (a matplotlib figure, one panel): per method, each seed's
    steps to the target as a dot (a cross at the budget: not reached) and the median as a bar; on
    the language model each seed's final validation loss and a tick at the median. Okabe–Ito
    colours, large labels."""
    import matplotlib.pyplot as plt

    first = payloads[0]
    fig, ax = plt.subplots(figsize=(9, 0.7 * len(payloads) + 2.4))
    names = [p["title"] for p in payloads]
    for i, p in enumerate(payloads):
        color = OKABE_ITO[list(METHODS).index(p["method"]) % len(OKABE_ITO)]
        if first["metric"] == "loss":
            values = p["final_val_loss"]  # a bar from 0 would hide the differences: a tick at the median
            ax.scatter([_median(values)], [i], marker="|", s=900, linewidths=3, color=color, zorder=2)
            ax.scatter(values, [i] * len(values), color=color, edgecolor="k", s=60, zorder=3)
            continue
        reached = [s for s in p["steps_to_target"] if s is not None]
        missed = len(p["steps_to_target"]) - len(reached)
        if reached:
            ax.barh(i, _median(reached), color=color, alpha=0.45)
            ax.scatter(reached, [i] * len(reached), color=color, edgecolor="k", s=60, zorder=3)
        if missed:
            ax.scatter([p["steps_budget"]] * missed, [i] * missed, marker="x", color="k", s=80, zorder=3)
    if first["metric"] == "accuracy":  # the budget when a seed missed it, else the slowest seed
        reached = [s for p in payloads for s in p["steps_to_target"] if s is not None]
        missed = any(s is None for p in payloads for s in p["steps_to_target"])
        ax.set_xlim(0, (first["steps_budget"] if missed or not reached else max(reached)) * 1.08)
    ax.set_yticks(range(len(names)), names, fontsize=13)
    ax.invert_yaxis()
    ax.tick_params(axis="x", labelsize=12)
    ax.set_xlabel("validation loss at the budget" if first["metric"] == "loss"
                  else f"steps to {first.get('target', 0.95):.0%} validation accuracy (x: not reached in the budget)",
                  fontsize=13)
    ax.set_title(f"{first['task_title']}\nbest configuration of each method, {len(first['seeds'])} seeds", fontsize=14)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def report(out: Path) -> list[str]:
    """Write ``out/summary.md`` and, with matplotlib, ``out/<task>.png`` from the pairs in ``out``."""
    payloads = load_results(out)
    lines = summary_lines(payloads)
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return lines
    for task in TASKS:
        mine = [p for p in payloads if p["task"] == task]
        if mine:
            fig = task_figure(mine)
            fig.savefig(out / f"{task}.png", dpi=110)
            plt.close(fig)
    return lines


__all__ = ["OKABE_ITO", "SMALL_STEPS", "PairError", "PairsFailed", "best_config", "compare_pair", "config_table",
           "grid_path", "load_results", "ranking_decided", "report", "result_path", "run_compare", "summary_lines",
           "task_figure"]
