"""The engine's C kernels: the same plan as the Triton kernels, as C functions built by the
system's C compiler, for steps on the CPU.

:class:`CEmitter` writes a pass of a group of leaves as a loop over the work items (``BLOCK``
elements of one leaf each) and, inside it, over their elements: the element programs of the
chain in its order, each operation in float32 (float64 for float64 values) and rounded to its
value's dtype, as the eager op rounds (bfloat16 and float16 to nearest even, written out in
integer operations). The compiler may not contract a multiply and an add (``-ffp-contract=off``),
and may assume no floating-point trap (``-fno-trapping-math``: a conditional conversion or
division then vectorizes; no result changes);
division and square root are IEEE's. ``uniform`` and ``normal`` hash the key and the element's
index ``i`` in ``uint32_t`` operations (``normal``'s log and cosine: the C library's ``logf`` and
``cosf``). The element loops carry ``#pragma omp simd`` (vectorised) and the work items are shared
by ``torch.get_num_threads()`` threads (OpenMP, ``-fopenmp``; where the compiler has no OpenMP
runtime, one thread). A thread computes its items as any other would: the numbers do not depend on
the number of threads.

A step's kernels are one translation unit, compiled once into a shared library in the kernel
cache folder (:func:`~grokxform.engine.step.cache_dir`; the file's name is the hash of its source,
the compiler and its flags) and called through ``ctypes`` with one argument: an int64 array of
the addresses and sizes the kernel reads. Where no C compiler is found (``CC``, else ``cc``,
``gcc`` or ``clang`` on the ``PATH``), :func:`compiler` says why and the engine runs its foreach
backend instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
from typing import Any

import torch

from grokxform.elements import ScalarRef
from grokxform.engine import codegen as G
from grokxform.transforms.compress import DEAD_ZONE, ROOT_SLACK, SCALE_FLOOR

_CTYPE = {torch.float32: "float", torch.float64: "double", torch.bfloat16: "uint16_t", torch.float16: "uint16_t",
          torch.int8: "int8_t", torch.uint8: "uint8_t"}

HEADER = r"""#include <stdint.h>
#include <string.h>
#include <math.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t b = (uint32_t)h << 16; float f; memcpy(&f, &b, 4); return f;
}
static inline uint16_t f32_to_bf16(float f) {  /* to nearest even; a NaN is 0x7FC0, as torch's */
    uint32_t b; memcpy(&b, &f, 4);
    if (f != f) return 0x7FC0;
    return (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}
static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, em = h & 0x7FFFu, b;
    if (em >= 0x7C00u) b = sign | 0x7F800000u | ((em & 0x3FFu) << 13);
    else if (em >= 0x400u) b = sign | ((em << 13) + 0x38000000u);
    else { float m = (float)em * 5.9604644775390625e-8f; memcpy(&b, &m, 4); b |= sign; }
    float f; memcpy(&f, &b, 4); return f;
}
static inline uint16_t f32_to_f16(float f) {  /* to nearest even; a NaN is 0x7E00 with its sign */
    uint32_t b; memcpy(&b, &f, 4);
    uint32_t sign = (b >> 16) & 0x8000u, a = b & 0x7FFFFFFFu;
    if (a > 0x7F800000u) return (uint16_t)(sign | 0x7E00u);
    if (a >= 0x477FF000u) return (uint16_t)(sign | 0x7C00u);  /* 65520 and beyond: inf */
    if (a < 0x38800000u) {  /* a subnormal half: the float unit rounds at 2^-24 */
        float m; memcpy(&m, &a, 4); m += 0.5f; uint32_t r; memcpy(&r, &m, 4);
        return (uint16_t)(sign | (r - 0x3F000000u));
    }
    return (uint16_t)(sign | ((a + 0xC8000FFFu + ((a >> 13) & 1u)) >> 13));
}
static inline float round_bf16(float x) { return bf16_to_f32(f32_to_bf16(x)); }
static inline float f32_of_bits(uint32_t b) { float f; memcpy(&f, &b, 4); return f; }
static inline int32_t bits_of_f32(float f) { int32_t b; memcpy(&b, &f, 4); return b; }
static inline float round_f16(float x) { return f16_to_f32(f32_to_f16(x)); }
"""


def _compute(dtype: torch.dtype) -> str:
    return "double" if dtype == torch.float64 else "float"


def _ctype(dtype: torch.dtype) -> str:
    """The C type of a value of ``dtype`` in the kernel: its compute type, ``int`` for a predicate."""
    return "int" if dtype == torch.bool else _compute(dtype)


def _round(expr: str, dtype: torch.dtype) -> str:
    if dtype == torch.bfloat16:
        return f"round_bf16({expr})"
    if dtype == torch.float16:
        return f"round_f16({expr})"
    return expr


class CEmitter(G.Emitter):
    """The body of one C kernel: the program of leaf ``leaf`` (the group's program) for one pass.
    ``pre`` holds what a work item computes once (its pointers and scalars), ``lines`` what each
    element computes, ``post`` what the item stores after its elements (a reduction's sums).
    Where the pass decodes int8 state, the item's elements run in chunks of ``chunk`` elements
    (the least block size: a chunk lies in one quantization block of each packed field), and
    ``per_chunk`` holds what a chunk computes once (its blocks' scales; the element loop stays a
    vector loop)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pre: list[str] = []
        self.post: list[str] = []
        self.per_chunk: list[str] = []
        self.chunk: int | None = None
        self.reduces = False
        self.after_elements = False
        """Whether :meth:`decode` emits for a loop after the element loop (its int8 scales read
        per element there, not per chunk)."""

    def pre_line(self, text: str) -> None:
        self.pre.append(text)

    def ptr(self, role: str) -> str:
        """The pointer to this item's leaf of ``role`` (typed by the role's dtype), at the slot
        :meth:`~grokxform.engine.codegen.Emitter.at_slot` gives (a compressed ring's part)."""
        table = self.table(role)

        def make() -> str:
            v = self.var("p")
            ct = _CTYPE[self.dtype_of(role)]
            self.pre_line(f"{ct}* {v} = ({ct}*)(intptr_t){table}[leaf];")
            return v

        base = self.cached(("ptr", role), make)
        return base if role not in self.shifts else f"({base} + {self.shifts[role]})"

    def invariant(self, prefix: str, expr: str, ctype: str) -> str:
        v = self.var(prefix)
        self.pre_line(f"const {ctype} {v} = {expr};")
        return v

    def read(self, buf: str, index: str) -> str:
        return f"{buf}[{index}]"

    def widen(self, expr: str, dtype: torch.dtype) -> str:
        return f"({_compute(dtype)}){expr}"

    def round_text(self, expr: str, dtype: torch.dtype) -> str:
        return _round(expr, dtype)

    def lanes(self, node: Any, name: str) -> str:
        return self.flag(node, name)

    infinity = "INFINITY"

    def pick(self, cond: str, a: str, b: str) -> str:
        return f"({cond} ? {a} : {b})"

    def sqrt(self, x: str, dtype: torch.dtype) -> str:
        return f"sqrt({x})" if dtype == torch.float64 else f"sqrtf({x})"

    def div(self, a: str, b: str, dtype: torch.dtype) -> str:
        return f"({a} / {b})"

    def abs(self, x: str, dtype: torch.dtype) -> str:
        return f"fabs({x})" if dtype == torch.float64 else f"fabsf({x})"

    def sign(self, x: str, dtype: torch.dtype) -> str:
        ct = _compute(dtype)
        return f"(({ct})({x} > 0) - ({ct})({x} < 0))"

    def signbit(self, x: str, dtype: torch.dtype) -> str:
        return f"(signbit({x}) != 0)"

    def logical(self, kind: str, a: str, b: str = "") -> str:
        return {"and": f"({a} && {b})", "or": f"({a} || {b})", "not": f"(!{a})"}[kind]

    element_index = "i"

    def u32(self, expr: str) -> str:
        return f"(uint32_t)({expr})"

    def u32_const(self, c: int) -> str:
        return f"{c:#x}u"

    def u32_value(self, expr: str) -> str:
        v = self.var("h")
        self.line(f"const uint32_t {v} = {expr};")
        return v

    def f32_text(self, x: float) -> str:
        return f"{x!r}f"

    def to_f32(self, expr: str) -> str:
        return f"(float)(int32_t)({expr})"  # (below 2²⁴: a signed conversion, which vectorizes)

    def log_f32(self, x: str) -> str:
        return f"logf({x})"

    def cos_f32(self, x: str) -> str:
        return f"cosf({x})"

    def value(self, expr: str, dtype: torch.dtype) -> G.Value:
        v = self.var()
        self.line(f"const {_ctype(dtype)} {v} = {expr};")
        return G.Value(v, dtype)

    def run_cast(self, x: G.Value, dtype: torch.dtype) -> G.Value:
        if x.dtype == dtype:
            return x
        src = x.name if _compute(x.dtype) == _compute(dtype) else f"({_compute(dtype)}){x.name}"
        if x.dtype == torch.float64 and dtype in (torch.bfloat16, torch.float16):
            src = f"(float){x.name}"  # through float32, as torch converts a double
        return self.rounded(src, dtype)

    def load(self, role: str, dtype: torch.dtype, offset: str = "") -> G.Value:
        p = self.ptr(role)
        v = self.var("x")
        raw = f"{p}[{offset}i]"
        value = {torch.bfloat16: f"bf16_to_f32({raw})", torch.float16: f"f16_to_f32({raw})"}.get(dtype, raw)
        self.line(f"const {_compute(dtype)} {v} = {value};")
        return G.Value(v, dtype)

    def _stored(self, value: G.Value) -> str:
        return {torch.bfloat16: f"f32_to_bf16({value.name})", torch.float16: f"f32_to_f16({value.name})"}.get(
            value.dtype, value.name)

    def store(self, role: str, value: G.Value, offset: str = "") -> None:
        p = self.ptr(role)
        text = f"{p}[{offset}i] = {self._stored(value)};"
        self.line(f"if ({' && '.join(self.guards)}) {text}" if self.guards else text)

    def reduce(self, x: G.Value, sums: dict[str, G.Value]) -> None:
        """Σx², then the sum of each of ``sums`` (accumulated in float64, stored as ``RSQ_T``), at
        the item's slot of the reduction buffer (``1 + len(sums)`` values per slot), and the
        count of non-finite values of ``x`` in this item."""
        self.reduces = True
        width = 1 + len(sums)
        self.pre_line("double rsq = 0.0;")
        self.pre_line("int32_t rbad = 0;")
        self.line(f"rsq += (double){x.name} * (double){x.name};")
        self.line(f"rbad += ({x.name} != {x.name}) | ({x.name} - {x.name} != 0);")
        self.post.append(f"RSQ[(leaf * CHUNKS + start / BLOCK) * {width}] = (RSQ_T)rsq;")
        for j, v in enumerate(sums.values(), start=1):
            self.pre_line(f"double rs{j} = 0.0;")
            self.line(f"rs{j} += (double){v.name};")
            self.post.append(f"RSQ[(leaf * CHUNKS + start / BLOCK) * {width} + {j}] = (RSQ_T)rs{j};")
        self.post.append("RBAD[leaf * CHUNKS + start / BLOCK] = rbad;")

    # -- compressed state (Emitter.decode / Emitter.encode, in C) -------------------------------

    def decode(self, role: str, codec: Any) -> G.Value:
        f32 = torch.float32
        if codec.fmt == "bf16":
            hi, lo = self.ptr(f"{role}__hi"), self.ptr(f"{role}__lo")
            return self.value(f"f32_of_bits(((uint32_t)(int32_t)(int16_t){hi}[i] << 16) | ((uint32_t){lo}[i] << 8))", f32)
        if codec.fmt == "bf16_sr":
            return self.value(f"bf16_to_f32({self.ptr(f'{role}__value')}[i])", f32)
        bs = codec.block_size
        if self.after_elements:
            scale = self.value(f"{self.ptr(f'{role}__scales')}[i / {bs}]", f32).name
        else:
            self.chunk = min(self.chunk or bs, bs)
            scale = self.var("sc")
            self.per_chunk.append(f"const float {scale} = {self.ptr(f'{role}__scales')}[q0 / {bs}];")
        code = self.unit_of_code(self.value(f"(float){self.ptr(f'{role}__codes')}[i]", f32), codec)
        return self.value(f"{code.name} * {scale}", f32)

    def encode(self, *, role: str, codec: Any, value: G.Value, node: Any) -> G.Value | None:
        """As Triton's; returns None: an int8 block is encoded after the item's elements
        (:meth:`packed_total` decodes the slot there)."""
        guard = f"if ({' && '.join(self.guards)}) " if self.guards else ""
        x = value.name
        if codec.fmt in ("bf16", "bf16_sr"):
            bits, r = self.var("b"), self.var("r")
            self.line(f"const int32_t {bits} = bits_of_f32({x});")
            special = f"(({bits} & 0x7F800000) == 0x7F800000)"
            if codec.fmt == "bf16":
                self.line(f"const int32_t {r} = {special} ? {bits} : {bits} + 0x80;")
                hi, lo = self.ptr(f"{role}__hi"), self.ptr(f"{role}__lo")
                self.line(f"{guard}{{ {hi}[i] = (uint16_t)({r} >> 16); {lo}[i] = (uint8_t)(({r} >> 8) & 0xFF); }}")
                return None
            u = self.random("uniform", ScalarRef(codec.key), node)
            self.line(f"const int32_t {r} = {special} ? {bits} : {bits} + (int32_t)({u.name} * 65536.0f);")
            self.line(f"{guard}{self.ptr(f'{role}__value')}[i] = (uint16_t)({r} >> 16);")
            return None
        # int8: the item's new values kept in a local array, then per quantization block (they
        # divide the item: block_size divides BLOCK) its absmax and its codes, from L1.
        bs, buf, noise = codec.block_size, self.var("qb"), self.var("ub")
        self.pre_line(f"float {buf}[BLOCK];")
        self.line(f"{buf}[i - start] = {x};")
        if codec.unsigned:
            self.pre_line(f"float {noise}[BLOCK];")
            self.line(f"{noise}[i - start] = {self.random('dither', ScalarRef(codec.key), node).name};")
        codes, scales = self.ptr(f"{role}__codes"), self.ptr(f"{role}__scales")
        ctype = "uint8_t" if codec.unsigned else "int8_t"
        mag = f"{buf}[j - start]" if codec.unsigned else f"fabsf({buf}[j - start])"
        inv = "1.0f / scale" if codec.unsigned else f"(1.0f / scale) * {self.number(127.0, torch.float32)}"
        tiny = self.number(SCALE_FLOOR, torch.float32)
        u, k = f"{noise}[j - start]", self.number(1.0 / 255.0, torch.float32)
        if codec.unsigned:  # the fourth-root code below q, and up with the probability of q's distance from it
            # (⌊qt⌋ in float operations: an int conversion keeps the loop scalar)
            code = ("q = q < 0.0f ? 0.0f : q; q = q > 1.0f ? 1.0f : q;"
                    f" const float qt = sqrtf(sqrtf(q)) * 255.0f + {self.f32_text(ROOT_SLACK)};"
                    " const float qn = (qt + 12582912.0f) - 12582912.0f;"
                    " float qg = qn - (float)(qn > qt); qg = qg > 254.0f ? 254.0f : qg;"
                    f" float qa = qg * {k}; qa = qa * qa; qa = qa * qa;"  # (decode's (t·t)·(t·t))
                    " const float qo = qa > q ? qg - 1.0f : qg + 1.0f;"
                    f" float qb = qo * {k}; qb = qb * qb; qb = qb * qb;"
                    " const float qlo = qa > q ? qo : qg, qbe = qa > q ? qb : qa, qab = qa > q ? qa : qb;"
                    f" float qu = {u} < {self.f32_text(DEAD_ZONE)} ? {self.f32_text(DEAD_ZONE)} : {u};"
                    f" qu = qu > {self.f32_text(1.0 - DEAD_ZONE)} ? {self.f32_text(1.0 - DEAD_ZONE)} : qu;"
                    " const float qc = qlo + (float)(qu * (qab - qbe) < q - qbe);"
                    " const float qm = (float)(q > 0.0f); q = qc > qm ? qc : qm;")  # (a positive v: not 0)
        else:  # rounded to nearest, ties to even
            code = "q = q < -127.0f ? -127.0f : q; q = q > 127.0f ? 127.0f : q; q = (q + 12582912.0f) - 12582912.0f;"
        self.post += [
            f"{guard}for (int64_t b0 = start; b0 < end; b0 += {bs}) {{",
            f"    const int64_t b1 = b0 + {bs} < end ? b0 + {bs} : end;",
            f"    float top = b1 - b0 < {bs} ? 0.0f : -INFINITY;  /* (zero padding past the leaf, as eager) */",
            "    int nan = 0;",
            "    #pragma omp simd reduction(max:top) reduction(|:nan)",
            f"    for (int64_t j = b0; j < b1; ++j) {{ const float a = {mag}; nan |= a != a; top = a > top ? a : top; }}",
            "    float scale = nan ? NAN : top;",
            f"    scale = scale < {tiny} ? {tiny} : scale;  /* (a NaN stays) */",
            f"    const float inv = {inv};",
            "    #pragma omp simd",
            "    for (int64_t j = b0; j < b1; ++j) {",
            f"        float q = {buf}[j - start] * inv;",
            f"        q = q != q ? 0.0f : q; {code}",
            f"        {codes}[j] = ({ctype})q;",
            "    }",
            f"    {scales}[b0 / {bs}] = scale;",
            "}",
        ]
        return None

    blocks_of_n = "((n + {m}) / {bs})"

    def packed_total(self, m: Any, codec: Any, newest: G.Value, total: G.Value, role: str, w: int,
                     q: G.Value | None) -> None:
        """As the Triton kernel's, after the item's elements (its int8 codes and scales are
        written there): the new values and the rule's sums kept in local arrays, then per element
        q decoded from the slot, ``total + (q − newest)``, or on the re-sum update the decoded
        slots summed in float64."""
        acc = total.dtype
        gb, tb = self.var("gb"), self.var("tb")
        self.pre_line(f"float {gb}[BLOCK];")
        self.pre_line(f"{_ctype(acc)} {tb}[BLOCK];")
        self.line(f"{gb}[i - start] = {newest.name};")
        self.line(f"{tb}[i - start] = {total.name};")
        ring, slot, dst = self.role_of(m, "window"), self._slot(m), self.ptr(role)
        saved, self.lines = self.lines, []
        self.after_elements = True
        with self.at_slot(ring, codec, slot):
            q = self.decode(ring, codec)
        fixed = self.rounded(f"{tb}[i - start] + ({self.widen(q.name, acc)} - {self.widen(f'{gb}[i - start]', acc)})", acc)
        self.line(f"{dst}[i] = {self._stored(fixed)};")
        running, self.lines = self.lines, []
        with self.at_slot(ring, codec, slot):
            q = self.decode(ring, codec)
        a, j = self.var("acc"), self.var("j")
        if w == 1:
            self.line(f"double {a} = (double){q.name};")
        else:
            first, v0 = self._decoded(ring, codec, "0")
            later, vj = self._decoded(ring, codec, j)
            self.lines += [*first, f"double {a} = (double){v0.name};", f"for (int64_t {j} = 1; {j} < {w - 1}; ++{j}) {{",
                           *(f"    {x}" for x in later), f"    {a} += (double){vj.name};", "}",
                           f"{a} += (double){q.name};"]
        summed = self.rounded(f"(double){a}" if acc == torch.float64 else f"(float){a}", acc)
        self.line(f"{dst}[i] = {self._stored(summed)};")
        resum, self.lines = self.lines, saved
        self.after_elements = False
        guard = f"if ({' && '.join(self.guards)}) " if self.guards else ""
        self.post += [
            f"{guard}{{",
            f"    if ({slot} == {w - 1}) {{",
            "        for (int64_t i = start; i < end; ++i) {",
            *(f"            {x}" for x in resum),
            "        }",
            "    } else {",
            "        #pragma omp simd",
            "        for (int64_t i = start; i < end; ++i) {",
            *(f"            {x}" for x in running),
            "        }",
            "    }",
            "}",
        ]

    def window_sum(self, slot: str, w: int, role: str, total: str, newest: G.Value) -> None:
        """As Triton's, in a loop of its own after the item's elements (the ring's slots, the
        newest one stored, in order): inside the element loop it would keep that loop from
        vectorising."""
        ring, dst = self.ptr(role), self.ptr(total)
        tdt = self.dtype_of(total)
        load = {torch.bfloat16: "(double)bf16_to_f32({})", torch.float16: "(double)f16_to_f32({})"}.get(
            self.dtype_of(role), "(double){}")
        acc = self.var("acc")
        summed = G.Value(f"(double){acc}" if tdt == torch.float64 else _round(f"(float){acc}", tdt), tdt)
        guard = f"if ({' && '.join(self.guards)}) " if self.guards else ""
        self.post += [
            f"{guard}if ({slot} == {w - 1}) {{",
            "    for (int64_t i = start; i < end; ++i) {",
            f"        double {acc} = {load.format(f'{ring}[i]')};",
            f"        for (int64_t j = 1; j < {w}; ++j) {acc} += {load.format(f'{ring}[j * n + i]')};",
            f"        {dst}[i] = {self._stored(summed)};",
            "    }",
            "}",
        ]

    def index(self, expr: str) -> str:
        return f"(int64_t){expr}"


def function_source(name: str, em: CEmitter, passes: int, block: int, rsq: torch.dtype = torch.float32) -> str:
    """The C function ``name`` whose body ``em`` emitted. Its one argument is an int64 array:
    the number of work items, the item tables, the leaves' sizes, the position and scalar tables,
    one address table per role (``em.roles``), the reduction buffers (sums of squares of dtype
    ``rsq``), their row length and the number of threads that share the items (OpenMP, where the
    library was built with it; every item is computed alike on any thread: the same numbers)."""
    names = ["ITEM_LEAF", "ITEM_START", "NUMEL", "POS", "NPOS", "CONST", *(f"SC{k}" for k in range(passes)),
             *(f"T_{r}" for r in em.roles), "RSQ", "RBAD", "CHUNKS", "THREADS"]
    types = {"ITEM_LEAF": "const int64_t*", "ITEM_START": "const int64_t*", "NUMEL": "const int64_t*",
             "POS": "const int64_t*", "NPOS": "const int64_t", "CONST": "const double*", "RSQ": "RSQ_T*",
             "RBAD": "int32_t*", "CHUNKS": "const int64_t", "THREADS": "const int64_t"}
    lines = [f"void {name}(const int64_t* A) {{", f"    typedef {_CTYPE[rsq]} RSQ_T;", "    const int64_t n_items = A[0];"]
    for k, arg in enumerate(names, start=1):
        t = types.get(arg, "const double*" if arg.startswith("SC") else "const int64_t*")
        value = f"A[{k}]" if not t.endswith("*") else f"({t})(intptr_t)A[{k}]"
        lines.append(f"    {t} {arg} = {value};")
    lines.append(f"    const int64_t BLOCK = {block};")
    unused = [a for a in names if a not in ("ITEM_LEAF", "ITEM_START", "NUMEL")]
    lines.append("    " + " ".join(f"(void){a};" for a in unused))
    lines += [
        "    #ifdef _OPENMP",
        "    #pragma omp parallel for schedule(static) num_threads(THREADS) if(THREADS > 1)",
        "    #endif",
        "    for (int64_t item = 0; item < n_items; ++item) {",
        "        const int64_t leaf = ITEM_LEAF[item], start = ITEM_START[item], n = NUMEL[leaf];",
        "        const int64_t end = start + BLOCK < n ? start + BLOCK : n;",
        "        (void)n;",
        *(f"        {x}" for x in em.pre),
        *_element_loop(em),
        *(f"        {x}" for x in em.post),
        "    }",
        "}",
    ]
    return "\n".join(lines)


def _element_loop(em: CEmitter) -> list[str]:
    """The loop over an item's elements (in chunks where :attr:`CEmitter.chunk` is set)."""
    simd = "#pragma omp simd" + (f" reduction(+:{', '.join(_accumulators(em))})" if em.reduces else "")
    if em.chunk is None:
        return [f"        {simd}", "        for (int64_t i = start; i < end; ++i) {",
                *(f"            {x}" for x in em.lines), "        }"]
    return [
        f"        for (int64_t q0 = start; q0 < end; q0 += {em.chunk}) {{",
        f"            const int64_t q1 = q0 + {em.chunk} < end ? q0 + {em.chunk} : end;",
        *(f"            {x}" for x in em.per_chunk),
        f"            {simd}",
        "            for (int64_t i = q0; i < q1; ++i) {",
        *(f"                {x}" for x in em.lines),
        "            }",
        "        }",
    ]


def _accumulators(em: CEmitter) -> list[str]:
    """The variables an item's reduction accumulates (:meth:`CEmitter.reduce`)."""
    return ["rsq", "rbad", *(f"rs{j}" for j in range(1, len(em.sum_names) + 1))]


# --------------------------------------------------------------------------------------------
# The compiler and the libraries.

_FLAGS = ["-O3", "-std=c11", "-shared", "-fPIC", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math", "-w"]
_THREADS = (["-fopenmp"], ["-fopenmp-simd"])
"""Threads and vector loops (OpenMP's runtime, which torch's CPU builds load too), else vector loops
alone (a compiler without that runtime)."""
_COMPILER: tuple[str | None, str] | None = None
_LIBRARIES: dict[str, Any] = {}


def _isa_flags() -> list[str]:
    """Instruction-set flags for the vector units this CPU has (as torch's own kernels use)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return []
    cap = torch.backends.cpu.get_cpu_capability()
    if cap.startswith("AVX512"):
        return ["-mavx2", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"]
    if cap == "AVX2":
        return ["-mavx2"]
    return []


def compiler() -> tuple[str | None, str]:
    """The C compiler and a description of it (its path and version), or ``(None, why)``."""
    global _COMPILER
    if _COMPILER is None:
        given = os.environ.get("CC", "")
        found = shutil.which(given) if given else next(
            (p for p in (shutil.which(c) for c in ("cc", "gcc", "clang")) if p), None)
        if found is None:
            _COMPILER = (None, f"the C compiler CC={given!r} was not found" if given else "no C compiler (cc, gcc"
                         " or clang) is on the PATH")
        else:
            try:
                out = subprocess.run([found, "--version"], capture_output=True, text=True, timeout=30)
                _COMPILER = (found, f"{found} {out.stdout.splitlines()[0] if out.stdout else ''}")
            except (OSError, subprocess.SubprocessError) as e:
                _COMPILER = (None, f"the C compiler {found} does not run ({e})")
    return _COMPILER


def load_library(source: str, folder: str) -> Any:
    """The shared library built from ``source`` (whole C text, :data:`HEADER` included) in
    ``folder``: built once (compiled to a file of this user alone, renamed into place) and loaded
    from there. Raises ``RuntimeError`` with the compiler's message when it does not compile."""
    cc, about = compiler()
    if cc is None:
        raise RuntimeError(about)
    errors = []
    for threads in _THREADS:
        flags = _FLAGS + threads + _isa_flags()
        key = hashlib.sha256("\0".join([source, about, *flags]).encode()).hexdigest()[:24]
        lib = _LIBRARIES.get(key)
        if lib is not None:
            return lib
        path = os.path.join(folder, f"grokxform_c_{key}.so")
        if not os.path.exists(path):
            error = _build(cc, flags, source, folder, key, path)
            if error is not None:
                errors.append(error)
                continue
        lib = _LIBRARIES[key] = ctypes.CDLL(path)
        return lib
    raise RuntimeError(f"the C kernels did not compile ({cc}): {errors[-1]}")


def _build(cc: str, flags: list[str], source: str, folder: str, key: str, path: str) -> str | None:
    """Compile ``source`` into the library ``path`` (a file of this user alone, renamed into place);
    the compiler's message when it fails."""
    fd, src = tempfile.mkstemp(dir=folder, prefix=f".grokxform_c_{key}.", suffix=".c")
    tmp = src[:-2] + ".so"
    try:
        with os.fdopen(fd, "w") as f:
            f.write(source)
        done = subprocess.run([cc, *flags, src, "-o", tmp, "-lm"], capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            return done.stderr.strip()[-2000:]
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        return None
    finally:
        for leftover in (src, tmp):
            with contextlib.suppress(OSError):
                os.unlink(leftover)


def function(lib: Any, name: str) -> Any:
    """The kernel ``name`` of ``lib``, called with the address of its int64 argument array."""
    fn = getattr(lib, name)
    fn.argtypes = [ctypes.c_void_p]
    fn.restype = None
    return fn
