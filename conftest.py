"""pytest setup of the Slicer-side tests (MedSSLCommon, MedSSLSegment and MedSSLTrainer ``Testing/Python``).

The three module folders go on ``sys.path``, as Slicer puts scripted module folders there (so
``MedSSLCommonLib``, ``MedSSLSegmentLib`` and ``MedSSLTrainerLib`` import as in Slicer), and so does the one
folder of shared test helpers, ``MedSSLCommon/Testing/Python`` (fake_slicer_gui.py, fake_medssl.py,
slicer_testing_helpers.py). The shared fixtures are defined here, once:

* ``scene`` - a fresh MRML scene set as ``slicer.mrmlScene`` (skips without the slicer-core wheel);
* ``work_dir`` - ``MEDSSL_WORK_DIR`` in a temporary folder;
* ``fake_backend`` - the stand-in CLI (fake_medssl.py) installed as a ``MedSSL`` package and made the
  backend the logic starts;
* ``real_backend`` - the repository's real backend, run by this Python, with its cube cache in a temporary
  folder;
* ``slicer_app`` - slicer.app, qt, ctk, the scripted-module classes and parameterNodeWrapper faked (strict
  doubles), MRML real: the module widgets run outside Slicer (the environment probe answers
  ``slicer_testing_helpers.ENVIRONMENT``; the backend's option defaults come from the stand-in).

The backend's own tests (``Testing/Python``) use none of these and import none of these folders.
"""

import os
import shutil
import sys
from unittest import mock

import pytest

#: the shuffled test order and the check that no test leaks process-wide state (conftest_isolation.py)
pytest_plugins = ["conftest_isolation"]

ROOT = os.path.dirname(os.path.abspath(__file__))
HELPERS = os.path.join(ROOT, "MedSSLCommon", "Testing", "Python")
SLICER_PATHS = [HELPERS] + [os.path.join(ROOT, module) for module in ("MedSSLCommon", "MedSSLSegment", "MedSSLTrainer")]

#: under pytest-xdist (``-n 2``: the README's test command) each worker computes on one thread, so two
#: workers share two cores instead of fighting over them; child processes inherit it
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")

for _path in reversed(SLICER_PATHS):
    if _path not in sys.path:
        sys.path.insert(0, _path)


@pytest.fixture
def scene():
    from slicer_testing_helpers import importSlicer

    slicer = importSlicer()
    mrmlScene = slicer.vtkMRMLScene()
    previous = getattr(slicer, "mrmlScene", None)
    slicer.mrmlScene = mrmlScene
    yield mrmlScene
    if previous is None:
        del slicer.mrmlScene
    else:
        slicer.mrmlScene = previous
    mrmlScene.Clear(1)


@pytest.fixture
def work_dir(tmp_path, monkeypatch):
    path = tmp_path / "work"
    monkeypatch.setenv("MEDSSL_WORK_DIR", str(path))
    return path


@pytest.fixture
def fake_backend(tmp_path, monkeypatch, work_dir):
    """A ``MedSSL`` package whose ``__main__`` is fake_medssl.py, used by the logic's child processes."""
    root = tmp_path / "fake_backend"
    (root / "MedSSL").mkdir(parents=True)
    (root / "MedSSL" / "__init__.py").write_text("", encoding="utf-8")
    shutil.copy(os.path.join(HELPERS, "fake_medssl.py"), root / "MedSSL" / "__main__.py")
    monkeypatch.setenv("MEDSSL_BACKEND_PATH", str(root))
    monkeypatch.setenv("MEDSSL_PYTHON", sys.executable)
    _forgetCachedDefaults(monkeypatch)
    return root


@pytest.fixture
def real_backend(work_dir, monkeypatch, tmp_path):
    """The MedSSL backend of this repository (found next to the modules), run by this Python."""
    monkeypatch.delenv("MEDSSL_BACKEND_PATH", raising=False)
    monkeypatch.setenv("MEDSSL_PYTHON", sys.executable)
    monkeypatch.setenv("MEDSSL_CACHE", str(tmp_path / "cache"))
    _forgetCachedDefaults(monkeypatch)


def _forgetCachedDefaults(monkeypatch):
    """The backend's option defaults are cached per Python (MedSSLCommonLib.backend.commandDefaults): each test's
    backend answers ``info --defaults`` afresh."""
    from MedSSLCommonLib import backend

    monkeypatch.setattr(backend, "_DEFAULTS_CACHE", {})


WIDGET_MODULES = ("MedSSLCommonLib.gui", "MedSSLCommonLib.install", "MedSSLCommonLib.widget", "MedSSLSegment",
                  "MedSSLTrainer")
"""Imported again under the fakes (they import qt or the scripted-module classes when imported)."""


@pytest.fixture
def slicer_app(scene, fake_backend, monkeypatch):
    """slicer.app, qt, ctk, the scripted-module classes and parameterNodeWrapper faked; MRML real."""
    import fake_slicer_gui
    import slicer
    from slicer_testing_helpers import ENVIRONMENT

    fakes = {"qt": mock.MagicMock(name="qt"), "ctk": mock.MagicMock(name="ctk"),
             "slicer.ScriptedLoadableModule": fake_slicer_gui.scriptedLoadableModule(scene),
             "slicer.parameterNodeWrapper": fake_slicer_gui.parameterNodeWrapperModule()}
    for name, module in fakes.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(slicer, "app", mock.MagicMock(name="slicer.app"), raising=False)
    monkeypatch.setattr(slicer, "modules", mock.MagicMock(name="slicer.modules"), raising=False)
    for name in ("loadUI", "setSliceViewerLayers", "errorDisplay", "showStatusMessage"):
        monkeypatch.setattr(slicer.util, name, mock.MagicMock(name=name))
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", mock.MagicMock(return_value=True))
    _forgetWidgetModules()
    from MedSSLCommonLib import gui

    def synchronousCall(function, onDone, intervalMs=200):
        try:
            onDone(function(), None)
        except Exception as exc:
            onDone(None, exc)

    monkeypatch.setattr(gui, "BackgroundCall", synchronousCall)
    from MedSSLCommonLib import backend

    monkeypatch.setattr(backend, "probeEnvironment", lambda *args, **kwargs: dict(ENVIRONMENT))  # no torch import
    slicer.testWidgets = []
    yield slicer
    for widget in slicer.testWidgets:
        widget.cleanup()
    del slicer.testWidgets
    _forgetWidgetModules()


def _forgetWidgetModules():
    """Drop the widget modules so the next import runs them again under the current fakes (also the package's
    attribute: ``from MedSSLCommonLib import gui`` would otherwise reuse the module it names)."""
    import MedSSLCommonLib

    for name in WIDGET_MODULES:
        sys.modules.pop(name, None)
        if name.startswith("MedSSLCommonLib."):
            MedSSLCommonLib.__dict__.pop(name.split(".", 1)[1], None)
