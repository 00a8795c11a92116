"""Griffe extension: reST roles in docstrings (``:func:`solve```, ``:class:`~flowdiff.Latent```) as code spans.

The docstrings are written for readers of the source, with Sphinx-style roles; the site renders
Markdown, where a role would show as literal text. ``~`` (show the last component) is honoured.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|obj|exc|const):`(~?)([^`]+)`")


def _code(match: re.Match) -> str:
    tilde, target = match.groups()
    return f"`{target.rsplit('.', 1)[-1] if tilde else target}`"


class RolesToCode(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(_code, obj.docstring.value)
