"""``benchmarks/compressed_quality.py``: its labels, its format choice, and one sweep per format
written and put beside float32."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from scripts import benchmark_script


@pytest.fixture(scope="module")
def script() -> Iterator[ModuleType]:
    yield from benchmark_script("compressed_quality")


def test_labels_name_the_format_and_the_block_size(script: ModuleType) -> None:
    assert script.parse_label("int8_b128") == ("int8", 128)
    assert script.parse_label("bf16_sr") == ("bf16_sr", 256)
    assert script.parse_label("int8") == ("int8", 256)


def test_an_unknown_format_is_refused(script: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(sys, "argv", ["compressed_quality.py", "--formats", "int8,fp8", "--out", str(tmp_path)])
    with pytest.raises(SystemExit):
        script.main()
    assert "unknown format(s) fp8" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.json"))


def test_a_sweep_per_format_is_summarized_beside_float32(script: ModuleType, tmp_path: Path) -> None:
    for fmt in ("float32", "int8"):
        script.run_job(("sub", "grokadamw", fmt, "cpu", str(tmp_path), 2, None))
    assert script.labels_in(tmp_path, "sub", "grokadamw") == ["float32", "int8"]
    rows = {r["format"]: r for r in script.summarize(tmp_path)["rows"]}
    assert rows.keys() == {"float32", "int8"}
    assert rows["int8"]["seeds"] == [0, 1, 2]
    assert rows["int8"]["state_bytes"] < rows["float32"]["state_bytes"] / 3
    assert "| sub | grokadamw | int8 |" in (tmp_path / "summary.md").read_text()


def test_seeds_replaces_the_tasks_seeds(script: ModuleType, tmp_path: Path) -> None:
    script.run_job(("div", "grokfast_ema", "int8", "cpu", str(tmp_path), 2, 4))
    payload = json.loads((tmp_path / "div__grokfast_ema__int8.json").read_text())
    assert [m["seed"] for m in payload["members"]] == [0, 1, 2, 3]
