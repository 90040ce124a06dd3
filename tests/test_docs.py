"""The documentation: every public name on the API page with a docstring, and the docstring
examples run as doctests (``torch`` and ``grokxform as gx`` in scope, as the API page says)."""

from __future__ import annotations

import doctest
import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pytest
import torch

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
