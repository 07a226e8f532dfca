"""Extension packaging and process-model rules, checked on the source tree (the hidden MedSSLCommon module and
the two modules): every Python file is listed in its module's CMakeLists.txt, the root CMakeLists adds
MedSSLCommon first and ships the backend, the modules depend on MedSSLCommon, which is hidden, no torch or
MONAI import on the Slicer side, Qt only in the widget files, .ui widget names match the code (the shared
widget base's names in both .ui files), and a CMake configure + install with a stand-in Slicer lays the
extension out as Slicer expects."""

import ast
import os
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from slicer_testing_helpers import MODULES, ROOT, WIDGET_MODULES

# need the Slicer application
QT_ALLOWED = {"MedSSLCommon.py", "MedSSLSegment.py", "MedSSLTrainer.py", "gui.py", "install.py", "widget.py",
              "SegmentEditorMedSSLFillEffect.py"}


def pythonFiles(module, includeTests=False):
    base = os.path.join(ROOT, module)
    for folder, dirs, files in os.walk(base):
        dirs[:] = [d for d in dirs if d != "__pycache__" and (includeTests or d != "Testing")]
        for name in files:
            if name.endswith(".py"):
                yield os.path.relpath(os.path.join(folder, name), base).replace(os.sep, "/")


def cmakeList(module, variable):
    text = open(os.path.join(ROOT, module, "CMakeLists.txt")).read()
    body = re.search(r"set\(%s\s+(.*?)\)" % variable, text, re.S).group(1)
    return [item.replace("${MODULE_NAME}", module) for item in body.split()]


@pytest.mark.parametrize("module", MODULES)
def test_every_python_file_and_resource_is_listed(module):
    listed = cmakeList(module, "MODULE_PYTHON_SCRIPTS")
    assert sorted(listed) == sorted(pythonFiles(module))
    resources = cmakeList(module, "MODULE_PYTHON_RESOURCES")
    if module in WIDGET_MODULES:
        assert f"Resources/UI/{module}.ui" in resources and f"Resources/Icons/{module}.png" in resources
    else:  # the hidden library module: no widget; what install.py reads
        assert resources == ["Resources/requirements.txt"]
    for path in resources:
        assert os.path.isfile(os.path.join(ROOT, module, path)), path
    resourceFiles = {os.path.relpath(os.path.join(folder, name), os.path.join(ROOT, module)).replace(os.sep, "/")
                     for folder, _dirs, files in os.walk(os.path.join(ROOT, module, "Resources")) for name in files}
    assert resourceFiles == set(resources)
    text = open(os.path.join(ROOT, module, "CMakeLists.txt")).read()
    assert re.search(r"^set\(MODULE_NAME %s\)$" % module, text, re.M)
    assert re.search(r"^medssl_add_scripted_module\((WITH_GENERIC_TESTS)?\)$", text, re.M)
    assert ("WITH_GENERIC_TESTS" in text) == (module in WIDGET_MODULES)  # generic tests need a widget
    assert os.path.isfile(os.path.join(ROOT, module, "Testing", "CMakeLists.txt"))


def test_modules_depend_on_the_hidden_common_module():
    """MedSSLCommon is hidden and carries MedSSLCommonLib; the two modules list it as a dependency, so Slicer
    loads it first, and import nothing from each other's Lib package."""
    common = open(os.path.join(ROOT, "MedSSLCommon", "MedSSLCommon.py")).read()
    assert "self.parent.hidden = True" in common and "class MedSSLCommonWidget" not in common
    for module in WIDGET_MODULES:
        code = open(os.path.join(ROOT, module, f"{module}.py")).read()
        assert re.search(r'self\.parent\.dependencies = \["MedSSLCommon"\]', code), module
        other = ({"MedSSLSegment", "MedSSLTrainer"} - {module}).pop()
        for relative in pythonFiles(module):
            assert f"{other}Lib" not in set(imports(os.path.join(ROOT, module, relative))), relative
    for relative in pythonFiles("MedSSLCommon"):
        assert not set(imports(os.path.join(ROOT, "MedSSLCommon", relative))) & {"MedSSLSegmentLib", "MedSSLTrainerLib"}


def test_the_cmake_helper_builds_registers_the_self_test_and_adds_testing():
    text = open(os.path.join(ROOT, "CMakeLists.txt")).read()
    macro = re.search(r"macro\(medssl_add_scripted_module\)(.*?)endmacro\(\)", text, re.S).group(1)
    assert "slicerMacroBuildScriptedModule(" in macro and "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in macro
    assert "add_subdirectory(Testing)" in macro
    assert text.index("endmacro()") < text.index("add_subdirectory(MedSSLCommon)")


def test_root_cmakelists_metadata_and_backend():
    text = open(os.path.join(ROOT, "CMakeLists.txt")).read()
    for variable in ("HOMEPAGE", "CATEGORY", "CONTRIBUTORS", "DESCRIPTION", "ICONURL", "SCREENSHOTURLS"):
        assert re.search(r'set\(EXTENSION_%s "[^"]+"\)' % variable, text), variable
    assert 'set(EXTENSION_DEPENDS "NA")' in text  # torch comes from light-the-torch, not the PyTorch extension
    added = re.findall(r"^add_subdirectory\((\w+)\)$", text, re.M)
    assert added == ["MedSSLCommon", "MedSSLSegment", "MedSSLTrainer"]  # the library module first
    assert "${CMAKE_CURRENT_SOURCE_DIR}/MedSSL/*.py" in text and "Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR" in text
    assert os.path.isfile(os.path.join(ROOT, "Resources", "Icons", "MedSSL.png"))


def test_extension_urls_point_at_files_in_the_repository():
    """Issue 11 item 10: the icon and every screenshot URL name a PNG that is in the repository (the
    raw.githubusercontent.com URLs of the main branch map to paths in this tree)."""
    from test_common_extension_index import cmakeVariables

    variables = cmakeVariables()
    urls = variables["EXTENSION_ICONURL"].split() + variables["EXTENSION_SCREENSHOTURLS"].split()
    prefix = f"https://raw.githubusercontent.com/{variables['MEDSSL_GITHUB_REPOSITORY']}/main/"
    assert len(urls) >= 2
    for url in urls:
        assert url.startswith(prefix), url
        path = os.path.join(ROOT, *url[len(prefix):].split("/"))
        assert os.path.isfile(path) and open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n", url


def imports(path):
    tree = ast.parse(open(path, encoding="utf-8").read(), path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module.split(".")[0]


@pytest.mark.parametrize("module", MODULES)
def test_no_torch_or_monai_and_qt_only_in_widgets(module):
    for relative in pythonFiles(module, includeTests=True):
        names = set(imports(os.path.join(ROOT, module, relative)))
        assert not names & {"torch", "monai"}, relative
        if os.path.basename(relative) not in QT_ALLOWED:
            assert not names & {"qt", "ctk", "slicer.ScriptedLoadableModule"}, relative


@pytest.mark.parametrize("module", WIDGET_MODULES)
def test_ui_widgets_used_by_the_code_exist(module):
    tree = ET.parse(os.path.join(ROOT, module, "Resources", "UI", f"{module}.ui"))
    names = {w.get("name") for w in tree.iter("widget")}
    code = open(os.path.join(ROOT, module, f"{module}.py")).read()
    used = set(re.findall(r"\bui\.([A-Za-z]\w*)", code))
    assert used and used <= names, used - names
    shared = open(os.path.join(ROOT, "MedSSLCommon", "MedSSLCommonLib", "widget.py")).read()
    usedByBase = set(re.findall(r"\bui\.([A-Za-z]\w*)", shared))
    assert usedByBase and usedByBase <= names, usedByBase - names
    for widget in tree.iter("widget"):
        for prop in widget.iter("property"):
            if prop.get("name") == "SlicerParameterName":
                assert re.search(r"^\s+%s: " % prop.find("string").text, code, re.M), prop.find("string").text


FAKE_SLICER = """
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/Empty.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/Empty.cmake)
"""
FAKE_USE = """
set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.12/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR ${Slicer_QTSCRIPTEDMODULES_LIB_DIR})
function(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY "WITH_GENERIC_TESTS" "NAME" "SCRIPTS;RESOURCES" ${ARGN})
  foreach(f IN LISTS MY_SCRIPTS MY_RESOURCES)
    if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${f})
      message(FATAL_ERROR "missing ${f}")
    endif()
    get_filename_component(d ${f} DIRECTORY)
    install(FILES ${f} DESTINATION ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}/${d})
  endforeach()
endfunction()
function(slicer_add_python_unittest)
endfunction()
"""


@pytest.mark.skipif(shutil.which("cmake") is None or shutil.which("c++") is None, reason="needs cmake and a C++ compiler")
def test_cmake_install_layout(tmp_path):
    fake = tmp_path / "FakeSlicer"
    fake.mkdir()
    (fake / "SlicerConfig.cmake").write_text(FAKE_SLICER, encoding="utf-8")
    (fake / "UseSlicer.cmake").write_text(FAKE_USE, encoding="utf-8")
    (fake / "Empty.cmake").write_text("", encoding="utf-8")
    build, prefix = tmp_path / "build", tmp_path / "install"
    configure = subprocess.run(["cmake", "-S", ROOT, "-B", str(build), f"-DSlicer_DIR={fake}", "-DBUILD_TESTING=OFF"],
                               capture_output=True, text=True)
    assert configure.returncode == 0, configure.stdout + configure.stderr
    install = subprocess.run(["cmake", "--install", str(build), "--prefix", str(prefix)], capture_output=True, text=True)
    assert install.returncode == 0, install.stdout + install.stderr
    modules = prefix / "lib" / "Slicer-5.12" / "qt-scripted-modules"
    for path in ["MedSSLCommon.py", "MedSSLSegment.py", "MedSSLTrainer.py", "MedSSLCommonLib/jobs.py",
                 "MedSSLCommonLib/widget.py", "MedSSLSegmentLib/logic.py", "MedSSLTrainerLib/logic.py",
                 "Resources/UI/MedSSLTrainer.ui", "Resources/Icons/MedSSLSegment.png", "Resources/requirements.txt",
                 "MedSSL/__init__.py", "MedSSL/__main__.py"]:
        assert (modules / path).is_file(), path
    assert (build / "lib" / "Slicer-5.12" / "qt-scripted-modules" / "MedSSL" / "__main__.py").is_file()
    # the installed logic finds the installed backend next to it
    found = subprocess.run([sys.executable, "-c", "import sys; sys.path.insert(0, sys.argv[1]); "
                            "from MedSSLCommonLib import backend; print(backend.backendRoot())", str(modules)],
                           capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "MEDSSL_BACKEND_PATH"})
    assert found.stdout.strip() == str(modules), found.stderr
