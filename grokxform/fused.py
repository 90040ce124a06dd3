"""The fast path: a whole chain of transforms as one in-place optimizer step.

:class:`FusedStep` (or :func:`compile_step`) takes any :class:`~grokxform.GradientTransformation`
and a tree of params, owns (or adopts) the state, and each call does, in place,

    updates, state' = tx.update(grads, state, params, **extra);   θ ← θ + updates;   state ← state'

with the numbers of the eager path. Two engines:

- **The engine** (``backend="auto"``, or ``"triton"`` / ``"c"``): every primitive declares its
  per-element rule and its per-step scalar rule (:mod:`grokxform.declarations`); the engine
  (:mod:`grokxform.engine`) composes the declarations of the chain, in its order, into generated
  multi-tensor kernels behind a small scalar prologue (Triton on CUDA, C built by the system's
  compiler on the CPU): one pass over memory, two when a reduction (the global clip) comes
  first. Any chain of declared transforms runs there, the standard pipelines and a user's own
  chains alike, compiled in well under a second on the CPU and in seconds on CUDA.
- **Inductor** (a transform the engine cannot run, tensors the kernels do not take, or
  ``backend="inductor"``): the pure step traced with ``make_fx`` and compiled
  (:mod:`grokxform.engine.traced`).

A chain (``chain``, ``named_chain``, nested or not) with members that have no declaration runs in
parts: each run of declared members as an engine step, each other member by its own ``update`` in
between, its state written back in place (:attr:`FusedStep.engine`: ``"c+tx.update+c"``).

On CUDA the step is captured into a CUDA graph after a warm-up call and replayed: one launch per
step. Nothing is specialised on a hyperparameter value: learning rates (schedules of the step
count or ``inject_hyperparams`` tensors) and the grokking signal (``train_loss=``, ``val_loss=``,
``grokking_signal=``) are tensors, so the step is built once per pattern of ``None`` gradients and
set of extra arguments (:attr:`FusedStep.compiles`).

State layout: the same tree as ``tx.init`` gives, except that each :class:`~grokxform.MaFilterState`
window (a tuple of w trees in the eager path) becomes a
:class:`~grokxform.declarations.RingWindow`, one ``[w, *shape]`` buffer per leaf whose slot
``count % w`` is overwritten each step. :meth:`FusedStep.eager_state` gives the eager layout back.
Design notes and measurements: ``docs/fast_path.md``.

Example::

    params = dict(model.named_parameters())
    step = compile_step(grokadamw(lr=warmup_cosine_decay(1e-3, 100, 10_000)), params)
    for batch in data:
        loss = loss_fn(model, batch); loss.backward()
        step({n: p.grad for n, p in params.items()}, train_loss=loss.detach(), val_loss=val_loss)
"""

from __future__ import annotations

import operator
import time
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any, Literal, Union

import torch

from grokxform import declarations as _decl
from grokxform import distributed as _dist
from grokxform import engine
from grokxform import tree as _tree
from grokxform.base import GradientTransformation, Params, State, Updates
from grokxform.engine import traced as _traced
from grokxform.engine.layout import Owned, init_state, to_eager_layout, to_fused_layout, write_back
from grokxform.engine.extras import stage_extras
from grokxform.engine.traced import DEFAULT_INDUCTOR_OPTIONS

Backend = Literal["auto", "engine", "triton", "c", "foreach", "inductor", "aot_eager", "eager"]
CudaGraphMode = Union[bool, Literal["auto"]]

_BACKENDS = ("auto", "engine", "triton", "c", "foreach", "inductor", "aot_eager", "eager")
_ENGINE_BACKENDS = ("auto", "engine", "triton", "c", "foreach")

STEP_CACHE_SIZE = 16
"""How many built steps (one per pattern of ``None`` gradients and set of extra arguments) a
:class:`FusedStep` keeps; the least recently used one is dropped (with its CUDA graph) to make
room for another, which is built again if its pattern comes back."""

_shape = operator.attrgetter("shape")
_dtype = operator.attrgetter("dtype")
_device = operator.attrgetter("device")

__all__ = [
    "DEFAULT_INDUCTOR_OPTIONS",
    "EngineUnavailable",
    "FusedStep",
    "compile_step",
    "init_state",
    "to_eager_layout",
    "to_fused_layout",
]


class EngineUnavailable(ValueError):
    """``backend="triton"``: the engine cannot run this chain or these tensors (the message says
    why: a member without a declaration, a dtype the kernels do not take...)."""


class _EngineFn:
    """An :class:`~grokxform.engine.EngineStep` behind the step's calling convention."""

    def __init__(self, step: Any, names: tuple[str, ...]) -> None:
        self.step, self.names = step, names
        self.capturable = step.backend == "triton"  # the foreach backend reads flags on the host
        self.grads: list[tuple[Any, ...]] = []  # the gradients built for: shape, dtype, device, stride

    def prepare(self, grads: list[torch.Tensor]) -> None:
        self.step.prepare(grads)

    def launch_flags(self) -> tuple[bool, ...]:
        return self.step.launch_flags()

    def __call__(self, grads: list[torch.Tensor], extras: list[torch.Tensor]) -> None:
        self.step(dict(zip(self.names, extras)))


class _SegmentedFn:
    """A chain the engine runs in parts: each run of declared members as an engine step (its
    update written to a buffer, the last run's added to the params), each member without a
    declaration by its own ``update`` in between, its state written back in place."""

    capturable = False  # a member's own update runs Python each step

    def __init__(self, parts: list[Any], names: tuple[str, ...], params: Any, p_leaves: list[Any]) -> None:
        self.parts, self.names, self.params, self.p_leaves = parts, names, params, p_leaves
        self.grads: list[tuple[Any, ...]] = []  # the gradients built for: shape, dtype, device, stride

    def prepare(self, grads: list[torch.Tensor]) -> None:
        del grads  # each engine part is pointed at its input when it runs

    def __call__(self, grads: list[torch.Tensor], extras: list[torch.Tensor]) -> None:
        extra = dict(zip(self.names, extras))
        mask = self.parts[0].mask
        xs = grads
        for part in self.parts:
            xs = part(xs, extra, self.params)
        if isinstance(self.parts[-1], _OwnUpdate):  # the last member's own update: θ ← θ + u
            params = [p for p, m in zip(self.p_leaves, mask) if m]
            for p, u in zip(params, xs):
                p.add_(u.to(p.dtype))


class _EnginePart:
    """A run of declared members of a segmented chain, as one engine step."""

    def __init__(self, step: Any, mask: tuple[bool, ...]) -> None:
        self.step, self.mask = step, mask

    def __call__(self, xs: list[torch.Tensor], extra: dict[str, Any], params: Any) -> list[torch.Tensor]:
        self.step.prepare(xs)
        self.step(extra)
        return [self.step.updates[i] for i in self.step.plan.leaves] if self.step.output == "updates" else []


class _OwnUpdate:
    """A member without a declaration of a segmented chain: its own ``update``, its new state
    written back into the step's state in place."""

    def __init__(self, tx: GradientTransformation, owned: Any, where: str, mask: tuple[bool, ...], spec: Any) -> None:
        self.tx, self.owned, self.where, self.mask, self.spec = tx, owned, where, mask, spec

    def __call__(self, xs: list[torch.Tensor], extra: dict[str, Any], params: Any) -> list[torch.Tensor]:
        it = iter(xs)
        tree = _tree.unflatten([next(it) if m else None for m in self.mask], self.spec)
        updates, state = self.tx.update(tree, self.owned.state, params, **extra)
        write_back(self.owned, state)
        leaves = _tree.flatten(updates)[0]
        out = [u for u, m in zip(leaves, self.mask) if m]
        if len(leaves) != len(self.mask) or any(u is None for u in out):
            raise ValueError(f"FusedStep: {self.where} returned no update for a leaf that has a gradient")
        # (the engine's next part reads each update through its address: a view such as a
        # transposed matrix is laid out as its param first)
        return [u if u.is_contiguous() else u.contiguous() for u in out]


def _chain_members(decl: Any, tx: Any, path: tuple[Any, ...] = ()) -> list[tuple[tuple[Any, ...], Any, Any]]:
    """The members of a chain (nested chains flattened) in order: (their keys in the state, their
    declaration or ``None``, the transform)."""
    if isinstance(decl, _decl.Sequence) and decl.transforms:
        return [m for key, d, t in zip(decl.keys, decl.members, decl.transforms)
                for m in _chain_members(d, t, (*path, key))]
    return [(path, decl, tx)]


def _state_at(state: Any, path: tuple[Any, ...]) -> Any:
    for key in path:
        state = state[key]
    return state


def _member_name(path: tuple[Any, ...]) -> str:
    return "member " + "".join(f"[{k!r}]" for k in path)


class _TracedFn:
    """A compiled traced step behind the same calling convention."""

    def __init__(self, fn: Any, args: Any, capturable: bool) -> None:
        self.fn, self.args = fn, args
        self.capturable = capturable
        self.grads: list[tuple[Any, ...]] = []  # the gradients built for: shape, dtype, device, stride

    def prepare(self, grads: list[torch.Tensor]) -> None:
        del grads

    def __call__(self, grads: list[torch.Tensor], extras: list[torch.Tensor]) -> None:
        self.fn(*self.args(grads, extras))


def _launch_flags(fn: Any) -> tuple[bool, ...]:
    """The engine kernels' ``ALIGNED`` flags of ``fn`` as it would launch now (a traced step: none)."""
    return fn.launch_flags() if isinstance(fn, _EngineFn) else ()


class _Captured:
    """A CUDA graph of one step, with the gradient tensors it read (traced steps read them in
    place; engine steps read them through their address tables) and the engine kernels'
    ``ALIGNED`` flags it launches (:meth:`~grokxform.engine.EngineStep.launch_flags`)."""

    def __init__(self, graph: torch.cuda.CUDAGraph, grads: list[torch.Tensor], engine: bool,
                 flags: tuple[bool, ...] = ()) -> None:
        self.graph, self.grads, self.engine, self.flags = graph, grads, engine, flags


class FusedStep:
    """An in-place optimizer step for the chain ``tx`` over the tree ``params``.

    ``step(grads, **extra)`` updates the params (in place) and the state it owns by the rule of
    ``tx``: ``u, s' = tx.update(grads, s, params, **extra)``, ``θ ← θ + u``, ``s ← s'``.

    Args:
        tx: any gradient transformation (a pipeline, a chain of primitives, a user's own).
        params: the tree of parameters to update in place (``dict(model.named_parameters())``).
        state: a state of ``tx`` to adopt; its tensors are updated in place (the windows of
            ``ma_filter`` are copied once into the ring layout). ``None``: ``tx.init(params)``,
            built without allocating an eager window.
        backend: ``"auto"`` (default): the engine's generated kernels when every member of the
            chain is declared and every tensor is on one device (Triton's on CUDA, C on the CPU),
            else ``"inductor"`` (:attr:`fallback_reason` says why); ``"triton"``: the engine's
            Triton kernels or :class:`EngineUnavailable` saying why not (on the CPU they run in
            Triton's interpreter with ``TRITON_INTERPRET=1``); ``"c"``: the engine's C kernels
            (the CPU, with a C compiler: ``CC``, else ``cc``, ``gcc`` or ``clang``) or
            :class:`EngineUnavailable`; ``"foreach"``: the engine's plan run in place with
            ``torch._foreach_*`` ops (any device, no compile); ``"engine"``: the kernels where
            they run, else foreach (what ``grokxform.Optimizer`` uses by default);
            ``"inductor"``: the traced chain compiled by Inductor (any chain); ``"aot_eager"``
            (the same trace, run op by op: quick to build, for tests on the CPU) or ``"eager"``
            (the traced graph, uncompiled).
        cuda_graph: capture the step into a CUDA graph after ``warmup_steps`` calls and replay
            it (``"auto"``: when every tensor is on one CUDA device). An engine step reads each
            call's gradients where they are; a traced step copies gradients that are other
            tensors than those of the capturing call into them first.
        options: Inductor settings merged over :data:`DEFAULT_INDUCTOR_OPTIONS`.
        warmup_steps: uncaptured calls (per pattern) before the CUDA graph is captured.
        check_params: check at each call that every param still holds the memory, shape, dtype
            and device the step was built for (a few µs): a param whose storage was replaced
            (``p.data = ...``, ``model.double()``) with the same shape and device is followed (the
            step is built again; the state keeps its dtype); a new shape or device raises naming
            the param. ``False``: the caller checks them (``grokxform.Optimizer`` does).

    Each call also checks the gradients whenever one is another tensor than at the last call:
    another shape or device than its param raises naming the path; another dtype or other strides
    build the step again for it. Extra arguments that no transform of
    the chain reads raise ``TypeError`` (:func:`grokxform.declarations.check_extra_args`).

    Attributes:
        compiles: how many times a step was built (one per pattern of ``None`` gradients and set
            of extra arguments, kept for the :data:`STEP_CACHE_SIZE` most recent patterns; again
            after a param or gradient changed dtype or storage).
        captures: how many CUDA graphs were captured.
        compile_seconds: the wall time of each build (the engine's kernels are compiled by
            Triton at their first launch, which the first call's time includes).
        engine: what ran the last pattern built: ``"triton"``, ``"c"``, ``"foreach"`` (a chain in
            parts: its parts joined by ``+``, ``"c+tx.update+c"``), ``"inductor"``,
            ``"aot_eager"`` or ``"eager"``; ``fallback_reason`` says why ``"auto"`` did not use
            the engine, or which members of a chain in parts run their own ``update``.

    Entry point for other front ends (``grokxform.Optimizer``): build
    ``FusedStep(tx, params_tree, state_tree)``, call it with the gradient tree (or
    :meth:`step_leaves` with the flat leaves) and the extra arguments, and read the live state from
    :attr:`state` (MA windows in ring layout; :meth:`eager_state` for the eager layout).
    """

    def __init__(
        self,
        tx: GradientTransformation,
        params: Params,
        state: State | None = None,
        *,
        backend: Backend = "auto",
        cuda_graph: CudaGraphMode = "auto",
        options: Mapping[str, Any] | None = None,
        warmup_steps: int = 1,
        check_params: bool = True,
    ) -> None:
        if not isinstance(tx, GradientTransformation):
            raise TypeError(f"FusedStep: tx must be a GradientTransformation, got {type(tx).__name__}")
        if backend not in _BACKENDS:
            raise ValueError(f"FusedStep: backend must be one of {_BACKENDS}, got {backend!r}")
        if cuda_graph not in (True, False, "auto"):
            raise ValueError(f"FusedStep: cuda_graph must be True, False or 'auto', got {cuda_graph!r}")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 1:
            raise ValueError(f"FusedStep: warmup_steps must be an int >= 1, got {warmup_steps!r}")
        p_leaves, p_spec = _tree.flatten(params)
        self._given = list(p_leaves)  # the params as given (DTensors too): what each call checks
        names = _tree.path_names(params)
        for name, p in zip(names, p_leaves):
            if p is not None and not (isinstance(p, torch.Tensor) and p.is_floating_point()):
                got = str(p.dtype) if isinstance(p, torch.Tensor) else type(p).__name__
                raise TypeError(f"FusedStep: the param at path {name!r} must be a floating-point tensor, got {got}")
        tensors = [p for p in p_leaves if isinstance(p, torch.Tensor)]
        if not tensors:
            raise ValueError("FusedStep: params has no tensor leaf")
        # DTensor params (FSDP2, tensor parallel): the step runs on the local shards, its
        # reductions completed over the ranks (grokxform.distributed); the state is of shards.
        self._shards = [_dist.shard_of(p) for p in p_leaves]
        if any(s is not None for s in self._shards):
            if backend not in _ENGINE_BACKENDS:
                raise ValueError(f"FusedStep: DTensor params run on the engine, not on backend={backend!r}")
            _dist.check_meshes(self._shards, "FusedStep")
            p_leaves = [_dist.local(p) for p in p_leaves]
            params = _tree.unflatten(p_leaves, p_spec)
            state = None if state is None else _dist.unshard_tree(state)
        self._tx = tx
        self._params = params
        self._p_leaves, self._p_spec = p_leaves, p_spec
        with torch.no_grad():
            state = init_state(tx, params) if state is None else to_fused_layout(state)
        self._state = state
        self._s_leaves, self._s_spec = _tree.flatten(state)
        self._check_no_aliasing()
        devices = {t.device for t in tensors} | {
            t.device for t in self._s_leaves if isinstance(t, torch.Tensor) and t.numel() > 1
        }
        self._device = next(iter(devices))
        on_one_gpu = len(devices) == 1 and self._device.type == "cuda"
        if cuda_graph is True and not on_one_gpu:
            raise ValueError(f"FusedStep: cuda_graph=True needs every tensor on one CUDA device, got {sorted(map(str, devices))}")
        sharded = any(sh is not None for sh in self._shards)
        if cuda_graph is True and sharded:
            raise ValueError("FusedStep: cuda_graph=True is not supported with DTensor params (the step all-reduces)")
        self._cuda_graph = bool(cuda_graph) and on_one_gpu and backend != "eager" and not sharded
        self._backend = backend
        self._options = (
            _traced.inductor_options(options, _traced.has_ring(state)) if backend in ("auto", "inductor") else {}
        )
        self._default_options = options is None
        self._warmup = warmup_steps
        self._check_params = bool(check_params)
        self._p_ptrs = self._ptrs(self._given)
        self._p_meta = [(p.shape, p.device) if isinstance(p, torch.Tensor) else None for p in self._given]
        self._fns: OrderedDict[Any, Any] = OrderedDict()
        self._graphs: dict[Any, _Captured] = {}
        self._runs: dict[Any, int] = {}
        self._seen: dict[Any, list[int]] = {}  # per pattern: the gradients' memory at its last call
        self._extras: dict[str, torch.Tensor] = {}
        self.compiles = 0
        self.captures = 0
        self.compile_seconds: list[float] = []
        self.engine: str | None = None
        self.fallback_reason: str | None = None

    # -- public views -------------------------------------------------------------------------

    @property
    def state(self) -> State:
        """The live state (updated in place by each call), MA windows in the ring layout."""
        return self._state

    @property
    def params(self) -> Params:
        """The params tree this step updates in place."""
        return self._params

    @property
    def cached(self) -> int:
        """How many built steps are kept (at most :data:`STEP_CACHE_SIZE`)."""
        return len(self._fns)

    @property
    def uses_cuda_graph(self) -> bool:
        """Whether steps replay CUDA graphs (after the warm-up steps): on one GPU, unless
        ``cuda_graph=False``, the backend is ``"eager"``, or a step reads flags on the host (the
        engine's foreach backend; a traced step with an MA window, whose re-sum reads the counts)."""
        return self._cuda_graph and all(getattr(f, "capturable", True) for f in self._fns.values())

    def eager_state(self) -> State:
        """The state in the eager layout (``tx.update`` takes it); MA slots are views."""
        return to_eager_layout(self._state)

    # -- the step -----------------------------------------------------------------------------

    def __call__(self, grads: Updates, **extra: Any) -> None:
        g_leaves, g_spec = _tree.flatten(grads)
        if g_spec != self._p_spec:
            _tree.check_structure(grads, self._params, "params", "gradient")
            raise ValueError("FusedStep: the gradient tree does not match the params tree")
        self.step_leaves(g_leaves, extra)

    def step_leaves(self, g_leaves: list[Any], extra: Mapping[str, Any]) -> None:
        """The step with the gradients as the flat list of leaves of the params tree (``None``:
        no gradient), in tree order: what ``__call__`` does after flattening."""
        if self._check_params and self._ptrs(self._given) != self._p_ptrs:
            self._follow_params()
        g_leaves = [_dist.local(g) for g in g_leaves]
        mask = tuple(g is not None for g in g_leaves)
        present = [g for g in g_leaves if g is not None]
        xs = self._stage_extras(extra)
        key = (mask, tuple(xs))
        fn = self._fns.get(key)
        ptrs = [g.data_ptr() for g in present]
        if fn is not None and ptrs != self._seen[key]:
            if not self._grads_fit(fn, present):
                self._check_grads(g_leaves)  # raises for another shape or device
                self._drop(key)  # another dtype or layout: built again for it
                fn = None
            self._seen[key] = ptrs
        if fn is None:
            _decl.check_extra_args(_decl.declaration_of(self._tx), list(xs), "FusedStep")
            self._check_grads(g_leaves)
            fn = self._build(key, g_leaves, xs)
            fn.grads = [(g.shape, g.dtype, g.device, g.stride()) for g in present]
            self._seen[key] = ptrs
            while len(self._fns) > STEP_CACHE_SIZE:
                self._drop(next(iter(self._fns)))
        else:
            self._fns.move_to_end(key)
        cap = self._graphs.get(key)
        if cap is not None:
            self._stage_grads(cap, present, fn)
            if cap.flags == _launch_flags(fn):
                cap.graph.replay()
                return
            del self._graphs[key]  # a gradient's alignment changed the kernels to launch: captured again
        runs = self._runs.get(key, 0)
        if self._cuda_graph and runs >= self._warmup and getattr(fn, "capturable", True):
            self._check_grads(g_leaves)
            self._graphs[key] = cap = self._capture(fn, present, list(xs.values()))
            cap.graph.replay()
            return
        self._runs[key] = runs + 1
        fn.prepare(present)
        with torch.no_grad():
            fn(present, list(xs.values()))

    # -- internals ----------------------------------------------------------------------------

    @staticmethod
    def _ptrs(leaves: list[Any]) -> list[int]:
        return [_dist.local(p).data_ptr() if isinstance(p, torch.Tensor) else 0 for p in leaves]

    @staticmethod
    def _grads_fit(fn: Any, present: list[torch.Tensor]) -> bool:
        """Whether the gradients have the shapes, dtypes, devices and layout ``fn`` was built for."""
        built = fn.grads
        return (
            list(map(_shape, present)) == [b[0] for b in built]
            and list(map(_dtype, present)) == [b[1] for b in built]
            and list(map(_device, present)) == [b[2] for b in built]
            and list(map(torch.Tensor.stride, present)) == [b[3] for b in built]
        )

    def _drop(self, key: Any) -> None:
        """Forget the step built for ``key`` (and its CUDA graph)."""
        self._fns.pop(key, None)
        self._graphs.pop(key, None)
        self._runs.pop(key, None)
        self._seen.pop(key, None)

    def _follow_params(self) -> None:
        """A param's storage was replaced: the same shape and device are followed (every step is
        built again over the new tensors); anything else raises naming the param."""
        names = _tree.path_names(self._params)
        for name, p, meta in zip(names, self._given, self._p_meta):
            if meta is None:
                continue
            shape, device = meta
            if p.shape != shape or p.device != device:
                raise ValueError(
                    f"FusedStep: the param at path {name!r} is now {p.dtype}{list(p.shape)} on {p.device}; the step"
                    f" and its state were built for {list(shape)} on {device}. Build a new step for it (with the"
                    " state moved or reshaped as you mean it: FusedStep(tx, params, state))"
                )
            if not p.is_floating_point():
                raise TypeError(f"FusedStep: the param at path {name!r} must be a floating-point tensor, got {p.dtype}")
        self._p_leaves = [_dist.local(p) for p in self._given]
        self._params = _tree.unflatten(self._p_leaves, self._p_spec)
        self._check_no_aliasing()
        for key in list(self._fns):
            self._drop(key)
        self._p_ptrs = self._ptrs(self._given)

    def _build(self, key: Any, g_leaves: list[Any], xs: dict[str, torch.Tensor]) -> Any:
        mask, names = key
        t0 = time.perf_counter()
        if self._backend in _ENGINE_BACKENDS:
            fn = self._engine_step(g_leaves, names, xs)
            if fn is not None:
                self.compile_seconds.append(time.perf_counter() - t0)
                self.compiles += 1
                if isinstance(fn, _EngineFn):  # (a segmented chain names its parts: _segmented)
                    self.engine = fn.step.backend
                self._fns[key] = fn
                return fn
        backend = "inductor" if self._backend in _ENGINE_BACKENDS else self._backend
        self.engine = backend
        step, p_pos, s_pos = _traced.make_step(
            self._tx, self._p_leaves, self._p_spec, self._s_leaves, self._s_spec, mask, names
        )
        present = [g for g in g_leaves if g is not None]

        def args(grads: list[torch.Tensor], extras: list[torch.Tensor]) -> list[Any]:
            return [*(self._p_leaves[i] for i in p_pos), *grads, *(self._s_leaves[i] for i in s_pos), *extras]

        example = args(present, list(xs.values()))
        try:
            compiled = _traced.compile_traced(step, example, backend, self._options)
        except Exception as e:  # noqa: BLE001 - only the optional horizontal fusion is retried
            if not self._default_options or not self._options.get("combo_kernels"):
                raise
            warnings.warn(f"FusedStep: compiling with combo_kernels failed ({type(e).__name__}: {e}); retrying without")
            self._options = {**self._options, "combo_kernels": False}
            compiled = _traced.compile_traced(step, example, backend, self._options)
        self.compile_seconds.append(time.perf_counter() - t0)
        self.compiles += 1
        # An MA window's re-sum reads the step counts on the host when it runs (one operator of
        # the graph): inside a CUDA graph it could only compute every sum, each step.
        fn = self._fns[key] = _TracedFn(compiled, args, capturable=not _traced.has_ring(self._state))
        return fn

    def _engine_step(self, g_leaves: list[Any], names: tuple[str, ...], xs: dict[str, torch.Tensor]) -> Any:
        """The engine's step for this pattern, or ``None`` (``"auto"``: Inductor then).

        ``"triton"``: generated Triton kernels (CUDA, or Triton's interpreter on the CPU); ``"c"``:
        generated C kernels (the CPU); ``"foreach"``: the plan with in-place foreach ops;
        ``"engine"``: kernels where they can run, else foreach; ``"auto"``: kernels."""
        members = _chain_members(_decl.declaration_of(self._tx), self._tx)
        sharded = any(sh is not None for sh in self._shards)  # (a member's own update sees local shards)
        if not sharded and any(d is None for _, d, _ in members) and any(d is not None for _, d, _ in members):
            return self._segmented(members, g_leaves, names, xs)
        step = self._engine_build(self._kinds(), self._tx, self._state, g_leaves, xs)
        return _EngineFn(step, names) if step is not None else None

    def _kinds(self, parts: bool = False) -> list[str]:
        """The engine backends to try, in order (a chain in parts, ``parts``: under ``"auto"``
        the kernels, else foreach)."""
        cuda = self._device.type == "cuda"
        kernels = ["triton"] if cuda else ["c"]
        if self._backend in ("triton", "c", "foreach"):
            return [self._backend]
        return kernels if self._backend == "auto" and not parts else [*kernels, "foreach"]

    def _engine_build(self, kinds: list[str], tx: Any, state: Any, g_leaves: list[Any],
                      xs: dict[str, torch.Tensor], **kwargs: Any) -> Any:
        """The first :class:`~grokxform.engine.EngineStep` of ``kinds`` that can run, or ``None``
        (``"auto"``: :attr:`fallback_reason` says why); other backends raise
        :class:`EngineUnavailable`."""
        reasons = []
        for kind in kinds:
            try:
                if kind == "c" and self._device.type != "cpu":
                    raise engine.Unsupported(f"the C kernels run on the CPU, not on {self._device}")
                if kind == "triton" and not engine.available(self._device):
                    raise engine.Unsupported(f"Triton cannot run on {self._device} here")
                with torch.no_grad():
                    return engine.EngineStep(tx, self._params, state, g_leaves, xs, backend=kind,
                                             shards=self._shards, **kwargs)
            except engine.Unsupported as e:
                reasons.append(str(e))
        reason = "; ".join(dict.fromkeys(reasons))
        if self._backend != "auto":
            raise EngineUnavailable(f"FusedStep(backend={self._backend!r}): {reason}") from None
        self.fallback_reason = reason
        return None

    def _segmented(
        self, members: list[tuple[tuple[Any, ...], Any, Any]], g_leaves: list[Any], names: tuple[str, ...],
        xs: dict[str, torch.Tensor],
    ) -> Any:
        """A chain with members the engine cannot run: its runs of declared members as engine
        steps, the others by their own ``update`` (:class:`_SegmentedFn`), or ``None`` (``"auto"``:
        Inductor then) where a run cannot be built."""
        mask = tuple(g is not None for g in g_leaves)
        runs: list[list[tuple[tuple[Any, ...], Any, Any]]] = []
        for m in members:
            if m[1] is not None and runs and runs[-1][0][1] is not None:
                runs[-1].append(m)
            else:
                runs.append([m])
        parts: list[Any] = []
        reasons: list[str] = []
        for k, run in enumerate(runs):
            if run[0][1] is None:
                path, _, tx = run[0]
                sub = _state_at(self._state, path)
                parts.append(_OwnUpdate(tx, Owned(sub), _member_name(path), mask, self._p_spec))
                reasons.append(f"{_member_name(path)} has no declaration: it runs its own update")
                continue
            decl = _decl.Sequence(tuple(range(len(run))), tuple(d for _, d, _ in run), tuple(t for _, _, t in run))
            state = tuple(_state_at(self._state, path) for path, _, _ in run)
            step = self._engine_build(self._kinds(parts=True), None, state, g_leaves, xs, declaration=decl,
                                      output="params" if k == len(runs) - 1 else "updates")
            if step is None:
                return None
            parts.append(_EnginePart(step, mask))
        self.engine = "+".join("tx.update" if isinstance(p, _OwnUpdate) else p.step.backend for p in parts)
        self.fallback_reason = "; ".join(reasons)
        return _SegmentedFn(parts, names, self._params, self._p_leaves)

    def _capture(self, fn: Any, grads: list[torch.Tensor], extras: list[torch.Tensor]) -> _Captured:
        engine = isinstance(fn, _EngineFn)
        fn.prepare(grads)  # address tables are host-to-device copies: not inside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            fn(grads, extras)
        self.captures += 1
        return _Captured(graph, list(grads), engine, _launch_flags(fn))

    def _stage_grads(self, cap: _Captured, grads: list[torch.Tensor], fn: Any) -> None:
        if len(grads) != len(cap.grads):
            raise ValueError("FusedStep: the number of gradients changed for a captured step")
        if cap.engine:  # the kernels read the gradients through address tables: repoint them if needed
            fn.prepare(grads)
            return
        for static, g in zip(cap.grads, grads):
            if g is static:
                continue
            if g.shape != static.shape or g.dtype != static.dtype:
                raise ValueError(
                    f"FusedStep: a gradient of {g.dtype}{list(g.shape)} meets a captured step compiled for"
                    f" {static.dtype}{list(static.shape)}"
                )
            if g.data_ptr() != static.data_ptr():
                static.copy_(g)

    def _stage_extras(self, extra: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        """Each extra argument in a persistent device tensor (:func:`grokxform.engine.extras.stage_extras`)."""
        return stage_extras(self._extras, extra, self._device, "FusedStep")

    def _check_grads(self, g_leaves: list[Any]) -> None:
        names = None
        for i, (g, p) in enumerate(zip(g_leaves, self._p_leaves)):
            if g is None:
                continue
            bad = not isinstance(g, torch.Tensor) or not isinstance(p, torch.Tensor) or g.shape != p.shape
            if not bad and g.device != p.device:
                bad = True
            if bad:
                names = names or _tree.path_names(self._params)
                what = f"{g.dtype}{list(g.shape)} on {g.device}" if isinstance(g, torch.Tensor) else type(g).__name__
                raise ValueError(f"FusedStep: the gradient at path {names[i]!r} ({what}) does not match its param")

    def _check_no_aliasing(self) -> None:
        seen: dict[tuple[torch.device, int], str] = {}
        trees = (("param", self._params, self._p_leaves), ("state leaf", self._state, self._s_leaves))
        for what, tree, leaves in trees:
            names = _tree.path_names(tree)
            for name, t in zip(names, leaves):
                if not isinstance(t, torch.Tensor) or t.numel() == 0:
                    continue
                t = getattr(t, "_local_tensor", t)  # a DTensor: the memory of its local shard
                if t.numel() == 0:
                    continue
                key = (t.device, t.data_ptr())
                if key in seen:
                    raise ValueError(
                        f"FusedStep: the {what} at path {name!r} shares memory with {seen[key]}; the fused"
                        " path writes each tensor in place, so they must be distinct"
                    )
                seen[key] = f"the {what} at path {name!r}"


def compile_step(
    tx: GradientTransformation,
    params: Params,
    state: State | None = None,
    *,
    backend: Backend = "auto",
    cuda_graph: CudaGraphMode = "auto",
    options: Mapping[str, Any] | None = None,
) -> FusedStep:
    """``FusedStep(tx, params, state, ...)``: the in-place step of ``tx`` (see :class:`FusedStep`).

    Examples:
        >>> from grokxform.fused import compile_step
        >>> model = torch.nn.Linear(3, 1)
        >>> params = dict(model.named_parameters())
        >>> step = compile_step(gx.grokfast_ema(lr=1e-3), params)
        >>> model(torch.randn(8, 3)).pow(2).mean().backward()
        >>> before = model.weight.detach().clone()
        >>> step({n: p.grad for n, p in params.items()})           # θ updated in place
        >>> bool((model.weight != before).all())
        True
    """
    return FusedStep(tx, params, state, backend=backend, cuda_graph=cuda_graph, options=options)

