"""MedSSL Common: the hidden module that carries the Slicer-side library shared by MedSSL Segment and MedSSL
Trainer (``MedSSLCommonLib``: job runner, backend discovery, node<->file conversion, geometry, dependency
installation, Qt job panel, loss chart, and ``MedSSLWidgetBase``, the widgets' shared lifecycle), and registers
the "MedSSL fill" Segment Editor effect at start-up.

It has no widget and does not show in the module list (``parent.hidden``); the two modules list it in their
``dependencies``, so Slicer loads it first, and import ``MedSSLCommonLib`` from the scripted modules folder
(one ``qt-scripted-modules`` folder in an installed extension, one module path per module folder in a
source checkout). torch is never imported in Slicer's process.
"""

import os

import slicer
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleTest

from MedSSLCommonLib import backend, install
from MedSSLCommonLib.i18n import tr as _

__all__ = ["MedSSLCommon", "MedSSLCommonTest"]


class MedSSLCommon(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MedSSL Common")
        self.parent.categories = ["Developer Tools"]
        self.parent.dependencies = []
        self.parent.hidden = True  # a library for MedSSLSegment and MedSSLTrainer, not a module of its own
        self.parent.contributors = ["MedSSL contributors (MedSSL project)"]  # as EXTENSION_CONTRIBUTORS
        self.parent.helpText = _("Shared code of the MedSSL Segment and MedSSL Trainer modules (no user interface).")
        self.parent.acknowledgementText = _(
            "MedSSL builds on Models Genesis (Zhou et al., MICCAI 2019 / MedIA 2021), MONAI and PyTorch.")
        slicer.app.connect("startupCompleted()", registerSegmentEditorEffect)


EFFECT_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "MedSSLCommonLib",
                             "SegmentEditorMedSSLFillEffect.py")


def registerSegmentEditorEffect():
    """Register the "MedSSL fill" Segment Editor effect (MedSSLCommonLib/SegmentEditorMedSSLFillEffect.py), as
    Slicer registers its own scripted effects: a C++ scripted-effect adaptor given the Python source."""
    import qSlicerSegmentationsEditorEffectsPythonQt as effects

    instance = effects.qSlicerSegmentEditorScriptedEffect(None)
    instance.setPythonSource(EFFECT_SOURCE.replace("\\", "/"))
    instance.self().register()


class MedSSLCommonTest(ScriptedLoadableModuleTest):
    """Runs in Slicer (ctest, or ``slicer.selfTests["MedSSLCommon"]()``): the shared library is packaged where
    the modules look for it - the backend package next to the modules, the pip requirements in Resources -
    and the library does not import torch into Slicer's process."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_LibraryIsPackaged()
        self.test_FillEffectIsRegistered()

    def test_LibraryIsPackaged(self):
        self.delayDisplay("Backend package and requirements are found; torch stays out of Slicer's process")
        root = backend.backendRoot()
        self.assertIsNotNone(root)
        self.assertTrue(os.path.isfile(os.path.join(root, backend.PACKAGE, "__main__.py")))
        self.assertTrue(any(r.lower().startswith("monai") for r in install.requirements()))
        self.assertNotIn("torch", vars(backend))  # checked in a child process, never imported here
        self.delayDisplay("Test passed")

    def test_FillEffectIsRegistered(self):
        self.delayDisplay("The MedSSL fill effect is in the Segment Editor")
        factory = slicer.qSlicerSegmentEditorEffectFactory.instance()
        self.assertIn("MedSSL fill", [effect.name for effect in factory.registeredEffects()])
        self.delayDisplay("Test passed")

