"""Wrappers that decide where and when an inner transform acts: ``masked``, ``partition``,
``MultiSteps`` (gradient accumulation) and ``apply_if_finite``.

Decisions that depend on tensor values (is this the k-th micro-step? is the gradient finite?) are
made with ``torch.where`` over the results rather than Python ``if``: no host synchronisation, no
graph break under ``torch.compile``, and they batch under ``torch.func.vmap``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Union

import torch

from grokxform import _common as C
from grokxform import tree as _tree
from grokxform.base import GradientTransformation, Params, Updates, static_hyperparams, with_extra_args_support
from grokxform.declarations import Accumulate, IfFinite, Masked, Partition, declaration_of, declare, run_rule
from grokxform.elements import Inputs, Outputs, Scalars, TracedRule, where
from grokxform.transforms.masks import Mask, mask_selector


def _keep(tree: Any, selected: list[bool]) -> Any:
    """``tree`` with the unselected leaves replaced by ``None``."""
    leaves, spec = _tree.flatten(tree)
    return _tree.unflatten([x if s else None for x, s in zip(leaves, selected)], spec)


def _merge(base: Any, overlay: Any, selected: list[bool]) -> Any:
    """Leaves of ``overlay`` where selected, of ``base`` elsewhere."""
    b, spec = _tree.flatten(base)
    o, _ = _tree.flatten(overlay)
    return _tree.unflatten([y if s else x for x, y, s in zip(b, o, selected)], spec)


def _skip(rule: TracedRule, flag: dict[str, torch.Tensor], updates: Any) -> Any:
    """The update of a step that a wrapper takes where its ``flag`` is set, else skips (``rule``: −0.0)."""
    leaves, spec = _tree.flatten(updates)
    index = [i for i, u in enumerate(leaves) if u is not None]
    got = run_rule(rule, {"x": [leaves[i] for i in index]}, Scalars(flag, len(index)))["out"]
    for j, i in enumerate(index):
        leaves[i] = got[j]
    return _tree.unflatten(leaves, spec)


def _select(cond: torch.Tensor, new: Any, old: Any) -> Any:
    """``where(cond, new, old)`` leaf by leaf over two trees of the same structure."""

    def pick(n: Any, o: Any) -> Any:
        if isinstance(n, torch.Tensor) and isinstance(o, torch.Tensor):
            return torch.where(cond.to(n.device), n, o)
        return n

    return _tree.tree_map(pick, new, old)


@static_hyperparams("mask")
def masked(inner: GradientTransformation, mask: Mask) -> GradientTransformation:
    """Apply ``inner`` to the selected leaves only; the others pass through unchanged.

    ``mask``: glob patterns over dotted paths, ``fn(path, param) -> bool``, or a tree of bools.
    The inner transform sees the unselected leaves as ``None`` (no gradient), so it keeps no
    state for them. State: the inner state.

    Examples:
        >>> tx = gx.masked(gx.scale_by_learning_rate(0.1), lambda path, p: path == "W")
        >>> params = {"W": torch.ones(1), "b": torch.ones(1)}
        >>> u, _ = tx.update({"W": torch.ones(1), "b": torch.ones(1)}, tx.init(params), params)
        >>> u["W"], u["b"]                                     # unmasked leaves pass through
        (tensor([-0.1000]), tensor([1.]))
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"masked: inner must be a GradientTransformation, got {type(inner).__name__}")
    inner = with_extra_args_support(inner)  # (an inner transform without **extra gets what it names)
    selection = mask_selector(mask, "masked")

    def init_fn(params: Params) -> Any:
        return inner.init(_keep(params, selection(params)))

    def update_fn(updates: Updates, state: Any, params: Params | None = None, **extra: Any) -> tuple[Updates, Any]:
        ref = params if params is not None else updates
        sel = selection(ref)
        inner_params = None if params is None else _keep(params, sel)
        out, new_state = inner.update(_keep(updates, sel), state, inner_params, **extra)
        return _merge(updates, out, sel), new_state

    return declare(GradientTransformation(init_fn, update_fn), Masked(declaration_of(inner), selection))


Labeler = Union[Callable[[str, torch.Tensor], str], Any]


def partition(transforms: Mapping[str, GradientTransformation], labels: Labeler) -> GradientTransformation:
    """A different transform per label: each leaf goes through ``transforms[label(leaf)]`` alone.

    ``labels``: ``fn(path, param) -> label`` or a tree of labels shaped like the params. State: a
    dict label -> that transform's state (it sees the other labels' leaves as ``None``).

    Examples:
        >>> label = lambda path, p: "plain" if p.ndim < 2 else "decayed"
        >>> tx = gx.partition({"decayed": gx.adamw(weight_decay=0.1), "plain": gx.adamw(weight_decay=0.0)}, label)
        >>> params = {"W": torch.ones(2, 2), "b": torch.ones(2)}
        >>> state = tx.init(params)
        >>> sorted(state)
        ['decayed', 'plain']
    """
    if not transforms:
        raise ValueError("partition: transforms must not be empty")
    for k, t in transforms.items():
        if not isinstance(t, GradientTransformation):
            raise TypeError(f"partition: transforms[{k!r}] is not a GradientTransformation")
    transforms = {k: with_extra_args_support(t) for k, t in transforms.items()}
    names = list(transforms)
    resolved: dict[tuple[str, ...], list[str]] = {}

    def leaf_labels(params: Params) -> list[str]:
        key = tuple(_tree.path_names(params))
        if key not in resolved:
            leaves, spec = _tree.flatten(params)
            if callable(labels):
                got = [labels(n, p) for n, p in zip(key, leaves)]
            else:
                _tree.check_structure(labels, params, "params", "labels", shapes=False)
                got = _tree.flatten(labels)[0]
            for n, lab in zip(key, got):
                if lab not in transforms:
                    raise ValueError(f"partition: leaf {n!r} has label {lab!r}, which is not one of {names}")
            resolved[key] = got
        return resolved[key]

    def init_fn(params: Params) -> dict[str, Any]:
        labs = leaf_labels(params)
        return {k: t.init(_keep(params, [lab == k for lab in labs])) for k, t in transforms.items()}

    def update_fn(
        updates: Updates, state: dict[str, Any], params: Params | None = None, **extra: Any
    ) -> tuple[Updates, dict[str, Any]]:
        if not isinstance(state, dict) or list(state) != names:
            raise ValueError(f"partition: the state must be a dict with keys {names}")
        labs = leaf_labels(params if params is not None else updates)
        out, new_state = updates, {}
        for k, t in transforms.items():
            sel = [lab == k for lab in labs]
            p = None if params is None else _keep(params, sel)
            part, new_state[k] = t.update(_keep(updates, sel), state[k], p, **extra)
            out = _merge(out, part, sel)
        return out, new_state

    members = {k: declaration_of(t) for k, t in transforms.items()}
    return declare(GradientTransformation(init_fn, update_fn), Partition(members, leaf_labels))


class MultiStepsState(NamedTuple):
    """``mini_step``: micro-steps since the last real step (0-d int64); ``acc``: per-leaf gradient
    sums; ``inner_state``; ``steps``: real steps taken (0-d int64)."""

    mini_step: torch.Tensor
    acc: Any
    inner_state: Any
    steps: torch.Tensor


def MultiSteps(inner: GradientTransformation, every_k_schedule: int) -> GradientTransformation:  # noqa: N802
    """Gradient accumulation: ``inner`` runs on the mean of every k gradients.

    Micro-steps 1..k−1 add g to the accumulator and return zero updates (−0.0, so the params stay
    bit for bit); micro-step k returns ``inner.update(mean of the k gradients)`` and resets the
    accumulator. Leaves with a ``None`` gradient add nothing (the mean still divides by k); a leaf
    whose gradient is ``None`` on micro-step k gets no update and keeps its sum, which is carried
    into the next window rather than dropped. State: :class:`MultiStepsState`.

    Examples:
        >>> tx = gx.MultiSteps(gx.scale_by_learning_rate(1.0), every_k_schedule=2)   # one step per 2 micro-batches
        >>> state = tx.init({"w": torch.zeros(1)})
        >>> u, state = tx.update({"w": torch.tensor([1.0])}, state)
        >>> bool(u["w"].eq(0).all())      # accumulating: no step yet
        True
        >>> u, state = tx.update({"w": torch.tensor([3.0])}, state)
        >>> u["w"]                       # −lr·mean(1, 3)
        tensor([-2.])
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"MultiSteps: inner must be a GradientTransformation, got {type(inner).__name__}")
    inner = with_extra_args_support(inner)  # (an inner transform without **extra gets what it names)
    k = C.check_int("MultiSteps", "every_k_schedule", every_k_schedule, low=1)

    def init_fn(params: Params) -> MultiStepsState:
        dev = _tree.first_device(params)
        return MultiStepsState(C.counter(dev), C.zeros_like_tree(params), inner.init(params), C.counter(dev))

    def update_fn(
        updates: Updates, state: MultiStepsState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, MultiStepsState]:
        _tree.check_structure(updates, state.acc, "MultiSteps state", "gradient")
        final, counters = decl.advance(state)
        g_leaves, spec = _tree.flatten(updates)
        acc_leaves = _tree.flatten(state.acc)[0]
        index = [i for i, g in enumerate(g_leaves) if g is not None]
        got = run_rule(_ACCUMULATE, {"x": [g_leaves[i] for i in index], "acc": [acc_leaves[i] for i in index]},
                       Scalars({"k": float(k), "final": final}, len(index)))
        mean: list[Any] = [None] * len(g_leaves)
        new_acc = list(acc_leaves)  # a leaf without a gradient keeps its sum (for the next window too)
        for j, i in enumerate(index):
            mean[i], new_acc[i] = got["mean"][j], got["acc"][j]
        out, inner_new = inner.update(_tree.unflatten(mean, spec), state.inner_state, params, **extra)
        return _skip(decl.skip, {"final": final}, out), MultiStepsState(
            mini_step=counters["mini_step"],
            acc=_tree.unflatten(new_acc, spec),
            inner_state=_select(final, inner_new, state.inner_state),
            steps=counters["steps"],
        )

    decl = Accumulate(declaration_of(inner), k, _ACCUMULATE)
    return declare(GradientTransformation(init_fn, update_fn), decl)


def _accumulate(v: Inputs, sc: Inputs) -> Outputs:
    """The sum of the micro-steps' gradients and their mean over k (in the gradient's dtype); the
    sum kept is zero after the k-th micro-step (flag ``final``)."""
    acc = v.acc + v.x.to(v.acc.dtype)
    return {"acc": where(sc.final, 0.0, acc), "mean": (acc / sc.k).to(v.x.dtype)}


_ACCUMULATE = TracedRule(_accumulate)


class ApplyIfFiniteState(NamedTuple):
    """``notfinite_count``: consecutive skipped steps; ``last_finite``: whether the last gradient
    was finite; ``total_notfinite``: skipped steps in all; ``inner_state``."""

    notfinite_count: torch.Tensor
    last_finite: torch.Tensor
    total_notfinite: torch.Tensor
    inner_state: Any


def apply_if_finite(inner: GradientTransformation) -> GradientTransformation:
    """Skip steps whose gradient has a NaN or an infinity anywhere.

    If every gradient leaf is finite: ``inner.update``. Otherwise the updates are −0.0 (so
    ``apply_updates`` leaves the params bit for bit as they were, −0.0 included), the inner state is
    kept as it was, and the skip is counted. Only the gradients are checked: a non-finite loss or
    signal passed as an extra argument is handled by the transform that reads it (the EMA filter
    falls back to α_init). A tree that is part of a larger gradient (the param groups of one
    :class:`~grokxform.Optimizer`, which passes it for you): ``update(..., global_grad_finite=b)``
    says whether the whole is finite, and a step is taken only when it is. State:
    :class:`ApplyIfFiniteState`.

    Examples:
        >>> tx = gx.apply_if_finite(gx.adamw(lr=1e-3))
        >>> params = {"w": torch.tensor([1.0, -2.0])}
        >>> state = tx.init(params)
        >>> u, state = tx.update({"w": torch.tensor([float("nan"), 1.0])}, state, params)
        >>> bool(u["w"].eq(0).all()), int(state.notfinite_count)   # step skipped, state kept
        (True, 1)
    """
    if not isinstance(inner, GradientTransformation):
        raise TypeError(f"apply_if_finite: inner must be a GradientTransformation, got {type(inner).__name__}")
    inner = with_extra_args_support(inner)  # (an inner transform without **extra gets what it names)

    def init_fn(params: Params) -> ApplyIfFiniteState:
        dev = _tree.first_device(params)
        return ApplyIfFiniteState(C.counter(dev), torch.ones((), dtype=torch.bool, device=dev), C.counter(dev),
                                  inner.init(params))

    def update_fn(
        updates: Updates, state: ApplyIfFiniteState, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, ApplyIfFiniteState]:
        dev = state.last_finite.device
        present = [g for g in _tree.flatten(updates)[0] if g is not None]
        finite = torch.ones((), dtype=torch.bool, device=dev)
        for g in present:
            finite = finite & torch.isfinite(g).all().to(dev)
        finite = IfFinite.combine(finite, extra)
        out, inner_new = inner.update(updates, state.inner_state, params, **extra)
        return _skip(IfFinite.skip, {"finite": finite}, out), ApplyIfFiniteState(
            **IfFinite.advance(state, finite), inner_state=_select(finite, inner_new, state.inner_state)
        )

    return declare(GradientTransformation(init_fn, update_fn), IfFinite(declaration_of(inner)))
