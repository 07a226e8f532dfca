"""Grey-level augmentations of the teacher-student methods (Adam-v2's jitter and blur, Ark's student
jitter), per sample, on (N, C, X, Y, Z) batches in [0, 1] (or (N, C, X, Y)); randomness from ``generator``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from MedSSL.transforms.views import uniform


def jitter_intensity(x: torch.Tensor, p: float, brightness: float, contrast: float, generator: torch.Generator) -> torch.Tensor:
    """Per sample with probability ``p``: brightness x * U(1 -+ brightness), then contrast about the
    sample's mean by U(1 -+ contrast), clipped to [0, 1] (the grey-level part of ColorJitter)."""
    n = x.shape[0]
    shape = (n,) + (1,) * (x.dim() - 1)
    on = (torch.rand(n, generator=generator, device=generator.device) < p).to(x.device).view(shape)
    b = uniform(n, 1 - brightness, 1 + brightness, generator).to(x.device).view(shape)
    c = uniform(n, 1 - contrast, 1 + contrast, generator).to(x.device).view(shape)
    y = x * b
    mean = y.mean(dim=tuple(range(1, x.dim())), keepdim=True)
    y = ((y - mean) * c + mean).clamp(0.0, 1.0)
    return torch.where(on, y, x)


def gaussian_blur(x: torch.Tensor, p: float, sigma_range, generator: torch.Generator, reference: int = 224) -> torch.Tensor:
    """Per sample with probability ``p``: a Gaussian blur with sigma ``U(sigma_range)`` pixels of a
    ``reference``-pixel image, i.e. ``sigma * S / reference`` voxels along an axis of S voxels (the
    published GaussianBlur sigma 0.1-2 px on 224 px images). Separable, reflected at the border."""
    n, d = x.shape[0], x.dim() - 2
    on = (torch.rand(n, generator=generator, device=generator.device) < p).cpu()
    sigma = uniform(n, float(sigma_range[0]), float(sigma_range[1]), generator).cpu()
    if p <= 0 or not bool(on.any()):
        return x
    out = x.float()
    conv = F.conv3d if d == 3 else F.conv2d
    for axis in range(d):
        size = x.shape[2 + axis]
        s = sigma * size / reference
        radius = int(min(size - 1, math.ceil(3.0 * float(s.max()))))
        if radius < 1:
            continue
        r = torch.arange(-radius, radius + 1, dtype=torch.float32)
        k = torch.exp(-0.5 * (r.view(1, -1) / s.clamp_min(1e-3).view(-1, 1)) ** 2)
        k = k / k.sum(dim=1, keepdim=True)
        k = torch.where(on.view(-1, 1), k, (r == 0).float().view(1, -1))  # identity kernel when off
        c = x.shape[1]
        kshape = [n * c, 1] + [1] * d
        kshape[2 + axis] = 2 * radius + 1
        pad = [0] * (2 * d)
        pad[2 * (d - 1 - axis)] = pad[2 * (d - 1 - axis) + 1] = radius
        grouped = F.pad(out.reshape(1, n * c, *out.shape[2:]), pad, mode="reflect")  # one group per image
        weight = k.repeat_interleave(c, dim=0).view(kshape).to(x.device)
        out = conv(grouped, weight, groups=n * c).view(out.shape)
    return out.contiguous()


#: Ark's student jitter: (contrast, brightness, gamma) limits. "published": albumentations'
#: RandomBrightnessContrast / RandomGamma defaults on 8-bit radiographs; "ct": Hounsfield units are
#: absolute and soft tissues differ by 10-50 HU, so +-0.2 of the [-1000, 1000] window (+-400 HU) would
#: turn the liver into fat or bone: the fine-tuning CT limits (10-20 HU), no gamma
JITTER_RANGES = {"published": (0.2, 0.2, 0.2), "ct": (0.03, 0.01, 0.0)}


def student_jitter(x: torch.Tensor, p: float, generator: torch.Generator, limits=JITTER_RANGES["published"]) -> torch.Tensor:
    """Per sample with probability ``p``, one of (half and half): brightness/contrast
    ``x * (1 + U(-c, c)) + U(-b, b)`` or gamma ``x ** U(1 - g, 1 + g)``; clipped to [0, 1]. ``limits``
    (c, b, g): see :data:`JITTER_RANGES` (published: 0.2 each)."""
    c, b, g = (float(v) for v in limits)
    n = x.shape[0]
    shape = (n,) + (1,) * (x.dim() - 1)
    dev = generator.device
    u = torch.rand(5, n, generator=generator, device=dev).to(x.device)
    on = (u[0] < p).view(shape)
    use_gamma = (u[1] < 0.5).view(shape) if g > 0 else torch.zeros(shape, dtype=torch.bool, device=x.device)
    alpha, beta = (c * (2 * u[2] - 1)).view(shape), (b * (2 * u[3] - 1)).view(shape)
    gamma = (1.0 + g * (2 * u[4] - 1)).view(shape)
    xc = x.clamp(0.0, 1.0)
    jittered = torch.where(use_gamma, xc ** gamma, xc * (1 + alpha) + beta).clamp(0.0, 1.0)
    return torch.where(on, jittered, x)
