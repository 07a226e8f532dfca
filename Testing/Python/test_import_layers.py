"""The backend is one stack: each part imports only parts below it (README, "Design").

errors -> io -> data -> transforms -> models -> losses -> engine -> methods -> tasks -> commands, and inside
tasks: evaluate -> pretrain -> finetune -> infer -> fewshot -> cohort. Every import in every module counts, also the
ones inside functions. A module may import anything in its own part, except that no module outside a
package imports a private (``_name``) module of it."""

import ast
import shutil
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "MedSSL"

STACK = ["errors", "io", "data", "transforms", "models", "losses", "engine", "methods",
         "tasks.evaluate", "tasks.pretrain", "tasks.finetune", "tasks.infer", "tasks.fewshot", "tasks.cohort", "commands"]
BOTTOM = {"MedSSL", "MedSSL.errors"}  # the version string and the one exception type, usable everywhere
TOP = {"MedSSL.__main__"}


def layer_of(module):
    """Index in STACK of a dotted module name inside MedSSL, None for the package root."""
    if module in BOTTOM:
        return 0
    if module in TOP:
        return len(STACK)
    parts = module.split(".")[1:]
    if parts == ["tasks"]:
        return STACK.index("tasks.evaluate")
    for depth in (2, 1):
        name = ".".join(parts[:depth])
        if name in STACK:
            return STACK.index(name)
    raise AssertionError(f"{module} is in no part of the stack: add its folder to STACK and the README")


def module_name(path, package=PACKAGE):
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path, package_root=PACKAGE):
    """(line, dotted name) of every MedSSL import in a file, relative ones resolved."""
    own = module_name(path, package_root).split(".")
    package = own if path.name == "__init__.py" else own[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[:len(package) - node.level + 1] + ([node.module] if node.module else []))
            names = [base]
            if node.module is None or base in ("MedSSL",) or _is_package(base, package_root):
                names = [f"{base}.{alias.name}" if _exists(f"{base}.{alias.name}", package_root) else base for alias in node.names]
        else:
            continue
        for name in names:
            if name == "MedSSL" or name.startswith("MedSSL."):
                yield node.lineno, name


def _exists(dotted, package_root):
    path = package_root.parent.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _is_package(dotted, package_root):
    return (package_root.parent.joinpath(*dotted.split(".")) / "__init__.py").is_file()


def violations(package_root=PACKAGE):
    found = []
    for path in sorted(package_root.rglob("*.py")):
        importer = module_name(path, package_root)
        for line, imported in imported_modules(path, package_root):
            where = f"{path.relative_to(package_root.parent)}:{line} imports {imported}"
            if layer_of(imported) > layer_of(importer):
                found.append(f"{where}: {STACK[min(layer_of(imported), len(STACK) - 1)]} is above "
                             f"{STACK[min(layer_of(importer), len(STACK) - 1)]}")
            private = [part for part in imported.split(".")[1:] if part.startswith("_") and part != "__main__"]
            owner = imported.rsplit(".", 1)[0]
            if private and not importer.startswith(owner):
                found.append(f"{where}: a private module imported from outside its package")
    return found


def test_every_import_goes_down_the_stack():
    assert violations() == []


def test_every_backend_module_is_in_the_stack():
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path))


def test_the_checker_catches_upward_and_private_imports(tmp_path):
    """The checker itself can fail: an io module importing a task, or a private module of another package."""
    copy = tmp_path / "MedSSL"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "io" / "probe.py").write_text("from MedSSL.tasks.infer import predict\n", encoding="utf-8")
    (copy / "methods" / "_private_probe.py").write_text("", encoding="utf-8")
    (copy / "tasks" / "infer" / "probe.py").write_text("from MedSSL.methods import _private_probe\n", encoding="utf-8")
    found = violations(copy)
    assert any("io/probe.py:1 imports MedSSL.tasks.infer.predict" in v for v in found)
    assert any("tasks/infer/probe.py:1 imports MedSSL.methods._private_probe: a private" in v for v in found)
