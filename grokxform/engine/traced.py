"""The compiled fallback: a chain without a declaration (or any chain, on request) traced with
``make_fx`` and compiled by Inductor into an in-place step.

1. **Trace** the pure step once on fake tensors: the transforms' Python (trees, paths, masks,
   per-leaf constants) runs natively, only tensor operations are recorded; the traced function
   ends by copying the new params and state into the old tensors (``copy_``).
2. **Reshape** the graph: the ring-window write becomes an in-place ``index_put_`` (one slot, not a
   copy of the window), and the scalar work (bias corrections, schedules, α_t, slot indices,
   counters) moves into a prologue graph, computed once instead of once per element.
3. **Compile** both graphs with Inductor (``torch._inductor.compile``), or run them op by op
   (``"aot_eager"``, ``"eager"``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from grokxform import tree as _tree
from grokxform.base import GradientTransformation, State, apply_updates
from grokxform.declarations import RingWindow

DEFAULT_INDUCTOR_OPTIONS: dict[str, Any] = {
    # Horizontal fusion: independent per-leaf kernels (and the 0-d counter updates) share launches.
    "combo_kernels": True,
    # Round where the eager code rounds (bf16 params), so the fused step gives the eager numbers.
    "emulate_precision_casts": True,
}
"""Inductor settings used unless ``options=`` says otherwise (keys this torch lacks are skipped)."""


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


def make_step(
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


def inplace_scatters(gm: torch.fx.GraphModule) -> int:
    """Rewrite ``y = index_put(x, idx, v); ...; x.copy_(y)`` as ``x.index_put_(idx, v)`` where
    nothing reads ``x`` after the ``index_put``: the ring window's one-slot write then stays one
    slot, instead of a copy of the whole ``[w, ...]`` buffer (Inductor does not re-inplace
    through the explicit ``copy_``). Whatever read ``y`` (the window's re-sum) reads ``x``.
    Returns the number of rewrites."""
    aten = torch.ops.aten
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.copy_.default:
            continue
        dst, src = node.args[0], node.args[1]
        if not isinstance(dst, torch.fx.Node) or not isinstance(src, torch.fx.Node):
            continue
        if src.target is not aten.index_put.default or src.args[0] is not dst:
            continue
        if node.users:
            continue
        if any(u is not node and u is not src and order[u] > order[src] for u in dst.users):
            continue
        with gm.graph.inserting_before(src):
            inplace = gm.graph.call_function(aten.index_put_.default, (dst, *src.args[1:]), dict(src.kwargs))
        gm.graph.erase_node(node)
        src.replace_all_uses_with(dst)
        gm.graph.erase_node(src)
        inplace.meta.update(src.meta)
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


def compile_traced(step: Any, args: list[torch.Tensor], backend: str, options: dict[str, Any]) -> Any:
    """Trace ``step`` on fake tensors, make the ring writes in place, split off the scalar
    prologue, and compile both graphs with ``backend``. Returns ``fn(*args)``."""
    with torch.no_grad():  # the step runs without autograd: compile it so (no joint graph)
        gm = make_fx(step, tracing_mode="fake")(*args)
        inplace_scatters(gm)
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


def has_ring(state: State) -> bool:
    leaves = torch.utils._pytree.tree_leaves(state, is_leaf=lambda x: isinstance(x, RingWindow))
    return any(isinstance(x, RingWindow) for x in leaves)


def inductor_options(options: Mapping[str, Any] | None, ring: bool) -> dict[str, Any]:
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
