"""What a user gets when the tensors, values and lists an optimizer captured change under it:
``gx.Optimizer`` (default engine, and ``fused=False``) beside ``torch.optim.AdamW``, on the same
scripts. Each probe prints one row per optimizer: what happened (``ok``, the error raised, or a
silent wrong result) and the figure that shows it.

    python benchmarks/torch_side_by_side.py --out benchmarks/results/cpu_side_by_side.json

Runs on the CPU (the default engine there is its foreach backend) in a few minutes; the
``torch.compile`` probes use Inductor, as a user's ``torch.compile`` does.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import io
import json
import platform
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

import grokxform as gx

OPTIMIZERS: dict[str, Callable[[nn.Module, Any], torch.optim.Optimizer]] = {
    "gx.Optimizer": lambda m, lr: gx.Optimizer(m.named_parameters(), gx.adamw, lr=lr, weight_decay=0.01),
    "gx.Optimizer(fused=False)": lambda m, lr: gx.Optimizer(
        m.named_parameters(), gx.adamw, lr=lr, weight_decay=0.01, fused=False),
    "torch.optim.AdamW": lambda m, lr: torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.01),
}


def model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def backward(m: nn.Module, t: int) -> None:
    g = torch.Generator().manual_seed(100 + t)
    dtype = next(m.parameters()).dtype
    x, y = torch.randn(16, 5, generator=g, dtype=dtype), torch.randn(16, 3, generator=g, dtype=dtype)
    for p in m.parameters():
        p.grad = None
    nn.functional.mse_loss(m(x), y).backward()


def train(m: nn.Module, opt: torch.optim.Optimizer, steps: range, **extra: Any) -> None:
    for t in steps:
        backward(m, t)
        opt.step(**extra)


def weights(m: nn.Module) -> list[torch.Tensor]:
    return [p.detach().double().clone() for p in m.parameters()]


def diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    """(``"ok"``, fn's figure) or (the error's type and first line, None)."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            figure = fn()
        noted = [str(w.message).splitlines()[0][:160] for w in caught if issubclass(w.category, (RuntimeWarning, UserWarning))]
        return ("ok" + (f" (warns: {noted[0]})" if noted else ""), figure)
    except Exception as e:  # noqa: BLE001 - the probe reports what the user sees
        return (f"{type(e).__name__}: {str(e).splitlines()[0][:200]}", None)


def each(run: Callable[[nn.Module, torch.optim.Optimizer], Any]) -> dict[str, tuple[str, Any]]:
    """``run(model, optimizer)`` for a fresh model and each optimizer: its :func:`outcome`."""
    out = {}
    for name, make in OPTIMIZERS.items():
        m = model()
        opt = make(m, 1e-2)
        out[name] = outcome(lambda: run(m, opt))
    return out


def probe_replaced_storage() -> dict[str, Any]:
    """1. ``p.data = new`` after the first step, 10 more steps: how far the model's weight moved,
    and its distance to torch AdamW's on the same script."""
    out = {}
    runs = {}
    for name, make in OPTIMIZERS.items():
        m = model()
        opt = make(m, 1e-2)

        def run() -> float:
            train(m, opt, range(1))
            before = m[0].weight.detach().clone()
            m[0].weight.data = m[0].weight.detach().clone()
            train(m, opt, range(1, 11))
            runs[name] = weights(m)
            return (m[0].weight.detach() - before).abs().max().item()

        out[name] = outcome(run)
    for name in OPTIMIZERS:
        what, moved = out[name]
        if name in runs:
            out[name] = (what, {"weight moved": moved, "max |w - torch AdamW's|": diff(runs[name], runs["torch.optim.AdamW"])})
    return out


def probe_cast(convert: str) -> dict[str, Any]:
    """1. ``model.double()`` / ``.half()`` after the first step, 10 more steps: how far the
    weight moved."""

    def run(m: nn.Module, opt: torch.optim.Optimizer) -> float:
        train(m, opt, range(1))
        before = m[0].weight.detach().double().clone()
        getattr(m, convert)()
        train(m, opt, range(1, 11))
        return (m[0].weight.detach().double() - before).abs().max().item()

    return each(run)


def probe_grad_shape() -> dict[str, Any]:
    """2. ``p.grad.data = torch.ones(1)`` for a (3,) bias after two steps."""

    def run(m: nn.Module, opt: torch.optim.Optimizer) -> float:
        train(m, opt, range(2))
        backward(m, 2)
        m[2].bias.grad.data = torch.ones(1)
        before = m[2].bias.detach().clone()
        opt.step()
        return (m[2].bias.detach() - before).abs().max().item()

    return each(run)


def probe_float64_grads() -> dict[str, Any]:
    """2. ``compile_step`` (Inductor) given float64 gradients after its first call, against the
    eager ``tx.update``."""
    from grokxform.fused import compile_step

    tx = gx.adamw(lr=0.1)
    params = {"w": torch.full((5,), 0.5)}
    fused = {"w": params["w"].clone()}
    grads = [{"w": torch.full((5,), 0.5)}, {"w": torch.full((5,), 1.0, dtype=torch.float64)}]

    def run() -> float:
        step = compile_step(tx, fused, backend="inductor")
        state, p = tx.init(params), params
        for g in grads:
            step(g)
            u, state = tx.update(g, state, p)
            p = gx.apply_updates(p, u)
        return (fused["w"] - p["w"]).abs().max().item()

    return {"compile_step(inductor)": outcome(run)}


def roundtrip(sd: Any) -> Any:
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def probe_kept_state_dict() -> dict[str, Any]:
    """3. A state dict taken at step 6 and kept while training goes on to 8; resumed from at 8
    with the step-8 weights and trained to 20: distance to the uninterrupted run."""
    out = {}
    for name, make in OPTIMIZERS.items():

        def run() -> float:
            m = model()
            opt = make(m, 1e-2)
            train(m, opt, range(6))
            kept = opt.state_dict()
            train(m, opt, range(6, 8))
            saved, w8 = roundtrip(kept), copy.deepcopy(m.state_dict())
            train(m, opt, range(8, 20))
            twin = model()
            twin.load_state_dict(w8)
            twin_opt = make(twin, 1e-2)
            twin_opt.load_state_dict(saved)
            train(twin, twin_opt, range(8, 20))
            return diff(weights(twin), weights(m))

        out[name] = outcome(run)
    return out


def probe_compile(lr_kind: str) -> dict[str, Any]:
    """4. ``torch.compile(opt.step)`` (Inductor) with StepLR over 30 steps: graphs Dynamo
    built and distance to the uncompiled run of the same optimizer."""
    from torch._dynamo.utils import counters

    out = {}
    for name, make in OPTIMIZERS.items():
        if "fused=False" in name:
            continue

        def once(compiled: bool) -> tuple[list[torch.Tensor], int]:
            m = model()
            opt = make(m, torch.tensor(0.01) if lr_kind == "tensor" else 0.01)
            sched = torch.optim.lr_scheduler.StepLR(opt, 5, 0.5)
            torch._dynamo.reset()
            counters.clear()
            step = torch.compile(opt.step) if compiled else opt.step
            for t in range(30):
                backward(m, t)
                step()
                sched.step()
            return weights(m), int(counters["stats"]["unique_graphs"])

        def run() -> dict[str, Any]:
            eager, _ = once(False)
            compiled, graphs = once(True)
            return {"graphs": graphs, "max |compiled - uncompiled|": diff(compiled, eager)}

        out[name] = outcome(run)
    return out


def probe_step_argument(given: str) -> dict[str, Any]:
    """5. ``step(eval_loss=...)`` / a misspelt ``trian_loss=``."""

    def run(m: nn.Module, opt: torch.optim.Optimizer) -> None:
        backward(m, 0)
        opt.step(**{given: 1.0})

    return each(run)


def probe_hyperparameter(key: str, value: float) -> dict[str, Any]:
    """6. ``param_groups[0][key] = value`` between steps: the error, or whether the params turned
    non-finite."""

    def run(m: nn.Module, opt: torch.optim.Optimizer) -> dict[str, bool]:
        train(m, opt, range(2))
        opt.param_groups[0][key] = value
        train(m, opt, range(2, 3))
        return {"params finite": all(bool(torch.isfinite(p).all()) for p in m.parameters())}

    return each(run)


def probe_param_list() -> dict[str, Any]:
    """7. A parameter appended to ``group["params"]`` after the first step: whether it is updated."""

    def run(m: nn.Module, opt: torch.optim.Optimizer) -> float:
        train(m, opt, range(1))
        extra = nn.Parameter(torch.ones(2))
        opt.param_groups[0]["params"].append(extra)
        backward(m, 1)
        extra.grad = torch.ones(2)
        opt.step()
        return (extra.detach() - 1).abs().max().item()

    return each(run)


def probe_duplicate() -> dict[str, Any]:
    """7. One tensor given twice: how far one step moved it (AdamW's first step moves by lr)."""
    out = {}
    for name, make in OPTIMIZERS.items():
        p = nn.Parameter(torch.zeros(3))

        def run() -> float:
            if name.startswith("gx"):
                opt = gx.Optimizer([("a", p), ("b", p)], gx.adamw, lr=1e-2,
                                   **({"fused": False} if "fused=False" in name else {}))
            else:
                opt = torch.optim.AdamW([p, p], lr=1e-2)
            p.grad = torch.ones(3)
            opt.step()
            return p.detach().abs().max().item()

        out[name] = outcome(run)
    return out


def rss_mib() -> float:
    """The resident memory of this process now (Linux), in MiB."""
    with open("/proc/self/status") as f:
        kib = next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
    return kib / 1024


def probe_none_patterns(steps: int) -> dict[str, Any]:
    """8. Random subsets of parameters without a gradient for ``steps`` steps: steps built and
    kept, and the growth of the resident memory."""
    out = {}
    for name, make in OPTIMIZERS.items():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(5, 3), *[nn.Linear(3, 3) for _ in range(11)])
        opt = make(m, 1e-2)
        rng = torch.Generator().manual_seed(1)

        def run() -> dict[str, Any]:
            start = rss_mib()
            for t in range(steps):
                keep = (torch.rand(24, generator=rng) < 0.5).tolist()
                backward(m, t)
                for k, p in zip(keep, m.parameters()):
                    if not k:
                        p.grad = None
                opt.step()
            figures: dict[str, Any] = {"RSS growth (MiB)": round(rss_mib() - start, 1)}
            built = getattr(opt, "_fused_steps", {}).get(0)
            if built is not None:
                figures.update(built=built[1].compiles, kept=len(built[1]._fns))
            return figures

        out[name] = outcome(run)
    return out


def probe_checkpoint(kind: str) -> dict[str, Any]:
    """11. A tampered checkpoint: a step count of -1, or NaN first moments; then one step."""

    def run(m: nn.Module, opt: torch.optim.Optimizer) -> dict[str, bool]:
        train(m, opt, range(3))
        sd = copy.deepcopy(opt.state_dict())
        entry = sd["state"][0]
        if kind == "count":
            key = "step" if "step" in entry else "inner_state.adam.count"
            entry[key] = torch.full_like(entry[key], -1)
        else:
            key = "exp_avg" if "exp_avg" in entry else "inner_state.adam.mu"
            entry[key].fill_(float("nan"))
        opt.load_state_dict(sd)
        train(m, opt, range(3, 4))
        return {"params finite after a step": all(bool(torch.isfinite(p).all()) for p in m.parameters())}

    return each(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/results/cpu_side_by_side.json")
    parser.add_argument("--none-steps", type=int, default=1500)
    args = parser.parse_args()
    torch.set_num_threads(1)
    probes = {
        "1 p.data = new tensor": probe_replaced_storage,
        "1 model.double()": lambda: probe_cast("double"),
        "1 model.half()": lambda: probe_cast("half"),
        "2 p.grad.data = torch.ones(1)": probe_grad_shape,
        "2 float64 gradients after the first call": probe_float64_grads,
        "3 state_dict kept while training goes on": probe_kept_state_dict,
        "4 torch.compile(opt.step), float lr": lambda: probe_compile("float"),
        "4 torch.compile(opt.step), tensor lr": lambda: probe_compile("tensor"),
        "5 step(eval_loss=...)": lambda: probe_step_argument("eval_loss"),
        "5 step(trian_loss=...)": lambda: probe_step_argument("trian_loss"),
        "6 lr = nan": lambda: probe_hyperparameter("lr", float("nan")),
        "6 lr = inf": lambda: probe_hyperparameter("lr", float("inf")),
        "6 lr = -1e-3": lambda: probe_hyperparameter("lr", -1e-3),
        "6 weight_decay = -5": lambda: probe_hyperparameter("weight_decay", -5.0),
        "6 eps = -1": lambda: probe_hyperparameter("eps", -1.0),
        "7 a parameter appended to group['params']": probe_param_list,
        "7 one tensor given twice": probe_duplicate,
        f"8 random None gradients, {args.none_steps} steps": lambda: probe_none_patterns(args.none_steps),
        "11 checkpoint with count -1": lambda: probe_checkpoint("count"),
        "11 checkpoint with NaN moments": lambda: probe_checkpoint("nan"),
    }
    results = {}
    for title, fn in probes.items():
        results[title] = fn()
        print(f"\n{title}")
        for who, (what, figure) in results[title].items():
            print(f"  {who:28s} {what}" + (f"  {figure}" if figure is not None else ""))
    payload = {
        "device": f"CPU ({platform.processor() or platform.machine()}), 1 thread",
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
        "command": f"python benchmarks/torch_side_by_side.py --out {args.out}",
        "probes": {k: {who: {"outcome": what, "figures": figure} for who, (what, figure) in v.items()}
                   for k, v in results.items()},
    }
    with open(args.out, "w") as f:
        json.dump(payload, f, indent=1)
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
