"""Losses for the grokking experiments beside torch's cross-entropy."""

from __future__ import annotations

import torch


def stablemax(x: torch.Tensor) -> torch.Tensor:
    """s(x) = x + 1 for x ≥ 0, 1/(1 − x) for x < 0: StableMax's replacement of exp (Prieto et al.
    2025, "Grokking at the Edge of Numerical Stability", arXiv:2501.04697). It grows linearly
    instead of exponentially, so large logits do not round the probabilities of the others to 0
    (the paper's "softmax collapse").

    Examples:
        >>> from grokxform.experiments import stablemax
        >>> stablemax(torch.tensor([-1.0, 0.0, 2.0]))
        tensor([0.5000, 1.0000, 3.0000])
    """
    return torch.where(x >= 0, x + 1.0, 1.0 / (1.0 - torch.minimum(x, torch.zeros_like(x))))


def stablemax_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The cross-entropy of StableMax probabilities: ``−log(s(z_y) / Σ_j s(z_j))``, with
    :func:`stablemax` for ``s``, over the last dimension of ``logits`` (computed in float64; the
    loss in the logits' dtype). ``targets``: class indices. ``reduction``: ``"mean"``, ``"sum"``
    or ``"none"``, as :func:`torch.nn.functional.cross_entropy`. A drop-in ``loss_fn`` for the
    experiments' training loops.

    Examples:
        >>> from grokxform.experiments import stablemax_cross_entropy
        >>> logits = torch.tensor([[0.0, 1.0], [2.0, -1.0]])
        >>> stablemax_cross_entropy(logits, torch.tensor([1, 0]))     # −(log(2/3) + log(3/3.5))/2
        tensor(0.2798)
    """
    if logits.dim() < 1 or targets.shape != logits.shape[:-1]:
        raise ValueError(
            f"stablemax_cross_entropy: targets of shape {tuple(targets.shape)} do not index logits of shape"
            f" {tuple(logits.shape)} (one class index per row of the last dimension)"
        )
    if reduction not in ("mean", "sum", "none"):
        raise ValueError(f"stablemax_cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
    s = stablemax(logits.to(torch.float64))
    log_p = torch.log(s.gather(-1, targets.unsqueeze(-1)).squeeze(-1)) - torch.log(s.sum(-1))
    loss = -log_p
    if reduction == "mean":
        loss = loss.mean()
    elif reduction == "sum":
        loss = loss.sum()
    return loss.to(logits.dtype)
