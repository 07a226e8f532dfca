"""Fixtures shared by the backend tests: folders of phantom CT volumes (MedSSL.data.phantom), written once
per test session and only read by the tests (each test writes its caches and models elsewhere)."""

import pytest

from MedSSL.data.phantom import make_phantom
from MedSSL.io.volumes import write_volume

#: 32 x 32 x 16 voxels of 6 x 6 x 8 mm: the smallest phantom the width-4 networks of the tests train on
SMALL = {"shape": (32, 32, 16), "spacing": (6.0, 6.0, 8.0)}
#: 48 x 48 x 24 voxels of 4 x 4 x 6 mm: room for 32 x 32 x 16 cubes and two crops per cube
LARGE = {"shape": (48, 48, 24), "spacing": (4.0, 4.0, 6.0)}


def write_phantoms(folder, count: int, size: dict):
    """``count`` phantom CTs (seeds 0..count-1) of ``size`` as folder/case_<seed>.nii.gz; returns ``folder``."""
    for seed in range(count):
        write_volume(make_phantom(seed, **size).image, folder / f"case_{seed}.nii.gz")
    return folder


@pytest.fixture(scope="session")
def small_phantoms(tmp_path_factory):
    """A folder of three SMALL phantom CTs."""
    return write_phantoms(tmp_path_factory.mktemp("small_phantoms"), 3, SMALL)


@pytest.fixture(scope="session")
def large_phantoms(tmp_path_factory):
    """A folder of three LARGE phantom CTs."""
    return write_phantoms(tmp_path_factory.mktemp("large_phantoms"), 3, LARGE)
