"""A Griffe extension for the API reference (mkdocs.yml): reads this project's docstrings as Google style
renders them best, without changing them.

* Doctests are headed ``Example:``, which Google style reads as an admonition of Markdown text (``>>>``
  lines would render as nested quotes); read as ``Examples:`` they render as code.
* Sphinx roles (``:class:`~surgery.plan.Plan```) are shown as code (``Plan``); left as they are, the
  role's colon also splits a ``Returns:`` line into a name and a description.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_HEADER = re.compile(r"^(\s*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:class|func|meth|mod|data|attr|exc|obj|const):`(~?)([^`]+)`")


def _role(match: re.Match[str]) -> str:
    target = match.group(2)
    return f"`{target.rsplit('.', 1)[-1] if match.group(1) else target}`"


class ProjectDocstrings(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_role, _HEADER.sub(r"\1Examples:", obj.docstring.value))
