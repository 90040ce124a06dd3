"""The documentation: every public name on the API page with a docstring, and the docstring
examples run as doctests (``torch`` and ``grokxform as gx`` in scope, as the API page says)."""

from __future__ import annotations

import doctest
import importlib
import inspect
import os
import pkgutil
import re
from pathlib import Path

import torch

if not torch.cuda.is_available():  # importing every module imports Triton: as tests/test_engine.py does
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

import grokxform as gx

ROOT = Path(__file__).resolve().parents[1]
API_PAGE = ROOT / "docs" / "api.md"


def _modules() -> list[str]:
    names = ["grokxform"]
    for info in pkgutil.walk_packages(gx.__path__, "grokxform."):
        names.append(info.name)
    return sorted(names)


def test_every_public_name_is_on_the_api_page() -> None:
    documented = set(re.findall(r"^::: grokxform\.(\w+)\s*$", API_PAGE.read_text(), flags=re.MULTILINE))
    missing = sorted(set(gx.__all__) - documented)
    assert not missing, f"public names absent from docs/api.md: {missing}"
    extra = sorted(documented - set(gx.__all__))
    assert not extra, f"docs/api.md documents names that grokxform does not export: {extra}"


@pytest.mark.parametrize("name", sorted(gx.__all__))
def test_every_public_name_has_a_docstring(name: str) -> None:
    obj = getattr(gx, name)
    if inspect.isfunction(obj) or inspect.isclass(obj) or inspect.ismodule(obj):
        doc = inspect.getdoc(obj) or ""
        assert len(doc) > 20, f"grokxform.{name} has no docstring"
        if inspect.isfunction(obj):
            assert ">>> " in doc, f"grokxform.{name} has no runnable example"
    else:  # a type alias: documented by the string literal after its assignment
        source = (ROOT / "grokxform" / "base.py").read_text()
        assert re.search(rf'^{name} = .*\n"""', source, flags=re.MULTILINE), f"alias {name} has no docstring"


def _doctests() -> list[doctest.DocTest]:
    finder = doctest.DocTestFinder(exclude_empty=True)
    tests = []
    for name in _modules():
        module = importlib.import_module(name)
        for t in finder.find(module, globs={"torch": torch, "gx": gx}):
            if t.examples:
                tests.append(t)
    return sorted(tests, key=lambda t: t.name)


DOCTESTS = _doctests()


def test_doctests_are_collected() -> None:
    assert len(DOCTESTS) >= 25


@pytest.mark.parametrize("test", DOCTESTS, ids=[t.name for t in DOCTESTS])
def test_docstring_example(test: doctest.DocTest) -> None:
    torch.manual_seed(0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    out: list[str] = []
    result = runner.run(test, out=out.append, clear_globs=True)
    assert result.failed == 0, "".join(out)


def test_every_notebook_and_page_is_in_the_site_nav() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    notebooks = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert len(notebooks) >= 5
    for name in notebooks:
        assert f"notebooks/{name}" in nav, f"notebooks/{name} is not in the site nav"
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert f": {page.name}" in nav, f"docs/{page.name} is not in the site nav"


def published_as_committed() -> list[str]:
    """The notebooks the site shows as committed (mkdocs-jupyter's ``execute_ignore``)."""
    text = (ROOT / "mkdocs.yml").read_text()
    block = text[text.index("execute_ignore:"):].splitlines()[1:]
    names = []
    for line in block:
        if not line.strip().startswith("- "):
            break
        names.append(line.strip()[2:].removeprefix("notebooks/"))
    return names


def test_notebooks_are_committed_without_outputs_or_with_a_full_run() -> None:
    """A notebook the site build executes has no outputs; one it shows as committed has the
    outputs of a full run (every code cell run, in order, none in the short mode)."""
    import json

    committed = published_as_committed()
    assert committed and all((ROOT / "notebooks" / n).exists() for n in committed), committed
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        if path.name not in committed:
            assert not [c for c in cells if c["outputs"] or c["execution_count"]], (
                f"{path.name}: clear its outputs (the site build executes it)"
            )
            continue
        assert [c["execution_count"] for c in cells] == list(range(1, len(cells) + 1)), (
            f"{path.name}: commit the outputs of one full run, every cell in order"
        )
        text = json.dumps([c["outputs"] for c in cells])
        assert "Traceback" not in text and '"output_type": "error"' not in text, path.name
        budgets = [int(n) for n in re.findall(r"up to (\d+) steps", text)]
        assert budgets and min(budgets) >= 1000, f"{path.name}: its outputs are from the short mode ({budgets})"


def test_notebook_cache_keys_on_the_short_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    """The executed notebooks' cache folder (docs/_ext/hooks.py) differs between a short and a full
    build, so that neither reuses the other's outputs."""
    import importlib.util

    pytest.importorskip("mkdocs")
    spec = importlib.util.spec_from_file_location("docs_hooks", ROOT / "docs" / "_ext" / "hooks.py")
    assert spec is not None and spec.loader is not None
    hooks = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hooks)
    monkeypatch.setenv("GROKXFORM_NOTEBOOK_SMALL", "1")
    short = hooks.outputs_key()
    monkeypatch.delenv("GROKXFORM_NOTEBOOK_SMALL")
    assert hooks.outputs_key() != short and hooks.outputs_key() == hooks.outputs_key()
