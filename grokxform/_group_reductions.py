"""Reductions over the tree that span an optimizer's param groups.

Each param group is one tree with its own transformation, but a reduction over the tree (the
global clip norm, ``apply_if_finite``'s check) covers every group that steps, as
``clip_grad_norm_(model.parameters())`` does: groups change hyperparameters, never the scope of a
reduction. The whole gradient's values are computed once a step
(:func:`grokxform.declarations.whole_gradient_reductions`) and given to each group's ``update``
under the arguments through which its reductions take them
(:func:`grokxform.declarations.tree_reduction_args`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from grokxform import declarations as D
from grokxform.base import GradientTransformation


class GroupReductions:
    """The whole gradient's values that the tree reductions of several param groups read; what
    each group's transformation reduces is read from its declaration once per transformation."""

    def __init__(self) -> None:
        self._found: dict[int, tuple[GradientTransformation, list[tuple[str, bool, tuple[str, ...]]]]] = {}

    def _reductions(self, g: int, tx: GradientTransformation) -> list[tuple[str, bool, tuple[str, ...]]]:
        found = self._found.get(g)
        if found is None or found[0] is not tx:  # (a walk of the declaration builds an injected transform)
            found = self._found[g] = (tx, D.tree_reduction_args(D.declaration_of(tx)))
        return found[1]

    def whole_gradient(
        self, transforms: Iterable[tuple[int, GradientTransformation]], grads: list[torch.Tensor | None], who: str
    ) -> dict[str, torch.Tensor]:
        """The ``update`` arguments that give the reductions of the stepping groups their values
        over the whole gradient (empty when none reduces the tree). A reduction that cannot take
        the whole gradient's value, or that does not read the gradients as they come, raises
        ``ValueError``.

        Args:
            transforms: ``(index, transformation)`` of every param group that steps.
            grads: the gradients of all their parameters (``None`` for those without one).
            who: the optimizer's transformation, as its messages name it.
        """
        wanted: set[str] = set()
        for g, tx in transforms:
            for name, on_gradient, whole in self._reductions(g, tx):
                if not whole:
                    raise ValueError(
                        f"Optimizer: {who} makes a reduction over the whole tree ({name}) that"
                        " several param groups cannot share (only clip_by_global_norm's norm and apply_if_finite's"
                        " check are passed across groups). Use one param group and give per-parameter differences"
                        " as masks (weight_decay_mask=...)"
                    )
                if not on_gradient:
                    raise ValueError(
                        f"Optimizer: {who} makes a reduction over the whole tree ({name}) that does"
                        " not read the gradients as they come (other members change them first, or a mask or"
                        " partition selects some leaves), so it cannot span several param groups. Use one param"
                        " group and give per-parameter differences as masks (weight_decay_mask=...), or put the"
                        " reduction first in the chain"
                    )
                wanted.update(whole)
        if not wanted:
            return {}
        return D.whole_gradient_reductions(grads, tuple(wanted))
