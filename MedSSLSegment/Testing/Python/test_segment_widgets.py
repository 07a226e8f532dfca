"""The MedSSLSegment widget outside Slicer (the ``slicer_app`` fixture: strict doubles of Qt, CTK and the
scripted-module classes, real MRML, the stand-in backend; see test_common_widgets.py): the model info line,
applying a detector and capping its findings, and the parameter node kept across exit and enter."""

from fake_slicer_gui import leaveModule, showModule
from slicer_testing_helpers import addVolume, makeWidget, phantom, runPanel


def test_segment_widget_applies_a_detector(slicer_app, scene, tmp_path):
    slicer = slicer_app
    module, widget, ui = makeWidget(slicer, "MedSSLSegment")
    bundle = tmp_path / "detector"
    bundle.mkdir()
    (bundle / "model.json").write_text('{"task": "segment", "detection": true, "method": {"name": "genesis"}, '
                                       '"classes": {"1": {"name": "tissue"}, "2": {"name": "lesion"}}}', encoding="utf-8")
    volume = addVolume(scene, phantom(), name="ct")
    widget.logic.minVolumeMm3 = 0.0  # the phantom's lesion is 13 mm^3
    ui.inputVolumeSelector.setCurrentNode(volume)
    ui.modelPathLineEdit.currentPath = str(bundle)
    assert "Detect model: tissue, lesion" in ui.modelInfoLabel.text and ui.applyButton.enabled
    widget.onApplyButton()
    runPanel(widget)
    assert widget.panel.job.status == "done", widget.panel.job.error
    assert widget.panel.job.result.GetNumberOfControlPoints() == 2
    ui.modelPathLineEdit.currentPath = str(tmp_path)
    assert "not a MedSSL model folder" in ui.modelInfoLabel.text and not ui.applyButton.enabled
    ui.modelPathLineEdit.currentPath = str(bundle / "model.json")
    assert "Choose a model folder" in ui.modelInfoLabel.text and not ui.applyButton.enabled
    widget.cleanup()


def test_segment_widget_keeps_its_parameter_node_across_exit(slicer_app, scene):
    """As the template: exit() stops the GUI <-> parameter node syncing but keeps the node."""
    _module, widget, ui = makeWidget(slicer_app, "MedSSLSegment")
    node = widget._parameterNode
    assert node.connectedGuiCount() == 1
    leaveModule(widget)
    assert widget._parameterNode is node and node.connectedGuiCount() == 0
    showModule(widget)  # enter() wraps the same scripted module node again and connects that
    assert widget._parameterNode.parameterNode.GetID() == node.parameterNode.GetID()
    assert widget._parameterNode.connectedGuiCount() == 1 and node.connectedGuiCount() == 0


def test_segment_widget_caps_the_findings(slicer_app, scene, tmp_path, monkeypatch):
    """Issue 11 item 12 in the module: the "Findings shown" setting (at least 1) caps the points."""
    monkeypatch.setenv("FAKE_MEDSSL_FINDINGS", "100")
    _module, widget, ui = makeWidget(slicer_app, "MedSSLSegment")
    assert ui.maxFindingsSpinBox.minimum == 1 and ui.maxFindingsSpinBox.value == 10
    bundle = tmp_path / "detector"
    bundle.mkdir()
    (bundle / "model.json").write_text('{"task": "segment", "detection": true, "classes": {"1": {"name": "tissue"}, '
                                       '"2": {"name": "lesion"}}}', encoding="utf-8")
    ui.inputVolumeSelector.setCurrentNode(addVolume(scene, phantom(), name="ct"))
    ui.modelPathLineEdit.currentPath = str(bundle)
    ui.maxFindingsSpinBox.value = 4
    ui.allFindingsCheckBox.checked = True
    assert widget._parameterNode.maxFindings == 4 and widget._parameterNode.allFindings is True
    widget.onApplyButton()
    runPanel(widget)
    assert widget.panel.job.status == "done", widget.panel.job.error
    assert widget.panel.job.result.GetNumberOfControlPoints() == 4
    assert widget.logic.lastOutputs["table"].GetNumberOfRows() == 102
    assert ui.statusLabel.text == "4 findings shown (best score first) of 102 found."


def test_segment_widget_segments_several_volumes_and_a_folder(slicer_app, scene, tmp_path):
    """Several scans: disabled with a reason until a segmentation model and volumes (or a folder) are chosen;
    checked volumes get a segmentation each; a folder of scans gets label maps and a summary on disk."""
    from MedSSLCommonLib import nodes

    _module, widget, ui = makeWidget(slicer_app, "MedSSLSegment")
    bundle = tmp_path / "model"
    bundle.mkdir()
    (bundle / "model.json").write_text('{"task": "segment", "classes": {"1": {"name": "tissue"}, '
                                       '"2": {"name": "lesion"}}}', encoding="utf-8")
    first, second = addVolume(scene, phantom(), name="ct1"), addVolume(scene, phantom(), name="ct2")
    ui.modelPathLineEdit.currentPath = ""  # (the path history may hold another test's model)
    assert not ui.applyManyButton.enabled and "segmentation model" in ui.applyManyButton.toolTip
    ui.modelPathLineEdit.currentPath = str(bundle)
    assert not ui.applyManyButton.enabled and "check the volumes" in ui.applyManyButton.toolTip
    ui.manyVolumesSelector.setCheckedNodes([first, second])
    assert ui.applyManyButton.enabled
    widget.onApplyManyButton()
    runPanel(widget)
    assert widget.panel.job.status == "done", widget.panel.job.error
    assert [n.GetName() for n in widget.panel.job.result] == ["ct1 model", "ct2 model"]
    assert ui.statusLabel.text == "2 segmentation(s) made."
    folder = tmp_path / "scans"
    nodes.writeVolume(first, str(folder / "a.nrrd"))
    ui.scansFolderPathLineEdit.currentPath = str(folder)
    ui.manyOutputPathLineEdit.currentPath = str(tmp_path / "out")
    widget.onApplyManyButton()
    runPanel(widget)
    assert widget.panel.job.status == "done", widget.panel.job.error
    assert (tmp_path / "out" / "a.nii.gz").is_file() and "summary" in ui.statusLabel.text
    widget.cleanup()
