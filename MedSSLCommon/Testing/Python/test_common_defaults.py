"""The option defaults the panels show and the logic leaves out come from the backend (``medssl info
--defaults``, asked by the widgets' background probe), not from the Slicer side: the stand-in backend answers
different defaults here and the widgets show them, and a value equal to the backend's default is left out of
the command line. The deliberate differences (MedSSLCommonLib.backend.GUI_DEFAULTS) stay what they are. The
last tests check, against the real backend, that the probe gets the real defaults and that the stand-in's
table matches them."""

import importlib.util
import json
import subprocess
import sys

import pytest

import fake_medssl
from MedSSLCommonLib import backend
from slicer_testing_helpers import addVolume, makeWidget, paintedSegmentation, phantom, runPanel


def option(command, flag):
    """The value after ``flag`` in an argv, or None when the option is left out."""
    return command[command.index(flag) + 1] if flag in command else None


def test_command_defaults_come_from_the_backend_and_are_cached(fake_backend, monkeypatch):
    assert backend.cachedDefaults() is None
    monkeypatch.setenv("FAKE_MEDSSL_DEFAULTS", json.dumps({"pretrain": {"steps": 1234}}))
    answer = backend.commandDefaults()
    assert answer["pretrain"]["steps"] == 1234 and answer["suggest"]["count"] == fake_medssl.DEFAULTS["suggest"]["count"]
    assert backend.cachedDefaults() == answer
    assert backend.guiDefault(answer, "predict", "overlap") == fake_medssl.DEFAULTS["predict"]["overlap"]
    assert backend.guiDefault(answer, "pretrain", "steps") == backend.GUI_DEFAULTS["pretrain"]["steps"]  # deliberate
    assert backend.unlessDefault(answer, "pretrain", "steps", 1234) is None
    assert backend.unlessDefault(answer, "pretrain", "steps", 2000) == 2000
    assert backend.unlessDefault(None, "pretrain", "steps", 1234) == 1234  # not known: passed as given
    assert backend.runtimeDefault(answer, "device") == "auto"


def test_command_defaults_failure_is_one_line_and_not_cached(fake_backend, monkeypatch):
    monkeypatch.setenv("FAKE_MEDSSL_FAIL", "no defaults today")
    with pytest.raises(RuntimeError, match="no defaults today"):
        backend.commandDefaults()
    assert backend.cachedDefaults() is None


def test_trainer_shows_the_backends_steps_and_leaves_them_out(slicer_app, scene, monkeypatch):
    """Without a deliberate difference for pretraining steps, the panel shows the backend's default (the
    stand-in answers 1234) and a pretraining at that value leaves --steps out; another value is passed."""
    monkeypatch.setitem(backend.GUI_DEFAULTS, "pretrain", {})
    monkeypatch.setenv("FAKE_MEDSSL_DEFAULTS", json.dumps({"pretrain": {"steps": 1234}}))
    _module, widget, ui = makeWidget(slicer_app, "MedSSLTrainer")
    assert ui.pretrainStepsSpinBox.value == 1234 and widget._parameterNode.pretrainSteps == 1234
    volume = addVolume(scene, phantom(), name="ct")
    ui.pretrainVolumesSelector.setCheckedNodes([volume])
    widget.onPretrainButton()
    runPanel(widget)
    assert widget.panel.job.status == "done", widget.panel.job.error
    command = widget.panel.job.commands[0]
    assert option(command, "--steps") is None and option(command, "--device") is None
    ui.pretrainStepsSpinBox.value = 1500  # the user's own budget
    widget.onPretrainButton()
    runPanel(widget)
    assert option(widget.panel.job.commands[0], "--steps") == "1500"


def test_user_values_are_kept_when_the_backend_answers(slicer_app, scene, monkeypatch):
    """A value the user changed before the probe answered is not replaced by the backend's default."""
    from MedSSLCommonLib import gui

    monkeypatch.setitem(backend.GUI_DEFAULTS, "pretrain", {})
    monkeypatch.setenv("FAKE_MEDSSL_DEFAULTS", json.dumps({"pretrain": {"steps": 1234}}))
    answers = []
    monkeypatch.setattr(gui, "BackgroundCall", lambda function, onDone, intervalMs=200: answers.append((function, onDone)))
    _module, widget, ui = makeWidget(slicer_app, "MedSSLTrainer")
    assert ui.pretrainStepsSpinBox.value == 0  # "no limit" (--steps left out) until the backend answers
    ui.pretrainStepsSpinBox.value = 50
    function, onDone = answers[-1]
    onDone(function(), None)
    assert ui.pretrainStepsSpinBox.value == 50 and widget._parameterNode.pretrainSteps == 50


def test_deliberate_differences_stay_and_are_passed(slicer_app, scene, monkeypatch):
    """The panel's own budgets (GUI_DEFAULTS) are shown whatever the backend answers, and passed since they
    differ from the backend's default; the fine-tuning budget is the few-shot engine's default (the backend's
    "fewshot" answer, not the network's "finetune" one) and is left out; suggest leaves --count and the
    backend's device out."""
    monkeypatch.setenv("FAKE_MEDSSL_DEFAULTS", json.dumps({"pretrain": {"steps": 1234}, "finetune": {"steps": 777},
                                                           "fewshot": {"steps": 321}, "suggest": {"count": 3}}))
    _module, widget, ui = makeWidget(slicer_app, "MedSSLTrainer")
    assert ui.pretrainStepsSpinBox.value == backend.GUI_DEFAULTS["pretrain"]["steps"]
    assert ui.finetuneStepsSpinBox.value == 321
    volume = addVolume(scene, phantom(), name="ct")
    ui.fewShotVolumeSelector.setCurrentNode(volume)
    ui.fewShotSegmentationSelector.setCurrentNode(paintedSegmentation(scene, volume))
    ui.initComboBox.setCurrentIndex(ui.initComboBox.findData("none"))
    widget.onFineTuneButton()
    runPanel(widget)
    assert widget.panel.job.status == "done", widget.panel.job.error
    finetune, predict = widget.panel.job.commands
    assert option(finetune, "--steps") is None
    assert option(finetune, "--device") is None and option(predict, "--device") is None
    widget.onSuggestButton()
    runPanel(widget)
    assert widget.panel.job.status == "done", widget.panel.job.error
    assert option(widget.panel.job.commands[0], "--count") is None and len(widget._suggestions) == 3


def test_device_choice_shows_the_backends_default(slicer_app, scene, monkeypatch, tmp_path):
    """The device selector starts at the backend's default device; that choice leaves --device out, another
    one is passed."""
    monkeypatch.setenv("FAKE_MEDSSL_DEFAULTS", json.dumps({name: {"device": "cpu"} for name in fake_medssl.DEFAULTS}))
    _module, widget, ui = makeWidget(slicer_app, "MedSSLSegment")
    assert ui.deviceComboBox.currentData == "cpu" and widget._parameterNode.device == ""
    widget._prepareRun()
    assert widget.logic.device is None
    ui.deviceComboBox.setCurrentIndex(ui.deviceComboBox.findData("auto"))
    assert widget._parameterNode.device == "auto"
    widget._prepareRun()
    assert widget.logic.device == "auto"


def test_logic_leaves_the_backends_defaults_out(scene, fake_backend, monkeypatch, tmp_path):
    """The logic passes only what it is given: suggest without count gets the backend's count."""
    from MedSSLTrainerLib.logic import MedSSLTrainerLogic

    monkeypatch.setenv("FAKE_MEDSSL_DEFAULTS", json.dumps({"suggest": {"count": 2}}))
    volume = addVolume(scene, phantom(), name="ct")
    model = tmp_path / "model"
    model.mkdir()
    logic = MedSSLTrainerLogic()
    slices = logic.suggestSlices(volume, str(model))
    command = logic.lastJob.commands[0]
    assert len(slices) == 2 and option(command, "--count") is None and option(command, "--device") is None


REAL = None if importlib.util.find_spec("torch") and backend.backendRoot() else "MedSSL backend or torch not available"


@pytest.mark.skipif(REAL is not None, reason=REAL or "")
def test_probe_returns_the_real_backends_defaults(real_backend, monkeypatch):
    """The widgets' probe (``gui.probeDefaults``, Qt-free) asks the real backend: its answer is what the
    backend's settings dataclasses hold (read here in a separate process), and the stand-in answers the same."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    answer = backend.commandDefaults()
    script = "import json; from MedSSL.commands.info import command_defaults; print(json.dumps(command_defaults()))"
    done = subprocess.run([sys.executable, "-c", script], env=backend.childEnvironment(), capture_output=True,
                          text=True, timeout=300, check=True)
    assert answer == json.loads(done.stdout.strip().splitlines()[-1])
    assert set(answer) == {"pretrain", "finetune", "predict", "suggest", "fewshot"}
    assert answer["pretrain"]["no-amp"] is False  # flags that switch something off are off by default
    assert answer["pretrain"]["patch"] and isinstance(answer["pretrain"]["steps"], int)
    assert answer == fake_medssl.DEFAULTS, "update fake_medssl.DEFAULTS to what `medssl info --defaults` prints"
    assert backend.cachedDefaults() == answer
