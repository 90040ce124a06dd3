"""Plots and a markdown table from the GPU reproduction's JSON (``grokxform reproduce``).

    python benchmarks/plot_modular.py benchmarks/results/modular

writes ``paper_curves.png``, ``sweep_heatmap.png``, ``ablation.png`` and ``summary.md`` there.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


SHORT = {"weight_decay": "wd", "b1": "β1", "alpha": "α", "lamb": "λ"}


def _fmt(stats: dict) -> str:
    if stats["median"] is None:
        return f"not reached ({stats['reached']}/{stats['of']})"
    return f"{stats['median']:g} [{stats['min']:g}–{stats['max']:g}] ({stats['reached']}/{stats['of']})"


def paper_curves(folder: Path) -> list[str]:
    paper = json.loads((folder / "paper.json").read_text())
    base = json.loads((folder / "baseline.json").read_text())["baseline"]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colors = {"grokfast_ema": "tab:red", "grokfast_ma": "tab:orange"}
    for name, color in colors.items():
        for i, run in enumerate(paper[name]["runs"]):
            c = run["curve"]
            ax.plot(c["step"], c["val_acc"], color=color, alpha=0.8, label=f"{name} val" if i == 0 else None)
            ax.plot(c["step"], c["train_acc"], color=color, alpha=0.3, ls="--", label=f"{name} train" if i == 0 else None)
    steps = base["eval_steps"]
    for i in range(len(base["val_acc"][0])):
        ax.plot(steps, [v[i] for v in base["val_acc"]], color="tab:blue", alpha=0.8, label="baseline val" if i == 0 else None)
        ax.plot(steps, [v[i] for v in base["train_acc"]], color="tab:blue", alpha=0.3, ls="--",
                label="baseline train" if i == 0 else None)
    ax.axhline(0.95, color="gray", lw=0.5)
    ax.set_xscale("log")
    ax.set_xlabel("optimizer steps")
    ax.set_ylabel("accuracy")
    seeds = paper["seeds"]
    span = f"{seeds[0]}–{seeds[-1]}" if seeds == list(range(seeds[0], seeds[-1] + 1)) else ", ".join(map(str, seeds))
    ax.set_title(f"x·y mod 97: val (solid) and train (dashed) accuracy, seeds {span}\n{paper['device']}", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(folder / "paper_curves.png", dpi=120)
    plt.close(fig)
    lines = [
        "| run | steps to 95% val acc: median [min–max] (reached) | seconds to 95%: median | paper (steps, s) |",
        "| --- | --- | --- | --- |",
    ]
    for name in ("baseline", "grokfast_ma", "grokfast_ema"):  # seconds: runs that had the GPU alone
        if name == "baseline":
            last = [round(v, 2) for v in base["val_acc"][-1]]
            got = (f"not reached in {base['steps_run']} steps ({len(base['per_seed'])} seeds; val acc at the cap {last},"
                   f" {base['seconds']:.0f} s)")
            if base["steps_to_95"]["median"] is not None:
                got = _fmt(base["steps_to_95"])
            secs = "—"
            ref = base["paper"]
        else:
            got = _fmt(paper[name]["steps_to_95"])
            secs = f"{paper[name]['seconds_to_95']['median']:.1f}"
            ref = paper[name]["paper"]
        lines.append(f"| {name} | {got} | {secs} | {ref['steps']}, {ref['seconds']} |")
    return lines


def sweep_heatmap(folder: Path) -> list[str]:
    sw = json.loads((folder / "sweep.json").read_text())
    res = sw["result"]
    grid = sw["grid"]
    alphas, lambs, wds = grid["alpha"], grid["lamb"], grid["weight_decay"]
    fig, axes = plt.subplots(1, len(wds), figsize=(5 * len(wds), 4), squeeze=False)
    cap = res["steps"]
    for w_i, wd in enumerate(wds):
        table = np.full((len(alphas), len(lambs)), np.nan)
        for a_i, a in enumerate(alphas):
            for l_i, lam in enumerate(lambs):
                vals = [s if s is not None else np.nan for m, s in zip(res["members"], res["steps_to_target"])
                        if m["alpha"] == a and m["lamb"] == lam and m["weight_decay"] == wd]
                table[a_i, l_i] = np.nanmedian(vals) if not all(np.isnan(vals)) else np.nan
        ax = axes[0][w_i]
        im = ax.imshow(table, cmap="viridis_r", vmin=0, vmax=cap)
        for a_i in range(len(alphas)):
            for l_i in range(len(lambs)):
                v = table[a_i, l_i]
                miss = np.isnan(v)
                ax.text(l_i, a_i, f"not in {cap}" if miss else f"{v:.0f}", ha="center", va="center",
                        color="k" if miss else "w")
        ax.set_facecolor("lightgray")  # not reached by any seed
        ax.set_xticks(range(len(lambs)), [f"λ={x:g}" for x in lambs])
        ax.set_yticks(range(len(alphas)), [f"α={x:g}" for x in alphas])
        ax.set_title(f"Grokfast-EMA, L2 wd={wd:g}:\nmedian steps to 95% val acc", fontsize=10)
        fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(folder / "sweep_heatmap.png", dpi=120)
    plt.close(fig)
    singles = sw["singles"]
    steady = sw.get("steady_member_steps_per_s", sw["member_steps_per_s"])
    one = [s.get("vmapped1_steady_steps_per_s", s["vmapped1_steps_per_s"]) for s in singles]
    compiled = "compiled, " if sw.get("compiled") else ""
    return [
        f"Sweep: {sw['members']} members ({' × '.join(f'{k} {v}' for k, v in grid.items())} × seeds {sw['seeds']}) "
        f"as one vmapped program ({compiled}{sw['device']}): {steady:.0f} member-steps/s after the first epoch "
        f"({sw['member_steps_per_s']:.0f} counting the compile) over {sw['steps_run']} steps; one by one: "
        f"{sw['best_single_steps_per_s']:.1f} steps/s (best of the plain loop, "
        f"{np.mean([s['loop_steps_per_s'] for s in singles]):.1f}, and the same code with one member, "
        f"{np.mean(one):.1f}): **{sw['throughput_ratio']:.1f}×** the throughput"
        + (f" ({sw['throughput_ratio_with_compile']:.1f}× counting the sweep's compile)." if "throughput_ratio_with_compile" in sw else "."),
    ]


def ablation(folder: Path) -> list[str]:
    ab = json.loads((folder / "ablation.json").read_text())
    lines = [
        f"Ablation (steps run: AdamW {ab['raw']['adamw']['steps']}, Grokfast-EMA {ab['raw']['grokfast_ema']['steps']}, "
        f"each capped by steps or wall time; seeds {ab['seeds']}, same number of configurations each):",
        "",
        "| pipeline | configuration | steps to 95%: median [min–max] (reached) |",
        "| --- | --- | --- |",
    ]
    names = {"adamw_tuned": "AdamW", "grokfast_ema": "Grokfast-EMA"}
    colors = {"adamw_tuned": "tab:blue", "grokfast_ema": "tab:red"}
    shown = [(name, r) for name in names for r in ab[name]["table"]]
    cap = max(ab["steps_run"])
    fig, ax = plt.subplots(figsize=(9, 0.32 * len(shown) + 1.5))
    for i, (name, r) in enumerate(shown):
        cfg = ", ".join(f"{a}={b:g}" for a, b in r["config"].items())
        lines.append(f"| {name} | {cfg} | {_fmt(r)} |")
        if r["median"] is None:
            ax.barh(i, cap, color="0.9", hatch="///", edgecolor="0.6")
            ax.text(cap * 0.02, i, f"not reached in {cap} steps ({r['reached']}/{r['of']} seeds)", va="center", fontsize=8)
        else:
            ax.barh(i, r["median"], color=colors[name],
                    xerr=[[r["median"] - r["min"]], [r["max"] - r["median"]]], error_kw={"lw": 0.8})
            ax.text(r["max"] + cap * 0.01, i, f"{r['median']:g} ({r['reached']}/{r['of']})", va="center", fontsize=8)
    ax.set_yticks(range(len(shown)),
                  [f"{names[n]} " + ", ".join(f"{SHORT.get(a, a)}={b:g}" for a, b in r["config"].items()) for n, r in shown],
                  fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, cap * 1.2)
    ax.set_xlabel("steps to 95% val acc: median, whiskers min–max over the seeds that reached it")
    ax.set_title(f"x·y mod 97: tuned AdamW against Grokfast-EMA, seeds {ab['seeds']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(folder / "ablation.png", dpi=120)
    plt.close(fig)
    b1, b2 = ab["adamw_tuned"]["best"], ab["grokfast_ema"]["best"]
    lines += ["", f"Best tuned AdamW: {b1['config']} → {_fmt(b1)}; best Grokfast-EMA: {b2['config']} → {_fmt(b2)}."]
    return lines


def main(folder: str) -> None:
    path = Path(folder)
    lines = ["# Modular arithmetic on the GPU", ""]
    lines += paper_curves(path) + [""] + sweep_heatmap(path) + [""] + ablation(path)
    (path / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/modular")
