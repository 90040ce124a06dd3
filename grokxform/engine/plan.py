"""A transform's declarations bound to a live state, its leaves and one pattern of gradients.

:func:`make_plan` turns the declaration tree (:mod:`grokxform.declarations`) into a tree of nodes
that know their state objects and the leaves they act on, in the chain's own order:

- :class:`Member`: one primitive (:class:`~grokxform.declarations.Elementwise`) with its state
  tensors per leaf, its scalar stage and, for a primitive that reduces its input (the clip), the
  index of its reduction pass;
- :class:`Whole`: a whole-leaf stage (:class:`~grokxform.declarations.Leafwise`: Muon's
  Newton–Schulz iteration) with the index of the pass that ends at it and its buffers;
- :class:`Amp`, :class:`Mask`, :class:`Part`, :class:`Inject`, :class:`Accum`, :class:`Finite`,
  :class:`Pack` (``compress_state``: which state columns of its members are stored compressed,
  each a :class:`Codec`) and :class:`Seq` for the combinators.

Each node type carries everything the engine does with it, once: its planning (``plan``), this
step's declaration (``rebind``), its scalars and state updates (``scalars``), its per-leaf state
tensors (``columns``) and its per-element meaning (``apply``). ``apply`` is the one walk of a
chain's element programs: every backend (the Triton and C kernel text of
:mod:`grokxform.engine.codegen`, the in-place foreach lists of :mod:`grokxform.engine.foreach`)
is a :class:`Runner` that it drives.

Reductions and whole-leaf stages split a step into passes (:attr:`Plan.reductions`, the points
where a pass ends, in the chain's order): pass r computes the program up to point r and, at a
reduction, reduces there (Σx² and the count of non-finite values per block of each leaf); at a
whole-leaf stage it stores its input into the stage's buffers, which the engine then maps with
the stage's function (torch's ops, batched by shape) before pass r + 1, whose program reads them
back at that point. Every pass recomputes the program before its point (the members there write
their state in the last pass only); the last pass runs the whole program and writes. The scalars
of a node are computed in stage s = the number of points before it (its own included), before
pass s.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any, ClassVar, NoReturn, Protocol, Union

import torch
import torch.utils._pytree as pytree

from grokxform import declarations as D
from grokxform import tree as _tree
from grokxform.elements import TracedRule, leaf_keys
from grokxform.transforms.compress import STOCHASTIC, stochastic

SLOT = "__slot"
"""The scalar holding each leaf's ring slot of a member's window (its oldest value)."""


class Unsupported(ValueError):
    """The engine cannot run this transform, state or tensors (the message says why)."""


class TupleWindow(Unsupported):
    """A window in the eager layout (a tuple of trees): the engine takes the ring layout only."""


@dataclass(frozen=True)
class Codec:
    """How one state tensor of a member is stored under ``compress_state``: ``fmt`` (``"bf16"``:
    parts ``hi``, ``lo``; ``"bf16_sr"``: ``value``; ``"int8"``: ``codes``, ``scales``),
    ``unsigned`` (int8's fourth-root code of a non-negative field), ``block_size`` (int8's
    quantization block) and ``key``, the member's scalar holding each leaf's stochastic rounding
    key (where it rounds stochastically: ``"bf16_sr"``, ``"int8"``'s unsigned code). The runners
    load such a column as decode(parts) and store encode(value), the codecs of
    :mod:`grokxform.transforms.compress`."""

    fmt: str
    unsigned: bool
    block_size: int
    key: str


def is_packed(x: Any) -> bool:
    """Whether ``x`` is a compressed state tensor (:data:`grokxform.transforms.compress.Packed`)."""
    return isinstance(x, tuple) and getattr(type(x), "_packed", False)


class Runner(Protocol):
    """What :meth:`Node.apply` drives: one backend running one pass of the plan for the leaves of
    a group (which all run the program of :attr:`leaf`). Values (``X``) are the backend's own:
    kernel variables, lists of tensors."""

    leaf: int
    pass_index: int
    main: bool
    """Whether this is the pass that writes (the last)."""

    def rule(self, node: Any, rule: TracedRule, inputs: dict[str, Any]) -> dict[str, Any]:
        """The element rule on ``inputs`` with ``node``'s scalars."""

    def param(self) -> Any:
        """The param."""

    def state(self, node: Any, name: str) -> Any:
        """A per-leaf state tensor of ``node`` (a column of :meth:`Node.columns`)."""

    def write(self, node: Any, name: str, value: Any) -> None:
        """Store ``value`` in that state tensor (where the enclosing wrappers' flags are set)."""

    def oldest(self, member: Member) -> Any:
        """The oldest value of ``member``'s window."""

    def push(self, member: Member, newest: Any, out: Any, total: Any) -> Any:
        """Store ``newest`` in the window's oldest slot, re-sum the window where due
        (:class:`~grokxform.declarations.WindowField`); return ``out`` (a copy if it was re-summed).
        A compressed window (``member.codec(leaf, "window")``): the slot stores encode(newest),
        and the running sum (``total``: the rule's new value, not written yet) is written as
        ``total + (q − newest)`` in its dtype, q = decode(encode(newest)), what the slot holds (the
        eager ``compress_state``'s correction), its re-sum summing the decoded slots."""

    def reached(self, x: Any, sums: dict[str, Any]) -> NoReturn:
        """The pass's reduction point: reduce ``x`` (its norm and finiteness) and sum each of
        ``sums`` per leaf, and end the pass."""

    def stash(self, node: Whole, x: Any) -> NoReturn:
        """The pass's whole-leaf stage: store ``x`` into ``node``'s buffer (whatever the enclosing
        wrappers' flags), and end the pass."""

    def stashed(self, node: Whole) -> Any:
        """``node``'s buffer, as its function left it (a pass after the stage's)."""

    def shared(self, x: Any) -> Any:
        """``x``, to be read again later (no op may write it in place)."""

    def gated(self, node: Any, flag: str) -> AbstractContextManager[None]:
        """State writes inside happen only where ``node``'s flag ``flag`` is set."""


@dataclass(frozen=True, eq=False)
class Flag:
    """A per-step condition that gates the state writes of the nodes under a wrapper (the k-th
    micro-step of ``MultiSteps``, the finite step of ``apply_if_finite``)."""

    node: Union[Accum, Finite]
    name: str


@dataclass
class StepEnv:
    """What the scalar rules of one step read and write (:meth:`Node.scalars`)."""

    decls: dict[int, Any]
    """Per node id: this step's declaration (an :class:`Inject`: its hyperparameters)."""
    counts: dict[int, torch.Tensor]
    reduced: dict[int, dict[str, torch.Tensor]]
    extras: dict[str, Any]
    paths: list[str]
    present: dict[int, list[bool]]
    count_vectors: dict[int, torch.Tensor | None]
    device: torch.device
    flags: dict[tuple[int, str], torch.Tensor] = field(default_factory=dict)
    writes: list[tuple[torch.Tensor, Any, tuple[Flag, ...]]] = field(default_factory=list)
    bumps: list[tuple[list[torch.Tensor], torch.Tensor | None, tuple[Flag, ...]]] = field(default_factory=list)

    def write(self, state: Any, new: dict[str, Any], guards: tuple[Flag, ...]) -> None:
        """The 0-d fields of ``state`` get the values ``new`` after the step (where ``guards`` hold)."""
        self.writes.extend((getattr(state, f), v, guards) for f, v in new.items())


@dataclass
class _Ctx:
    p_tree: Any
    p_leaves: list[Any]
    paths: list[str]
    spec: Any
    members: list[Member] = field(default_factory=list)
    nodes: list[Any] = field(default_factory=list)
    reductions: list[Union[Member, Finite, Whole]] = field(default_factory=list)

    def leaf_list(self, tree: Any, where: str, what: str) -> list[Any]:
        leaves, spec = _tree.flatten(tree)
        if spec != self.spec:  # (compressed tensors in the tensors' places: one leaf each)
            leaves, spec = pytree.tree_flatten(tree, is_leaf=lambda x: x is None or is_packed(x))
        if spec != self.spec:
            raise Unsupported(f"{where}: the state's {what} does not have the structure of the params")
        return leaves


class Node(ABC):
    """A node of the plan. The defaults are those of a node without scalars or state tensors."""

    declares: ClassVar[type]
    """The declaration type the node plans."""
    per_leaf: ClassVar[bool] = False
    """Whether its ``leaves`` are the list of leaves its per-leaf scalars and state belong to."""

    def acts_on(self, leaf: int) -> bool:
        """Whether the node does per-element work on ``leaf`` (when it gets a gradient)."""
        return True

    def computes(self, active: list[int]) -> Iterable[int]:
        """The leaves (of ``active``, those with a gradient) whose update the node computes
        rather than passes through."""
        return ()

    @classmethod
    @abstractmethod
    def plan(cls, decl: Any, state: Any, active: list[int], guards: tuple[Flag, ...], ctx: _Ctx, where: str) -> Node:
        """The node of ``decl`` over the leaves ``active``, its state ``state``."""

    def rebind(self, decl: Any, state: Any) -> Iterator[tuple[Node, Any]]:
        """``(node, this step's declaration)`` for this node and those below it."""
        yield self, decl

    @abstractmethod
    def apply(self, run: Runner, x: Any) -> Any:
        """The node's update of the value ``x`` of :attr:`Runner.leaf`, on ``run``."""

    def scalars(self, env: StepEnv) -> dict[str, Any]:
        """This step's scalars of the node; its state updates go to ``env``."""
        return {}

    def codec(self, leaf: int, name: str) -> Codec | None:
        """How its column ``name`` is stored at ``leaf`` (``None``: a plain tensor)."""
        return None

    def columns(self) -> dict[str, list[torch.Tensor]]:
        """Its per-leaf state tensors that the element programs read, by name, one per leaf of its
        ``leaves``."""
        return {}

    def state_tensors(self) -> list[list[torch.Tensor]]:
        """All its per-leaf state tensors, by column (counters included)."""
        return list(self.columns().values())

    def bind(self, other: Node) -> None:
        """Take the tensors and state of ``other``, a plan of the same transform over other tensors."""

    def release(self) -> None:
        """Drop the references to tensors and state (:meth:`bind` gives them again)."""


class _StateWrapper(Node):
    """A wrapper node whose only tensors are its state's (``state``: counters, injected
    hyperparameters, flags), bound and released whole."""

    state: Any

    def bind(self, other: Node) -> None:
        assert isinstance(other, type(self))
        self.state = other.state

    def release(self) -> None:
        self.state = None


def _plan(decl: Any, state: Any, active: list[int], guards: tuple[Flag, ...], ctx: _Ctx, where: str) -> Node:
    if decl is None:
        raise Unsupported(f"{where} has no declaration (a transform with its own update function)")
    kind = _NODES.get(type(decl))
    if kind is None:
        raise Unsupported(f"{where}: no engine support for {type(decl).__name__}")
    return kind.plan(decl, state, active, guards, ctx, where)


def _name(where: str, key: Any) -> str:
    return f"{where}[{key!r}]" if where != "the transform" else f"member {key!r}"


@dataclass(eq=False)
class Seq(Node):
    declares: ClassVar[type] = D.Sequence
    children: list[Node]

    @classmethod
    def plan(cls, decl: D.Sequence, state: Any, active: list[int], guards: tuple[Flag, ...], ctx: _Ctx,
             where: str) -> Node:
        if decl.keys and (not isinstance(state, (tuple, dict)) or len(state) != len(decl.keys)):
            raise Unsupported(f"{where}: the state does not match the chain")
        return cls([_plan(m, state[k], active, guards, ctx, _name(where, k)) for k, m in zip(decl.keys, decl.members)])

    def rebind(self, decl: D.Sequence, state: Any) -> Iterator[tuple[Node, Any]]:
        for key, kid, d in zip(decl.keys, self.children, decl.members):
            yield from kid.rebind(d, state[key])

    def apply(self, run: Runner, x: Any) -> Any:
        for kid in self.children:
            x = kid.apply(run, x)
        return x


@dataclass(eq=False)
class Member(Node):
    """A primitive in the plan. ``leaves``: the positions (among all leaves of the tree) it acts
    on this step; ``fields``/``counts``/``window``: its per-leaf state tensors at those leaves."""

    declares: ClassVar[type] = D.Elementwise
    per_leaf: ClassVar[bool] = True
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
    summed: tuple[str, ...] = ()
    """The names of its per-leaf sums (read once, at planning: the step reads them every call)."""
    codecs: dict[str, list[Codec | None]] = field(default_factory=dict)
    """Its compressed fields (under :class:`Pack`): per leaf of :attr:`leaves`, how it is stored."""
    keys: dict[str, tuple[Pack, list[int]]] = field(default_factory=dict)
    """Per stochastically rounded field: the :class:`Pack` whose count keys it and each leaf's
    position among the leaves of that wrapper's inner state."""

    @classmethod
    def plan(cls, decl: D.Elementwise, state: Any, active: list[int], guards: tuple[Flag, ...], ctx: _Ctx,
             where: str) -> Node:
        where = f"{where} ({decl.name})"
        if decl.unsupported:
            raise Unsupported(f"{where}: {decl.unsupported}")
        if decl.state_type is not None and not isinstance(state, decl.state_type):
            raise Unsupported(f"{where}: the state is a {type(state).__name__}, not a {decl.state_type.__name__}")
        leaves = list(active)
        if decl.select is not None:
            sel = decl.select(ctx.p_tree)
            leaves = [i for i in leaves if sel[i]]

        def column(tree: Any, what: str) -> list[Any]:
            got = ctx.leaf_list(tree, where, what)
            return [got[i] for i in leaves]

        fields = {f: column(getattr(state, f), f) for f in decl.fields}
        counts = column(getattr(state, decl.count), decl.count) if decl.count is not None else None
        window = None
        if decl.window is not None:
            w = getattr(state, decl.window.name)
            if not isinstance(w, D.RingWindow):
                raise TupleWindow(f"{where}: the window is not in the ring layout")
            window = column(w.buffers, "window")
        for i, leaf in enumerate(leaves):
            if any(v[i] is None for v in fields.values()) or (counts is not None and counts[i] is None):
                raise Unsupported(f"{where}: the leaf {ctx.paths[leaf]!r} has no state (its param was None at init)")
        node = cls(decl, state, where, leaves, fields, counts, window, guards, summed=decl.sum_names())
        if decl.reduces():
            node.reduction = len(ctx.reductions)
            ctx.reductions.append(node)
        node.stage = len(ctx.reductions)
        ctx.members.append(node)
        ctx.nodes.append(node)
        return node

    def reduction_kinds(self) -> tuple[str, ...]:
        """What it reduces at its reduction point (a pass ends there)."""
        return self.decl.reduce

    def sum_names(self) -> tuple[str, ...]:
        """The per-leaf sums it takes at its reduction point (:attr:`Elementwise.sums`)."""
        return self.summed

    def rebind(self, decl: Any, state: Any) -> Iterator[tuple[Node, Any]]:
        if not isinstance(decl, D.Elementwise) or decl.name != self.decl.name:
            raise Unsupported(f"{self.where}: the transform changed its structure between steps")
        yield self, decl

    def apply(self, run: Runner, x: Any) -> Any:
        if run.leaf not in self.leaves:
            return x
        decl = self.decl
        if self.reduction == run.pass_index:
            run.reached(x, {} if decl.sums is None else run.rule(self, decl.sums, self._inputs(run, x)))
        inputs = self._inputs(run, x)
        if decl.window is not None:
            inputs["window"] = run.oldest(self)
        got = run.rule(self, decl.rule, inputs)
        if not run.main:
            return got["out"]
        # (a running sum of a compressed window is written by push: corrected by what the slot stores)
        total = decl.window.total if decl.window is not None and self.codec(run.leaf, "window") is not None else None
        for f in decl.fields:
            if f != total:
                run.write(self, f, got[f])
        if decl.window is None:
            return got["out"]
        return run.push(self, got["window"], got["out"], None if total is None else got[total])

    def _inputs(self, run: Runner, x: Any) -> dict[str, Any]:
        """``x``, the param (if it reads it) and its state fields: the inputs of its rules but the window."""
        inputs = {"x": x}
        if self.decl.needs_params:
            inputs["param"] = run.param()
        for f in self.decl.fields:
            inputs[f] = run.state(self, f)
        return inputs

    def scalars(self, env: StepEnv) -> dict[str, Any]:
        if not self.leaves and self.decl.reduces():
            return {}  # a reduction over nothing changes nothing (as eager)
        decl = env.decls[id(self)]
        counts = env.counts.get(id(self))
        ctx = D.ScalarContext(
            state=self.state, counts=counts, reduced=env.reduced.get(id(self), {}), known_paths=env.paths,
            present=env.present[id(self)], index=self.leaves, extra=D.DeclaredExtras(env.extras, decl),
            device=env.device,
        )
        values, new = decl.scalars(ctx)
        values = dict(values)
        if self.window is not None and counts is not None and decl.window is not None:
            values[SLOT] = torch.remainder(counts, decl.window.size)
        for f, (pack, positions) in self.keys.items():
            codec = next(c for c in self.codecs[f] if c is not None)
            values[codec.key] = leaf_keys(pack.decl.seed, pack.state.count, positions).to(torch.float64)
        env.write(self.state, dict(new), self.guards)
        if self.counts:
            env.bumps.append((self.counts, env.count_vectors[id(self)], self.guards))
        return values

    def columns(self) -> dict[str, list[torch.Tensor]]:
        return {**self.fields, **({"window": self.window} if self.window is not None else {})}

    def state_tensors(self) -> list[list[torch.Tensor]]:
        return [*self.columns().values(), *([self.counts] if self.counts else [])]

    def codec(self, leaf: int, name: str) -> Codec | None:
        codecs = self.codecs.get(name)
        return None if codecs is None else codecs[self.leaves.index(leaf)]

    def computes(self, active: list[int]) -> Iterable[int]:
        return self.leaves

    def bind(self, other: Node) -> None:
        assert isinstance(other, Member)
        self.fields, self.counts, self.window, self.state = other.fields, other.counts, other.window, other.state

    def release(self) -> None:
        self.fields, self.counts, self.window, self.state = {}, None, None, None


@dataclass(eq=False)
class Amp(Node):
    """``amplify``: ``rule(x, slow)`` with ``slow`` the inner filter's output."""

    declares: ClassVar[type] = D.Amplify
    inner: Node
    rule: TracedRule
    lamb: Any
    leaves: set[int]
    where: str
    stage: int = 0

    @classmethod
    def plan(cls, decl: D.Amplify, state: Any, active: list[int], guards: tuple[Flag, ...], ctx: _Ctx,
             where: str) -> Node:
        node = cls(_plan(decl.inner, state, active, guards, ctx, where), decl.rule, decl.lamb, set(active), where)
        node.stage = len(ctx.reductions)
        ctx.nodes.append(node)
        return node

    def rebind(self, decl: D.Amplify, state: Any) -> Iterator[tuple[Node, Any]]:
        yield self, decl
        yield from self.inner.rebind(decl.inner, state)

    def acts_on(self, leaf: int) -> bool:
        return leaf in self.leaves

    def computes(self, active: list[int]) -> Iterable[int]:
        return self.leaves

    def apply(self, run: Runner, x: Any) -> Any:
        if run.leaf not in self.leaves:
            return x
        slow = self.inner.apply(run, run.shared(x))
        return run.rule(self, self.rule, {"x": x, "slow": slow})["out"]

    def scalars(self, env: StepEnv) -> dict[str, Any]:
        return {"lamb": env.decls[id(self)].lamb}


@dataclass(eq=False)
class Mask(Node):
    declares: ClassVar[type] = D.Masked
    inner: Node
    selected: set[int]

    @classmethod
    def plan(cls, decl: D.Masked, state: Any, active: list[int], guards: tuple[Flag, ...], ctx: _Ctx,
             where: str) -> Node:
        sel = decl.select(ctx.p_tree)
        chosen = [i for i in active if sel[i]]
        return cls(_plan(decl.inner, state, chosen, guards, ctx, where), set(chosen))

    def rebind(self, decl: D.Masked, state: Any) -> Iterator[tuple[Node, Any]]:
        yield from self.inner.rebind(decl.inner, state)

    def apply(self, run: Runner, x: Any) -> Any:
        return self.inner.apply(run, x) if run.leaf in self.selected else x


@dataclass(eq=False)
class Part(Node):
    declares: ClassVar[type] = D.Partition
    members: dict[str, Node]
    labels: list[str]

    @classmethod
    def plan(cls, decl: D.Partition, state: Any, active: list[int], guards: tuple[Flag, ...], ctx: _Ctx,
             where: str) -> Node:
        labels = decl.labels(ctx.p_tree)
        return cls({
            label: _plan(d, state[label], [i for i in active if labels[i] == label], guards, ctx, _name(where, label))
            for label, d in decl.members.items()
        }, labels)

    def rebind(self, decl: D.Partition, state: Any) -> Iterator[tuple[Node, Any]]:
        for label, kid in self.members.items():
            yield from kid.rebind(decl.members[label], state[label])

    def apply(self, run: Runner, x: Any) -> Any:
        return self.members[self.labels[run.leaf]].apply(run, x)


@dataclass(eq=False)
class Inject(_StateWrapper):
    """``inject_hyperparams``: the inner transform built from this step's hyperparameters."""

    declares: ClassVar[type] = D.Injected
    inner: Node
    decl: D.Injected
    state: Any
    guards: tuple[Flag, ...]
    where: str
    stage: int = 0
    built: tuple[Any, Any, Any] | None = None
    """(the hyperparameter tensors' ids, the inner declaration built from them, the declaration)."""

    @classmethod
    def plan(cls, decl: D.Injected, state: Any, active: list[int], guards: tuple[Flag, ...], ctx: _Ctx,
             where: str) -> Node:
        hp = decl.current(state.count, state.hyperparams)
        inner = D.declaration_of(decl.build(hp))
        node = cls(Seq([]), decl, state, guards, where, built=(tuple(id(v) for v in hp.values()), inner, decl))
        ctx.nodes.append(node)
        node.inner = _plan(inner, state.inner_state, active, guards, ctx, where)
        return node

    def rebind(self, decl: D.Injected, state: Any) -> Iterator[tuple[Node, Any]]:
        hp = decl.current(state.count, state.hyperparams)
        yield self, hp
        # The inner transform is rebuilt only when a hyperparameter is another tensor (a schedule's
        # value): the stored ones are filled in place, and the transform reads them as they are.
        key = tuple(id(v) for v in hp.values())
        if self.built is None or self.built[0] != key or self.built[2] is not decl:
            self.built = (key, D.declaration_of(decl.build(hp)), decl)
        yield from self.inner.rebind(self.built[1], state.inner_state)

    def apply(self, run: Runner, x: Any) -> Any:
        return self.inner.apply(run, x)

    def scalars(self, env: StepEnv) -> dict[str, Any]:
        st, hp = self.state, env.decls[id(self)]
        env.writes.append((st.count, st.count + 1, self.guards))
        env.writes.extend((st.hyperparams[n], hp[n], self.guards) for n in self.decl.schedules)
        return {}


@dataclass(eq=False)
class Accum(Node):
    """``MultiSteps``: the inner transform on the mean of every k gradients."""

    declares: ClassVar[type] = D.Accumulate
    per_leaf: ClassVar[bool] = True
    inner: Node
    decl: D.Accumulate
    state: Any
    leaves: list[int]
    acc: list[torch.Tensor]
    guards: tuple[Flag, ...]
    where: str
    stage: int = 0

    @classmethod
    def plan(cls, decl: D.Accumulate, state: Any, active: list[int], guards: tuple[Flag, ...], ctx: _Ctx,
             where: str) -> Node:
        acc = ctx.leaf_list(state.acc, where, "accumulator")
        node = cls(Seq([]), decl, state, list(active), [acc[i] for i in active], guards, where)
        node.stage = len(ctx.reductions)
        ctx.nodes.append(node)
        node.inner = _plan(decl.inner, state.inner_state, active, (*guards, Flag(node, "final")), ctx, where)
        return node

    def rebind(self, decl: D.Accumulate, state: Any) -> Iterator[tuple[Node, Any]]:
        yield self, decl
        yield from self.inner.rebind(decl.inner, state.inner_state)

    def apply(self, run: Runner, x: Any) -> Any:
        if run.leaf not in self.leaves:
            return x
        got = run.rule(self, self.decl.rule, {"x": x, "acc": run.state(self, "acc")})
        with run.gated(self, "final"):
            y = self.inner.apply(run, got["mean"])
        if run.main:
            run.write(self, "acc", got["acc"])
        return run.rule(self, D.Accumulate.skip, {"x": y})["out"]

    def scalars(self, env: StepEnv) -> dict[str, Any]:
        final, new = self.decl.advance(self.state)
        env.flags[(id(self), "final")] = final
        env.write(self.state, new, self.guards)
        return {"k": float(self.decl.every), "final": final}

    def columns(self) -> dict[str, list[torch.Tensor]]:
        return {"acc": self.acc}

    def computes(self, active: list[int]) -> Iterable[int]:
        return active  # (a skipped step is −0.0 on every leaf)

    def bind(self, other: Node) -> None:
        assert isinstance(other, Accum)
        self.acc, self.state = other.acc, other.state

    def release(self) -> None:
        self.acc, self.state = [], None


@dataclass(eq=False)
class Finite(_StateWrapper):
    """``apply_if_finite``: the inner transform's step where every gradient is finite."""

    declares: ClassVar[type] = D.IfFinite
    per_leaf: ClassVar[bool] = True
    inner: Node
    state: Any
    leaves: list[int]
    guards: tuple[Flag, ...]
    where: str
    stage: int = 0
    reduction: int = 0

    @classmethod
    def plan(cls, decl: D.IfFinite, state: Any, active: list[int], guards: tuple[Flag, ...], ctx: _Ctx,
             where: str) -> Node:
        node = cls(Seq([]), state, list(active), guards, where)
        node.reduction = len(ctx.reductions)
        ctx.reductions.append(node)
        node.stage = len(ctx.reductions)
        ctx.nodes.append(node)
        node.inner = _plan(decl.inner, state.inner_state, active, (*guards, Flag(node, "finite")), ctx, where)
        return node

    def reduction_kinds(self) -> tuple[str, ...]:
        return ("finite",)

    def sum_names(self) -> tuple[str, ...]:
        return ()

    def rebind(self, decl: D.IfFinite, state: Any) -> Iterator[tuple[Node, Any]]:
        yield self, decl
        yield from self.inner.rebind(decl.inner, state.inner_state)

    def apply(self, run: Runner, x: Any) -> Any:
        if self.reduction == run.pass_index:
            run.reached(x, {})
        with run.gated(self, "finite"):
            y = self.inner.apply(run, x)
        return run.rule(self, D.IfFinite.skip, {"x": y})["out"]

    def computes(self, active: list[int]) -> Iterable[int]:
        return active  # (a skipped step is −0.0 on every leaf)

    def scalars(self, env: StepEnv) -> dict[str, Any]:
        finite = D.IfFinite.combine(env.reduced[id(self)]["finite"].all(), env.extras)
        env.flags[(id(self), "finite")] = finite
        env.write(self.state, D.IfFinite.advance(self.state, finite), self.guards)
        return {"finite": finite}


@dataclass(eq=False)
class Pack(_StateWrapper):
    """``compress_state``: the inner transform, its members' packed state columns marked with
    their :class:`Codec` (the runners decode them where they load them and encode where they
    store them: one pass over the compressed bytes). Its count (the stochastic rounding's keys
    derive from it) is bumped by its scalars."""

    declares: ClassVar[type] = D.Compressed
    inner: Node
    decl: D.Compressed
    state: Any
    guards: tuple[Flag, ...]
    where: str
    stage: int = 0

    @classmethod
    def plan(cls, decl: D.Compressed, state: Any, active: list[int], guards: tuple[Flag, ...], ctx: _Ctx,
             where: str) -> Node:
        if not hasattr(state, "count") or not hasattr(state, "inner"):
            raise Unsupported(f"{where}: the state is a {type(state).__name__}, not compress_state's")
        node = cls(Seq([]), decl, state, guards, where)
        node.stage = len(ctx.reductions)
        ctx.nodes.append(node)
        first = len(ctx.members)
        try:
            node.inner = _plan(decl.inner, state.inner, active, guards, ctx, where)
        except TupleWindow:
            raise Unsupported(f"{where}: compress_state over an MA window in the eager layout (the engine takes"
                              " its compressed ring: to_fused_layout)") from None
        position = _eager_positions(state.inner) if decl.fmt in STOCHASTIC else {}
        for m in ctx.members[first:]:
            for f, col in {**m.fields, **({"window": m.window} if m.window is not None else {})}.items():
                if not any(is_packed(t) for t in col):
                    continue
                key = f"__key_{f}"
                m.codecs[f] = [
                    Codec(decl.fmt, t[0].dtype == torch.uint8, decl.block_size, key) if is_packed(t) else None
                    for t in col
                ]
                if any(c is not None and stochastic(c.fmt, c.unsigned) for c in m.codecs[f]):
                    m.keys[f] = (node, [position.get(id(t), 0) for t in col])
        return node

    def rebind(self, decl: D.Compressed, state: Any) -> Iterator[tuple[Node, Any]]:
        yield self, decl
        yield from self.inner.rebind(decl.inner, state.inner)

    def apply(self, run: Runner, x: Any) -> Any:
        return self.inner.apply(run, x)

    def scalars(self, env: StepEnv) -> dict[str, Any]:
        env.writes.append((self.state.count, self.state.count + 1, self.guards))
        return {}


def _eager_positions(inner: Any) -> dict[int, int]:
    """The position of each tensor of the state ``inner`` (fused layout) among the leaves of its
    eager layout, where the eager ``compress_state`` keys its stochastic rounding (compressed
    tensors are leaves). A window's ring: the position of its newest value (its slot in the last
    of the eager window's w trees)."""
    position: dict[int, int] = {}
    at = 0
    for x in pytree.tree_leaves(inner, is_leaf=lambda y: is_packed(y) or isinstance(y, D.RingWindow)):
        if not isinstance(x, D.RingWindow):
            position[id(x)] = at
            at += 1
            continue
        rings = pytree.tree_leaves(x.buffers, is_leaf=is_packed)
        w = (rings[0][0] if is_packed(rings[0]) else rings[0]).shape[0] if rings else 0
        for j, ring in enumerate(rings):
            position[id(ring)] = at + (w - 1) * len(rings) + j
        at += w * len(rings)
    return position


@dataclass(eq=False)
class Whole(Node):
    """A whole-leaf stage (:class:`~grokxform.declarations.Leafwise`) over the leaves it selects
    among those with a gradient (``leaves``). Pass :attr:`index` ends at it, storing its input into
    :attr:`buffers`; :meth:`run` maps them with the stage's function; later passes read them.
    The buffers are the engine's (:meth:`allocate`): one ``[n, *shape]`` tensor per shape and dtype
    of its leaves (:attr:`stacks`), each leaf's buffer a view of one, so the function maps them
    where they are, and kept from step to step (a CUDA graph replays the same ops on them)."""

    declares: ClassVar[type] = D.Leafwise
    per_leaf: ClassVar[bool] = True
    decl: D.Leafwise
    where: str
    leaves: list[int]
    index: int = 0
    stage: int = 0
    buffers: list[torch.Tensor] = field(default_factory=list)
    stacks: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def plan(cls, decl: D.Leafwise, state: Any, active: list[int], guards: tuple[Flag, ...], ctx: _Ctx,
             where: str) -> Node:
        del state, guards  # (stateless; its buffers are written on every pass that reaches it)
        leaves = [i for i in active if isinstance(ctx.p_leaves[i], torch.Tensor) and decl.select(ctx.p_leaves[i])]
        node = cls(decl, f"{where} ({decl.name})", leaves)
        node.index = len(ctx.reductions)
        ctx.reductions.append(node)
        node.stage = len(ctx.reductions)
        ctx.nodes.append(node)
        return node

    def rebind(self, decl: Any, state: Any) -> Iterator[tuple[Node, Any]]:
        if not isinstance(decl, D.Leafwise) or decl.name != self.decl.name:
            raise Unsupported(f"{self.where}: the transform changed its structure between steps")
        yield self, decl

    def apply(self, run: Runner, x: Any) -> Any:
        if run.leaf not in self.leaves:
            return x
        if run.pass_index == self.index:
            run.stash(self, x)
        return run.stashed(self)

    def allocate(self, like: list[torch.Tensor], device: torch.device) -> None:
        """Its buffers: for its leaves, shaped and typed as ``like`` (their gradients)."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for k, t in enumerate(like):
            groups.setdefault((tuple(t.shape), t.dtype), []).append(k)
        self.buffers, self.stacks = [torch.empty(0)] * len(like), []
        for (shape, dtype), ks in groups.items():
            stack = torch.zeros((len(ks), *shape), dtype=dtype, device=device)
            self.stacks.append(stack)
            for j, k in enumerate(ks):
                self.buffers[k] = stack[j]

    def run(self, decl: D.Leafwise) -> None:
        """This step's function (``decl``'s) on each stack of buffers, the result written back in place."""
        for stack in self.stacks:
            stack.copy_(decl.map(stack))

    def columns(self) -> dict[str, list[torch.Tensor]]:
        return {"stash": self.buffers}

    def state_tensors(self) -> list[list[torch.Tensor]]:
        return []  # (its buffers are the engine's, not state)

    def computes(self, active: list[int]) -> Iterable[int]:
        return self.leaves


_NODES: dict[type, type[Node]] = {
    kind.declares: kind for kind in (Seq, Member, Amp, Mask, Part, Inject, Accum, Finite, Pack, Whole)
}
"""The node type of each declaration type."""

Staged = Union[Member, Amp, Inject, Accum, Finite, Pack]
"""The nodes that have scalars (a stage)."""
Reduction = Union[Member, Finite]
"""The nodes that reduce their input (a pass ends at each)."""
Point = Union[Member, Finite, Whole]
"""The nodes where a pass ends: the reductions and the whole-leaf stages."""


@dataclass(eq=False)
class Plan:
    root: Node
    members: list[Member]
    nodes: list[Any]
    """Every node with scalars (members and wrappers), in the order they are planned."""
    reductions: list[Point]
    """The points where a pass ends (reductions and whole-leaf stages), in the chain's order."""
    leaves: list[int]
    """The positions of the leaves with a gradient (the step's work)."""
    paths: list[str]
    present: list[bool]
    params: list[Any]
    grads: dict[int, torch.Tensor]

    @property
    def passes(self) -> int:
        return len(self.reductions) + 1

    def rebind(self, decl: Any, state: Any) -> dict[int, Any]:
        """This step's declaration of every node, by id (an :class:`Inject` node builds its inner
        transform from this step's hyperparameters)."""
        return {id(node): d for node, d in self.root.rebind(decl, state)}


def make_plan(decl: D.Declaration | None, state: Any, p_tree: Any, grads: list[Any]) -> Plan:
    """The plan of a step of ``decl`` over the params tree ``p_tree`` with gradient leaves
    ``grads`` (``None``: no gradient). Raises :class:`Unsupported` naming what the engine cannot run."""
    p_leaves, spec = _tree.flatten(p_tree)
    ctx = _Ctx(p_tree, p_leaves, _tree.path_names(p_tree), spec)
    active = [i for i, g in enumerate(grads) if g is not None]
    if not active:
        raise Unsupported("no leaf has a gradient")
    root = _plan(decl, state, active, (), ctx, "the transform")
    present = [g is not None for g in grads]
    return Plan(
        root, ctx.members, ctx.nodes, ctx.reductions, active, ctx.paths, present, p_leaves,
        {i: grads[i] for i in active},
    )
