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
from typing import Any, Union

import torch

from grokxform.elements import foreach_ok, traced, unwrapped, wrapped

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


def _any_due(counts: torch.Tensor, size: int) -> bool:
    """Whether any leaf is due (of any member, under ``torch.vmap``): the counts read on the host
    through ``torch.func``'s wrappers, once; ``True`` while a CUDA graph is being captured (the
    host cannot read them)."""
    if counts.is_cuda and torch.cuda.is_current_stream_capturing():
        return True
    return any(c % size == size - 1 for c in unwrapped(counts).reshape(-1).tolist())


def _needs_grad(running: list[torch.Tensor], windows: list[Any], newest: list[torch.Tensor]) -> bool:
    """Whether autograd records the re-sum: grad mode is on and a sum or a window value requires
    a gradient."""
    if not torch.is_grad_enabled():
        return False
    rows = [t for w in windows for t in ([w] if isinstance(w, torch.Tensor) else w)]
    return any(t.requires_grad for t in [*running, *newest, *rows])


def _check_not_func_transformed() -> None:
    """Raise if a ``torch.func`` transform differentiates a graph being traced by ``make_fx``:
    the autograd rule of a custom operator does not run under ``torch.func``."""
    if not torch.compiler.is_compiling() and torch._C._functorch.maybe_current_level() is not None:
        raise RuntimeError(
            "ma_filter: torch.func.grad (or vjp, jacrev) cannot differentiate the window's re-sum inside"
            " a graph traced by make_fx; apply the transform to the untraced function, or differentiate"
            " the traced one with torch.autograd"
        )


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


def _window_sum_setup(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    values, ring, size, _ = inputs
    ctx.ring, ctx.size = ring, size
    ctx.metas = [(v.shape, v.dtype) for v in values]


def _window_sum_backward(ctx: Any, grad: torch.Tensor) -> tuple[list[torch.Tensor], None, None, None]:
    """The sum is linear: each value added gets the incoming gradient, cast to its dtype (summed
    over the dimensions it was broadcast along, as autograd does for ``acc + v``); a ring's slots
    that are not in the window get zero."""
    wide = grad.to(torch.float64)
    grads = []
    for k, (shape, dtype) in enumerate(ctx.metas):
        if ctx.ring and k == 0:
            row = wide.sum_to_size(shape[1:]).to(dtype)
            used = min(ctx.size - 1, shape[0])
            unused = row.new_zeros(shape[0] - used, *row.shape)
            grads.append(torch.cat([row.expand(used, *row.shape), unused]))
        else:
            grads.append(wide.sum_to_size(shape).to(dtype))
    return grads, None, None, None


_window_sum_op.register_autograd(_window_sum_backward, setup_context=_window_sum_setup)


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
    operator, ``grokxform::window_resum_``, which reads the counts when it runs; a traced graph
    that differentiates the sums (a window or a sum requires a gradient) computes every leaf's
    sum with ``grokxform::window_sum``, which has an autograd rule, and selects it with
    ``where``. Under an eager ``torch.func`` transform (grad, jvp, vmap: the counts are then
    wrapped too) the counts are read through the wrappers, and on an update where any leaf of any
    member is due (and always while a CUDA graph is being captured) every leaf's sum is computed
    with plain torch ops, which every transform differentiates and batches, and selected with
    ``where``."""
    n = len(running)
    if traced():
        windows = [older(k) for k in range(n)]
        if not _needs_grad(running, windows, newest):
            totals = [r.clone() for r in running]  # the rule's may be its output too (a "sum" filter)
            flat = [t for k, o in enumerate(windows) for t in _operands(o, newest[k])]
            _window_resum_op(totals, flat, [isinstance(o, torch.Tensor) for o in windows], counts, size)
            return totals
        _check_not_func_transformed()
        sums = [_window_sum_op(_operands(o, newest[k]), isinstance(o, torch.Tensor), size, running[k].dtype)
                for k, o in enumerate(windows)]
    elif not wrapped(counts) and not (counts.is_cuda and torch.cuda.is_current_stream_capturing()):
        pick = _due_on_host(resum_due(counts, size))
        if not pick:
            return running
        out = list(running)
        rows = [_values(older(k), newest[k], size) for k in pick]
        for k, v in zip(pick, sum_windows(rows, [running[k].dtype for k in pick])):
            out[k] = v
        return out
    else:
        if not _any_due(counts, size):
            return running
        sums = [window_sum(_values(older(k), newest[k], size), running[k].dtype) for k in range(n)]
    due = resum_due(counts, size)
    return [torch.where(due[k], s, r) for k, (s, r) in enumerate(zip(sums, running))]
