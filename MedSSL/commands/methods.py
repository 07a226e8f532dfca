"""``medssl methods``: the self-supervised methods this installation offers."""

from __future__ import annotations

import json


def add_parser(sub) -> None:
    p = sub.add_parser("methods", help="list the self-supervised methods")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)


def run(args) -> int:
    from MedSSL.methods.base import available_methods
    from MedSSL.methods.settings import defaults

    methods = [{"name": m.name, "description": m.description, "published": m.published,
                "data": "--datasets SPEC.json" if m.data_kind == "labelled-datasets" else "--data PATH...",
                "supports_2d": m.supports_2d,
                "settings": defaults(m.Settings)}
               for m in available_methods()]
    if args.json:
        print(json.dumps({"methods": methods}))
    else:
        for m in methods:
            print(f"{m['name']:18s} {m['description']}")
    return 0
