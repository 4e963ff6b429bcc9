"""Field docstrings of the core's config dataclasses, for node tooltips.

A config dataclass documents each field with a string literal right under it
(the convention nerfstudio's configs use); :func:`field_docs` reads those, so
a node's tooltip states the same default source as the core, never a copy.
:func:`field_spec` adds the type, default and the widget range a field declares
with :func:`limits`, so a node declares its widgets from the config once
(``nodes/schema.py``).
"""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import typing
from dataclasses import dataclass
from typing import Dict, Optional, Tuple


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


def limits(minimum=None, maximum=None, step=None, options=None) -> Dict[str, object]:
    """``dataclasses.field(metadata=limits(...))``: the range (or the choices) a front end may offer
    for a config field. Validation stays in the config's ``validate``; these only bound widgets."""
    spec = {"min": minimum, "max": maximum, "step": step, "options": tuple(options) if options else None}
    return {"limits": {k: v for k, v in spec.items() if v is not None}}


@dataclass(frozen=True)
class FieldSpec:
    """One config field as a front end needs it: a widget's type, default, range and tooltip.

    Attributes:
        name: the field's name (the widget's name too, so names never drift).
        kind: ``int``, ``float``, ``bool`` or ``str``.
        default: the dataclass default.
        doc: the field's docstring (it names the default's source).
        min, max, step: the widget's range, where the field declares one with :func:`limits`.
        options: the choices of a ``str`` field, if it declares them.
    """

    name: str
    kind: type
    default: object
    doc: str
    min: Optional[float] = None
    max: Optional[float] = None
    step: Optional[float] = None
    options: Optional[Tuple[str, ...]] = None


def field_spec(cls: type, name: str) -> FieldSpec:
    """The :class:`FieldSpec` of field ``name`` of dataclass ``cls``.

    Raises:
        KeyError: ``cls`` has no such field.
        TypeError: the field is not an int, float, bool or str (possibly Optional).
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if name not in fields:
        raise KeyError(f"{cls.__name__} has no field {name!r}")
    f = fields[name]
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    kind = args[0] if typing.get_origin(hint) is typing.Union and len(args) == 1 else hint
    literal = typing.get_args(kind) if typing.get_origin(kind) is typing.Literal else None
    if literal and all(isinstance(v, str) for v in literal):
        kind = str  # a Literal of strings is a choice: its values are the options
    if kind not in (int, float, bool, str):
        raise TypeError(f"{cls.__name__}.{name}: a {hint} field has no widget; declare that input by hand")
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        raise TypeError(f"{cls.__name__}.{name} has no default")
    lim = dict(f.metadata.get("limits", {}))
    if literal and "options" not in lim:
        lim["options"] = tuple(literal)
    return FieldSpec(name=name, kind=kind, default=default, doc=field_docs(cls).get(name, ""),
                     min=lim.get("min"), max=lim.get("max"), step=lim.get("step"), options=lim.get("options"))


def config_from_values(cls: type, values: Dict[str, object], **nested):
    """``cls(**{every field of cls found in values}, **nested)``: a config built from a node's
    inputs named after its fields (others are ignored; absent fields keep their defaults)."""
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in names and k not in nested}, **nested)
