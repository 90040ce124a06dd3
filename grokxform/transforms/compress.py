"""Compressed optimizer state: any chain's large state tensors kept in 8 or 24 bits per element."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any, Literal, NamedTuple

import torch
import torch.utils._pytree as pytree

from grokxform import _common as C
from grokxform import _memory
from grokxform import declarations as D
from grokxform import distributed as _dist
from grokxform import tree as _tree
from grokxform._resum import window_sum
from grokxform.base import GradientTransformation, Params, State, Updates, with_extra_args_support
from grokxform.elements import leaf_keys, random_like, traced, unwrapped

Format = Literal["bf16", "bf16_sr", "int8"]
FORMATS: tuple[str, ...] = ("bf16", "bf16_sr", "int8")
"""The formats of :func:`compress_state`."""
STOCHASTIC: tuple[str, ...] = ("bf16_sr", "int8")
"""The formats with a field that rounds stochastically (:func:`encode` takes a ``key``)."""


def stochastic(fmt: str, nonnegative: bool) -> bool:
    """Whether :func:`encode` in ``fmt`` draws random numbers for a field (``nonnegative``: one
    its primitive declares non-negative): ``"bf16_sr"``, and ``"int8"``'s unsigned code."""
    return fmt == "bf16_sr" or (fmt == "int8" and nonnegative)

_SEED = 0x5EED_C0DE
"""The seed of the stochastic rounding's keys (``leaf_keys(_SEED, step, leaf)``)."""


class Bf16Pair(NamedTuple):
    """A float32 tensor in 24 bits per element: ``hi``, the bfloat16 of its top 16 bits, and
    ``lo`` (uint8), the next 8 bits; the value rounded to nearest at the 24th bit (16 significand
    bits, float32's exponent)."""

    hi: Any
    lo: Any
    _packed = True  # (the engine's plan: a compressed tensor in a tensor's place)


class Bf16Stochastic(NamedTuple):
    """A float32 tensor rounded stochastically to bfloat16 (``value``)."""

    value: Any
    _packed = True  # (the engine's plan: a compressed tensor in a tensor's place)


class Int8Blocks(NamedTuple):
    """A float32 tensor in 8 bits per element and one float32 per block of ``block_size``
    elements (in the tensor's flat order). ``codes`` int8, signed linear: value =
    scale·code/127, scale = the block's absmax. ``codes`` uint8, for a non-negative field: value =
    scale·(code/255)⁴, scale = the block's max (the fourth root of value/max, coded linearly).
    A scale is at least 2⁻¹²⁰ (:data:`SCALE_FLOOR`, :func:`encode`)."""

    codes: Any
    scales: Any
    _packed = True  # (the engine's plan: a compressed tensor in a tensor's place)


Packed = (Bf16Pair, Bf16Stochastic, Int8Blocks)
"""The compressed forms of a state tensor."""


class CompressedState(NamedTuple):
    """``count``: updates done (0-d int64; the stochastic rounding's keys derive from it);
    ``inner``: the wrapped transform's state, its large float32 tensors compressed
    (:class:`Bf16Pair`, :class:`Bf16Stochastic` or :class:`Int8Blocks` in their place)."""

    count: torch.Tensor
    inner: Any

    @property
    def hyperparams(self) -> dict[str, torch.Tensor]:
        """The injected hyperparameters of the wrapped state (``inject_hyperparams``'), if any."""
        return getattr(self.inner, "hyperparams", {})


# --------------------------------------------------------------------------------------------
# The codecs: torch ops, the same for every path (eager, vmapped, under the engine's kernels).


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """``x`` flat, zero-padded to whole blocks, as ``[blocks, block_size]``."""
    flat = x.reshape(-1)
    pad = -flat.shape[0] % block_size
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.reshape(-1, block_size)


def _unblock(b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return b.reshape(-1)[: like.numel()].reshape(like.shape)


def _special(bits: torch.Tensor) -> torch.Tensor:
    """Where the float32 ``bits`` are an infinity or a NaN (no rounding there)."""
    return (bits & 0x7F800000) == 0x7F800000


@torch.library.custom_op("grokxform::bitcast", mutates_args=())
def _bitcast_op(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x``'s bits read as ``dtype`` (of ``x``'s element size), a new tensor: ``Tensor.view(dtype)``
    as an elementwise operator, which ``vmap`` maps on every torch (2.11 has no batching rule for
    ``view(dtype)``)."""
    return x.view(dtype).clone()


@_bitcast_op.register_fake
def _(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty_like(x, dtype=dtype)


def _bitcast_vmap(info, in_dims, x, dtype):  # type: ignore[no-untyped-def]
    """Elementwise: the mapped dimension stays where it is (the op again, for an outer ``vmap``)."""
    return _bitcast_op(x, dtype), in_dims[0]


_bitcast_op.register_vmap(_bitcast_vmap)


def _bitcast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x``'s bits as ``dtype`` (same element size): a view, or under ``torch.func`` transforms the
    operator :func:`_bitcast_op` (a copy)."""
    if torch._C._functorch.is_functorch_wrapped_tensor(x):
        return _bitcast_op(x, dtype)
    return x.view(dtype)


DEAD_ZONE = 2.0**-12
"""The unsigned int8 code's random number u is held within [2⁻¹², 1 − 2⁻¹²]: a value within this
fraction of a step from a code takes that code, so a decoded value, coded again (within 3 ulp of
its code's value, under 2⁻¹⁶ of a step), keeps its code."""

ROOT_SLACK = 1.0 / 64.0
"""What the unsigned code's guess ⌊255·q^¼ + this⌋ adds to the fourth root (in codes): an
engine's root may be off by less than this (Triton's is two approximate reciprocal square roots),
and the code below q is then the guess or the one under it (:func:`_code_below`)."""

SCALE_FLOOR = 2.0**-120
"""The least scale of an int8 block: its reciprocal times 127 is a finite float32 (the engine's
kernels use it too)."""


def _block_scales(b: torch.Tensor, nonnegative: bool) -> torch.Tensor:
    """The scale of each block (row) of ``b``: its max (``nonnegative``) or its absmax, at least
    :data:`SCALE_FLOOR`; NaN where the block holds a NaN."""
    top = b.amax(dim=1) if nonnegative else b.abs().amax(dim=1)
    return torch.where(top < SCALE_FLOOR, SCALE_FLOOR, top)


def encode(
    x: torch.Tensor, fmt: str, *, nonnegative: bool = False, block_size: int = 256, key: Any = 0
) -> NamedTuple:
    """The compressed form of the float32 tensor ``x`` in ``fmt`` (see :func:`compress_state`).
    ``nonnegative``: ``x`` holds no negative value (``"int8"`` then uses its unsigned code);
    ``key``: the stochastic rounding's key (``"bf16_sr"``, ``"int8"``'s unsigned code: an
    integer, or an int64 0-d tensor; :func:`stochastic`).

    ``"int8"``, per block: the scale s (its absmax, or its max for the unsigned code; at least
    2⁻¹²⁰) and r = 1/s (correctly rounded); per element the code:

    - signed, rounded to nearest (ties to even): q = clamp(x·(r·127), −127, 127), the code
      round(q);
    - unsigned, rounded stochastically in the value's own units: q = clamp(x·r, 0, 1), f(c) =
      (c/255)⁴ as :func:`decode` computes it, lo the largest c ≤ 254 with f(c) ≤ q (from the
      guess g = min(⌊255·q^¼ + 1/64⌋, 254), lo = g − [f(g) > q]: :data:`ROOT_SLACK`), u the
      :func:`~grokxform.elements.counter_dither` of ``key`` at the element held within
      [2⁻¹², 1 − 2⁻¹²] (:data:`DEAD_ZONE`), the code lo + [u·(f(lo+1) − f(lo)) < q − f(lo)];
      where q > 0, at least 1.

    A second moment between two codes takes the upper one with the probability of its distance
    from the lower one, so the mean of its codings is the value: v, which moves by less than half
    a code a step (an EMA with β₂ near 1), still moves, where rounding to nearest would hold it.
    A positive v never decodes to 0 (m/(√v + ε) would grow by up to 1/ε). The signed codes
    (m, EMA μ, window slots) round to nearest: a stochastic code would give a value far below
    its block's scale a whole code (m/√v then grows by as much where v is as small). A decoded
    tensor coded again gives the same codes and scales (the block's largest code decodes to its
    scale exactly, and every decoded value rounds back to its code or lies in its dead zone), so
    a step that a wrapper skips leaves a compressed state as it was. A NaN product codes 0. Every
    operation a code depends on is correctly rounded and none is fused (the fourth root only
    guesses), so the engine's kernels (C, Triton on a GPU) store these codes and scales bit for
    bit.

    Examples:
        >>> p = gx.transforms.compress.encode(torch.tensor([1.0, -0.5, 0.25]), "int8")
        >>> p.codes, p.scales
        (tensor([127, -64,  32], dtype=torch.int8), tensor([1.]))
        >>> gx.transforms.compress.decode(p)
        tensor([ 1.0000, -0.5039,  0.2520])
    """
    if fmt == "bf16":
        bits = _bitcast(x.contiguous(), torch.int32)
        r = torch.where(_special(bits), bits, bits + 0x80)
        return Bf16Pair(_bitcast((r >> 16).to(torch.int16), torch.bfloat16), ((r >> 8) & 0xFF).to(torch.uint8))
    if fmt == "bf16_sr":
        bits = _bitcast(x.contiguous(), torch.int32)
        noise = (random_like("uniform", x, key) * 65536.0).to(torch.int32)  # 16 random bits
        r = torch.where(_special(bits), bits, bits + noise)
        return Bf16Stochastic(_bitcast((r >> 16).to(torch.int16), torch.bfloat16))
    q, scale = _scaled(x, block_size, nonnegative)
    if not nonnegative:
        return Int8Blocks(_unblock(torch.round(q.clamp(-127.0, 127.0)).to(torch.int8), x), scale)
    u = _blocks(random_like("dither", x, key), block_size).clamp(DEAD_ZONE, 1.0 - DEAD_ZONE)
    q = q.clamp(0.0, 1.0)
    lo, below, above = _code_below(q, q.sqrt().sqrt())
    codes = torch.maximum(lo + (u * (above - below) < q - below).to(torch.float32), (q > 0.0).to(torch.float32))
    return Int8Blocks(_unblock(codes.to(torch.uint8), x), scale)


def _scaled(x: torch.Tensor, block_size: int, nonnegative: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``x`` in blocks (``[blocks, block_size]``) times its block's r = 1/scale (the signed code:
    r·127; a NaN product 0), and the scales: what :func:`encode` codes."""
    b = _blocks(x, block_size)
    scale = _block_scales(b, nonnegative)
    r = torch.reciprocal(scale)
    return torch.nan_to_num(b * (r if nonnegative else r * 127.0).unsqueeze(1), nan=0.0), scale


def _code_below(q: torch.Tensor, root: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The largest unsigned code c ≤ 254 with f(c) ≤ q (q in [0, 1]), f(c) and f(c + 1), given
    ``root``, a guess of q^¼ that 255·root puts less than :data:`ROOT_SLACK` (1/64 of a code)
    below or 0.98 of a code above 255·q^¼: the guess g = min(⌊255·root + 1/64⌋, 254) is c or
    c + 1, and f(g) > q tells which."""
    guess = torch.floor(root * 255.0 + ROOT_SLACK).clamp(max=254.0)
    at_guess = _fourth(guess)
    down = at_guess > q
    other = guess + torch.where(down, -1.0, 1.0)
    at_other = _fourth(other)
    return (torch.where(down, other, guess), torch.where(down, at_other, at_guess),
            torch.where(down, at_guess, at_other))


def _fourth(code: torch.Tensor) -> torch.Tensor:
    """The value/scale of the unsigned code ``code`` (float32): t = code·fl(1/255), (t·t)·(t·t)."""
    t = code * (1.0 / 255.0)
    t = t * t
    return t * t


def _zeros(like: torch.Tensor, fmt: str, nonnegative: bool, block_size: int) -> NamedTuple:
    """:func:`encode` of zeros shaped as ``like`` (every format codes 0 as zero bits), made with
    ``torch.zeros``: within the engine's lazy init (:class:`~grokxform._memory.LazyZeros`) it
    takes no memory until the state is laid out (an MA window's slots go straight into a ring)."""
    shape, dev = like.shape, like.device
    if fmt == "bf16":
        return Bf16Pair(torch.zeros(shape, dtype=torch.bfloat16, device=dev), torch.zeros(shape, dtype=torch.uint8, device=dev))
    if fmt == "bf16_sr":
        return Bf16Stochastic(torch.zeros(shape, dtype=torch.bfloat16, device=dev))
    blocks = -(-like.numel() // block_size)
    codes = torch.zeros(shape, dtype=torch.uint8 if nonnegative else torch.int8, device=dev)
    return Int8Blocks(codes, torch.zeros(blocks, dtype=torch.float32, device=dev))


def decode(packed: NamedTuple, block_size: int = 256) -> torch.Tensor:
    """The float32 tensor that ``packed`` (from :func:`encode`, with this ``block_size``) holds:
    ``"int8"``, (code·fl(1/127))·scale, or for the unsigned code t = code·fl(1/255), (t·t)·(t·t)·scale
    (multiplications only: the same numbers in the engine's kernels). A block whose scale is not
    finite (a NaN or an infinity was encoded in it) decodes to NaN."""
    if isinstance(packed, Bf16Pair):
        hi = _bitcast(packed.hi, torch.int16).to(torch.int32)
        return _bitcast((hi << 16) | (packed.lo.to(torch.int32) << 8), torch.float32)
    if isinstance(packed, Bf16Stochastic):
        return packed.value.to(torch.float32)
    if not isinstance(packed, Int8Blocks):
        raise TypeError(f"decode: expected a compressed tensor, got {type(packed).__name__}")
    codes = _blocks(packed.codes, block_size).to(torch.float32)
    if packed.codes.dtype == torch.uint8:
        return _unblock(_fourth(codes) * packed.scales.unsqueeze(1), packed.codes)
    return _unblock(codes * (1.0 / 127.0) * packed.scales.unsqueeze(1), packed.codes)


def bytes_per_element(fmt: str, block_size: int = 256) -> float:
    """The bytes one element of a compressed tensor takes in ``fmt`` (scales included)."""
    return {"bf16": 3.0, "bf16_sr": 2.0, "int8": 1.0 + 4.0 / block_size}[fmt]


# --------------------------------------------------------------------------------------------
# Which tensors of a state: the declaration's roles (running sums kept, second moments unsigned).


def _members(decl: Any, state: Any, path: tuple[Any, ...] = (), guarded: bool = False) -> Iterator[tuple[D.Elementwise, Any, tuple[Any, ...], bool]]:
    """Every primitive of the declaration tree ``decl`` with its state, the path to it and whether
    a wrapper above it selects between states."""
    if decl is None or state is None:
        return
    if isinstance(decl, D.Elementwise):
        yield decl, state, path, guarded
    elif isinstance(decl, D.Sequence):
        for key, member in zip(decl.keys, decl.members):
            yield from _members(member, state[key], (*path, key), guarded)
    elif isinstance(decl, (D.Amplify, D.Masked)):
        yield from _members(decl.inner, state, path, guarded)
    elif isinstance(decl, D.Partition):
        for label, member in decl.members.items():
            yield from _members(member, state[label], (*path, label), guarded)
    elif isinstance(decl, D.Injected):
        inner = D.declaration_of(decl.build(decl.current(state.count, state.hyperparams)))
        yield from _members(inner, state.inner_state, (*path, "inner_state"), guarded)
    elif isinstance(decl, (D.Accumulate, D.IfFinite)):
        yield from _members(decl.inner, state.inner_state, (*path, "inner_state"), True)
    elif isinstance(decl, D.Compressed):
        yield from _members(decl.inner, state.inner, (*path, "inner"), guarded)


def _ids(tree: Any) -> set[int]:
    return {id(x) for x in pytree.tree_leaves(tree, is_leaf=_is_packed) if isinstance(x, torch.Tensor)}


def _is_packed(x: Any) -> bool:
    return isinstance(x, Packed)


# --------------------------------------------------------------------------------------------
# The wrapper.


def compress_state(
    tx: GradientTransformation, fmt: Format = "bf16", *, block_size: int = 256, min_size: int = 4096
) -> GradientTransformation:
    """``tx`` with its large state tensors kept compressed between steps: ``update`` decodes
    them, runs ``tx.update`` and encodes the new state (pure; works under ``torch.func``). The
    in-place engine (:class:`~grokxform.fused.FusedStep`, ``gx.Optimizer(..., state_format=)``)
    runs it in its kernels instead: a packed field is decoded where the kernel loads it and its
    new value encoded where it stores it, in registers (the C, Triton and foreach backends store
    the codes and scales this function stores, bit for bit). There ``"int8"`` needs a
    ``block_size`` that divides the kernels' tile of 1024 elements. An MA window is there a ring
    of compressed slots (one ``[w, ...]`` buffer per part, :mod:`grokxform.engine.layout`): a
    step decodes the oldest slot where it reads it, encodes the new value into that slot and
    corrects the running sum by what the slot stores, as below; its state round-trips through
    ``state_dict`` bit for bit (the slots in slot order). This ``update`` takes that layout too
    (the traced fallback): the slots are gathered oldest first on the device and the newest one
    is put back.

    Compressed: every float32 state tensor of ``min_size`` elements or more (Adam's m and v,
    EMA μ, momentum traces, the MA window's slots, AdEMAMix's slow EMA...). Kept as they are:
    an MA filter's running sum (its ``total``, float32), counters, 0-d values, smaller tensors,
    float64 and 16-bit state (``state_dtype=torch.bfloat16`` is already 2 bytes).

    Formats (bytes per element of a compressed tensor):

    - ``"bf16"`` (3): bfloat16 plus a compensation byte: the value rounded to nearest at 16
      significand bits (float32's exponent, so no overflow or underflow that float32 has not).
      decode(encode(x)) is within 2⁻¹⁷ of x relatively.
    - ``"bf16_sr"`` (2): bfloat16 with stochastic rounding (unbiased: a value rounds up with
      the probability of its distance from the value below). The random bits are the
      counter-based ones of :func:`~grokxform.elements.uniform`: keys from the wrapper's step
      count and the tensor's position in the state, so a resumed run draws the same bits.
    - ``"int8"`` (1 + 4/``block_size``): per block of ``block_size`` elements one float32
      scale (from the block's absmax, as bitsandbytes' and torchao's 8-bit optimizers; codes by
      multiplication with its reciprocal, :func:`encode`). Signed
      state: a linear code in [−127, 127]. A field its primitive declares non-negative
      (``nonnegative=``: Adam's, NAdam's, AdEMAMix's and RMSprop's ``nu``): the fourth root of
      value/max coded linearly in [0, 255], so small second moments keep their relative
      precision (a linear code rounds most of them to 0, and m/(√v+ε) then explodes). The
      signed codes round to nearest. The unsigned ones round stochastically, unbiased in the
      value's units: a second moment with β₂ = 0.999 moves 0.1% a step, less than half a code,
      and rounding to nearest would hold it where it is. Their random numbers are a dither
      (:func:`~grokxform.elements.counter_dither`) of the keys of ``"bf16_sr"``, and a
      positive value codes at least 1.

    Measured by ``benchmarks/state_memory.py`` (a 64→256→1 MLP, ``gx.adamw`` lr 1e-3, 500 steps
    of batches of 64, every state tensor compressed; the distance of the final params from the
    float32 run's, relative to how far that run moved): 1.8e-2 (``"bf16"``), 5.8e-2
    (``"bf16_sr"``), 0.12 (``"int8"``). There is no fp8 format: e4m3 with the same block scales
    measured 1.7-3.0x the int8 code's error on μ, m and gradients and 2.4-5.8x on √v, and every fp8
    run ended farther from the float32 one (``benchmarks/fp8_codes.py``).

    MA windows: a slot stores q = decode(encode(g)); the running sum adds what the slot stores
    (q − g is added to the sum on the step that writes the slot), so that the decoded oldest
    value removed later cancels what was added; the exact re-sum every w steps sums the decoded
    slots (under ``torch.func`` transforms, where the counts are not read on the host, the
    re-sum's newest value is g, corrected by q − g). Here only the oldest slot (and, on a leaf's
    re-sum step, the whole window) is decoded at a step, so a step's temporaries are one float32
    copy of the gradient-sized fields, not of the window; the engine decodes no slot into memory
    (its re-sum adds the decoded slots one by one in registers; the foreach backend decodes one
    slot of the due leaves at a time).

    A NaN or infinity in a tensor makes its value NaN (``"int8"``: its whole block) after
    decoding. State: :class:`CompressedState`. Sharded (DTensor) params are refused
    (``TypeError``): a block must not straddle shards. Defaults: ``fmt="bf16"``,
    ``block_size=256``, ``min_size=4096``.

    Examples:
        >>> tx = gx.compress_state(gx.adamw(1e-3), "int8", min_size=1)
        >>> state = tx.init({"w": torch.zeros(4)})
        >>> type(state.inner["adam"].mu["w"]).__name__, state.inner["adam"].nu["w"].codes.dtype
        ('Int8Blocks', torch.uint8)
        >>> u, state = tx.update({"w": torch.ones(4)}, state, {"w": torch.zeros(4)})
        >>> u["w"]
        tensor([-0.0010, -0.0010, -0.0010, -0.0010])
    """
    if not isinstance(tx, GradientTransformation):
        raise TypeError(f"compress_state: tx must be a GradientTransformation, got {type(tx).__name__}")
    if fmt not in FORMATS:
        raise ValueError(f"compress_state: fmt must be one of {', '.join(map(repr, FORMATS))}, got {fmt!r}")
    block_size = C.check_int("compress_state", "block_size", block_size, low=1)
    min_size = C.check_int("compress_state", "min_size", min_size, low=1)
    tx = with_extra_args_support(tx)
    decl = D.declaration_of(tx)

    def roles(inner: Any) -> tuple[set[int], set[int]]:
        """The ids of the tensors kept as they are (running sums) and of the non-negative ones."""
        keep: set[int] = set()
        nonneg: set[int] = set()
        for m, st, _, _ in _members(decl, inner):
            if m.window is not None and m.window.total is not None:
                keep |= _ids(getattr(st, m.window.total))
            for f in m.nonnegative:
                nonneg |= _ids(getattr(st, f))
        return keep, nonneg

    def packable(x: Any, keep: set[int]) -> bool:
        return (isinstance(x, torch.Tensor) and x.dtype == torch.float32 and x.dim() >= 1
                and x.numel() >= min_size and id(x) not in keep)

    def keys_of(leaves: list[Any], count: torch.Tensor) -> Callable[[Any, bool], Any]:
        """The stochastic rounding's key of each tensor of the state (by id; 0 for a field that
        rounds to nearest): from the step count and the tensor's position among the state's
        leaves, made at the first field that rounds stochastically."""
        @functools.cache
        def table() -> tuple[torch.Tensor, dict[int, int]]:
            return leaf_keys(_SEED, count, range(len(leaves))), {id(y): j for j, y in enumerate(leaves)}

        def key(x: Any, nonnegative: bool) -> Any:
            if not stochastic(fmt, nonnegative):
                return 0
            keys, position = table()
            return keys[position[id(x)]]

        return key

    def pack(inner: Any, count: torch.Tensor, reuse: dict[int, Any], zeros: dict[int, Any] | None = None) -> Any:
        """The state ``inner`` with its packable tensors compressed (``reuse``: tensors whose
        compressed form is known, by id; ``zeros``: lazy zeros of the init, by id)."""
        keep, nonneg = roles(inner)
        leaves, spec = pytree.tree_flatten(inner, is_leaf=_is_packed)
        key = keys_of(leaves, count)
        out = []
        for x in leaves:
            if isinstance(x, torch.Tensor) and _dist.is_sharded(x):
                raise TypeError(
                    "compress_state: the state holds a sharded (DTensor) tensor; compressed state needs whole"
                    " tensors (a block must not straddle shards): compress the state of unsharded params only")
            if id(x) in reuse:
                out.append(reuse[id(x)])
            elif packable(x, keep) and zeros is not None and _memory.is_lazy(x, zeros):
                out.append(_zeros(x, fmt, id(x) in nonneg, block_size))
            elif packable(x, keep):
                unsigned = id(x) in nonneg
                out.append(encode(x, fmt, nonnegative=unsigned, block_size=block_size, key=key(x, unsigned)))
            elif isinstance(x, torch.Tensor) and x.dim() > 0 and 0 in x.stride() and x.numel() > 1:
                out.append(x.contiguous())  # (a lazy zero of the engine's init: a real tensor)
            else:
                out.append(x)
        return pytree.tree_unflatten(out, spec)

    def init_fn(params: Params) -> CompressedState:
        per_element = bytes_per_element(fmt, block_size)
        with _memory.state_format(lambda dtype, numel: per_element if dtype == torch.float32 and numel >= min_size
                                  else None), torch.no_grad(), _memory.LazyZeros() as lazy:
            inner = tx.init(params)
        count = C.counter(_tree.first_device(params) if _tree.flatten(params)[0] else torch.device("cpu"))
        return CompressedState(count, pack(inner, count, {}, lazy.lazy))

    def update(updates: Updates, state: State, params: Params | None = None, **extra: Any) -> tuple[Updates, CompressedState]:
        C.check_state(state, CompressedState, "compress_state")
        rings = [(path, st) for m, st, path, _ in _members(decl, state.inner)
                 if m.window is not None and isinstance(getattr(st, m.window.name), D.RingWindow)]
        if rings:  # (the engine's layout, in a traced step: its windows gathered oldest first, put back after)
            out, new = update(updates, CompressedState(state.count, _gathered(decl, state.inner)), params, **extra)
            return out, CompressedState(new.count, _scattered(decl, new.inner, state.inner))
        origin: dict[int, Any] = {}
        lazy = lazy_slots(state.inner)

        def unpack(p: Any) -> Any:
            if not _is_packed(p):
                return p
            if id(p) in lazy:
                out = lazy[id(p)]
            else:
                out = decode(p, block_size)
            origin[id(out)] = p
            return out

        decoded = pytree.tree_map(unpack, state.inner, is_leaf=_is_packed)
        out, new_inner = tx.update(updates, decoded, params, **extra)
        key = keys_of(pytree.tree_leaves(new_inner, is_leaf=_is_packed), state.count)
        fresh: dict[int, Any] = {}
        new_inner = store_windows(new_inner, origin, fresh, key)
        return out, CompressedState(state.count + 1, pack(new_inner, state.count, {**origin, **fresh}))

    def store_windows(new: Any, origin: dict[int, Any], fresh: dict[int, Any], key: Callable[[Any], Any]) -> Any:
        """The new state with each window slot written this step compressed (into ``fresh``, by
        the id of its tensor) and its running sum given what the slot stores: ``S ← S + (q − g)``,
        q = decode(encode(g))."""
        for m, st, path, _ in list(_members(decl, new)):
            wf = m.window
            if wf is None:
                continue
            window = getattr(st, wf.name)
            if not isinstance(window, tuple) or isinstance(window, D.RingWindow):
                raise TypeError("compress_state: a window in the ring layout; give the state that init made")
            newest, spec = _tree.flatten(window[-1])
            totals = _tree.flatten(getattr(st, wf.total))[0] if wf.total is not None else None
            new_totals = list(totals) if totals is not None else None
            assert m.count is not None  # (a window is declared with a count)
            counts = _host_counts(_tree.flatten(getattr(st, m.count))[0]) if totals is not None else []
            for i, g in enumerate(newest):
                if not isinstance(g, torch.Tensor) or id(g) in origin or g.dtype != torch.float32 or g.numel() < min_size:
                    continue
                packed = encode(g, fmt, block_size=block_size, key=key(g, False))
                fresh[id(g)] = packed
                if new_totals is not None and new_totals[i] is not None:
                    acc, q = new_totals[i].dtype, decode(packed, block_size)
                    if counts[i] is not None and counts[i] % wf.size == 0:  # re-summed: the exact sum of the slots
                        new_totals[i] = window_sum([_tree.flatten(t)[0][i] for t in window[:-1]] + [q], acc)
                    else:
                        new_totals[i] = new_totals[i] + (q.to(acc) - g.to(acc))
            if new_totals is not None and totals is not None and any(a is not b for a, b in zip(new_totals, totals)):
                member = type(st)(*(
                    _tree.unflatten(new_totals, _tree.flatten(v)[1]) if f == wf.total else v
                    for f, v in zip(st._fields, st)))
                new = _replace_at(new, path, member)
        return new

    def lazy_slots(inner: Any) -> dict[int, torch.Tensor]:
        """The window slots a step does not read, by the id of their compressed form, with a
        stand-in (a zero view that takes no memory): every slot but the oldest, on a leaf that
        is not due for its re-sum this step. Decoded whole: windows under apply_if_finite or
        MultiSteps (which select between states), in a traced graph (the host cannot read the
        counts), and under ``torch.vmap`` where the members' counts differ."""
        lazy: dict[int, torch.Tensor] = {}
        zero: dict[torch.device, torch.Tensor] = {}  # (one 0-d zero a device: a view of it per slot)
        for m, st, _, guarded in _members(decl, inner):
            wf = m.window
            if wf is None or guarded or m.count is None:
                continue
            window = getattr(st, wf.name)
            if not isinstance(window, tuple) or isinstance(window, D.RingWindow):
                continue
            counts = _tree.flatten(getattr(st, m.count))[0]
            host = _host_counts(counts)
            slots = [_ring_leaves(t)[0] for t in window]  # (a compressed tensor is one leaf)
            for i, c in enumerate(host):
                if c is None or (c + 1) % wf.size == 0:
                    continue  # (no count, one the host cannot read, or a re-sum: decoded whole)
                for k in range(1, len(slots)):
                    p = slots[k][i]
                    if isinstance(p, Int8Blocks):
                        like = p.codes
                    elif isinstance(p, Bf16Pair):
                        like = p.hi
                    elif isinstance(p, Bf16Stochastic):
                        like = p.value
                    else:
                        continue
                    if like.device not in zero:
                        zero[like.device] = torch.zeros((), dtype=torch.float32, device=like.device)
                    lazy[id(p)] = zero[like.device].expand(like.shape)
        return lazy

    update.__qualname__ = update.__name__ = "compress_state.update"
    # (declared for the in-place engine, which decodes and encodes in its kernels; a call of
    # update decodes, runs tx.update, encodes)
    return D.declare(GradientTransformation(init_fn, update), D.Compressed(decl, fmt, block_size, _SEED), offer=False)


def _host_counts(counts: list[Any]) -> list[int | None]:
    """The leaves' step counts read on the host, in one read: under ``torch.vmap`` the count every
    member shares (read through the wrappers); ``None`` for a leaf without one or where the
    members' counts differ, and for every leaf in a traced graph and while a CUDA graph is being
    captured."""
    if traced():
        return [None] * len(counts)
    present = [unwrapped(torch.as_tensor(c)).reshape(-1) for c in counts if c is not None]
    if not present or (present[0].is_cuda and torch.cuda.is_current_stream_capturing()):
        return [None] * len(counts)
    flat, sizes, at = torch.cat(present).tolist(), iter(len(v) for v in present), 0
    out: list[int | None] = []
    for c in counts:
        if c is None:
            out.append(None)
            continue
        n = next(sizes)
        row, at = flat[at:at + n], at + n
        out.append(int(row[0]) if all(v == row[0] for v in row) else None)
    return out


def _ring_leaves(tree: Any) -> tuple[list[Any], Any]:
    return pytree.tree_flatten(tree, is_leaf=lambda x: x is None or _is_packed(x))


def _gathered(decl: Any, inner: Any) -> Any:
    """``inner`` with each window in the ring layout (:class:`~grokxform.declarations.RingWindow`,
    of compressed rings) as the eager tuple of w trees, oldest first: slot ``(count + k) % w`` of
    each leaf's ring (copies, indexed on the device: traceable)."""
    for m, st, path, _ in list(_members(decl, inner)):
        wf = m.window
        window = getattr(st, wf.name) if wf is not None else None
        if not isinstance(window, D.RingWindow):
            continue
        assert wf is not None and m.count is not None  # (a window is declared with a count)
        counts = _tree.flatten(getattr(st, m.count))[0]
        rings, spec = _ring_leaves(window.buffers)

        def slot(ring: Any, c: torch.Tensor, k: int, w: int = wf.size) -> Any:
            at = torch.remainder(c + k, w).reshape(1)
            if _is_packed(ring):
                return type(ring)(*(part.index_select(0, at).squeeze(0) for part in ring))
            return ring.index_select(0, at).squeeze(0)

        trees = tuple(pytree.tree_unflatten([None if r is None else slot(r, c, k) for r, c in zip(rings, counts)], spec)
                      for k in range(wf.size))
        inner = _replace_at(inner, path, type(st)(*(trees if f == wf.name else v for f, v in zip(st._fields, st))))
    return inner


def _scattered(decl: Any, new: Any, old: Any) -> Any:
    """The new state ``new`` (windows oldest first, from :func:`_gathered`'s) with each window put
    back in the rings of ``old``: each leaf that moved on writes its newest value into the slot
    its old count names."""
    olds = {path: st for _, st, path, _ in _members(decl, old)}
    for m, st, path, _ in list(_members(decl, new)):
        wf = m.window
        if wf is None or not isinstance(getattr(olds[path], wf.name), D.RingWindow):
            continue
        assert m.count is not None
        before = _tree.flatten(getattr(olds[path], m.count))[0]
        after = _tree.flatten(getattr(st, m.count))[0]
        rings, spec = _ring_leaves(getattr(olds[path], wf.name).buffers)
        newest = _ring_leaves(getattr(st, wf.name)[-1])[0]

        def put(ring: torch.Tensor, value: torch.Tensor, c: torch.Tensor, moved: torch.Tensor,
                w: int = wf.size) -> torch.Tensor:
            at = torch.remainder(c, w).reshape(1)
            return ring.index_put((at,), torch.where(moved, value.unsqueeze(0), ring.index_select(0, at)))

        out = []
        for r, v, c0, c1 in zip(rings, newest, before, after):
            if r is None:
                out.append(None)
            elif _is_packed(r):
                out.append(type(r)(*(put(a, b, c0, c1 != c0) for a, b in zip(r, v))))
            else:
                out.append(put(r, v, c0, c1 != c0))
        ring = D.RingWindow(pytree.tree_unflatten(out, spec))
        new = _replace_at(new, path, type(st)(*(ring if f == wf.name else v for f, v in zip(st._fields, st))))
    return new


def _replace_at(state: Any, path: tuple[Any, ...], value: Any) -> Any:
    """``state`` with the node at ``path`` replaced by ``value`` (new containers along the path)."""
    if not path:
        return value
    key, rest = path[0], path[1:]
    if isinstance(key, str) and hasattr(state, "_fields"):
        return type(state)(*(_replace_at(v, rest, value) if f == key else v for f, v in zip(state._fields, state)))
    if isinstance(state, dict):
        return {k: _replace_at(v, rest, value) if k == key else v for k, v in state.items()}
    items = [_replace_at(v, rest, value) if k == key else v for k, v in enumerate(state)]
    return type(state)(*items) if hasattr(state, "_fields") else type(state)(items)


__all__ = ["Bf16Pair", "Bf16Stochastic", "CompressedState", "Int8Blocks", "compress_state"]
