"""The "MedSSL fill" effect's Qt part (MedSSLCommonLib/SegmentEditorMedSSLFillEffect.py) with the strict doubles
of fake_slicer_gui.py (the scripted-effect adaptor, the auto-complete base class, the widgets), real MRML and
the real backend: Initialize starts the session and fills the preview, Cancel and Apply end it, a scene
close ends it, and the effect registers under its name."""

import importlib
import os
import sys
from unittest import mock

import numpy as np
import pytest

import fake_slicer_gui
from slicer_testing_helpers import paintedPhantomScene


@pytest.fixture
def effect_module(scene, real_backend, monkeypatch):
    """SegmentEditorMedSSLFillEffect imported with qt, slicer.app and SegmentEditorEffects faked."""
    import slicer

    qt = mock.MagicMock(name="qt")
    qt.QLabel = lambda text="": _label(text)
    monkeypatch.setitem(sys.modules, "qt", qt)
    monkeypatch.setitem(sys.modules, "SegmentEditorEffects", fake_slicer_gui.segmentEditorEffectsModule())
    monkeypatch.setattr(slicer, "app", mock.MagicMock(name="slicer.app"), raising=False)
    sys.modules.pop("MedSSLCommonLib.SegmentEditorMedSSLFillEffect", None)
    module = importlib.import_module("MedSSLCommonLib.SegmentEditorMedSSLFillEffect")
    yield module
    sys.modules.pop("MedSSLCommonLib.SegmentEditorMedSSLFillEffect", None)


def _label(text):
    label = fake_slicer_gui.FakeLabel("statusLabel")
    label.text = text
    return label


def make_effect(module, scene):
    import slicer

    volume, segmentation, truth, _ = paintedPhantomScene(scene)
    editorNode = slicer.vtkMRMLSegmentEditorNode()  # the editor's parameter set node (not registered in the scene)
    scene.AddNode(editorNode)
    editorNode.SetAndObserveSegmentationNode(segmentation)
    source = slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(volume)
    scripted = fake_slicer_gui.FakeScriptedEffect(source, editorNode)
    effect = module.SegmentEditorMedSSLFillEffect(scripted)
    effect.logic.device = "cpu"
    effect.setupOptionsFrame()
    return effect, scripted, truth


def preview_array(effect):
    from MedSSLCommonLib.fill import imageArray

    return imageArray(effect.previewLabelmap)


def test_initialize_previews_then_cancel_and_apply_end_the_session(effect_module, scene):
    effect, scripted, truth = make_effect(effect_module, scene)
    assert scripted.name == "MedSSL fill" and scripted.title == "MedSSL fill" and not scripted.perSegment
    assert scripted.options[-1] is effect.statusLabel and "Initialize" in effect.statusLabel.text
    assert "Apply" in effect.helpText() and "Cancel" in effect.helpText()

    effect.previewButton.click()  # Initialize: the session starts, the preview is the whole structure
    assert effect.logic.running and effect.previewButton.text == "Update"
    preview = preview_array(effect)
    assert preview.shape == truth.shape
    assert 2.0 * ((preview > 0) & (truth > 0)).sum() / ((preview > 0).sum() + truth.sum()) > 0.85
    assert effect.statusLabel.text.startswith("last update: full")
    effect.cancelButton.click()
    assert not effect.logic.running and effect.previewLabelmap is None and effect.applied == []

    effect.previewButton.click()  # Initialize again, then Apply
    assert effect.logic.running
    effect.applyButton.click()
    assert not effect.logic.running and len(effect.applied) == 1
    assert effect.applied[0] is not None  # the preview went to the segments
    effect.cleanup()


def test_selecting_the_effect_launches_the_session_and_leaving_it_before_initialize_ends_it(effect_module, scene,
                                                                                           work_dir):
    effect, _, _ = make_effect(effect_module, scene)
    effect.activate()  # selected: the session starts reading the image while the user paints
    assert effect.logic.running and effect.logic.jobDir is not None
    effect.logic.waitReady()
    assert effect.logic.jobDir is None and not os.listdir(work_dir / "jobs")  # the image copy is gone
    effect.deactivate()  # left before Initialize: nothing to keep
    assert not effect.logic.running
    effect.activate()
    effect.previewButton.click()  # Initialize uses the launched session
    session = effect.logic.client
    effect.deactivate()  # left with a preview: the session stays for Update / Apply
    assert effect.logic.running and effect.logic.client is session
    effect.onCancel()
    effect.cleanup()


def test_closing_the_scene_ends_the_session(effect_module, scene):
    import slicer

    effect, _, _ = make_effect(effect_module, scene)
    effect.previewButton.click()
    assert effect.logic.running
    slicer.mrmlScene.InvokeEvent(slicer.mrmlScene.StartCloseEvent)
    assert not effect.logic.running
    effect.cleanup()
    assert effect._sceneObserver is None


def test_the_module_registers_the_effect_at_startup(monkeypatch):
    """MedSSLCommon connects startupCompleted() to the registration, which gives Slicer's scripted-effect
    adaptor the effect's source file."""
    import os

    import slicer

    source = open(os.path.join(os.path.dirname(__file__), "..", "..", "MedSSLCommon.py"), encoding="utf-8").read()
    assert 'slicer.app.connect("startupCompleted()", registerSegmentEditorEffect)' in source
    adaptor = mock.MagicMock(name="qSlicerSegmentEditorScriptedEffect")
    effects = mock.MagicMock(qSlicerSegmentEditorScriptedEffect=adaptor)
    monkeypatch.setitem(sys.modules, "qSlicerSegmentationsEditorEffectsPythonQt", effects)
    monkeypatch.setattr(slicer, "app", mock.MagicMock(name="slicer.app"), raising=False)
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", fake_slicer_gui.scriptedLoadableModule(None))
    sys.modules.pop("MedSSLCommon", None)
    module = importlib.import_module("MedSSLCommon")
    try:
        module.registerSegmentEditorEffect()
        path = adaptor.return_value.setPythonSource.call_args[0][0]
        assert path.endswith("MedSSLCommonLib/SegmentEditorMedSSLFillEffect.py") and os.path.isfile(path)
        adaptor.return_value.self.return_value.register.assert_called_once_with()
    finally:
        sys.modules.pop("MedSSLCommon", None)
