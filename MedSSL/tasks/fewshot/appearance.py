"""Appearance learned on the volume itself: what the painted voxels of each class look like.

Written here because neither MONAI nor SimpleITK has it: an ilastik/ECONet-style online voxel
classifier. Every voxel of the region of interest gets a small stack of multi-scale image features
(:func:`voxel_features`); a two-layer MLP (:class:`AppearanceNet`) is trained on the voxels of the
painted planes, with classes balanced and background sampled half near the painted structure (where
the decision is hard) and half anywhere. Its output, per class ``c``, is the log-odds
``log p(c | x) - log p(background | x)`` (:func:`log_odds`), which, because training was balanced,
estimates the log likelihood ratio that the engine adds to the shape prior.
"""

from __future__ import annotations

from contextlib import contextmanager

import numpy as np
import torch
from scipy import ndimage
from torch import nn

#: Gaussian scales of the features, mm
SCALES_MM = (1.0, 2.0, 4.0)
#: background voxels within this distance (mm) of the painted structure count as "near"
NEAR_MM = 10.0
LOGIT_CLIP = 8.0
#: the MLP's peak learning rate (cosine schedule to 0)
LR = 1e-2


def normalise(image: np.ndarray) -> np.ndarray:
    """(X, Y, Z) -> float32 with the 1st and 99th percentiles at 0 and 1 (CT and MR alike)."""
    lo, hi = np.percentile(image, (1.0, 99.0))
    return ((image.astype(np.float32) - np.float32(lo)) / np.float32(max(hi - lo, 1e-6))).astype(np.float32)


def voxel_features(image: np.ndarray, spacing) -> np.ndarray:
    """(X, Y, Z) normalised image, spacing (3,) mm -> (F, X, Y, Z) float32 features.

    F = 1 + 3 * len(SCALES_MM): the image; per scale s: the Gaussian-smoothed image, its gradient
    magnitude and the local standard deviation (both at scale s, in mm, anisotropic in voxels).
    """
    spacing = np.asarray(spacing, np.float64)
    feats = [image]
    for s in SCALES_MM:
        sigma = s / spacing
        smooth = ndimage.gaussian_filter(image, sigma, mode="nearest")
        feats.append(smooth)
        feats.append(ndimage.gaussian_gradient_magnitude(image, sigma, mode="nearest") * np.float32(s))
        second = ndimage.gaussian_filter(image * image, sigma, mode="nearest")
        feats.append(np.sqrt(np.maximum(second - smooth * smooth, 0.0)))
    return np.stack(feats).astype(np.float32)


class AppearanceNet(nn.Module):
    """Per-voxel MLP: (N, F) standardised features -> (N, C + 1) logits (channel 0 = background)."""

    def __init__(self, n_features: int, n_classes: int, hidden: int = 32):
        super().__init__()
        self.register_buffer("mean", torch.zeros(n_features))
        self.register_buffer("std", torch.ones(n_features))
        self.layers = nn.Sequential(nn.Linear(n_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                    nn.Linear(hidden, n_classes + 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers((x - self.mean) / self.std)


def _training_pools(labels: np.ndarray, known: np.ndarray, classes, spacing) -> list[np.ndarray]:
    """Flat voxel indices to sample from: [near background, any background, class 1, class 2, ...]."""
    fg = known & (labels > 0)
    near = ndimage.distance_transform_edt(~fg, sampling=spacing) <= NEAR_MM if fg.any() else np.zeros_like(fg)
    bg = known & (labels == 0)
    pools = [np.flatnonzero(bg & near), np.flatnonzero(bg)]
    pools += [np.flatnonzero(known & (labels == c)) for c in classes]
    return pools


def train_appearance(features: np.ndarray, labels: np.ndarray, known: np.ndarray, classes, spacing, *, steps: int = 300,
                     batch: int = 2048, seed: int = 0, init: AppearanceNet | None = None) -> AppearanceNet:
    """Fit the MLP on the painted voxels.

    features: (F, X, Y, Z); labels: (X, Y, Z) class values (valid where ``known``); known: (X, Y, Z) bool,
    the painted planes; classes: the class values (channel c + 1 = classes[c]). ``init`` warm-starts
    (a correction round): its weights are the starting point. Returns the trained net (eval mode, CPU).
    """
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    flat = features.reshape(features.shape[0], -1)
    pools = _training_pools(labels, known, classes, spacing)
    sample = flat[:, np.concatenate([p for p in pools if p.size])[:: max(1, sum(p.size for p in pools) // 20000)]]
    torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    net = AppearanceNet(features.shape[0], len(classes))
    if init is not None:
        net.load_state_dict(init.state_dict())
    else:
        net.mean.copy_(torch.from_numpy(sample.mean(axis=1)))
        net.std.copy_(torch.from_numpy(sample.std(axis=1) + 1e-6))
    targets = [0, 0] + [i + 1 for i in range(len(classes))]
    groups = [(p, t) for p, t in zip(pools, targets) if p.size]
    per = max(1, batch // len(groups))
    params = list(net.layers.parameters())
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    net.train()
    with single_thread():
        _fit(net, params, moments, flat, groups, per, steps, rng)
    return net.eval()


@contextmanager
def single_thread():
    """One torch thread for the MLP's small matrix products: with two threads, each step waits on the
    other thread and, on a loaded 2-core machine, runs about ten times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _fit(net, params, moments, flat, groups, per: int, steps: int, rng) -> None:
    for step in range(1, steps + 1):
        index = np.concatenate([rng.choice(p, per) for p, _ in groups])
        y = torch.from_numpy(np.concatenate([np.full(per, t) for _, t in groups]))
        x = torch.from_numpy(np.ascontiguousarray(flat[:, index].T))
        loss = nn.functional.cross_entropy(net(x), y)
        grads = torch.autograd.grad(loss, params)
        lr = LR * 0.5 * (1.0 + np.cos(np.pi * (step - 1) / steps))
        _adam_step(params, grads, moments, lr, step)


@torch.no_grad()
def _adam_step(params, grads, moments, lr: float, step: int, betas=(0.9, 0.999), eps: float = 1e-8) -> None:
    """One Adam update (Kingma & Ba 2015), written out: ``torch.optim`` costs seconds of imports at first
    use, a large share of an interactive run's budget for a 2k-parameter MLP."""
    for p, g, (m, v) in zip(params, grads, moments):
        m.mul_(betas[0]).add_(g, alpha=1 - betas[0])
        v.mul_(betas[1]).addcmul_(g, g, value=1 - betas[1])
        m_hat = m / (1 - betas[0] ** step)
        v_hat = v / (1 - betas[1] ** step)
        p.sub_(lr * m_hat / (v_hat.sqrt() + eps))


@torch.inference_mode()
def log_odds(net: AppearanceNet, features: np.ndarray, chunk: int = 1 << 18) -> np.ndarray:
    """(F, X, Y, Z) -> (C, X, Y, Z) float32 log-odds of each class against background, clipped to +-8."""
    flat = features.reshape(features.shape[0], -1)
    out = np.empty((net.layers[-1].out_features - 1, flat.shape[1]), np.float32)
    for start in range(0, flat.shape[1], chunk):
        x = torch.from_numpy(np.ascontiguousarray(flat[:, start:start + chunk].T))
        logits = net(x)
        out[:, start:start + chunk] = (logits[:, 1:] - logits[:, :1]).T.numpy()
    np.clip(out, -LOGIT_CLIP, LOGIT_CLIP, out=out)
    return out.reshape((-1,) + features.shape[1:])
