"""Field docstrings of the core's config dataclasses, for node tooltips.

A config dataclass documents each field with a string literal right under it
(the convention nerfstudio's configs use); :func:`field_docs` reads those, so
a node's tooltip states the same default source as the core, never a copy.
"""
from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from typing import Dict


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> Dict[str, str]:
    """``{field name: docstring}`` of a dataclass, from the string under each annotated field.

    Whitespace is collapsed to single spaces; fields without a docstring are absent.
    """
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant) \
                and isinstance(nxt.value.value, str):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
