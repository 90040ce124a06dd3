"""Real clients: ``grokxform.Optimizer`` driven by Lightning's ``Trainer`` and by transformers' ``Trainer``.

Both trainers get ``grokxform.Optimizer(..., grokxform.grokadamw, lr=...)`` and a torch LR scheduler,
train a tiny model built in the test (no download, no tokenizer) on synthetic data, save checkpoints
through their own machinery, and resume from them. Resuming is checked bit for bit against an
uninterrupted run of the same length: parameters, the optimizer's whole state dict, the scheduler.
Under Lightning that needs the data order and dropout's masks restored too: with a shuffled loader
or dropout, only a checkpoint that keeps torch's RNG state resumes bit for bit. The Trainer-built
two param groups equal one group with a decay mask up to the summation order of the clip's norm.

The packages are pinned in the ``test`` extra of pyproject.toml, so CI runs these tests.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import grokxform as gx

# Lightning's notes on choices these tests make on purpose: a resumed run writes its checkpoints to
# another folder, and a manual-optimization checkpoint holds the state after the step (so does an
# automatic one taken at the end of a batch).
pytestmark = [
    pytest.mark.filterwarnings("ignore:The dirpath has changed from"),
    pytest.mark.filterwarnings("ignore:Using ModelCheckpoint with manual optimization"),
]

LR = 1e-2
WARMUP = 4


def _warmup(step: int) -> float:
    return min(1.0, (step + 1) / WARMUP)


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    """The models are tiny: on a small shared CPU, intra-op threads only contend (one thread runs
    these tests several times faster). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _assert_same(a: Any, b: Any, path: str = "") -> None:
    """``a`` and ``b`` are the same tree, tensors ``torch.equal`` (bit for bit)."""
    assert type(a) is type(b), f"{path}: {type(a).__name__} != {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        same_kind = a.dtype == b.dtype and a.shape == b.shape
        assert same_kind, f"{path}: {a.dtype}{tuple(a.shape)} != {b.dtype}{tuple(b.shape)}"
        assert torch.equal(a, b), f"{path}: max |diff| {(a.double() - b.double()).abs().max().item()}"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: keys {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            _assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{path}: length {len(a)} != {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{path}/{i}")
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def _assert_state_populated(opt: gx.Optimizer, model: nn.Module, steps: int) -> None:
    for name, p in model.named_parameters():
        st = opt.state[p]
        for key in ("adam.mu", "adam.nu", "grokfast.mu"):
            assert key in st, f"{name}: {key} missing from opt.state ({sorted(st)})"
            assert st[key].shape == p.shape and bool(st[key].abs().sum() > 0), f"{name}: {key} is empty"
        assert int(st["adam.count"]) == steps, f"{name}: adam.count {int(st['adam.count'])} != {steps}"
    assert int(opt.metrics()["count"]) == steps


# -- Lightning ---------------------------------------------------------------------------------

# A teacher y = tanh(x·w) + noise: 64 training samples (4 batches of 16), 64 held out.
_G = torch.Generator().manual_seed(0)
_W = torch.randn(8, 1, generator=_G)
_X = torch.randn(128, 8, generator=_G)
_Y = torch.tanh(_X @ _W) + 0.1 * torch.randn(128, 1, generator=_G)
X_TRAIN, Y_TRAIN, X_VAL, Y_VAL = _X[:64], _Y[:64], _X[64:], _Y[64:]
BATCHES_PER_EPOCH = 4


@functools.cache
def _regressor_class() -> type:
    L = pytest.importorskip("lightning")

    class Regressor(L.LightningModule):
        """An MLP. ``feed_signal=False``: automatic optimization (Lightning calls
        ``opt.step(closure)``). ``feed_signal=True``: manual optimization, each step passes
        ``train_loss=`` (the batch) and ``val_loss=`` (the held-out set) to ``opt.step``."""

        def __init__(self, feed_signal: bool) -> None:
            super().__init__()
            self.automatic_optimization = not feed_signal
            self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
            self.losses: list[float] = []
            self.sent: list[tuple[float, float]] = []  # (train_loss, val_loss) given to opt.step
            self.seen: list[tuple[float, float]] = []  # (grokfast/signal, grokfast/alpha) after it

        def training_step(self, batch: Any, batch_idx: int) -> Any:
            x, y = batch
            loss = F.mse_loss(self.net(x), y)
            self.losses.append(loss.item())
            if self.automatic_optimization:
                return loss
            opt, sched = self.optimizers(), self.lr_schedulers()
            with torch.no_grad():
                val_loss = F.mse_loss(self.net(X_VAL), Y_VAL)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step(train_loss=loss.detach(), val_loss=val_loss)
            sched.step()
            m = self.trainer.optimizers[0].metrics(floats=True)
            self.sent.append((loss.item(), val_loss.item()))
            self.seen.append((m["grokfast/signal"], m["grokfast/alpha"]))
            return None

        def configure_optimizers(self) -> Any:
            opt = gx.Optimizer(self.named_parameters(), gx.grokadamw, lr=LR)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Regressor


def _fit_lightning(
    root: Path, feed_signal: bool, max_steps: int, *, save_every: int = 0, ckpt_path: Path | None = None,
    cls: type | None = None, shuffle: bool = False,
) -> tuple[Any, Any]:
    """Seed, build the module (``cls``, a subclass of the regressor, or the regressor), ``trainer.fit``
    it on a DataLoader (shuffled or not); returns (module, trainer)."""
    L = pytest.importorskip("lightning")
    from lightning.pytorch.callbacks import ModelCheckpoint

    L.seed_everything(0 if ckpt_path is None else 1, verbose=False)  # a resumed run must not rely on the init
    module = (cls or _regressor_class())(feed_signal)
    callbacks = []
    if save_every:
        callbacks.append(ModelCheckpoint(dirpath=root / "ckpt", every_n_train_steps=save_every, save_top_k=-1))
    trainer = L.Trainer(
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=bool(save_every),
        callbacks=callbacks,
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(X_TRAIN, Y_TRAIN), batch_size=16, shuffle=shuffle, num_workers=0
    )
    trainer.fit(module, loader, ckpt_path=ckpt_path, weights_only=True if ckpt_path is not None else None)
    return module, trainer


def _train_mse(module: nn.Module) -> float:
    with torch.no_grad():
        return F.mse_loss(module.net(X_TRAIN), Y_TRAIN).item()


def test_lightning_fit_lowers_the_loss_and_fills_the_state(tmp_path: Path) -> None:
    L = pytest.importorskip("lightning")
    L.seed_everything(0, verbose=False)
    before = _train_mse(_regressor_class()(False))  # the very init _fit_lightning builds (same seed)
    module, trainer = _fit_lightning(tmp_path, feed_signal=False, max_steps=24)
    after = _train_mse(module)
    assert after < 0.5 * before, (before, after)
    assert trainer.global_step == 24
    opt = trainer.optimizers[0]
    assert isinstance(opt, gx.Optimizer)
    _assert_state_populated(opt, module, 24)
    # The scheduler drove the learning rate that the transform used.
    assert opt.param_groups[0]["lr"] == LR
    assert opt.metrics(floats=True)["lr"] == LR


def test_lightning_manual_step_feeds_the_grokking_signal(tmp_path: Path) -> None:
    module, trainer = _fit_lightning(tmp_path, feed_signal=True, max_steps=16)
    assert trainer.global_step == 16 and len(module.seen) == 16
    alphas = []
    for (train_loss, val_loss), (signal, alpha) in zip(module.sent, module.seen):
        expected = max(0.0, val_loss - train_loss) / max(val_loss, train_loss)
        assert signal == pytest.approx(expected, rel=1e-5, abs=1e-7)
        assert alpha == pytest.approx(0.98 * math.exp(-0.1 * expected), rel=1e-6)
        alphas.append(alpha)
    assert min(alphas) < 0.98 - 1e-3, alphas  # the held-out loss is above the batch loss: α < α_init
    assert len({round(a, 9) for a in alphas}) > 4, alphas  # and α moves from step to step
    assert _train_mse(module) < 0.5 * module.losses[0]


@pytest.mark.parametrize("feed_signal", [False, True], ids=["automatic", "manual-signal"])
def test_lightning_resume_is_bit_for_bit(tmp_path: Path, feed_signal: bool) -> None:
    # The checkpoint is at an epoch boundary (step 8 = 2 epochs of 4 batches). Lightning restarts a
    # plain DataLoader's epoch from its first batch when resuming mid-epoch (it warns that the
    # loader is not resumable), so a mid-epoch resume would see other batches: a data-order
    # difference, not an optimizer one.
    n, k = 16, 2 * BATCHES_PER_EPOCH
    full, full_trainer = _fit_lightning(tmp_path / "full", feed_signal, n, save_every=k)
    ckpt = next((tmp_path / "full" / "ckpt").glob(f"*step={k}.ckpt"))

    raw = torch.load(ckpt, weights_only=True)  # the whole .ckpt is plain containers
    assert raw["optimizer_states"][0]["param_groups"][0]["grokxform_transform"] == "grokxform.pipelines.grokadamw"
    assert raw["global_step"] == k

    resumed, resumed_trainer = _fit_lightning(tmp_path / "resumed", feed_signal, n, save_every=k, ckpt_path=ckpt)
    assert resumed_trainer.global_step == n
    assert resumed.losses == full.losses[k:]  # the same batch losses, step by step
    _assert_same(dict(resumed.named_parameters()), dict(full.named_parameters()), "params")
    opt_full, opt_resumed = full_trainer.optimizers[0], resumed_trainer.optimizers[0]
    _assert_same(opt_resumed.state_dict(), opt_full.state_dict(), "optimizer")
    _assert_same(
        resumed_trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        full_trainer.lr_scheduler_configs[0].scheduler.state_dict(),
        "scheduler",
    )
    if feed_signal:
        assert resumed.seen == full.seen[k:]


def _dropout_regressor(dropout: float, restore_rng: bool) -> type:
    """The regressor with dropout (probability ``dropout``) before its output layer; ``restore_rng``:
    its checkpoint also holds torch's global RNG state (``on_save_checkpoint``), set back on loading."""

    class Dropout(_regressor_class()):  # type: ignore[misc]
        def __init__(self, feed_signal: bool) -> None:
            super().__init__(feed_signal)
            self.net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Dropout(dropout), nn.Linear(32, 1))

        if restore_rng:
            def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
                checkpoint["torch_rng_state"] = torch.get_rng_state()

            def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
                torch.set_rng_state(checkpoint["torch_rng_state"])

    return Dropout


@pytest.mark.parametrize("shuffle, dropout, restore_rng", [
    (True, 0.0, False), (False, 0.1, False), (True, 0.1, False), (True, 0.1, True),
], ids=["shuffle", "dropout", "shuffle-dropout", "shuffle-dropout-rng-restored"])
def test_lightning_resume_with_shuffle_or_dropout_needs_the_rng_state(
    tmp_path: Path, shuffle: bool, dropout: float, restore_rng: bool
) -> None:
    """Lightning's checkpoint restores the model, the optimizer and the scheduler, not torch's RNG:
    a shuffled DataLoader draws each epoch's order, and dropout its masks, from that RNG, so a
    resumed run sees other batches or masks than the uninterrupted one. With the RNG state saved in
    the checkpoint and set back on loading, the resumed run is the uninterrupted one bit for bit."""
    n, k = 16, 2 * BATCHES_PER_EPOCH
    cls = _dropout_regressor(dropout, restore_rng)
    full, _ = _fit_lightning(tmp_path / "full", False, n, save_every=k, cls=cls, shuffle=shuffle)
    ckpt = next((tmp_path / "full" / "ckpt").glob(f"*step={k}.ckpt"))
    resumed, _ = _fit_lightning(tmp_path / "resumed", False, n, save_every=k, ckpt_path=ckpt, cls=cls,
                                shuffle=shuffle)
    diff = max((a - b).abs().max().item() for a, b in zip(resumed.parameters(), full.parameters()))
    print(f"Lightning resume at step {k} of {n}, shuffle {shuffle}, dropout {dropout}, RNG state restored"
          f" {restore_rng}: largest |param diff| {diff:.3g}")  # the figures of docs/optimizer.md (pytest -s)
    if restore_rng:
        assert resumed.losses == full.losses[k:]
        _assert_same(dict(resumed.named_parameters()), dict(full.named_parameters()), "params")
    else:
        assert resumed.losses != full.losses[k:] and diff > 0


# -- transformers ------------------------------------------------------------------------------

def _unnamed_regressor(module_names: bool) -> type:
    """The regressor whose ``configure_optimizers`` passes ``self.parameters()`` (no names), with
    ``module=self`` or without it."""

    class Unnamed(_regressor_class()):  # type: ignore[misc]
        def configure_optimizers(self) -> Any:
            kw = {"module": self} if module_names else {}
            opt = gx.Optimizer(self.parameters(), gx.grokadamw, lr=LR, **kw)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return Unnamed


def test_lightning_unnamed_parameters_take_the_module_names(tmp_path: Path) -> None:
    """``Optimizer(self.parameters(), grokadamw, module=self)`` in ``configure_optimizers`` is the
    named run bit for bit (β1 by depth from "net.0.weight"...); without ``module=`` the depth rule
    refuses the positions, saying how to name them."""
    named, _ = _fit_lightning(tmp_path / "named", feed_signal=False, max_steps=6)
    unnamed, trainer = _fit_lightning(tmp_path / "unnamed", feed_signal=False, max_steps=6, cls=_unnamed_regressor(True))
    _assert_same(dict(unnamed.named_parameters()), dict(named.named_parameters()), "params")
    assert trainer.optimizers[0]._names == [[n for n, _ in unnamed.named_parameters()]]
    with pytest.raises(ValueError, match=r"named by its position.*module=model"):
        _fit_lightning(tmp_path / "positions", feed_signal=False, max_steps=2, cls=_unnamed_regressor(False))


SEQ = 16


class _Progressions(torch.utils.data.Dataset):
    """32 arithmetic progressions mod 64 (start and stride random): a next-token task a small
    GPT-2 learns quickly. Labels are the inputs (the model shifts them)."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        start = torch.randint(0, 64, (32, 1), generator=g)
        stride = torch.randint(1, 5, (32, 1), generator=g)
        self.ids = (start + stride * torch.arange(SEQ)) % 64

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _train_hf(out: Path, max_steps: int, save_steps: int, resume: Path | None = None) -> tuple[Any, Any, Any]:
    """A 2-layer GPT-2 from a config (no download) trained by ``transformers.Trainer`` with
    ``optimizers=(grokxform.Optimizer(...grokadamw...), LambdaLR)``; returns (model, opt, trainer)."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")

    transformers.set_seed(0 if resume is None else 1)  # a resumed run must not rely on the init
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=SEQ,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    model = transformers.GPT2LMHeadModel(config)
    opt = gx.Optimizer(model.named_parameters(), gx.grokadamw, lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _warmup)
    args = transformers.TrainingArguments(
        output_dir=str(out),
        max_steps=max_steps,
        per_device_train_batch_size=8,
        save_strategy="steps",
        save_steps=save_steps,
        logging_steps=1,
        max_grad_norm=0.0,  # grokadamw clips the global norm itself
        report_to=[],
        use_cpu=True,
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Progressions(), optimizers=(opt, sched))
    trainer.train(resume_from_checkpoint=str(resume) if resume is not None else None)
    return model, opt, trainer


def _hf_model_and_args(out: Path, max_steps: int) -> tuple[Any, Any]:
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    transformers.set_seed(0)
    config = transformers.GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=SEQ,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )
    args = transformers.TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=8, save_strategy="no",
        logging_steps=1, max_grad_norm=0.0, weight_decay=0.1, report_to=[], use_cpu=True, seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    return transformers.GPT2LMHeadModel(config), args


def _groups_and_mask(root: Path, steps: int, clip: float) -> tuple[Any, Any, gx.Optimizer]:
    """The same ``steps`` of ``transformers.Trainer`` twice: with the optimizer it builds itself
    (``optimizer_cls_and_kwargs``: two param groups, decay / no decay, of unnamed parameters, named
    by ``module=model``), and with one group whose decay split is a ``weight_decay_mask``. Returns
    (two-group model, one-group model, the two-group optimizer)."""
    transformers = pytest.importorskip("transformers")
    model, args = _hf_model_and_args(root / "groups", steps)
    kwargs = {"tx": gx.grokadamw, "module": model, "lr": LR, "gradient_clipping": clip}
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_Progressions(),
                                   optimizer_cls_and_kwargs=(gx.Optimizer, kwargs))
    trainer.train()
    reference, args = _hf_model_and_args(root / "mask", steps)
    decay = set(transformers.Trainer(model=reference, args=args).get_decay_parameter_names(reference))
    one = gx.Optimizer(reference.named_parameters(), gx.grokadamw, lr=LR, weight_decay=0.1, gradient_clipping=clip,
                       weight_decay_mask=lambda name, p: name in decay)
    transformers.Trainer(model=reference, args=args, train_dataset=_Progressions(), optimizers=(one, None)).train()
    return model, reference, trainer.optimizer.optimizer


def test_transformers_trainer_built_optimizer_keeps_depth_and_one_clip(tmp_path: Path) -> None:
    """With ``module=model`` the Trainer's two groups carry the module paths, and the clip takes one
    norm over both groups. The run equals one group with the decay split as a mask up to the order
    in which that norm is summed (another order over two groups than over one tree: the norm can
    differ in its last bit, and so can the clip's scale). After 30 steps, clipped on every one, the
    params differ by at most 2.4e-7, except the attention's key biases: their exact gradient is
    zero (softmax ignores a constant added to a row of scores), so their computed gradient is
    rounding noise that Adam scales up to steps of about lr, and they differ by up to 1.5e-5
    (CPU, torch 2.13)."""
    model, reference, opt = _groups_and_mask(tmp_path, 30, clip=0.05)
    assert len(opt.param_groups) == 2 and [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
    assert sorted(n for names in opt._names for n in names) == sorted(n for n, _ in model.named_parameters())
    m = opt.metrics(floats=True)
    assert m["group0/clip/norm"] == m["group1/clip/norm"] and m["group0/clip/scale"] < 1.0
    width = model.config.n_embd
    key_bias = elsewhere = 0.0
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        diff = (a - b).abs()
        if name.endswith("attn.c_attn.bias"):  # [query | key | value]
            key_bias = max(key_bias, diff[width:2 * width].max().item())
            diff = torch.cat([diff[:width], diff[2 * width:]])
        elsewhere = max(elsewhere, diff.max().item())
    print(f"two groups vs one group with a mask, 30 steps: largest |param diff| {elsewhere:.3g},"
          f" {key_bias:.3g} in the key biases")  # the figures of docs/optimizer.md (pytest -s)
    assert elsewhere <= 1e-6 and key_bias < 1e-4, (elsewhere, key_bias)


def test_transformers_trainer_groups_equal_the_mask_bit_for_bit_without_the_clip(tmp_path: Path) -> None:
    """With the clip off (``gradient_clipping=0``), nothing is summed over the groups: the
    two-group run is the one-group run with a mask, bit for bit."""
    model, reference, _ = _groups_and_mask(tmp_path, 30, clip=0.0)
    _assert_same(dict(model.named_parameters()), dict(reference.named_parameters()), "params")


def _step_losses(trainer: Any) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in trainer.state.log_history if "loss" in h}


def test_transformers_trainer_trains_and_resumes_bit_for_bit(tmp_path: Path) -> None:
    # 4 batches an epoch; the checkpoint at step 6 is mid-epoch: the Trainer skips the 2 batches
    # of epoch 2 already seen (its sampler is seeded), so the resumed run sees the same data.
    n, k = 12, 6
    full, opt_full, trainer_full = _train_hf(tmp_path / "full", n, k)
    losses = _step_losses(trainer_full)
    assert sorted(losses) == list(range(1, n + 1))
    first, last = losses[1], sum(losses[s] for s in range(n - 2, n + 1)) / 3
    assert last < 0.85 * first, losses
    assert trainer_full.optimizer.optimizer is opt_full  # accelerate wraps it, the step is ours
    _assert_state_populated(opt_full, full, n)

    ckpt = tmp_path / "full" / f"checkpoint-{k}"
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)  # what Trainer reads back
    assert saved["param_groups"][0]["grokxform_transform"] == "grokxform.pipelines.grokadamw"

    resumed, opt_resumed, trainer_resumed = _train_hf(tmp_path / "resumed", n, k, resume=ckpt)
    assert trainer_resumed.state.global_step == n
    resumed_losses = _step_losses(trainer_resumed)
    assert {s: resumed_losses[s] for s in range(k + 1, n + 1)} == {s: losses[s] for s in range(k + 1, n + 1)}
    _assert_same(dict(resumed.named_parameters()), dict(full.named_parameters()), "params")
    _assert_same(opt_resumed.state_dict(), opt_full.state_dict(), "optimizer")
    _assert_same(trainer_resumed.lr_scheduler.state_dict(), trainer_full.lr_scheduler.state_dict(), "scheduler")
