"""Counter-based random numbers of the element language (``uniform``, ``normal``): the reference
hash, and the same streams on every backend (one leaf at a time under vmap and torch.compile,
foreach, the Triton kernels in the interpreter, the C kernels), up to whole optimizer steps.

On a machine without CUDA the Triton kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``,
set here before Triton is imported)."""

from __future__ import annotations

import functools
import os
from typing import Any, NamedTuple

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import grokxform as gx  # noqa: E402
from grokxform import _common as C  # noqa: E402
from grokxform import tree as T  # noqa: E402
from grokxform.elements import (  # noqa: E402
    ScalarRef, Scalars, TracedRule, counter_bits, counter_dither, counter_normal, counter_uniform, leaf_keys, mix32,
    normal, random_like, run_foreach, run_leaf, uniform,
)
from grokxform.engine import functional, native  # noqa: E402
from grokxform.fused import FusedStep  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_c = pytest.mark.skipif(DEVICE != "cpu" or not native.compiler()[0],
                             reason="the C kernels run on the CPU, with a compiler")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}
SHAPES = {"one": (1,), "odd": (1023,), "two_blocks": (5, 205), "many": (5000,)}
"""Leaves of 1, 1023, 1025 and 5000 elements: shorter than a kernel block, and across blocks."""
KEYS = (0, 1, 2**32 - 1, 3_000_000_019)
"""One key per leaf: the ends of the range, and a key above 2³¹."""


@functools.cache
def _reference(key: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference uniforms and normals of elements 0..n−1 under ``key`` (float32)."""
    u = torch.tensor([counter_uniform(key, i) for i in range(n)], dtype=torch.float32)
    z = torch.tensor([counter_normal(key, i) for i in range(n)], dtype=torch.float32)
    return u, z


def _assert_within_ulps(got: torch.Tensor, want: torch.Tensor, ulps: int = 4) -> None:
    """``got`` within ``ulps`` float32 ulp of ``want`` (elementwise)."""
    got, want = got.to(torch.float32).flatten(), want.flatten()
    spacing = torch.nextafter(want.abs(), torch.tensor(float("inf"))) - want.abs()
    off = (got - want).abs() / spacing
    assert torch.isfinite(got).all() and off.max() <= ulps, (off.max().item(), off.argmax().item())


# --------------------------------------------------------------------------------------------
# The reference hash.


def test_the_reference_hash_has_its_constants() -> None:
    """Hard-coded values: a change of a constant or of the round structure is a new stream."""
    assert (mix32(0), mix32(1), mix32(0xFFFFFFFF)) == (0, 1753845952, 1734902346)
    assert [counter_bits(0, 0), counter_bits(1, 0), counter_bits(0, 1), counter_bits(2**32 - 1, 2**40 + 5)] == [
        1106484830, 1786511181, 2680090525, 4121554711]
    assert counter_uniform(0, 0) == 4322206 * 2.0**-24
    assert counter_uniform(123456789, 1000) == 0.8905118107795715
    assert counter_normal(0, 0) == float.fromhex("-0x1.9515bcp-5")
    assert counter_normal(123456789, 1000) == float.fromhex("-0x1.313136p-5")
    assert counter_bits(2**32 + 7, 3) == counter_bits(7, 3)  # a key is taken modulo 2³²
    assert counter_bits(5, 2**32 + 3) != counter_bits(5, 3)  # the index's high word is mixed in


def test_uniforms_are_24_bit_fractions_in_the_unit_interval() -> None:
    us = [counter_uniform(key, i) for key in (0, 7, 2**32 - 1) for i in range(20_000)]
    assert min(us) >= 0.0 and max(us) < 1.0
    assert all((u * 2**24).is_integer() for u in us)
    assert max(us) > 1 - 1e-3 and min(us) < 1e-3  # the whole interval is reached
    assert len(set(us)) > 0.99 * len(us)


def test_the_dither_is_uniform_over_keys_and_even_over_elements() -> None:
    """:func:`counter_dither`: each element's value uniform over keys (an unbiased stochastic
    rounding), one key's values a shifted Weyl sequence (spread evenly), the eager values equal to
    the reference."""
    assert counter_dither(0, 0) == 4792828 * 2.0**-24 and counter_dither(123456789, 1000) == 0.1521090865135193
    assert counter_dither(2**32 + 7, 3) == counter_dither(7, 3)  # a key is taken modulo 2³²
    assert counter_dither(5, 2**32 + 3) != counter_dither(5, 3)  # the index's high word is mixed in
    over_keys = torch.tensor([counter_dither(k, 17) for k in range(20_000)])
    assert abs(over_keys.mean().item() - 0.5) < 0.01 and abs(over_keys.var().item() - 1 / 12) < 0.003
    assert torch.histc(over_keys, 10, 0.0, 1.0).min() > 1_800  # (2,000 a bin)
    one_key = random_like("dither", torch.zeros(100_000), 11)
    assert one_key.tolist()[:50] == [counter_dither(11, i) for i in range(50)]
    assert torch.histc(one_key, 100, 0.0, 1.0).sub(1_000).abs().max() <= 2  # (far more even than independent draws)
    assert not torch.equal(one_key, random_like("dither", torch.zeros(100_000), 12))


def test_the_streams_of_keys_and_leaves_differ_and_repeat() -> None:
    prog = TracedRule(lambda v, sc: {"out": uniform(sc.key)}).program({"x": torch.float32})
    x = torch.zeros(10_000)

    def draw(key: Any) -> torch.Tensor:
        return run_leaf(prog, {"x": x}, Scalars({"key": key}, 1), 0)["out"]

    a, b, c = draw(5), draw(6), draw(2**32 - 5)
    assert torch.equal(a, draw(5)) and torch.equal(a, draw(torch.tensor(5)))
    assert (a == b).float().mean() < 1e-3 and (a == c).float().mean() < 1e-3
    # uniform and normal of one key are independent streams: no correlation to speak of
    both = TracedRule(lambda v, sc: {"u": uniform(sc.key), "z": normal(sc.key)}).program({"x": torch.float32})
    got = run_leaf(both, {"x": torch.zeros(100_000)}, Scalars({"key": 5}, 1), 0)
    assert abs(torch.corrcoef(torch.stack([got["u"], got["z"]]))[0, 1]) < 0.02
    # per-leaf keys: a new key for every leaf and every step, the same for the same (seed, step, leaf)
    steps = torch.arange(1000, dtype=torch.int64)
    keys = torch.stack([leaf_keys(3, steps, [j] * 1000) for j in (0, 1, 17)])
    assert keys.dtype == torch.int64 and 0 <= keys.min() and keys.max() < 2**32
    assert keys.unique().numel() == keys.numel()
    assert torch.equal(keys[2], leaf_keys(3, steps, [17] * 1000))
    assert torch.equal(leaf_keys(3, torch.tensor([4, 9]), [1, 17]), torch.stack([keys[1, 4], keys[2, 9]]))
    assert not torch.equal(leaf_keys(4, steps, [0] * 1000), keys[0])
    assert leaf_keys(2**64 - 1, torch.tensor(2**40), [0, 1]).shape == (2,)
    with pytest.raises(ValueError, match="seed"):
        leaf_keys(-1, steps, [0])


def test_the_language_takes_a_key_that_is_a_scalar_of_the_rule() -> None:
    with pytest.raises(TypeError, match="scalar of the rule"):
        TracedRule(lambda v, sc: {"out": uniform(3)}).program({"x": torch.float32})
    with pytest.raises(TypeError, match="inside an element rule"):
        normal(ScalarRef("key"))
    prog = TracedRule(lambda v, sc: {"out": v.x + normal(sc.key).to(v.x.dtype)}).program({"x": torch.bfloat16})
    assert [(op.kind, op.args, op.dtype) for op in prog.ops[:1]] == [("normal", (0, ScalarRef("key")), torch.float32)]


# --------------------------------------------------------------------------------------------
# Every backend: the reference bits.


class _DrawState(NamedTuple):
    u: Any
    z: Any


def _draw_rule(v, sc):
    return {"out": v.x, "u": uniform(sc.key), "z": normal(sc.key)}


DRAWS = TracedRule(_draw_rule)


def _key_scalar(kind: str, index: list[int], device: Any) -> Any:
    """The leaves' keys as each kind of scalar: an int64 tensor per leaf, a float64 tensor per
    leaf, a list of numbers, one number for every leaf."""
    keys = [KEYS[i] for i in index]
    if kind == "int64":
        return C.constant_vector(tuple(float(k) for k in keys), device).to(torch.int64)
    if kind == "float64":
        return C.constant_vector(tuple(float(k) for k in keys), device)
    return keys if kind == "numbers" else KEYS[2]


def _draws(kind: str) -> gx.GradientTransformation:
    """A primitive that passes the update through and stores a uniform and a normal per element."""
    return gx.base.elementwise(
        "draws", _draw_rule, init=lambda params: _DrawState(*(T.tree_map(
            lambda p: torch.zeros(p.shape, dtype=torch.float32, device=p.device), params) for _ in range(2))),
        scalars=lambda ctx: ({"key": _key_scalar(kind, ctx.index, ctx.device)}, {}),
        state_type=_DrawState, fields=("u", "z"),
    )


def _leaves(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {name: torch.linspace(-1, 1, torch.Size(s).numel(), dtype=dtype, device=DEVICE).reshape(s)
            for name, s in SHAPES.items()}


def _run(backend: str, dtype: torch.dtype, kind: str) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """The uniforms and normals of every leaf, and its key, as ``backend`` draws them."""
    params = _leaves(dtype)
    names = list(T.path_names(params))
    xs = [params[n] for n in names]
    keys = [KEYS[i] if kind != "number" else KEYS[2] for i in range(len(xs))]
    if backend in ("leaf", "foreach"):
        sc = Scalars({"key": _key_scalar(kind, list(range(len(xs))), torch.device(DEVICE))}, len(xs))
        prog = DRAWS.program({"x": dtype})
        if backend == "foreach":
            got = run_foreach(prog, {"x": xs}, sc, list(range(len(xs))))
            return got["u"], got["z"], keys
        outs = [run_leaf(prog, {"x": x}, sc, i) for i, x in enumerate(xs)]
        return [o["u"] for o in outs], [o["z"] for o in outs], keys
    fused = FusedStep(_draws(kind), {n: p.clone() for n, p in params.items()}, backend=backend)
    fused({n: p.clone() for n, p in params.items()})
    assert fused.engine == backend
    state = fused.eager_state()
    return [state.u[n] for n in names], [state.z[n] for n in names], keys


BACKENDS = [
    *((b, d) for b in ("leaf", "foreach") for d in DTYPES),
    *(pytest.param("triton", d, id=f"triton-{d}") for d in ("fp32", "bf16", "fp16")),  # (no float64 in Triton)
    *(pytest.param("c", d, marks=needs_c, id=f"c-{d}") for d in DTYPES),
]


@pytest.mark.parametrize("kind", ["int64", "float64", "numbers", "number"])
@pytest.mark.parametrize("backend, dtype", BACKENDS)
def test_every_backend_draws_the_reference_streams(backend: str, dtype: str, kind: str) -> None:
    """Uniforms bit for bit, normals within 4 ulp of the reference, for leaves of odd sizes in
    every dtype (the value's dtype only gives the shape), with keys from every kind of scalar."""
    if backend == "triton":
        pytest.importorskip("triton")
    us, zs, keys = _run(backend, DTYPES[dtype], kind)
    for u, z, key, shape in zip(us, zs, keys, SHAPES.values()):
        want_u, want_z = _reference(key, torch.Size(shape).numel())
        assert u.dtype == torch.float32 and u.shape == shape and z.shape == shape
        assert torch.equal(u.cpu().flatten(), want_u), (backend, key, shape)
        _assert_within_ulps(z.cpu(), want_z)


def test_normals_have_the_moments_of_a_standard_normal() -> None:
    """Over 10⁶ draws of one key (fixed numbers, so no chance failure): the mean, the standard
    deviation and the mass within one and two σ of a standard normal, each within about five
    standard errors; a uniform, or a normal of another scale, is far outside."""
    prog = TracedRule(lambda v, sc: {"u": uniform(sc.key), "z": normal(sc.key)}).program({"x": torch.float32})
    got = run_leaf(prog, {"x": torch.zeros(1000, 1000)}, Scalars({"key": 20240601}, 1), 0)
    z = got["z"].double()
    assert abs(z.mean()) < 5e-3 and abs(z.std() - 1) < 5e-3
    assert abs((z.abs() < 1).double().mean() - 0.682689) < 2.5e-3
    assert abs((z.abs() < 2).double().mean() - 0.954500) < 1.5e-3
    assert z.abs().max() < 6.0
    u = got["u"].double()
    assert abs(u.mean() - 0.5) < 1.5e-3 and abs(u.var() - 1 / 12) < 1e-3


# --------------------------------------------------------------------------------------------
# One leaf at a time under torch.func.vmap and torch.compile.


def test_run_leaf_under_vmap_draws_per_example_streams() -> None:
    """Under vmap each example is a leaf: its element indices are its own, and a batched key
    gives each example its stream."""
    prog = DRAWS.program({"x": torch.float32})
    keys = torch.tensor([5, 2**32 - 1, 77])

    def draw(x: torch.Tensor, key: Any) -> tuple[torch.Tensor, torch.Tensor]:
        got = run_leaf(prog, {"x": x}, Scalars({"key": key}, 1), 0)
        return got["u"], got["z"]

    u, z = torch.func.vmap(draw)(torch.zeros(3, 7, 5), keys)
    same_u, _ = torch.func.vmap(draw, in_dims=(0, None))(torch.zeros(3, 7, 5), 77)
    for b, key in enumerate(keys.tolist()):
        want_u, want_z = _reference(key, 35)
        assert torch.equal(u[b].flatten(), want_u) and torch.equal(same_u[b].flatten(), _reference(77, 35)[0])
        _assert_within_ulps(z[b], want_z)


def test_run_leaf_under_torch_compile_draws_the_same_bits() -> None:
    prog = DRAWS.program({"x": torch.bfloat16})

    @torch.compile(fullgraph=True, backend="inductor")
    def draw(x: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        got = run_leaf(prog, {"x": x}, Scalars({"key": key}, 1), 0)
        return got["u"], got["z"]

    for key in (3_000_000_019, 9):
        u, z = draw(torch.zeros(1025, dtype=torch.bfloat16), torch.tensor(key, dtype=torch.int64))
        want_u, want_z = _reference(key, 1025)
        assert torch.equal(u, want_u)
        _assert_within_ulps(z, want_z)


# --------------------------------------------------------------------------------------------
# End to end: a primitive that adds noise, in the optimizer and in the pure update.


class _NoiseState(NamedTuple):
    count: Any


def _noise(draw: Any, sigma: float = 0.5, seed: int = 1234) -> gx.GradientTransformation:
    """u = g + σ·draw(key), a new key per leaf and step (:func:`leaf_keys` of the leaf's count)."""

    def rule(v, sc):
        return {"out": v.x + (draw(sc.key) * sc.sigma).to(v.x.dtype)}

    return gx.base.elementwise(
        "noise", rule, init=lambda params: _NoiseState(C.counters_like_tree(params)),
        scalars=lambda ctx: ({"key": leaf_keys(seed, ctx.counts, ctx.index), "sigma": sigma}, {}),
        state_type=_NoiseState, count="count",
    )


def _grads(params: dict[str, torch.Tensor], t: int) -> dict[str, torch.Tensor]:
    return {n: torch.full_like(p, 0.01 * (t + 1)) for n, p in params.items()}


@pytest.mark.skipif(DEVICE == "cpu" and not native.compiler()[0], reason="the engine's C kernels need a compiler")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("draw", [uniform, normal], ids=["uniform", "normal"])
def test_the_optimizer_and_the_pure_update_add_the_same_noise(draw: Any, dtype: torch.dtype) -> None:
    """``gx.Optimizer`` on the engine's kernels (C on the CPU; Triton in a CUDA graph on CUDA,
    the keys computed inside the captured step) and on foreach, and ``tx.update`` on the kernels
    and op by op: the same params over three steps (uniform noise bit for bit, normal noise within
    its few ulp), and a new draw at every step."""
    shapes = {"w": (37, 29), "b": (1025,), "s": (1,)}
    start = {n: torch.linspace(-1, 1, torch.Size(s).numel(), dtype=dtype, device=DEVICE).reshape(s)
             for n, s in shapes.items()}
    runs: dict[str, dict[str, torch.Tensor]] = {}
    for fused in (None, "foreach"):
        params = {n: torch.nn.Parameter(p.clone()) for n, p in start.items()}
        opt = gx.Optimizer(list(params.items()), _noise(draw), fused=fused)
        for t in range(3):
            for n, p in params.items():
                p.grad = _grads(start, t)[n]
            opt.step()
        engine = "foreach" if fused else "c" if DEVICE == "cpu" else "triton"
        assert opt.engines == [engine]
        runs[f"optimizer-{engine}"] = {n: p.detach() for n, p in params.items()}
    for kernels in (True, False):
        tx = _noise(draw)
        params, state, steps = dict(start), tx.init(start), []
        if kernels:  # (None: the pure update runs on the kernels)
            assert functional.explain(tx, _grads(start, 0), state, params) is None
        for t in range(3):
            with gx.kernels(kernels):
                u, state = tx.update(_grads(start, t), state, params)
            params = gx.apply_updates(params, u)
            steps.append(u)
        runs[f"update-kernels-{kernels}"] = params
        assert not any(torch.equal(steps[0][n], steps[1][n] - 0.01) for n in ("w", "b"))
    want = runs["update-kernels-False"]
    for name, got in runs.items():
        for n in shapes:
            if draw is uniform:
                assert torch.equal(got[n], want[n]), (name, n)
            elif dtype == torch.float32:
                torch.testing.assert_close(got[n], want[n], rtol=1e-6, atol=1e-6, msg=f"{name} {n}")
            else:  # a noise a few float32 ulp apart rounds to bfloat16 alike, or one bit off
                assert (got[n] != want[n]).float().mean() < 0.01, (name, n)
                torch.testing.assert_close(got[n], want[n], rtol=2**-6, atol=2**-6, msg=f"{name} {n}")
