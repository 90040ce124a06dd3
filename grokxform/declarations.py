"""Declarations: what a transform says about its own maths, so that any engine can run it.

A :class:`~grokxform.GradientTransformation` is a pair ``(init, update)``. A *declared* one also
says what its ``update`` computes, as data that lives on the ``update`` function
(:func:`declare`, :func:`declaration_of`):

- a primitive is :class:`Elementwise`: a per-element rule (:mod:`grokxform.elements`), a per-step
  scalar rule (ordinary torch code: bias corrections, α_t from the signal, the clip factor...), the
  fields of its state, and the per-leaf reductions of its input it needs first (the clip's norms);
- a whole-leaf stage is :class:`Leafwise`: a stateless function of each selected leaf whole
  (Muon's Newton–Schulz iteration), run on the leaves of one shape and dtype stacked;
- a combinator is a node over its members' declarations: :class:`Sequence` (``chain``,
  ``named_chain``), :class:`Amplify`, :class:`Masked`, :class:`Partition`, :class:`Injected`
  (``inject_hyperparams``), :class:`Accumulate` (``MultiSteps``), :class:`IfFinite`
  (``apply_if_finite``) and :class:`Compressed` (``compress_state``).

The eager ``update`` of a primitive is :meth:`Elementwise.update`: it runs the same two rules with
``torch._foreach_*`` ops over the leaves grouped by device and dtype (one tensor at a time under
``torch.func`` transforms and autograd). The engine (:mod:`grokxform.engine`) reads the same
declarations and composes them, in the chain's order, into multi-tensor kernels. A transform
without a declaration still works everywhere; the engine then falls back and says why.
"""

from __future__ import annotations

import difflib
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping
from collections.abc import Sequence as Seq
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple, Union

import torch

from grokxform import _common as C
from grokxform import distributed as _dist
from grokxform import tree as _tree
from grokxform._resum import window_sums
from grokxform.signals import SIGNAL_INPUTS
from grokxform.elements import Scalars, TracedRule, foreach_ok, run_foreach, run_leaf, where

# --------------------------------------------------------------------------------------------
# Attaching a declaration to a transform.

_ATTR = "__grokxform_declaration__"
KERNEL_CACHE = "__grokxform_kernel_steps__"
"""The attribute of a declared ``update`` holding its steps on the kernels (:func:`declare`)."""

KernelRunner = Callable[["Declaration", Any, Any, Any, Any, dict[str, Any]], tuple[Any, Any] | None]
"""``runner(declaration, cache, updates, state, params, extra)``: ``update`` on generated kernels,
or ``None`` where they cannot run this call (:mod:`grokxform.engine.functional` installs it)."""
_runner: list[KernelRunner] = []
_kernels_on: ContextVar[bool] = ContextVar("grokxform_kernels", default=True)


def set_kernel_runner(runner: KernelRunner) -> None:
    """Install what runs a declared ``update`` on generated kernels (the engine does, when imported)."""
    _runner[:] = [runner]


@contextmanager
def kernels(enabled: bool = True) -> Iterator[None]:
    """Whether a declared transform's ``update`` may run on the engine's generated kernels.

    By default ``tx.update`` runs the whole declared chain as generated kernels, out of place (new
    state and update tensors), when nothing records or transforms the call: no ``torch.func``
    transform, no autograd (grad mode on with an input that requires grad), no ``torch.compile``
    tracing, no dispatch or function mode. Otherwise, and within ``with gx.kernels(False):``, it
    runs the element rules op by op with torch's own ops, the whole chain: bit for bit the
    reference implementations (the kernels agree to rounding: a square root may differ in the
    last bit).

    Examples:
        >>> tx = gx.adamw(1e-3)
        >>> params = {"w": torch.ones(3)}
        >>> with gx.kernels(False):
        ...     u, state = tx.update({"w": torch.ones(3)}, tx.init(params), params)
        >>> u["w"]
        tensor([-0.0010, -0.0010, -0.0010])
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"kernels: enabled must be a bool, got {type(enabled).__name__}")
    token = _kernels_on.set(enabled)
    try:
        yield
    finally:
        _kernels_on.reset(token)


def declare(tx: Any, declaration: Declaration, *, offer: bool = True) -> Any:
    """``tx`` with ``update`` recorded as computing what ``declaration`` says (and run on the
    engine's kernels where they can run it, see :func:`kernels`); use the transform it returns.
    ``offer=False``: the declaration is recorded for the in-place engine (the fused step, the
    optimizer) only; a call of ``update`` runs ``tx.update`` as it is.

    The transform stays a plain ``(init, update)`` pair; a user's own transform can be declared
    the same way (see ``docs/fast_path.md``)."""
    plain = tx.update
    cache: dict[Any, Any] = {}
    if not offer:
        def recorded(updates: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, Any]:
            return plain(updates, state, params, **extra)

        recorded.__name__, recorded.__qualname__, recorded.__doc__ = plain.__name__, plain.__qualname__, plain.__doc__
        setattr(recorded, _ATTR, declaration)
        return type(tx)(tx.init, recorded)

    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, Any]:
        if _runner and not torch.compiler.is_compiling() and _kernels_on.get():  # (compiling: traced as it is)
            got = _runner[0](declaration, cache, updates, state, params, extra)
            if got is not None:
                return got
            token = _kernels_on.set(False)  # the whole transform op by op: its members too
            try:
                return plain(updates, state, params, **extra)
            finally:
                _kernels_on.reset(token)
        return plain(updates, state, params, **extra)

    # (attributes set one by one, not functools.wraps: a factory may run inside torch.compile)
    update.__name__, update.__qualname__, update.__doc__ = plain.__name__, plain.__qualname__, plain.__doc__
    setattr(update, _ATTR, declaration)
    setattr(update, KERNEL_CACHE, cache)
    return type(tx)(tx.init, update)


def declaration_of(tx: Any) -> Declaration | None:
    """The declaration of ``tx``, or ``None`` for a transform that has none."""
    return getattr(tx.update, _ATTR, None)


# --------------------------------------------------------------------------------------------
# State layouts.


class RingWindow(NamedTuple):
    """The ring layout of a windowed state field (``ma_filter``'s window), used by the fused
    step: one ``[w, *shape]`` buffer per leaf whose slot ``count % w`` holds the oldest gradient.
    The eager layout is a tuple of w trees, oldest first. Same numbers; an update writes one slot,
    so a compiled step can do it in place."""

    buffers: Any


_WINDOWED = "__grokxform_window__"


def windowed_state(*, window: str, count: str) -> Callable[[type], type]:
    """Mark a NamedTuple state class as holding a window field (:class:`WindowField`): ``window``
    its field (eager: a tuple of trees, oldest first; fused: :class:`RingWindow`) and ``count``
    its field of per-leaf step counts (leaf i's oldest value is at ring slot ``count % w``). The
    state layouts (``grokxform.engine.layout``) find windows by this mark."""

    def mark(cls: type) -> type:
        setattr(cls, _WINDOWED, (window, count))
        return cls

    return mark


def window_fields(state: Any) -> tuple[str, str] | None:
    """``(window, count)``: the fields of a state marked by :func:`windowed_state`, else ``None``."""
    return getattr(type(state), _WINDOWED, None)


@dataclass(frozen=True)
class WindowField:
    """A state field holding the last ``size`` values per leaf (eager: a tuple of ``size`` trees,
    oldest first; fused: :class:`RingWindow`). The element rule reads the oldest value as input
    ``"window"`` and returns the value to store as output ``"window"``.

    ``total``: a field of the element rule that keeps a running sum of the window. Every ``size``
    updates of a leaf (on the update that makes its count a multiple of ``size``), every engine
    replaces the rule's new value of that field by the window's sum, recomputed after the update:
    its values oldest to newest, added one by one in float64 and rounded once to the field's
    dtype. So whatever rounding the running sum has gathered lasts at most ``size`` updates."""

    name: str
    size: int
    total: str | None = None


# --------------------------------------------------------------------------------------------
# The scalar rule's view of a step.


@dataclass
class ScalarContext:
    """What a primitive's scalar rule sees, for its ``n`` leaves with a gradient.

    ``state``: the primitive's state before the step. ``counts``: the per-leaf step counts before
    the step (1-d int64, ``n`` values; ``None`` without a count field). ``reduced``: the per-leaf
    reductions of the input it declared (``"norm"``: 2-norms, float32 or float64; ``"finite"``:
    bool). ``paths`` / ``present``: the dotted path of every leaf of the tree and whether it takes
    part this step (its positions are ``index``). ``extra``: ``update``'s keyword arguments that
    the primitive declares (:attr:`Elementwise.extras`; reading another one raises).
    ``device``: where the rule's tensors go.
    """

    state: Any
    counts: torch.Tensor | None
    reduced: dict[str, torch.Tensor]
    present: list[bool]
    index: list[int]
    extra: dict[str, Any]
    device: torch.device
    tree: Any = None
    """The tree whose leaf paths are :attr:`paths` (the gradients or the params)."""
    known_paths: list[str] | None = None

    @property
    def n(self) -> int:
        return len(self.index)

    @property
    def paths(self) -> list[str]:
        """The dotted path of every leaf of the tree (computed when a rule asks)."""
        if self.known_paths is None:
            self.known_paths = _tree.path_names(self.tree)
        return self.known_paths


ScalarRule = Callable[[ScalarContext], tuple[Mapping[str, Any], Mapping[str, Any]]]
"""``rule(ctx) -> (scalars, new_globals)``: the element rule's scalars (see
:class:`~grokxform.elements.Scalars`) and the new values of the state's 0-d fields."""


# --------------------------------------------------------------------------------------------
# The nodes.


class DeclNode:
    """What every declaration says of itself to the generic walks over a declaration tree
    (:func:`extra_args`, :func:`tree_reduction_args`): the declarations below it, and what it
    reads of ``update``'s keyword arguments and reduces over the whole tree itself."""

    def parts(self) -> list[tuple[Union["Declaration", None], bool]]:
        """The declarations of its members, each with whether it gets the node's input as it is
        (the incoming gradient of every leaf, when the node does)."""
        return []

    def own_extras(self) -> tuple[str, ...]:
        """The keyword arguments of ``update`` it reads itself."""
        return ()

    def own_reductions(self) -> list[tuple[str, tuple[str, ...]]]:
        """Its reductions over the whole tree: ``(name, the WHOLE_GRADIENT arguments that give
        it over a whole gradient of which the tree is a part)``."""
        return []


@dataclass(frozen=True, eq=False)
class Elementwise(DeclNode):
    """A primitive that acts on each leaf element by element.

    ``rule(v, sc) -> {"out": ..., <field>: ...}``: the element rule; its inputs are ``v.x`` (the
    incoming update), ``v.param`` (with ``needs_params``), one value per name in ``fields`` (the
    per-leaf state tensors) and ``v.window`` (the oldest value of the window field); its outputs
    are ``"out"`` and the new value of each field (``"window"``: the value to store).
    ``scalars``: the scalar rule. ``count``: the field of per-leaf int64 step counts (each leaf
    with a gradient adds one). ``reduce``: per-leaf reductions of the input needed by the scalar
    rule (``"norm"``, ``"finite"``); ``sums``: per-leaf sums of other element values it needs (see
    :attr:`sums`). ``select(params) -> [bool]``: the leaves it acts on (the others pass through
    unchanged). ``state_type``: its state class (``None``: stateless).
    """

    name: str
    rule: TracedRule
    scalars: ScalarRule
    state_type: type | None = None
    fields: tuple[str, ...] = ()
    count: str | None = None
    window: WindowField | None = None
    reduce: tuple[str, ...] = ()
    reduce_scope: Literal["tree", "leaf"] | None = None
    """``"tree"``: the scalar rule combines the per-leaf reductions over the tree (a global norm),
    which the param groups of an optimizer then share; ``"leaf"``: each leaf's reductions serve
    that leaf alone. Default: ``"tree"`` with ``reduce``, ``"leaf"`` with :attr:`sums` alone."""
    needs_params: bool = False
    nonnegative: tuple[str, ...] = ()
    """The fields that hold no negative value (a second moment ``nu``): a compressed state
    (:func:`~grokxform.compress_state`) stores them with an unsigned code."""
    select: Callable[[Any], list[bool]] | None = None
    check: Callable[[Any, Any, Any], None] | None = None
    """``check(updates, state, params)``: validation beyond the generic checks (raises)."""
    unsupported: str | None = None
    """Why an engine that captures the step (a CUDA graph) cannot run it, if it cannot."""
    extras: tuple[str, ...] = ()
    """The keyword arguments of ``update`` that the scalar rule reads from ``ctx.extra``
    (``"train_loss"``...): reading another one raises, and a front end refuses a step argument
    that no member of its chain declares (:func:`extra_args`)."""
    sums: TracedRule | None = None
    """Per-leaf sums the scalar rule reads: an element rule (without scalars) over ``x``,
    ``param`` (with ``needs_params``) and the state fields that returns named values;
    ``ctx.reduced[name]`` is then, per leaf, the sum of that value over the leaf's elements
    (accumulated in float32, float64 for float64 values; over the whole leaf when it is sharded).
    Each engine sums in its own fixed order, so they agree to rounding. A reduction over the
    tree is the scalar rule's to make from them."""

    def sum_names(self) -> tuple[str, ...]:
        """The names of :attr:`sums`' values."""
        if self.sums is None:
            return ()
        return tuple(self.sums.program(dict.fromkeys(self.sum_inputs(), torch.float32)).outputs)

    def sum_inputs(self) -> tuple[str, ...]:
        """The inputs of :attr:`sums`: those of the element rule but the window."""
        return ("x",) + (("param",) if self.needs_params else ()) + self.fields

    def reduces(self) -> bool:
        """Whether a step must reduce the input before the scalar rule runs (a pass ends there)."""
        return bool(self.reduce) or self.sums is not None

    def own_extras(self) -> tuple[str, ...]:
        return self.extras

    def own_reductions(self) -> list[tuple[str, tuple[str, ...]]]:
        if not (self.reduces() and (self.reduce_scope or ("tree" if self.reduce else "leaf")) == "tree"):
            return []
        return [(self.name, tuple(a for a in self.extras if a in WHOLE_GRADIENT))]

    def input_names(self) -> tuple[str, ...]:
        names = ("x",) + (("param",) if self.needs_params else ()) + self.fields
        return names + (("window",) if self.window is not None else ())

    def update(self, updates: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, Any]:
        """The eager update: both rules over the leaves, multi-tensor."""
        return _run_elementwise(self, updates, state, params, extra)


@dataclass(frozen=True, eq=False)
class Sequence(DeclNode):
    """``chain`` (``keys`` are 0, 1, ...; state a tuple) or ``named_chain`` (``keys`` are the
    names; state a dict): the members in order. A member without a declaration is ``None``."""

    keys: tuple[Any, ...]
    members: tuple[Union["Declaration", None], ...]
    transforms: tuple[Any, ...] = ()
    """The member transforms themselves (what runs a member without a declaration)."""

    def parts(self) -> list[tuple[Union["Declaration", None], bool]]:
        return [(m, k == 0) for k, m in enumerate(self.members)]


@dataclass(frozen=True, eq=False)
class Amplify(DeclNode):
    """``amplify(filter, lamb)``: ``out = combine(x, filter(x))`` per element; state: the filter's."""

    inner: Union["Declaration", None]
    rule: TracedRule
    """inputs ``x``, ``slow``; output ``out``; scalar ``lamb``."""
    lamb: Any

    def parts(self) -> list[tuple[Union["Declaration", None], bool]]:
        return [(self.inner, True)]


@dataclass(frozen=True, eq=False)
class Masked(DeclNode):
    """``masked(inner, mask)``: ``inner`` on the selected leaves (``select(params)``), the others unchanged."""

    inner: Union["Declaration", None]
    select: Callable[[Any], list[bool]]

    def parts(self) -> list[tuple[Union["Declaration", None], bool]]:
        return [(self.inner, False)]


@dataclass(frozen=True, eq=False)
class Partition(DeclNode):
    """``partition(transforms, labels)``: leaf i goes through ``members[labels(params)[i]]``."""

    members: dict[str, Union["Declaration", None]]
    labels: Callable[[Any], list[str]]

    def parts(self) -> list[tuple[Union["Declaration", None], bool]]:
        return [(m, False) for m in self.members.values()]


@dataclass(frozen=True, eq=False)
class Injected(DeclNode):
    """``inject_hyperparams(factory)(...)``: the inner transform is ``build(hp)`` with
    ``hp = current(state.count, state.hyperparams)`` (schedules evaluated at the count)."""

    build: Callable[[dict[str, torch.Tensor]], Any]
    current: Callable[[torch.Tensor, dict[str, torch.Tensor]], dict[str, torch.Tensor]]
    schedules: tuple[str, ...]
    example: Callable[[], Any]
    """The inner transform built with the initial values (its structure is every step's)."""

    def parts(self) -> list[tuple[Union["Declaration", None], bool]]:
        return [(declaration_of(self.example()), True)]


def _skip_unless(flag: str) -> TracedRule:
    """The rule ``out = x where the scalar flag holds, else −0.0`` (θ + (−0.0) is θ bit for bit,
    also for θ = −0.0): the update of a step that a wrapper skips."""
    return TracedRule(lambda v, sc: {"out": where(getattr(sc, flag), v.x, -0.0)})


@dataclass(frozen=True, eq=False)
class Accumulate(DeclNode):
    """``MultiSteps(inner, k)``: ``inner`` runs on the mean of every k gradients (``rule``: inputs
    ``x``, ``acc``; scalars ``k`` and the flag ``final``; outputs ``acc``, the sum to keep (zero
    after the k-th micro-step) and ``mean``, what ``inner`` gets). The inner state changes on the
    k-th micro-step only, and ``skip`` gives the update."""

    inner: Union["Declaration", None]
    every: int
    rule: TracedRule
    skip: ClassVar[TracedRule] = _skip_unless("final")

    def parts(self) -> list[tuple[Union["Declaration", None], bool]]:
        return [(self.inner, False)]

    def advance(self, state: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(final, new)``: whether this micro-step is the k-th, and the new values of the
        state's counters ``mini_step`` and ``steps``."""
        final = state.mini_step + 1 >= self.every
        return final, {
            "mini_step": torch.where(final, torch.zeros_like(state.mini_step), state.mini_step + 1),
            "steps": state.steps + final.to(state.steps.dtype),
        }


@dataclass(frozen=True, eq=False)
class IfFinite(DeclNode):
    """``apply_if_finite(inner)``: ``inner``'s step where every gradient is finite, else none
    (``skip`` gives the update)."""

    inner: Union["Declaration", None]
    skip: ClassVar[TracedRule] = _skip_unless("finite")

    def parts(self) -> list[tuple[Union["Declaration", None], bool]]:
        return [(self.inner, True)]

    def own_extras(self) -> tuple[str, ...]:
        return (GLOBAL_FINITE,)

    def own_reductions(self) -> list[tuple[str, tuple[str, ...]]]:
        return [("apply_if_finite", (GLOBAL_FINITE,))]

    @staticmethod
    def combine(finite: torch.Tensor, extra: Mapping[str, Any]) -> torch.Tensor:
        """Whether the step is taken: ``finite`` (the tree's gradients are), and the whole
        gradient is when the tree is a part of it (``extra[GLOBAL_FINITE]``)."""
        whole = extra.get(GLOBAL_FINITE)
        if whole is None:
            return finite
        return finite & torch.as_tensor(whole).to(finite.device, torch.bool).reshape(())

    @staticmethod
    def advance(state: Any, finite: torch.Tensor) -> dict[str, torch.Tensor]:
        """The new values of the state's counters after a step that was (not) ``finite``."""
        skipped = (~finite).to(torch.int64)
        return {
            "notfinite_count": (state.notfinite_count + 1) * skipped,
            "last_finite": finite,
            "total_notfinite": state.total_notfinite + skipped,
        }


@dataclass(frozen=True, eq=False)
class Compressed(DeclNode):
    """``compress_state(inner, fmt)``: ``inner`` with its large float32 state tensors stored
    compressed (:mod:`grokxform.transforms.compress`); the engine decodes a packed state field
    where it loads it and encodes its new value where it stores it. ``seed``: the stochastic
    rounding's keys are ``leaf_keys(seed, count, position)``, ``position`` the tensor's among the
    leaves of the inner state (packed ones counting as one)."""

    inner: Union["Declaration", None]
    fmt: str
    block_size: int
    seed: int

    def parts(self) -> list[tuple[Union["Declaration", None], bool]]:
        return [(self.inner, True)]


@dataclass(frozen=True, eq=False)
class Leafwise(DeclNode):
    """A stateless stage that maps each selected leaf whole rather than element by element (a
    matrix function: Muon's Newton–Schulz iteration).

    ``fn(stacked) -> result``: the leaves of one shape, dtype and device stacked into one
    ``[n, *shape]`` tensor (in the order of the tree), mapped at once; the result has the shape
    and dtype of ``stacked`` and is leaf k's update at ``result[k]``. ``select(leaf) -> bool``:
    whether it maps a leaf (a function of its shape and dtype: the eager path asks it of the
    update, the engine of the param, which is shaped as it); the others pass through unchanged.
    The engine runs ``fn`` between two passes of its kernels, on buffers it keeps from step to
    step (:class:`grokxform.engine.plan.Whole`). ``check(updates)``: validation beyond the
    generic checks (raises)."""

    name: str
    fn: Callable[[torch.Tensor], torch.Tensor]
    select: Callable[[torch.Tensor], bool]
    check: Callable[[Any], None] | None = None

    def update(self, updates: Any, state: Any, params: Any = None, **extra: Any) -> tuple[Any, Any]:
        """The eager update: ``fn`` on each group of selected leaves of one shape, dtype and device."""
        del params, extra
        name = self.name
        C.check_gradients(updates, name)
        if self.check is not None:
            self.check(updates)
        leaves, spec = _tree.flatten(updates)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, g in enumerate(leaves):
            if isinstance(g, torch.Tensor) and self.select(g):
                if _dist.is_sharded(g):
                    raise TypeError(
                        f"{name}: the update at path {_tree.path_names(updates)[i]!r} is a DTensor (a sharded"
                        f" leaf); {name} needs each leaf whole"
                    )
                groups.setdefault((tuple(g.shape), g.dtype, g.device), []).append(i)
        out = list(leaves)
        for idx in groups.values():
            result = self.map(torch.stack([leaves[i] for i in idx]))
            for k, i in enumerate(idx):
                out[i] = result[k]
        return _tree.unflatten(out, spec), state

    def map(self, stacked: torch.Tensor) -> torch.Tensor:
        """``fn(stacked)``, checked to keep the shape and dtype (metadata only: no device read)."""
        result = self.fn(stacked)
        if not isinstance(result, torch.Tensor) or result.shape != stacked.shape or result.dtype != stacked.dtype:
            got = f"{result.dtype}{list(result.shape)}" if isinstance(result, torch.Tensor) else type(result).__name__
            raise ValueError(
                f"{self.name}: fn returned {got} for leaves stacked as {stacked.dtype}{list(stacked.shape)}: it"
                " must keep the shape and dtype"
            )
        return result


Declaration = Union[
    Elementwise, Sequence, Amplify, Masked, Partition, Injected, Accumulate, IfFinite, Compressed, Leafwise
]


# --------------------------------------------------------------------------------------------
# Running an element rule eagerly over the leaves.


def run_rule(rule: TracedRule, inputs: Mapping[str, list[Any]], sc: Scalars) -> dict[str, list[torch.Tensor]]:
    """Run ``rule`` over ``n`` leaves: ``inputs[name][k]`` is input ``name`` of leaf k (tensors).
    Leaves are grouped by device and the dtypes of their inputs; each group runs as
    ``torch._foreach_*`` ops (or one leaf at a time, see :func:`foreach_ok`). Returns, per
    output, the ``n`` results in order."""
    names = list(inputs)
    n = sc.n
    columns = [inputs[name] for name in names]
    result: dict[str, list[Any]] = {}
    if n == 0:
        return defaultdict(list)
    if foreach_ok([col[0] for col in columns] + [col[-1] for col in columns], sc):
        groups: dict[tuple[Any, ...], list[int]] = {}
        for k in range(n):
            key = (columns[0][k].device, *(col[k].dtype for col in columns))
            groups.setdefault(key, []).append(k)
        for key, idx in groups.items():
            prog = rule.program(dict(zip(names, key[1:])))
            got = run_foreach(prog, {name: [col[k] for k in idx] for name, col in zip(names, columns)}, sc, idx)
            for name, vals in got.items():
                slot = result.setdefault(name, [None] * n)
                for k, v in zip(idx, vals):
                    slot[k] = v
        return result
    for k in range(n):
        prog = rule.program({name: col[k].dtype for name, col in zip(names, columns)})
        one = run_leaf(prog, {name: col[k] for name, col in zip(names, columns)}, sc, k)
        for name, t in one.items():
            result.setdefault(name, [None] * n)[k] = t
    return result


def reductions(
    kinds: Seq[str], xs: list[torch.Tensor], device: torch.device,
    shards: Seq[_dist.LeafShard | None] | None = None, summed: Mapping[str, list[torch.Tensor]] | None = None,
) -> dict[str, torch.Tensor]:
    """Per-leaf reductions of ``xs`` as 1-d tensors on ``device``: ``"norm"`` (the 2-norm, in
    float32, float64 for float64 leaves; float64 if any leaf is) and ``"finite"`` (whether every
    value is finite); and for each name of ``summed`` (values per leaf, see
    :attr:`Elementwise.sums`) the sum of each leaf's values. With ``shards`` (the layout of each
    leaf whose local shard ``xs`` holds), the reductions are of the whole leaves
    (:func:`grokxform.distributed.complete_reductions`)."""
    out = _local_reductions(kinds, xs, device)
    for name, ts in (summed or {}).items():
        out[name] = leaf_sums(ts, device)
    if shards is not None and any(s is not None for s in shards):
        out = _dist.complete_reductions(out, shards)
    return out


def leaf_sums(ts: Seq[torch.Tensor], device: torch.device) -> torch.Tensor:
    """The sum of each tensor's elements (accumulated in float32, float64 for float64 tensors), as
    a 1-d tensor on ``device`` (float64 if any tensor is)."""
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32
    if not ts:
        return torch.zeros(0, dtype=dtype, device=device)
    return torch.stack([t.sum(dtype=torch.promote_types(t.dtype, torch.float32)).to(device, dtype) for t in ts])


def _finite_on_cpu(xs: list[torch.Tensor], norms: Any) -> torch.Tensor:
    """Whether every value of each CPU leaf of ``xs`` is finite, from their 2-norms: a finite norm
    proves it (a non-finite value makes Σx² non-finite); a leaf whose norm is not finite (such a
    value, or finite values whose Σx² overflows) is read again. (The ∞-norm, one pass for every
    leaf, is about ten times slower than the 2-norm on the CPU.)"""
    finite = torch.isfinite(norms)
    if bool(finite.all()):
        return finite
    for k in (~finite).nonzero().flatten().tolist():
        finite[k] = bool(torch.isfinite(xs[k]).all())
    return finite


def _local_reductions(kinds: Seq[str], xs: list[torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    if not kinds:
        return out
    if xs and foreach_ok(xs[:1] + xs[-1:]):  # (a transform wraps all the leaves it maps over)
        kind = {(x.device, x.dtype) for x in xs}
        if len(kind) == 1:  # one device and dtype, the common case: no per-leaf Python
            ((dev, dt),) = kind
            acc = torch.promote_types(dt, torch.float32)  # the norm dtype too
            norms = torch.stack(torch._foreach_norm(xs, 2, dtype=acc)) if "norm" in kinds or (
                "finite" in kinds and dev.type == "cpu") else None
            if "norm" in kinds:
                out["norm"] = norms.to(device)
            if "finite" in kinds and all(x.numel() for x in xs):
                out["finite"] = (_finite_on_cpu(xs, norms) if dev.type == "cpu" else torch.isfinite(
                    torch.stack(torch._foreach_norm(xs, float("inf"))))).to(device)
            if len(out) == len(kinds):
                return out
            out = {}
        norm_dtype = torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32
        norms: list[Any] = [None] * len(xs)
        maxes: list[Any] = [None] * len(xs)
        groups: dict[tuple[Any, ...], list[int]] = {}
        for k, x in enumerate(xs):
            groups.setdefault((x.device, x.dtype), []).append(k)
        for (_, dt), idx in groups.items():
            sub = [xs[k] for k in idx]
            if "norm" in kinds:
                for k, v in zip(idx, torch._foreach_norm(sub, 2, dtype=torch.promote_types(dt, torch.float32))):
                    norms[k] = v
            if "finite" in kinds:  # the largest |x| (nan or inf where a value is); empty leaves are finite
                full = [k for k in idx if xs[k].numel()]
                for k, v in zip(full, torch._foreach_norm([xs[k] for k in full], float("inf")) if full else []):
                    maxes[k] = v
        # (leaves may sit on several devices: each value is moved, a no-op on one device)
        if "norm" in kinds:
            out["norm"] = torch.stack([v.to(device=device, dtype=norm_dtype) for v in norms])
        if "finite" in kinds:
            zero = torch.zeros((), dtype=norm_dtype, device=device)
            out["finite"] = torch.isfinite(
                torch.stack([zero if v is None else v.to(device=device, dtype=norm_dtype) for v in maxes])
            )
        return out
    norm_dtype = torch.float64 if any(x.dtype == torch.float64 for x in xs) else torch.float32
    if "norm" in kinds:
        out["norm"] = torch.stack([
            torch.linalg.vector_norm(x, dtype=torch.promote_types(x.dtype, torch.float32)).to(device, norm_dtype)
            for x in xs
        ]) if xs else torch.zeros(0, dtype=norm_dtype, device=device)
    if "finite" in kinds:
        out["finite"] = torch.stack([torch.isfinite(x).all().to(device) for x in xs]) if xs else torch.ones(
            0, dtype=torch.bool, device=device)
    return out


GLOBAL_NORM = "global_grad_norm"
"""``update``'s keyword argument that gives :func:`~grokxform.clip_by_global_norm` the norm of the
whole gradient when the tree is a part of it."""
GLOBAL_FINITE = "global_grad_finite"
"""``update``'s keyword argument that tells :func:`~grokxform.apply_if_finite` whether the whole
gradient is finite when the tree is a part of it."""


class DeclaredExtras(Mapping[str, Any]):
    """``update``'s keyword arguments as a primitive's scalar rule sees them: the declared ones
    (:attr:`Elementwise.extras`); asking for another name raises, naming the primitive, so that a
    rule never reads ``None`` for an argument it forgot to declare."""

    def __init__(self, extra: Mapping[str, Any], decl: Elementwise) -> None:
        self._extra, self._decl = extra, decl

    def _allowed(self, key: str) -> None:
        if key not in self._decl.extras:
            raise ValueError(
                f"{self._decl.name}: its scalar rule reads the update argument {key!r}, which it does not declare"
                f" (declared: {list(self._decl.extras)}); declare it with elementwise(..., extras=({key!r},))"
            )

    def __getitem__(self, key: str) -> Any:
        self._allowed(key)
        return self._extra[key]

    def get(self, key: str, default: Any = None) -> Any:
        self._allowed(key)
        return self._extra.get(key, default)

    def __contains__(self, key: object) -> bool:
        self._allowed(str(key))
        return key in self._extra

    def __iter__(self) -> Any:
        return (k for k in self._extra if k in self._decl.extras)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def extra_args(decl: Any) -> frozenset[str] | None:
    """The keyword arguments of ``update`` that the declared transform ``decl`` reads (its
    primitives' :attr:`Elementwise.extras`, ``apply_if_finite``'s :data:`GLOBAL_FINITE`), or
    ``None`` when a member has no declaration (what it reads is not known)."""
    if decl is None:
        return None
    out = set(decl.own_extras())
    for kid, _ in decl.parts():
        names = extra_args(kid)
        if names is None:
            return None
        out |= names
    return frozenset(out)


def check_extra_args(decl: Any, names: Seq[str], who: str) -> None:
    """Raise ``TypeError`` for a name in ``names`` that the declared transform ``decl`` does not
    read (:func:`extra_args`), suggesting the closest name it takes; nothing is checked when what
    it reads is not known (a member without a declaration). The grokking signal's inputs
    (:data:`~grokxform.signals.SIGNAL_INPUTS`) are taken by every chain: one without a signal
    ignores them, so one training loop can pass them to every optimizer."""
    accepted = extra_args(decl)
    if accepted is None:
        return
    unknown = [n for n in names if n not in accepted and n not in SIGNAL_INPUTS]
    if not unknown:
        return
    name = unknown[0]
    taken = sorted((set(accepted) | set(SIGNAL_INPUTS)) - {GLOBAL_NORM, GLOBAL_FINITE})
    close = difflib.get_close_matches(name, taken, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    raise TypeError(
        f"{who}: got the keyword argument {name!r}, which no transform of this chain reads (it takes"
        f" {', '.join(taken)}){hint}"
    )


def whole_gradient_reductions(
    leaves: Seq[torch.Tensor | None], wanted: Seq[str] = (GLOBAL_NORM, GLOBAL_FINITE)
) -> dict[str, torch.Tensor]:
    """The reductions of a gradient made of several trees (the param groups of one optimizer), as
    ``update`` keyword arguments for each tree (those named in ``wanted``): ``global_grad_norm``,
    the pair ``(‖g‖, ‖g‖_fin)`` that :func:`~grokxform.clip_by_global_norm` computes over one tree
    (per-leaf norms in float32, float64 if any leaf is; ``‖g‖_fin`` over the finite leaves), and
    ``global_grad_finite``, whether every value is finite. ``None`` leaves are skipped; sharded
    leaves (DTensors) count whole (one all-reduce). One read of the gradients: without
    ``global_grad_finite``, a leaf counts as finite when its norm is (a finite leaf whose float32
    sum of squares overflows, values beyond ~1e19, counts as non-finite)."""
    xs = [x for x in leaves if x is not None]
    shards = None
    if any(_dist.is_sharded(x) for x in xs):
        shards = [_dist.shard_of(x) for x in xs]
        xs = [_dist.local(x) for x in xs]
    device = xs[0].device if xs else torch.device("cpu")
    kinds = ("norm", "finite") if GLOBAL_FINITE in wanted else ("norm",)
    red = reductions(kinds, xs, device, shards)
    norms = red["norm"]
    finite = red["finite"] if "finite" in red else torch.isfinite(norms)
    out = {}
    if GLOBAL_NORM in wanted:
        out[GLOBAL_NORM] = torch.stack(
            [torch.linalg.vector_norm(norms), torch.linalg.vector_norm(torch.where(finite, norms, 0.0))]
        )
    if GLOBAL_FINITE in wanted:
        out[GLOBAL_FINITE] = finite.all()
    return out


WHOLE_GRADIENT = (GLOBAL_NORM, GLOBAL_FINITE)
"""The keyword arguments of ``update`` that give a reduction over a tree its value over the whole
gradient, when the tree is a part of it (:func:`whole_gradient_reductions` computes them)."""


def tree_reductions(decl: Any, *, on_gradient: bool = True) -> list[tuple[str, bool]]:
    """The reductions over the whole tree that the declared transform ``decl`` makes, in order:
    ``(name, on_gradient)`` for each, ``on_gradient`` saying whether it reads the incoming
    gradient of every leaf as it is (first in the chain, with no mask, partition or accumulation
    above it). Per-leaf reductions (``clip_by_tensor_norm``) are not listed; nor is anything
    inside a member without a declaration."""
    return [(name, on) for name, on, _ in tree_reduction_args(decl, on_gradient=on_gradient)]


def tree_reduction_args(decl: Any, *, on_gradient: bool = True) -> list[tuple[str, bool, tuple[str, ...]]]:
    """:func:`tree_reductions` with, for each, the arguments of ``update`` (of
    :data:`WHOLE_GRADIENT`) through which it takes its value over a whole gradient of which the
    tree is a part: those a primitive declares among its :attr:`Elementwise.extras`, and
    :data:`GLOBAL_FINITE` for ``apply_if_finite``. A reduction without one reduces the tree it is
    given, and only that."""
    if decl is None:
        return []
    own = [(name, on_gradient, args) for name, args in decl.own_reductions()]
    return own + [r for kid, keeps in decl.parts() for r in tree_reduction_args(kid, on_gradient=on_gradient and keeps)]


def _leaves(tree: Any, spec: Any, updates: Any, what: str, name: str) -> list[Any]:
    leaves, s = _tree.flatten(tree)
    if s != spec:
        _tree.check_structure(updates, tree, f"{name} state", "gradient", shapes=False)
        raise ValueError(f"{name}: the state's {what} does not match the gradient tree")
    return leaves


def _run_elementwise(
    decl: Elementwise, updates: Any, state: Any, params: Any, extra: dict[str, Any]
) -> tuple[Any, Any]:
    name = decl.name
    if decl.state_type is not None:
        C.check_state(state, decl.state_type, name)
    if decl.needs_params and params is None:
        raise ValueError(f"{name}: update needs params (pass params=...)")
    g_leaves, spec = _tree.flatten(updates)
    field_leaves = {f: _leaves(getattr(state, f), spec, updates, f, name) for f in decl.fields}
    counts = _leaves(getattr(state, decl.count), spec, updates, decl.count, name) if decl.count else None
    wf = decl.window
    window = getattr(state, wf.name) if wf is not None else None
    ring = isinstance(window, RingWindow)
    if wf is not None and not ring and (not isinstance(window, tuple) or len(window) != wf.size):
        raise ValueError(f"{name}: the state's window must be a tuple of {wf.size} trees")
    slots = [] if window is None or ring else [_tree.flatten(t)[0] for t in window]
    buffers = _leaves(window.buffers, spec, updates, "window", name) if isinstance(window, RingWindow) else []
    shaped = next(iter(field_leaves.values()), None)
    p_leaves = None
    if decl.needs_params:
        _tree.check_structure(updates, params, "params", "gradient")
        p_leaves = _tree.flatten(params)[0]
    if shaped is not None:
        if any(isinstance(g, torch.Tensor) and isinstance(r, torch.Tensor) and g.shape != r.shape
               for g, r in zip(g_leaves, shaped)):
            _tree.check_structure(updates, getattr(state, decl.fields[0]), f"{name} state", "gradient")
        C._check_gradient_leaves(g_leaves, shaped, updates, name)
    else:
        refs = p_leaves if p_leaves is not None else (_tree.flatten(params)[0] if params is not None else [])
        C._check_gradient_leaves(g_leaves, refs, updates, name, like_name="param")
        if counts is not None:  # (a state of per-leaf counters alone: on the gradients' devices too)
            C._check_gradient_leaves(g_leaves, counts, updates, name)
    if decl.check is not None:
        decl.check(updates, state, params)
    selected = decl.select(params if params is not None else updates) if decl.select is not None else None
    index = [i for i, g in enumerate(g_leaves) if g is not None and (selected is None or selected[i])]
    for column in [*field_leaves.values(), *([counts] if counts is not None else [])]:
        if any(x is None for x in column):
            missing = next((i for i in index if column[i] is None), None)
            if missing is not None:
                path = _tree.path_names(updates)[missing]
                raise ValueError(f"{name}: the gradient at path {path!r} has no state (its param was None at init)")
    # DTensor leaves (sharded params): the rule runs on the local shards, the results are
    # DTensors laid out as the gradients; reductions are completed over the ranks.
    shards = [_dist.shard_of(g) for g in g_leaves]
    sharded = any(s is not None for s in shards)
    lo = _dist.local
    xs = [lo(g_leaves[i]) for i in index]
    if not index and decl.reduces():
        return updates, state
    device = state_device(state, xs)
    cnt = torch.stack([counts[i] for i in index]) if counts is not None and index else None
    if counts is not None and not index:
        cnt = torch.zeros(0, dtype=torch.int64, device=device)
    present = [False] * len(g_leaves)
    for i in index:
        present[i] = True
    inputs: dict[str, list[Any]] = {"x": xs}
    if p_leaves is not None:
        inputs["param"] = [lo(p_leaves[i]) for i in index]
    for f in decl.fields:
        inputs[f] = [lo(field_leaves[f][i]) for i in index]
    summed = {} if decl.sums is None else run_rule(
        decl.sums, {k: inputs[k] for k in decl.sum_inputs()}, Scalars({}, len(index)))
    ctx = ScalarContext(
        state=state, counts=cnt,
        reduced=reductions(decl.reduce, xs, device, [shards[i] for i in index] if sharded else None, summed),
        tree=updates, present=present, index=index, extra=DeclaredExtras(extra, decl), device=device,
    )
    values, new_globals = decl.scalars(ctx)
    sc = Scalars(values, len(index))
    ring_slots: list[torch.Tensor] = []
    if wf is not None:
        if ring:
            assert counts is not None
            ring_slots = [torch.remainder(counts[i], wf.size).reshape(1) for i in index]
            inputs["window"] = [lo(buffers[i]).index_select(0, s).squeeze(0) for i, s in zip(index, ring_slots)]
        else:
            inputs["window"] = [lo(slots[0][i]) for i in index]
    got = run_rule(decl.rule, inputs, sc)
    if wf is not None and wf.total is not None and index:
        assert cnt is not None  # a window is declared with a count

        def older(k: int) -> torch.Tensor | list[torch.Tensor]:  # at a re-sum the ring is in order
            return lo(buffers[index[k]]) if ring else [lo(slots[j][index[k]]) for j in range(1, wf.size)]

        got[wf.total] = window_sums(got[wf.total], older, got["window"], cnt, wf.size)
    if sharded:
        got = {key: [_dist.wrap(t, shards[i]) for t, i in zip(col, index)] for key, col in got.items()}
    out = list(g_leaves)
    for k, i in enumerate(index):
        out[i] = got["out"][k]
    changes: dict[str, Any] = dict(new_globals)
    for f in decl.fields:
        new = list(field_leaves[f])
        for k, i in enumerate(index):
            new[i] = got[f][k]
        changes[f] = _tree.unflatten(new, spec)
    if counts is not None and decl.count is not None:
        new_counts = list(counts)
        present_counts = [counts[i] for i in index]
        bumped = torch._foreach_add(present_counts, 1) if index and foreach_ok(present_counts[:1]) else [
            c + 1 for c in present_counts]
        for k, i in enumerate(index):
            new_counts[i] = bumped[k]
        changes[decl.count] = _tree.unflatten(new_counts, spec)
    if wf is not None:
        stored = got["window"]
        if ring:
            new_buffers = list(buffers)
            for k, i in enumerate(index):
                new_buffers[i] = _dist.wrap(
                    lo(buffers[i]).index_put((ring_slots[k],), lo(stored[k]).unsqueeze(0)),
                    _dist.stacked(shards[i], wf.size),
                )
            changes[wf.name] = RingWindow(_tree.unflatten(new_buffers, spec))
        else:  # rotate the window of each leaf that got a value; the others keep their slots
            w = wf.size
            stored_at = dict(zip(index, stored))
            new_slots = [
                [slots[k + 1][i] if present[i] else slots[k][i] for i in range(len(g_leaves))] for k in range(w - 1)
            ]
            new_slots.append([stored_at[i] if present[i] else slots[w - 1][i] for i in range(len(g_leaves))])
            changes[wf.name] = tuple(_tree.unflatten(s, spec) for s in new_slots)
    if not changes:
        return _tree.unflatten(out, spec), state
    new_state = type(state)(*(changes.get(f, v) for f, v in zip(state._fields, state)))  # no _replace: Dynamo
    return _tree.unflatten(out, spec), new_state


def state_device(state: Any, fallback: list[torch.Tensor]) -> torch.device:
    """The device of a state's 0-d fields (its first tensor), else of the first of ``fallback``."""
    if isinstance(state, tuple):
        for v in state:
            if isinstance(v, torch.Tensor):
                return v.device
    for t in fallback:
        return t.device
    return _tree.first_device(state)


__all__ = [
    "GLOBAL_FINITE",
    "GLOBAL_NORM",
    "WHOLE_GRADIENT",
    "Accumulate",
    "Amplify",
    "Compressed",
    "Declaration",
    "Elementwise",
    "IfFinite",
    "Injected",
    "Leafwise",
    "RingWindow",
    "Masked",
    "Partition",
    "ScalarContext",
    "Sequence",
    "WindowField",
    "DeclaredExtras",
    "check_extra_args",
    "declaration_of",
    "declare",
    "extra_args",
    "kernels",
    "run_rule",
    "set_kernel_runner",
    "tree_reduction_args",
    "tree_reductions",
    "whole_gradient_reductions",
    "window_fields",
    "windowed_state",
]
