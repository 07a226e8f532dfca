"""``medssl methods``: the self-supervised methods this installation offers, with their settings."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("methods", help="list the self-supervised methods and their settings")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)


def settings_lines(settings: dict, docs: dict) -> list[str]:
    """One line per setting: ``name = default  description`` (JSON defaults, aligned columns)."""
    values = {k: json.dumps(v) for k, v in settings.items()}
    kw = max(map(len, settings), default=0)
    vw = min(max(map(len, values.values()), default=0), 16)
    return [f"    {k:<{kw}} = {values[k]:<{vw}}  {docs.get(k, '')}".rstrip() for k in settings]


def run(args) -> int:
    from MedSSL.methods.base import available_methods
    from MedSSL.methods.settings import defaults, field_docs

    methods = [{"name": m.name, "description": m.description, "published": m.published,
                "data": "--datasets SPEC.json" if m.data_kind == "labelled-datasets" else "--data PATH...",
                "supports_2d": m.supports_2d,
                "settings": defaults(m.Settings),
                "setting_descriptions": field_docs(m.Settings)}
               for m in available_methods()]
    if args.json:
        print(json.dumps({"methods": methods}))
    else:
        for m in methods:
            print(f"{m['name']:18s} {m['description']}")
            print("\n".join(settings_lines(m["settings"], m["setting_descriptions"])))
    return 0
