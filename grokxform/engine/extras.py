"""The extra arguments of a step (``train_loss=``, ``val_loss=``...) as the engine reads them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from grokxform.signals import SIGNAL_INPUTS, signal_input


def stage_extras(
    bufs: dict[str, torch.Tensor], extra: Mapping[str, Any], device: torch.device, who: str,
    error: type[Exception] = TypeError,
) -> dict[str, torch.Tensor]:
    """Copy each extra argument into a persistent device tensor of ``bufs`` (made at its first
    call: a compiled or captured step reads those, so a new loss value is new data, never a new
    step), and return them by name, sorted. The grokking-signal inputs are checked as ``update``
    checks them and staged as 0-d float64 tensors; numbers too; other float tensors as float64.
    A value that is not a number or a tensor raises ``error``; a tensor of another shape than its
    buffer's, ``ValueError``."""
    out = {}
    for name in sorted(extra):
        value = extra[name]
        if name in SIGNAL_INPUTS:
            value = signal_input(f"{name}=", value)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, torch.Tensor)):
            raise error(f"{who}: extra argument {name}= must be a number or a tensor, got {type(value).__name__}")
        buf = bufs.get(name)
        if isinstance(value, torch.Tensor):
            v = value.detach()
            if buf is None:  # floats kept as float64, the dtype the scalar rules compute in
                dtype = torch.float64 if v.is_floating_point() else v.dtype
                buf = bufs[name] = torch.empty(v.shape, dtype=dtype, device=device)
            elif v.shape != buf.shape:
                raise ValueError(f"{who}: extra argument {name}= had shape {list(buf.shape)}, now {list(v.shape)}")
            buf.copy_(v)
        else:
            if buf is None:
                buf = bufs[name] = torch.empty((), dtype=torch.float64, device=device)
            buf.fill_(value)
        out[name] = buf
    return out
