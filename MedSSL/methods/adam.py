"""Adam-v2 (Hosseinzadeh Taher et al., CVPR 2024): localizability, composability and decomposability
of anatomy, learned coarse to fine, here in 3D (or 2D) on the Genesis U-Net encoder.

Per cube and step:

* **Anchor.** At granularity level g the anchor is a random sub-box of the cube whose sides are
  ``2^-g`` of the cube's (g = 0: the whole cube, 1: half, 2: quarter along every axis), resampled to
  the patch size. The level follows a curriculum over the run: ``granularity_levels`` in turn, each for
  its share ``granularity_steps`` of the optimiser steps (published: 10-90-165 epochs at g = 0-1-2).
* **Localizability** (DINO self-distillation). The teacher (an exponential moving average of the
  student's encoder and head) sees the anchor x0; the student sees a *global* centre crop of it
  (``global_scale`` of its volume, at the patch size) and ``len(local_scale_bins)`` nested *local*
  centre crops (one per volume-fraction bin, at ``local_size`` of the patch). Embeddings are the global
  average pool of the bottleneck, projected by the localizability head (MLP -> L2 norm -> prototypes
  with unit-norm rows = weight normalisation with g fixed at 1). Loss: the cross-entropy between the
  teacher's centred and sharpened softmax ``softmax((t - center) / tau_t)`` and the student's
  ``log_softmax(s / tau_s)``, averaged over the student's views; the center follows the batch mean of
  the teacher outputs (EMA ``center_momentum``, all-reduced under torchrun).
* **Composability.** The anchor is split into ``parts`` (2 x 2 x 1: four quadrants of the plane,
  every slice); each part, resampled to the patch size, goes through the student encoder; the
  concatenated embeddings go through the compose head (Linear(P d -> d), ReLU, Linear(d -> d)), are
  L2-normalised and must match the teacher's normalised embedding of the whole anchor.
* **Decomposability.** The student's embedding of the whole anchor goes through the decompose head
  (Linear(d -> d), ReLU, Linear(d -> P d)), is L2-normalised as one vector (``decompose_norm``
  "whole", as published; "part" normalises each slice) and each d-slice must match the teacher's
  normalised embedding of the corresponding part.

Loss = ``loc_weight`` L_loc + ``comp_weight`` L_comp + ``decomp_weight`` L_decomp (published 1:1:1).
The distances of the last two are squared Euclidean distances between the (unit) vectors, summed over
the embedding and averaged over the batch (``mse`` "sum" = 2 - 2 cos for unit vectors) or, with
``mse`` "mean", averaged over the embedding too (PyTorch's MSELoss default).

Teacher. Momentum ``teacher_momentum`` -> 1.0 on a cosine over the run (the trainer reports the step
through :meth:`after_step`); the teacher starts as a copy of the student at the first training step
(so ``--init`` weights are copied) and is updated once per optimiser step (by ``after_step``, or by the
next training step when the trainer does not call it). The momentum encoder is the one of
:mod:`._contrastive` (encoder stages + head). The bundle's ``backbone.*`` encoder is the teacher's
(published: fine-tuning starts from the teacher), ``export`` "student" keeps the student's.

No validation loss: the self-distillation loss against a moving teacher and a moving curriculum does
not measure progress (a lower value at a coarser level is no better model), so the trainer keeps the
final weights, as published.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from MedSSL.errors import MedSSLError
from MedSSL.methods._contrastive import MomentumEncoder, _uniform
from MedSSL.methods.base import PretrainData, SSLMethod, register

#: published local crops: 8 nested centre crops, one per area bin (0.05-0.1, 0.1-0.2, ..., 0.7-0.8)
PUBLISHED_LOCAL_BINS = [[0.05, 0.1], [0.1, 0.2], [0.2, 0.3], [0.3, 0.4], [0.4, 0.5], [0.5, 0.6], [0.6, 0.7],
                        [0.7, 0.8]]


class LocalizabilityHead(nn.Module):
    """DINO head: GAP -> Linear(in, h) GELU Linear(h, h) GELU Linear(h, b) -> L2 norm -> prototypes.

    ``prototypes`` (out_dim, b) is used with unit-norm rows (weight normalisation with the norm fixed
    at 1, the published ``norm_last_layer``); linear layers trunc-normal(std 0.02), biases 0.
    """

    def __init__(self, in_channels: int, out_dim: int, hidden: int, bottleneck: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_channels, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(),
                                 nn.Linear(hidden, bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        self.prototypes = nn.Parameter(nn.Linear(bottleneck, out_dim, bias=False).weight.detach().clone())

    def project(self, embedding: torch.Tensor) -> torch.Tensor:
        """(N, in) pooled embeddings -> (N, out_dim) logits (cosines to the prototypes)."""
        h = F.normalize(self.mlp(embedding.float()), dim=-1)
        return h @ F.normalize(self.prototypes, dim=1).t()

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        return self.project(pool(bottleneck))


def pool(bottleneck: torch.Tensor) -> torch.Tensor:
    """Global average pool (N, C, ...) -> (N, C), float32."""
    return bottleneck.float().mean(dim=tuple(range(2, bottleneck.dim())))


def mlp(sizes: list[int]) -> nn.Sequential:
    """Linear layers of ``sizes`` with ReLU between them."""
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


# --------------------------------------------------------------------------------------------------
# geometry: boxes in normalised coordinates, resampled with one affine_grid per batch
# --------------------------------------------------------------------------------------------------


def sample_boxes(x: torch.Tensor, centre: torch.Tensor, half: torch.Tensor, size, angle: torch.Tensor | None = None) -> torch.Tensor:
    """Resample one box per sample of ``x`` (N, C, *S) to ``size`` voxels (linear, zeros outside).

    centre, half: (N, d) in normalised coordinates ([-1, 1] spans the cube), axes in array order
    (X, Y[, Z]); the box is ``centre +- half``. angle: (N,) radians, a rotation of the box in the
    (X, Y) plane about its centre.
    """
    n, c = x.shape[:2]
    d = x.dim() - 2
    theta = torch.zeros(n, d, d + 1, device=x.device, dtype=torch.float32)
    centre, half = centre.to(x.device, torch.float32), half.to(x.device, torch.float32)
    row = lambda axis: d - 1 - axis  # noqa: E731 - affine_grid orders coordinates last axis first
    for axis in range(d):
        theta[:, row(axis), row(axis)] = half[:, axis]
        theta[:, row(axis), d] = centre[:, axis]
    if angle is not None:
        cos, sin = torch.cos(angle).to(x.device), torch.sin(angle).to(x.device)
        rx, ry = row(0), row(1)
        theta[:, rx, rx], theta[:, rx, ry] = cos * half[:, 0], -sin * half[:, 1]
        theta[:, ry, rx], theta[:, ry, ry] = sin * half[:, 0], cos * half[:, 1]
    grid = F.affine_grid(theta, [n, c, *[int(s) for s in size]], align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def draw_anchor(n: int, d: int, level: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(centre, half) of anchors with sides ``2^-level`` of the cube at uniform positions inside it."""
    side = 2.0 ** -int(level)
    half = torch.full((n, d), side)
    centre = (1.0 - side) * (2.0 * torch.rand(n, d, generator=generator, device=generator.device).cpu() - 1.0)
    return centre, half


def centre_crop_half(anchor_half: torch.Tensor, scale, generator: torch.Generator, aspect: float = 4.0 / 3.0) -> torch.Tensor:
    """Half-sides of centre crops holding a fraction ``U(scale)`` of the anchor's volume (area in 2D),
    each side jittered by a log-uniform factor in [1/aspect, aspect] and clipped to the anchor."""
    n, d = anchor_half.shape
    fraction = _uniform(n, float(scale[0]), float(scale[1]), generator).cpu()
    log_a = math.log(aspect)
    jitter = torch.exp(_uniform(n * d, -log_a, log_a, generator).cpu()).view(n, d)
    sides = (fraction.pow(1.0 / d).unsqueeze(1) * jitter).clamp(max=1.0)
    return anchor_half * sides


def part_boxes(centre: torch.Tensor, half: torch.Tensor, grid) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The anchor ``centre +- half`` split into ``grid`` (per axis) equal parts, in C order."""
    d = centre.shape[1]
    grid = [int(g) for g in grid][:d]
    boxes = []
    for index in np.ndindex(*grid):
        offset = torch.tensor([-1.0 + (2 * i + 1) / g for i, g in zip(index, grid)])
        boxes.append((centre + half * offset, half / torch.tensor([float(g) for g in grid])))
    return boxes


def local_size(patch, fraction: float) -> tuple:
    """Local-crop size: ``fraction`` of the patch per axis, rounded down to a multiple of 8 (>= 8)."""
    return tuple(max(8, int(p * fraction) // 8 * 8) if p >= 8 else int(p) for p in patch)


# --------------------------------------------------------------------------------------------------
# intensity augmentation
# --------------------------------------------------------------------------------------------------


def jitter_intensity(x: torch.Tensor, p: float, brightness: float, contrast: float, generator: torch.Generator) -> torch.Tensor:
    """Per sample with probability ``p``: brightness x * U(1 -+ brightness), then contrast about the
    sample's mean by U(1 -+ contrast), clipped to [0, 1] (the grey-level part of ColorJitter)."""
    n = x.shape[0]
    shape = (n,) + (1,) * (x.dim() - 1)
    on = (torch.rand(n, generator=generator, device=generator.device) < p).to(x.device).view(shape)
    b = _uniform(n, 1 - brightness, 1 + brightness, generator).to(x.device).view(shape)
    c = _uniform(n, 1 - contrast, 1 + contrast, generator).to(x.device).view(shape)
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
    sigma = _uniform(n, float(sigma_range[0]), float(sigma_range[1]), generator).cpu()
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


# --------------------------------------------------------------------------------------------------
# the method
# --------------------------------------------------------------------------------------------------


def cosine_ramp(start: float, end: float, step: int, total: int) -> float:
    """``start`` at step 0 to ``end`` at ``total`` along a half cosine."""
    f = min(max(step, 0), max(total, 1)) / max(total, 1)
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * f))


@register
class Adam(SSLMethod):
    name = "adam"
    description = ("Adam-v2: anatomy localizability (DINO teacher-student on nested crops), composability and "
                   "decomposability of parts, coarse-to-fine granularity")
    published = (
        "2D chest X-rays, ResNet-50 / ConvNeXt-B, DINO head 2048-2048-256 -> 65,536 prototypes, student 1 global "
        "(224 px, scale 0.8-1) + 8 nested local centre crops (96 px, area bins 0.05-0.1 ... 0.7-0.8), teacher the "
        "whole anchor; tau_s 0.1, tau_t 0.04, center momentum 0.9, teacher momentum cosine 0.996 -> 1; 2x2 parts; "
        "1:1:1 weights; granularity 0-1-2 over 10-90-165 epochs after a 200-200-100 epoch DINO-only warm-up; "
        "AdamW 5e-4 x batch/256, weight decay 0.04 -> 0.4. Ours: 3D sub-volumes of the cube (2D on one-slice "
        "images) on the Genesis U-Net encoder (GAP of the bottleneck, 16w channels), 4,096 prototypes by default, "
        "parts 2x2x1, local crops at half the patch (multiples of 8), anchors are sub-boxes of the cube (no 50 px "
        "margin), no DINO-only warm-up stage, one run with the curriculum by step fraction, grey-level jitter and "
        "blur as published, in-plane rotation of the student's crops only, the center starts at the first batch's "
        "mean, no validation (final weights kept), the trainer's optimiser and schedule (self-distillation wants a "
        "small --lr, e.g. 5e-4 or less; the published peak is 5e-4 x batch / 256)"
    )
    defaults = {
        "loc_weight": 1.0,
        "comp_weight": 1.0,
        "decomp_weight": 1.0,
        "out_dim": 4096,
        "head_hidden": 2048,
        "head_bottleneck": 256,
        "student_temperature": 0.1,
        "teacher_temperature": 0.04,
        "center_momentum": 0.9,
        "teacher_momentum": 0.996,
        "granularity_levels": [0, 1, 2],
        "granularity_steps": [10, 90, 165],
        "parts": [2, 2, 1],
        "global_scale": [0.8, 1.0],
        "local_scale_bins": PUBLISHED_LOCAL_BINS,
        "local_size": 0.5,
        "rotation_deg": 10.0,
        "jitter_prob": 0.8,
        "brightness": 0.4,
        "contrast": 0.4,
        "blur_prob": [0.1, 1.0, 0.5],
        "blur_sigma": [0.1, 2.0],
        "decompose_norm": "whole",
        "mse": "sum",
        "export": "teacher",
    }
    supports_2d = True

    def __init__(self, width: int = 32, in_channels: int = 1, settings: dict | None = None,
                 spatial_dims: int = 3):
        super().__init__(width, in_channels, settings, spatial_dims)
        s = self.settings
        self._check_settings()
        d = self.backbone.bottleneck_channels
        self.n_parts = int(np.prod([int(g) for g in s["parts"]][: self.spatial_dims]))
        self.head = LocalizabilityHead(d, int(s["out_dim"]), int(s["head_hidden"]), int(s["head_bottleneck"]))
        self.compose_head = mlp([self.n_parts * d, d, d])
        self.decompose_head = mlp([d, d, self.n_parts * d])
        self.teacher = MomentumEncoder(self.backbone, self.head)
        self.register_buffer("center", torch.zeros(1, int(s["out_dim"])))
        self.register_buffer("center_ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("teacher_ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.register_buffer("total_steps", torch.zeros((), dtype=torch.long))
        self._update_pending = False

    def _check_settings(self) -> None:
        s = self.settings
        levels, shares = list(s["granularity_levels"]), list(s["granularity_steps"])
        if not levels or len(levels) != len(shares) or any(int(g) < 0 for g in levels) or any(float(w) < 0 for w in shares) \
                or sum(float(w) for w in shares) <= 0:
            raise MedSSLError("granularity_levels and granularity_steps must be lists of the same length "
                              "(levels >= 0, non-negative step shares, not all 0)")
        if len(s["parts"]) != 3 or any(int(g) < 1 for g in s["parts"]) or int(np.prod(s["parts"][:2])) < 2:
            raise MedSSLError("parts must be three counts >= 1 (X, Y, Z), at least two parts in the plane")
        for name in ("student_temperature", "teacher_temperature"):
            if float(s[name]) <= 0:
                raise MedSSLError(f"{name} must be > 0")
        for name in ("center_momentum", "teacher_momentum"):
            if not 0.0 <= float(s[name]) <= 1.0:
                raise MedSSLError(f"{name} must be in [0, 1]")
        lo, hi = (float(v) for v in s["global_scale"])
        if not 0 < lo <= hi <= 1:
            raise MedSSLError("global_scale must be [low, high] with 0 < low <= high <= 1")
        for pair in s["local_scale_bins"]:
            if len(pair) != 2 or not 0 < float(pair[0]) <= float(pair[1]) <= 1:
                raise MedSSLError("local_scale_bins must be [low, high] pairs with 0 < low <= high <= 1")
        if len(s["blur_prob"]) != 3:
            raise MedSSLError("blur_prob must be three probabilities (teacher's anchor, global, local views)")
        if s["decompose_norm"] not in ("whole", "part") or s["mse"] not in ("sum", "mean") \
                or s["export"] not in ("teacher", "student"):
            raise MedSSLError("decompose_norm must be whole|part, mse sum|mean, export teacher|student")

    # ----- schedules ------------------------------------------------------------------------------
    def granularity_at(self, step: int, total: int) -> int:
        """The granularity level of step ``step`` (0-based) of ``total``: the levels in turn, each for its
        share of the steps. Without a known total (0), the first level."""
        levels = [int(g) for g in self.settings["granularity_levels"]]
        if total <= 0:
            return levels[0]
        shares = np.asarray([float(w) for w in self.settings["granularity_steps"]])
        # level i from step cum[i-1] / sum * total on; compared multiplied out (exact for whole shares)
        index = int(np.count_nonzero(np.cumsum(shares) * total <= step * shares.sum()))
        return levels[min(index, len(levels) - 1)]

    def teacher_momentum_at(self, step: int, total: int) -> float:
        """Teacher momentum for the update after step ``step`` (0-based): cosine from the setting to 1."""
        m0 = float(self.settings["teacher_momentum"])
        return m0 if total <= 0 else cosine_ramp(m0, 1.0, step, total)

    @property
    def level(self) -> int:
        return self.granularity_at(int(self.steps_done), int(self.total_steps))

    # ----- the teacher ----------------------------------------------------------------------------
    @torch.no_grad()
    def momentum_update(self, momentum: float) -> None:
        self.teacher.update(self.backbone, self.head, momentum)

    def after_step(self, step: int, total_steps: int) -> None:
        self.steps_done.fill_(int(step))
        self.total_steps.fill_(int(total_steps))
        if self._update_pending:
            self.momentum_update(self.teacher_momentum_at(int(step) - 1, int(total_steps)))
            self._update_pending = False

    def _prepare_teacher(self) -> None:
        if not bool(self.teacher_ready):
            self.teacher.copy_from(self.backbone, self.head)
            self.teacher_ready.fill_(True)
        elif self._update_pending:  # the trainer did not call after_step
            self.momentum_update(self.teacher_momentum_at(int(self.steps_done), int(self.total_steps)))
        self._update_pending = False

    @torch.no_grad()
    def teacher_embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled embedding (N, d), head logits (N, out_dim)) of the teacher."""
        for stage in self.teacher.stages:
            x, _ = stage(x)
        embedding = pool(x)
        return embedding, self.teacher.head.project(embedding)

    def student_embed(self, x: torch.Tensor) -> torch.Tensor:
        return pool(self.backbone.encode(x)[0])

    @torch.no_grad()
    def update_center(self, teacher_logits: torch.Tensor) -> None:
        """center <- m * center + (1 - m) * batch mean of the teacher logits (over all ranks); the first
        update sets it to the first batch's mean (DINO starts from 0: its first steps then compare
        uncentred, sharper teacher outputs and their loss is not comparable with the later ones)."""
        mean = teacher_logits.detach().float().sum(dim=0, keepdim=True)
        count = torch.tensor(float(teacher_logits.shape[0]), device=mean.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(mean)
            dist.all_reduce(count)
        m = float(self.settings["center_momentum"]) if bool(self.center_ready) else 0.0
        self.center.mul_(m).add_(mean / count, alpha=1.0 - m)
        self.center_ready.fill_(True)

    # ----- views ----------------------------------------------------------------------------------
    def make_views(self, batch: torch.Tensor, generator: torch.Generator, level: int | None = None) -> dict:
        """All inputs of one step for cubes ``batch`` (N, 1, *patch):

        ``anchor`` (N, 1, *patch) the teacher's view x0 (also the student's input for decomposition);
        ``global`` (N, 1, *patch); ``locals`` list of (N, 1, *local_size), one per scale bin;
        ``parts`` list of (N, 1, *patch), the anchor's parts in C order over ``parts``;
        ``level``, and the boxes (``anchor_box``, ``part_boxes``) in the cube's normalised coordinates.
        """
        s = self.settings
        n, d = batch.shape[0], batch.dim() - 2
        patch = tuple(batch.shape[2:])
        level = self.level if level is None else int(level)
        centre, half = draw_anchor(n, d, level, generator)
        max_angle = math.radians(float(s["rotation_deg"]))
        jitter = lambda v: jitter_intensity(v, float(s["jitter_prob"]), float(s["brightness"]), float(s["contrast"]), generator)  # noqa: E731
        blur_p = [float(p) for p in s["blur_prob"]]
        sigma = s["blur_sigma"]

        anchor = gaussian_blur(jitter(sample_boxes(batch, centre, half, patch)), blur_p[0], sigma, generator)
        g_half = centre_crop_half(half, s["global_scale"], generator)
        g_angle = _uniform(n, -max_angle, max_angle, generator).cpu()
        global_view = gaussian_blur(jitter(sample_boxes(batch, centre, g_half, patch, g_angle)), blur_p[1], sigma, generator)
        size = local_size(patch, float(s["local_size"]))
        locals_ = []
        for scale in s["local_scale_bins"]:
            l_half = centre_crop_half(half, scale, generator)
            angle = _uniform(n, -max_angle, max_angle, generator).cpu()
            locals_.append(gaussian_blur(jitter(sample_boxes(batch, centre, l_half, size, angle)), blur_p[2], sigma, generator))
        boxes = part_boxes(centre, half, s["parts"])
        parts = [sample_boxes(batch, c, h, patch) for c, h in boxes]
        return {"anchor": anchor, "global": global_view, "locals": locals_, "parts": parts, "level": level,
                "anchor_box": (centre, half), "part_boxes": boxes}

    # ----- the loss -------------------------------------------------------------------------------
    def _distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        sq = (a - b).pow(2)
        return sq.sum(dim=-1).mean() if self.settings["mse"] == "sum" else sq.mean()

    def teacher_targets(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        """The teacher's centred and sharpened distribution softmax((t - center) / tau_t)."""
        return torch.softmax((teacher_logits.float() - self.center) / float(self.settings["teacher_temperature"]), dim=-1)

    def localizability_loss(self, teacher_logits: torch.Tensor, student_logits: list[torch.Tensor]) -> torch.Tensor:
        """Mean over the student's views of CE(softmax((t - center) / tau_t), log_softmax(s / tau_s))."""
        target = self.teacher_targets(teacher_logits)
        tau_s = float(self.settings["student_temperature"])
        losses = [-(target * F.log_softmax(v.float() / tau_s, dim=-1)).sum(dim=-1).mean() for v in student_logits]
        return torch.stack(losses).mean()

    def composability_loss(self, part_embeddings: list[torch.Tensor], teacher_whole: torch.Tensor) -> torch.Tensor:
        composed = F.normalize(self.compose_head(torch.cat(part_embeddings, dim=1)), dim=-1)
        return self._distance(composed, F.normalize(teacher_whole.float(), dim=-1))

    def decomposability_loss(self, whole_embedding: torch.Tensor, teacher_parts: list[torch.Tensor]) -> torch.Tensor:
        n, d = whole_embedding.shape[0], whole_embedding.shape[1]
        out = self.decompose_head(whole_embedding)
        if self.settings["decompose_norm"] == "whole":
            pieces = F.normalize(out, dim=-1).view(n, self.n_parts, d)
        else:
            pieces = F.normalize(out.view(n, self.n_parts, d), dim=-1)
        return torch.stack([self._distance(pieces[:, p], F.normalize(t.float(), dim=-1))
                            for p, t in enumerate(teacher_parts)]).mean()

    def training_loss(self, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        training = self.training and torch.is_grad_enabled()
        if training:
            self._prepare_teacher()
        views = self.make_views(batch, generator)
        n, parts = batch.shape[0], views["parts"]
        # teacher: the anchor and its parts in one pass
        t_emb, t_logits = self.teacher_embed(torch.cat([views["anchor"], *parts]))
        t_whole, t_parts = t_emb[:n], list(t_emb[n:].split(n))
        t_logits = t_logits[:n]
        # student: global view, parts and the whole anchor at the patch size; local views together
        s_emb = self.student_embed(torch.cat([views["global"], *parts, views["anchor"]]))
        s_global, s_parts, s_whole = s_emb[:n], list(s_emb[n:-n].split(n)), s_emb[-n:]
        s_logits = [self.head.project(s_global)]
        if views["locals"]:
            s_logits += list(self.head.project(self.student_embed(torch.cat(views["locals"]))).split(n))
        if training and not bool(self.center_ready):
            self.update_center(t_logits)  # the first batch's mean (see update_center)
        loc = self.localizability_loss(t_logits, s_logits)
        comp = self.composability_loss(s_parts, t_whole)
        decomp = self.decomposability_loss(s_whole, t_parts)
        s = self.settings
        loss = float(s["loc_weight"]) * loc + float(s["comp_weight"]) * comp + float(s["decomp_weight"]) * decomp
        if training:
            self.update_center(t_logits)
            self._update_pending = True
        with torch.no_grad():  # collapse monitor: 1 = uniform teacher outputs, 0 = one-hot
            p = self.teacher_targets(t_logits)
            entropy = float(-(p * p.clamp_min(1e-12).log()).sum(dim=-1).mean() / math.log(p.shape[-1]))
        return loss, {"loc": float(loc.detach()), "comp": float(comp.detach()), "decomp": float(decomp.detach()),
                      "granularity": float(views["level"]), "teacher_entropy": entropy}

    def batch_source(self, data: PretrainData, batch_size: int, rng: np.random.Generator, device):
        """Random cubes of the training *and* validation sets (there is no validation, see
        :meth:`validation_batches`, so the held-out cubes would otherwise go unused)."""
        if data.val is not None and len(data.val):
            train, val = data.train, data.val
            merged = type(train)(train.files + val.files, train.infos + val.infos, train.selections + val.selections)
            data = dataclasses.replace(data, train=merged, val=None)
        return super().batch_source(data, batch_size, rng, device)

    def validation_batches(self, data: PretrainData, batch_size: int, device, limit: int = 8) -> list:
        """None: see the module docstring (the final weights are kept)."""
        return []

    # ----- the bundle -----------------------------------------------------------------------------
    def transferable_state_dict(self) -> dict:
        """The whole state; with ``export`` "teacher" (after training started) the ``backbone.*`` encoder
        tensors (weights and BatchNorm statistics) are the teacher's."""
        state = dict(self.state_dict())
        if self.settings["export"] != "teacher" or not bool(self.teacher_ready):
            return state
        names = ("down_tr64", "down_tr128", "down_tr256", "down_tr512")
        for key, value in self.teacher.stages.state_dict().items():
            index, rest = key.split(".", 1)
            target = f"backbone.{names[int(index)]}.{rest}"
            if target not in state:
                raise RuntimeError(f"teacher key {key} has no backbone counterpart")
            state[target] = value.detach().clone()  # a copy: safetensors refuses shared storage
        return state

    def describe(self) -> dict:
        return {**super().describe(), "exported_encoder": self.settings["export"] if bool(self.teacher_ready) else "student"}
