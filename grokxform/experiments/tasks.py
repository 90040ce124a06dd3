"""The tasks of the sweeps and of the comparison, by name (:data:`TASKS`): how each draws its
model, data and shuffle stream from a seed, its loss, batch size, evaluation cadence, warm-up,
the metric a comparison ranks by, and which of its params are Muon's matrices.

==========  ==================================================================================
task        setting
==========  ==================================================================================
``mul``     x·y mod 97, the Grokfast paper's decoder and split (:mod:`.modular`): batch 512,
``add``     evaluated every epoch (10 steps), lr warm-up 10 steps; x+y, x−y, x·y⁻¹ mod 97
``sub``     the same with the other operation
``div``
``parity``  (20, 3)-sparse parity (:mod:`.parity`): 1000 training points, MLP 20-1000-2,
            batch 32, evaluated every epoch (32 steps) on 2000 fresh points, no warm-up
``mnist``   MNIST-1k (:mod:`.mnist`): MLP 784-200-200-10 at init scale 8, MSE on one-hot
            targets, batch 200, evaluated every 100 steps, no warm-up, target 90%
            (:data:`MNIST_TARGET`); needs ``data_root``
``lm``      a byte-level GPT on the standard library's ``.py`` files (:mod:`.lm`): batch 32
            windows of 128 bytes (4096 tokens a step), evaluated every 100 steps on 256
            windows, warm-up 100 steps; ranked by the validation loss at the step budget
==========  ==================================================================================

Every task is vmappable: each member of a sweep has its own model, split (where the split depends
on the seed) and shuffle stream. Data that is the same for every seed (MNIST, the corpus) is held
once and shared by the members.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from grokxform.experiments.data import TaskSetup
from grokxform.experiments.lm import lm_setup, next_byte_loss
from grokxform.experiments.losses import stablemax_cross_entropy
from grokxform.experiments.methods import MatrixLabel, blocks_matrices, get_method
from grokxform.experiments.mnist import make_mlp, mnist_data, mse_one_hot
from grokxform.experiments.modular import paper_setup, task_name
from grokxform.experiments.parity import parity_setup

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def head_excluded(head: str) -> MatrixLabel:
    """Muon's matrices of an MLP: every 2-D weight but the output layer ``head``."""

    def label(name: str, param: torch.Tensor) -> bool:
        return param.ndim == 2 and name != head

    return label


@dataclass(frozen=True)
class Task:
    """A task: ``setup(seed, data_root)`` draws its :class:`~grokxform.experiments.data.TaskSetup`;
    ``loss`` is its training loss (``cross_entropy``: whether a method's StableMax replaces it);
    ``batch_size``, ``eval_every`` (steps) and ``warmup_steps`` its training setting; ``metric``
    what a comparison ranks by: ``"accuracy"`` (steps to the target validation accuracy) or
    ``"loss"`` (validation loss at the step budget); ``shared_data``: every seed has the same data;
    ``matrices``: Muon's leaves; ``steps``: the comparison's default step budget; ``target``: the
    validation accuracy whose first step a sweep reports (accuracy tasks)."""

    title: str
    setup: Callable[[int, Any], TaskSetup]
    loss: LossFn
    cross_entropy: bool
    batch_size: int
    eval_every: int
    warmup_steps: int
    metric: str
    shared_data: bool
    matrices: MatrixLabel
    steps: int
    target: float = 0.95


def _modular(op: str) -> Callable[[int, Any], TaskSetup]:
    def setup(seed: int, data_root: Any = None) -> TaskSetup:
        s = paper_setup(seed, task=op)
        return TaskSetup(s.model, s.data, s.generator)

    return setup


def _parity(seed: int, data_root: Any = None) -> TaskSetup:
    return parity_setup(seed)


@functools.lru_cache(maxsize=2)
def _mnist_data(root: str) -> Any:
    return mnist_data(root)


def _mnist(seed: int, data_root: Any = None) -> TaskSetup:
    if data_root is None:
        raise ValueError("task mnist: give the folder of the MNIST files (data_root=, --data-root)")
    return TaskSetup(make_mlp(seed), _mnist_data(str(data_root)), torch.Generator().manual_seed(int(seed)))


def _lm(seed: int, data_root: Any = None) -> TaskSetup:
    return lm_setup(seed)


MNIST_TARGET = 0.90
"""MNIST-1k's target validation accuracy: with 1,000 training images the MLP levels off near 93%
(AdamW, lr 1e-3, weight decay 1: 92.1% at step 2,000, 93.3% at 5,000, 93.1% at 6,000), so the 95%
of the other tasks is out of reach."""

TASKS: dict[str, Task] = {
    **{op: Task(task_name(op), _modular(op), F.cross_entropy, True, 512, 10, 10, "accuracy", False, blocks_matrices,
                10_000) for op in ("mul", "add", "sub", "div")},
    "parity": Task("(20, 3)-sparse parity", _parity, F.cross_entropy, True, 32, 32, 0, "accuracy", False,
                   head_excluded("2.weight"), 20_000),
    "mnist": Task("MNIST-1k, init scale 8", _mnist, mse_one_hot, False, 200, 100, 0, "accuracy", True,
                  head_excluded("5.weight"), 20_000, MNIST_TARGET),
    "lm": Task("byte-level LM, stdlib .py", _lm, next_byte_loss, True, 32, 100, 100, "loss", True, blocks_matrices,
               2000),
}
"""Name → :class:`Task`."""


def get_task(name: str) -> Task:
    """``TASKS[name]``, or a ``ValueError`` naming the choices."""
    try:
        return TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}") from None


def method_loss(task: str, method: str) -> LossFn:
    """The loss a method trains a task with: StableMax's cross-entropy for a method whose loss is
    ``"stablemax"`` on a cross-entropy task, else the task's own."""
    t = get_task(task)
    return stablemax_cross_entropy if get_method(method).loss == "stablemax" and t.cross_entropy else t.loss


__all__ = ["TASKS", "Task", "get_task", "head_excluded", "method_loss"]
