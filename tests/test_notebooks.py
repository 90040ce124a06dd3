"""The notebooks the site shows as committed (outputs of a full run) still run: each executed in
its short mode (``GROKXFORM_NOTEBOOK_SMALL=1``) in a kernel, its outputs thrown away."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from test_docs import published_as_committed

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize("name", published_as_committed())
def test_notebook_runs_in_its_short_mode(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    monkeypatch.setenv("GROKXFORM_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.reads((ROOT / "notebooks" / name).read_text(), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}).execute()
    text = json.dumps([c.get("outputs", []) for c in nb.cells])
    budgets = [int(n) for n in re.findall(r"up to (\d+) steps", text)]  # (every notebook prints its budget)
    assert budgets and max(budgets) <= 20, f"the notebook did not run in its short mode ({budgets})"
