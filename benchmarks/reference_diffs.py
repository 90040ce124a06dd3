"""The largest difference between grokxform's pipelines and their references, per comparison.

Runs every case of ``tests/test_references.py`` once (the same functions the tests assert on),
prints ``comparison | steps | max abs diff | tol`` and writes ``benchmarks/results/reference_diffs.json``.

    python benchmarks/reference_diffs.py [--out PATH]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import math
import platform
import sys
import time
import warnings
from importlib.metadata import version
from pathlib import Path
from types import ModuleType

import torch

ROOT = Path(__file__).resolve().parent.parent


def load_cases() -> ModuleType:
    """Import tests/test_references.py by path (tests/ is not a package)."""
    path = ROOT / "tests" / "test_references.py"
    spec = importlib.util.spec_from_file_location("grokxform_test_references", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "reference_diffs.json")
    args = parser.parse_args(argv)
    # grokadamw 0.1.2 imports torch.cuda.amp.autocast; on a CPU box that only warns.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*CUDA is not available.*")
    torch.set_num_threads(1)

    mod = load_cases()
    rows = []
    width = max(len(n) for n in mod.CASES)
    print(f"{'comparison':<{width}} | steps | max abs diff | tol    | ok")
    print(f"{'-' * width}-|-------|--------------|--------|---")
    t0 = time.perf_counter()
    for name, case in mod.CASES.items():
        res = case.run()
        ok = res.exact if case.tol == 0.0 else (not math.isnan(res.max_abs_diff) and res.max_abs_diff <= case.tol)
        tol = "exact" if case.tol == 0.0 else f"{case.tol:.0e}"
        print(f"{name:<{width}} | {res.steps:5d} | {res.max_abs_diff:12.3e} | {tol:<6} | {'yes' if ok else 'NO'}")
        rows.append(
            {
                "comparison": name,
                "steps": res.steps,
                "max_abs_diff": res.max_abs_diff,
                "bit_identical": res.exact,
                "tolerance": case.tol,
                "passed": ok,
            }
        )
    elapsed = time.perf_counter() - t0
    worst = max((r["max_abs_diff"] for r in rows if r["tolerance"] > 0), default=0.0)
    print(f"\n{len(rows)} comparisons in {elapsed:.1f} s; largest diff among toleranced ones: {worst:.3e}")

    record = {
        "what": "max |grokxform - reference| of params (and state where noted) over all steps, float64 unless"
        " the name says f32; tolerance 0 = bit-identical (torch.equal)",
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": "cpu",
        "torch": torch.__version__,
        "python": platform.python_version(),
        "pytorch_optimizer": version("pytorch_optimizer"),
        "grokadamw": version("grokadamw"),
        "seconds": round(elapsed, 2),
        "all_passed": all(r["passed"] for r in rows),
        "results": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0 if record["all_passed"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
