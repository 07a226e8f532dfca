"""MedSSL Segment: apply a MedSSL model bundle to a volume (segmentation, detection or classification).

Slicer glue only (module, parameter node, widget, self-test). The work is done by
``MedSSLSegmentLib.logic.MedSSLSegmentLogic`` (Qt-free) and the MedSSL backend in a child process; torch is
never imported in Slicer's process. The widget's lifecycle, parameter node, probe and install flow come from
``MedSSLCommonLib.widget.MedSSLWidgetBase`` (the hidden MedSSLCommon module, a declared dependency).
"""

import os
import tempfile
from typing import Annotated

import ctk
import numpy as np

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest

from MedSSLCommonLib import backend, gui, jobs, nodes
from MedSSLCommonLib.i18n import tr as _
from MedSSLCommonLib.widget import MedSSLWidgetBase, describeModule
from MedSSLSegmentLib.logic import MedSSLSegmentLogic, modelName

try:
    from slicer import vtkMRMLScalarVolumeNode
    from slicer.parameterNodeWrapper import Minimum, parameterNodeWrapper
except ImportError:  # Slicer < 5.2: the settings are simply not kept with the scene
    parameterNodeWrapper = None

__all__ = ["MedSSLSegment", "MedSSLSegmentWidget", "MedSSLSegmentLogic", "MedSSLSegmentTest"]


class MedSSLSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        describeModule(self.parent, _("MedSSL Segment"), _("""
Apply a MedSSL model to a volume. Segmentation models create a segmentation with the model's segment names
and colors; detection models create a point list (one point per finding, labelled with class and score) and
a findings table; classification models create a table of class probabilities. The model runs in a separate
process: Slicer stays responsive and Cancel stops it. Models come from the MedSSL Trainer module or from
colleagues (a model is a folder with model.json and weights.safetensors)."""))
        self.parent.dependencies = ["MedSSLCommon"]  # provides MedSSLCommonLib


if parameterNodeWrapper is not None:

    @parameterNodeWrapper
    class MedSSLSegmentParameterNode:
        """The module's settings, saved with the scene."""

        inputVolume: vtkMRMLScalarVolumeNode
        modelPath: str = ""
        device: str = ""  # "": the backend's default device (info --defaults), until one is chosen
        maxFindings: Annotated[int, Minimum(1)] = nodes.DEFAULT_MAX_FINDINGS  # detection: points shown at most
        allFindings: bool = False  # detection: the table lists every finding
else:
    MedSSLSegmentParameterNode = None


class MedSSLSegmentWidget(MedSSLWidgetBase):
    parameterNodeClass = MedSSLSegmentParameterNode
    logicClass = MedSSLSegmentLogic
    startButtonNames = ("applyButton", "applyManyButton")

    def __init__(self, parent=None):
        MedSSLWidgetBase.__init__(self, parent)
        self._modelInfo = None

    def setupModule(self):
        self.ui.modelPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.modelPathLineEdit.settingKey = "MedSSL/ApplyModelPath"
        self.strings.path(self.ui.modelPathLineEdit, "modelPath")
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelChanged)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self._checkCanApply)
        for edit in (self.ui.scansFolderPathLineEdit, self.ui.manyOutputPathLineEdit):
            edit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.applyManyButton.connect("clicked(bool)", self.onApplyManyButton)
        self.ui.manyVolumesSelector.connect("checkedNodesChanged()", self._checkCanApply)
        self.ui.scansFolderPathLineEdit.connect("currentPathChanged(QString)", self._checkCanApply)

    def parameterNodeChanged(self):
        self.onModelChanged()

    # ------------------------------------------------------------------ model and apply

    def onModelChanged(self, *_args):
        path = self.ui.modelPathLineEdit.currentPath
        self._modelInfo = None
        if not path or not os.path.isdir(path):
            self.ui.modelInfoLabel.text = _("Choose a model folder (it holds model.json and weights.safetensors).")
        else:
            try:
                self._modelInfo = self.logic.modelInfo(path)
                self.ui.modelInfoLabel.text = describeModel(self._modelInfo)
            except ValueError as exc:
                self.ui.modelInfoLabel.text = str(exc)
        self._checkCanApply()

    def _checkCanApply(self, *_args):
        task = backend.bundleTask(self._modelInfo) if self._modelInfo else None
        ready = bool(self.ui.inputVolumeSelector.currentNode()) and task in ("segment", "detect", "classify")
        self.ui.applyButton.enabled = (ready or self.panel.busy) and not self._installing
        if not self.panel.busy:
            self.ui.applyButton.toolTip = "" if ready else _("Select a volume and a segmentation, detection or "
                                                             "classification model.")
        many = self._manyMissing(task)
        busyHere = self.panel.busy and self._running == "many"
        self.ui.applyManyButton.enabled = (busyHere or (not many and not self.panel.busy)) and not self._installing
        if not self.panel.busy:
            self.ui.applyManyButton.toolTip = (_("Disabled: {reason}.").format(reason=many) if many else
                                               _("Segment each scan with the model, loaded once."))

    _running = None

    def _manyMissing(self, task) -> str:
        """Why several scans cannot be segmented ('' when they can)."""
        if task not in ("segment", "detect"):
            return _("choose a segmentation model")
        if not self.ui.scansFolderPathLineEdit.currentPath and not self.ui.manyVolumesSelector.checkedNodes():
            return _("check the volumes, or choose a folder of scans")
        return ""

    def updateStartButtons(self):
        self._checkCanApply()

    def onApplyButton(self):
        self.startOrCancel(_("MedSSL could not start."), self._apply)

    def _apply(self):
        volume = self.ui.inputVolumeSelector.currentNode()
        modelDir = self.ui.modelPathLineEdit.currentPath
        self.ui.modelPathLineEdit.addCurrentPathToHistory()
        self.logic.maxFindings = max(1, int(self.ui.maxFindingsSpinBox.value))
        self.logic.allFindingsInTable = bool(self.ui.allFindingsCheckBox.checked)
        job = self.logic.apply(volume, modelDir, blocking=False)
        title = _("Applying {model}").format(model=modelName(modelDir, self._modelInfo))
        self.panel.start(job, self.ui.applyButton, title, onEnded=lambda j, v=volume: self.onJobEnded(j, v))

    def onApplyManyButton(self):
        self.startOrCancel(_("MedSSL could not start."), self._applyMany)

    def _applyMany(self):
        ui = self.ui
        modelDir = ui.modelPathLineEdit.currentPath
        folder = ui.scansFolderPathLineEdit.currentPath
        source = folder if folder else list(ui.manyVolumesSelector.checkedNodes())
        job = self.logic.segmentMany(source, modelDir, outputDir=ui.manyOutputPathLineEdit.currentPath or None,
                                     blocking=False)
        self._running = "many"
        title = _("Segmenting {count} scan(s) with {model}").format(
            count=len(source) if not folder else _("the folder's"), model=modelName(modelDir, self._modelInfo))
        self.panel.start(job, ui.applyManyButton, title, onEnded=self.onManyEnded)

    def onManyEnded(self, job):
        self._running = None
        self._checkCanApply()
        if job.status != jobs.DONE:
            return
        if isinstance(job.result, list):
            for node in job.result:
                gui.showSegmentation(node)
            self.ui.statusLabel.text = _("{count} segmentation(s) made.").format(count=len(job.result))
        else:
            self.ui.statusLabel.text = _("Label maps and summary written: {path}").format(path=job.result)

    def onJobEnded(self, job, volume):
        self._checkCanApply()
        if job.status != jobs.DONE:
            return
        result = job.result
        if result.IsA("vtkMRMLSegmentationNode"):
            gui.showSegmentation(result)  # slice views and 3D
            slicer.util.setSliceViewerLayers(background=volume)
        elif result.IsA("vtkMRMLMarkupsFiducialNode"):
            gui.showTable(self.logic.lastOutputs["table"])
            self.ui.statusLabel.text = _("{shown} findings shown (best score first) of {total} found.").format(
                shown=result.GetNumberOfControlPoints(), total=self.logic.lastOutputs.get("findingsTotal", "?"))
            if result.GetNumberOfControlPoints():
                slicer.modules.markups.logic().JumpSlicesToNthPointInMarkup(result.GetID(), 0, True)
        elif result.IsA("vtkMRMLTableNode"):
            gui.showTable(result)
            self.ui.statusLabel.text = _("Predicted class: {name}").format(
                name=result.GetAttribute("MedSSL.predictedClass"))


def describeModel(info: dict) -> str:
    """One line about a bundle for the panel: task, classes, method."""
    task = backend.bundleTask(info)
    classes = nodes.normaliseClasses(info.get("classes"))
    names = ", ".join(c["name"] for c in classes.values()) or _("no classes")
    method = (info.get("method") or {}).get("name", "?")
    if task == "pretrain":
        return _("Pretrained model ({method}): fine-tune it in MedSSL Trainer before applying it.").format(method=method)
    if task == "fewshot":
        return _("Few-shot model: {names}. It completes the painting it was trained with (MedSSL Trainer); it "
                 "cannot be applied to a volume here.").format(names=names)
    kinds = {"segment": _("Segment model: {names} (pretraining: {method})."),
             "detect": _("Detect model: {names} (pretraining: {method})."),
             "classify": _("Classify model: {names} (pretraining: {method}).")}
    return kinds.get(task, _("{task} model: {names} (pretraining: {method}).")).format(task=task.capitalize(),
                                                                                      names=names, method=method)


class MedSSLSegmentTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (Reload and Test, or ctest). Checks the geometry and result import on small synthetic
    data; applying a real model is only tested when the environment variable MEDSSL_TEST_MODEL names a
    segmentation bundle (it needs torch in Slicer's Python)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_GeometryRoundTrip()
        self.setUp()
        self.test_ResultsBecomeNodes()
        self.setUp()
        self.test_ApplyModel()

    def _obliqueVolume(self):
        matrix = np.eye(4)
        angle = 0.3
        matrix[:3, :3] = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0],
                                   [0, 0, 1]]) @ np.diag([0.7, 0.9, 2.5])
        matrix[:3, 3] = [10.0, -20.0, 30.0]
        array = np.zeros((6, 10, 12), np.int16)
        array[1:5, 2:8, 3:10] = 50
        array[2:4, 4:6, 5:7] = 200
        return nodes.addVolumeFromArray(array, matrix, "MedSSL test volume")

    def test_GeometryRoundTrip(self):
        self.delayDisplay("Volume node -> NRRD -> node keeps an oblique, non-isotropic geometry")
        volume = self._obliqueVolume()
        path = nodes.writeVolume(volume, os.path.join(tempfile.mkdtemp(), "volume.nrrd"))
        array, matrix = nodes.readArray(path)
        np.testing.assert_allclose(matrix, nodes.ijkToRasArray(volume), atol=1e-9)
        self.assertTrue(np.array_equal(array, slicer.util.arrayFromVolume(volume)))
        self.delayDisplay("Test passed")

    def test_ResultsBecomeNodes(self):
        self.delayDisplay("Labelmap and findings become named, colored nodes")
        volume = self._obliqueVolume()
        labels = (slicer.util.arrayFromVolume(volume) > 100).astype(np.uint8)
        segmentation = nodes.segmentationFromLabelmap(labels, nodes.ijkToRasArray(volume),
                                                      {"1": {"name": "lesion", "color": [1, 0, 0]}}, volume, "test")
        self.assertEqual(segmentation.GetSegmentation().GetNthSegment(0).GetName(), "lesion")
        markups = nodes.markupsFromDetections([{"label": 1, "name": "lesion", "center_mm": [1.0, 2.0, 3.0],
                                                "score": 0.5}], volume, "test findings")
        position = [0.0, 0.0, 0.0]
        markups.GetNthControlPointPosition(0, position)
        self.assertEqual(position, [-1.0, -2.0, 3.0])
        self.delayDisplay("Test passed")

    def test_ApplyModel(self):
        modelDir = os.environ.get("MEDSSL_TEST_MODEL")
        if not modelDir:
            self.delayDisplay("MEDSSL_TEST_MODEL not set: applying a model is not tested")
            return
        volume = self._obliqueVolume()
        result = MedSSLSegmentLogic().apply(volume, modelDir, blocking=True)
        self.assertIsNotNone(result)
        self.delayDisplay("Test passed")
