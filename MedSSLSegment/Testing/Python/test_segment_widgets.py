"""Smoke tests of both module widgets outside Slicer: Qt, CTK, the scripted-module base classes and
parameterNodeWrapper are replaced by small fakes, MRML is real (slicer-core) and the backend is the stand-in
CLI. They catch wiring mistakes (names, signatures, flows) that only Slicer would otherwise reveal; they do
not show that the widgets look right - that needs Slicer itself (the modules' self-tests)."""

import importlib
import os
import sys
import time
import types
import unittest
import xml.etree.ElementTree as ET
from unittest import mock

import numpy as np
import pytest

from slicer_testing_helpers import ROOT, addVolume, phantom


class FakeSignalWidget:
    """Records connections; ``emit(signal, *args)`` calls them."""

    def __init__(self, name):
        self.name = name
        self.enabled = True
        self.visible = True
        self.text = ""
        self.toolTip = ""
        self._slots = {}

    def connect(self, signal, slot):
        self._slots.setdefault(signal, []).append(slot)

    def emit(self, signal, *args):
        for slot in self._slots.get(signal, []):
            slot(*args)

    def blockSignals(self, _block):
        return False

    def hide(self):
        self.visible = False

    def show(self):
        self.visible = True

    def __getattr__(self, name):  # anything else (setRange, clear, appendPlainText...) is accepted
        if name.startswith("__"):
            raise AttributeError(name)
        return mock.MagicMock(name=f"{self.name}.{name}")


class FakeComboBox(FakeSignalWidget):
    def __init__(self, name):
        super().__init__(name)
        self.items = []
        self.currentIndex = -1

    def addItem(self, text, data=None):
        self.items.append((text, data))
        if self.currentIndex < 0:
            self.setCurrentIndex(0)

    def clear(self):
        self.items, self.currentIndex = [], -1

    def findData(self, data):
        return next((i for i, (_t, d) in enumerate(self.items) if d == data), -1)

    def setCurrentIndex(self, index):
        if index != self.currentIndex:
            self.currentIndex = index
            self.emit("currentIndexChanged(int)", index)

    def setItemData(self, *_args):
        pass

    @property
    def count(self):
        return len(self.items)

    @property
    def currentData(self):
        return self.items[self.currentIndex][1] if 0 <= self.currentIndex < len(self.items) else None


class FakePathLineEdit(FakeSignalWidget):
    def __init__(self, name):
        super().__init__(name)
        self._path = ""
        self.filters = 0
        self.nameFilters = []
        self.settingKey = ""

    @property
    def currentPath(self):
        return self._path

    @currentPath.setter
    def currentPath(self, value):
        if value != self._path:
            self._path = value
            self.emit("currentPathChanged(QString)", value)

    def addCurrentPathToHistory(self):
        pass


class FakeNodeComboBox(FakeSignalWidget):
    def __init__(self, name):
        super().__init__(name)
        self.node = None
        self.checked = []

    def currentNode(self):
        return self.node

    def setCurrentNode(self, node):
        self.node = node
        self.emit("currentNodeChanged(vtkMRMLNode*)", node)

    def checkedNodes(self):
        return list(self.checked)


class FakeValueWidget(FakeSignalWidget):
    def __init__(self, name):
        super().__init__(name)
        self.value = 0
        self.checked = False


WIDGETS = {"QComboBox": FakeComboBox, "ctkPathLineEdit": FakePathLineEdit, "qMRMLNodeComboBox": FakeNodeComboBox,
           "qMRMLCheckableNodeComboBox": FakeNodeComboBox, "QSpinBox": FakeValueWidget,
           "QDoubleSpinBox": FakeValueWidget, "QCheckBox": FakeValueWidget}


def fakeUi(module):
    tree = ET.parse(os.path.join(ROOT, module, "Resources", "UI", f"{module}.ui"))
    return types.SimpleNamespace(**{w.get("name"): WIDGETS.get(w.get("class"), FakeSignalWidget)(w.get("name"))
                                    for w in tree.iter("widget")})


def fakeScriptedLoadableModule(scene):
    module = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent

    class ScriptedLoadableModuleWidget:
        def __init__(self, parent=None):
            self.parent = parent or mock.MagicMock()
            self.layout = mock.MagicMock()

        def setup(self):
            pass

        def resourcePath(self, relative):
            return relative

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = type(self).__name__

        def getParameterNode(self):
            node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", self.moduleName)
                node.SetSingletonTag(self.moduleName)
            return node

    module.ScriptedLoadableModule = ScriptedLoadableModule
    module.ScriptedLoadableModuleWidget = ScriptedLoadableModuleWidget
    module.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    module.ScriptedLoadableModuleTest = unittest.TestCase
    return module


def fakeParameterNodeWrapper(cls):
    """Keeps typed attributes in a dict and proxies observers to the scripted module node."""
    defaults = {name: getattr(cls, name, None) for name in cls.__annotations__}

    class Wrapped:
        def __init__(self, node):
            object.__setattr__(self, "_node", node)
            object.__setattr__(self, "_values", dict(defaults))

        def __getattr__(self, name):
            if name in defaults:
                return self._values[name]
            raise AttributeError(name)

        def __setattr__(self, name, value):
            assert name in defaults, name
            self._values[name] = value
            self._node.Modified()

        def connectGui(self, ui):
            return "tag"

        def disconnectGui(self, tag):
            pass

        def AddObserver(self, event, method, priority=0.0):
            return self._node.AddObserver(event, method, priority)

        def RemoveObserver(self, tag):
            self._node.RemoveObserver(tag)

    return Wrapped


ENVIRONMENT = {"python": "3.12", "torch": "2.5.1", "monai": "1.4.0", "SimpleITK": "2.4", "safetensors": "0.4",
               "MedSSL": "0.1.0", "cuda": [{"name": "NVIDIA RTX A4000", "memory_gb": 15.7}], "mps": False}
"""What the environment probe would report on a workstation with a GPU (the real probe imports torch)."""


@pytest.fixture
def slicer_app(scene, fake_backend, monkeypatch):
    """slicer.app, qt, ctk, the scripted-module classes and parameterNodeWrapper faked; MRML real."""
    import slicer

    wrapperModule = types.ModuleType("slicer.parameterNodeWrapper")
    wrapperModule.parameterNodeWrapper = fakeParameterNodeWrapper
    fakes = {"qt": mock.MagicMock(name="qt"), "ctk": mock.MagicMock(name="ctk"),
             "slicer.ScriptedLoadableModule": fakeScriptedLoadableModule(scene),
             "slicer.parameterNodeWrapper": wrapperModule}
    for name, module in fakes.items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(slicer, "app", mock.MagicMock(name="slicer.app"), raising=False)
    monkeypatch.setattr(slicer, "modules", mock.MagicMock(name="slicer.modules"), raising=False)
    for name in ("loadUI", "setSliceViewerLayers", "errorDisplay", "showStatusMessage"):
        monkeypatch.setattr(slicer.util, name, mock.MagicMock(name=name))
    monkeypatch.setattr(slicer.util, "confirmOkCancelDisplay", mock.MagicMock(return_value=True))
    for name in ("MedSSLSegmentLib.gui", "MedSSLSegmentLib.install", "MedSSLSegment", "MedSSLTrainer"):
        sys.modules.pop(name, None)
    from MedSSLSegmentLib import gui

    def synchronousCall(function, onDone, intervalMs=200):
        try:
            onDone(function(), None)
        except Exception as exc:
            onDone(None, exc)

    monkeypatch.setattr(gui, "BackgroundCall", synchronousCall)
    from MedSSLSegmentLib import backend

    monkeypatch.setattr(backend, "probeEnvironment", lambda *args, **kwargs: dict(ENVIRONMENT))  # no torch import
    slicer.testWidgets = []
    yield slicer
    for widget in slicer.testWidgets:
        widget.cleanup()
    del slicer.testWidgets
    for name in ("MedSSLSegmentLib.gui", "MedSSLSegmentLib.install", "MedSSLSegment", "MedSSLTrainer"):
        sys.modules.pop(name, None)


def makeWidget(slicer, moduleName):
    module = importlib.import_module(moduleName)
    ui = fakeUi(moduleName)
    slicer.util.childWidgetVariables = mock.MagicMock(return_value=ui)
    getattr(module, moduleName)(mock.MagicMock())  # the module class: title, help, categories
    widget = getattr(module, f"{moduleName}Widget")(mock.MagicMock())
    widget.setup()
    slicer.testWidgets.append(widget)
    return module, widget, ui


def runPanel(widget, timeout=60):
    deadline = time.monotonic() + timeout
    while widget.panel.job is not None and (widget.panel.busy or widget.panel.timer.start.called) and time.monotonic() < deadline:
        widget.panel._poll()
        if not widget.panel.job.running:
            break
        time.sleep(0.05)


def test_trainer_widget_fine_tune_and_suggest(slicer_app, scene, tmp_path):
    slicer = slicer_app
    module, widget, ui = makeWidget(slicer, "MedSSLTrainer")
    assert ui.methodComboBox.currentData == "genesis" and ui.methodComboBox.count >= 2  # from methods --json
    assert ui.deviceComboBox.currentData == "auto" and not ui.installButton.visible
    assert ui.deviceComboBox.items[0][0] == "auto (NVIDIA RTX A4000, 15.7 GB)" and ui.deviceWarningLabel.text == ""
    ui.deviceComboBox.setCurrentIndex(ui.deviceComboBox.findData("cpu"))
    assert "CPU" in ui.deviceWarningLabel.text
    volume = addVolume(scene, phantom(), name="ct")
    from MedSSLSegmentLib import nodes

    labels = np.zeros(phantom().shape, np.uint8)
    labels[2, 2:8, 3:10] = 1
    segmentation = nodes.segmentationFromLabelmap(labels, nodes.ijkToRasArray(volume), {"1": {"name": "tissue"}}, volume, "painted")
    ui.fewShotVolumeSelector.setCurrentNode(volume)
    ui.fewShotSegmentationSelector.setCurrentNode(segmentation)
    ui.initComboBox.setCurrentIndex(ui.initComboBox.findData("none"))
    assert ui.fineTuneButton.enabled and not ui.suggestButton.enabled
    widget.onFineTuneButton()
    assert ui.fineTuneButton.text == "Cancel" and widget.panel.busy
    runPanel(widget)
    assert widget.panel.job.status == "done", widget.panel.job.error
    assert ui.fineTuneButton.text != "Cancel" and ui.modelPathLineEdit.currentPath == widget.panel.job.result
    assert widget._lossCurve.points()  # the loss chart got the progress events
    assert widget._parameterNode.model == ui.modelPathLineEdit.currentPath  # str parameters follow the widgets
    assert ui.suggestButton.enabled
    widget.onSuggestButton()
    runPanel(widget)
    assert widget.panel.job.status == "done" and len(widget._suggestions) == 5
    widget.exit()
    widget.cleanup()


def test_trainer_widget_cancel_removes_loss_chart(slicer_app, scene, monkeypatch):
    slicer = slicer_app
    module, widget, ui = makeWidget(slicer, "MedSSLTrainer")
    monkeypatch.setenv("FAKE_MEDSSL_STEP_S", "1")
    volume = addVolume(scene, phantom(), name="ct")
    ui.pretrainVolumesSelector.checked = [volume]
    ui.pretrainVolumesSelector.emit("checkedNodesChanged()")
    assert ui.pretrainButton.enabled
    count = scene.GetNumberOfNodes()
    widget.onPretrainButton()
    assert widget.panel.busy and scene.GetNumberOfNodes() == count + 3  # loss table, series, chart
    widget.onPretrainButton()  # the button is Cancel now
    assert widget.panel.job.status == "cancelled" and scene.GetNumberOfNodes() == count
    assert ui.pretrainButton.text == "Start pretraining" or ui.pretrainButton.text != "Cancel"


def test_trainer_widget_labelled_datasets_method_takes_a_spec(slicer_app, scene, tmp_path):
    """Choosing a method that learns from labelled datasets (Ark) swaps the volume/folder inputs for a
    SPEC.json picker, and the pretraining job gets --datasets."""
    import json

    import SimpleITK as sitk

    slicer = slicer_app
    _module, widget, ui = makeWidget(slicer, "MedSSLTrainer")
    ui.methodComboBox.setCurrentIndex(ui.methodComboBox.findData("ark"))
    assert not ui.pretrainVolumesSelector.visible and not ui.dataFolderPathLineEdit.visible
    assert ui.datasetsSpecPathLineEdit.visible and not ui.pretrainButton.enabled
    image = sitk.GetImageFromArray(phantom())
    sitk.WriteImage(image, str(tmp_path / "ct.nrrd"))
    sitk.WriteImage(sitk.Cast(image > 0, sitk.sitkUInt8), str(tmp_path / "liver.nrrd"))
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"datasets": [{"name": "livers", "classes": {"1": "liver"},
                                              "cases": [{"image": str(tmp_path / "ct.nrrd"), "label": str(tmp_path / "liver.nrrd")}]}]}))
    ui.datasetsSpecPathLineEdit.currentPath = str(spec)
    assert ui.pretrainButton.enabled
    widget.onPretrainButton()
    runPanel(widget)
    assert widget.panel.job.status == "done", widget.panel.job.error
    meta = json.loads((tmp_path / "work").joinpath(widget.panel.job.result, "model.json").read_text())
    assert meta["method"] == {"name": "ark"} and meta["datasets_seen"][0]["cases"][0]["label_values"] == [0, 1]
    ui.methodComboBox.setCurrentIndex(ui.methodComboBox.findData("genesis"))
    assert ui.pretrainVolumesSelector.visible and not ui.datasetsSpecPathLineEdit.visible


def test_segment_widget_applies_a_detector(slicer_app, scene, tmp_path):
    slicer = slicer_app
    module, widget, ui = makeWidget(slicer, "MedSSLSegment")
    bundle = tmp_path / "detector"
    bundle.mkdir()
    (bundle / "model.json").write_text('{"task": "segment", "detection": true, "method": {"name": "genesis"}, '
                                       '"classes": {"1": {"name": "tissue"}, "2": {"name": "lesion"}}}')
    volume = addVolume(scene, phantom(), name="ct")
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.modelPathLineEdit.currentPath = str(bundle)
    assert "Detect model: tissue, lesion" in ui.modelInfoLabel.text and ui.applyButton.enabled
    widget.onApplyButton()
    runPanel(widget)
    assert widget.panel.job.status == "done", widget.panel.job.error
    assert widget.panel.job.result.GetNumberOfControlPoints() == 2
    ui.modelPathLineEdit.currentPath = str(tmp_path)
    assert "not a MedSSL model folder" in ui.modelInfoLabel.text and not ui.applyButton.enabled
    ui.modelPathLineEdit.currentPath = str(bundle / "model.json")
    assert "Choose a model folder" in ui.modelInfoLabel.text and not ui.applyButton.enabled
    widget.cleanup()
