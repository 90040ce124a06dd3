"""The container the experiment tasks hand to the training loop."""

from __future__ import annotations

from typing import NamedTuple

import torch


class TaskData(NamedTuple):
    """A supervised split: inputs and integer class targets for training and validation."""

    train_inputs: torch.Tensor
    train_targets: torch.Tensor
    val_inputs: torch.Tensor
    val_targets: torch.Tensor

    def to(self, device: torch.device | str) -> TaskData:
        """The same split on ``device``."""
        return TaskData(*(t.to(device) for t in self))
