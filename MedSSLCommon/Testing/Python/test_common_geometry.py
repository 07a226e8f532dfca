"""Geometry: IJK->RAS <-> ITK LPS, and node -> NRRD file -> node round trips (oblique, non-isotropic)."""

import numpy as np
import pytest

from slicer_testing_helpers import addVolume, obliqueMatrix, phantom

from MedSSLCommonLib import geometry


def test_itk_ras_conversion_round_trips_and_flips_x_y():
    matrix = obliqueMatrix()
    origin, spacing, direction = geometry.itkFromIjkToRas(matrix)
    np.testing.assert_allclose(spacing, [0.7, 0.9, 2.5], atol=1e-12)
    np.testing.assert_allclose(origin, [-12.25, 30.5, 41.125], atol=1e-12)  # LPS: x and y negated
    np.testing.assert_allclose(direction.T @ direction, np.eye(3), atol=1e-12)
    np.testing.assert_allclose(geometry.ijkToRasFromItk(origin, spacing, direction.flatten()), matrix, atol=1e-12)


def test_voxel_positions_agree_with_simpleitk():
    sitk = pytest.importorskip("SimpleITK")
    matrix = obliqueMatrix()
    origin, spacing, direction = geometry.itkFromIjkToRas(matrix)
    image = sitk.Image(12, 10, 6, sitk.sitkInt16)
    image.SetOrigin(tuple(origin))
    image.SetSpacing(tuple(spacing))
    image.SetDirection(tuple(direction.flatten()))
    for index in [(0, 0, 0), (11, 9, 5), (3, 7, 2)]:
        lps = image.TransformIndexToPhysicalPoint(index)
        np.testing.assert_allclose(geometry.lpsToRas(lps), geometry.indexToRas(matrix, index), atol=1e-10)


def test_volume_node_round_trip_through_nrrd(scene, tmp_path):
    from MedSSLCommonLib import nodes

    array = np.random.default_rng(3).integers(-1000, 3000, size=(5, 7, 9)).astype(np.int16)
    volume = addVolume(scene, array, name="oblique")
    path = nodes.writeVolume(volume, str(tmp_path / "v.nrrd"))
    back, matrix = nodes.readArray(path)
    assert back.dtype == np.int16 and np.array_equal(back, array)
    np.testing.assert_allclose(matrix, nodes.ijkToRasArray(volume), rtol=0, atol=1e-12)
    assert "left-posterior-superior" in open(path, "rb").read(300).decode("ascii", "replace")
    copy = nodes.addVolumeFromArray(back, matrix, "copy", scene=scene)
    np.testing.assert_allclose(nodes.ijkToRasArray(copy), nodes.ijkToRasArray(volume), rtol=0, atol=1e-12)
    # with a reference on the same grid the exact matrix is reused (bit-for-bit)
    exact = nodes.addVolumeFromArray((back > 0).astype(np.uint8), matrix, "exact", "vtkMRMLLabelMapVolumeNode", scene, volume)
    assert np.array_equal(nodes.ijkToRasArray(exact), nodes.ijkToRasArray(volume))


def test_float_volume_and_axis_aligned_file_written_by_itk(scene, tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    from MedSSLCommonLib import nodes

    image = sitk.GetImageFromArray(phantom().astype(np.float32))
    image.SetSpacing((0.5, 0.75, 3.0))
    image.SetOrigin((100.0, 50.0, -20.0))  # LPS
    sitk.WriteImage(image, str(tmp_path / "lps.nrrd"))
    array, matrix = nodes.readArray(str(tmp_path / "lps.nrrd"))
    volume = nodes.addVolumeFromArray(array, matrix, "fromItk", scene=scene)
    expected = np.diag([-0.5, -0.75, 3.0, 1.0])
    expected[:3, 3] = [-100.0, -50.0, -20.0]  # RAS
    np.testing.assert_allclose(nodes.ijkToRasArray(volume), expected, atol=1e-12)
    nodes.writeVolume(volume, str(tmp_path / "again.nrrd"))
    again = sitk.ReadImage(str(tmp_path / "again.nrrd"))
    assert again.GetOrigin() == image.GetOrigin() and again.GetSpacing() == image.GetSpacing()
    assert again.GetDirection() == image.GetDirection()
    assert np.array_equal(sitk.GetArrayFromImage(again), sitk.GetArrayFromImage(image))
