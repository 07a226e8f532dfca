"""Out-of-plane rotation (``AugmentConfig.tilt_deg``): rigid in voxels on a patch whose axes differ in length,
and absent by default (painted planes stay exact)."""

import numpy as np
import torch

from MedSSL.transforms.augment import AugmentConfig, augment_batch

GEOMETRY_ONLY = dict(rotate_deg=0.0, scale=(1.0, 1.0), p_affine=1.0, flip_axes=(), contrast=(1.0, 1.0),
                     brightness=0.0, gamma=(1.0, 1.0), noise_std=0.0)


def _patch(mask: np.ndarray, n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.from_numpy(mask.astype(np.float32))[None, None].repeat(n, 1, 1, 1, 1)
    return image, image[:, 0].long()


def test_tilt_turns_a_rod_out_of_the_slices_and_keeps_a_ball_a_ball_on_a_flat_patch():
    shape = (48, 48, 24)  # X, Y, Z: Z half as long, as the automatic patch on thick slices
    x, y, z = np.indices(shape).astype(float)
    ball = (x - 24) ** 2 + (y - 24) ** 2 + (z - 12) ** 2 <= 8 ** 2
    rod = ((x - 24) ** 2 + (y - 24) ** 2 <= 2 ** 2) & (np.abs(z - 12) <= 8)
    config = AugmentConfig(tilt_deg=30.0, **GEOMETRY_ONLY)
    _, balls = augment_batch(*_patch(ball), config, torch.Generator().manual_seed(1))
    for warped in balls.numpy():
        found = np.argwhere(warped == 1)
        assert abs(len(found) - ball.sum()) < 0.02 * ball.sum()  # same volume: rigid in voxels
        assert np.all(np.abs(found.max(0) - found.min(0) - 16) <= 1)  # still 17 voxels across on every axis
    _, rods = augment_batch(*_patch(rod), config, torch.Generator().manual_seed(2))
    spreads = [np.ptp(np.argwhere(r == 1)[:, :2], axis=0).max() for r in rods.numpy()]
    assert max(spreads) > 6  # tilted: the rod now crosses the plane (4 voxels wide upright)


def test_without_tilt_every_slice_keeps_its_own_labels():
    labels = np.zeros((32, 32, 16), bool)
    labels[8:24, 8:24, 4:6] = True  # two slices only
    config = AugmentConfig(**{**GEOMETRY_ONLY, "rotate_deg": 20.0})
    _, warped = augment_batch(*_patch(labels), config, torch.Generator().manual_seed(0))
    assert np.all(warped.numpy()[..., 6:] != 1) and np.all(warped.numpy()[..., :4] != 1)
    assert np.all((warped.numpy()[..., 4:6] == 1).reshape(4, -1).any(axis=1))
