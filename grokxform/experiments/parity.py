"""Sparse parity: the label of ``x ∈ {−1, +1}^n`` is the parity of ``k`` of its bits, the others
are noise (Barak et al. 2022, "Hidden Progress in Deep Learning: SGD Learns Parities Near the
Computational Limit", arXiv:2207.08799).

The setting is the one of the grokking-on-parity papers (Barak et al.'s MLP experiments; Merrill,
Tsilivis and Shukla 2023, "A Tale of Two Circuits: Grokking as Competition of Sparse and Dense
Subnetworks", arXiv:2303.11873, who use n = 40): a fixed training set of 1000 points, an MLP with
one hidden layer of 1000 ReLU units (torch's default init), minibatches of 32. Here n = 20 and
k = 3, with two differences from those papers, so that every optimizer of the comparison trains
this task as it trains the others: the loss is the cross-entropy of two logits (classes 0 and 1,
the parity being odd) instead of the hinge loss of one output, and the validation split is 2000
fresh points.

From one seed, in this order: the k relevant bits (a random subset), the training points, the
validation points, the model's init, then the shuffle stream (the returned generator).

Example::

    setup = parity_setup(seed=0)
    logits = setup.model(setup.data.train_inputs[:4])     # (4, 2)
"""

from __future__ import annotations

import torch
import torch.nn as nn

from grokxform.experiments.data import TaskData, TaskSetup

N_BITS = 20
"""Input bits n."""
K_RELEVANT = 3
"""Bits whose parity is the label (k)."""
TRAIN_POINTS = 1000
"""Size of the fixed training set."""
VAL_POINTS = 2000
"""Size of the validation set (fresh points of the same distribution)."""
HIDDEN = 1000
"""Hidden ReLU units of the MLP."""


def parity_points(bits: torch.Tensor, count: int, n: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` uniform points of ``{−1, +1}^n`` (float32) and their labels: 1 where the product
    of the coordinates ``bits`` is −1 (an odd number of −1s among them), else 0."""
    x = torch.randint(0, 2, (count, n), generator=generator).to(torch.float32) * 2 - 1
    y = (x[:, bits].prod(dim=1) < 0).to(torch.int64)
    return x, y


def parity_setup(seed: int = 0, n: int = N_BITS, k: int = K_RELEVANT, train_points: int = TRAIN_POINTS,
                 val_points: int = VAL_POINTS, hidden: int = HIDDEN) -> TaskSetup:
    """The (n, k)-sparse-parity task of one seed: ``Linear(n, hidden)``, ReLU, ``Linear(hidden, 2)``,
    its data and its shuffle stream (all on the CPU; the global RNG is left as it was)."""
    for name, value, low in (("n", n, 1), ("k", k, 1), ("train_points", train_points, 1),
                             ("val_points", val_points, 1), ("hidden", hidden, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"parity_setup: {name} must be an int >= {low}, got {value!r}")
    if k > n:
        raise ValueError(f"parity_setup: k ({k}) must not exceed n ({n})")
    gen = torch.Generator().manual_seed(int(seed))
    bits = torch.randperm(n, generator=gen)[:k]
    x_tr, y_tr = parity_points(bits, train_points, n, gen)
    x_va, y_va = parity_points(bits, val_points, n, gen)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = nn.Sequential(nn.Linear(n, hidden), nn.ReLU(), nn.Linear(hidden, 2))
    return TaskSetup(model, TaskData(x_tr, y_tr, x_va, y_va), gen)
