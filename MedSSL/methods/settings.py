"""Method settings: one frozen, validated dataclass per method (``SSLMethod.Settings``).

Fields are the keys of ``--method-settings`` JSON and of the bundle's ``method`` entry; defaults are the
fields' defaults; each class checks its values in ``__post_init__`` (one-line :class:`MedSSLError`).
A field whose value is itself a settings dataclass (the contrastive methods' view transform, a
:class:`~MedSSL.transforms.genesis.GenesisTransformConfig`) is written flat in JSON, its keys prefixed
with ``metadata["prefix"]`` (``view_flip_rate``...), after the plain fields. JSON lists are held as
tuples (the dataclasses are frozen) and written back as lists, so a bundle's model.json reads as before.
Each field is described by an attribute docstring (a string literal on the line after it), which
:func:`field_docs` reads back for ``medssl methods``.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
from typing import Any


def _frozen(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return tuple(_frozen(v) for v in value)
    return value


def _jsonable(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def _nested(f: dataclasses.Field) -> str | None:
    """The JSON key prefix of a nested settings field, None for a plain field."""
    return f.metadata.get("prefix")


def to_json(settings) -> dict:
    """The flat JSON dict of a settings instance (plain fields in order, then nested ones, prefixed)."""
    fields = dataclasses.fields(settings)
    out = {f.name: _jsonable(getattr(settings, f.name)) for f in fields if _nested(f) is None}
    for f in fields:
        if _nested(f) is not None:
            out.update({_nested(f) + k: v for k, v in to_json(getattr(settings, f.name)).items()})
    return out


def defaults(cls) -> dict:
    """The flat JSON defaults of settings class ``cls`` (``medssl methods --json``)."""
    return to_json(cls())


def unknown_keys(cls, given: dict) -> list[str]:
    """The keys of ``given`` that are no setting of ``cls``, sorted."""
    return sorted(set(given) - set(defaults(cls)))


def from_json(cls, given: dict | None):
    """A ``cls`` instance from flat JSON ``given`` (missing keys take the defaults). Unknown keys:
    ValueError naming them; invalid values: the class's MedSSLError."""
    given = dict(given or {})
    unknown = unknown_keys(cls, given)
    if unknown:
        raise ValueError(f"unknown setting(s): {', '.join(unknown)}")
    base = cls()
    values = {}
    for f in dataclasses.fields(cls):
        prefix = _nested(f)
        if prefix is None:
            if f.name in given:
                values[f.name] = _frozen(given[f.name])
            continue
        inner = {k[len(prefix):]: v for k, v in given.items() if k.startswith(prefix)}
        if inner:
            values[f.name] = from_json(type(getattr(base, f.name)), {**to_json(getattr(base, f.name)), **inner})
    return dataclasses.replace(base, **values) if values else base


def nested(prefix: str, factory) -> dataclasses.Field:
    """A nested settings field written flat in JSON with keys ``prefix + key``."""
    return dataclasses.field(default_factory=factory, metadata={"prefix": prefix})


@functools.lru_cache(maxsize=None)
def _attribute_docs(cls) -> dict:
    """{field: docstring} of the attribute docstrings written in ``cls``'s own body ({} without source)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError, SyntaxError):
        return {}
    body = tree.body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr) \
                and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def field_docs(cls) -> dict:
    """{flat JSON key: one-line description} of settings class ``cls``, keys in the order of
    :func:`defaults`: each field's attribute docstring (a subclass's wins over its base's; "" where there
    is none); a nested field's keys take the descriptions of the nested class's fields."""
    own: dict = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            own.update(_attribute_docs(klass))
    fields = dataclasses.fields(cls)
    out = {f.name: own.get(f.name, "") for f in fields if _nested(f) is None}
    base = cls()
    for f in fields:
        if _nested(f) is not None:
            out.update({_nested(f) + k: v for k, v in field_docs(type(getattr(base, f.name))).items()})
    return out
