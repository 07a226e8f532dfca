"""The common method of DiRA and CAiD: MoCo-v2 in 3D on the Genesis U-Net (or in 2D on its 2D variant,
for one-slice images), plus restoration of the first view's crop.

Composed of :class:`~MedSSL.models.heads.ProjectionHead`, the EMA key encoder
:class:`~MedSSL.models.momentum.MomentumEncoder` updated by :class:`~MedSSL.models.momentum.TeacherUpdates`
(MoCo updates the key encoder at the start of each forward pass, i.e. once after each optimiser step;
it starts as a copy of the student at the first training step, so ``--init`` weights are copied too),
the negatives' :class:`~MedSSL.models.momentum.FeatureQueue`, :func:`~MedSSL.losses.contrastive.info_nce`,
:func:`~MedSSL.losses.restoration.restoration_mse`, and as views
:func:`~MedSSL.transforms.views.random_resized_crop3d` followed by the Genesis perturbations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from MedSSL.errors import MedSSLError
from MedSSL.losses.contrastive import in_batch_info_nce, info_nce
from MedSSL.losses.restoration import restoration_mse
from MedSSL.methods.base import SSLMethod
from MedSSL.methods.settings import nested
from MedSSL.models.heads import ProjectionHead
from MedSSL.models.momentum import FeatureQueue, MomentumEncoder, TeacherUpdates
from MedSSL.transforms.genesis import GenesisTransformConfig, genesis_transform
from MedSSL.transforms.views import random_resized_crop3d

def view_transform() -> GenesisTransformConfig:
    """The Genesis transform of the contrastive views (settings ``view_*``). The published views (2D)
    are colour jitter (p 0.8), blur (p 0.5), horizontal flip, then cut-out 30 % / out-painting 5 % /
    patch swapping 30 % / nothing 35 %. We use the Genesis transform for the same roles with the same
    rates: flips (Genesis' flip loop); the Bezier intensity curve for the colour jitter (p 0.8); local
    pixel shuffling for the patch swapping (p 0.3); painting p 0.35 of which 85 % in-painting (the
    cut-out, 0.30 overall) and 15 % out-painting (0.05 overall). Genesis draws these independently where
    DiRA picks one distortion; the rates per distortion are the same."""
    return GenesisTransformConfig(local_rate=0.3, nonlinear_rate=0.8, paint_rate=0.35, inpaint_rate=0.85)


@dataclass(frozen=True)
class MoCoSettings:
    """DiRA's and CAiD's common settings (published: 1 NCE + 10 MSE, T 0.2, m 0.999, 128-d MLP head)."""

    nce_weight: float = 1.0
    """Weight of the InfoNCE (instance discrimination) loss (published 1)."""
    mse_weight: float = 10.0
    """Weight of the restoration MSE of view 1's crop (published 10)."""
    temperature: float = 0.2
    """InfoNCE softmax temperature, > 0 (published 0.2)."""
    momentum: float = 0.999
    """EMA momentum of the key encoder (encoder + head), in [0, 1) (published 0.999)."""
    queue_size: int = 4096
    """Negative keys held in the queue (published 65,536; fewer suit small datasets)."""
    embedding_dim: int = 128
    """Size of the projected, L2-normalised embeddings q and k (published 128)."""
    mlp_head: bool = True
    """Projection head: true = MLP Linear-ReLU-Linear (MoCo-v2, published), false = one Linear."""
    crop_scale: tuple = (0.3, 1.0)
    """[low, high] fraction of the cube's volume (area in 2D) kept by each random resized crop, within (0, 1]."""
    shuffle_bn_groups: int = 2
    """Key sub-batches normalised separately, a stand-in for shuffle-BN (1 = off; at most half the batch)."""
    view: GenesisTransformConfig = nested("view_", view_transform)
    """The Genesis perturbations of the views (JSON keys view_*; defaults: see view_transform)."""

    def __post_init__(self):
        if not 0.0 <= float(self.momentum) < 1.0:
            raise MedSSLError("momentum must be in [0, 1)")
        if float(self.temperature) <= 0:
            raise MedSSLError("temperature must be > 0")
        lo, hi = (float(v) for v in self.crop_scale)
        if not 0.0 < lo <= hi <= 1.0:
            raise MedSSLError("crop_scale must be [low, high] with 0 < low <= high <= 1")


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

    Settings = MoCoSettings

    def build_modules(self) -> None:
        s = self.settings
        channels = self.backbone.bottleneck_channels
        self.projection = ProjectionHead(channels, int(s.embedding_dim), channels, bool(s.mlp_head))
        self.teacher = MomentumEncoder(self.backbone, self.projection)
        self.queue = FeatureQueue(int(s.queue_size), int(s.embedding_dim),
                                  torch.Generator().manual_seed(int(s.queue_size)))
        self.register_buffer("teacher_ready", torch.zeros((), dtype=torch.bool))
        self.teacher_updates = TeacherUpdates(self, lambda: self.teacher.copy_from(self.backbone, self.projection),
                                              lambda m: self.teacher.update(self.backbone, self.projection, m))

    # ----- the teacher ----------------------------------------------------------------------------
    def momentum(self) -> float:
        return float(self.settings.momentum)

    def after_step(self, step: int, total_steps: int) -> None:
        self.teacher_updates.after_optimizer_step(self.momentum)

    @torch.no_grad()
    def keys(self, view: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """L2-normalised teacher embeddings of ``view``. While training, the batch is shuffled and cut
        into ``shuffle_bn_groups`` groups normalised separately (single-device stand-in for MoCo's
        shuffle-BN, so BatchNorm statistics cannot leak the positive)."""
        groups = int(self.settings.shuffle_bn_groups)
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
        scale = tuple(float(v) for v in self.settings.crop_scale)
        crop1 = random_resized_crop3d(batch, scale, generator)
        crop2 = random_resized_crop3d(batch, scale, generator)
        view1, target1 = genesis_transform(crop1, self.settings.view, generator)  # 2D: as one-slice cubes
        view2, _ = genesis_transform(crop2, self.settings.view, generator)
        return view1, target1, view2

    # ----- the loss -------------------------------------------------------------------------------
    def extra_loss(self, restored: torch.Tensor, target: torch.Tensor, training: bool) -> tuple[torch.Tensor | None, dict]:
        """Extra loss terms (DiRA's adversary). Default: none."""
        return None, {}

    def training_loss(self, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        training = self.training and torch.is_grad_enabled()
        if training:
            self.teacher_updates.before_training_step(self.momentum)
        view1, target1, view2 = self.make_views(batch, generator)
        logits, bottleneck = self.backbone.forward_with_bottleneck(view1)
        mse, restored = restoration_mse(logits, target1)
        q = F.normalize(self.projection(bottleneck).float(), dim=1)
        k = self.keys(view2, generator)
        nce, acc = info_nce(q, k, self.queue.negatives(), float(self.settings.temperature))
        s = self.settings
        loss = float(s.nce_weight) * nce + float(s.mse_weight) * mse
        parts = {"nce": float(nce.detach()), "mse": float(mse.detach()), "nce_acc": float(acc)}
        extra, extra_parts = self.extra_loss(restored, target1.float(), training)
        if extra is not None:
            loss = loss + extra
        parts.update(extra_parts)
        if training:
            self.queue.enqueue(k)
            self.teacher_updates.after_training_step()
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
        nce = in_batch_info_nce(q, k, float(self.settings.temperature))
        return float(float(self.settings.nce_weight) * nce + float(self.settings.mse_weight) * mse)
