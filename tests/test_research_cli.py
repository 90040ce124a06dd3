"""The research command line and its instruments: ``grokxform --help``, ``python -m grokxform``,
``ablation run`` and ``report`` and ``reproduce`` end to end, clear errors for bad values, ``--task``,
the sweep's heatmap, the GrokAdamW ablation's report, and where ``--out`` writes (inside a folder it
names; an unwritable one refused before any training)."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from grokxform.experiments import ablation, cli, demo, reproduce
from grokxform.experiments import sweep as sweep_module
from grokxform.experiments.modular import P, equations, paper_setup

ROOT = Path(__file__).resolve().parents[1]


def test_help_of_the_command_and_of_every_subcommand(capsys):
    words = [*([g] for g in cli.GROUPS), *(list(c.words) for c in cli.COMMANDS)]
    for argv in (["--help"], *([*w, "--help"] for w in words)):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: {' '.join(['grokxform', *argv[:-1]])} ")
        if len(argv) == 1:
            assert all(c.words[0] in out for c in cli.COMMANDS) and "examples:" in out
            assert "steps to 95%" in out  # the help's literal % is printed, not taken as a format
        elif argv[:-1] == [argv[0]] and argv[0] in cli.GROUPS:
            assert all(c.words[-1] in out for c in cli.COMMANDS if c.words[0] == argv[0])
        else:
            assert "--device" in out or "FOLDER" in out


def test_python_dash_m_grokxform_is_the_command(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["grokxform", "--help"])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("grokxform", run_name="__main__", alter_sys=True)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(word in out for word in ("demo", "sweep", "ablation", "reproduce"))


def test_the_core_package_loads_no_experiment_and_one_module_parses_arguments():
    code = "import sys, grokxform; print(sorted(m for m in sys.modules if m.startswith('grokxform.experiments')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == "[]"
    parsers = sorted(p.name for p in (ROOT / "grokxform").rglob("*.py") if "argparse" in p.read_text())
    assert parsers == ["cli.py"]


def test_no_command_is_a_usage_error(capsys):
    for argv in ([], ["ablation"]):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv)
        assert exit_.value.code == 2
        assert "the following arguments are required: COMMAND" in capsys.readouterr().err


@pytest.mark.parametrize("seeds", ["a", "0,,1", "-1", "0,0", ""])
def test_sweep_rejects_bad_seeds_with_an_argparse_error(seeds, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["sweep", "--seeds", seeds, "--steps", "1", "--device", "cpu"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "argument --seeds" in err and "invalid literal" not in err


@pytest.mark.parametrize("argv,message", [
    (["sweep", "--alpha", "0.9,x"], "argument --alpha"),
    (["sweep", "--alpha", "nan"], "finite"),
    (["sweep", "--task", "pow"], "argument --task"),
    (["demo", "--task", "pow"], "argument --task"),
    (["sweep", "--threads", "0"], "argument --threads"),
    (["demo", "--device", "nowhere"], "argument --device: device 'nowhere' is not usable"),
    (["demo", "--runs", "baseline,baseline"], "argument --runs: a run is named twice"),
    (["sweep", "--gamma", "0.1"], "argument --gamma: the method grokfast_ema has no γ (grokadamw has)"),
    (["sweep", "grokadamw", "--kappa", "-1"], "argument --kappa: "),
    (["ablation", "run", "--program", "sgd"], "argument --program: invalid choice: 'sgd'"),
    (["ablation", "run", "--program", "adamw", "--seeds", "0,x"], "argument --seeds"),
    (["ablation", "run", "--program", "adamw", "--steps", "0"], "argument --steps: expected a positive integer"),
    (["ablation", "run", "--program", "adamw", "--max-seconds", "-5"], "argument --max-seconds"),
    (["ablation", "run", "--program", "adamw"], "the following arguments are required: --out"),
    (["ablation", "report", "nowhere"], "argument FOLDER: no results of an ablation program in nowhere"),
    (["reproduce", "--phases", "paper,fit"], "argument --phases: unknown phase 'fit'"),
    (["reproduce", "--compile", "all"], "argument --compile: unknown phase 'all'"),
    (["reproduce", "--baseline-steps", "-1"], "argument --baseline-steps"),
    (["reproduce", "--phases", "paper"], "the following arguments are required: --out"),
    (["sweep", "--task", "mnist", "--steps", "1"], "argument --data-root: the mnist task needs the folder"),
    (["sweep", "lion", "--alpha", "0.9"], "argument --alpha: the method lion has no hyperparameter alpha"),
    (["sweep", "--state-format", "int8", "--state-block-size", "0"], "argument --state-block-size: must be an int >= 1"),
    (["compare", "--methods", "sgd", "--out", "o"], "argument --methods: unknown method 'sgd'"),
    (["compare", "--tasks", "mnist", "--out", "o"], "argument --data-root: the mnist task needs the folder"),
    (["compare", "--seeds", "0,1", "--out", "o"], "argument --seeds: the best configuration is rerun over 5 seeds"),
])
def test_bad_values_are_argparse_errors(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where the default --out of a sweep is checked
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith(f"usage: grokxform {argv[0]}"), err


def test_sweep_reports_an_out_of_range_value_of_any_member(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["sweep", "--alpha", "0.9,1.5", "--seeds", "0", "--steps", "1", "--device", "cpu",
                  "--out", str(tmp_path / "x")])
    assert exit_.value.code == 2
    assert "argument --alpha: ema_filter: alpha must be in [0.0, 1.0), got 1.5" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()


def test_tasks_compute_their_operation():
    from grokxform.experiments.modular import TASKS

    x0, y0 = 5, 7
    want = {"mul": 35, "add": 12, "sub": (5 - 7) % P, "div": next(r for r in range(P) if (r * 7) % P == 5)}
    for task in TASKS:
        tokens, results = equations(P, task)
        assert tokens.shape == (P * (P - 1), 4) and results.min() >= 0 and results.max() < P
        row = ((tokens[:, 0] == x0) & (tokens[:, 2] == y0)).nonzero().item()
        assert results[row].item() == want[task], task
    x, y = equations(P, "div")[0][:, 0], equations(P, "div")[0][:, 2]
    assert torch.equal((equations(P, "div")[1] * y) % P, x)
    with pytest.raises(ValueError, match="choose from mul, add, sub, div"):
        equations(P, "pow")
    # same model and split for every task: only the targets change
    a, b = paper_setup(0, task="mul"), paper_setup(0, task="sub")
    assert torch.equal(a.data.train_inputs, b.data.train_inputs)
    assert not torch.equal(a.data.train_targets, b.data.train_targets)


def test_heatmap_names_members_and_stays_readable_when_none_reach():
    import matplotlib.pyplot as plt

    members = [{"alpha": a, "lamb": lam, "weight_decay": 0.01, "seed": s}
               for a in (0.9, 0.98) for lam in (1.0, 2.0) for s in (0, 1)]
    steps = [None] * len(members)
    steps[0] = 10  # alpha 0.9, lamb 1: one of two seeds, at step 10 (a light cell)
    steps[2] = steps[3] = 95  # alpha 0.9, lamb 2: both, at 95 (a dark cell)
    fig = sweep_module.heatmap_figure(members, steps, 100, "a title long enough to need more than one line on a plot only a few cells wide")
    ax = fig.axes[0]
    texts = {t.get_text(): t.get_color() for t in ax.texts}
    assert texts["10\n(1/2)"] == "k" and texts["95\n(2/2)"] == "w"  # text contrasts with its cell
    unreached = [(t, c) for t, c in texts.items() if t.startswith("none in")]
    assert unreached and all(c == "k" and "(0/2)" in t for t, c in unreached)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["alpha=0.9", "alpha=0.98"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["lamb=1, weight_decay=0.01", "lamb=2, weight_decay=0.01"]
    assert "\n" in ax.get_title()
    plt.close(fig)


@pytest.mark.slow
def test_grokadamw_sweep_member_matches_grokadamw_alone():
    """The sweep's clip / signal knobs are grokadamw's own: clip 0 (off) and κ, past the first
    evaluation (where the loss signal starts), equal a single run of ``grokadamw``."""
    from grokxform.experiments.methods import PAPER_B2
    from grokxform.experiments.sweep import sweep
    from grokxform.experiments.train import train
    from grokxform.pipelines import grokadamw
    from grokxform.transforms.schedules import linear_warmup

    members = [{"clip": c, "grokking_signal_decay_rate": 1.0, "seed": 0} for c in (0.0, 1.0)]
    steps = 11  # one past the first evaluation, from which on the signal reads the losses
    res = sweep("grokadamw", {}, members=members, steps=steps, static={"gamma": 0.0})
    assert res.static == {"gamma": 0.0, "warmup_steps": 10}
    setup = paper_setup(0)  # the clip-off member (the clip-on path is grokadamw's own, tested in test_sweep)
    tx = grokadamw(lr=linear_warmup(1e-3, 10), betas=(0.9, PAPER_B2), gamma=0.0,
                   grokking_signal_decay_rate=1.0, gradient_clipping=0.0)
    alone = train(setup.model, tx, setup.data, steps=steps, generator=setup.generator)
    for name in ("head.weight", "layers.1.mlp.0.weight"):
        torch.testing.assert_close(res.params[name][0], alone.params[name], rtol=1e-5, atol=1e-6)
    assert not torch.equal(res.params["head.weight"][0], res.params["head.weight"][1])
    with pytest.raises(ValueError, match="fixed argument"):
        sweep("adamw", {"b1": [0.9]}, static={"gamma": 0.0}, steps=1)


def _payload(pipeline, static, members, steps):
    return {"program": pipeline, "device": "cpu", "torch": "x", "date": "d", "seeds": [0, 1], "step_cap": 100,
            "task": "mul", "pipeline": pipeline, "static": static, "members": members, "steps_to_target": steps,
            "steps": 100, "final_val_acc": [0.5] * len(members)}


def test_ablation_report_states_each_piece(tmp_path):
    base = {k: v for k, v in ablation.GROKADAMW_DEFAULTS.items() if k != "gamma"}
    on, off = {**base}, {**base, "grokking_signal_decay_rate": 0.0}
    members = [{**on, "seed": 0}, {**on, "seed": 1}, {**off, "seed": 0}, {**off, "seed": 1}]
    (tmp_path / "grokadamw_g0.1.json").write_text(json.dumps(_payload("grokadamw", {"gamma": 0.1}, members,
                                                                      [50, 60, None, 40])))
    (tmp_path / "adamw.json").write_text(json.dumps(_payload("adamw", {}, [{"weight_decay": 1.0, "b1": 0.9, "seed": 0}],
                                                             [30])))
    lines = "\n".join(ablation.report(tmp_path))
    assert "| κ | 0 | 1/2 | 40 | faster 1, slower 1, same 0 |" in lines
    assert "| κ | 0.1 | 2/2 | 55 | default |" in lines
    assert "GrokAdamW γ=0.1 κ=0 clip=1 wd=0.01 λ=2 α=0.98 | 40 [40–40] (1/2) |" in lines
    assert "Best AdamW (tuned): AdamW (tuned) wd=1 β1=0.9 → 30 [30–30] (1/1)" in lines
    assert (tmp_path / "ablation_table.md").exists()
    assert (tmp_path / "grokadamw_ablation.png").read_bytes()[:4] == b"\x89PNG"


# --------------------------------------------------------------------------- output paths


@pytest.mark.parametrize("trailing_separator", [False, True], ids=["existing-folder", "new-folder-with-separator"])
def test_demo_out_naming_a_folder_writes_inside_it(tmp_path, capsys, trailing_separator):
    folder = tmp_path / "plots"
    if trailing_separator:
        out = f"{folder}{os.sep}"
    else:
        folder.mkdir()
        out = str(folder)
    status = cli.main(["demo", "--steps", "2", "--runs", "grokfast_ma", "--out", out, "--threads", "1",
                       "--no-progress-bar"])
    assert status == 0
    assert (folder / "grokxform_demo.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "plots.png").exists()
    assert f"curves written to {folder / 'grokxform_demo.png'}" in capsys.readouterr().out


def test_sweep_out_naming_a_folder_writes_inside_it(tmp_path):
    status = cli.main(["sweep", "--alpha", "0.9", "--lamb", "1,2", "--seeds", "0", "--steps", "1", "--device", "cpu",
                       "--out", str(tmp_path), "--threads", "1", "--no-progress-bar"])
    assert status == 0
    assert json.loads((tmp_path / "grokxform_sweep.json").read_text())["steps"] == 1
    assert (tmp_path / "grokxform_sweep.png").read_bytes()[:4] == b"\x89PNG"
    assert not tmp_path.with_suffix(".json").exists()


def _never_trains(*args, **kwargs):
    raise AssertionError("trained before checking --out")


def _unwritable_outs(tmp_path):
    """Outputs that cannot be written: under a regular file (refused for root too), and a folder
    without write permission when not running as root (root writes anywhere)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    outs = [(blocker / "sub" / "out", "a_file is a file, not a folder")]
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        outs.append((locked / "out", "Permission denied"))
    return outs


@pytest.mark.parametrize("command", ["demo", "sweep", "ablation", "reproduce", "compare"])
def test_an_unwritable_out_is_refused_before_any_training(tmp_path, monkeypatch, capsys, command):
    monkeypatch.setattr(demo, "train", _never_trains)
    monkeypatch.setattr(sweep_module, "sweep", _never_trains)
    monkeypatch.setattr(ablation, "sweep", _never_trains)
    monkeypatch.setattr(reproduce, "paper_rows", _never_trains)
    monkeypatch.setattr(cli, "run_compare", _never_trains)
    argv = {
        "demo": lambda out: ["demo", "--steps", "1", "--out", str(out / "demo.png"), "--no-progress-bar"],
        "sweep": lambda out: ["sweep", "--alpha", "0.9", "--steps", "1", "--device", "cpu", "--out", str(out / "grid")],
        "ablation": lambda out: ["ablation", "run", "--program", "adamw", "--out", str(out), "--steps", "1",
                                 "--device", "cpu"],
        "reproduce": lambda out: ["reproduce", "--out", str(out), "--phases", "paper", "--device", "cpu"],
        "compare": lambda out: ["compare", "--out", str(out), "--small", "--device", "cpu"],
    }[command]
    for out, reason in _unwritable_outs(tmp_path):
        with pytest.raises(SystemExit) as exit_:
            cli.main(argv(out))
        assert exit_.value.code == 2
        err = capsys.readouterr().err
        assert f"argument --out: cannot write in {tmp_path}" in err and reason in err, err


# --------------------------------------------------------------------------- ablation and reproduce, end to end


def test_ablation_run_then_report_end_to_end(tmp_path, capsys):
    out = tmp_path / "ablation"
    for program in ("grokadamw_g0.1", "adamw"):
        assert cli.main(["ablation", "run", "--program", program, "--out", str(out), "--limit", "2", "--seeds", "0",
                         "--steps", "2", "--device", "cpu", "--threads", "1"]) == 0
        payload = json.loads((out / f"{program}.json").read_text())
        assert payload["program"] == program and payload["seeds"] == [0] and payload["step_cap"] == 2
        assert len(payload["members"]) == 2 and payload["steps"] == 2 and payload["device"] == "cpu"
    assert "[adamw] wrote" in capsys.readouterr().out
    assert cli.main(["ablation", "report", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("# GrokAdamW ablation: x·y mod 97, seeds [0], step cap 2")
    assert (out / "ablation_table.md").read_text() == printed
    assert (out / "grokadamw_ablation.png").read_bytes()[:4] == b"\x89PNG"


def test_reproduce_runs_its_phases_end_to_end(tmp_path, capsys):
    out = tmp_path / "reproduce"
    assert cli.main(["reproduce", "--out", str(out), "--phases", "paper,baseline", "--seeds", "0",
                     "--max-steps", "2", "--baseline-steps", "2", "--compile", "none", "--task", "add",
                     "--device", "cpu", "--threads", "1"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["baseline.json", "paper.json"]
    paper = json.loads((out / "paper.json").read_text())
    assert paper["task"] == "add" and paper["device"] == "cpu" and paper["seeds"] == [0]
    assert [[r["steps"] for r in paper[name]["runs"]] for name in ("grokfast_ema", "grokfast_ma")] == [[2], [2]]
    baseline = json.loads((out / "baseline.json").read_text())["baseline"]
    assert baseline["steps_run"] == 2 and baseline["compiled"] is False and baseline["per_seed"] == [None]
    assert f"wrote {out / 'baseline.json'}" in capsys.readouterr().out


def test_reproduce_passes_its_options_to_the_sweep_and_ablation_phases(tmp_path, monkeypatch):
    """Their grids train 36 members at once (gigabytes on a CPU): the options they get, not the
    training, are checked here."""
    calls = []
    monkeypatch.setattr(reproduce, "sweep_throughput", lambda *a: calls.append(("sweep", a)) or {"members": 36})
    monkeypatch.setattr(reproduce, "ablation", lambda *a: calls.append(("ablation", a)) or {"budget_steps": a[1]})
    out = tmp_path / "reproduce"
    assert cli.main(["reproduce", "--out", str(out), "--phases", "ablation,sweep", "--sweep-steps", "7",
                     "--single-steps", "3", "--ablation-steps", "5", "--phase-seconds", "9.5", "--compile", "sweep",
                     "--task", "div", "--device", "cpu", "--threads", "1"]) == 0
    cpu = torch.device("cpu")
    assert calls == [("ablation", (cpu, 5, False, 9.5, "div")), ("sweep", (cpu, 7, 3, True, 9.5, "div"))]
    assert json.loads((out / "sweep.json").read_text())["members"] == 36
    assert json.loads((out / "ablation.json").read_text())["task"] == "div"
