"""grokxform's pipelines against the reference implementations (CPU; float64 unless stated).

1. ``adamw``            == ``torch.optim.AdamW`` (1e-12 over 100 steps; schedules == ``LambdaLR``;
                           ``None`` gradients skip a leaf, as torch.optim skips a param).
2. ``grokfast_ema/ma``  == ``pytorch_optimizer.gradfilter_ema/ma`` (4.1.0) + ``torch.optim.AdamW``
                           (or ``torch.optim.Adam(weight_decay=wd)`` for the paper's coupled L2), and
                           == a plain-Python re-derivation of the formulas (lists and loops).
3. ``grokadamw_compat`` == the installed ``grokadamw==0.1.2`` ``GrokAdamW``.
4. ``grokadamw``        == the same ``named_chain`` rebuilt by hand from the public primitives,
                           bit for bit in float32, and == a float64 re-derivation of its documented maths.

Every comparison is a function returning a :class:`Result`; :data:`CASES` names them all, the
tests below assert each against its tolerance, and ``benchmarks/reference_diffs.py`` imports this
module to print the largest differences.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import pytest
import torch
import torch.utils._pytree as pytree
from torch import nn

import grokxform as gx

F64 = torch.float64
F32 = torch.float32


class Result(NamedTuple):
    """``steps`` compared; ``max_abs_diff``: the largest |grokxform − reference| over all params
    (and, where stated, state) after every step; ``exact``: every compared tensor ``torch.equal``."""

    steps: int
    max_abs_diff: float
    exact: bool


# --------------------------------------------------------------------------------------------
# Shared helpers: seeded parameter trees and gradient streams, differences.
# --------------------------------------------------------------------------------------------

# A 0-d tensor, two empty tensors, vectors and matrices.
SHAPES: dict[str, tuple[int, ...]] = {
    "scalar": (),
    "empty": (0,),
    "empty_2d": (3, 0),
    "vector": (7,),
    "matrix": (4, 5),
    "matrix_b": (3, 2),
}


def _generator(seed: int, step: int) -> torch.Generator:
    """A fresh generator per (seed, step): both sides of a comparison see the same numbers."""
    return torch.Generator().manual_seed(seed * 100_003 + step)


def init_params(shapes: dict[str, tuple[int, ...]], seed: int, dtype: torch.dtype = F64) -> dict[str, torch.Tensor]:
    gen = _generator(seed, -1)
    return {n: torch.randn(s, generator=gen, dtype=dtype) for n, s in shapes.items()}


MissingFn = Callable[[int, str], bool]
ScaleFn = Callable[[int, int], float]


def no_missing(step: int, name: str) -> bool:
    return False


def some_missing(step: int, name: str) -> bool:
    """``True`` where a leaf gets no gradient: ``matrix_b`` misses the first two steps (its state
    starts late), ``vector`` every third step, ``scalar`` and ``empty`` now and then."""
    return (
        (name == "matrix_b" and step < 2)
        or (name == "vector" and step % 3 == 1)
        or (name == "scalar" and step % 5 == 4)
        or (name == "empty" and step % 4 == 2)
    )


def grad_stream(
    shapes: dict[str, tuple[int, ...]],
    seed: int,
    steps: int,
    *,
    dtype: torch.dtype = F64,
    missing: MissingFn = no_missing,
    scale: ScaleFn | None = None,
) -> list[dict[str, torch.Tensor | None]]:
    """Random gradients, one seeded generator per step; ``None`` where ``missing(step, name)``;
    leaf i of step t multiplied by ``scale(t, i)``."""
    out = []
    for t in range(steps):
        gen = _generator(seed, t)
        grads: dict[str, torch.Tensor | None] = {}
        for i, (n, s) in enumerate(shapes.items()):
            g = torch.randn(s, generator=gen, dtype=dtype)
            if scale is not None:
                g = g * scale(t, i)
            grads[n] = None if missing(t, n) else g
        out.append(grads)
    return out


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest |a − b| over the leaves of two flat dicts with the same names and shapes."""
    assert list(a) == list(b), (list(a), list(b))
    worst = 0.0
    for n in a:
        x, y = a[n].detach(), b[n].detach()
        assert x.shape == y.shape, (n, x.shape, y.shape)
        if x.numel():
            worst = max(worst, (x.to(F64) - y.to(F64)).abs().max().item())
        if torch.isnan(x).any() or torch.isnan(y).any():
            return math.nan
    return worst


def all_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[n].detach(), b[n].detach()) for n in a)


def clone_grads(grads: dict[str, torch.Tensor | None]) -> dict[str, torch.Tensor | None]:
    return {n: None if g is None else g.clone() for n, g in grads.items()}


class Holder(nn.Module):
    """An ``nn.Module`` whose parameters are given tensors (for the official filters)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        super().__init__()
        for n, t in tensors.items():
            self.register_parameter(n, nn.Parameter(t.clone()))


def set_grads(params: dict[str, torch.Tensor], grads: dict[str, torch.Tensor | None]) -> None:
    for n, p in params.items():
        g = grads[n]
        p.grad = None if g is None else g.clone()


def warmup_factor(warmup_steps: int) -> Callable[[int], float]:
    """``LambdaLR``'s factor for :func:`grokxform.linear_warmup`: min(1, s/warmup_steps)."""
    return lambda s: min(1.0, s / warmup_steps)


def cosine_factor(peak: float, warmup_steps: int, decay_steps: int, end: float) -> Callable[[int], float]:
    """``LambdaLR``'s factor for :func:`grokxform.warmup_cosine_decay`, written from its docstring."""

    def factor(s: int) -> float:
        if s < warmup_steps:
            return s / warmup_steps
        p = min(1.0, max(0.0, (s - warmup_steps) / (decay_steps - warmup_steps)))
        return (end + (peak - end) * 0.5 * (1.0 + math.cos(math.pi * p))) / peak

    return factor


def run_grokxform(
    tx: gx.GradientTransformation,
    params: Any,
    grads: Sequence[Any],
    extras: Sequence[dict[str, Any]] | None = None,
) -> tuple[list[Any], list[Any]]:
    """The params (and states) after each step of ``tx`` driven by ``grads``."""
    state = tx.init(params)
    out_params, out_states = [], []
    for t, g in enumerate(grads):
        extra = extras[t] if extras is not None else {}
        updates, state = tx.update(g, state, params, **extra)
        params = gx.apply_updates(params, updates)
        out_params.append(params)
        out_states.append(state)
    return out_params, out_states


# --------------------------------------------------------------------------------------------
# 1. adamw == torch.optim.AdamW
# --------------------------------------------------------------------------------------------

ADAMW_SETTINGS: dict[str, dict[str, Any]] = {
    "defaults": dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2),
    "lr1e-2_b0.8-0.99_eps1e-6_wd0.1": dict(lr=1e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1),
    "lr3e-3_b0-0.9_eps1e-12_wd0": dict(lr=3e-3, betas=(0.0, 0.9), eps=1e-12, weight_decay=0.0),
    "lr0.1_b0.95-0.9999_eps1e-4_wd1": dict(lr=0.1, betas=(0.95, 0.9999), eps=1e-4, weight_decay=1.0),
}


def compare_adamw(
    setting: str = "defaults",
    *,
    steps: int = 100,
    missing: MissingFn = no_missing,
    schedule: str | None = None,
    foreach: bool | None = None,
    seed: int = 0,
) -> Result:
    """grokxform.adamw against torch.optim.AdamW (+ LambdaLR when ``schedule`` is given)."""
    hp = ADAMW_SETTINGS[setting]
    lr = hp["lr"]
    if schedule is None:
        gx_lr: Any = lr
        factor = None
    elif schedule == "linear_warmup":
        gx_lr, factor = gx.linear_warmup(lr, 10), warmup_factor(10)
    elif schedule == "warmup_cosine_decay":
        gx_lr, factor = gx.warmup_cosine_decay(lr, 5, 60, lr / 10), cosine_factor(lr, 5, 60, lr / 10)
    else:
        raise ValueError(f"unknown schedule {schedule!r}")
    params = init_params(SHAPES, seed)
    grads = grad_stream(SHAPES, seed, steps, missing=missing)

    tparams = {n: nn.Parameter(p.clone()) for n, p in params.items()}
    opt = torch.optim.AdamW(list(tparams.values()), foreach=foreach, **hp)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, factor) if factor is not None else None
    tx = gx.adamw(gx_lr, hp["betas"], hp["eps"], hp["weight_decay"])
    ours, _ = run_grokxform(tx, params, grads)

    worst, exact = 0.0, True
    for t in range(steps):
        set_grads(tparams, grads[t])
        opt.step()
        if sched is not None:
            sched.step()
        worst = max(worst, max_abs_diff(ours[t], tparams))
        exact = exact and all_equal(ours[t], tparams)
    return Result(steps, worst, exact)


# --------------------------------------------------------------------------------------------
# 2. grokfast_ema / grokfast_ma == official filters + torch.optim; == plain-Python formulas
# --------------------------------------------------------------------------------------------


class GrokfastConfig(NamedTuple):
    kind: str  # "ema" or "ma"
    alpha: float = 0.98
    lamb: float = 2.0
    window: int = 100
    filter_type: str = "mean"
    warmup: bool = True
    mode: str = "decoupled"  # or "coupled": torch.optim.Adam(weight_decay=wd), the paper's setting
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-2
    warmup_steps: int | None = None  # linear_warmup(lr, warmup_steps) == LambdaLR(min(1, s/w))


PAPER_EMA = GrokfastConfig("ema", 0.98, 2.0, mode="coupled", betas=(0.9, 0.98), weight_decay=0.005, warmup_steps=10)
PAPER_MA = GrokfastConfig(
    "ma", lamb=5.0, window=7, mode="coupled", betas=(0.9, 0.98), weight_decay=0.01, warmup_steps=10
)


def grokfast_tx(cfg: GrokfastConfig) -> gx.GradientTransformation:
    lr: Any = cfg.lr if cfg.warmup_steps is None else gx.linear_warmup(cfg.lr, cfg.warmup_steps)
    common = dict(betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, weight_decay_mode=cfg.mode)
    if cfg.kind == "ema":
        return gx.grokfast_ema(lr, cfg.alpha, cfg.lamb, **common)
    return gx.grokfast_ma(lr, cfg.window, cfg.lamb, cfg.filter_type, cfg.warmup, **common)


def official_grokfast(
    cfg: GrokfastConfig, params: dict[str, torch.Tensor], grads: Sequence[dict[str, torch.Tensor | None]]
) -> list[dict[str, torch.Tensor]]:
    """pytorch_optimizer's gradfilter_ema/ma (mutating p.grad of an nn.Module), then torch.optim."""
    from pytorch_optimizer.optimizer.grokfast import gradfilter_ema, gradfilter_ma

    model = Holder(params)
    named = dict(model.named_parameters())
    if cfg.mode == "coupled":
        opt: torch.optim.Optimizer = torch.optim.Adam(
            model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    sched = None
    if cfg.warmup_steps is not None:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, warmup_factor(cfg.warmup_steps))
    filt_state: Any = None
    out = []
    for g in grads:
        set_grads(named, g)
        if cfg.kind == "ema":
            filt_state = gradfilter_ema(model, grads=filt_state, alpha=cfg.alpha, lamb=cfg.lamb)
        else:
            filt_state = gradfilter_ma(
                model,
                grads=filt_state,
                window_size=cfg.window,
                lamb=cfg.lamb,
                filter_type=cfg.filter_type,  # type: ignore[arg-type]
                warmup=cfg.warmup,
            )
        opt.step()
        if sched is not None:
            sched.step()
        out.append({n: p.detach().clone() for n, p in named.items()})
    return out


def python_grokfast(
    cfg: GrokfastConfig, params: dict[str, torch.Tensor], grads: Sequence[dict[str, torch.Tensor | None]]
) -> list[dict[str, list[float]]]:
    """The formulas of REFERENCE.md on Python floats, element by element (no torch maths).

    EMA: μ ← g on a leaf's first gradient, else μ ← α·μ + (1−α)·g;  ĝ = g + λ·μ.
    MA: queue of the last w raw gradients (g_t included); if not warmup or len = w:
    ĝ = g + λ·mean(queue) (or sum), else ĝ = g.
    Then (coupled: ĝ ← ĝ + wd·θ) per-leaf step t, m ← β1·m + (1−β1)·ĝ, v ← β2·v + (1−β2)·ĝ²,
    (decoupled: θ ← θ·(1 − η·wd)), θ ← θ − (η/(1−β1^t))·m/(√v/√(1−β2^t) + ε); leaves without a
    gradient are skipped entirely.
    """
    b1, b2 = cfg.betas
    theta = {n: p.flatten().tolist() for n, p in params.items()}
    mu: dict[str, list[float]] = {}
    queue: dict[str, list[list[float]]] = {}
    m: dict[str, list[float]] = {}
    v: dict[str, list[float]] = {}
    count: dict[str, int] = {}
    out = []
    for step, g_all in enumerate(grads):
        lr = cfg.lr if cfg.warmup_steps is None else cfg.lr * min(1.0, step / cfg.warmup_steps)
        for n, g_t in g_all.items():
            if g_t is None:
                continue
            g = g_t.flatten().tolist()
            if cfg.kind == "ema":
                if n not in mu:
                    mu[n] = list(g)
                else:
                    mu[n] = [a * cfg.alpha + x * (1.0 - cfg.alpha) for a, x in zip(mu[n], g)]
                gh = [x + cfg.lamb * a for x, a in zip(g, mu[n])]
            else:
                q = queue.setdefault(n, [])
                q.append(list(g))
                if len(q) > cfg.window:
                    q.pop(0)
                if not cfg.warmup or len(q) == cfg.window:
                    sums = [sum(col) for col in zip(*q)] if g else []
                    avg = [s / len(q) for s in sums] if cfg.filter_type == "mean" else sums
                    gh = [x + cfg.lamb * a for x, a in zip(g, avg)]
                else:
                    gh = list(g)
            th = theta[n]
            if cfg.mode == "coupled":
                gh = [x + cfg.weight_decay * p for x, p in zip(gh, th)]
            count[n] = t = count.get(n, 0) + 1
            m[n] = [b1 * a + (1.0 - b1) * x for a, x in zip(m.get(n, [0.0] * len(g)), gh)]
            v[n] = [b2 * a + (1.0 - b2) * x * x for a, x in zip(v.get(n, [0.0] * len(g)), gh)]
            bc1, bc2 = 1.0 - b1**t, 1.0 - b2**t
            if cfg.mode == "decoupled":
                th = [p * (1.0 - lr * cfg.weight_decay) for p in th]
            theta[n] = [
                p - (lr / bc1) * a / (math.sqrt(s) / math.sqrt(bc2) + cfg.eps) for p, a, s in zip(th, m[n], v[n])
            ]
        out.append({n: list(th) for n, th in theta.items()})
    return out


def compare_grokfast(
    cfg: GrokfastConfig, reference: str = "official", *, steps: int = 30, missing: MissingFn = some_missing, seed: int = 1
) -> Result:
    """grokfast_ema/ma against the official filters + torch.optim (``reference="official"``) or the
    plain-Python formulas (``reference="python"``)."""
    params = init_params(SHAPES, seed)
    grads = grad_stream(SHAPES, seed, steps, missing=missing)
    ours, _ = run_grokxform(grokfast_tx(cfg), params, grads)
    worst, exact = 0.0, True
    if reference == "official":
        ref = official_grokfast(cfg, params, grads)
        for a, b in zip(ours, ref):
            worst = max(worst, max_abs_diff(a, b))
            exact = exact and all_equal(a, b)
    elif reference == "python":
        ref_lists = python_grokfast(cfg, params, grads)
        for a, b in zip(ours, ref_lists):
            as_tensors = {n: torch.tensor(b[n], dtype=F64).reshape(a[n].shape) for n in b}
            worst = max(worst, max_abs_diff(a, as_tensors))
            exact = exact and all_equal(a, as_tensors)
    else:
        raise ValueError(f"unknown reference {reference!r}")
    return Result(steps, worst, exact)


# --------------------------------------------------------------------------------------------
# 3. grokadamw_compat == grokadamw 0.1.2
# --------------------------------------------------------------------------------------------


def mlp(seed: int, dtype: torch.dtype = F64) -> nn.Module:
    """10 tensors: Linear, LayerNorm, Linear, Linear, Linear (so β1 by tensor index matters)."""
    model = nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 4), nn.Linear(4, 2))
    gen = _generator(seed, -1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.to(dtype)


# Target gradient norms per tensor, times a factor in [0.5, 1.5] that changes each step: with the
# clip threshold 1, some tensors are clipped on some steps only, some always, some never.
_NORM_TARGETS = (0.2, 3.0, 0.6, 1.2, 0.9, 5.0, 0.05, 1.05, 2.0, 0.4)


def clip_scale(shapes: dict[str, tuple[int, ...]]) -> ScaleFn:
    sizes = [max(1, math.prod(s)) for s in shapes.values()]

    def scale(step: int, i: int) -> float:
        return _NORM_TARGETS[i % len(_NORM_TARGETS)] * (0.5 + ((step * 7 + i * 3) % 11) / 10) / math.sqrt(sizes[i])

    return scale


class CompatConfig(NamedTuple):
    kwargs: dict[str, Any]
    signal: str | None = None  # None, or "zero_arg": signal functions with no argument
    missing: bool = False  # some tensors without a gradient on some steps (shifts the tensor index)


def _signal_fns(step_box: list[int]) -> list[Callable[[], float | None]]:
    """Zero-argument signal functions (0.1.2's form) reading the current step from ``step_box``;
    one returns ``None`` on some steps (ignored by both sides)."""
    values = [0.0, 0.3, None, 1.2, 0.7, 2.5]
    return [lambda: values[step_box[0] % len(values)], lambda: 0.05 * step_box[0]]


def _compat_missing(step: int, name: str) -> bool:
    return (name == "2.weight" and step % 4 == 1) or (name == "0.bias" and step < 3) or (name == "5.bias" and step % 5 == 2)


def compare_grokadamw_012(cfg: CompatConfig, *, steps: int = 50, seed: int = 2) -> Result:
    """grokadamw_compat against the installed grokadamw 0.1.2 GrokAdamW (one param group)."""
    from grokadamw import GrokAdamW

    model = mlp(seed)
    named = dict(model.named_parameters())
    shapes = {n: tuple(p.shape) for n, p in named.items()}
    params = {n: p.detach().clone() for n, p in named.items()}
    missing = _compat_missing if cfg.missing else no_missing
    grads = grad_stream(shapes, seed, steps, missing=missing, scale=clip_scale(shapes))

    step_ref, step_ours = [0], [0]
    kw_ref, kw_ours = dict(cfg.kwargs), dict(cfg.kwargs)
    if cfg.signal == "zero_arg":
        kw_ref["grokking_signal_fns"] = _signal_fns(step_ref)
        kw_ours["grokking_signal_fns"] = _signal_fns(step_ours)
    opt = GrokAdamW(model.parameters(), **kw_ref)
    tx = gx.grokadamw_compat(**kw_ours)
    state = tx.init(params)

    worst, exact = 0.0, True
    for t in range(steps):
        step_ref[0] = step_ours[0] = t
        set_grads(named, grads[t])
        opt.step()
        updates, state = tx.update(clone_grads(grads[t]), state, params)
        params = gx.apply_updates(params, updates)
        worst = max(worst, max_abs_diff(params, named))
        exact = exact and all_equal(params, named)
    return Result(steps, worst, exact)


# --------------------------------------------------------------------------------------------
# 4. grokadamw == its chain rebuilt by hand (bit for bit); == a float64 re-derivation
# --------------------------------------------------------------------------------------------

# A nested tree: block depth comes from the path ("blocks.2.w" -> 2; 0 outside numbered blocks).
NESTED_SHAPES: dict[str, tuple[int, ...]] = {
    "embed": (6, 4),
    "blocks.0.w": (4, 4),
    "blocks.0.b": (4,),
    "blocks.1.w": (4, 4),
    "blocks.1.b": (4,),
    "blocks.2.w": (4, 4),
    "blocks.2.b": (4,),
    "head.w": (4, 3),
}
EXPECTED_DEPTH = {"embed": 0, "blocks.0.w": 0, "blocks.0.b": 0, "blocks.1.w": 1, "blocks.1.b": 1,
                  "blocks.2.w": 2, "blocks.2.b": 2, "head.w": 0}  # fmt: skip


def nest(flat: dict[str, Any]) -> dict[str, Any]:
    """``{"blocks.0.w": x}`` -> ``{"blocks": [{"w": x}]}`` (integer parts become list positions)."""
    root: dict[str, Any] = {}
    for name, value in flat.items():
        parts = name.split(".")
        node: Any = root
        for part, nxt in zip(parts[:-1], parts[1:]):
            key: Any = int(part) if re.fullmatch(r"\d+", part) else part
            child: Any = [] if re.fullmatch(r"\d+", nxt) else {}
            if isinstance(node, list):
                if key == len(node):
                    node.append(child)
                node = node[key]
            else:
                node = node.setdefault(key, child)
        last: Any = parts[-1]
        if isinstance(node, list):
            node.append(value)
        else:
            node[last] = value
    return root


def flat_names(tree: Any, prefix: str = "") -> dict[str, Any]:
    """The inverse of :func:`nest`: dotted name -> leaf, in insertion order."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flat_names(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, (list, tuple)) and not isinstance(tree, torch.Tensor):
        out = {}
        for i, v in enumerate(tree):
            out.update(flat_names(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: tree}


def loss_extras(steps: int, dtype: torch.dtype) -> list[dict[str, torch.Tensor]]:
    """Train and val losses that cross (the loss gap signal is 0 on some steps, > 0 on others)."""
    return [
        {
            "train_loss": torch.tensor(1.0 + 0.5 * math.sin(0.7 * t), dtype=dtype),
            "val_loss": torch.tensor(1.2 + 0.4 * math.cos(0.3 * t), dtype=dtype),
        }
        for t in range(steps)
    ]


def loss_signal_fn(train_loss: torch.Tensor, val_loss: torch.Tensor) -> torch.Tensor:
    """A signal of the two losses (GrokAdamW's README form): |val − train| / (val + train)."""
    return (val_loss - train_loss).abs() / (val_loss + train_loss)


class GrokConfig(NamedTuple):
    kwargs: dict[str, Any]
    signal_fn: bool = False  # grokking_signal_fns=[loss_signal_fn]
    schedule: bool = False  # lr = linear_warmup(lr, 5)


def hand_built_grokadamw(
    lr: Any = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    alpha_init: float = 0.98,
    lamb: float = 2.0,
    gamma: float = 0.1,
    grokking_signal_fns: Any = None,
    grokking_signal_decay_rate: float = 0.1,
    gradient_clipping: float = 1.0,
    layer: str = "depth",
) -> gx.GradientTransformation:
    """grokadamw as a user writes it from the public primitives."""
    steps: list[tuple[str, gx.GradientTransformation]] = []
    if gradient_clipping > 0:
        steps.append(("clip", gx.clip_by_global_norm(gradient_clipping)))
    ema = gx.ema_filter(
        alpha_init, init="zeros", signal_fns=grokking_signal_fns, signal_decay_rate=grokking_signal_decay_rate
    )
    steps.append(("grokfast", gx.amplify(ema, lamb)))
    b1 = gx.layerwise_beta(betas[0], gamma, layer) if gamma != 0 else betas[0]
    steps.append(("adam", gx.scale_by_adam(b1, betas[1], eps)))
    steps.append(("weight_decay", gx.decoupled_weight_decay(weight_decay)))
    steps.append(("lr", gx.scale_by_learning_rate(lr)))
    return gx.named_chain(*steps)


def _grok_kwargs(cfg: GrokConfig) -> dict[str, Any]:
    kw = dict(cfg.kwargs)
    if cfg.signal_fn:
        kw["grokking_signal_fns"] = [loss_signal_fn]
    if cfg.schedule:
        kw["lr"] = gx.linear_warmup(kw.get("lr", 1e-3), 5)
    return kw


def _state_tensors(state: Any) -> dict[str, torch.Tensor]:
    leaves = pytree.tree_leaves(state)
    return {str(i): x for i, x in enumerate(x for x in leaves if isinstance(x, torch.Tensor))}


def compare_grokadamw_by_hand(cfg: GrokConfig, *, steps: int = 20, seed: int = 3) -> Result:
    """grokadamw against hand_built_grokadamw in float32: params and every state tensor, each step."""
    flat = init_params(NESTED_SHAPES, seed, F32)
    grads = grad_stream(NESTED_SHAPES, seed, steps, dtype=F32, scale=lambda t, i: 0.1 + 0.15 * ((t + i) % 5))
    extras = loss_extras(steps, F32)
    kw = _grok_kwargs(cfg)
    ours, our_states = run_grokxform(gx.grokadamw(**kw), nest(flat), [nest(g) for g in grads], extras)
    hand, hand_states = run_grokxform(hand_built_grokadamw(**kw), nest(flat), [nest(g) for g in grads], extras)
    worst, exact = 0.0, True
    for a, b, sa, sb in zip(ours, hand, our_states, hand_states):
        pa, pb = flat_names(a), flat_names(b)
        ta, tb = _state_tensors(sa), _state_tensors(sb)
        worst = max(worst, max_abs_diff(pa, pb), max_abs_diff(ta, tb))
        exact = exact and all_equal(pa, pb) and all_equal(ta, tb)
    return Result(steps, worst, exact)


def rederived_grokadamw(
    cfg: GrokConfig, params: dict[str, torch.Tensor], grads: Sequence[dict[str, torch.Tensor]], extras: Sequence[dict]
) -> tuple[list[dict[str, torch.Tensor]], list[float]]:
    """The documented maths of grokadamw, written out in float64 (params after each step, α_t):

    global clip g ← g·min(1, c/(‖g‖+1e−6)) with ‖g‖ over all leaves;
    GS_t = max(0, val−train)/max(val, train) (or the mean of the signal functions);
    α_t = α_init·exp(−κ·GS_t);  μ ← α_t·μ + (1−α_t)·g (μ_0 = 0);  ĝ = g + λ·μ;
    β1_l = β1·(1−γ)^l with l the block depth; m, v as Adam;
    u = (m/(1−β1_l^t)) / (√v/√(1−β2^t) + ε);  θ ← θ − η_t·(u + wd·θ).
    """
    kw = dict(lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, alpha_init=0.98, lamb=2.0, gamma=0.1,
              grokking_signal_decay_rate=0.1, gradient_clipping=1.0)  # fmt: skip
    kw.update(cfg.kwargs)
    b1, b2 = kw["betas"]
    theta = {n: p.clone() for n, p in params.items()}
    mu = {n: torch.zeros_like(p) for n, p in params.items()}
    m = {n: torch.zeros_like(p) for n, p in params.items()}
    v = {n: torch.zeros_like(p) for n, p in params.items()}
    out, alphas = [], []
    for t, (g_all, ex) in enumerate(zip(grads, extras), start=1):
        lr = kw["lr"] * min(1.0, (t - 1) / 5) if cfg.schedule else kw["lr"]
        g = dict(g_all)
        if kw["gradient_clipping"] > 0:
            norm = math.sqrt(sum(float((x * x).sum()) for x in g.values()))
            scale = min(1.0, kw["gradient_clipping"] / (norm + 1e-6))
            g = {n: x * scale for n, x in g.items()}
        tr, va = float(ex["train_loss"]), float(ex["val_loss"])
        if cfg.signal_fn:
            gs = abs(va - tr) / (va + tr)
        else:
            gs = max(0.0, va - tr) / max(va, tr)
        alpha = kw["alpha_init"] * math.exp(-kw["grokking_signal_decay_rate"] * gs)
        alphas.append(alpha)
        for n, x in g.items():
            mu[n] = alpha * mu[n] + (1.0 - alpha) * x
            gh = x + kw["lamb"] * mu[n]
            beta1 = b1 * (1.0 - kw["gamma"]) ** EXPECTED_DEPTH[n]
            m[n] = beta1 * m[n] + (1.0 - beta1) * gh
            v[n] = b2 * v[n] + (1.0 - b2) * gh * gh
            u = (m[n] / (1.0 - beta1**t)) / (v[n].sqrt() / math.sqrt(1.0 - b2**t) + kw["eps"])
            theta[n] = theta[n] - lr * (u + kw["weight_decay"] * theta[n])
        out.append({n: x.clone() for n, x in theta.items()})
    return out, alphas


def rederived_scale(step: int, i: int) -> float:
    """Global gradient norms of about 0.4, 0.9, 1.4 and 1.9 in turn (clip threshold 1 and 0.3)."""
    return (0.04 + 0.05 * (step % 4)) * (1.0 + 0.1 * i)


def compare_grokadamw_rederived(cfg: GrokConfig, *, steps: int = 40, seed: int = 4) -> Result:
    """grokadamw (float64) against :func:`rederived_grokadamw`; α_t in the state is compared too.
    Gradients are scaled so that the global clip is active on some steps only."""
    flat = init_params(NESTED_SHAPES, seed)
    grads = grad_stream(NESTED_SHAPES, seed, steps, scale=rederived_scale)
    extras = loss_extras(steps, F64)
    ours, states = run_grokxform(gx.grokadamw(**_grok_kwargs(cfg)), nest(flat), [nest(g) for g in grads], extras)
    ref, alphas = rederived_grokadamw(cfg, flat, grads, extras)
    worst, exact = 0.0, True
    for a, b, s, alpha in zip(ours, ref, states, alphas):
        pa = flat_names(a)
        worst = max(worst, max_abs_diff(pa, b), abs(float(s["grokfast"].alpha) - alpha))
        exact = exact and all_equal(pa, b)
    return Result(steps, worst, exact)


# --------------------------------------------------------------------------------------------
# The cases: name -> (comparison, tolerance). Tolerance 0.0 means bit for bit (torch.equal).
# --------------------------------------------------------------------------------------------


class Case(NamedTuple):
    run: Callable[[], Result]
    tol: float


def _cases() -> dict[str, Case]:
    c: dict[str, Case] = {}
    for name in ADAMW_SETTINGS:
        c[f"adamw/{name}"] = Case(lambda name=name: compare_adamw(name), 1e-12)
    c["adamw/defaults/foreach"] = Case(lambda: compare_adamw("defaults", foreach=True), 1e-12)
    c["adamw/lr1e-2.../none_grads"] = Case(
        lambda: compare_adamw("lr1e-2_b0.8-0.99_eps1e-6_wd0.1", missing=some_missing), 1e-12
    )
    c["adamw/defaults/linear_warmup"] = Case(lambda: compare_adamw("defaults", schedule="linear_warmup"), 1e-12)
    c["adamw/lr0.1.../warmup_cosine_decay+none_grads"] = Case(
        lambda: compare_adamw("lr0.1_b0.95-0.9999_eps1e-4_wd1", schedule="warmup_cosine_decay", missing=some_missing),
        1e-12,
    )

    ema = {
        "a0.98_l2": GrokfastConfig("ema", 0.98, 2.0),
        "a0.99_l5": GrokfastConfig("ema", 0.99, 5.0),
        "a0.8_l0.1_wd2": GrokfastConfig("ema", 0.8, 0.1, weight_decay=2.0),
        "a0.5_l0": GrokfastConfig("ema", 0.5, 0.0),
    }
    for name, cfg in ema.items():
        c[f"grokfast_ema/{name}/official"] = Case(lambda cfg=cfg: compare_grokfast(cfg), 1e-12)
    c["grokfast_ema/paper_coupled/official"] = Case(lambda: compare_grokfast(PAPER_EMA), 1e-12)
    for w in (1, 3, 7):
        for ft in ("mean", "sum"):
            for warm in (True, False):
                cfg = GrokfastConfig("ma", lamb=5.0 if ft == "mean" else 0.5, window=w, filter_type=ft, warmup=warm)
                c[f"grokfast_ma/w{w}_{ft}_warmup{warm}/official"] = Case(lambda cfg=cfg: compare_grokfast(cfg), 1e-12)
    c["grokfast_ma/paper_coupled_w7/official"] = Case(lambda: compare_grokfast(PAPER_MA), 1e-12)

    py = {
        "grokfast_ema/a0.98_l2": ema["a0.98_l2"],
        "grokfast_ema/paper_coupled": PAPER_EMA,
        "grokfast_ma/w3_mean_warmupTrue": GrokfastConfig("ma", lamb=5.0, window=3),
        "grokfast_ma/w7_sum_warmupFalse": GrokfastConfig("ma", lamb=0.5, window=7, filter_type="sum", warmup=False),
        "grokfast_ma/paper_coupled_w7": PAPER_MA,
    }
    for name, cfg in py.items():
        c[f"{name}/python"] = Case(lambda cfg=cfg: compare_grokfast(cfg, "python"), 1e-12)

    compat = {
        "defaults": CompatConfig({}),
        "no_clip": CompatConfig({"gradient_clipping": 0.0}),
        "signal_fns": CompatConfig({}, signal="zero_arg"),
        "clip0.5_signal_fns_lr1e-2": CompatConfig(
            {"gradient_clipping": 0.5, "lr": 1e-2, "gamma": 0.2, "lamb": 5.0}, signal="zero_arg"
        ),
        "none_grads": CompatConfig({}, missing=True),
    }
    for name, cfg in compat.items():
        c[f"grokadamw_compat/{name}/grokadamw-0.1.2"] = Case(lambda cfg=cfg: compare_grokadamw_012(cfg), 1e-12)

    by_hand = {
        "defaults+losses": GrokConfig({}),
        "signal_fn(train,val)": GrokConfig({}, signal_fn=True),
        "no_clip_index_schedule": GrokConfig({"gradient_clipping": 0.0, "layer": "index", "lr": 1e-2}, schedule=True),
    }
    for name, cfg in by_hand.items():
        c[f"grokadamw/{name}/by_hand_f32"] = Case(lambda cfg=cfg: compare_grokadamw_by_hand(cfg), 0.0)
    rederived = {
        "defaults+losses": GrokConfig({}),
        "signal_fn(train,val)": GrokConfig({"grokking_signal_decay_rate": 2.0}, signal_fn=True),
        "clip0.3_gamma0.3_schedule": GrokConfig(
            {"gradient_clipping": 0.3, "gamma": 0.3, "lr": 1e-2, "weight_decay": 0.1}, schedule=True
        ),
    }
    for name, cfg in rederived.items():
        c[f"grokadamw/{name}/rederived_f64"] = Case(lambda cfg=cfg: compare_grokadamw_rederived(cfg), 1e-12)
    return c


CASES: dict[str, Case] = _cases()


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_reference(name: str) -> None:
    case = CASES[name]
    res = case.run()
    if case.tol == 0.0:
        assert res.exact, f"{name}: not bit-identical, max abs diff {res.max_abs_diff:.3e}"
    else:
        assert res.max_abs_diff <= case.tol, f"{name}: max abs diff {res.max_abs_diff:.3e} > {case.tol:g}"


def test_none_gradient_case_is_exercised() -> None:
    """The skipped-leaf comparison must really skip: a grokxform Adam that advanced the count of a
    leaf without a gradient (as a shared step counter would) must disagree with torch."""
    params = init_params(SHAPES, 0)
    grads = grad_stream(SHAPES, 0, 10, missing=some_missing)
    ours, _ = run_grokxform(gx.adamw(1e-2), params, grads)
    filled = [{n: torch.zeros_like(params[n]) if g is None else g for n, g in gs.items()} for gs in grads]
    shared_count, _ = run_grokxform(gx.adamw(1e-2), params, filled)
    assert max_abs_diff(ours[-1], shared_count[-1]) > 1e-6


def test_clipping_is_partial() -> None:
    """In the GrokAdamW 0.1.2 comparison some tensors are clipped on some steps, not on others."""
    model = mlp(2)
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    grads = grad_stream(shapes, 2, 50, scale=clip_scale(shapes))
    norms = torch.tensor([[float(g.norm()) for g in gs.values()] for gs in grads])  # (step, tensor)
    clipped = norms > 1.0
    sometimes, always, never = clipped.any(dim=0), clipped.all(dim=0), ~clipped.any(dim=0)
    assert len(shapes) >= 6
    assert always.any() and never.any(), "want tensors always clipped and tensors never clipped"
    assert (sometimes & ~always).sum() >= 3, "want tensors clipped on some steps only"


def test_global_clip_is_partial() -> None:
    """In the re-derivation comparison the global clip is active on some steps only."""
    grads = grad_stream(NESTED_SHAPES, 4, 40, scale=rederived_scale)
    norms = [math.sqrt(sum(float((g * g).sum()) for g in gs.values())) for gs in grads]
    assert any(n > 1.0 for n in norms) and any(n < 1.0 for n in norms)


def test_loss_signal_varies() -> None:
    """The loss extras give GS = 0 on some steps and GS > 0 on others (α moves and returns)."""
    gs = [max(0.0, float(e["val_loss"] - e["train_loss"])) for e in loss_extras(40, F64)]
    assert any(x == 0.0 for x in gs) and any(x > 0.05 for x in gs)


def test_compat_reference_differs_from_done_right() -> None:
    """The two GrokAdamW flavours are distinguishable on the compared model, so the 0.1.2 test
    would catch a compat preset that silently fell back to the README maths."""
    model = mlp(2)
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    shapes = {n: tuple(p.shape) for n, p in params.items()}
    grads = grad_stream(shapes, 2, 10, scale=clip_scale(shapes))
    a, _ = run_grokxform(gx.grokadamw_compat(), params, grads)
    b, _ = run_grokxform(gx.grokadamw(layer="index"), params, grads)
    assert max_abs_diff(a[-1], b[-1]) > 1e-6
