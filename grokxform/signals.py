"""The grokking signal GS_t and the EMA momentum it drives, α_t = clamp(α_init·exp(−κ·GS_t), 0, 1).

Everything is computed in-graph from tensors, so a compiled step does not recompile when the
losses change. The losses reach the transforms as extra keyword arguments of ``update``::

    updates, state = tx.update(grads, state, params, train_loss=loss, val_loss=val_loss)

or the signal is passed directly with ``grokking_signal=...``.
"""

from __future__ import annotations

import inspect
import numbers
from collections.abc import Callable, Sequence
from typing import Any

import torch

SignalFn = Callable[..., Any]
"""``fn(train_loss, val_loss)``, ``fn(train_loss, val_loss, step)`` or ``fn()`` (grokadamw 0.1.2's
form); returns a number, a one-element tensor, or ``None`` (ignored)."""

SIGNAL_INPUTS = ("grokking_signal", "train_loss", "val_loss")
"""The ``update`` keyword arguments the grokking signal reads."""


def loss_gap_signal(train_loss: torch.Tensor, val_loss: torch.Tensor) -> torch.Tensor:
    """GS = max(0, L_val − L_train) / max(L_val, L_train), and 0 where both losses are ≤ 0.

    The default signal of GrokAdamW (its code's ``_default_grokking_signal``), as tensor maths.
    """
    gap = torch.clamp(val_loss - train_loss, min=0.0)
    top = torch.maximum(val_loss, train_loss)
    positive = top > 0
    return torch.where(positive, gap / torch.where(positive, top, 1.0), 0.0)  # no 0/0, also for autograd


def _arity(fn: SignalFn) -> int:
    """How many positional arguments ``fn`` takes (0, 2 or 3)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return 2
    params = [p for p in sig.parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if any(p.kind == p.VAR_POSITIONAL for p in sig.parameters.values()) or len(params) >= 3:
        return 3
    if len(params) in (0, 2):
        return len(params)
    raise TypeError(
        f"grokking signal function {getattr(fn, '__name__', fn)!r} must take (train_loss, val_loss),"
        " (train_loss, val_loss, step) or no argument"
    )


def check_signal_fns(fns: Sequence[SignalFn] | None) -> tuple[tuple[SignalFn, int], ...]:
    """Validate signal functions and record how each is called."""
    if fns is None:
        return ()
    if callable(fns):
        fns = [fns]
    out = []
    for f in fns:
        if not callable(f):
            raise TypeError(f"grokking_signal_fns: {f!r} is not callable")
        out.append((f, _arity(f)))
    return tuple(out)


def signal_input(name: str, value: Any) -> torch.Tensor | float | int | None:
    """``value`` checked as a grokking-signal input, named ``name`` in errors (``"val_loss="``):
    ``None``, a real number (not a bool; an int or a float as given, another real number as a
    float), or a tensor of one element (any shape) and a real dtype, returned detached as a 0-d
    float64 tensor on its device.

    Every path checks with this function (``tx.update``, and the engine when it copies the
    arguments), so each takes and refuses the same values with the same message. Python-level
    checks only: nothing is read from the device.
    """
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.dtype.is_complex or value.dtype == torch.bool:
            raise TypeError(
                f"{name} must be a real number or a one-element tensor of a real dtype, got a {value.dtype} tensor"
            )
        if value.numel() != 1:
            raise ValueError(
                f"{name} must be a number or a one-element tensor, got a tensor of shape {list(value.shape)};"
                " reduce it first, e.g. loss.mean()"
            )
        return value.detach().reshape(()).to(torch.float64)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    raise TypeError(
        f"{name} must be a real number or a one-element tensor of a real dtype, got {type(value).__name__}"
        f" {value!r:.80}"
    )


def _as_f64(x: torch.Tensor | float | int, device: torch.device) -> torch.Tensor:
    """``x`` (a value :func:`signal_input` took) as a 0-d float64 tensor on ``device``.

    A number is added to a zero tensor rather than wrapped by ``torch.tensor``: under
    ``torch.compile`` an added Python float stays a graph input, while one wrapped into a new
    tensor is burnt into the graph as a constant, so every new loss value would recompile.
    """
    if isinstance(x, torch.Tensor):
        return x.to(device)
    return torch.zeros((), dtype=torch.float64, device=device) + x


def has_signal(fns: tuple[tuple[SignalFn, int], ...], extra: dict[str, Any]) -> bool:
    """Whether :func:`compute_signal` can give anything but 0 this step (the inputs checked by
    :func:`signal_input`)."""
    direct, train, val = (signal_input(f"{n}=", extra.get(n)) for n in SIGNAL_INPUTS)
    return bool(fns) or direct is not None or (train is not None and val is not None)


def compute_signal(
    fns: tuple[tuple[SignalFn, int], ...],
    step: torch.Tensor,
    device: torch.device,
    extra: dict[str, Any],
) -> torch.Tensor:
    """GS_t as a 0-d float64 tensor.

    Precedence: ``grokking_signal=`` passed to ``update``; else the mean of the signal functions'
    non-``None`` results; else, with no functions, :func:`loss_gap_signal` of ``train_loss=`` and
    ``val_loss=``; else 0 (α stays α_init). Functions that need losses are skipped on a step
    that passes none.
    """
    direct, train, val = (signal_input(f"{n}=", extra.get(n)) for n in SIGNAL_INPUTS)
    if direct is not None:
        return _as_f64(direct, device)
    have_losses = train is not None and val is not None
    if fns:
        values = []
        for fn, arity in fns:
            if arity == 0:
                v = fn()
            elif not have_losses:
                continue
            elif arity == 2:
                v = fn(_as_f64(train, device), _as_f64(val, device))
            else:
                v = fn(_as_f64(train, device), _as_f64(val, device), step)
            v = signal_input(f"the value of grokking signal function {getattr(fn, '__name__', fn)!r}", v)
            if v is not None:
                values.append(_as_f64(v, device))
        if not values:
            return torch.zeros((), dtype=torch.float64, device=device)
        return torch.stack(values).mean()
    if have_losses:
        return loss_gap_signal(_as_f64(train, device), _as_f64(val, device))
    return torch.zeros((), dtype=torch.float64, device=device)


def adapted_alpha(alpha_init: Any, decay_rate: Any, signal: torch.Tensor) -> torch.Tensor:
    """α_t = clamp(α_init·exp(−κ·GS_t), 0, 1), in float64.

    The signal is data, so what it does to α is bounded here rather than refused: a negative
    GS_t (the loss-gap signal is never negative, a user's signal may be) raises α_t towards 1 and
    stops there (μ held, never amplified: μ_t stays a convex combination of gradients, so it
    cannot grow without bound). A non-finite GS_t (a NaN or infinite loss) counts as GS_t = 0, so
    α_t = α_init: one bad loss must not turn every leaf's EMA into NaN. Static hyperparameters
    that would leave [0, 1] (α_init outside [0, 1), κ < 0) are refused when a transform is built.
    """
    a0 = alpha_init.to(torch.float64) if isinstance(alpha_init, torch.Tensor) else float(alpha_init)
    k = decay_rate.to(torch.float64) if isinstance(decay_rate, torch.Tensor) else float(decay_rate)
    signal = torch.where(torch.isfinite(signal), signal, 0.0)
    return torch.clamp(a0 * torch.exp(-k * signal), 0.0, 1.0)
