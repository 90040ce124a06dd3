"""Pytree utilities over ``torch.utils._pytree``, with ``None`` as a leaf ("no gradient").

The trees are those of the transforms: dicts, lists, tuples and NamedTuples of tensors, where a
``None`` leaf is a parameter without a gradient. What a transform of your own needs
(``docs/composing.md``):

- :func:`tree_map` (``None`` leaves stay ``None``), :func:`tree_zeros_like`, :func:`tree_cast`;
- arithmetic leaf by leaf: :func:`tree_add`, :func:`tree_sub`, :func:`tree_scale`;
- reductions to a 0-d tensor: :func:`tree_l2_norm`, :func:`tree_vdot`, :func:`tree_sum`
  (accumulated in float32, in float64 when a leaf is float64).

Examples:
    >>> from grokxform import tree as T
    >>> g = {"w": torch.tensor([3.0, 4.0]), "frozen": None}
    >>> T.tree_l2_norm(g)
    tensor(5.)
    >>> T.tree_scale(0.5, g)
    {'w': tensor([1.5000, 2.0000]), 'frozen': None}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.utils._pytree as _pt

TreeSpec = _pt.TreeSpec

__all__ = [
    "tree_add",
    "tree_cast",
    "tree_l2_norm",
    "tree_map",
    "tree_scale",
    "tree_sub",
    "tree_sum",
    "tree_vdot",
    "tree_zeros_like",
]


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
    """``fn(leaf, *rest_leaves)`` over the leaves of ``tree`` and of the trees in ``rest`` (same
    structure); where ``tree`` has a ``None`` leaf (no gradient), the result has ``None`` and
    ``fn`` is not called. The leaves of ``rest`` reach ``fn`` as they are, ``None`` included.

    Examples:
        >>> from grokxform import tree as T
        >>> T.tree_map(lambda g, m: 0.9 * m + g, {"w": torch.ones(2), "b": None}, {"w": torch.ones(2), "b": None})
        {'w': tensor([1.9000, 1.9000]), 'b': None}
    """
    return _pt.tree_map(lambda x, *xs: None if x is None else fn(x, *xs), tree, *rest, is_leaf=_is_none)


def _map_present(fn: Callable[..., Any], tree: Any, *rest: Any) -> Any:
    """``fn`` over the leaves, ``None`` where any of the trees has ``None``."""
    return _pt.tree_map(
        lambda *xs: None if any(x is None for x in xs) else fn(*xs), tree, *rest, is_leaf=_is_none
    )


def tree_zeros_like(tree: Any, dtype: torch.dtype | None = None) -> Any:
    """Zeros shaped like each tensor leaf of ``tree`` (in ``dtype``, default the leaf's own);
    ``None`` stays ``None``.

    Examples:
        >>> from grokxform import tree as T
        >>> T.tree_zeros_like({"w": torch.ones(2), "b": None}, dtype=torch.float64)
        {'w': tensor([0., 0.], dtype=torch.float64), 'b': None}
    """
    return tree_map(lambda x: torch.zeros_like(x, dtype=dtype), tree)


def tree_add(tree: Any, *others: Any) -> Any:
    """``a + b (+ c ...)`` leaf by leaf (the trees of one structure); ``None`` where any tree has
    ``None``. The dtype is torch's promotion of the leaves'.

    Examples:
        >>> from grokxform import tree as T
        >>> T.tree_add({"w": torch.ones(2), "b": None}, {"w": torch.full((2,), 2.0), "b": torch.ones(1)})
        {'w': tensor([3., 3.]), 'b': None}
    """
    if not others:
        raise TypeError("tree_add: give at least two trees")
    return _map_present(lambda x, *xs: sum(xs, x), tree, *others)


def tree_sub(tree: Any, other: Any) -> Any:
    """``a − b`` leaf by leaf; ``None`` where either tree has ``None``.

    Examples:
        >>> from grokxform import tree as T
        >>> T.tree_sub({"w": torch.ones(2)}, {"w": torch.full((2,), 3.0)})
        {'w': tensor([-2., -2.])}
    """
    return _map_present(torch.sub, tree, other)


def tree_scale(scalar: float | torch.Tensor, tree: Any) -> Any:
    """``s·x`` for each leaf x (optax's ``tree_scalar_mul``): ``s`` a number or a 0-d tensor (a
    tensor multiplies in the leaf's dtype, on the leaf's device); ``None`` stays ``None``.

    Examples:
        >>> from grokxform import tree as T
        >>> T.tree_scale(torch.tensor(2.0, dtype=torch.float64), {"w": torch.ones(2)})
        {'w': tensor([2., 2.])}
    """
    if isinstance(scalar, torch.Tensor):
        return tree_map(lambda x: x * scalar.to(device=x.device, dtype=x.dtype), tree)
    return tree_map(lambda x: x * scalar, tree)


def tree_cast(tree: Any, dtype: torch.dtype | None) -> Any:
    """The floating-point tensor leaves of ``tree`` in ``dtype`` (``None``: unchanged); other
    leaves (integer step counts, ``None``, numbers) as they are.

    Examples:
        >>> from grokxform import tree as T
        >>> T.tree_cast({"w": torch.ones(1), "count": torch.tensor(3)}, torch.bfloat16)
        {'w': tensor([1.], dtype=torch.bfloat16), 'count': tensor(3)}
    """
    if dtype is None:
        return tree
    return tree_map(lambda x: x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x, tree)


def _accumulator(leaves: Sequence[torch.Tensor]) -> torch.dtype:
    return torch.float64 if any(x.dtype == torch.float64 for x in leaves) else torch.float32


def _total(parts: list[torch.Tensor], leaves: Sequence[Any], acc: torch.dtype) -> torch.Tensor:
    """The sum of the per-leaf 0-d ``parts`` on the first leaf's device (0 for none)."""
    if not parts:
        device = leaves[0].device if leaves else torch.device("cpu")
        return torch.zeros((), dtype=acc, device=device)
    return torch.stack([p.to(parts[0].device) for p in parts]).sum()


def tree_sum(tree: Any) -> torch.Tensor:
    """The sum of every element of every tensor leaf, a 0-d tensor accumulated in float32
    (float64 when a leaf is float64); ``None`` leaves count nothing.

    Examples:
        >>> from grokxform import tree as T
        >>> T.tree_sum({"w": torch.ones(2, 2), "b": torch.tensor([0.5]), "frozen": None})
        tensor(4.5000)
    """
    leaves = [x for x in flatten(tree)[0] if isinstance(x, torch.Tensor)]
    acc = _accumulator(leaves)
    return _total([x.sum(dtype=acc) for x in leaves], leaves, acc)


def tree_vdot(tree: Any, other: Any) -> torch.Tensor:
    """``Σ a·b`` over every element of the two trees, a 0-d tensor accumulated in float32 (float64
    when a leaf is float64); leaves where either tree has ``None`` count nothing.

    Examples:
        >>> from grokxform import tree as T
        >>> T.tree_vdot({"w": torch.tensor([1.0, 2.0]), "b": None}, {"w": torch.tensor([3.0, 4.0]), "b": None})
        tensor(11.)
    """
    check_structure(other, tree, "first tree", "second tree")
    pairs = [(a, b) for a, b in zip(flatten(tree)[0], flatten(other)[0]) if a is not None and b is not None]
    acc = _accumulator([x for pair in pairs for x in pair])
    parts = [torch.vdot(a.reshape(-1).to(acc), b.reshape(-1).to(device=a.device, dtype=acc)) for a, b in pairs]
    return _total(parts, [a for a, _ in pairs], acc)


def tree_l2_norm(tree: Any, squared: bool = False) -> torch.Tensor:
    """``‖x‖₂`` over every element of every tensor leaf (``‖x‖₂²`` with ``squared=True``), a 0-d
    tensor: per-leaf norms accumulated in float32 (float64 when a leaf is float64), as
    :func:`~grokxform.clip_by_global_norm` computes them; ``None`` leaves count nothing.

    Examples:
        >>> from grokxform import tree as T
        >>> T.tree_l2_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0], dtype=torch.bfloat16), "c": None})
        tensor(5.)
        >>> T.tree_l2_norm({"a": torch.tensor([3.0])}, squared=True)
        tensor(9.)
    """
    leaves = [x for x in flatten(tree)[0] if isinstance(x, torch.Tensor)]
    acc = _accumulator(leaves)
    norms = [torch.linalg.vector_norm(x, dtype=acc) for x in leaves]
    if not norms:
        return _total([], leaves, acc)
    stacked = torch.stack([n.to(norms[0].device) for n in norms])
    return (stacked * stacked).sum() if squared else torch.linalg.vector_norm(stacked)


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
