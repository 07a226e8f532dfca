"""Issue 19 item 14 (the smaller ones): the findings table in world coordinates under a transform, the table
shown without taking away a layout that has a table view, taskkill without a console window on Windows, and
Reload also reloading the ``*Lib`` packages."""

import subprocess
import sys
from unittest import mock

import numpy as np

from slicer_testing_helpers import addVolume, makeWidget, phantom

FINDING = {"name": "lesion", "label": 2, "score": 0.9, "center_mm": [10.0, 20.0, 30.0], "volume_mm3": 50.0}


def test_findings_table_is_in_world_coordinates_like_the_points(scene):
    import vtk

    from MedSSLCommonLib import nodes

    volume = addVolume(scene, phantom(), name="ct")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 100.0)  # 100 mm to the right
    transform.SetMatrixTransformToParent(matrix)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    table = nodes.tableFromDetections([FINDING], volume, "findings").GetTable()
    row = [table.GetValueByName(0, name).ToDouble() for name in ("R", "A", "S")]
    assert row == [-10.0 + 100.0, -20.0, 30.0]  # LPS -> RAS, then through the transform
    points = nodes.markupsFromDetections([FINDING], volume, "findings")
    world = [0.0, 0.0, 0.0]
    points.GetNthControlPointPositionWorld(0, world)
    assert np.allclose(world, row)


def test_show_table_keeps_a_layout_that_has_a_table_view(slicer_app, scene):
    from MedSSLCommonLib import gui, nodes

    slicer = slicer_app
    table = nodes.tableFromRows([("a", "int")], [[1]], "t", scene=scene)
    layoutManager = slicer.app.layoutManager.return_value
    layoutManager.tableWidget.return_value = mock.MagicMock(visible=True)
    gui.showTable(table)
    assert layoutManager.setLayout.call_count == 0
    layoutManager.tableWidget.return_value = None
    gui.showTable(table)
    layoutManager.setLayout.assert_called_once_with(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpTableView)


def test_taskkill_starts_without_a_console_window(monkeypatch):
    from MedSSLCommonLib import jobs

    runs = []
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(subprocess, "run", lambda *args, **kwargs: runs.append((args, kwargs)))
    process = mock.MagicMock(pid=1234)
    jobs.killProcessTree(process)
    (args, kwargs), = runs
    assert args[0][0] == "taskkill" and kwargs["creationflags"] & 0x08000000


def test_reload_reloads_the_lib_packages_before_the_module(slicer_app, scene, monkeypatch):
    import importlib

    from slicer.ScriptedLoadableModule import reloaded

    _module, widget, _ui = makeWidget(slicer_app, "MedSSLTrainer")
    order = []
    monkeypatch.setattr(importlib, "reload", lambda module: order.append(module.__name__))
    widget.onReload()
    assert {"MedSSLCommonLib.backend", "MedSSLCommonLib.gui", "MedSSLTrainerLib.logic", "MedSSLTrainerLib.rounds"} <= set(order)
    assert order.index("MedSSLCommonLib.backend") < order.index("MedSSLCommonLib.gui") < order.index("MedSSLCommonLib.widget")
    assert order.index("MedSSLTrainerLib.rounds") < order.index("MedSSLTrainerLib.logic")
    assert not any(name.startswith("MedSSLSegmentLib") for name in order) and reloaded == ["MedSSLTrainer"]
