"""Packaging: the license metadata, an editable install that type checkers can follow, and the
import layering of the package's modules."""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import subprocess
import sys
import sysconfig
import zipfile
from collections.abc import Mapping
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


# The package's rooms, lowest first: a module imports from its own room and the rooms below it,
# never from one above. The maths (the primitives, the pipelines and what they stand on) never
# imports its engines, the fused step or the optimizer: the engine reads what the primitives
# declare, not the reverse (docs/design.md).
ROOMS: tuple[tuple[str, ...], ...] = (
    ("grokxform.tree", "grokxform.elements", "grokxform.signals", "grokxform.distributed"),
    ("grokxform._common", "grokxform._resum", "grokxform._memory", "grokxform._state_io", "grokxform.declarations",
     "grokxform.base"),
    ("grokxform.transforms", "grokxform.transforms.*"),
    ("grokxform.pipelines", "grokxform.metrics"),
    ("grokxform.engine", "grokxform.engine.*"),
    ("grokxform.fused",),
    ("grokxform._naming", "grokxform._hyperparams", "grokxform._group_reductions", "grokxform._checkpoint"),
    ("grokxform.optim",),
    ("grokxform", "grokxform.__main__", "grokxform.experiments", "grokxform.experiments.*"),
)


def _package_sources() -> dict[str, str]:
    """Each module of the package by its dotted name (a package by its own: ``grokxform.engine``)."""
    out = {}
    for path in sorted((ROOT / "grokxform").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path.read_text()
    return out


def import_graph(sources: Mapping[str, str]) -> dict[str, set[str]]:
    """The modules of ``sources`` that each one imports, at its top or inside a function:
    ``from grokxform import fused`` imports ``grokxform.fused``, ``from grokxform.base import chain``
    ``grokxform.base``. (A package's ``__init__`` also runs when one of its modules is imported; only
    what a module names counts here.)"""
    graph: dict[str, set[str]] = {}
    for module, source in sources.items():
        names: list[str] = []
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Import):
                names += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                assert node.level == 0, f"{module}: a relative import; the package imports by absolute names"
                names += [f"{node.module}.{a.name}" for a in node.names]
        graph[module] = set()
        for name in names:
            while name and name not in sources:  # a name inside a module: the module
                name = name.rpartition(".")[0]
            if name and name != module:
                graph[module].add(name)
    return graph


def room(module: str) -> int:
    rooms = [i for i, patterns in enumerate(ROOMS) if any(fnmatch.fnmatchcase(module, p) for p in patterns)]
    assert len(rooms) == 1, f"{module} is in rooms {rooms} of ROOMS; it belongs in one"
    return rooms[0]


def upward_imports(graph: Mapping[str, set[str]]) -> list[str]:
    rooms = {m: room(m) for m in graph}  # every module, importing or not, has its room
    return sorted(f"{m} (room {rooms[m]}) imports {d} (room {rooms[d]})"
                  for m, deps in graph.items() for d in deps if rooms[d] > rooms[m])


def import_cycle(graph: Mapping[str, set[str]]) -> list[str]:
    """A cycle of imports, as the modules along it (the first again at the end), or []."""
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> list[str]:
        if module in path:
            return path[path.index(module):] + [module]
        if module in done:
            return []
        for dep in sorted(graph[module]):
            cycle = visit(dep, path + [module])
            if cycle:
                return cycle
        done.add(module)
        return []

    for module in sorted(graph):
        cycle = visit(module, [])
        if cycle:
            return cycle
    return []


def test_modules_import_only_from_their_room_and_those_below() -> None:
    graph = import_graph(_package_sources())
    assert {"grokxform.pipelines", "grokxform.optim", "grokxform.engine.step"} <= set(graph)
    assert "grokxform.fused" in graph["grokxform.optim"]  # the graph holds the package's imports
    assert not upward_imports(graph)


def test_the_package_has_no_import_cycle() -> None:
    assert import_cycle(import_graph(_package_sources())) == []


def test_the_layering_checks_catch_what_they_look_for() -> None:
    """An upward import in each spelling, at the top of a module or inside a function, and a cycle
    inside one room."""
    quiet = {"grokxform.fused": "", "grokxform.optim": "", "grokxform.declarations": "import grokxform.base",
             "grokxform.base": "", "grokxform.pipelines": ""}
    for upward in ("from grokxform import fused", "import grokxform.fused as F",
                   "def f():\n    from grokxform.optim import Optimizer"):
        assert upward_imports(import_graph({**quiet, "grokxform.pipelines": upward})), upward
    assert not upward_imports(import_graph(quiet))
    graph = import_graph({**quiet, "grokxform.base": "from grokxform.declarations import declare"})
    assert import_cycle(graph) == ["grokxform.base", "grokxform.declarations", "grokxform.base"]
    assert import_cycle(import_graph(quiet)) == []
