"""Slicer-side code shared by the MedSSL modules (Qt-free unless noted).

Layout: the shared code lives once, here, in the hidden MedSSLCommon module's ``*Lib`` package; each
visible module keeps only its own logic (``MedSSLSegmentLib``, ``MedSSLTrainerLib``) and widget:

* :mod:`.geometry` - IJK->RAS matrix <-> ITK (LPS) origin/spacing/direction (numpy only);
* :mod:`.nodes` - MRML nodes <-> NRRD files, labelmaps, findings, tables (needs ``slicer`` MRML only);
* :mod:`.jobs` - child processes with JSON-lines progress, cancel of the whole process tree (pure Python);
* :mod:`.backend` - where the ``MedSSL`` backend is, which Python runs it, probes (pure Python);
* :mod:`.runner` - base class of both logic classes; :mod:`.plots` - live loss chart nodes;
* :mod:`.i18n` - Slicer's ``tr``/``translate`` with stand-ins for Slicer < 5.4;
* :mod:`.install`, :mod:`.gui` and :mod:`.widget` - need the Slicer application (dependency installation
  dialogs, Qt job panel, ``MedSSLWidgetBase``: the module widgets' shared lifecycle) and are only imported
  by the module widgets.

MedSSLSegment and MedSSLTrainer declare MedSSLCommon as a module dependency and import ``MedSSLCommonLib``.
This works because Slicer puts scripted module folders on ``sys.path``: installed extensions have every
module file and ``*Lib`` package in one ``qt-scripted-modules`` folder, and in a source checkout every
module folder is added as a module path. The tests' root ``conftest.py`` puts the three folders on
``sys.path`` the same way.
"""
