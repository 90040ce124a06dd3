"""compress_state on the in-place engine: packed state decoded where the kernels load it and
encoded where they store it, against the eager ``compress_state.update`` (torch's ops).

The C kernels, the foreach backend and Triton's kernels (its CPU interpreter here,
``TRITON_INTERPRET=1``; compiled on a GPU) store the very codes and scales the eager codecs store:
the state is compared bit for bit (a global norm, summed in another order, to rounding). The
params differ from the eager path's as the uncompressed kernels' do (the last bit of a step's
division or square root).
"""

from __future__ import annotations

import importlib.util
import io
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import grokxform as gx  # noqa: E402
from grokxform.engine import native  # noqa: E402
from grokxform.engine.layout import init_state  # noqa: E402
from grokxform.fused import EngineUnavailable, FusedStep  # noqa: E402
from grokxform.transforms.compress import decode  # noqa: E402

FORMATS = ("bf16", "bf16_sr", "int8")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_c = pytest.mark.skipif(DEVICE != "cpu" or not native.compiler()[0], reason="the C kernels run on the CPU")


def _chain(name: str) -> gx.GradientTransformation:
    return {
        "adamw": lambda: gx.adamw(1e-2, weight_decay=0.1),
        "grokadamw": lambda: gx.grokadamw(1e-2),
        "grokfast_ema": lambda: gx.grokfast_ema(1e-2),
        # a user's chain: a reduction first (two passes: the first decodes, the last encodes)
        "user": lambda: gx.chain(gx.clip_by_global_norm(100.0), gx.trace(0.9, nesterov=True), gx.scale(-1e-2)),
        # a reduction of decoded state (the pass that sums decodes, the last pass decodes and encodes)
        "user_norm_after": lambda: gx.chain(gx.trace(0.9), gx.clip_by_global_norm(100.0), gx.scale(-1e-2)),
    }[name]()


def _params() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    # "w": whole blocks of 64; "v": 340 elements, a partial last block; "b": too small to compress
    return {k: torch.randn(s, generator=g).to(DEVICE) for k, s in (("w", (40, 32)), ("b", (30,)), ("v", (20, 17)))}


def _grads(t: int, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor | None]:
    g = torch.Generator().manual_seed(1000 + t)
    out: dict[str, torch.Tensor | None] = {k: torch.randn(v.shape, generator=g).to(DEVICE) for k, v in like.items()}
    if t % 4 == 3:
        out["v"] = None  # (its state is left as it is, codes and all)
    return out


def _tensors(tree: object) -> list[torch.Tensor]:
    return [x for x in torch.utils._pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def _eager(tx: gx.GradientTransformation, steps: int) -> tuple[dict, object]:
    params = _params()
    state = tx.init(params)
    with gx.kernels(False):
        for t in range(steps):
            u, state = tx.update(_grads(t, params), state, params)
            params = gx.apply_updates(params, u)
    return params, state


def _engine(tx: gx.GradientTransformation, steps: int, backend: str) -> FusedStep:
    fs = FusedStep(tx, _params(), backend=backend)  # type: ignore[arg-type]
    for t in range(steps):
        fs(_grads(t, _params()))
    assert fs.engine == (backend if steps else None)
    return fs


def _check(fs: FusedStep, eager: tuple[dict, object]) -> None:
    params, state = eager
    for a, b in zip(_tensors(state), _tensors(fs.eager_state())):  # (MA windows oldest first)
        if a.is_floating_point() and a.dim() == 0:  # (a global norm: summed in another order)
            torch.testing.assert_close(a, b)
        else:
            assert a.dtype == b.dtype and torch.equal(a, b)  # codes, scales, counters: bit for bit
    for k in params:  # the kernels' own rounding (an ulp of a step), larger where a decoded v is near 0
        torch.testing.assert_close(fs.params[k], params[k], rtol=1e-4, atol=1e-5)


BACKENDS = [pytest.param("c", marks=needs_c), "foreach"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["adamw", "grokadamw", "grokfast_ema", "user", "user_norm_after"])
def test_engine_stores_the_eager_codes(name: str, fmt: str, backend: str) -> None:
    tx = gx.compress_state(_chain(name), fmt, min_size=64, block_size=64)
    _check(_engine(tx, 20, backend), _eager(tx, 20))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("name", ["adamw", "user", "user_norm_after"])
def test_triton_stores_the_eager_codes(name: str, fmt: str) -> None:
    """(Not grokadamw: its clip binds, and the Triton kernels sum its norm in their own order, so
    its input differs by an ulp, as without compression; the C kernels take torch's norm.)"""
    pytest.importorskip("triton")
    steps = 20 if DEVICE == "cuda" else 6  # (the interpreter is slow)
    tx = gx.compress_state(_chain(name), fmt, min_size=64, block_size=64)
    _check(_engine(tx, steps, "triton"), _eager(tx, steps))


@pytest.mark.parametrize("knob", ["HOIST_LOADS", "ROUNDING_IN_LINE"])
def test_triton_kernel_variants_store_the_same_codes(knob: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's kernel variants (element loads first; square roots and divisions in line) store
    the plain kernels' codes, scales and params, bit for bit: an int8 Adam and an int8 MA window."""
    pytest.importorskip("triton")
    from grokxform.engine import step as engine_step

    steps = 20 if DEVICE == "cuda" else 6
    for tx in (gx.compress_state(_chain("grokadamw"), "int8", min_size=64, block_size=64),
               _window_int8_adam_bf16_sr()):
        plain = _engine(tx, steps, "triton")
        with monkeypatch.context() as m:
            m.setattr(engine_step, knob, True)
            variant = _engine(tx, steps, "triton")
        pairs = zip(_tensors((plain.params, plain.eager_state())), _tensors((variant.params, variant.eager_state())))
        for a, b in pairs:
            assert a.dtype == b.dtype and torch.equal(a, b)


def test_triton_stores_int8_codes_from_an_integer_byte(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every Triton store of int8 codes (an MA window's slot, Adam's signed m and unsigned v) takes
    its byte from ``low_byte``, an integer instruction when compiled. Truncated straight from a
    float's bits, the window's byte reached a shared-memory store of the float's register, which
    the ptxas of Triton 3.6 compiled as a saturating float-to-byte conversion: every code 255 (the
    CUDA tests of compressed MA windows fail so)."""
    pytest.importorskip("triton")
    sources = _kernel_sources(monkeypatch)
    _engine(_ma("int8"), 1, "triton")
    stores = [line for text in sources for line in text.splitlines() if "tl.store(" in line and "__codes" in line]
    assert {name for line in stores for name in ("N1_window", "N3_mu", "N3_nu") if f"T_{name}__codes" in line} == {
        "N1_window", "N3_mu", "N3_nu"}
    assert all(", low_byte(" in line for line in stores), stores


def _window_int8_adam_bf16_sr() -> gx.GradientTransformation:
    """Formats nested per part, as the memory page advises for Grokfast-MA: the window's slots in
    int8, Adam's state in bf16 with stochastic rounding (a window of 5: 20 steps re-sum it)."""
    return gx.named_chain(
        ("grokfast", gx.compress_state(gx.amplify(gx.ma_filter(5), 5.0), "int8", min_size=64, block_size=64)),
        ("adam", gx.compress_state(gx.scale_by_adam(0.9, 0.98), "bf16_sr", min_size=64)),
        ("lr", gx.scale_by_learning_rate(1e-2)),
    )


@pytest.mark.parametrize("backend", [*BACKENDS, pytest.param("triton", marks=pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="needs triton"))])
def test_engine_stores_the_eager_codes_of_formats_nested_per_part(backend: str) -> None:
    tx = _window_int8_adam_bf16_sr()
    steps = 20 if backend != "triton" or DEVICE == "cuda" else 6
    fs = _engine(tx, steps, backend)
    state = fs.eager_state()
    assert state["grokfast"].inner.window[0]["w"].codes.dtype == torch.int8
    assert state["adam"].inner.nu["w"].value.dtype == torch.bfloat16
    _check(fs, _eager(tx, steps))


@pytest.mark.parametrize("backend", [*BACKENDS, pytest.param("triton", marks=pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="needs triton"))])
def test_engine_codes_small_moments_as_the_eager_codecs(backend: str) -> None:
    """Gradients far below their blocks' largest: m rounds to 0 and v codes 1 where the fourth-root
    code would round it below its first code (a positive v never codes 0), in every backend."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(40, 32, generator=g).to(DEVICE)
    grads = []
    for _ in range(4):
        x = torch.randn(40, 32, generator=g) * 1e-4
        x.view(-1)[::64] = 1e3  # (each block's largest)
        x.view(-1)[1::64] = 0.0  # (a v of 0 codes 0)
        grads.append(x.to(DEVICE))
    tx = gx.compress_state(gx.adam(1e-2), "int8", min_size=64, block_size=64)
    params, state = {"w": w.clone()}, tx.init({"w": w.clone()})
    with gx.kernels(False):
        for x in grads:
            u, state = tx.update({"w": x.clone()}, state, params)
            params = gx.apply_updates(params, u)
    fs = FusedStep(tx, {"w": w.clone()}, backend=backend)  # type: ignore[arg-type]
    for x in grads:
        fs({"w": x})
    nu = state.inner["adam"].nu["w"].codes.view(-1)
    assert (nu[1::64] == 0).all() and (nu.reshape(-1, 64)[:, 2:] == 1).all()
    assert (state.inner["adam"].mu["w"].codes.view(-1).reshape(-1, 64)[:, 1:] == 0).all()
    _check(fs, (params, state))


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # (inf·0 in the interpreter)
@pytest.mark.parametrize("backend", [*BACKENDS, pytest.param("triton", marks=pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="needs triton"))])
def test_engine_codes_nonfinite_blocks_as_the_eager_codecs(backend: str) -> None:
    """A block holding a NaN has a NaN scale and codes 0; an infinity's block has scale inf and
    codes 0 (inf·0 is NaN: code 0); the other blocks (one a ramp over many codes) code as usual;
    in every backend."""
    g = torch.Generator().manual_seed(5)
    w = torch.randn(8, 64, generator=g).to(DEVICE)
    x = torch.randn(8, 64, generator=g)
    x[0, 0] = float("nan")  # (m's and v's block 0)
    x[1, 5], x[2, 7] = float("inf"), -float("inf")  # (blocks 1 and 2)
    x[3] = torch.linspace(-1.0, 1.0, 64)  # (a ramp: many codes)
    tx = gx.compress_state(gx.adam(1e-2), "int8", min_size=64, block_size=64)
    state = tx.init({"w": w.clone()})
    with gx.kernels(False):
        _, state = tx.update({"w": x.to(DEVICE)}, state, {"w": w.clone()})
    fs = FusedStep(tx, {"w": w.clone()}, backend=backend)  # type: ignore[arg-type]
    fs({"w": x.to(DEVICE)})
    got = fs.eager_state()
    for field in ("mu", "nu"):
        want, have = getattr(state.inner["adam"], field)["w"], getattr(got.inner["adam"], field)["w"]
        assert torch.equal(want.codes, have.codes)
        torch.testing.assert_close(have.scales, want.scales, rtol=0, atol=0, equal_nan=True)
        assert want.scales[0].isnan() and want.scales[1:3].isinf().all()
        assert (want.codes[:3] == 0).all() and want.codes[3:].unique().numel() > 30


def _kernel_sources(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The list that collects the source of every Triton kernel the engine generates from now on."""
    from grokxform.engine import codegen

    sources: list[str] = []
    make = codegen.kernel_source

    def keep(*args: object) -> str:
        sources.append(make(*args))  # type: ignore[arg-type]
        return sources[-1]

    monkeypatch.setattr(codegen, "kernel_source", keep)
    return sources


def _tiles_used(monkeypatch: pytest.MonkeyPatch) -> set[tuple[int, int, int | None, int]]:
    """The set that collects the main-pass tile of every group the engine makes from now on."""
    from grokxform.engine import step as engine_step

    tiles: set[tuple[int, int, int | None, int]] = set()
    make_groups = engine_step.EngineStep._make_groups

    def keep(self: engine_step.EngineStep, plan: object) -> list:
        groups = make_groups(self, plan)  # type: ignore[arg-type]
        tiles.update(g.tile for g in groups)
        return groups

    monkeypatch.setattr(engine_step.EngineStep, "_make_groups", keep)
    return tiles


@pytest.mark.parametrize("tile", [(256, 1, None, 1), (512, 2, 64, 1), (64, 1, None, 1), (64, 1, 80, 4), (128, 1, None, 3)])
def test_int8_tile_keeps_the_codes(tile: tuple[int, int, int | None, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """The passes that write int8 codes on their own tile (``INT8_TILE``: elements, warps,
    registers, items a program takes in turn; ``INT8_WINDOW_TILE`` where the pass holds an MA
    window) store the eager codes; a step mixing them with float32 leaves (``"b"``) and an MA
    window too."""
    pytest.importorskip("triton")
    from grokxform.engine import step as engine_step

    monkeypatch.setattr(engine_step, "INT8_TILE", tile)
    monkeypatch.setattr(engine_step, "INT8_WINDOW_TILE", tile)
    tiles = _tiles_used(monkeypatch)
    steps = 20 if DEVICE == "cuda" else 6
    tx = gx.compress_state(_chain("user"), "int8", min_size=64, block_size=64)
    _check(_engine(tx, steps, "triton"), _eager(tx, steps))
    assert tiles == {tile, (engine_step.BLOCK, engine_step.NUM_WARPS, None, 1)}
    tiles.clear()
    tx = _ma("int8")
    _check(_engine(tx, MA_STEPS, "triton"), _eager(tx, MA_STEPS))
    assert tile in tiles


def test_a_pass_holding_an_ma_window_takes_the_window_tile(monkeypatch: pytest.MonkeyPatch) -> None:
    """Int8 passes over an MA window run on ``INT8_WINDOW_TILE``, the others on ``INT8_TILE``
    (the defaults: 256 elements a warp, at most 64 and 96 registers), each storing the eager codes."""
    pytest.importorskip("triton")
    from grokxform.engine import step as engine_step

    plain, windowed = (256, 1, 64, 1), (256, 1, 96, 1)
    assert (engine_step.INT8_TILE, engine_step.INT8_WINDOW_TILE) == (plain, windowed)
    monkeypatch.setattr(engine_step, "INT8_WINDOW_TILE", (128, 1, None, 1))  # (a tile of its own)
    tiles = _tiles_used(monkeypatch)
    tx = _ma("int8")
    _check(_engine(tx, MA_STEPS, "triton"), _eager(tx, MA_STEPS))
    assert (128, 1, None, 1) in tiles and plain not in tiles
    tiles.clear()
    tx = gx.compress_state(gx.adamw(1e-2, weight_decay=0.1), "int8", min_size=64, block_size=64)
    _check(_engine(tx, 6, "triton"), _eager(tx, 6))
    assert tiles == {plain, (engine_step.BLOCK, engine_step.NUM_WARPS, None, 1)}  # (and the float32 leaves')


def test_int8_blocks_larger_than_the_int8_tile_take_the_other_tile(monkeypatch: pytest.MonkeyPatch) -> None:
    """A quantization block of 512 elements does not fit the int8 tile of 256: its passes run on
    the float32 passes' tile of 1024 (on the engine, with the eager codes)."""
    pytest.importorskip("triton")
    from grokxform.engine import step as engine_step

    monkeypatch.setattr(engine_step, "INT8_TILE", (256, 1, 80, 1))
    monkeypatch.setattr(engine_step, "INT8_WINDOW_TILE", (256, 1, 80, 1))
    tiles = _tiles_used(monkeypatch)
    tx = gx.compress_state(gx.adamw(1e-2, weight_decay=0.1), "int8", min_size=64, block_size=512)
    steps = 6
    _check(_engine(tx, steps, "triton"), _eager(tx, steps))
    assert tiles == {(engine_step.BLOCK, engine_step.NUM_WARPS, None, 1)}


def test_block_size_must_divide_the_tile() -> None:
    tx = gx.compress_state(gx.adamw(1e-2), "int8", min_size=64, block_size=100)
    _check(_engine(tx, 5, "foreach"), _eager(tx, 5))  # (the foreach backend codes whole tensors)
    kernels = "triton" if DEVICE == "cuda" else "c"
    with pytest.raises(EngineUnavailable, match="block_size must divide"):
        _engine(tx, 1, kernels)


@pytest.mark.parametrize("fmt,bound", [("bf16", 2.0**-16), ("bf16_sr", 2.0**-7), ("int8", 1 / 127)])
def test_decoded_state_stays_close_to_float32(fmt: str, bound: float) -> None:
    """After a few steps the decoded moments are within a few codec steps of the float32 run's."""
    plain = FusedStep(gx.adam(1e-2), _params(), backend="foreach" if DEVICE == "cpu" else "triton")
    packed = _engine(gx.compress_state(gx.adam(1e-2), fmt, min_size=64, block_size=64), 0,
                     "foreach" if DEVICE == "cpu" else "triton")
    for t in range(3):
        plain(_grads(t, _params()))
        packed(_grads(t, _params()))
    for field in ("mu", "nu"):
        want = getattr(plain.state["adam"], field)["w"]
        got = decode(getattr(packed.state.inner["adam"], field)["w"], 64)
        if fmt == "int8" and field == "nu":  # the fourth-root code: within 3 codes of ⁴√(v/max) (one a step)
            top = want.reshape(-1, 64).amax(1, keepdim=True)
            assert ((got.reshape(-1, 64) / top).pow(0.25) - (want.reshape(-1, 64) / top).pow(0.25)).abs().max() <= 3 / 255
        elif fmt == "int8":  # within 3 codes of each block's scale (one a step: stochastic rounding)
            top = want.reshape(-1, 64).abs().amax(1, keepdim=True)
            assert ((got - want).reshape(-1, 64).abs() <= 3 * top * bound).all()
        else:  # within 3 roundings of the tensor's largest value (an error carries over into the next step)
            assert ((got - want).abs() <= 3 * want.abs().max() * bound).all()


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 80), torch.nn.ReLU(), torch.nn.Linear(80, 1))


def _train(m: torch.nn.Module, opt: gx.Optimizer, k: int) -> None:
    g = torch.Generator().manual_seed(k)
    for _ in range(k):
        x, y = torch.randn(32, 64, generator=g), torch.randn(32, 1, generator=g)
        opt.zero_grad()
        torch.nn.functional.mse_loss(m(x), y).backward()
        opt.step()


@pytest.mark.parametrize("fmt", FORMATS)
def test_optimizer_runs_compressed_state_on_the_engine(fmt: str) -> None:
    m, ref = _model(), _model()
    opt = gx.Optimizer(m.named_parameters(), gx.grokadamw, lr=1e-3, state_format=fmt)
    eager = gx.Optimizer(ref.named_parameters(), gx.grokadamw, lr=1e-3, state_format=fmt, fused=False)
    _train(m, opt, 1)
    _train(ref, eager, 1)
    assert opt.engines == ["c" if native.compiler()[0] else "foreach"] and opt.fallback_reasons == [None]
    assert eager.engines == ["tx.update"]
    for a, b in zip(_tensors(opt.tx_states), _tensors(eager.tx_states)):
        assert torch.equal(a, b)  # the state the engine keeps is the eager one, bit for bit
    _train(m, opt, 3)  # (then the gradients differ as the params do: by the kernels' rounding)
    _train(ref, eager, 3)
    for a, b in zip(m.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    m2 = _model()
    m2.load_state_dict(m.state_dict())
    opt2 = gx.Optimizer(m2.named_parameters(), gx.grokadamw, lr=1e-3, state_format=fmt)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    _train(m, opt, 3)
    _train(m2, opt2, 3)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(_tensors(opt.tx_states), _tensors(opt2.tx_states)))


# -- MA windows: a ring of compressed slots, the running sum corrected by what each slot stores --

W = 4
MA_STEPS = 3 * W + 1  # three re-sums of each leaf ("v", without a gradient every 4th step, lags)


def _ma(fmt: str, accumulator_dtype: torch.dtype | None = None) -> gx.GradientTransformation:
    return gx.compress_state(gx.grokfast_ma(1e-2, window_size=W, accumulator_dtype=accumulator_dtype), fmt,
                             min_size=64, block_size=64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fmt,acc", [*((f, None) for f in FORMATS), ("int8", torch.float64)])
def test_engine_runs_a_compressed_ma_window(fmt: str, acc: torch.dtype | None, backend: str) -> None:
    """The slots' codes and scales and the running sums (re-sums included) as the eager update's,
    bit for bit."""
    tx = _ma(fmt, acc)
    fs = _engine(tx, MA_STEPS, backend)
    assert type(fs.state.inner["grokfast"].window.buffers["w"]).__name__ == {
        "bf16": "Bf16Pair", "bf16_sr": "Bf16Stochastic", "int8": "Int8Blocks"}[fmt]
    _check(fs, _eager(tx, MA_STEPS))


@pytest.mark.parametrize("fmt", FORMATS)
def test_triton_runs_a_compressed_ma_window(fmt: str) -> None:
    pytest.importorskip("triton")
    tx = _ma(fmt)
    _check(_engine(tx, MA_STEPS, "triton"), _eager(tx, MA_STEPS))


@pytest.mark.parametrize("fmt", ["int8", "bf16_sr"])
def test_traced_step_runs_a_compressed_ring(fmt: str) -> None:
    """The traced fallback (``make_fx``, op by op) on the engine's layout: ``tx.update`` gathers the
    rings' slots oldest first on the device and writes the newest one back. (Its re-sum, which
    cannot read the counts on the host, adds g and then q − g: the running sums to rounding.)"""
    tx = _ma(fmt)
    fs = _engine(tx, MA_STEPS, "eager")
    params, state = _eager(tx, MA_STEPS)
    want, got = state.inner["grokfast"], fs.eager_state().inner["grokfast"]
    for a, b in zip(_tensors((want.window, want.count)), _tensors((got.window, got.count))):
        assert a.dtype == b.dtype and torch.equal(a, b)  # the slots: codes and scales
    for a, b in zip(_tensors(want.total), _tensors(got.total)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for k in params:
        torch.testing.assert_close(fs.params[k], params[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_running_sum_is_the_sum_of_the_decoded_slots(fmt: str) -> None:
    """After many steps (mid-window), each running sum is the float64 sum of what its slots hold,
    to the rounding of a few float32 additions since the last re-sum."""
    tx = gx.compress_state(gx.grokfast_ma(1e-2, window_size=8), fmt, min_size=64, block_size=64)
    fs = _engine(tx, 45, "c" if DEVICE == "cpu" and native.compiler()[0] else "foreach" if DEVICE == "cpu" else "triton")
    st = fs.eager_state().inner["grokfast"]
    for k in ("w", "v"):
        want = sum(decode(slot[k], 64).double() for slot in st.window)
        torch.testing.assert_close(st.total[k].double(), want, rtol=0, atol=8 * 2.0**-24 * float(want.abs().max()))


@pytest.mark.parametrize("fmt", FORMATS)
def test_optimizer_runs_a_compressed_ma_window_on_the_engine(fmt: str) -> None:
    m, ref = _model(), _model()
    kwargs = {"lr": 1e-3, "window_size": W, "state_format": fmt}
    opt = gx.Optimizer(m.named_parameters(), gx.grokfast_ma, **kwargs)
    eager = gx.Optimizer(ref.named_parameters(), gx.grokfast_ma, fused=False, **kwargs)
    _train(m, opt, 1)
    _train(ref, eager, 1)
    assert opt.engines == ["c" if native.compiler()[0] else "foreach"] and opt.fallback_reasons == [None]
    assert all(torch.equal(a, b) for a, b in zip(_tensors(opt.tx_states), _tensors(eager.tx_states)))
    _train(m, opt, 5)  # (mid-window: the ring's oldest slot is not its first)
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    m2 = _model()
    m2.load_state_dict(m.state_dict())
    opt2 = gx.Optimizer(m2.named_parameters(), gx.grokfast_ma, **kwargs)
    opt2.load_state_dict(torch.load(buf, weights_only=True))
    _train(m, opt, 2 * W)
    _train(m2, opt2, 2 * W)
    assert opt2.fallback_reasons == [None]
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m2.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(_tensors(opt.tx_states), _tensors(opt2.tx_states)))


def test_compressed_window_bytes_per_param(monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's state (the window a ring of packed slots, made without a float32 copy): an
    int8 window of 100 slots takes 100 · (1 + 4/256) bytes per param; the memory check counts them."""
    params = {"w": torch.zeros(256, 256), "v": torch.zeros(128, 256)}
    n = sum(p.numel() for p in params.values())
    monkeypatch.setattr(gx._memory, "available_bytes", lambda device: 120 * n)  # (float32: 400 bytes per param)
    with pytest.raises(gx._memory.StateTooLargeError):
        init_state(gx.grokfast_ma(window_size=100), params)
    state = init_state(gx.compress_state(gx.grokfast_ma(window_size=100), "int8"), params)
    window = state.inner["grokfast"].window.buffers
    assert sum(x.nbytes for x in _tensors(window)) / n == 100 * (1 + 4 / 256)
    assert sum(x.nbytes for x in _tensors(state)) / n <= 108  # (+ the float32 sum, Adam's m and v in int8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", FORMATS)
def test_captured_in_a_cuda_graph(fmt: str) -> None:
    """adamw: against eager, bit for bit; grokadamw (whose clip binds, its norm summed in the
    kernels' order): against the same kernels uncaptured, bit for bit."""
    tx = gx.compress_state(_chain("adamw"), fmt, min_size=64, block_size=64)
    fs = FusedStep(tx, _params(), backend="triton", cuda_graph=True)
    for t in range(6):
        fs(_grads(t, _params()))
    assert fs.captures >= 1
    _check(fs, _eager(tx, 6))
    tx = gx.compress_state(gx.grokadamw(1e-2), fmt, min_size=64, block_size=64)
    fs = FusedStep(tx, _params(), backend="triton", cuda_graph=True)
    for t in range(6):
        fs(_grads(t, _params()))
    assert fs.captures >= 1
    plain = _engine(tx, 6, "triton")
    for a, b in zip(_tensors((fs.params, fs.state)), _tensors((plain.params, plain.state))):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_triton_int8_codec_is_multiplications(monkeypatch: pytest.MonkeyPatch) -> None:
    """The int8 codec in the Triton kernel: per quantization block one absmax (a NaN-propagating
    max over the tile's row) and one correctly rounded reciprocal; per element multiplications
    (and the unsigned code's guess of a fourth root, two approximate reciprocal square roots): no
    division, no correctly rounded root, no gather of the scales."""
    pytest.importorskip("triton")
    sources = _kernel_sources(monkeypatch)
    params = {"w": torch.randn(64, 64, device=DEVICE)}
    for tx in (gx.adamw(1e-2), gx.compress_state(gx.adamw(1e-2), "int8", min_size=64, block_size=64)):
        FusedStep(tx, params, backend="triton")({"w": torch.randn(64, 64, device=DEVICE)})
    # the body of a whole tile (the partial tile's is the same, masked)
    plain, packed = (src.split("    if start + BLOCK <= n:\n", 1)[1].split("\n    else:\n", 1)[0] for src in sources)
    assert packed.count("tl.div_rn(") == plain.count("tl.div_rn(") + 2  # 1/scale of m's and v's blocks
    assert packed.count("tl.sqrt_rn(") == plain.count("tl.sqrt_rn(")
    assert packed.count("fourth_root_guess(") == 1 and "fourth_root_guess(" not in plain  # v's guess of its code
    assert packed.count("tl.reduce(") == 2 and "tl.max(" not in packed and "offs //" not in packed
