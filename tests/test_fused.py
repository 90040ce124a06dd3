"""The fused path (grokxform.fused) gives the numbers of the eager path.

CPU tests run the same trace as the GPU path through ``backend="aot_eager"`` (and one small
Inductor compile); GPU tests (``-m gpu``) run Inductor + CUDA graphs against eager.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from cases import PIPELINES, grad_tree, param_tree

import grokxform as gx
from grokxform import tree as T
from grokxform.engine.traced import inplace_scatters as _inplace_scatters
from grokxform.fused import FusedStep, compile_step, init_state, to_eager_layout, to_fused_layout
from grokxform.transforms.filters import MaFilterState, RingWindow

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


SHAPES = {"emb.weight": (11, 6), "h.0.w": (6, 6), "h.0.b": (6,), "h.1.w": (6, 6), "h.1.b": (6,), "ln.w": (6,)}


def _params(dtype: torch.dtype = torch.float64, device: str = "cpu") -> dict[str, torch.Tensor]:
    return param_tree(SHAPES, dtype=dtype, device=device)


def _signal(t: int, device: str) -> dict[str, Any]:
    if t % 2:
        return {"train_loss": torch.tensor(1.0 / (t + 1), device=device), "val_loss": 2.0 + t}
    return {"train_loss": 1.0 / (t + 1), "val_loss": torch.tensor(2.0 + t, dtype=torch.float64, device=device)}


def _run_both(
    tx: gx.GradientTransformation,
    params: dict[str, torch.Tensor],
    steps: int,
    none_at: dict[int, tuple[str, ...]] | None = None,
    **fused_kwargs: Any,
) -> tuple[Any, Any, Any, FusedStep]:
    """``steps`` eager steps and ``steps`` fused steps from the same start; returns the eager params
    and state, the fused params and the FusedStep."""
    device = str(next(iter(params.values())).device)
    p_eager = dict(params)
    p_fused = {n: p.clone() for n, p in params.items()}
    s_eager = tx.init(p_eager)
    fused = FusedStep(tx, p_fused, **fused_kwargs)
    for t in range(steps):
        grads = grad_tree(params, t, none=(none_at or {}).get(t, ()))
        extra = _signal(t, device)
        u, s_eager = tx.update(grads, s_eager, p_eager, **extra)
        p_eager = gx.apply_updates(p_eager, u)
        fused(grads, **extra)
    return p_eager, s_eager, p_fused, fused


def _assert_trees_close(a: Any, b: Any, **tol: Any) -> None:
    la, sa = T.flatten(a)
    lb, sb = T.flatten(b)
    assert sa == sb
    for x, y in zip(la, lb):
        if isinstance(x, torch.Tensor):
            torch.testing.assert_close(y, x, **tol)
        else:
            assert x == y


# --------------------------------------------------------------------------------------------
# CPU: the trace through aot_eager (float64: the same arithmetic, so the same numbers).


@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_fused_matches_eager_cpu(name: str) -> None:
    tx = PIPELINES[name].make()
    none_at = {3: ("h.1.w",), 4: ("h.1.w", "ln.w")}
    p_e, s_e, p_f, fused = _run_both(tx, _params(), 8, none_at, backend="aot_eager")
    # (normals: the kernels' log and cos and torch's agree to a few float32 ulps)
    tol = {"rtol": 1e-7, "atol": 1e-9} if PIPELINES[name].draws_normals else {"rtol": 1e-13, "atol": 1e-15}
    _assert_trees_close(p_e, p_f, **tol)
    _assert_trees_close(s_e, fused.eager_state(), **tol)
    assert fused.compiles == 3  # one per pattern of None gradients, not per step


def test_fused_updates_the_given_tensors_in_place() -> None:
    model = torch.nn.Linear(4, 3).double()
    params = dict(model.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    ptrs = {n: p.data_ptr() for n, p in params.items()}
    step = compile_step(gx.adamw(lr=0.1), params, backend="aot_eager")
    m_ptr = step.state["adam"].mu["weight"].data_ptr()
    step({n: torch.ones_like(p) for n, p in params.items()})
    for n, p in model.named_parameters():
        assert p.data_ptr() == ptrs[n]
        assert not torch.equal(p.detach(), before[n])
        assert p.requires_grad
    assert step.state["adam"].mu["weight"].data_ptr() == m_ptr
    torch.testing.assert_close(step.state["adam"].mu["weight"], torch.full((3, 4), 0.1, dtype=torch.float64))


def test_injected_lr_changes_without_recompiling() -> None:
    tx = gx.inject_hyperparams(gx.adamw)(lr=1e-2)
    params = _params()
    p_e, s_e = dict(params), tx.init(params)
    p_f = {n: p.clone() for n, p in params.items()}
    fused = FusedStep(tx, p_f, backend="aot_eager")
    for t in range(4):
        lr = 1e-2 / (t + 1)
        s_e.hyperparams["lr"].fill_(lr)
        fused.state.hyperparams["lr"].fill_(lr)
        g = grad_tree(params, t)
        u, s_e = tx.update(g, s_e, p_e)
        p_e = gx.apply_updates(p_e, u)
        fused(g)
    _assert_trees_close(p_e, p_f, rtol=1e-13, atol=1e-15)
    assert fused.compiles == 1


def test_many_steps_with_schedule_and_changing_signal_compile_once() -> None:
    tx = gx.grokadamw(lr=gx.warmup_cosine_decay(1e-2, 5, 40))
    fused = FusedStep(tx, _params(torch.float32), backend="aot_eager")
    for t in range(40):
        fused(grad_tree(fused.params, t), **_signal(t, "cpu"))
    assert fused.compiles == 1
    assert int(fused.state["lr"].count) == 40
    assert float(fused.state["grokfast"].alpha) != 0.98  # the signal moved α, in-graph


def test_inductor_cpu_ma_ring_in_place() -> None:
    """The Inductor path itself (CPU backend), with the ring window written in place."""
    params = {"w": torch.randn(5, 4, dtype=torch.float64), "b": torch.randn(4, dtype=torch.float64)}
    tx = gx.grokfast_ma(lr=1e-2, window_size=3)
    p_e, s_e, p_f, fused = _run_both(tx, params, 7, backend="inductor")
    _assert_trees_close(p_e, p_f, rtol=1e-12, atol=1e-14)
    _assert_trees_close(s_e, fused.eager_state(), rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------
# The ring layout of ma_filter.


def test_ring_layout_gives_the_eager_numbers_bitwise() -> None:
    tx = gx.ma_filter(4, "mean", warmup=False)
    params = _params()
    s_tuple = tx.init(params)
    s_ring = to_fused_layout(tx.init(params))
    assert isinstance(s_ring.window, RingWindow)
    for t in range(10):
        g = grad_tree(params, t, none=("h.0.b",) if t == 5 else ())
        u1, s_tuple = tx.update(g, s_tuple, params)
        u2, s_ring = tx.update(g, s_ring, params)
        _assert_trees_close(u1, u2, rtol=0, atol=0)
    _assert_trees_close(s_tuple, to_eager_layout(s_ring), rtol=0, atol=0)


def test_adopting_an_eager_state_mid_training() -> None:
    """Conversion to the ring keeps each leaf's own rotation (leaves skipped on some steps)."""
    tx = gx.grokfast_ma(lr=1e-2, window_size=3)
    params = _params()
    p_e, s_e = dict(params), tx.init(params)
    for t in range(4):
        u, s_e = tx.update(grad_tree(params, t, none=("h.1.b",) if t == 1 else ()), s_e, p_e)
        p_e = gx.apply_updates(p_e, u)
    p_f = {n: p.clone() for n, p in p_e.items()}
    fused = FusedStep(tx, p_f, s_e, backend="aot_eager")
    for t in range(4, 9):
        g = grad_tree(params, t)
        u, s_e = tx.update(g, s_e, p_e)
        p_e = gx.apply_updates(p_e, u)
        fused(g)
    _assert_trees_close(p_e, p_f, rtol=1e-13, atol=1e-15)
    _assert_trees_close(s_e, fused.eager_state(), rtol=1e-13, atol=1e-15)


def test_init_state_allocates_no_eager_window() -> None:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Allocations(TorchDispatchMode):
        """The bytes of the tensors that factory ops make."""

        def __init__(self) -> None:
            super().__init__()
            self.bytes = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            if func._schema.name in ("aten::zeros", "aten::empty", "aten::zeros_like", "aten::empty_like",
                                     "aten::new_zeros", "aten::full", "aten::empty_strided", "aten::clone"):
                self.bytes += out.numel() * out.element_size()
            return out

    tx = gx.grokfast_ma(window_size=50)
    params = _params(torch.float32)
    with Allocations() as made:
        state = init_state(tx, params)
    window = 50 * sum(p.numel() * 4 for p in params.values())
    assert window <= made.bytes < window + window // 5  # the ring and the rest of the state, no eager window
    ma = state["grokfast"]
    assert isinstance(ma, MaFilterState) and isinstance(ma.window, RingWindow)
    ring = ma.window.buffers["emb.weight"]
    assert ring.shape == (50, 11, 6) and ring.is_contiguous() and not ring.any()
    assert ma.total["emb.weight"].dtype == torch.float32 and ma.total["emb.weight"].is_contiguous()
    _assert_trees_close(to_eager_layout(state), tx.init(params), rtol=0, atol=0)
    for leaf in T.flatten(state)[0]:
        assert leaf is None or all(s != 0 for s, n in zip(leaf.stride(), leaf.shape) if n > 1)


def test_scatter_rewrite_turns_the_ring_write_in_place() -> None:
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(ring: torch.Tensor, c: torch.Tensor, g: torch.Tensor) -> tuple[()]:
        slot = torch.remainder(c, 3).reshape(1)
        old = ring.index_select(0, slot).squeeze(0)
        ring.copy_(ring.index_put((slot,), (g + old).unsqueeze(0)))
        return ()

    gm = make_fx(f)(torch.zeros(3, 4), torch.tensor(4), torch.ones(4))
    assert _inplace_scatters(gm) == 1
    targets = [n.target for n in gm.graph.nodes]
    assert torch.ops.aten.index_put_.default in targets and torch.ops.aten.copy_.default not in targets
    ring = torch.arange(12.0).reshape(3, 4)
    gm(ring, torch.tensor(4), torch.ones(4))
    torch.testing.assert_close(ring[1], torch.tensor([5.0, 6.0, 7.0, 8.0]))  # slot 4 % 3 = 1: old + 1
    torch.testing.assert_close(ring[0], torch.arange(4.0))  # other slots untouched


# --------------------------------------------------------------------------------------------
# Errors.


def test_errors_name_the_bad_argument() -> None:
    params = _params()
    with pytest.raises(TypeError, match="GradientTransformation"):
        FusedStep(lambda g: g, params)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        FusedStep(gx.adamw(), params, backend="jit")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cuda_graph=True"):
        FusedStep(gx.adamw(), params, cuda_graph=True)
    with pytest.raises(TypeError, match="'h.0.b'"):
        FusedStep(gx.adamw(), {**params, "h.0.b": torch.zeros(6, dtype=torch.int64)})
    with pytest.raises(ValueError, match="shares memory"):
        FusedStep(gx.adamw(), {"a": params["h.0.w"], "b": params["h.0.w"]})
    fused = FusedStep(gx.adamw(), params, backend="aot_eager")
    with pytest.raises(ValueError, match="'ln.w'"):
        fused({n: g for n, g in grad_tree(params, 0).items() if n != "ln.w"})
    with pytest.raises(ValueError, match="'h.0.b'"):
        fused({**grad_tree(params, 0), "h.0.b": torch.zeros(7, dtype=torch.float64)})
    with pytest.raises(TypeError, match="train_loss="):
        fused(grad_tree(params, 0), train_loss="low")


def test_a_state_that_changes_dtype_is_refused() -> None:
    def init(params: Any) -> Any:
        return {"acc": torch.zeros((), dtype=torch.float32)}

    def update(updates: Any, state: Any, params: Any = None, **extra: Any) -> Any:
        return updates, {"acc": (state["acc"] + 1).double()}

    fused = FusedStep(gx.GradientTransformation(init, update), _params(), backend="aot_eager")
    with pytest.raises(ValueError, match="'acc'.*in place"):
        fused(grad_tree(_params(), 0))


# --------------------------------------------------------------------------------------------
# GPU: Inductor + CUDA graphs against eager.


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", ["grokfast_ema_coupled", "grokfast_ma", "grokadamw_schedule", "grokadamw_compat",
                                  "inject_grokadamw"])
def test_fused_matches_eager_gpu_fp32(name: str) -> None:
    tx = PIPELINES[name].make()
    params = _params(torch.float32, "cuda")
    p_e, s_e, p_f, fused = _run_both(tx, params, 8, {3: ("h.1.w",)})
    # Two patterns compiled; only the full one ran more than the warm-up call, so only it is captured.
    assert fused.uses_cuda_graph and (fused.compiles, fused.captures) == (2, 1)
    _assert_trees_close(p_e, p_f, rtol=1e-5, atol=1e-6)
    _assert_trees_close(s_e, fused.eager_state(), rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@needs_cuda
def test_fused_matches_eager_gpu_fp64_tightly() -> None:
    tx = PIPELINES["grokadamw_schedule"].make()
    p_e, s_e, p_f, fused = _run_both(tx, _params(torch.float64, "cuda"), 6)
    _assert_trees_close(p_e, p_f, rtol=1e-12, atol=1e-14)
    _assert_trees_close(s_e, fused.eager_state(), rtol=1e-12, atol=1e-14)


@pytest.mark.gpu
@needs_cuda
def test_fused_matches_eager_gpu_bf16_params_fp32_state() -> None:
    tx = gx.grokadamw(lr=1e-2)
    p_e, s_e, p_f, fused = _run_both(tx, _params(torch.bfloat16, "cuda"), 6, backend="inductor")
    assert fused.state["adam"].mu["h.0.w"].dtype == torch.float32
    _assert_trees_close(p_e, p_f, rtol=2**-7, atol=1e-5)  # within one bf16 rounding
    _assert_trees_close(s_e, fused.eager_state(), rtol=1e-3, atol=1e-6)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_with_fresh_gradient_tensors_each_step() -> None:
    """Gradients that are new tensors each step are copied into the captured ones; a replay
    without that copy would reuse the old gradient and diverge."""
    tx = gx.grokfast_ema(lr=1e-2)
    p_e, s_e, p_f, fused = _run_both(tx, _params(torch.float32, "cuda"), 6)
    assert fused.captures == 1 and fused.compiles == 1
    _assert_trees_close(p_e, p_f, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@needs_cuda
def test_graph_and_no_graph_agree_and_never_recompile() -> None:
    tx = gx.grokadamw(lr=gx.warmup_cosine_decay(1e-2, 5, 60))
    params = _params(torch.float32, "cuda")
    a = FusedStep(tx, {n: p.clone() for n, p in params.items()}, cuda_graph=True)
    b = FusedStep(tx, {n: p.clone() for n, p in params.items()}, cuda_graph=False)
    for t in range(60):
        g, x = grad_tree(params, t), _signal(t, "cuda")
        a(g, **x)
        b(g, **x)
    assert (a.compiles, a.captures, b.compiles, b.captures) == (1, 1, 1, 0)
    _assert_trees_close(a.params, b.params, rtol=0, atol=0)


def test_step_counters_live_in_one_buffer_and_stay_exact() -> None:
    """The fused layout keeps each tree of per-leaf step counters in one int64 buffer (the leaves
    are views of it): a step reads and bumps them with one op each. A leaf without a gradient keeps
    its count."""
    tx = gx.grokfast_ema(lr=1e-2)
    params = _params()
    fused = FusedStep(tx, {n: p.clone() for n, p in params.items()}, backend="aot_eager")
    counts = list(fused.state["adam"].count.values())
    base = counts[0].untyped_storage().data_ptr()
    assert all(c.untyped_storage().data_ptr() == base and c.storage_offset() == k for k, c in enumerate(counts))
    p_e, s_e, p_f, fused = _run_both(tx, params, 4, {2: ("h.0.b",)}, backend="aot_eager")
    assert {n: int(c) for n, c in fused.state["adam"].count.items()} == {n: int(c) for n, c in s_e["adam"].count.items()}
    assert int(fused.state["adam"].count["h.0.b"]) == 3
