"""FSDP2 at GPT-2-small shapes: the step time of each rank with grokxform's optimizers beside
``torch.optim.AdamW``, in one run, and how far ``grokxform.adamw`` lands from torch's AdamW.

    torchrun --nproc-per-node 2 benchmarks/fsdp2_gpt2.py --out fsdp2_gpt2.json

Each optimizer gets a fresh model from the same seed (12 blocks, d=768, 12 heads, vocab 50257,
context 1024: 124M parameters), sharded with ``fully_shard`` per block and at the root (bf16
compute, fp32 gradient reduction and fp32 sharded master weights), the same batches, ``--warmup``
untimed steps, then ``--steps`` timed ones. Per rank and step: the forward and backward time and
the ``opt.step()`` time, by CUDA events. Then ``gx.adamw`` and torch's AdamW take 5 steps on the
same seeded gradients and the largest parameter difference is reported. ``--device cpu --tiny`` runs it on the CPU with gloo (a
check of the script, no timing worth reading).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import grokxform as gx


class Block(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2)
                   for z in self.qkv(self.ln1(x)).split(c, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).reshape(b, t, c)
        x = x + self.proj(y)
        return x + self.out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    def __init__(self, vocab: int, ctx: int, d: int, layers: int, heads: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(ctx, d)
        self.blocks = nn.ModuleList(Block(d, heads) for _ in range(layers))
        self.ln_f = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for blk in self.blocks:
            x = blk(x)
        return self.head(self.ln_f(x))


OPTIMIZERS: dict[str, Callable[[nn.Module], torch.optim.Optimizer]] = {
    "torch.optim.AdamW(foreach)": lambda m: torch.optim.AdamW(m.parameters(), lr=3e-4, weight_decay=0.01),
    "torch.optim.AdamW(fused)": lambda m: torch.optim.AdamW(m.parameters(), lr=3e-4, weight_decay=0.01, fused=True),
    "gx.adamw": lambda m: gx.Optimizer(m.named_parameters(), gx.adamw, lr=3e-4, weight_decay=0.01),
    "gx.grokfast_ema": lambda m: gx.Optimizer(m.named_parameters(), gx.grokfast_ema, lr=3e-4, weight_decay=0.01),
    "gx.grokfast_ma(w=100)": lambda m: gx.Optimizer(m.named_parameters(), gx.grokfast_ma, lr=3e-4, window_size=100),
    "gx.grokadamw(clip=1.0)": lambda m: gx.Optimizer(m.named_parameters(), gx.grokadamw, lr=3e-4,
                                                     gradient_clipping=1.0),
}


def build(args: argparse.Namespace, device: torch.device, mesh: Any) -> nn.Module:
    torch.manual_seed(0)
    shape = (512, 64, 64, 2, 4) if args.tiny else (50257, 1024, 768, 12, 12)
    m = GPT(*shape).to(device)
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if device.type == "cuda" else None
    kw = {"mesh": mesh, **({"mp_policy": mp} if mp is not None else {})}
    for blk in m.blocks:
        fully_shard(blk, **kw)
    fully_shard(m, **kw)
    return m


def batches(args: argparse.Namespace, device: torch.device, rank: int, n: int) -> list[torch.Tensor]:
    vocab, ctx = (512, 64) if args.tiny else (50257, 1024)
    g = torch.Generator().manual_seed(1000 + rank)
    return [torch.randint(0, vocab, (args.batch, ctx + 1), generator=g).to(device) for _ in range(n)]


def loss_of(m: nn.Module, seq: torch.Tensor) -> torch.Tensor:
    logits = m(seq[:, :-1])
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), seq[:, 1:].reshape(-1))


def timed(device: torch.device, fn: Callable[[], Any]) -> float:
    """Milliseconds of ``fn`` (CUDA events on the GPU)."""
    if device.type == "cuda":
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def run(name: str, args: argparse.Namespace, device: torch.device, mesh: Any, data: list[torch.Tensor]) -> dict[str, Any]:
    if device.type == "cuda":  # the previous run's model and state are gone
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    m = build(args, device, mesh)
    opt = OPTIMIZERS[name](m)
    fb, st = [], []
    signal = torch.zeros((), device=device)
    extra = {"train_loss": signal, "val_loss": signal} if "grok" in name else {}
    def fwd_bwd(seq: torch.Tensor) -> None:
        opt.zero_grad(set_to_none=True)
        loss = loss_of(m, seq)
        loss.backward()
        signal.copy_(loss.detach())

    for i, seq in enumerate(data):
        t_fb = timed(device, lambda: fwd_bwd(seq))  # noqa: B023 - called at once
        t_st = timed(device, lambda: opt.step(**extra))
        if i >= args.warmup:
            fb.append(t_fb)
            st.append(t_st)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    out = {"step_ms_median": statistics.median(st), "step_ms_min": min(st), "fwd_bwd_ms_median": statistics.median(fb),
           "train_step_ms_median": statistics.median(a + b for a, b in zip(fb, st)), "peak_mem_gib": peak,
           "engine": getattr(opt, "engines", None)}
    return out


def agreement(args: argparse.Namespace, device: torch.device, mesh: Any, steps: int = 5) -> float:
    """Max |θ_gx.adamw − θ_torch.AdamW(foreach)| after ``steps`` FSDP2 steps from the same start on
    the same gradients (seeded, set on the sharded params: the backward pass, whose bf16 kernels
    need not be deterministic, is left out)."""
    from grokxform import distributed as gxd

    finals = []
    for name in ("torch.optim.AdamW(foreach)", "gx.adamw"):
        m = build(args, device, mesh)
        opt = OPTIMIZERS[name](m)
        for t in range(steps):
            g = torch.Generator(device=device).manual_seed(t)
            for p in m.parameters():
                whole = torch.randn(p.shape, generator=g, device=device) * 1e-2
                spec = gxd.shard_of(p)
                p.grad = gxd.wrap(gxd.local_piece(whole, spec).contiguous(), spec)
            opt.step()
        finals.append({n: p.detach().full_tensor() for n, p in m.named_parameters()})
    return max((finals[0][n] - finals[1][n]).abs().max().item() for n in finals[0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    mesh = init_device_mesh(device.type, (world,))
    data = batches(args, device, rank, args.warmup + args.steps)
    per_rank: dict[str, Any] = {}
    for name in OPTIMIZERS:
        try:
            per_rank[name] = run(name, args, device, mesh, data)
        except Exception as e:  # noqa: BLE001 - a baseline torch cannot run here is reported, not fatal
            per_rank[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        if rank == 0:
            print(name, per_rank[name], flush=True)
    diff = agreement(args, device, mesh)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, per_rank)
    if rank == 0:
        result = {
            "what": "FSDP2 (fully_shard per block and root, bf16 compute, fp32 reduce and master weights), GPT-2-small"
                    " shapes (124M params), step time per rank: opt.step() and forward+backward, CUDA events, median"
                    f" of {args.steps} steps after {args.warmup} warm-up steps",
            "world_size": world, "batch_per_rank": args.batch, "context": 64 if args.tiny else 1024,
            "device": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
            "torch": torch.__version__, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "max_abs_diff_gx_adamw_vs_torch_adamw_5_steps_same_grads": diff, "lr": 3e-4,
            "per_rank": {f"rank{r}": g for r, g in enumerate(gathered)},
        }
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(json.dumps(result, indent=1), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
