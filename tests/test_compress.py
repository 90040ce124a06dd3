"""compress_state: the codecs' error bounds, every path agreeing, purity, resume, memory."""

from __future__ import annotations

import contextlib
import io
import math
import warnings
from collections.abc import Iterator

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import grokxform as gx
from grokxform import _memory
from grokxform.engine.functional import explain
from grokxform.transforms.compress import Bf16Pair, Int8Blocks, bytes_per_element, decode, encode
from grokxform.transforms import compress

FORMATS = ("bf16", "bf16_sr", "int8")


def _params(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(40, 30, generator=g), "b": torch.randn(30, generator=g)}


def _grads(step: int, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return {k: torch.randn(v.shape, generator=g) for k, v in like.items()}


def _tensors(tree: object) -> list[torch.Tensor]:
    return [x for x in torch.utils._pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


# -- the codecs ------------------------------------------------------------------------------


def test_bf16_keeps_16_significand_bits() -> None:
    x = torch.randn(10_000) * torch.exp2(torch.randint(-40, 40, (10_000,)).float())
    d = decode(encode(x, "bf16"))
    assert ((d - x).abs() <= x.abs() * 2.0**-16).all()
    assert torch.equal(decode(encode(d, "bf16")), d)  # idempotent
    special = torch.tensor([float("inf"), -float("inf"), 0.0, -0.0])
    assert torch.equal(decode(encode(special, "bf16")), special)
    assert decode(encode(torch.tensor([3.4e38]), "bf16")).isfinite().all()
    assert decode(encode(torch.tensor([float("nan")]), "bf16")).isnan().all()


def test_bf16_sr_is_unbiased_within_one_ulp() -> None:
    x = torch.full((4096,), 1.0 + 2.0**-9)  # a quarter of a bfloat16 ulp above 1
    d = torch.stack([decode(encode(x, "bf16_sr", key=k)) for k in range(8)])
    assert set(d.unique().tolist()) == {1.0, 1.0 + 2.0**-7}
    assert abs(d.mean().item() - x[0].item()) < 2.0**-13
    assert torch.equal(decode(encode(x, "bf16_sr", key=3)), decode(encode(x, "bf16_sr", key=3)))


@pytest.mark.parametrize("block_size", [256, 100])
def test_int8_block_bounds(block_size: int) -> None:
    """A signed element codes the nearest code (within half a code of the block's scale, the same
    whatever the key); an unsigned one one of the two codes around it (within one code of the
    fourth root of value/max, not always the nearer); a code point stays."""
    x = torch.randn(1000) * torch.linspace(0.01, 10.0, 1000)
    p = encode(x, "int8", block_size=block_size, key=5)
    assert p.codes.dtype == torch.int8 and p.codes.shape == x.shape
    assert p.scales.shape == (math.ceil(1000 / block_size),)
    d = decode(p, block_size)
    scale = p.scales.repeat_interleave(block_size)[:1000] / 127
    assert ((d - x).abs() <= scale * 0.5 * (1 + 1e-5)).all()
    assert torch.equal(encode(x, "int8", block_size=block_size, key=6).codes, p.codes)
    assert all(torch.equal(a, b) for a, b in zip(encode(d, "int8", block_size=block_size, key=6), p))  # coded again: the same
    v = x * x
    q = encode(v, "int8", nonnegative=True, block_size=block_size, key=5)
    assert q.codes.dtype == torch.uint8
    dv = decode(q, block_size)
    top = q.scales.repeat_interleave(block_size)[:1000]
    gap = (dv.pow(0.25) - v.pow(0.25)).abs()
    assert (gap <= top.pow(0.25) / 255 * (1 + 1e-5)).all()
    assert (gap > top.pow(0.25) / 255 * 0.5 * (1 + 1e-5)).any()  # (not always the nearest: stochastic)
    assert all(torch.equal(a, b) for a, b in zip(encode(dv, "int8", nonnegative=True, block_size=block_size, key=6), q))
    assert torch.equal(decode(encode(torch.zeros(7), "int8")), torch.zeros(7))
    nan = x.clone()
    nan[3] = float("nan")
    got = decode(encode(nan, "int8", block_size=block_size), block_size)
    assert got[:block_size].isnan().all() and not got[block_size:].isnan().any()


def test_int8_second_moment_rounds_stochastically_without_bias() -> None:
    """A value of the unsigned code between two codes takes the upper one with the probability of
    its distance from the lower one, in the value's own units (though the codes are not evenly
    spaced): the mean of many codings is the value. A second moment that moves by less than half a
    code a step (an EMA with β₂ near 1) therefore still moves on average; rounding to nearest (the
    signed code's) holds it."""
    top = torch.tensor([1.0])
    lo, hi = torch.tensor([100.0 / 255.0]) ** 4, torch.tensor([101.0 / 255.0]) ** 4
    x = torch.cat([top, lo + 0.3 * (hi - lo), torch.zeros(254)]).repeat(64)
    d = torch.stack([decode(encode(x, "int8", nonnegative=True, key=k)) for k in range(64)])
    mid = d.reshape(64, 64, 256)[:, :, 1]
    assert mid.unique().tolist() == pytest.approx([lo.item(), hi.item()], rel=1e-5)  # the two codes around it
    assert abs(mid.mean().item() - x[1].item()) < 0.03 * (hi - lo).item()
    assert torch.equal(encode(x, "int8", nonnegative=True, key=3).codes,
                       encode(x, "int8", nonnegative=True, key=3).codes)  # a key gives the same codes
    assert not torch.equal(encode(x, "int8", nonnegative=True, key=3).codes,
                           encode(x, "int8", nonnegative=True, key=4).codes)

    def decayed(nonnegative: bool) -> float:  # 255 values decayed 1% a step for 100 steps, coded after each
        v = torch.cat([top, torch.full((255,), 0.3)])  # (under half a code a step near 0.3)
        for k in range(100):
            v = torch.cat([top, 0.99 * decode(encode(v, "int8", nonnegative=nonnegative, key=k))[1:]])
        return v[1:].mean().item()

    assert decayed(True) == pytest.approx(0.3 * 0.99**100, rel=0.03)
    assert decayed(False) > 0.29  # (rounded to nearest: held)


def test_int8_small_values_code_safely() -> None:
    """Where m and v are both far below their blocks' scales, Adam's direction m/√v from the codes
    stays bounded: a signed value below half a code codes 0 (a stochastic code would give it a
    whole code, many times its value), and a positive second moment codes at least 1 (never 0,
    where m/(√v + ε) would grow by up to 1/ε)."""
    m = torch.cat([torch.ones(1), torch.full((255,), 1e-5)])
    v = torch.cat([torch.ones(1), torch.full((255,), 1e-30)])
    for k in range(32):
        assert (encode(m, "int8", key=k).codes[1:] == 0).all()
        assert (encode(v, "int8", nonnegative=True, key=k).codes[1:] == 1).all()
    assert (encode(torch.zeros(256), "int8", nonnegative=True, key=1).codes == 0).all()


def test_int8_code_below_needs_only_a_guess_of_the_root() -> None:
    """The unsigned code's lower neighbour is the largest c ≤ 254 with f(c) ≤ q, found exactly
    from any fourth root that is off by less than 1/64 of a code below or 0.98 above (a GPU's
    approximate roots): checked against a search of f's table on every code's value and its
    float32 neighbours, and on values spread over [0, 1]."""
    table = compress._fourth(torch.arange(256, dtype=torch.float32))
    near = torch.cat([table, torch.nextafter(table, torch.ones(())), torch.nextafter(table, torch.zeros(()))])
    spread = torch.rand(200_000, generator=torch.Generator().manual_seed(0)) ** 4
    q = torch.cat([near, spread, torch.tensor([0.0, 1e-45, 1e-38, 1.0])]).clamp(0.0, 1.0)
    want = (torch.searchsorted(table, q, right=True) - 1).clamp(max=254).to(torch.float32)
    exact = q.double() ** 0.25
    for off in (0.0, -0.0155, 0.97, 0.5, -0.01):
        root = (exact + off / 255.0).clamp(min=0.0).to(torch.float32)
        lo, below, above = compress._code_below(q, root)
        assert torch.equal(lo, want), off
        assert torch.equal(below, table[want.long()]) and torch.equal(above, table[want.long() + 1])
    lo, _, _ = compress._code_below(q, (exact - 0.03 / 255.0).clamp(min=0.0).to(torch.float32))
    assert not torch.equal(lo, want)  # (a guess off by more than the slack misses)


def test_int8_unsigned_code_is_the_earlier_derivations() -> None:
    """The unsigned code, found from a guess of the fourth root and a dead zone of u, is the code
    of the earlier derivation (⌊√√q·255⌋ from correctly rounded roots, a snap to a code within
    2⁻¹² of t), which the quality results measured: the two differ only where t lies within
    about 2⁻¹² of a code and u within 2⁻¹² of 0 or 1, none among these 4,000,000 codings."""
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(1_000_000, generator=g) * torch.rand(1_000_000, generator=g) ** 4) ** 2
    q = compress._scaled(x, 256, True)[0].clamp(0.0, 1.0)
    t = q.sqrt().sqrt() * 255.0
    lo = torch.floor(t).clamp(max=254.0)
    below, above = compress._fourth(lo), compress._fourth(lo + 1.0)
    near = torch.round(t)
    for key in range(4):
        u = compress._blocks(compress.random_like("dither", x, key), 256)
        old = torch.where((t - near).abs() < 2.0**-12, near, lo + (u * (above - below) < q - below).to(torch.float32))
        old = torch.where(q > 0.0, old.clamp(min=1.0), old)
        assert torch.equal(encode(x, "int8", nonnegative=True, key=key).codes, compress._unblock(old, x).to(torch.uint8))


def test_int8_decoded_state_codes_again_to_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    """A decoded value coded again keeps its code whatever the key (a step that a wrapper skips
    re-codes the old state): it lies within a few roundings of its code, inside the code's dead
    zone (u held within [2⁻¹², 1 − 2⁻¹²]; the signed code rounds to nearest). Without the dead
    zone, stochastic rounding moves a few codes in ten million."""
    x = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0)) * torch.linspace(0.0, 1.0, 1_000_000) ** 3

    def moved(keys: int) -> int:
        n = 0
        for nonnegative, v in ((False, x), (True, x * x)):
            p = encode(v, "int8", nonnegative=nonnegative, key=1)
            for k in range(keys):
                again = encode(decode(p), "int8", nonnegative=nonnegative, key=7 + k)
                assert torch.equal(again.scales, p.scales)
                n += int((again.codes != p.codes).sum())
        return n

    assert moved(20) == 0
    monkeypatch.setattr(compress, "DEAD_ZONE", 0.0)
    assert moved(20) > 0


class _Ops(TorchDispatchMode):
    """Records the aten ops that run."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[object] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.seen.add(func.overloadpacket)
        return func(*args, **(kwargs or {}))


def test_int8_codec_divides_by_no_number() -> None:
    """On CUDA torch divides by a number (``x / 127.0``) as a multiplication by its reciprocal,
    which the kernels' correctly rounded division does not match: the codec divides nothing but
    takes a tensor's reciprocal and multiplies, the same numbers on every device and kernel."""
    x = torch.randn(1000)
    with _Ops() as ops:
        for nonnegative in (False, True):
            decode(encode(x * x if nonnegative else x, "int8", nonnegative=nonnegative, block_size=64), 64)
    assert torch.ops.aten.reciprocal in ops.seen
    assert not ops.seen & {torch.ops.aten.div, torch.ops.aten.div_, torch.ops.aten.true_divide, torch.ops.aten.pow}


@contextlib.contextmanager
def _no_view_batching() -> Iterator[None]:
    """vmap as torch 2.11 has it: no batching rule for ``Tensor.view(dtype)``."""
    lib = torch.library.Library("aten", "IMPL")

    def refuse(*args: object, **kwargs: object) -> torch.Tensor:
        raise RuntimeError("Batching rule not implemented for aten::view.dtype")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (it overrides torch's rule)
        lib.impl("view.dtype", refuse, "FuncTorchBatched")
    try:
        yield
    finally:
        lib._destroy()


@pytest.mark.parametrize("fmt", ["bf16", "bf16_sr"])
def test_bit_casts_map_under_vmap_without_a_view_batching_rule(fmt: str) -> None:
    x = torch.randn(3, 500) * torch.exp2(torch.randint(-20, 20, (3, 500)).float())
    with _no_view_batching():
        with pytest.raises(RuntimeError, match="view.dtype"):
            torch.func.vmap(lambda t: t.view(torch.int32))(x)
        packed = torch.func.vmap(lambda t: encode(t, fmt, key=5))(x)
        back = torch.func.vmap(decode)(packed)
    for i in range(3):
        one = encode(x[i], fmt, key=5)
        assert all(torch.equal(a[i], b) for a, b in zip(packed, one))
        assert torch.equal(back[i], decode(one))


# -- the wrapper -----------------------------------------------------------------------------


def _chains() -> dict[str, gx.GradientTransformation]:
    return {
        "adamw": gx.adamw(1e-2, weight_decay=0.1),
        "grokfast_ma": gx.grokfast_ma(1e-2, window_size=4, lamb=2.0),
        "grokadamw": gx.grokadamw(1e-2),
    }


def _run(tx: gx.GradientTransformation, steps: int, params: dict[str, torch.Tensor]) -> tuple[dict, object]:
    state = tx.init(params)
    for t in range(steps):
        u, state = tx.update(_grads(t, params), state, params)
        params = gx.apply_updates(params, u)
    return params, state


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["adamw", "grokfast_ma", "grokadamw"])
def test_eager_kernels_and_vmap_agree(fmt: str, name: str) -> None:
    tx = gx.compress_state(_chains()[name], fmt, min_size=64, block_size=64)
    params = _params()
    state = tx.init(params)
    why = explain(_chains()[name], _grads(0, params), _chains()[name].init(params), params)
    assert why is None if name != "grokfast_ma" else "ring layout" in why  # the kernels run the decoded state
    with gx.kernels(False):
        p_eager, s_eager = _run(tx, 9, params)
    p_kern, s_kern = _run(tx, 9, params)
    for a, b in zip(_tensors((p_eager, s_eager)), _tensors((p_kern, s_kern))):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert (a.to(torch.int32) - b.to(torch.int32)).abs().max() <= 1
    batch = {k: torch.stack([v, v * 0.5]) for k, v in params.items()}

    def step(p: dict, s: object, g: dict) -> tuple:
        u, s = tx.update(g, s, p)
        return gx.apply_updates(p, u), s

    with _no_view_batching():  # (as on torch 2.11)
        states = torch.func.vmap(tx.init)(batch)
        for t in range(9):
            g = _grads(t, params)
            batch, states = torch.func.vmap(step)(batch, states, {k: torch.stack([v, v]) for k, v in g.items()})
    del state
    one = {k: v[0] for k, v in batch.items()}
    for k in params:
        torch.testing.assert_close(one[k], p_eager[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fmt", FORMATS)
def test_window_decodes_its_oldest_slot(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A step decodes a compressed window's oldest slot only, and the whole window on the step
    that re-sums it; under vmap too, where the members step together."""
    import grokxform.transforms.compress as compress

    tx = gx.compress_state(gx.ma_filter(window_size=5), fmt, min_size=64, block_size=64)
    params = {"w": _params()["w"]}  # (one compressed leaf)
    decoded: list[int] = []
    real = compress.decode
    monkeypatch.setattr(compress, "decode", lambda *a, **k: decoded.append(1) or real(*a, **k))

    def step(g: dict, s: object) -> tuple:
        return tx.update(g, s, params)

    state = tx.init(params)
    batch = torch.func.vmap(tx.init)({k: torch.stack([v, v]) for k, v in params.items()})
    for t in range(10):
        g = _grads(t, params)
        for mapped in (False, True):
            decoded.clear()
            if mapped:
                _, batch = torch.func.vmap(step)({k: torch.stack([v, -v]) for k, v in g.items()}, batch)
            else:
                _, state = step(g, state)
            # oldest slot + the new slot's decode(encode(g)); a re-sum: every slot
            assert len(decoded) == (5 + 1 if t % 5 == 4 else 2), (t, mapped, len(decoded))


@pytest.mark.parametrize("fmt", FORMATS)
def test_update_is_pure(fmt: str) -> None:
    tx = gx.compress_state(gx.grokfast_ma(1e-2, window_size=3), fmt, min_size=64, block_size=64)
    params = _params()
    state = tx.init(params)
    for t in range(2):
        _, state = tx.update(_grads(t, params), state, params)
    before = [x.clone() for x in _tensors(state)]
    grads = _grads(5, params)
    g_before = {k: v.clone() for k, v in grads.items()}
    u1, s1 = tx.update(grads, state, params)
    u2, s2 = tx.update(grads, state, params)
    assert all(torch.equal(a, b) for a, b in zip(before, _tensors(state)))
    assert all(torch.equal(grads[k], g_before[k]) for k in grads)
    assert all(torch.equal(a, b) for a, b in zip(_tensors((u1, s1)), _tensors((u2, s2))))
    assert not any(a is b for a in _tensors(u1) for b in _tensors(s1))


@pytest.mark.parametrize("fmt", FORMATS)
def test_window_sum_matches_the_decoded_slots(fmt: str) -> None:
    w = 5
    tx = gx.compress_state(gx.ma_filter(window_size=w), fmt, min_size=64, block_size=64)
    params = {"w": _params()["w"]}
    state = tx.init(params)
    for t in range(3 * w + 2):
        _, state = tx.update(_grads(t, params), state, params)
        if t < w:
            continue
        for k in params:
            slots = torch.stack([decode(s[k], 64).double() for s in state.inner.window]).sum(0)
            torch.testing.assert_close(state.inner.total[k].double(), slots, rtol=0, atol=4e-6 * w)
            if (t + 1) % w == 0:  # the re-sum: exactly the decoded slots' sum
                assert torch.equal(state.inner.total[k], slots.float())


def test_what_is_compressed() -> None:
    params = {"big": torch.zeros(64, 100), "small": torch.zeros(10), "d": torch.zeros(80, 80, dtype=torch.float64)}
    state = gx.compress_state(gx.grokfast_ma(window_size=3), "int8").init(params)
    adam, ma = state.inner["adam"], state.inner["grokfast"]
    assert isinstance(adam.mu["big"], Int8Blocks) and adam.nu["big"].codes.dtype == torch.uint8
    assert adam.mu["big"].codes.dtype == torch.int8
    assert isinstance(adam.mu["small"], torch.Tensor) and isinstance(adam.mu["d"], torch.Tensor)
    assert all(isinstance(s["big"], Int8Blocks) for s in ma.window)
    assert ma.total["big"].dtype == torch.float32 and isinstance(ma.total["big"], torch.Tensor)
    assert isinstance(gx.compress_state(gx.trace(0.9), "bf16").init(params).inner.trace["big"], Bf16Pair)


def _state_bytes(state: object) -> int:
    return sum(x.nbytes for x in _tensors(state))


def test_bytes_per_param() -> None:
    params = {"w": torch.zeros(256, 256), "v": torch.zeros(128, 256)}
    n = sum(p.numel() for p in params.values())
    fp32 = gx.grokadamw().init(params)
    int8 = gx.compress_state(gx.grokadamw(), "int8").init(params)
    assert _state_bytes(fp32) / n >= 12
    assert _state_bytes(int8) / n <= 3.2
    ma = gx.compress_state(gx.grokfast_ma(window_size=100), "int8").init(params)
    window = sum(x.nbytes for s in ma.inner["grokfast"].window for x in _tensors(s))
    assert window / n <= 105
    assert bytes_per_element("int8", 256) == 1 + 4 / 256


def test_memory_check_counts_compressed_bytes(monkeypatch: pytest.MonkeyPatch) -> None:
    params = {"w": torch.zeros(100, 100)}  # window of 100: 4 MB in float32, ~1 MB in int8
    monkeypatch.setattr(_memory, "available_bytes", lambda device: 2_000_000)
    with pytest.raises(_memory.StateTooLargeError):
        gx.grokfast_ma(window_size=100).init(params)
    gx.compress_state(gx.grokfast_ma(window_size=100), "int8").init(params)


@pytest.mark.parametrize("fmt", FORMATS)
def test_optimizer_resume_is_bit_for_bit(fmt: str) -> None:
    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.ReLU(), torch.nn.Linear(80, 1))

    x, y = torch.randn(32, 64), torch.randn(32, 1)

    def steps(m: torch.nn.Module, opt: gx.Optimizer, k: int) -> None:
        for _ in range(k):
            loss = torch.nn.functional.mse_loss(m(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    m = model()
    opt = gx.Optimizer(m.named_parameters(), gx.grokfast_ma, lr=1e-3, window_size=3, state_format=fmt)
    steps(m, opt, 4)
    assert opt.engines[0] in ("c", "foreach") and opt.fallback_reasons == [None]  # (the MA window on the engine)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    m2 = model()
    m2.load_state_dict(m.state_dict())
    opt2 = gx.Optimizer(m2.named_parameters(), gx.grokfast_ma, lr=1e-3, window_size=3, state_format=fmt)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    steps(m, opt, 3)
    steps(m2, opt2, 3)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))
    assert any(k.endswith(".codes") or k.endswith(".hi") or k.endswith(".value") for k in opt.state[m[0].weight])


@pytest.mark.parametrize("fmt,bound", [("bf16", 0.01), ("bf16_sr", 0.05), ("int8", 0.3)])
def test_adam_stays_close_to_float32(fmt: str, bound: float) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 32, generator=g)
    y = torch.tanh(x @ torch.randn(32, 1, generator=g))

    def train(state_format: str | None) -> tuple[list[torch.Tensor], float]:
        torch.manual_seed(1)
        m = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 1))
        opt = gx.Optimizer(m.parameters(), gx.adam, lr=3e-3, state_format=state_format)
        for t in range(80):
            idx = torch.arange(t * 32, t * 32 + 32) % 512
            loss = torch.nn.functional.mse_loss(m(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        return [p.detach().clone() for p in m.parameters()], torch.nn.functional.mse_loss(m(x), y).item()

    torch.manual_seed(1)
    start = [p.detach().clone() for p in torch.nn.Sequential(
        torch.nn.Linear(32, 128), torch.nn.ReLU(), torch.nn.Linear(128, 1)).parameters()]
    ref, ref_loss = train(None)
    got, loss = train(fmt)
    moved = math.sqrt(sum(((a - b) ** 2).sum().item() for a, b in zip(ref, start)))
    dist = math.sqrt(sum(((a - b) ** 2).sum().item() for a, b in zip(got, ref)))
    assert dist / moved < bound
    assert abs(loss - ref_loss) < 0.2 * ref_loss + 1e-3


def test_bad_input() -> None:
    with pytest.raises(ValueError, match="fmt must be one of"):
        gx.compress_state(gx.adam(), "fp4")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="block_size"):
        gx.compress_state(gx.adam(), "int8", block_size=0)
    with pytest.raises(TypeError, match="block_size"):
        gx.compress_state(gx.adam(), "int8", block_size=2.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="GradientTransformation"):
        gx.compress_state(lambda g: g, "int8")  # type: ignore[arg-type]
    tx = gx.compress_state(gx.adam(), "int8")
    params = {"w": torch.zeros(3)}
    with pytest.raises(TypeError, match="compress_state"):
        tx.update(params, gx.adam().init(params), params)  # an uncompressed state
    with pytest.raises(ValueError, match="state_format"):
        gx.Optimizer([torch.zeros(2, requires_grad=True)], gx.adam, state_format="int4")
    with pytest.raises(TypeError, match="decode"):
        decode(torch.zeros(3))  # type: ignore[arg-type]
