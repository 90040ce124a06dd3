"""The one abstraction: a pair of pure functions ``(init, update)`` over pytrees of tensors.

A :class:`GradientTransformation` turns a tree of gradients into a tree of updates::

    state = tx.init(params)
    updates, state = tx.update(grads, state, params, **extra)
    params = apply_updates(params, updates)

``update`` never mutates its inputs and never returns a state tensor as an update. Extra keyword
arguments (``train_loss=``, ``val_loss=``, ``grokking_signal=``...) flow through every combinator;
each transform takes what it needs and ignores the rest.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol, Union

import torch

from grokxform import _common
from grokxform import declarations as _decl
from grokxform import tree as _tree
from grokxform.elements import Inputs, Outputs, TracedRule

Params = Any
"""A pytree of tensors (``dict(model.named_parameters())`` is the common case)."""
Updates = Any
"""A pytree with the structure of the params; a ``None`` leaf means "no gradient"."""
State = Any
"""A pytree of NamedTuples / dicts / tuples of tensors."""
Scalar = Union[float, int, torch.Tensor]
"""A hyperparameter: a Python number or a 0-d tensor (batched under ``torch.func.vmap``)."""
Schedule = Callable[[torch.Tensor], torch.Tensor]
"""A function of the 0-d int64 step count (0 at the first update) returning a 0-d tensor."""


class InitFn(Protocol):
    def __call__(self, params: Params) -> State: ...


class UpdateFn(Protocol):
    def __call__(
        self, updates: Updates, state: State, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, State]: ...


class GradientTransformation(NamedTuple):
    """``init(params) -> state`` and ``update(updates, state, params=None, **extra)``."""

    init: InitFn
    update: UpdateFn


class EmptyState(NamedTuple):
    """The state of a stateless transform."""


def identity() -> GradientTransformation:
    """The transform that returns its input: ``u = g``.

    Examples:
        >>> tx = gx.identity()
        >>> u, _ = tx.update({"w": torch.ones(1)}, tx.init({"w": torch.ones(1)}))
        >>> u["w"]
        tensor([1.])
    """

    def init(params: Params) -> EmptyState:
        del params
        return EmptyState()

    def update(
        updates: Updates, state: State, params: Params | None = None, **extra: Any
    ) -> tuple[Updates, State]:
        del params, extra
        return updates, state

    return _decl.declare(GradientTransformation(init, update), _decl.Sequence((), ()))


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Apply ``transforms`` in order: ``u = t_n(...t_2(t_1(g)))``. State: a tuple, one per transform.

    The extra keyword arguments of ``update`` (``train_loss=``...) reach each member that takes
    them: one whose ``update`` has ``**kwargs`` gets all of them, one written without (an
    optax-style ``update(updates, state, params=None)``) only those it names
    (:func:`with_extra_args_support`; its signature is read once, here).

    Examples:
        >>> tx = gx.chain(gx.clip_by_global_norm(1.0), gx.scale_by_adam(), gx.scale_by_learning_rate(1e-3))
        >>> state = tx.init({"w": torch.zeros(2)})
        >>> len(state)
        3
    """
    for i, t in enumerate(transforms):
        if not isinstance(t, GradientTransformation):
            raise TypeError(f"chain: argument {i} is {type(t).__name__}, not a GradientTransformation")
    transforms = tuple(with_extra_args_support(t) for t in transforms)

    def init(params: Params) -> tuple[State, ...]:
        return tuple(t.init(params) for t in transforms)

    def update(
        updates: Updates, state: tuple[State, ...], params: Params | None = None, **extra: Any
    ) -> tuple[Updates, tuple[State, ...]]:
        if not isinstance(state, tuple) or len(state) != len(transforms):
            raise ValueError(
                f"chain: the state must be a tuple of {len(transforms)} states, got {type(state).__name__}"
                + (f" of length {len(state)}" if isinstance(state, tuple) else "")
            )
        new_state = []
        for t, s in zip(transforms, state):
            updates, s = t.update(updates, s, params, **extra)
            new_state.append(s)
        return updates, tuple(new_state)

    members = tuple(_decl.declaration_of(t) for t in transforms)
    return _decl.declare(
        GradientTransformation(init, update), _decl.Sequence(tuple(range(len(transforms))), members, transforms)
    )


def named_chain(*named: tuple[str, GradientTransformation]) -> GradientTransformation:
    """Like :func:`chain`, with state a dict keyed by name: ``state["adam"].mu``. Each member gets
    the extra keyword arguments it takes, as in :func:`chain`.

    Examples:
        >>> tx = gx.named_chain(("adam", gx.scale_by_adam()), ("lr", gx.scale_by_learning_rate(1e-3)))
        >>> state = tx.init({"w": torch.zeros(2)})
        >>> state["adam"].mu["w"]
        tensor([0., 0.])
    """
    names = [n for n, _ in named]
    if len(set(names)) != len(names):
        raise ValueError(f"named_chain: names must be unique, got {names}")
    for n, t in named:
        if not isinstance(n, str) or not isinstance(t, GradientTransformation):
            raise TypeError(f"named_chain: expected (str, GradientTransformation) pairs, got ({n!r}, {t!r})")
    named = tuple((n, with_extra_args_support(t)) for n, t in named)

    def init(params: Params) -> dict[str, State]:
        return {n: t.init(params) for n, t in named}

    def update(
        updates: Updates, state: dict[str, State], params: Params | None = None, **extra: Any
    ) -> tuple[Updates, dict[str, State]]:
        if not isinstance(state, dict) or list(state) != names:
            got = list(state) if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"named_chain: the state must be a dict with keys {names}, got {got}")
        new_state = {}
        for n, t in named:
            updates, new_state[n] = t.update(updates, state[n], params, **extra)
        return updates, new_state

    members = tuple(_decl.declaration_of(t) for _, t in named)
    return _decl.declare(
        GradientTransformation(init, update), _decl.Sequence(tuple(names), members, tuple(t for _, t in named))
    )


def _accepted_extras(update: Callable[..., Any]) -> frozenset[str] | None:
    """The extra keyword arguments ``update(updates, state, params, ...)`` takes by name, or
    ``None`` when it takes any (``**kwargs``) or its signature cannot be read."""
    try:
        parameters = list(inspect.signature(update).parameters.values())
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in parameters):
        return None
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    named = [p for p in positional[3:] if p.kind is p.POSITIONAL_OR_KEYWORD]
    named += [p for p in parameters if p.kind is p.KEYWORD_ONLY]
    return frozenset(p.name for p in named)


def with_extra_args_support(tx: GradientTransformation) -> GradientTransformation:
    """``tx`` with an ``update`` that takes any extra keyword arguments (``train_loss=``,
    ``val_loss=``...) and passes on only those that ``tx.update`` names: what an optax-style
    transform written as ``update(updates, state, params=None)`` needs to run where a training
    loop passes the losses. ``tx`` itself when its ``update`` already takes ``**kwargs`` (every
    transform of this package does); its signature is read once, here. :func:`chain`,
    :func:`named_chain` and the wrappers (``masked``, ``partition``, ``MultiSteps``,
    ``apply_if_finite``, ``amplify``) wrap their members so; wrap a lone transform yourself. A
    transform without a declaration stays without one (the engine runs its ``update`` as it is).

    Examples:
        >>> def halve():
        ...     def update(updates, state, params=None):          # no **extra
        ...         return {k: v / 2 for k, v in updates.items()}, state
        ...     return gx.GradientTransformation(lambda params: gx.EmptyState(), update)
        >>> tx = gx.with_extra_args_support(halve())
        >>> u, _ = tx.update({"w": torch.ones(1)}, gx.EmptyState(), None, train_loss=torch.tensor(0.5))
        >>> u["w"]
        tensor([0.5000])
    """
    if not isinstance(tx, GradientTransformation):
        raise TypeError(f"with_extra_args_support: expected a GradientTransformation, got {type(tx).__name__}")
    if _decl.declaration_of(tx) is not None:  # (its update takes **extra; no signature to read where
        return tx                             # a factory is rebuilt every step inside torch.compile)
    accepted = _accepted_extras(tx.update)
    if accepted is None:
        return tx
    inner = tx.update

    def update(updates: Updates, state: State, params: Params | None = None, **extra: Any) -> tuple[Updates, State]:
        return inner(updates, state, params, **{k: v for k, v in extra.items() if k in accepted})

    update.__name__ = getattr(inner, "__name__", "update")
    update.__qualname__ = getattr(inner, "__qualname__", "update")
    update.__doc__ = getattr(inner, "__doc__", None)
    return GradientTransformation(tx.init, update)


STATIC_ATTR = "__grokxform_static_hyperparams__"


def static_hyperparams(*names: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Mark the arguments ``names`` of a transform factory as ones that
    :func:`~grokxform.inject_hyperparams` keeps fixed (they decide the transform's structure: a
    mask, a layer rule, a signal function, a clip that 0 switches off), whatever their type.

    Examples:
        >>> @gx.base.static_hyperparams("mask")
        ... def my_decay(weight_decay=0.1, mask=None):
        ...     return gx.decoupled_weight_decay(weight_decay, mask=mask)
        >>> tx = gx.inject_hyperparams(my_decay)(weight_decay=0.2, mask=lambda path, p: p.dim() > 1)
        >>> sorted(tx.init({"w": torch.ones(1)}).hyperparams)
        ['weight_decay']
    """

    def mark(factory: Callable[..., Any]) -> Callable[..., Any]:
        setattr(factory, STATIC_ATTR, frozenset(names) | getattr(factory, STATIC_ATTR, frozenset()))
        return factory

    return mark


def apply_updates(params: Params, updates: Updates) -> Params:
    """``θ' = θ + u`` leaf by leaf, in the dtype of θ; a ``None`` update leaves θ as it is. Pure.

    Examples:
        >>> gx.apply_updates({"w": torch.ones(2)}, {"w": torch.tensor([0.5, -1.0])})
        {'w': tensor([1.5000, 0.0000])}
    """
    p_leaves, p_spec = _tree.flatten(params)
    u_leaves, spec = _tree.flatten(updates)
    if spec != p_spec or any(
        isinstance(u, torch.Tensor) and isinstance(p, torch.Tensor) and u.shape != p.shape
        for u, p in zip(u_leaves, p_leaves)
    ):
        _tree.check_structure(updates, params, "params", "updates")  # raises, naming the path
    _common._check_gradient_leaves(u_leaves, p_leaves, updates, "apply_updates", what="update", like_name="param")
    out = list(p_leaves)
    pairs = [(i, p, u) for i, (p, u) in enumerate(zip(p_leaves, u_leaves)) if u is not None and p is not None]
    if pairs and _decl.foreach_ok([*pairs[0][1:], *pairs[-1][1:]]):
        groups: dict[tuple[Any, ...], list[int]] = {}
        for k, (_, p, u) in enumerate(pairs):
            groups.setdefault((p.device, p.dtype, u.dtype), []).append(k)
        for (_, pdt, _), ks in groups.items():
            new = torch._foreach_add([pairs[k][1] for k in ks], [pairs[k][2].to(pdt) for k in ks])
            for k, t in zip(ks, new):
                out[pairs[k][0]] = t
    else:
        for i, p, u in pairs:
            out[i] = p + u.to(p.dtype)
    return _tree.unflatten(out, spec)


def elementwise(
    name: str,
    rule: Callable[[Inputs, Inputs], Outputs],
    *,
    init: InitFn | None = None,
    scalars: _decl.ScalarRule | None = None,
    sums: Callable[[Inputs, Inputs], Outputs] | None = None,
    **fields: Any,
) -> GradientTransformation:
    """A primitive from its rules: ``GradientTransformation(init, update)`` whose ``update`` runs the
    element rule ``rule(v, sc) -> {"out": ..., <field>: ...}`` (:mod:`grokxform.elements`) over the
    leaves with the per-step scalars that ``scalars(ctx) -> (values, new_globals)`` gives (each
    name the element rule reads as ``sc.<name>``), and whose declaration
    (:class:`~grokxform.declarations.Elementwise`, ``fields`` its other fields: ``state_type``,
    ``fields``, ``count``, ``needs_params``, ``extras``...) lets the engine fuse it with the rest of
    a chain. ``sums(v, sc) -> {name: value}``: element values whose per-leaf sums the scalar rule
    reads as ``ctx.reduced[name]`` (1-d, one per leaf with a gradient; the inputs are ``v.x``,
    ``v.param`` and the fields). Defaults: no state (``init`` gives :class:`EmptyState`), no
    scalars, no sums.

    Examples:
        >>> def halve(v, sc):
        ...     return {"out": v.x * sc.c}
        >>> tx = gx.base.elementwise("halve", halve, scalars=lambda ctx: ({"c": 0.5}, {}))
        >>> u, _ = tx.update({"w": torch.ones(2)}, tx.init({"w": torch.ones(2)}))
        >>> u["w"]
        tensor([0.5000, 0.5000])
    """
    if not isinstance(name, str) or not callable(rule):
        raise TypeError("elementwise(name, rule, *, init=..., scalars=..., ...): a name and an element rule")
    if init is None:
        if fields.get("state_type") is not None or fields.get("fields") or fields.get("count"):
            raise TypeError(f"elementwise: {name} has state; give its init=")
        init = _empty_init
    if sums is not None and not callable(sums):
        raise TypeError(f"elementwise: {name}'s sums must be an element rule (a function), got {type(sums).__name__}")
    decl = _decl.Elementwise(name, TracedRule(rule), scalars if scalars is not None else _no_scalars,
                             sums=TracedRule(sums) if sums is not None else None, **fields)

    def update(updates: Updates, state: State, params: Params | None = None, **extra: Any) -> tuple[Updates, State]:
        return decl.update(updates, state, params, **extra)

    update.__qualname__ = update.__name__ = f"{name}.update"
    return _decl.declare(GradientTransformation(init, update), decl)


def leafwise(
    name: str,
    fn: Callable[[torch.Tensor], torch.Tensor],
    *,
    select: Callable[[torch.Tensor], bool] | None = None,
    check: Callable[[Updates], None] | None = None,
) -> GradientTransformation:
    """A stateless stage from a function of whole leaves (a matrix function, which no element rule
    can state): ``update`` stacks the selected leaves of one shape, dtype and device into one
    ``[n, *shape]`` tensor, in the order of the tree, and each leaf's update is its slice of
    ``fn(stacked)``, which must keep the shape and dtype. ``select(leaf) -> bool``: the leaves it
    maps, from their shape and dtype (default: every leaf); the others, and ``None``, pass
    through unchanged. ``check(updates)``: validation beyond the generic checks (raises).

    Its declaration (:class:`~grokxform.declarations.Leafwise`) lets the engine run it inside any
    declared chain: the kernels of the members before it write its input into buffers that the
    engine keeps (one ``[n, *shape]`` tensor per group), ``fn`` maps each buffer with torch's
    ops, and the kernels of the members after it read the result; no host synchronisation (a
    CUDA step is captured whole). A DTensor (sharded) leaf that it selects raises ``TypeError``
    (the engine refuses it): ``fn`` needs each leaf whole.

    Examples:
        >>> unit = gx.base.leafwise("unit_frobenius", lambda x: x / torch.linalg.matrix_norm(x, keepdim=True),
        ...                         select=lambda leaf: leaf.ndim == 2)
        >>> g = {"W": torch.full((2, 2), 3.0), "b": torch.ones(2)}
        >>> u, _ = unit.update(g, unit.init(g))
        >>> u["W"]
        tensor([[0.5000, 0.5000],
                [0.5000, 0.5000]])
        >>> u["b"]                                   # not selected: unchanged
        tensor([1., 1.])
    """
    if not isinstance(name, str) or not callable(fn):
        raise TypeError("leafwise(name, fn, *, select=..., check=...): a name and a function of stacked leaves")
    for what, f in (("select", select), ("check", check)):
        if f is not None and not callable(f):
            raise TypeError(f"leafwise: {name}'s {what} must be a function, got {type(f).__name__}")
    decl = _decl.Leafwise(name, fn, select if select is not None else _every_leaf, check)

    def init(params: Params) -> EmptyState:
        _common.check_gradients(params, name, what="param")
        return EmptyState()

    def update(updates: Updates, state: State, params: Params | None = None, **extra: Any) -> tuple[Updates, State]:
        _common.check_state(state, EmptyState, name)
        return decl.update(updates, state, params, **extra)

    update.__qualname__ = update.__name__ = f"{name}.update"
    return _decl.declare(GradientTransformation(init, update), decl)


def _every_leaf(leaf: torch.Tensor) -> bool:
    del leaf
    return True


def _empty_init(params: Params) -> EmptyState:
    del params
    return EmptyState()


def _no_scalars(ctx: _decl.ScalarContext) -> tuple[dict[str, Any], dict[str, Any]]:
    del ctx
    return {}, {}
