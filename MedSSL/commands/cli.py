"""The ``medssl`` command line: one sub-command per module in :mod:`MedSSL.commands`.

Errors the user can fix (:class:`~MedSSL.errors.MedSSLError`, bad options) print one line,
``medssl: error: <reason>``, on stderr and exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

# OpenMP threads that spin while they wait slow torch's CPU kernels badly when the cores are shared
# (Slicer's GUI, other jobs): measured 1.8 vs 123 cubes/s for the Genesis transforms on a loaded
# 2-core machine. Set before torch is imported; an explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from MedSSL import __version__
from MedSSL.errors import MedSSLError

#: sub-command modules, in the order ``medssl --help`` lists them
COMMANDS = ("pretrain", "finetune", "predict", "evaluate", "suggest", "session", "info", "methods", "demo")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2
        self.exit(2, f"medssl: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="medssl", description="Self-supervised pretraining and few-shot segmentation of CT/MR volumes.")
    parser.add_argument("--version", action="version", version=f"medssl {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__package__}.{name}":
                continue
            raise
        module.add_parser(sub)
    return parser


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or bool(os.environ.get("MEDSSL_DEBUG"))
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return int(args.run(args) or 0)
    except MedSSLError as exc:
        if debug:
            raise
        sys.stderr.write(f"medssl: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("medssl: interrupted\n")
        return 130
    except (FloatingPointError, MemoryError) as exc:
        if debug:
            raise
        sys.stderr.write(f"medssl: error: {exc.__class__.__name__}: {exc}\n")
        return 1
    except RuntimeError as exc:
        if debug:
            raise
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        if "out of memory" in first.lower():
            first += " (try a smaller --batch-size, --patch or --width)"
        sys.stderr.write(f"medssl: error: {first[:300]}\n")
        return 1
