"""Muon's pieces against ``torch.optim.Muon`` (torch 2.13, ``torch/optim/_muon.py``), CPU.

- ``orthogonalize`` == torch's ``_zeropower_via_newtonschulz`` (bfloat16) times its ``_adjust_lr``
  factor, bit for bit, for square, tall and wide matrices, several of one shape stacked; in float64
  (``ns_dtype=torch.float64``) to 1e-12 of a float64 re-derivation of torch's steps; under
  ``torch.func.vmap`` (an ensemble) each member's numbers, bit for bit with bfloat16's iteration
  for small matrices, within a bfloat16 ulp at 64×64.
- ``muon_momentum`` == torch's ``buf.lerp_(g, 1 − μ)`` and ``g.lerp(buf, μ)``: float64 to 1e-15
  per step, float32 within 2 ulps (torch's vectorised lerp is a multiply-add).
- ``muon`` == ``torch.optim.Muon`` over 20 steps (Nesterov on / off, both lr adjustments, weight
  decay): float64 params to 1e-5: each step from torch's params and buffer is within 4.4e-16,
  except one of 20 where the buffer's last-ulp difference (torch's lerp is a multiply-add) gives
  two elements of one matrix another bfloat16 rounding in the iteration (4.9e-6); float32 params to 5e-4
  (2.5% of lr): started from torch's params and buffer, most steps are within an ulp of the
  params, but torch's fused multiply-adds move the float32 input of the bfloat16 cast by an ulp,
  which flips a bfloat16 rounding now and then (2 of 20 steps here), and the iteration carries
  the flip to the whole matrix (up to 1.8e-4 in a step); through ``tx.update`` (the C kernels),
  ``gx.Optimizer`` (the whole chain on the C kernels, the iteration between two of their passes)
  and ``fused=False``.
- ``partition(muon for the matrices, adamw for the rest)`` == ``torch.optim.Muon`` +
  ``torch.optim.AdamW`` on a small network.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

import grokxform as gx
from grokxform.engine import native
from grokxform.transforms.muon import NS_COEFFICIENTS

F32, F64 = torch.float32, torch.float64

# square, tall (transposed for the iteration), wide; two of one shape (one stacked iteration); a
# vector and a 0-d leaf, which the orthogonalization passes through.
SHAPES: dict[str, tuple[int, ...]] = {
    "square": (16, 16), "tall": (24, 6), "wide": (5, 20), "square2": (16, 16), "bias": (7,), "gain": (),
}
MATRICES = [n for n, s in SHAPES.items() if len(s) == 2]
STEPS = 20


def tree_of(dtype: torch.dtype, seed: int, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    drawn = {n: torch.randn(s, generator=g, dtype=F64).to(dtype) for n, s in SHAPES.items()}
    return {n: drawn[n] for n in (names or list(SHAPES))}


def _torch_ns(g: torch.Tensor) -> torch.Tensor:
    return _zeropower_via_newtonschulz(g, NS_COEFFICIENTS, 5, 1e-7)


@pytest.mark.parametrize("adjust", [None, "original", "match_rms_adamw"])
def test_orthogonalize_is_torchs_newton_schulz_bit_for_bit(adjust: str | None) -> None:
    grads = tree_of(F32, 1)
    tx = gx.orthogonalize(adjust_lr_fn=adjust)
    out, state = tx.update(grads, tx.init(grads))
    assert state == gx.EmptyState()
    for n in MATRICES:
        ratio = _adjust_lr(1.0, adjust, grads[n].shape)
        want = _torch_ns(grads[n]).float()
        want = want * ratio if ratio != 1.0 else want
        assert out[n].dtype == F32 and torch.equal(out[n], want), n
    assert out["bias"] is grads["bias"] and out["gain"] is grads["gain"]


def _ns64(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """torch's iteration, op for op, in float64."""
    a, b, c = NS_COEFFICIENTS
    x = g.T if g.shape[0] > g.shape[1] else g
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x.T if g.shape[0] > g.shape[1] else x


def test_orthogonalize_in_float64_and_its_leaves() -> None:
    grads: dict[str, Any] = tree_of(F64, 2)
    grads["empty"] = torch.zeros(0, 3, dtype=F64)
    grads["none"] = None
    tx = gx.orthogonalize(ns_steps=7, ns_dtype=None)
    out, _ = tx.update(grads, tx.init({n: g for n, g in grads.items() if g is not None}))
    for n in MATRICES:
        ratio = math.sqrt(max(1, grads[n].shape[0] / grads[n].shape[1]))
        torch.testing.assert_close(out[n], _ns64(grads[n], 7) * ratio, rtol=0, atol=1e-12)
    assert out["empty"].shape == (0, 3) and out["none"] is None
    # the polar factor's singular values land near 1
    s = torch.linalg.svdvals(_ns64(grads["square"]))
    assert 0.6 < float(s.min()) and float(s.max()) < 1.3


@pytest.mark.parametrize("dtype, ns_dtype", [(F64, None), (F32, torch.bfloat16)])
def test_muon_under_vmap_equals_each_member(dtype: torch.dtype, ns_dtype: torch.dtype | None) -> None:
    """An ensemble of three: the same numbers as each member alone, bit for bit in bfloat16 (the
    batched iteration rounds each ``baddbmm`` once, as the eager one); in float64 to 1e-15 (vmap's
    ``baddbmm`` is a product and a sum)."""
    members = [tree_of(dtype, s, MATRICES + ["bias"]) for s in range(3)]
    stacked = {n: torch.stack([m[n] for m in members]) for n in members[0]}
    tx = gx.muon(lr=0.02, ns_dtype=ns_dtype)

    def one(g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        p = {n: torch.ones_like(x) for n, x in g.items()}
        return tx.update(g, tx.init(p), p)[0]

    got = torch.func.vmap(one)(stacked)
    for k, m in enumerate(members):
        want = one(m)
        for n in m:
            torch.testing.assert_close(got[n][k], want[n], rtol=0, atol=0 if dtype == F32 else 1e-15, msg=n)


def test_orthogonalize_under_vmap_is_each_member_to_a_bfloat16_ulp_for_larger_matrices() -> None:
    """At 64×64 the batched product sums its float32 terms in another order, so a bfloat16
    element of a member can round the other way, and the iteration carries it on: within two
    bfloat16 ulps (on a 2-core Intel Xeon, 12 of one member's 4,096 elements lie two ulps apart,
    the rest within one; every element of the other two members is equal)."""
    gen = torch.Generator().manual_seed(0)
    stacked = torch.randn(3, 64, 64, generator=gen)
    tx = gx.orthogonalize()

    def one(g: torch.Tensor) -> torch.Tensor:
        return tx.update({"w": g}, tx.init({"w": g}))[0]["w"]

    got = torch.func.vmap(one)(stacked)
    for k in range(3):
        want = one(stacked[k])
        torch.testing.assert_close(got[k], want, rtol=2**-7, atol=2**-8)


@pytest.mark.parametrize("dtype", [F32, F64])
@pytest.mark.parametrize("nesterov", [True, False])
def test_muon_momentum_is_torchs_lerp(dtype: torch.dtype, nesterov: bool) -> None:
    tx = gx.muon_momentum(0.95, nesterov)
    grads0 = tree_of(dtype, 0)
    state = tx.init(grads0)
    buf = {n: torch.zeros_like(g) for n, g in grads0.items()}
    for t in range(5):
        grads = tree_of(dtype, 10 + t)
        out, state = tx.update(grads, state)
        for n, g in grads.items():
            buf[n] = buf[n].lerp(g, 1 - 0.95)
            want = g.lerp(buf[n], 0.95) if nesterov else buf[n]
            tol = {"rtol": 0, "atol": 1e-15} if dtype == F64 else {"rtol": 2.5e-7, "atol": 1e-7}
            torch.testing.assert_close(state.momentum_buffer[n], buf[n], **tol)
            torch.testing.assert_close(out[n], want, **tol)
            buf[n] = state.momentum_buffer[n].clone()  # each step from the same buffer


def _reference(params: dict[str, torch.Tensor], **kw: Any) -> tuple[dict[str, torch.Tensor], torch.optim.Optimizer]:
    tensors = {n: p.clone().requires_grad_() for n, p in params.items()}
    return tensors, torch.optim.Muon(list(tensors.values()), **kw)


def _run_gx(how: str, tx: gx.GradientTransformation, params: dict[str, torch.Tensor],
            grads: list[dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], Any]:
    if how == "tx.update":
        state = tx.init(params)
        for g in grads:
            u, state = tx.update(g, state, params)
            params = gx.apply_updates(params, u)
        return params, None
    tensors = {n: p.clone().requires_grad_() for n, p in params.items()}
    opt = gx.Optimizer(list(tensors.items()), tx) if how == "optimizer" else gx.Optimizer(list(tensors.items()), tx, fused=False)
    for g in grads:
        for n, p in tensors.items():
            p.grad = g[n].clone()
        opt.step()
    return {n: p.detach() for n, p in tensors.items()}, opt


@pytest.mark.parametrize("how", ["tx.update", "optimizer", "fused=False"])
@pytest.mark.parametrize("dtype, nesterov, adjust", [
    (F32, True, None), (F32, False, "match_rms_adamw"), (F64, True, "original"), (F64, False, None),
])
def test_muon_equals_torch_muon(dtype: torch.dtype, nesterov: bool, adjust: str | None, how: str) -> None:
    params = tree_of(dtype, 0, MATRICES)
    grads = [tree_of(dtype, 100 + t, MATRICES) for t in range(STEPS)]
    kw = {"lr": 0.02, "momentum": 0.95, "nesterov": nesterov, "weight_decay": 0.1, "adjust_lr_fn": adjust}
    ref, opt = _reference(params, **kw)
    for g in grads:
        for n, p in ref.items():
            p.grad = g[n].clone()
        opt.step()
    got, ours = _run_gx(how, gx.muon(**kw), params, grads)
    if how == "optimizer":
        assert ours.engines == ["c" if native.compiler()[0] else "foreach"] and ours.fallback_reasons == [None]
    tol = 1e-5 if dtype == F64 else 5e-4  # bfloat16 roundings that flip (module docstring)
    for n in MATRICES:
        torch.testing.assert_close(got[n], ref[n].detach(), rtol=0, atol=tol)


def test_muon_with_adamw_for_the_other_params_equals_two_torch_optimizers() -> None:
    """``gx.partition`` of Muon (the matrices) and AdamW (the rest) on one ``gx.Optimizer`` ==
    ``torch.optim.Muon`` + ``torch.optim.AdamW``, fed the same gradients: AdamW's leaves to 5e-6
    (float32 rounding over 20 steps),
    Muon's within the bfloat16 flips of :func:`test_muon_equals_torch_muon`. (The whole step runs
    on the engine: the partition's two chains in one program, the iteration between its passes.)"""
    shapes = {"w1": (12, 6), "b1": (12,), "ln": (12,), "w2": (3, 12), "b2": (3,), "w3": (12, 12)}
    g = torch.Generator().manual_seed(3)
    params = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    grads = [{n: torch.randn(s, generator=g) for n, s in shapes.items()} for _ in range(STEPS)]
    label = lambda path, p: "muon" if p.ndim == 2 else "adamw"
    tx = gx.partition({"muon": gx.muon(lr=0.02, weight_decay=0.1),
                       "adamw": gx.adamw(lr=3e-3, weight_decay=0.01)}, label)
    ours = {n: p.clone().requires_grad_() for n, p in params.items()}
    theirs = {n: p.clone().requires_grad_() for n, p in params.items()}
    opt = gx.Optimizer(list(ours.items()), tx)
    refs = [torch.optim.Muon([p for p in theirs.values() if p.ndim == 2], lr=0.02, weight_decay=0.1),
            torch.optim.AdamW([p for p in theirs.values() if p.ndim != 2], lr=3e-3, weight_decay=0.01)]
    for grad in grads:
        for tensors in (ours, theirs):
            for n, p in tensors.items():
                p.grad = grad[n].clone()
        opt.step()
        for r in refs:
            r.step()
    assert opt.engines == ["c" if native.compiler()[0] else "foreach"] and opt.fallback_reasons == [None]
    for n, p in ours.items():
        torch.testing.assert_close(p, theirs[n], rtol=0, atol=5e-4 if p.ndim == 2 else 5e-6, msg=n)


def test_a_sharded_matrix_is_refused_naming_its_path() -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        grads = {"blocks": {"w": distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)])}, "b": torch.ones(4)}
        with pytest.raises(TypeError, match=r"'blocks\.w' is a DTensor"):
            gx.orthogonalize().update(grads, gx.EmptyState())
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("factory, kwargs, match", [
    (gx.orthogonalize, {"ns_steps": 100}, "below 100"),
    (gx.orthogonalize, {"ns_steps": -1}, "ns_steps"),
    (gx.orthogonalize, {"coefficients": (1.0, 2.0)}, "three numbers"),
    (gx.orthogonalize, {"adjust_lr_fn": "rms"}, "adjust_lr_fn"),
    (gx.orthogonalize, {"ns_dtype": torch.int32}, "ns_dtype"),
    (gx.muon_momentum, {"momentum": 1.5}, "momentum"),
    (gx.muon, {"weight_decay": -0.1}, "weight_decay"),
    (gx.muon, {"lr": -1.0}, "lr"),
])
def test_bad_arguments_name_themselves(factory: Any, kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises((ValueError, TypeError), match=match):
        factory(**kwargs)
