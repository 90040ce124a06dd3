"""Packaging: the license metadata, and an editable install that type checkers can follow."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import sysconfig
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_license_is_an_spdx_expression_with_its_file() -> None:
    pyproject = (ROOT / "pyproject.toml").read_text()  # (tomllib is 3.11+; the package supports 3.10)
    assert re.search(r'^license = "Apache-2.0"$', pyproject, flags=re.MULTILINE)
    assert re.search(r'^license-files = \["LICENSE"\]$', pyproject, flags=re.MULTILINE)
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")
    assert (ROOT / "grokxform" / "py.typed").is_file()


def _pth_entries(lines: list[str]) -> list[Path]:
    return [Path(line) for line in lines if line and not line.startswith(("import ", "#"))]


def _built_editable_roots(tmp: Path) -> list[Path] | None:
    """The path entries of the editable wheel that this checkout's pyproject builds now, or
    ``None`` without a setuptools that reads it."""
    try:
        import setuptools
    except ImportError:
        return None
    if int(setuptools.__version__.split(".")[0]) < 77:
        return None
    code = "import sys; from setuptools import build_meta as b; print(b.build_editable(sys.argv[1]))"
    out = subprocess.run([sys.executable, "-c", code, str(tmp)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120, check=True)
    wheel = tmp / out.stdout.strip().splitlines()[-1]
    with zipfile.ZipFile(wheel) as zf:
        pths = [n for n in zf.namelist() if n.endswith(".pth")]
        return [e for n in pths for e in _pth_entries(zf.read(n).decode().splitlines())]


def _installed_editable_roots() -> list[Path]:
    """The path entries of the installed editable grokxform, when it is this checkout's."""
    urls = [d.read_text("direct_url.json") for d in metadata.distributions(name="grokxform")]
    ours = [u for u in urls if u and json.loads(u).get("dir_info", {}).get("editable")
            and Path(json.loads(u)["url"].removeprefix("file://")).resolve() == ROOT]
    if not ours:
        pytest.skip("this checkout is not installed in editable mode")
    site = Path(sysconfig.get_paths()["purelib"])
    return [e for pth in site.glob("__editable__*grokxform*.pth") for e in _pth_entries(pth.read_text().splitlines())]


def test_editable_install_is_a_plain_path_entry_that_mypy_follows(tmp_path: Path) -> None:
    # mypy reads the directories listed in .pth files; it cannot see setuptools' import-hook
    # finder. `package-dir = {"" = "."}` in pyproject makes the editable install a path entry.
    roots = _built_editable_roots(tmp_path)
    if roots is None:
        roots = _installed_editable_roots()
    assert any((r / "grokxform" / "__init__.py").is_file() and (r / "grokxform" / "py.typed").is_file()
               for r in roots), f"no .pth path entry holds grokxform: {roots}"
