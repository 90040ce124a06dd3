"""Leaf selection by path: masks for weight decay, ``masked`` and ``partition``."""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from typing import Any, Union

import torch

from grokxform import tree as _tree
from grokxform.base import Params

MaskFn = Callable[[str, torch.Tensor], bool]
Mask = Union[MaskFn, Iterable[str], Any, None]
"""Which leaves are selected: ``fn(path, param) -> bool``; an iterable of glob patterns over the
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


def mask_selector(mask: Mask, who: str) -> Callable[[Params], list[bool]]:
    """``selector(params) -> list[bool]``, memoised per tree structure.

    A mask depends only on the tree's paths (and, for a function, on the params seen at ``init``),
    so it is resolved once, at ``init``; a compiled update then reads constants instead of tracing
    the pattern matching.
    """
    resolved: dict[tuple[str, ...], list[bool]] = {}

    def selector(params: Params) -> list[bool]:
        key = tuple(_tree.path_names(params))
        if key not in resolved:
            resolved[key] = resolve_mask(mask, params, who)
        return resolved[key]

    return selector
