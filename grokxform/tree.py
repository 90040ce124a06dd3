"""Pytree helpers over ``torch.utils._pytree``, with ``None`` as a leaf ("no gradient")."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils._pytree as _pt

TreeSpec = _pt.TreeSpec


def _is_none(x: Any) -> bool:
    return x is None


_FLAT_SPECS: dict[tuple[Any, ...], TreeSpec] = {}
_FLAT_KEYS: dict[int, tuple[TreeSpec, tuple[Any, ...]]] = {}


def flat_dict(tree: Any) -> bool:
    """Whether ``tree`` is a plain dict of tensors and ``None`` (``{name: param}``, the common tree),
    outside a ``torch.compile`` trace (which sees the general path)."""
    return (
        type(tree) is dict
        and not torch.compiler.is_compiling()
        and all(v is None or isinstance(v, torch.Tensor) for v in tree.values())
    )


def flatten(tree: Any) -> tuple[list[Any], TreeSpec]:
    """Leaves (``None`` included) and the structure of ``tree``."""
    if flat_dict(tree):  # the same leaves and spec as torch's pytree, without its per-node Python
        keys = tuple(tree)
        spec = _FLAT_SPECS.get(keys)
        if spec is None:
            spec = _pt.tree_flatten(dict.fromkeys(keys), is_leaf=_is_none)[1]
            if len(_FLAT_SPECS) < 1024:
                _FLAT_SPECS[keys] = spec
                _FLAT_KEYS[id(spec)] = (spec, keys)
        return list(tree.values()), spec
    return _pt.tree_flatten(tree, is_leaf=_is_none)


def unflatten(leaves: Sequence[Any], spec: TreeSpec) -> Any:
    if not torch.compiler.is_compiling():
        flat = _FLAT_KEYS.get(id(spec))
        if flat is not None and flat[0] is spec:
            return dict(zip(flat[1], leaves))
    return _pt.tree_unflatten(list(leaves), spec)


class _Other(Exception):
    """A node type other than dict, list, tuple and NamedTuple."""


_SCALARS = (int, float, bool, str)


def _key(tree: Any, leaves: list[Any]) -> Any:
    t = type(tree)
    if t is dict:
        return (dict, tuple(tree), tuple([_key(v, leaves) for v in tree.values()]))
    if t is tuple or t is list:
        return (t, len(tree), tuple([_key(v, leaves) for v in tree]))
    if isinstance(tree, tuple) and hasattr(t, "_fields"):
        return (t, len(tree), tuple([_key(v, leaves) for v in tree]))
    if tree is None or isinstance(tree, torch.Tensor) or t in _SCALARS:
        leaves.append(tree)
        return None
    raise _Other


def structure(tree: Any) -> tuple[list[Any], Any]:
    """The leaves of a tree of dicts, lists, tuples and NamedTuples (tensors, numbers, strings
    and ``None`` as leaves) and a hashable key of its structure (``None`` for any other node type:
    :func:`flatten` then); :func:`restructure` builds a tree from the key and new leaves. A few
    times faster than :func:`flatten` with its spec's hash, for keys of a cache."""
    leaves: list[Any] = []
    try:
        return leaves, _key(tree, leaves)
    except _Other:
        return flatten(tree)[0], None


def _build(key: Any, it: Any) -> Any:
    if key is None:
        return next(it)
    t, shape, kids = key
    if t is dict:
        return {k: _build(c, it) for k, c in zip(shape, kids)}
    if t is tuple or t is list:
        return t(_build(c, it) for c in kids)
    return t(*[_build(c, it) for c in kids])


def restructure(key: Any, leaves: Sequence[Any]) -> Any:
    """The tree of structure ``key`` (from :func:`structure`) with ``leaves``."""
    return _build(key, iter(leaves))


def tree_map(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """``fn`` over the leaves of ``tree`` (and of the trees in ``rest``, same structure)."""
    return _pt.tree_map(fn, tree, *rest, is_leaf=_is_none)


def _key_name(key: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def path_names(tree: Any) -> list[str]:
    """Dotted names of the leaves: ``{"blocks": [{"w": t}]}`` gives ``["blocks.0.w"]``."""
    if flat_dict(tree):
        return [str(k) for k in tree]
    with_path, _ = _pt.tree_flatten_with_path(tree, is_leaf=_is_none)
    return [".".join(_key_name(k) for k in path) or "<root>" for path, _ in with_path]


def check_structure(
    tree: Any, reference: Any, reference_name: str, tree_name: str, *, shapes: bool = True
) -> TreeSpec:
    """Return the common structure, or raise ``ValueError`` naming the first path that differs.

    With ``shapes``, tensor leaves must also agree in shape.
    """
    leaves, spec = flatten(tree)
    ref_leaves, ref_spec = flatten(reference)
    if spec != ref_spec:
        names, ref_names = path_names(tree), path_names(reference)
        missing = [n for n in ref_names if n not in set(names)]
        extra = [n for n in names if n not in set(ref_names)]
        if missing:
            detail = f"path {missing[0]!r} of the {reference_name} is missing from the {tree_name}"
        elif extra:
            detail = f"path {extra[0]!r} of the {tree_name} is not in the {reference_name}"
        else:
            detail = _spec_difference(spec, ref_spec, tree_name, reference_name, "")
        counts = f" ({len(names)} leaves vs {len(ref_names)})" if len(names) != len(ref_names) else ""
        raise ValueError(f"the {tree_name} tree does not match the {reference_name} tree: {detail}{counts}")
    for i, (a, b) in enumerate(zip(leaves, ref_leaves) if shapes else ()):
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape != b.shape:
            name = path_names(tree)[i]
            raise ValueError(
                f"the {tree_name} leaf at path {name!r} has shape {tuple(a.shape)} but the"
                f" {reference_name} has shape {tuple(b.shape)}"
            )
    return spec


def _spec_difference(a: TreeSpec, b: TreeSpec, a_name: str, b_name: str, path: str) -> str:
    """Why two structures with the same leaf paths differ: the first container whose type or key
    order is not the same."""
    where = f"at path {path!r}" if path else "at the root"
    if a.type is not b.type:
        kinds = (getattr(a.type, "__name__", "a leaf"), getattr(b.type, "__name__", "a leaf"))
        return f"{where} the container types differ: {kinds[0]} in the {a_name}, {kinds[1]} in the {b_name}"
    if a.context != b.context:
        keys_a, keys_b = list(a.context or ()), list(b.context or ())
        if sorted(map(str, keys_a)) == sorted(map(str, keys_b)):
            return (
                f"{where} the keys are the same but in another order ({keys_a} vs {keys_b}); the trees of one"
                " transform keep the key order of the params given to init"
            )
        return f"{where} the {a_name} has keys {keys_a} where the {b_name} has {keys_b}"
    keys = list(a.context) if isinstance(a.context, (list, tuple)) else list(range(a.num_children))
    for i, key in enumerate(keys[: a.num_children]):
        ca, cb = a.child(i), b.child(i)
        if ca != cb:
            return _spec_difference(ca, cb, a_name, b_name, f"{path}.{key}" if path else str(key))
    return f"{where} the containers differ"


def first_device(tree: Any) -> torch.device:
    """The device of the first tensor leaf (the CPU for a tree without tensors)."""
    for leaf in flatten(tree)[0]:
        if isinstance(leaf, torch.Tensor):
            return leaf.device
    return torch.device("cpu")
