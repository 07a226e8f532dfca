"""Issue 19 item 11: Slicer 5.6 and 5.8 run the backend with their PythonSlicer, Python 3.9, while this suite
runs on a newer Python. Every backend and Slicer module file must parse with the Python 3.9 grammar and must
not use what 3.9 lacks at run time: ``X | Y`` unions evaluated at run time (annotations are fine under ``from
__future__ import annotations``), ``zip(strict=...)``, ``dataclass(slots=/kw_only=)``. Where a Python 3.9
interpreter is installed (``MEDSSL_PYTHON39``, or pyenv's), every file is also byte-compiled by it."""

import ast
import glob
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FOLDERS = ("MedSSL", "MedSSLCommon", "MedSSLSegment", "MedSSLTrainer")
OLDEST = (3, 9)


def sources() -> list[str]:
    files = [p for folder in FOLDERS for p in glob.glob(os.path.join(ROOT, folder, "**", "*.py"), recursive=True)]
    assert len(files) > 100
    return sorted(files)


def _runtimeUnions(tree, postponed: bool):
    """``A | B`` of types evaluated at run time: in isinstance/issubclass calls, and in annotations unless
    annotations are postponed."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass"):
            if len(node.args) == 2 and isinstance(node.args[1], ast.BinOp) and isinstance(node.args[1].op, ast.BitOr):
                yield node.lineno
        if postponed:
            continue
        annotations = []
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            arguments = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            annotations = [a.annotation for a in arguments if a.annotation] + ([node.returns] if node.returns else [])
        elif isinstance(node, ast.AnnAssign):
            annotations = [node.annotation]
        for annotation in annotations:
            if any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(annotation)):
                yield annotation.lineno


def _newKeywords(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
            keywords = {k.arg for k in node.keywords}
            if (name == "zip" and "strict" in keywords) or (name == "dataclass" and keywords & {"slots", "kw_only"}):
                yield node.lineno


def test_every_file_parses_with_the_oldest_supported_grammar_and_runs_there():
    problems = []
    for path in sources():
        text = open(path, encoding="utf-8").read()
        try:
            tree = ast.parse(text, path, feature_version=OLDEST)
        except SyntaxError as exc:
            problems.append(f"{path}:{exc.lineno}: {exc.msg} (Python 3.9 grammar)")
            continue
        postponed = "from __future__ import annotations" in text
        problems += [f"{path}:{line}: X | Y evaluated at run time" for line in _runtimeUnions(tree, postponed)]
        problems += [f"{path}:{line}: a keyword Python 3.9 lacks" for line in _newKeywords(tree)]
    assert not problems, "\n".join(problems)


def python39():
    candidates = [os.environ.get("MEDSSL_PYTHON39"), os.path.expanduser("~/.pyenv/versions/3.9.18/bin/python"),
                  *sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/bin/python"))), "/usr/bin/python3.9"]
    return next((c for c in candidates if c and os.path.isfile(c)), None)


def test_a_python39_interpreter_compiles_every_file(tmp_path):
    interpreter = python39()
    if interpreter is None:
        pytest.skip("no Python 3.9 interpreter here (set MEDSSL_PYTHON39)")
    script = ("import py_compile, sys\n"
              "for path in sys.argv[1:]:\n"
              "    py_compile.compile(path, cfile=sys.argv[0] + '.pyc', doraise=True)\n")
    done = subprocess.run([interpreter, "-c", script.replace("sys.argv[0]", repr(str(tmp_path / "x"))), *sources()],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
