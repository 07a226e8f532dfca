"""Test helpers shared by the MedSSLCommon, MedSSLSegment and MedSSLTrainer pytest suites (this folder is on
``sys.path`` through the repository's root conftest.py, which also defines the shared fixtures: ``scene``,
``work_dir``, ``fake_backend``, ``real_backend``, ``slicer_app``).

Volumes: :func:`obliqueMatrix`, :func:`addVolume`, :func:`phantom` (the stand-in backend's classes),
:func:`bodyPhantom` (for the real backend), :func:`paintedSegmentation`. Widgets (with ``slicer_app``):
:func:`makeWidget`, :func:`runPanel`, :func:`fakeUi`, :data:`ENVIRONMENT`.
"""

import importlib
import math
import os
import time
from unittest import mock

import numpy as np
import pytest

import fake_slicer_gui
from fake_slicer_gui import showModule

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
MODULES = ["MedSSLCommon", "MedSSLSegment", "MedSSLTrainer"]
WIDGET_MODULES = ["MedSSLSegment", "MedSSLTrainer"]


def importSlicer():
    """``slicer`` from the slicer-core wheel, or skip the test."""
    slicer = pytest.importorskip("slicer", reason="needs the slicer-core wheel (pip install slicer-core)")
    if not hasattr(slicer, "vtkMRMLScene"):
        pytest.skip("the installed 'slicer' package is not slicer-core")
    _registerSegmentationConverters(slicer)
    return slicer


def _registerSegmentationConverters(slicer) -> None:
    """The representation converters Slicer's Segmentations module registers at start-up (labelmap <->
    closed surface): without them a segmentation holding no segment yet cannot create an empty one."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if len(factory.GetConverterRules()):
        return
    for rule in (slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule, slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule):
        factory.RegisterConverterRule(rule())


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
    from MedSSLCommonLib import nodes

    return nodes.addVolumeFromArray(array, obliqueMatrix() if matrix is None else matrix, name, scene=scene)


def phantom(shape=(6, 10, 12)):
    """int16 (k, j, i) volume: -1000 background, 50 in a block (class 1 for the fake backend), 200 in a
    smaller block (class 2)."""
    array = np.full(shape, -1000, np.int16)
    array[1:5, 2:8, 3:10] = 50
    array[2:4, 4:6, 5:7] = 200
    return array


def bodyPhantom():
    """(k, j, i) = (16, 32, 32) CT-like volume for the real backend: body 60 HU, a 300 HU lesion, air
    elsewhere."""
    array = np.full((16, 32, 32), -800, np.int16)
    array[3:13, 6:26, 6:26] = 60
    array[6:10, 12:19, 12:19] = 300
    return array


def paintedSegmentation(scene, volume):
    """One painted slice (k=2) of class "tissue" on :func:`phantom`'s grid."""
    from MedSSLCommonLib import nodes

    labels = np.zeros(phantom().shape, np.uint8)
    labels[2, 2:8, 3:10] = 1
    return nodes.segmentationFromLabelmap(labels, nodes.ijkToRasArray(volume), {"1": {"name": "tissue"}}, volume, "painted")


# ------------------------------------------------------------------------------ module widgets (slicer_app)

ENVIRONMENT = {"python": "3.12", "torch": "2.5.1", "monai": "1.4.0", "SimpleITK": "2.4", "safetensors": "0.4",
               "MedSSL": "0.1.0", "cuda": [{"name": "NVIDIA RTX A4000", "memory_gb": 15.7}], "mps": False}
"""What the environment probe would report on a workstation with a GPU (the real probe imports torch)."""


def fakeUi(module):
    return fake_slicer_gui.fakeUi(ROOT, module)


def makeWidget(slicer, moduleName):
    """Import the module file under the fakes, create the module and its widget, set it up and show it."""
    module = importlib.import_module(moduleName)
    ui = fakeUi(moduleName)
    slicer.util.childWidgetVariables = mock.MagicMock(return_value=ui)
    getattr(module, moduleName)(mock.MagicMock())  # the module class: title, help, categories
    widget = getattr(module, f"{moduleName}Widget")(fake_slicer_gui.FakeModuleWidgetParent())
    widget.setup()  # Slicer: setup() when the module is first shown, then enter()
    showModule(widget)
    slicer.testWidgets.append(widget)
    return module, widget, ui


def runPanel(widget, timeout=60):
    """Poll the widget's job panel as its timer would, until the job ends (or ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while widget.panel.job is not None and (widget.panel.busy or widget.panel.timer.start.called) and time.monotonic() < deadline:
        widget.panel._poll()
        if not widget.panel.job.running:
            break
        time.sleep(0.05)


def paintedPhantomScene(scene, planes=(3, 10, 18)):
    """The backend's phantom (64 x 64 x 40, 2 x 2 x 3 mm, oblique) as volume "ct" and a segmentation "paint"
    whose one segment (liver) is painted on the axial slices ``planes``. Returns (volume, segmentation,
    liver truth (k, j, i) uint8, IJK->RAS matrix)."""
    from MedSSL.data.phantom import make_phantom
    from MedSSLCommonLib import nodes

    phantom = make_phantom(0, shape=(64, 64, 40))
    truth = np.ascontiguousarray((phantom.labels.array == 1).astype(np.uint8).T)  # (k, j, i)
    matrix = obliqueMatrix(spacing=(2.0, 2.0, 3.0))
    volume = nodes.addVolumeFromArray(np.ascontiguousarray(phantom.image.array.T), matrix, "ct", scene=scene)
    painting = np.zeros_like(truth)
    painting[list(planes)] = truth[list(planes)]
    segmentation = nodes.segmentationFromLabelmap(painting, matrix, {"1": {"name": "liver"}}, volume, "paint",
                                                  scene=scene)
    return volume, segmentation, truth, matrix
