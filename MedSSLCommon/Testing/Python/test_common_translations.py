"""Issue 19 item 13: what the panels show goes through Slicer's translation functions (``_()`` /
``translate`` with placeholders, which translation tooling extracts), not f-strings: with a translator that
marks every text it is given, the Cancel text, status and progress lines, device box, environment line,
error dialog and model description all come out marked."""

import sys
import types

import pytest

from slicer_testing_helpers import ENVIRONMENT, addVolume, makeWidget, phantom

MARK = "\u00bb"


@pytest.fixture
def marked(slicer_app, monkeypatch):
    """slicer.i18n whose tr/translate mark the text; the module files imported again to use it."""
    fake = types.ModuleType("slicer.i18n")
    fake.tr = lambda text: MARK + text
    fake.translate = lambda context, text: MARK + text
    monkeypatch.setitem(sys.modules, "slicer.i18n", fake)
    names = ("MedSSLCommonLib.i18n", "MedSSLCommonLib.gui", "MedSSLCommonLib.install", "MedSSLCommonLib.widget",
             "MedSSLSegment", "MedSSLTrainer")
    forget(names)
    from MedSSLCommonLib import backend, gui

    monkeypatch.setattr(gui, "BackgroundCall", lambda function, onDone, intervalMs=200: onDone(function(), None))
    monkeypatch.setattr(backend, "probeEnvironment", lambda *args, **kwargs: dict(ENVIRONMENT, mps=True))
    yield slicer_app
    forget(names)


def forget(names):
    """Drop imported modules so the next import runs them again (also the package's attribute, which
    ``from MedSSLCommonLib import gui`` would otherwise reuse)."""
    import MedSSLCommonLib

    for name in names:
        sys.modules.pop(name, None)
        if name.startswith("MedSSLCommonLib."):
            MedSSLCommonLib.__dict__.pop(name.split(".", 1)[1], None)


def test_panel_texts_are_translated(marked, scene, tmp_path):
    slicer = marked
    from MedSSLCommonLib import gui, jobs

    module, widget, ui = makeWidget(slicer, "MedSSLTrainer")
    texts = [ui.deviceComboBox.itemText(i) for i in range(ui.deviceComboBox.count)]
    assert texts and all(text.startswith(MARK) for text in texts), texts
    assert ui.environmentLabel.text.startswith(MARK) and ui.initComboBox.currentText.startswith(MARK)
    assert gui.deviceWarning(ENVIRONMENT, "cpu").startswith(MARK)
    volume = addVolume(scene, phantom(), name="ct")
    ui.pretrainVolumesSelector.setCheckedNodes([volume])
    ui.pretrainButton.click()
    assert ui.pretrainButton.text == MARK + "Cancel" and ui.pretrainButton.toolTip.startswith(MARK)
    assert ui.statusLabel.text.startswith(MARK)
    widget.panel.showEvent({"event": "progress", "stage": "pretrain", "step": 1, "total": 4, "loss": 0.5, "eta_s": 75})
    assert ui.statusLabel.text == f"{MARK}pretrain: step 1/4{MARK}, loss 0.5{MARK}, about {MARK}1 min 15 s left"
    widget.panel.cancel()
    assert ui.statusLabel.text.startswith(MARK)
    job = jobs.Job([[sys.executable, "-c", "import sys; sys.exit(3)"]], str(tmp_path / "job"))
    (tmp_path / "job").mkdir()
    job.start()
    widget.panel.start(job, ui.pretrainButton, "Pretraining")
    while job.running:
        widget.panel._poll()
    widget.panel._poll()
    assert slicer.util.errorDisplay.call_args[0][0].startswith(MARK)

    segmentModule, _segment, segmentUi = makeWidget(slicer, "MedSSLSegment")
    bundle = tmp_path / "model"
    bundle.mkdir()
    (bundle / "model.json").write_text('{"task": "segment", "classes": {"1": {"name": "liver"}}}', encoding="utf-8")
    segmentUi.modelPathLineEdit.currentPath = str(bundle)
    assert segmentUi.modelInfoLabel.text == MARK + "Segment model: liver (pretraining: ?)."
