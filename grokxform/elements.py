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
- by the engine (:mod:`grokxform.engine`), which turns it into lines of a multi-tensor Triton kernel.

So the eager path and the kernels cannot disagree about the maths: there is one source.

Rules of the language (what makes the engine's kernels round as eager does):

- ``Val ∘ Val`` needs both operands in one dtype (cast with ``.to`` first); the result has it.
- ``Val ∘ scalar`` has the dtype of the ``Val``. A Python number is used at the op's compute
  precision (float32 for 16- and 32-bit values, as torch's ``x * 0.9``); a scalar that is a tensor
  is first rounded to the value's dtype (as ``x * s.to(x.dtype)``).
- Operations: ``+ - * /`` (with a scalar or a number on either side), unary ``-``, ``.sqrt()``,
  ``.to(dtype)``, and :func:`where` ``(cond, a, b)`` with a scalar condition.
- Scalars are per-step values given by the primitive's scalar rule: a number, a number per leaf, a
  0-d tensor, or a 1-d tensor with one value per leaf (:class:`Scalars`).
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

import torch

Number = Union[int, float]

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
    """``out = kind(args)`` rounded to ``dtype``. ``args`` holds value ids (int), :class:`ScalarRef`
    or Python numbers (as ``("num", x)``)."""

    kind: str
    args: tuple[Any, ...]
    dtype: torch.dtype


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


class Val:
    """One element of a tensor, of dtype ``dtype``, while an element rule is traced."""

    __slots__ = ("_t", "id", "dtype")
    __array_ufunc__ = None  # ``np.float32(2) * v`` defers to ``v.__rmul__``

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


def where(cond: ScalarRef, a: Val, b: Val | Number) -> Val:
    """``a`` where the scalar ``cond`` is true (non-zero), else ``b`` (a value of ``a``'s dtype or a number)."""
    if not isinstance(cond, ScalarRef):
        raise TypeError("where: the condition must be a scalar of the rule (a per-step flag)")
    if not isinstance(a, Val):
        raise TypeError("where: the second argument must be an element value")
    return a._t.emit("where", (cond, a.id, a._arg(b, "where")), a.dtype)


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


def trace(
    rule: Callable[[Inputs, Inputs], Outputs], inputs: Mapping[str, torch.dtype], scalar_names: Sequence[str]
) -> Program:
    """Trace ``rule(values, scalars) -> {name: Val}`` for the given input dtypes."""
    tracer = _Tracer()
    vals = {name: tracer.value(dt) for name, dt in inputs.items()}
    out = rule(Inputs(vals), Inputs({n: ScalarRef(n) for n in scalar_names}))
    outputs: dict[str, int] = {}
    for name, v in out.items():
        if not isinstance(v, Val) or v._t is not tracer:
            raise TypeError(f"element rule: output {name!r} is not an element value of this trace")
        outputs[name] = v.id
    return Program(tuple(inputs), tuple(tracer.ops), outputs, tuple(tracer.dtypes))


class TracedRule:
    """An element rule with its traces cached per input dtypes."""

    def __init__(self, rule: Callable[[Inputs, Inputs], Outputs], scalar_names: Sequence[str]) -> None:
        self.rule = rule
        self.scalar_names = tuple(scalar_names)
        self._cache: dict[tuple[tuple[str, torch.dtype], ...], Program] = {}

    def program(self, inputs: Mapping[str, torch.dtype]) -> Program:
        key = tuple(inputs.items())
        prog = self._cache.get(key)
        if prog is None:
            prog = self._cache[key] = trace(self.rule, inputs, self.scalar_names)
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

    def kind(self, name: str) -> str:
        """``"number"``, ``"numbers"``, ``"tensor"`` (0-d) or ``"tensors"`` (one per leaf)."""
        v = self.values[name]
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
        out = self.values[name]
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
# Running a program eagerly: one tensor at a time, or foreach over lists.


def traced() -> bool:
    """Whether a graph is being traced (``torch.compile``'s Dynamo, or ``make_fx`` and other
    dispatch modes): tensors are then symbolic, and the host cannot read their values."""
    return torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack() > 0


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


def run_leaf(
    prog: Program, inputs: Mapping[str, torch.Tensor], sc: Scalars, i: int
) -> dict[str, torch.Tensor]:
    """Run ``prog`` on single tensors, leaf ``i`` of the scalars. Works under ``torch.func``
    transforms and autograd."""
    vals: list[Any] = [inputs[name] for name in prog.inputs]
    device = vals[0].device if vals else None
    for op in prog.ops:
        a = op.args
        kind = op.kind
        if kind == "where":
            cond = sc.at(a[0].name, torch.bool, device, i)
            x = vals[a[1]]
            y = vals[a[2]] if isinstance(a[2], int) else torch.full_like(x, a[2][1])
            vals.append(torch.where(cond, x, y))
            continue
        x = vals[a[0]]
        if kind == "sqrt":
            r = torch.sqrt(x)
        elif kind == "neg":
            r = torch.neg(x)
        elif kind == "cast":
            r = x.to(op.dtype)
        else:
            y = _operand(a[1], vals, lambda n: sc.at(n, op.dtype, device, i))
            if kind == "add":
                r = x + y
            elif kind == "sub":
                r = x - y
            elif kind == "mul":
                r = x * y
            elif kind == "div":
                r = x / y
            elif kind == "rsub":
                r = torch.neg(x) + y
            else:  # rdiv
                r = (y if isinstance(y, torch.Tensor) else torch.full_like(x, y)) / x
        vals.append(r)
    return _distinct(prog, vals, torch.clone)


_WIDE = (torch.float32, torch.float64)


def _unary(kind: str, x: list[torch.Tensor], inplace: bool) -> list[torch.Tensor]:
    """``sqrt`` or ``neg`` of ``x`` with a foreach op; in place on ``x`` if ``inplace``."""
    if inplace:
        getattr(torch, f"_foreach_{kind}_")(x)
        return x
    return list(getattr(torch, f"_foreach_{kind}")(x))


def _binary(kind: str, x: list[torch.Tensor], y: Any, inplace: bool) -> list[torch.Tensor]:
    """``x ∘ y`` (``kind`` add/sub/mul/div) with a foreach op; in place on ``x`` if ``inplace``."""
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
    device) with ``torch._foreach_*`` ops; ``idx`` are the positions of the listed leaves among the
    scalars' leaves. A temporary is updated in place at its last use, and so is an input named in
    ``owned`` (one whose old values nobody needs after the step: a state the caller overwrites);
    no other input is written."""
    n_in = len(prog.inputs)
    mutable = [name in owned for name in prog.inputs]
    vals: list[Any] = [inputs[name] for name in prog.inputs]
    first = vals[0] if vals else []
    device = first[0].device if first else None
    last = prog.last_uses()
    for k, op in enumerate(prog.ops):
        a = op.args
        kind = op.kind
        if kind == "where":
            cond = sc.group(a[0].name, torch.bool, device, idx)
            xs = vals[a[1]]
            conds = cond if isinstance(cond, list) else [cond] * len(xs)
            if isinstance(a[2], int):
                ys = vals[a[2]]
                vals.append([torch.where(c, t, u) for c, t, u in zip(conds, xs, ys)])
            else:
                vals.append([torch.where(c, t, torch.full_like(t, a[2][1])) for c, t in zip(conds, xs)])
            continue
        x = vals[a[0]]
        # A value read for the last time is reused in place; not in 16-bit dtypes, where torch's
        # in-place multiplication by a number rounds the number to the dtype first.
        mine = (a[0] >= n_in or mutable[a[0]]) and last[a[0]] == k and op.dtype in _WIDE
        r: list[torch.Tensor]
        if kind in ("sqrt", "neg"):
            r = _unary(kind, x, mine)
        elif kind == "cast":
            r = [t.to(op.dtype) for t in x]
        else:
            y = _operand(a[1], vals, lambda n: sc.group(n, op.dtype, device, idx))
            if kind in ("add", "sub", "mul", "div"):
                r = _binary(kind, x, y, mine)
            elif kind == "rsub":  # s − x = (−x) + s exactly
                r = _binary("add", _unary("neg", x, mine), y, op.dtype in _WIDE)
            else:  # rdiv: s / x
                ys = y if isinstance(y, list) else [y] * len(x)
                r = [(s if isinstance(s, torch.Tensor) else torch.full_like(t, s)) / t for s, t in zip(ys, x)]
        vals.append(r)
    return _distinct(prog, vals, _copy_list)


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
