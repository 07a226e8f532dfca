"""Random augmentation of training batches, in torch on the training device.

Per sample: an affine warp (in-plane rotation about the Z axis and in-plane scaling) with probability
``p_affine``, flips along ``flip_axes``, then intensity jitter (contrast scale, brightness shift, gamma,
Gaussian noise) on the image only. Labels are warped with nearest-neighbour sampling and voxels brought
in from outside the patch become 255 (not annotated), so no invented background enters the loss.

2D batches (one-slice images: (N, 1, X, Y) images, (N, X, Y) targets) are augmented as one-slice 3D
patches: the warp never resamples across Z, so on a slice of depth 1 it is exactly the 2D rotation and
scaling of the (X, Y) plane (checked in the tests against the 3D path).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F

from MedSSL.data.labels import IGNORE


@dataclass
class AugmentConfig:
    """Ranges of the random augmentations (angles in degrees, intensities in [0, 1] image units).

    The defaults suit MR; use :meth:`for_modality` ("CT" gets much smaller intensity jitter)."""

    p_affine: float = 0.5
    rotate_deg: float = 15.0
    scale: tuple = (0.85, 1.15)
    flip_axes: tuple = (0, 1)
    contrast: tuple = (0.9, 1.1)
    brightness: float = 0.05
    gamma: tuple = (0.8, 1.25)
    noise_std: float = 0.01
    #: out-of-plane rotation (degrees, about each in-plane axis): it resamples across slices, so only for
    #: dense labels (best on a near-isotropic grid); 0 keeps painted planes exact
    tilt_deg: float = 0.0

    def to_dict(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}

    @classmethod
    def for_task(cls, task: str, modality: str | None) -> "AugmentConfig":
        """Segmentation: no flips (anatomy is lateral: a left-right flip turns the spleen's side into
        the liver's and teaches the network that liver-like tissue there is spleen), full in-plane
        warps. Classification: flips on, fewer warps. Intensities per :meth:`for_modality`."""
        base = cls.for_modality(modality)
        if task == "segment":
            return replace(base, flip_axes=())
        return replace(base, p_affine=0.3)

    @classmethod
    def for_modality(cls, modality: str | None) -> "AugmentConfig":
        """CT: Hounsfield units are absolute and soft tissues differ by 10-50 HU (0.005-0.025 in the
        [-1000, 1000] window), so intensity jitter stays within about 10-20 HU and there is no gamma;
        the MR ranges above otherwise. (With the MR ranges on CT, +-0.05 brightness is +-100 HU: a
        400 HU blob then got a Dice of 0.1 instead of 0.7.)"""
        if modality == "CT":
            return cls(contrast=(0.97, 1.03), brightness=0.01, gamma=(1.0, 1.0), noise_std=0.005)
        return cls()


def _uniform(n: int, lo: float, hi: float, generator, device) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=generator, device=device)


def _affine(image: torch.Tensor, target: torch.Tensor, config: AugmentConfig, generator) -> tuple[torch.Tensor, torch.Tensor]:
    n, device = image.shape[0], image.device
    angle = _uniform(n, -config.rotate_deg, config.rotate_deg, generator, device) * (math.pi / 180)
    scale = _uniform(n, config.scale[0], config.scale[1], generator, device)
    apply = torch.rand(n, generator=generator, device=device) < config.p_affine
    angle, scale = torch.where(apply, angle, 0.0), torch.where(apply, scale, 1.0)
    # theta maps output grid coordinates (z, y, x order of the last three dims W, H, D) to input ones;
    # the rotation acts on (y, x) = plane of the array's first two axes, about the slice axis Z.
    theta = torch.zeros(n, 3, 4, device=device)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta[:, 0, 0] = 1.0  # no resampling across slices (often thick): painted planes stay exact
    theta[:, 1, 1], theta[:, 1, 2] = cos, -sin
    theta[:, 2, 1], theta[:, 2, 2] = sin, cos
    if config.tilt_deg > 0:
        theta[:, :, :3] = _tilted(theta[:, :, :3], image.shape[2:], apply, config.tilt_deg, generator)
    grid = F.affine_grid(theta, list(image.shape), align_corners=False)
    image = F.grid_sample(image, grid, mode="bilinear", padding_mode="border", align_corners=False)
    shifted = (target.float() + 1.0).unsqueeze(1)  # 0 after sampling = outside the patch
    warped = F.grid_sample(shifted, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    warped = warped.squeeze(1).round().long() - 1
    target = torch.where(warped < 0, torch.full_like(warped, IGNORE), warped)
    return image, target


def _tilted(linear: torch.Tensor, size, apply: torch.Tensor, tilt_deg: float, generator) -> torch.Tensor:
    """``linear`` (N, 3, 3), the in-plane warp in affine_grid's (Z, Y, X) order, followed by rotations of up to
    ``tilt_deg`` about the array's X and Y axes; made rigid in voxels (affine_grid's coordinates run from -1
    to 1 along each axis, so a rotation mixing axes of different lengths is conjugated by their half sizes)."""
    n, device = linear.shape[0], linear.device
    a, b = (torch.where(apply, _uniform(n, -tilt_deg, tilt_deg, generator, device) * (math.pi / 180), 0.0)
            for _ in range(2))
    about_x = torch.zeros(n, 3, 3, device=device)  # mixes Z and Y
    about_x[:, 0, 0], about_x[:, 0, 1], about_x[:, 1, 0], about_x[:, 1, 1] = a.cos(), -a.sin(), a.sin(), a.cos()
    about_x[:, 2, 2] = 1.0
    about_y = torch.zeros(n, 3, 3, device=device)  # mixes Z and X
    about_y[:, 0, 0], about_y[:, 0, 2], about_y[:, 2, 0], about_y[:, 2, 2] = b.cos(), -b.sin(), b.sin(), b.cos()
    about_y[:, 1, 1] = 1.0
    half = torch.tensor([size[2], size[1], size[0]], dtype=linear.dtype, device=device) / 2.0
    rotation = linear @ about_x @ about_y
    return rotation * half.view(1, 1, 3) / half.view(1, 3, 1)


def _flip(image: torch.Tensor, target: torch.Tensor, axes, generator) -> tuple[torch.Tensor, torch.Tensor]:
    for axis in axes:
        mask = torch.rand(image.shape[0], generator=generator, device=image.device) < 0.5
        if mask.any():
            image = torch.where(mask.view(-1, 1, 1, 1, 1), image.flip(axis + 2), image)
            target = torch.where(mask.view(-1, 1, 1, 1), target.flip(axis + 1), target)
    return image, target


def _intensity(image: torch.Tensor, config: AugmentConfig, generator) -> torch.Tensor:
    n, device = image.shape[0], image.device
    shape = (n, 1, 1, 1, 1)
    if config.gamma != (1.0, 1.0):
        gamma = torch.exp(_uniform(n, math.log(config.gamma[0]), math.log(config.gamma[1]), generator, device)).view(shape)
        image = image.clamp(0.0, 1.0) ** gamma
    contrast = _uniform(n, *config.contrast, generator, device).view(shape)
    shift = _uniform(n, -config.brightness, config.brightness, generator, device).view(shape)
    mean = image.mean(dim=(2, 3, 4), keepdim=True)
    image = (image - mean) * contrast + mean + shift
    if config.noise_std > 0:
        image = image + config.noise_std * torch.randn(image.shape, generator=generator, device=device)
    return image


def augment_batch(image: torch.Tensor, target: torch.Tensor, config: AugmentConfig,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """image (N, C, X, Y, Z) float in [0, 1], target (N, X, Y, Z) long channels (255 = ignored)
    -> the same shapes, randomly augmented (the target only geometrically). Channel 0 is the image; more
    channels (position channels, :mod:`MedSSL.data.position`) are warped with it but get no intensity
    jitter. 2D: image (N, C, X, Y), target (N, X, Y) -> the same shapes (see the module docstring)."""
    if image.dim() == 4:
        image, target = augment_batch(image.unsqueeze(-1), target.unsqueeze(-1), config, generator)
        return image.squeeze(-1), target.squeeze(-1)
    if config.p_affine > 0:
        image, target = _affine(image, target, config, generator)
    image, target = _flip(image, target, config.flip_axes, generator)
    if image.shape[1] == 1:
        return _intensity(image, config, generator), target
    return torch.cat([_intensity(image[:, :1], config, generator), image[:, 1:]], dim=1), target
