"""The state layout of the in-place step: ``ma_filter`` windows as ring buffers, built lazily.

The eager window of :func:`~grokxform.ma_filter` is a tuple of w trees (oldest first), so that a
pure update rotates references. An in-place step writes one slot of a ``[w, *shape]`` ring buffer
instead (:class:`~grokxform.declarations.MaRingWindow`, slot ``count % w`` oldest). Every other
state leaf is used as it is.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from grokxform import tree as _tree
from grokxform.base import GradientTransformation, Params, State
from grokxform.declarations import MaRingWindow
from grokxform.transforms.filters import MaFilterState


class _LazyZeros(TorchDispatchMode):
    """While active, zero-filled allocations of more than one element return a stride-0 view of
    a single zero (no memory). ``tx.init`` of a 100-slot window then costs nothing until the
    ring buffers are allocated, instead of holding the tuple layout and the ring at once."""

    def __init__(self) -> None:
        super().__init__()
        self.lazy: dict[int, torch.Tensor] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func in (aten.zeros_like.default, aten.new_zeros.default, aten.zeros.default):
            if func is aten.zeros.default:
                shape, ref = tuple(args[0]), None
            elif func is aten.new_zeros.default:
                shape, ref = tuple(args[1]), args[0]
            else:
                shape, ref = tuple(args[0].shape), args[0]
            dtype = kwargs.get("dtype") or (ref.dtype if ref is not None else torch.get_default_dtype())
            device = kwargs.get("device") or (ref.device if ref is not None else torch.device("cpu"))
            numel = 1
            for s in shape:
                numel *= int(s)
            if numel > 1:
                out = torch.zeros((), dtype=dtype, device=device).expand(shape)
                self.lazy[id(out)] = out
                return out
        return func(*args, **kwargs)


def _materialize(x: Any, lazy: dict[int, torch.Tensor]) -> Any:
    """A lazy zero becomes real zeros; any other broadcast (stride-0) tensor a real copy, since
    the fused step writes each state tensor in place."""
    if not isinstance(x, torch.Tensor):
        return x
    if id(x) in lazy:
        return torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    if any(st == 0 and n > 1 for st, n in zip(x.stride(), x.shape)):
        return x.contiguous()
    return x


def _is_ma_state(x: Any) -> bool:
    return isinstance(x, MaFilterState) or x is None


def _ring_from_slots(slots: list[torch.Tensor], count: int, lazy: dict[int, torch.Tensor]) -> torch.Tensor:
    """One ``[w, *shape]`` buffer: slot ``(count + k) % w`` holds window slot k (k = 0 oldest)."""
    w, first = len(slots), slots[0]
    if all(id(s) in lazy for s in slots):
        return torch.zeros((w, *first.shape), dtype=first.dtype, device=first.device)
    ring = torch.empty((w, *first.shape), dtype=first.dtype, device=first.device)
    for k, s in enumerate(slots):
        ring[(count + k) % w].copy_(s)
    return ring


def _to_ring(st: MaFilterState, lazy: dict[int, torch.Tensor]) -> MaFilterState:
    if isinstance(st.window, MaRingWindow):
        return MaFilterState(*(_tree.tree_map(lambda x: _materialize(x, lazy), t) for t in st))
    if not isinstance(st.window, tuple) or not st.window:
        raise ValueError("an ma_filter state's window must be a non-empty tuple of trees")
    counts, spec = _tree.flatten(st.count)
    slot_leaves = [_tree.flatten(t)[0] for t in st.window]
    rings: list[torch.Tensor | None] = []
    for i, c in enumerate(counts):
        if c is None:
            rings.append(None)
            continue
        rings.append(_ring_from_slots([s[i] for s in slot_leaves], int(c), lazy))
    count, total = (_tree.tree_map(lambda x: _materialize(x, lazy), t) for t in (st.count, st.total))
    return MaFilterState(count, MaRingWindow(_tree.unflatten(rings, spec)), total)


def _to_eager(st: MaFilterState) -> MaFilterState:
    if not isinstance(st.window, MaRingWindow):
        return st
    counts, spec = _tree.flatten(st.count)
    rings = _tree.flatten(st.window.buffers)[0]
    w = next((r.shape[0] for r in rings if r is not None), 0)
    slots = [
        [None if r is None else r[(int(c) + k) % w] for c, r in zip(counts, rings)] for k in range(w)
    ]
    return MaFilterState(st.count, tuple(_tree.unflatten(s, spec) for s in slots), st.total)


def to_fused_layout(state: State, *, _lazy: dict[int, torch.Tensor] | None = None) -> State:
    """``state`` with each :class:`MaFilterState` window in the ring layout (a copy of the
    windows) and each tree of per-leaf step counters in one int64 buffer (its leaves are views of
    it: a step reads and bumps all of them with one op each). Every other leaf is the same tensor.
    Numbers are unchanged."""
    lazy = _lazy or {}
    state = torch.utils._pytree.tree_map(
        lambda x: _to_ring(x, lazy) if isinstance(x, MaFilterState) else _materialize(x, lazy),
        state,
        is_leaf=_is_ma_state,
    )
    return _home_counters(state)


def _counters(values: list[Any]) -> bool:
    """Whether ``values`` are per-leaf step counters (0-d int64 tensors on one device, or ``None``)."""
    ts = [v for v in values if v is not None]
    return len(ts) >= 2 and all(
        isinstance(t, torch.Tensor) and t.dim() == 0 and t.dtype == torch.int64 and t.device == ts[0].device
        for t in ts
    )


def _homed(values: list[Any]) -> list[Any]:
    """The counters as consecutive views of one new buffer (``None`` stays ``None``)."""
    ts = [v for v in values if v is not None]
    views = iter(torch.stack(ts).unbind())
    return [None if v is None else next(views) for v in values]


def _home_counters(node: Any) -> Any:
    if isinstance(node, MaRingWindow) or isinstance(node, torch.Tensor) or node is None:
        return node
    if isinstance(node, tuple) and hasattr(node, "_fields"):  # a state NamedTuple
        return type(node)(*(_home_counters(v) for v in node))
    if isinstance(node, dict):
        values = list(node.values())
        if _counters(values):
            return dict(zip(node, _homed(values)))
        return {k: _home_counters(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        if _counters(list(node)):
            return type(node)(_homed(list(node)))
        return type(node)(_home_counters(v) for v in node)
    return node


def to_eager_layout(state: State) -> State:
    """``state`` with each ring window back in the eager tuple-of-trees layout. The slots are
    views of the ring buffers (no copy): clone them to keep a snapshot."""
    return torch.utils._pytree.tree_map(
        lambda x: _to_eager(x) if isinstance(x, MaFilterState) else x, state, is_leaf=_is_ma_state
    )


def init_state(tx: GradientTransformation, params: Params) -> State:
    """``tx.init(params)`` in the fused layout, without ever allocating the eager window."""
    mode = _LazyZeros()
    with torch.no_grad(), mode:
        state = tx.init(params)
    return to_fused_layout(state, _lazy=mode.lazy)
