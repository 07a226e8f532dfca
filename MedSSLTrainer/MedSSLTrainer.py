"""MedSSL Trainer: self-supervised pretraining on your own unlabeled scans, and few-shot segmentation from a
few painted slices.

Slicer glue only (module, parameter node, widget, self-test). The work is done by
``MedSSLTrainerLib.logic.MedSSLTrainerLogic`` (Qt-free) and the MedSSL backend in a child process; torch is
never imported in Slicer's process. Shared code (job runner, node<->file conversion, Qt job panel, loss chart,
and the widget's lifecycle, parameter node, probe and install flow in ``MedSSLWidgetBase``) comes from
``MedSSLCommonLib`` of the hidden MedSSLCommon module, a declared dependency.
"""

import os
from typing import Annotated

import ctk
import numpy as np
import qt

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest

from MedSSLCommonLib import backend, gui, jobs, nodes
from MedSSLCommonLib.i18n import tr as _
from MedSSLCommonLib.plots import LossCurve
from MedSSLCommonLib.widget import MedSSLWidgetBase, describeModule
from MedSSLTrainerLib.annotation import NOT_ANNOTATED, sliceName, sparseLabels
from MedSSLTrainerLib.cohort import MedSSLCohortLogic
from MedSSLTrainerLib.datasets import methodTakesDatasets
from MedSSLTrainerLib.logic import MedSSLTrainerLogic, describeRound

try:
    from slicer import vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
    from slicer.parameterNodeWrapper import Minimum, parameterNodeWrapper
except ImportError:  # Slicer < 5.2: the settings are simply not kept with the scene
    parameterNodeWrapper = None

__all__ = ["MedSSLTrainer", "MedSSLTrainerWidget", "MedSSLTrainerLogic", "MedSSLTrainerTest"]

INIT_CHOICES = [
    ("none", _("No initial model (learn from the painting alone)")),
    ("bundle", _("Start from a MedSSL model (pretrained or fine-tuned)")),
    ("genesis-pt", _("Start from an official Models Genesis .pt file")),
]
"""Initial-model choices (item data, text), the default first: the few-shot engine needs no initial model."""

BUTTON_TIPS = {
    "pretrainButton": _("Pretrain in the background; the button turns into Cancel."),
    "fineTuneButton": _("Train on the painted slices, then segment the whole volume into a new segmentation for "
                        "review."),
    "suggestButton": _("Move the slice views to the slices where more annotation should help most."),
    "addToCohortButton": _("Copy the volume and its segmentation into the cohort folder and refresh the cohort "
                           "model on every scan of the cohort in the background."),
    "segmentNextButton": _("Segment the volume with the cohort model: a draft to review and correct."),
    "correctDraftButton": _("Repaint a plane or two where the draft is wrong (a new segmentation, segments named as "
                            "the cohort's classes); the scan is redone from them, a few planes of the draft and "
                            "the network's probabilities."),
}
"""The tooltips of the start buttons while they can be clicked (else the tooltip says what is missing)."""


class MedSSLTrainer(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        describeModule(self.parent, _("MedSSL Trainer"), _("""
Pretraining: learn from your own unlabeled CT/MR scans (volumes in the scene or a folder) with a
self-supervised method such as Models Genesis; best on a GPU, overnight. Few-shot segmentation: paint a
structure on a few slices in the Segment Editor, click Fine-tune: the network starts from the pretrained
model, learns from the painted slices and segments the whole volume into a new segmentation for review.
Suggest slices moves the views to where more paint helps most; paint there and fine-tune again. Everything
runs in a separate process: Slicer stays responsive and Cancel stops it."""))
        self.parent.dependencies = ["MedSSLCommon"]  # provides MedSSLCommonLib


if parameterNodeWrapper is not None:

    @parameterNodeWrapper
    class MedSSLTrainerParameterNode:
        """The module's settings, saved with the scene."""

        device: str = ""  # "": the backend's default device (info --defaults), until one is chosen
        useDataFolder: bool = False
        dataFolder: str = ""
        datasetsSpec: str = ""
        method: str = "genesis"
        # step budgets: the deliberate differences of backend.GUI_DEFAULTS, else the backend's defaults once
        # the probe has them (bindDefault); 0: no step limit ("no limit" shows)
        pretrainSteps: Annotated[int, Minimum(0)] = backend.initialGuiDefault("pretrain", "steps")
        pretrainMinutes: Annotated[float, Minimum(0)] = 0.0  # 0: no time limit
        pretrainOutput: str = ""
        fewShotVolume: vtkMRMLScalarVolumeNode
        fewShotSegmentation: vtkMRMLSegmentationNode
        initChoice: str = "none"  # the few-shot engine needs no initial model
        initModel: str = ""
        finetuneSteps: Annotated[int, Minimum(0)] = backend.initialGuiDefault("fewshot", "steps")
        finetuneMinutes: Annotated[float, Minimum(0)] = 0.0
        model: str = ""
else:
    MedSSLTrainerParameterNode = None


def budget(stepsSpinBox, minutesSpinBox):
    """(steps or None, seconds or None) from the budget widgets; 0 means no limit of that kind. Negative
    values (impossible once the parameter node bounds the spin boxes) raise ``ValueError``."""
    if stepsSpinBox.value < 0 or minutesSpinBox.value < 0:
        raise ValueError("steps and time limit must be 0 (no limit) or more")
    steps = int(stepsSpinBox.value) or None
    seconds = float(minutesSpinBox.value) * 60.0 or None
    return steps, seconds


class MedSSLTrainerWidget(MedSSLWidgetBase):
    parameterNodeClass = MedSSLTrainerParameterNode
    logicClass = MedSSLTrainerLogic
    volumeParameter = "fewShotVolume"
    startButtonNames = ("pretrainButton", "fineTuneButton", "suggestButton", "addToCohortButton", "segmentNextButton",
                        "correctDraftButton")

    def __init__(self, parent=None):
        MedSSLWidgetBase.__init__(self, parent)
        self._lossCurve = None
        self._suggestions = []
        self._cpuConfirmed = False
        self._chartShown = False

    # ------------------------------------------------------------------ setup

    def setupModule(self):
        self._setupWidgets()
        for widget, name in ((self.ui.methodComboBox, "method"), (self.ui.initComboBox, "initChoice")):
            self.strings.combo(widget, name)
        for widget, name in ((self.ui.dataFolderPathLineEdit, "dataFolder"),
                             (self.ui.datasetsSpecPathLineEdit, "datasetsSpec"), (self.ui.pretrainOutputPathLineEdit,
                             "pretrainOutput"), (self.ui.initModelPathLineEdit, "initModel"),
                             (self.ui.modelPathLineEdit, "model")):
            self.strings.path(widget, name)
        self.bindDefault(self.ui.pretrainStepsSpinBox, "pretrainSteps", "pretrain", "steps")
        # the Trainer fine-tunes on one painted volume: the few-shot engine, whose --steps default is "fewshot"
        self.bindDefault(self.ui.finetuneStepsSpinBox, "finetuneSteps", "fewshot", "steps")
        self._connect()

    def _setupWidgets(self):
        ui = self.ui
        ui.dataFolderPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        ui.pretrainOutputPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        ui.modelPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        ui.dataFolderPathLineEdit.settingKey = "MedSSL/PretrainDataFolder"
        ui.datasetsSpecPathLineEdit.filters = ctk.ctkPathLineEdit.Files
        ui.datasetsSpecPathLineEdit.nameFilters = ["Labelled dataset specs (*.json)"]
        ui.datasetsSpecPathLineEdit.settingKey = "MedSSL/PretrainDatasetsSpec"
        ui.initModelPathLineEdit.settingKey = "MedSSL/InitModelPath"
        ui.cohortUnlabeledPathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
        self._fillMethods(list(backend.DEFAULT_METHODS))
        for value, text in INIT_CHOICES:
            ui.initComboBox.addItem(text, value)

    def _connect(self):
        ui = self.ui
        ui.pretrainButton.connect("clicked(bool)", self.onPretrainButton)
        ui.fineTuneButton.connect("clicked(bool)", self.onFineTuneButton)
        ui.suggestButton.connect("clicked(bool)", self.onSuggestButton)
        ui.addToCohortButton.connect("clicked(bool)", self.onAddToCohortButton)
        ui.segmentNextButton.connect("clicked(bool)", self.onSegmentNextButton)
        ui.correctDraftButton.connect("clicked(bool)", self.onCorrectDraftButton)
        ui.showChartButton.connect("clicked(bool)", self.onShowChartButton)
        ui.suggestionsListWidget.connect("currentRowChanged(int)", self.onSuggestionSelected)
        ui.initComboBox.connect("currentIndexChanged(int)", self._updateInitWidgets)
        ui.useDataFolderCheckBox.connect("toggled(bool)", self._updateButtons)
        ui.methodComboBox.connect("currentIndexChanged(int)", self._updateButtons)
        ui.pretrainVolumesSelector.connect("checkedNodesChanged()", self._updateButtons)
        for widget in (ui.dataFolderPathLineEdit, ui.datasetsSpecPathLineEdit, ui.initModelPathLineEdit,
                       ui.modelPathLineEdit):
            widget.connect("currentPathChanged(QString)", self._updateButtons)
        for selector in (ui.fewShotVolumeSelector, ui.fewShotSegmentationSelector):
            selector.connect("currentNodeChanged(vtkMRMLNode*)", self._updateButtons)

    def forgetSceneNodes(self):
        self._lossCurve = None

    def cleanup(self):
        MedSSLWidgetBase.cleanup(self)
        if self.logic is not None:
            self.logic.correctionRounds.stopWatching()

    def parameterNodeChanged(self):
        self._updateInitWidgets()
        self.ui.cohortStatusLabel.text = self._describeCohort()

    # ------------------------------------------------------------------ environment

    def probeBackend(self) -> dict:
        """Check torch/MONAI/GPUs, read the backend's option defaults and list its methods (in child processes, in
        the background)."""
        return gui.probeBackend(methods=True)

    def backendProbed(self, answer):
        if answer:
            self._fillMethods(answer["methods"])
        self.strings.updateGui()

    def _fillMethods(self, methods):
        combo = self.ui.methodComboBox
        current = combo.currentData or (self._parameterNode.method if self._parameterNode else "genesis")
        combo.blockSignals(True)
        combo.clear()
        self._datasetMethods = {m["name"] for m in methods if methodTakesDatasets(m)}
        for method in methods:
            combo.addItem(method["name"], method["name"])
            combo.setItemData(combo.count - 1, method.get("description", ""), qt.Qt.ToolTipRole)
        index = combo.findData(current)
        combo.setCurrentIndex(index if index >= 0 else 0)
        combo.blockSignals(False)

    def dependenciesInstalled(self):
        self.startProbe()  # again: the methods list needs the backend's dependencies

    def _usesCpu(self):
        environment = self._environment or {}
        return self.logic.device == "cpu" or not (environment.get("cuda") or environment.get("mps"))

    # ------------------------------------------------------------------ widget state

    def _updateInitWidgets(self, *_args):
        choice = self.ui.initComboBox.currentData
        edit = self.ui.initModelPathLineEdit
        edit.visible = choice != "none"
        if choice == "genesis-pt":
            edit.filters = ctk.ctkPathLineEdit.Files
            edit.nameFilters = ["Models Genesis weights (*.pt *.pth)"]
        else:
            edit.filters = ctk.ctkPathLineEdit.Dirs
        self._updateButtons()

    def _updateButtons(self, *_args):
        ui = self.ui
        busy = self.panel.busy
        useFolder = ui.useDataFolderCheckBox.checked
        labelled = self._methodTakesDatasets()
        for widget in (ui.pretrainVolumesLabel, ui.pretrainVolumesSelector, ui.useDataFolderCheckBox,
                       ui.dataFolderLabel, ui.dataFolderPathLineEdit):
            widget.visible = not labelled
        ui.datasetsSpecLabel.visible = ui.datasetsSpecPathLineEdit.visible = labelled
        ui.pretrainVolumesSelector.enabled = not useFolder
        ui.dataFolderPathLineEdit.enabled = useFolder
        missing = [(ui.pretrainButton, self._pretrainMissing(labelled, useFolder)),
                   (ui.fineTuneButton, self._fineTuneMissing()), (ui.suggestButton, self._suggestMissing()),
                   *self._cohortMissing()]
        for button, reason in missing:
            if self._installing or busy:
                button.enabled = busy and self._runningButton == button
                continue
            button.enabled = not reason
            button.toolTip = (_("Disabled: {reason}.").format(reason=reason) if reason
                              else BUTTON_TIPS[button.objectName])
        ui.showChartButton.enabled = self._lossCurve is not None

    _runningButton = None
    _datasetMethods = frozenset()

    def updateStartButtons(self):
        self._updateButtons()

    def _pretrainMissing(self, labelled, useFolder) -> str:
        """Why pretraining cannot start ('' when it can)."""
        ui = self.ui
        if labelled:
            return "" if ui.datasetsSpecPathLineEdit.currentPath else _("choose the datasets' SPEC.json")
        if useFolder:
            return "" if ui.dataFolderPathLineEdit.currentPath else _("choose the folder of scans")
        return "" if ui.pretrainVolumesSelector.checkedNodes() else _("check the volumes to pretrain on")

    def _fineTuneMissing(self) -> str:
        """Why fine-tuning cannot start ('' when it can)."""
        ui = self.ui
        if not ui.fewShotVolumeSelector.currentNode():
            return _("choose the volume to segment")
        if not ui.fewShotSegmentationSelector.currentNode():
            return _("choose the segmentation painted on it (paint a few slices in the Segment Editor)")
        if ui.initComboBox.currentData != "none" and not ui.initModelPathLineEdit.currentPath:
            return _("choose the initial model, or 'No initial model'")
        return ""

    def _suggestMissing(self) -> str:
        """Why suggesting slices cannot start ('' when it can)."""
        if not self.ui.fewShotVolumeSelector.currentNode():
            return _("choose the volume")
        if not self.ui.modelPathLineEdit.currentPath:
            return _("fine-tune first (or choose a model)")
        return ""

    def _cohortMissing(self) -> list:
        """(button, why it cannot start or '') of the three cohort buttons."""
        ui = self.ui
        volume, segmentation = ui.fewShotVolumeSelector.currentNode(), ui.fewShotSegmentationSelector.currentNode()
        hasModel = bool(self.cohort.model)
        noVolume = _("choose the volume")
        noSegmentation = _("choose its segmentation (a few painted planes, or a reviewed segmentation)")
        noModel = _("add a painted scan to the cohort first")
        return [(ui.addToCohortButton, noVolume if not volume else noSegmentation if not segmentation else ""),
                (ui.segmentNextButton, noVolume if not volume else noModel if not hasModel else ""),
                (ui.correctDraftButton, noVolume if not volume else noModel if not hasModel else
                 _("choose the segmentation holding the repainted planes") if not segmentation else "")]

    def _methodTakesDatasets(self) -> bool:
        """Whether the chosen method learns from labelled datasets (SPEC.json) instead of volumes."""
        return (self.ui.methodComboBox.currentData or "") in self._datasetMethods

    def _start(self, job, button, title, onEnded):
        self._runningButton = button
        self.panel.start(job, button, title, onEnded=lambda j: self._ended(j, onEnded))
        self._updateButtons()

    def _ended(self, job, onEnded):
        self._runningButton = None
        if self._lossCurve is not None:
            self._lossCurve.flush()
        if job.status == jobs.CANCELLED and self._lossCurve is not None:
            self._lossCurve.remove()  # leave the scene as it was
            self._lossCurve = None
        try:
            onEnded(job)
        finally:
            self._updateButtons()

    def _lossCurveFor(self, title):
        """The module's one loss chart, emptied for a new job (created on first use, or again after a cancel
        or scene close removed it). The layout switches to show a chart only when it is new: later jobs must
        not take the views away from painting (Show chart brings it back)."""
        if self._lossCurve is not None and self._lossCurve.inScene():
            self._lossCurve.reset(title)
        else:
            self._lossCurve = LossCurve(title)
            self._chartShown = False
        if not self._chartShown:
            gui.showChart(self._lossCurve.chart)
            self._chartShown = True

    def _onEvent(self, event):
        """Job event handler (main thread): progress events feed the loss chart."""
        if event.get("event") == "progress" and event.get("loss") is not None and self._lossCurve is not None:
            self._lossCurve.append(event.get("step", 0), event["loss"])

    def onShowChartButton(self):
        if self._lossCurve is not None:
            gui.showChart(self._lossCurve.chart)

    # ------------------------------------------------------------------ pretraining

    def onPretrainButton(self):
        self.startOrCancel(_("Pretraining could not start."), self._pretrain)

    def _pretrain(self):
        if self._usesCpu() and not self._cpuConfirmed:
            if not slicer.util.confirmOkCancelDisplay(gui.deviceWarning(self._environment, "cpu") + "\n\n"
                                                      + _("Pretrain on the CPU anyway?")):
                return
            self._cpuConfirmed = True
        ui = self.ui
        method = ui.methodComboBox.currentData or "genesis"
        steps, maxTime = budget(ui.pretrainStepsSpinBox, ui.pretrainMinutesSpinBox)
        steps = self.optionValue("pretrain", "steps", steps)  # the backend's default: left out
        options = dict(method=method, outputDir=ui.pretrainOutputPathLineEdit.currentPath or None, steps=steps,
                       maxTime=maxTime, blocking=False, onEvent=self._onEvent)
        if self._methodTakesDatasets():
            ui.datasetsSpecPathLineEdit.addCurrentPathToHistory()
            job = self.logic.pretrainOnDatasets(ui.datasetsSpecPathLineEdit.currentPath, **options)
        else:
            if ui.useDataFolderCheckBox.checked:
                data = [ui.dataFolderPathLineEdit.currentPath]
                ui.dataFolderPathLineEdit.addCurrentPathToHistory()
            else:
                data = list(ui.pretrainVolumesSelector.checkedNodes())
            job = self.logic.pretrain(data, **options)
        self._lossCurveFor(_("Pretraining"))  # only once the job started: a failed start adds no node
        self._start(job, ui.pretrainButton, _("Pretraining"), self.onPretrainEnded)

    def onPretrainEnded(self, job):
        if job.status != jobs.DONE:
            return
        bundle = job.result
        self.ui.statusLabel.text = _("Pretrained model saved in {path}. It is now the initial model for "
                                     "few-shot segmentation.").format(path=bundle)
        self._storeResults(initChoice="bundle", initModel=bundle)

    # ------------------------------------------------------------------ few-shot fine-tuning

    def _initModel(self):
        choice = self.ui.initComboBox.currentData
        return "none" if choice == "none" else (self.ui.initModelPathLineEdit.currentPath or None)

    def onFineTuneButton(self):
        self.startOrCancel(_("Fine-tuning could not start."), self._fineTune)

    def _fineTune(self):
        ui = self.ui
        volume = ui.fewShotVolumeSelector.currentNode()
        steps, maxTime = budget(ui.finetuneStepsSpinBox, ui.finetuneMinutesSpinBox)
        steps = self.optionValue("fewshot", "steps", steps)
        if ui.initComboBox.currentData != "none" and ui.initModelPathLineEdit.currentPath:
            ui.initModelPathLineEdit.addCurrentPathToHistory()
        job = self.logic.finetune(volume, ui.fewShotSegmentationSelector.currentNode(), initModel=self._initModel(),
                                  steps=steps, maxTime=maxTime, blocking=False, onEvent=self._onEvent)
        self._lossCurveFor(_("Fine-tuning"))
        title = _("Fine-tuning, round {number}").format(number=self.logic.lastRound["round"])
        painting = ui.fewShotSegmentationSelector.currentNode()
        self._start(job, ui.fineTuneButton, title, lambda j, v=volume, p=painting: self.onFineTuneEnded(j, v, p))
        ui.statusLabel.text = _("Fine-tuning: {round}").format(round=describeRound(self.logic.lastRound))

    def onFineTuneEnded(self, job, volume, painting=None):
        if job.status != jobs.DONE:
            return
        self._storeResults(model=job.result)
        segmentation = getattr(job, "segmentationNode", None)
        if segmentation is not None:
            gui.showSegmentation(segmentation, hide=painting)  # slices and 3D; the painting hidden, not deleted
            slicer.util.setSliceViewerLayers(background=volume)
            self.ui.statusLabel.text = _("Review '{name}' (the painting is hidden, not deleted). To improve it, show "
                                         "the painting, paint more slices (Suggest slices shows where) and fine-tune "
                                         "again.").format(name=segmentation.GetName())

    # ------------------------------------------------------------------ suggestions

    def onSuggestButton(self):
        self.startOrCancel(_("Suggesting slices failed."), self._suggest)

    def _suggest(self):
        job = self.logic.suggestSlices(self.ui.fewShotVolumeSelector.currentNode(),
                                       self.ui.modelPathLineEdit.currentPath, blocking=False,
                                       segmentationNode=self.ui.fewShotSegmentationSelector.currentNode())
        self._start(job, self.ui.suggestButton, _("Suggesting slices"), self.onSuggestEnded)

    def onSuggestEnded(self, job):
        if job.status != jobs.DONE:
            return
        self._suggestions = list(job.result or [])
        widget = self.ui.suggestionsListWidget
        widget.clear()
        volume = self.ui.fewShotVolumeSelector.currentNode()
        for item in self._suggestions:
            widget.addItem(_("{slice} (score {score})").format(
                slice=sliceName(volume, int(item.get("axis", 2)), int(item["index"])),
                score=f"{float(item.get('score', 0)):.3g}"))
        if self._suggestions:
            widget.setCurrentRow(0)

    # ------------------------------------------------------------------ cohort

    @property
    def cohort(self) -> MedSSLCohortLogic:
        """The cohort logic, with the module logic's Python, job folder and device."""
        if "_cohort" not in self.__dict__:
            self._cohort = MedSSLCohortLogic()
        logic = self.logic
        if logic is not None:
            self._cohort.python, self._cohort.workDir, self._cohort.device = logic.python, logic.workDir, logic.device
        return self._cohort

    def _describeCohort(self) -> str:
        state = self.cohort.state()
        if not state["scans"]:
            return _("The cohort has no scan yet. Paint a few planes of the volume above, then add it.")
        names = ", ".join(entry["name"] for entry in state["classes"].values())
        return _("The cohort: {count} scan(s) of {names}; model {round} in {folder}.").format(
            count=len(state["scans"]), names=names, round=state["round"], folder=state["model"])

    def onAddToCohortButton(self):
        self.startOrCancel(_("Adding the scan to the cohort failed."), self._addToCohort)

    def _addToCohort(self):
        ui = self.ui
        unlabeled = ui.cohortUnlabeledPathLineEdit.currentPath.strip()
        job = self.cohort.addScan(ui.fewShotVolumeSelector.currentNode(), ui.fewShotSegmentationSelector.currentNode(),
                                  complete=ui.cohortCompleteCheckBox.checked,
                                  initModel=self._initModel() if not self.cohort.model else None,
                                  unlabeled=[unlabeled] if unlabeled else None, blocking=False, onEvent=self._onEvent)
        self._lossCurveFor(_("Cohort model"))
        self._start(job, ui.addToCohortButton, _("Cohort model"), self.onCohortEnded)

    def onCohortEnded(self, job):
        self.ui.cohortStatusLabel.text = self._describeCohort()
        if job.status == jobs.DONE:
            self.ui.statusLabel.text = _("Cohort model refreshed: {path}.").format(path=job.result)

    def onSegmentNextButton(self):
        self.startOrCancel(_("Segmenting the next scan failed."), self._segmentNext)

    def _segmentNext(self):
        job = self.cohort.segmentNext(self.ui.fewShotVolumeSelector.currentNode(), blocking=False)
        self._start(job, self.ui.segmentNextButton, _("Draft of the next scan"), self.onDraftEnded)

    def onCorrectDraftButton(self):
        self.startOrCancel(_("Correcting the draft failed."), self._correctDraft)

    def _correctDraft(self):
        ui = self.ui
        job = self.cohort.correct(ui.fewShotVolumeSelector.currentNode(), ui.fewShotSegmentationSelector.currentNode(),
                                  blocking=False)
        self._start(job, ui.correctDraftButton, _("Correcting the draft"), self.onDraftEnded)

    def onDraftEnded(self, job):
        if job.status != jobs.DONE:
            return
        gui.showSegmentation(job.result)
        self.ui.statusLabel.text = _("Review '{name}'. Where it is wrong, repaint a plane or two in a new segmentation "
                                     "and Correct the draft; once it is right, check 'complete' and add it to the "
                                     "cohort.").format(name=job.result.GetName())

    def onSuggestionSelected(self, row):
        if 0 <= row < len(self._suggestions) and self._suggestions[row].get("center_ras"):
            self.logic.jumpToSlice(self._suggestions[row])


class MedSSLTrainerTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (Reload and Test, or ctest). Checks the sparse-annotation extraction and the loss chart
    nodes on small synthetic data, and that the backend's environment can be probed. A tiny fine-tune is
    only run when the environment variable MEDSSL_TEST_TRAIN=1 (it needs torch in Slicer's Python and takes
    a minute on a CPU)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_SparseAnnotation()
        self.setUp()
        self.test_LossChart()
        self.setUp()
        self.test_TinyFineTune()

    def _paintedVolume(self):
        array = np.zeros((8, 16, 16), np.int16)
        array[2:6, 4:12, 4:12] = 100
        matrix = np.diag([0.8, 0.8, 2.0, 1.0])
        volume = nodes.addVolumeFromArray(array, matrix, "MedSSL test volume")
        labels = np.zeros(array.shape, np.uint8)
        labels[3, 4:12, 4:12] = 1  # one painted slice
        segmentation = nodes.segmentationFromLabelmap(labels, matrix, {"1": {"name": "box", "color": [1, 0, 0]}},
                                                      volume, "MedSSL test annotations")
        return volume, segmentation

    def test_SparseAnnotation(self):
        self.delayDisplay("Painted slices become training labels, other slices are ignored (255)")
        volume, segmentation = self._paintedVolume()
        labels, classes, planes = sparseLabels(segmentation, volume)
        self.assertEqual(planes, {0: [], 1: [], 2: [3]})
        self.assertEqual(classes["1"]["name"], "box")
        self.assertTrue((labels[3] != NOT_ANNOTATED).all() and (labels[[0, 1, 2, 4, 5, 6, 7]] == NOT_ANNOTATED).all())
        self.delayDisplay("Test passed")

    def test_LossChart(self):
        self.delayDisplay("Loss chart nodes")
        curve = LossCurve("test")
        curve.append(1, 0.5)
        self.assertEqual(curve.points(), [(1.0, 0.5)])
        curve.remove()
        self.delayDisplay("Test passed")

    def test_TinyFineTune(self):
        environment = backend.probeEnvironment()
        self.delayDisplay(gui.environmentSummary(environment))
        if os.environ.get("MEDSSL_TEST_TRAIN") != "1" or backend.missingDependencies(environment):
            self.delayDisplay("MEDSSL_TEST_TRAIN not set (or torch/MONAI missing): fine-tuning is not tested")
            return
        volume, segmentation = self._paintedVolume()
        logic = MedSSLTrainerLogic()
        logic.device = "cpu"
        bundle = logic.finetune(volume, segmentation, initModel="none", steps=2, width=4)
        self.assertTrue(os.path.isfile(os.path.join(bundle, "model.json")))
        self.assertIsNotNone(logic.lastOutputs.get("segmentation"))
        self.delayDisplay("Test passed")
