"""Hyperparameter sweeps of the modular task as ONE program: every member of a grid (α × λ × weight
decay × β1 × seeds ...) is trained at once under ``torch.func.vmap`` over stacked models.

Each member m has its own params θ_m (the decoder of ``paper_setup(seed_m)``), its own split and
shuffle stream, and its own hyperparameters, held as batched 0-d tensors in the state of
``inject_hyperparams(factory)``; one vmapped step computes, for all m at once::

    (L_m, g_m) = value_and_grad(loss(θ_m; x_m, y_m))
    u_m, s_m   = tx.update(g_m, s_m, θ_m, train_loss=L_m, val_loss=L_val,m)
    θ_m        = θ_m + u_m

so a member's numbers are those of training it alone with :func:`~grokxform.experiments.train.train`
(up to float reassociation in batched kernels), while the GPU sees E-times larger kernels.

Example::

    result = sweep("grokfast_ema", {"alpha": [0.9, 0.98], "lamb": [1.0, 2.0, 5.0]}, seeds=[0, 1], steps=3000)
    print(result.table())
"""

from __future__ import annotations

import inspect
import itertools
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value

from grokxform import tree as _tree
from grokxform.base import GradientTransformation, apply_updates, named_chain
from grokxform.experiments.modular import check_task, paper_setup, steps_per_epoch
from grokxform.pipelines import grokadamw, grokfast_ema, grokfast_ma
from grokxform.transforms.adam import scale_by_adam
from grokxform.transforms.schedules import linear_warmup, scale_by_learning_rate
from grokxform.transforms.weight_decay import decoupled_weight_decay
from grokxform.transforms.wrappers import inject_hyperparams

PAPER_B2 = 0.98


def adam_l2(lr: Any, b1: Any = 0.9, weight_decay: Any = 0.0, decoupled: bool = False) -> GradientTransformation:
    """The paper's baseline optimizer: Adam, β2 = 0.98, with coupled L2 ``g + wd·θ`` (or AdamW's
    decoupled decay with ``decoupled=True``)."""
    decay = ("weight_decay", decoupled_weight_decay(weight_decay))
    return named_chain(
        *([] if decoupled else [decay]),
        ("adam", scale_by_adam(b1, PAPER_B2)),
        *([decay] if decoupled else []),
        ("lr", scale_by_learning_rate(lr)),
    )


def _ema(lr: Any, alpha: Any = 0.98, lamb: Any = 2.0, b1: Any = 0.9, weight_decay: Any = 0.005) -> GradientTransformation:
    return grokfast_ema(lr=lr, alpha=alpha, lamb=lamb, betas=(b1, PAPER_B2), weight_decay=weight_decay,
                        weight_decay_mode="coupled")


def _ma(lr: Any, lamb: Any = 5.0, b1: Any = 0.9, weight_decay: Any = 0.01, window_size: int = 100) -> GradientTransformation:
    return grokfast_ma(lr=lr, window_size=window_size, lamb=lamb, betas=(b1, PAPER_B2), weight_decay=weight_decay,
                       weight_decay_mode="coupled")


def _grokadamw(lr: Any, alpha_init: Any = 0.98, lamb: Any = 2.0, b1: Any = 0.9, weight_decay: Any = 0.01,
               grokking_signal_decay_rate: Any = 0.1, clip: Any = 1.0,
               gamma: float = 0.1) -> GradientTransformation:
    """:func:`grokadamw` with the paper's β2. ``clip`` is its ``gradient_clipping`` under a name
    a sweep may vary: 0 switches the clip off also as a (batched) tensor, whose threshold then
    becomes +∞, and ``min(1, ∞/‖g‖) = 1`` leaves g exactly as it is."""
    if isinstance(clip, torch.Tensor):
        clip = torch.where(clip > 0, clip, float("inf"))
    return grokadamw(lr=lr, betas=(b1, PAPER_B2), alpha_init=alpha_init, lamb=lamb, weight_decay=weight_decay,
                     gamma=gamma, grokking_signal_decay_rate=grokking_signal_decay_rate, gradient_clipping=clip)


def _adamw(lr: Any, b1: Any = 0.9, weight_decay: Any = 0.01) -> GradientTransformation:
    return adam_l2(lr, b1, weight_decay, decoupled=True)


SWEEP_FACTORIES: dict[str, Callable[..., GradientTransformation]] = {
    "baseline": adam_l2,
    "adamw": _adamw,
    "grokfast_ema": _ema,
    "grokfast_ma": _ma,
    "grokadamw": _grokadamw,
}
"""Pipelines a sweep can run, with the paper's settings as defaults; the keyword arguments other
than ``lr`` (and ``window_size`` and grokadamw's ``gamma``, fixed per sweep: they set the
pipeline's structure) are the sweepable hyperparameters."""

STATIC_ARGS = ("window_size", "gamma")
"""Arguments a sweep holds fixed for all its members (pass them as ``static=``)."""


@dataclass
class SweepResult:
    """Per member: its hyperparameters, seed, steps (and seconds) to the target validation
    accuracy (``None``: not reached), and the per-evaluation curves ``[evaluations][members]``."""

    pipeline: str
    members: list[dict[str, float]]
    steps_to_target: list[int | None]
    seconds_to_target: list[float | None]
    steps: int
    seconds: float
    eval_steps: list[int] = field(default_factory=list)
    val_acc: list[list[float]] = field(default_factory=list)
    train_acc: list[list[float]] = field(default_factory=list)
    device: str = "cpu"
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    """The final params, stacked: ``params[name][m]`` is member m's."""
    first_epoch_steps: int = 0
    first_epoch_seconds: float = 0.0
    """Steps and wall seconds up to the first evaluation (they hold a compile, if any)."""
    task: str = "mul"
    static: dict[str, Any] = field(default_factory=dict)
    """The arguments held fixed for every member (``gamma``, ``window_size``)."""

    @property
    def member_steps_per_second(self) -> float:
        """Throughput: members × steps / wall seconds (evaluations and any compile included)."""
        return len(self.members) * self.steps / self.seconds if self.seconds > 0 else float("nan")

    @property
    def steady_member_steps_per_second(self) -> float:
        """Throughput after the first epoch: members × steps / wall seconds, evaluations included,
        the one-time compile and warm-up of the first epoch left out."""
        steps, secs = self.steps - self.first_epoch_steps, self.seconds - self.first_epoch_seconds
        return len(self.members) * steps / secs if steps > 0 and secs > 0 else float("nan")

    def table(self) -> str:
        """One line per member: hyperparameters and steps to the target."""
        keys = list(self.members[0]) if self.members else []
        lines = [" ".join(f"{k:>12}" for k in keys) + f" {'steps':>8}"]
        for m, s in zip(self.members, self.steps_to_target):
            lines.append(" ".join(f"{m[k]:>12g}" for k in keys) + f" {('-' if s is None else s):>8}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "task": self.task,
            "static": self.static,
            "device": self.device,
            "members": self.members,
            "steps_to_target": self.steps_to_target,
            "seconds_to_target": self.seconds_to_target,
            "steps": self.steps,
            "seconds": self.seconds,
            "member_steps_per_second": self.member_steps_per_second,
            "steady_member_steps_per_second": self.steady_member_steps_per_second,
            "first_epoch_steps": self.first_epoch_steps,
            "first_epoch_seconds": self.first_epoch_seconds,
            "eval_steps": self.eval_steps,
            "val_acc": self.val_acc,
            "train_acc": self.train_acc,
        }


def grid_members(grid: Mapping[str, Sequence[float]], seeds: Sequence[int]) -> list[dict[str, float]]:
    """The Cartesian product of ``grid`` × ``seeds`` as a list of ``{name: value, "seed": s}``."""
    names = list(grid)
    out = []
    for values in itertools.product(*(grid[n] for n in names)):
        for s in seeds:
            out.append({**{n: float(v) for n, v in zip(names, values)}, "seed": int(s)})
    return out


def _stack(trees: Sequence[Any]) -> Any:
    return _tree.tree_map(lambda *xs: None if xs[0] is None else torch.stack(xs), *trees)


def sweep(
    pipeline: str,
    grid: Mapping[str, Sequence[float]],
    seeds: Sequence[int] = (0,),
    *,
    steps: int = 2000,
    lr: float = 1e-3,
    warmup_steps: int = 10,
    window_size: int = 100,
    batch_size: int = 512,
    device: str | torch.device = "cpu",
    target_accuracy: float = 0.95,
    stop_when_all_reached: bool = True,
    members: Sequence[Mapping[str, float]] | None = None,
    on_eval: Callable[[int, list[float]], None] | None = None,
    compile: bool = False,
    max_seconds: float | None = None,
    task: str = "mul",
    static: Mapping[str, Any] | None = None,
) -> SweepResult:
    """Train every member of ``grid`` × ``seeds`` (or the explicit ``members``) at once.

    The learning rate is the paper's ``lr·min(1, t/warmup_steps)`` for all members. Validation
    accuracy is measured over the full validation split after every epoch; a member's "steps to
    target" is the step count of its first evaluation ≥ ``target_accuracy``. ``compile=True``
    compiles the vmapped step with ``torch.compile`` (one graph per batch shape). ``max_seconds``
    stops at the first evaluation past that wall time (members not yet at the target are
    reported as not reached by ``result.steps``). ``task`` is the operation of
    :data:`~grokxform.experiments.modular.TASKS`; ``static`` fixes arguments of
    :data:`STATIC_ARGS` for every member (``{"gamma": 0.0}``).
    """
    if pipeline not in SWEEP_FACTORIES:
        raise ValueError(f"sweep: unknown pipeline {pipeline!r}; choose from {sorted(SWEEP_FACTORIES)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sweep: steps must be an int >= 1, got {steps!r}")
    factory = SWEEP_FACTORIES[pipeline]
    check_task(task)
    signature = set(inspect.signature(factory).parameters)
    allowed = signature - {"lr", "decoupled", *STATIC_ARGS}
    static = dict(static or {})
    bad_static = sorted(k for k in static if k not in STATIC_ARGS or k not in signature)
    if bad_static:
        raise ValueError(f"sweep: {pipeline} takes no fixed argument {bad_static}; it has"
                         f" {sorted(signature & set(STATIC_ARGS)) or 'none'}")
    member_list = [dict(m) for m in members] if members is not None else grid_members(grid, seeds)
    if not member_list:
        raise ValueError("sweep: the grid is empty")
    hyper_names = [k for k in member_list[0] if k != "seed"]
    for name in hyper_names:
        if name not in allowed:
            raise ValueError(f"sweep: {pipeline} has no sweepable hyperparameter {name!r}; choose from {sorted(allowed)}")
    for m in member_list:
        if "seed" not in m or sorted(k for k in m if k != "seed") != sorted(hyper_names):
            raise ValueError(f"sweep: every member needs a seed and the hyperparameters {hyper_names}, got {m}")
    for config in {tuple((k, m[k]) for k in hyper_names) for m in member_list}:  # each value's own checks
        factory(lr=lr, **dict(config), **({"window_size": window_size} if pipeline == "grokfast_ma" else {}), **static)
    device = torch.device(device)

    # --- the members' models, data and shuffle streams, as the single-run setup draws them
    setups = [paper_setup(int(m["seed"]), task=task) for m in member_list]
    params = _stack([{k: v.detach() for k, v in s.model.named_parameters()} for s in setups])
    params = _tree.tree_map(lambda t: t.to(device), params)
    base = setups[0].model.to(device)  # only its structure is used: functional_call swaps in params
    x_tr = torch.stack([s.data.train_inputs for s in setups]).to(device)
    y_tr = torch.stack([s.data.train_targets for s in setups]).to(device)
    x_va = torch.stack([s.data.val_inputs for s in setups]).to(device)
    y_va = torch.stack([s.data.val_targets for s in setups]).to(device)
    gens = [s.generator for s in setups]
    n_members, n = y_tr.shape

    # --- one transform, per-member hyperparameters in its (stacked) state
    extra_static = {"window_size": window_size} if pipeline == "grokfast_ma" else {}
    extra_static.update(static)
    first = {k: member_list[0][k] for k in hyper_names}
    tx = inject_hyperparams(factory, static_args=STATIC_ARGS)(lr=linear_warmup(lr, warmup_steps), **first,
                                                              **extra_static)
    one = _tree.tree_map(lambda t: t[0], params)
    state = _stack([tx.init(one) for _ in member_list])
    for k in hyper_names:
        state.hyperparams[k].copy_(torch.tensor([m[k] for m in member_list], dtype=torch.float64, device=device))

    def loss_and_logits(p: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = functional_call(base, p, (x,))
        return F.cross_entropy(logits, y), logits.detach()

    grad_fn = grad_and_value(loss_and_logits, has_aux=True)

    def member_step(p: dict, s: Any, x: torch.Tensor, y: torch.Tensor, val_loss: torch.Tensor | None):
        grads, (loss, logits) = grad_fn(p, x, y)
        extra = {"train_loss": loss.detach()}
        if val_loss is not None:
            extra["val_loss"] = val_loss
        u, s = tx.update(grads, s, p, **extra)
        correct = (logits.argmax(-1) == y).sum()
        return apply_updates(p, u), s, correct

    uses_losses = pipeline == "grokadamw"  # the only pipeline here that reads val_loss (one graph less)
    step_first = torch.func.vmap(lambda p, s, x, y: member_step(p, s, x, y, None))
    step_later = torch.func.vmap(member_step)
    if compile:
        step_first = torch.compile(step_first, fullgraph=True, dynamic=False)
        step_later = torch.compile(step_later, fullgraph=True, dynamic=False)

    def member_eval(p: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = functional_call(base, p, (x,))
        return F.cross_entropy(logits, y), (logits.argmax(-1) == y).float().mean()

    evaluate = torch.func.vmap(member_eval)

    result = SweepResult(pipeline, member_list, [None] * n_members, [None] * n_members, 0, 0.0, device=str(device),
                         task=task, static=extra_static)
    per_epoch = steps_per_epoch(n, batch_size)
    rows = torch.arange(n_members, device=device)[:, None]
    val_loss: torch.Tensor | None = None
    step = 0
    correct_sum = torch.zeros(n_members, dtype=torch.int64, device=device)
    seen = 0
    start = time.perf_counter()
    with torch.no_grad():
        while step < steps:
            order = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(device)
            for b in range(per_epoch):
                if step >= steps:
                    break
                idx = order[:, b * batch_size : (b + 1) * batch_size]
                x, y = x_tr[rows, idx], y_tr[rows, idx]
                with torch.enable_grad():
                    if val_loss is None or not uses_losses:
                        params, state, correct = step_first(params, state, x, y)
                    else:
                        params, state, correct = step_later(params, state, x, y, val_loss)
                correct_sum += correct
                seen += idx.shape[1]
                step += 1
            v_loss, v_acc = evaluate(params, x_va, y_va)
            val_loss = v_loss.to(torch.float64)
            accs = v_acc.tolist()
            now = time.perf_counter() - start
            if not result.eval_steps:
                result.first_epoch_steps, result.first_epoch_seconds = step, now
            result.eval_steps.append(step)
            result.val_acc.append(accs)
            result.train_acc.append((correct_sum.double() / seen).tolist())
            correct_sum.zero_()
            seen = 0
            for i, a in enumerate(accs):
                if result.steps_to_target[i] is None and a >= target_accuracy:
                    result.steps_to_target[i], result.seconds_to_target[i] = step, now
            if on_eval is not None:
                on_eval(step, accs)
            if stop_when_all_reached and all(s is not None for s in result.steps_to_target):
                break
            if max_seconds is not None and now > max_seconds:
                break
    result.steps = step
    result.seconds = time.perf_counter() - start
    result.params = params
    return result


def median_and_spread(values: Sequence[int | None]) -> dict[str, Any]:
    """Median, min and max of the reached values, and how many reached."""
    got = sorted(v for v in values if v is not None)
    if not got:
        return {"median": None, "min": None, "max": None, "reached": 0, "of": len(values)}
    mid = len(got) // 2
    med = got[mid] if len(got) % 2 else 0.5 * (got[mid - 1] + got[mid])
    return {"median": med, "min": got[0], "max": got[-1], "reached": len(got), "of": len(values)}


__all__ = ["STATIC_ARGS", "SWEEP_FACTORIES", "SweepResult", "adam_l2", "grid_members", "median_and_spread", "sweep"]
