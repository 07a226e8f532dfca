"""Sparse annotation extraction: painted slices -> 0 / class ids, every other slice -> 255."""

import numpy as np
import pytest

from slicer_testing_helpers import addVolume, phantom


def paint(scene, volume, masks):
    """A segmentation with one segment per (name, color, mask (k, j, i)) painted on ``volume``'s grid."""
    from MedSSLSegmentLib import nodes

    labels = np.zeros(phantom().shape, np.uint8)
    classes = {}
    for value, (name, color, mask) in enumerate(masks, start=1):
        labels[mask] = value
        classes[str(value)] = {"name": name, "color": color}
    segmentation = nodes.segmentationFromLabelmap(labels, nodes.ijkToRasArray(volume), classes, volume, "painted")
    return segmentation


def test_painted_slices_become_classes_and_others_255(scene):
    from MedSSLTrainerLib.annotation import sparseLabels

    volume = addVolume(scene, phantom(), name="ct")
    spleen = np.zeros(phantom().shape, bool)
    spleen[1, 2:4, 3:6] = True  # slice k=1
    liver = np.zeros(phantom().shape, bool)
    liver[4, 5:8, 6:9] = True  # slice k=4
    liver[1, 8, 10] = True  # also on k=1
    segmentation = paint(scene, volume, [("spleen", [1.0, 0.0, 0.0], spleen), ("liver", [0.0, 0.5, 1.0], liver)])
    empty = segmentation.GetSegmentation().AddEmptySegment("", "unused", [0.0, 1.0, 0.0])
    assert empty
    labels, classes, slices = sparseLabels(segmentation, volume)
    assert slices == [1, 4]
    assert classes == {"1": {"name": "spleen", "color": [1.0, 0.0, 0.0]}, "2": {"name": "liver", "color": [0.0, 0.5, 1.0]}}
    assert labels.dtype == np.uint8 and labels.shape == phantom().shape
    expected = np.full(phantom().shape, 255, np.uint8)
    expected[[1, 4]] = 0
    expected[spleen] = 1
    expected[liver] = 2
    assert np.array_equal(labels, expected)


def test_other_slice_axis(scene):
    from MedSSLTrainerLib.annotation import sparseLabels

    volume = addVolume(scene, phantom(), name="ct")
    mask = np.zeros(phantom().shape, bool)
    mask[0:5, 2:6, 7] = True  # a sagittal-ish stroke: i = 7 in every k
    labels, _classes, slices = sparseLabels(paint(scene, volume, [("vessel", [1, 1, 0], mask)]), volume, sliceAxis=0)
    assert slices == [7]
    assert (labels[:, :, 7] != 255).all() and (labels[:, :, :7] == 255).all() and labels[mask].min() == 1


def test_nothing_painted_is_an_error(scene):
    from MedSSLTrainerLib.annotation import sparseLabels

    volume = addVolume(scene, phantom(), name="ct")
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.GetSegmentation().AddEmptySegment("", "spleen", [1, 0, 0])
    with pytest.raises(ValueError, match="paint a few slices"):
        sparseLabels(segmentation, volume)


def test_painting_on_a_different_grid_is_resampled(scene):
    """A segmentation whose own labelmap geometry differs (e.g. painted with another source volume) is
    resampled onto the volume's grid."""
    from MedSSLSegmentLib import nodes
    from MedSSLTrainerLib.annotation import sparseLabels
    from slicer_testing_helpers import obliqueMatrix

    volume = addVolume(scene, phantom(), name="ct")
    fine = np.zeros((12, 20, 24), np.uint8)
    fine[2:4, 4:8, 6:12] = 1  # the same physical region as k=1, j=2..3, i=3..5 at half the spacing
    matrix = obliqueMatrix(spacing=(0.35, 0.45, 1.25))
    matrix[:3, 3] = nodes.ijkToRasArray(volume)[:3, 3] - matrix[:3, :3] @ [0.5, 0.5, 0.5]
    other = nodes.addVolumeFromArray(fine, matrix, "fine", "vtkMRMLLabelMapVolumeNode", scene)
    segmentation = nodes.segmentationFromLabelmap(fine, matrix, {"1": {"name": "spleen"}}, other, "painted fine")
    labels, _classes, slices = sparseLabels(segmentation, volume)
    assert slices == [1]
    assert labels[1, 2:4, 3:6].min() == 1 and (labels[1] == 1).sum() == 6
