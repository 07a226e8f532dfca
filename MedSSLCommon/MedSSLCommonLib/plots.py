"""A live loss curve in MRML: a table node (step, loss) drawn by a plot series in a plot chart node.

Qt-free (the widget shows the chart in the layout); works under slicer-core.
"""

from __future__ import annotations

import time

import vtk

import slicer

from .nodes import getScene, uniqueName


class LossCurve:
    """Table + plot series + plot chart holding a training loss against the step.

    ``append(step, loss)`` adds a point and redraws at most every ``redrawInterval`` seconds (a fast job
    can report dozens of steps per second); ``flush()`` redraws now; ``reset(title)`` empties it for the
    next job; ``remove()`` deletes the three nodes (used when a job is cancelled, so that the scene is left
    as it was).
    """

    redrawInterval = 0.5

    def __init__(self, title: str, scene=None):
        scene = getScene(scene)
        self._lastRedraw = 0.0
        self.table = scene.AddNewNodeByClass("vtkMRMLTableNode", uniqueName(scene, f"{title} loss"))
        for name in ("step", "loss"):
            column = vtk.vtkDoubleArray()
            column.SetName(name)
            self.table.AddColumn(column)
        self.series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", uniqueName(scene, f"{title} loss"))
        self.series.SetAndObserveTableNodeID(self.table.GetID())
        self.series.SetXColumnName("step")
        self.series.SetYColumnName("loss")
        self.series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        self.series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        self.series.SetColor(0.1, 0.4, 0.8)
        self.chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", uniqueName(scene, f"{title} loss chart"))
        self.chart.AddAndObservePlotSeriesNodeID(self.series.GetID())
        self.chart.SetTitle(f"{title}: training loss")
        self.chart.SetXAxisTitle("step")
        self.chart.SetYAxisTitle("loss")
        self.chart.SetLegendVisibility(False)

    def reset(self, title: str) -> None:
        """Empty the curve and retitle it, for the next job (one chart per module, not one per job)."""
        self.table.GetTable().SetNumberOfRows(0)
        self.chart.SetTitle(f"{title}: training loss")
        self.flush()

    def inScene(self) -> bool:
        """True while the chart, series and table are all still in a scene (a scene close removes them)."""
        return all(node is not None and node.GetScene() is not None for node in (self.chart, self.series, self.table))

    def append(self, step: float, loss: float) -> None:
        """Add one (step, loss) point; redraw if the last redraw is older than ``redrawInterval``."""
        table = self.table.GetTable()
        row = table.InsertNextBlankRow()
        table.SetValue(row, 0, vtk.vtkVariant(float(step)))
        table.SetValue(row, 1, vtk.vtkVariant(float(loss)))
        if time.monotonic() - self._lastRedraw >= self.redrawInterval:
            self.flush()

    def flush(self) -> None:
        """Redraw the chart with every point so far."""
        self.table.GetTable().Modified()
        self.table.Modified()
        self._lastRedraw = time.monotonic()

    def points(self) -> list[tuple[float, float]]:
        """The (step, loss) points so far."""
        table = self.table.GetTable()
        return [(table.GetValue(r, 0).ToDouble(), table.GetValue(r, 1).ToDouble()) for r in range(table.GetNumberOfRows())]

    def remove(self) -> None:
        """Remove the chart, series and table nodes from the scene."""
        for node in (self.chart, self.series, self.table):
            if node is not None and node.GetScene() is not None:
                node.GetScene().RemoveNode(node)
