"""MedSSL Segment: apply a MedSSL model bundle to a volume (segmentation, detection or classification).

Slicer glue only (module, parameter node, widget, self-test). The work is done by
``MedSSLSegmentLib.logic.MedSSLSegmentLogic`` (Qt-free) and the MedSSL backend in a child process; torch is
never imported in Slicer's process.
"""

import os
import tempfile
from typing import Annotated

import ctk
import numpy as np
import vtk

import slicer
from slicer.ScriptedLoadableModule import (ScriptedLoadableModule, ScriptedLoadableModuleLogic,
                                           ScriptedLoadableModuleTest, ScriptedLoadableModuleWidget)
from slicer.util import VTKObservationMixin

from MedSSLSegmentLib import backend, gui, install, jobs, nodes
from MedSSLSegmentLib.logic import MedSSLSegmentLogic, modelName

try:
    from slicer.i18n import tr as _
    from slicer.i18n import translate
except ImportError:  # Slicer < 5.4
    def _(text):
        return text

    def translate(_context, text):
        return text

try:
    from slicer import vtkMRMLScalarVolumeNode
    from slicer.parameterNodeWrapper import Minimum, parameterNodeWrapper
except ImportError:  # Slicer < 5.2: the settings are simply not kept with the scene
    parameterNodeWrapper = None

__all__ = ["MedSSLSegment", "MedSSLSegmentWidget", "MedSSLSegmentLogic", "MedSSLSegmentTest"]


class MedSSLSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedSSL Segment")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MedSSL contributors"]
        self.parent.helpText = _(
            "Apply a MedSSL model to a volume. Segmentation models create a segmentation with the model's "
            "segment names and colors; detection models create a point list (one point per finding, labelled "
            "with class and score) and a findings table; classification models create a table of class "
            "probabilities. The model runs in a separate process: Slicer stays responsive and Cancel stops it. "
            "Models come from the MedSSL Trainer module or from colleagues (a model is a folder with "
            "model.json and weights.safetensors).")
        self.parent.acknowledgementText = _(
            "MedSSL builds on Models Genesis (Zhou et al., MICCAI 2019 / MedIA 2021), MONAI and PyTorch.")


if parameterNodeWrapper is not None:

    @parameterNodeWrapper
    class MedSSLSegmentParameterNode:
        """The module's settings, saved with the scene."""

        inputVolume: vtkMRMLScalarVolumeNode
        modelPath: str = ""
        device: str = "auto"
        maxFindings: Annotated[int, Minimum(1)] = nodes.DEFAULT_MAX_FINDINGS  # detection: points shown at most
        allFindings: bool = False  # detection: the table lists every finding


def getParameterNode():
    """The module's parameter node (wrapped), or None on Slicer versions without parameterNodeWrapper."""
    if parameterNodeWrapper is None:
        return None
    logic = ScriptedLoadableModuleLogic()
    logic.moduleName = "MedSSLSegment"
    return MedSSLSegmentParameterNode(logic.getParameterNode())


class MedSSLSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.panel = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._environment = None
        self._probe = None
        self._modelInfo = None

    # ------------------------------------------------------------------ setup and parameter node

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MedSSLSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MedSSLSegmentLogic()
        gui.bindJobSettings(self.ui.workDirPathLineEdit, self.ui.keepJobFilesCheckBox, self.logic)
        self.panel = gui.JobPanel(self.ui.progressBar, self.ui.statusLabel, self.ui.logTextEdit)
        self.ui.modelPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self.ui.modelPathLineEdit.settingKey = "MedSSL/ApplyModelPath"
        gui.fillDeviceComboBox(self.ui.deviceComboBox, None)
        self.ui.installButton.hide()
        self.strings = gui.StringBindings()
        self.strings.path(self.ui.modelPathLineEdit, "modelPath")
        self.strings.combo(self.ui.deviceComboBox, "device")

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.installButton.connect("clicked(bool)", self.onInstallButton)
        self.ui.openJobFolderButton.connect("clicked(bool)", lambda: self.panel.openJobFolder())
        self.ui.modelPathLineEdit.connect("currentPathChanged(QString)", self.onModelChanged)
        self.ui.inputVolumeSelector.connect("currentNodeChanged(vtkMRMLNode*)", self._checkCanApply)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self._updateDeviceWarning)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        self.startProbe()

    def cleanup(self):
        if self.panel is not None and self.panel.busy:
            self.panel.cancel()
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        # As the scripted-module template: stop syncing the GUI with the parameter node while another module
        # is shown, but keep the node: a job that ends meanwhile stores its results there (_storeResults)
        # and enter() shows them.
        self._disconnectGui()

    def onSceneStartClose(self, caller, event):
        if self.panel.busy:
            self.panel.cancel()  # its input volume is going away
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        parameterNode = getParameterNode()
        if parameterNode is not None and not parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                parameterNode.inputVolume = firstVolume
        self.setParameterNode(parameterNode)

    def _disconnectGui(self):
        if self._parameterNode is not None and self._parameterNodeGuiTag is not None:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.strings.updateGui)
        self._parameterNodeGuiTag = None
        self.strings.setParameterNode(None)

    def _storeResults(self, **values):
        """Job results (str parameters) into the parameter node, whichever module is shown, and into the
        widgets; without parameterNodeWrapper (Slicer < 5.2) only into the widgets."""
        parameterNode = self._parameterNode or getParameterNode()
        for name, value in values.items():
            if parameterNode is not None:
                setattr(parameterNode, name, value)
            self.strings.setWidget(name, value)

    def setParameterNode(self, parameterNode):
        self._disconnectGui()
        self._parameterNode = parameterNode
        self.strings.setParameterNode(parameterNode)
        if self._parameterNode is not None:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.strings.updateGui)
        self.onModelChanged()

    # ------------------------------------------------------------------ environment

    def startProbe(self):
        """Check torch/MONAI/GPUs in a child process, in the background."""
        self.ui.environmentLabel.text = gui.environmentSummary(None)
        self._probe = gui.BackgroundCall(backend.probeEnvironment, self.onProbeDone)

    def onProbeDone(self, environment, error):
        self._probe = None
        self._environment = environment
        self.ui.environmentLabel.text = gui.environmentSummary(environment, error)
        self.ui.installButton.visible = bool(environment and backend.missingDependencies(environment))
        device = self.ui.deviceComboBox.currentData or "auto"
        gui.fillDeviceComboBox(self.ui.deviceComboBox, environment, device)
        self._updateDeviceWarning()

    def onInstallButton(self):
        with slicer.util.tryWithErrorDisplay(_("Installing the Python packages failed."), waitCursor=True):
            self._environment = install.ensureBackendReady(self._environment)
        self.onProbeDone(self._environment, None)

    def _updateDeviceWarning(self, *_args):
        self.ui.deviceWarningLabel.text = gui.deviceWarning(self._environment, self.ui.deviceComboBox.currentData)

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
        self.ui.applyButton.enabled = ready or self.panel.busy
        if not self.panel.busy:
            self.ui.applyButton.toolTip = "" if ready else _("Select a volume and a segmentation, detection or "
                                                             "classification model.")

    def onApplyButton(self):
        if self.panel.busy:
            self.panel.cancel()
            return
        with slicer.util.tryWithErrorDisplay(_("MedSSL could not start."), waitCursor=True):
            self._environment = install.ensureBackendReady(self._environment)
            volume = self.ui.inputVolumeSelector.currentNode()
            modelDir = self.ui.modelPathLineEdit.currentPath
            self.ui.modelPathLineEdit.addCurrentPathToHistory()
            self.logic.device = self.ui.deviceComboBox.currentData or "auto"
            self.logic.maxFindings = max(1, int(self.ui.maxFindingsSpinBox.value))
            self.logic.allFindingsInTable = bool(self.ui.allFindingsCheckBox.checked)
            job = self.logic.apply(volume, modelDir, blocking=False)
            title = _("Applying {model}").format(model=modelName(modelDir, self._modelInfo))
            self.panel.start(job, self.ui.applyButton, title, onEnded=lambda j, v=volume: self.onJobEnded(j, v))

    def onJobEnded(self, job, volume):
        self._checkCanApply()
        if job.status != jobs.DONE:
            return
        result = job.result
        if result.IsA("vtkMRMLSegmentationNode"):
            result.GetDisplayNode().SetVisibility(True)
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
    names = ", ".join(c["name"] for c in classes.values()) or "no classes"
    method = (info.get("method") or {}).get("name", "?")
    if task == "pretrain":
        return f"Pretrained model ({method}): fine-tune it in MedSSL Trainer before applying it."
    if task == "fewshot":
        return (f"Few-shot model: {names}. It completes the painting it was trained with (MedSSL Trainer); it "
                "cannot be applied to a volume here.")
    return f"{task.capitalize()} model: {names} (pretraining: {method})."


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
