"""The per-element language in which each primitive writes its maths once.

A primitive's per-element update is an ordinary Python function of its inputs (:class:`Val`
values: one element of a tensor, of a known dtype) and its scalars (:class:`ScalarRef` names of
per-step values such as α_t or a bias correction), both read as attributes::

    def ema_elements(v: Inputs, sc: Inputs) -> Outputs:    # v.x: the update, v.mu: the state
        g = v.x.to(v.mu.dtype)
        mu = v.mu * sc.alpha + g * sc.one_minus_alpha
        return {"out": mu.to(v.x.dtype), "mu": mu}

It is traced once per combination of input dtypes into a :class:`Program`: a straight list of
operations, each rounded to the dtype of its result, exactly as an eager torch op rounds. The same
program is then run

- eagerly, as ``torch._foreach_*`` ops over lists of tensors grouped by device and dtype
  (:func:`run_foreach`), or one tensor at a time under ``torch.func`` transforms (:func:`run_leaf`);
- by the engine (:mod:`grokxform.engine`), which turns it into lines of a multi-tensor Triton kernel
  (CUDA) or C function (the CPU).

So the eager path and the kernels cannot disagree about the maths: there is one source.

Rules of the language (what makes the engine's kernels round as eager does):

- ``Val ∘ Val`` needs both operands in one dtype (cast with ``.to`` first); the result has it.
- ``Val ∘ scalar`` has the dtype of the ``Val``. In arithmetic a Python number is used at the op's
  compute precision (float32 for 16- and 32-bit values, as torch's ``x * 0.9``); a scalar that is a
  tensor is first rounded to the value's dtype (as ``x * s.to(x.dtype)``).
- Comparisons, :func:`minimum`, :func:`maximum` and the numbers of :func:`where` take a number or a
  scalar as a value of the other operand's dtype: rounded to it (through float32, as torch converts
  a double), as torch's ``x < 0.1`` compares a bfloat16 ``x`` with ``0.1`` rounded to bfloat16.
  (For minimum and maximum the rounding changes no result.)
- Arithmetic: ``+ - * /`` (with a scalar or a number on either side), unary ``-``, ``.sqrt()``
  (each correctly rounded), ``.to(dtype)``.
- ``abs(x)``: ``|x|`` (the sign bit cleared, NaNs included). :func:`sign` is ``torch.sign``:
  −1.0 below zero, +1.0 above, +0.0 for ±0 and for NaN.
- :func:`minimum` / :func:`maximum` of two values, or of a value and a scalar or a number on either
  side: IEEE 754's minimum and maximum, as ``torch.minimum`` / ``torch.maximum``: NaN where an
  operand is NaN, otherwise the smaller (larger) operand, with −0 below +0. (``torch.minimum``
  itself gives either zero of a tie of ±0, depending on where in the tensor it lies; the language
  fixes it.)
- Predicates: the comparisons ``< <= > >= == !=`` of a value with a value, a scalar or a number,
  :func:`isnan`, :func:`isfinite`, combined with ``&``, ``|`` and ``~``. A predicate is not a
  value: it is a condition of :func:`where` and nothing else.
- :func:`where` ``(cond, a, b)``: ``a`` where ``cond`` holds, else ``b``; ``cond`` is a scalar
  flag of the rule (the same for the whole leaf) or a predicate (per element); ``a`` and ``b`` are
  values of one dtype, or one of them a number.
- :func:`uniform` ``(sc.key)`` and :func:`normal` ``(sc.key)``: counter-based random numbers, a
  float32 value per element (cast it with ``.to``), a pure function of the scalar ``key`` (an
  integer in [0, 2³²), one per leaf: :func:`leaf_keys` derives them from a seed, the step and the
  leaf) and the element's flat index in its leaf (in a vmapped rule, its index in the example).
  The hash (:func:`counter_bits`: Wellons' lowbias32 over the key and the index's two 32-bit
  words) is written in each backend's integer operations, so uniform is the same bit for bit on
  every backend; normal (Box–Muller, :func:`counter_normal`) agrees to within a few ulp, since the
  backends' log and cos are not correctly rounded everywhere.
- Scalars are per-step values given by the primitive's scalar rule: a number, a number per leaf, a
  0-d tensor, or a 1-d tensor with one value per leaf (:class:`Scalars`).
"""

from __future__ import annotations

import math
import numbers
import struct
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, Union

import torch

Number = Union[int, float]
V = TypeVar("V")

# --------------------------------------------------------------------------------------------
# Tracing: Val, ScalarRef, Program.


@dataclass(frozen=True)
class ScalarRef:
    """A per-step scalar of the primitive, by name (``sc.alpha``)."""

    name: str

    def _no_maths(self, *args: Any) -> Any:
        raise TypeError(
            f"scalar {self.name!r}: arithmetic on scalars belongs in the scalar rule (give the element rule"
            " the finished value)"
        )

    __neg__ = __abs__ = __pow__ = __rpow__ = __rsub__ = __rtruediv__ = _no_maths

    def __add__(self, other: Any) -> Any:
        return _reverse(other, "add", self)

    def __mul__(self, other: Any) -> Any:
        return _reverse(other, "mul", self)

    def __sub__(self, other: Any) -> Any:
        return _reverse(other, "rsub", self)

    def __truediv__(self, other: Any) -> Any:
        return _reverse(other, "rdiv", self)

    __radd__, __rmul__ = __add__, __mul__


def _reverse(val: Any, kind: str, scalar: ScalarRef) -> Val:
    if not isinstance(val, Val):
        scalar._no_maths()
    return val._op(kind, scalar)


Operand = Union["Val", ScalarRef, float, int]


@dataclass(frozen=True)
class Op:
    """``out = kind(args)`` rounded to ``dtype`` (``torch.bool`` for a predicate). ``args`` holds
    value ids (int), :class:`ScalarRef` or Python numbers (as ``("num", x)``); a ``where``'s first
    argument is a flag (:class:`ScalarRef`) or a predicate's id; a ``uniform`` or ``normal`` reads
    the id of the value whose shape it takes (the first input) and its key (:class:`ScalarRef`)."""

    kind: str
    args: tuple[Any, ...]
    dtype: torch.dtype


COMPARISONS = {"lt": "<", "le": "<=", "gt": ">", "ge": ">=", "eq": "==", "ne": "!="}
"""The comparison ops of the language, by kind, with their operator."""
ARITHMETIC = frozenset({"add", "sub", "mul", "div", "rsub", "rdiv"})
"""The binary ops that use a number at compute precision (the others use it rounded to the value's dtype)."""


class _Tracer:
    def __init__(self) -> None:
        self.ops: list[Op] = []
        self.dtypes: list[torch.dtype] = []

    def value(self, dtype: torch.dtype) -> Val:
        self.dtypes.append(dtype)
        return Val(self, len(self.dtypes) - 1, dtype)

    def emit(self, kind: str, args: tuple[Any, ...], dtype: torch.dtype) -> Val:
        self.ops.append(Op(kind, args, dtype))
        return self.value(dtype)

    def emit_pred(self, kind: str, args: tuple[Any, ...]) -> Pred:
        self.ops.append(Op(kind, args, torch.bool))
        self.dtypes.append(torch.bool)
        return Pred(self, len(self.dtypes) - 1)


class Val:
    """One element of a tensor, of dtype ``dtype``, while an element rule is traced."""

    __slots__ = ("_t", "id", "dtype")
    __array_ufunc__ = None  # ``np.float32(2) * v`` defers to ``v.__rmul__``
    __hash__ = None  # type: ignore[assignment]  # ``==`` makes a predicate

    def __init__(self, tracer: _Tracer, id: int, dtype: torch.dtype) -> None:
        self._t, self.id, self.dtype = tracer, id, dtype

    def _arg(self, other: Operand, kind: str) -> Any:
        if isinstance(other, Val):
            if other._t is not self._t:
                raise ValueError("element values of two different traces")
            if other.dtype != self.dtype:
                raise TypeError(
                    f"element rule: {kind} of a {self.dtype} and a {other.dtype} value; cast one with .to() first"
                )
            return other.id
        if isinstance(other, ScalarRef):
            return other
        if isinstance(other, numbers.Real) and not isinstance(other, bool):
            return ("num", float(other))
        raise TypeError(f"element rule: cannot {kind} a value and a {type(other).__name__}")

    def _op(self, kind: str, other: Operand) -> Val:
        return self._t.emit(kind, (self.id, self._arg(other, kind)), self.dtype)

    def _compare(self, kind: str, other: Operand) -> Pred:
        return self._t.emit_pred(kind, (self.id, self._arg(other, kind)))

    def __add__(self, other: Operand) -> Val:
        return self._op("add", other)

    def __sub__(self, other: Operand) -> Val:
        return self._op("sub", other)

    def __mul__(self, other: Operand) -> Val:
        return self._op("mul", other)

    def __truediv__(self, other: Operand) -> Val:
        return self._op("div", other)

    def __radd__(self, other: Operand) -> Val:
        return self._op("add", other)

    def __rmul__(self, other: Operand) -> Val:
        return self._op("mul", other)

    def __rsub__(self, other: Operand) -> Val:
        return self._op("rsub", other)

    def __rtruediv__(self, other: Operand) -> Val:
        return self._op("rdiv", other)

    def __neg__(self) -> Val:
        return self._t.emit("neg", (self.id,), self.dtype)

    def __abs__(self) -> Val:
        return self._t.emit("abs", (self.id,), self.dtype)

    def __lt__(self, other: Operand) -> Pred:
        return self._compare("lt", other)

    def __le__(self, other: Operand) -> Pred:
        return self._compare("le", other)

    def __gt__(self, other: Operand) -> Pred:
        return self._compare("gt", other)

    def __ge__(self, other: Operand) -> Pred:
        return self._compare("ge", other)

    def __eq__(self, other: Operand) -> Pred:  # type: ignore[override]
        return self._compare("eq", other)

    def __ne__(self, other: Operand) -> Pred:  # type: ignore[override]
        return self._compare("ne", other)

    def sqrt(self) -> Val:
        """√x, correctly rounded."""
        return self._t.emit("sqrt", (self.id,), self.dtype)

    def to(self, dtype: torch.dtype) -> Val:
        """The value in ``dtype`` (no operation when it already has it)."""
        if dtype == self.dtype:
            return self
        return self._t.emit("cast", (self.id,), dtype)

    def __bool__(self) -> bool:
        raise TypeError("element rule: an element value has no truth value (use grokxform.elements.where)")


class Pred:
    """A condition on one element while an element rule is traced (a comparison, :func:`isnan`,
    :func:`isfinite`, and their ``&``, ``|``, ``~``): the condition of :func:`where`."""

    __slots__ = ("_t", "id")

    def __init__(self, tracer: _Tracer, id: int) -> None:
        self._t, self.id = tracer, id

    def _logical(self, kind: str, other: Any) -> Pred:
        if not isinstance(other, Pred):
            raise TypeError(f"element rule: {kind} of a predicate and a {type(other).__name__} (compare it first)")
        if other._t is not self._t:
            raise ValueError("predicates of two different traces")
        return self._t.emit_pred(kind, (self.id, other.id))

    def __and__(self, other: Pred) -> Pred:
        return self._logical("and", other)

    def __or__(self, other: Pred) -> Pred:
        return self._logical("or", other)

    def __invert__(self) -> Pred:
        return self._t.emit_pred("not", (self.id,))

    def __bool__(self) -> bool:
        raise TypeError("element rule: a predicate has no truth value (use grokxform.elements.where; combine"
                        " predicates with &, | and ~)")


def _value(x: Any, who: str) -> Val:
    if not isinstance(x, Val):
        raise TypeError(f"{who}: expected an element value, got {type(x).__name__}")
    return x


def sign(x: Val) -> Val:
    """``torch.sign(x)``: −1.0 below zero, +1.0 above, +0.0 for ±0 and for NaN."""
    return x._t.emit("sign", (_value(x, "sign").id,), x.dtype)


def isnan(x: Val) -> Pred:
    """Whether ``x`` is NaN."""
    return x._t.emit_pred("isnan", (_value(x, "isnan").id,))


def isfinite(x: Val) -> Pred:
    """Whether ``x`` is neither infinite nor NaN."""
    return x._t.emit_pred("isfinite", (_value(x, "isfinite").id,))


def _extreme(kind: str, who: str, a: Operand, b: Operand) -> Val:
    if not isinstance(a, Val):  # both are symmetric: the value goes first
        a, b = b, a
    return _value(a, who)._op(kind, b)


def minimum(a: Operand, b: Operand) -> Val:
    """IEEE 754's minimum of ``a`` and ``b`` (values of one dtype, or a value and a scalar or a
    number on either side), as ``torch.minimum``: NaN if either is NaN, −0 below +0."""
    return _extreme("min", "minimum", a, b)


def maximum(a: Operand, b: Operand) -> Val:
    """IEEE 754's maximum of ``a`` and ``b`` (values of one dtype, or a value and a scalar or a
    number on either side), as ``torch.maximum``: NaN if either is NaN, +0 above −0."""
    return _extreme("max", "maximum", a, b)


def where(cond: ScalarRef | Pred, a: Val | Number, b: Val | Number) -> Val:
    """``a`` where ``cond`` holds, else ``b``. ``cond``: a scalar flag of the rule (true when
    non-zero; the same for every element of a leaf) or a predicate of the elements. ``a`` and ``b``:
    values of one dtype, or one of them a number (rounded to that dtype)."""
    ref = a if isinstance(a, Val) else b
    if not isinstance(ref, Val) or isinstance(a, ScalarRef) or isinstance(b, ScalarRef):
        raise TypeError("where: a and b are element values, or one of them a number")
    if isinstance(cond, Pred):
        if cond._t is not ref._t:
            raise ValueError("where: a predicate of another trace")
        c: Any = cond.id
    elif isinstance(cond, ScalarRef):
        c = cond
    else:
        raise TypeError("where: the condition must be a scalar of the rule (a per-step flag) or a predicate of"
                        f" the elements (a comparison, isnan, isfinite), got {type(cond).__name__}")
    return ref._t.emit("where", (c, ref._arg(a, "where"), ref._arg(b, "where")), ref.dtype)


_ACTIVE: list[_Tracer] = []
"""The tracers of the rules being traced, innermost last (what :func:`uniform` and :func:`normal`,
which take no value, emit into)."""

RANDOM = frozenset({"uniform", "normal"})
"""The ops that draw counter-based random numbers (:func:`uniform`, :func:`normal`)."""


def _random(kind: str, key: ScalarRef) -> Val:
    if not isinstance(key, ScalarRef):
        raise TypeError(f"{kind}: the key must be a scalar of the rule (sc.<name>), got {type(key).__name__}")
    if not _ACTIVE:
        raise TypeError(f"{kind}: call it inside an element rule being traced")
    # The op takes its shape from the first input (every input of a rule has the leaf's shape).
    return _ACTIVE[-1].emit(kind, (0, key), torch.float32)


def uniform(key: ScalarRef) -> Val:
    """A float32 value in [0, 1) per element: :func:`counter_uniform` of the scalar ``key`` (an
    integer in [0, 2³²), taken modulo 2³²; one per leaf, see :func:`leaf_keys`) and the element's
    flat index in its leaf. The same bits on every backend."""
    return _random("uniform", key)


def normal(key: ScalarRef) -> Val:
    """A standard normal float32 value per element: :func:`counter_normal` of the scalar ``key``
    and the element's flat index in its leaf (Box–Muller over two uniforms of its own). The
    backends agree to within a few ulp (their log and cos are not correctly rounded everywhere)."""
    return _random("normal", key)


class Inputs:
    """Named element values or scalars, read as attributes (``st.mu``, ``sc.alpha``)."""

    def __init__(self, items: Mapping[str, Any]) -> None:
        self._items = dict(items)

    def __getattr__(self, name: str) -> Any:
        try:
            return self._items[name]
        except KeyError:
            raise AttributeError(f"no input named {name!r} (have {sorted(self._items)})") from None


Outputs = Mapping[str, Val]


@dataclass(frozen=True)
class Program:
    """An element rule traced for given input dtypes: inputs are value ids ``0..len(inputs)-1``."""

    inputs: tuple[str, ...]
    ops: tuple[Op, ...]
    outputs: dict[str, int]
    dtypes: tuple[torch.dtype, ...]
    """The dtype of every value: the inputs', then each op's result."""

    def last_uses(self) -> list[int]:
        """For each value id, the index of the last op reading it (``len(ops)`` for outputs)."""
        last = [-1] * len(self.dtypes)
        for k, op in enumerate(self.ops):
            for a in op.args:
                if isinstance(a, int):
                    last[a] = k
        for v in self.outputs.values():
            last[v] = len(self.ops)
        return last


class _AnyScalar:
    """The scalars of a rule being traced: every name read is a scalar of its scalar rule."""

    def __getattr__(self, name: str) -> ScalarRef:
        if name.startswith("__"):
            raise AttributeError(name)
        return ScalarRef(name)


def trace(rule: Callable[[Inputs, Inputs], Outputs], inputs: Mapping[str, torch.dtype]) -> Program:
    """Trace ``rule(values, scalars) -> {name: Val}`` for the given input dtypes (each name the
    rule reads from ``scalars`` is a scalar its scalar rule gives)."""
    tracer = _Tracer()
    vals = {name: tracer.value(dt) for name, dt in inputs.items()}
    _ACTIVE.append(tracer)
    try:
        out = rule(Inputs(vals), _AnyScalar())  # type: ignore[arg-type]
    finally:
        _ACTIVE.pop()
    outputs: dict[str, int] = {}
    for name, v in out.items():
        if not isinstance(v, Val) or v._t is not tracer:
            raise TypeError(f"element rule: output {name!r} is not an element value of this trace")
        outputs[name] = v.id
    return Program(tuple(inputs), tuple(tracer.ops), outputs, tuple(tracer.dtypes))


class TracedRule:
    """An element rule with its traces cached per input dtypes."""

    def __init__(self, rule: Callable[[Inputs, Inputs], Outputs]) -> None:
        self.rule = rule
        self._cache: dict[tuple[tuple[str, torch.dtype], ...], Program] = {}

    def program(self, inputs: Mapping[str, torch.dtype]) -> Program:
        key = tuple(inputs.items())
        prog = self._cache.get(key)
        if prog is None:
            prog = self._cache[key] = trace(self.rule, inputs)
        return prog


# --------------------------------------------------------------------------------------------
# Scalars: what a scalar rule gives, and how an op uses it.


class Scalars:
    """The per-step scalars of one primitive for ``n`` leaves (its leaves with a gradient).

    Each value is one of: a Python number (the same for every leaf, used at compute precision);
    a list of ``n`` numbers (one per leaf, fixed by the tree's structure: β1 per layer); a 0-d tensor
    (the same for every leaf, rounded to the value's dtype before use); a 1-d tensor of ``n`` values
    (rounded likewise). Flags used by :func:`where` are bool tensors (or 0/1 values).
    """

    def __init__(self, values: Mapping[str, Any], n: int) -> None:
        self.n = n
        self.values: dict[str, Any] = {}
        for name, v in values.items():
            if isinstance(v, bool):
                raise TypeError(f"scalar {name!r}: give a flag as a 0-d or per-leaf bool tensor, not a Python bool")
            if isinstance(v, torch.Tensor):
                if v.dim() > 1 or (v.dim() == 1 and v.shape[0] != n):
                    raise ValueError(
                        f"scalar {name!r}: a tensor scalar must be 0-d or have one value per leaf ({n}),"
                        f" got shape {tuple(v.shape)}"
                    )
            elif isinstance(v, (list, tuple)):
                if len(v) != n or not all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in v):
                    raise ValueError(f"scalar {name!r}: a list must hold one number per leaf ({n})")
                v = [float(x) for x in v]
            elif isinstance(v, numbers.Real):
                v = float(v)
            else:
                raise TypeError(
                    f"scalar {name!r}: expected a number, a list of numbers or a tensor, got {type(v).__name__}"
                )
            self.values[name] = v
        self._cast: dict[tuple[str, torch.dtype, Any], Any] = {}

    def _value(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise ValueError(f"the element rule reads a scalar {name!r} that its scalar rule does not give"
                             f" (it gives {sorted(self.values)})") from None

    def kind(self, name: str) -> str:
        """``"number"``, ``"numbers"``, ``"tensor"`` (0-d) or ``"tensors"`` (one per leaf)."""
        v = self._value(name)
        if isinstance(v, float):
            return "number"
        if isinstance(v, list):
            return "numbers"
        return "tensor" if v.dim() == 0 else "tensors"

    def cast(self, name: str, dtype: torch.dtype, device: Any = None) -> Any:
        """The scalar as an op on a ``dtype`` value on ``device`` uses it: numbers as they are, tensors
        rounded to ``dtype`` (``s.to(dtype)``, as c10 converts: a double through float first)."""
        key = (name, dtype, device)
        if key in self._cast:  # (no sentinel: Dynamo cannot compare a symbolic number with an object)
            return self._cast[key]
        out = self._value(name)
        if isinstance(out, torch.Tensor):
            out = out.to(device=device if device is not None else out.device, dtype=dtype)
        self._cast[key] = out
        return out

    def at(self, name: str, dtype: torch.dtype, device: Any, i: int) -> Any:
        """The scalar of leaf ``i``."""
        v = self.cast(name, dtype, device)
        if isinstance(v, list) or (isinstance(v, torch.Tensor) and v.dim() == 1):
            return v[i]
        return v

    def group(self, name: str, dtype: torch.dtype, device: Any, idx: Sequence[int]) -> Any:
        """The scalar of the leaves ``idx`` as a ``torch._foreach_*`` op takes it (a number, a list of
        numbers, a 0-d tensor or a list of 0-d tensors). On the CPU a tensor scalar, already rounded
        to ``dtype``, is read as numbers: the same values, and the ops' scalar overloads."""
        v = self.cast(name, dtype, device)
        if isinstance(v, torch.Tensor) and v.device.type == "cpu" and v.dtype != torch.bool:
            key = (name, dtype, "host")
            host = self._cast.get(key)
            if host is None:
                host = self._cast[key] = v.tolist()
            v = host
        if isinstance(v, list):
            return [v[i] for i in idx]
        if isinstance(v, torch.Tensor) and v.dim() == 1:
            parts = v.unbind()
            return [parts[i] for i in idx]
        return v



# --------------------------------------------------------------------------------------------
# Counter-based random numbers: one hash, written in each backend's integer operations.

IntLike = Union[int, torch.Tensor]
MASK32 = 0xFFFFFFFF
MIX_SHIFTS = (16, 15, 16)
MIX_MULTIPLIERS = (0x7FEB352D, 0x846CA68B)
"""The 32-bit mixer (Chris Wellons' lowbias32): ``x ^= x >> 16; x *= 0x7FEB352D; x ^= x >> 15;
x *= 0x846CA68B; x ^= x >> 16``, modulo 2³²: a bijection of 32-bit words."""
STREAMS = {"uniform": 0x9E3779B9, "normal_radius": 0x3C6EF372, "normal_angle": 0xDAA66D2B,
           "leaf_keys": 0x78DDE6E4, "dither": 0x1715609D}
"""The word each use of the hash mixes into its key (the first multiples of 0x9E3779B9, 2³²/φ,
modulo 2³²), so that :func:`uniform`, the two uniforms of :func:`normal`, :func:`leaf_keys` and
:func:`counter_dither` of one key are independent streams."""
WEYL = 0x9E3779B9
"""The step of :func:`counter_dither`'s sequence over the elements (2³²/φ, odd)."""
TWO_PI_F32 = 6.2831854820251465
"""2π rounded to float32 (the angle of :func:`normal` is ``float32(TWO_PI_F32 · u)``)."""


def _mul32(x: IntLike, c: int) -> IntLike:
    """``x · c mod 2³²`` for ``x`` in [0, 2³²): in 16-bit halves of ``c``, so that no partial
    product reaches 2⁴⁹ (an int64 tensor never overflows; a Python int gives the same number)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & MASK32


def mix32(x: IntLike) -> IntLike:
    """The mixer (:data:`MIX_SHIFTS`, :data:`MIX_MULTIPLIERS`) of a 32-bit word ``x``: a Python
    int, or an int64 tensor of such words."""
    for k, shift in enumerate(MIX_SHIFTS):
        x = x ^ (x >> shift)
        if k < len(MIX_MULTIPLIERS):
            x = _mul32(x, MIX_MULTIPLIERS[k])
    return x


def _counter_bits(key: IntLike, lo: IntLike, hi: IntLike, stream: int) -> IntLike:
    """The 32 random bits of the element whose flat index has the 32-bit words ``lo`` and ``hi``
    (index = hi·2³² + lo), in ``stream`` of ``key`` (a 32-bit word): with
    ``base = mix(mix(key ^ stream) ^ hi)``, the bits are ``mix(mix(lo + base mod 2³²) ^ key)``.
    For one key and high word, a bijection of the low word: no two elements of a leaf of up to
    2³² elements draw the same bits."""
    base = mix32(mix32(key ^ stream) ^ hi)
    return mix32(mix32((lo + base) & MASK32) ^ key)


def counter_bits(key: int, index: int, stream: int = STREAMS["uniform"]) -> int:
    """The 32 random bits (an int in [0, 2³²)) of element ``index`` (an int in [0, 2⁶⁴)) in
    ``stream`` of ``key`` (taken modulo 2³²): the reference every backend's integer steps equal."""
    return int(_counter_bits(key & MASK32, index & MASK32, index >> 32, stream))


def _dither_bits(key: IntLike, lo: IntLike, hi: IntLike) -> IntLike:
    """The 32 bits of :func:`counter_dither` (``lo``, ``hi``: the words of the index):
    ``(lo·WEYL + mix(mix(key ^ stream) ^ hi)) mod 2³²``."""
    return (_mul32(lo, WEYL) + mix32(mix32(key ^ STREAMS["dither"]) ^ hi)) & MASK32


def counter_dither(key: int, index: int) -> float:
    """A float32 value in [0, 1) for element ``index`` (an int in [0, 2⁶⁴)) under ``key`` (taken
    modulo 2³²), cheaper than :func:`counter_uniform`: the top 24 bits of
    ``(lo·WEYL + b) mod 2³²`` times 2⁻²⁴, with ``lo`` the index's low word and ``b`` the hash of
    the key and the index's high word. One key's values are the Weyl sequence of the golden ratio,
    shifted by b: each element's value is uniform over keys (b is), and independent from key to
    key, while the elements of one key are spread evenly over [0, 1) rather than independent.
    Made for stochastic rounding (``compress_state``'s int8 second moments: one multiplication and
    one addition an element), not as a source of noise."""
    return (int(_dither_bits(key & MASK32, index & MASK32, index >> 32)) >> 8) * 2.0**-24


def counter_uniform(key: int, index: int) -> float:
    """:func:`uniform` of element ``index`` under ``key``: the top 24 bits of
    :func:`counter_bits` times 2⁻²⁴, a float32 value in [0, 1) (exact in float32)."""
    return (counter_bits(key, index) >> 8) * 2.0**-24


def to_float32(x: float) -> float:
    """``x`` rounded to float32 (to nearest even), as a Python float."""
    return struct.unpack("f", struct.pack("f", x))[0]


def counter_normal(key: int, index: int) -> float:
    """:func:`normal` of element ``index`` under ``key``, each float32 step correctly rounded:
    Box–Muller of ``u1 = (b1 + 1)·2⁻²⁴`` in (0, 1] and ``u2 = b2·2⁻²⁴`` in [0, 1), b1 and b2 the
    top 24 bits of the streams ``normal_radius`` and ``normal_angle``:
    ``sqrt(−2·ln u1) · cos(float32(TWO_PI_F32·u2))``. The backends compute ln and cos with their own
    libraries, within a few ulp of this."""
    u1 = ((counter_bits(key, index, STREAMS["normal_radius"]) >> 8) + 1) * 2.0**-24
    u2 = (counter_bits(key, index, STREAMS["normal_angle"]) >> 8) * 2.0**-24
    radius = to_float32(math.sqrt(-2.0 * to_float32(math.log(u1))))
    return to_float32(radius * to_float32(math.cos(to_float32(TWO_PI_F32 * u2))))


def random_like(kind: str, like: torch.Tensor, key: IntLike | float) -> torch.Tensor:
    """:func:`uniform` (``kind`` ``"uniform"``), :func:`normal` or :func:`counter_dither`
    (``"dither"``) values of ``key`` (an integer as a number or an integer tensor, 0-d) for every
    element of ``like`` (float32, ``like``'s shape and device; its values are not read), with
    torch's int64 ops: the bits of :func:`counter_bits` (:func:`counter_dither`'s).
    Works under ``torch.func`` transforms and ``torch.compile``."""
    key = (int(key) if not isinstance(key, torch.Tensor) else key.to(torch.int64)) & MASK32
    n = like.numel()
    index = torch.arange(n, dtype=torch.int64, device=like.device).reshape(like.shape)
    lo = index & MASK32
    hi = index >> 32 if n > 2**32 else 0  # (the high word of every index of a smaller leaf is 0)

    def top24(stream: str, plus: int = 0) -> torch.Tensor:
        return ((_counter_bits(key, lo, hi, STREAMS[stream]) >> 8) + plus).to(torch.float32) * 2.0**-24

    if kind == "uniform":
        return top24("uniform")
    if kind == "dither":
        return (_dither_bits(key, lo, hi) >> 8).to(torch.float32) * 2.0**-24
    radius = torch.sqrt(torch.log(top24("normal_radius", 1)) * -2.0)
    return radius * torch.cos(top24("normal_angle") * TWO_PI_F32)


_CONSTANTS: dict[tuple[tuple[float, ...], torch.device], torch.Tensor] = {}


def constant_vector(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """``values`` as a float64 vector on ``device``, made once and reused (read-only): a step that
    is captured into a CUDA graph must not copy from the host."""
    if traced():  # a constant of the graph
        return torch.tensor(values, dtype=torch.float64, device=device)
    key = (values, torch.device(device))
    out = _CONSTANTS.get(key)
    if out is None:
        if len(_CONSTANTS) > 256:
            _CONSTANTS.clear()
        out = _CONSTANTS[key] = torch.tensor(values, dtype=torch.float64, device=device)
    return out


def leaf_keys(seed: int, step: torch.Tensor, leaf_index: Sequence[int]) -> torch.Tensor:
    """Keys for :func:`uniform` and :func:`normal`, one per leaf: int64 values in [0, 2³²) on
    ``step``'s device, a hash of ``seed`` (an int in [0, 2⁶⁴)), the leaf's step ``step`` (int64,
    one per leaf or one for all: ``ctx.counts``) and its position ``leaf_index`` (``ctx.index``).
    For one seed and leaf, a bijection of the step modulo 2³²: a leaf draws a new stream at every
    one of 2³² steps. Computed with int64 ops on the device (no copy from the host after the
    first call with these leaves), so a captured step can hold it."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ValueError(f"leaf_keys: the seed must be an int in [0, 2**64), got {seed!r}")
    s = mix32(mix32((seed & MASK32) ^ STREAMS["leaf_keys"]) ^ (seed >> 32))
    leaves = constant_vector(tuple(float(mix32(s ^ (j & MASK32))) for j in leaf_index), step.device)
    t = step.to(torch.int64)
    return mix32(mix32((leaves.to(torch.int64) + (t & MASK32)) & MASK32) ^ ((t >> 32) & MASK32))


# --------------------------------------------------------------------------------------------
# Running a program eagerly: one tensor at a time, or foreach over lists.


def traced() -> bool:
    """Whether a graph is being traced (``torch.compile``'s Dynamo, or ``make_fx`` and other
    dispatch modes): tensors are then symbolic, and the host cannot read their values."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


def unwrapped(t: torch.Tensor) -> torch.Tensor:
    """The tensor inside ``torch.func``'s wrappers (vmap's batched tensors, grad's tracked ones):
    under ``vmap``, every member's values, which the host may read where it is not tracing."""
    while torch._C._functorch.is_functorch_wrapped_tensor(t):
        t = torch._C._functorch.get_unwrapped(t)
    return t


def wrapped(t: Any) -> bool:
    """Whether ``t`` is a tensor wrapped by a ``torch.func`` transform (vmap, grad) or tracked by
    autograd."""
    return isinstance(t, torch.Tensor) and (
        torch._C._functorch.is_functorch_wrapped_tensor(t) or (t.requires_grad and torch.is_grad_enabled())
    )


def foreach_ok(tensors: Sequence[Any], sc: Scalars | None = None) -> bool:
    """Whether ``torch._foreach_*`` ops may run: not while a graph is traced (``torch.compile``,
    which fuses the per-leaf ops itself and may be tracing a ``vmap``; ``make_fx``), and no tensor
    is wrapped by a ``torch.func`` transform (vmap, grad) or tracked by autograd. Otherwise the
    rule runs one leaf at a time, with ops that every transform supports. (A transform wraps all
    the leaves it maps over, so the first tensor of each input stands for the others.)"""
    if traced() or any(wrapped(t) for t in tensors):
        return False
    return sc is None or not any(wrapped(v) for v in sc.values.values())


def _operand(arg: Any, vals: list[Any], get_scalar: Callable[[str], Any]) -> Any:
    if isinstance(arg, int):
        return vals[arg]
    if isinstance(arg, ScalarRef):
        return get_scalar(arg.name)
    return arg[1]


def _extremum(kind: str, x: torch.Tensor, y: Any) -> torch.Tensor:
    """IEEE 754's minimum (``kind`` ``"min"``) or maximum of ``x`` and ``y`` (a tensor or a number
    in ``x``'s dtype): torch's ``minimum`` (``clamp_max`` with a number), where NaN propagates, with
    a tie of ±0 resolved (−0 below +0), which torch leaves to where in the tensor it lies."""
    low = kind == "min"
    if isinstance(y, torch.Tensor):
        r = torch.minimum(x, y) if low else torch.maximum(x, y)
    else:
        r = torch.clamp_max(x, y) if low else torch.clamp_min(x, y)
        if y != 0:  # (or NaN) a tie is of two equal values
            return r
    negative = torch.signbit(x)
    tie = torch.where(negative, x, y) if low else torch.where(negative, y, x)
    return torch.where(x == y, tie, r)


_TORCH: dict[str, Callable[..., torch.Tensor]] = {
    "sqrt": torch.sqrt, "neg": torch.neg, "abs": torch.abs, "sign": torch.sign,
    "isnan": torch.isnan, "isfinite": torch.isfinite, "not": torch.logical_not,
    "and": torch.logical_and, "or": torch.logical_or,
    "add": torch.add, "sub": torch.sub, "mul": torch.mul, "div": torch.div,
    **{kind: getattr(torch, kind) for kind in COMPARISONS},
}


def _one(kind: str, x: torch.Tensor, *y: Any) -> torch.Tensor:
    """The op ``kind`` on one tensor ``x`` (and the other operand ``y``: a tensor, or a number or
    scalar as the op uses it), as the eager torch op computes it."""
    if kind in ("min", "max"):
        return _extremum(kind, x, y[0])
    if kind == "rsub":  # s − x = (−x) + s exactly
        return torch.neg(x) + y[0]
    if kind == "rdiv":
        return (y[0] if isinstance(y[0], torch.Tensor) else torch.full_like(x, y[0])) / x
    return _TORCH[kind](x, *y)


def _where(cond: Any, a: Any, b: Any) -> torch.Tensor:
    """``torch.where`` of a value and a value or a number (a tensor filled with it, in the value's dtype)."""
    if not isinstance(a, torch.Tensor):
        a = torch.full_like(b, a)
    elif not isinstance(b, torch.Tensor):
        b = torch.full_like(a, b)
    return torch.where(cond, a, b)


def interpret(prog: Program, inputs: Mapping[str, V], step: Callable[[Op, list[V], int], V]) -> list[V]:
    """Run ``prog``: every value of the program (its inputs, then each op's result), each op
    computed by ``step(op, values so far, op index)``. The one interpreter of the language: its
    backends are :func:`run_leaf` (one tensor), :func:`run_foreach` (lists of tensors) and the
    engine's kernel text (:class:`grokxform.engine.codegen.Emitter`, Triton and C)."""
    vals: list[V] = [inputs[name] for name in prog.inputs]
    for k, op in enumerate(prog.ops):
        vals.append(step(op, vals, k))
    return vals


def run_leaf(
    prog: Program, inputs: Mapping[str, torch.Tensor], sc: Scalars, i: int
) -> dict[str, torch.Tensor]:
    """Run ``prog`` on single tensors, leaf ``i`` of the scalars. Works under ``torch.func``
    transforms and autograd."""
    first = next(iter(inputs.values()), None)
    device = first.device if first is not None else None

    def step(op: Op, vals: list[Any], k: int) -> torch.Tensor:
        a, kind = op.args, op.kind
        if kind == "where":
            cond = sc.at(a[0].name, torch.bool, device, i) if isinstance(a[0], ScalarRef) else vals[a[0]]
            return _where(cond, *[vals[s] if isinstance(s, int) else s[1] for s in a[1:]])
        if kind == "cast":
            return vals[a[0]].to(op.dtype)
        if kind in RANDOM:
            return random_like(kind, vals[a[0]], sc.at(a[1].name, torch.int64, device, i))
        dtype = prog.dtypes[a[0]]  # the operands' (a comparison's own is bool)
        ys = [_operand(y, vals, lambda n: sc.at(n, dtype, device, i)) for y in a[1:]]
        return _one(kind, vals[a[0]], *ys)

    return _distinct(prog, interpret(prog, inputs, step), torch.clone)


_WIDE = (torch.float32, torch.float64)


def _unary(kind: str, x: list[torch.Tensor], inplace: bool) -> list[torch.Tensor]:
    """``sqrt``, ``neg``, ``abs`` or ``sign`` of ``x`` with a foreach op; in place on ``x`` if ``inplace``."""
    if inplace:
        getattr(torch, f"_foreach_{kind}_")(x)
        return x
    return list(getattr(torch, f"_foreach_{kind}")(x))


def _binary(kind: str, x: list[torch.Tensor], y: Any, inplace: bool) -> list[torch.Tensor]:
    """``x ∘ y`` (``kind`` add/sub/mul/div, clamp_max/clamp_min) with a foreach op; in place on ``x``
    if ``inplace``."""
    if kind == "sub" and isinstance(y, torch.Tensor):  # no Tensor overload of sub: x + (−1)·s is x − s exactly
        kind, extra = "add", {"alpha": -1}
    else:
        extra = {}
    if inplace:
        getattr(torch, f"_foreach_{kind}_")(x, y, **extra)
        return x
    return list(getattr(torch, f"_foreach_{kind}")(x, y, **extra))


def run_foreach(
    prog: Program, inputs: Mapping[str, list[torch.Tensor]], sc: Scalars, idx: Sequence[int],
    owned: frozenset[str] = frozenset(),
) -> dict[str, list[torch.Tensor]]:
    """Run ``prog`` over lists of tensors (one list per input, each list of one dtype, all on one
    device) with ``torch._foreach_*`` ops, and per-tensor ops where torch has no foreach op
    (comparisons, predicates, ``where``, a minimum or maximum that may meet a tie of ±0, random
    numbers); ``idx`` are the positions of the listed leaves among the scalars' leaves. A
    temporary is updated in place at its last use, and so is an input named in ``owned`` (one whose old values nobody needs
    after the step: a state the caller overwrites); no other input is written."""
    n_in = len(prog.inputs)
    mutable = [name in owned for name in prog.inputs]
    first = next(iter(inputs.values()), [])
    device = first[0].device if first else None
    last = prog.last_uses()

    def step(op: Op, vals: list[Any], k: int) -> list[torch.Tensor]:
        a = op.args
        kind = op.kind
        if kind == "where":
            cond = vals[a[0]] if isinstance(a[0], int) else sc.group(a[0].name, torch.bool, device, idx)
            sides = [vals[s] if isinstance(s, int) else [s[1]] * len(first) for s in a[1:]]
            return [_where(c, t, u) for c, t, u in zip(_each(cond, len(first)), *sides)]
        x = vals[a[0]]
        if kind in RANDOM:
            keys = _each(sc.group(a[1].name, torch.int64, device, idx), len(x))
            return [random_like(kind, t, key) for t, key in zip(x, keys)]
        # A value read for the last time is reused in place; not in 16-bit dtypes, where torch's
        # in-place multiplication by a number rounds the number to the dtype first.
        mine = (a[0] >= n_in or mutable[a[0]]) and last[a[0]] == k and op.dtype in _WIDE
        if kind in ("sqrt", "neg", "abs", "sign"):
            return _unary(kind, x, mine)
        if kind == "cast":
            return [t.to(op.dtype) for t in x]
        if len(a) == 1:  # isnan, isfinite, not
            return [_one(kind, t) for t in x]
        dtype = prog.dtypes[a[0]]  # the operands' (a comparison's own is bool)
        y = _operand(a[1], vals, lambda n: sc.group(n, dtype, device, idx))
        if kind in ("add", "sub", "mul", "div"):
            return _binary(kind, x, y, mine)
        if kind == "rsub":  # s − x = (−x) + s exactly
            return _binary("add", _unary("neg", x, mine), y, op.dtype in _WIDE)
        if kind in ("min", "max") and all(isinstance(u, float) and u != 0 for u in _each(y, 1)):
            # numbers other than ±0: no tie of ±0, so torch's clamp is the IEEE minimum / maximum
            return _binary("clamp_max" if kind == "min" else "clamp_min", x, y, mine)
        return [_one(kind, t, u) for t, u in zip(x, _each(y, len(x)))]  # rdiv, min, max, comparisons, and, or

    return _distinct(prog, interpret(prog, inputs, step), _copy_list)


def _each(v: Any, n: int) -> list[Any]:
    """``v`` as a list of ``n`` (a list as it is; anything else ``n`` times)."""
    return v if isinstance(v, list) else [v] * n


def _copy_list(ts: list[torch.Tensor]) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for t in ts]
    torch._foreach_copy_(out, ts)
    return out


def _distinct(prog: Program, vals: list[Any], copy: Callable[[Any], Any]) -> dict[str, Any]:
    """The outputs, each its own tensor: an output that is an input (a rule storing ``x`` as it is)
    or that another output already returned (a filter's output that is its new state) is copied,
    so a state never aliases a gradient or an update."""
    taken = set(range(len(prog.inputs)))
    out = {}
    for name, v in prog.outputs.items():
        out[name] = copy(vals[v]) if v in taken else vals[v]
        taken.add(v)
    return out
