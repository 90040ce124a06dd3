"""Triton source for one group of leaves and one pass of a plan.

The kernel is multi-tensor: program ``i`` handles ``BLOCK`` elements of one leaf (``ITEM_LEAF[i]``
from ``ITEM_START[i]``); every tensor is reached through an int64 table of addresses indexed by the
leaf, so nothing is gathered into a flat buffer. The body is the plan's element programs
(:class:`~grokxform.elements.Program`) in the chain's order, each operation written as the eager
op computes it: in float32 (float64 for float64 values), then rounded to the value's dtype
(``round_to``), with correctly rounded division and square root, and no fused multiply-add (the
step is compiled with ``enable_fp_fusion=False``). Scalars are read from a constant table
(``CONST``: the Python numbers of the rules) and from the buffers the scalar prologue fills
before each pass (``SC0``, ``SC1``...), per leaf through the position table ``POS``.

``uniform`` and ``normal`` hash the key (a scalar, read as float64 and converted to a 32-bit word)
and the element's index ``offs`` with ``uint32`` operations, the steps of
:func:`~grokxform.elements.counter_bits`; ``normal``'s log and cosine are libdevice's ``logf`` and
``cosf`` (numpy's in the interpreter).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from grokxform.elements import (
    ARITHMETIC, COMPARISONS, MIX_MULTIPLIERS, MIX_SHIFTS, RANDOM, STREAMS, TWO_PI_F32, WEYL, Op, Program,
    ScalarRef, interpret, to_float32,
)
from grokxform.engine import plan as P
from grokxform.transforms.compress import DEAD_ZONE, ROOT_SLACK, SCALE_FLOOR, Bf16Pair, Bf16Stochastic, Int8Blocks

_PARTS = {"bf16": Bf16Pair._fields, "bf16_sr": Bf16Stochastic._fields, "int8": Int8Blocks._fields}
"""The parts of a compressed tensor of each format."""
_TL = {torch.float32: "tl.float32", torch.bfloat16: "tl.bfloat16", torch.float16: "tl.float16",
       torch.float64: "tl.float64"}


def tl_name(dtype: torch.dtype) -> str:
    return _TL[dtype]


def _compute(dtype: torch.dtype) -> str:
    return "tl.float64" if dtype == torch.float64 else "tl.float32"


@dataclass(frozen=True)
class Slot:
    """Where a scalar lives: ``kind`` (number, numbers, tensor, tensors), buffer (``"CONST"`` or
    ``"SC<stage>"``) and offset."""

    kind: str
    buf: str
    off: int


class Stop(Exception):
    """Raised when the pass's reduction point (or whole-leaf stage's store) has been emitted."""


@dataclass
class Value:
    name: str
    dtype: torch.dtype


class Emitter:
    """Emits the body of one kernel: the program of the leaf ``leaf`` (every leaf of the group
    runs the same program) for pass ``pass_index``."""

    def __init__(
        self,
        leaf: int,
        pass_index: int,
        main: bool,
        dtype_of: Callable[[str], torch.dtype],
        slot_of: Callable[[Any, str], Slot],
        col_of: Callable[[Any], int],
        constant: Callable[[float], int],
        role_of: Callable[[Any, str], str],
        *,
        output: str = "params",
    ) -> None:
        self.leaf, self.pass_index, self.main = leaf, pass_index, main
        self.output = output
        """``"params"``: the last pass adds the update to the params (role ``P``); ``"updates"``: it
        stores the update (role ``U``, in its dtype) and leaves the params as they are."""
        self.dtype_of, self.slot_of, self.col_of, self.constant, self.role_of = (
            dtype_of, slot_of, col_of, constant, role_of)
        self.lines: list[str] = []
        self.roles: list[str] = []
        self._n = 0
        self._cache: dict[Any, str] = {}
        self.guards: list[str] = []
        self.gates: list[tuple[Any, str]] = []
        """The flags (node, scalar name) of the wrappers that gate the stores (``guards``: as lanes)."""
        self.reduced: Value | None = None
        """The value this pass reduces (the loaded gradient when the reduction reads it as it is)."""
        self.sum_names: tuple[str, ...] = ()
        """The per-leaf sums this pass takes, in the order of the reduction buffer's values."""
        self.wide_sums = False
        """Whether a sum is of float64 values (the reduction buffer is then float64)."""
        self.shifts: dict[str, str] = {}
        """Per role of a packed part: the offset (in its elements) of the slot that the codecs
        read and write (a compressed window's ring: :meth:`at_slot`)."""

    # -- helpers --------------------------------------------------------------------------------

    def var(self, prefix: str = "v") -> str:
        self._n += 1
        return f"{prefix}{self._n}"

    def line(self, text: str) -> None:
        self.lines.append(text)

    def table(self, role: str) -> str:
        if role not in self.roles:
            self.roles.append(role)
        return f"T_{role}"

    def cached(self, key: Any, make: Callable[[], str]) -> str:
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]

    # -- text that the C emitter writes its own way ----------------------------------------------

    def invariant(self, prefix: str, expr: str, ctype: str) -> str:
        """A new variable holding ``expr``, computed once per work item (``ctype``: its C type)."""
        v = self.var(prefix)
        self.line(f"{v} = {expr}")
        return v

    def read(self, buf: str, index: str) -> str:
        """Element ``index`` of the table or buffer ``buf``."""
        return f"tl.load({buf} + {index})"

    def widen(self, expr: str, dtype: torch.dtype) -> str:
        """``expr`` in the compute precision of ``dtype`` values (float32, float64 for float64)."""
        return f"{expr}.to({_compute(dtype)})"

    def round_text(self, expr: str, dtype: torch.dtype) -> str:
        """A float32 ``expr`` rounded to ``dtype`` (a 16-bit float) and back."""
        return f"round_to({expr}, {tl_name(dtype)})"

    # -- scalars --------------------------------------------------------------------------------

    def pos(self, node: Any) -> str:
        return self.cached(("pos", id(node)), lambda: self.invariant(
            "pos", self.read("POS", f"leaf * NPOS + {self.col_of(node)}"), "int64_t"))

    def raw_scalar(self, node: Any, name: str) -> str:
        """The scalar as stored (float64)."""
        slot = self.slot_of(node, name)

        def make() -> str:
            index = f"{slot.off}" if slot.kind in ("number", "tensor") else f"{slot.off} + {self.pos(node)}"
            return self.invariant("s", self.read(slot.buf, index), "double")

        return self.cached(("raw", id(node), name), make)

    def scalar(self, node: Any, name: str, dtype: torch.dtype) -> str:
        """The scalar as an op on a ``dtype`` value uses it (see :mod:`grokxform.elements`)."""
        slot = self.slot_of(node, name)

        def make() -> str:
            raw = self.raw_scalar(node, name)
            if dtype == torch.float64:
                return raw
            value = self.widen(raw, torch.float32)
            if slot.kind in ("tensor", "tensors") and dtype != torch.float32:  # rounded to the value's dtype first
                value = self.round_text(value, dtype)
            return self.invariant("s", value, "float")

        return self.cached(("scalar", id(node), name, dtype), make)

    def flag(self, node: Any, name: str) -> str:
        return self.cached(("flag", id(node), name), lambda: self.invariant(
            "f", f"{self.raw_scalar(node, name)} != 0", "int"))

    def lanes(self, node: Any, name: str) -> str:
        """The flag as a block of lanes (a store mask cannot take a scalar flag in the interpreter)."""
        return self.cached(("lanes", id(node), name), lambda: f"((offs * 0 + {self.raw_scalar(node, name)}) != 0)")

    def number(self, x: float, dtype: torch.dtype) -> str:
        return self.cached(("num", float(x).hex(), dtype == torch.float64), lambda: self.invariant(
            "c", self.widen(self.read("CONST", str(self.constant(x))), dtype),
            "double" if dtype == torch.float64 else "float"))

    def exact_number(self, x: float, dtype: torch.dtype) -> str:
        """The number ``x`` as a value of ``dtype`` (rounded to it through float32), as a comparison,
        a minimum or maximum, or ``where`` takes it."""
        if dtype in (torch.float32, torch.float64):
            return self.number(x, dtype)
        return self.cached(("exact-num", float(x).hex(), dtype),
                           lambda: self.invariant("s", self.round_text(self.number(x, dtype), dtype), "float"))

    def exact_scalar(self, node: Any, name: str, dtype: torch.dtype) -> str:
        """The scalar as a value of ``dtype`` (a tensor scalar already is one; a number is rounded)."""
        if dtype in (torch.float32, torch.float64) or self.slot_of(node, name).kind in ("tensor", "tensors"):
            return self.scalar(node, name, dtype)
        return self.cached(("exact-scalar", id(node), name, dtype), lambda: self.invariant(
            "s", self.round_text(self.scalar(node, name, dtype), dtype), "float"))

    def select(self, cond: str, a: str, b: str, dtype: torch.dtype) -> Value:
        """``a`` where ``cond``, else ``b`` (both values of ``dtype``)."""
        return self.value(self.pick(cond, a, b), dtype)

    # -- the text of the operations (the C emitter overrides those whose C differs) --------------

    infinity = "float('inf')"

    def pick(self, cond: str, a: str, b: str) -> str:
        """``a`` where ``cond``, else ``b``."""
        return f"tl.where({cond}, {a}, {b})"

    def sqrt(self, x: str, dtype: torch.dtype) -> str:
        """√x correctly rounded, in the compute precision of ``dtype``."""
        return f"tl.sqrt_rn({x})" if dtype != torch.float64 else f"tl.sqrt({x})"

    def div(self, a: str, b: str, dtype: torch.dtype) -> str:
        """a / b correctly rounded (Triton's float32 ``/`` is approximate)."""
        return f"tl.div_rn({a}, {b})" if dtype != torch.float64 else f"({a} / {b})"

    def abs(self, x: str, dtype: torch.dtype) -> str:
        """|x|, the sign bit cleared."""
        return f"tl.abs({x})"

    def sign(self, x: str, dtype: torch.dtype) -> str:
        """torch.sign: (x > 0) − (x < 0), so +0.0 for ±0 and NaN."""
        return f"(({x} > 0).to({_compute(dtype)}) - ({x} < 0).to({_compute(dtype)}))"

    def signbit(self, x: str, dtype: torch.dtype) -> str:
        """Whether the sign bit of ``x`` is set (−0.0 included)."""
        bits = "tl.int64" if dtype == torch.float64 else "tl.int32"
        return f"({x}.to({bits}, bitcast=True) < 0)"

    def logical(self, kind: str, a: str, b: str = "") -> str:
        """``a and b``, ``a or b`` or ``not a`` of predicates."""
        return {"and": f"({a} & {b})", "or": f"({a} | {b})", "not": f"({a} == 0)"}[kind]

    def extremum(self, kind: str, x: str, y: str, dtype: torch.dtype) -> str:
        """IEEE 754's minimum (``kind`` ``"min"``) or maximum of the value ``x`` and ``y``: ``x``
        where it is NaN, or below (above) ``y``, or on a tie of ±0 the zero that orders first (−0
        for the minimum); else ``y`` (NaN when ``y`` is). (Each test reads ``x``, a block: the
        interpreter cannot combine a predicate of a scalar with one of a block.)"""
        first = f"({x} < {y})" if kind == "min" else f"({x} > {y})"
        negative = self.signbit(x, dtype)
        tie = self.logical("and", f"({x} == {y})", negative if kind == "min" else self.logical("not", negative))
        take_x = self.logical("or", self.logical("or", first, f"({x} != {x})"), tie)
        return self.pick(take_x, x, y)

    # -- counter-based random numbers: the integer steps of grokxform.elements.counter_bits ------

    element_index = "offs"
    """The flat index of the element (int64) in its leaf."""

    def u32(self, expr: str) -> str:
        """The integer ``expr`` as a 32-bit unsigned word (modulo 2³²)."""
        return f"({expr}).to(tl.uint32)"

    def u32_const(self, c: int) -> str:
        """The 32-bit word ``c`` as a constant of 32-bit unsigned arithmetic."""
        return f"{c:#x}"

    def u32_value(self, expr: str) -> str:
        """A new 32-bit unsigned variable of the element holding ``expr``."""
        v = self.var("h")
        self.line(f"{v} = {expr}")
        return v

    def f32_text(self, x: float) -> str:
        """The number ``x`` (exact in float32) as a float32 constant."""
        return repr(x)

    def to_f32(self, expr: str) -> str:
        """The integer ``expr`` (below 2²⁴: exact) as a float32 value."""
        return f"({expr}).to(tl.float32)"

    def log_f32(self, x: str) -> str:
        """ln x in float32 (libdevice's on a GPU, within 1 ulp; numpy's in the interpreter)."""
        return f"log_f32({x})"

    def cos_f32(self, x: str) -> str:
        """cos x in float32 (libdevice's on a GPU, within 2 ulp; numpy's in the interpreter)."""
        return f"cos_f32({x})"

    def mix(self, x: str, per_item: bool) -> str:
        """:func:`~grokxform.elements.mix32` of the 32-bit word ``x``, into new variables: once per
        work item (``per_item``) or per element."""
        for k, shift in enumerate(MIX_SHIFTS):
            step = f"{x} ^ ({x} >> {shift})"
            x = self.invariant("h", step, "uint32_t") if per_item else self.u32_value(step)
            if k < len(MIX_MULTIPLIERS):
                step = f"{x} * {self.u32_const(MIX_MULTIPLIERS[k])}"
                x = self.invariant("h", step, "uint32_t") if per_item else self.u32_value(step)
        return x

    def bits(self, node: Any, key: ScalarRef, stream: str) -> str:
        """The 32 random bits of the element in ``stream`` of the scalar ``key``: the steps of
        :func:`~grokxform.elements.counter_bits` (the key's and the stream's part once per item);
        for ``stream`` ``"dither"``, :func:`~grokxform.elements.counter_dither`'s."""
        k = self.cached(("key", id(node), key.name), lambda: self.invariant(
            "k", self.u32(self.index(self.raw_scalar(node, key.name))), "uint32_t"))
        keyed = self.cached(("stream", id(node), key.name, stream), lambda: self.mix(self.invariant(
            "h", f"{k} ^ {self.u32_const(STREAMS[stream])}", "uint32_t"), True))
        lo = self.cached(("index", "lo"), lambda: self.u32_value(self.u32(self.element_index)))
        # the index's high word, the item's: an item starts at a multiple of BLOCK, which divides 2³²
        hi = self.cached(("index", "hi"), lambda: self.invariant("h", self.u32("start >> 32"), "uint32_t"))
        base = self.cached(("base", id(node), key.name, stream), lambda: self.mix(self.invariant(
            "h", f"{keyed} ^ {hi}", "uint32_t"), True))
        if stream == "dither":
            return self.u32_value(f"{lo} * {self.u32_const(WEYL)} + {base}")
        inner = self.mix(self.u32_value(f"{lo} + {base}"), False)
        return self.mix(self.u32_value(f"{inner} ^ {k}"), False)

    def random(self, kind: str, key: ScalarRef, node: Any) -> Value:
        """:func:`~grokxform.elements.uniform`, :func:`~grokxform.elements.normal` (as
        :func:`~grokxform.elements.counter_normal` computes it) or ``"dither"``
        (:func:`~grokxform.elements.counter_dither`) of ``key`` at this element (float32)."""
        f32, scale = torch.float32, self.f32_text(2.0**-24)
        if kind in ("uniform", "dither"):
            return self.value(f"{self.to_f32(self.bits(node, key, kind) + ' >> 8')} * {scale}", f32)
        radius_bits, angle_bits = self.bits(node, key, "normal_radius"), self.bits(node, key, "normal_angle")
        u1 = self.value(f"{self.to_f32(f'({radius_bits} >> 8) + 1')} * {scale}", f32)
        u2 = self.value(f"{self.to_f32(f'{angle_bits} >> 8')} * {scale}", f32)
        radius = self.value(self.sqrt(f"{self.f32_text(-2.0)} * {self.log_f32(u1.name)}", f32), f32)
        angle = self.value(f"{u2.name} * {self.f32_text(TWO_PI_F32)}", f32)
        return self.value(f"{radius.name} * {self.cos_f32(angle.name)}", f32)

    # -- values ---------------------------------------------------------------------------------

    def value(self, expr: str, dtype: torch.dtype) -> Value:
        """A new value ``expr`` of ``dtype``, already exact in it (or a predicate, ``torch.bool``)."""
        v = self.var()
        self.line(f"{v} = {expr}")
        return Value(v, dtype)

    def rounded(self, expr: str, dtype: torch.dtype) -> Value:
        """A new value ``expr`` (computed in float32 or float64) rounded to ``dtype``."""
        return self.value(expr if dtype in (torch.float32, torch.float64) else self.round_text(expr, dtype), dtype)

    def load(self, role: str, dtype: torch.dtype, offset: str = "") -> Value:
        table = self.table(role)
        v = self.var("x")
        self.line(
            f"{v} = tl.load(pointer({table}, leaf, {tl_name(dtype)}, ALIGNED) + {offset}offs, mask=msk, other=0.0)"
            f".to({_compute(dtype)})"
        )
        return Value(v, dtype)

    def store(self, role: str, value: Value, offset: str = "") -> None:
        table = self.table(role)
        mask = " & ".join(["msk", *self.guards])
        store = value.name if value.dtype in (torch.float32, torch.float64) else (
            f"cast_to({value.name}, {tl_name(value.dtype)})")
        at = f"pointer({table}, leaf, {tl_name(value.dtype)}, ALIGNED)"
        self.line(f"tl.store({at} + {offset}offs, {store}, mask={mask})")

    # -- element programs -----------------------------------------------------------------------

    def run(self, prog: Program, inputs: dict[str, Value], node: Any) -> dict[str, Value]:
        """The program's text (:func:`~grokxform.elements.interpret`) with ``node``'s scalars."""
        vals = interpret(prog, inputs, lambda op, values, k: self.op(op, values, node))
        return {name: vals[v] for name, v in prog.outputs.items()}

    def operand(self, arg: Any, vals: list[Value], node: Any, dtype: torch.dtype, exact: bool) -> str:
        """An op's operand on a ``dtype`` value: a value, or a scalar or a number at compute precision
        (arithmetic) or rounded to ``dtype`` (``exact``: comparisons, minimum, maximum, ``where``)."""
        if isinstance(arg, int):
            return vals[arg].name
        if isinstance(arg, ScalarRef):
            return self.exact_scalar(node, arg.name, dtype) if exact else self.scalar(node, arg.name, dtype)
        return self.exact_number(arg[1], dtype) if exact else self.number(arg[1], dtype)

    def op(self, op: Op, vals: list[Value], node: Any) -> Value:
        """One operation of an element program, as the eager op computes it."""
        a, kind, dt = op.args, op.kind, op.dtype
        if kind == "where":
            cond = self.flag(node, a[0].name) if isinstance(a[0], ScalarRef) else vals[a[0]].name
            return self.select(cond, *(self.operand(y, vals, node, dt, True) for y in a[1:]), dt)
        if kind in RANDOM:
            return self.random(kind, a[1], node)
        x = vals[a[0]]
        if kind == "cast":
            return self.run_cast(x, dt)
        if kind == "sqrt":
            return self.rounded(self.sqrt(x.name, dt), dt)
        if kind == "neg":
            return self.rounded(f"-{x.name}", dt)
        if kind == "abs":
            return self.value(self.abs(x.name, dt), dt)
        if kind == "sign":
            return self.value(self.sign(x.name, dt), dt)
        if kind == "isnan":
            return self.value(f"({x.name} != {x.name})", dt)
        if kind == "isfinite":
            return self.value(f"({self.abs(x.name, x.dtype)} < {self.infinity})", dt)
        if kind == "not":
            return self.value(self.logical("not", x.name), dt)
        y = self.operand(a[1], vals, node, x.dtype, kind not in ARITHMETIC)
        if kind in COMPARISONS:
            return self.value(f"({x.name} {COMPARISONS[kind]} {y})", dt)
        if kind in ("and", "or"):
            return self.value(self.logical(kind, x.name, y), dt)
        if kind in ("min", "max"):
            return self.value(self.extremum(kind, x.name, y, dt), dt)
        expr = {
            "add": f"{x.name} + {y}",
            "sub": f"{x.name} - {y}",
            "mul": f"{x.name} * {y}",
            "div": self.div(x.name, y, dt),
            "rsub": f"{y} - {x.name}",
            "rdiv": self.div(y, x.name, dt),
        }[kind]
        return self.rounded(expr, dt)

    def reduce(self, x: Value, sums: dict[str, Value]) -> None:
        """Σx² (float32), then the sum of each of ``sums`` (float32; float64 for float64 values),
        at the item's slot of the reduction buffer (``1 + len(sums)`` values per slot, float64
        when a sum is), and the count of non-finite values of ``x`` in this block."""
        width = 1 + len(sums)
        self.line(f"r = tl.where(msk, {x.name}, 0.0).to(tl.float32)")
        self.line("rsq = tl.sum(r * r, axis=0)")
        bad = f"(({x.name} != {x.name}) | (tl.abs({x.name}) == float('inf'))) & msk"
        self.line(f"rbad = tl.sum(({bad}).to(tl.int32), axis=0)")
        self.line("rslot = leaf * CHUNKS + start // BLOCK")
        self.line(f"tl.store(RSQ + rslot * {width}, rsq)")
        for j, v in enumerate(sums.values(), start=1):
            wide = _compute(v.dtype)
            self.line(f"tl.store(RSQ + rslot * {width} + {j}, tl.sum(tl.where(msk, {v.name}, 0.0).to({wide}), axis=0))")
        self.line("tl.store(RBAD + rslot, rbad)")

    def finish(self, u: Value) -> None:
        """θ ← θ + u, in the param's dtype (as ``apply_updates``); or u stored as it is."""
        if self.output == "updates":
            self.store("U", self.run_cast(u, self.dtype_of("U")))
            return
        p = self.param()
        step = self.run_cast(u, p.dtype)
        self.store("P", self.rounded(f"{p.name} + {step.name}", p.dtype))

    def run_cast(self, x: Value, dtype: torch.dtype) -> Value:
        if x.dtype == dtype:
            return x
        src = x.name if _compute(x.dtype) == _compute(dtype) else f"{x.name}.to({_compute(dtype)})"
        return self.rounded(src, dtype)

    # -- the plan: what :meth:`grokxform.engine.plan.Node.apply` drives (a Runner) -------------

    def walk(self, root: P.Node) -> None:
        """The pass's text: the plan's program from the gradient, then the write (or, in a
        reduction pass, up to its reduction point)."""
        self.gradient = self.load("G", self.dtype_of("G"))
        try:
            self.finish(root.apply(self, self.gradient))
        except Stop:
            pass

    def rule(self, node: Any, rule: Any, inputs: dict[str, Value]) -> dict[str, Value]:
        return self.run(rule.program({name: v.dtype for name, v in inputs.items()}), inputs, node)

    def state(self, node: Any, name: str) -> Value:
        role = self.role_of(node, name)
        codec = node.codec(self.leaf, name)
        if codec is not None:
            return self.decode(role, codec)
        return self.load(role, self.dtype_of(role))

    def write(self, node: Any, name: str, value: Value) -> None:
        codec = node.codec(self.leaf, name)
        if codec is not None:
            self.encode(role=self.role_of(node, name), codec=codec, value=value, node=node)
        else:
            self.store(self.role_of(node, name), value)

    # -- compressed state: the codecs of grokxform.transforms.compress, in registers ------------

    def part(self, role: str, part: str, dtype: str) -> str:
        """A pointer of Triton type ``dtype`` to this item's leaf of the packed ``role``'s ``part``."""
        name = f"{role}__{part}"
        at = f"pointer({self.table(name)}, leaf, {dtype}, ALIGNED)"
        return at if name not in self.shifts else f"({at} + {self.shifts[name]})"

    def decode(self, role: str, codec: P.Codec) -> Value:
        """The float32 value the packed ``role`` holds at each element (``decode``)."""
        f32 = torch.float32
        if codec.fmt == "bf16":  # hi·2¹⁶ + lo·2⁸: the top 24 bits of the float32
            hi = self.value(f"tl.load({self.part(role, 'hi', 'tl.int16')} + offs, mask=msk, other=0).to(tl.int32)", f32)
            lo = self.value(f"tl.load({self.part(role, 'lo', 'tl.uint8')} + offs, mask=msk, other=0).to(tl.int32)", f32)
            return self.value(f"(({hi.name} << 16) | ({lo.name} << 8)).to(tl.float32, bitcast=True)", f32)
        if codec.fmt == "bf16_sr":
            return self.value(f"tl.load({self.part(role, 'value', 'tl.bfloat16')} + offs, mask=msk, other=0.0)"
                              ".to(tl.float32)", f32)
        # int8: the tile as [BLOCK // bs, bs], one row per quantization block (block_size divides
        # BLOCK; a leaf's items start at multiples of BLOCK), each row times its block's scale.
        # A code's byte b as a float32 by its bits, without a conversion instruction: 2²³ + b
        # (b = the unsigned code; b ^ 0x80 = the signed code + 128), less 2²³ (+ 128), exactly.
        bs = codec.block_size
        byte = self.value(f"tl.load({self.part(role, 'codes', 'tl.uint8')} + offs, mask=msk, other=0).to(tl.int32)",
                          torch.int32)
        bits, less = ("0x4B000000", 8388608.0) if codec.unsigned else ("0x4B000080", 8388736.0)
        code = self.value(f"({byte.name} ^ {bits}).to(tl.float32, bitcast=True) - {less!r}", f32)
        first = self.block_starts(bs)
        scale = self.value(f"tl.load({self.part(role, 'scales', 'tl.float32')} + start // {bs} + tl.arange(0, BLOCK // {bs}),"
                           f" mask={first} < n, other=0.0)", f32)
        code = self.unit_of_code(code, codec)
        return self.scaled(code, scale, bs)

    def scaled(self, unit: Value, scale: Value, bs: int) -> Value:
        """Each block of ``bs`` elements of ``unit`` (a code decoded up to its scale) times its
        block's ``scale``: ``decode``'s last step. (Triton folds the reshapes: the kernel compiles
        to the instructions of a tile held as ``[BLOCK // bs, bs]`` from the start.)"""
        return self.value(f"tl.reshape(tl.reshape({unit.name}, [BLOCK // {bs}, {bs}]) * {scale.name}[:, None],"
                          " [BLOCK])", torch.float32)

    def unit_of_code(self, code: Value, codec: P.Codec) -> Value:
        """An int8 code (as float32) decoded up to its block's scale, by multiplications only
        (``decode``'s definition, in every dialect): ``t = code·fl(1/255)``, ``(t·t)·(t·t)`` for
        the unsigned code; ``code·fl(1/127)`` for the signed one."""
        f32 = torch.float32
        if codec.unsigned:
            t = self.value(f"{code.name} * {self.f32_text(to_float32(1.0 / 255.0))}", f32)
            t = self.value(f"{t.name} * {t.name}", f32)
            return self.value(f"{t.name} * {t.name}", f32)
        return self.value(f"{code.name} * {self.f32_text(to_float32(1.0 / 127.0))}", f32)

    def block_starts(self, bs: int) -> str:
        """The index of the first element of each quantization block of ``bs`` elements in this item."""
        return self.cached(("block starts", bs), lambda: self.invariant(
            "qb", f"start + tl.arange(0, BLOCK // {bs}).to(tl.int64) * {bs}", "int64_t"))

    def encode(self, *, role: str, codec: P.Codec, value: Value, node: Any) -> Value | None:
        """Store ``value`` (float32) into the packed ``role`` (``encode``), where the store mask
        and the wrappers' flags are set. Returns what the store holds, decoded (``decode``'s
        value, from the registers; the compiler drops it where nothing reads it)."""
        mask = " & ".join(["msk", *self.guards])
        x, f32 = value.name, torch.float32
        if codec.fmt in ("bf16", "bf16_sr"):
            bits = self.value(f"{x}.to(tl.int32, bitcast=True)", torch.int32)
            special = f"(({bits.name} & 0x7F800000) == 0x7F800000)"  # an infinity or a NaN: not rounded
            if codec.fmt == "bf16":
                r = self.value(f"tl.where({special}, {bits.name}, {bits.name} + 0x80)", torch.int32)
                self.line(f"tl.store({self.part(role, 'hi', 'tl.int16')} + offs, ({r.name} >> 16).to(tl.int16), mask={mask})")
                self.line(f"tl.store({self.part(role, 'lo', 'tl.uint8')} + offs, (({r.name} >> 8) & 0xFF).to(tl.uint8),"
                          f" mask={mask})")
                return self.value(f"({r.name} & -256).to(tl.float32, bitcast=True)", f32)  # the top 24 bits
            u = self.random("uniform", ScalarRef(codec.key), node)  # 16 random bits below the kept 16
            noise = self.value(f"({u.name} * 65536.0).to(tl.int32)", torch.int32)
            r = self.value(f"tl.where({special}, {bits.name}, {bits.name} + {noise.name})", torch.int32)
            self.line(f"tl.store({self.part(role, 'value', 'tl.int16')} + offs, ({r.name} >> 16).to(tl.int16), mask={mask})")
            return self.value(f"({r.name} & -65536).to(tl.float32, bitcast=True)", f32)  # the top 16 bits
        # int8: per quantization block (a row of the tile as [BLOCK // bs, bs]): its scale (the
        # absmax with NaN propagated, zero beyond the leaf as the eager padding) and the scale's
        # reciprocal; per element a multiplication (encode's definition).
        bs = codec.block_size
        a = self.value(f"tl.reshape(tl.where(msk, {x}, 0.0), [BLOCK // {bs}, {bs}])", f32)
        mag = f"tl.abs({a.name})" if not codec.unsigned else a.name
        top = self.value(f"tl.reduce({mag}, 1, max_nan)", f32)
        tiny = self.f32_text(SCALE_FLOOR)
        scale = self.value(f"tl.where({top.name} < {tiny}, {tiny}, {top.name})", f32)  # (a NaN stays)
        inv = self.value(self.div("1.0", scale.name, f32), f32)
        if not codec.unsigned:
            inv = self.value(f"{inv.name} * 127.0", f32)
        q = self.value(f"tl.reshape({a.name} * {inv.name}[:, None], [BLOCK])", f32)
        if codec.unsigned:  # the fourth-root code below q, and up with the probability of q's distance from it
            dead = self.f32_text(DEAD_ZONE)
            u = self.random("dither", ScalarRef(codec.key), node)
            u = self.value(f"tl.minimum(tl.maximum({u.name}, {dead}), {self.f32_text(1.0 - DEAD_ZONE)})", f32)
            # (a NaN product codes 0: tl.maximum returns the number of a NaN and a number)
            q = self.value(f"tl.minimum(tl.maximum({q.name}, 0.0), 1.0)", f32)
            root = self.value(f"fourth_root_guess({q.name})", f32)  # q^¼, approximate (the comparison below decides)
            guess = self.value(f"tl.minimum(tl.floor({root.name} * 255.0 + {self.f32_text(ROOT_SLACK)}), 254.0)", f32)
            at_guess = self.unit_of_code(guess, codec)
            down = self.value(f"{at_guess.name} > {q.name}", torch.bool)
            other = self.value(f"{guess.name} + tl.where({down.name}, -1.0, 1.0)", f32)
            at_other = self.unit_of_code(other, codec)
            lo = self.value(f"tl.where({down.name}, {other.name}, {guess.name})", f32)
            below = self.value(f"tl.where({down.name}, {at_other.name}, {at_guess.name})", f32)
            above = self.value(f"tl.where({down.name}, {at_guess.name}, {at_other.name})", f32)
            up = f"({u.name} * ({above.name} - {below.name}) < {q.name} - {below.name})"
            q = self.value(f"tl.maximum({lo.name} + {up}.to(tl.float32), ({q.name} > 0.0).to(tl.float32))", f32)
            magic = self.value(f"{q.name} + 8388608.0", f32)  # 2²³ + the code: its low byte
        else:  # rounded to nearest, ties to even (|q| ≤ 127·(1 + 2⁻²²): encode's clamp changes nothing)
            q = self.value(f"tl.where({q.name} != {q.name}, 0.0, {q.name})", f32)  # (a NaN product codes 0)
            magic = self.value(f"{q.name} + 12582912.0", f32)  # 1.5·2²³ + the code: its low byte
            q = self.value(f"{magic.name} - 12582912.0", f32)
        # the code's byte from the float's bits (no conversion instruction; low_byte says why it
        # takes an integer instruction)
        kind = "tl.uint8" if codec.unsigned else "tl.int8"
        byte = f"low_byte({magic.name}.to(tl.int32, bitcast=True)).to({kind})"
        self.line(f"tl.store({self.part(role, 'codes', kind)} + offs, {byte}, mask={mask})")
        first = self.block_starts(bs)  # a block is written where its first element is
        written = " & ".join([f"({first} < n)", *(f"(({first} * 0 + {self.raw_scalar(gate, flag)}) != 0)"
                                                  for gate, flag in self.gates)])
        self.line(f"tl.store({self.part(role, 'scales', 'tl.float32')} + start // {bs} + tl.arange(0, BLOCK // {bs}),"
                  f" {scale.name}, mask={written})")
        return self.scaled(self.unit_of_code(q, codec), scale, bs)

    # -- windows: a ring of w slots per leaf (compressed: one ring per part) ----------------------

    blocks_of_n = "((n + {m}) // {bs})"
    """The text of a leaf's number of int8 blocks of ``bs`` elements (``m`` = bs − 1)."""

    @contextmanager
    def at_slot(self, role: str, codec: P.Codec, slot: str) -> Iterator[None]:
        """Within: the codecs read and write slot ``slot`` (text) of the compressed ring ``role``
        (its codes or bfloat16 parts ``[w, n]``, its scales ``[w, blocks]``)."""
        blocks = self.blocks_of_n.format(m=codec.block_size - 1, bs=codec.block_size)
        saved = dict(self.shifts)
        for part in _PARTS[codec.fmt]:
            self.shifts[f"{role}__{part}"] = f"{slot} * {blocks if part == 'scales' else 'n'}"
        try:
            yield
        finally:
            self.shifts = saved

    def oldest(self, m: P.Member) -> Value:
        role = self.role_of(m, "window")
        codec = m.codec(self.leaf, "window")
        if codec is not None:
            with self.at_slot(role, codec, self._slot(m)):
                return self.decode(role, codec)
        return self.load(role, self.dtype_of(role), f"{self._slot(m)} * n + ")

    def push(self, m: P.Member, newest: Value, out: Value, total: Value | None) -> Value:
        codec = m.codec(self.leaf, "window")
        if codec is None:
            self.store(self.role_of(m, "window"), newest, f"{self._slot(m)} * n + ")
            self.resum(m, newest)
            return out
        role = self.role_of(m, "window")
        with self.at_slot(role, codec, self._slot(m)):
            q = self.encode(role=role, codec=codec, value=newest, node=m)
        wf = m.decl.window
        if wf is not None and wf.total is not None and total is not None:
            self.packed_total(m, codec, newest, total, self.role_of(m, wf.total), wf.size, q)
        return out

    def packed_total(self, m: P.Member, codec: P.Codec, newest: Value, total: Value, role: str, w: int,
                     q: Value | None) -> None:
        """The running sum of a compressed window: ``total + (q − newest)`` in its dtype, q what the
        slot now holds (``encode``'s decoded value); on the update due for the re-sum, its decoded
        slots summed (:meth:`packed_window_sum`)."""
        assert q is not None  # (Triton's encode returns it)
        ring, slot = self.role_of(m, "window"), self._slot(m)
        acc = total.dtype
        fixed = self.rounded(f"{total.name} + ({self.widen(q.name, acc)} - {self.widen(newest.name, acc)})", acc)
        self.store(role, fixed)
        self.packed_window_sum(ring, codec, slot, w, role, q)

    def _decoded(self, ring: str, codec: P.Codec, slot: str) -> tuple[list[str], Value]:
        """The lines that decode slot ``slot`` of the compressed ``ring`` (to emit in a block), and the value."""
        saved, self.lines = self.lines, []
        with self.at_slot(ring, codec, slot):
            v = self.decode(ring, codec)
        lines, self.lines = self.lines, saved
        return lines, v

    def packed_window_sum(self, ring: str, codec: P.Codec, slot: str, w: int, total: str, q: Value) -> None:
        """On the update due for it, the running sum ``total`` becomes the sum of the decoded slots
        of the compressed ``ring`` (the w − 1 older, then ``q``), added one by one in float64."""
        dst = f"pointer({self.table(total)}, leaf, {tl_name(self.dtype_of(total))}, ALIGNED)"
        mask = " & ".join(["msk", *self.guards])
        acc, j = self.var("acc"), self.var("j")
        self.line(f"if {slot} == {w - 1}:")
        if w == 1:
            self.line(f"    {acc} = {q.name}.to(tl.float64)")
        else:
            first, v0 = self._decoded(ring, codec, "0")
            later, vj = self._decoded(ring, codec, j)
            self.lines += [f"    {x}" for x in first]
            self.line(f"    {acc} = {v0.name}.to(tl.float64)")
            self.line(f"    for {j} in range(1, {w - 1}):")
            self.lines += [f"        {x}" for x in later]
            self.line(f"        {acc} += {vj.name}.to(tl.float64)")
            self.line(f"    {acc} += {q.name}.to(tl.float64)")
        self.line(f"    tl.store({dst} + offs, {acc}.to({tl_name(self.dtype_of(total))}), mask={mask})")

    def reached(self, x: Value, sums: dict[str, Value]) -> NoReturn:
        self.reduced, self.sum_names = x, tuple(sums)
        self.wide_sums = any(v.dtype == torch.float64 for v in sums.values())
        self.reduce(x, sums)
        raise Stop

    def stash(self, node: P.Whole, x: Value) -> NoReturn:
        role = self.role_of(node, "stash")
        if x.dtype != self.dtype_of(role):
            raise P.Unsupported(f"{node.where}: its input is {x.dtype}, not the gradient's {self.dtype_of(role)}")
        guards, self.guards = self.guards, []  # (a buffer, not state: written whatever the flags)
        self.store(role, x)
        self.guards = guards
        raise Stop

    def stashed(self, node: P.Whole) -> Value:
        role = self.role_of(node, "stash")
        return self.load(role, self.dtype_of(role))

    def shared(self, x: Value) -> Value:
        return x

    @contextmanager
    def gated(self, node: Any, flag: str) -> Iterator[None]:
        self.guards.append(self.lanes(node, flag))
        self.gates.append((node, flag))
        try:
            yield
        finally:
            self.guards.pop()
            self.gates.pop()

    def resum(self, m: P.Member, newest: Value) -> None:
        """On the update due for it (slot ``w − 1``: the ring is in order, the newest value goes
        to the last slot), the running sum becomes the window's sum: its values oldest first,
        added one by one in float64, rounded once (:class:`~grokxform.declarations.WindowField`)."""
        wf = m.decl.window
        if wf is None or wf.total is None:
            return
        self.window_sum(self._slot(m), wf.size, self.role_of(m, "window"), self.role_of(m, wf.total), newest)

    def window_sum(self, slot: str, w: int, role: str, total: str, newest: Value) -> None:
        """The text of :meth:`resum`: the ring ``role``'s w − 1 older slots and ``newest`` into ``total``."""
        ring = f"pointer({self.table(role)}, leaf, {tl_name(self.dtype_of(role))}, ALIGNED)"
        dst = f"pointer({self.table(total)}, leaf, {tl_name(self.dtype_of(total))}, ALIGNED)"
        mask = " & ".join(["msk", *self.guards])
        acc, j = self.var("acc"), self.var("j")
        wide = f".to({_compute(self.dtype_of(role))}).to(tl.float64)"  # exact: through float32 for 16-bit values
        # One slot per iteration: unrolling (more loads in flight) cost every step more registers
        # than it saved on the re-sum (GPT-2, H200).
        self.line(f"if {slot} == {w - 1}:")
        if w == 1:
            self.line(f"    {acc} = {newest.name}.to(tl.float64)")
        else:
            self.line(f"    {acc} = tl.load({ring} + offs, mask=msk, other=0.0){wide}")
            self.line(f"    for {j} in range(1, {w - 1}):")
            self.line(f"        {acc} += tl.load({ring} + {j} * n + offs, mask=msk, other=0.0){wide}")
            self.line(f"    {acc} += {newest.name}.to(tl.float64)")
        self.line(f"    tl.store({dst} + offs, {acc}.to({tl_name(self.dtype_of(total))}), mask={mask})")

    def _slot(self, m: P.Member) -> str:
        """The ring slot of this item's leaf (the window's oldest value) for member ``m``."""
        return self.cached(("slot", id(m)), lambda: self.invariant(
            "slot", self.index(self.raw_scalar(m, P.SLOT)), "int64_t"))

    def index(self, expr: str) -> str:
        """A float64 ``expr`` holding a whole number, as an int64 index."""
        return f"{expr}.to(tl.int64)"

    def param(self) -> Value:
        dtype = self.dtype_of("P")
        return Value(self.cached("param", lambda: self.load("P", dtype).name), dtype)


_ELEMENT_LOAD = re.compile(r"^(\w+) = tl\.load\(.*pointer\(T_")
_TABLE = re.compile(r"\bT_\w+")
_NAME = re.compile(r"\b[A-Za-z_]\w*\b")


def hoist_loads(lines: list[str]) -> list[str]:
    """``lines`` (a kernel body) with each element load moved up to just after what it needs: the
    lines that define its names and any store to its tensor (so it reads what it read before).
    A load of a later member then no longer waits for an earlier member's store, which the
    compiler cannot reorder (the tensors come from address tables: they may alias, for all it
    knows). Only unindented loads move, and only to unindented positions."""
    out: list[str] = []
    moved: set[str] = set()
    for line in lines:
        if _ELEMENT_LOAD.match(line):
            tables = set(_TABLE.findall(line))
            names = set(_NAME.findall(line.split("=", 1)[1]))
            pos = 0
            for k, prior in enumerate(out):
                defines = prior.strip().split(" = ", 1)[0] if " = " in prior else None
                if defines in names or ("tl.store(" in prior and tables & set(_TABLE.findall(prior))):
                    pos = k + 1
            while pos < len(out) and (out[pos].startswith(" ") or out[pos] in moved):
                pos += 1  # (not into an indented block; after the loads moved before it, in order)
            out.insert(pos, line)
            moved.add(line)
        else:
            out.append(line)
    return out


_ROUNDED = re.compile(r"\btl\.(sqrt_rn|div_rn)\((?!1\.0,)")


def rounding_in_line(lines: list[str]) -> list[str]:
    """``lines`` (a kernel body) with each float32 square root and division of elements
    (``tl.sqrt_rn``, ``tl.div_rn``; not a block's reciprocal ``tl.div_rn(1.0, ...)``) computed by
    :func:`~grokxform.engine._lib.sqrt_f32` and :func:`~grokxform.engine._lib.div_f32`: the same
    correctly rounded numbers, without a branch per element."""
    return [_ROUNDED.sub(lambda m: "sqrt_f32(" if m.group(1) == "sqrt_rn" else "div_f32(", line) for line in lines]


def kernel_source(name: str, em: Emitter, passes: int, items: int = 1, hoist: bool = False,
                  in_line: bool = False) -> str:
    """The module text of the kernel ``name`` whose body ``em`` emitted. Arguments: the work
    items, the position and scalar tables, one address table per role (``em.roles``), the
    reduction buffers and their row length, and ``ALIGNED`` (constexpr: every address in the
    tables is a multiple of 16 bytes). A program takes ``items`` consecutive work items in
    turn (the item tables then hold a multiple of ``items``); ``hoist``: the element loads as
    early as they may be (:func:`hoist_loads`); ``in_line``: square roots and divisions without
    a branch per element (:func:`rounding_in_line`).

    An item starts at a multiple of ``BLOCK`` (``_items``). The body is written twice: for an
    item of ``BLOCK`` elements, with a mask the compiler knows to be all true (no bounds test per
    element; with ``ALIGNED`` a thread's elements move in vector loads and stores), and, masked,
    for a leaf's last, partial item."""
    tables = "".join(f"T_{r}, " for r in em.roles)
    scs = "".join(f"SC{k}, " for k in range(passes))
    args = (f"ITEM_LEAF, ITEM_START, NUMEL, POS, CONST, {scs}{tables}RSQ, RBAD, CHUNKS, "
            "NPOS: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr")
    lines = hoist_loads(em.lines) if hoist else em.lines
    lines = rounding_in_line(lines) if in_line else lines
    per_item = [
        "leaf = tl.load(ITEM_LEAF + item)",
        "start = tl.multiple_of(tl.load(ITEM_START + item), BLOCK)",
        "n = tl.load(NUMEL + leaf)",
        "offs = start + tl.arange(0, BLOCK).to(tl.int64)",
        "if start + BLOCK <= n:",
        "    msk = tl.full([BLOCK], 1, tl.int1)",
        *(f"    {line}" for line in lines),
        "else:",
        "    msk = offs < n",
        *(f"    {line}" for line in lines),
    ]
    if items == 1:
        body = ["item = tl.program_id(0)", *per_item]
    else:
        body = [f"for k in range({items}):", f"    item = tl.program_id(0) * {items} + k",
                *(f"    {line}" for line in per_item)]
    text = [
        "import triton",
        "import triton.language as tl",
        "from grokxform.engine._lib import (cast_to, cos_f32, div_f32, fourth_root_guess, log_f32, low_byte, max_nan,",
        "                                   pointer, round_to, sqrt_f32)",
        "",
        "",
        "@triton.jit",
        f"def {name}({args}):",
        *(f"    {line}" for line in body),
        "",
    ]
    return "\n".join(text)
