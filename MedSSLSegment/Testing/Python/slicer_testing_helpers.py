"""Test helpers shared by the MedSSLSegment and MedSSLTrainer pytest suites (imported by both conftest.py).

``pytest`` fixtures: ``scene`` (a fresh MRML scene set as ``slicer.mrmlScene``; skips without slicer-core),
``fake_backend`` (the stand-in CLI of fake_medssl.py installed as a ``MedSSL`` package and made the
backend the logic starts), ``work_dir`` (``MEDSSL_WORK_DIR`` in a temporary folder).
"""

import math
import os
import shutil
import sys

import numpy as np
import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
MODULE_DIRS = [os.path.join(ROOT, "MedSSLSegment"), os.path.join(ROOT, "MedSSLTrainer")]


def addModulePaths():
    """Put both module folders on sys.path, as Slicer does for scripted modules."""
    for path in reversed(MODULE_DIRS):
        if path not in sys.path:
            sys.path.insert(0, path)


def importSlicer():
    """``slicer`` from the slicer-core wheel, or skip the test."""
    slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install slicer-core)")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the installed 'slicer' package is not slicer-core")
    return slicer


@pytest.fixture
def scene():
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
    (root / "MedSSL" / "__init__.py").write_text("")
    shutil.copy(os.path.join(HERE, "fake_medssl.py"), root / "MedSSL" / "__main__.py")
    monkeypatch.setenv("MEDSSL_BACKEND_PATH", str(root))
    monkeypatch.setenv("MEDSSL_PYTHON", sys.executable)
    return root


def obliqueMatrix(spacing=(0.7, 0.9, 2.5), origin=(12.25, -30.5, 41.125), angles=(0.3, -0.2, 0.45)):
    """A 4x4 IJK->RAS matrix with rotated (oblique) axes and non-isotropic spacing (mm)."""
    a, b, c = angles
    rx = np.array([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = np.array([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = np.array([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    matrix = np.eye(4)
    matrix[:3, :3] = rz @ ry @ rx @ np.diag(spacing)
    matrix[:3, 3] = origin
    return matrix


def addVolume(scene, array, matrix=None, name="volume"):
    """A scalar volume node holding ``array`` (k, j, i) placed by ``matrix`` (default: oblique)."""
    from MedSSLSegmentLib import nodes

    return nodes.addVolumeFromArray(array, obliqueMatrix() if matrix is None else matrix, name, scene=scene)


def phantom(shape=(6, 10, 12)):
    """int16 (k, j, i) volume: -1000 background, 50 in a block (class 1 for the fake backend), 200 in a
    smaller block (class 2)."""
    array = np.full(shape, -1000, np.int16)
    array[1:5, 2:8, 3:10] = 50
    array[2:4, 4:6, 5:7] = 200
    return array
