"""Settings dataclasses: each run option is a field declared once, with its default, its command-line flag
and help (field metadata), and its check (``__post_init__``, raising the one-line :class:`MedSSLError` the
CLI prints). :mod:`MedSSL.commands.common` generates the argparse options from these fields and
``medssl info --defaults`` prints the defaults for the Slicer modules, so a default is written in one place.

A help text may name ``{default}``: it is filled in with the field's default (as the CLI shows it).
"""

from __future__ import annotations

import dataclasses
from dataclasses import MISSING, field

from MedSSL.errors import MedSSLError


def option(default=MISSING, *, flag: str | None = None, help: str = "", type=None, choices=None, nargs=None,
           metavar=None, action: str | None = None, cli_default=MISSING, default_factory=MISSING, shown=None):
    """A settings field that is also a command-line option.

    flag: "--name" (default: the field name with dashes). cli_default: what argparse stores when the flag is
    left out, when it must differ from the default (None: "not given", resolved by the command).
    action: "store_true"/"store_false"/"append" (no type, nargs). shown: the default as the help shows it
    (default: ``default``).
    """
    meta = {"cli": True, "flag": flag, "help": help, "type": type, "choices": choices, "nargs": nargs,
            "metavar": metavar, "action": action, "cli_default": cli_default, "shown": shown}
    if default_factory is not MISSING:
        return field(default_factory=default_factory, metadata=meta)
    return field(default=default, metadata=meta)


def flag_of(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def option_fields(cls) -> list:
    """The fields of settings class ``cls`` that are command-line options, in declaration order."""
    return [f for f in dataclasses.fields(cls) if f.metadata.get("cli")]


def default_of(f: dataclasses.Field, instance=None):
    """The default of field ``f`` (read from ``instance`` when given: a task's own defaults of a nested config)."""
    if instance is not None:
        return getattr(instance, f.name)
    if f.default is not MISSING:
        return f.default
    if f.default_factory is not MISSING:
        return f.default_factory()
    return None


def flag_name(cls, name: str) -> str:
    """The command-line flag of field ``name`` of ``cls`` (for error messages)."""
    for f in dataclasses.fields(cls):
        if f.name == name:
            return flag_of(f)
    return "--" + name.replace("_", "-")


def at_least(owner, name: str, minimum, allow_none: bool = True) -> None:
    """MedSSLError "--flag VALUE: must be at least MINIMUM" when field ``name`` of ``owner`` is below it."""
    value = getattr(owner, name)
    if value is None and allow_none:
        return
    if value is None or value < minimum:
        raise MedSSLError(f"{flag_name(type(owner), name)} {value}: must be at least {minimum}")


def one_of(owner, name: str, choices) -> None:
    value = getattr(owner, name)
    if value not in choices:
        raise MedSSLError(f"{flag_name(type(owner), name)} {value}: expected one of {', '.join(map(str, choices))}")


def jsonable(value):
    if isinstance(value, tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    if hasattr(value, "__fspath__"):
        return str(value)
    return value
