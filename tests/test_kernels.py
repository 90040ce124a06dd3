"""The Triton kernel step (``FusedStep(backend="triton")``) against the eager transforms.

On a machine without CUDA the kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``,
set here before Triton is imported); the same tests run the compiled kernels on a GPU (``-m gpu``
adds the CUDA-graph and large-tensor cases).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

pytest.importorskip("triton")

import grokxform as gx  # noqa: E402
from grokxform import tree as T  # noqa: E402
from grokxform.fused import FusedStep  # noqa: E402
from grokxform.kernels.spec import spec_of  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
INTERPRETED = DEVICE == "cpu"


def _params(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"wte.weight": (37, 5), "h.0.w": (3000,), "h.0.b": (4, 4), "h.1.w": (2100,), "h.1.b": (3,), "ln.w": (1,)}
    return {n: torch.randn(s, generator=g).to(DEVICE, dtype) for n, s in shapes.items()}


def _grads(params: dict[str, torch.Tensor], t: int, none: tuple[str, ...] = ()) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(100 + t)
    return {n: None if n in none else (torch.randn(p.shape, generator=g) * (1 + t)).to(DEVICE, p.dtype)
            for n, p in params.items()}


def _losses(t: int) -> dict[str, torch.Tensor]:
    return {"train_loss": torch.tensor(2.0 / (t + 1), device=DEVICE), "val_loss": torch.tensor(2.5, device=DEVICE)}


CASES = {
    "adamw": (lambda: gx.adamw(lr=1e-2, weight_decay=0.1), False),
    "adamw_masked": (lambda: gx.adamw(lr=gx.linear_warmup(1e-2, 3), weight_decay_mask=["*.w"]), False),
    "grokfast_ema": (lambda: gx.grokfast_ema(lr=1e-2, alpha=0.9), False),
    "grokfast_ema_coupled": (lambda: gx.grokfast_ema(lr=gx.linear_warmup(1e-2, 3), weight_decay=0.005,
                                                     weight_decay_mode="coupled"), False),
    "grokfast_ma": (lambda: gx.grokfast_ma(lr=1e-2, window_size=3), False),
    "grokfast_ma_sum": (lambda: gx.grokfast_ma(lr=1e-2, window_size=2, filter_type="sum", warmup=False), False),
    "grokfast_ma_bf16_window": (lambda: gx.grokfast_ma(lr=1e-2, window_size=3, window_dtype=torch.bfloat16), False),
    "grokfast_ma_coupled": (lambda: gx.grokfast_ma(lr=1e-2, window_size=3, weight_decay_mode="coupled"), False),
    "grokadamw": (lambda: gx.grokadamw(lr=gx.warmup_cosine_decay(1e-2, 2, 20), gradient_clipping=0.5), True),
    "grokadamw_noclip": (lambda: gx.grokadamw(lr=1e-2, gradient_clipping=0.0), True),
    "grokadamw_index": (lambda: gx.grokadamw(lr=1e-2, layer="index", weight_decay_mask=["h.*"]), True),
    "grokadamw_layer_fn": (lambda: gx.grokadamw(lr=1e-2, layer=lambda path, i: i % 3), True),
    "inject": (lambda: gx.inject_hyperparams(gx.grokadamw)(lr=gx.warmup_cosine_decay(1e-2, 2, 20), lamb=1.5,
                                                           weight_decay=0.05), True),
    "inject_ema": (lambda: gx.inject_hyperparams(gx.grokfast_ema)(lr=1e-2, alpha=0.95, eps=1e-6), False),
}


def _run(tx: gx.GradientTransformation, dtype: torch.dtype, steps: int, none_at=None, signal: bool = False,
         **kw):
    params = _params(dtype)
    p_e = dict(params)
    s_e = tx.init(p_e)
    p_f = {n: p.clone() for n, p in params.items()}
    fused = FusedStep(tx, p_f, backend="triton", **kw)
    for t in range(steps):
        g = _grads(params, t, (none_at or {}).get(t, ()))
        extra = _losses(t) if signal else {}
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
    eager's can move one bfloat16 rounding of g·scale, so there within one bfloat16 rounding of
    g (two in v, which holds g²)."""
    return {"rtol": 2**-6, "atol": 1e-5} if bf16 and not INTERPRETED else {"rtol": 1e-5, "atol": 1e-6}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_step_matches_eager(name: str, dtype: torch.dtype) -> None:
    make, signal = CASES[name]
    bf16 = dtype == torch.bfloat16
    # bfloat16 params are rounded as the eager ops round them: equal in the interpreter. On a GPU the
    # compiled scalar prologue (the clip factor's reduction order, libdevice maths) may differ from
    # eager's kernels in the last float32 bit; that can flip one bfloat16 rounding of θ + u, and
    # flips compound over steps, so there one step is compared, within one rounding.
    steps, none_at = (1, None) if bf16 and not INTERPRETED else (6, {2: ("h.1.w",), 3: ("h.1.w", "ln.w")})
    p_e, s_e, p_f, fused = _run(make(), dtype, steps, none_at, signal)
    assert fused.engine == "triton" and fused.compiles == (1 if steps == 1 else 3)  # one per None pattern
    _close(p_e, p_f, exact=bf16 and INTERPRETED, rtol=2**-7 if bf16 else 2e-6, atol=1e-4 if bf16 else 1e-6)
    _close(s_e, fused.eager_state(), exact=False, **_state_tol(bf16))


def test_ma_ring_wraps_many_times() -> None:
    p_e, s_e, p_f, fused = _run(gx.grokfast_ma(lr=1e-2, window_size=3), torch.float32, 11)
    _close(p_e, p_f, exact=False)
    _close(s_e, fused.eager_state(), exact=False)


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


def test_optimizer_fused_triton_follows_a_scheduler() -> None:
    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).to(DEVICE)

    a, b = model(), model()
    oa = gx.Optimizer(a.parameters(), gx.grokadamw, lr=1e-2, weight_decay=0.05)
    ob = gx.Optimizer(b.parameters(), gx.grokadamw, fused="triton", lr=1e-2, weight_decay=0.05)
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


@pytest.mark.parametrize(
    "make, why",
    [
        (lambda: gx.grokadamw_compat(lr=1e-2), "no kernel spec"),
        (lambda: gx.chain(gx.scale_by_adam(), gx.scale_by_learning_rate(1e-3)), "no kernel spec"),
        (lambda: gx.grokadamw(grokking_signal_fns=[lambda: 0.5]), "signal functions"),
    ],
)
def test_triton_backend_names_what_it_cannot_run(make, why: str) -> None:
    fused = FusedStep(make(), _params(torch.float32), backend="triton")
    with pytest.raises(ValueError, match=why):
        fused(_grads(_params(torch.float32), 0))


def test_float64_params_are_refused_by_the_kernels() -> None:
    params = {n: p.double() for n, p in _params(torch.float32).items()}
    fused = FusedStep(gx.adamw(), params, backend="triton")
    with pytest.raises(ValueError, match="dtypes"):
        fused({n: torch.ones_like(p) for n, p in params.items()})


def test_only_the_pipelines_carry_a_spec() -> None:
    assert spec_of(gx.grokadamw()) is not None and spec_of(gx.adamw()) is not None
    assert spec_of(gx.grokadamw_compat()) is None
    assert spec_of(gx.chain(gx.scale_by_adam())) is None


@pytest.mark.skipif(DEVICE != "cpu", reason="what backend='auto' does on the CPU")
def test_auto_on_the_cpu_never_picks_the_kernels() -> None:
    fused = FusedStep(gx.adamw(lr=1e-2), _params(torch.float32), backend="auto")
    assert fused._kernel_step((True,) * 6, [], (), []) is None
    assert "CUDA only" in fused.fallback_reason


# --------------------------------------------------------------------------------------------
# GPU: the compiled kernels, CUDA graphs, offsets past 2^31.


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("name", ["adamw", "grokfast_ema_coupled", "grokfast_ma", "grokadamw", "inject"])
def test_auto_uses_the_kernels_with_a_cuda_graph(name: str) -> None:
    make, signal = CASES[name]
    params = _params(torch.float32)
    tx = make()
    p_e, p_f = dict(params), {n: p.clone() for n, p in params.items()}
    s_e = tx.init(p_e)
    fused = FusedStep(tx, p_f)  # backend="auto"
    for t in range(8):
        g = _grads(params, t)  # new tensors each step: copied into the captured ones
        extra = _losses(t) if signal else {}
        u, s_e = tx.update(g, s_e, p_e, **extra)
        p_e = gx.apply_updates(p_e, u)
        fused(g, **extra)
    assert (fused.engine, fused.compiles, fused.captures) == ("triton", 1, 1)
    _close(p_e, p_f, exact=False)
    _close(s_e, fused.eager_state(), exact=False, rtol=1e-5)


@pytest.mark.gpu
@needs_cuda
def test_kernels_and_inductor_agree() -> None:
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", ["grokadamw", "inject", "grokfast_ma"])
def test_compiled_scalar_prologue_matches(name: str, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch) -> None:
    """The prologue as the GPU runs it: traced with make_fx and compiled by Inductor."""
    from grokxform.kernels import step as kstep

    monkeypatch.setattr(kstep, "COMPILE_PROLOGUE", True)
    make, signal = CASES[name]
    bf16 = dtype == torch.bfloat16
    p_e, s_e, p_f, fused = _run(make(), dtype, 1 if bf16 and not INTERPRETED else 5, None, signal)
    _close(p_e, p_f, exact=bf16 and INTERPRETED, rtol=2**-7 if bf16 else 2e-6, atol=1e-4 if bf16 else 1e-6)
    _close(s_e, fused.eager_state(), exact=False, **_state_tol(bf16))


def test_a_pipeline_built_inside_torch_compile_records_no_spec() -> None:
    """Building a transform in a traced function (a vmapped sweep does) must not write to the
    kernel registry, which Dynamo cannot trace."""

    @torch.compile(fullgraph=True, backend="eager")
    def f(x: torch.Tensor) -> torch.Tensor:
        gx.grokadamw(lr=1e-3)
        return x + 1

    assert torch.equal(f(torch.ones(2)), torch.full((2,), 2.0))
