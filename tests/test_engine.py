"""The engine (``FusedStep(backend="triton")``): any chain of declared transforms as generated
multi-tensor kernels, against the eager transforms.

On a machine without CUDA the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``,
set here before Triton is imported); the same tests run the compiled kernels on a GPU (``-m gpu``
adds the CUDA-graph, bit-for-bit and large-tensor cases).
"""

from __future__ import annotations

import os
import re
from typing import Any, NamedTuple

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

from cases import (  # noqa: E402
    PIPELINES, PRIMITIVES, ROUNDS_TWICE, Case, grad_tree, param_tree, same_bits, special_pairs, special_values,
)

import grokxform as gx  # noqa: E402
from grokxform import tree as T  # noqa: E402
from grokxform.elements import isfinite, isnan, maximum, minimum, sign, where  # noqa: E402
from grokxform.engine import native  # noqa: E402
from grokxform.engine import plan as P  # noqa: E402
from grokxform.fused import FusedStep  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
needs_c = pytest.mark.skipif(DEVICE != "cpu" or not native.compiler()[0],
                             reason="the C kernels run on the CPU, with a compiler")
INTERPRETED = DEVICE == "cpu"


# Leaves longer than a kernel block, and short ones.
SHAPES = {"wte.weight": (37, 5), "h.0.w": (3000,), "h.0.b": (4, 4), "h.1.w": (2100,), "h.1.b": (3,), "ln.w": (1,)}


def _params(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return param_tree(SHAPES, dtype=dtype, device=DEVICE)


def _grads(params: dict[str, torch.Tensor], t: int, none: tuple[str, ...] = ()) -> dict[str, torch.Tensor | None]:
    return grad_tree(params, t, scale=1 + t, none=none)


def _losses(t: int) -> dict[str, torch.Tensor]:
    return {"train_loss": torch.tensor(2.0 / (t + 1), device=DEVICE), "val_loss": torch.tensor(2.5, device=DEVICE)}


def _user_chain() -> gx.GradientTransformation:
    return gx.chain(
        gx.amplify(gx.ema_filter(0.95), 1.5), gx.clip_by_global_norm(1.0), gx.scale_by_adam(0.9, 0.98),
        gx.decoupled_weight_decay(0.01), gx.scale_by_learning_rate(1e-3),
    )


# The pipelines, then chains that no pipeline builds, and every combinator.
CASES: dict[str, Case] = {
    **PIPELINES,
    "user_chain": Case(_user_chain),
    "amplify_ma_then_clip": Case(lambda: gx.chain(gx.amplify(gx.ma_filter(2), 3.0), gx.clip_by_global_norm(0.5),
                                                  gx.scale_by_adam(), gx.scale_by_learning_rate(1e-2))),
    "two_clips": Case(lambda: gx.chain(gx.clip_by_tensor_norm(2.0), gx.scale_by_adam(), gx.clip_by_global_norm(0.1),
                                       gx.scale_by_learning_rate(1e-2))),
    "masked": Case(lambda: gx.chain(gx.scale_by_adam(), gx.masked(gx.decoupled_weight_decay(0.3), ["h.*"]),
                                    gx.masked(gx.amplify(gx.ema_filter(0.9), 2.0), lambda path, p: p.ndim >= 2),
                                    gx.scale_by_learning_rate(1e-2))),
    "partition": Case(lambda: gx.partition({"big": gx.grokadamw(lr=1e-2), "small": gx.adamw(lr=3e-2, weight_decay=0.0)},
                                           lambda path, p: "big" if p.numel() > 100 else "small"), signal=True),
    "multisteps": Case(lambda: gx.MultiSteps(gx.grokfast_ema(lr=1e-2), 2)),
    "apply_if_finite": Case(lambda: gx.apply_if_finite(gx.grokadamw(lr=1e-2)), signal=True),
    "named_schedule": Case(lambda: gx.named_chain(
        ("adam", gx.scale_by_adam(b1=gx.layerwise_beta(0.9, 0.2))),
        ("lr", gx.scale_by_learning_rate(gx.warmup_cosine_decay(1e-2, 1, 9))),
    )),
}


def _run(tx: gx.GradientTransformation, dtype: torch.dtype, steps: int, none_at=None, signal: bool = False,
         poison=None, backend: str = "triton", **kw):
    params = _params(dtype)
    p_e = dict(params)
    s_e = tx.init(p_e)
    p_f = {n: p.clone() for n, p in params.items()}
    fused = FusedStep(tx, p_f, backend=backend, **kw)
    for t in range(steps):
        g = _grads(params, t, (none_at or {}).get(t, ()))
        if poison is not None:
            poison(t, g)
        extra = _losses(t) if signal else {}
        with gx.kernels(False):  # the reference: torch's own ops
            u, s_e = tx.update(g, s_e, p_e, **extra)
        p_e = gx.apply_updates(p_e, u)
        fused(g, **extra)
    return p_e, s_e, p_f, fused


def _close(a, b, exact: bool, rtol: float = 2e-6, atol: float = 1e-6) -> None:
    la, sa = T.flatten(a)
    lb, sb = T.flatten(b)
    assert sa == sb
    for x, y in zip(la, lb):
        if not isinstance(x, torch.Tensor):
            assert x == y
        elif exact:
            assert torch.equal(x, y), (x - y).abs().max()
        else:
            torch.testing.assert_close(y, x, rtol=rtol, atol=atol)


def _state_tol(bf16: bool) -> dict[str, float]:
    """State built from bfloat16 gradients: on a GPU, a clip factor one float32 bit away from
    eager's (another reduction order) can move one bfloat16 rounding of g·scale, so there within
    one bfloat16 rounding of g (two in v, which holds g²)."""
    return {"rtol": 2**-6, "atol": 1e-5} if bf16 and not INTERPRETED else {"rtol": 1e-5, "atol": 1e-6}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_engine_matches_eager(name: str, dtype: torch.dtype) -> None:
    case = CASES[name]
    bf16 = dtype == torch.bfloat16
    # bfloat16 params are rounded as the eager ops round them: equal in the interpreter. On a GPU a
    # reduction (the clip's norm) sums in another order than eager, which can flip one bfloat16
    # rounding of θ + u, and flips compound over steps, so there one step is compared, within one
    # rounding. (Without a reduction the GPU is bit for bit too: test_gpu_bit_for_bit.)
    steps, none_at = (1, None) if bf16 and not INTERPRETED else (6, {2: ("h.1.w",), 3: ("h.1.w", "ln.w")})
    p_e, s_e, p_f, fused = _run(case.make(), dtype, steps, none_at, case.signal)
    assert fused.engine == "triton" and fused.compiles == (1 if steps == 1 else 3)  # one per None pattern
    _close(p_e, p_f, exact=bf16 and INTERPRETED, rtol=2**-7 if bf16 else 2e-6, atol=1e-4 if bf16 else 1e-6)
    _close(s_e, fused.eager_state(), exact=False, **_state_tol(bf16))


@pytest.mark.parametrize("knob, name", [
    *(("HOIST_LOADS", n) for n in ("grokfast_ma", "grokadamw", "user_chain", "apply_if_finite", "amplify_ma_then_clip")),
    *(("ROUNDING_IN_LINE", n) for n in ("grokadamw", "adamw", "grokfast_ma", "user_chain")),
])
def test_kernel_variants_give_the_same_numbers(knob: str, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Kernels whose element loads come first (``HOIST_LOADS``) or whose square roots and
    divisions run with no branch per element (``ROUNDING_IN_LINE``) give the plain kernels'
    params and state bit for bit (an MA window's ring too, over a wrap of its slots)."""
    from grokxform.engine import step as engine_step

    case = CASES[name]
    _, _, p_plain, plain = _run(case.make(), torch.float32, 6, {2: ("h.1.w",)}, case.signal)
    monkeypatch.setattr(engine_step, knob, True)
    _, _, p_variant, variant = _run(case.make(), torch.float32, 6, {2: ("h.1.w",)}, case.signal)
    assert variant.engine == "triton"
    _close(p_plain, p_variant, exact=True)
    _close(plain.eager_state(), variant.eager_state(), exact=True)


def test_rounding_in_line_replaces_the_element_roots_and_divisions() -> None:
    from grokxform.engine.codegen import rounding_in_line

    body = ["v1 = tl.sqrt_rn(x1 * s2)", "v2 = tl.div_rn(v1, tl.sqrt_rn(x3))", "v3 = tl.div_rn(1.0, v2)",
            "v4 = tl.sqrt(x5)", "v5 = (a / b)"]
    assert rounding_in_line(body) == ["v1 = sqrt_f32(x1 * s2)", "v2 = div_f32(v1, sqrt_f32(x3))", body[2], *body[3:]]


@pytest.mark.gpu
@needs_cuda
def test_in_line_roots_and_divisions_are_correctly_rounded() -> None:
    """``_lib.sqrt_f32`` equals ``tl.sqrt_rn`` on every float32 (NaN for NaN); ``_lib.div_f32``
    equals ``tl.div_rn`` on 2²⁹ pairs whose tile takes its fast sequence (|a| and |b| in
    [2⁻⁶⁰, 2⁶⁰), a = ±0) and on pairs of special values (NaN, ±inf, ±0, subnormals, extremes),
    whose tile takes ``tl.div_rn``: quotients near a midpoint, exact ones, and random ones."""
    import triton
    import triton.language as tl

    from grokxform.engine._lib import div_f32, sqrt_f32

    @triton.jit
    def roots(X, OUT, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        x = tl.load(X + offs)
        fast, plain = sqrt_f32(x), tl.sqrt_rn(x)
        same = fast.to(tl.int32, bitcast=True) == plain.to(tl.int32, bitcast=True)
        same = same | ((fast != fast) & (plain != plain))
        tl.store(OUT + offs, same.to(tl.int8))

    @triton.jit
    def quotients(A, B, OUT, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        a, b = tl.load(A + offs), tl.load(B + offs)
        fast, plain = div_f32(a, b), tl.div_rn(a, b)
        same = fast.to(tl.int32, bitcast=True) == plain.to(tl.int32, bitcast=True)
        same = same | ((fast != fast) & (plain != plain))
        tl.store(OUT + offs, same.to(tl.int8))

    n = 1 << 28
    out = torch.empty(n, dtype=torch.int8, device="cuda")
    for c in range(16):  # every bit pattern
        x = torch.arange(c * n, (c + 1) * n, dtype=torch.int64, device="cuda").to(torch.int32).view(torch.float32)
        roots[(n // 1024,)](x, out, BLOCK=1024)
        assert bool(out.all()), x[out == 0][:8].tolist()

    g = torch.Generator(device="cuda").manual_seed(0)

    def floats(m: int, lo: int = -60, hi: int = 59) -> torch.Tensor:
        e = torch.randint(lo + 127, hi + 128, (m,), device="cuda", generator=g)
        bits = (torch.randint(0, 2, (m,), device="cuda", generator=g) << 31) | (e << 23)
        bits |= torch.randint(0, 1 << 23, (m,), device="cuda", generator=g)
        return bits.to(torch.int32).view(torch.float32)

    m = 1 << 27
    for kind in ("random", "midpoints", "exact", "zeros"):
        a, b = floats(m), floats(m)
        if kind == "midpoints":  # a/b within float32 rounding of halfway between two float32s
            a = (b.double() * floats(m, -30, 30).double() * (1 + 2.0**-24)).float().clamp(-(2.0**59), 2.0**59)
            a = torch.where(a.abs() < 2.0**-60, 2.0**-60, a)
        elif kind == "exact":
            a = b * torch.randint(-4096, 4097, (m,), device="cuda", generator=g).float()
            a = torch.where((a.abs() >= 2.0**-60) & (a.abs() < 2.0**60) | (a == 0), a, 1.0)
        elif kind == "zeros":
            a = torch.where(torch.rand(m, device="cuda", generator=g) < 0.3, a * 0.0, a)
        o = torch.empty(m, dtype=torch.int8, device="cuda")
        quotients[(m // 256,)](a, b, o, BLOCK=256)
        assert bool(o.all()), (kind, a[o == 0][:4].tolist(), b[o == 0][:4].tolist())
    x, y = special_pairs(torch.float32, True)
    x, y = x.to("cuda"), y.to("cuda")
    k = len(x) // 256 * 256
    o = torch.empty(k, dtype=torch.int8, device="cuda")
    for a, b in ((x, y), (y, x)):
        quotients[(k // 256,)](a[:k].contiguous(), b[:k].contiguous(), o, BLOCK=256)
        assert bool(o.all())


def test_hoist_loads_moves_a_load_up_to_what_it_needs() -> None:
    from grokxform.engine.codegen import hoist_loads

    body = [
        "x1 = tl.load(pointer(T_G, leaf, tl.float32) + offs, mask=msk, other=0.0)",
        "tl.store(pointer(T_A, leaf, tl.float32) + offs, x1, mask=msk)",
        "s2 = tl.load(SC0 + 1)",
        "slot3 = s2.to(tl.int64)",
        "if slot3 == 3:",
        "    v4 = tl.load(pointer(T_B, leaf, tl.float32) + offs, mask=msk, other=0.0)",
        "    tl.store(pointer(T_C, leaf, tl.float32) + offs, v4, mask=msk)",
        "x5 = tl.load(pointer(T_A, leaf, tl.float32) + offs, mask=msk, other=0.0)",  # after A's store
        "x6 = tl.load((pointer(T_D, leaf, tl.float32) + slot3 * n) + offs, mask=msk, other=0.0)",  # after slot3
        "x7 = tl.load(pointer(T_E, leaf, tl.float32) + offs, mask=msk, other=0.0)",  # to the top
        "x8 = tl.load(pointer(T_C, leaf, tl.float32) + offs, mask=msk, other=0.0)",  # after C's store (indented)
    ]
    assert hoist_loads(body) == [body[0], body[9], body[1], body[7], body[2], body[3], body[8], *body[4:7], body[10]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_foreach_backend_is_eager_bit_for_bit(name: str, dtype: torch.dtype) -> None:
    """The engine's foreach backend (the optimizer's path where no kernel runs) runs the eager
    programs, scalar rules and reductions in place: the same numbers, bit for bit."""
    case = CASES[name]
    p_e, s_e, p_f, fused = _run(case.make(), dtype, 6, {2: ("h.1.w",), 3: ("h.1.w", "ln.w")}, case.signal,
                                backend="foreach")
    assert fused.engine == "foreach" and fused.compiles == 3
    _close(p_e, p_f, exact=True)
    _close(s_e, fused.eager_state(), exact=True)


def test_ma_ring_wraps_many_times() -> None:
    p_e, s_e, p_f, fused = _run(gx.grokfast_ma(lr=1e-2, window_size=3), torch.float32, 11)
    _close(p_e, p_f, exact=False)
    _close(s_e, fused.eager_state(), exact=False)


def test_apply_if_finite_skips_a_non_finite_step_in_the_kernels() -> None:
    def poison(t: int, g: dict) -> None:
        if t == 2:
            g["h.0.b"] = g["h.0.b"].clone()
            g["h.0.b"][1, 2] = float("inf")

    tx = gx.apply_if_finite(gx.grokadamw(lr=1e-2))
    p_e, s_e, p_f, fused = _run(tx, torch.float32, 5, signal=True, poison=poison)
    _close(p_e, p_f, exact=False)
    _close(s_e, fused.eager_state(), exact=False, rtol=1e-5, atol=1e-6)
    assert int(fused.state.total_notfinite) == 1 and int(fused.state.inner_state["adam"].count["h.0.w"]) == 4


def test_a_reduction_over_leaves_of_many_blocks() -> None:
    """Leaves longer than a block of either pass: the clip's norm sums every block of each leaf."""
    tx = gx.grokadamw(lr=1e-2, gradient_clipping=0.5)
    g = torch.Generator().manual_seed(5)
    params = {"h.0.w": torch.randn(9000, generator=g).to(DEVICE), "h.1.w": torch.randn(4097, generator=g).to(DEVICE),
              "b": torch.randn(3, generator=g).to(DEVICE)}
    p_e, p_f = dict(params), {n: p.clone() for n, p in params.items()}
    s_e = tx.init(p_e)
    fused = FusedStep(tx, p_f, backend="triton")
    for t in range(3):
        grads = {n: torch.randn(p.shape, generator=g).to(DEVICE) * (t + 1) for n, p in params.items()}
        u, s_e = tx.update(grads, s_e, p_e)
        p_e = gx.apply_updates(p_e, u)
        fused(grads)
    _close(p_e, p_f, exact=False)
    torch.testing.assert_close(fused.state["clip"].norm, s_e["clip"].norm, rtol=1e-6, atol=0)


def test_one_non_finite_leaf_leaves_the_others_clipped_as_eager() -> None:
    tx = gx.grokadamw(lr=1e-2, gradient_clipping=0.1)
    params = _params(torch.float32)
    p_e, p_f = dict(params), {n: p.clone() for n, p in params.items()}
    s_e = tx.init(p_e)
    fused = FusedStep(tx, p_f, backend="triton")
    g = _grads(params, 0)
    g["h.0.b"] = g["h.0.b"].clone()
    g["h.0.b"][1, 2] = float("nan")
    u, s_e = tx.update(g, s_e, p_e)
    p_e = gx.apply_updates(p_e, u)
    fused(g)
    for n in params:
        if n == "h.0.b":
            assert torch.isnan(p_f[n]).any()
        else:
            torch.testing.assert_close(p_f[n], p_e[n], rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(fused.state["clip"].scale, s_e["clip"].scale)
    assert torch.isnan(fused.state["clip"].norm)


@pytest.mark.parametrize("name, passes", [("adamw", 1), ("grokfast_ma", 1), ("grokadamw", 2), ("user_chain", 2),
                                          ("two_clips", 3), ("apply_if_finite", 3)])
def test_one_pass_over_memory_two_with_a_reduction(name: str, passes: int) -> None:
    """The step is one kernel per group of leaves, plus one before each reduction (the clip)."""
    _, _, _, fused = _run(CASES[name].make(), torch.float32, 1, signal=CASES[name].signal)
    (fn,) = fused._fns.values()
    assert fn.step.plan.passes == passes
    assert {p for grp in fn.step._groups for p in grp.kernels} == set(range(passes))


def _offset_by(tree: dict[str, torch.Tensor], elements: int) -> dict[str, torch.Tensor]:
    """Copies of ``tree``'s tensors that start ``elements`` elements into a buffer of their own."""
    out = {}
    for n, x in tree.items():
        buf = torch.zeros(x.numel() + elements, dtype=x.dtype, device=x.device)
        out[n] = buf[elements:].view(x.shape)
        out[n].copy_(x)
    return out


@pytest.mark.parametrize("params_offset", [0, 1])
@pytest.mark.parametrize("fmt", ["none", "int8"])
def test_tensors_not_16_byte_aligned_run_kernels_without_vector_access(fmt: str, params_offset: int) -> None:
    """A parameter or gradient 4 bytes into its buffer (a bucket view, a flat buffer's slice)
    turns ``ALIGNED`` off for its group, and back on when the tables point at aligned tensors
    again; the numbers are eager's either way (on a GPU a vector access there would fault). A
    CUDA graph captured under one setting is captured again when it changes."""
    tx = gx.grokadamw(lr=1e-2)
    if fmt != "none":
        tx = gx.compress_state(tx, fmt, min_size=64, block_size=64)
    params = _params(torch.float32)
    p_e, s_e = dict(params), tx.init(params)
    p_f = _offset_by(params, params_offset)
    fused = FusedStep(tx, p_f, backend="triton")
    seen, flags = [], []
    for t in range(6):
        g = _grads(params, t)
        with gx.kernels(False):
            u, s_e = tx.update(g, s_e, p_e)
        p_e = gx.apply_updates(p_e, u)
        fused(_offset_by(g, 1) if t % 2 else g)
        (fn,) = fused._fns.values()
        seen.append(set().union(*(grp.unaligned for grp in fn.step._groups)))
        flags.append(set(fn.step.launch_flags()))
    p = {"P"} if params_offset else set()
    assert seen == [p, p | {"G"}] * 3
    assert flags == ([{False}] * 6 if params_offset else [{True}, {False}] * 3)
    if fused.uses_cuda_graph:  # captured after the first call; again at each flip of the flags
        assert fused.captures == (1 if params_offset else 5)
    _close(p_e, p_f, exact=False)
    _close(s_e, fused.eager_state(), exact=False, rtol=1e-5, atol=1e-6)


def test_a_captured_step_is_captured_again_when_its_alignment_flags_change(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under a CUDA graph the kernels' ``ALIGNED`` argument is baked in: a replay runs only while the
    gradients give the flags it was captured with (here on any device, with a stand-in graph)."""
    from grokxform import fused as fused_module

    params = _params(torch.float32)
    fused = FusedStep(gx.adamw(1e-2), {n: p.clone() for n, p in params.items()}, backend="triton")
    fused(_grads(params, 0))  # built, not captured
    (fn,) = fused._fns.values()
    replays: list[set[bool]] = []
    captures: list[set[bool]] = []

    class Graph:
        def replay(self) -> None:
            replays.append(set(fn.launch_flags()))

    def capture(fn_: Any, grads: list[torch.Tensor], extras: list[torch.Tensor]) -> Any:
        fn_.prepare(grads)
        captures.append(set(fn_.launch_flags()))
        return fused_module._Captured(Graph(), list(grads), True, fused_module._launch_flags(fn_))

    monkeypatch.setattr(fused, "_capture", capture)
    monkeypatch.setattr(fused, "_cuda_graph", True)
    for t, offset in enumerate([1, 0, 0, 1, 1], start=1):
        fused(_offset_by(_grads(params, t), offset))
    assert captures == [{False}, {True}, {False}]
    assert replays == [{False}, {True}, {True}, {False}, {False}]


def test_optimizer_fused_triton_follows_a_scheduler() -> None:
    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(DEVICE)

    a, b = model(), model()
    oa = gx.Optimizer(a.named_parameters(), gx.grokadamw, fused=False, lr=1e-2, weight_decay=0.05)
    ob = gx.Optimizer(b.named_parameters(), gx.grokadamw, fused="triton", lr=1e-2, weight_decay=0.05)
    sa = torch.optim.lr_scheduler.StepLR(oa, 2, 0.5)
    sb = torch.optim.lr_scheduler.StepLR(ob, 2, 0.5)
    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    for t in range(7):
        for m, o, s in ((a, oa, sa), (b, ob, sb)):
            o.zero_grad()
            loss = m(x).square().mean()
            loss.backward()
            o.step(train_loss=loss.detach(), val_loss=torch.tensor(1.0, device=DEVICE))
            s.step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pb, pa, rtol=2e-6, atol=1e-6)
    fs = ob._fused_steps[0][1]
    assert fs.engine == "triton" and fs.compiles == 1


def test_optimizer_groups_share_the_clip_and_the_finite_check_in_the_kernels() -> None:
    """Two param groups: one clip norm over both and one finiteness check, in the kernels as eagerly."""
    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(DEVICE)

    def groups(m: torch.nn.Module) -> list[dict]:
        ps = list(m.parameters())
        return [{"params": ps[:2], "weight_decay": 0.1}, {"params": ps[2:], "weight_decay": 0.0}]

    runs = []
    for fused in (False, "triton"):
        m = model()
        def safe_grokadamw(weight_decay: float = 0.0) -> gx.GradientTransformation:
            return gx.apply_if_finite(gx.grokadamw(lr=1e-2, weight_decay=weight_decay, gradient_clipping=0.1))

        opt = gx.Optimizer(groups(m), safe_grokadamw, module=m, fused=fused)
        x = torch.randn(16, 6, generator=torch.Generator().manual_seed(3)).to(DEVICE)
        for t in range(4):
            opt.zero_grad()
            (m(x).square().mean() * 100).backward()
            if t == 2:
                list(m.parameters())[-1].grad[0] = float("inf")  # in the second group: no group steps
            opt.step()
        runs.append((m, opt))
    (ma, _), (mb, ob) = runs
    assert ob.engines == ["triton", "triton"]
    for pa, pb in zip(ma.parameters(), mb.parameters()):
        torch.testing.assert_close(pb, pa, rtol=2e-6, atol=1e-6)
    m = ob.metrics(floats=True)
    norms = sorted(k for k in m if k.endswith("clip/norm"))
    assert len(norms) == 2 and m[norms[0]] == m[norms[1]]
    assert [s.inner_state.total_notfinite.item() for s in ob.tx_states] == [1, 1]


def _own_update(updates, state, params=None, **extra):
    return gx.tree.tree_map(lambda g: None if g is None else g * 0.5, updates), state


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda: gx.inject_hyperparams(lambda lr: gx.chain(
            gx.scale_by_adam(), gx.GradientTransformation(lambda p: (), _own_update),
            gx.scale_by_learning_rate(lr)))(lr=1e-2), r"member 1 has no declaration"),
        (lambda: gx.grokadamw(grokking_signal_fns=[lambda: 0.5]), r"'grokfast'.*signal functions"),
    ],
)
def test_what_the_engine_cannot_run_is_named(make, why: str) -> None:
    tx = make()
    params = _params(torch.float32)
    with pytest.raises(ValueError, match=why):
        FusedStep(tx, params, backend="triton")(_grads(params, 0))
    auto = FusedStep(tx, {n: p.clone() for n, p in params.items()}, backend="auto")
    auto(_grads(params, 0))  # the compiled fallback runs it, and says why
    assert auto.engine == "inductor"
    if DEVICE == "cuda":
        assert re.search(why, auto.fallback_reason)


# --------------------------------------------------------------------------------------------
# The C kernels (the engine on the CPU): the same plan through another emitter.


def _norm_reduction(fused: FusedStep) -> bool:
    """Whether a step of ``fused`` sums squares (a norm) or other per-leaf sums: the one place where
    emitters may round differently (another summation order)."""
    # (a chain in parts: its engine parts; a member's own update sums nothing)
    steps = [part.step for fn in fused._fns.values() for part in getattr(fn, "parts", [fn]) if hasattr(part, "step")]
    return any(isinstance(r, P.Member) and ("norm" in r.decl.reduce or r.decl.sums is not None)
               for s in steps for r in s.plan.reductions)


@needs_c
@pytest.mark.parametrize("name, dtype", [
    *((n, d) for n in sorted(CASES) for d in (torch.float32, torch.bfloat16)),
    *((n, torch.float16) for n in ("adamw", "grokfast_ma", "user_chain", "multisteps")),
], ids=lambda v: {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}.get(v, v))
def test_c_kernels_equal_the_triton_kernels(name: str, dtype: torch.dtype) -> None:
    """The C and the Triton kernels are two emitters of one plan, each op IEEE's (correctly
    rounded division and square root, no fused multiply-add, 16-bit values rounded to nearest
    even): the same params and state bit for bit, over steps with several patterns of ``None``
    gradients; where the step sums a norm (the clip), within the rounding of that sum."""
    case = CASES[name]
    none_at = {2: ("h.1.w",), 3: ("h.1.w", "ln.w")}
    runs = [_run(case.make(), dtype, 6, none_at, case.signal, backend=b) for b in ("triton", "c")]
    (_, _, p_t, f_t), (_, _, p_c, f_c) = runs
    assert (f_t.engine, f_c.engine, f_c.compiles) == ("triton", "c", 3)
    exact = not _norm_reduction(f_c) and not case.draws_normals  # (normals: the C library's log/cos, Triton's)
    tol = {"rtol": 2e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2**-6, "atol": 1e-4}
    _close(p_t, p_c, exact=exact, **tol)
    _close(f_t.eager_state(), f_c.eager_state(), exact=exact, **tol)
    if name == "adamw":
        assert not exact or all(torch.equal(p_t[n], p_c[n]) for n in p_t)


@needs_c
@pytest.mark.parametrize("name", sorted(CASES))
def test_c_kernels_match_eager_in_float64(name: str) -> None:
    """float64 params (which the Triton kernels do not take) run in float64 in the C kernels:
    within the last bits of eager, whose CPU square root (MKL's, for large tensors) is not
    always correctly rounded."""
    case = CASES[name]
    p_e, s_e, p_f, fused = _run(case.make(), torch.float64, 6, {2: ("h.1.w",)}, case.signal, backend="c")
    assert fused.engine == "c"
    tol = {"rtol": 1e-7, "atol": 1e-9} if case.draws_normals else {"rtol": 1e-12, "atol": 1e-13}  # (float32 normals)
    _close(p_e, p_f, exact=False, **tol)
    _close(s_e, fused.eager_state(), exact=False, **tol)


def _assert_the_engine_runs_foreach(params: dict[str, torch.Tensor]) -> None:
    engine = FusedStep(gx.adamw(lr=1e-2), params, backend="engine")
    engine(_grads(params, 0))
    assert engine.engine == "foreach"


@pytest.mark.skipif(DEVICE != "cpu", reason="the engine on the CPU")
def test_without_a_c_compiler_the_engine_runs_foreach_and_says_why(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setattr(native, "_COMPILER", None)
    params = _params(torch.float32)
    with pytest.raises(ValueError, match=r"CC='/nonexistent/cc' was not found"):
        FusedStep(gx.adamw(lr=1e-2), params, backend="c")(_grads(params, 0))
    _assert_the_engine_runs_foreach(params)
    auto = FusedStep(gx.adamw(lr=1e-2), params, backend="auto", options={"combo_kernels": False})
    auto(_grads(params, 0))
    assert auto.engine == "inductor" and "CC='/nonexistent/cc'" in auto.fallback_reason
    model = torch.nn.Linear(3, 2)
    opt = gx.Optimizer(model.named_parameters(), gx.adamw, lr=1e-2)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    assert opt.engines == ["foreach"]


@needs_c
def test_kernels_that_do_not_compile_leave_the_engine_for_foreach(monkeypatch: pytest.MonkeyPatch) -> None:
    """A compiler that fails (here: an option it does not know) is reported with its message; the
    default engine then runs its foreach backend."""
    monkeypatch.setattr(native, "_FLAGS", [*native._FLAGS, "--no-such-option-for-grokxform"])
    params = _params(torch.float32)
    with pytest.raises(ValueError, match=r"did not compile.*no-such-option"):
        FusedStep(gx.adamw(lr=1e-2), params, backend="c")(_grads(params, 0))
    _assert_the_engine_runs_foreach(params)


@needs_c
def test_c_kernels_give_the_same_numbers_on_any_number_of_threads() -> None:
    """The work items are shared by torch's threads: one thread or four, the same params and
    state bit for bit (a clip's per-item sums included)."""
    shapes = {"a": (300_000,), "b": (517, 301), "c": (7,)}
    runs = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 4):
            torch.set_num_threads(n)
            params = param_tree(shapes)
            fused = FusedStep(gx.chain(gx.amplify(gx.ema_filter(0.9), 2.0), gx.clip_by_global_norm(0.1),
                                       gx.adamw(lr=1e-2)), params, backend="c")
            for t in range(3):
                fused(grad_tree(params, t))
            assert fused.engine == "c"
            step = next(iter(fused._fns.values())).step
            assert max(step._threads(g) for g in step._groups) == n
            runs.append((params, fused.eager_state()))
    finally:
        torch.set_num_threads(threads)
    _close(runs[0][0], runs[1][0], exact=True)
    _close(runs[0][1], runs[1][1], exact=True)


@needs_c
def test_auto_on_the_cpu_runs_the_c_kernels() -> None:
    params = _params(torch.float32)
    auto = FusedStep(gx.adamw(lr=1e-2), params, backend="auto")
    auto(_grads(params, 0))
    assert auto.engine == "c" and auto.fallback_reason is None


# --------------------------------------------------------------------------------------------
# abs, sign, minimum, maximum, comparisons and predicates: the kernels give eager's bits.


class _MomentumState(NamedTuple):
    mu: Any


def _zeros_state(params: Any) -> _MomentumState:
    return _MomentumState(T.tree_map(torch.zeros_like, params))


def _sign_momentum_rule(v, sc):
    c = v.mu * sc.b1 + v.x * sc.one_minus_b1
    return {"out": sign(c), "mu": v.mu * sc.b2 + v.x * sc.one_minus_b2}


def _sign_momentum(b1: float = 0.9, b2: float = 0.99) -> gx.GradientTransformation:
    """A toy Lion: u = sign(β1·m + (1−β1)·g), m ← β2·m + (1−β2)·g."""
    return gx.base.elementwise(
        "sign_momentum", _sign_momentum_rule, init=_zeros_state,
        scalars=lambda ctx: ({"b1": b1, "one_minus_b1": 1 - b1, "b2": b2, "one_minus_b2": 1 - b2}, {}),
        state_type=_MomentumState, fields=("mu",),
    )


def _clip_rule(v, sc):
    return {"out": where(isnan(v.x), 0.0, minimum(maximum(sc.low, v.x), sc.high))}


def _clip_elementwise(c: float) -> gx.GradientTransformation:
    """u = clip(g, −c, c) with NaN → 0 (c a 0-d tensor, −c a number)."""
    return gx.base.elementwise(
        "clip_elementwise", _clip_rule,
        # (torch.full, not torch.tensor: no host-to-device copy, which a CUDA graph cannot capture)
        scalars=lambda ctx: ({"low": -c, "high": torch.full((), c, dtype=torch.float64, device=ctx.device)}, {}),
    )


_PROBES = ("abs", "sign", "min", "max", "min_0", "max_neg0", "clip", "min_twice", "min_tensors", "max_numbers",
           "min_tensor", "max_number", "lt", "le", "gt", "ge", "eq", "ne", "finite", "nan", "flag")


class _ProbeState(NamedTuple):
    abs: Any
    sign: Any
    min: Any
    max: Any
    min_0: Any
    max_neg0: Any
    clip: Any
    min_twice: Any
    min_tensors: Any
    max_numbers: Any
    min_tensor: Any
    max_number: Any
    lt: Any
    le: Any
    gt: Any
    ge: Any
    eq: Any
    ne: Any
    finite: Any
    nan: Any
    flag: Any


def _probe_rule(v, sc):
    """Each op's result kept in a state field of its own (a zero's sign shows there), against the
    param (a value), numbers on either side and every kind of scalar."""
    x, p = v.x, v.param
    twice = ROUNDS_TWICE[torch.bfloat16]
    return {
        "out": where(isfinite(x), x, 0.0),
        "abs": abs(x), "sign": sign(x), "min": minimum(x, p), "max": maximum(p, x),
        "min_0": minimum(x, 0.0), "max_neg0": maximum(-0.0, x), "clip": minimum(maximum(x, -0.5), 0.5),
        "min_twice": minimum(twice, x), "min_tensors": minimum(x, sc.t), "max_numbers": maximum(sc.n, x),
        "min_tensor": minimum(x, sc.z), "max_number": maximum(x, sc.f),
        "lt": where(x < p, x, p), "le": where(x <= sc.t, x, p), "gt": where(x > twice, x, p),
        "ge": where((x >= twice) | (ROUNDS_TWICE[torch.float16] <= x), x, p), "eq": where(x == sc.f, x, p),
        "ne": where((x != p) & ~isnan(p) | (x == -0.0), x, p), "finite": where(isfinite(x), x, 0.1),
        "nan": where(isnan(x) | ~isfinite(p), -2.5, x), "flag": where(sc.on, minimum(x, p), x),
    }


def _probe() -> gx.GradientTransformation:
    made: dict[Any, dict[str, torch.Tensor]] = {}  # the device constants, made on the first (uncaptured) step

    def scalars(ctx: Any) -> tuple[dict, dict]:
        n = ctx.n
        if (n, ctx.device) not in made:
            made[(n, ctx.device)] = {
                "t": torch.tensor([ROUNDS_TWICE[torch.bfloat16], -0.0, 0.0, float("nan"), 0.5, -1.0][:n],
                                  dtype=torch.float64, device=ctx.device),
                "z": torch.tensor(-0.0, dtype=torch.float64, device=ctx.device),
                "on": torch.tensor([True, False, True, True, False, True][:n], device=ctx.device),
            }
        return {**made[(n, ctx.device)], "n": [0.0, -0.0, 0.1, -0.5, 0.0, 2.5][:n], "f": ROUNDS_TWICE[torch.float16]}, {}

    return gx.base.elementwise(
        "probe", _probe_rule, init=lambda params: _ProbeState(*(T.tree_map(torch.zeros_like, params) for _ in _PROBES)),
        scalars=scalars, state_type=_ProbeState, fields=_PROBES, needs_params=True,
    )


OP_CASES = {
    "sign_momentum": lambda: gx.chain(_sign_momentum(), gx.scale_by_learning_rate(1e-2)),
    "clip_elementwise": lambda: gx.chain(_clip_elementwise(0.5), gx.scale_by_learning_rate(1e-2)),
    "probe": lambda: gx.chain(_probe(), gx.scale_by_learning_rate(1e-2)),
}
_C = pytest.mark.skipif(DEVICE != "cpu" or not native.compiler()[0], reason="the C kernels run on the CPU, with a compiler")


@pytest.mark.parametrize("backend, dtype", [
    *(("triton", d) for d in (torch.float32, torch.bfloat16, torch.float16)),
    *(pytest.param("c", d, marks=_C) for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)),
    *(("foreach", d) for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64)),
], ids=lambda v: {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}.get(v, v))
@pytest.mark.parametrize("name", sorted(OP_CASES))
def test_new_ops_in_the_kernels_are_eager_bit_for_bit(name: str, backend: str, dtype: torch.dtype) -> None:
    """Declared primitives that use the new ops (a sign of an interpolation, an elementwise clip,
    and a probe of every op) over gradients and params holding every pair of special values
    (NaN, ±inf, ±0, subnormals, numbers a 16-bit dtype rounds twice): the Triton kernels, the C
    kernels and the foreach backend give the eager params and state, bit for bit (NaNs where
    eager has them). Triton's interpreter flushes bfloat16 subnormals to zero when it widens them
    to float32 (its own float conversion; a GPU shifts the bits), so its bfloat16 case has no
    value that is or becomes subnormal."""
    tx = OP_CASES[name]()
    subnormals = not (backend == "triton" and dtype == torch.bfloat16 and INTERPRETED)
    x, y = special_pairs(dtype, subnormals)
    params = _params(dtype)
    params["h.0.w"][: len(y)] = y.to(DEVICE)
    p_e, p_f = dict(params), {n: p.clone() for n, p in params.items()}
    s_e = tx.init(p_e)
    fused = FusedStep(tx, p_f, backend=backend)
    for t in range(3):
        g = _grads(params, t)
        g["h.0.w"][: len(x)] = (x if t != 1 else y.flip(0)).to(DEVICE)
        g["h.0.b"] = torch.tensor(special_values(dtype, subnormals)[-16:], dtype=dtype, device=DEVICE).reshape(4, 4)
        u, s_e = tx.update(g, s_e, p_e)
        p_e = gx.apply_updates(p_e, u)
        fused(g)
    assert fused.engine == backend
    for a, b in ((p_e, p_f), (s_e, fused.eager_state())):
        la, sa = T.flatten(a)
        lb, sb = T.flatten(b)
        assert sa == sb
        bad = [path for path, u, v in zip(T.path_names(a), la, lb) if not same_bits(u, v)]
        assert not bad, bad


# --------------------------------------------------------------------------------------------
# GPU: the compiled kernels, CUDA graphs, exactness, offsets past 2^31.


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", sorted(n for n, c in PRIMITIVES.items() if gx.declarations.declaration_of(c.make())))
def test_every_declared_primitive_runs_in_a_cuda_graph(name: str) -> None:
    """Each declared primitive, before a learning rate, runs captured in a CUDA graph: its scalar
    rule makes its device values on the device (a copy from the host would fail the capture)."""
    case = PRIMITIVES[name]
    params = _params(torch.float32)
    tx = gx.chain(case.make(), gx.scale_by_learning_rate(1e-2))
    fused = FusedStep(tx, {n: p.clone() for n, p in params.items()})
    for t in range(4):
        fused(_grads(params, t), **(_losses(t) if case.signal else {}))
    assert (fused.engine, fused.captures) == ("triton", 1)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", ["adamw", "grokfast_ema_coupled", "grokfast_ma", "grokadamw", "inject_grokadamw",
                                  "user_chain", "multisteps", "partition"])
def test_auto_uses_the_engine_with_a_cuda_graph(name: str) -> None:
    case = CASES[name]
    params = _params(torch.float32)
    tx = case.make()
    p_e, p_f = dict(params), {n: p.clone() for n, p in params.items()}
    s_e = tx.init(p_e)
    fused = FusedStep(tx, p_f)  # backend="auto"
    for t in range(8):
        g = _grads(params, t)  # new tensors each step: read where they are
        extra = _losses(t) if case.signal else {}
        with gx.kernels(False):  # the reference: torch's own ops
            u, s_e = tx.update(g, s_e, p_e, **extra)
        p_e = gx.apply_updates(p_e, u)
        fused(g, **extra)
    assert (fused.engine, fused.compiles, fused.captures) == ("triton", 1, 1)
    _close(p_e, p_f, exact=False)
    _close(s_e, fused.eager_state(), exact=False, rtol=1e-5)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["adamw", "grokfast_ema", "grokfast_ma_coupled", "inject_grokfast_ema", "masked"])
def test_gpu_bit_for_bit(name: str, dtype: torch.dtype) -> None:
    """Without a reduction, every op of the kernel rounds as the eager CUDA op does: equal."""
    p_e, s_e, p_f, fused = _run(CASES[name].make(), dtype, 6, {2: ("h.1.w",)})
    _close(p_e, p_f, exact=True)
    _close(s_e, fused.eager_state(), exact=True)


@pytest.mark.gpu
@needs_cuda
def test_engine_and_inductor_agree() -> None:
    tx = gx.grokadamw(lr=gx.warmup_cosine_decay(1e-2, 3, 30))
    params = _params(torch.float32)
    a = FusedStep(tx, {n: p.clone() for n, p in params.items()}, backend="triton")
    b = FusedStep(tx, {n: p.clone() for n, p in params.items()}, backend="inductor")
    for t in range(30):
        g, x = _grads(params, t), _losses(t)
        a(g, **x)
        b(g, **x)
    _close(b.params, a.params, exact=False, rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
@needs_cuda
def test_ring_offsets_beyond_int32() -> None:
    """A 22M-element leaf with a 100-slot window: slot offsets pass 2^31 elements."""
    n, w = 22_000_000, 100
    tx = gx.grokfast_ma(lr=1e-3, window_size=w, window_dtype=torch.bfloat16)
    p = torch.zeros(n, device="cuda")
    fused = FusedStep(tx, {"w": p}, backend="triton")
    gen = torch.Generator(device="cuda").manual_seed(0)
    last = None
    for t in range(w + 2):
        g = torch.randn(n, device="cuda", generator=gen)
        fused({"w": g})
        if t >= 2:  # the oldest stored gradient, last slot included
            last = g
    ring = fused.state["grokfast"].window.buffers["w"]
    count = int(fused.state["grokfast"].count["w"])
    newest = (count - 1) % w
    assert torch.equal(ring[newest], last.to(torch.bfloat16))
    assert ring[w - 1].abs().sum() > 0


def test_a_pipeline_built_inside_torch_compile_works() -> None:
    """Building a transform in a traced function (a vmapped sweep does) records its declaration
    on a function object only; Dynamo traces it."""

    @torch.compile(fullgraph=True, backend="eager")
    def f(x: torch.Tensor) -> torch.Tensor:
        gx.grokadamw(lr=1e-3)
        return x + 1

    assert torch.equal(f(torch.ones(2)), torch.full((2,), 2.0))


# --------------------------------------------------------------------------------------------
# A chain with a member the engine cannot run: the declared runs on the engine, that member between.


def _plain_scale(c: float) -> gx.GradientTransformation:
    """An optax-style transform without a declaration (a counter in its state)."""

    def init(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"n": torch.zeros((), dtype=torch.int64, device=DEVICE)}

    def update(u, s, params=None, **extra):
        return {k: None if v is None else v * c for k, v in u.items()}, {"n": s["n"] + 1}

    return gx.GradientTransformation(init, update)


PARTS = {
    "middle": (lambda: gx.chain(gx.clip_by_global_norm(1.0), _plain_scale(0.5), gx.grokadamw(lr=1e-2)),
               ["{k}", "tx.update", "{k}"], True),
    "last": (lambda: gx.chain(gx.adamw(lr=1e-2), _plain_scale(0.5)), ["{k}", "tx.update"], False),
    "first_of_nested": (lambda: gx.chain(gx.chain(_plain_scale(2.0), gx.grokfast_ma(lr=1e-2, window_size=3)),
                                         gx.scale_by_learning_rate(0.5)), ["tx.update", "{k}"], False),
}


@pytest.mark.parametrize("name, backend", [
    *((n, b) for n in sorted(PARTS) for b in ("triton", "foreach")
      if not (b == "triton" and INTERPRETED and n == "middle")),  # (the interpreter is slow: two chains cover it)
    *(pytest.param(n, "c", marks=needs_c) for n in sorted(PARTS)),
])
def test_a_member_without_a_declaration_runs_between_engine_steps(name: str, backend: str) -> None:
    """The runs of declared members before and after it stay on the engine; the member runs its
    own ``update`` between them, its state written back in place. The numbers are eager's (bit
    for bit on the foreach backend), over patterns of ``None`` gradients; ``engine`` and
    ``fallback_reason`` name the parts."""
    make, parts, signal = PARTS[name]
    p_e, s_e, p_f, fused = _run(make(), torch.float32, 5, {2: ("h.1.w",)}, signal, backend=backend)
    assert fused.engine == "+".join(p.format(k=backend) for p in parts)
    assert fused.compiles == 2 and "has no declaration: it runs its own update" in fused.fallback_reason
    _close(p_e, p_f, exact=backend == "foreach", rtol=2e-5, atol=1e-6)
    _close(s_e, fused.eager_state(), exact=backend == "foreach", rtol=2e-5, atol=1e-6)
    counters = [x for x in T.flatten(fused.state)[0] if isinstance(x, torch.Tensor) and x.dtype == torch.int64]
    assert counters and max(int(c.max()) for c in counters) == 5


def test_the_optimizer_runs_a_chain_in_parts_and_says_which_member_runs_its_own_update() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(DEVICE)
    twin = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).to(DEVICE)
    twin.load_state_dict(model.state_dict())
    make = lambda: gx.chain(gx.clip_by_global_norm(1.0), _plain_scale(0.5), gx.adamw(lr=1e-2))  # noqa: E731
    opts = [gx.Optimizer(model.named_parameters(), make()), gx.Optimizer(twin.named_parameters(), make(), fused=False)]
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        x, y = torch.randn(4, 5, generator=g).to(DEVICE), torch.randn(4, 3, generator=g).to(DEVICE)
        for m, opt in zip((model, twin), opts):
            opt.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            opt.step()
    kernel = "triton" if DEVICE == "cuda" else "c" if native.compiler()[0] else "foreach"
    assert opts[0].engines == [f"{kernel}+tx.update+{kernel}"]
    assert opts[0].fallback_reasons == ["member [0][1] has no declaration: it runs its own update"]
    assert int(opts[0].tx_states[0][1]["n"]) == int(opts[1].tx_states[0][1]["n"]) == 4
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=1e-6)


def test_a_member_that_drops_an_update_is_named() -> None:
    def init(params):
        return ()

    def update(u, s, params=None, **extra):
        return {k: None for k in u}, s

    params = _params(torch.float32)
    fused = FusedStep(gx.chain(gx.scale_by_learning_rate(2.0), gx.GradientTransformation(init, update), gx.scale_by_learning_rate(0.5)), params,
                      backend="foreach")
    with pytest.raises(ValueError, match=r"member \[1\] returned no update for a leaf that has a gradient"):
        fused(_grads(params, 0))


@pytest.mark.parametrize("backend", ["triton", pytest.param("c", marks=needs_c)])
def test_a_member_that_returns_a_view_runs_between_engine_steps(backend: str) -> None:
    """An update returned as a non-contiguous view (a matrix transposed twice, as a
    Newton–Schulz step may leave it) reaches the next engine part as its values."""

    def view(v: torch.Tensor) -> torch.Tensor:
        return (v * 3.0).mT.contiguous().mT if v.dim() == 2 else v * 3.0

    def update(u, s, params=None, **extra):
        return {k: None if v is None else view(v) for k, v in u.items()}, s

    own = gx.GradientTransformation(lambda params: (), update)
    tx = gx.chain(gx.scale(2.0), own, gx.scale_by_learning_rate(0.5))
    params = _params(torch.float32)
    p_e, p_f = dict(params), {n: p.clone() for n, p in params.items()}
    fused = FusedStep(tx, p_f, backend=backend)
    g = _grads(params, 0)
    with gx.kernels(False):
        u, _ = tx.update(g, tx.init(p_e), p_e)
    fused(g)
    assert fused.engine == f"{backend}+tx.update+{backend}"
    _close(gx.apply_updates(p_e, u), p_f, exact=True)
