"""grokxform.experiments: the modular task, the decoder, the functional loop, the MNIST loader and
the ``grokxform demo`` command, all on small settings (CPU, a few seconds)."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad

import grokxform as gx
from grokxform.experiments import cli, demo, mnist, modular
from grokxform.experiments.data import TaskData
from grokxform.experiments.optimizers import MNIST_OPTIMIZERS, MODULAR_OPTIMIZERS, modular_optimizer
from grokxform.experiments.train import EvalRecord, TrainResult, evaluate, train



@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    """One intra-op thread: these tiny steps gain nothing from two, and on a CPU shared with
    other jobs a second spinning thread makes them many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------- data


def test_equations_layout() -> None:
    tokens, results = modular.equations()
    assert tokens.shape == (9312, 4) and results.shape == (9312,)
    x, op, y, eq = tokens.T
    assert torch.equal(op, torch.full_like(op, 98)) and torch.equal(eq, torch.full_like(eq, 97))
    assert (x.min(), x.max(), y.min(), y.max()) == (0, 96, 1, 96)
    assert torch.equal(results, (x * y) % 97)
    assert len(set((x * 97 + y).tolist())) == 9312  # every (x, y) once
    assert tokens.max() < modular.VOCAB_SIZE == 99


def test_split_is_half_disjoint_and_seeded() -> None:
    d = modular.modular_data(seed=0)
    assert len(d.train_inputs) == len(d.val_inputs) == 4656
    key = lambda t: set((t[:, 0] * 97 + t[:, 2]).tolist())  # noqa: E731
    train_keys, val_keys = key(d.train_inputs), key(d.val_inputs)
    assert not train_keys & val_keys and len(train_keys | val_keys) == 9312
    assert torch.equal(d.train_targets, (d.train_inputs[:, 0] * d.train_inputs[:, 2]) % 97)
    again, other = modular.modular_data(seed=0), modular.modular_data(seed=1)
    assert torch.equal(again.train_inputs, d.train_inputs)
    assert not torch.equal(other.train_inputs, d.train_inputs)


def test_paper_setup_follows_one_rng_stream_and_leaves_global_rng_alone() -> None:
    """Seed → model init → randperm(split) → per-epoch shuffles, as the paper's main.py draws them."""
    before = torch.get_rng_state()
    setup = modular.paper_setup(seed=3)
    assert torch.equal(torch.get_rng_state(), before)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = modular.Decoder()
        perm = torch.randperm(9312)
        shuffle = torch.randperm(4656)
    tokens, _ = modular.equations()
    assert torch.equal(setup.data.train_inputs, tokens[perm[:4656]])
    assert torch.equal(torch.randperm(4656, generator=setup.generator), shuffle)
    for (n1, p1), (n2, p2) in zip(setup.model.named_parameters(), model.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)


# --------------------------------------------------------------------------- model


def test_decoder_has_the_papers_parameter_count() -> None:
    model = modular.make_decoder(seed=0)
    assert modular.num_parameters(model) == (422_784, 29)
    tokens = modular.modular_data(0).train_inputs[:6]
    assert model(tokens).shape == (6, 99)
    assert model(tokens, all_positions=True).shape == (6, 4, 99)


class _PaperBlock(nn.Module):
    """The paper's block written with nn.MultiheadAttention (sequence-first), as a reference."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = torch.triu(torch.full((len(x), len(x)), float("-inf")), diagonal=1)
        x = self.ln_1(x)
        x = x + self.attn(x, x, x, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


def test_decoder_matches_a_multihead_attention_reference() -> None:
    """Same seed → same parameters (names, order, values) and same logits as the paper's layout."""
    torch.manual_seed(0)
    ref = nn.ModuleDict(
        {
            "token_embeddings": nn.Embedding(99, 128),
            "position_embeddings": nn.Embedding(5, 128),
            "layers": nn.ModuleList([_PaperBlock(128, 4) for _ in range(2)]),
            "ln_f": nn.LayerNorm(128),
            "head": nn.Linear(128, 99, bias=False),
        }
    )
    model = modular.make_decoder(seed=0)
    ref_params, params = dict(ref.named_parameters()), dict(model.named_parameters())
    assert list(ref_params) == list(params)
    assert all(torch.equal(ref_params[k], params[k]) for k in params)
    tokens = modular.modular_data(0).val_inputs[:32]
    with torch.no_grad():
        h = ref["token_embeddings"](tokens.T) + ref["position_embeddings"](torch.arange(4)).unsqueeze(1)
        for block in ref["layers"]:
            h = block(h)
        expected = ref["head"](ref["ln_f"](h))[-1]
        torch.testing.assert_close(model(tokens), expected, rtol=1e-5, atol=1e-5)


def test_attention_is_causal() -> None:
    model = modular.make_decoder(seed=1)
    tokens = modular.modular_data(0).train_inputs[:16]
    changed = tokens.clone()
    changed[:, 3] = (changed[:, 3] + 5) % 97  # alter the last token only
    with torch.no_grad():
        a, b = model(tokens, all_positions=True), model(changed, all_positions=True)
    torch.testing.assert_close(a[:, :3], b[:, :3], rtol=0, atol=0)
    assert (a[:, 3] - b[:, 3]).abs().max() > 1e-3


def test_decoder_works_with_functional_call_and_func_grad() -> None:
    model = modular.make_decoder(seed=0)
    data = modular.modular_data(0)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(functional_call(model, p, (data.train_inputs[:64],)), data.train_targets[:64])

    grads = grad(loss)(params)
    assert list(grads) == list(params)
    params_ad = {k: v.detach().requires_grad_() for k, v in model.named_parameters()}
    expected = torch.autograd.grad(loss(params_ad), list(params_ad.values()))
    for g, e in zip(grads.values(), expected):
        torch.testing.assert_close(g, e)


# --------------------------------------------------------------------------- loop


def _small(data: TaskData, n: int) -> TaskData:
    return TaskData(data.train_inputs[:n], data.train_targets[:n], data.val_inputs[:n], data.val_targets[:n])


def test_loop_decreases_train_loss_and_leaves_the_model_alone() -> None:
    setup = modular.paper_setup(seed=0)
    data = _small(setup.data, 256)
    before = {k: v.clone() for k, v in setup.model.named_parameters()}
    loss0, _ = evaluate(setup.model, dict(setup.model.named_parameters()), data.train_inputs, data.train_targets)
    result = train(setup.model, gx.adamw(lr=1e-3, weight_decay=0.0), data, steps=20, batch_size=128)
    loss1, _ = evaluate(setup.model, result.params, data.train_inputs, data.train_targets)
    assert loss1 < loss0 - 0.3, (loss0, loss1)
    assert [r.step for r in result.history] == list(range(2, 21, 2)) and result.steps == 20
    assert all(torch.equal(before[k], v) for k, v in setup.model.named_parameters())
    assert not any(p.requires_grad for p in result.params.values())


def test_loop_counts_batches_keeps_the_last_small_one_and_stops_at_the_budget() -> None:
    setup = modular.paper_setup(seed=0)
    data = _small(setup.data, 1100)  # 1100 / 512 -> 3 batches an epoch (512, 512, 76)
    sizes: list[int] = []

    def spy() -> gx.GradientTransformation:
        def update(u: Any, s: Any, p: Any = None, **extra: Any) -> tuple[Any, Any]:
            sizes.append(int(extra["train_loss"].numel()))
            return gx.tree.tree_map(lambda g: None if g is None else torch.zeros_like(g), u), s

        return gx.GradientTransformation(lambda p: gx.EmptyState(), update)

    result = train(setup.model, spy(), data, steps=7, generator=setup.generator)
    assert [(r.step, r.epoch) for r in result.history] == [(3, 1), (6, 2), (7, 3)]
    assert len(sizes) == 7 and modular.steps_per_epoch(4656, 512) == 10


def test_loop_feeds_the_losses_to_the_transform() -> None:
    setup = modular.paper_setup(seed=0)
    data = _small(setup.data, 512)
    seen: list[dict[str, float]] = []

    def recorder() -> gx.GradientTransformation:
        def update(u: Any, s: Any, p: Any = None, **extra: Any) -> tuple[Any, Any]:
            seen.append({k: float(v) for k, v in extra.items()})
            return gx.tree.tree_map(lambda g: None if g is None else -1e-3 * g, u), s

        return gx.GradientTransformation(lambda p: gx.EmptyState(), update)

    result = train(setup.model, recorder(), data, steps=3, batch_size=256)
    assert list(seen[0]) == ["train_loss"] and list(seen[1]) == ["train_loss"]  # no evaluation yet
    assert seen[2]["val_loss"] == pytest.approx(result.history[0].val_loss)
    assert seen[2]["train_loss"] > 0
    seen.clear()
    train(setup.model, recorder(), data, steps=3, batch_size=256, pass_losses=False)
    assert seen == [{}, {}, {}]


def test_loop_stops_early_at_the_target() -> None:
    setup = modular.paper_setup(seed=0)
    data = _small(setup.data, 512)
    result = train(setup.model, gx.adamw(), data, steps=50, batch_size=256, target_accuracy=0.0, stop_at_target=True)
    assert result.steps == 2 and result.steps_to_target == 2 and result.reached
    assert result.seconds_to_target == result.history[0].seconds
    result = train(setup.model, gx.adamw(), data, steps=4, batch_size=256, target_accuracy=1.0)
    assert result.steps == 4 and result.steps_to_target is None and not result.reached


def test_loop_rejects_bad_arguments() -> None:
    setup = modular.paper_setup(seed=0)
    with pytest.raises(ValueError, match="batch_size"):
        train(setup.model, gx.adamw(), setup.data, steps=1, batch_size=0)
    with pytest.raises(ValueError, match="steps"):
        train(setup.model, gx.adamw(), setup.data, steps=-1)
    with pytest.raises(TypeError, match="TaskData"):
        train(setup.model, gx.adamw(), tuple(setup.data), steps=1)  # type: ignore[arg-type]


def test_modular_optimizers_are_the_papers() -> None:
    assert list(MODULAR_OPTIMIZERS) == ["baseline", "grokfast_ema", "grokfast_ma", "grokadamw"]
    with pytest.raises(ValueError, match="unknown name"):
        modular_optimizer("sgd")
    assert set(MNIST_OPTIMIZERS) == {"baseline", "grokfast_ema"}


def _paper_loop(
    setup: modular.ModularSetup, data: TaskData, steps: int, batch: int, filt: str
) -> dict[str, torch.Tensor]:
    """The paper's imperative loop: backward, filter on p.grad (EMA: μ seeded with g_1,
    ĝ = g + 2μ; MA: ĝ = g + 5·mean of the last 100 raw gradients once 100 are stored),
    torch.optim.Adam with coupled L2, LambdaLR(min(1, t/10))."""
    from collections import deque

    model = setup.model
    wd = {"none": 0.0, "ema": 0.005, "ma": 0.01}[filt]
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=wd)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, t / 10))
    mu: dict[str, torch.Tensor] = {}
    window: dict[str, deque[torch.Tensor]] = {}
    n_train = len(data.train_targets)
    per_epoch = n_train // batch
    for i in range(steps):
        if i % per_epoch == 0:  # a new epoch: reshuffle
            order = torch.randperm(n_train, generator=setup.generator)
        idx = order[(i % per_epoch) * batch : (i % per_epoch + 1) * batch]
        model.zero_grad()
        F.cross_entropy(model(data.train_inputs[idx]), data.train_targets[idx]).backward()
        for n, p in model.named_parameters():
            g = p.grad.detach().clone()
            if filt == "ema":
                mu[n] = g if n not in mu else mu[n] * 0.98 + g * 0.02
                p.grad = g + 2.0 * mu[n]
            elif filt == "ma":
                window.setdefault(n, deque(maxlen=100)).append(g)
                if len(window[n]) == 100:
                    p.grad = g + 5.0 * (sum(window[n]) / 100)
        opt.step()
        sched.step()
    return {k: v.detach() for k, v in model.named_parameters()}


@pytest.mark.parametrize(
    "name,filt,steps,n_train,batch",
    [("baseline", "none", 12, 1024, 128), ("grokfast_ema", "ema", 12, 1024, 128), ("grokfast_ma", "ma", 103, 256, 32)],
)
def test_loop_with_paper_optimizer_matches_the_papers_imperative_loop(
    name: str, filt: str, steps: int, n_train: int, batch: int
) -> None:
    setup = modular.paper_setup(seed=0, dtype=torch.float64)
    data = _small(setup.data, n_train)
    result = train(
        setup.model, MODULAR_OPTIMIZERS[name](), data, steps=steps, batch_size=batch, generator=setup.generator
    )
    ref_setup = modular.paper_setup(seed=0, dtype=torch.float64)
    ref = _paper_loop(ref_setup, data, steps, batch, filt)
    for k in ref:
        got, want = result.params[k], ref[k]
        if k.endswith("in_proj_bias"):
            # The key bias b_k shifts every score of a query row by q·b_k, which softmax ignores:
            # its gradient is exactly 0 and only rounding noise (~1e-19) reaches it. With L2 decay
            # through Adam, g + wd·θ ≈ wd·θ ≪ ε makes the step −η·wd·θ/ε, a factor −500 per step,
            # so that noise grows to O(η) and differs between any two implementations. It never
            # changes the outputs (checked below); compare the query and value biases only.
            got, want = torch.cat([got[:128], got[256:]]), torch.cat([want[:128], want[256:]])
        torch.testing.assert_close(got, want, rtol=1e-8, atol=1e-9)
    with torch.no_grad():
        logits = functional_call(setup.model, result.params, (data.val_inputs,))
        torch.testing.assert_close(logits, ref_setup.model(data.val_inputs), rtol=1e-8, atol=1e-8)


# --------------------------------------------------------------------------- CLI


@pytest.mark.slow
def test_demo_runs_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "plots" / "demo.png"
    status = cli.main(
        ["demo", "--steps", "20", "--seed", "1", "--out", str(out), "--threads", "1", "--no-progress-bar"]
    )
    assert status == 0
    printed = capsys.readouterr()
    for name in demo.DEMO_RUNS:
        assert name in printed.out
    assert printed.out.count("not reached in 20 steps") == 2 and "1 CPU thread(s)," in printed.out
    assert "[baseline] step     20/20" in printed.err
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed" in printed.out and not out.exists()
    else:
        assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"curves written to {out}" in printed.out


def test_demo_selects_runs_and_rejects_unknown_ones(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--runs", "baseline,adagrad"])
    assert exc.value.code == 2 and "adagrad" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["demo", "--steps", "0"])
    capsys.readouterr()
    status = cli.main(["demo", "--steps", "10", "--runs", "grokfast_ma", "--out", str(tmp_path / "a.png"), "--no-progress-bar"])
    assert status == 0
    table = capsys.readouterr().out.split("\n")
    assert any(line.startswith("grokfast_ma") for line in table)
    assert not any(line.startswith("baseline") for line in table)


def test_demo_defaults_and_full(monkeypatch: pytest.MonkeyPatch) -> None:
    """By default Adam and Grokfast-EMA, 1,200 steps each; ``--full`` the paper's four, 1,800 steps;
    ``--runs`` and ``--steps`` given win over either."""
    seen: list[tuple[list[str], int]] = []
    monkeypatch.setattr(cli, "run_demo", lambda runs, *, steps, **kw: seen.append((list(runs), steps)))
    for argv in (["demo"], ["demo", "--full"], ["demo", "--full", "--steps", "50", "--runs", "grokadamw"]):
        assert cli.main(argv) == 0
    assert seen == [(["baseline", "grokfast_ema"], 1200), (list(MODULAR_OPTIMIZERS), 1800), (["grokadamw"], 50)]


def test_auto_threads_falls_back_to_one_on_a_busy_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch, "get_num_threads", lambda: 4)
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (2.5, 1.0, 1.0))
    assert cli.auto_threads() == 1
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (0.2, 1.0, 1.0))
    assert cli.auto_threads() == 4


def test_format_table_reports_reached_runs() -> None:
    rec = EvalRecord(step=910, epoch=91, train_loss=0.1, train_acc=1.0, val_loss=0.2, val_acc=0.96, seconds=45.5)
    r = TrainResult(history=[rec], steps=910, seconds=45.5, steps_to_target=910, seconds_to_target=45.5)
    text = demo.format_table({"grokfast_ema": r}, budget=1500)
    assert "910" in text and "45.5" in text and "not reached" not in text


# --------------------------------------------------------------------------- MNIST


def _idx_bytes(magic: int, shape: tuple[int, ...], payload: bytes) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{len(shape)}I", *shape) + payload


def _write_mnist(root: Path, n_train: int = 12, n_test: int = 5, gz: bool = False) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    arrays = {
        "train_images": torch.randint(0, 256, (n_train, 28, 28), generator=g, dtype=torch.uint8),
        "train_labels": torch.randint(0, 10, (n_train,), generator=g, dtype=torch.uint8),
        "test_images": torch.randint(0, 256, (n_test, 28, 28), generator=g, dtype=torch.uint8),
        "test_labels": torch.randint(0, 10, (n_test,), generator=g, dtype=torch.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for key, name in mnist.FILES.items():
        a = arrays[key]
        magic = mnist.IMAGES_MAGIC if a.dim() == 3 else mnist.LABELS_MAGIC
        raw = _idx_bytes(magic, tuple(a.shape), a.numpy().tobytes())
        if gz:
            (root / (name + ".gz")).write_bytes(gzip.compress(raw))
        else:
            (root / name).write_bytes(raw)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_idx_loader_reads_what_was_written(tmp_path: Path, gz: bool) -> None:
    arrays = _write_mnist(tmp_path, gz=gz)
    loaded = mnist.load_mnist(tmp_path)
    for key, a in arrays.items():
        assert torch.equal(getattr(loaded, key), a)
    data = mnist.mnist_data(tmp_path, train_points=10)
    assert data.train_inputs.shape == (10, 784) and data.val_inputs.shape == (5, 784)
    assert data.train_inputs.dtype == torch.float32 and data.train_targets.dtype == torch.int64
    torch.testing.assert_close(data.train_inputs, arrays["train_images"][:10].reshape(10, -1).float() / 255)
    assert 0.0 <= float(data.train_inputs.min()) and float(data.train_inputs.max()) <= 1.0


def test_idx_loader_reads_other_dtypes(tmp_path: Path) -> None:
    path = tmp_path / "f.idx"
    path.write_bytes(_idx_bytes(0x00000D02, (2, 3), struct.pack(">6f", *range(6))))
    torch.testing.assert_close(mnist.read_idx(path), torch.arange(6, dtype=torch.float32).reshape(2, 3))


def test_idx_loader_errors_are_clear(tmp_path: Path) -> None:
    _write_mnist(tmp_path)
    labels = tmp_path / mnist.FILES["train_labels"]
    images = tmp_path / mnist.FILES["train_images"]
    images.write_bytes(labels.read_bytes())  # a label file where images belong
    with pytest.raises(ValueError, match=r"wrong IDX magic number 0x00000801, expected 0x00000803"):
        mnist.load_mnist(tmp_path)
    with pytest.raises(ValueError, match="not an IDX file"):
        images.write_bytes(b"\x12\x34\x08\x03" + bytes(20))
        mnist.read_idx(images)
    images.write_bytes(_idx_bytes(mnist.IMAGES_MAGIC, (12, 28, 28), bytes(100)))
    with pytest.raises(ValueError, match="needs 9408 bytes"):
        mnist.read_idx(images)
    gz = tmp_path / "broken.gz"
    gz.write_bytes(gzip.compress(_idx_bytes(mnist.LABELS_MAGIC, (3,), b"abc"))[:-6])
    with pytest.raises(ValueError, match="corrupt gzip"):
        mnist.read_idx(gz)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="does not download"):
        mnist.load_mnist(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="not a directory"):
        mnist.load_mnist(tmp_path / "missing")
    with pytest.raises(ValueError, match="train_points"):
        _write_mnist(tmp_path / "ok")
        mnist.mnist_data(tmp_path / "ok", train_points=13)


def test_mnist_model_and_loss() -> None:
    model = mnist.make_mlp(seed=0)
    assert sum(p.numel() for p in model.parameters()) == 784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10
    unscaled = mnist.make_mlp(seed=0, init_scale=1.0)
    for p, q in zip(model.parameters(), unscaled.parameters()):
        torch.testing.assert_close(p, 8.0 * q)
    logits, targets = torch.randn(7, 10), torch.randint(0, 10, (7,))
    expected = nn.MSELoss()(logits, torch.eye(10)[targets])
    torch.testing.assert_close(mnist.mse_one_hot(logits, targets), expected)


def test_mnist_task_trains_with_the_loop(tmp_path: Path) -> None:
    _write_mnist(tmp_path, n_train=40, n_test=20)
    model, data = mnist.mnist_setup(tmp_path, seed=0, train_points=40)
    result = train(model, MNIST_OPTIMIZERS["baseline"](), data, steps=10, batch_size=20, loss_fn=mnist.mse_one_hot)
    assert result.steps == 10 and len(result.history) == 5
    loss0, _ = evaluate(model, dict(model.named_parameters()), data.train_inputs, data.train_targets, mnist.mse_one_hot)
    loss1, _ = evaluate(model, result.params, data.train_inputs, data.train_targets, mnist.mse_one_hot)
    assert loss1 < loss0
