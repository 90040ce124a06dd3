"""Which state costs Grokfast-MA its language-model loss in int8? The byte-level language model
(``grokxform.experiments.lm``) trained with Grokfast-MA at the paper's settings (w 100, λ 5, L2
weight decay 0.01, Adam β = (0.9, 0.98), lr 1e-3; the sweep's method ``grokfast_ma``), its chain
rebuilt with one part of its state compressed at a time:

==============  ===========================================================================
role            compressed
==============  ===========================================================================
``float32``     nothing (the chain is ``grokfast_ma_l2``'s, the same numbers)
``window``      the filter (``compress_state(amplify(ma_filter), "int8")``): the window's slots
``adam``        Adam (``compress_state(scale_by_adam, "int8")``): m and v
``m``           Adam's m in int8, v in ``"bf16"`` (24 bits: within 2⁻¹⁷ of float32)
``v``           Adam's v in int8 (its unsigned code), m in ``"bf16"``
``mixed``       the window in ``"int8"``, Adam's m and v in ``"bf16_sr"``
``v_ceil``      as ``adam``, v's fourth-root code rounded up instead of to nearest
``v_near``      as ``adam``, v's code the one whose value is nearest to v
``v_near_sqrt`` as ``adam``, v's code the one whose value's square root is nearest to √v
``v_pow2``      as ``adam``, v in a square-root code: value = max·(code/255)² (not the fourth power)
``v_b32``       as ``adam``, v's fourth-root code in blocks of 32 (m's stay 256)
``sr_v``        int8 throughout (the window and Adam) in the package's codes: the signed ones
                (the window's slots, m) rounded to nearest, v's rounded stochastically and a
                positive v never coded 0
==============  ===========================================================================

The committed results (``benchmarks/results/compress_quality/cpu_lm_roles/``) of every role but
``sr_v`` were measured when ``"int8"`` rounded every code to nearest (commit acd33bf and before):
they found the loss in v's rounding. ``sr_v`` was measured with its codes written into this
script, v's random numbers the counter-based hash of ``"bf16_sr"``; the package's codes
(:func:`grokxform.transforms.compress.encode`) now take a dither instead, and the role runs them.
The ``v_*`` roles' codes round to nearest (or up) still.

``m`` and ``v`` hold one field of the same ``compress_state(adam, "int8")`` near float32 by
coding it in ``"bf16"`` instead; the ``v_*`` roles code v another way (the codec's choice per
field, swapped in for the run: :func:`swap_codes`). Each
(role, seed) is one sweep on the CPU, written to ``OUT/<role>__s<seed>.json`` (skipped when it
exists); then ``OUT/summary.md`` puts each role beside float32, seed by seed.

Usage:
    python benchmarks/compressed_roles.py --roles window,adam,m,v,mixed --seeds 0 --out OUT
    python benchmarks/compressed_roles.py --summarize --out OUT
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import grokxform.experiments.methods as methods
import grokxform.transforms.compress as compress
from grokxform import amplify, decoupled_weight_decay, ma_filter, scale_by_adam, scale_by_learning_rate
from grokxform.base import GradientTransformation, named_chain
from grokxform.experiments.sweep import environment, sweep

ROLES = ("float32", "window", "adam", "m", "v", "mixed", "v_ceil", "v_near", "v_near_sqrt", "v_pow2", "v_b32",
         "sr_v")
STEPS = 2000


def chain_for(role: str) -> Any:
    """A stand-in for :func:`grokxform.grokfast_ma` (as ``grokfast_ma_l2`` calls it, coupled L2)
    with ``role``'s part compressed."""

    def build(lr: Any, window_size: int, lamb: Any, betas: tuple[Any, Any], weight_decay: Any,
              weight_decay_mode: str) -> GradientTransformation:
        assert weight_decay_mode == "coupled"
        pre = amplify(ma_filter(window_size, "mean", True), lamb)
        adam = scale_by_adam(betas[0], betas[1], 1e-8)
        if role in ("window", "mixed", "sr_v"):
            pre = compress.compress_state(pre, "int8")
        if role in ("adam", "m", "v", "sr_v") or role.startswith("v_"):
            adam = compress.compress_state(adam, "int8")
        if role == "mixed":
            adam = compress.compress_state(adam, "bf16_sr")
        return named_chain(("grokfast", pre), ("weight_decay", decoupled_weight_decay(weight_decay)),
                           ("adam", adam), ("lr", scale_by_learning_rate(lr)))

    return build


V_BLOCK = 32
"""``v_b32``'s block size for v."""


def v_codes(x: torch.Tensor, rule: str, block_size: int) -> Any:
    """v (non-negative) in ``"int8"``'s unsigned code, each code chosen by ``rule``: ``"ceil"``
    (the fourth-root code rounded up), ``"near"`` (the code whose value is nearest to v),
    ``"near_sqrt"`` (whose value's square root is nearest to √v) or ``"pow2"`` (a square-root
    code: value = max·(code/255)², :func:`swap_codes` decodes it)."""
    q, scale = compress._scaled(x, block_size, True)
    q = q.clamp(0.0, 1.0)
    t = q.sqrt().sqrt() * 255.0
    if rule == "pow2":
        codes = torch.round(q.sqrt() * 255.0)
    elif rule == "ceil":
        codes = torch.ceil(t).clamp(0.0, 255.0)
    else:
        lo = torch.floor(t).clamp(0.0, 254.0)
        hi = lo + 1.0
        dlo, dhi = (lo / 255.0) ** 4, (hi / 255.0) ** 4
        if rule == "near":
            codes = torch.where(q - dlo <= dhi - q, lo, hi)
        else:
            codes = torch.where(q.sqrt() - dlo.sqrt() <= dhi.sqrt() - q.sqrt(), lo, hi)
    return compress.Int8Blocks(compress._unblock(codes.to(torch.uint8), x), scale)


def swap_codes(role: str) -> None:
    """The codecs of ``role`` in place of ``compress``'s: for ``m`` (``v``) the other field, v
    (m), in ``"bf16"`` where int8 would code it; for a ``v_*`` role v coded by its rule
    (:func:`v_codes`; ``v_b32``: the fourth-root code in blocks of :data:`V_BLOCK`)."""
    encode, decode, zeros = compress.encode, compress.decode, compress._zeros
    exact = {"m": True, "v": False}.get(role)  # the field kept near float32: v (non-negative) or m
    rule = role[2:] if role.startswith("v_") else None

    def encode_field(x: torch.Tensor, fmt: str, *, nonnegative: bool = False, block_size: int = 256,
                     key: Any = 0) -> Any:
        if fmt == "int8" and nonnegative == exact:
            return encode(x, "bf16", block_size=block_size, key=key)
        if fmt == "int8" and nonnegative and rule == "b32":
            return encode(x, fmt, nonnegative=True, block_size=V_BLOCK, key=key)
        if fmt == "int8" and nonnegative and rule is not None:
            return v_codes(x, rule, block_size)
        return encode(x, fmt, nonnegative=nonnegative, block_size=block_size, key=key)

    def decode_field(packed: Any, block_size: int = 256) -> torch.Tensor:
        if rule in ("b32", "pow2") and isinstance(packed, compress.Int8Blocks) and packed.codes.dtype == torch.uint8:
            if rule == "b32":
                return decode(packed, V_BLOCK)
            t = compress._blocks(packed.codes, block_size).to(torch.float32) * (1.0 / 255.0)
            return compress._unblock(t * t * packed.scales.unsqueeze(1), packed.codes)
        return decode(packed, block_size)

    def zeros_field(like: torch.Tensor, fmt: str, nonnegative: bool, block_size: int) -> Any:
        if fmt == "int8" and nonnegative == exact:
            return zeros(like, "bf16", nonnegative, block_size)
        return zeros(like, fmt, nonnegative, V_BLOCK if rule == "b32" and nonnegative else block_size)

    compress.encode, compress.decode = encode_field, decode_field  # type: ignore[assignment]
    compress._zeros = zeros_field  # type: ignore[assignment]


def run(role: str, seed: int, out: Path) -> str:
    path = out / f"{role}__s{seed}.json"
    if path.exists():
        return f"{path.name}: done already"
    torch.set_num_threads(1)
    saved = methods.grokfast_ma, compress.encode, compress.decode, compress._zeros
    methods.grokfast_ma = chain_for(role)  # type: ignore[assignment]
    if role in ("m", "v") or role.startswith("v_"):
        swap_codes(role)
    t0 = time.perf_counter()
    try:
        res = sweep("grokfast_ma", {"lr": [1e-3]}, seeds=[seed], steps=STEPS, task="lm", device="cpu")
    finally:
        methods.grokfast_ma, compress.encode, compress.decode, compress._zeros = saved  # type: ignore[assignment]
    payload = {**environment(torch.device("cpu")), **res.to_json(), "role": role, "seed": seed,
               "seconds_total": time.perf_counter() - t0}
    path.write_text(json.dumps(payload))
    return f"{path.name}: val loss {res.val_loss[-1][0]:.4f} at step {res.steps}, {time.perf_counter() - t0:.0f} s"


def summarize(out: Path) -> list[str]:
    runs = [json.loads(p.read_text()) for p in sorted(out.glob("*__s*.json"))]
    base = {r["seed"]: r["val_loss"][-1][0] for r in runs if r["role"] == "float32"}
    lines = ["| role | seed | val loss at step 2,000 | vs float32 | state bytes |", "| --- | --- | --- | --- | --- |"]
    for role in ROLES:
        for r in sorted((r for r in runs if r["role"] == role), key=lambda r: r["seed"]):
            loss = r["val_loss"][-1][0]
            ref = base.get(r["seed"])
            vs = "" if ref is None or role == "float32" else f"{100 * (loss / ref - 1):+.2f}%"
            lines.append(f"| {role} | {r['seed']} | {loss:.4f} | {vs} | {r['state_bytes'] / 1e6:.1f} MB |")
    deltas = {role: [100 * (r["val_loss"][-1][0] / base[r["seed"]] - 1) for r in runs
                     if r["role"] == role and r["seed"] in base] for role in ROLES[1:]}
    lines += ["", "Mean change over the seeds with a float32 run: " + ", ".join(
        f"{role} {statistics.mean(d):+.2f}%" for role, d in deltas.items() if d)]
    first = next(iter(runs), None)
    if first is not None:
        lines += ["", f"Ran on: {first['device_name']}, torch {first['torch']}, Python {first['python']}."]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--roles", default=",".join(ROLES))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--summarize", action="store_true")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if not args.summarize:
        roles = args.roles.split(",")
        for role in roles:
            if role not in ROLES:
                ap.error(f"--roles: {role!r} is not one of {', '.join(ROLES)}")
        for role in roles:
            for seed in map(int, args.seeds.split(",")):
                print(run(role, seed, args.out), flush=True)
    print("\n".join(summarize(args.out)))


if __name__ == "__main__":
    main()
