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


def test_fine_tune_is_enabled_from_the_defaults_and_says_why_when_not(slicer_app, scene):
    """Item 2: from the module's defaults (no switching first), a painted volume is enough: the default initial
    model is none, as the few-shot engine needs; a disabled button's tooltip says what is missing."""
    _module, widget, ui = makeWidget(slicer_app, "MedSSLTrainer")
    assert ui.initComboBox.currentData == "none" and ui.initComboBox.currentIndex == 0
    assert ui.initComboBox.currentText == "No initial model (learn from the painting alone)"
    assert not ui.initModelPathLineEdit.visible
    assert not ui.fineTuneButton.enabled and ui.fineTuneButton.toolTip == "Disabled: choose the volume to segment."
    assert ui.suggestButton.toolTip == "Disabled: choose the volume."
    assert ui.pretrainButton.toolTip == "Disabled: check the volumes to pretrain on."
    volume = addVolume(scene, phantom(), name="ct")
    ui.fewShotVolumeSelector.setCurrentNode(volume)
    assert ui.fineTuneButton.toolTip.startswith("Disabled: choose the segmentation painted on it")
    ui.fewShotSegmentationSelector.setCurrentNode(paintedSegmentation(scene, volume))
    assert ui.fineTuneButton.enabled and ui.fineTuneButton.toolTip.startswith("Train on the painted slices")
    ui.initComboBox.setCurrentIndex(ui.initComboBox.findData("bundle"))
    assert not ui.fineTuneButton.enabled
    assert ui.fineTuneButton.toolTip == "Disabled: choose the initial model, or 'No initial model'."
    ui.initComboBox.setCurrentIndex(ui.initComboBox.findData("none"))
    ui.fineTuneButton.click()
    assert ui.fineTuneButton.text == "Cancel"
    runPanel(widget)
    assert widget.panel.job.status == "done", widget.panel.job.error
    assert widget.logic.lastInit == "none"


def test_saved_path_history_survives_opening_the_module_and_the_initial_model_joins_it(slicer_app, scene, tmp_path,
                                                                                      monkeypatch):
    """Item 12: ctkPathLineEdit restores the last path from its settingKey; the parameter node's empty string
    must not wipe it, and a fine-tune from an initial model adds that model to the history."""
    import fake_slicer_gui

    pretrained, other = tmp_path / "pretrained", tmp_path / "other"
    for folder in (pretrained, other):
        folder.mkdir()
        (folder / "model.json").write_text('{"task": "pretrain"}', encoding="utf-8")
    monkeypatch.setattr(fake_slicer_gui, "PATH_HISTORY", {"MedSSL/InitModelPath": [str(pretrained)],
                                                          "MedSSL/ApplyModelPath": [str(pretrained)]})
    _module, widget, ui = makeWidget(slicer_app, "MedSSLTrainer")
    assert ui.initModelPathLineEdit.currentPath == str(pretrained)
    _module, segment, segmentUi = makeWidget(slicer_app, "MedSSLSegment")
    assert segmentUi.modelPathLineEdit.currentPath == str(pretrained)
    volume = addVolume(scene, phantom(), name="ct")
    ui.fewShotVolumeSelector.setCurrentNode(volume)
    ui.fewShotSegmentationSelector.setCurrentNode(paintedSegmentation(scene, volume))
    ui.initComboBox.setCurrentIndex(ui.initComboBox.findData("bundle"))
    ui.initModelPathLineEdit.currentPath = str(other)
    ui.fineTuneButton.click()
    runPanel(widget)
    assert widget.panel.job.status == "done", widget.panel.job.error
    assert widget.logic.lastInit == str(other)
    assert ui.initModelPathLineEdit.history() == [str(other), str(pretrained)]


def test_what_a_clinician_sees_after_a_run(slicer_app, scene, tmp_path):
    """The result: a short name (structure and round), standard terminology where the class has one, shown in
    3D as a closed surface as well as in the slices, the painting hidden (not deleted); a notice in the status
    bar (seen from any module); suggestions named "axial 3", not "slice 3 along axis k"."""
    import vtk

    from MedSSLCommonLib import nodes

    def terminology(segmentation):
        entry = vtk.reference("")
        segmentation.GetSegmentation().GetNthSegment(0).GetTag("TerminologyEntry", entry)
        return str(entry)

    slicer = slicer_app
    _module, widget, ui = makeWidget(slicer, "MedSSLTrainer")
    volume = addVolume(scene, phantom(), matrix=np.diag([0.8, 0.8, 2.5, 1.0]), name="ct")
    labels = np.zeros(phantom().shape, np.uint8)
    labels[2, 2:8, 3:10] = 1
    painting = nodes.segmentationFromLabelmap(labels, nodes.ijkToRasArray(volume), {"1": {"name": "Spleen"}}, volume,
                                              "painted")
    assert "~SCT^78961009^Spleen~" in terminology(painting)
    ui.fewShotVolumeSelector.setCurrentNode(volume)
    ui.fewShotSegmentationSelector.setCurrentNode(painting)
    ui.fineTuneButton.click()
    runPanel(widget)
    assert widget.panel.job.status == "done", widget.panel.job.error
    result = widget.panel.job.segmentationNode
    assert result.GetName() == "Spleen round 1"
    assert terminology(result) == ("Segmentation category and type - 3D Slicer General Anatomy list~SCT^123037004^"
                                   "Anatomical Structure~SCT^78961009^Spleen~^^~Anatomic codes - DICOM master list~^^~^^")
    display = result.GetDisplayNode()
    assert display.GetVisibility() and display.GetVisibility3D()
    assert display.GetPreferredDisplayRepresentationName3D() == "Closed surface"
    assert not painting.GetDisplayNode().GetVisibility() and scene.GetNodeByID(painting.GetID()) is painting
    message = slicer.util.showStatusMessage.call_args[0][0]
    assert message.startswith("Fine-tuning, round 1: done in")
    model = tmp_path / "model"
    model.mkdir()
    ui.modelPathLineEdit.currentPath = str(model)
    ui.suggestButton.click()
    runPanel(widget)
    texts = ui.suggestionsListWidget.itemTexts()
    assert texts and all(text.startswith("axial ") for text in texts), texts


def test_oblique_volumes_name_their_slices_by_index():
    from MedSSLTrainerLib.annotation import sliceName
    from slicer_testing_helpers import importSlicer, obliqueMatrix

    importSlicer()
    import slicer

    scene = slicer.vtkMRMLScene()
    oblique = addVolume(scene, phantom(), matrix=obliqueMatrix(angles=(0.6, 0.5, 0.4)), name="oblique")
    assert sliceName(oblique, 2, 7) == "oblique slice k=7"
    sagittalFirst = addVolume(scene, phantom(), matrix=np.array([[0, 0, 1.0, 0], [1.0, 0, 0, 0], [0, 1.0, 0, 0],
                                                                 [0, 0, 0, 1]]), name="permuted")
    assert [sliceName(sagittalFirst, axis, 4) for axis in (0, 1, 2)] == ["coronal 4", "axial 4", "sagittal 4"]
