"""The benchmark scripts that run without a GPU: ``benchmarks/kernel_sass.py`` compiles the
engine's kernels for sm_90 with Triton's own ptxas and reads their machine code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():  # as the other kernel tests: Triton reads its mode when imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]
TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


@pytest.mark.skipif(not (TOOLS / "ptxas").is_file() or not (TOOLS / "cuobjdump").is_file(),
                    reason="this Triton ships no ptxas / cuobjdump")
def test_kernel_sass_reads_the_engines_int8_kernel_aligned_and_not_hoisted_and_not(tmp_path: Path) -> None:
    """With every address 16-byte aligned a thread's eight elements of a tile move as vectors (two
    128-bit loads of a float32 tensor, one 64-bit load of an int8 code tensor); without, one
    element per instruction."""
    rows = []
    for flags in ([], ["--hoist-loads", "--rounding-in-line", "--unaligned"]):
        out = tmp_path / f"sass{len(flags)}.json"
        run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_sass.py"), "--pipelines", "adamw",
                              "--formats", "int8", "--tiles", "engine", "--out", str(out), *flags],
                             capture_output=True, text=True, cwd=ROOT)
        assert run.returncode == 0, run.stderr[-4000:]
        doc = json.loads(out.read_text())
        assert doc["arch"] == "sm_90" and doc["command"].startswith("python benchmarks/kernel_sass.py")
        (row,) = doc["rows"]
        assert row["hoist_loads"] == row["rounding_in_line"] == bool(flags) and row["aligned"] == (not flags)
        assert row["local_bytes"] == 0
        assert row["registers"] <= row["max_registers"] and row["instructions"] > 0 and row["shuffles"] > 0
        rows.append(row)
    aligned, unaligned = (row["memory"] for row in rows)
    assert aligned.get("LDG.E.128") and aligned.get("STG.E.128") and not any(".U8" in op for op in aligned)
    assert unaligned.get("LDG.E.U8") and unaligned.get("STG.E.U8") and not any(".128" in op for op in unaligned)
    assert sum(aligned.values()) * 2 < sum(unaligned.values())  # (41 memory instructions against 88)
