"""Qt pieces shared by the MedSSL module widgets: the job panel (timer polling, Start <-> Cancel, progress
with ETA, log), background probes, device choice, and two-way binding of str parameters.

Needs the Slicer application (``qt``, ``slicer.app``): imported only by MedSSLTrainer.py / MedSSLSegment.py,
never by the logic or the tests.
"""

from __future__ import annotations

import logging
import os
import threading

import qt

import slicer

from . import backend, jobs
from .i18n import tr as _

LOG_MAX_LINES = 5000


def formatDuration(seconds) -> str:
    """'1 h 05 min', '3 min 20 s' or '45 s'."""
    seconds = max(0, int(round(float(seconds))))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return _("{hours} h {minutes} min").format(hours=hours, minutes=f"{minutes:02d}")
    if minutes:
        return _("{minutes} min {seconds} s").format(minutes=minutes, seconds=f"{secs:02d}")
    return _("{seconds} s").format(seconds=secs)


def describeProgress(event: dict) -> str:
    """One status line from a progress event: stage, step/total, loss, speed, ETA."""
    text = _("{stage}: step {step}/{total}").format(stage=event.get("stage", _("running")),
                                                     step=event.get("step", "?"), total=event.get("total", "?"))
    if event.get("loss") is not None:
        text += _(", loss {loss}").format(loss=f"{float(event['loss']):.4g}")
    if event.get("cubes_per_s"):
        text += _(", {speed} cubes/s").format(speed=f"{float(event['cubes_per_s']):.1f}")
    if event.get("eta_s") is not None:
        text += _(", about {duration} left").format(duration=formatDuration(event["eta_s"]))
    return text


class JobPanel:
    """Runs one :class:`jobs.Job` at a time for a widget.

    A ``qt.QTimer`` polls the job on the main thread (so results are imported there), the start button turns
    into Cancel, the progress bar and status label show step/total and ETA, the log view follows the job's
    log file. ``onEnded(job)`` is called once when the job is done, failed or cancelled.
    """

    def __init__(self, progressBar, statusLabel, logView, intervalMs: int = 250):
        self.progressBar = progressBar
        self.statusLabel = statusLabel
        self.logView = logView
        self.logView.setMaximumBlockCount(LOG_MAX_LINES)
        self.job = None
        self.title = ""
        self._button = None
        self._buttonText = ""
        self._onEnded = None
        self._logOffset = 0
        self.timer = qt.QTimer()
        self.timer.setInterval(intervalMs)
        self.timer.connect("timeout()", self._poll)
        self.progressBar.hide()

    @property
    def busy(self) -> bool:
        return self.job is not None and self.job.running

    @property
    def jobDir(self) -> str | None:
        return self.job.jobDir if self.job is not None else None

    def start(self, job, button, title: str, onEnded=None) -> None:
        """Follow a started ``job``; ``button`` becomes its Cancel button until it ends."""
        self.job, self.title, self._onEnded = job, title, onEnded
        self._button, self._buttonText = button, button.text
        button.text = _("Cancel")
        button.toolTip = _("Stop: {task} (ends the background process)").format(task=title)
        self._logOffset = 0
        self.logView.clear()
        self.progressBar.setRange(0, 0)  # busy indicator until the first progress event
        self.progressBar.show()
        self.statusLabel.text = _("{title}: starting...").format(title=title)
        self.timer.start()

    def cancel(self) -> None:
        """Cancel the running job (its whole process tree ends within a few seconds)."""
        if self.busy:
            self.statusLabel.text = _("{title}: cancelling...").format(title=self.title)
            slicer.app.processEvents()
            self.job.cancel()
            self._poll()

    def showEvent(self, event: dict) -> None:
        """Update the progress bar and status line from a job event."""
        kind = event.get("event")
        if kind == "progress" and event.get("total"):
            self.progressBar.setRange(0, int(event["total"]))
            self.progressBar.setValue(int(event.get("step", 0)))
            self.statusLabel.text = describeProgress(event)
        elif kind == "stage":
            self.progressBar.setRange(0, 0)
            self.statusLabel.text = _("{stage}: {message}").format(stage=event.get("stage", ""),
                                                                   message=event.get("message", ""))

    def _poll(self) -> None:
        job = self.job
        if job is None:
            self.timer.stop()
            return
        try:
            for event in job.poll():
                self.showEvent(event)
        except Exception:  # a bug in an event handler must not leave a job running unobserved
            logging.exception("MedSSL: error while following the job; cancelling it")
            job.cancel()
        self._followLog()
        if not job.running:
            self.timer.stop()
            self._ended(job)

    def _followLog(self) -> None:
        """Append what the job's log file gained since the last poll."""
        try:
            with open(self.job.logPath, encoding="utf-8", errors="replace") as handle:
                handle.seek(self._logOffset)
                text = handle.read()
                self._logOffset = handle.tell()
        except OSError:
            return
        if text:
            self.logView.appendPlainText(text.rstrip("\n"))

    def _ended(self, job) -> None:
        self._button.text = self._buttonText
        self._button.toolTip = ""
        self.progressBar.hide()
        if job.status == jobs.DONE:
            self.statusLabel.text = _("{title}: done in {duration}.").format(title=self.title,
                                                                              duration=formatDuration(job.elapsed))
        elif job.status == jobs.CANCELLED:
            self.statusLabel.text = _("{title}: cancelled.").format(title=self.title)
        else:
            self.statusLabel.text = _("{title} failed: {error}").format(title=self.title, error=job.error)
        slicer.util.showStatusMessage(self.statusLabel.text, 15000)  # seen in any module (the user may be elsewhere)
        onEnded, self._onEnded = self._onEnded, None
        if onEnded is not None:
            onEnded(job)
        if job.status == jobs.FAILED:
            slicer.util.errorDisplay(_("{title} failed:\n{error}\n\nThe full log is in {path}").format(
                title=self.title, error=job.error, path=job.logPath), detailedText=job.readLog(20000))

    def openJobFolder(self) -> None:
        """Show the current job's folder (log, outputs) in the file browser; when it was deleted (done or
        cancelled without "Keep job outputs and logs"), its parent."""
        if not self.jobDir:
            return
        folder = self.jobDir if os.path.isdir(self.jobDir) else os.path.dirname(self.jobDir)
        if os.path.isdir(folder):
            qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(folder))


class BackgroundCall:
    """Run a Qt-free, MRML-free function (e.g. a subprocess probe) in a thread; a timer on the main thread
    calls ``onDone(result, error)`` when it returns."""

    def __init__(self, function, onDone, intervalMs: int = 200):
        self.result = None
        self.error = None
        self._onDone = onDone
        self._thread = threading.Thread(target=self._run, args=(function,), daemon=True)
        self._timer = qt.QTimer()
        self._timer.setInterval(intervalMs)
        self._timer.connect("timeout()", self._check)
        self._thread.start()
        self._timer.start()

    def _run(self, function) -> None:
        try:
            self.result = function()
        except Exception as exc:  # reported on the main thread
            self.error = exc

    def _check(self) -> None:
        if self._thread.is_alive():
            return
        self._timer.stop()
        self._onDone(self.result, self.error)


def probeDefaults(environment: dict) -> dict | None:
    """The backend's option defaults (``info --defaults``; asked once, then the answer cached by
    :func:`backend.commandDefaults` serves both modules), or None when the backend does not import or cannot
    answer (the panels then keep what they show)."""
    if not environment.get("MedSSL"):
        return None
    try:
        return backend.cachedDefaults() or backend.commandDefaults()
    except RuntimeError as exc:
        logging.warning("MedSSL: %s", exc)
        return None


def probeBackend(methods: bool = False) -> dict:
    """Environment probe, the backend's option defaults and (``methods``) its method list in one background
    call: {"environment": ..., "defaults": {...} or None, "methods": [...]}."""
    environment = backend.probeEnvironment()
    answer = {"environment": environment, "defaults": probeDefaults(environment)}
    if methods:
        answer["methods"] = backend.availableMethods() if environment.get("MedSSL") else list(backend.DEFAULT_METHODS)
    return answer


def deviceChoices(environment: dict | None, checking: bool = False) -> list[tuple[str, str]]:
    """[(value for --device, label)] for the device box: auto first, naming what it will use (the first CUDA
    GPU, else the Apple GPU (MPS), else the CPU). ``environment`` None: not known yet (``checking``: the
    probe is still running) or the check failed."""
    if environment is None:
        auto = _("auto (checking...)") if checking else _("auto (unknown: the environment check failed)")
        return [("auto", auto), ("cpu", _("cpu"))]
    gpus = environment.get("cuda") or []
    if gpus:
        auto = _("auto ({gpu}, {memory} GB)").format(gpu=gpus[0]["name"], memory=gpus[0].get("memory_gb", "?"))
    elif environment.get("mps"):
        auto = _("auto (Apple GPU, MPS)")
    else:
        auto = _("auto (CPU: no GPU found - slow)")
    choices = [("auto", auto)]
    if gpus:
        choices.append(("cuda", _("cuda ({gpu})").format(gpu=gpus[0]["name"])))
    if environment.get("mps"):
        choices.append(("mps", _("mps (Apple GPU)")))
    choices.append(("cpu", _("cpu (slow)")))
    return choices


def fillDeviceComboBox(comboBox, environment: dict | None, current: str = "auto", checking: bool = False) -> None:
    """Device choices (item data = --device value), auto naming the GPU it will use ("checking..." while
    the probe runs: ``environment`` None and ``checking``)."""
    comboBox.blockSignals(True)
    comboBox.clear()
    for value, label in deviceChoices(environment, checking):
        comboBox.addItem(label, value)
    index = comboBox.findData(current)
    comboBox.setCurrentIndex(index if index >= 0 else 0)
    comboBox.blockSignals(False)


def deviceWarning(environment: dict | None, device: str) -> str:
    """A warning to show next to the device choice ('' when a GPU will be used)."""
    if environment is None:
        return ""
    if device == "cpu" or not (environment.get("cuda") or environment.get("mps")):
        return _("Training will run on the CPU: expect hours for pretraining. Use a small step budget, or a "
                 "computer with a GPU (NVIDIA CUDA, or an Apple-silicon Mac).")
    return ""


def environmentSummary(environment: dict | None, error=None) -> str:
    """One line about torch/MONAI/GPU for the module panel."""
    if error is not None:
        return _("Could not check the Python environment: {error}").format(error=error)
    if environment is None:
        return _("Checking torch, MONAI and GPUs...")
    missing = backend.missingDependencies(environment)
    if missing:
        return _("Missing Python packages: {names}. Click Install to add them.").format(names=", ".join(missing))
    if not environment.get("MedSSL"):
        return _("The MedSSL backend does not import: {error}").format(
            error=environment.get("MedSSL_error", _("not found")))
    gpus = ", ".join(g["name"] for g in environment.get("cuda") or [])
    gpus = gpus or (_("Apple GPU (MPS)") if environment.get("mps") else _("no GPU"))
    return _("torch {torch}, MONAI {monai}; {gpus}.").format(torch=environment["torch"], monai=environment["monai"],
                                                            gpus=gpus)


class StringBindings:
    """Two-way binding of ``str`` parameters of a parameterNodeWrapper to QComboBox (item data) and
    ctkPathLineEdit widgets (the widget types whose str binding this module does not leave to the
    wrapper's connectGui)."""

    def __init__(self):
        self._bindings = []  # (widget, name, kind)
        self._parameterNode = None
        self._updating = False

    def combo(self, comboBox, name: str) -> None:
        self._bindings.append((comboBox, name, "combo"))
        comboBox.connect("currentIndexChanged(int)", lambda _index, n=name, w=comboBox: self._store(n, w, "combo"))

    def path(self, pathLineEdit, name: str) -> None:
        self._bindings.append((pathLineEdit, name, "path"))
        pathLineEdit.connect("currentPathChanged(QString)", lambda _path, n=name, w=pathLineEdit: self._store(n, w, "path"))

    def setParameterNode(self, parameterNode) -> None:
        self._parameterNode = parameterNode
        self.updateGui()

    def updateGui(self, *_args) -> None:
        """Parameter node -> widgets. An empty path parameter leaves the path widget as it is: a
        ctkPathLineEdit with a ``settingKey`` shows the most recent path of its saved history, which the
        parameter node of a new scene must not wipe."""
        if self._parameterNode is None:
            return
        self._updating = True
        try:
            for widget, name, kind in self._bindings:
                value = getattr(self._parameterNode, name)
                if kind == "combo":
                    index = widget.findData(value)
                    if index >= 0 and index != widget.currentIndex:
                        widget.setCurrentIndex(index)
                elif value and widget.currentPath != value:
                    widget.currentPath = value
        finally:
            self._updating = False

    def setWidget(self, name: str, value) -> None:
        """Show ``value`` in the widget bound to ``name`` (without writing it to the parameter node)."""
        self._updating = True
        try:
            for widget, boundName, kind in self._bindings:
                if boundName != name:
                    continue
                if kind == "combo":
                    index = widget.findData(value)
                    if index >= 0:
                        widget.setCurrentIndex(index)
                elif widget.currentPath != value:
                    widget.currentPath = value
        finally:
            self._updating = False

    def _store(self, name, widget, kind) -> None:
        """Widget -> parameter node."""
        if self._updating or self._parameterNode is None:
            return
        value = widget.currentData if kind == "combo" else widget.currentPath
        if value is not None and getattr(self._parameterNode, name) != value:
            setattr(self._parameterNode, name, str(value))


def bindJobSettings(pathLineEdit, checkBox) -> None:
    """The "Job folder" and "Keep job outputs and logs" widgets: shown from, and saved to, the Slicer
    application settings, shared by both modules. The logic reads the settings at each job
    (:func:`backend.workDirectory`, :func:`backend.keepJobFilesSetting`), so a change in one module applies to
    the next job of either; :func:`showJobSettings` refreshes the widgets when a module is shown."""
    import ctk

    settings = slicer.app.userSettings()
    pathLineEdit.filters = ctk.ctkPathLineEdit.Dirs
    showJobSettings(pathLineEdit, checkBox)

    def onPath(path):
        if path:
            settings.setValue(backend.WORK_DIR_SETTING, path)

    def onKeep(checked):
        settings.setValue(backend.KEEP_JOB_FILES_SETTING, "true" if checked else "false")

    pathLineEdit.connect("currentPathChanged(QString)", onPath)
    checkBox.connect("toggled(bool)", onKeep)


def showJobSettings(pathLineEdit, checkBox) -> None:
    """Show the current job settings (the other module may have changed them) without saving them again."""
    for widget, value in ((pathLineEdit, backend.workDirectory()), (checkBox, backend.keepJobFilesSetting())):
        widget.blockSignals(True)
        if widget is checkBox:
            widget.checked = value
        else:
            widget.currentPath = value
        widget.blockSignals(False)


def showChart(chartNode) -> None:
    """Show a plot chart node in the view layout (switching to a layout with a plot view if needed)."""
    slicer.modules.plots.logic().ShowChartInLayout(chartNode)


def showSegmentation(segmentationNode, hide=None) -> None:
    """Show a result segmentation in the slice views and in 3D (closed surface, made from the labelmap), and
    hide (not delete) ``hide``, e.g. the painting it was made from, so that the two do not overlap."""
    display = segmentationNode.GetDisplayNode()
    display.SetVisibility(True)
    display.SetVisibility3D(True)
    display.SetPreferredDisplayRepresentationName3D("Closed surface")
    segmentationNode.CreateClosedSurfaceRepresentation()
    if hide is not None and hide.GetDisplayNode() is not None:
        hide.GetDisplayNode().SetVisibility(False)


def showTable(tableNode) -> None:
    """Show a table node in the layout's table view; the layout switches to Four-Up Table only when the
    current one shows no table view (a layout the user chose with a table stays)."""
    layoutManager = slicer.app.layoutManager()
    tableView = layoutManager.tableWidget(0)
    if tableView is None or not tableView.visible:
        layoutManager.setLayout(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)
    selectionNode = slicer.app.applicationLogic().GetSelectionNode()
    selectionNode.SetActiveTableID(tableNode.GetID())
    slicer.app.applicationLogic().PropagateTableSelection()
