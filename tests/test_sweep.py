"""The vmapped sweep: each member's numbers are those of training it alone."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from grokxform.experiments.methods import build
from grokxform.experiments.modular import paper_setup
from grokxform.experiments.sweep import cpu_name, grid_members, median_and_spread, sweep
from grokxform.experiments.train import train


def test_grid_members_is_the_product_with_seeds():
    members = grid_members({"alpha": [0.9, 0.98], "lamb": [1.0]}, seeds=[0, 1, 2])
    assert len(members) == 6
    assert members[0] == {"alpha": 0.9, "lamb": 1.0, "seed": 0}
    assert {m["seed"] for m in members} == {0, 1, 2}


@pytest.mark.slow
@pytest.mark.parametrize("pipeline,grid", [
    ("grokfast_ema", {"alpha": [0.9, 0.98], "weight_decay": [0.005]}),
    ("adam", {"b1": [0.8], "weight_decay": [0.0, 0.1]}),
])
def test_each_member_matches_its_single_run(pipeline, grid):
    steps = 3
    result = sweep(pipeline, grid, seeds=[0], steps=steps)
    assert result.steps == steps and len(result.val_acc) == 1
    for i, member in enumerate(result.members):
        setup = paper_setup(member["seed"])
        hyper = {k: v for k, v in member.items() if k != "seed"}
        tx = build(pipeline, hyper, warmup_steps=10)
        alone = train(setup.model, tx, setup.data, steps=steps, generator=setup.generator)
        for name, p in alone.params.items():
            got = result.params[name][i]
            if name.endswith("in_proj_bias"):
                # The key bias has a zero gradient in exact maths (softmax ignores a shift shared by
                # all keys); Adam normalises its float noise to ±lr, which batching changes. Compare
                # the query and value parts.
                d = p.shape[0] // 3
                got, p = torch.cat([got[:d], got[2 * d:]]), torch.cat([p[:d], p[2 * d:]])
            torch.testing.assert_close(got, p, rtol=1e-5, atol=1e-6)
        assert abs(alone.history[-1].val_acc - result.val_acc[-1][i]) < 1e-3
    # members with different hyperparameters did train differently
    a, b = (result.params[n] for n in ["head.weight"] * 2)
    assert not torch.equal(a[0], b[1])


def test_sweep_rejects_unknown_names():
    with pytest.raises(ValueError, match="unknown method 'sgd'"):
        sweep("sgd", {"lr": [1.0]})
    with pytest.raises(ValueError, match="sweepable"):
        sweep("grokfast_ema", {"window_size": [3.0]}, steps=1)
    with pytest.raises(ValueError, match="unknown task 'pow'"):
        sweep("adam", {"lr": [1e-3]}, steps=1, task="pow")
    with pytest.raises(ValueError, match="eval_every must be an int >= 1"):
        sweep("adam", {"lr": [1e-3]}, steps=1, eval_every=0)


def test_sweep_command_writes_json_and_heatmap(tmp_path, capsys):
    import json

    from grokxform.experiments import cli

    prefix = tmp_path / "out" / "grid"
    status = cli.main(["sweep", "--alpha", "0.9,0.98", "--lamb", "2", "--seeds", "0", "--steps", "2",
                       "--device", "cpu", "--out", str(prefix)])
    assert status == 0
    printed = capsys.readouterr().out
    assert "2 members" in printed and "member-steps/s" in printed
    payload = json.loads(prefix.with_suffix(".json").read_text())
    assert [m["alpha"] for m in payload["members"]] == [0.9, 0.98] and payload["steps"] == 2
    head = subprocess.run(["git", "-C", str(Path(__file__).parents[1]), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=False).stdout.strip() or None  # None: tested outside a checkout
    assert payload["git_commit"] == head and payload["torch"] == torch.__version__
    assert payload["device_name"] == cpu_name() and payload["date"] and payload["state_bytes"] > 0
    assert prefix.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit) as exit_:
        cli.main(["sweep", "adam", "--alpha", "0.9", "--steps", "1", "--device", "cpu",
                  "--out", str(prefix)])
    assert exit_.value.code == 2
    assert "argument --alpha: the method adam has no hyperparameter alpha" in capsys.readouterr().err


def test_median_and_spread():
    assert median_and_spread([30, None, 10, 20]) == {"median": 20, "min": 10, "max": 30, "reached": 3, "of": 4}
    assert median_and_spread([None])["median"] is None


@pytest.mark.slow
def test_compiled_sweeps_compile_each_step_once_in_one_process():
    """Each compiled sweep's steps are graphs of their own: with torch.compile allowed one graph
    per code object, two GrokAdamW sweeps (a first step and a later step each) run in one process.
    torch.func.vmap's wrappers share one code object, and a state leaf returned broadcast would
    change the next call's strides: either would need a second graph and fail here."""
    import torch._dynamo

    with torch._dynamo.config.patch(recompile_limit=1):
        for lr in (1e-3, 3e-3):
            res = sweep("grokadamw", {"lr": [lr]}, seeds=[0, 1], steps=4, task="parity", batch_size=8,
                        eval_every=2, val_points=32, compile=True)
            eager = sweep("grokadamw", {"lr": [lr]}, seeds=[0, 1], steps=4, task="parity", batch_size=8,
                          eval_every=2, val_points=32)
            for name, p in eager.params.items():
                torch.testing.assert_close(res.params[name], p, rtol=1e-5, atol=1e-6, msg=name)
