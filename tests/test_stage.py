"""The engine's whole-leaf stage (:class:`grokxform.declarations.Leafwise`; Muon's
``orthogonalize``, a user's own through ``gx.base.leafwise``) against the eager path.

- Every position of ``gx.muon`` (a chain, the factory form through ``inject_hyperparams``, a
  ``partition`` with AdamW, ``masked``, a nested chain, ``MultiSteps``, ``apply_if_finite``) runs on
  the engine (``opt.engines`` names only an engine backend, no ``fallback_reasons``) with the
  eager path's numbers bit for bit, params and state, in float64 on the C kernels and the foreach
  backend, over steps where some leaves have no gradient (non-matrix leaves pass through).
- A global-norm clip after the stage reduces the orthogonalized values (the foreach backend bit
  for bit; the C kernels sum the norm in another order: within 1e-15).
- The pure ``tx.update`` runs on the kernels (bit for bit), a state dict saved mid-run resumes to
  the same bits, a user's own stage runs fused, the Triton kernels (in the interpreter on the CPU)
  agree, and a sharded leaf is refused by name. On CUDA, a Muon step is captured in a CUDA graph.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import grokxform as gx  # noqa: E402
from grokxform import tree as T  # noqa: E402
from grokxform.engine import native  # noqa: E402
from grokxform.engine import plan as P  # noqa: E402
from grokxform.engine.functional import explain  # noqa: E402
from grokxform.fused import FusedStep  # noqa: E402

F64 = torch.float64
KERNELS = "c" if native.compiler()[0] else "foreach"
# two square matrices of one shape (one stacked iteration), a tall and a wide one, a vector, a 0-d leaf
SHAPES = {"w1": (6, 6), "w2": (6, 6), "tall": (7, 3), "wide": (3, 5), "b": (6,), "gain": ()}
NONE_AT = {1: ("w2",), 2: ("b", "tall")}
STEPS = 4


def _matrix(path: str, p: torch.Tensor) -> str:
    return "muon" if p.ndim == 2 else "adamw"


POSITIONS: dict[str, Callable[[], Any]] = {
    "chain": lambda: gx.muon(lr=0.02, weight_decay=0.1, ns_dtype=None),
    "partition": lambda: gx.partition({"muon": gx.muon(lr=0.02, weight_decay=0.1),
                                       "adamw": gx.adamw(3e-3, weight_decay=0.01)}, _matrix),
    "masked": lambda: gx.chain(gx.masked(gx.muon(lr=0.02), lambda path, p: path != "w2"), gx.scale(0.5)),
    "nested": lambda: gx.named_chain(("inner", gx.chain(gx.chain(gx.muon_momentum(), gx.orthogonalize())),),
                                     ("lr", gx.scale_by_learning_rate(0.02))),
    "multisteps": lambda: gx.MultiSteps(gx.muon(lr=0.02), 2),
    "apply_if_finite": lambda: gx.apply_if_finite(gx.muon(lr=0.02)),
}


def _params(dtype: torch.dtype = F64) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(s, generator=g, dtype=F64).to(dtype) for n, s in SHAPES.items()}


def _grads(t: int, dtype: torch.dtype = F64) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(100 + t)
    drawn = {n: torch.randn(s, generator=g, dtype=F64).to(dtype) for n, s in SHAPES.items()}
    return {n: None if n in NONE_AT.get(t, ()) else x for n, x in drawn.items()}


def _eager(tx: gx.GradientTransformation, steps: int = STEPS, dtype: torch.dtype = F64,
           device: str = "cpu") -> tuple[dict, Any]:
    params = {n: p.to(device) for n, p in _params(dtype).items()}
    state = tx.init(params)
    for t in range(steps):
        grads = {n: None if g is None else g.to(device) for n, g in _grads(t, dtype).items()}
        with gx.kernels(False):  # torch's own ops, op by op
            u, state = tx.update(grads, state, params)
        params = gx.apply_updates(params, u)
    return params, state


def _optimizer(make: Any, fused: Any, steps: int = STEPS, **kw: Any) -> tuple[dict, gx.Optimizer]:
    tensors = [(n, torch.nn.Parameter(p.clone())) for n, p in _params().items()]
    opt = gx.Optimizer(tensors, make, fused=fused, **kw)
    for t in range(steps):
        g = _grads(t)
        for n, p in tensors:
            p.grad = None if g[n] is None else g[n].clone()
        opt.step()
    return {n: p.detach() for n, p in tensors}, opt


def _same(a: Any, b: Any, atol: float = 0.0) -> None:
    """The trees ``a`` and ``b`` equal: bit for bit, or within ``atol``."""
    la, lb = T.flatten(a)[0], T.flatten(b)[0]
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        if not isinstance(x, torch.Tensor):
            assert x == y
        elif atol:
            torch.testing.assert_close(y, x, rtol=0, atol=atol)
        else:
            assert torch.equal(x, y), (x - y).abs().max()


@pytest.mark.parametrize("fused", [None, "foreach"], ids=["kernels", "foreach"])
@pytest.mark.parametrize("position", sorted(POSITIONS))
def test_every_position_runs_on_the_engine_as_eager(position: str, fused: str | None) -> None:
    make = POSITIONS[position]
    want_p, want_s = _eager(make())
    got_p, opt = _optimizer(make(), fused)
    assert opt.engines == [fused or KERNELS] and opt.fallback_reasons == [None]
    _same(want_p, got_p)
    _same(want_s, opt.tx_states[0])


@pytest.mark.parametrize("fused", [None, "foreach"], ids=["kernels", "foreach"])
def test_the_factory_form_runs_on_the_engine_as_eager(fused: str | None) -> None:
    """``gx.Optimizer(params, gx.muon, lr=...)``: the chain inside ``inject_hyperparams``."""
    want_p, want_s = _eager(gx.inject_hyperparams(gx.muon)(lr=0.02, weight_decay=0.1))
    got_p, opt = _optimizer(gx.muon, fused, lr=0.02, weight_decay=0.1)
    assert opt.engines == [fused or KERNELS] and opt.fallback_reasons == [None]
    _same(want_p, got_p)
    _same(want_s.inner_state, opt.tx_states[0].inner_state)  # (the optimizer holds more hyperparameters)


def _clipped() -> gx.GradientTransformation:
    return gx.chain(gx.muon_momentum(), gx.orthogonalize(ns_dtype=None), gx.clip_by_global_norm(0.5),
                    gx.scale_by_learning_rate(0.1))


@pytest.mark.parametrize("backend", ["foreach", pytest.param("c", marks=pytest.mark.skipif(
    KERNELS != "c", reason="the C kernels need a compiler"))])
def test_a_clip_after_the_stage_reduces_the_orthogonalized_values(backend: str) -> None:
    tx = _clipped()
    want_p, want_s = _eager(tx)
    params = _params()
    fused = FusedStep(tx, params, backend=backend)
    for t in range(STEPS):
        fused(_grads(t))
    (fn,) = [f for f in fused._fns.values() if len(f.step.plan.leaves) == len(SHAPES)]
    plan = fn.step.plan
    assert plan.passes == 3 and isinstance(plan.reductions[0], P.Whole) and isinstance(plan.reductions[1], P.Member)
    atol = 0.0 if backend == "foreach" else 1e-15  # (the C kernels sum the norm in another order)
    _same(want_p, params, atol)
    _same(want_s, fused.eager_state(), atol)
    # the clip's norm is that of the orthogonalized momentum (every singular value near 1), not the gradient's
    assert 2.0 < float(fused.state[2].norm) < 5.0


def test_the_pure_update_runs_on_the_kernels_as_op_by_op() -> None:
    tx = gx.partition({"muon": gx.muon(lr=0.02), "adamw": gx.adamw(3e-3)}, _matrix)
    params = _params()
    state = ref = tx.init(params)
    for t in range(3):
        g = _grads(t)
        assert explain(tx, g, state, params) is None
        u, state = tx.update(g, state, params)
        with gx.kernels(False):
            want, ref = tx.update(g, ref, params)
        _same(want, u)
        _same(ref, state)
    alone = gx.orthogonalize(ns_dtype=None)
    g = _grads(0)
    assert explain(alone, g, alone.init(params)) is None
    out, _ = alone.update(g, alone.init(params))
    assert out["b"] is g["b"] and out["gain"] is g["gain"]  # not matrices: the very tensors


def test_a_state_dict_saved_mid_run_resumes_to_the_same_bits() -> None:
    make = POSITIONS["partition"]
    want, _ = _optimizer(make(), None, steps=STEPS)
    tensors = [(n, torch.nn.Parameter(p.clone())) for n, p in _params().items()]
    opt = gx.Optimizer(tensors, make())
    for t in range(STEPS):
        if t == 2:  # a new optimizer, from the saved state
            saved = opt.state_dict()
            opt = gx.Optimizer(tensors, make())
            opt.load_state_dict(saved)
        g = _grads(t)
        for n, p in tensors:
            p.grad = None if g[n] is None else g[n].clone()
        opt.step()
    assert opt.engines == [KERNELS]
    _same(want, {n: p.detach() for n, p in tensors})


def _unit_frobenius() -> gx.GradientTransformation:
    return gx.base.leafwise("unit_frobenius", lambda x: x / torch.linalg.matrix_norm(x, keepdim=True),
                            select=lambda leaf: leaf.ndim == 2)


def test_a_users_own_stage_runs_on_the_engine() -> None:
    make = lambda: gx.chain(gx.trace(0.9), _unit_frobenius(), gx.scale(-0.1))  # noqa: E731
    want_p, want_s = _eager(make())
    got_p, opt = _optimizer(make(), None)
    assert opt.engines == [KERNELS]
    _same(want_p, got_p)
    _same(want_s, opt.tx_states[0])
    for n in ("w1", "tall"):  # each matrix moved by 0.1 in Frobenius norm at the first step
        tx = make()
        u, _ = tx.update(_grads(0), tx.init(_params()))
        assert abs(float(torch.linalg.matrix_norm(u[n])) - 0.1) < 1e-12


def test_a_stage_must_keep_the_shape_and_dtype() -> None:
    tx = gx.base.leafwise("halves", lambda x: x[..., :1])
    g = {"w": torch.ones(2, 2)}
    with pytest.raises(ValueError, match=r"halves: fn returned .* it must keep the shape and dtype"):
        tx.update(g, tx.init(g))
    with pytest.raises(TypeError, match="a name and a function"):
        gx.base.leafwise("nothing", None)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="select must be a function"):
        gx.base.leafwise("x", lambda x: x, select=2)  # type: ignore[arg-type]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_the_triton_kernels_run_the_stage(dtype: torch.dtype) -> None:
    pytest.importorskip("triton")
    tx = gx.muon(lr=0.02, weight_decay=0.1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    want_p, want_s = _eager(tx, 3, dtype, device)  # (the same device: its matrix products round as the stage's)
    want_p, want_s = T.tree_map(lambda x: x.cpu() if isinstance(x, torch.Tensor) else x, (want_p, want_s))
    params = {n: p.to(device) for n, p in _params(dtype).items()}
    fused = FusedStep(tx, params, backend="triton")
    for t in range(3):
        fused({n: None if g is None else g.to(device) for n, g in _grads(t, dtype).items()})
    assert fused.engine == "triton"
    _same(want_p, {n: p.cpu() for n, p in params.items()})
    _same(want_s, T.tree_map(lambda x: x.cpu() if isinstance(x, torch.Tensor) else x, fused.eager_state()))


def test_a_sharded_matrix_is_refused_by_the_engine_naming_the_stage() -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        params = {"w": distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)]), "b": torch.ones(4)}
        with pytest.raises(gx.fused.EngineUnavailable, match=r"orthogonalize\).*sharded.*needs each leaf whole"):
            FusedStep(gx.muon(lr=0.02), params, backend="foreach")({"w": params["w"].detach().clone(),
                                                                    "b": torch.ones(4)})
    finally:
        dist.destroy_process_group()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_a_muon_step_is_captured_in_a_cuda_graph() -> None:
    """The stage is torch's ops on the engine's buffers, without a host synchronisation: the
    whole step (kernels, iteration, kernels) replays as one CUDA graph, with eager's numbers
    (float32 params: the kernels round as the eager ops; the bfloat16 iteration is torch's)."""
    tx = POSITIONS["partition"]()
    params = {n: p.float().cuda() for n, p in _params().items()}
    p_e, s_e = dict(params), tx.init(params)
    p_f = {n: p.clone() for n, p in params.items()}
    fused = FusedStep(tx, p_f)
    for t in range(5):
        g = {n: None if x is None else x.float().cuda() for n, x in _grads(t).items()}
        with gx.kernels(False):
            u, s_e = tx.update(g, s_e, p_e)
        p_e = gx.apply_updates(p_e, u)
        fused(g)
    assert fused.engine == "triton" and fused.captures >= 1
    for n, p in p_f.items():
        torch.testing.assert_close(p, p_e[n], rtol=0, atol=1e-6)
