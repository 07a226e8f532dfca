"""Sparse annotation extraction: painted planes (any of the three axes) -> 0 / class ids, the rest -> 255."""

import numpy as np
import pytest

from slicer_testing_helpers import addVolume, phantom


def paint(scene, volume, masks):
    """A segmentation with one segment per (name, color, mask (k, j, i)) painted on ``volume``'s grid."""
    from MedSSLCommonLib import nodes

    labels = np.zeros(masks[0][2].shape, np.uint8)
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
    labels, classes, planes = sparseLabels(segmentation, volume)
    assert planes == {0: [], 1: [], 2: [1, 4]}
    assert classes == {"1": {"name": "spleen", "color": [1.0, 0.0, 0.0]}, "2": {"name": "liver", "color": [0.0, 0.5, 1.0]}}
    assert labels.dtype == np.uint8 and labels.shape == phantom().shape
    expected = np.full(phantom().shape, 255, np.uint8)
    expected[[1, 4]] = 0
    expected[spleen] = 1
    expected[liver] = 2
    assert np.array_equal(labels, expected)


def test_forced_slice_axis(scene):
    from MedSSLTrainerLib.annotation import sparseLabels

    volume = addVolume(scene, phantom(), name="ct")
    mask = np.zeros(phantom().shape, bool)
    mask[0:5, 2:6, 7] = True  # a sagittal-ish stroke: i = 7 in every k
    labels, _classes, planes = sparseLabels(paint(scene, volume, [("vessel", [1, 1, 0], mask)]), volume, sliceAxis=0)
    assert planes == {0: [7], 1: [], 2: []}
    assert (labels[:, :, 7] != 255).all() and (labels[:, :, :7] == 255).all() and labels[mask].min() == 1


BIG = (20, 24, 28)  # (k, j, i)


def test_one_sagittal_slice_marks_only_that_plane(scene):
    """Painting one sagittal slice annotates that slice only, not every axial slice the stroke crosses
    (the old rule made the rest of the structure on those axial slices background)."""
    from MedSSLTrainerLib.annotation import sparseLabels

    volume = addVolume(scene, np.zeros(BIG, np.int16), matrix=np.diag([0.8, 0.8, 2.0, 1.0]), name="ct")
    mask = np.zeros(BIG, bool)
    mask[4:15, 6:18, 11] = True  # painted in a sagittal view: i = 11
    labels, _classes, planes = sparseLabels(paint(scene, volume, [("liver", [1, 0, 0], mask)]), volume)
    assert planes == {0: [11], 1: [], 2: []}
    expected = np.full(BIG, 255, np.uint8)
    expected[:, :, 11] = 0
    expected[mask] = 1
    assert np.array_equal(labels, expected)


def test_axial_and_sagittal_strokes_that_cross(scene):
    """Two axial strokes and one sagittal stroke through the same organ touch (one connected blob of
    paint): each is still found as its own plane, and nothing else is annotated."""
    from MedSSLTrainerLib.annotation import describePlanes, sparseLabels

    volume = addVolume(scene, np.zeros(BIG, np.int16), matrix=np.diag([0.8, 0.8, 2.0, 1.0]), name="ct")
    organ = np.zeros(BIG, bool)
    organ[3:17, 5:19, 6:22] = True
    mask = np.zeros(BIG, bool)
    for k in (6, 12):
        mask[k] = organ[k]
    mask[:, :, 14] |= organ[:, :, 14]
    labels, _classes, planes = sparseLabels(paint(scene, volume, [("organ", [1, 0, 0], mask)]), volume)
    assert planes == {0: [14], 1: [], 2: [6, 12]}
    annotated = labels != 255
    assert annotated[[6, 12]].all() and annotated[:, :, 14].all()
    assert annotated.sum() == 2 * BIG[1] * BIG[2] + BIG[0] * BIG[1] - 2 * BIG[1]
    assert np.array_equal(labels[annotated] == 1, mask[annotated])
    assert describePlanes(planes, volume) == "painted planes: axial k=6,12; sagittal i=14"


def test_strokes_in_all_three_views_and_two_classes(scene):
    from MedSSLTrainerLib.annotation import sparseLabels

    volume = addVolume(scene, np.zeros(BIG, np.int16), name="ct")
    spleen = np.zeros(BIG, bool)
    spleen[3, 2:6, 2:9] = True  # axial k=3
    liver = np.zeros(BIG, bool)
    liver[8:15, 20, 10:20] = True  # coronal j=20
    liver[10:18, 4:12, 25] = True  # sagittal i=25
    labels, _classes, planes = sparseLabels(paint(scene, volume, [("spleen", [1, 0, 0], spleen),
                                                                  ("liver", [0, 0, 1], liver)]), volume)
    assert planes == {0: [25], 1: [20], 2: [3]}
    assert (labels[3][spleen[3]] == 1).all() and (labels[:, 20][liver[:, 20]] == 2).all()
    assert labels[10, 10, 10] == 255 and labels[3, 10, 10] == 0 and labels[10, 20, 0] == 0


def test_volumetric_segmentation_is_annotated_on_every_slice_it_spans(scene):
    """A dense blob (thick along all axes, not crossing strokes): every slice it spans along its thinnest
    axis is annotated; slices beyond it are not."""
    from MedSSLTrainerLib.annotation import paintedPlanes

    mask = np.zeros(BIG, bool)
    mask[5:10, 4:20, 3:25] = True  # thinnest along k (5 slices)
    assert paintedPlanes(mask) == {0: [], 1: [], 2: [5, 6, 7, 8, 9]}
    ball = np.zeros(BIG, bool)
    z, y, x = np.ogrid[:BIG[0], :BIG[1], :BIG[2]]
    ball[(z - 10) ** 2 + (y - 12) ** 2 + (x - 14) ** 2 <= 16] = True  # a sphere-brush blob, radius 4
    assert paintedPlanes(ball) == {0: [], 1: [], 2: list(range(6, 15))}


def test_two_voxel_thick_stroke_from_a_slightly_oblique_view(scene):
    from MedSSLTrainerLib.annotation import paintedPlanes

    mask = np.zeros(BIG, bool)
    mask[2:18, 7:9, 3:20] = True  # coronal, two layers thick
    assert paintedPlanes(mask) == {0: [], 1: [7, 8], 2: []}


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
    from MedSSLCommonLib import nodes
    from MedSSLTrainerLib.annotation import sparseLabels
    from slicer_testing_helpers import obliqueMatrix

    volume = addVolume(scene, phantom(), name="ct")
    fine = np.zeros((12, 20, 24), np.uint8)
    fine[2:4, 4:8, 6:12] = 1  # the same physical region as k=1, j=2..3, i=3..5 at half the spacing
    matrix = obliqueMatrix(spacing=(0.35, 0.45, 1.25))
    matrix[:3, 3] = nodes.ijkToRasArray(volume)[:3, 3] - matrix[:3, :3] @ [0.5, 0.5, 0.5]
    other = nodes.addVolumeFromArray(fine, matrix, "fine", "vtkMRMLLabelMapVolumeNode", scene)
    segmentation = nodes.segmentationFromLabelmap(fine, matrix, {"1": {"name": "spleen"}}, other, "painted fine")
    labels, _classes, planes = sparseLabels(segmentation, volume)
    assert planes == {0: [], 1: [], 2: [1]}
    assert labels[1, 2:4, 3:6].min() == 1 and (labels[1] == 1).sum() == 6
