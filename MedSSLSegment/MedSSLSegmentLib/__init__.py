"""Slicer-side code shared by the MedSSL modules (Qt-free unless noted).

Layout: the shared code lives once, here, in the MedSSLSegment module's ``*Lib`` package:

* :mod:`.geometry` - IJK->RAS matrix <-> ITK (LPS) origin/spacing/direction (numpy only);
* :mod:`.nodes` - MRML nodes <-> NRRD files, labelmaps, findings, tables (needs ``slicer`` MRML only);
* :mod:`.jobs` - child processes with JSON-lines progress, cancel of the whole process tree (pure Python);
* :mod:`.backend` - where the ``MedSSL`` backend is, which Python runs it, probes (pure Python);
* :mod:`.runner` - base class of both logic classes; :mod:`.plots` - live loss chart nodes;
* :mod:`.logic` - ``MedSSLSegmentLogic``; :mod:`.install` and :mod:`.gui` - need the Slicer application
  (dependency installation dialogs, Qt job panel) and are only imported by the module widgets.

MedSSLTrainer declares MedSSLSegment as a module dependency and imports ``MedSSLSegmentLib``. This works
because Slicer puts scripted module folders on ``sys.path``: installed extensions have every module file
and ``*Lib`` package in one ``qt-scripted-modules`` folder, and in a source checkout both module folders
are added as module paths. The tests' ``conftest.py`` puts both folders on ``sys.path`` the same way.
"""
