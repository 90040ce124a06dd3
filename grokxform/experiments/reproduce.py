"""The GPU reproduction of the paper's modular-arithmetic table, the sweep throughput, and the
weight-decay / β1 ablation, as phases that each write their JSON when they end
(:func:`run_phases`)::

    grokxform reproduce --out results/ --device cuda --phases paper,sweep,ablation

- ``paper``: Grokfast-EMA and Grokfast-MA, one single run per seed (the plain training loop, as
  a user would run it; wall clock measured).
- ``sweep``: a Grokfast-EMA grid α × λ × weight decay × seeds as one vmapped program, and the same
  members' throughput when run one by one (the plain loop, and the vmapped code with one member):
  the ratio is member-steps per second of the sweep over that of one-by-one.
- ``ablation``: does Grokfast still win against a tuned baseline? Tune AdamW's (decoupled) weight decay and β1 for the
  baseline with the same number of configurations and steps as a Grokfast-EMA grid, then compare
  the best of each.
- ``baseline``: the Adam baseline (wd 0) for the same seeds, trained as one vmapped program
  (capped at ``--baseline-steps``, default 50,000).
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection, Sequence
from pathlib import Path
from typing import Any

import torch

from grokxform.experiments.modular import paper_setup
from grokxform.experiments.optimizers import modular_optimizer
from grokxform.experiments.methods import build
from grokxform.experiments.sweep import median_and_spread, sweep
from grokxform.experiments.train import train

PAPER_TABLE = {
    "baseline": {"steps": 39890, "seconds": 5984},
    "grokfast_ma": {"steps": 790, "seconds": 292},
    "grokfast_ema": {"steps": 910, "seconds": 137},
}
"""The paper's iterations and wall clock (GTX 1080 Ti) to 95% validation accuracy."""

PHASES = ("paper", "sweep", "ablation", "baseline")
"""The phases, in the order they run by default."""


def _env(device: torch.device) -> dict[str, Any]:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    return {"device": name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _write(out: Path, name: str, payload: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(payload, indent=1))
    print(f"wrote {out / name}", flush=True)


def paper_rows(device: torch.device, seeds: list[int], max_steps: int, task: str = "mul") -> dict[str, Any]:
    """Grokfast-EMA and -MA with the paper's settings: one plain single run per seed."""
    rows: dict[str, Any] = {}
    for name in ("grokfast_ema", "grokfast_ma"):
        runs: list[dict[str, Any]] = []
        for seed in seeds:
            setup = paper_setup(seed, device=device, task=task)
            res = train(setup.model, modular_optimizer(name), setup.data, steps=max_steps,
                        generator=setup.generator, stop_at_target=True)
            runs.append({"seed": seed, "steps_to_95": res.steps_to_target, "seconds_to_95": res.seconds_to_target,
                         "steps": res.steps, "seconds": res.seconds, "curve": res.curves()})
            print(name, seed, res.steps_to_target, res.seconds_to_target, flush=True)
        rows[name] = {"runs": runs, "steps_to_95": median_and_spread([r["steps_to_95"] for r in runs]),
                      "seconds_to_95": median_and_spread([r["seconds_to_95"] for r in runs]),
                      "paper": PAPER_TABLE[name]}
    return rows


def _sweep_or_eager(name: str, grid: dict[str, list[Any]], **kw: Any) -> tuple[Any, bool]:
    """``sweep(name, grid, **kw)``; if the compiled run fails, the same run eagerly (a compiler
    failure must not cost the row). Returns the result and whether it ran compiled."""
    try:
        return sweep(name, grid, **kw), bool(kw.get("compile"))
    except Exception as err:
        if not kw.get("compile"):
            raise
        print(f"{name}: compiled run failed ({type(err).__name__}: {err}); running eagerly", flush=True)
        return sweep(name, grid, **{**kw, "compile": False}), False


def baseline_row(device: torch.device, seeds: list[int], steps: int, seconds: float | None,
                 compile: bool, task: str = "mul") -> dict[str, Any]:
    """The Adam baseline (wd 0) for all seeds at once, as one vmapped program, capped."""
    base, compile = _sweep_or_eager("adam", {"weight_decay": [0.0]}, seeds=seeds, steps=steps, device=device,
                                    compile=compile, max_seconds=seconds, task=task)
    print("baseline", base.steps_to_target, base.steps, base.seconds, flush=True)
    return {"vmapped": True, "compiled": compile, "steps_run": base.steps, "seconds": base.seconds,
            "steps_to_95": median_and_spread(base.steps_to_target), "per_seed": base.steps_to_target,
            "paper": PAPER_TABLE["baseline"], "eval_steps": base.eval_steps[::10],
            "val_acc": base.val_acc[::10], "train_acc": base.train_acc[::10]}


def sweep_throughput(device: torch.device, steps: int, single_steps: int, compile: bool,
                     seconds: float | None = None, task: str = "mul") -> dict[str, Any]:
    grid = {"alpha": [0.9, 0.95, 0.98], "lamb": [1.0, 2.0, 5.0], "weight_decay": [0.005, 0.01]}
    seeds = [0, 1]
    res, compile = _sweep_or_eager("grokfast_ema", grid, seeds=seeds, steps=steps, device=device, compile=compile,
                                   stop_when_all_reached=True, max_seconds=seconds, task=task)
    n = len(res.members)
    # one by one: a few members alone, the plain loop and the vmapped code with one member
    singles = []
    for m in res.members[:3]:
        setup = paper_setup(m["seed"], device=device, task=task)
        tx = build("grokfast_ema", {k: v for k, v in m.items() if k != "seed"}, warmup_steps=10)
        t0 = time.perf_counter()
        r = train(setup.model, tx, setup.data, steps=single_steps, generator=setup.generator)
        loop_s = time.perf_counter() - t0
        one = sweep("grokfast_ema", {}, steps=single_steps, device=device, compile=compile,
                    members=[m], stop_when_all_reached=False, task=task)
        singles.append({"member": m, "loop_steps_per_s": r.steps / loop_s,
                        "vmapped1_steps_per_s": one.steps / one.seconds,
                        "vmapped1_steady_steps_per_s": one.steady_member_steps_per_second})
    best_single = max(max(s["loop_steps_per_s"], s["vmapped1_steady_steps_per_s"]) for s in singles)
    return {
        "members": n, "grid": grid, "seeds": seeds, "compiled": compile, "steps_run": res.steps, "seconds": res.seconds,
        "member_steps_per_s": res.member_steps_per_second,
        "steady_member_steps_per_s": res.steady_member_steps_per_second, "singles": singles,
        "best_single_steps_per_s": best_single,
        "throughput_ratio": res.steady_member_steps_per_second / best_single,
        "throughput_ratio_with_compile": res.member_steps_per_second / best_single,
        "result": res.to_json(),
    }


def ablation(device: torch.device, steps: int, compile: bool, seconds: float | None = None,
             task: str = "mul") -> dict[str, Any]:
    seeds = [0, 1]
    tuned, compiled = _sweep_or_eager("adamw", {"weight_decay": [0.1, 0.3, 1.0], "b1": [0.8, 0.9, 0.98]}, seeds=seeds,
                                      steps=steps, device=device, compile=compile, max_seconds=seconds, task=task)
    grok, compiled2 = _sweep_or_eager("grokfast_ema", {"alpha": [0.9, 0.98, 0.99], "weight_decay": [0.001, 0.005, 0.01]},
                                      seeds=seeds, steps=steps, device=device, compile=compile, max_seconds=seconds,
                                      task=task)

    def best(res: Any) -> dict[str, Any]:
        configs: dict[tuple, list] = {}
        for m, s in zip(res.members, res.steps_to_target):
            key = tuple((k, v) for k, v in m.items() if k != "seed")
            configs.setdefault(key, []).append(s)
        table = [{"config": dict(k), **median_and_spread(v)} for k, v in configs.items()]
        ranked = sorted(table, key=lambda r: (-r["reached"], r["median"] if r["median"] is not None else 1e12))
        return {"table": table, "best": ranked[0]}

    return {"budget_steps": steps, "seeds": seeds, "compiled": [compiled, compiled2],
            "steps_run": [tuned.steps, grok.steps], "adamw_tuned": best(tuned), "grokfast_ema": best(grok),
            "raw": {"adamw": tuned.to_json(), "grokfast_ema": grok.to_json()}}


def run_phases(phases: Sequence[str], out: Path, *, device: torch.device, seeds: list[int], task: str = "mul",
               max_steps: int = 5000, baseline_steps: int = 50_000, sweep_steps: int = 3000, single_steps: int = 200,
               ablation_steps: int = 5000, phase_seconds: float | None = None,
               baseline_seconds: float | None = None, compiled: Collection[str] = ("baseline",)) -> None:
    """Run each of ``phases`` (of :data:`PHASES`) in the order given and write ``out/<phase>.json``
    when it ends, with the device, torch's version, the date, the task and the phase's wall time.

    Step caps: ``max_steps`` of each single run of ``paper``, ``baseline_steps`` of the baseline,
    ``sweep_steps`` of the sweep and ``single_steps`` of its one-by-one runs, ``ablation_steps`` of
    the ablation's two grids. ``phase_seconds`` caps the wall time of each vmapped sweep of
    ``sweep`` and ``ablation``, ``baseline_seconds`` the baseline's. The vmapped steps of the
    phases in ``compiled`` run under ``torch.compile`` (eagerly again if compiling fails).
    """
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        raise ValueError(f"reproduce: unknown phase(s) {unknown}; choose from {', '.join(PHASES)}")
    env = _env(device)
    for phase in phases:
        t0 = time.perf_counter()
        if phase == "paper":
            payload = {"seeds": seeds, **paper_rows(device, seeds, max_steps, task)}
        elif phase == "baseline":
            payload = {"seeds": seeds, "baseline": baseline_row(device, seeds, baseline_steps, baseline_seconds,
                                                                "baseline" in compiled, task)}
        elif phase == "sweep":
            payload = sweep_throughput(device, sweep_steps, single_steps, "sweep" in compiled, phase_seconds, task)
        else:
            payload = ablation(device, ablation_steps, "ablation" in compiled, phase_seconds, task)
        _write(out, f"{phase}.json", {**env, "task": task, "phase_seconds": time.perf_counter() - t0, **payload})
