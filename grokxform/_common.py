"""Private helpers shared by the transforms: argument checks, scalars, leaf-wise maps."""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from grokxform import tree as _tree
from grokxform.elements import constant_vector, traced


def is_number(x: Any) -> bool:
    """A real number that is not a bool: Python's ``int``/``float`` and NumPy's scalars alike."""
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def plain_number(x: Any) -> Any:
    """A NumPy scalar as the Python number of the same value (``np.float32(0.1)`` -> ``float``,
    ``np.int64(3)`` -> ``int``); anything else unchanged."""
    if is_number(x) and type(x) not in (int, float):
        return int(x) if isinstance(x, numbers.Integral) else float(x)
    return x


def check_int(fn: str, name: str, value: Any, *, low: int) -> int:
    """``value`` as an ``int`` (NumPy integers too), or ``TypeError``/``ValueError`` naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{fn}: {name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{fn}: {name} must be an int >= {low}, got {value!r}")
    return int(value)


def check_bool(fn: str, name: str, value: Any) -> bool:
    """``value`` if it is a ``bool``, else ``TypeError`` naming ``name`` (``"no"`` is not false)."""
    if not isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be True or False, got {value!r}")
    return value


def check_scalar(
    fn: str,
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ``ValueError`` naming ``name`` if the Python number ``value`` is outside the range.

    Tensors are accepted unchecked (checking one would synchronise with the device and break
    ``torch.func.vmap``); ``inject_hyperparams`` checks their initial values.
    """
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise ValueError(f"{fn}: {name} must be a number or a 0-d tensor, got shape {tuple(value.shape)}")
        return
    if not is_number(value):
        raise TypeError(f"{fn}: {name} must be a number or a 0-d tensor, got {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{fn}: {name} must be finite, got {value}")
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and (value >= high if high_open else value > high)
    if bad_low or bad_high:
        lo = "" if low is None else ("(" if low_open else "[") + f"{low}"
        hi = "" if high is None else f"{high}" + (")" if high_open else "]")
        rng = f"in {lo}, {hi}" if low is not None and high is not None else (
            f"{'>' if low_open else '>='} {low}" if low is not None else f"{'<' if high_open else '<='} {high}"
        )
        raise ValueError(f"{fn}: {name} must be {rng}, got {value}")


def f64(x: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` as a new 0-d float64 tensor on ``device`` (never the caller's tensor: a state built
    from it must not alias it)."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float64, copy=True)
    return torch.tensor(float(x), dtype=torch.float64, device=device)


def device_f64(x: float | torch.Tensor, device: torch.device) -> torch.Tensor:
    """``x`` as a 0-d float64 tensor on ``device`` for a scalar rule: a number is filled in on the
    device (no copy from the host, which a CUDA graph capture refuses), a tensor converted."""
    if isinstance(x, torch.Tensor):
        return x.to(device=device, dtype=torch.float64)
    return torch.full((), float(x), dtype=torch.float64, device=device)


def scalar_for(x: float | torch.Tensor, like: torch.Tensor) -> float | torch.Tensor:
    """A hyperparameter ready to multiply ``like``: numbers stay numbers, tensors take its dtype."""
    if isinstance(x, torch.Tensor):
        return x.to(device=like.device, dtype=like.dtype)
    return x


def counter(device: torch.device) -> torch.Tensor:
    """A 0-d int64 step counter at zero."""
    return torch.zeros((), dtype=torch.int64, device=device)


def state_dtype_for(leaf: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a state tensor of ``leaf`` is kept in: ``dtype`` if given, else the leaf's own
    dtype promoted to at least float32 (a bfloat16 EMA would lose its small increments)."""
    if dtype is not None:
        return dtype
    if leaf.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return leaf.dtype


def zeros_like_tree(params: Any, dtype: torch.dtype | None = None) -> Any:
    """Zeros shaped like each leaf of ``params`` (``None`` leaves stay ``None``)."""
    check_gradients(params, "init", what="param")
    return _tree.tree_map(
        lambda p: None if p is None else torch.zeros_like(p, dtype=state_dtype_for(p, dtype)), params
    )


def check_gradients(
    updates: Any, transform: str, like: Any = None, *, what: str = "gradient", like_name: str = "state"
) -> None:
    """Raise naming the path unless each non-``None`` leaf of ``updates`` is a dense floating-point
    tensor (``TypeError``) on the device of the matching tensor leaf of ``like`` (``ValueError``).

    ``like`` (a tree of the same structure, or ``None``) is the state or the params the leaf meets;
    a structure mismatch is left to :func:`grokxform.tree.check_structure`. Python-level checks only:
    nothing is read from the device, so this is free under ``torch.compile`` and ``vmap``.
    """
    leaves = _tree.flatten(updates)[0]
    refs = _tree.flatten(like)[0] if like is not None else []
    _check_gradient_leaves(leaves, refs, updates, transform, what, like_name)


def _check_gradient_leaves(
    leaves: list[Any], refs: list[Any], updates: Any, transform: str, what: str = "gradient", like_name: str = "state"
) -> None:
    """:func:`check_gradients` on leaves already flattened (``updates`` only names paths in errors)."""
    if len(refs) != len(leaves):
        refs = [None] * len(leaves)
    for i, (g, ref) in enumerate(zip(leaves, refs)):
        if g is None:
            continue
        if not isinstance(g, torch.Tensor) or not g.is_floating_point():
            got = str(g.dtype) if isinstance(g, torch.Tensor) else type(g).__name__
            raise TypeError(
                f"{transform}: the {what} at path {_tree.path_names(updates)[i]!r} must be a floating-point"
                f" tensor, got {got}"
            )
        if g.layout != torch.strided:
            raise TypeError(
                f"{transform}: the {what} at path {_tree.path_names(updates)[i]!r} must be a dense (strided)"
                f" tensor, got layout {g.layout}; densify it with .to_dense() (nn.Embedding and nn.EmbeddingBag"
                " give dense gradients unless built with sparse=True)"
            )
        if isinstance(ref, torch.Tensor) and g.device != ref.device:
            raise ValueError(
                f"{transform}: the {what} at path {_tree.path_names(updates)[i]!r} is on {g.device} but the"
                f" {like_name} it meets is on {ref.device}"
            )


def check_state(state: Any, cls: type, transform: str) -> None:
    """Raise ``TypeError`` unless ``state`` is a ``cls``, the state that ``transform``'s init makes
    (a state of another transform would otherwise fail later on a missing attribute)."""
    if not isinstance(state, cls):
        raise TypeError(
            f"{transform}: the state must be the {cls.__name__} made by {transform}'s init, got {type(state).__name__}"
        )


def counters_like_tree(params: Any) -> Any:
    """One 0-d int64 counter per leaf of ``params``, on the leaf's device."""
    return _tree.tree_map(lambda p: None if p is None else counter(p.device), params)
