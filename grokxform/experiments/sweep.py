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

``grokxform sweep`` is :func:`run_sweep`: the same with a progress bar, a table of the members, their
JSON and a heatmap.
"""

from __future__ import annotations

import inspect
import itertools
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad_and_value

from grokxform import tree as _tree
from grokxform.base import GradientTransformation, apply_updates, named_chain
from grokxform.experiments.modular import check_task, paper_setup, steps_per_epoch, task_name
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


def sweepable(pipeline: str) -> list[str]:
    """The hyperparameters that a sweep of ``pipeline`` (of :data:`SWEEP_FACTORIES`) can vary."""
    signature = inspect.signature(SWEEP_FACTORIES[pipeline]).parameters
    return sorted(set(signature) - {"lr", "decoupled", *STATIC_ARGS})


def fixed_arguments(pipeline: str) -> list[str]:
    """The arguments of :data:`STATIC_ARGS` that ``pipeline`` takes (fixed for all members of a sweep)."""
    return sorted(set(inspect.signature(SWEEP_FACTORIES[pipeline]).parameters) & set(STATIC_ARGS))


def check_sweep(
    pipeline: str,
    grid: Mapping[str, Sequence[float]],
    seeds: Sequence[int] = (0,),
    *,
    members: Sequence[Mapping[str, float]] | None = None,
    steps: int = 1,
    lr: float = 1e-3,
    window_size: int = 100,
    task: str = "mul",
    static: Mapping[str, Any] | None = None,
) -> list[dict[str, float]]:
    """The members of a :func:`sweep` with these arguments, checked as it checks them before it
    trains anything: the pipeline, the step count, the task, the fixed and the swept names, and
    every configuration's values (each builds its transform once). A ``ValueError`` names the
    first bad one."""
    if pipeline not in SWEEP_FACTORIES:
        raise ValueError(f"sweep: unknown pipeline {pipeline!r}; choose from {sorted(SWEEP_FACTORIES)}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sweep: steps must be an int >= 1, got {steps!r}")
    factory = SWEEP_FACTORIES[pipeline]
    check_task(task)
    allowed = sweepable(pipeline)
    fixed = fixed_arguments(pipeline)
    static = dict(static or {})
    bad_static = sorted(k for k in static if k not in fixed)
    if bad_static:
        raise ValueError(f"sweep: {pipeline} takes no fixed argument {bad_static}; it has {fixed or 'none'}")
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
    return member_list


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
    member_list = check_sweep(pipeline, grid, seeds, members=members, steps=steps, lr=lr, window_size=window_size,
                              task=task, static=static)
    factory = SWEEP_FACTORIES[pipeline]
    static = dict(static or {})
    hyper_names = [k for k in member_list[0] if k != "seed"]
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


# --------------------------------------------------------------------------- grokxform sweep


def _cell_label(value: float, reached: int, of: int, budget: int) -> str:
    if reached == 0:
        return f"none in\n{budget}\n(0/{of})"
    return f"{value:.0f}\n({reached}/{of})"


def plot_heatmap(members: list[dict[str, float]], steps: list[int | None], budget: int, path: Path,
                 title: str) -> bool:
    """Write :func:`heatmap_figure` to ``path``; False, writing nothing, when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig = heatmap_figure(members, steps, budget, title)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def heatmap_figure(members: list[dict[str, float]], steps: list[int | None], budget: int, title: str) -> Any:
    """Median steps to the target of each configuration (over the seeds that reached it; the
    count reached/seeds in each cell), as a matplotlib figure. The first swept axis runs along x,
    the others together along y, so every configuration has a cell named on the axes. A cell no
    seed brought to the target is hatched grey and reads "none in <budget>"; text is dark or
    light to suit its cell."""
    import textwrap

    import matplotlib.pyplot as plt

    names = [k for k in members[0] if k != "seed"]
    xk, yks = names[0], names[1:]
    xs = sorted({m[xk] for m in members})
    ys = sorted({tuple(m[k] for k in yks) for m in members})
    cells = [[float("nan")] * len(xs) for _ in ys]
    counts = [[(0, 0)] * len(xs) for _ in ys]
    for j, yv in enumerate(ys):
        for i, xv in enumerate(xs):
            mine = [s for m, s in zip(members, steps) if m[xk] == xv and tuple(m[k] for k in yks) == yv]
            got = sorted(s for s in mine if s is not None)
            counts[j][i] = (len(got), len(mine))
            if got:
                cells[j][i] = float(got[len(got) // 2])
    fig, ax = plt.subplots(figsize=(1.3 * len(xs) + 3.2, 0.75 * len(ys) + 2.2))
    ax.set_facecolor("0.88")
    cmap = plt.get_cmap("viridis_r")
    im = ax.imshow(cells, cmap=cmap, vmin=0, vmax=budget, aspect="auto")
    for j in range(len(ys)):
        for i in range(len(xs)):
            v, (reached, of) = cells[j][i], counts[j][i]
            if of == 0:
                continue
            if reached == 0:
                ax.add_patch(plt.Rectangle((i - 0.5, j - 0.5), 1, 1, facecolor="0.88", hatch="//", edgecolor="0.7"))
                color = "k"
            else:
                r, g, b, _ = cmap(v / budget)
                color = "k" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "w"
            ax.text(i, j, _cell_label(v, reached, of, budget), ha="center", va="center", color=color, fontsize=8)
    ax.set_xticks(range(len(xs)), [f"{xk}={x:g}" for x in xs])
    ax.set_yticks(range(len(ys)), [", ".join(f"{k}={v:g}" for k, v in zip(yks, y)) or "-" for y in ys])
    ax.set_xlabel(xk)
    ax.set_ylabel(", ".join(yks))
    ax.set_title("\n".join(textwrap.wrap(title, 60)), fontsize=9)
    fig.colorbar(im, ax=ax, label="median steps to target (seeds that reached it)")
    fig.tight_layout()
    return fig


class _SweepProgress:
    """A tqdm bar over the step budget (or a line every ~10 %), with the best val accuracy and
    how many members are at the target."""

    def __init__(self, total: int, stream: TextIO, use_tqdm: bool, target: float) -> None:
        self.total, self.stream, self.done, self.use_tqdm, self.target = total, stream, 0, use_tqdm, target
        self.bar: Any = None
        self.every = max(1, total // 10)
        self.next_at = self.every

    def update(self, step: int, accs: list[float]) -> None:
        at = sum(a >= self.target for a in accs)
        if self.use_tqdm and self.bar is None:  # opened at the first evaluation: errors come first, alone
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=self.total, desc="sweep", unit="step", file=self.stream, dynamic_ncols=True)
            except ImportError:
                self.use_tqdm = False
        if self.bar is not None:
            self.bar.update(step - self.done)
            self.bar.set_postfix(best_val=f"{max(accs):.3f}", at_target=f"{at}/{len(accs)}", refresh=False)
        elif step >= self.next_at or step >= self.total:
            print(f"  step {step:>6}/{self.total}: val acc max {max(accs):.3f}, {at}/{len(accs)} at target",
                  file=self.stream, flush=True)
            while self.next_at <= step:
                self.next_at += self.every
        self.done = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_sweep(pipeline: str, grid: Mapping[str, Sequence[float]], *, seeds: Sequence[int], steps: int,
              device: torch.device, out: Path, task: str = "mul", static: Mapping[str, Any] | None = None,
              compile: bool = False, progress_bar: bool = True, target_accuracy: float = 0.95) -> SweepResult:
    """:func:`sweep` with a progress bar on stderr (lines without ``progress_bar`` or tqdm); prints
    the members' table and throughput, writes ``<out>.json`` (the result with torch's version, the
    date and the device) and, with two swept names or more (a hyperparameter and the seeds),
    the heatmap ``<out>.png``."""
    n = len(seeds)
    for values in grid.values():
        n *= len(values)
    print(f"grokxform sweep: {pipeline} on {task_name(task)}, {n} members"
          f" ({' x '.join(f'{k} {v}' for k, v in grid.items())} x seeds {list(seeds)}) as one vmapped program on"
          f" {device} ({torch.get_num_threads()} CPU thread(s)), budget {steps} steps", flush=True)
    bar = _SweepProgress(steps, sys.stderr, use_tqdm=progress_bar, target=target_accuracy)
    try:
        result = sweep(pipeline, grid, seeds=seeds, steps=steps, device=device, task=task, static=static,
                       compile=compile, on_eval=bar.update, target_accuracy=target_accuracy)
    finally:
        bar.close()
    print(result.table())
    print(f"{result.member_steps_per_second:.1f} member-steps/s over {result.steps} steps, {result.seconds:.1f} s")
    payload = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
               **result.to_json()}
    Path(f"{out}.json").write_text(json.dumps(payload, indent=1))
    title = (f"{pipeline} on {task_name(task)}: median steps to {target_accuracy:.0%} val acc,"
             f" seeds {list(seeds)}")
    if len(result.members[0]) >= 2 and plot_heatmap(result.members, result.steps_to_target, result.steps,
                                                     Path(f"{out}.png"), title):
        print(f"heatmap written to {out}.png, results to {out}.json")
    else:
        print(f"results written to {out}.json (no heatmap: matplotlib missing or nothing swept)")
    return result


__all__ = [
    "STATIC_ARGS",
    "SWEEP_FACTORIES",
    "SweepResult",
    "adam_l2",
    "check_sweep",
    "fixed_arguments",
    "grid_members",
    "heatmap_figure",
    "median_and_spread",
    "plot_heatmap",
    "run_sweep",
    "sweep",
    "sweepable",
]
