"""Reproduction tasks of the Grokfast paper and the functional loop that trains them.

- :mod:`~grokxform.experiments.modular`: x·y mod 97 and the paper's causal decoder.
- :mod:`~grokxform.experiments.mnist`: Omnigrok's MNIST MLP, read from local IDX files.
- :mod:`~grokxform.experiments.parity`: (20, 3)-sparse parity and its MLP.
- :mod:`~grokxform.experiments.lm`: a byte-level GPT on the standard library's source files.
- :mod:`~grokxform.experiments.tasks`: every task of the sweeps by name, with its training setting.
- :mod:`~grokxform.experiments.optimizers`: the optimizers of each run, by name.
- :mod:`~grokxform.experiments.methods`: the methods of the sweeps and the comparison: knobs, grids, losses.
- :mod:`~grokxform.experiments.losses`: StableMax's cross-entropy (grokking without softmax collapse).
- :mod:`~grokxform.experiments.train`: ``train(model, tx, data, steps=...)``, any transform.
- :mod:`~grokxform.experiments.sweep`: a grid × seeds of any method on any task, as one vmapped program.
- :mod:`~grokxform.experiments.compare`: every method's grid per task, its best configuration over 5 seeds.
- :mod:`~grokxform.experiments.demo`: the paper's optimizers side by side on the modular task.
- :mod:`~grokxform.experiments.ablation`: GrokAdamW's pieces one at a time, beside Grokfast-EMA and AdamW.
- :mod:`~grokxform.experiments.reproduce`: the GPU reproduction of the paper's table, in phases.
- :mod:`~grokxform.experiments.cli`: the ``grokxform`` command (also ``python -m grokxform``), whose
  subcommands ``demo``, ``sweep``, ``compare``, ``ablation run``, ``ablation report`` and ``reproduce`` run the
  modules above.

``import grokxform`` loads none of this: the package is imported on its own, by name.
"""

from grokxform.experiments.data import TaskData
from grokxform.experiments.losses import stablemax, stablemax_cross_entropy
from grokxform.experiments.mnist import load_mnist, make_mlp, mnist_data, mnist_setup, mse_one_hot, read_idx
from grokxform.experiments.modular import Decoder, make_decoder, modular_data, paper_setup
from grokxform.experiments.optimizers import MNIST_OPTIMIZERS, MODULAR_OPTIMIZERS, modular_optimizer
from grokxform.experiments.train import EvalRecord, TrainResult, evaluate, train

__all__ = [
    "MNIST_OPTIMIZERS",
    "MODULAR_OPTIMIZERS",
    "Decoder",
    "EvalRecord",
    "TaskData",
    "TrainResult",
    "evaluate",
    "load_mnist",
    "make_decoder",
    "make_mlp",
    "mnist_data",
    "mnist_setup",
    "modular_data",
    "modular_optimizer",
    "mse_one_hot",
    "paper_setup",
    "read_idx",
    "stablemax",
    "stablemax_cross_entropy",
    "train",
]
