"""The exact re-sum of a window's running sum (:class:`~grokxform.declarations.WindowField`).

A running sum ``S ← S − oldest + newest`` keeps every rounding error it makes: it drifts, and one
huge value leaves its errors behind when it leaves the window (a NaN never leaves). So every
``size`` updates of a leaf (on the update that makes its count a multiple of ``size``) the sum is
recomputed from the window: its values oldest to newest, added one by one in float64, rounded once
to the sum's dtype. Every engine computes that same sum in that same order, so they agree bit for
bit: the generated kernels (:mod:`grokxform.engine.codegen`), the foreach backend
(:mod:`grokxform.engine.foreach`) and the eager update (:func:`window_sums`).

A leaf's window is given as its ``size − 1`` older values, oldest first, and its newest value.
The older values are a list of tensors (the eager layout) or a ring buffer: on the update that
re-sums, the ring's slots are in order and the newest value goes to its last slot, so the older
values are its first ``size − 1`` slots.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Union

import torch

from grokxform.elements import foreach_ok, traced, wrapped

Older = Callable[[int], Union[torch.Tensor, list[torch.Tensor]]]
"""``older(k)``: the older values of leaf k's window, as a list of tensors or a ring buffer."""


def resum_due(counts: torch.Tensor, size: int) -> torch.Tensor:
    """Whether each leaf's running sum is re-summed on this update: its count before the update
    is ``size − 1`` modulo ``size`` (bool, shaped like ``counts``)."""
    return torch.remainder(counts, size) == size - 1


def window_sum(values: Sequence[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """The window's sum: ``values`` (oldest first) added one by one in float64, rounded once to
    ``dtype``."""
    acc = values[0].to(torch.float64)
    for v in values[1:]:
        acc = acc + v
    return acc.to(dtype)


def sum_windows(rows: list[list[torch.Tensor]], dtypes: list[torch.dtype]) -> list[torch.Tensor]:
    """:func:`window_sum` of each window (``rows[k]``: its values, oldest first), as one
    ``torch._foreach_add`` per slot where foreach ops may run."""
    if not rows:
        return []
    if not foreach_ok(rows[0]):
        return [window_sum(r, dt) for r, dt in zip(rows, dtypes)]
    acc = [r[0].to(torch.float64, copy=True) for r in rows]
    for j in range(1, len(rows[0])):
        torch._foreach_add_(acc, [r[j] for r in rows])
    return [a.to(dt) for a, dt in zip(acc, dtypes)]


def _due_on_host(due: torch.Tensor) -> list[int]:
    """The leaves that are due, read on the host (one read of the whole vector)."""
    return [k for k, d in enumerate(due.tolist()) if d]


def _values(older: torch.Tensor | Sequence[torch.Tensor], newest: torch.Tensor, size: int) -> list[torch.Tensor]:
    rows = list(older[: size - 1].unbind()) if isinstance(older, torch.Tensor) else list(older)
    return [*rows, newest]


def _operands(older: torch.Tensor | list[torch.Tensor], newest: torch.Tensor) -> list[torch.Tensor]:
    """One leaf's window as an operator's list of tensors: ``[ring, newest]`` or its values."""
    return [older, newest] if isinstance(older, torch.Tensor) else [*older, newest]


def _window_of(values: list[torch.Tensor], ring: bool, size: int) -> list[torch.Tensor]:
    return _values(values[0], values[1], size) if ring else values


@torch.library.custom_op("grokxform::window_sum", mutates_args=())
def _window_sum_op(values: list[torch.Tensor], ring: bool, size: int, dtype: torch.dtype) -> torch.Tensor:
    """:func:`window_sum` of one leaf's window (:func:`_operands`) as one operator."""
    return window_sum(_window_of(values, ring, size), dtype)


@_window_sum_op.register_fake
def _(values: list[torch.Tensor], ring: bool, size: int, dtype: torch.dtype) -> torch.Tensor:
    return values[-1].new_empty(values[-1].shape, dtype=dtype)


def _window_sum_vmap(info, in_dims, values, ring, size, dtype):  # type: ignore[no-untyped-def]
    """Under ``vmap`` the sum is elementwise over the mapped dimension: it goes first in each
    mapped value (second in a ring buffer, after its slots); the others broadcast."""
    moved = [v if d is None else v.movedim(d, 1 if ring and k == 0 else 0) for k, (v, d) in enumerate(zip(values, in_dims[0]))]
    return _window_sum_op(moved, ring, size, dtype), 0


_window_sum_op.register_vmap(_window_sum_vmap)


@torch.library.custom_op("grokxform::window_resum_", mutates_args=("totals",))
def _window_resum_op(
    totals: list[torch.Tensor], values: list[torch.Tensor], rings: list[bool], counts: torch.Tensor, size: int
) -> None:
    """Each running sum of ``totals`` that is due (:func:`resum_due` of ``counts``) becomes its
    window's sum, in place: the re-sum of a traced graph, one operator that decides when it runs.
    ``values``: the windows' :func:`_operands`, one after the other. The counts are read on the
    host, once (on a GPU, one synchronisation); while a CUDA graph is being captured, where the
    host cannot read them, every sum is computed and selected on the device."""
    starts = [0]
    for ring in rings:
        starts.append(starts[-1] + (2 if ring else size))

    def window(k: int) -> list[torch.Tensor]:
        return _window_of(values[starts[k]:starts[k + 1]], rings[k], size)

    due = resum_due(counts, size)
    if counts.is_cuda and torch.cuda.is_current_stream_capturing():
        for k, t in enumerate(totals):
            t.copy_(torch.where(due[k], window_sum(window(k), t.dtype), t))
        return
    pick = _due_on_host(due)
    for k, v in zip(pick, sum_windows([window(k) for k in pick], [totals[k].dtype for k in pick])):
        totals[k].copy_(v)


@_window_resum_op.register_fake
def _(totals: list[torch.Tensor], values: list[torch.Tensor], rings: list[bool], counts: torch.Tensor, size: int) -> None:
    return None


def _window_resum_vmap(info, in_dims, totals, values, rings, counts, size):  # type: ignore[no-untyped-def]
    """Under ``vmap`` over states (the counts mapped) each sum is computed for every member and
    selected: the members' counts cannot be read one by one."""
    t_dims, v_dims, _, c_dim, _ = in_dims
    counts = counts if c_dim is None else counts.movedim(c_dim, -1)  # [n] or [n, B]
    at = 0
    for k, (ring, t, td) in enumerate(zip(rings, totals, t_dims)):
        m = 2 if ring else size
        vals = [v if d is None else v.movedim(d, 1 if ring and j == 0 else 0)
                for j, (v, d) in enumerate(zip(values[at:at + m], v_dims[at:at + m]))]
        at += m
        phys = t if td is None else t.movedim(td, 0)
        due = resum_due(counts[k], size)
        if c_dim is not None:
            due = due.reshape(-1, *([1] * (phys.dim() - 1)))
        phys.copy_(torch.where(due, _window_sum_op(vals, ring, size, t.dtype), phys))
    return None, None


_window_resum_op.register_vmap(_window_resum_vmap)


def window_sums(
    running: list[torch.Tensor], older: Older, newest: list[torch.Tensor], counts: torch.Tensor, size: int
) -> list[torch.Tensor]:
    """The new running sums of ``n`` leaves (``running``: the element rule's), each replaced by
    its window's sum (``older(k)``, then ``newest[k]``) on the update that is due for it
    (:func:`resum_due` of ``counts``).

    Eagerly the due leaves are read on the host and only they are summed: each window is read
    once every ``size`` updates. In a traced graph (``torch.compile``, ``make_fx``) that is one
    operator, ``grokxform::window_resum_``, which reads the counts when it runs. Under an eager
    ``torch.func`` transform that maps the counts (``vmap`` over states), and while a CUDA graph
    is being captured, every leaf's sum is computed and selected with ``where``."""
    n = len(running)
    if traced():
        totals = [r.clone() for r in running]  # the rule's may be its output too (a "sum" filter)
        windows = [older(k) for k in range(n)]
        flat = [t for k, o in enumerate(windows) for t in _operands(o, newest[k])]
        _window_resum_op(totals, flat, [isinstance(o, torch.Tensor) for o in windows], counts, size)
        return totals
    due = resum_due(counts, size)
    if not wrapped(counts) and not (counts.is_cuda and torch.cuda.is_current_stream_capturing()):
        pick = _due_on_host(due)
        if not pick:
            return running
        out = list(running)
        rows = [_values(older(k), newest[k], size) for k in pick]
        for k, v in zip(pick, sum_windows(rows, [running[k].dtype for k in pick])):
            out[k] = v
        return out
    sums = []
    for k in range(n):
        o = older(k)
        sums.append(_window_sum_op(_operands(o, newest[k]), isinstance(o, torch.Tensor), size, running[k].dtype))
    return [torch.where(due[k], s, r) for k, (s, r) in enumerate(zip(sums, running))]
