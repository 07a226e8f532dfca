"""Every text file the project reads or writes names its encoding: the backend, the benchmarks, the Slicer
side and the tools (not the tests). Without ``encoding=`` Python uses the locale's, and under the C locale
(a bare container, or a library that reset it) writing a table with ± or → fails with UnicodeEncodeError.
Text-mode ``subprocess`` calls name it too. Found by parsing the code: ``open``/``os.fdopen`` in a text
mode, ``Path.open``, ``read_text``, ``write_text`` and ``subprocess.run/Popen/check_output(text=True)``."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
FOLDERS = ("MedSSL", "Testing/Benchmarks", "MedSSLCommon", "MedSSLSegment", "MedSSLTrainer", "Resources")
#: modules whose ``open`` is not the built-in one (they open images or archives, in binary)
NOT_TEXT_OPEN = {"sitk", "Image", "tarfile", "zipfile", "gzip", "np", "os"}


def project_sources():
    for folder in FOLDERS:
        for path in sorted((REPO / folder).rglob("*.py")):
            if not (path.name.startswith("test_") or path.name == "conftest.py"):
                yield path


def _mode(call: ast.Call, position: int):
    for keyword in call.keywords:
        if keyword.arg == "mode":
            return keyword.value
    return call.args[position] if len(call.args) > position else None


def unnamed_encodings(tree: ast.AST):
    """(line, call) for each text-mode file or process call without ``encoding=``."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or any(k.arg == "encoding" for k in node.keywords):
            continue
        func = node.func
        name = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
        owner = func.value.id if isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) else None
        if name in ("read_text", "write_text"):
            yield node.lineno, name
        elif name == "fdopen" or (name == "open" and owner not in NOT_TEXT_OPEN):
            mode = _mode(node, 1 if isinstance(func, ast.Name) or name == "fdopen" else 0)
            if not (isinstance(mode, ast.Constant) and "b" in str(mode.value)):
                yield node.lineno, f"{name}({ast.unparse(mode) if mode is not None else ''})"
        elif name in ("run", "Popen", "check_output") and any(
                k.arg in ("text", "universal_newlines") for k in node.keywords):
            yield node.lineno, f"{name}(text=True)"


def test_every_text_file_names_its_encoding():
    found = [f"{path.relative_to(REPO)}:{line}: {call}" for path in project_sources()
             for line, call in unnamed_encodings(ast.parse(path.read_text(encoding="utf-8")))]
    assert not found, "text I/O without encoding=:\n" + "\n".join(found)


def test_the_check_finds_what_it_looks_for():
    code = ("open(p, 'w')\nopen(p, 'rb')\nPath(p).write_text(t)\nPath(p).read_text(encoding='utf-8')\n"
            "subprocess.run(c, text=True)\nsitk.open(p)\nos.fdopen(fd, 'w')\np.open()\n")
    assert [line for line, _ in unnamed_encodings(ast.parse(code))] == [1, 3, 5, 7, 8]
