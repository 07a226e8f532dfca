"""The "MedSSL fill" Segment Editor effect: the few-shot engine as a live auto-complete effect.

Built like Slicer's own "Fill between slices" (an ``AbstractScriptedSegmentEditorAutoCompleteEffect``):
the base class owns the Initialize/Update, Auto-update, Cancel and Apply controls, the preview
segmentation node, the observation of the segments (an auto-update shortly after each paint stroke) and
Apply (the preview written into the segments through the editor, so its masking settings - editable area,
intensity range, overwriting of other segments - apply). This class only computes the preview: the first
Initialize starts a live session (``python -m MedSSL session``, a child process: torch never runs in
Slicer's process) on the source volume; each update sends the slices painted since and pastes the
changed box the session answers (:class:`MedSSLCommonLib.fill.MedSSLFillLogic`). Selecting the effect
already launches the session (the image is read while the user paints); Cancel, Apply, closing the scene,
leaving the effect before Initialize and unloading the effect end it.

Registered by the MedSSLCommon module at Slicer's start-up (``registerSegmentEditorEffect`` there).
"""

import os

import qt
import slicer
from SegmentEditorEffects import AbstractScriptedSegmentEditorAutoCompleteEffect

from MedSSLCommonLib.fill import MedSSLFillLogic
from MedSSLCommonLib.i18n import tr as _

EFFECT_NAME = "MedSSL fill"  # not translated: modules find effects by name


class SegmentEditorMedSSLFillEffect(AbstractScriptedSegmentEditorAutoCompleteEffect):
    """Few-shot completion of a structure painted on a few slices, updated live while painting."""

    def __init__(self, scriptedEffect):
        AbstractScriptedSegmentEditorAutoCompleteEffect.__init__(self, scriptedEffect)
        scriptedEffect.name = EFFECT_NAME
        scriptedEffect.title = _("MedSSL fill")
        self.logic = MedSSLFillLogic()
        self.statusLabel = None
        self._sceneObserver = slicer.mrmlScene.AddObserver(slicer.mrmlScene.StartCloseEvent, self.onSceneClose)

    def clone(self):
        import qSlicerSegmentationsEditorEffectsPythonQt as effects

        clonedEffect = effects.qSlicerSegmentEditorScriptedEffect(None)
        clonedEffect.setPythonSource(__file__.replace("\\", "/"))
        return clonedEffect

    def icon(self):
        here = os.path.dirname(os.path.abspath(__file__))
        for folder in (os.path.join(here, "..", "Resources", "Icons"),  # installed: one qt-scripted-modules folder
                       os.path.join(here, "..", "..", "MedSSLTrainer", "Resources", "Icons")):  # source tree
            path = os.path.join(folder, "MedSSLTrainer.png")
            if os.path.isfile(path):
                return qt.QIcon(path)
        return qt.QIcon()

    def helpText(self):
        return "<html>" + _(
            "Complete a structure painted on a few slices, with the MedSSL few-shot engine.<br>"
            "<p><ul>"
            "<li>Paint each structure (one segment each) completely on a few slices of one view (axial, "
            "coronal or sagittal), with any effect; leave the slices between them empty.</li>"
            "<li>Press <b>Initialize</b>: a MedSSL session starts on the source volume (the first result "
            "takes seconds to tens of seconds).</li>"
            "<li>Correct a slice the preview got wrong, or paint one more: with <b>Auto-update</b> the preview "
            "follows each stroke within about a second; only the slices between the corrected slice's painted "
            "neighbours change.</li>"
            "<li><b>Apply</b> writes the preview into the segments (the masking settings apply); "
            "<b>Cancel</b> discards it. Both end the session.</li>"
            "</ul><p>All visible segments take part. The session runs in a separate process (torch never runs "
            "in Slicer); it keeps no copy of the image on disk.") + "</html>"

    def setupOptionsFrame(self):
        AbstractScriptedSegmentEditorAutoCompleteEffect.setupOptionsFrame(self)
        self.statusLabel = qt.QLabel(_("Paint a few slices of each visible segment, then Initialize."))
        self.statusLabel.wordWrap = True
        self.scriptedEffect.addOptionsWidget(self.statusLabel)

    def activate(self):
        """Selecting the effect launches the session, so that the image is read (and torch imported, in the
        session's process) while the user paints; Initialize then only waits for what is left."""
        if not self.logic.running and self.scriptedEffect.sourceVolumeImageData() is not None:
            try:
                self.logic.launch(self.scriptedEffect.sourceVolumeImageData())
            except (OSError, ValueError, RuntimeError) as exc:  # Initialize tries again and shows the reason
                self.statusLabel.text = str(exc)

    def deactivate(self):
        """Leaving the effect before Initialize ends the launched session (a preview keeps it running)."""
        if self.getPreviewNode() is None:
            self.logic.close()

    def computePreviewLabelmap(self, mergedImage, outputLabelmap):
        if not self.logic.running:
            self.statusLabel.text = _("Starting the MedSSL session (reading the image)...")
            slicer.app.processEvents()
            self.logic.launch(self.scriptedEffect.sourceVolumeImageData())
        result = self.logic.update(mergedImage)
        self.logic.fillLabelmap(outputLabelmap, result)
        self.statusLabel.text = self.logic.describe()

    def onCancel(self):
        self.logic.close()
        AbstractScriptedSegmentEditorAutoCompleteEffect.onCancel(self)
        self.statusLabel.text = _("Session closed.")

    def onApply(self):
        AbstractScriptedSegmentEditorAutoCompleteEffect.onApply(self)
        self.logic.close()
        self.statusLabel.text = _("Applied; session closed.")

    def onSceneClose(self, caller=None, event=None):
        self.logic.close()

    def cleanup(self):
        self.logic.close()
        if self._sceneObserver is not None:
            slicer.mrmlScene.RemoveObserver(self._sceneObserver)
            self._sceneObserver = None
        AbstractScriptedSegmentEditorAutoCompleteEffect.cleanup(self)
