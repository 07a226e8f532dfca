"""Dimensionality decided once (MedSSL/data/spatial.py) and layers picked by it (MedSSL/models/layers.py)."""

import numpy as np
import pytest
import torch
from torch import nn

from MedSSL.data.spatial import SpatialSpec, image_dims, is_one_slice, is_one_slice_file, sampling_size, validate_patch
from MedSSL.errors import MedSSLError
from MedSSL.io.volumes import Volume, write_volume
from MedSSL.models.genesis_unet import GenesisUNet
from MedSSL.models.layers import layer


def test_one_slice_predicate_and_header_reading(tmp_path):
    assert is_one_slice((64, 48, 1)) and is_one_slice((64, 48)) and not is_one_slice((64, 48, 2))
    flat, deep = tmp_path / "flat.nii.gz", tmp_path / "deep.nii.gz"
    write_volume(Volume(np.zeros((16, 16, 1), np.int16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3)), flat)
    write_volume(Volume(np.zeros((16, 16, 4), np.int16), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3)), deep)
    assert is_one_slice_file(flat) and not is_one_slice_file(deep)
    assert not is_one_slice_file(tmp_path) and not is_one_slice_file(tmp_path / "missing.nii.gz")


@pytest.mark.parametrize("patch, dims, expected", [
    ((64, 64, 32), 3, (64, 64, 32)), ((64, 64, 1), None, (64, 64, 1)), ((64, 64, 16), None, (64, 64, 16)),
    ((32, 48), 2, (32, 48, 1)), ((32, 48, 16), 2, (32, 48, 1)), ((32, 48, 1), 2, (32, 48, 1)),
])
def test_valid_patches(patch, dims, expected):
    assert validate_patch(patch, dims) == expected


@pytest.mark.parametrize("patch, dims, message", [
    ((64, 64, 30), 3, "--patch 64 64 30: each size must be a multiple of 8"),
    ((64, 64, 1), 3, "Z = 1 is for one-slice (2D) images"),
    ((64, 64), 3, "3D volumes take three sizes"),
    ((60, 64), 2, "one-slice (2D) images take X Y or X Y 1"),
    ((64, 64, 12), None, "each size must be a multiple of 8"),
    (("a", 8, 8), 3, "expected sizes in voxels"),
])
def test_invalid_patches_are_one_line_errors(patch, dims, message):
    with pytest.raises(MedSSLError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate_patch(patch, dims)


def test_window_errors_name_the_option():
    with pytest.raises(MedSSLError, match="^--window 7 8 8:"):
        validate_patch((7, 8, 8), 3, what="--window")


def test_ignored_z_is_noted():
    notes = []
    assert validate_patch((32, 32, 16), 2, log=notes.append) == (32, 32, 1)
    assert notes == ["one-slice images: 2D patches of 32x32 (Z 16 ignored)"]


def test_image_dims_and_mixtures():
    assert image_dims((64, 64, 1), "a.nrrd") == 2 and image_dims((64, 64, 9), "b.nrrd") == 3
    with pytest.raises(MedSSLError, match="b.nrrd: a 3D volume .* among one-slice"):
        image_dims((64, 64, 9), "b.nrrd", first=(2, "a.nrrd"))
    with pytest.raises(MedSSLError, match="c.nrrd: a single-slice image .* along X or Y"):
        image_dims((1, 64, 9), "c.nrrd")


def test_sampling_sizes_and_spec():
    assert sampling_size((5, 6, 7)) == (5, 6, 7)
    with pytest.raises(MedSSLError, match="expected three sizes >= 1"):
        sampling_size((5, 0, 7))
    spec = SpatialSpec(2, (32, 32, 1), None)
    assert spec.network_patch == (32, 32)
    assert SpatialSpec(3, (32, 32, 16), (1.0, 1.0, 2.0)).network_patch == (32, 32, 16)
    with pytest.raises(ValueError):
        SpatialSpec(2, (32, 32, 16))


def test_layers_by_dims():
    assert layer("conv", 2) is nn.Conv2d and layer("conv", 3) is nn.Conv3d
    assert layer("batch_norm", 3) is nn.BatchNorm3d and layer("conv_transpose", 2) is nn.ConvTranspose2d
    with pytest.raises(ValueError):
        layer("conv", 1)
    with pytest.raises(ValueError):
        layer("dropout", 3)


def test_layers_are_the_classes_monais_factories_give():
    """MedSSL names the torch classes itself (importing MONAI costs a training process seconds); they are
    MONAI's factories' classes, kind for kind and in 2D and 3D."""
    from monai.networks.layers.factories import Conv, Norm, Pool

    factories = {"conv": (Conv, Conv.CONV), "conv_transpose": (Conv, Conv.CONVTRANS), "batch_norm": (Norm, Norm.BATCH),
                 "instance_norm": (Norm, Norm.INSTANCE), "max_pool": (Pool, Pool.MAX),
                 "adaptive_avg_pool": (Pool, Pool.ADAPTIVEAVG)}
    for kind, (factory, name) in factories.items():
        for dims in (2, 3):
            assert layer(kind, dims) is factory[name, dims], (kind, dims)


def test_a_training_process_does_not_import_monai_before_its_first_step():
    """pretrain, finetune, predict and suggest import no MONAI module until a network is slid over an image
    (its import loads all its submodules: 2-3 s of every job the Slicer modules start); the bundle still
    records MONAI's version."""
    import subprocess
    import sys

    code = ("import sys, MedSSL.commands.cli, MedSSL.tasks.pretrain, MedSSL.tasks.finetune.segment, MedSSL.io.bundle, "
            "MedSSL.tasks.infer.predict, MedSSL.tasks.infer.suggest; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'monai')[:3]); "
            "print(MedSSL.io.bundle.versions()['monai'])")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    imported, version = done.stdout.splitlines()
    assert imported == "[]", imported
    import monai

    assert version == monai.__version__


def test_2d_and_3d_networks_share_keys():
    net2, net3 = GenesisUNet(width=2, spatial_dims=2), GenesisUNet(width=2, spatial_dims=3)
    assert list(net2.state_dict()) == list(net3.state_dict())
    assert net2(torch.zeros(1, 1, 16, 16)).shape == (1, 1, 16, 16)
    assert net3(torch.zeros(1, 1, 16, 16, 8)).shape == (1, 1, 16, 16, 8)
