"""``benchmarks/compressed_roles.py``: each role compresses the part it names, the float32 role is
the comparison's Grokfast-MA, and a run leaves the codecs as it found them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from scripts import benchmark_script

import grokxform.transforms.compress as compress
from grokxform.experiments.sweep import sweep


@pytest.fixture(scope="module")
def roles() -> Iterator[ModuleType]:
    yield from benchmark_script("compressed_roles")


def test_every_role_runs_and_leaves_the_codecs_as_they_were(roles: ModuleType, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(roles, "STEPS", 2)
    codecs = compress.encode, compress.decode, compress._zeros
    for role in roles.ROLES:
        roles.run(role, 0, tmp_path)
        assert (compress.encode, compress.decode, compress._zeros) == codecs, role
    got = {r: json.loads((tmp_path / f"{r}__s0.json").read_text()) for r in roles.ROLES}
    size = {r: got[r]["state_bytes"] for r in roles.ROLES}
    assert size["mixed"] < size["window"] < size["float32"] / 3  # the window is nearly all of it
    assert size["adam"] < size["m"] == size["v"] < size["float32"]  # one field in bf16's 3 bytes
    assert size["v_b32"] > size["adam"]  # v's scales, one per 32
    assert size["sr_v"] < size["mixed"]  # int8 throughout
    lines = roles.summarize(tmp_path)
    assert all(any(line.startswith(f"| {r} | 0 |") for line in lines) for r in roles.ROLES)


def test_the_float32_role_is_the_comparisons_grokfast_ma(roles: ModuleType, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Bit for bit, where 20 steps already tell an int8 field's trajectory from float32's."""
    monkeypatch.setattr(roles, "STEPS", 20)
    for role in ("float32", "adam"):
        roles.run(role, 0, tmp_path)
    loss = {r: json.loads((tmp_path / f"{r}__s0.json").read_text())["val_loss"][-1] for r in ("float32", "adam")}
    alone = sweep("grokfast_ma", {"lr": [1e-3]}, seeds=[0], steps=20, task="lm", device="cpu")
    assert loss["float32"] == alone.val_loss[-1]
    assert loss["adam"] != loss["float32"]
