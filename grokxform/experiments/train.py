"""A functional training loop that runs any :class:`~grokxform.GradientTransformation`.

Per step, on a minibatch (x, y) of the shuffled training set::

    (g, (L, logits)) = torch.func.grad_and_value(loss of functional_call(model, θ, x), has_aux=True)(θ)
    u, state = tx.update(g, state, θ, train_loss=L, val_loss=L_val)   # L_val: the last evaluation's
    θ = grokxform.apply_updates(θ, u)

θ starts as ``dict(model.named_parameters())`` detached; the module itself is never modified.
An epoch is one pass over the training set in ``ceil(n / batch_size)`` batches, reshuffled each
epoch (the last, smaller batch is kept, as ``torch.split`` does in the paper's script: 4656 / 512
gives 10 steps per epoch). After every ``eval_every`` epochs (and at the last step) the loop
records the mean training loss and accuracy of the batches seen since the previous record
(measured on the forward passes of those steps, before each update, as the paper does) and the
loss and accuracy over the full validation split. "Steps to target" is the step count of the
first record whose validation accuracy is ≥ the target, so its resolution is one epoch.

Example::

    setup = paper_setup(seed=0)          # grokxform.experiments.modular
    result = train(setup.model, modular_optimizer("grokfast_ema"), setup.data, steps=2000,
                   generator=setup.generator, stop_at_target=True)
    print(result.steps_to_target, result.seconds_to_target)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value

from grokxform.base import GradientTransformation, apply_updates
from grokxform.experiments.data import TaskData

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss(logits, targets) -> 0-d tensor``, the mean over the batch."""


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation: after ``step`` updates (``epoch`` epochs begun), ``seconds`` of wall time
    since the start of training (evaluations included)."""

    step: int
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    seconds: float


@dataclass
class TrainResult:
    """The history of a run and where it ended."""

    history: list[EvalRecord] = field(default_factory=list)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    state: Any = None
    steps: int = 0
    seconds: float = 0.0
    target: float = 0.95
    steps_to_target: int | None = None
    seconds_to_target: float | None = None

    @property
    def reached(self) -> bool:
        """Whether some evaluation reached the target validation accuracy."""
        return self.steps_to_target is not None

    def curves(self) -> dict[str, list[float]]:
        """The history as columns: ``step``, ``train_acc``, ``val_acc``, ``train_loss``, ..."""
        names = ("step", "epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds")
        return {n: [getattr(r, n) for r in self.history] for n in names}


def accuracy_count(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Number of rows whose arg-max equals the target (a 0-d tensor, no device sync)."""
    return (logits.argmax(dim=-1) == targets).sum()


def evaluate(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    loss_fn: LossFn = F.cross_entropy,
    batch_size: int | None = None,
) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` with ``params`` over a whole split, in chunks of
    ``batch_size`` rows (all at once by default)."""
    n = len(targets)
    if n == 0:
        raise ValueError("evaluate: the split is empty")
    chunk = n if batch_size is None else batch_size
    loss_sum = torch.zeros((), dtype=torch.float64, device=targets.device)
    correct = torch.zeros((), dtype=torch.int64, device=targets.device)
    with torch.no_grad():
        for start in range(0, n, chunk):
            x, y = inputs[start : start + chunk], targets[start : start + chunk]
            logits = functional_call(model, params, (x,))
            loss_sum += loss_fn(logits, y).to(torch.float64) * len(y)
            correct += accuracy_count(logits, y)
    return float(loss_sum) / n, float(correct) / n


def _check_args(steps: int, batch_size: int, eval_every: int, target_accuracy: float, data: Any) -> None:
    for name, value, low in (("steps", steps, 0), ("batch_size", batch_size, 1), ("eval_every", eval_every, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"train: {name} must be an int >= {low}, got {value!r}")
    if not 0.0 <= target_accuracy <= 1.0:
        raise ValueError(f"train: target_accuracy must be in [0, 1], got {target_accuracy!r}")
    if not isinstance(data, TaskData):
        raise TypeError(f"train: data must be a TaskData, got {type(data).__name__}")
    if len(data.train_targets) == 0:
        raise ValueError("train: the training split is empty")


def train(
    model: nn.Module,
    tx: GradientTransformation,
    data: TaskData,
    *,
    steps: int,
    batch_size: int = 512,
    loss_fn: LossFn = F.cross_entropy,
    generator: torch.Generator | None = None,
    seed: int = 0,
    target_accuracy: float = 0.95,
    stop_at_target: bool = False,
    eval_every: int = 1,
    eval_batch_size: int | None = None,
    pass_losses: bool = True,
    on_eval: Callable[[EvalRecord], None] | None = None,
) -> TrainResult:
    """Train ``model`` functionally with ``tx`` for at most ``steps`` updates.

    - ``generator`` shuffles the training set each epoch (a CPU ``torch.Generator``; default: one
      seeded with ``seed``). :func:`~grokxform.experiments.modular.paper_setup` gives the paper's.
    - ``pass_losses``: feed ``train_loss=`` (this batch's loss) and, once a first evaluation exists,
      ``val_loss=`` (the last evaluation's) to ``tx.update`` as 0-d tensors; transforms that do
      not use them ignore them (GrokAdamW's grokking signal reads them).
    - ``stop_at_target``: stop at the first evaluation with validation accuracy ≥
      ``target_accuracy``; otherwise run the whole budget (the first such step is recorded
      either way).
    - ``on_eval(record)`` is called after each evaluation (progress bars, logging).

    The data must live on the model's device. Returns a :class:`TrainResult` with the final
    params and optimizer state.
    """
    _check_args(steps, batch_size, eval_every, target_accuracy, data)
    gen = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    x_train, y_train, x_val, y_val = data
    n = len(y_train)
    per_epoch = math.ceil(n / batch_size)
    device = y_train.device

    def loss_and_logits(
        params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits = functional_call(model, params, (x,))
        return loss_fn(logits, y), logits.detach()

    grad_fn = grad_and_value(loss_and_logits, has_aux=True)

    result = TrainResult(target=float(target_accuracy))
    start = time.perf_counter()
    params = {name: p.detach() for name, p in model.named_parameters()}
    state = tx.init(params)
    val_loss: torch.Tensor | None = None
    step = epoch = 0
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    seen = 0
    while step < steps:
        order = torch.randperm(n, generator=gen).to(device)
        epoch += 1
        for b in range(per_epoch):
            if step >= steps:
                break
            idx = order[b * batch_size : (b + 1) * batch_size]
            x, y = x_train[idx], y_train[idx]
            grads, (loss, logits) = grad_fn(params, x, y)
            loss = loss.detach()
            extra: dict[str, torch.Tensor] = {}
            if pass_losses:
                extra["train_loss"] = loss
                if val_loss is not None:
                    extra["val_loss"] = val_loss
            with torch.no_grad():
                updates, state = tx.update(grads, state, params, **extra)
                params = apply_updates(params, updates)
            step += 1
            loss_sum += loss.to(torch.float64) * len(y)
            correct += accuracy_count(logits, y)
            seen += len(y)
        if epoch % eval_every == 0 or step >= steps:
            v_loss, v_acc = evaluate(model, params, x_val, y_val, loss_fn, eval_batch_size)
            val_loss = torch.tensor(v_loss, dtype=torch.float64, device=device)
            record = EvalRecord(
                step=step,
                epoch=epoch,
                train_loss=float(loss_sum) / seen,
                train_acc=float(correct) / seen,
                val_loss=v_loss,
                val_acc=v_acc,
                seconds=time.perf_counter() - start,
            )
            loss_sum.zero_()
            correct.zero_()
            seen = 0
            result.history.append(record)
            if on_eval is not None:
                on_eval(record)
            if result.steps_to_target is None and v_acc >= target_accuracy:
                result.steps_to_target, result.seconds_to_target = step, record.seconds
                if stop_at_target:
                    break
    result.params, result.state, result.steps = params, state, step
    result.seconds = time.perf_counter() - start
    return result
