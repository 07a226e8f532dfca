"""The procedural CT phantom: reproducible, labelled, plausible HU, geometry honoured."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from MedSSL.data.phantom import make_phantom, write_phantom
from MedSSL.data.phantom_classes import CLASSES, class_colors
from MedSSL.errors import MedSSLError
from MedSSL.io.volumes import read_volume


@pytest.fixture(scope="module")
def phantom():
    return make_phantom(0)


def _interior(labels, label, iterations=2):
    mask = labels == label
    inner = ndimage.binary_erosion(mask, iterations=iterations)
    return inner if inner.any() else mask


def _centroid_mm(volume, mask):
    return volume.index_to_physical(np.argwhere(mask).mean(axis=0))[0]


def test_same_seed_same_arrays_other_seed_differs(phantom):
    again = make_phantom(0)
    assert np.array_equal(again.image.array, phantom.image.array)
    assert np.array_equal(again.labels.array, phantom.labels.array)
    assert again.nodules == phantom.nodules
    other = make_phantom(1)
    assert not np.array_equal(other.image.array, phantom.image.array)
    assert not np.array_equal(other.labels.array, phantom.labels.array)  # shapes vary with the seed


def test_types_geometry_and_class_ids(phantom):
    img, lab = phantom.image, phantom.labels
    assert img.array.dtype == np.int16 and lab.array.dtype == np.uint8
    assert img.shape == (96, 96, 64) and img.same_grid(lab)
    assert np.allclose(img.spacing, [2.0, 2.0, 3.0]) and np.allclose(img.direction, np.eye(3))
    centre = img.index_to_physical((np.array(img.shape) - 1) / 2.0)[0]
    assert np.allclose(centre, 0.0)  # default origin centres the field of view
    assert img.modality == "CT"
    assert phantom.classes == CLASSES
    assert CLASSES == {1: "liver", 2: "spleen", 3: "kidney_left", 4: "kidney_right", 5: "lung_left",
                       6: "lung_right", 7: "aorta", 8: "nodule"}
    present = set(np.unique(lab.array).tolist())
    assert present <= set(range(9))
    assert set(range(1, 8)) <= present


def test_explicit_geometry_is_kept():
    direction = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
    p = make_phantom(3, shape=(40, 48, 20), spacing=(4.0, 3.5, 6.0), origin=(10.0, -20.0, 30.0), direction=direction)
    for v in (p.image, p.labels):
        assert v.shape == (40, 48, 20)
        assert np.allclose(v.spacing, [4.0, 3.5, 6.0])
        assert np.allclose(v.origin, [10.0, -20.0, 30.0])
        assert np.allclose(v.direction, direction)


def test_plausible_hounsfield_units(phantom):
    a, lab = phantom.image.array.astype(np.float64), phantom.labels.array
    med = lambda label: float(np.median(a[_interior(lab, label)]))  # noqa: E731
    assert 45 <= med(1) <= 75  # liver
    assert 35 <= med(2) <= 65  # spleen
    assert med(1) > med(2)
    for k in (3, 4):  # kidneys: medulla ~30, cortex brighter
        assert 20 <= med(k) <= 120
    for k in (5, 6):
        assert -900 <= med(k) <= -780  # lungs
        assert np.percentile(a[lab == k], 99) > -500  # vessel texture
    assert 150 <= med(7) <= 250  # contrast aorta
    assert np.mean(a[:4, :4, :]) < -950  # air around the body
    assert a.max() >= 600  # bone
    body = a > -500
    assert 0.2 < body.mean() < 0.8
    # noise: a few HU to a few tens of HU inside the liver
    assert 5 <= np.std(a[_interior(lab, 1, 3)]) <= 30
    # subcutaneous fat exists
    assert np.count_nonzero((a > -140) & (a < -60)) > 500


def test_nodules_inside_the_lungs_with_physical_centres(phantom):
    assert 1 <= len(phantom.nodules) <= 4
    lab = phantom.labels.array
    for nod in phantom.nodules:
        assert nod["label"] == 8
        assert 4.0 <= nod["radius_mm"] <= 10.0
        idx = np.array(nod["center_index"])
        assert np.allclose(phantom.image.index_to_physical(idx)[0], nod["center_mm"], atol=1e-2)
        i, j, k = np.rint(idx).astype(int)
        assert lab[i, j, k] == 8
        assert phantom.image.array[i, j, k] > -200  # solid, ~ +40 HU before partial volume
    assert np.count_nonzero(lab == 8) > 0


@pytest.mark.parametrize("direction", [np.eye(3), np.diag([-1.0, -1.0, 1.0]),
                                       np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 1.0]])])
def test_patient_left_right_follow_the_direction(direction):
    p = make_phantom(2, shape=(64, 64, 40), spacing=(3.0, 3.0, 4.5), direction=direction)
    lab = p.labels.array
    c = {k: _centroid_mm(p.image, lab == k) for k in (1, 2, 3, 4, 5, 6)}
    # LPS: +x is the patient's left
    assert c[2][0] > c[1][0]  # spleen left of liver
    assert c[3][0] > c[4][0]  # kidney_left at +x
    assert c[5][0] > c[6][0]  # lung_left at +x
    assert c[5][2] > c[1][2]  # lungs above the liver (+z superior)
    assert c[3][1] > c[1][1]  # kidneys posterior (+y) to the liver


def test_small_and_single_slice_grids():
    small = make_phantom(4, shape=(24, 20, 6), spacing=(8.0, 8.0, 30.0))
    assert small.image.shape == (24, 20, 6)
    flat = make_phantom(5, shape=(48, 48, 1))
    assert flat.image.shape == (48, 48, 1) and flat.labels.shape == (48, 48, 1)
    with pytest.raises(MedSSLError):
        make_phantom(0, shape=(10, 10))
    with pytest.raises(MedSSLError):
        make_phantom(0, direction=np.ones((3, 3)))


def test_class_colors():
    colors = class_colors()
    assert set(colors) == set(CLASSES)
    for rgb in colors.values():
        assert len(rgb) == 3 and all(0.0 <= c <= 1.0 for c in rgb)
    assert len(set(colors.values())) == len(colors)


def test_write_phantom_round_trip(tmp_path):
    p = make_phantom(6, shape=(32, 32, 16), spacing=(6.0, 6.0, 12.0))
    image_path, label_path, classes_path = write_phantom(p, tmp_path / "out")
    image, labels = read_volume(image_path), read_volume(label_path)
    assert np.array_equal(image.array, p.image.array) and image.same_grid(p.image)
    assert np.array_equal(labels.array, p.labels.array)
    classes = json.loads(classes_path.read_text(encoding="utf-8"))
    assert classes["1"]["name"] == "liver" and classes["8"]["name"] == "nodule"
    assert set(classes) == {str(k) for k in CLASSES}
    assert all(len(c["color"]) == 3 for c in classes.values())
    assert not [f for f in (tmp_path / "out").iterdir() if f.name.startswith(".tmp")]
