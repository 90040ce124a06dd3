"""Every Python block of README.md and of the guides runs as written, in order, one namespace per
file (a block may use the names an earlier block of its page defined). Runs that take minutes
are shortened by the substitutions below, and only those."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", "docs/index.md", "docs/quickstart.md", "docs/composing.md", "docs/grokking_optimizers.md",
         "docs/migrating.md",
         "docs/reproducing.md", "docs/sweeps.md", "docs/meta_gradients.md"]
SHORTER = {  # page -> (written, run here): the paper's task takes ~50 ms a step on a CPU
    "docs/reproducing.md": [("steps=2000", "steps=10")],
    "docs/sweeps.md": [("steps=3000", "steps=10"), ('"alpha": [0.9, 0.98]', '"alpha": [0.9]')],
}
SLOW_PAGES = {"README.md", "docs/quickstart.md", "docs/sweeps.md"}  # over 20 s on 2 CPU cores
BLOCK = re.compile(r"^```python\n(.*?)^```", flags=re.DOTALL | re.MULTILINE)


def python_blocks(page: str) -> list[str]:
    return BLOCK.findall((ROOT / page).read_text())


def test_the_pages_have_python_blocks() -> None:
    assert all(python_blocks(p) for p in PAGES)
    assert len(python_blocks("README.md")) >= 3
    for page, subs in SHORTER.items():  # each shortening still finds what it shortens
        assert all(written in "".join(python_blocks(page)) for written, _ in subs), page


@pytest.mark.parametrize("page", [pytest.param(p, marks=pytest.mark.slow) if p in SLOW_PAGES else p for p in PAGES])
def test_python_blocks_run(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict[str, object] = {"__name__": "__main__"}
    for i, block in enumerate(python_blocks(page)):
        for written, short in SHORTER.get(page, []):
            block = block.replace(written, short)
        exec(compile(block, f"{page}, python block {i + 1}", "exec"), namespace)  # noqa: S102 - the docs run as written
