"""fp8 (e4m3, per-block scales) against the int8 codes of compressed state on x·y mod 97.

Does fp8 hold any kind of state (EMA μ, Adam's m and v, an MA slot's gradient) better than the
int8 codes of ``gx.compress_state``?

    python benchmarks/fp8_codes.py [--steps 2000] [--out benchmarks/results/cpu_fp8_codes.json]

Both codes take one byte an element and one float32 scale per block of 256 elements.

- int8: :func:`grokxform.transforms.compress.encode` / ``decode`` (signed linear code of the
  block's absmax, rounded to nearest; Adam's v in the unsigned fourth-root code, rounded
  stochastically by a dither of the keys ``gx.compress_state`` gives each tensor at each step).
- fp8: per block, s = absmax / 448 (e4m3's largest finite value), the element x / s rounded to
  ``torch.float8_e4m3fn``, decoded as code · s. For Adam's v two variants: v itself, and √v
  (the root squared on decode; a square root spreads v's range as the int8 code's fourth root does).

Training: the paper's decoder on x·y mod 97 (seed 0, batch 512, the paper's split), Adam with β =
(0.9, 0.98), lr 1e-3, in two chains: AdamW (decoupled weight decay 1.0), and the paper's
Grokfast-EMA (α 0.98, λ 2.0, μ starting from the first gradient, then L2 weight decay 0.005 added to
the gradient, the learning rate warmed up over 10 steps); every step written out in this script:
each step computes in float32 from the decoded state and stores its new state coded (what a
compressed state does), μ, m and v each in the code under test. The float32 run is the reference.
Reported per code: the first step (of every 10th) whose validation accuracy reaches 95%, the final
training and validation accuracy, and the distance of the params from the float32 run's relative to
how far that run moved them, at step 100 and at the end. The script checks its int8 runs against
``gx.compress_state(..., "int8")`` running the same chains (the distances between the two,
``int8_vs_package_early`` and ``int8_vs_package``, show how much of a distance float reassociation
alone makes).

Codec errors: the float32 run's final μ, m, v and last gradient (what an MA window slot holds)
coded and decoded: the relative 2-norm error of each, and of Adam's direction m / (√v + ε).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

import grokxform as gx
from grokxform.experiments.methods import warmed_up
from grokxform.experiments.modular import paper_setup
from grokxform.experiments.sweep import environment
from grokxform.elements import leaf_keys
from grokxform.transforms.compress import _SEED, SCALE_FLOOR, Int8Blocks, _blocks, _unblock, decode, encode

BLOCK = 256
E4M3_MAX = 448.0
LR, BETAS, EPS = 1e-3, (0.9, 0.98), 1e-8
ALPHA, LAMB = 0.98, 2.0
CHAINS = {  # name: (the filter's in it, weight decay, coupled (L2) or decoupled, warm-up steps)
    "adamw": (False, 1.0, False, 0),
    "grokfast_ema": (True, 0.005, True, 10),
}

Codec = Callable[[torch.Tensor, Any], torch.Tensor]
"""A code, coded and decoded: (tensor, its stochastic rounding's key) → tensor."""


def fp8(x: torch.Tensor, key: Any = 0) -> torch.Tensor:
    """e4m3 with one scale per block of :data:`BLOCK` (the int8 code's blocks), coded and decoded
    (rounded to nearest: ``key`` is not used)."""
    b = _blocks(x, BLOCK)
    scale = (b.abs().amax(dim=1, keepdim=True) / E4M3_MAX).clamp_min(SCALE_FLOOR)
    coded = (b / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)  # e4m3fn has no infinity
    return _unblock(coded.to(torch.float32) * scale, x)


def fp8_root(x: torch.Tensor, key: Any = 0) -> torch.Tensor:
    """A non-negative tensor stored as e4m3 of its square root (squared on decode)."""
    return fp8(x.sqrt()).square()


def int8(x: torch.Tensor, key: Any = 0) -> torch.Tensor:
    return decode(encode(x, "int8", key=key))


def int8_nonnegative(x: torch.Tensor, key: Any = 0) -> torch.Tensor:
    return decode(encode(x, "int8", nonnegative=True, key=key))


def identity(x: torch.Tensor, key: Any = 0) -> torch.Tensor:
    return x


CODES: dict[str, tuple[Codec, Codec]] = {  # (signed state: μ and m, Adam's v)
    "float32": (identity, identity),
    "int8": (int8, int8_nonnegative),
    "fp8": (fp8, fp8),
    "fp8_sqrt_v": (fp8, fp8_root),
}


def _loss(model: torch.nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)


def _accuracy(model: torch.nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (torch.func.functional_call(model, params, (x,)).argmax(-1) == y).float().mean().item()


def _batches(steps: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor], list[torch.Tensor], tuple]:
    setup = paper_setup(0)
    n = setup.data.train_targets.shape[0]
    order: list[torch.Tensor] = []
    while len(order) < steps:
        perm = torch.randperm(n, generator=setup.generator)
        order += [perm[i:i + 512] for i in range(0, n, 512)]
    params = {k: v.detach().clone() for k, v in setup.model.named_parameters()}
    return setup.model, params, order[:steps], setup.data


EVAL_EVERY = 10
"""Steps between validation evaluations (the task's epoch)."""
TARGET = 0.95
EARLY = 100
"""The step of the early distance: before a run's small differences have been amplified."""


@dataclass
class Run:
    params: dict[str, torch.Tensor]
    early: dict[str, torch.Tensor]  # the params at step EARLY
    state: dict[str, torch.Tensor]  # the last μ, m, v (as stored, decoded) and gradient, flat
    train_acc: float
    val_acc: float
    steps_to_target: int | None  # the first evaluation at TARGET validation accuracy


def train(steps: int, chain: str, code: str) -> Run:
    """The chain written out, its state stored in ``code`` (int8: with the stochastic rounding's keys
    of ``package_int8``'s state, :func:`keys_of`)."""
    signed, positive = CODES[code]
    filtered, wd, coupled, warmup = CHAINS[chain]
    model, params, order, data = _batches(steps)
    key = keys_of(chain, params)
    mu = {k: torch.zeros_like(v) for k, v in params.items()}
    m = {k: torch.zeros_like(v) for k, v in params.items()}
    v = {k: torch.zeros_like(p) for k, p in params.items()}
    grads: dict[str, torch.Tensor] = {}
    early: dict[str, torch.Tensor] = {}
    reached: int | None = None
    b1, b2 = BETAS
    for t, idx in enumerate(order, start=1):
        grads = torch.func.grad(lambda p: _loss(model, p, data.train_inputs[idx], data.train_targets[idx]))(params)
        lr = LR * min(1.0, (t - 1) / warmup) if warmup else LR  # the paper's LambdaLR warm-up
        for k, g in grads.items():
            # each step computes in float32 from the decoded state and stores its new state coded
            if filtered:  # the paper's filter starts from the first gradient
                new_mu = g if t == 1 else ALPHA * mu[k] + (1 - ALPHA) * g
                mu[k] = signed(new_mu, key(t, "grokfast", "mu", k))
                g = g + LAMB * new_mu
            if coupled:
                g = g + wd * params[k]
            new_m, new_v = b1 * m[k] + (1 - b1) * g, b2 * v[k] + (1 - b2) * g * g
            m[k], v[k] = signed(new_m, key(t, "adam", "mu", k)), positive(new_v, key(t, "adam", "nu", k))
            step = (new_m / (1 - b1**t)) / ((new_v / (1 - b2**t)).sqrt() + EPS)
            params[k] = params[k] - lr * (step if coupled else step + wd * params[k])
        early = dict(params) if t == EARLY else early
        if reached is None and t % EVAL_EVERY == 0 and _accuracy(model, params, data.val_inputs,
                                                                  data.val_targets) >= TARGET:
            reached = t
    last = {"mu": mu, "m": m, "v": v, "grad": grads}
    return Run(params, early, {name: _flat(tree) for name, tree in last.items()},
               _accuracy(model, params, data.train_inputs, data.train_targets),
               _accuracy(model, params, data.val_inputs, data.val_targets), reached)


def package_chain(chain: str) -> gx.GradientTransformation:
    """The chain from the package, its state compressed to int8."""
    filtered, wd, coupled, warmup = CHAINS[chain]
    if filtered:
        tx = gx.grokfast_ema(warmed_up(LR, warmup), ALPHA, LAMB, betas=BETAS, eps=EPS, weight_decay=wd,
                             weight_decay_mode="coupled" if coupled else "decoupled")
    else:
        tx = gx.adamw(warmed_up(LR, warmup), betas=BETAS, eps=EPS, weight_decay=wd)
    return gx.compress_state(tx, "int8", min_size=1)


def keys_of(chain: str, params: dict[str, torch.Tensor]) -> Callable[[int, str, str, str], torch.Tensor]:
    """The stochastic rounding's key of step t's (from 1) new value of the state tensor
    ``part``.``field``[param] (``"adam"``, ``"nu"``, a param's name) in :func:`package_chain`'s
    state: the keys of ``compress_state``, from its step count and the tensor's position among
    the state's leaves (``params``: the model's, which the state's layout follows)."""
    inner = package_chain(chain).init(params).inner
    leaves = pytree.tree_flatten_with_path(inner, is_leaf=lambda x: isinstance(x, Int8Blocks))[0]
    position = {pytree.keystr(path): j for j, (path, _) in enumerate(leaves)}

    def key(t: int, part: str, field: str, name: str) -> torch.Tensor:
        return leaf_keys(_SEED, torch.tensor(t - 1), [position[f"[{part!r}].{field}[{name!r}]"]])[0]

    return key


def package_int8(steps: int, chain: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The same chain from the package, its state compressed to int8: the params at step
    :data:`EARLY` and at the end."""
    model, params, order, data = _batches(steps)
    tx = package_chain(chain)
    state = tx.init(params)
    early: dict[str, torch.Tensor] = {}
    for t, idx in enumerate(order, start=1):
        grads = torch.func.grad(lambda p: _loss(model, p, data.train_inputs[idx], data.train_targets[idx]))(params)
        updates, state = tx.update(grads, state, params)
        params = gx.apply_updates(params, updates)
        early = dict(params) if t == EARLY else early
    return early, params


def _flat(tree: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in tree.values()])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--out", default="benchmarks/results/cpu_fp8_codes.json")
    args = ap.parse_args()
    if args.steps < EARLY:
        ap.error(f"--steps must be at least {EARLY}")
    start = _flat(_batches(1)[1])
    result: dict[str, Any] = {**environment(torch.device("cpu")), "steps": args.steps, "early_step": EARLY,
                              "block_size": BLOCK, "chains": {}}
    for chain, (filtered, *_) in CHAINS.items():
        runs = {code: train(args.steps, chain, code) for code in CODES}
        ref = runs["float32"]

        def distance(params: dict[str, torch.Tensor], to: dict[str, torch.Tensor]) -> float:
            """How far ``params`` are from ``to``, relative to how far the float32 run moved ``to``."""
            return ((_flat(params) - _flat(to)).norm() / (_flat(to) - start).norm()).item()

        rows: dict[str, dict[str, Any]] = {}
        for code, run in runs.items():
            rows[code] = {"steps_to_95": run.steps_to_target, "train_acc": run.train_acc, "val_acc": run.val_acc,
                          "distance_early": distance(run.early, ref.early),
                          "distance": distance(run.params, ref.params)}
        early, final = package_int8(args.steps, chain)
        rows["int8"]["int8_vs_package_early"] = distance(runs["int8"].early, early)
        rows["int8"]["int8_vs_package"] = distance(runs["int8"].params, final)
        errors: dict[str, dict[str, float]] = {}
        state = ref.state
        direction = state["m"] / (state["v"].sqrt() + EPS)
        for code, (signed, positive) in CODES.items():
            if code == "float32":
                continue
            dm, dv = signed(state["m"]), positive(state["v"])
            errors[code] = {"m": _rel(dm, state["m"]), "sqrt_v": _rel(dv.sqrt(), state["v"].sqrt()),
                            "direction": _rel(dm / (dv.sqrt() + EPS), direction),
                            "grad": _rel(signed(state["grad"]), state["grad"])}
            if filtered:
                errors[code]["mu"] = _rel(signed(state["mu"]), state["mu"])
        result["chains"][chain] = {"trajectory": rows, "codec_errors": errors}
        for code in CODES:
            print(chain, code, {k: v if v is None or isinstance(v, int) else f"{v:.3g}" for k, v in rows[code].items()},
                  {k: f"{v:.3g}" for k, v in errors.get(code, {}).items()}, flush=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
