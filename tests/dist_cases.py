"""The runs of tests/test_distributed.py: one model, one data stream, the pipelines of
``cases.SHARDABLE`` (the aliases that take sharded params), trained in one process or on 2 ranks
(FSDP2 or DDP), checkpointed with ``torch.distributed.checkpoint``.

``python tests/dist_cases.py OUT CKPT1`` is one rank of the 2-rank run (RANK, WORLD_SIZE,
MASTER_ADDR and MASTER_PORT in the environment); it writes ``OUT/rank{r}.pt`` with the full
parameters each case reached.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from cases import SHARDABLE
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import grokxform as gx
from grokxform.base import elementwise

STEPS, SAVE_AT, BATCH = 6, 3, 16

def model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 8), torch.nn.Tanh(),
                               torch.nn.Linear(8, 3))


def batch(t: int, rank: int = 0, world: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Step ``t``'s batch, or rank ``rank``'s equal part of it."""
    g = torch.Generator().manual_seed(t)
    x = torch.randn(BATCH, 6, generator=g)
    y = torch.sin(x[:, :3] * 2.0)
    n = BATCH // world
    return x[rank * n:(rank + 1) * n], y[rank * n:(rank + 1) * n]


def optimizer(m: torch.nn.Module, name: str, groups: bool = False, **kw: Any) -> gx.Optimizer:
    """The pipeline over ``m``'s named parameters; with ``groups``, as transformers' Trainer builds
    it: a decay and a no-decay group of unnamed parameters, named by ``module=``."""
    case = SHARDABLE[name]
    if not groups:
        return gx.Optimizer(m.named_parameters(), case.factory, **case.kwargs, **kw)
    decay = [p for n, p in m.named_parameters() if n.endswith("weight")]
    rest = [p for n, p in m.named_parameters() if not n.endswith("weight")]
    split = [{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}]
    return gx.Optimizer(split, case.factory, module=m, **case.kwargs, **kw)


def train(m: torch.nn.Module, opt: torch.optim.Optimizer, start: int, stop: int, rank: int = 0, world: int = 1) -> None:
    for t in range(start, stop):
        x, y = batch(t, rank, world)
        loss = torch.nn.functional.mse_loss(m(x), y)
        opt.zero_grad()
        loss.backward()
        signal = torch.tensor(0.1 * (t + 1))  # the same on every rank
        opt.step(train_loss=signal, val_loss=signal * 2)


def full_params(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in m.named_parameters():
        p = p.detach()
        out[n.removeprefix("module.")] = (p.full_tensor() if hasattr(p, "full_tensor") else p).clone()
    return out


def save(m: torch.nn.Module, opt: torch.optim.Optimizer, path: str) -> None:
    msd, osd = get_state_dict(m, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)


def load(m: torch.nn.Module, opt: torch.optim.Optimizer, path: str) -> None:
    msd, osd = get_state_dict(m, opt)  # the layout to load into (sharded like this run)
    sd = {"model": msd, "optim": osd}
    dcp.load(sd, checkpoint_id=path)
    set_state_dict(m, opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def single(name: str, ckpt: str | None = None, resume: str | None = None, **kw: Any) -> dict[str, torch.Tensor]:
    """One process: ``STEPS`` steps (saving at ``SAVE_AT`` to ``ckpt``), or from ``resume``'s
    checkpoint at ``SAVE_AT`` to ``STEPS``."""
    m = model()
    opt = optimizer(m, name, **kw)
    if resume is not None:
        load(m, opt, resume)
        train(m, opt, SAVE_AT, STEPS)
        return full_params(m)
    train(m, opt, 0, SAVE_AT)
    if ckpt is not None:
        save(m, opt, ckpt)
    train(m, opt, SAVE_AT, STEPS)
    return full_params(m)


def sharded(name: str, rank: int, world: int, how: str, ckpt: str | None = None, resume: str | None = None,
            **kw: Any) -> dict[str, torch.Tensor]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    m = model()
    if how == "fsdp2":
        mesh = init_device_mesh("cpu", (world,))
        for layer in m:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(m, mesh=mesh)
    else:
        m = torch.nn.parallel.DistributedDataParallel(m)
    opt = optimizer(m, name, **kw)
    if resume is not None:
        load(m, opt, resume)
        train(m, opt, SAVE_AT, STEPS, rank, world)
        return full_params(m)
    train(m, opt, 0, SAVE_AT, rank, world)
    if ckpt is not None:
        save(m, opt, ckpt)
    train(m, opt, SAVE_AT, STEPS, rank, world)
    if how == "fsdp2":  # opt.state lists each parameter's state tensors as DTensors (ring buffers aside)
        views = [(k, v) for st in opt.state.values() for k, v in st.items() if v.dim() > 0]
        assert views and all(hasattr(v, "placements") for k, v in views if not k.endswith(".buffers")), views
    return full_params(m)


def full_state_resume(name: str, rank: int, world: int) -> dict[str, torch.Tensor]:
    """FSDP2: the whole (gathered) model and optimizer state dicts at ``SAVE_AT``, set into a fresh
    sharded run that continues to ``STEPS``."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    def fresh() -> tuple[torch.nn.Module, gx.Optimizer]:
        m = model()
        fully_shard(m, mesh=init_device_mesh("cpu", (world,)))
        return m, optimizer(m, name)

    m, opt = fresh()
    train(m, opt, 0, SAVE_AT, rank, world)
    full = StateDictOptions(full_state_dict=True)
    msd, osd = get_state_dict(m, opt, options=full)
    m, opt = fresh()
    set_state_dict(m, opt, model_state_dict=msd, optim_state_dict=osd, options=full)
    train(m, opt, SAVE_AT, STEPS, rank, world)
    return full_params(m)


def all_reduces_per_step(name: str, rank: int, world: int) -> int:
    """How many all-reduces one ``opt.step()`` of an FSDP2 model makes."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    m = model()
    fully_shard(m, mesh=init_device_mesh("cpu", (world,)))
    opt = optimizer(m, name)
    train(m, opt, 0, 2, rank, world)  # built and warm
    x, y = batch(2, rank, world)
    opt.zero_grad()
    torch.nn.functional.mse_loss(m(x), y).backward()
    calls = []
    real = dist.all_reduce

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    dist.all_reduce = counting  # type: ignore[assignment]
    try:
        opt.step(train_loss=0.5, val_loss=1.0)
    finally:
        dist.all_reduce = real  # type: ignore[assignment]
    return len(calls)


def _projection() -> gx.GradientTransformation:
    """Half the gradient's component along the weights removed, per leaf: a primitive whose scalar
    rule reads per-leaf sums (⟨g, θ⟩ and ‖θ‖², of whole leaves when they are sharded)."""

    def rule(v: Any, sc: Any) -> dict[str, Any]:
        return {"out": v.x - v.param * sc.c}

    def sums(v: Any, sc: Any) -> dict[str, Any]:
        return {"xw": v.x * v.param, "ww": v.param * v.param}

    def scalars(ctx: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        return {"c": 0.5 * ctx.reduced["xw"] / (ctx.reduced["ww"] + 1e-30)}, {}

    return elementwise("project", rule, scalars=scalars, sums=sums, needs_params=True)


def _functional_tx() -> gx.GradientTransformation:
    return gx.chain(gx.clip_by_global_norm(0.05), _projection(), gx.grokfast_ma(lr=1e-2, window_size=3))


def functional(rank: int, world: int) -> dict[str, Any]:
    """``tx.init`` / ``tx.update`` on a tree of DTensors (rows sharded over the ranks): a global
    clip, per-leaf sums and an MA window."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    tx = _functional_tx()
    full = full_params(model())
    params = {n: distribute_tensor(p, mesh, [Shard(0)]) for n, p in full.items()}
    state = tx.init(params)
    leaves = [x for x in torch.utils._pytree.tree_leaves(state) if isinstance(x, torch.Tensor) and x.dim() > 0]
    sharded = all(hasattr(x, "placements") and x.to_local().shape[0] < x.shape[0] for x in leaves)
    ups = []
    for t in range(3):
        g = torch.Generator().manual_seed(100 + t)
        grads = {n: distribute_tensor(torch.randn(p.shape, generator=g), mesh, [Shard(0)]) for n, p in full.items()}
        u, state = tx.update(grads, state, params)
        ups.append({n: v.full_tensor() for n, v in u.items()})
    leaves = [x for x in torch.utils._pytree.tree_leaves(state) if isinstance(x, torch.Tensor) and x.dim() > 0]
    sharded = sharded and all(hasattr(x, "placements") and x.to_local().shape[0] < x.shape[0] for x in leaves)
    return {"updates": ups, "state_sharded": sharded, "state_leaves": len(leaves)}


def functional_reference() -> list[dict[str, torch.Tensor]]:
    tx = _functional_tx()
    params = full_params(model())
    state = tx.init(params)
    ups = []
    for t in range(3):
        g = torch.Generator().manual_seed(100 + t)
        grads = {n: torch.randn(p.shape, generator=g) for n, p in params.items()}
        u, state = tx.update(grads, state, params)
        ups.append(u)
    return ups


def main(out: str, ckpt1: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(1)
    results: dict[str, Any] = {}
    for name in SHARDABLE:
        results[f"fsdp2/{name}"] = sharded(name, rank, world, "fsdp2", ckpt=os.path.join(out, f"ckpt2_{name}"))
        results[f"ddp/{name}"] = sharded(name, rank, world, "ddp")
        results[f"resume_1to2/{name}"] = sharded(name, rank, world, "fsdp2", resume=os.path.join(ckpt1, name))
    results["fsdp2_groups/grokadamw"] = sharded("grokadamw", rank, world, "fsdp2", groups=True)
    results["fsdp2_eager/grokadamw"] = sharded("grokadamw", rank, world, "fsdp2", fused=False)
    results["fsdp2_eager/grokfast_ma"] = sharded("grokfast_ma", rank, world, "fsdp2", fused=False)
    results["full_state/grokfast_ma"] = full_state_resume("grokfast_ma", rank, world)
    results["all_reduces/grokadamw"] = all_reduces_per_step("grokadamw", rank, world)
    results["all_reduces/adamw"] = all_reduces_per_step("adamw", rank, world)
    results["functional"] = functional(rank, world)
    torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
