"""A griffe extension for the API page: the docstrings cross-reference with reStructuredText roles
(``:func:`grokxform.chain```), which Markdown does not read; render them as inline code."""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:func|class|mod|meth|attr|data|obj|exc):`~?([^`]+)`")


class RstRolesAsCode(griffe.Extension):
    """Rewrites ``:role:`target``` as ``target`` in every docstring griffe loads."""

    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(r"``\1``", obj.docstring.value)
