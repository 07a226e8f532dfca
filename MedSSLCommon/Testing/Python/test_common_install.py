"""First-use installation (issue 11 item 2): torch is asked of the PyTorch extension at the version the
backend needs, pip never chooses torch (MONAI pinned to the range that accepts the installed torch, torch
held by a constraint), the installed torch's version is checked, and the dialog says what will be
installed before anything is."""

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

    monkeypatch.setattr(slicer.util, "pip_install", pip_install, raising=False)
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", confirm, raising=False)
    monkeypatch.setattr(slicer.util, "WaitCursor", mock.MagicMock(), raising=False)
    monkeypatch.setattr(slicer.util, "showStatusMessage", mock.MagicMock(), raising=False)
    pytorchUtils = types.ModuleType("PyTorchUtils")

    class PyTorchUtilsLogic:
        def installTorch(self, askConfirmation=True, torchVersionRequirement=None, **kwargs):
            calls["torch"].append(torchVersionRequirement)

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
    assert calls["torch"] == []  # torch is fine: the PyTorch extension is not asked to change it
    assert len(calls["pip"]) == 1
    args = calls["pip"][0]
    assert monai in args and not any(a.lower().startswith("torch") for a in args if not a.startswith("-"))
    assert calls["constraints"] == [[f"torch=={torch.split('+')[0]}"]]
    assert monai in calls["dialog"][0] and "torch is held" in calls["dialog"][0]


def test_missing_torch_comes_from_the_pytorch_extension_first(installer, monkeypatch):
    install, backend, calls = installer
    probes(monkeypatch, backend, {"torch": "2.6.0+cu126", "monai": None}, {"torch": "2.6.0+cu126", "monai": "1.5.2"})
    install.ensureBackendReady(dict(BASE, torch=None, monai=None))
    assert calls["torch"] == [">=2.1"]
    assert "monai>=1.3,<1.6" in calls["pip"][0] and calls["constraints"] == [["torch==2.6.0"]]
    assert "PyTorch extension" in calls["dialog"][0]


def test_too_old_torch_counts_as_missing_and_is_upgraded_by_the_extension(installer, monkeypatch):
    install, backend, calls = installer
    old = dict(BASE, torch="2.0.1", monai="1.3.0")
    assert backend.missingDependencies(old) == ["torch"]  # imports, but is too old
    probes(monkeypatch, backend, {"torch": "2.2.2", "monai": "1.3.0"}, {"torch": "2.2.2", "monai": "1.4.0"})
    install.ensureBackendReady(old)
    assert calls["torch"] == [">=2.1"] and "replacing torch 2.0.1" in calls["dialog"][0]
    assert "monai>=1.3,<1.5" in calls["pip"][0]


def test_extension_leaving_torch_too_old_stops_before_pip(installer, monkeypatch):
    install, backend, calls = installer
    probes(monkeypatch, backend, {"torch": "2.0.1", "monai": None})
    with pytest.raises(RuntimeError, match="torch 2.1 or newer"):
        install.ensureBackendReady(dict(BASE, torch="2.0.1", monai=None))
    assert calls["pip"] == []


def test_version_parsing():
    slicer = importSlicer()  # noqa: F841 (backend needs no slicer, but keeps the suite's skip rule)
    from MedSSLCommonLib import backend

    assert backend.versionTuple("2.5.1+cu121") == (2, 5, 1)
    assert backend.versionTuple("2.6.0.dev20250101") == (2, 6, 0)
    assert backend.versionTuple("2.10.0rc1") == (2, 10, 0)
    assert backend.versionTuple(None) == ()
