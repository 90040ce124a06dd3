"""Hyperparameter sweeps as ONE program: every member of a grid (learning rate × a method's knobs
× seeds ...) is trained at once under ``torch.func.vmap`` over stacked models.

Each member m has its own params θ_m (the model of its task's setup for seed_m), its own split
and shuffle stream, and its own hyperparameters, held as batched 0-d tensors in the state of
``inject_hyperparams(factory)``; one vmapped step computes, for all m at once::

    (L_m, g_m) = value_and_grad(loss(θ_m; x_m, y_m))
    u_m, s_m   = tx.update(g_m, s_m, θ_m, train_loss=L_m, val_loss=L_val,m)
    θ_m        = θ_m + u_m

so a member's numbers are those of training it alone with :func:`~grokxform.experiments.train.train`
(up to float reassociation in batched kernels), while the GPU sees E-times larger kernels. Any
method of :data:`~grokxform.experiments.methods.METHODS` runs on any task of
:data:`~grokxform.experiments.tasks.TASKS`.

Example::

    result = sweep("grokfast_ema", {"alpha": [0.9, 0.98], "lamb": [1.0, 2.0, 5.0]}, seeds=[0, 1], steps=3000)
    print(result.table())

``grokxform sweep METHOD`` is :func:`run_sweep`: the same with a progress bar, a table of the
members, their JSON and a heatmap.
"""

from __future__ import annotations

import functools
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import time
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch
from torch.func import functional_call, grad_and_value

from grokxform import tree as _tree
from grokxform._common import check_int
from grokxform.base import apply_updates
from grokxform.experiments.methods import STATIC_ARGS, fixed_arguments, fixed_call_args, get_method, knobs
from grokxform.experiments.modular import steps_per_epoch
from grokxform.experiments.tasks import get_task, method_loss
from grokxform.transforms.compress import FORMATS, compress_state
from grokxform.transforms.wrappers import inject_hyperparams


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
    """The arguments held fixed for every member (``gamma``, ``window_size``, ``warmup_steps``)."""
    val_loss: list[list[float]] = field(default_factory=list)
    """The validation loss of every member at each evaluation (the member's training loss)."""
    state_bytes: int = 0
    """Bytes of one member's optimizer state (its transform's state without the injected
    hyperparameters)."""
    target: float = 0.95
    state_format: str | None = None
    """The optimizer state's storage format (``None``: the method's own)."""
    state_block_size: int | None = None
    """The ``"int8"`` format's block size (``None`` without a ``state_format``)."""

    @property
    def member_steps_per_second(self) -> float:
        """Throughput: members × steps / wall seconds (evaluations and any compile included)."""
        return len(self.members) * self.steps / self.seconds if self.seconds > 0 else float("nan")

    @property
    def steady_member_steps_per_second(self) -> float:
        """Throughput after the first evaluation: members × steps / wall seconds, evaluations
        included, the one-time compile and warm-up of the first evaluation's steps left out."""
        steps, secs = self.steps - self.first_epoch_steps, self.seconds - self.first_epoch_seconds
        return len(self.members) * steps / secs if steps > 0 and secs > 0 else float("nan")

    def table(self) -> str:
        """One line per member: hyperparameters, steps to the target and the final val accuracy and loss."""
        keys = list(self.members[0]) if self.members else []
        lines = [" ".join(f"{k:>12}" for k in keys) + f" {'steps':>8} {'val acc':>8} {'val loss':>9}"]
        for i, (m, s) in enumerate(zip(self.members, self.steps_to_target)):
            acc = self.val_acc[-1][i] if self.val_acc else float("nan")
            loss = self.val_loss[-1][i] if self.val_loss else float("nan")
            lines.append(" ".join(f"{m[k]:>12g}" for k in keys) + f" {('-' if s is None else s):>8} {acc:>8.3f}"
                         f" {loss:>9.4f}")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "task": self.task,
            "static": {k: v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
                       for k, v in self.static.items() if k != "matrices"},
            "device": self.device,
            "members": self.members,
            "target": self.target,
            "steps_to_target": self.steps_to_target,
            "seconds_to_target": self.seconds_to_target,
            "steps": self.steps,
            "seconds": self.seconds,
            "member_steps_per_second": self.member_steps_per_second,
            "steady_member_steps_per_second": self.steady_member_steps_per_second,
            "first_epoch_steps": self.first_epoch_steps,
            "first_epoch_seconds": self.first_epoch_seconds,
            "state_bytes": self.state_bytes,
            "state_format": self.state_format,
            "state_block_size": self.state_block_size,
            "eval_steps": self.eval_steps,
            "val_acc": self.val_acc,
            "val_loss": self.val_loss,
            "train_acc": self.train_acc,
        }


def compressed(factory: Callable[..., Any], fmt: str, block_size: int = 256) -> Callable[..., Any]:
    """``factory`` whose transform keeps its state in ``fmt`` (:func:`~grokxform.compress_state`,
    with ``block_size``), with ``factory``'s signature and static markings (what
    :func:`~grokxform.inject_hyperparams` reads)."""
    if fmt not in FORMATS:
        raise ValueError(f"sweep: state_format must be None or one of {', '.join(map(repr, FORMATS))}, got {fmt!r}")
    block_size = check_int("sweep", "state_block_size", block_size, low=1)

    @functools.wraps(factory)
    def make(*args: Any, **kwargs: Any) -> Any:
        return compress_state(factory(*args, **kwargs), fmt, block_size=block_size)

    return make


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


def state_bytes(state: Any) -> int:
    """Bytes of the tensors of ``state`` (a pytree)."""
    leaves = [x for x in _tree.flatten(state)[0] if isinstance(x, torch.Tensor)]
    return sum(x.numel() * x.element_size() for x in leaves)


def git_commit() -> str | None:
    """The commit checked out where grokxform is imported from, when that is a git checkout
    (``None`` otherwise, or without git)."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def cpu_name() -> str:
    """``"cpu"`` with the processor's model and core count where the system says them
    (``"cpu (AMD EPYC, 2 cores)"``)."""
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
    except OSError:
        model = platform.processor()
    parts = [x for x in (model, f"{os.cpu_count()} cores" if os.cpu_count() else "") if x]
    return f"cpu ({', '.join(parts)})" if parts else "cpu"


def environment(device: torch.device) -> dict[str, Any]:
    """What a result file records of where it ran: device, torch and Python versions, date, commit."""
    return {"device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "torch": torch.__version__, "python": sys.version.split()[0],
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "git_commit": git_commit()}


def check_sweep(
    method: str,
    grid: Mapping[str, Sequence[float]],
    seeds: Sequence[int] = (0,),
    *,
    members: Sequence[Mapping[str, float]] | None = None,
    steps: int = 1,
    task: str = "mul",
    static: Mapping[str, Any] | None = None,
) -> list[dict[str, float]]:
    """The members of a :func:`sweep` with these arguments, checked as it checks them before it
    trains anything: the method, the step count, the task, the fixed and the swept names, and
    every configuration's values (each builds its transform once). A ``ValueError`` names the
    first bad one."""
    get_method(method)
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"sweep: steps must be an int >= 1, got {steps!r}")
    t = get_task(task)
    allowed = knobs(method)
    fixed = fixed_arguments(method)
    static = dict(static or {})
    bad_static = sorted(k for k in static if k not in fixed or k in ("warmup_steps", "matrices"))
    if bad_static:
        raise ValueError(f"sweep: {method} takes no fixed argument {bad_static}; it has"
                         f" {[f for f in fixed if f not in ('warmup_steps', 'matrices')] or 'none'}")
    member_list = [dict(m) for m in members] if members is not None else grid_members(grid, seeds)
    if not member_list:
        raise ValueError("sweep: the grid is empty")
    hyper_names = [k for k in member_list[0] if k != "seed"]
    for name in hyper_names:
        if name not in allowed:
            raise ValueError(f"sweep: {method} has no sweepable hyperparameter {name!r}; choose from {allowed}")
    for m in member_list:
        if "seed" not in m or sorted(k for k in m if k != "seed") != sorted(hyper_names):
            raise ValueError(f"sweep: every member needs a seed and the hyperparameters {hyper_names}, got {m}")
    factory = get_method(method).factory
    for config in {tuple((k, m[k]) for k in hyper_names) for m in member_list}:  # each value's own checks
        factory(**dict(config), **fixed_call_args(method, t.warmup_steps, t.matrices, static))
    return member_list


def sweep(
    method: str,
    grid: Mapping[str, Sequence[float]],
    seeds: Sequence[int] = (0,),
    *,
    steps: int = 2000,
    task: str = "mul",
    batch_size: int | None = None,
    eval_every: int | None = None,
    device: str | torch.device = "cpu",
    target_accuracy: float | None = None,
    stop_when_all_reached: bool = True,
    stop_when: Callable[[list[int | None], int], bool] | None = None,
    members: Sequence[Mapping[str, float]] | None = None,
    on_eval: Callable[[int, list[float]], None] | None = None,
    compile: bool = False,
    max_seconds: float | None = None,
    static: Mapping[str, Any] | None = None,
    data_root: str | Path | None = None,
    val_points: int | None = None,
    state_format: str | None = None,
    state_block_size: int = 256,
) -> SweepResult:
    """Train every member of ``grid`` × ``seeds`` (or the explicit ``members``) at once.

    ``method`` names a :data:`~grokxform.experiments.methods.METHODS` entry and the grid its knobs
    (``lr`` included; a knob not in the grid keeps the method's default); ``task`` a
    :data:`~grokxform.experiments.tasks.TASKS` entry, whose batch size, evaluation cadence (steps)
    and learning-rate warm-up apply unless ``batch_size`` or ``eval_every`` say otherwise;
    ``data_root`` is the MNIST folder of the ``mnist`` task; ``val_points`` keeps only the first
    rows of the validation split (a smoke test's shortcut; default all). Validation accuracy and loss are
    measured over the task's validation split every ``eval_every`` steps and at the last step; a
    member's "steps to target" is the step count of its first evaluation ≥ ``target_accuracy``
    (default: the task's, :attr:`~grokxform.experiments.tasks.Task.target`; accuracy tasks only:
    the ``lm`` task is ranked by its loss, and never stops early).
    ``stop_when_all_reached`` stops at the first evaluation where every member has reached the
    target; ``stop_when(steps_to_target, step)``, called after each evaluation of an accuracy task
    with every member's steps to the target so far (``None``: not yet), stops when it returns True.
    ``compile=True`` compiles the vmapped step with ``torch.compile`` (one graph per batch
    shape). ``max_seconds`` stops at the first evaluation past that wall time (members not yet at
    the target are reported as not reached by ``result.steps``). ``static`` fixes arguments of
    :data:`~grokxform.experiments.methods.STATIC_ARGS` for every member (``{"gamma": 0.0}``).
    ``state_format`` (``"bf16"``, ``"bf16_sr"`` or ``"int8"``) keeps every member's optimizer state
    compressed (:func:`~grokxform.compress_state` with ``block_size=state_block_size``, default
    256); ``None``: as the method keeps it.
    """
    member_list = check_sweep(method, grid, seeds, members=members, steps=steps, task=task, static=static)
    t = get_task(task)
    batch_size = t.batch_size if batch_size is None else batch_size
    eval_every = t.eval_every if eval_every is None else eval_every
    target_accuracy = t.target if target_accuracy is None else target_accuracy
    for name, value in (("batch_size", batch_size), ("eval_every", eval_every), ("val_points", val_points)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"sweep: {name} must be an int >= 1, got {value!r}")
    factory = get_method(method).factory
    if state_format is not None:
        factory = compressed(factory, state_format, state_block_size)
    fixed = fixed_call_args(method, t.warmup_steps, t.matrices, static)
    hyper_names = [k for k in member_list[0] if k != "seed"]
    device = torch.device(device)
    loss_fn = method_loss(task, method)
    ranks_accuracy = t.metric == "accuracy"

    # --- the members' models, data and shuffle streams, as the single-run setup draws them
    setups = [t.setup(int(m["seed"]), data_root) for m in member_list]
    params = _stack([{k: v.detach() for k, v in s.model.named_parameters()} for s in setups])
    params = _tree.tree_map(lambda x: x.to(device), params)
    base = setups[0].model.to(device)  # only its structure is used: functional_call swaps in params
    n_members = len(member_list)
    if t.shared_data:  # one copy, seen by every member
        x_tr, y_tr, x_va, y_va = (x.to(device).expand(n_members, *x.shape) for x in setups[0].data)
    else:
        x_tr, y_tr, x_va, y_va = (torch.stack(xs).to(device) for xs in zip(*(s.data for s in setups)))
    if val_points is not None:
        x_va, y_va = x_va[:, :val_points], y_va[:, :val_points]
    gens = [s.generator for s in setups]
    n = y_tr.shape[1]

    # --- one transform, per-member hyperparameters in its (stacked) state
    first = {k: member_list[0][k] for k in hyper_names}
    tx = inject_hyperparams(factory, static_args=STATIC_ARGS)(**first, **fixed)
    members_params = [_tree.tree_map(lambda x, i=i: x[i], params) for i in range(n_members)]
    state = _stack([tx.init(p) for p in members_params])  # each from its own params
    for k in hyper_names:
        state.hyperparams[k].copy_(torch.tensor([m[k] for m in member_list], dtype=torch.float64, device=device))

    def loss_and_logits(p: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = functional_call(base, p, (x,))
        return loss_fn(logits, y), logits.detach()

    grad_fn = grad_and_value(loss_and_logits, has_aux=True)

    # The state crosses vmap as the list of its tensors (its None leaves, a partition's leaves of
    # another label, stay outside): vmap's own walks of a deep tree (an MA window: w trees of
    # compressed tensors), or of a per-leaf in_dims list, cost more per step than the members'
    # arithmetic.
    leaves, s_spec = _tree.flatten(state)
    present = [i for i, x in enumerate(leaves) if x is not None]
    state = [leaves[i] for i in present]

    def member_step(p: dict, s: list[Any], x: torch.Tensor, y: torch.Tensor, val_loss: torch.Tensor | None):
        grads, (loss, logits) = grad_fn(p, x, y)
        extra = {"train_loss": loss.detach()}
        if val_loss is not None:
            extra["val_loss"] = val_loss
        whole: list[Any] = [None] * len(leaves)
        for i, t in zip(present, s):
            whole[i] = t
        u, new = tx.update(grads, _tree.unflatten(whole, s_spec), p, **extra)
        correct = (logits.argmax(-1) == y).sum()
        flat = _tree.flatten(new)[0]
        return apply_updates(p, u), [flat[i] for i in present], correct

    uses_losses = method == "grokadamw"  # the only method here that reads val_loss (one graph less)
    step_first = torch.func.vmap(lambda p, s, x, y: member_step(p, s, x, y, None))
    step_later = torch.func.vmap(member_step)
    if compile:
        step_first, step_later = _compiled(step_first), _compiled(step_later)

    def member_eval(p: dict, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = functional_call(base, p, (x,))
        return loss_fn(logits, y), (logits.argmax(-1) == y).float().mean()

    evaluate = torch.func.vmap(member_eval)

    result = SweepResult(method, member_list, [None] * n_members, [None] * n_members, 0, 0.0, device=str(device),
                         task=task, static=fixed, target=target_accuracy, state_format=state_format,
                         state_block_size=None if state_format is None else state_block_size)
    result.state_bytes = state_bytes(factory(**first, **fixed).init(members_params[0]))
    per_epoch = steps_per_epoch(n, batch_size)
    rows = torch.arange(n_members, device=device)[:, None]
    val_loss: torch.Tensor | None = None
    step = 0
    correct_sum = torch.zeros(n_members, dtype=torch.int64, device=device)
    seen = 0
    start = time.perf_counter()
    done = False
    with torch.no_grad():
        while not done:
            order = torch.stack([torch.randperm(n, generator=g) for g in gens]).to(device)
            for b in range(per_epoch):
                idx = order[:, b * batch_size : (b + 1) * batch_size]
                x, y = x_tr[rows, idx], y_tr[rows, idx]
                with torch.enable_grad():
                    if val_loss is None or not uses_losses:
                        params, state, correct = step_first(params, state, x, y)
                    else:
                        params, state, correct = step_later(params, state, x, y, val_loss)
                correct_sum += correct
                seen += y[0].numel()
                step += 1
                if step % eval_every and step < steps:
                    continue
                v_loss, v_acc = evaluate(params, x_va, y_va)
                val_loss = v_loss.to(torch.float64)
                accs = v_acc.tolist()
                now = time.perf_counter() - start
                if not result.eval_steps:
                    result.first_epoch_steps, result.first_epoch_seconds = step, now
                result.eval_steps.append(step)
                result.val_acc.append(accs)
                result.val_loss.append(val_loss.tolist())
                result.train_acc.append((correct_sum.double() / seen).tolist())
                correct_sum.zero_()
                seen = 0
                if ranks_accuracy:
                    for i, a in enumerate(accs):
                        if result.steps_to_target[i] is None and a >= target_accuracy:
                            result.steps_to_target[i], result.seconds_to_target[i] = step, now
                if on_eval is not None:
                    on_eval(step, accs)
                done = (step >= steps
                        or (ranks_accuracy and stop_when_all_reached
                            and all(s is not None for s in result.steps_to_target))
                        or (ranks_accuracy and stop_when is not None and stop_when(list(result.steps_to_target), step))
                        or (max_seconds is not None and now > max_seconds))
                if done:
                    break
    result.steps = step
    result.seconds = time.perf_counter() - start
    result.params = params
    return result


def _compiled(step: Callable[..., Any]) -> Callable[..., Any]:
    """``step`` (a vmapped step returning params, state leaves and counts) compiled behind a
    function with a code object of its own, its state leaves returned contiguous. torch.compile
    keeps the graphs of one code object together and stops at a limit of them; every
    ``torch.func.vmap`` wrapper shares one code object, so without a fresh one each sweep's steps
    would count against those of every sweep before it in the process (the ninth graph fails). A
    leaf the graph would return broadcast (a value the same for every member) would change the
    strides of the next call's input and compile the step a second time."""

    def contiguous_step(*args: Any) -> Any:
        params, state, correct = step(*args)
        return params, [None if x is None else x.contiguous() for x in state], correct

    code = contiguous_step.__code__.replace()  # a new code object: its own cache of graphs
    own = types.FunctionType(code, contiguous_step.__globals__, "sweep_step", None, contiguous_step.__closure__)
    return torch.compile(own, fullgraph=True, dynamic=False)


def median_and_spread(values: Sequence[int | None]) -> dict[str, Any]:
    """Median, min and max of the reached values, and how many reached."""
    got = sorted(v for v in values if v is not None)
    if not got:
        return {"median": None, "min": None, "max": None, "reached": 0, "of": len(values)}
    mid = len(got) // 2
    med = got[mid] if len(got) % 2 else 0.5 * (got[mid - 1] + got[mid])
    return {"median": med, "min": got[0], "max": got[-1], "reached": len(got), "of": len(values)}


# --------------------------------------------------------------------------- grokxform sweep


def _median(values: Sequence[float]) -> float:
    got = sorted(values)
    mid = len(got) // 2
    return got[mid] if len(got) % 2 else 0.5 * (got[mid - 1] + got[mid])


UNREACHED_COLOR = "#d9d9d9"
"""Background of a heatmap cell whose members all missed the target (hatched)."""


def plot_heatmap(members: list[dict[str, float]], steps: list[int | None], budget: int, path: Path, title: str,
                 final: Sequence[float] | None = None, metric: str = "accuracy") -> bool:
    """Write :func:`heatmap_figure` to ``path``; False, writing nothing, when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig = heatmap_figure(members, steps, budget, title, final=final, metric=metric)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def heatmap_figure(members: list[dict[str, float]], steps: list[int | None], budget: int, title: str,
                   final: Sequence[float] | None = None, metric: str = "accuracy") -> Any:
    """One cell per configuration, as a matplotlib figure; the first swept axis runs along x, the
    others together along y, so every configuration has a cell named on the axes.

    ``metric="accuracy"``: a cell reads the median steps to the target over the seeds that reached
    it and the count reached/seeds (``"950\\n(2/2)"``), coloured by those steps (viridis, light =
    fast: a colour-blind-safe map). A cell where no seed reached it is hatched grey and reads, in
    italics, the median over its seeds of ``final`` (their last validation accuracy:
    ``"0.41\\n(0/2)"``), or "none in <budget>" without ``final``. ``metric="loss"``: every cell
    reads the median of ``final`` (the validation loss at the budget), coloured by it (light = low).
    Text is dark or light to suit its cell; labels are large."""
    import textwrap

    import matplotlib.pyplot as plt

    names = [k for k in members[0] if k != "seed"]
    xk, yks = (names[0], names[1:]) if names else ("seed", [])
    xs = sorted({m[xk] for m in members})
    ys = sorted({tuple(m[k] for k in yks) for m in members})
    cells = [[float("nan")] * len(xs) for _ in ys]
    labels = [[""] * len(xs) for _ in ys]
    unreached = [[False] * len(xs) for _ in ys]
    for j, yv in enumerate(ys):
        for i, xv in enumerate(xs):
            mine = [k for k, m in enumerate(members) if m[xk] == xv and tuple(m[q] for q in yks) == yv]
            if not mine:
                continue
            if metric == "loss":
                value = _median([final[k] for k in mine]) if final is not None else float("nan")
                cells[j][i], labels[j][i] = value, f"{value:.3f}"
                continue
            got = [steps[k] for k in mine if steps[k] is not None]
            if got:
                cells[j][i] = float(_median(got))
                labels[j][i] = f"{cells[j][i]:.0f}\n({len(got)}/{len(mine)})"
            else:
                unreached[j][i] = True
                labels[j][i] = (f"{_median([final[k] for k in mine]):.2f}\n(0/{len(mine)})" if final is not None
                                else f"none in\n{budget}\n(0/{len(mine)})")
    finite = [v for row in cells for v in row if math.isfinite(v)]
    vmin, vmax = (0.0, float(budget)) if metric != "loss" else (min(finite, default=0.0), max(finite, default=1.0))
    if vmax <= vmin:
        vmax = vmin + 1.0
    fig, ax = plt.subplots(figsize=(1.7 * len(xs) + 3.8, 1.0 * len(ys) + 2.6))
    ax.set_facecolor(UNREACHED_COLOR)
    cmap = plt.get_cmap("viridis_r")
    im = ax.imshow(cells, cmap=cmap, vmin=vmin, vmax=vmax, aspect="auto")
    for j in range(len(ys)):
        for i in range(len(xs)):
            if not labels[j][i]:
                continue
            if unreached[j][i]:
                ax.add_patch(plt.Rectangle((i - 0.5, j - 0.5), 1, 1, facecolor=UNREACHED_COLOR, hatch="//",
                                           edgecolor="0.65"))
                ax.text(i, j, labels[j][i], ha="center", va="center", color="k", fontsize=12, style="italic",
                        bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none", "alpha": 0.8})
                continue
            r, g, b, _ = cmap((cells[j][i] - vmin) / (vmax - vmin))
            color = "k" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "w"
            ax.text(i, j, labels[j][i], ha="center", va="center", color=color, fontsize=12, fontweight="bold")
    ax.set_xticks(range(len(xs)), [f"{xk}={x:g}" for x in xs], fontsize=12)
    ax.set_yticks(range(len(ys)), [", ".join(f"{k}={v:g}" for k, v in zip(yks, y)) or "-" for y in ys], fontsize=12)
    ax.set_xlabel(xk, fontsize=13)
    ax.set_ylabel(", ".join(yks), fontsize=13)
    ax.set_title("\n".join(textwrap.wrap(title, 55)), fontsize=13)
    bar = fig.colorbar(im, ax=ax)
    bar.set_label("validation loss at the budget" if metric == "loss"
                  else "median steps to target (seeds that reached it)", fontsize=12)
    bar.ax.tick_params(labelsize=11)
    if metric != "loss" and final is not None and any(v for row in unreached for v in row):
        fig.text(0.01, 0.01, "hatched, italic: no seed reached the target; the median final validation accuracy",
                 fontsize=10, style="italic")
    fig.tight_layout(rect=(0, 0.03, 1, 1))
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


def run_sweep(method: str, grid: Mapping[str, Sequence[float]], *, seeds: Sequence[int], steps: int,
              device: torch.device, out: Path, task: str = "mul", static: Mapping[str, Any] | None = None,
              compile: bool = False, progress_bar: bool = True, target_accuracy: float | None = None,
              data_root: str | Path | None = None, state_format: str | None = None,
              state_block_size: int = 256) -> SweepResult:
    """:func:`sweep` with a progress bar on stderr (lines without ``progress_bar`` or tqdm); prints
    the members' table and throughput, writes ``<out>.json`` (the result with the device, torch's
    and Python's versions, the date and the git commit: :func:`environment`) and, with two swept
    names or more (a hyperparameter and the seeds), the heatmap ``<out>.png``."""
    t = get_task(task)
    target_accuracy = t.target if target_accuracy is None else target_accuracy
    n = len(seeds)
    for values in grid.values():
        n *= len(values)
    print(f"grokxform sweep: {method} on {t.title}, {n} members"
          f" ({' x '.join(f'{k} {v}' for k, v in grid.items())} x seeds {list(seeds)}) as one vmapped program on"
          f" {device} ({torch.get_num_threads()} CPU thread(s)), budget {steps} steps"
          + ("" if state_format is None else f", state in {state_format}")
          + ("" if state_format != "int8" else f" (blocks of {state_block_size})"), flush=True)
    bar = _SweepProgress(steps, sys.stderr, use_tqdm=progress_bar, target=target_accuracy)
    try:
        result = sweep(method, grid, seeds=seeds, steps=steps, device=device, task=task, static=static,
                       compile=compile, on_eval=bar.update, target_accuracy=target_accuracy, data_root=data_root,
                       state_format=state_format, state_block_size=state_block_size)
    finally:
        bar.close()
    print(result.table())
    print(f"{result.member_steps_per_second:.1f} member-steps/s over {result.steps} steps, {result.seconds:.1f} s")
    payload = {**environment(device), **result.to_json()}
    Path(f"{out}.json").write_text(json.dumps(payload, indent=1))
    what = "validation loss at the budget" if t.metric == "loss" else f"median steps to {target_accuracy:.0%} val acc"
    title = f"{get_method(method).title} on {t.title}: {what}, seeds {list(seeds)}"
    final = result.val_loss[-1] if t.metric == "loss" else result.val_acc[-1]
    if len(result.members[0]) >= 2 and plot_heatmap(result.members, result.steps_to_target, result.steps,
                                                     Path(f"{out}.png"), title, final=final, metric=t.metric):
        print(f"heatmap written to {out}.png, results to {out}.json")
    else:
        print(f"results written to {out}.json (no heatmap: matplotlib missing or nothing swept)")
    return result


__all__ = [
    "SweepResult",
    "check_sweep",
    "compressed",
    "cpu_name",
    "environment",
    "git_commit",
    "grid_members",
    "heatmap_figure",
    "median_and_spread",
    "plot_heatmap",
    "run_sweep",
    "state_bytes",
    "sweep",
]
