"""The pure ``tx.update`` on the engine's kernels (``grokxform.engine.functional``): out of place,
equal to the op-by-op path within rounding, refused (op by op, bit for bit) wherever a call is
recorded or transformed, built once per pattern of calls and holding none of the caller's tensors.

On the CPU the kernels are the generated C functions; on a CUDA machine the Triton kernels."""

from __future__ import annotations

import gc
import threading
import weakref
from typing import Any

import pytest
import torch
from cases import PIPELINES, grad_tree, param_tree, same_bits

import grokxform as gx
from grokxform import tree as T
from grokxform.engine import EngineStep, available, native
from grokxform.engine.functional import explain

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
pytestmark = pytest.mark.skipif(
    not (native.compiler()[0] if DEVICE.type == "cpu" else available(DEVICE)),
    reason="no kernels on this machine (a C compiler on the CPU, Triton on CUDA)",
)

WINDOWED = {n for n in PIPELINES if n.startswith("grokfast_ma")}
NONE_AT = {2: ("blocks.1.w",), 3: ("blocks.1.w", "head")}


def _losses(t: int) -> dict[str, Any]:
    return {"train_loss": torch.tensor(1.0 / (t + 1), device=DEVICE), "val_loss": 1.5 + 0.1 * t}


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [x for x in T.flatten(tree)[0] if isinstance(x, torch.Tensor)]


def _close(a: Any, b: Any, exact: bool = False, normals: bool = False) -> None:
    """Bit for bit, or within rounding (``normals``: within a few float32 ulps of drawn normals,
    whose log and cos the kernels take from the C library and op by op from torch)."""
    la, sa = T.flatten(a)
    lb, sb = T.flatten(b)
    assert sa == sb
    for x, y in zip(la, lb):
        if not isinstance(x, torch.Tensor):
            assert x == y
        elif exact:
            assert x.dtype == y.dtype and same_bits(x, y)
        else:
            assert x.dtype == y.dtype and x.shape == y.shape
            tol = 1e-7 if normals else 1e-12 if x.dtype == torch.float64 else 2e-5
            torch.testing.assert_close(x, y, rtol=tol, atol=tol)


def _counting(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many engine steps run (a list whose length grows by one per step)."""
    calls: list[int] = []
    real = EngineStep.__call__

    def counted(self: EngineStep, extras: Any) -> None:
        calls.append(1)
        real(self, extras)

    monkeypatch.setattr(EngineStep, "__call__", counted)
    return calls


@pytest.mark.parametrize("dtype", [
    torch.float32,
    pytest.param(torch.float64, marks=pytest.mark.skipif(DEVICE.type == "cuda", reason="Triton takes 16/32-bit floats")),
], ids=["fp32", "fp64"])
@pytest.mark.parametrize("name", sorted(PIPELINES))
def test_tx_update_runs_the_kernels_out_of_place(name: str, dtype: torch.dtype, monkeypatch) -> None:
    """Every pipeline over steps with ``None`` gradients: the kernels run the whole chain (a chain
    with an MA window, whose tuple layout they do not take, or with a member without a declaration,
    says so and runs op by op, all of it),
    the numbers are the op-by-op ones within rounding, the inputs are never written, and the new
    state and updates are new tensors except where a leaf without a gradient keeps its state."""
    case = PIPELINES[name]
    tx = case.make()
    params = param_tree(dtype=dtype, device=DEVICE)
    state = ref_state = tx.init(params)
    calls = _counting(monkeypatch)
    for t in range(5):
        grads = grad_tree(params, t, none=NONE_AT.get(t, ()))
        extra = _losses(t) if case.signal else {}
        why = explain(tx, grads, state, params, **extra)
        assert (why is None) == (name not in WINDOWED), why
        if name in WINDOWED:
            assert "ring layout" in why
        before = [(x, x.clone(), x._version) for x in _tensors((grads, state, params))]
        n = len(calls)
        updates, new_state = tx.update(grads, state, params, **extra)
        assert len(calls) == n + (name not in WINDOWED)
        for x, copy, version in before:
            assert x._version == version and same_bits(x, copy), "an input was written"
        with gx.kernels(False):
            ref_updates, ref_state = tx.update(grads, ref_state, params, **extra)
        _close(updates, ref_updates, normals=case.draws_normals)
        _close(new_state, ref_state, normals=case.draws_normals)
        kept = {id(x) for x in _tensors(state)}
        inputs = {x.untyped_storage().data_ptr() for x in _tensors((grads, params, state)) if x.numel()}
        for path, x in zip(T.path_names(new_state), T.flatten(new_state)[0]):
            if not isinstance(x, torch.Tensor) or name in WINDOWED:  # (op by op: the window's slots rotate)
                continue
            if id(x) in kept:  # the state of a leaf without a gradient
                assert any(leaf in path for leaf in NONE_AT.get(t, ())), path
            elif x.numel():
                assert x.untyped_storage().data_ptr() not in inputs, path
        for k, u in updates.items():
            assert (u is None) == (grads[k] is None)
        state = new_state
        params = gx.apply_updates(params, updates)


@pytest.mark.parametrize("name", ["adamw", "grokadamw", "grokfast_ema", "inject_grokadamw"])
def test_tx_update_equals_the_optimizers_default_engine_bit_for_bit(name: str) -> None:
    """Out of place or in place, the kernels are the same programs: the functional loop and
    ``gx.Optimizer`` with default arguments give the same bits."""
    case = PIPELINES[name]
    init = param_tree(device=DEVICE)
    tensors = {n: torch.nn.Parameter(p.clone()) for n, p in init.items()}
    opt = gx.Optimizer(list(tensors.items()), case.make())
    tx = case.make()
    params = {n: p.clone() for n, p in init.items()}
    state = tx.init(params)
    for t in range(4):
        grads = grad_tree(params, t)
        extra = _losses(t) if case.signal else {}
        for n, p in tensors.items():
            p.grad = grads[n].clone()
        opt.step(**extra)
        updates, state = tx.update(grads, state, params, **extra)
        params = gx.apply_updates(params, updates)
    assert opt.engines[0] == ("c" if DEVICE.type == "cpu" else "triton")
    for n, p in tensors.items():
        assert same_bits(p.detach(), params[n]), n


def test_a_pattern_is_built_once_and_the_arguments_change_freely(monkeypatch) -> None:
    """New loss values (numbers or tensors) and new gradient tensors reuse the built step; another
    pattern of ``None`` gradients builds one more."""
    tx = gx.grokadamw(lr=1e-2)
    params = param_tree(device=DEVICE)
    state = tx.init(params)
    built = []
    real = EngineStep.__init__

    def counting_init(self: EngineStep, *args: Any, **kwargs: Any) -> None:
        built.append(1)
        real(self, *args, **kwargs)

    monkeypatch.setattr(EngineStep, "__init__", counting_init)
    for t in range(6):
        loss = 1.0 / (t + 1) if t % 2 else torch.tensor(1.0 / (t + 1), device=DEVICE)
        _, state = tx.update(grad_tree(params, t), state, params, train_loss=loss, val_loss=2.0)
    assert len(built) == 1
    _, state = tx.update(grad_tree(params, 7, none=("head",)), state, params, train_loss=0.1, val_loss=2.0)
    assert len(built) == 2


def test_the_cached_step_holds_none_of_the_callers_tensors() -> None:
    tx = gx.adamw(lr=1e-2)
    params = param_tree(device=DEVICE)
    state = tx.init(params)
    grads = grad_tree(params, 0)
    refs = [weakref.ref(g) for g in grads.values()]
    updates, state = tx.update(grads, state, params)
    assert explain(tx, grads, state, params) is None
    del grads, updates
    gc.collect()
    assert all(r() is None for r in refs)


def test_recorded_or_transformed_calls_run_op_by_op_bit_for_bit() -> None:
    """Autograd (an input or a hyperparameter that requires grad), ``torch.func.vmap`` and
    ``gx.kernels(False)``: the op-by-op path, whose numbers and gradients they keep."""
    tx = gx.grokfast_ema(lr=1e-2)
    params = param_tree(device=DEVICE)
    state = tx.init(params)
    grads = grad_tree(params, 0)
    with gx.kernels(False):
        want, _ = tx.update(grads, state, params)
    assert explain(tx, grads, state, params) is None

    needs = {k: v.clone().requires_grad_() for k, v in params.items()}
    assert explain(tx, grads, state, needs) == "autograd records the call (an input requires grad)"
    got, _ = tx.update(grads, state, needs)
    _close(got, want, exact=True)
    with torch.no_grad():  # nothing is recorded: the kernels run
        assert explain(tx, grads, state, needs) is None

    lr = torch.tensor(1e-2, device=DEVICE, dtype=torch.float64, requires_grad=True)
    tx_lr = gx.grokfast_ema(lr=lr)
    assert "a hyperparameter requires grad" in explain(tx_lr, grads, state, params)
    u, _ = tx_lr.update(grads, state, params)
    (d,) = torch.autograd.grad(sum(x.sum() for x in u.values() if x is not None), lr)
    assert torch.isfinite(d) and d != 0

    def one(g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return tx.update(g, state, params)[0]

    batched = torch.func.vmap(one)({k: torch.stack([v, v]) for k, v in grads.items()})
    for k, v in want.items():
        assert same_bits(batched[k][1], v)

    with gx.kernels(False):
        assert explain(tx, grads, state, params) == "kernels are off (gx.kernels(False))"
    with pytest.raises(TypeError, match="enabled must be a bool"), gx.kernels("no"):  # type: ignore[arg-type]
        pass


def test_calls_the_kernels_do_not_take_run_op_by_op(monkeypatch) -> None:
    """Mixed dtypes in a leaf, a member without a declaration, a non-contiguous gradient: the call
    runs op by op (and says why); a wrong tree raises what the op-by-op path raises."""
    params = param_tree(device=DEVICE)
    tx = gx.adamw(lr=1e-2)
    state = tx.init(params)
    half = {k: v.to(torch.bfloat16) for k, v in grad_tree(params, 0).items()}
    assert "mix dtypes" in explain(tx, half, state, params)
    with gx.kernels(False):
        want, _ = tx.update(half, state, params)
    got, _ = tx.update(half, state, params)
    _close(got, want, exact=True)

    plain = gx.GradientTransformation(lambda p: gx.EmptyState(), lambda u, s, p=None, **e: (u, s))
    assert explain(plain, grad_tree(params, 0), gx.EmptyState()) == "the transform has no declaration"
    mixed = gx.chain(plain, gx.adamw(lr=1e-2))
    assert "has no declaration" in explain(mixed, grad_tree(params, 0), mixed.init(params), params)
    calls = _counting(monkeypatch)  # the whole chain op by op, its declared members too
    got, _ = mixed.update(grad_tree(params, 0), mixed.init(params), params)
    with gx.kernels(False):
        want, _ = mixed.update(grad_tree(params, 0), mixed.init(params), params)
    assert not calls
    _close(got, want, exact=True)

    grads = grad_tree(params, 0)
    grads["blocks.0.w"] = grads["blocks.0.w"].t()
    assert "not contiguous" in explain(tx, grads, state, params)

    ma = gx.grokfast_ma(lr=1e-2, window_size=3)  # its pure update keeps the window as a tuple: refused
    ma_state = ma.init(params)                   # at once, every call, before the trees are flattened
    assert "ring layout" in explain(ma, grad_tree(params, 0), ma_state, params)
    monkeypatch.setattr(T, "structure", lambda tree: pytest.fail("flattened a refused call"))
    assert "ring layout" in explain(ma, grad_tree(params, 1), ma_state, params)
    monkeypatch.undo()

    wrong = dict(grad_tree(params, 0), head=torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="head"):
        tx.update(wrong, state, params)


def test_a_step_busy_in_another_thread_leaves_the_call_op_by_op() -> None:
    """Threads sharing a transform: each call gets the kernels or the op-by-op path, never a step
    another thread is pointing at its own tensors."""
    tx = gx.adamw(lr=1e-2)
    params = param_tree(device=DEVICE)
    state = tx.init(params)
    with gx.kernels(False):
        want = [tx.update(grad_tree(params, t), state, params)[0] for t in range(8)]
    got: list[Any] = [None] * 8

    def work(t: int) -> None:
        got[t] = tx.update(grad_tree(params, t), state, params)[0]

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    for a, b in zip(got, want):
        _close(a, b)
