"""First-use installation (issue 11 item 2, issue 19 items 6, 7, 8, 11): torch comes from light-the-torch in a
child process at the version the backend needs (never imported in Slicer's process, no torchvision), pip
never chooses torch (MONAI pinned to the range that accepts the installed torch, torch held by a constraint
with its exact version string), the installed torch's version is checked, the dialog says what will be
installed before anything is, an unsupported Slicer is refused in one line and so is a failed download."""

import subprocess

import sys
import types
from unittest import mock

import pytest

from slicer_testing_helpers import importSlicer

BASE = {"python": "3.12", "SimpleITK": "2.4", "safetensors": "0.4", "MedSSL": "0.1.0", "cuda": [], "mps": False}


@pytest.fixture
def installer(monkeypatch):
    slicer = importSlicer()
    monkeypatch.setattr(slicer, "app", mock.MagicMock(name="slicer.app"), raising=False)
    slicer.app.testingEnabled.return_value = False
    slicer.app.majorVersion, slicer.app.minorVersion = 5, 8
    calls = {"pip": [], "constraints": [], "torch": [], "dialog": []}

    def pip_install(args):
        args = list(args)
        if "--constraint" in args:
            path = args[args.index("--constraint") + 1]
            calls["constraints"].append(open(path, encoding="utf-8").read().split())
        calls["pip"].append(args)

    def confirm(message, *args, **kwargs):
        calls["dialog"].append(message)
        return True

    def executePythonModule(module, args):  # Slicer runs it as PythonSlicer -m module args (a child process)
        assert module == "light_the_torch" and args[0] == "install"
        calls["torch"].append(args[1])

    monkeypatch.setattr(slicer.util, "pip_install", pip_install, raising=False)
    monkeypatch.setattr(slicer.util, "_executePythonModule", executePythonModule, raising=False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", confirm, raising=False)
    monkeypatch.setattr(slicer.util, "WaitCursor", mock.MagicMock(), raising=False)
    monkeypatch.setattr(slicer.util, "showStatusMessage", mock.MagicMock(), raising=False)
    pytorchUtils = types.ModuleType("PyTorchUtils")  # its installTorch ends with "import torch" in this process

    class PyTorchUtilsLogic:
        def installTorch(self, *args, **kwargs):
            raise AssertionError("the PyTorch extension's installTorch imports torch in Slicer's process")

    pytorchUtils.PyTorchUtilsLogic = PyTorchUtilsLogic
    monkeypatch.setitem(sys.modules, "PyTorchUtils", pytorchUtils)
    sys.modules.pop("MedSSLCommonLib.install", None)
    from MedSSLCommonLib import backend, install

    yield install, backend, calls
    sys.modules.pop("MedSSLCommonLib.install", None)


def probes(monkeypatch, backend, *results):
    answers = iter(results)
    monkeypatch.setattr(backend, "probeEnvironment", lambda *a, **k: dict(BASE, **next(answers)))


@pytest.mark.parametrize("torch, monai", [("2.3.1+cu121", "monai>=1.3,<1.5"), ("2.4.1", "monai>=1.3,<1.6"),
                                          ("2.5.1+cu124", "monai>=1.3,<1.6"), ("2.8.0", "monai>=1.3,<1.7")])
def test_monai_is_pinned_to_the_installed_torch_and_torch_is_held(installer, monkeypatch, torch, monai):
    install, backend, calls = installer
    probes(monkeypatch, backend, {"torch": torch, "monai": "1.4.0"})
    environment = dict(BASE, torch=torch, monai=None)
    install.ensureBackendReady(environment)
    assert calls["torch"] == []  # torch is fine: nothing changes it
    assert len(calls["pip"]) == 1
    args = calls["pip"][0]
    assert monai in args and not any(a.lower().startswith("torch") for a in args if not a.startswith("-"))
    assert calls["constraints"] == [[f"torch=={torch}"]]  # the exact installed version
    assert monai in calls["dialog"][0] and "torch is held" in calls["dialog"][0]


def test_missing_torch_comes_from_light_the_torch_in_a_child_process(installer, monkeypatch):
    install, backend, calls = installer
    probes(monkeypatch, backend, {"torch": "2.6.0+cu126", "monai": None}, {"torch": "2.6.0+cu126", "monai": "1.5.2"})
    install.ensureBackendReady(dict(BASE, torch=None, monai=None))
    assert calls["pip"][0] == ["light-the-torch>=0.7"] and calls["torch"] == ["torch>=2.1"]
    assert "monai>=1.3,<1.6" in calls["pip"][1] and calls["constraints"] == [["torch==2.6.0+cu126"]]
    plan = calls["dialog"][0]
    assert "light-the-torch" in plan and "build for your NVIDIA driver, else the CPU build" in plan
    assert "not torchvision" in plan and "torchvision" not in " ".join(map(str, calls["pip"] + calls["torch"]))


def test_python_39_gets_a_torch_that_exists_for_it(installer, monkeypatch):
    """Item 11: Slicer 5.6 and 5.8 embed Python 3.9, for which torch stops at 2.8."""
    install, backend, calls = installer
    probes(monkeypatch, backend, {"python": "3.9.10", "torch": "2.8.0", "monai": None},
           {"python": "3.9.10", "torch": "2.8.0", "monai": "1.5.1"})
    install.ensureBackendReady(dict(BASE, python="3.9.10", torch=None, monai=None))
    assert calls["torch"] == ["torch>=2.1,<2.9"] and "torch>=2.1,<2.9" in calls["dialog"][0]


def test_an_unsupported_slicer_is_refused_in_one_line_before_anything(installer, monkeypatch):
    """Item 11: Slicer older than 5.6 is refused before the dialog; nothing is installed."""
    import slicer

    install, backend, calls = installer
    slicer.app.majorVersion, slicer.app.minorVersion = 5, 4
    with pytest.raises(RuntimeError) as caught:
        install.ensureBackendReady(dict(BASE, torch=None, monai=None))
    assert str(caught.value) == "MedSSL needs Slicer 5.6 or newer; this is Slicer 5.4: install a newer Slicer."
    assert calls == {"pip": [], "constraints": [], "torch": [], "dialog": []}
    assert "Python 3.9 or newer" in install.unsupportedReason(dict(BASE, python="3.8.10"), (5, 8))


@pytest.mark.parametrize("version", ["2.6.0.dev20250101+cu124", "2.1.0a0+git1234abc", "2.5.0rc1"])
def test_nightly_pre_release_and_custom_torch_builds_are_held_exactly(installer, monkeypatch, version):
    """Item 8: the constraint names the installed version string, so pip keeps the build it has."""
    install, backend, calls = installer
    probes(monkeypatch, backend, {"torch": version, "monai": "1.4.0"})
    install.ensureBackendReady(dict(BASE, torch=version, monai=None))
    assert calls["constraints"] == [[f"torch=={version}"]]


def test_a_failed_download_is_one_readable_line(installer, monkeypatch):
    """Item 7: offline or behind a proxy, pip fails: one line, not pip's CalledProcessError."""
    import slicer

    install, backend, calls = installer

    def offline(args):
        raise subprocess.CalledProcessError(1, ["PythonSlicer", "-m", "pip", "install", *args])

    monkeypatch.setattr(slicer.util, "pip_install", offline)
    with pytest.raises(RuntimeError) as caught:
        install.ensureBackendReady(dict(BASE, torch=None, monai=None))
    assert str(caught.value) == ("installing light-the-torch>=0.7 failed (exit status 1): check the internet connection "
                                 "(or proxy settings) and try again; pip's messages are in the Python console")
    assert caught.value.__cause__ is None and calls["torch"] == []


def test_too_old_torch_counts_as_missing_and_is_upgraded(installer, monkeypatch):
    install, backend, calls = installer
    old = dict(BASE, torch="2.0.1", monai="1.3.0")
    assert backend.missingDependencies(old) == ["torch"]  # imports, but is too old
    probes(monkeypatch, backend, {"torch": "2.2.2", "monai": "1.3.0"}, {"torch": "2.2.2", "monai": "1.4.0"})
    install.ensureBackendReady(old)
    assert calls["torch"] == ["torch>=2.1"] and "replacing torch 2.0.1" in calls["dialog"][0]
    assert "monai>=1.3,<1.5" in calls["pip"][1]


def test_installer_leaving_torch_too_old_stops_before_pip(installer, monkeypatch):
    install, backend, calls = installer
    probes(monkeypatch, backend, {"torch": "2.0.1", "monai": None})
    with pytest.raises(RuntimeError, match="torch 2.1 or newer"):
        install.ensureBackendReady(dict(BASE, torch="2.0.1", monai=None))
    assert calls["pip"] == [["light-the-torch>=0.7"]]  # the installer only


def test_version_parsing():
    slicer = importSlicer()  # noqa: F841 (backend needs no slicer, but keeps the suite's skip rule)
    from MedSSLCommonLib import backend

    assert backend.versionTuple("2.5.1+cu121") == (2, 5, 1)
    assert backend.versionTuple("2.6.0.dev20250101") == (2, 6, 0)
    assert backend.versionTuple("2.10.0rc1") == (2, 10, 0)
    assert backend.versionTuple(None) == ()
