"""A transform's declarations bound to a live state, its leaves and one pattern of gradients.

:func:`make_plan` walks the declaration tree (:mod:`grokxform.declarations`) in the chain's own
order and returns a tree of nodes that know their state objects and the leaves they act on:

- :class:`Member`: one primitive (:class:`~grokxform.declarations.Elementwise`) with its state
  tensors per leaf, its scalar stage and, for a primitive that reduces its input (the clip), the
  index of its reduction pass;
- :class:`Amp`, :class:`Mask`, :class:`Part`, :class:`Inject`, :class:`Accum`, :class:`Finite` and
  :class:`Seq` for the combinators.

Reductions split a step into passes: pass r computes the program up to reduction point r and
reduces there (Σx² and the count of non-finite values per block of each leaf); the last pass runs
the whole program and writes. The scalars of a node are computed in stage s = the number of
reduction points before it (its own included), before pass s.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Union

import torch

from grokxform import declarations as D
from grokxform import tree as _tree
from grokxform.elements import TracedRule


class Unsupported(ValueError):
    """The engine cannot run this transform, state or tensors (the message says why)."""


class TupleWindow(Unsupported):
    """A window in the eager layout (a tuple of trees): the engine takes the ring layout only."""


@dataclass(eq=False)
class Member:
    """A primitive in the plan. ``leaves``: the positions (among all leaves of the tree) it acts
    on this step; ``fields``/``counts``/``window``: its per-leaf state tensors at those leaves."""

    decl: D.Elementwise
    state: Any
    where: str
    leaves: list[int]
    fields: dict[str, list[torch.Tensor]]
    counts: list[torch.Tensor] | None
    window: list[torch.Tensor] | None
    guards: tuple[Flag, ...]
    stage: int = 0
    reduction: int | None = None


@dataclass(eq=False)
class Amp:
    inner: Node
    rule: TracedRule
    lamb: Any
    leaves: set[int]
    where: str
    stage: int = 0


@dataclass(eq=False)
class Mask:
    inner: Node
    selected: set[int]


@dataclass(eq=False)
class Part:
    members: dict[str, Node]
    labels: list[str]


@dataclass(eq=False)
class Inject:
    inner: Node
    decl: D.Injected
    state: Any
    guards: tuple[Flag, ...]
    where: str
    stage: int = 0
    built: tuple[Any, Any, Any] | None = None
    """(the hyperparameter tensors' ids, the inner declaration built from them, the declaration)."""


@dataclass(eq=False)
class Accum:
    inner: Node
    decl: D.Accumulate
    state: Any
    leaves: list[int]
    acc: list[torch.Tensor]
    guards: tuple[Flag, ...]
    where: str
    stage: int = 0


@dataclass(eq=False)
class Finite:
    inner: Node
    state: Any
    leaves: list[int]
    guards: tuple[Flag, ...]
    where: str
    stage: int = 0
    reduction: int = 0


@dataclass(eq=False)
class Seq:
    children: list[Node]


Node = Union[Member, Amp, Mask, Part, Inject, Accum, Finite, Seq]
Staged = Union[Member, Amp, Inject, Accum, Finite]
"""The nodes that have scalars (a stage)."""


@dataclass(frozen=True, eq=False)
class Flag:
    """A per-step condition that gates the state writes of the nodes under a wrapper (the k-th
    micro-step of ``MultiSteps``, the finite step of ``apply_if_finite``)."""

    node: Union[Accum, Finite]
    name: str


@dataclass(eq=False)
class Plan:
    root: Node
    members: list[Member]
    nodes: list[Staged]
    """Every node with scalars (members and wrappers), in the order they are planned."""
    reductions: list[Union[Member, Finite]]
    leaves: list[int]
    """The positions of the leaves with a gradient (the step's work)."""
    paths: list[str]
    present: list[bool]
    params: list[Any]
    grads: dict[int, torch.Tensor]

    @property
    def passes(self) -> int:
        return len(self.reductions) + 1


@dataclass
class _Ctx:
    p_tree: Any
    p_leaves: list[Any]
    paths: list[str]
    spec: Any
    members: list[Member] = field(default_factory=list)
    nodes: list[Staged] = field(default_factory=list)
    reductions: list[Union[Member, Finite]] = field(default_factory=list)


def _leaf_list(tree: Any, ctx: _Ctx, where: str, what: str) -> list[Any]:
    leaves, spec = _tree.flatten(tree)
    if spec != ctx.spec:
        raise Unsupported(f"{where}: the state's {what} does not have the structure of the params")
    return leaves


def make_plan(decl: D.Declaration | None, state: Any, p_tree: Any, grads: list[Any]) -> Plan:
    """The plan of a step of ``decl`` over the params tree ``p_tree`` with gradient leaves
    ``grads`` (``None``: no gradient). Raises :class:`Unsupported` naming what the engine cannot run."""
    p_leaves, spec = _tree.flatten(p_tree)
    ctx = _Ctx(p_tree, p_leaves, _tree.path_names(p_tree), spec)
    active = [i for i, g in enumerate(grads) if g is not None]
    if not active:
        raise Unsupported("no leaf has a gradient")
    root = _walk(decl, state, active, (), ctx, "the transform")
    present = [g is not None for g in grads]
    return Plan(
        root, ctx.members, ctx.nodes, ctx.reductions, active, ctx.paths, present, p_leaves,
        {i: grads[i] for i in active},
    )


def _name(where: str, key: Any) -> str:
    return f"{where}[{key!r}]" if where != "the transform" else f"member {key!r}"


def _walk(decl: Any, state: Any, active: list[int], guards: tuple[Flag, ...], ctx: _Ctx, where: str) -> Node:
    if decl is None:
        raise Unsupported(f"{where} has no declaration (a transform with its own update function)")
    if isinstance(decl, D.Sequence):
        if decl.keys and (not isinstance(state, (tuple, dict)) or len(state) != len(decl.keys)):
            raise Unsupported(f"{where}: the state does not match the chain")
        kids = []
        for key, member in zip(decl.keys, decl.members):
            kids.append(_walk(member, state[key], active, guards, ctx, _name(where, key)))
        return Seq(kids)
    if isinstance(decl, D.Elementwise):
        return _member(decl, state, active, guards, ctx, where)
    if isinstance(decl, D.Amplify):
        amp = Amp(_walk(decl.inner, state, active, guards, ctx, where), decl.rule, decl.lamb, set(active), where)
        amp.stage = len(ctx.reductions)
        ctx.nodes.append(amp)
        return amp
    if isinstance(decl, D.Masked):
        sel = decl.select(ctx.p_tree)
        chosen = [i for i in active if sel[i]]
        return Mask(_walk(decl.inner, state, chosen, guards, ctx, where), set(chosen))
    if isinstance(decl, D.Partition):
        labels = decl.labels(ctx.p_tree)
        parts = {
            label: _walk(d, state[label], [i for i in active if labels[i] == label], guards, ctx, _name(where, label))
            for label, d in decl.members.items()
        }
        return Part(parts, labels)
    if isinstance(decl, D.Injected):
        hp = decl.current(state.count, state.hyperparams)
        inner = D.declaration_of(decl.build(hp))
        inject = Inject(Seq([]), decl, state, guards, where, built=(tuple(id(v) for v in hp.values()), inner, decl))
        ctx.nodes.append(inject)
        inject.inner = _walk(inner, state.inner_state, active, guards, ctx, where)
        return inject
    if isinstance(decl, D.Accumulate):
        acc = _leaf_list(state.acc, ctx, where, "accumulator")
        accum = Accum(Seq([]), decl, state, list(active), [acc[i] for i in active], guards, where)
        accum.stage = len(ctx.reductions)
        ctx.nodes.append(accum)
        accum.inner = _walk(decl.inner, state.inner_state, active, (*guards, Flag(accum, "final")), ctx, where)
        return accum
    if isinstance(decl, D.IfFinite):
        finite = Finite(Seq([]), state, list(active), guards, where)
        finite.reduction = len(ctx.reductions)
        ctx.reductions.append(finite)
        finite.stage = len(ctx.reductions)
        ctx.nodes.append(finite)
        finite.inner = _walk(decl.inner, state.inner_state, active, (*guards, Flag(finite, "finite")), ctx, where)
        return finite
    raise Unsupported(f"{where}: no engine support for {type(decl).__name__}")


def _member(
    decl: D.Elementwise, state: Any, active: list[int], guards: tuple[Flag, ...], ctx: _Ctx, where: str
) -> Member:
    where = f"{where} ({decl.name})"
    if decl.unsupported:
        raise Unsupported(f"{where}: {decl.unsupported}")
    if decl.state_type is not None and not isinstance(state, decl.state_type):
        raise Unsupported(f"{where}: the state is a {type(state).__name__}, not a {decl.state_type.__name__}")
    leaves = list(active)
    if decl.select is not None:
        sel = decl.select(ctx.p_tree)
        leaves = [i for i in leaves if sel[i]]
    fields = {}
    for f in decl.fields:
        got = _leaf_list(getattr(state, f), ctx, where, f)
        fields[f] = [got[i] for i in leaves]
    counts = None
    if decl.count is not None:
        got = _leaf_list(getattr(state, decl.count), ctx, where, decl.count)
        counts = [got[i] for i in leaves]
    window = None
    if decl.window is not None:
        w = getattr(state, decl.window.name)
        if not isinstance(w, D.MaRingWindow):
            raise TupleWindow(f"{where}: the window is not in the ring layout")
        got = _leaf_list(w.buffers, ctx, where, "window")
        window = [got[i] for i in leaves]
    for i, leaf in enumerate(leaves):
        if any(v[i] is None for v in fields.values()) or (counts is not None and counts[i] is None):
            raise Unsupported(f"{where}: the leaf {ctx.paths[leaf]!r} has no state (its param was None at init)")
    node = Member(decl, state, where, leaves, fields, counts, window, guards)
    if decl.reduce:
        node.reduction = len(ctx.reductions)
        ctx.reductions.append(node)
    node.stage = len(ctx.reductions)
    ctx.members.append(node)
    ctx.nodes.append(node)
    return node


def rebind(node: Node, decl: Any, state: Any) -> Iterator[tuple[Node, Any]]:
    """Yield ``(node, declaration)`` for every node of a plan, with the declarations of this
    step (an :class:`Inject` node builds its inner transform from this step's hyperparameters)."""
    if isinstance(node, Seq):
        for key, kid, d in zip(decl.keys, node.children, decl.members):
            yield from rebind(kid, d, state[key])
    elif isinstance(node, Member):
        if not isinstance(decl, D.Elementwise) or decl.name != node.decl.name:
            raise Unsupported(f"{node.where}: the transform changed its structure between steps")
        yield node, decl
    elif isinstance(node, Amp):
        yield node, decl
        yield from rebind(node.inner, decl.inner, state)
    elif isinstance(node, Mask):
        yield from rebind(node.inner, decl.inner, state)
    elif isinstance(node, Part):
        for label, kid in node.members.items():
            yield from rebind(kid, decl.members[label], state[label])
    elif isinstance(node, Inject):
        hp = decl.current(state.count, state.hyperparams)
        yield node, hp
        # The inner transform is rebuilt only when a hyperparameter is another tensor (a schedule's
        # value): the stored ones are filled in place, and the transform reads them as they are.
        key = tuple(id(v) for v in hp.values())
        if node.built is None or node.built[0] != key or node.built[2] is not decl:
            node.built = (key, D.declaration_of(decl.build(hp)), decl)
        yield from rebind(node.inner, node.built[1], state.inner_state)
    elif isinstance(node, (Accum, Finite)):
        yield node, decl
        yield from rebind(node.inner, decl.inner, state.inner_state)
