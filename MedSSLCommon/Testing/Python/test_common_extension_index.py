"""Issue 19 items 4 and 5: what the Extensions Index and a source-checkout install need. The root CMakeLists.txt
metadata (LICENSE.txt at the root, contributors as "Name (Organisation)", the homepage, icon and screenshot URLs
made from one repository variable, no unused extension dependency), and the install instructions naming every
folder that holds a module (without MedSSLCommon, ``import MedSSLCommonLib`` fails and Slicer refuses the two
modules that depend on it)."""

import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
CONTRIBUTOR = re.compile(r"^[^,()]+ \([^,()]+\)$")


def cmakeVariables() -> dict:
    """The root CMakeLists.txt's ``set(NAME "value")`` lines, ``${OTHER}`` expanded."""
    text = open(os.path.join(ROOT, "CMakeLists.txt"), encoding="utf-8").read()
    variables = {}
    for name, value in re.findall(r'^set\((\w+) "([^"]*)"\)', text, re.M):
        variables[name] = re.sub(r"\$\{(\w+)\}", lambda m: variables.get(m.group(1), m.group(0)), value)
    return variables


def moduleFolders() -> set:
    """Folders of the repository that hold a Slicer module (``<Folder>/<Folder>.py``)."""
    return {name for name in os.listdir(ROOT) if os.path.isfile(os.path.join(ROOT, name, f"{name}.py"))}


def test_license_file_and_metadata_for_the_extensions_index():
    license = open(os.path.join(ROOT, "LICENSE.txt"), encoding="utf-8").read()
    assert "Apache License" in license and "Version 2.0, January 2004" in license
    assert 'license = { text = "Apache-2.0" }' in open(os.path.join(ROOT, "pyproject.toml"), encoding="utf-8").read()
    variables = cmakeVariables()
    assert variables["EXTENSION_DEPENDS"] == "NA"
    contributors = [c.strip() for c in variables["EXTENSION_CONTRIBUTORS"].split(",")]
    assert contributors and all(CONTRIBUTOR.match(c) for c in contributors), contributors
    repository = variables["MEDSSL_GITHUB_REPOSITORY"]
    assert re.fullmatch(r"[\w.-]+/[\w.-]+", repository)
    assert variables["EXTENSION_HOMEPAGE"].startswith(f"https://github.com/{repository}")
    for name in ("EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS"):
        for url in variables[name].split():
            assert url.startswith(f"https://raw.githubusercontent.com/{repository}/main/"), url
    assert variables["EXTENSION_CATEGORY"] and len(variables["EXTENSION_DESCRIPTION"]) > 40


def test_modules_name_the_same_contributors_as_the_extension():
    contributors = cmakeVariables()["EXTENSION_CONTRIBUTORS"]
    for path in ("MedSSLCommon/MedSSLCommon.py", "MedSSLCommon/MedSSLCommonLib/widget.py"):
        assert f'contributors = ["{contributors}"]' in open(os.path.join(ROOT, path), encoding="utf-8").read(), path


def installInstructions() -> list[str]:
    """The paragraphs that tell a source-checkout user which folders to add as module paths."""
    found = []
    for name in ("README.md", os.path.join("docs", "slicer.md")):
        path = os.path.join(ROOT, name)
        if os.path.isfile(path):
            text = open(path, encoding="utf-8").read()
            found += [p for p in text.split("\n\n") if "Additional module paths" in p]
    return found


def test_source_checkout_instructions_add_every_module_folder():
    paragraphs = installInstructions()
    assert paragraphs, "no install instructions mention 'Additional module paths'"
    modules = moduleFolders()
    assert modules == {"MedSSLCommon", "MedSSLSegment", "MedSSLTrainer"}
    for paragraph in paragraphs:
        named = set(re.findall(r"`(MedSSL\w*)`", paragraph)) & (modules | {"MedSSL"})
        assert named - {"MedSSL"} == modules, paragraph
