"""MkDocs hooks: the result figures live in benchmarks/results/ (next to the JSON they are drawn
from), outside docs/. Serve them under figures/ and point the pages' links there. The executed
notebooks' cache is keyed on what changes their outputs besides their own text (which
mkdocs-jupyter keys on): the short-mode switch, the package's source, torch's and Python's versions."""

from __future__ import annotations

import hashlib
import os
import platform
from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
LINK = "../benchmarks/results/"


def outputs_key() -> str:
    """A hash of what, besides a notebook's text, changes its executed outputs."""
    import torch

    h = hashlib.sha256()
    h.update(f"small={os.environ.get('GROKXFORM_NOTEBOOK_SMALL')} torch={torch.__version__}"
             f" python={platform.python_version()}".encode())
    for path in sorted((ROOT / "grokxform").rglob("*.py")):
        h.update(path.relative_to(ROOT).as_posix().encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def on_config(config: Any) -> Any:
    plugin = config.plugins.get("mkdocs-jupyter")
    if plugin is not None and plugin.config.get("cache"):
        plugin.config["cache_dir"] = str(Path(plugin.config["cache_dir"]) / outputs_key())
    return config


def on_files(files: Files, config: Any) -> Files:
    for png in sorted(RESULTS.rglob("*.png")):
        rel = png.relative_to(RESULTS).as_posix()
        files.append(File.generated(config, f"figures/{rel}", abs_src_path=str(png)))
    return files


def on_page_markdown(markdown: str, **kwargs: Any) -> str:
    return markdown.replace(LINK, "figures/")
