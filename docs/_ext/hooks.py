"""MkDocs hooks: the result figures live in benchmarks/results/ (next to the JSON they are drawn
from), outside docs/. Serve them under figures/ and point the pages' links there."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

RESULTS = Path(__file__).resolve().parents[2] / "benchmarks" / "results"
LINK = "../benchmarks/results/"


def on_files(files: Files, config: Any) -> Files:
    for png in sorted(RESULTS.rglob("*.png")):
        rel = png.relative_to(RESULTS).as_posix()
        files.append(File.generated(config, f"figures/{rel}", abs_src_path=str(png)))
    return files


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return markdown.replace(LINK, "figures/")
