"""The container the experiment tasks hand to the training loop."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn as nn


class TaskData(NamedTuple):
    """A supervised split: inputs and integer class targets for training and validation."""

    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    val_inputs: torch.Tensor
    val_targets: torch.Tensor

    def to(self, device: torch.device | str) -> TaskData:
        """The same split on ``device``."""
        return TaskData(*(t.to(device) for t in self))


class TaskSetup(NamedTuple):
    """What a task draws from one seed: the model, the split, and the generator that shuffles the
    training set each epoch."""

    model: nn.Module
    data: TaskData
    generator: torch.Generator
