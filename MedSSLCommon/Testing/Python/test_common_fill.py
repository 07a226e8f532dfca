"""The "MedSSL fill" effect's logic (MedSSLCommonLib/fill.py) against real MRML (slicer-core) and the real
backend's live session: a segmentation painted on a few slices of an oblique phantom volume -> the merged
labelmap the Segment Editor makes -> the preview labelmap; a stroke on one more slice sends that plane only
and changes the result only between its neighbouring painted slices; nothing stays on disk."""

import os

import numpy as np
import pytest

from slicer_testing_helpers import paintedPhantomScene


@pytest.fixture
def painted_scene(scene):
    return paintedPhantomScene(scene)


def merged(segmentation):
    """The Segment Editor's merged labelmap of all segments (value n = n-th segment), effective extent."""
    import slicer

    image = slicer.vtkOrientedImageData()
    segmentation.GenerateMergedLabelmapForAllSegments(image, slicer.vtkSegmentation.EXTENT_UNION_OF_EFFECTIVE_SEGMENTS)
    return image


def source(volume):
    import slicer

    return slicer.vtkSlicerSegmentationsModuleLogic.CreateOrientedImageDataFromVolumeNode(volume)


def repaint(volume, matrix, painting):
    """A segmentation holding ``painting`` (as the user's strokes would leave it)."""
    from MedSSLCommonLib import nodes

    return nodes.segmentationFromLabelmap(painting, matrix, {"1": {"name": "liver"}}, volume, "paint",
                                          scene=volume.GetScene())


def dice(a, b):
    return 2.0 * np.logical_and(a > 0, b > 0).sum() / ((a > 0).sum() + (b > 0).sum())


def test_painting_axis_and_planes():
    from MedSSLCommonLib.fill import paintedPlanes, paintingAxis

    mask = np.zeros((8, 9, 10), bool)  # (k, j, i)
    mask[[2, 5], 3:6, 3:7] = True
    assert paintingAxis(mask) == 2 and sorted(paintedPlanes(mask.astype(np.uint8), 2)) == [2, 5]
    sagittal = np.zeros((8, 9, 10), bool)
    sagittal[1:7, 2:8, 4] = True
    assert paintingAxis(sagittal) == 0 and list(paintedPlanes(sagittal.astype(np.uint8), 0)) == [4]


def test_fill_logic_runs_a_live_session_from_mrml(real_backend, painted_scene, work_dir):
    from MedSSLCommonLib.fill import MedSSLFillLogic, imageArray
    import slicer

    volume, segmentation, truth, matrix = painted_scene
    logic = MedSSLFillLogic(device="cpu")
    logic.start(source(volume))
    try:
        assert not os.listdir(work_dir / "jobs")  # the image copy is gone once the session has read it
        sent = []
        setPlanes = logic.client.setPlanes
        logic.client.setPlanes = lambda axis, planes, clear=(): (sent.append((axis, sorted(planes), list(clear))),
                                                                 setPlanes(axis, planes, clear))
        first = logic.update(merged(segmentation)).copy()
        assert sent == [(2, [3, 10, 18], [])] and logic.lastUpdate.mode == "full"
        assert first.shape == truth.shape and dice(first, truth) > 0.85
        assert "full" in logic.describe()

        painting = np.zeros_like(truth)
        painting[[3, 7, 10, 18]] = truth[[3, 7, 10, 18]]  # one more painted slice, between 3 and 10
        second = logic.update(merged(repaint(volume, matrix, painting))).copy()
        assert sent[-1] == (2, [7], []) and logic.lastUpdate.mode == "incremental"
        changed = np.flatnonzero((first != second).any(axis=(1, 2)))
        assert changed.size and changed.min() >= 4 and changed.max() <= 9

        output = slicer.vtkOrientedImageData()
        logic.fillLabelmap(output, second)
        assert output.GetExtent() == source(volume).GetExtent()
        np.testing.assert_array_equal(imageArray(output), second)
        from MedSSLCommonLib.fill import imageToWorld

        np.testing.assert_allclose(imageToWorld(output), matrix, atol=1e-6)

        with pytest.raises(ValueError, match="nothing painted"):
            logic.update(merged(volume.GetScene().AddNewNodeByClass("vtkMRMLSegmentationNode")))  # no segments
    finally:
        logic.close()
    assert not logic.running and logic.client is None
    with pytest.raises(RuntimeError, match="Initialize"):
        logic.update(merged(segmentation))
