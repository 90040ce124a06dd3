"""The fast path: a whole chain of transforms compiled into one in-place optimizer step.

:class:`FusedStep` (or :func:`compile_step`) takes any :class:`~grokxform.GradientTransformation`
and a tree of params, owns (or adopts) the state, and each call does, in place,

    updates, state' = tx.update(grads, state, params, **extra);   θ ← θ + updates;   state ← state'

with the numbers of the eager path. Two engines:

- **Kernels** (``backend="auto"`` on CUDA, or ``"triton"``): the standard pipelines (``adamw``,
  ``grokfast_ema``, ``grokfast_ma``, ``grokadamw``) run as hand-written multi-tensor Triton kernels
  over address tables of the leaves, behind a small Inductor-compiled scalar prologue
  (:mod:`grokxform.kernels`): one pass over memory per step (two with a global clip), compiled
  in seconds.
- **Inductor** (any other chain, or ``backend="inductor"``), as follows.

1. **Trace** the pure step once with ``make_fx`` on fake tensors: the transforms' Python (trees,
   paths, masks, per-leaf constants) runs natively, only tensor operations are recorded. The
   traced function ends by copying the new params and state into the old tensors (``copy_``).
2. **Reshape** the graph: the ring-window write becomes an in-place ``index_put_`` (one slot, not
   a copy of the window), and the scalar work (bias corrections, schedules, α_t, slot indices,
   step counters) moves into a prologue graph, computed once instead of once per element.
3. **Compile** both graphs with Inductor (``torch._inductor.compile``): the chain becomes a few
   fused kernels per leaf, or a few multi-leaf kernels with ``combo_kernels``, that read the
   gradients once and write the params and state straight into their buffers.
4. On CUDA, **capture** the compiled step into a CUDA graph after a warm-up call and replay it:
   one launch per step, so launch-bound models run at the speed of their kernels.

No guards run at call time and nothing is specialised on a hyperparameter value: learning rates
(schedules of the step count or ``inject_hyperparams`` tensors) and the grokking signal
(``train_loss=``, ``val_loss=``, ``grokking_signal=``) are tensors, so the step is compiled once
per pattern of ``None`` gradients and set of extra arguments (:attr:`FusedStep.compiles`).

State layout: the same tree as ``tx.init`` gives, except that each :class:`~grokxform.MaFilterState`
window (a tuple of w trees in the eager path) becomes a :class:`~grokxform.transforms.filters.MaRingWindow`,
one ``[w, *shape]`` buffer per leaf whose slot ``count % w`` is overwritten each step, so the
compiled step writes one slot in place instead of rotating w tensors. :meth:`FusedStep.eager_state`
gives the eager layout back. Design notes and measurements: ``docs/fast_path.md``.

Example::

    params = dict(model.named_parameters())
    step = compile_step(grokadamw(lr=warmup_cosine_decay(1e-3, 100, 10_000)), params)
    for batch in data:
        loss = loss_fn(model, batch); loss.backward()
        step({n: p.grad for n, p in params.items()}, train_loss=loss.detach(), val_loss=val_loss)
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping
from typing import Any, Literal, Union

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._python_dispatch import TorchDispatchMode

from grokxform import tree as _tree
from grokxform.base import GradientTransformation, Params, State, Updates, apply_updates
from grokxform.transforms.filters import MaFilterState, MaRingWindow

Backend = Literal["auto", "triton", "inductor", "aot_eager", "eager"]
CudaGraphMode = Union[bool, Literal["auto"]]

DEFAULT_INDUCTOR_OPTIONS: dict[str, Any] = {
    # Horizontal fusion: independent per-leaf kernels (and the 0-d counter updates) share launches.
    "combo_kernels": True,
    # Round where the eager code rounds (bf16 params), so the fused step gives the eager numbers.
    "emulate_precision_casts": True,
}
"""Inductor settings used unless ``options=`` says otherwise (keys this torch lacks are skipped)."""

_BACKENDS = ("auto", "triton", "inductor", "aot_eager", "eager")


# --------------------------------------------------------------------------------------------
# State layout: lazy zeros at init, the ring window of ma_filter.


class _LazyZeros(TorchDispatchMode):
    """While active, zero-filled allocations of more than one element return a stride-0 view of
    a single zero (no memory). ``tx.init`` of a 100-slot window then costs nothing until the
    ring buffers are allocated, instead of holding the tuple layout and the ring at once."""

    def __init__(self) -> None:
        super().__init__()
        self.lazy: dict[int, torch.Tensor] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func in (aten.zeros_like.default, aten.new_zeros.default, aten.zeros.default):
            if func is aten.zeros.default:
                shape, ref = tuple(args[0]), None
            elif func is aten.new_zeros.default:
                shape, ref = tuple(args[1]), args[0]
            else:
                shape, ref = tuple(args[0].shape), args[0]
            dtype = kwargs.get("dtype") or (ref.dtype if ref is not None else torch.get_default_dtype())
            device = kwargs.get("device") or (ref.device if ref is not None else torch.device("cpu"))
            numel = 1
            for s in shape:
                numel *= int(s)
            if numel > 1:
                out = torch.zeros((), dtype=dtype, device=device).expand(shape)
                self.lazy[id(out)] = out
                return out
        return func(*args, **kwargs)


def _materialize(x: Any, lazy: dict[int, torch.Tensor]) -> Any:
    """A lazy zero becomes real zeros; any other broadcast (stride-0) tensor a real copy, since
    the fused step writes each state tensor in place."""
    if not isinstance(x, torch.Tensor):
        return x
    if id(x) in lazy:
        return torch.zeros(x.shape, dtype=x.dtype, device=x.device)
    if any(st == 0 and n > 1 for st, n in zip(x.stride(), x.shape)):
        return x.contiguous()
    return x


def _is_ma_state(x: Any) -> bool:
    return isinstance(x, MaFilterState) or x is None


def _ring_from_slots(slots: list[torch.Tensor], count: int, lazy: dict[int, torch.Tensor]) -> torch.Tensor:
    """One ``[w, *shape]`` buffer: slot ``(count + k) % w`` holds window slot k (k = 0 oldest)."""
    w, first = len(slots), slots[0]
    if all(id(s) in lazy for s in slots):
        return torch.zeros((w, *first.shape), dtype=first.dtype, device=first.device)
    ring = torch.empty((w, *first.shape), dtype=first.dtype, device=first.device)
    for k, s in enumerate(slots):
        ring[(count + k) % w].copy_(s)
    return ring


def _to_ring(st: MaFilterState, lazy: dict[int, torch.Tensor]) -> MaFilterState:
    if isinstance(st.window, MaRingWindow):
        return MaFilterState(*(_tree.tree_map(lambda x: _materialize(x, lazy), t) for t in st))
    if not isinstance(st.window, tuple) or not st.window:
        raise ValueError("FusedStep: an ma_filter state's window must be a non-empty tuple of trees")
    counts, spec = _tree.flatten(st.count)
    slot_leaves = [_tree.flatten(t)[0] for t in st.window]
    rings = []
    for i, c in enumerate(counts):
        if c is None:
            rings.append(None)
            continue
        rings.append(_ring_from_slots([s[i] for s in slot_leaves], int(c), lazy))
    count, total = (_tree.tree_map(lambda x: _materialize(x, lazy), t) for t in (st.count, st.total))
    return MaFilterState(count, MaRingWindow(_tree.unflatten(rings, spec)), total)


def _to_eager(st: MaFilterState) -> MaFilterState:
    if not isinstance(st.window, MaRingWindow):
        return st
    counts, spec = _tree.flatten(st.count)
    rings = _tree.flatten(st.window.buffers)[0]
    w = next((r.shape[0] for r in rings if r is not None), 0)
    slots = [
        [None if r is None else r[(int(c) + k) % w] for c, r in zip(counts, rings)] for k in range(w)
    ]
    return MaFilterState(st.count, tuple(_tree.unflatten(s, spec) for s in slots), st.total)


def to_fused_layout(state: State, *, _lazy: dict[int, torch.Tensor] | None = None) -> State:
    """``state`` with each :class:`MaFilterState` window in the ring layout (a copy of the
    windows; every other leaf is the same tensor). Numbers are unchanged."""
    lazy = _lazy or {}
    return torch.utils._pytree.tree_map(
        lambda x: _to_ring(x, lazy) if isinstance(x, MaFilterState) else _materialize(x, lazy),
        state,
        is_leaf=_is_ma_state,
    )


def to_eager_layout(state: State) -> State:
    """``state`` with each ring window back in the eager tuple-of-trees layout. The slots are
    views of the ring buffers (no copy): clone them to keep a snapshot."""
    return torch.utils._pytree.tree_map(
        lambda x: _to_eager(x) if isinstance(x, MaFilterState) else x, state, is_leaf=_is_ma_state
    )


def init_state(tx: GradientTransformation, params: Params) -> State:
    """``tx.init(params)`` in the fused layout, without ever allocating the eager window."""
    mode = _LazyZeros()
    with torch.no_grad(), mode:
        state = tx.init(params)
    return to_fused_layout(state, _lazy=mode.lazy)


# --------------------------------------------------------------------------------------------
# The traced step.


def _write_back(
    olds: list[Any], news: list[Any], names: list[str], what: str, inputs: dict[int, Any]
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pairs (destination, source) for the in-place write of ``news`` into ``olds``."""
    pairs = []
    for old, new, name in zip(olds, news, names):
        if new is old:
            continue
        if not isinstance(old, torch.Tensor) or not isinstance(new, torch.Tensor):
            raise ValueError(
                f"FusedStep: the {what} at path {name!r} changes from {type(old).__name__} to"
                f" {type(new).__name__} in update; only tensors can be updated in place"
            )
        if new.shape != old.shape or new.dtype != old.dtype:
            raise ValueError(
                f"FusedStep: the {what} at path {name!r} is {old.dtype}{list(old.shape)} but update"
                f" returns {new.dtype}{list(new.shape)}; the fused path updates state in place"
            )
        if id(new) in inputs:  # another input's old value: read it before anything is written
            new = new.clone()
        pairs.append((old, new))
    return pairs


def _make_step(
    tx: GradientTransformation,
    p_leaves: list[Any],
    p_spec: _tree.TreeSpec,
    s_leaves: list[Any],
    s_spec: _tree.TreeSpec,
    mask: tuple[bool, ...],
    extra_names: tuple[str, ...],
) -> tuple[Any, list[int], list[int]]:
    """The pure-then-in-place step over a flat argument list, and the positions of the tensor
    leaves of the params and state it takes (the others are constants of the trace)."""
    p_pos = [i for i, p in enumerate(p_leaves) if isinstance(p, torch.Tensor)]
    s_pos = [i for i, s in enumerate(s_leaves) if isinstance(s, torch.Tensor)]
    p_names = _tree.path_names(_tree.unflatten(p_leaves, p_spec))
    s_names = _tree.path_names(_tree.unflatten(s_leaves, s_spec))
    n_p, n_g, n_s = len(p_pos), sum(mask), len(s_pos)

    def step(*flat: torch.Tensor) -> tuple[()]:
        ps, gs = list(flat[:n_p]), list(flat[n_p : n_p + n_g])
        ss, xs = list(flat[n_p + n_g : n_p + n_g + n_s]), flat[n_p + n_g + n_s :]
        p_all = list(p_leaves)
        for i, t in zip(p_pos, ps):
            p_all[i] = t
        s_all = list(s_leaves)
        for i, t in zip(s_pos, ss):
            s_all[i] = t
        g_iter = iter(gs)
        g_all = [next(g_iter) if m else None for m in mask]
        params = _tree.unflatten(p_all, p_spec)
        updates, new_state = tx.update(
            _tree.unflatten(g_all, p_spec),
            _tree.unflatten(s_all, s_spec),
            params,
            **dict(zip(extra_names, xs)),
        )
        new_params = apply_updates(params, updates)
        new_s, new_spec = _tree.flatten(new_state)
        if new_spec != s_spec:
            raise ValueError("FusedStep: tx.update returned a state whose structure differs from the state it got")
        inputs = {id(t): t for t in flat}
        pairs = _write_back(p_all, _tree.flatten(new_params)[0], p_names, "param", inputs)
        pairs += _write_back(s_all, new_s, s_names, "state leaf", inputs)
        for dst, src in pairs:
            dst.copy_(src)
        return ()

    return step, p_pos, s_pos


def _inplace_scatters(gm: torch.fx.GraphModule) -> int:
    """Rewrite ``x.copy_(index_put(x, idx, v))`` as ``x.index_put_(idx, v)`` where nothing reads
    ``x`` between the two: the ring window's one-slot write then stays one slot, instead of a
    copy of the whole ``[w, ...]`` buffer (Inductor does not re-inplace through the explicit
    ``copy_``). Returns the number of rewrites."""
    aten = torch.ops.aten
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.copy_.default:
            continue
        dst, src = node.args[0], node.args[1]
        if not isinstance(src, torch.fx.Node) or src.target is not aten.index_put.default or src.args[0] is not dst:
            continue
        if len(src.users) != 1 or node.users:
            continue
        if any(u is not node and u is not src and order[u] > order[src] for u in dst.users):
            continue
        with gm.graph.inserting_before(node):
            gm.graph.call_function(aten.index_put_.default, (dst, *src.args[1:]), dict(src.kwargs))
        gm.graph.erase_node(node)
        gm.graph.erase_node(src)
        done += 1
    if done:
        gm.graph.lint()
        gm.recompile()
    return done


def _small(node: torch.fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.numel() <= 1


def _mutates(node: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def _split_scalars(gm: torch.fx.GraphModule) -> tuple[torch.fx.GraphModule, torch.fx.GraphModule, list[int]] | None:
    """Split off the scalar prologue: the nodes of at most one element computed from scalar inputs
    and constants only (bias corrections 1−β^t, schedules η(t), α_t = α·exp(−κ·GS), slot indices).

    Left in one graph, Inductor inlines each into the elementwise kernel that uses it, so the
    float64 ``pow``/``exp``/``cos`` run once per *element* (grokadamw, GPT-2 small, H100: 3.44 ms
    a step with them inlined, 2.46 ms split off). As a graph of their own they run once, and the
    main graph reads the results. Every
    mutation of the step comes after its last read (the write-back ends the trace), so reading
    the scalar inputs first gives the same values. Returns ``(prologue, main, prologue input
    positions)``, or ``None`` when there is nothing to split.
    """
    nodes = list(gm.graph.nodes)
    first_mut = next((i for i, n in enumerate(nodes) if _mutates(n)), len(nodes))
    pro: dict[torch.fx.Node, None] = {}
    for n in nodes[:first_mut]:
        if not _small(n) or n.op not in ("call_function", "get_attr"):
            continue
        if all((m.op == "placeholder" and _small(m)) or m in pro for m in n.all_input_nodes):
            pro[n] = None
    # Writes of new scalars into scalar inputs that nothing else reads (the step counters) move
    # into the prologue too: one small kernel instead of one launch per counter.
    moved: dict[torch.fx.Node, None] = {}
    for n in nodes[first_mut:]:
        if n.target is torch.ops.aten.copy_.default and not n.users:
            dst, src = n.args[0], n.args[1]
            if dst.op == "placeholder" and _small(dst) and src in pro and all(u in pro or u is n for u in dst.users):
                moved[n] = None
    outs = [n for n in pro if n.op == "call_function" and any(u not in pro and u not in moved for u in n.users)]
    if not outs and not moved:
        return None
    placeholders = [n for n in nodes if n.op == "placeholder"]
    pro_in = [i for i, n in enumerate(placeholders) if any(u in pro or u in moved for u in n.users)]

    pg = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    for i in pro_in:
        env[placeholders[i]] = pg.placeholder(placeholders[i].name)
        env[placeholders[i]].meta = dict(placeholders[i].meta)
    for n in [*pro, *moved]:
        env[n] = pg.node_copy(n, lambda m: env[m])
    pg.output(tuple(env[n] for n in outs))

    mg = torch.fx.Graph()
    env2: dict[torch.fx.Node, torch.fx.Node] = {}
    for n in placeholders:
        env2[n] = mg.placeholder(n.name)
        env2[n].meta = dict(n.meta)
    for n in outs:
        env2[n] = mg.placeholder(f"prologue_{n.name}")
        env2[n].meta = dict(n.meta)
    for n in nodes:
        if n.op != "placeholder" and n not in moved and not (n in pro and n.op == "call_function"):
            env2[n] = mg.node_copy(n, lambda m: env2[m])  # constants stay readable by both graphs
    return torch.fx.GraphModule(gm, pg), torch.fx.GraphModule(gm, mg), pro_in


def _backend_compile(gm: torch.fx.GraphModule, args: list[Any], backend: str, options: dict[str, Any]) -> Any:
    if backend == "eager":
        return gm
    if backend == "aot_eager":
        return torch._dynamo.lookup_backend("aot_eager")(gm, args)
    # A fake mode with a shape environment, as torch.compile gives Inductor: without one the FX
    # graph cache is bypassed, and every process would compile the step from scratch.
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    fake_mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    with torch._guards.tracing(torch._guards.TracingContext(fake_mode)):
        return torch._inductor.compile(gm, args, options=options)


def _example(node: torch.fx.Node) -> torch.Tensor:
    val = node.meta["val"]
    return torch.zeros(val.shape, dtype=val.dtype, device=val.device)


def _compile(step: Any, args: list[torch.Tensor], backend: str, options: dict[str, Any]) -> Any:
    """Trace ``step`` on fake tensors, make the ring writes in place, split off the scalar
    prologue, and compile both graphs with ``backend``. Returns ``fn(*args)``."""
    with torch.no_grad():
        gm = make_fx(step, tracing_mode="fake")(*args)
    _inplace_scatters(gm)
    split = _split_scalars(gm)
    if split is None:
        return _backend_compile(gm, args, backend, options)
    pro_gm, main_gm, pro_in = split
    out_nodes = list(pro_gm.graph.nodes)[-1].args[0]
    pro = _backend_compile(pro_gm, [args[i] for i in pro_in], backend, options)
    main = _backend_compile(main_gm, [*args, *(_example(n) for n in out_nodes)], backend, options)

    def fn(*a: Any) -> Any:
        return main(*a, *pro(*[a[i] for i in pro_in]))

    return fn


def _has_ring(state: State) -> bool:
    leaves = torch.utils._pytree.tree_leaves(state, is_leaf=lambda x: isinstance(x, MaRingWindow))
    return any(isinstance(x, MaRingWindow) for x in leaves)


def _inductor_options(options: Mapping[str, Any] | None, ring: bool) -> dict[str, Any]:
    """:data:`DEFAULT_INDUCTOR_OPTIONS` (those this torch knows) under the user's ``options``.

    With ring windows, no benchmarking of kernel configurations at the first call: Inductor's
    autotuner clones the tensors a kernel mutates, and a ``[w, ...]`` ring is w times a param.
    """
    import torch._inductor.config as cfg

    known = cfg.get_config_copy() if hasattr(cfg, "get_config_copy") else cfg.shallow_copy_dict()
    out = {k: v for k, v in DEFAULT_INDUCTOR_OPTIONS.items() if k in known}
    if ring:
        out.update({k: v for k, v in (("triton.autotune_pointwise", False), ("combo_kernels_autotune", 0)) if k in known})
    out.update({k: v for k, v in (options or {}).items() if k in known or not k.startswith("eager_numerics.")})
    return out


class _KernelFn:
    """A :class:`~grokxform.kernels.step.KernelStep` behind the compiled step's calling
    convention, ``fn(*grads, *extras)``."""

    def __init__(self, ks: Any, n_grads: int, names: tuple[str, ...]) -> None:
        self.ks, self.n, self.names = ks, n_grads, names

    def prepare(self, args: list[Any]) -> None:
        self.ks.prepare(args[: self.n])

    def __call__(self, *args: Any) -> None:
        self.ks(list(args[: self.n]), dict(zip(self.names, args[self.n :])))


class _Captured:
    """A CUDA graph of one compiled step, with the tensors it reads."""

    def __init__(self, graph: torch.cuda.CUDAGraph, grads: list[torch.Tensor]) -> None:
        self.graph = graph
        self.grads = grads


class FusedStep:
    """A compiled, in-place optimizer step for the chain ``tx`` over the tree ``params``.

    ``step(grads, **extra)`` updates the params (in place) and the state it owns by the rule of
    ``tx``: ``u, s' = tx.update(grads, s, params, **extra)``, ``θ ← θ + u``, ``s ← s'``.

    Args:
        tx: any gradient transformation (a pipeline, a chain of primitives, a user's own).
        params: the tree of parameters to update in place (``dict(model.named_parameters())``).
        state: a state of ``tx`` to adopt; its tensors are updated in place (the windows of
            ``ma_filter`` are copied once into the ring layout). ``None``: ``tx.init(params)``,
            built without allocating an eager window.
        backend: ``"auto"`` (default): the Triton kernels of :mod:`grokxform.kernels` when the
            chain is one of the standard pipelines (``adamw``, ``grokfast_ema``, ``grokfast_ma``,
            ``grokadamw``, also under ``inject_hyperparams``) and every tensor is on one CUDA
            device, else ``"inductor"``; ``"triton"``: the kernels or a ``ValueError`` saying why
            not (on the CPU they run in Triton's interpreter with ``TRITON_INTERPRET=1``);
            ``"inductor"``: the traced chain compiled by Inductor (any chain); ``"aot_eager"``
            (the same trace, run op by op: quick to build, for tests on the CPU) or ``"eager"``
            (the traced graph, uncompiled).
        cuda_graph: capture the step into a CUDA graph after ``warmup_steps`` calls and replay
            it (``"auto"``: when every tensor is on one CUDA device). The captured step reads
            the gradients from the tensors of the capturing call; later gradients that are other
            tensors are first copied there (keep ``.grad`` tensors alive with
            ``zero_grad(set_to_none=False)`` to avoid the copy).
        options: Inductor settings merged over :data:`DEFAULT_INDUCTOR_OPTIONS`.
        warmup_steps: uncaptured calls (per pattern) before the CUDA graph is captured.

    Attributes:
        compiles: how many times a step was traced and compiled (one per pattern of ``None``
            gradients and set of extra arguments; it never grows with the step count).
        captures: how many CUDA graphs were captured.
        compile_seconds: the wall time of each compile.
        engine: what ran the last pattern built: ``"triton"``, ``"inductor"``, ``"aot_eager"``
            or ``"eager"``; ``fallback_reason`` says why ``"auto"`` did not use the kernels.

    Entry point for other front ends (``grokxform.Optimizer``): build
    ``FusedStep(tx, params_tree, state_tree)``, call it with the gradient tree and the extra
    arguments, and read the live state back from :attr:`state` (MA windows in ring layout;
    :meth:`eager_state` for the eager layout).
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
        names = _tree.path_names(params)
        for name, p in zip(names, p_leaves):
            if p is not None and not (isinstance(p, torch.Tensor) and p.is_floating_point()):
                got = str(p.dtype) if isinstance(p, torch.Tensor) else type(p).__name__
                raise TypeError(f"FusedStep: the param at path {name!r} must be a floating-point tensor, got {got}")
        tensors = [p for p in p_leaves if isinstance(p, torch.Tensor)]
        if not tensors:
            raise ValueError("FusedStep: params has no tensor leaf")
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
        self._cuda_graph = bool(cuda_graph) and on_one_gpu and backend != "eager"
        self._backend = backend
        self._options = _inductor_options(options, _has_ring(state)) if backend in ("auto", "inductor") else {}
        self._default_options = options is None
        self._warmup = warmup_steps
        self._fns: dict[Any, tuple[Any, list[int], list[int]]] = {}
        self._graphs: dict[Any, _Captured] = {}
        self._runs: dict[Any, int] = {}
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
    def uses_cuda_graph(self) -> bool:
        return self._cuda_graph

    def eager_state(self) -> State:
        """The state in the eager layout (``tx.update`` takes it); MA slots are views."""
        return to_eager_layout(self._state)

    # -- the step -----------------------------------------------------------------------------

    def __call__(self, grads: Updates, **extra: Any) -> None:
        g_leaves, g_spec = _tree.flatten(grads)
        if g_spec != self._p_spec:
            _tree.check_structure(grads, self._params, "params", "gradient")
            raise ValueError("FusedStep: the gradient tree does not match the params tree")
        mask = tuple(g is not None for g in g_leaves)
        present = [g for g in g_leaves if g is not None]
        xs = self._stage_extras(extra)
        key = (mask, tuple(xs))
        entry = self._fns.get(key)
        if entry is None:
            self._check_grads(g_leaves)
            entry = self._build(key, present, list(xs.values()))
        fn, p_pos, s_pos = entry
        cap = self._graphs.get(key)
        if cap is not None:
            self._stage_grads(cap, present)
            cap.graph.replay()
            return
        args = self._args(p_pos, present, s_pos, list(xs.values()))
        runs = self._runs.get(key, 0)
        if self._cuda_graph and runs >= self._warmup:
            self._check_grads(g_leaves)
            self._graphs[key] = cap = self._capture(fn, args, present)
            cap.graph.replay()
            return
        self._runs[key] = runs + 1
        with torch.no_grad():
            fn(*args)

    # -- internals ----------------------------------------------------------------------------

    def _args(self, p_pos: list[int], grads: list[torch.Tensor], s_pos: list[int], xs: list[torch.Tensor]) -> list[Any]:
        return [*(self._p_leaves[i] for i in p_pos), *grads, *(self._s_leaves[i] for i in s_pos), *xs]

    def _build(self, key: Any, grads: list[torch.Tensor], xs: list[torch.Tensor]) -> tuple[Any, list[int], list[int]]:
        mask, names = key
        if self._backend in ("auto", "triton"):
            kernel = self._kernel_step(mask, grads, names, xs)
            if kernel is not None:
                self.compiles += 1
                self.engine = "triton"
                self._fns[key] = (kernel, [], [])
                return self._fns[key]
        self.engine = "inductor" if self._backend == "auto" else self._backend
        step, p_pos, s_pos = _make_step(self._tx, self._p_leaves, self._p_spec, self._s_leaves, self._s_spec, mask, names)
        args = self._args(p_pos, grads, s_pos, xs)
        t0 = time.perf_counter()
        try:
            fn = _compile(step, args, self._engine_backend(), self._options)
        except Exception as e:  # noqa: BLE001 - only the optional horizontal fusion is retried
            if not self._default_options or not self._options.get("combo_kernels"):
                raise
            warnings.warn(f"FusedStep: compiling with combo_kernels failed ({type(e).__name__}: {e}); retrying without")
            self._options = {**self._options, "combo_kernels": False}
            fn = _compile(step, args, self._engine_backend(), self._options)
        self.compile_seconds.append(time.perf_counter() - t0)
        self.compiles += 1
        self._fns[key] = (fn, p_pos, s_pos)
        return self._fns[key]

    def _engine_backend(self) -> str:
        return "inductor" if self._backend == "auto" else self._backend

    def _kernel_step(
        self, mask: tuple[bool, ...], grads: list[torch.Tensor], names: tuple[str, ...], xs: list[torch.Tensor]
    ) -> Any:
        """The Triton kernel step for this pattern, or ``None`` (``"auto"``: Inductor then)."""
        from grokxform.kernels import step as kstep

        try:
            if self._backend == "auto" and self._device.type != "cuda":
                raise kstep.KernelUnsupported("backend='auto' uses the kernels on CUDA only")
            if not kstep.available(self._device):
                raise kstep.KernelUnsupported(f"Triton cannot run on {self._device} here")
            t0 = time.perf_counter()
            ks = kstep.build(self._tx, self._p_leaves, self._p_spec, self._state, mask, grads, names, xs)
            self.compile_seconds.append(time.perf_counter() - t0)
        except kstep.KernelUnsupported as e:
            if self._backend == "triton":
                raise ValueError(f"FusedStep(backend='triton'): {e}") from None
            self.fallback_reason = str(e)
            return None
        return _KernelFn(ks, len(grads), names)

    def _capture(self, fn: Any, args: list[Any], grads: list[torch.Tensor]) -> _Captured:
        if isinstance(fn, _KernelFn):  # address tables are host-to-device copies: not inside the capture
            fn.prepare(list(args))
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            fn(*args)
        self.captures += 1
        return _Captured(graph, list(grads))

    def _stage_grads(self, cap: _Captured, grads: list[torch.Tensor]) -> None:
        if len(grads) != len(cap.grads):
            raise ValueError("FusedStep: the number of gradients changed for a captured step")
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

    def _stage_extras(self, extra: dict[str, Any]) -> dict[str, torch.Tensor]:
        """Copy each extra argument into a persistent device tensor (the compiled step reads
        those, so a new loss value is new data, never a new graph)."""
        out = {}
        for name in sorted(extra):
            value = extra[name]
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
                raise TypeError(
                    f"FusedStep: extra argument {name}= must be a number or a tensor, got {type(value).__name__}"
                )
            buf = self._extras.get(name)
            if isinstance(value, torch.Tensor):
                v = value.detach()
                if buf is None:
                    buf = self._extras[name] = torch.empty(v.shape, dtype=v.dtype, device=self._device)
                elif v.shape != buf.shape:
                    raise ValueError(
                        f"FusedStep: extra argument {name}= had shape {list(buf.shape)}, now {list(v.shape)}"
                    )
                buf.copy_(v)
            else:
                if buf is None:
                    buf = self._extras[name] = torch.empty((), dtype=torch.float64, device=self._device)
                buf.fill_(value)
            out[name] = buf
        return out

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
    """``FusedStep(tx, params, state, ...)``: the compiled in-place step of ``tx`` (see :class:`FusedStep`).

    Example::

        step = compile_step(grokfast_ema(lr=1e-3), dict(model.named_parameters()))
        step({n: p.grad for n, p in model.named_parameters()})
    """
    return FusedStep(tx, params, state, backend=backend, cuda_graph=cuda_graph, options=options)
