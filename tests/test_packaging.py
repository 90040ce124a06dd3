"""Packaging: the license metadata, and an editable install that type checkers can follow."""

from __future__ import annotations

import json
import sysconfig
from importlib import metadata
from pathlib import Path

import pytest
import tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_license_is_an_spdx_expression_with_its_file() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"
    assert project["license-files"] == ["LICENSE"]
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert (ROOT / "grokxform" / "py.typed").is_file()


def _editable_roots() -> list[Path]:
    """The directories the ``.pth`` files of an editable grokxform install put on ``sys.path``."""
    urls = [d.read_text("direct_url.json") for d in metadata.distributions(name="grokxform")]
    if not any(u and json.loads(u).get("dir_info", {}).get("editable") for u in urls):
        pytest.skip("grokxform is not an editable install")
    site = Path(sysconfig.get_paths()["purelib"])
    roots = []
    for pth in site.glob("__editable__*grokxform*.pth"):
        for line in pth.read_text().splitlines():
            if line and not line.startswith(("import ", "#")):
                roots.append(Path(line))
    return roots


def test_editable_install_is_a_plain_path_entry_that_mypy_follows() -> None:
    # mypy reads the directories listed in .pth files; it cannot see setuptools' import-hook
    # finder. `package-dir = {"" = "."}` in pyproject makes the editable install a path entry.
    roots = _editable_roots()
    assert any((r / "grokxform" / "__init__.py").is_file() and (r / "grokxform" / "py.typed").is_file()
               for r in roots), f"no .pth path entry holds grokxform: {roots}"
