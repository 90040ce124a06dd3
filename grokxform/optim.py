"""``grokxform.Optimizer``: any gradient transformation as a ``torch.optim.Optimizer``.

Two ways to give the transformation, with different meanings of a param group's ``lr``:

1. **A factory and its arguments** (recommended)::

       opt = grokxform.Optimizer(model.named_parameters(), grokxform.grokadamw, lr=1e-3, weight_decay=0.01)

   Every argument of the factory that has a default (``lr``, ``betas``, ``eps``, ``weight_decay``,
   ``lamb``...) is a hyperparameter of each param group, as in ``torch.optim.AdamW``: the keyword
   arguments set the defaults, a param group dict overrides them for its parameters. Each group
   runs its own ``inject_hyperparams(factory)(**group_hyperparameters)``: the float
   hyperparameters are 0-d float64 tensors in the group's state, refilled from the group's dict
   before every step (``fill_``, no new graph), so ``torch.optim.lr_scheduler`` schedulers (all
   of them, ``ReduceLROnPlateau`` and ``OneCycleLR`` included) change the learning rate exactly as
   they do for torch's optimizers. A hyperparameter that is not a float (``betas``, a tuple; ints;
   strings; functions) is fixed in the transform; when a scheduler changes it (``OneCycleLR``
   cycles ``betas``), that group's transform is rebuilt with the new value, its state kept.

2. **A ready** :class:`~grokxform.GradientTransformation`::

       opt = grokxform.Optimizer(model.parameters(), grokxform.chain(...))

   Its hyperparameters are fixed inside it. The only group hyperparameter is ``lr``, a
   *multiplier* of the transform's updates, 1.0 by default: a scheduler then scales the whole
   step (``LambdaLR(opt, f)`` multiplies it by f(t); ``OneCycleLR`` wants ``max_lr=1.0``). The
   learning rate inside the transform is not touched; loggers that read ``param_groups[0]["lr"]``
   see the multiplier.

The tree. Each param group is one tree ``{name: param}`` handed to the transform, with the
parameter names as keys when named parameters are given (``model.named_parameters()``, or
``(name, param)`` pairs inside group dicts, or a ``"param_names"`` list), so masks and depth rules
that read paths work (``"blocks.3.attn.weight"``). Unnamed parameters (``model.parameters()``, the
groups that transformers' ``Trainer`` builds) take their names from ``module=model`` when it is
given, else their position, ``"0"``, ``"1"``..., counted across groups; a depth rule
(``layerwise_beta(layer="depth")``, GrokAdamW's default) refuses positions, since they are not
module paths. Each group has its own state, but a reduction over the tree (the global clip norm,
``apply_if_finite``'s check) spans every group that steps, as ``clip_grad_norm_(parameters)``
does: groups change hyperparameters, not the scope of a reduction. A chain whose reduction reads
its input after other members changed it cannot span groups and raises with several of them.

A step: the gradients (``p.grad``; ``None`` for frozen parameters and those that got no gradient:
no update, their state kept) go through the group's transformation, ``θ ← θ + u``.
``step(train_loss=..., val_loss=...)`` passes the extra arguments to the transform (the grokking
signal). A group none of whose parameters has a gradient is skipped. The state of a group is
initialised at its first step. ``optimizer.state[p]`` lists the tensors of the group state that
belong to ``p`` (``"adam.mu"``, ``"adam.nu"``, ``"grokfast.mu"``, ``"grokfast.window.3"``...); the
group states themselves are ``optimizer.tx_states`` (in the eager layout). ``torch.amp.GradScaler`` works (it unscales the
``.grad`` of the param groups, then calls ``step``).

Engines. By default (``fused=None``) each group's step is the engine's
(:class:`grokxform.fused.FusedStep` with ``backend="engine"``, ``docs/fast_path.md``): the chain's
declared primitives as generated Triton kernels on CUDA (captured in a CUDA graph), as generated C
kernels on the CPU (built by the system's C compiler), or as the same plan run with in-place
``torch._foreach_*`` ops where neither runs; params and state are updated in place.
The hyperparameter tensors a scheduler fills are the ones the step reads, so lr changes need no
new step; a scheduler that changes a fixed hyperparameter (``OneCycleLR``'s betas) rebuilds it. A
member of a chain without a declaration runs its own ``update`` between the engine's steps of the
members around it (``optimizer.engines``: ``"c+tx.update+c"``); a transformation the engine cannot
run at all runs the eager, multi-tensor ``tx.update`` instead (``optimizer.fallback_reasons`` says
why); ``fused=False`` asks for that path, op by op with torch's own ops (:func:`grokxform.kernels`).
``fused=True`` is ``FusedStep(backend="auto")`` (the engine's kernels, else an Inductor-compiled
step); ``fused=`` also takes a backend name (``"triton"``, ``"c"``, ``"foreach"``, ``"inductor"``;
``"aot_eager"`` runs the traced step op by op). ``optimizer.engines`` says what ran each group.

State. Each group's state is made at its first step, in the engine's layout (MA windows as
ring buffers), and every engine updates those very tensors in place: the engine's kernels, the
eager ``tx.update`` (its result written back) and a step inside ``torch.compile``. Each step
first checks that the parameters are the tensors the state was built for: new storage
(``p.data = ...``, ``model.double()``) is followed, the state cast and moved as ``init`` would
make it; a new shape, an edited ``group["params"]`` or a gradient of another shape raise, naming
the parameter. Hyperparameters edited in ``param_groups`` are checked by the factory when a step
first reads them.

Checkpoints. ``state_dict()`` has torch.optim's layout (each parameter's state under its index;
``torch.distributed.checkpoint`` reads it, sharded DTensor state included, ``docs/distributed.md``)
and plain containers only, so ``torch.load(path, weights_only=True)`` reads it; its tensors are
the optimizer's own, live, as torch.optim's are (MA windows as their ring slots).
``load_state_dict`` rebuilds the state against a freshly initialised one and raises, naming the
mismatch, for another model (names, shapes), another transform (factory, state structure) or a
value no run produces (a negative count), leaving the optimizer unchanged. Resuming is bit for
bit.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Iterable
from typing import Any, Union

import torch

from grokxform import _checkpoint as K
from grokxform import _common as C
from grokxform import _hyperparams as H
from grokxform import _naming as N
from grokxform import _state_io as S
from grokxform import declarations as D
from grokxform import distributed as _dist
from grokxform._group_reductions import GroupReductions
from grokxform.base import GradientTransformation, chain
from grokxform.declarations import kernels
from grokxform.engine.layout import (
    Owned,
    init_state,
    oldest_first,
    to_eager_layout,
    to_fused_layout,
    write_back,
)
from grokxform.fused import EngineUnavailable as _EngineUnavailable
from grokxform.fused import FusedStep
from grokxform.metrics import metrics as _metrics
from grokxform.signals import SIGNAL_INPUTS, signal_input
from grokxform.transforms.compress import FORMATS, compress_state
from grokxform.transforms.schedules import scale_by_learning_rate
from grokxform.transforms.wrappers import inject_hyperparams

Factory = Callable[..., GradientTransformation]
ParamsArg = Union[Iterable[torch.Tensor], Iterable[tuple[str, torch.Tensor]], Iterable[dict[str, Any]]]


def _multiplier(lr: Any) -> GradientTransformation:
    """``u·lr``: the lr multiplier of a ready transformation, as the last member of its fused step."""
    return scale_by_learning_rate(lr, flip_sign=False)


class _Bound:
    """The parameters a group's state is built for: the very tensors of ``group["params"]``,
    where their data lives, and their shapes, dtypes and devices. A step first compares where
    their data lies (about 11 µs for 150 tensors): ``p.data = ...``, ``model.double()`` or
    ``.to(...)`` move it, and so does an edit of ``group["params"]``."""

    def __init__(self, params: list[torch.Tensor]) -> None:
        self.params = list(params)
        self.sharded = any(_dist.is_sharded(p) for p in params)
        self.ptrs = self._ptrs(params)
        self.meta = [(tuple(p.shape), p.dtype, p.device) for p in params]

    def _ptrs(self, params: list[torch.Tensor]) -> list[int]:
        if self.sharded:
            return [_dist.local(p).data_ptr() for p in params]
        return list(map(torch.Tensor.data_ptr, params))

    def same_list(self, params: list[torch.Tensor]) -> bool:
        return len(params) == len(self.params) and all(map(operator.is_, params, self.params))

    def same(self, params: list[torch.Tensor]) -> bool:
        """Whether nothing changed: the same storage in the same places (another list of tensors
        has other storage, or another length: :meth:`same_list` then tells which)."""
        return self._ptrs(params) == self.ptrs


class Optimizer(torch.optim.Optimizer):
    """A ``torch.optim.Optimizer`` that runs a grokxform transformation (see the module docs).

    ``Optimizer(params, tx, **hyperparameters)``:

    - ``params``: ``model.parameters()``, ``model.named_parameters()``, or a list of param group
      dicts (``{"params": [...], "lr": 1e-2}``; the params of a group may be ``(name, param)``
      pairs).
    - ``tx``: a factory (``grokxform.adamw``, ``grokxform.grokadamw``, any function returning a
      :class:`~grokxform.GradientTransformation`), whose arguments become the group
      hyperparameters, defaults from ``hyperparameters``; or a ready transformation, with
      ``lr`` (a multiplier of its updates, a finite number >= 0, default 1.0) as the only
      hyperparameter.
    - ``fused``: the engine (``None``, the default), ``False`` (eager ``tx.update``) or a
      :class:`~grokxform.fused.FusedStep` backend (see the module docs).
    - ``state_format``: ``None`` (the default: the state as the transformation makes it), or
      ``"bf16"``, ``"bf16_sr"``, ``"int8"``: the transformation wrapped in
      :func:`~grokxform.compress_state` with that format (its large state tensors stored
      compressed). The engine runs such a group in place, decoding and encoding the packed
      state in its kernels (``docs/memory.md``), MA windows as rings of compressed slots.
    - ``module``: the ``nn.Module`` the parameters belong to; unnamed parameters given here take
      their names from ``module.named_parameters()`` (for depth rules and masks that read paths).

    ``step(closure=None, **extra)``: ``u = tx.update(g, state, θ, **extra)``, ``θ ← θ + u`` for every
    parameter with a gradient; returns the closure's loss.

    Examples:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = gx.Optimizer(model.named_parameters(), gx.grokadamw, lr=1e-3)
        >>> sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-3, total_steps=10)
        >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
        >>> for _ in range(3):
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     opt.zero_grad()
        ...     loss.backward()
        ...     opt.step(train_loss=loss.detach(), val_loss=loss.detach())
        ...     sched.step()
    """

    def __init__(
        self,
        params: ParamsArg,
        tx: Union[GradientTransformation, Factory],
        *,
        fused: Union[bool, str, None] = None,
        state_format: str | None = None,
        module: torch.nn.Module | None = None,
        **hyperparameters: Any,
    ) -> None:
        if fused not in (None, False, True, "auto", "engine", "triton", "c", "foreach", "inductor", "aot_eager", "eager"):
            raise ValueError(
                "Optimizer: fused must be None (the fastest exact path: the engine), False (eager),"
                f" True or a FusedStep backend name, got {fused!r}"
            )
        if state_format is not None and state_format not in FORMATS:
            raise ValueError(
                f"Optimizer: state_format must be None or one of {', '.join(map(repr, FORMATS))}, got {state_format!r}"
            )
        self._fused = fused
        self._state_format = state_format
        self._fused_steps: dict[int, tuple[GradientTransformation, Any]] = {}
        self._eager_groups: set[int] = set()
        self._filled: dict[tuple[int, str], tuple[torch.Tensor, Any]] = {}
        self._slots_of: dict[int, tuple[Any, Any]] = {}  # (state, its windows as ring slots), per group
        self._bound: dict[int, _Bound] = {}
        self._checked: dict[int, dict[str, Any]] = {}  # the hyperparameter values last checked, per group
        self._extras_checked: dict[int, tuple[GradientTransformation, frozenset[str]]] = {}
        self._group_reductions = GroupReductions()
        self.engines: list[str | None] = []
        """What ran each param group's last step: ``"triton"`` or ``"c"`` (the engine's generated
        kernels), ``"foreach"`` (the engine's plan with in-place foreach ops), ``"inductor"``, ``"aot_eager"`` or
        ``"eager"`` (the traced fallbacks of :class:`~grokxform.fused.FusedStep`), or ``"tx.update"``
        (the eager, multi-tensor ``tx.update``); ``None`` before its first step."""
        self.fallback_reasons: list[str | None] = []
        """Under the default ``fused=None``: why a group runs ``"tx.update"`` (the engine cannot run
        its chain), or which members of its chain run their own ``update`` between engine steps."""
        if isinstance(tx, GradientTransformation):
            unknown = [k for k in hyperparameters if k != "lr"]
            if unknown:
                raise TypeError(
                    f"Optimizer: {unknown[0]!r} is not a hyperparameter of a ready GradientTransformation (its"
                    " hyperparameters are fixed inside it; only lr, a multiplier of its updates, is accepted)."
                    " Pass a factory to set hyperparameters: Optimizer(params, grokxform.adamw, weight_decay=...)"
                )
            lr = hyperparameters.get("lr", 1.0)
            H.check_multiplier(lr)
            self._hp: H.Hyperparameters = H.MULTIPLIER
            defaults: dict[str, Any] = {"lr": self._hp.coerce("lr", lr)}
            self._factory: Factory | None = None
            self._fixed_tx: GradientTransformation | None = self._compressed(tx)
            self.transform_name = "GradientTransformation"
        elif callable(tx) and not isinstance(tx, torch.Tensor):
            self._hp, defaults = H.read_factory(tx, hyperparameters)
            self._factory = tx
            self._fixed_tx = None
            self.transform_name = H.factory_name(tx)
            # Build once, so that bad hyperparameters fail here, named by the factory.
            inject_hyperparams(tx)(**defaults)
        else:
            raise TypeError(
                f"Optimizer: tx must be a GradientTransformation or a function returning one, got {type(tx).__name__}"
            )
        self._txs: list[GradientTransformation | None] = []
        self._built_args: list[dict[str, Any] | None] = []
        self._states: list[Any] = []
        self._names: list[list[str]] = []
        # The module's names for the unnamed params given here (not kept: groups added later name theirs).
        self._module_names = N.module_names(module)
        super().__init__(params, defaults)
        self._module_names = None

    # -- construction ------------------------------------------------------------------------

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group (see ``torch.optim.Optimizer.add_param_group``); its keys other than
        ``params`` must be hyperparameters of the transformation."""
        if not isinstance(param_group, dict):
            raise TypeError(f"Optimizer: a param group must be a dict, got {type(param_group).__name__}")
        g = len(self.param_groups)
        for key in param_group:
            if key in ("params", "param_names") or key in self._hp.names:
                continue
            if self._factory is None:
                raise ValueError(
                    f"Optimizer: param group {g} sets {key!r}, but a ready GradientTransformation takes no group"
                    " hyperparameter other than lr (a multiplier of its updates); pass a factory to set others:"
                    " Optimizer(params, grokxform.adamw, ...)"
                )
            raise ValueError(
                f"Optimizer: param group {g} sets {key!r}, which is not an argument of {self.transform_name}"
                f" (its hyperparameters: {list(self._hp.names)})"
            )
        for key in self._hp.names:
            if key in param_group:
                param_group[key] = self._hp.coerce(key, param_group[key])
        if self._factory is None and "lr" in param_group:
            H.check_multiplier(param_group["lr"])
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            before = list(zip(self._names, (x["params"] for x in self.param_groups[:-1])))
            names = N.group_names(group, g, before, self._module_names)
            for n, p in zip(names, group["params"]):
                if p.is_sparse or p.is_complex():
                    kind = "sparse" if p.is_sparse else "complex"
                    raise TypeError(f"Optimizer: parameter {n!r} is {kind}, which is not supported")
            N.check_distinct(group["params"], names, g, before)
            tx, args = None, None
            if self._factory is not None:  # build now: bad group hyperparameters fail here, by name
                args = self._hp.of(group)
                tx = self._compressed(inject_hyperparams(self._factory)(**args))
                self._checked[g] = H.numbers(args)
        except Exception:
            self.param_groups.pop()
            raise
        self._names.append(names)
        self._txs.append(tx)
        self._built_args.append(args)
        self._states.append(None)
        self._bound[g] = _Bound(group["params"])
        self.engines.append(None)
        self.fallback_reasons.append(None)

    def _compressed(self, tx: GradientTransformation) -> GradientTransformation:
        """``tx``, with its state compressed under ``state_format``."""
        return tx if self._state_format is None else compress_state(tx, self._state_format)  # type: ignore[arg-type]

    # -- the step ------------------------------------------------------------------------------

    def _transform(self, g: int, group: dict[str, Any], state: Any) -> GradientTransformation:
        """The group's transformation, (re)built from the group's hyperparameters when a fixed one
        changed (or at the group's first step). Injected float values flow through the state; a
        number edited in the group since it was last checked is checked by the factory first (its
        own message, the step refused), outside ``torch.compile`` (which traces them)."""
        if self._factory is None:
            assert self._fixed_tx is not None
            return self._fixed_tx
        args = self._hp.of(group)
        if not torch.compiler.is_compiling():
            numbers = H.numbers(args)
            if numbers != self._checked.get(g):
                try:
                    self._factory(**args)
                except (TypeError, ValueError) as e:
                    raise type(e)(f"Optimizer: param group {g}: {e}") from None
                self._checked[g] = numbers
        built, tx = self._built_args[g], self._txs[g]
        if tx is not None and built is not None:
            injected = set(getattr(state, "hyperparams", {})) if state is not None else set()
            if H.still_serves(args, built, injected):
                return tx
        tx = self._compressed(inject_hyperparams(self._factory)(**args))
        self._txs[g], self._built_args[g] = tx, args
        return tx

    def _fill_hyperparams(self, g: int, group: dict[str, Any], state: Any) -> None:
        """Write the group's current values into the state's hyperparameter tensors (in place)."""
        for name, slot in getattr(state, "hyperparams", {}).items():
            if name not in group:
                continue
            value = group[name]
            if callable(value) and not isinstance(value, torch.Tensor):
                continue  # a schedule of the step: evaluated by the transformation itself
            if not isinstance(value, torch.Tensor) and not C.is_number(value):
                raise TypeError(
                    f"Optimizer: param group {g} has {name}={value!r}; a float hyperparameter must stay a number"
                )
            self._fill(g, name, slot, value)

    def _fill(self, g: int, name: str, slot: torch.Tensor, value: Any) -> None:
        """``slot ← value``, skipped when a number has not changed since it was written there (a
        fill is a device launch). Inside ``torch.compile`` the value is written each step, with a
        foreach copy (a traced ``copy_``/``fill_`` into a 0-d float64 CPU tensor is lost on
        torch 2.13)."""
        if torch.compiler.is_compiling():
            if isinstance(value, torch.Tensor):
                src = value.detach().reshape(slot.shape).to(slot.dtype)
            else:  # (added, not wrapped: a number that changes is then a graph input, not a constant)
                src = torch.zeros_like(slot) + value
            torch._foreach_copy_([slot], [src])
            return
        if isinstance(value, torch.Tensor):
            if value is not slot:
                slot.copy_(value.detach().reshape(slot.shape))
            return
        last = self._filled.get((g, name))
        if last is None or last[0] is not slot or last[1] != value:
            slot.fill_(float(value))
            self._filled[(g, name)] = (slot, value)

    def _init_group(self, group: dict[str, Any], g: int) -> None:
        """Group ``g``'s parameters checked against those its state was built for, and its state
        made at its first step (in the fused layout: MA windows as ring buffers). Under
        ``torch.compile`` Dynamo runs this method as it is, outside the graph (as it does
        torch.optim's ``_init_group``), so the state is never made inside a graph."""
        params = group["params"]
        if not self._bound[g].same(params):
            self._rebind(g, group)
        if self._states[g] is not None or all(p.grad is None for p in params):
            return
        tx = self._transform(g, group, None)
        tree = {n: _dist.local(p.detach()) for n, p in zip(self._names[g], params)}
        with torch.no_grad():
            self._states[g] = init_state(tx, tree)
        self._bound[g] = _Bound(params)
        self._refresh_state_views(g)

    def _refresh_state_views(self, g: int) -> None:
        """``self.state[p]``: the state tensors of each parameter of group ``g`` (each MA window
        slot under its slot number, ``"grokfast.window.3"``), refreshed when the group's state is
        made, converted or loaded; the tensors are the live ones."""
        if self._states[g] is None:
            return
        views = S.per_param_views(self._ring_slots(g), self._names[g])
        for n, p in zip(self._names[g], self.param_groups[g]["params"]):
            self.state[p] = views[n]

    def _rebind(self, g: int, group: dict[str, Any]) -> None:
        """``group["params"]`` differs from what group ``g``'s state was built for. The same
        tensors with new storage (``p.data = ...``, ``model.double()``, ``.to(...)``) are followed:
        the state is cast and moved to what ``init`` gives for the new tensors, keeping its values,
        and the step is built anew. Another list, or a new shape, raises naming the parameter."""
        bound, params, names = self._bound[g], group["params"], self._names[g]
        if not bound.same_list(params):
            if len(params) != len(bound.params):
                what = f"it has {len(params)} parameters, {len(bound.params)} when it was built"
            else:
                k = next(i for i, (a, b) in enumerate(zip(params, bound.params)) if a is not b)
                what = f"its parameter {k} ({names[k]!r}) is another tensor"
            raise ValueError(
                f"Optimizer: the 'params' list of param group {g} was edited ({what}); add parameters with"
                " add_param_group(), or build a new Optimizer (load_state_dict() carries the state over)"
            )
        for n, p, (shape, dtype, device) in zip(names, params, bound.meta):
            if tuple(p.shape) != shape:
                raise ValueError(
                    f"Optimizer: parameter {n!r} of param group {g} changed shape from {shape} to {tuple(p.shape)};"
                    " its optimizer state is for the old shape. Build a new Optimizer for the new shapes"
                )
        state = self._states[g]
        if state is not None and any((p.dtype, p.device) != (m[1], m[2]) for p, m in zip(params, bound.meta)):
            tx = self._transform(g, group, state)
            tree = {n: _dist.local(p.detach()) for n, p in zip(names, params)}
            with torch.no_grad():
                template = to_eager_layout(init_state(tx, tree), ring_order=True)
                entries = S.param_entries(to_eager_layout(state, ring_order=True), names)
                state = S.from_param_entries(entries, template, names, f"param group {g}", cast=True)
                self._states[g] = to_fused_layout(state, ring_order=True)
            self._refresh_state_views(g)
        self._fused_steps.pop(g, None)
        self._bound[g] = _Bound(params)

    def _step_group(self, g: int, group: dict[str, Any], extra: dict[str, Any]) -> None:
        params = group["params"]
        grads = [p.grad for p in params]
        if all(x is None for x in grads):
            return
        for n, x in zip(self._names[g], grads):
            if x is not None and x.is_sparse:
                raise TypeError(f"Optimizer: the gradient of {n!r} is sparse, which is not supported")
        state = self._states[g]
        tx = self._transform(g, group, state)
        compiling = torch.compiler.is_compiling()  # under torch.compile: tx.update, traced by it
        backend = None if g in self._eager_groups or compiling else self._backend(g, params)
        if backend is not None:
            built = self._fused_steps.get(g)
            if built is None or built[0] is not tx:  # first step, a loaded state, or a rebuilt transform
                built = self._build_fused(g, tx, backend)
            try:
                self._fused_step(g, built[1], grads, extra)
                return
            except _EngineUnavailable as e:  # the default path: this chain runs eagerly
                if self._fused is not None:
                    raise
                self._leave_engine(g, str(e))
        self._eager_step(g, group, tx, grads, extra)

    def _ring_slots(self, g: int) -> Any:
        """Group ``g``'s state with its MA windows as the ring's slots in slot order (views, made
        once per state; DTensors for sharded parameters): what checkpoints and ``self.state``
        hold, and what the eager step writes into."""
        return self._owned(g).state

    def _owned(self, g: int) -> Owned:
        """:meth:`_ring_slots` as the eager step writes into it (kept per state)."""
        state = self._states[g]
        cached = self._slots_of.get(g)
        if cached is None or cached[0] is not state:
            slots = _dist.shard_like(to_eager_layout(state, ring_order=True), self._shard_specs(g))
            cached = self._slots_of[g] = (state, Owned(slots))
        return cached[1]

    def _eager_step(
        self, g: int, group: dict[str, Any], tx: GradientTransformation, grads: list[Any], extra: dict[str, Any],
    ) -> None:
        """``tx.update`` on the group's state, written back into it in place (so every engine
        updates the same tensors). Under ``torch.compile`` the state goes in as it is (windows as
        ring buffers: nothing is read on the host); otherwise the windows are read oldest first,
        and a rotation writes one slot."""
        names, params = self._names[g], group["params"]
        tree = {n: p.detach() for n, p in zip(names, params)}
        state = self._states[g]
        self._fill_hyperparams(g, group, state)
        if torch.compiler.is_compiling():
            owned = Owned(_dist.shard_like(state, self._shard_specs(g)))
        else:
            owned = self._owned(g)
        current = oldest_first(owned.state) if owned.windows and not torch.compiler.is_compiling() else owned.state
        grads = [None if x is None else x.detach() for x in grads]
        grad_tree = dict(zip(names, grads))
        if self._fused is False and not torch.compiler.is_compiling():  # op by op, torch's own ops
            with kernels(False):
                updates, new_state = tx.update(grad_tree, current, tree, **extra)
        else:
            updates, new_state = tx.update(grad_tree, current, tree, **extra)
        if not isinstance(updates, dict) or list(updates) != names:
            raise ValueError(
                f"Optimizer: the transformation of param group {g} returned updates that are not a dict"
                " over its parameters"
            )
        scale = group["lr"] if self._factory is None else 1.0
        if self._factory is None and not torch.compiler.is_compiling():
            H.check_multiplier(scale)
        if isinstance(scale, torch.Tensor) or scale != 1.0:  # the multiplier, rounded to the updates' dtype
            scale = scale.detach() if isinstance(scale, torch.Tensor) else torch.tensor(float(scale), dtype=torch.float64)
        for n, p in zip(names, params):
            u = updates[n]
            if u is None:
                continue
            if isinstance(scale, torch.Tensor):
                u = u * scale.to(device=u.device, dtype=u.dtype)
            p.add_(u.to(p.dtype))
        write_back(owned, new_state)
        self.engines[g] = "tx.update"

    def _backend(self, g: int, params: list[torch.Tensor]) -> str | None:
        """The :class:`~grokxform.fused.FusedStep` backend of group ``g`` (``None``: eager)."""
        if self._fused is False:
            return None
        if self._fused is None:  # the engine: its kernels (Triton on CUDA, C on the CPU), else its foreach backend
            return "engine" if len({p.device for p in params}) == 1 else None
        return "auto" if self._fused is True else str(self._fused)

    def _build_fused(self, g: int, tx: GradientTransformation, backend: str) -> tuple[Any, Any]:
        """Group ``g``'s :class:`~grokxform.fused.FusedStep` over its state, whose tensors it
        updates in place (a ready transformation runs with its lr multiplier as a last member)."""
        tree = {n: p.detach() for n, p in zip(self._names[g], self.param_groups[g]["params"])}
        run, adopted = tx, self._states[g]
        if self._factory is None:  # the multiplier lives in the state, where a compiled step reads it
            mult = inject_hyperparams(_multiplier)(lr=1.0)
            run = chain(tx, mult)
            adopted = (adopted, mult.init(tree))
        built = (tx, FusedStep(run, tree, adopted, backend=backend, check_params=False))  # type: ignore[arg-type]
        self._fused_steps[g] = built
        return built

    def _fused_step(self, g: int, fs: Any, grads: list[Any], extra: dict[str, Any]) -> None:
        """Group ``g``'s step through its :class:`~grokxform.fused.FusedStep`: params and state are
        updated in place; the hyperparameter tensors it reads are the ones :meth:`_fill_hyperparams`
        fills, so a scheduler changes the lr without a new graph."""
        group = self.param_groups[g]
        if self._factory is None:
            H.check_multiplier(group["lr"])
            self._fill(g, "lr", fs.state[1].hyperparams["lr"], group["lr"])
        else:
            self._fill_hyperparams(g, group, self._states[g])
        fs.step_leaves(grads, extra)
        self.engines[g] = fs.engine
        if self._fused is None:  # a chain in parts ("c+tx.update+c"): which members run their own update
            self.fallback_reasons[g] = fs.fallback_reason

    def _leave_engine(self, g: int, reason: str) -> None:
        """Run group ``g`` eagerly from now on (the engine cannot run its chain); its state stays
        where it is."""
        self._fused_steps.pop(g, None)
        self._eager_groups.add(g)
        self.fallback_reasons[g] = reason

    def _live_state(self, g: int) -> Any:
        """Group ``g``'s state in the eager layout (its tensors the live ones; MA windows given
        oldest first, as views of the ring slots)."""
        state = self._states[g]
        if state is None:
            return None
        return _dist.shard_like(to_eager_layout(state), self._shard_specs(g))

    def _shard_specs(self, g: int) -> dict[str, Any]:
        """The layout of each parameter of group ``g`` (``None`` for a plain tensor)."""
        return {n: _dist.shard_of(p) for n, p in zip(self._names[g], self.param_groups[g]["params"])}

    @property
    def tx_states(self) -> list[Any]:
        """The state of each param group's transformation (``None`` before the group's first step), in
        the eager layout: ``tx.update`` takes it. Its tensors are the live ones, updated in place by
        each step; MA windows are views of the ring slots, oldest first as of the last step."""
        return [self._live_state(g) for g in range(len(self.param_groups))]

    def step(self, closure: Callable[[], Any] | None = None, **extra: Any) -> Any:  # type: ignore[override]
        """One update of every param group; ``extra`` (``train_loss=``, ``val_loss=``,
        ``grokking_signal=``...) reaches ``tx.update``: a name that no transform of the chain reads
        raises ``TypeError``. Returns ``closure()``'s value, if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            for g, group in enumerate(self.param_groups):
                self._init_group(group, g)
            if extra:
                self._check_extra(extra)
            extra = self._whole_gradient(extra)
            for g, group in enumerate(self.param_groups):
                self._step_group(g, group, extra)
        return loss

    def _check_extra(self, extra: dict[str, Any]) -> None:
        """A step argument that no transform of a group's chain reads is refused, naming the
        closest one it reads; the grokking signal's inputs are checked on every path alike
        (:func:`grokxform.signals.signal_input`), read or not."""
        for name in SIGNAL_INPUTS:
            signal_input(f"{name}=", extra.get(name))
        names = frozenset(extra)
        for g, group in enumerate(self.param_groups):
            tx = self._transform(g, group, self._states[g])
            if self._extras_checked.get(g) == (tx, names):
                continue  # (a walk of the declaration builds the injected transform: once per transform)
            D.check_extra_args(D.declaration_of(tx), list(extra), f"Optimizer.step ({self.transform_name})")
            self._extras_checked[g] = (tx, names)

    def _whole_gradient(self, extra: dict[str, Any]) -> dict[str, Any]:
        """``extra`` with the values of the whole gradient that the tree reductions of the param
        groups read (the global clip norm, ``apply_if_finite``'s check), when several groups step:
        a reduction spans all of them, as one ``clip_grad_norm_(parameters)`` does
        (:class:`grokxform._group_reductions.GroupReductions`)."""
        stepping = [g for g, group in enumerate(self.param_groups) if any(p.grad is not None for p in group["params"])]
        if len(stepping) < 2:
            return extra
        transforms = ((g, self._transform(g, self.param_groups[g], self._states[g])) for g in stepping)
        grads = [p.grad for g in stepping for p in self.param_groups[g]["params"]]
        whole = self._group_reductions.whole_gradient(transforms, grads, self.transform_name)
        return {**whole, **extra} if whole else extra

    def metrics(self, *, floats: bool = False) -> dict[str, Any]:
        """:func:`grokxform.metrics.metrics` of every initialised group state (keys prefixed with
        ``group{g}/`` when there are several groups)."""
        out: dict[str, Any] = {}
        several = len(self.param_groups) > 1
        for g, state in enumerate(self.tx_states):
            if state is not None:
                out.update(_metrics(state, prefix=f"group{g}/" if several else "", floats=floats))
        return out

    # -- checkpoints ---------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:  # type: ignore[override]
        """torch.optim's layout: ``{"state": {index: {path: tensor...}}, "param_groups": [...]}``,
        which ``torch.distributed.checkpoint`` (``get_optimizer_state_dict``, ``dcp.save``) reads.
        Each parameter's entry holds its state tensors (``"inner_state.adam.mu"``...) and the
        group-wide leaves (``"group.count"``, hyperparameters...); an MA window is given as the
        slots of its ring buffer (``"...window.k"``, slot k; the oldest is slot ``count % w``).

        Every tensor is the optimizer's own, live, on every engine, as torch.optim's are: later
        steps update them in place, counts and hyperparameters included, so the dict is always
        the state of one step, the last (``copy.deepcopy`` it to keep a snapshot). Plain
        containers only (``torch.load(weights_only=True)`` reads it); DTensor state stays
        sharded. Group values that a checkpoint cannot hold (functions, masks) are left out;
        loading keeps the current ones."""
        for pre_hook in self._optimizer_state_dict_pre_hooks.values():
            pre_hook(self)
        sd = K.state_dict(
            [
                (group, self._names[g], None if self._states[g] is None else self._ring_slots(g))
                for g, group in enumerate(self.param_groups)
            ],
            self.transform_name,
        )
        for post_hook in self._optimizer_state_dict_post_hooks.values():
            result = post_hook(self, sd)
            if result is not None:
                sd = result
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:  # type: ignore[override]
        """Restore a :meth:`state_dict` (or one that ``torch.distributed.checkpoint`` rebuilt: the
        state keyed by parameter names, resharded for this process). Everything is checked first; on
        a mismatch (another model, another transform) a ``ValueError`` names it and the optimizer
        is left as it was."""
        sd = state_dict
        for pre_hook in self._optimizer_load_state_dict_pre_hooks.values():
            result = pre_hook(self, sd)
            if result is not None:
                sd = result
        version = K.check(sd, self.transform_name, [(n, x["params"]) for n, x in zip(self._names, self.param_groups)])
        staged = []
        for g, group in enumerate(self.param_groups):
            values = K.group_values(sd["param_groups"][g])
            saved = K.saved_state(sd, version, g, self._names[g])
            tx, state, args = None, None, None
            if saved is not None:
                if self._factory is None:
                    tx = self._fixed_tx
                else:
                    args = self._hp.of({**group, **values})
                    try:
                        tx = self._compressed(inject_hyperparams(self._factory)(**args))
                    except (TypeError, ValueError) as e:
                        raise type(e)(f"load_state_dict: param group {g}: {e}") from None
                assert tx is not None
                where = f"load_state_dict: param group {g}'s state"
                state = K.restore(saved, version, tx, group["params"], self._names[g], self._shard_specs(g), where)
            staged.append((values, tx, args, state))
        self._fused_steps.clear()  # a fused step owns the state it adopted: adopt the loaded one
        self._slots_of.clear()
        for g, (values, tx, args, state) in enumerate(staged):
            self.param_groups[g].update(values)
            self._txs[g], self._built_args[g], self._states[g] = tx, args, state
            self._bound[g] = _Bound(self.param_groups[g]["params"])
            if args is not None:
                self._checked[g] = H.numbers(args)
        self.state.clear()
        for g in range(len(self.param_groups)):
            self._refresh_state_views(g)
        for post_hook in self._optimizer_load_state_dict_post_hooks.values():
            post_hook(self)

    def __getstate__(self) -> dict[str, Any]:
        own = {k: v for k, v in self.__dict__.items() if k not in ("defaults", "state", "param_groups")}
        # fused steps and views are rebuilt on the next step, from the state
        own["_fused_steps"], own["_filled"], own["_slots_of"], own["_extras_checked"] = {}, {}, {}, {}
        return {**super().__getstate__(), **own}
