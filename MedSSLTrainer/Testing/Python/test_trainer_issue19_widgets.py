"""Issue 19 in the MedSSL Trainer widget (the ``slicer_app`` fixture: strict doubles of Qt/CTK and the
scripted-module classes, real MRML, the stand-in backend), starting from the module's defaults."""

import numpy as np

from slicer_testing_helpers import addVolume, makeWidget, paintedSegmentation, phantom, runPanel


def patient(scene, seed):
    array = phantom() + np.random.default_rng(seed).integers(0, 20, phantom().shape).astype(np.int16)
    return addVolume(scene, array, name=f"patient {seed}")


def test_module_says_which_round_runs_and_the_next_patient_starts_at_round_one(slicer_app, scene, monkeypatch):
    """Item 1: the status line names the round and its start; after File > Close Scene the next patient's
    first run is round 1 from the user's choice, not a correction round of the last patient's model."""
    monkeypatch.setenv("FAKE_MEDSSL_TASK", "fewshot")
    _module, widget, ui = makeWidget(slicer_app, "MedSSLTrainer")
    volume = patient(scene, 1)
    ui.fewShotVolumeSelector.setCurrentNode(volume)
    ui.fewShotSegmentationSelector.setCurrentNode(paintedSegmentation(scene, volume))
    widget.onFineTuneButton()
    assert ui.statusLabel.text.startswith("Fine-tuning: round 1 on this painting, from no initial model")
    runPanel(widget)
    first = widget.panel.job.result
    widget.onFineTuneButton()
    assert ui.statusLabel.text == f"Fine-tuning: round 2 on this painting, from the few-shot model {first} (continues round 1)"
    assert widget.panel.title == "Fine-tuning, round 2"
    runPanel(widget)
    scene.Clear(0)  # File > Close Scene; the next patient's nodes get the same IDs again
    volume = patient(scene, 2)
    ui.fewShotVolumeSelector.setCurrentNode(volume)
    ui.fewShotSegmentationSelector.setCurrentNode(paintedSegmentation(scene, volume))
    widget.onFineTuneButton()
    assert ui.statusLabel.text.startswith("Fine-tuning: round 1 on this painting, from no initial model")
    runPanel(widget)
    assert widget.panel.job.status == "done", widget.panel.job.error
