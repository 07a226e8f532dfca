"""Shared parts of the instance-discrimination methods (DiRA, CAiD): MoCo-v2 in 3D on the Genesis U-Net
(or in 2D on its 2D variant, for one-slice images: every part below takes (N, C, X, Y) as well).

* :class:`ProjectionHead`: global average pooling of the bottleneck, then the MoCo-v2 MLP
  (published 2048 -> 2048 -> 128 on a ResNet-50; here ``16w -> 16w -> dim``).
* :class:`MomentumEncoder`: an exponential-moving-average copy of the backbone's encoder
  (``down_tr64`` ... ``down_tr512``) and of the projection head; produces the keys.
* :class:`FeatureQueue`: the FIFO queue of negative keys (a ring buffer with a write pointer).
* :func:`info_nce`: the MoCo InfoNCE loss (positive logit first, cross-entropy with target 0).
* :func:`random_resized_crop3d`: the 3D analogue of RandomResizedCrop (a random sub-box resampled
  to the cube size; a sub-rectangle of a 2D image), done for the whole batch at once with
  ``affine_grid``/``grid_sample``.
* :class:`MoCoRestorationMethod`: the common method of DiRA and CAiD (two views, InfoNCE on the keys of
  the momentum encoder, restoration of the first view's crop); DiRA adds its adversary on top.

The momentum update. MoCo updates the key encoder at the start of each forward pass, i.e. after the
previous optimiser step. :meth:`MoCoRestorationMethod.after_step` does exactly that update; when the
trainer does not call ``after_step`` the next :meth:`training_loss` does it first, so the teacher is
updated once per optimiser step either way (never twice). The teacher starts as a copy of the student at
the first training step (not at construction), so weights loaded with ``--init`` after construction
are copied too.
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F
from torch import nn

from MedSSL.errors import MedSSLError
from MedSSL.transforms.genesis import GenesisTransformConfig, genesis_transform
from MedSSL.methods._restoration import restoration_mse
from MedSSL.methods.base import SSLMethod


class ProjectionHead(nn.Module):
    """GAP of a bottleneck (N, C, x, y, z) or, in 2D, (N, C, x, y) -> (N, dim) (not normalised).
    ``mlp`` False: one Linear."""

    def __init__(self, in_channels: int, dim: int = 128, hidden: int | None = None, mlp: bool = True):
        super().__init__()
        hidden = hidden or in_channels
        if mlp:
            self.fc = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(inplace=True), nn.Linear(hidden, dim))
        else:
            self.fc = nn.Sequential(nn.Linear(in_channels, dim))

    def forward(self, bottleneck: torch.Tensor) -> torch.Tensor:
        return self.fc(bottleneck.float().mean(dim=tuple(range(2, bottleneck.dim()))))


def encoder_modules(backbone: nn.Module) -> list[nn.Module]:
    """The four encoder stages of a GenesisUNet, in order."""
    return [backbone.down_tr64, backbone.down_tr128, backbone.down_tr256, backbone.down_tr512]


class MomentumEncoder(nn.Module):
    """EMA teacher: copies of the encoder stages and the projection head, gradients off.

    ``update(student_backbone, student_head, m)`` sets every parameter to ``m * teacher + (1 - m) *
    student`` (parameters only, as MoCo: the BatchNorm running statistics of the teacher come from its
    own forward passes). ``copy_from`` makes it an exact copy.
    """

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.stages = nn.ModuleList(copy.deepcopy(m) for m in encoder_modules(backbone))
        self.head = copy.deepcopy(head)
        for p in self.parameters():
            p.requires_grad_(False)

    @staticmethod
    def _student_parameters(backbone: nn.Module, head: nn.Module) -> list[nn.Parameter]:
        params = [p for m in encoder_modules(backbone) for p in m.parameters()]
        return params + list(head.parameters())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for stage in self.stages:
            x, _ = stage(x)
        return self.head(x)

    @torch.no_grad()
    def update(self, backbone: nn.Module, head: nn.Module, momentum: float) -> None:
        teacher = list(self.parameters())
        student = self._student_parameters(backbone, head)
        if len(teacher) != len(student):
            raise RuntimeError("momentum encoder and student do not match")
        torch._foreach_mul_(teacher, momentum)
        torch._foreach_add_(teacher, [s.detach().to(t.dtype) for t, s in zip(teacher, student)], alpha=1.0 - momentum)

    @torch.no_grad()
    def copy_from(self, backbone: nn.Module, head: nn.Module) -> None:
        for t, s in zip(self.parameters(), self._student_parameters(backbone, head)):
            t.copy_(s.detach())
        student_buffers = [b for m in encoder_modules(backbone) for b in m.buffers()] + list(head.buffers())
        for t, s in zip(self.buffers(), student_buffers):
            t.copy_(s)


class FeatureQueue(nn.Module):
    """FIFO queue of ``size`` L2-normalised ``dim``-vectors (MoCo's dictionary of negatives).

    A ring buffer: :meth:`enqueue` writes the new keys at ``ptr`` (wrapping round the end) and moves
    ``ptr`` on, so the oldest keys are the ones overwritten. ``filled`` counts real keys (at most
    ``size``). As in MoCo the initial entries are random unit vectors, used as negatives until they
    are overwritten. Buffers, so checkpoints and resume keep the queue.
    """

    def __init__(self, size: int, dim: int, generator: torch.Generator | None = None):
        super().__init__()
        if size < 1:
            raise MedSSLError("queue size must be >= 1")
        self.size, self.dim = int(size), int(dim)
        self.register_buffer("queue", F.normalize(torch.randn(self.size, self.dim, generator=generator), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        keys = keys.detach().to(self.queue.dtype)
        if keys.shape[0] > self.size:  # more keys than room: only the newest fit
            keys = keys[-self.size:]
        n = keys.shape[0]
        idx = (int(self.ptr) + torch.arange(n, device=self.queue.device)) % self.size
        self.queue[idx] = keys
        self.ptr.fill_((int(self.ptr) + n) % self.size)
        self.filled.fill_(min(self.size, int(self.filled) + n))

    def negatives(self) -> torch.Tensor:
        """(size, dim) negatives (a clone, so later enqueues do not change a graph that uses them)."""
        return self.queue.clone().detach()


def info_nce(q: torch.Tensor, k: torch.Tensor, negatives: torch.Tensor, temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """MoCo InfoNCE. q, k: (N, dim) L2-normalised (k without gradient), negatives (K, dim).

    Returns (loss, accuracy of picking the positive among 1 + K candidates).
    """
    pos = (q * k).sum(dim=1, keepdim=True)
    neg = q @ negatives.t()
    logits = torch.cat([pos, neg], dim=1) / temperature
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
    loss = F.cross_entropy(logits, target)
    acc = (logits.argmax(dim=1) == 0).float().mean()
    return loss, acc


def in_batch_info_nce(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """InfoNCE with the other keys of the batch as negatives (q_i's positive is k_i)."""
    logits = q @ k.t() / temperature
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device))


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return low + (high - low) * torch.rand(n, generator=generator, device=generator.device)


def random_resized_crop3d(x: torch.Tensor, scale: tuple, generator: torch.Generator,
                          aspect: float = 4.0 / 3.0) -> torch.Tensor:
    """Random sub-box of each (N, C, X, Y, Z) cube resampled (trilinear) to the cube's size; in 2D the
    same for (N, C, X, Y) images (a sub-rectangle, bilinear): published RandomResizedCrop.

    The box holds a fraction ``U(scale)`` of the cube's volume (of the image's area in 2D); each side is
    that fraction's d-th root (d = 3 or 2 axes) times a log-uniform aspect factor in [1/aspect, aspect]
    per axis (clipped to the cube), and the box lies at a uniform random position inside the cube.
    3D analogue of RandomResizedCrop (published 2D: scale 0.2-1 of the area, aspect 3/4-4/3).
    """
    n, d = x.shape[0], x.dim() - 2
    if d not in (2, 3):
        raise ValueError(f"expected (N, C, X, Y, Z) or (N, C, X, Y), got shape {tuple(x.shape)}")
    device = x.device
    volume = _uniform(n, float(scale[0]), float(scale[1]), generator).to(device)
    log_a = math.log(aspect)
    sides = []
    for _ in range(d):
        jitter = torch.exp(_uniform(n, -log_a, log_a, generator)).to(device)
        sides.append((volume.pow(1.0 / d) * jitter).clamp(max=1.0))
    # sides[a] is the fraction of axis a (X, Y[, Z]); grid coords are ordered last axis first
    theta = torch.zeros(n, d, d + 1, device=device, dtype=torch.float32)
    for row, axis in enumerate(reversed(range(d))):
        f = sides[axis]
        centre = (1.0 - f) * (2.0 * _uniform(n, 0.0, 1.0, generator).to(device) - 1.0)
        theta[:, row, row] = f
        theta[:, row, d] = centre
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)


# --------------------------------------------------------------------------------------------------
# the common DiRA / CAiD method
# --------------------------------------------------------------------------------------------------

#: Genesis-transform settings for the contrastive views: every key of GenesisTransformConfig prefixed
#: ``view_``. The published views (2D) are colour jitter (p 0.8), blur (p 0.5), horizontal flip, then
#: cut-out 30 % / out-painting 5 % / patch swapping 30 % / nothing 35 %. We use the Genesis transform
#: for the same roles with the same rates: flips (Genesis' flip loop); the Bezier intensity curve for
#: the colour jitter (p 0.8); local pixel shuffling for the patch swapping (p 0.3); painting p 0.35 of
#: which 85 % in-painting (the cut-out, 0.30 overall) and 15 % out-painting (0.05 overall). Genesis
#: draws these independently where DiRA picks one distortion; the rates per distortion are the same.
VIEW_TRANSFORM_DEFAULTS = {
    "local_rate": 0.3,
    "nonlinear_rate": 0.8,
    "paint_rate": 0.35,
    "inpaint_rate": 0.85,
}


def view_transform_defaults() -> dict:
    """``view_<field>`` defaults: GenesisTransformConfig's defaults with the view probabilities above."""
    base = dict(GenesisTransformConfig().__dict__)
    for key, value in VIEW_TRANSFORM_DEFAULTS.items():
        if key in base:
            base[key] = value
    return {f"view_{k}": (list(v) if isinstance(v, tuple) else v) for k, v in base.items()}


class MoCoRestorationMethod(SSLMethod):
    """Instance discrimination (MoCo-v2) + restoration of the first view's crop, on the Genesis U-Net.

    Per cube x ((1, X, Y, Z); in 2D an image (1, X, Y) and everything below 2D): two random resized
    crops c1, c2 of x; each goes through the Genesis perturbations (``view_*`` settings) giving views
    v1, v2 and, for v1, the restoration target t1 (c1 with v1's flips, nothing else; in 2D the Genesis
    transform sees one-slice cubes, as Models Genesis does in 2D). The online U-Net sees v1: its output restores t1 (MSE of the sigmoid) and
    its bottleneck, pooled and projected, is the query q. The momentum encoder sees v2 and gives the
    key k. Loss = ``nce_weight`` * InfoNCE(q, k, queue) + ``mse_weight`` * MSE. Then k is enqueued.
    Subclasses add terms through :meth:`extra_loss`.
    """

    common_defaults = {
        "nce_weight": 1.0,
        "mse_weight": 10.0,
        "temperature": 0.2,
        "momentum": 0.999,
        "queue_size": 4096,
        "embedding_dim": 128,
        "mlp_head": True,
        "crop_scale": [0.3, 1.0],
        "shuffle_bn_groups": 2,
    }

    def __init__(self, width: int = 32, in_channels: int = 1, settings: dict | None = None,
                 spatial_dims: int = 3):
        super().__init__(width, in_channels, settings, spatial_dims)
        s = self.settings
        if not 0.0 <= float(s["momentum"]) < 1.0:
            raise MedSSLError("momentum must be in [0, 1)")
        if float(s["temperature"]) <= 0:
            raise MedSSLError("temperature must be > 0")
        lo, hi = (float(v) for v in s["crop_scale"])
        if not 0.0 < lo <= hi <= 1.0:
            raise MedSSLError("crop_scale must be [low, high] with 0 < low <= high <= 1")
        channels = self.backbone.bottleneck_channels
        self.projection = ProjectionHead(channels, int(s["embedding_dim"]), channels, bool(s["mlp_head"]))
        self.teacher = MomentumEncoder(self.backbone, self.projection)
        self.queue = FeatureQueue(int(s["queue_size"]), int(s["embedding_dim"]),
                                  torch.Generator().manual_seed(int(s["queue_size"])))
        self.register_buffer("teacher_ready", torch.zeros((), dtype=torch.bool))
        self.view_config = GenesisTransformConfig(**{
            k[len("view_"):]: (tuple(v) if isinstance(v, list) else v) for k, v in s.items() if k.startswith("view_")
        })
        self._update_pending = False

    # ----- the teacher ----------------------------------------------------------------------------
    @torch.no_grad()
    def momentum_update(self) -> None:
        """teacher <- m * teacher + (1 - m) * student (parameters)."""
        self.teacher.update(self.backbone, self.projection, float(self.settings["momentum"]))

    def after_step(self, step: int, total_steps: int) -> None:
        if self._update_pending:
            self.momentum_update()
            self._update_pending = False

    def _prepare_teacher(self) -> None:
        if not bool(self.teacher_ready):
            self.teacher.copy_from(self.backbone, self.projection)
            self.teacher_ready.fill_(True)
            self._update_pending = False
        elif self._update_pending:  # the trainer did not call after_step: do the update now
            self.momentum_update()
            self._update_pending = False

    @torch.no_grad()
    def keys(self, view: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """L2-normalised teacher embeddings of ``view``. While training, the batch is shuffled and cut
        into ``shuffle_bn_groups`` groups normalised separately (single-device stand-in for MoCo's
        shuffle-BN, so BatchNorm statistics cannot leak the positive)."""
        groups = int(self.settings["shuffle_bn_groups"])
        n = view.shape[0]
        groups = max(1, min(groups, n // 2)) if self.teacher.training else 1
        if groups == 1:
            return F.normalize(self.teacher(view).float(), dim=1)
        perm = torch.randperm(n, generator=generator, device=generator.device).to(view.device)
        out = torch.cat([self.teacher(chunk) for chunk in view[perm].chunk(groups)]).float()
        keys = torch.empty_like(out)
        keys[perm] = out
        return F.normalize(keys, dim=1)

    # ----- views ----------------------------------------------------------------------------------
    def make_views(self, batch: torch.Tensor, generator: torch.Generator):
        """(view1, target1, view2): two augmented views of each cube and view 1's restoration target,
        each the batch's shape ((N, 1, X, Y, Z), or (N, 1, X, Y) in 2D)."""
        scale = tuple(float(v) for v in self.settings["crop_scale"])
        crop1 = random_resized_crop3d(batch, scale, generator)
        crop2 = random_resized_crop3d(batch, scale, generator)
        view1, target1 = genesis_transform(crop1, self.view_config, generator)  # 2D: as one-slice cubes
        view2, _ = genesis_transform(crop2, self.view_config, generator)
        return view1, target1, view2

    # ----- the loss -------------------------------------------------------------------------------
    def extra_loss(self, restored: torch.Tensor, target: torch.Tensor, training: bool) -> tuple[torch.Tensor | None, dict]:
        """Extra loss terms (DiRA's adversary). Default: none."""
        return None, {}

    def training_loss(self, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        training = self.training and torch.is_grad_enabled()
        if training:
            self._prepare_teacher()
        view1, target1, view2 = self.make_views(batch, generator)
        logits, bottleneck = self.backbone.forward_with_bottleneck(view1)
        mse, restored = restoration_mse(logits, target1)
        q = F.normalize(self.projection(bottleneck).float(), dim=1)
        k = self.keys(view2, generator)
        nce, acc = info_nce(q, k, self.queue.negatives(), float(self.settings["temperature"]))
        s = self.settings
        loss = float(s["nce_weight"]) * nce + float(s["mse_weight"]) * mse
        parts = {"nce": float(nce.detach()), "mse": float(mse.detach()), "nce_acc": float(acc)}
        extra, extra_parts = self.extra_loss(restored, target1.float(), training)
        if extra is not None:
            loss = loss + extra
        parts.update(extra_parts)
        if training:
            self.queue.enqueue(k)
            self._update_pending = True
        return loss, parts

    @torch.no_grad()
    def validation_loss(self, batch: torch.Tensor, generator: torch.Generator) -> float:
        """``nce_weight`` * InfoNCE against the other keys of the batch + ``mse_weight`` * MSE.

        Not the queue: it changes as it fills (the training InfoNCE rises while random initial
        entries are replaced by real keys), so checks against it would not compare over time and would
        make the earliest weights look best. Extra (adversarial) terms are left out for the same reason.
        """
        view1, target1, view2 = self.make_views(batch, generator)
        logits, bottleneck = self.backbone.forward_with_bottleneck(view1)
        mse, _ = restoration_mse(logits, target1)
        q = F.normalize(self.projection(bottleneck).float(), dim=1)
        k = self.keys(view2, generator)
        nce = in_batch_info_nce(q, k, float(self.settings["temperature"]))
        return float(float(self.settings["nce_weight"]) * nce + float(self.settings["mse_weight"]) * mse)
