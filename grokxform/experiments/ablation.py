"""Does GrokAdamW grok? Its pieces one at a time on the modular task, beside Grokfast-EMA and a
tuned AdamW with grids of the same size, the same seeds and the same step cap.

GrokAdamW (:func:`grokxform.grokadamw`) adds two ideas to AdamW: the Grokfast-EMA filter
``ĝ = g + λ·μ`` whose ``α_t = α_init·exp(−κ·GS_t)`` is adapted by a grokking signal of the losses
(κ = ``grokking_signal_decay_rate``; κ = 0 keeps α fixed), and β1 decayed with depth,
``β1_l = β1·(1−γ)^l``; it also clips the global gradient norm to 1. The grid of :data:`PROGRAMS`
varies each of these, and the decoupled weight decay over the range where AdamW groks, as
vmapped sweeps (one program per structure: γ is fixed within a program)::

    grokxform ablation run --program grokadamw_g0.1 --out OUT --steps 3000
    grokxform ablation report OUT      # table, piece effects, PNG

``run`` (:func:`run_program`) writes ``OUT/<program>.json``; ``report`` (:func:`report`) reads every
program's JSON there and writes ``ablation_table.md`` and ``grokadamw_ablation.png``.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch

from grokxform.experiments.modular import task_name
from grokxform.experiments.sweep import median_and_spread, sweep

TARGET = 0.95
"""Validation accuracy that counts as generalised."""

GROKADAMW_DEFAULTS: dict[str, float] = {
    "gamma": 0.1,
    "grokking_signal_decay_rate": 0.1,
    "clip": 1.0,
    "weight_decay": 0.01,
    "lamb": 2.0,
    "alpha_init": 0.98,
}
"""GrokAdamW's own defaults (the pipeline's), the reference each piece is varied from."""

SHORT = {
    "gamma": "γ",
    "grokking_signal_decay_rate": "κ",
    "clip": "clip",
    "weight_decay": "wd",
    "lamb": "λ",
    "alpha_init": "α",
    "alpha": "α",
    "b1": "β1",
}
"""How each hyperparameter is written on the axes and in tables."""


class Program(NamedTuple):
    """One vmapped sweep: a method of :data:`~grokxform.experiments.methods.METHODS`,
    the arguments fixed for all its members, and its configurations (each × every seed)."""

    pipeline: str
    static: dict[str, float]
    configs: list[dict[str, float]]


def _product(**axes: Sequence[float]) -> list[dict[str, float]]:
    names = list(axes)
    return [dict(zip(names, map(float, values))) for values in itertools.product(*axes.values())]


def _grokadamw_configs(gamma: float) -> list[dict[str, float]]:
    base = {k: v for k, v in GROKADAMW_DEFAULTS.items() if k != "gamma"}
    if gamma != GROKADAMW_DEFAULTS["gamma"]:  # γ's own rows: the clip and weight decay around it
        rows = _product(clip=[0.0, 1.0], weight_decay=[0.01, 0.3, 1.0])
    else:  # the default γ: signal (κ) × clip × weight decay, then λ and α_init one at a time
        rows = _product(grokking_signal_decay_rate=[0.0, 0.1, 1.0], clip=[0.0, 1.0], weight_decay=[0.01, 0.3, 1.0])
        rows += _product(lamb=[0.0, 5.0], weight_decay=[0.01, 1.0])
        rows += _product(alpha_init=[0.9], weight_decay=[0.01, 1.0])
    return [{**base, **row} for row in rows]


PROGRAMS: dict[str, Program] = {
    "grokadamw_g0.1": Program("grokadamw", {"gamma": 0.1}, _grokadamw_configs(0.1)),
    "grokadamw_g0.01": Program("grokadamw", {"gamma": 0.01}, _grokadamw_configs(0.01)),
    "grokadamw_g0": Program("grokadamw", {"gamma": 0.0}, _grokadamw_configs(0.0)),
    "grokfast_ema": Program("grokfast_ema", {}, _product(alpha=[0.9, 0.95, 0.98, 0.99], lamb=[1.0, 2.0, 5.0],
                                                         weight_decay=[0.001, 0.005, 0.01])),
    "adamw": Program("adamw", {}, _product(weight_decay=[0.01, 0.03, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 3.0],
                                           b1=[0.8, 0.9, 0.95, 0.98])),
}
"""The ablation's sweeps. GrokAdamW: 36 configurations over three programs (γ ∈ {0.1, 0.01, 0});
Grokfast-EMA (coupled L2, the paper's) and AdamW (decoupled): 36 each."""

FAMILIES = {"grokadamw": "GrokAdamW", "grokfast_ema": "Grokfast-EMA", "adamw": "AdamW (tuned)"}


def run_program(name: str, out: Path, *, seeds: Sequence[int], steps: int, device: str | torch.device,
                task: str = "mul", max_seconds: float | None = None, limit: int | None = None) -> dict[str, Any]:
    """Train program ``name`` of :data:`PROGRAMS` (its first ``limit`` configurations, for a dry
    run) over ``seeds`` as one vmapped sweep; write and return ``out/<name>.json``."""
    if name not in PROGRAMS:
        raise ValueError(f"ablation: unknown program {name!r}; choose from {', '.join(PROGRAMS)}")
    prog = PROGRAMS[name]
    configs = prog.configs[:limit] if limit else prog.configs
    members = [{**c, "seed": int(s)} for c in configs for s in seeds]
    dev = torch.device(device)
    every = max(1, steps // 20)
    next_at = [every]
    t0 = time.perf_counter()

    def progress(step: int, accs: list[float]) -> None:
        if step >= next_at[0] or step >= steps:
            done = sum(a >= TARGET for a in accs)
            print(f"[{name}] step {step}/{steps}  {time.perf_counter() - t0:6.1f} s  val acc max {max(accs):.3f}"
                  f"  {done}/{len(accs)} members at {TARGET:.0%} now", flush=True)
            while next_at[0] <= step:
                next_at[0] += every

    res = sweep(prog.pipeline, {}, members=members, steps=steps, device=dev, task=task, static=prog.static,
                on_eval=progress, max_seconds=max_seconds)
    env = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    raw = res.to_json()
    payload = {"program": name, **env, "seeds": list(seeds), "step_cap": steps, "target": TARGET,
               **{k: raw[k] for k in ("pipeline", "task", "static", "members", "steps_to_target", "steps", "seconds",
                                      "member_steps_per_second")},
               "final_val_acc": res.val_acc[-1] if res.val_acc else []}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(payload, indent=1))
    print(f"[{name}] wrote {out / f'{name}.json'}: {res.steps} steps in {res.seconds:.0f} s", flush=True)
    return payload


# --------------------------------------------------------------------------- report


def config_rows(payloads: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per configuration: its family, settings (static ones included), steps to the
    target over seeds (median/min/max/reached/of), the steps run, and the final val acc's median."""
    rows: dict[tuple, dict[str, Any]] = {}
    for p in payloads:
        for m, s, acc in zip(p["members"], p["steps_to_target"], p["final_val_acc"] or [None] * len(p["members"])):
            config = {**p["static"], **{k: v for k, v in m.items() if k != "seed"}}
            config.pop("window_size", None)
            config.pop("warmup_steps", None)
            key = (p["pipeline"], tuple(sorted(config.items())))
            row = rows.setdefault(key, {"pipeline": p["pipeline"], "config": config, "per_seed": [], "final": [],
                                        "steps_run": p["steps"]})
            row["per_seed"].append(s)
            row["final"].append(acc)
    out = []
    for row in rows.values():
        finals = sorted(a for a in row.pop("final") if a is not None)
        out.append({**row, **median_and_spread(row["per_seed"]),
                    "final_val_acc": finals[len(finals) // 2] if finals else None})
    return out


def label(row: dict[str, Any]) -> str:
    """A configuration as the axes and tables name it: ``"GrokAdamW κ=0 clip=off wd=1"``."""
    parts = []
    for k, v in row["config"].items():
        if k == "clip" and v == 0:
            parts.append("clip=off")
        else:
            parts.append(f"{SHORT.get(k, k)}={v:g}")
    return f"{FAMILIES.get(row['pipeline'], row['pipeline'])} " + " ".join(parts)


def fmt(row: dict[str, Any]) -> str:
    """``median [min–max] (reached/of)``, or ``not reached (0/3; final val acc 0.12)``."""
    if row["median"] is None:
        final = row.get("final_val_acc")
        tail = "" if final is None else f"; val acc at the cap {final:.2f}"
        return f"not reached ({row['reached']}/{row['of']}{tail})"
    return f"{row['median']:g} [{row['min']:g}–{row['max']:g}] ({row['reached']}/{row['of']})"


def _rank(row: dict[str, Any]) -> tuple[float, float]:
    return (-row["reached"] / max(1, row["of"]), row["median"] if row["median"] is not None else float("inf"))


def piece_effects(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """For each GrokAdamW knob k: configurations that differ only in k, grouped by k's value.

    Per value: members reaching the target (of all members in such groups) and the median steps
    over the members that reached it; per non-default value, the paired comparison with the
    default value, seed by seed (an unreached member counts as slower than any reached one):
    faster, slower, same (both reached at the same step, or neither reached)."""
    grok = [r for r in rows if r["pipeline"] == "grokadamw"]
    effects = []
    for knob, default in GROKADAMW_DEFAULTS.items():
        groups: dict[tuple, dict[float, dict[str, Any]]] = {}
        for r in grok:
            rest = tuple(sorted((k, v) for k, v in r["config"].items() if k != knob))
            groups.setdefault(rest, {})[r["config"][knob]] = r
        groups = {k: g for k, g in groups.items() if len(g) > 1 and default in g}
        values = sorted({v for g in groups.values() for v in g})
        per_value = []
        for v in values:
            seeds = [s for g in groups.values() if v in g for s in g[v]["per_seed"]]
            entry = {"value": v, **median_and_spread(seeds)}
            if v != default:
                faster = slower = same = 0
                for g in groups.values():
                    if v not in g:
                        continue
                    for a, b in zip(g[v]["per_seed"], g[default]["per_seed"]):
                        ka = float("inf") if a is None else a
                        kb = float("inf") if b is None else b
                        faster += ka < kb
                        slower += ka > kb
                        same += ka == kb
                entry.update(faster=faster, slower=slower, same=same)
            per_value.append(entry)
        effects.append({"knob": knob, "default": default, "groups": len(groups), "values": per_value})
    return effects


def _fmt_value(knob: str, v: float) -> str:
    return "off" if knob == "clip" and v == 0 else f"{v:g}"


def report(folder: Path) -> list[str]:
    """Read every program's JSON in ``folder``; write ``ablation_table.md`` and
    ``grokadamw_ablation.png`` there; return the markdown lines."""
    payloads = [json.loads((folder / f"{n}.json").read_text()) for n in PROGRAMS if (folder / f"{n}.json").exists()]
    if not payloads:
        raise FileNotFoundError(f"ablation: no program JSON in {folder}")
    rows = sorted(config_rows(payloads), key=_rank)
    p0 = payloads[0]
    caps = sorted({p["steps"] for p in payloads})
    lines = [
        f"# GrokAdamW ablation: {task_name(p0['task'])}, seeds {p0['seeds']}, step cap {p0['step_cap']}",
        "",
        f"Device {p0['device']}, torch {p0['torch']}, {p0['date']}; steps run per program: {caps}.",
        "",
        "## Which piece helps, hurts or does nothing (GrokAdamW, configurations differing only in it)",
        "",
        "| knob | value | members at 95% | median steps of those | vs the default, seed by seed |",
        "| --- | --- | --- | --- | --- |",
    ]
    for e in piece_effects(rows):
        for v in e["values"]:
            cmp = ("default" if v["value"] == e["default"] else
                   f"faster {v['faster']}, slower {v['slower']}, same {v['same']}")
            med = "—" if v["median"] is None else f"{v['median']:g}"
            lines.append(f"| {SHORT[e['knob']]} | {_fmt_value(e['knob'], v['value'])} | {v['reached']}/{v['of']} |"
                         f" {med} | {cmp} |")
    lines += ["", "## Every configuration, best first", "",
              "| configuration | steps to 95% val acc: median [min–max] (reached) |", "| --- | --- |"]
    lines += [f"| {label(r)} | {fmt(r)} |" for r in rows]
    for fam, fam_name in FAMILIES.items():
        best = [r for r in rows if r["pipeline"] == fam]
        if best:
            lines.append("")
            lines.append(f"Best {fam_name}: {label(best[0])} → {fmt(best[0])}; "
                         f"{sum(r['reached'] > 0 for r in best)} of {len(best)} configurations reach 95% on some seed.")
    (folder / "ablation_table.md").write_text("\n".join(lines) + "\n")
    plot(rows, folder / "grokadamw_ablation.png", p0["step_cap"],
         f"{task_name(p0['task'])}: steps to {TARGET:.0%} val acc, seeds {p0['seeds']}")
    return lines


def plot(rows: Sequence[dict[str, Any]], path: Path, cap: int, title: str, per_family: int = 10) -> bool:
    """Horizontal bars, one per configuration (every GrokAdamW one, the best ``per_family`` of the
    others), named on the axis: median steps to the target, whiskers min–max over the seeds that
    reached it; a configuration no seed brought to the target is a hatched grey bar to the cap,
    labelled with its val accuracy at the cap. Returns False when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    colors = {"grokadamw": "tab:purple", "grokfast_ema": "tab:red", "adamw": "tab:blue"}
    shown = []
    for fam in ("adamw", "grokfast_ema", "grokadamw"):
        fam_rows = [r for r in rows if r["pipeline"] == fam]
        shown += fam_rows if fam == "grokadamw" else fam_rows[:per_family]
    fig, ax = plt.subplots(figsize=(11, 0.26 * len(shown) + 1.6))
    for i, r in enumerate(shown):
        if r["median"] is None:
            ax.barh(i, cap, color="0.9", hatch="///", edgecolor="0.6")
            final = r.get("final_val_acc")
            ax.text(cap * 0.02, i, f"not reached by any seed (val acc {final:.2f} at the cap)" if final is not None
                    else "not reached by any seed", va="center", fontsize=7, color="k")
        else:
            ax.barh(i, r["median"], color=colors.get(r["pipeline"], "tab:gray"),
                    xerr=[[r["median"] - r["min"]], [r["max"] - r["median"]]], error_kw={"lw": 0.8})
            ax.text(r["max"] + cap * 0.01, i, f"{r['median']:g} ({r['reached']}/{r['of']})", va="center", fontsize=7)
    ax.set_yticks(range(len(shown)), [label(r) for r in shown], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlim(0, cap * 1.15)
    ax.axvline(cap, color="gray", lw=0.6, ls=":")
    ax.set_xlabel(f"steps to {TARGET:.0%} val acc: median, whiskers min–max of the seeds that reached it (cap {cap})")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
