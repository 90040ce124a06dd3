"""Optimizer-step benchmark: grokxform (as users call it) against torch.optim and the Grokfast prior art.

One process, one device. First the copy bandwidth (bytes read + written by a large device copy),
then, for each parameter set and dtype, the median time of one optimizer step (CUDA events around
each step on the GPU, the host clock on the CPU, >= 30 steps after warm-up; the JSON also has the
mean, which counts a step that is slower once every w steps, the MA filter's re-sum), its ratio to
``torch.optim.AdamW(fused=True)`` (``foreach`` on the CPU) and its fraction of the bandwidth floor
``bytes moved per step / bandwidth``. Also the first-step time (which holds any compile), the
recompile count over many steps with an lr schedule and a changing grokking signal, and the peak
extra memory during a step. Prints a table; writes JSON.

    python benchmarks/bench_step.py --sets decoder,gpt2 --dtypes fp32 --out results.json
    python benchmarks/bench_step.py --device cpu --threads 1 --sets decoder --rows 'torch-*,gx-adamw-*'

Rows (``--rows`` takes comma-separated glob patterns over the row names), per pipeline
(``adamw``, ``grokfast_ema``, ``grokfast_ma``, ``grokadamw``, ``grokadamw_compat``... and
``userchain``, a chain no pipeline builds):

- ``gx-<pipeline>-optim``: ``grokxform.Optimizer(named_params, factory)`` with default arguments,
  ``opt.step()`` (the engine's kernels: Triton on CUDA, C on the CPU);
- ``gx-<pipeline>-eager``: the functional ``tx.update`` + ``apply_updates`` as a user's loop calls
  them (the engine's kernels, out of place, where they run the chain), and
  ``gx-<pipeline>-opbyop``: the same under ``gx.kernels(False)`` (torch's ops, one per element op);
- ``gx-<pipeline>-fused``: ``FusedStep(tx, params)`` with default arguments, and its variants
  ``gx-<pipeline>-fused-<variant>`` (``--variants``);
- ``torch-foreach``, ``torch-fused``, ``torch-compiled``, ``official-ema``, ``official-ma``,
  ``grokadamw-0.1.2``, ``grokfast-pytorch``;
- beside other methods: ``gx-sgd-*`` (momentum 0.9) against ``torch-sgd-fused``
  (``torch.optim.SGD(fused=True)``); ``gx-lion-*``, ``gx-ademamix-*``, ``gx-adam-*``,
  ``gx-nadam-*``, ``gx-rmsprop-*`` (momentum 0.9), ``gx-lamb-*`` and ``gx-orthograd_sgd-*`` (⊥Grad
  in front of SGD with momentum) against the bandwidth floor of their bytes; and ``gx-muon-optim`` against ``torch-muon`` (``torch.optim.Muon``, lr 0.02),
  both over the set's matrices only;
- compressed state: ``gx-<pipeline>-int8-optim`` and ``-bf16-optim`` (``gx.Optimizer(...,
  state_format=fmt)``) beside ``torchao-adamw8bit`` and ``bnb-adamw8bit`` (torchao's and
  bitsandbytes' ``AdamW8bit``, where installed).

``--cold`` points Triton's and grokxform's kernel caches at empty folders first, so first steps
include every compile.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import fnmatch
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch

import grokxform as gx
from grokxform.engine import step as engine_step
from grokxform.experiments.modular import make_decoder
from grokxform.fused import FusedStep
from grokxform.transforms.compress import FORMATS, bytes_per_element

# --------------------------------------------------------------------------------------------
# Parameter sets: GPT-2-style trees (names carry the block index, so layer="depth" is meaningful).


def _block(prefix: str, d: int) -> list[tuple[str, tuple[int, ...]]]:
    return [
        (f"{prefix}.ln_1.weight", (d,)),
        (f"{prefix}.ln_1.bias", (d,)),
        (f"{prefix}.attn.c_attn.weight", (d, 3 * d)),
        (f"{prefix}.attn.c_attn.bias", (3 * d,)),
        (f"{prefix}.attn.c_proj.weight", (d, d)),
        (f"{prefix}.attn.c_proj.bias", (d,)),
        (f"{prefix}.ln_2.weight", (d,)),
        (f"{prefix}.ln_2.bias", (d,)),
        (f"{prefix}.mlp.c_fc.weight", (d, 4 * d)),
        (f"{prefix}.mlp.c_fc.bias", (4 * d,)),
        (f"{prefix}.mlp.c_proj.weight", (4 * d, d)),
        (f"{prefix}.mlp.c_proj.bias", (d,)),
    ]


def gpt_shapes(vocab: int, positions: int, d: int, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """The parameter shapes of a GPT-2-style decoder (tied head): 12·layers + 4 tensors."""
    shapes = [("wte.weight", (vocab, d)), ("wpe.weight", (positions, d))]
    for i in range(layers):
        shapes += _block(f"h.{i}", d)
    return shapes + [("ln_f.weight", (d,)), ("ln_f.bias", (d,))]


def decoder_shapes() -> list[tuple[str, tuple[int, ...]]]:
    """The Grokfast paper's modular-arithmetic decoder: 422,784 parameters in 29 tensors."""
    return [(n, tuple(p.shape)) for n, p in make_decoder(seed=0).named_parameters()]


SETS: dict[str, Callable[[], list[tuple[str, tuple[int, ...]]]]] = {
    "tiny": lambda: gpt_shapes(64, 16, 16, 2),  # 28 tensors, ~8k params: CPU smoke test
    "decoder": decoder_shapes,  # 29 tensors, 0.42M: the paper's model, launch-bound on a GPU
    "small": lambda: gpt_shapes(8192, 128, 256, 4),  # 52 tensors, 5.29M: launch-bound
    "10m": lambda: gpt_shapes(4096, 256, 384, 5),  # 64 tensors, 10.5M
    "gpt2": lambda: gpt_shapes(50257, 1024, 768, 12),  # 148 tensors, 124.44M: GPT-2 small
    "1b": lambda: gpt_shapes(50257, 1024, 2048, 22),  # 268 tensors, 1.21B
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def make_tree(shapes: list[tuple[str, tuple[int, ...]]], dtype: torch.dtype, device: torch.device, seed: int):
    gen = torch.Generator(device=device).manual_seed(seed)
    params, grads = {}, {}
    for name, shape in shapes:
        params[name] = (torch.randn(shape, generator=gen, device=device) * 0.02).to(dtype)
        grads[name] = (torch.randn(shape, generator=gen, device=device) * 1e-3).to(dtype)
    return params, grads


# --------------------------------------------------------------------------------------------
# Timing.


class Clock:
    """Times one step: CUDA events on the GPU (the GPU timeline, launch gaps included), the host
    clock on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.pairs: list[Any] = []

    def time(self, fn: Callable[[], Any]) -> None:
        if self.cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            self.pairs.append((a, b))
        else:
            t0 = time.perf_counter()
            fn()
            self.pairs.append(time.perf_counter() - t0)

    def all_ms(self) -> list[float]:
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in self.pairs]
        return [t * 1e3 for t in self.pairs]

    def median_ms(self) -> float:
        return statistics.median(self.all_ms())

    def mean_ms(self) -> float:
        """The mean: a step that is slower once every w steps (the MA filter's re-sum) counts
        here, as it does in a run, where the median leaves it out."""
        return statistics.fmean(self.all_ms())


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, nbytes: int, reps: int = 30) -> float:
    """Bytes read + written per second by ``dst.copy_(src)`` of ``nbytes`` (median of ``reps``)."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    clock = Clock(device)
    for _ in range(reps):
        clock.time(lambda: dst.copy_(src))
    ms = clock.median_ms()
    return 2 * nbytes / (ms * 1e-3)


# --------------------------------------------------------------------------------------------
# Rows: each builds its optimizer over fresh params/grads and returns (step, reset, info).


@dataclasses.dataclass
class Ctx:
    shapes: list[tuple[str, tuple[int, ...]]]
    dtype: torch.dtype
    device: torch.device
    window: int
    steps: int
    warmup: int
    slow_steps: int


@dataclasses.dataclass
class Built:
    step: Callable[[], Any]
    reset: Callable[[], Any] | None = None  # restores the grads that a step changed in place
    warmup: int | None = None
    steps: int | None = None
    numel: int | None = None  # the elements it steps, where not the whole set (Muon: the matrices)
    fused: FusedStep | None = None
    optim: gx.Optimizer | None = None
    keep: Any = None  # objects that must live as long as the row


class _Holder(torch.nn.Module):
    """An nn.Module over a params dict (for the optimizers and filters that take a model)."""

    def __init__(self, params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for name, p in params.items():
            param = torch.nn.Parameter(p)
            param.grad = grads[name]
            self.register_parameter(name.replace(".", "_"), param)


def _with_reset(model: _Holder, grads: dict[str, torch.Tensor]) -> Callable[[], None]:
    saved = [g.clone() for g in grads.values()]
    plist = list(model.parameters())

    def reset() -> None:
        for p, g in zip(plist, saved):
            p.grad.copy_(g)

    return reset


def row_torch(kind: str) -> Callable[[Ctx], Built]:
    def build(ctx: Ctx) -> Built:
        params, grads = make_tree(ctx.shapes, ctx.dtype, ctx.device, 0)
        model = _Holder(params, grads)
        if kind == "compiled":
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, foreach=True)
            step = torch.compile(opt.step)
        else:
            opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, **{kind: True})
            step = opt.step
        return Built(step=step, keep=(model, opt))

    return build


def row_torch_sgd(ctx: Ctx) -> Built:
    """``torch.optim.SGD`` with momentum 0.9, fused (the ``gx-sgd-*`` rows' reference)."""
    params, grads = make_tree(ctx.shapes, ctx.dtype, ctx.device, 0)
    model = _Holder(params, grads)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9, fused=True)
    return Built(step=opt.step, keep=(model, opt))


def _matrices(ctx: Ctx) -> tuple[list[tuple[str, torch.nn.Parameter]], int]:
    """The set's 2-D params with gradients (what Muon steps) and their number of elements."""
    params, grads = make_tree(ctx.shapes, ctx.dtype, ctx.device, 0)
    named = []
    for n, p in params.items():
        if p.ndim == 2:
            param = torch.nn.Parameter(p)
            param.grad = grads[n]
            named.append((n, param))
    return named, sum(p.numel() for _, p in named)


def row_torch_muon(ctx: Ctx) -> Built:
    """``torch.optim.Muon`` (its defaults, lr 0.02) over the set's matrices."""
    named, numel = _matrices(ctx)
    opt = torch.optim.Muon([p for _, p in named], lr=0.02)
    return Built(step=opt.step, numel=numel, keep=(named, opt))


def row_gx_muon(ctx: Ctx) -> Built:
    """``gx.Optimizer(matrices, gx.muon, lr=0.02)`` (defaults otherwise) over the same matrices."""
    named, numel = _matrices(ctx)
    opt = gx.Optimizer(named, gx.muon, lr=0.02)
    return Built(step=opt.step, numel=numel, optim=opt, keep=(named, opt))


def row_adamw8bit(package: str) -> Callable[[Ctx], Built]:
    """An 8-bit AdamW of the prior art (lr 1e-3, wd 0.01): torchao's ``AdamW8bit`` (``"torchao"``)
    or bitsandbytes' (``"bnb"``), each with its default block size."""

    def build(ctx: Ctx) -> Built:
        if package == "torchao":
            from torchao.optim import AdamW8bit
        else:
            from bitsandbytes.optim import AdamW8bit
        params, grads = make_tree(ctx.shapes, ctx.dtype, ctx.device, 0)
        model = _Holder(params, grads)
        opt = AdamW8bit(model.parameters(), lr=1e-3, weight_decay=0.01)
        return Built(step=opt.step, keep=(model, opt))

    return build


def row_official(kind: str) -> Callable[[Ctx], Built]:
    def build(ctx: Ctx) -> Built:
        from pytorch_optimizer.optimizer.grokfast import gradfilter_ema, gradfilter_ma

        params, grads = make_tree(ctx.shapes, ctx.dtype, ctx.device, 0)
        model = _Holder(params, grads)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, fused=ctx.device.type == "cuda")
        box: dict[str, Any] = {"g": None}

        def step() -> None:
            if kind == "ema":
                box["g"] = gradfilter_ema(model, grads=box["g"], alpha=0.98, lamb=2.0)
            else:
                box["g"] = gradfilter_ma(model, grads=box["g"], window_size=ctx.window, lamb=5.0)
            opt.step()

        # MA: time the filtering steps, after the window has filled.
        warm = ctx.window + 2 if kind == "ma" else None
        return Built(step=step, reset=_with_reset(model, grads), warmup=warm, keep=(model, opt, box))

    return build


def row_grokadamw_pkg(ctx: Ctx) -> Built:
    from grokadamw import GrokAdamW

    params, grads = make_tree(ctx.shapes, ctx.dtype, ctx.device, 0)
    model = _Holder(params, grads)
    opt = GrokAdamW(model.parameters(), lr=1e-3)
    return Built(step=opt.step, reset=_with_reset(model, grads), warmup=1, steps=ctx.slow_steps, keep=(model, opt))


def row_grokfast_pytorch(ctx: Ctx) -> Built:
    from grokfast_pytorch import GrokFastAdamW

    params, grads = make_tree(ctx.shapes, ctx.dtype, ctx.device, 0)
    model = _Holder(params, grads)
    opt = GrokFastAdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    return Built(step=opt.step, reset=_with_reset(model, grads), keep=(model, opt))


def pipeline(name: str, window: int) -> gx.GradientTransformation:
    if name == "adamw":
        return gx.adamw(lr=1e-3, weight_decay=0.01)
    if name == "grokfast_ema":
        return gx.grokfast_ema(lr=1e-3)
    if name == "grokfast_ma":
        return gx.grokfast_ma(lr=1e-3, window_size=window)
    if name == "grokfast_ma_bf16w":
        return gx.grokfast_ma(lr=1e-3, window_size=window, window_dtype=torch.bfloat16)
    if name == "grokfast_ma_f64sum":
        return gx.grokfast_ma(lr=1e-3, window_size=window, accumulator_dtype=torch.float64)
    if name == "grokadamw":
        return gx.grokadamw(lr=1e-3)
    if name == "grokadamw_compat":
        return gx.grokadamw_compat(lr=1e-3)
    if name == "userchain":
        return user_chain()
    if name == "orthograd_sgd":
        return orthograd_sgd()
    if name in VOCABULARY:  # the method as its gx.Optimizer row builds it
        factory, kwargs = FACTORIES[name]
        return factory(**kwargs)
    raise ValueError(f"unknown pipeline {name!r}")


def user_chain() -> gx.GradientTransformation:
    """A chain no pipeline builds: amplified EMA, then a global clip, Adam (β2 0.98), decay, lr."""
    return gx.chain(
        gx.amplify(gx.ema_filter(0.95), 1.5), gx.clip_by_global_norm(1.0), gx.scale_by_adam(0.9, 0.98),
        gx.decoupled_weight_decay(0.01), gx.scale_by_learning_rate(1e-3),
    )


def orthograd_sgd() -> gx.GradientTransformation:
    """⊥Grad in front of SGD with momentum (``pytorch_optimizer.OrthoGrad(SGD)``'s optimizer)."""
    return gx.chain(gx.orthograd(), gx.sgd(1e-3, momentum=0.9))


FACTORIES: dict[str, tuple[Callable[..., gx.GradientTransformation], dict[str, Any]]] = {
    # what gx.Optimizer(named_params, factory, **kwargs) runs for each pipeline row
    "adamw": (gx.adamw, {"lr": 1e-3, "weight_decay": 0.01}),
    "grokfast_ema": (gx.grokfast_ema, {"lr": 1e-3}),
    "grokfast_ma": (gx.grokfast_ma, {"lr": 1e-3}),
    "grokfast_ma_bf16w": (gx.grokfast_ma, {"lr": 1e-3, "window_dtype": torch.bfloat16}),
    "grokfast_ma_f64sum": (gx.grokfast_ma, {"lr": 1e-3, "accumulator_dtype": torch.float64}),
    "grokadamw": (gx.grokadamw, {"lr": 1e-3}),
    "grokadamw_compat": (gx.grokadamw_compat, {"lr": 1e-3}),
    "sgd": (gx.sgd, {"lr": 1e-3, "momentum": 0.9}),
    "lion": (gx.lion, {"lr": 1e-4}),
    "ademamix": (gx.ademamix, {"lr": 1e-3}),
    "adam": (gx.adam, {"lr": 1e-3}),
    "nadam": (gx.nadam, {"lr": 1e-3}),
    "rmsprop": (gx.rmsprop, {"lr": 1e-3, "momentum": 0.9}),
    "lamb": (gx.lamb, {"lr": 1e-3, "weight_decay": 0.01}),
}

PIPELINES = ("grokadamw", "adamw", "grokfast_ema", "grokfast_ma", "grokfast_ma_bf16w", "grokfast_ma_f64sum", "grokadamw_compat",
             "userchain")
COMPRESSED = ("grokadamw", "adamw", "grokfast_ma")
"""Pipelines with ``gx.Optimizer(..., state_format=fmt)`` rows (``gx-grokadamw-int8-optim``...)."""
VOCABULARY = ("sgd", "lion", "ademamix", "adam", "nadam", "rmsprop", "lamb", "orthograd_sgd")
"""Methods beside the Grokfast family: a default ``gx.Optimizer`` row and a ``tx.update`` row each."""
SIGNAL = {"train_loss": 1.0, "val_loss": 2.5}

VARIANTS: dict[str, dict[str, Any]] = {
    # name: FusedStep keyword arguments (options are merged over the defaults)
    "": {},
    "nograph": {"cuda_graph": False},
    "nocombo": {"options": {"combo_kernels": False}},
    "nocombo-nograph": {"options": {"combo_kernels": False}, "cuda_graph": False},
    "inductor": {"backend": "inductor"},
    "triton-nograph": {"backend": "triton", "cuda_graph": False},
    "foreach": {"backend": "foreach"},
}


def row_gx_eager(name: str, kernels: bool = True) -> Callable[[Ctx], Built]:
    def build(ctx: Ctx) -> Built:
        params, grads = make_tree(ctx.shapes, ctx.dtype, ctx.device, 0)
        tx = pipeline(name, ctx.window)
        box = {"p": params, "s": tx.init(params)}

        def step() -> None:
            with gx.kernels(kernels):
                u, box["s"] = tx.update(grads, box["s"], box["p"], **SIGNAL)
            box["p"] = gx.apply_updates(box["p"], u)

        return Built(step=step, keep=box)

    return build


def row_gx_fused(name: str, variant: str) -> Callable[[Ctx], Built]:
    def build(ctx: Ctx) -> Built:
        params, grads = make_tree(ctx.shapes, ctx.dtype, ctx.device, 0)
        fs = FusedStep(pipeline(name, ctx.window), params, **VARIANTS[variant])
        return Built(step=lambda: fs(grads, **SIGNAL), fused=fs, keep=(params, grads))

    return build


def row_gx_optim(name: str, state_format: str | None = None) -> Callable[[Ctx], Built]:
    """``gx.Optimizer`` with default arguments over named parameters (depth rules see the block
    numbers), stepped with the losses as 0-d tensors (``loss.detach()``), as a training loop does;
    ``state_format``: its state compressed (``gx.compress_state``)."""

    def build(ctx: Ctx) -> Built:
        params, grads = make_tree(ctx.shapes, ctx.dtype, ctx.device, 0)
        named = []
        for n, p in params.items():
            param = torch.nn.Parameter(p)
            param.grad = grads[n]
            named.append((n, param))
        if name == "userchain":
            opt = gx.Optimizer(named, user_chain())
        elif name == "orthograd_sgd":
            opt = gx.Optimizer(named, orthograd_sgd())
        else:
            factory, kwargs = FACTORIES[name]
            kwargs = {**kwargs, "window_size": ctx.window} if factory is gx.grokfast_ma else kwargs
            opt = gx.Optimizer(named, factory, state_format=state_format, **kwargs)
        sig = {k: torch.tensor(v, device=ctx.device) for k, v in SIGNAL.items()}

        def step() -> None:
            opt.step(**sig)

        return Built(step=step, optim=opt, keep=(named, opt))

    return build


# Bytes per parameter that one step must move at least (each input read once, each output written
# once), as a function of the param, grad, state and window item sizes.
def bytes_per_param(row: str, pb: int, gb: int, sb: float) -> float:
    fmt = next((f for f in FORMATS if f"-{f}-" in row), None)
    slot = gb  # an MA window's slot item
    if fmt is not None:  # compressed state (scales included); the MA window's slots too
        sb = slot = bytes_per_element(fmt)
    adamw = 2 * pb + gb + 4 * sb
    if row.startswith("torch-"):
        return 2 * pb + gb + 4 * pb  # torch keeps its moments in the param dtype
    if row == "official-ema":
        return 2 * pb + gb + 4 * pb + 2 * gb  # μ in the grad dtype
    if row == "official-ma":
        return 2 * pb + gb + 4 * pb + 4 * gb  # one slot in, one out, a running sum (grad dtype)
    if row == "grokfast-pytorch":
        return 2 * pb + gb + 6 * pb
    if row in ("torchao-adamw8bit", "bnb-adamw8bit"):
        return 2 * pb + gb + 4 * 1  # m and v in one byte each (their block scales left out)
    if row in ("torch-sgd-fused", "torch-muon"):
        return 2 * pb + gb + 2 * pb  # one buffer, in the param dtype
    if row == "gx-muon-optim":
        return 2 * pb + gb + 2 * sb  # the momentum buffer (Newton–Schulz runs on the matrices' compute)
    if row == "grokadamw-0.1.2":
        return 2 * pb + 2 * gb + 6 * pb  # the clip reads g once more
    pipe = row[3:].split("-")[0]
    if pipe == "adamw":
        return adamw
    if pipe in ("sgd", "lion"):
        return 2 * pb + gb + 2 * sb  # one momentum buffer in and out
    if pipe == "ademamix":
        return 2 * pb + gb + 6 * sb  # m, the slow m and v
    if pipe in ("adam", "nadam", "rmsprop"):
        return 2 * pb + gb + 4 * sb  # two moments (rmsprop: the square average and the momentum)
    if pipe == "lamb":
        return adamw + pb + gb + 2 * sb  # the norms' pass reads θ, g and the moments again
    if pipe == "orthograd_sgd":
        return 2 * pb + gb + 2 * sb + pb + gb  # the sums' pass reads θ and g, then SGD's buffer
    if pipe == "grokfast_ema":
        return adamw + 2 * sb
    # MA: a ring slot in and out (compressed: the oldest decoded, the newest encoded), the running
    # sum in and out (float32, or float64 with f64sum), and
    # the re-sum, which reads the whole window once every w steps: one slot per step on average
    if pipe == "grokfast_ma":
        return adamw + 3 * slot + 2 * 4
    if pipe == "grokfast_ma_bf16w":
        return adamw + 3 * 2 + 2 * 4
    if pipe == "grokfast_ma_f64sum":
        return adamw + 3 * gb + 2 * 8
    if pipe in ("grokadamw", "grokadamw_compat"):
        return adamw + gb + 2 * sb  # the norm pass over g, and μ
    if pipe == "userchain":
        return adamw + gb + 3 * sb  # the clip's pass reads g and μ (g + λ·μ comes first), then μ in/out
    raise ValueError(row)


def all_rows(variants: list[str], variant_pipelines: list[str]) -> dict[str, Callable[[Ctx], Built]]:
    """Every row, in the order they run (the slow prior art last, so a time budget cuts those)."""
    rows: dict[str, Callable[[Ctx], Built]] = {
        "torch-fused": row_torch("fused"),
        "torch-foreach": row_torch("foreach"),
    }
    for name in PIPELINES:
        rows[f"gx-{name}-optim"] = row_gx_optim(name)
    for name in COMPRESSED:
        for fmt in ("int8", "bf16"):
            rows[f"gx-{name}-{fmt}-optim"] = row_gx_optim(name, fmt)
    rows["torchao-adamw8bit"] = row_adamw8bit("torchao")
    rows["bnb-adamw8bit"] = row_adamw8bit("bnb")
    for name in PIPELINES:
        rows[f"gx-{name}-fused"] = row_gx_fused(name, "")
        if name in variant_pipelines:
            for v in variants:
                rows[f"gx-{name}-fused-{v}"] = row_gx_fused(name, v)
    for name in PIPELINES:
        rows[f"gx-{name}-eager"] = row_gx_eager(name)
    for name in PIPELINES:
        rows[f"gx-{name}-opbyop"] = row_gx_eager(name, kernels=False)
    rows["torch-sgd-fused"] = row_torch_sgd
    for name in VOCABULARY:
        rows[f"gx-{name}-optim"] = row_gx_optim(name)
        rows[f"gx-{name}-eager"] = row_gx_eager(name)
    rows["torch-muon"] = row_torch_muon
    rows["gx-muon-optim"] = row_gx_muon
    rows.update(
        {
            "official-ema": row_official("ema"),
            "grokfast-pytorch": row_grokfast_pytorch,
            "grokadamw-0.1.2": row_grokadamw_pkg,
            "official-ma": row_official("ma"),
            "torch-compiled": row_torch("compiled"),
        }
    )
    return rows


# --------------------------------------------------------------------------------------------


def run_row(name: str, build: Callable[[Ctx], Built], ctx: Ctx, bw: float, n_params: int) -> dict[str, Any]:
    dev = ctx.device
    cuda = dev.type == "cuda"
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    out: dict[str, Any] = {"row": name}
    built = build(ctx)
    sync(dev)
    t0 = time.perf_counter()
    built.step()
    sync(dev)
    out["first_step_s"] = time.perf_counter() - t0
    if built.reset:
        built.reset()
    for _ in range((built.warmup or ctx.warmup) - 1):
        built.step()
        if built.reset:
            built.reset()
    sync(dev)
    if cuda:
        base = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    clock = Clock(dev)
    n = built.steps or ctx.steps
    for _ in range(n):
        clock.time(built.step)
        if built.reset:
            built.reset()
    ms = clock.median_ms()
    out.update(ms=ms, mean_ms=clock.mean_ms(), steps=n)
    if cuda:
        out["peak_extra_MB"] = (torch.cuda.max_memory_allocated(dev) - base) / 2**20
        out["allocated_MB"] = base / 2**20
    if built.optim is not None:
        opt = built.optim
        out["engine"] = opt.engines[0]
        if opt.fallback_reasons[0]:
            out["fallback_reason"] = opt.fallback_reasons[0]
        steps_built = list(opt._fused_steps.values())
        if steps_built:
            fs = steps_built[0][1]
            out.update(compiles=fs.compiles, captures=fs.captures, cuda_graph=fs.uses_cuda_graph)
    if built.fused is not None:
        fs = built.fused
        out.update(
            compile_s=fs.compile_seconds[0] if fs.compile_seconds else None,
            compiles=fs.compiles,
            captures=fs.captures,
            cuda_graph=fs.uses_cuda_graph,
            engine=fs.engine,
        )
    sb = 4 if name.startswith("gx-") else torch.finfo(ctx.dtype).bits // 8
    pb = gb = torch.finfo(ctx.dtype).bits // 8
    bpp = bytes_per_param(name, pb, gb, sb)
    floor_ms = bpp * (built.numel or n_params) / bw * 1e3
    out.update(bytes_per_param=bpp, floor_ms=floor_ms, x_floor=ms / floor_ms, frac_bw=floor_ms / ms)
    del built
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return out


def profile_row(build: Callable[[Ctx], Built], ctx: Ctx, steps: int = 5) -> dict[str, Any]:
    """The device kernels of ``steps`` steps (after warm-up), by total time: what a step is made of."""
    from torch.profiler import ProfilerActivity, profile

    built = build(ctx)
    for _ in range(max(ctx.warmup, 3)):
        built.step()
    sync(ctx.device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            built.step()
        sync(ctx.device)
    kernels: dict[str, list[float]] = {}
    for e in prof.events():
        if e.device_type.name == "CUDA":
            kernels.setdefault(e.name[:90], []).append(e.device_time_total / 1e3 if hasattr(e, "device_time_total") else e.cuda_time_total / 1e3)
    rows = sorted(((sum(v) / steps, len(v) / steps, k) for k, v in kernels.items()), reverse=True)
    return {"per_step_ms": sum(r[0] for r in rows), "kernels_per_step": sum(r[1] for r in rows),
            "top": [{"ms": round(ms, 4), "calls": calls, "kernel": k} for ms, calls, k in rows[:25]]}


def run_interleaved(names: list[str], rows: dict[str, Callable[[Ctx], Built]], ctx: Ctx, bw: float,
                    n_params: int) -> list[dict[str, Any]]:
    """The rows' steps taken in turn (one step of each row per round), so that every row sees the
    same machine: on a shared CPU the ratios then hold when its speed drifts."""
    built = {name: rows[name](ctx) for name in names}
    times: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(ctx.warmup):
        for b in built.values():
            b.step()
            if b.reset:
                b.reset()
    for _ in range(ctx.steps):
        for name, b in built.items():
            t0 = time.perf_counter()
            b.step()
            times[name].append(time.perf_counter() - t0)
            if b.reset:
                b.reset()
    out = []
    for name in names:
        ms = statistics.median(times[name]) * 1e3
        bpp = bytes_per_param(name, *(torch.finfo(ctx.dtype).bits // 8,) * 2, 4 if name.startswith("gx-") else
                              torch.finfo(ctx.dtype).bits // 8)
        floor_ms = bpp * (built[name].numel or n_params) / bw * 1e3
        row = {"row": name, "ms": ms, "mean_ms": statistics.fmean(times[name]) * 1e3, "steps": ctx.steps,
               "interleaved": True, "bytes_per_param": bpp,
               "floor_ms": floor_ms, "x_floor": ms / floor_ms, "frac_bw": floor_ms / ms}
        opt = built[name].optim
        if opt is not None:
            row["engine"] = opt.engines[0]
        out.append(row)
    return out


def recompile_check(ctx: Ctx, steps: int, cuda_graph: bool) -> dict[str, Any]:
    """grokadamw with a warm-up-cosine lr schedule and a grokking signal that changes every step,
    half of the steps passing floats, half tensors: how many compiles over ``steps`` steps."""
    params, grads = make_tree(ctx.shapes, ctx.dtype, ctx.device, 1)
    tx = gx.grokadamw(lr=gx.warmup_cosine_decay(1e-3, max(1, steps // 10), max(steps, 2)))
    fs = FusedStep(tx, params, cuda_graph=cuda_graph if ctx.device.type == "cuda" else False)
    t0 = time.perf_counter()
    for t in range(steps):
        tl, vl = 2.0 / (1 + t), 2.0 / (1 + 0.5 * t)
        if t % 2:
            fs(grads, train_loss=torch.tensor(tl, device=ctx.device), val_loss=torch.tensor(vl, device=ctx.device))
        else:
            fs(grads, train_loss=tl, val_loss=vl)
    sync(ctx.device)
    return {
        "steps": steps,
        "cuda_graph": fs.uses_cuda_graph,
        "compiles": fs.compiles,
        "recompiles": fs.compiles - 1,
        "captures": fs.captures,
        "compile_s": fs.compile_seconds,
        "wall_s": time.perf_counter() - t0,
    }


def print_table(results: list[dict[str, Any]]) -> None:
    by = {}
    for r in results:
        by.setdefault((r["set"], r["dtype"]), []).append(r)
    for (s, d), rows in by.items():
        ref = next((r["ms"] for r in rows if r["row"] == "torch-fused" and "ms" in r), None)
        ref = ref or next((r["ms"] for r in rows if r["row"] == "torch-foreach" and "ms" in r), None)
        print(f"\n== {s} {d}: {rows[0]['params'] / 1e6:.2f}M params, {rows[0]['tensors']} tensors ==")
        print(f"{'row':34s} {'ms':>9s} {'mean ms':>9s} {'/torchAdamW':>11s} {'B/param':>7s} {'x floor':>8s} {'%bw':>5s}"
              f" {'compile s':>9s} {'peak+MB':>8s}")
        for r in rows:
            if "ms" not in r:
                print(f"{r['row']:34s} {r.get('error', r.get('skipped', ''))[:90]}")
                continue
            ratio = f"{r['ms'] / ref:.2f}" if ref else "-"
            comp = f"{r['compile_s']:.1f}" if r.get("compile_s") is not None else ""
            peak = f"{r['peak_extra_MB']:.0f}" if r.get("peak_extra_MB") is not None else ""
            print(
                f"{r['row']:34s} {r['ms']:9.3f} {r.get('mean_ms', float('nan')):9.3f} {ratio:>11s}"
                f" {r['bytes_per_param']:7.0f} {r['x_floor']:8.2f}"
                f" {100 * r['frac_bw']:5.0f} {comp:>9s} {peak:>8s}"
            )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sets", default="small,gpt2", help=f"comma list of {list(SETS)}")
    ap.add_argument("--dtypes", default="fp32", help="comma list of fp32,bf16")
    ap.add_argument("--rows", default="*", help="comma list of glob patterns over row names")
    ap.add_argument("--skip", default="", help="comma list of glob patterns of rows to leave out")
    ap.add_argument("--variants", default="", help=f"extra fused variants, comma list of {list(VARIANTS)[1:]}")
    ap.add_argument("--variant-pipelines", default="grokadamw", help="pipelines that get the --variants")
    ap.add_argument("--window", type=int, default=100, help="MA window (official and grokxform)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--slow-steps", type=int, default=3, help="timed steps of grokadamw 0.1.2")
    ap.add_argument("--recompile-steps", type=int, default=1000, help="0: skip the recompile check")
    ap.add_argument("--recompile-set", default=None, help="set of the recompile check (default: first set)")
    ap.add_argument("--bandwidth-mb", type=int, default=2048)
    ap.add_argument("--budget-s", type=float, default=float("inf"), help="skip rows once this much time has passed")
    ap.add_argument("--block", type=int, default=None, help="elements per program of the engine's kernels")
    ap.add_argument("--warps", type=int, default=None, help="warps per program of the engine's kernels")
    ap.add_argument("--int8-tiles", default="", metavar="ELEMENTSxWARPS[xREGS[xITEMS]],...",
                    help="tiles of the engine's passes that write int8 codes (REGS 0: the compiler's choice; ITEMS:"
                         " work items a program takes), e.g. 1024x4,256x1x80x4: the int8 rows run once per tile"
                         " (default: the engine's own)")
    ap.add_argument("--hoist-loads", action="store_true",
                    help="the engine's Triton kernels issue their element loads as early as they may be")
    ap.add_argument("--rounding-in-line", action="store_true",
                    help="the engine's Triton kernels compute square roots and divisions with no branch per element"
                         " (ROUNDING_IN_LINE)")
    ap.add_argument("--no-vector-access", action="store_true",
                    help="the engine's Triton kernels launched ALIGNED=False whatever the addresses (one element per"
                         " load and store)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU runs)")
    ap.add_argument("--cold", action="store_true", help="empty kernel caches (Triton's and grokxform's) first")
    ap.add_argument("--interleave", action="store_true",
                    help="take the rows' steps in turn (for a shared CPU); no first-step or memory figures")
    ap.add_argument("--profile", default="", help="comma list of rows whose device kernels to list (first set)")
    ap.add_argument("--out", default=None, help="JSON path")
    args = ap.parse_args(argv)
    engine_step.BLOCK = args.block or engine_step.BLOCK
    engine_step.NUM_WARPS = args.warps or engine_step.NUM_WARPS
    tiles: list[tuple[int, int, int | None, int] | None] = []
    for text in (t for t in args.int8_tiles.split(",") if t):
        parts = [int(x) for x in text.split("x")]
        if len(parts) not in (2, 3, 4):
            ap.error(f"--int8-tiles: {text!r} is not ELEMENTSxWARPS[xREGS[xITEMS]]")
        parts += [0, 1][len(parts) - 2:]
        tiles.append((parts[0], parts[1], parts[2] or None, parts[3]))
    default_tile = engine_step.INT8_TILE
    default_window_tile = engine_step.INT8_WINDOW_TILE
    engine_step.HOIST_LOADS = args.hoist_loads
    engine_step.ROUNDING_IN_LINE = args.rounding_in_line
    engine_step.VECTOR_ACCESS = not args.no_vector_access
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cold:
        cold = tempfile.mkdtemp(prefix="grokxform-cold-")
        os.environ["TRITON_CACHE_DIR"] = os.path.join(cold, "triton")
        os.environ["GROKXFORM_CACHE_DIR"] = os.path.join(cold, "grokxform")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(cold, "inductor")

    dev = torch.device(args.device)
    start = time.perf_counter()
    variants = [v for v in args.variants.split(",") if v]
    for v in variants:
        if v not in VARIANTS or not v:
            ap.error(f"--variants: unknown variant {v!r}")
    rows = all_rows(variants, [p for p in args.variant_pipelines.split(",") if p])
    pats = [p for p in args.rows.split(",") if p]
    skips = [p for p in args.skip.split(",") if p]
    chosen = [n for n in rows if any(fnmatch.fnmatch(n, p) for p in pats) and not any(fnmatch.fnmatch(n, p) for p in skips)]
    sets = [s for s in args.sets.split(",") if s]
    for s in sets:
        if s not in SETS:
            ap.error(f"--sets: unknown set {s!r}")
    dtypes = [d for d in args.dtypes.split(",") if d]

    info: dict[str, Any] = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:] if argv is None else argv,
        "kernel_block": engine_step.BLOCK,
        "kernel_warps": engine_step.NUM_WARPS,
        "int8_tile": default_tile,
        "int8_window_tile": default_window_tile,
        "hoist_loads": args.hoist_loads,
        "rounding_in_line": args.rounding_in_line,
        "vector_access": not args.no_vector_access,
        "threads": torch.get_num_threads(),
        "cold_caches": args.cold,
    }
    bw = copy_bandwidth(dev, (args.bandwidth_mb if dev.type == "cuda" else 64) * 2**20)
    info["copy_bandwidth_GBps"] = bw / 1e9
    print(f"device {info['device']}, torch {info['torch']}, copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    results: list[dict[str, Any]] = []
    doc = {**info, "rows": results}

    def save() -> None:
        if args.out:
            with open(args.out, "w") as f:
                json.dump(doc, f, indent=1)

    if args.recompile_steps > 0:
        rs = args.recompile_set or sets[0]
        ctx = Ctx(SETS[rs](), torch.float32, dev, args.window, args.steps, args.warmup, args.slow_steps)
        doc["recompile"] = []
        for graph in ([False, True] if dev.type == "cuda" else [False]):
            try:
                rc = {"set": rs, **recompile_check(ctx, args.recompile_steps, graph)}
            except Exception as e:  # noqa: BLE001
                rc = {"set": rs, "cuda_graph": graph, "error": f"{type(e).__name__}: {e}"[:2000]}
                traceback.print_exc()
            doc["recompile"].append(rc)
            print("recompile check:", rc, flush=True)
        save()
    for s in sets:
        shapes = SETS[s]()
        n_params = sum(math.prod(sh) for _, sh in shapes)
        for d in dtypes:
            ctx = Ctx(shapes, DTYPES[d], dev, args.window, args.steps, max(args.warmup, 2), args.slow_steps)
            if args.interleave:
                base = {"set": s, "dtype": d, "params": n_params, "tensors": len(shapes)}
                for r in run_interleaved(chosen, rows, ctx, bw, n_params):
                    results.append({**base, **r})
                    print(f"{s} {d} {r['row']}: {r['ms']:.3f} ms (interleaved)", flush=True)
                save()
                continue
            for name, tile in ((n, t) for n in chosen for t in (tiles if tiles and "int8" in n else [None])):
                # a row of the sweep runs every int8 pass on its tile; the others, on the defaults
                engine_step.INT8_TILE = tile if tile is not None else default_tile
                engine_step.INT8_WINDOW_TILE = tile if tile is not None else default_window_tile
                base = {"set": s, "dtype": d, "params": n_params, "tensors": len(shapes)}
                if tiles and "int8" in name:
                    base["int8_tile"] = tile
                label = name if not (tiles and "int8" in name) else f"{name}@{'x'.join(str(x or 0) for x in tile)}"
                if time.perf_counter() - start > args.budget_s:
                    results.append({**base, "row": label, "skipped": "time budget"})
                    continue
                try:
                    r = run_row(name, rows[name], ctx, bw, n_params)
                    r["row"] = label
                except Exception as e:  # noqa: BLE001 - a row's failure is a result, the others go on
                    r = {"row": label, "error": f"{type(e).__name__}: {e}"[:2000]}
                    traceback.print_exc()
                    gc.collect()
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
                results.append({**base, **r})
                msg = f"{r['ms']:.3f} ms" if "ms" in r else r.get("error", "")[:200]
                print(f"[{time.perf_counter() - start:6.0f}s] {s} {d} {label}: {msg}", flush=True)
                save()
    if args.profile and dev.type == "cuda":
        shapes = SETS[sets[0]]()
        ctx = Ctx(shapes, DTYPES[dtypes[0]], dev, args.window, args.steps, max(args.warmup, 2), args.slow_steps)
        doc["profiles"] = {}
        for name in [r for r in args.profile.split(",") if r]:
            prof = doc["profiles"][name] = profile_row(rows[name], ctx)
            print(f"\nprofile {sets[0]} {name}: {prof['per_step_ms']:.3f} ms of kernels,"
                  f" {prof['kernels_per_step']:.0f} kernels per step")
            for k in prof["top"][:12]:
                print(f"  {k['ms']:8.4f} ms  x{k['calls']:<5.0f} {k['kernel']}")
        save()
    doc["wall_s"] = time.perf_counter() - start
    save()
    print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
