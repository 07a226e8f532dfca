"""Results -> nodes: segmentation names/colors/order/geometry, findings as RAS control points, tables,
subject-hierarchy placement, and no leftover temporary nodes."""

import numpy as np
import pytest

from slicer_testing_helpers import addVolume, phantom

CLASSES = {"1": {"name": "spleen", "color": [1.0, 0.0, 0.0]}, "2": {"name": "liver", "color": [0, 0, 255]},
           "3": {"name": "kidney"}}


def nodeClasses(scene):
    return sorted(scene.GetNthNode(i).GetClassName() for i in range(scene.GetNumberOfNodes()))


def test_segmentation_from_labelmap(scene):
    from MedSSLCommonLib import nodes

    volume = addVolume(scene, phantom(), name="ct")
    labels = np.zeros(phantom().shape, np.uint8)
    labels[1:3, 2:5, 3:6] = 2
    labels[4, 6:8, 7:9] = 1
    labels[0, 0, 0] = 7  # a value the bundle does not name
    before = set(nodeClasses(scene))
    segmentation = nodes.segmentationFromLabelmap(labels, nodes.ijkToRasArray(volume), CLASSES, volume, "ct pred")
    names = [segmentation.GetSegmentation().GetNthSegment(i).GetName() for i in range(4)]
    assert names == ["spleen", "liver", "kidney", "class 7"]
    segment = segmentation.GetSegmentation().GetNthSegment
    assert segment(0).GetColor() == (1.0, 0.0, 0.0) and segment(1).GetColor() == (0.0, 0.0, 1.0)
    back, info = nodes.segmentsLabelmap(segmentation, volume)
    assert [s["name"] for s in info] == names
    expected = np.choose(labels, [0, 1, 2, 0, 0, 0, 0, 4]).astype(np.uint8)  # value -> segment position + 1
    assert np.array_equal(back, expected)  # kidney (3) is an empty segment
    referenceGeometry = segmentation.GetNodeReference(segmentation.GetReferenceImageGeometryReferenceRole())
    assert referenceGeometry is volume
    assert set(nodeClasses(scene)) - before <= {"vtkMRMLSegmentationNode", "vtkMRMLSegmentationDisplayNode",
                                                 "vtkMRMLSubjectHierarchyNode"}


def test_a_prediction_that_found_nothing_gives_empty_named_segments(scene):
    """A model that finds nothing in a scan (all background) still gives a node with the bundle's segments,
    empty (this needs the representation converters Slicer registers at start-up: the test helpers register
    them in slicer-core as Slicer does)."""
    from MedSSLCommonLib import nodes

    volume = addVolume(scene, phantom(), name="ct")
    empty = nodes.segmentationFromLabelmap(np.zeros(phantom().shape, np.uint8), nodes.ijkToRasArray(volume), CLASSES,
                                           volume, "nothing")
    segmentation = empty.GetSegmentation()
    assert [segmentation.GetNthSegment(i).GetName() for i in range(segmentation.GetNumberOfSegments())] == \
        ["spleen", "liver", "kidney"]
    assert not np.any(nodes.segmentsLabelmap(empty, volume)[0])


def test_outputs_go_to_the_volume_study_and_transform(scene):
    import slicer
    from MedSSLCommonLib import nodes

    volume = addVolume(scene, phantom(), name="ct")
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    volume.SetAndObserveTransformNodeID(transform.GetID())
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "patient"), "study")
    sh.CreateItem(study, volume)
    table = nodes.tableFromRows([("a", "string")], [["x"]], "t", volume)
    assert sh.GetItemParent(sh.GetItemByDataNode(table)) == study
    markups = nodes.markupsFromDetections([], volume, "points")
    assert sh.GetItemParent(sh.GetItemByDataNode(markups)) == study
    assert markups.GetTransformNodeID() == transform.GetID()


def test_markups_and_table_from_detections(scene):
    from MedSSLCommonLib import nodes

    volume = addVolume(scene, phantom(), name="ct")
    findings = [{"label": 2, "name": "nodule", "center_mm": [10.0, -20.0, 30.5], "score": 0.93, "volume_mm3": 12.5},
                {"label": 1, "name": "cyst", "center_mm": [-1.5, 2.25, -3.0], "score": 0.41, "volume_mm3": 3.0}]
    markups = nodes.markupsFromDetections(findings, volume, "ct findings")
    assert markups.GetNumberOfControlPoints() == 2
    position = [0.0, 0.0, 0.0]
    markups.GetNthControlPointPosition(0, position)
    assert position == [-10.0, 20.0, 30.5]  # LPS -> RAS
    assert markups.GetNthControlPointLabel(0) == "nodule 0.93" and markups.GetNthControlPointLabel(1) == "cyst 0.41"
    assert "score 0.930" in markups.GetNthControlPointDescription(0)
    table = nodes.tableFromDetections(findings, volume, "ct findings table")
    assert table.GetNumberOfRows() == 2
    columns = [table.GetColumnName(c) for c in range(table.GetNumberOfColumns())]
    assert columns == ["name", "label", "score", "R", "A", "S", "volume_mm3", "shown"]
    assert table.GetCellText(0, 0) == "nodule" and float(table.GetCellText(1, 3)) == 1.5


def test_classification_table(scene):
    from MedSSLCommonLib import nodes

    volume = addVolume(scene, phantom(), name="ct")
    table = nodes.tableFromClassification({"probabilities": {"normal": 0.2, "abnormal": 0.8}, "label": 1,
                                           "name": "abnormal"}, volume, "ct class")
    assert [table.GetCellText(r, 0) for r in range(2)] == ["abnormal", "normal"]
    assert table.GetCellText(0, 2) == "1" and table.GetAttribute("MedSSL.predictedClass") == "abnormal"


def test_rollback_removes_partial_results(scene):
    from MedSSLCommonLib import nodes

    volume = addVolume(scene, phantom(), name="ct")
    count = scene.GetNumberOfNodes()
    with pytest.raises(RuntimeError):
        with nodes.rollbackOnError(scene):
            nodes.markupsFromDetections([], volume, "half")
            raise RuntimeError("import failed")
    assert scene.GetNumberOfNodes() == count


def test_removed_volume_is_detected(scene):
    from MedSSLCommonLib import nodes

    volume = addVolume(scene, phantom(), name="ct")
    nodes.checkStillInScene(volume)
    scene.RemoveNode(volume)
    with pytest.raises(RuntimeError, match="removed"):
        nodes.checkStillInScene(volume)


def test_loss_curve_nodes(scene):
    from MedSSLCommonLib.plots import LossCurve

    count = scene.GetNumberOfNodes()
    curve = LossCurve("pretrain")
    curve.append(1, 0.5)
    curve.append(2, 0.25)
    assert curve.points() == [(1.0, 0.5), (2.0, 0.25)]
    assert curve.chart.GetPlotSeriesNodeID() == curve.series.GetID()
    curve.remove()
    assert scene.GetNumberOfNodes() == count


def rotatedTransform(scene):
    """A non-identity linear transform node (rotation about S and a shift)."""
    import vtk

    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    matrix = vtk.vtkMatrix4x4()
    angle = 0.4
    for r, row in enumerate([[np.cos(angle), -np.sin(angle), 0, 25.0], [np.sin(angle), np.cos(angle), 0, -12.0],
                             [0, 0, 1, 7.5]]):
        for c, value in enumerate(row):
            matrix.SetElement(r, c, value)
    transform.SetMatrixTransformToParent(matrix)
    return transform, matrix


def test_segmentation_of_a_volume_under_a_transform_lines_up(scene):
    """Issue 11 item 6: the segmentation's reference geometry is the volume's own (local) grid once the
    segmentation sits under the volume's transform, and the labels come back voxel for voxel."""
    from MedSSLCommonLib import nodes
    import slicer

    volume = addVolume(scene, phantom(), name="ct")
    transform, _matrix = rotatedTransform(scene)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    labels = np.zeros(phantom().shape, np.uint8)
    labels[1:3, 2:5, 3:6] = 1
    labels[4, 6:8, 7:9] = 2
    segmentation = nodes.segmentationFromLabelmap(labels, nodes.ijkToRasArray(volume), CLASSES, volume, "pred")
    assert segmentation.GetTransformNodeID() == transform.GetID()
    geometry = segmentation.GetSegmentation().GetConversionParameter(
        slicer.vtkSegmentationConverter.GetReferenceImageGeometryParameterName())
    expected = slicer.vtkSegmentationConverter.SerializeImageGeometry(_volumeGeometry(volume))
    assert geometry == expected
    back, _info = nodes.segmentsLabelmap(segmentation, volume)
    assert np.array_equal(back, labels)


def _volumeGeometry(volume):
    """An oriented image data with the volume's local grid (what SerializeImageGeometry takes)."""
    import slicer
    import vtk

    image = slicer.vtkOrientedImageData()
    image.SetExtent(volume.GetImageData().GetExtent())
    matrix = vtk.vtkMatrix4x4()
    volume.GetIJKToRASMatrix(matrix)
    image.SetImageToWorldMatrix(matrix)
    return image
