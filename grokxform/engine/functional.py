"""The pure ``tx.update`` on the engine's kernels.

A declared transform's ``update`` (:func:`grokxform.declarations.declare`) first offers the call
to :func:`run`: where nothing records or transforms it (no ``torch.func`` transform, no autograd,
no ``torch.compile`` tracing, no dispatch or function mode, plain tensors) the whole declared chain
runs as one :class:`~grokxform.engine.EngineStep` of generated kernels (Triton on CUDA, C on the
CPU), out of place: the state is copied into new tensors (one buffer per device and dtype) and
stepped there, the updates are written into new tensors, the caller's tensors are only read.

One step is built per pattern of the call (the trees' structures, every leaf's shape, dtype and
device, which gradients are ``None``, the extra arguments given) and kept with the transform;
each call points it at that call's tensors (:meth:`~grokxform.engine.EngineStep.bind`). A pattern
the kernels cannot run (a member without a declaration, an MA window in its tuple layout, mixed
dtypes in a leaf, a non-contiguous tensor...) is remembered with the reason, and such calls run
the element rules op by op, the whole transform (:func:`explain` gives the reason).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from grokxform import declarations as D
from grokxform import tree as _tree
from grokxform.engine import native
from grokxform.engine.extras import stage_extras
from grokxform.engine import plan as P
from grokxform.engine.plan import Unsupported
from grokxform.engine.step import EngineStep, available
from grokxform.signals import SIGNAL_INPUTS

CACHE_SIZE = 8
"""How many patterns of calls a transform keeps a built step for (least recently used dropped)."""

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_ALIGN = 16  # elements: each new tensor of a buffer starts at a multiple (64 bytes for float32)


Layout = list[tuple[torch.dtype, torch.device, int, list[int], list[tuple[Any, Any, int]]]]
"""Per buffer of new tensors: its dtype, device and length, the leaves it holds and, for each,
its shape, (contiguous) strides and offset."""


@dataclass(eq=False)
class _Built:
    """A step built for one pattern of calls, and how to lay out its new tensors."""

    step: EngineStep
    names: tuple[str, ...]
    """The extra arguments it reads, in the order it takes them."""
    extras: dict[str, torch.Tensor]
    """Their device tensors, filled each call."""
    computed: list[bool]
    """By leaf of the gradient tree: whether the step computes its update (a leaf no member acts
    on keeps its gradient as its update, the very tensor, and its state)."""
    state_layout: Layout
    update_layout: Layout
    """By leaf of the state tree (the state the step writes) and of the gradient tree."""
    lock: threading.Lock = field(default_factory=threading.Lock)


def _layout(tensors: Mapping[int, torch.Tensor]) -> Layout:
    groups: dict[tuple[torch.dtype, torch.device], tuple[list[int], list[tuple[Any, Any, int]]]] = {}
    ends: dict[tuple[torch.dtype, torch.device], int] = {}
    for i, t in tensors.items():
        key = (t.dtype, t.device)
        idx, views = groups.setdefault(key, ([], []))
        end = ends.get(key, 0)
        n = t.numel()
        if n >= _ALIGN:  # (0-d counters stay consecutive: the engine reads them as one vector)
            end = -(-end // _ALIGN) * _ALIGN
        idx.append(i)
        views.append((t.shape, torch.empty(t.shape, device="meta").stride(), end))
        ends[key] = end + n
    return [(dt, dev, ends[(dt, dev)], idx, views) for (dt, dev), (idx, views) in groups.items()]


def _new_tensors(layout: Layout, out: list[Any], sources: list[Any] | None) -> None:
    """New contiguous tensors as the layout says, carved out of one buffer per dtype and device,
    into ``out`` (by leaf); with ``sources``, a copy of ``sources`` (one multi-tensor copy per buffer)."""
    for dt, dev, size, idx, views in layout:
        buf = torch.empty(size, dtype=dt, device=dev)
        new = [buf.as_strided(shape, stride, off) for shape, stride, off in views]
        for i, v in zip(idx, new):
            out[i] = v
        if sources is not None:
            torch._foreach_copy_(new, [sources[i] for i in idx])


def _active(leaves: list[Any]) -> str | None:
    """Why the kernels cannot run a call over ``leaves`` right now, or ``None``."""
    if torch._C._functorch.peek_interpreter_stack() is not None:
        return "a torch.func transform is active"
    if torch._C._len_torch_dispatch_stack() or torch._C._len_torch_function_stack():
        return "a dispatch or function mode is active"
    grad = torch.is_grad_enabled()
    for t in leaves:
        if not isinstance(t, torch.Tensor):  # (``None``, numbers: the key holds their types)
            continue
        if type(t) not in _PLAIN:
            return f"a leaf is a {type(t).__name__}, not a plain tensor"
        if t.layout is not torch.strided:
            return f"a leaf is a {t.layout} tensor"
        if grad and t.requires_grad:
            return "autograd records the call (an input requires grad)"
    return None


def _metas(leaves: list[Any], layout: bool = True) -> tuple[Any, ...]:
    """Each leaf's shape, dtype, device and (``layout``: the kernels read it as it is) contiguity."""
    if layout:
        return tuple([(t.shape, t.dtype, t.device, t.is_contiguous()) if isinstance(t, torch.Tensor) else type(t)
                      for t in leaves])
    return tuple([(t.shape, t.dtype, t.device) if isinstance(t, torch.Tensor) else type(t) for t in leaves])


def _extra_key(extra: Mapping[str, Any], names: frozenset[str]) -> tuple[Any, ...]:
    """The extra arguments as the step takes them (:func:`~grokxform.engine.extras.stage_extras`):
    a signal input is a 0-d float64 tensor, and so is a number; another tensor keeps its shape
    (floats as float64)."""
    out = []
    for k, v in sorted(extra.items()):
        if k not in names or v is None:
            continue
        if k in SIGNAL_INPUTS:  # (checked as it is staged: refused as the op-by-op path refuses it)
            out.append((k, "signal"))
        elif isinstance(v, torch.Tensor):
            out.append((k, v.shape, torch.float64 if v.is_floating_point() else v.dtype))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append((k, torch.Size(), torch.float64))
        else:
            out.append((k, type(v)))
    return tuple(out)


def _check_dtypes(step: EngineStep) -> None:
    """Every per-element tensor a leaf's program reads and writes in the gradient's dtype: the
    kernels then give the update the dtype the op-by-op path gives it."""
    plan = step.plan
    for grp in step._groups:
        dts = set(grp.dtypes.values())
        if len(dts) > 1:
            leaf = plan.paths[grp.leaves[0]]
            raise Unsupported(f"the tensors at {leaf!r} mix dtypes ({sorted(map(str, dts))})")


def _check_shapes(plan: P.Plan, g_leaves: list[Any], params: Any) -> None:
    """Every per-element tensor of a leaf shaped as its gradient (else the op-by-op path raises,
    naming the path)."""
    p_leaves = plan.params if params is not None else None
    for i in plan.leaves:
        if p_leaves is not None and getattr(p_leaves[i], "shape", None) != g_leaves[i].shape:
            raise Unsupported(f"the param at {plan.paths[i]!r} is not shaped as its gradient")
    for node in plan.nodes:
        for name, col in node.columns().items():
            if name == "window":
                continue
            for i, t in zip(node.leaves, col):
                if getattr(t, "shape", None) != g_leaves[i].shape:
                    raise Unsupported(f"{node.where}: a state tensor at {plan.paths[i]!r} is not shaped as its gradient")


def _per_leaf_state(plan: P.Plan) -> set[int]:
    """The ids of the per-leaf state tensors the plan reads or writes."""
    return {id(t) for node in plan.nodes for col in node.state_tensors() for t in col}


def _build(
    decl: D.Declaration, names: frozenset[str], g_leaves: list[Any], state: Any, s_leaves: list[Any],
    params: Any, g_tree: Any, extra: Mapping[str, Any],
) -> _Built:
    present = [g for g in g_leaves if g is not None]
    if not present:
        raise Unsupported("no leaf has a gradient")
    device = present[0].device
    if device.type == "cuda":
        if not available(device):
            raise Unsupported(f"Triton cannot run on {device} here")
        backend = "triton"
    elif device.type == "cpu":
        cc, why = native.compiler()
        if cc is None:
            raise Unsupported(why)
        backend = "c"
    else:
        raise Unsupported(f"no kernels for {device.type} tensors")
    p_tree = params if params is not None else g_tree
    whole = P.make_plan(decl, state, p_tree, g_leaves)
    _check_shapes(whole, g_leaves, params)
    if params is None and any(m.decl.needs_params for m in whole.members):
        raise Unsupported("a member reads the params and none were given")
    acted = set().union(*(node.computes(whole.leaves) for node in whole.nodes))
    computed = [i in acted for i in range(len(g_leaves))]
    if not acted:
        raise Unsupported("no member acts on a leaf with a gradient")
    xs = stage_extras({}, {k: v for k, v in extra.items() if k in names}, device, "tx.update", Unsupported)
    # Built over the caller's tensors, which building only reads; each call binds it to its own.
    g_run = [g if c else None for g, c in zip(g_leaves, computed)]
    step = EngineStep(None, p_tree, state, g_run, xs, backend=backend, declaration=decl, output="updates")
    _check_dtypes(step)
    # The per-leaf state of leaves the step does not touch is kept as it is (the same tensors).
    try:
        every = _per_leaf_state(P.make_plan(decl, state, p_tree, [True] * len(g_leaves)))
    except Unsupported:  # (a leaf without state): every state tensor is new
        every = set()
    kept = every - _per_leaf_state(step.plan)
    step.release()
    state_layout = _layout({i: t for i, t in enumerate(s_leaves) if isinstance(t, torch.Tensor) and id(t) not in kept})
    update_layout = _layout({i: g for i, g in enumerate(g_run) if g is not None})
    return _Built(step, tuple(xs), xs, computed, state_layout, update_layout)


def _decide(
    decl: D.Declaration, cache: dict[Any, Any], updates: Any, state: Any, params: Any, extra: Mapping[str, Any],
) -> tuple[_Built | None, str | None, tuple[Any, ...]]:
    """The step for this call (built if new), or why there is none; and the trees' leaves and keys."""
    refused = cache.get("refused")
    if refused is not None:  # (said by the transform's state layout: no call of it runs on the kernels)
        return None, refused, ([], None, [], None)
    g_leaves, g_key = _tree.structure(updates)
    s_leaves, s_key = _tree.structure(state)
    p_leaves, p_key = _tree.structure(params) if params is not None else ([], None)
    trees = (g_leaves, g_key, s_leaves, s_key)
    why = _active([*g_leaves, *s_leaves, *p_leaves])
    if why is not None:
        return None, why, trees
    if g_key is None or s_key is None or (params is not None and p_key is None):
        return None, "a tree has a node type other than dict, list, tuple and NamedTuple", trees
    if params is not None and p_key != g_key:
        return None, "the gradient tree does not have the structure of the params", trees
    names = cache.get("names")
    if names is None:
        got = D.extra_args(decl)
        names = cache["names"] = frozenset() if got is None else got
    key = (g_key, s_key, p_key, _metas(g_leaves), _metas(s_leaves, layout=False), _metas(p_leaves),
           _extra_key(extra, names))  # (the state is copied: its layout does not matter)
    steps: OrderedDict[Any, Any] = cache.setdefault("steps", OrderedDict())
    got = steps.get(key)
    if got is None:
        try:
            with torch.no_grad():
                got = _build(decl, names, g_leaves, state, s_leaves, params, updates, extra)
        except P.TupleWindow as e:  # a window the pure update keeps as a tuple: every call is refused
            got = cache["refused"] = str(e)
        except Unsupported as e:
            got = steps[key] = str(e)
        except (IndexError, KeyError, TypeError, ValueError, AttributeError) as e:  # inputs the op-by-op path refuses
            return None, f"{type(e).__name__}: {e}", trees
        else:
            steps[key] = got
        while len(steps) > CACHE_SIZE:
            steps.popitem(last=False)
    else:
        steps.move_to_end(key)
    return (None, got, trees) if isinstance(got, str) else (got, None, trees)


def _attempt(
    decl: D.Declaration, cache: dict[Any, Any], updates: Any, state: Any, params: Any, extra: Mapping[str, Any],
) -> tuple[tuple[Any, Any] | None, str | None]:
    built, why, (g_leaves, g_key, s_leaves, s_key) = _decide(decl, cache, updates, state, params, extra)
    if built is None:
        return None, why
    if not built.lock.acquire(blocking=False):
        return None, "the step is running in another thread"
    step = built.step
    try:
        xs = stage_extras(built.extras, {k: v for k, v in extra.items() if k in built.names}, step.device,
                          "tx.update", Unsupported)
        s_new = list(s_leaves)
        _new_tensors(built.state_layout, s_new, s_leaves)
        u_new = list(g_leaves)
        _new_tensors(built.update_layout, u_new, None)
        g_run = [g if c else None for g, c in zip(g_leaves, built.computed)]
        new_state = _tree.restructure(s_key, s_new)
        with torch.no_grad():
            step.bind(new_state, params if params is not None else updates, g_run,
                      {i: u_new[i] for i in step.plan.leaves})
            step.prepare([g_run[i] for i in step.plan.leaves])
        step(xs)  # (in the caller's grad mode: it refuses a hyperparameter that requires grad)
        return (_tree.restructure(g_key, u_new), new_state), None
    except Unsupported as e:  # only new tensors were written: the call runs op by op instead
        return None, str(e)
    finally:
        step.release()
        built.lock.release()


def run(
    decl: D.Declaration, cache: dict[Any, Any], updates: Any, state: Any, params: Any, extra: dict[str, Any],
) -> tuple[Any, Any] | None:
    """``update(updates, state, params, **extra)`` of the transform declared by ``decl`` on
    generated kernels, or ``None`` where they cannot run this call (the caller then runs the
    element rules op by op). ``cache``: the transform's own, kept between calls."""
    return _attempt(decl, cache, updates, state, params, extra)[0]


def explain(tx: Any, updates: Any, state: Any, params: Any = None, **extra: Any) -> str | None:
    """Why ``tx.update(updates, state, params, **extra)`` runs op by op rather than on the
    engine's kernels, or ``None`` when the kernels run it. It makes the call (a pure one) to find out.

    Examples:
        >>> from grokxform.engine.functional import explain
        >>> tx = gx.adamw(1e-3)
        >>> params = {"w": torch.ones(3, requires_grad=True)}
        >>> explain(tx, {"w": torch.ones(3)}, tx.init(params), params)
        'autograd records the call (an input requires grad)'
    """
    decl = D.declaration_of(tx)
    if decl is None:
        return "the transform has no declaration"
    if not D._kernels_on.get():
        return "kernels are off (gx.kernels(False))"
    return _attempt(decl, getattr(tx.update, D.KERNEL_CACHE), updates, state, params, extra)[1]


D.set_kernel_runner(run)
