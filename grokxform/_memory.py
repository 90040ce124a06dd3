"""Will a state fit? Bytes needed against bytes available, checked before anything is allocated.

A windowed filter keeps w copies of the gradients: ``bytes = w × Σ_leaves numel × element size``.
With w = 10⁴ on a model of 10⁸ float32 parameters that is 4 TB, and allocating it slot by slot
would fail late (or push the host into swap). :func:`check_ma_window` raises first, saying how many
bytes are needed and how many are available.

Available bytes: on a CUDA device, the free device memory (``torch.cuda.mem_get_info``) plus what
PyTorch's caching allocator holds reserved but unused; on the CPU, ``MemAvailable`` from
``/proc/meminfo`` (else the available physical pages from ``os.sysconf``). On other devices
(``meta``, ``mps``, ...) nothing is known and nothing is checked.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from grokxform import _common as C
from grokxform import tree as _tree


class StateTooLargeError(MemoryError):
    """A transform's state would not fit in the memory available on its device."""


_FORMAT: ContextVar[Callable[[torch.dtype, int], float | None] | None] = ContextVar("grokxform_state_format", default=None)


@contextmanager
def state_format(per_element: Callable[[torch.dtype, int], float | None]) -> Iterator[None]:
    """Within: the state being made is stored compressed (:func:`~grokxform.compress_state`);
    ``per_element(dtype, numel)`` gives the bytes per element of a state tensor of that dtype and
    size, or ``None`` where it is stored as it is."""
    token = _FORMAT.set(per_element)
    try:
        yield
    finally:
        _FORMAT.reset(token)


def _item_bytes(dtype: torch.dtype, numel: int) -> float:
    """The bytes one element of a new state tensor takes (compressed within :func:`state_format`)."""
    fmt = _FORMAT.get()
    got = fmt(dtype, numel) if fmt is not None else None
    return dtype.itemsize if got is None else got


def _cpu_available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # the kernel reports kB
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def available_bytes(device: torch.device) -> int | None:
    """Bytes that a new allocation on ``device`` can use, or ``None`` where that is unknown."""
    if device.type == "cpu":
        return _cpu_available_bytes()
    if device.type == "cuda" and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free) + int(cached)
    return None


def _format(n: int) -> str:
    return f"{n:,} bytes ({n / 2**30:.3g} GiB)"


def check_fits(needed: dict[torch.device, int], who: str, detail: str, advice: str) -> None:
    """Raise :class:`StateTooLargeError` if ``needed[device]`` bytes exceed what ``device`` has.

    ``detail`` says how the need was counted; ``advice`` what to do instead. Skipped while
    ``torch.compile`` traces (reading the host's memory state is not graph code).
    """
    if torch.compiler.is_compiling():
        return
    for device, n in needed.items():
        have = available_bytes(device)
        if have is not None and n > have:
            raise StateTooLargeError(
                f"{who}: the state needs {_format(n)} on {device} ({detail}) but only {_format(have)}"
                f" are available; {advice}"
            )


def check_ma_window(
    params: Any, window_size: int, window_dtype: torch.dtype | None, accumulator_dtype: torch.dtype | None
) -> None:
    """Check, before ``ma_filter`` allocates it, that its state fits on each device of ``params``.

    Per device: ``w × Σ numel × size(window dtype)`` for the window, plus
    ``Σ numel × size(accumulator dtype)`` for the running sum (``None``: float32, float64 for
    float64 params). Within :func:`state_format` (a compressed state) the window's slots count
    the compressed bytes. Nothing is checked while ``torch.compile`` traces (as :func:`check_fits`:
    the host's memory is no graph code, nor is the compressed-state context).
    """
    if torch.compiler.is_compiling():
        return
    numel: dict[torch.device, int] = {}
    window: dict[torch.device, int] = {}
    total: dict[torch.device, int] = {}
    for p in _tree.flatten(params)[0]:
        if not isinstance(p, torch.Tensor):
            continue
        n = p.numel()
        item = _item_bytes(window_dtype or p.dtype, n)
        numel[p.device] = numel.get(p.device, 0) + n
        window[p.device] = window.get(p.device, 0) + int(window_size * n * item)
        total[p.device] = total.get(p.device, 0) + n * C.state_dtype_for(p, accumulator_dtype).itemsize
    for device in numel:
        check_fits(
            {device: window[device] + total[device]},
            "ma_filter",
            f"a window of {window_size:,} gradients of {numel[device]:,} elements: {window[device]:,} bytes,"
            f" plus the running sum: {total[device]:,} bytes",
            "use a smaller window_size, window_dtype=torch.bfloat16 (half the bytes of float32), or an"
            " EMA filter (one copy of the gradients)",
        )


class LazyZeros(TorchDispatchMode):
    """While active, zero-filled allocations of more than one element return a stride-0 view of
    a single zero (no memory). ``tx.init`` of a 100-slot window then costs nothing until the
    ring buffers are allocated, instead of holding the tuple layout and the ring at once."""

    def __init__(self) -> None:
        super().__init__()
        self.lazy: dict[int, torch.Tensor] = {}
        """The lazy zeros made, by the address of their one-element storage (the Python object a
        mode returns is not always the one it made: :func:`is_lazy` looks a tensor up)."""

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func in (aten.zeros_like.default, aten.new_zeros.default, aten.zeros.default):
            if func is aten.zeros.default:
                shape, ref = tuple(args[0]), None
            elif func is aten.new_zeros.default:
                shape, ref = tuple(args[1]), args[0]
            else:
                shape, ref = tuple(args[0].shape), args[0]
            dtype = kwargs.get("dtype") or (ref.dtype if ref is not None else torch.get_default_dtype())
            device = kwargs.get("device") or (ref.device if ref is not None else torch.device("cpu"))
            numel = 1
            for s in shape:
                numel *= int(s)
            if numel > 1:
                out = torch.zeros((), dtype=dtype, device=device).expand(shape)
                self.lazy[out.untyped_storage().data_ptr()] = out
                return out
        return func(*args, **kwargs)


def is_lazy(x: Any, lazy: dict[int, torch.Tensor]) -> bool:
    """Whether ``x`` is one of the lazy zeros ``lazy`` (:attr:`LazyZeros.lazy`) or a view of one."""
    return (type(x) is torch.Tensor and not torch._C._functorch.is_functorch_wrapped_tensor(x) and x.numel() > 1
            and 0 in x.stride() and x.untyped_storage().data_ptr() in lazy)
