"""``benchmarks/fp8_codes.py``, the measurement behind offering no fp8 state format: its e4m3
code is what it says, and its hand-written chains are the package's."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import pytest
import torch
from scripts import benchmark_script


@pytest.fixture(scope="module")
def script() -> Iterator[ModuleType]:
    yield from benchmark_script("fp8_codes")


def test_e4m3_blocks_keep_three_significand_bits_and_decode_the_absmax_exactly(script: ModuleType) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3 * 256 + 17, generator=g) * torch.logspace(-3, 3, 3 * 256 + 17)
    y = script.fp8(x)
    assert y.shape == x.shape and not torch.isnan(y).any()
    blocks = torch.nn.functional.pad(x, (0, 256 - 17)).reshape(-1, 256)
    top = blocks.abs().amax(dim=1)
    dec = torch.nn.functional.pad(y, (0, 256 - 17)).reshape(-1, 256)
    assert torch.equal(dec.abs().amax(dim=1), top)  # 448 is a code: the largest element comes back
    normal = blocks.abs() >= top.unsqueeze(1) * 2.0**-6 / 448  # e4m3's normal range
    err = (dec - blocks).abs()
    assert (err[normal] <= blocks.abs()[normal] * 2.0**-4 * (1 + 1e-6)).all()  # half an ulp of 3 bits
    assert (err[normal] > 0).any()  # it is a lossy code: a test of it can fail
    root = script.fp8_root(x.abs())
    assert ((root - x.abs()).abs() <= x.abs() * 0.13 + top.max() * 1e-9).all()  # (1 + 2^-4)^2 - 1 < 0.13


@pytest.mark.parametrize("chain", ["adamw", "grokfast_ema"])
def test_the_hand_written_int8_chain_is_the_packages(script: ModuleType, chain: str) -> None:
    """Three steps of the script's int8 run against ``gx.compress_state(..., "int8")`` on the same
    chain, and its float32 run's first step against the float32 one: the script measures the
    package's codes, not an imitation of them."""
    hand = script.train(3, chain, "int8").params
    _, package = script.package_int8(3, chain)
    start = script._flat(script._batches(1)[1])
    moved = (script._flat(package) - start).norm()
    assert ((script._flat(hand) - script._flat(package)).norm() / moved).item() < 1e-3
    float32 = script._flat(script.train(3, chain, "float32").params)
    assert ((float32 - script._flat(hand)).norm() / moved).item() > 1e-3  # the codes change the run
