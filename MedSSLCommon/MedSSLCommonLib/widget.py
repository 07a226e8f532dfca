"""``MedSSLWidgetBase``: what the MedSSL module widgets share - the module lifecycle (setup, enter, exit,
cleanup, scene close), the parameter node (GUI connection, str parameters bound by
:class:`~MedSSLCommonLib.gui.StringBindings`, job results stored while another module is shown), the job
panel and job settings, the background probe of the backend's environment and option defaults (spin boxes
bound with :meth:`MedSSLWidgetBase.bindDefault` show the backend's default until the user changes them), the
device choice and the installation of the backend's dependencies.

A module widget subclasses it and adds only its own parts: the parameter node class, the logic class, its
widgets and buttons (:meth:`setupModule`), and what follows a new parameter node or probe. Both .ui files
have the shared widgets (progressBar, statusLabel, logTextEdit, workDirPathLineEdit, keepJobFilesCheckBox,
deviceComboBox, deviceWarningLabel, environmentLabel, installButton, openJobFolderButton).

Needs the Slicer application (``slicer.ScriptedLoadableModule``, Qt through :mod:`.gui`): imported only by
MedSSLSegment.py and MedSSLTrainer.py.
"""

from __future__ import annotations

import importlib
import sys

import vtk

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic, ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin

from . import backend, gui, install
from .i18n import tr as _, translate


def describeModule(parent, title, helpText):
    """A MedSSL module's entry in Slicer's module list: title, category, contributors, help and
    acknowledgement (each module file sets its own ``dependencies``)."""
    parent.title = title
    parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
    parent.contributors = ["MedSSL contributors (MedSSL project)"]  # as EXTENSION_CONTRIBUTORS
    parent.helpText = helpText
    parent.acknowledgementText = _(
        "MedSSL builds on Models Genesis (Zhou et al., MICCAI 2019 / MedIA 2021), MONAI and PyTorch.")


class MedSSLWidgetBase(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Base of MedSSLSegmentWidget and MedSSLTrainerWidget (``self.moduleName`` comes from the class name,
    as for every scripted module widget: ``<Module>Widget``)."""

    parameterNodeClass = None
    """The module's ``@parameterNodeWrapper`` class (None: Slicer < 5.2)."""
    logicClass = None
    """The module's logic class (a :class:`~MedSSLCommonLib.runner.BackendRunner`)."""
    volumeParameter = "inputVolume"
    """The parameter set to the scene's first volume when it has none yet."""
    startButtonNames = ()
    """The module's job start buttons (disabled while dependencies install)."""
    _installing = False

    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.panel = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._environment = None
        self._probe = None
        self._defaults = None  # the backend's option defaults (info --defaults), once the probe has them
        self._defaultBindings = []  # (widget, parameter, subcommand, option, initial)
        self._shownDefaults = {}  # parameter -> the default last shown

    # ------------------------------------------------------------------ setup and parameter node

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath(f"UI/{self.moduleName}.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = self.logicClass()
        gui.bindJobSettings(self.ui.workDirPathLineEdit, self.ui.keepJobFilesCheckBox)
        self.panel = gui.JobPanel(self.ui.progressBar, self.ui.statusLabel, self.ui.logTextEdit)
        gui.fillDeviceComboBox(self.ui.deviceComboBox, None, checking=True)
        self.ui.installButton.hide()
        self.strings = gui.StringBindings()
        self.strings.combo(self.ui.deviceComboBox, "device")
        self.setupModule()
        self.ui.installButton.connect("clicked(bool)", self.onInstallButton)
        self.ui.openJobFolderButton.connect("clicked(bool)", lambda: self.panel.openJobFolder())
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self._updateDeviceWarning)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        self.startProbe()

    RELOAD_ORDER = ("i18n", "geometry", "jobs", "backend", "nodes", "runner", "plots", "install", "gui", "annotation",
                    "datasets", "rounds", "logic", "widget")
    """Submodules of the ``*Lib`` packages, those others import first (unknown names go last)."""

    def onReload(self):
        """Reload (developer mode): Slicer reloads only the module file; reload the shared ``MedSSLCommonLib``
        and the module's own ``<Module>Lib`` first, in import order, so edits there take effect too."""
        packages = ("MedSSLCommonLib", f"{self.moduleName}Lib")
        names = [n for n, m in list(sys.modules.items()) if m is not None and n.split(".")[0] in packages and "." in n]
        rank = {name: index for index, name in enumerate(self.RELOAD_ORDER)}
        for name in sorted(names, key=lambda n: (rank.get(n.rsplit(".", 1)[1], len(rank)), n)):
            importlib.reload(sys.modules[name])
        ScriptedLoadableModuleWidget.onReload(self)

    def setupModule(self):
        """The module's own widgets: their settings, str parameter bindings (``self.strings``) and signals."""

    def cleanup(self):
        if self.panel is not None and self.panel.busy:
            self.panel.cancel()
        self.removeObservers()

    def enter(self):
        gui.showJobSettings(self.ui.workDirPathLineEdit, self.ui.keepJobFilesCheckBox)  # maybe changed elsewhere
        self.initializeParameterNode()

    def exit(self):
        # As the scripted-module template: stop syncing the GUI with the parameter node while another module
        # is shown, but keep the node: a job that ends meanwhile stores its results there (_storeResults)
        # and enter() shows them.
        self._disconnectGui()

    def onSceneStartClose(self, caller, event):
        if self.panel.busy:
            self.panel.cancel()  # its input volume is going away
        self.forgetSceneNodes()
        self.setParameterNode(None)

    def forgetSceneNodes(self):
        """The scene is closing: drop references to nodes the widget made (before the GUI is updated)."""

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def getParameterNode(self):
        """The module's parameter node (its scripted module node, wrapped), or None on Slicer versions without
        parameterNodeWrapper (the settings are then not kept with the scene)."""
        if self.parameterNodeClass is None:
            return None
        logic = ScriptedLoadableModuleLogic()
        logic.moduleName = self.moduleName
        return self.parameterNodeClass(logic.getParameterNode())

    def initializeParameterNode(self):
        parameterNode = self.getParameterNode()
        if parameterNode is not None and not getattr(parameterNode, self.volumeParameter):
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                setattr(parameterNode, self.volumeParameter, firstVolume)
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
        parameterNode = self._parameterNode or self.getParameterNode()
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
        self.showDefaults()
        self.parameterNodeChanged()

    def parameterNodeChanged(self):
        """The widgets show a new parameter node (or none): update what depends on its values."""

    # ------------------------------------------------------------------ backend option defaults

    def bindDefault(self, spinBox, parameter: str, subcommand: str, option: str):
        """``spinBox`` (bound to the int/float ``parameter``) shows the default of the backend's ``subcommand
        --option`` until the user changes it: :func:`backend.guiDefault` (the backend's answer to ``info
        --defaults``, or a deliberate difference of :data:`backend.GUI_DEFAULTS`). Before the backend
        answers it shows :func:`backend.initialGuiDefault`, which must be the parameter's default."""
        initial = backend.initialGuiDefault(subcommand, option)
        self._defaultBindings.append((spinBox, parameter, subcommand, option, initial))
        spinBox.value = initial
        self._shownDefaults[parameter] = initial

    def showDefaults(self):
        """Show the defaults of the bound options (see :meth:`bindDefault`) where the value is still the
        default shown before (the user has not changed it)."""
        for spinBox, parameter, subcommand, option, initial in self._defaultBindings:
            value = backend.guiDefault(self._defaults, subcommand, option)
            if value is None:
                continue
            node = self._parameterNode
            current = getattr(node, parameter) if node is not None else spinBox.value
            if current in (initial, self._shownDefaults.get(parameter)) and current != value:
                if node is not None:
                    setattr(node, parameter, value)  # the parameter node updates the spin box
                else:
                    spinBox.value = value
            self._shownDefaults[parameter] = value

    def optionValue(self, subcommand: str, option: str, value):
        """``value`` for a logic call, or None when it is the backend's default (the logic then leaves the
        option out of the command line and the backend's default applies)."""
        return backend.unlessDefault(self._defaults, subcommand, option, value)

    # ------------------------------------------------------------------ environment

    def startProbe(self):
        """Check torch/MONAI/GPUs (and whatever :meth:`probeBackend` adds) in a child process, in the
        background."""
        self.ui.environmentLabel.text = gui.environmentSummary(None)
        gui.fillDeviceComboBox(self.ui.deviceComboBox, None, self._shownDevice(), checking=True)
        self._probe = gui.BackgroundCall(self.probeBackend, self.onProbeDone)

    def probeBackend(self) -> dict:
        """What the background probe asks the backend (runs in a thread): {"environment": ..., "defaults":
        ...} (see :func:`gui.probeBackend`)."""
        return gui.probeBackend()

    def onProbeDone(self, answer, error):
        self._probe = None
        self._environment = answer["environment"] if answer else None
        if answer and answer.get("defaults"):
            self._defaults = answer["defaults"]
        self.ui.environmentLabel.text = gui.environmentSummary(self._environment, error)
        self.ui.installButton.visible = bool(self._environment and backend.missingDependencies(self._environment))
        gui.fillDeviceComboBox(self.ui.deviceComboBox, self._environment, self._shownDevice())
        self.showDefaults()
        self.backendProbed(answer)
        self._updateDeviceWarning()

    def backendProbed(self, answer):
        """The module's part of a finished probe (``answer`` is None when the probe failed)."""

    def onInstallButton(self):
        if self._installing:
            return
        with slicer.util.tryWithErrorDisplay(_("Installing the Python packages failed.")):  # dialogs: no wait cursor
            self._ensureBackendReady()
        self.dependenciesInstalled()

    def _ensureBackendReady(self):
        """:func:`install.ensureBackendReady` with the install and start buttons disabled meanwhile: pip's
        output processes events on every line, so a second click would start a nested install."""
        if self._installing:
            raise RuntimeError(_("An installation is already running."))
        self._installing = True
        self._enableButtons(False)
        try:
            self._environment = install.ensureBackendReady(self._environment)
        finally:
            self._installing = False
            self._enableButtons(True)

    def _enableButtons(self, enabled: bool):
        for name in ("installButton",) + tuple(self.startButtonNames):
            getattr(self.ui, name).enabled = enabled
        if enabled:
            self.updateStartButtons()

    def updateStartButtons(self):
        """The module's start buttons enabled as its inputs allow (after an installation)."""

    def dependenciesInstalled(self):
        """After a successful install: show the environment the install checked."""
        self.onProbeDone({"environment": self._environment}, None)

    def _shownDevice(self):
        """The device to select: the one chosen (kept in the parameter node), else the backend's default,
        else the current choice."""
        chosen = getattr(self._parameterNode, "device", "") if self._parameterNode is not None else ""
        return chosen or backend.runtimeDefault(self._defaults, "device") or self.ui.deviceComboBox.currentData

    def _updateDeviceWarning(self, *_args):
        self.ui.deviceWarningLabel.text = gui.deviceWarning(self._environment, self.ui.deviceComboBox.currentData)

    # ------------------------------------------------------------------ jobs

    def _prepareRun(self):
        """Dependencies present (offering to install them) and the device chosen. Raises if not ready. Uses
        the background probe's answer: the GUI thread never waits for the backend."""
        self._ensureBackendReady()
        device = self.ui.deviceComboBox.currentData or None
        self.logic.device = None if device == backend.runtimeDefault(self._defaults, "device") else device

    def startOrCancel(self, errorMessage, start):
        """A job's start button: Cancel while a job runs; else check the dependencies, set the device and call
        ``start()``, showing any error (``errorMessage`` as the title) in a dialog. Before the background
        probe has answered, it only says so (and checks again if the last check failed): probing here would
        freeze Slicer for up to minutes."""
        if self.panel.busy:
            self.panel.cancel()
            return
        if self._installing:
            return
        if self._environment is None:
            if self._probe is None:
                self.startProbe()
            self.ui.statusLabel.text = _("Still checking torch, MONAI and GPUs: start again when the check has "
                                         "answered (above).")
            return
        with slicer.util.tryWithErrorDisplay(errorMessage):  # no wait cursor: confirmation dialogs may show
            self._prepareRun()
            start()
