"""The state layout of the in-place step: ``ma_filter`` windows as ring buffers, built lazily.

The eager window of :func:`~grokxform.ma_filter` is a tuple of w trees (oldest first), so that a
pure update rotates references. An in-place step writes one slot of a ``[w, *shape]`` ring buffer
instead (:class:`~grokxform.declarations.RingWindow`, slot ``count % w`` oldest). A window of
compressed slots (:func:`~grokxform.compress_state`) becomes a compressed ring: one ``[w, ...]``
buffer per part (int8's codes ``[w, *shape]`` and scales ``[w, blocks]``), each slot a view.
Every other state leaf is used as it is.

A state owned in the fused layout can also be stepped by the pure ``tx.update``, in place:
:func:`to_eager_layout` with ``ring_order=True`` gives its windows as the ring's slots (views, in
slot order, made once); :func:`oldest_first` rotates those references into the order ``tx.update``
reads; :func:`write_back` copies the new state into the owned tensors (one slot per window leaf).
"""

from __future__ import annotations

from typing import Any

import torch

from grokxform import distributed as _dist
from grokxform import tree as _tree
from grokxform._memory import LazyZeros, is_lazy
from grokxform.base import GradientTransformation, Params, State
from grokxform.declarations import RingWindow, window_fields


def _materialize(x: Any, lazy: dict[int, torch.Tensor]) -> Any:
    """A lazy zero becomes real zeros; any other broadcast (stride-0) tensor a real copy, since
    the fused step writes each state tensor in place."""
    if not isinstance(x, torch.Tensor):
        return x
    if is_lazy(x, lazy):
        return torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    if any(st == 0 and n > 1 for st, n in zip(x.stride(), x.shape)):
        return x.contiguous()
    return x


def _is_windowed(x: Any) -> bool:
    """Whether ``x`` is a state with a window field (:func:`~grokxform.declarations.windowed_state`)."""
    return window_fields(x) is not None


def _stops(x: Any) -> bool:  # (a windowed state is handled whole; ``None`` is a leaf)
    return x is None or _is_windowed(x)


def _is_packed(x: Any) -> bool:
    """Whether ``x`` is a compressed tensor (:mod:`grokxform.transforms.compress`: a NamedTuple of
    its parts, one leaf of a window's tree)."""
    return isinstance(x, tuple) and getattr(type(x), "_packed", False)


def _leaves(tree: Any) -> list[Any]:
    """The leaves of one tree of a window (or of a ring's buffers): ``None`` and compressed
    tensors are leaves."""
    if _tree.flat_dict(tree):
        return list(tree.values())
    return torch.utils._pytree.tree_flatten(tree, is_leaf=lambda x: x is None or _is_packed(x))[0]


def _unflatten_like(leaves: list[Any], tree: Any) -> Any:
    """``leaves`` in the structure of ``tree`` (compressed tensors are leaves)."""
    if type(tree) is dict and not torch.compiler.is_compiling() and all(
            v is None or isinstance(v, torch.Tensor) or _is_packed(v) for v in tree.values()):
        return dict(zip(tree, leaves))
    spec = torch.utils._pytree.tree_flatten(tree, is_leaf=lambda x: x is None or _is_packed(x))[1]
    return torch.utils._pytree.tree_unflatten(leaves, spec)


def _with(st: Any, **fields: Any) -> Any:
    """The state ``st`` with ``fields`` replaced (not ``_replace``: Dynamo)."""
    return type(st)(*(fields.get(f, v) for f, v in zip(st._fields, st)))


def _others(st: Any) -> tuple[Any, ...]:
    """The fields of a windowed state other than its window."""
    w = window_fields(st)[0]  # type: ignore[index]
    return tuple(v for f, v in zip(st._fields, st) if f != w)


def _ring_from_slots(slots: list[Any], count: int, lazy: dict[int, torch.Tensor]) -> Any:
    """One ``[w, *shape]`` buffer: slot ``(count + k) % w`` holds window slot k (k = 0 oldest). Of
    compressed slots, the compressed ring: one ``[w, *shape]`` buffer per part (int8's scales
    ``[w, blocks]``)."""
    w, first = len(slots), slots[0]
    if _is_packed(first):
        return type(first)(*(_ring_from_slots([s[j] for s in slots], count, lazy) for j in range(len(first))))
    if all(is_lazy(s, lazy) for s in slots):
        return torch.zeros((w, *first.shape), dtype=first.dtype, device=first.device)
    ring = torch.empty((w, *first.shape), dtype=first.dtype, device=first.device)
    for k, s in enumerate(slots):
        ring[(count + k) % w].copy_(s)
    return ring


def _host_counts(counts: list[Any]) -> list[int]:
    """The per-leaf counts as Python ints (``None`` leaves as 0), read with one host transfer."""
    ts = [c for c in counts if c is not None]
    values = iter(torch.stack([_dist.local(c) for c in ts]).tolist() if ts else [])
    return [0 if c is None else next(values) for c in counts]


def _to_ring(st: Any, lazy: dict[int, torch.Tensor], ring_order: bool) -> Any:
    wname, cname = window_fields(st)  # type: ignore[misc]
    window = getattr(st, wname)
    if isinstance(window, RingWindow):
        return _with(st, **{f: _tree.tree_map(lambda x: _materialize(x, lazy), v) for f, v in zip(st._fields, st)})
    # (the other fields only: the tuple window's lazy slots go straight into the rings)
    materialized = {f: _tree.tree_map(lambda x: _materialize(x, lazy), v) for f, v in zip(st._fields, st) if f != wname}
    if not isinstance(window, tuple) or not window:
        raise ValueError(f"a {type(st).__name__}'s {wname} must be a non-empty tuple of trees")
    counts = _tree.flatten(getattr(st, cname))[0]
    starts = [0] * len(counts) if ring_order else _host_counts(counts)
    slot_leaves = [_leaves(t) for t in window]
    rings: list[Any] = []
    for i, c in enumerate(counts):
        if c is None:
            rings.append(None)
            continue
        rings.append(_ring_from_slots([s[i] for s in slot_leaves], starts[i], lazy))
    return _with(st, **{**materialized, wname: RingWindow(_unflatten_like(rings, window[0]))})


def _unbind(ring: Any) -> Any:
    """The slots of a ring buffer (views); of a compressed ring, compressed slots of views."""
    if _is_packed(ring):
        return [type(ring)(*parts) for parts in zip(*(r.unbind(0) for r in ring))]
    return ring.unbind(0)


def _to_eager(st: Any, ring_order: bool) -> Any:
    wname, cname = window_fields(st)  # type: ignore[misc]
    window = getattr(st, wname)
    if not isinstance(window, RingWindow):
        return st
    counts = _tree.flatten(getattr(st, cname))[0]
    rings = _leaves(window.buffers)
    unbound = [None if r is None else _unbind(r) for r in rings]
    w = next((len(u) for u in unbound if u is not None), 0)
    starts = [0] * len(counts) if ring_order else _host_counts(counts)
    slots = [
        [None if u is None else u[(c + k) % w] for c, u in zip(starts, unbound)] for k in range(w)
    ]
    return _with(st, **{wname: tuple(_unflatten_like(s, window.buffers) for s in slots)})


def to_fused_layout(
    state: State, *, ring_order: bool = False, _lazy: dict[int, torch.Tensor] | None = None
) -> State:
    """``state`` with each window (an ``ma_filter`` state's) in the ring layout (a copy of the
    windows) and each tree of per-leaf step counters in one int64 buffer (its leaves are views of
    it: a step reads and bumps all of them with one op each). Every other leaf is the same tensor,
    and a state already in this layout is returned with its very tensors. Numbers are unchanged.
    ``ring_order=True``: the windows are given in slot order (as :func:`to_eager_layout` with
    ``ring_order=True`` gives them), not oldest first."""
    lazy = _lazy or {}
    state = torch.utils._pytree.tree_map(
        lambda x: _to_ring(x, lazy, ring_order) if _is_windowed(x) else _materialize(x, lazy),
        state,
        is_leaf=_stops,
    )
    return _home_counters(state)


def _counters(values: list[Any]) -> bool:
    """Whether ``values`` are per-leaf step counters (0-d int64 tensors on one device, or ``None``)."""
    ts = [v for v in values if v is not None]
    return len(ts) >= 2 and all(
        isinstance(t, torch.Tensor) and t.dim() == 0 and t.dtype == torch.int64 and t.device == ts[0].device
        for t in ts
    )


def _already_homed(ts: list[torch.Tensor]) -> bool:
    """Whether the counters are consecutive views of one buffer (homed before: kept as they are)."""
    base = ts[0]._base
    if base is None or base.dim() != 1 or base.shape[0] != len(ts):
        return False
    return all(t._base is base and t.storage_offset() == base.storage_offset() + k for k, t in enumerate(ts))


def _homed(values: list[Any]) -> list[Any]:
    """The counters as consecutive views of one new buffer (``None`` stays ``None``); counters
    already homed are returned as they are, so that the layout of a fused state is kept."""
    ts = [v for v in values if v is not None]
    if _already_homed(ts):
        return values
    views = iter(torch.stack(ts).unbind())
    return [None if v is None else next(views) for v in values]


def _home_counters(node: Any) -> Any:
    if isinstance(node, RingWindow) or isinstance(node, torch.Tensor) or node is None:
        return node
    if isinstance(node, tuple) and hasattr(node, "_fields"):  # a state NamedTuple
        return type(node)(*(_home_counters(v) for v in node))
    if isinstance(node, dict):
        values = list(node.values())
        if _counters(values):
            homed = _homed(values)
            return node if homed is values else dict(zip(node, homed))
        return {k: _home_counters(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        values = list(node)
        if _counters(values):
            homed = _homed(values)
            return node if homed is values else type(node)(homed)
        return type(node)(_home_counters(v) for v in node)
    return node


def to_eager_layout(state: State, *, ring_order: bool = False) -> State:
    """``state`` with each ring window back in the eager tuple-of-trees layout. The slots are
    views of the ring buffers (no copy): clone them to keep a snapshot. Oldest first (the
    counts are read on the host, once), or with ``ring_order=True`` in the ring's slot order
    (nothing read: the views stay the same tensors whatever the step)."""
    return torch.utils._pytree.tree_map(
        lambda x: _to_eager(x, ring_order) if _is_windowed(x) else x, state, is_leaf=_stops
    )


def has_windows(state: State) -> bool:
    """Whether ``state`` holds a windowed state (an ``ma_filter``'s, whose window :func:`oldest_first` rotates)."""
    return any(_is_windowed(x) for x in torch.utils._pytree.tree_leaves(state, is_leaf=_stops))


def _slot_leaves(window: tuple[Any, ...], like: Any) -> list[list[Any]]:
    """The leaves of each tree of a window, whose trees have the structure of ``like`` (the
    counts; compressed tensors are leaves): for a flat ``{name: tensor}`` dict, its values (no
    check per slot)."""
    if _tree.flat_dict(like):
        return [list(t.values()) for t in window]
    return [_leaves(t) for t in window]


def oldest_first(state: State) -> State:
    """A state whose windows are in slot order (:func:`to_eager_layout` with ``ring_order=True``)
    with each leaf's window rotated to start at its oldest slot, ``count % w``: the order
    ``tx.update`` reads. References only (the counts are read on the host, once per window)."""

    def rotate(st: Any) -> Any:
        if not _is_windowed(st):
            return st
        wname, cname = window_fields(st)  # type: ignore[misc]
        window, count = getattr(st, wname), getattr(st, cname)
        if not isinstance(window, tuple) or isinstance(window, RingWindow):
            return st
        starts = _host_counts(_tree.flatten(count)[0])
        slots = _slot_leaves(window, count)
        w = len(slots)
        return _with(st, **{wname: tuple(
            _unflatten_like([slots[(c + k) % w][i] for i, c in enumerate(starts)], window[0]) for k in range(w)
        )})

    return torch.utils._pytree.tree_map(rotate, state, is_leaf=_stops)


def _changed(dst: Any, src: Any) -> list[tuple[Any, Any]]:
    """(destination, source) pairs of the tensor leaves of ``dst`` that ``src`` (the same
    structure) replaces by another tensor."""
    return [(d, x) for d, x in zip(_tree.flatten(dst)[0], _tree.flatten(src)[0])
            if x is not d and isinstance(d, torch.Tensor)]


def _window_pairs(dst: Any, src: Any) -> list[tuple[Any, Any]]:
    """(destination, source) pairs of one windowed state whose window ``dst`` holds as ring
    slots in slot order and ``src`` oldest first: the k-th oldest value goes to slot
    ``(count + k) % w`` of the new count (a rotated reference lands on itself and is skipped)."""
    wname, cname = window_fields(dst)  # type: ignore[misc]
    pairs = _changed(_others(dst), _others(src))
    counts = _tree.flatten(getattr(src, cname))[0]
    starts = _host_counts(counts)
    ring = _slot_leaves(getattr(dst, wname), getattr(dst, cname))
    logical = _slot_leaves(getattr(src, wname), getattr(src, cname))
    w = len(ring)
    for i, c in enumerate(starts):
        if counts[i] is None:
            continue
        for k in range(w):
            d, x = ring[(c + k) % w][i], logical[k][i]
            if x is not d:
                pairs.extend(zip(d, x) if _is_packed(d) else [(d, x)])  # (a compressed slot: its parts)
    return [(d, x) for d, x in pairs if x is not d]


class Owned:
    """A state that an eager step writes back into (:func:`write_back`): its tree, windows as ring
    slots in slot order; its leaves (windowed states whole when it has windows), flattened
    once; whether it has windows and sharded (DTensor) leaves."""

    def __init__(self, state: State) -> None:
        self.state = state
        self.windows = has_windows(state)
        if self.windows:
            self.leaves, self.spec = torch.utils._pytree.tree_flatten(state, is_leaf=_stops)
        else:
            self.leaves, self.spec = _tree.flatten(state)
        self.sharded = any(_dist.is_sharded(x) for x in _tree.flatten(state)[0])


def _read_first(pairs: list[tuple[Any, Any]]) -> list[bool]:
    """For each pair of ``pairs``, whether its source is also a destination (so it must be read
    before anything is written): by ``id`` when eager, by identity under ``torch.compile``
    (which runs this only while tracing, and cannot trace ``id``)."""
    if torch.compiler.is_compiling():
        return [any(x is d for d, _ in pairs) for _, x in pairs]
    targets = {id(d) for d, _ in pairs}
    return [id(x) in targets for _, x in pairs]


def write_back(owned: Owned, new: State) -> None:
    """Copy ``new`` (what ``tx.update`` returned for ``owned.state``, read through
    :func:`oldest_first` or as it is) into the tensors of ``owned``, in place.

    A leaf of ``new`` that is the very tensor of ``owned`` at that place is skipped. A window
    written oldest first lands in the slots its new count says (``(count + k) % w`` for the k-th
    oldest), so a rotation costs one slot copy per leaf. All copies are grouped per dtype and
    device into ``torch._foreach_copy_``; a source that is also a destination is read first."""
    s_leaves = owned.spec.flatten_up_to(new) if owned.windows else _tree.flatten(new)[0]
    pairs: list[tuple[Any, Any]] = []
    for d, x in zip(owned.leaves, s_leaves):
        if x is d:
            continue
        if _is_windowed(d):
            window = getattr(d, window_fields(d)[0])  # type: ignore[index]
            pairs.extend(_window_pairs(d, x) if not isinstance(window, RingWindow) else _changed(d, x))
        elif isinstance(d, torch.Tensor):
            pairs.append((d, x))
    if not pairs:
        return
    if owned.sharded:
        pairs = [(_dist.local(d), _dist.local(x)) for d, x in pairs]
    by_dtype: dict[tuple[torch.dtype, torch.device], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for (d, x), read_first in zip(pairs, _read_first(pairs)):
        if read_first:  # another destination's old value: read before anything is written
            x = x.clone()
        dsts, srcs = by_dtype.setdefault((d.dtype, d.device), ([], []))
        dsts.append(d)
        srcs.append(x)
    for dsts, srcs in by_dtype.values():
        torch._foreach_copy_(dsts, srcs)


def init_state(tx: GradientTransformation, params: Params) -> State:
    """``tx.init(params)`` in the fused layout, without ever allocating the eager window."""
    mode = LazyZeros()
    with torch.no_grad(), mode:
        state = tx.init(params)
    return to_fused_layout(state, _lazy=mode.lazy)
