"""Smoke tests of both module widgets outside Slicer: Qt, CTK, the scripted-module base classes and
parameterNodeWrapper are replaced by strict doubles (fake_slicer_gui.py: unknown widget attributes fail,
connectGui sets spin box ranges from the parameter annotations, the module is entered and left as in
Slicer), MRML is real (slicer-core) and the backend is the stand-in CLI. They catch wiring mistakes (names,
signatures, flows, bounds, results lost across exit/enter) that only Slicer would otherwise reveal; they do
not show that the widgets look right - that needs Slicer itself (the modules' self-tests)."""

import importlib
import sys
import time
from unittest import mock

import numpy as np
import pytest

import fake_slicer_gui
from fake_slicer_gui import leaveModule, showModule
from slicer_testing_helpers import ROOT, addVolume, phantom


def fakeUi(module):
    return fake_slicer_gui.fakeUi(ROOT, module)


ENVIRONMENT = {"python": "3.12", "torch": "2.5.1", "monai": "1.4.0", "SimpleITK": "2.4", "safetensors": "0.4",
               "MedSSL": "0.1.0", "cuda": [{"name": "NVIDIA RTX A4000", "memory_gb": 15.7}], "mps": False}
"""What the environment probe would report on a workstation with a GPU (the real probe imports torch)."""


@pytest.fixture
def slicer_app(scene, fake_backend, monkeypatch):
    """slicer.app, qt, ctk, the scripted-module classes and parameterNodeWrapper faked; MRML real."""
    import slicer

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
    widget = getattr(module, f"{moduleName}Widget")(fake_slicer_gui.FakeModuleWidgetParent())
    widget.setup()  # Slicer: setup() when the module is first shown, then enter()
    showModule(widget)
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
    assert ui.deviceComboBox.itemText(0) == "auto (NVIDIA RTX A4000, 15.7 GB)" and ui.deviceWarningLabel.text == ""
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
    ui.pretrainVolumesSelector.setCheckedNodes([volume])
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
    widget.logic.minVolumeMm3 = 0.0  # the phantom's lesion is 13 mm^3
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


def test_strict_doubles_refuse_unknown_attributes_and_model_connect_gui(slicer_app):
    """The doubles fail where PythonQt would (issue 11 item 11): a misspelt property or method raises, and
    connectGui overwrites an unannotated int's range with -2**31 .. 2**31-1 as Slicer's connector does."""
    import typing

    ui = fakeUi("MedSSLTrainer")
    with pytest.raises(AttributeError):
        ui.statusLabel.txt = "typo"
    with pytest.raises(AttributeError):
        ui.progressBar.setRangeX(0, 1)
    with pytest.raises(AttributeError):
        ui.pretrainButton.connect("clickd(bool)", print)
    from slicer.parameterNodeWrapper import Minimum, parameterNodeWrapper

    class Plain:
        pretrainSteps: int = 5
        pretrainMinutes: typing.Annotated[float, Minimum(0)] = 0.0

    from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

    Wrapped = parameterNodeWrapper(Plain)
    node = Wrapped(ScriptedLoadableModuleLogic().getParameterNode())
    subset = type(ui)(pretrainStepsSpinBox=ui.pretrainStepsSpinBox, pretrainMinutesSpinBox=ui.pretrainMinutesSpinBox)
    tag = node.connectGui(subset)
    assert ui.pretrainStepsSpinBox.minimum == -2 ** 31 and ui.pretrainStepsSpinBox.value == 5
    assert ui.pretrainMinutesSpinBox.minimum == 0
    ui.pretrainStepsSpinBox.value = 7
    assert node.pretrainSteps == 7
    node.disconnectGui(tag)
    ui.pretrainStepsSpinBox.value = 9
    assert node.pretrainSteps == 7


def test_trainer_budgets_cannot_be_negative(slicer_app, scene):
    """Issue 11 item 4: steps and time limits have a minimum of 0 once the parameter node is connected, so
    the "no limit" text shows at 0 and a negative value cannot be entered."""
    _module, widget, ui = makeWidget(slicer_app, "MedSSLTrainer")
    for box in (ui.pretrainStepsSpinBox, ui.pretrainMinutesSpinBox, ui.finetuneStepsSpinBox, ui.finetuneMinutesSpinBox):
        assert box.minimum == 0, box.objectName
        box.value = -5
        assert box.value == 0 and box.shownText() == "no limit"
    assert widget._parameterNode.pretrainMinutes == 0 and widget._parameterNode.finetuneSteps == 0


def paintedSegmentation(scene, volume):
    from MedSSLSegmentLib import nodes

    labels = np.zeros(phantom().shape, np.uint8)
    labels[2, 2:8, 3:10] = 1
    return nodes.segmentationFromLabelmap(labels, nodes.ijkToRasArray(volume), {"1": {"name": "tissue"}}, volume, "painted")


def test_trainer_results_survive_leaving_the_module_while_jobs_run(slicer_app, scene, monkeypatch):
    """Issue 11 item 3: the user paints in the Segment Editor while fine-tuning runs; when the job ends its
    model is the module's model, also after coming back (and likewise the pretrained model becomes the
    initial model)."""
    _module, widget, ui = makeWidget(slicer_app, "MedSSLTrainer")
    volume = addVolume(scene, phantom(), name="ct")
    ui.fewShotVolumeSelector.setCurrentNode(volume)
    ui.fewShotSegmentationSelector.setCurrentNode(paintedSegmentation(scene, volume))
    ui.initComboBox.setCurrentIndex(ui.initComboBox.findData("none"))
    widget.onFineTuneButton()
    leaveModule(widget)  # to the Segment Editor
    runPanel(widget)
    assert widget.panel.job.status == "done", widget.panel.job.error
    showModule(widget)
    assert ui.modelPathLineEdit.currentPath == widget.panel.job.result
    assert widget._parameterNode.model == widget.panel.job.result

    ui.pretrainVolumesSelector.setCheckedNodes([volume])
    widget.onPretrainButton()
    leaveModule(widget)
    runPanel(widget)
    assert widget.panel.job.status == "done", widget.panel.job.error
    showModule(widget)
    assert ui.initComboBox.currentData == "bundle" and ui.initModelPathLineEdit.currentPath == widget.panel.job.result
    assert widget._parameterNode.initModel == widget.panel.job.result


def test_segment_widget_keeps_its_parameter_node_across_exit(slicer_app, scene):
    """As the template: exit() stops the GUI <-> parameter node syncing but keeps the node."""
    _module, widget, ui = makeWidget(slicer_app, "MedSSLSegment")
    node = widget._parameterNode
    assert node.connectedGuiCount() == 1
    leaveModule(widget)
    assert widget._parameterNode is node and node.connectedGuiCount() == 0
    showModule(widget)  # enter() wraps the same scripted module node again and connects that
    assert widget._parameterNode.parameterNode.GetID() == node.parameterNode.GetID()
    assert widget._parameterNode.connectedGuiCount() == 1 and node.connectedGuiCount() == 0


def lossNodes(scene):
    return sorted(scene.GetNthNode(i).GetClassName() for i in range(scene.GetNumberOfNodes())
                  if scene.GetNthNode(i).GetClassName() in ("vtkMRMLTableNode", "vtkMRMLPlotSeriesNode", "vtkMRMLPlotChartNode"))


def test_trainer_reuses_one_loss_chart_and_switches_the_layout_once(slicer_app, scene):
    """Issue 11 item 7: repeated jobs keep one table/series/chart; the layout switches to the chart at the
    first job only (not while the user paints during later ones); a start that fails adds nothing."""
    slicer = slicer_app
    _module, widget, ui = makeWidget(slicer, "MedSSLTrainer")
    showChart = slicer.modules.plots.logic.return_value.ShowChartInLayout
    volume = addVolume(scene, phantom(), name="ct")
    empty = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "nothing painted")
    empty.GetSegmentation().AddEmptySegment("", "liver", [1, 0, 0])
    ui.fewShotVolumeSelector.setCurrentNode(volume)
    ui.fewShotSegmentationSelector.setCurrentNode(empty)
    ui.initComboBox.setCurrentIndex(ui.initComboBox.findData("none"))
    with pytest.raises(ValueError, match="paint a few slices"):  # shown by tryWithErrorDisplay, then raised
        widget.onFineTuneButton()
    assert widget.panel.job is None and lossNodes(scene) == [] and showChart.call_count == 0
    ui.fewShotSegmentationSelector.setCurrentNode(paintedSegmentation(scene, volume))
    curves = []
    for _ in range(2):
        widget.onFineTuneButton()
        runPanel(widget)
        assert widget.panel.job.status == "done", widget.panel.job.error
        curves.append(widget._lossCurve.points())
    assert lossNodes(scene) == ["vtkMRMLPlotChartNode", "vtkMRMLPlotSeriesNode", "vtkMRMLTableNode"]
    assert showChart.call_count == 1
    assert curves[1] == curves[0] and len(curves[1]) == 4  # the second job's points only (3 training + predict)
    widget.onShowChartButton()
    assert showChart.call_count == 2


def test_trainer_suggest_skips_the_painted_slices(slicer_app, scene, tmp_path):
    """Issue 11 item 8: Suggest slices passes the painting, so painted slices are not suggested again."""
    _module, widget, ui = makeWidget(slicer_app, "MedSSLTrainer")
    volume = addVolume(scene, phantom(), name="ct")
    ui.fewShotVolumeSelector.setCurrentNode(volume)
    ui.fewShotSegmentationSelector.setCurrentNode(paintedSegmentation(scene, volume))  # slice k=2
    model = tmp_path / "model"
    model.mkdir()
    ui.modelPathLineEdit.currentPath = str(model)
    widget.onSuggestButton()
    runPanel(widget)
    assert widget.panel.job.status == "done", widget.panel.job.error
    assert len(widget._suggestions) == 5 and 2 not in {s["index"] for s in widget._suggestions}


def test_job_folder_and_keep_files_settings_reach_the_logic(slicer_app, scene, tmp_path):
    """Issue 11 item 9: the job folder is configurable in both modules and saved in Slicer's settings."""
    slicer = slicer_app
    for moduleName in ("MedSSLSegment", "MedSSLTrainer"):
        _module, widget, ui = makeWidget(slicer, moduleName)
        assert ui.workDirPathLineEdit.currentPath == str(tmp_path / "work")  # MEDSSL_WORK_DIR, else the setting
        assert widget.logic.keepJobFiles is False and not ui.keepJobFilesCheckBox.checked
        ui.workDirPathLineEdit.currentPath = str(tmp_path / "elsewhere")
        ui.keepJobFilesCheckBox.checked = True
        assert widget.logic.workDir == str(tmp_path / "elsewhere") and widget.logic.keepJobFiles is True
        settings = slicer.app.userSettings.return_value
        settings.setValue.assert_any_call("MedSSL/WorkDirectory", str(tmp_path / "elsewhere"))
        settings.setValue.assert_any_call("MedSSL/KeepJobFiles", "true")


def test_segment_widget_caps_the_findings(slicer_app, scene, tmp_path, monkeypatch):
    """Issue 11 item 12 in the module: the "Findings shown" setting (at least 1) caps the points."""
    monkeypatch.setenv("FAKE_MEDSSL_FINDINGS", "100")
    _module, widget, ui = makeWidget(slicer_app, "MedSSLSegment")
    assert ui.maxFindingsSpinBox.minimum == 1 and ui.maxFindingsSpinBox.value == 10
    bundle = tmp_path / "detector"
    bundle.mkdir()
    (bundle / "model.json").write_text('{"task": "segment", "detection": true, "classes": {"1": {"name": "tissue"}, '
                                       '"2": {"name": "lesion"}}}')
    ui.inputVolumeSelector.setCurrentNode(addVolume(scene, phantom(), name="ct"))
    ui.modelPathLineEdit.currentPath = str(bundle)
    ui.maxFindingsSpinBox.value = 4
    ui.allFindingsCheckBox.checked = True
    assert widget._parameterNode.maxFindings == 4 and widget._parameterNode.allFindings is True
    widget.onApplyButton()
    runPanel(widget)
    assert widget.panel.job.status == "done", widget.panel.job.error
    assert widget.panel.job.result.GetNumberOfControlPoints() == 4
    assert widget.logic.lastOutputs["table"].GetNumberOfRows() == 102
    assert ui.statusLabel.text == "4 findings shown (best score first) of 102 found."
