"""Weight decay as a transform: ``u = u + wd·θ``."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from typing import Any, Union

import torch

from grokxform import _common as C
from grokxform import tree as _tree
from grokxform.base import EmptyState, GradientTransformation, Params, Scalar, Updates

MaskFn = Callable[[str, torch.Tensor], bool]
Mask = Union[MaskFn, Iterable[str], Any, None]
"""Which leaves are decayed: ``fn(path, param) -> bool``; an iterable of glob patterns over the
dotted paths (``["*.weight"]``); a tree of bools shaped like the params; or ``None`` (all)."""


def resolve_mask(mask: Mask, params: Params, who: str) -> list[bool]:
    """One bool per leaf of ``params``: True where the leaf is selected."""
    names = _tree.path_names(params)
    leaves, spec = _tree.flatten(params)
    if mask is None:
        return [True] * len(leaves)
    if callable(mask):
        return [bool(mask(n, p)) for n, p in zip(names, leaves)]
    if isinstance(mask, str):
        mask = [mask]
    if isinstance(mask, (list, tuple, set, frozenset)) and all(isinstance(m, str) for m in mask):
        return [any(fnmatch.fnmatchcase(n, pat) for pat in mask) for n in names]
    mask_leaves, mask_spec = _tree.flatten(mask)
    if mask_spec != spec or not all(isinstance(m, bool) for m in mask_leaves):
        _tree.check_structure(mask, params, "params", f"{who} mask")
        raise TypeError(f"{who}: a mask tree must hold one bool per param leaf")
    return list(mask_leaves)


def decoupled_weight_decay(weight_decay: Scalar = 1e-2, *, mask: Mask = None) -> GradientTransformation:
    """``u = u + wd·θ`` on the leaves selected by ``mask``; the others pass unchanged. Stateless.

    Placed after :func:`scale_by_adam` and before the learning rate, this is AdamW's decoupled
    decay, ``θ ← θ − η·(adam + wd·θ)``; placed before Adam it is coupled L2 (``torch.optim.Adam``'s
    ``weight_decay``: ĝ = g + wd·θ), as the Grokfast paper ran it. Needs ``params``.

    Example::

        no_norms = lambda path, p: p.ndim >= 2          # decay matrices only
        tx = chain(scale_by_adam(), decoupled_weight_decay(0.01, mask=no_norms), scale_by_learning_rate(1e-3))
    """
    C.check_scalar("decoupled_weight_decay", "weight_decay", weight_decay, low=0.0)
    # The mask depends only on the tree's paths: resolved once per structure (at init), so that
    # a compiled update reads a constant instead of tracing the pattern matching.
    resolved: dict[tuple[str, ...], list[bool]] = {}

    def selection(params: Params) -> list[bool]:
        key = tuple(_tree.path_names(params))
        if key not in resolved:
            resolved[key] = resolve_mask(mask, params, "decoupled_weight_decay")
        return resolved[key]

    def init_fn(params: Params) -> EmptyState:
        selection(params)
        return EmptyState()

    def update_fn(
        updates: Updates, state: EmptyState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, EmptyState]:
        del extra
        if params is None:
            raise ValueError("decoupled_weight_decay: update needs params (pass params=...)")
        spec = _tree.check_structure(updates, params, "params", "gradient")
        selected = selection(params)
        u_leaves, _ = _tree.flatten(updates)
        p_leaves, _ = _tree.flatten(params)
        out = [
            u if u is None or not sel else u + p.to(u.dtype) * C.scalar_for(weight_decay, u)
            for u, p, sel in zip(u_leaves, p_leaves, selected)
        ]
        return _tree.unflatten(out, spec), state

    return GradientTransformation(init_fn, update_fn)
