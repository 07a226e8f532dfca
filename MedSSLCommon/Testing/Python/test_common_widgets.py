"""What the two module widgets share (MedSSLCommonLib.widget.MedSSLWidgetBase and the strict doubles that stand
in for Slicer's GUI classes), checked outside Slicer with the ``slicer_app`` fixture of the root conftest.py:
Qt, CTK, the scripted-module base classes and parameterNodeWrapper are strict doubles, MRML is real
(slicer-core) and the backend is the stand-in CLI. They catch wiring mistakes (names, signatures, flows,
bounds, results lost across exit/enter) that only Slicer would otherwise reveal; they do not show that the
widgets look right - that needs Slicer itself (the modules' self-tests)."""

import os
from unittest import mock

import pytest

from slicer_testing_helpers import WIDGET_MODULES, fakeUi, makeWidget


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


def test_job_folder_and_keep_files_settings_reach_the_logic(slicer_app, scene, tmp_path, monkeypatch):
    """Issue 11 item 9 and issue 19 item 3: the job folder is configurable in both modules, saved in Slicer's
    settings and read at each job: changed in the Trainer, MedSSL Segment's next job uses it too (no
    restart), and its panel shows it when it is shown again."""
    from fake_slicer_gui import FakeSettings, leaveModule, showModule
    from slicer_testing_helpers import addVolume, phantom, runPanel

    slicer = slicer_app
    monkeypatch.delenv("MEDSSL_WORK_DIR")  # the setting decides
    settings = slicer.app.userSettings.return_value = FakeSettings()
    settings.setValue("MedSSL/WorkDirectory", str(tmp_path / "work"))
    widgets = {name: makeWidget(slicer, name) for name in WIDGET_MODULES}
    _module, segment, segmentUi = widgets["MedSSLSegment"]
    _module, trainer, trainerUi = widgets["MedSSLTrainer"]
    assert segmentUi.workDirPathLineEdit.currentPath == str(tmp_path / "work") and not segmentUi.keepJobFilesCheckBox.checked
    leaveModule(segment)
    trainerUi.workDirPathLineEdit.currentPath = str(tmp_path / "encrypted")
    trainerUi.keepJobFilesCheckBox.checked = True
    assert settings.values == {"MedSSL/WorkDirectory": str(tmp_path / "encrypted"), "MedSSL/KeepJobFiles": "true"}
    showModule(segment)
    assert segmentUi.workDirPathLineEdit.currentPath == str(tmp_path / "encrypted") and segmentUi.keepJobFilesCheckBox.checked
    bundle = tmp_path / "model"
    bundle.mkdir()
    (bundle / "model.json").write_text('{"task": "segment", "classes": {"1": {"name": "tissue"}}}', encoding="utf-8")
    segmentUi.inputVolumeSelector.setCurrentNode(addVolume(scene, phantom(), name="ct"))
    segmentUi.modelPathLineEdit.currentPath = str(bundle)
    segment.onApplyButton()
    assert segment.panel.job.jobDir.startswith(str(tmp_path / "encrypted" / "jobs"))
    runPanel(segment)
    assert segment.panel.job.status == "done" and os.path.isdir(segment.panel.job.jobDir)  # kept: the setting


def test_no_backend_call_on_the_gui_thread_before_the_probe_answers(slicer_app, scene, monkeypatch):
    """Issue 19 item 9: until the background probe answers, the device box says "checking...", not "no CUDA
    GPU", and a start button only says that the check is running: nothing probes on the GUI thread (that
    froze Slicer for up to 180 s); once the probe answers, the start goes ahead without a wait cursor."""
    from MedSSLCommonLib import backend, gui
    from slicer_testing_helpers import ENVIRONMENT, addVolume, paintedSegmentation, phantom, runPanel

    pending = []

    class PendingCall:  # the probe's thread has not returned yet
        def __init__(self, function, onDone, intervalMs=200):
            pending.append((function, onDone))

    monkeypatch.setattr(gui, "BackgroundCall", PendingCall)
    monkeypatch.setattr(backend, "probeEnvironment", mock.MagicMock(side_effect=AssertionError("probed on the GUI thread")))
    _module, widget, ui = makeWidget(slicer_app, "MedSSLTrainer")
    assert ui.deviceComboBox.itemText(0) == "auto (checking...)" and ui.deviceWarningLabel.text == ""
    volume = addVolume(scene, phantom(), name="ct")
    ui.fewShotVolumeSelector.setCurrentNode(volume)
    ui.fewShotSegmentationSelector.setCurrentNode(paintedSegmentation(scene, volume))
    ui.fineTuneButton.click()
    assert widget.panel.job is None and ui.statusLabel.text.startswith("Still checking torch, MONAI and GPUs")
    assert len(pending) == 1  # the running probe, not a second one
    function, onDone = pending.pop()
    onDone({"environment": dict(ENVIRONMENT), "defaults": None, "methods": list(backend.DEFAULT_METHODS)}, None)
    assert ui.deviceComboBox.itemText(0) == "auto (NVIDIA RTX A4000, 15.7 GB)"
    ui.fineTuneButton.click()
    assert widget.panel.busy
    runPanel(widget)
    assert widget.panel.job.status == "done", widget.panel.job.error
    assert backend.probeEnvironment.call_count == 0


def test_start_buttons_show_dialogs_without_a_wait_cursor(slicer_app, scene, monkeypatch):
    """Issue 19 item 9: the CPU confirmation (and the install plan) must not appear under a wait cursor."""
    import contextlib

    from slicer_testing_helpers import addVolume, phantom

    slicer = slicer_app
    cursors = []

    def tryWithErrorDisplay(message=None, waitCursor=False):
        cursors.append(waitCursor)
        return contextlib.nullcontext()

    monkeypatch.setattr(slicer.util, "tryWithErrorDisplay", tryWithErrorDisplay)
    slicer.util.confirmOkCancelDisplay.return_value = False  # the user reads the CPU warning and declines
    _module, widget, ui = makeWidget(slicer, "MedSSLTrainer")
    ui.deviceComboBox.setCurrentIndex(ui.deviceComboBox.findData("cpu"))
    ui.pretrainVolumesSelector.setCheckedNodes([addVolume(scene, phantom(), name="ct")])
    ui.pretrainButton.click()
    widget.onInstallButton()
    assert slicer.util.confirmOkCancelDisplay.call_count == 1 and widget.panel.job is None
    assert cursors == [False, False]


def test_buttons_are_disabled_during_an_install_and_a_second_click_starts_nothing(slicer_app, scene, monkeypatch):
    """Issue 19 item 7: slicer.util.pip_install processes events on every output line; a click on Install or a
    start button meanwhile must not start a nested install or a job."""
    from MedSSLCommonLib import backend, install
    from slicer_testing_helpers import ENVIRONMENT, addVolume, phantom

    slicer = slicer_app
    slicer.app.majorVersion, slicer.app.minorVersion = 5, 8
    slicer.app.testingEnabled.return_value = False
    _module, widget, ui = makeWidget(slicer, "MedSSLTrainer")
    ui.pretrainVolumesSelector.setCheckedNodes([addVolume(scene, phantom(), name="ct")])
    widget._environment = dict(ENVIRONMENT, monai=None)
    seen = []

    def pipInstall(args):  # what the user can do while pip prints its lines
        seen.append((ui.installButton.enabled, ui.pretrainButton.enabled, ui.fineTuneButton.enabled))
        ui.installButton.click()
        ui.pretrainButton.click()

    monkeypatch.setattr(slicer.util, "pip_install", pipInstall, raising=False)
    monkeypatch.setattr(backend, "probeEnvironment", lambda *a, **k: dict(ENVIRONMENT))
    widget.onInstallButton()
    assert seen == [(False, False, False)]  # one pip call: the clicks during it started nothing
    assert widget.panel.job is None and ui.installButton.enabled and ui.pretrainButton.enabled
    assert install.unsupportedReason(ENVIRONMENT) == ""
