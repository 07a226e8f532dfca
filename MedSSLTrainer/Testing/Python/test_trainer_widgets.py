"""The MedSSLTrainer widget driven as a user would, outside Slicer, with the root conftest's ``slicer_app``
doubles (see test_common_widgets.py): fine-tune, suggest, cancel, the Ark datasets picker, budgets, results
of jobs that end while another module is shown, and the one loss chart."""

import pytest

from fake_slicer_gui import leaveModule, showModule
from slicer_testing_helpers import addVolume, makeWidget, paintedSegmentation, phantom, runPanel


def test_trainer_widget_fine_tune_and_suggest(slicer_app, scene, tmp_path):
    slicer = slicer_app
    module, widget, ui = makeWidget(slicer, "MedSSLTrainer")
    assert ui.methodComboBox.currentData == "genesis" and ui.methodComboBox.count >= 2  # from methods --json
    assert ui.deviceComboBox.currentData == "auto" and not ui.installButton.visible
    assert ui.deviceComboBox.itemText(0) == "auto (NVIDIA RTX A4000, 15.7 GB)" and ui.deviceWarningLabel.text == ""
    ui.deviceComboBox.setCurrentIndex(ui.deviceComboBox.findData("cpu"))
    assert "CPU" in ui.deviceWarningLabel.text
    volume = addVolume(scene, phantom(), name="ct")
    segmentation = paintedSegmentation(scene, volume)
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
                                              "cases": [{"image": str(tmp_path / "ct.nrrd"), "label": str(tmp_path / "liver.nrrd")}]}]}),
                    encoding="utf-8")
    ui.datasetsSpecPathLineEdit.currentPath = str(spec)
    assert ui.pretrainButton.enabled
    widget.onPretrainButton()
    runPanel(widget)
    assert widget.panel.job.status == "done", widget.panel.job.error
    meta = json.loads((tmp_path / "work").joinpath(widget.panel.job.result, "model.json").read_text(encoding="utf-8"))
    assert meta["method"] == {"name": "ark"} and meta["datasets_seen"][0]["cases"][0]["label_values"] == [0, 1]
    ui.methodComboBox.setCurrentIndex(ui.methodComboBox.findData("genesis"))
    assert ui.pretrainVolumesSelector.visible and not ui.datasetsSpecPathLineEdit.visible


def test_trainer_budgets_cannot_be_negative(slicer_app, scene):
    """Issue 11 item 4: steps and time limits have a minimum of 0 once the parameter node is connected, so
    the "no limit" text shows at 0 and a negative value cannot be entered."""
    _module, widget, ui = makeWidget(slicer_app, "MedSSLTrainer")
    for box in (ui.pretrainStepsSpinBox, ui.pretrainMinutesSpinBox, ui.finetuneStepsSpinBox, ui.finetuneMinutesSpinBox):
        assert box.minimum == 0, box.objectName
        box.value = -5
        assert box.value == 0 and box.shownText() == "no limit"
    assert widget._parameterNode.pretrainMinutes == 0 and widget._parameterNode.finetuneSteps == 0


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


def test_trainer_widget_cohort_add_segment_next_and_correct(slicer_app, scene, tmp_path):
    """The cohort buttons from the module's defaults: disabled with a reason until a volume and its painting are
    chosen; Add makes the cohort model (network engine) from the painted scan; Segment the next scan and Correct
    the draft make segmentation nodes; a second Add refreshes the model from the first on both scans, with the
    folder of unlabelled scans given (self-training)."""
    import json

    slicer = slicer_app
    module, widget, ui = makeWidget(slicer, "MedSSLTrainer")
    assert not ui.addToCohortButton.enabled and "volume" in ui.addToCohortButton.toolTip
    assert ui.cohortStatusLabel.text.startswith("The cohort has no scan yet")
    volume = addVolume(scene, phantom(), name="ct")
    ui.fewShotVolumeSelector.setCurrentNode(volume)
    assert not ui.segmentNextButton.enabled and "add a painted scan" in ui.segmentNextButton.toolTip
    ui.fewShotSegmentationSelector.setCurrentNode(paintedSegmentation(scene, volume))
    assert ui.addToCohortButton.enabled
    widget.onAddToCohortButton()
    runPanel(widget)
    assert widget.panel.job.status == "done", widget.panel.job.error
    first = widget.panel.job.result
    meta = json.loads(open(f"{first}/model.json", encoding="utf-8").read())
    assert meta["engine"] == "network" and meta["images"] == 1 and meta["init"] == "none"  # the default choice
    assert "1 scan(s) of tissue; model 1" in ui.cohortStatusLabel.text
    assert ui.segmentNextButton.enabled and ui.correctDraftButton.enabled
    widget.onSegmentNextButton()
    runPanel(widget)
    assert widget.panel.job.status == "done" and widget.panel.job.result.GetName() == "ct draft"
    widget.onCorrectDraftButton()
    runPanel(widget)
    assert widget.panel.job.status == "done" and widget.panel.job.result.GetName() == "ct corrected"
    ui.cohortCompleteCheckBox.checked = True
    ui.fewShotSegmentationSelector.setCurrentNode(widget.panel.job.result)
    ui.cohortUnlabeledPathLineEdit.currentPath = str(tmp_path)  # a folder of unlabelled scans: self-training
    widget.onAddToCohortButton()
    runPanel(widget)
    second = json.loads(open(f"{widget.panel.job.result}/model.json", encoding="utf-8").read())
    assert second["images"] == 2 and second["init"] == first and second["unlabeled"] == 1
    assert meta["unlabeled"] == 0
    assert "2 scan(s)" in ui.cohortStatusLabel.text
    widget.exit()
    widget.cleanup()
