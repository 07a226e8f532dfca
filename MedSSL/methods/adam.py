# One file over 300 lines: the docstring (50 lines) and the settings' descriptions and checks document the published recipe.
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
next training step when the trainer does not call it). The momentum encoder is
:class:`~MedSSL.models.momentum.MomentumEncoder` (encoder stages + head). The bundle's ``backbone.*`` encoder is the teacher's
(published: fine-tuning starts from the teacher), ``export`` "student" keeps the student's.

No validation loss: the self-distillation loss against a moving teacher and a moving curriculum does
not measure progress (a lower value at a coarser level is no better model), so the trainer keeps the
final weights, as published.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from MedSSL.engine.schedule import scheduled
from MedSSL.errors import MedSSLError
from MedSSL.losses.distillation import dino_loss, embedding_distance, normalised_entropy, sharpened_targets
from MedSSL.methods.base import PretrainData, SSLMethod, register
from MedSSL.models.heads import LocalizabilityHead, global_pool, mlp
from MedSSL.models.momentum import MomentumEncoder, TeacherUpdates
from MedSSL.transforms.intensity import gaussian_blur, jitter_intensity
from MedSSL.transforms.views import centre_crop_half, draw_anchor, local_size, part_boxes, sample_boxes, uniform

#: published local crops: 8 nested centre crops, one per area bin (0.05-0.1, 0.1-0.2, ..., 0.7-0.8)
PUBLISHED_LOCAL_BINS = ((0.05, 0.1), (0.1, 0.2), (0.2, 0.3), (0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (0.6, 0.7),
                        (0.7, 0.8))


@dataclass(frozen=True)
class AdamSettings:
    """Adam-v2's settings (published values unless the module docstring says otherwise)."""

    loc_weight: float = 1.0
    """Weight of the localizability (DINO self-distillation) loss (published 1)."""
    comp_weight: float = 1.0
    """Weight of the composability loss (published 1)."""
    decomp_weight: float = 1.0
    """Weight of the decomposability loss (published 1)."""
    out_dim: int = 4096
    """Prototypes of the localizability head, the size of the DINO softmax (published 65,536)."""
    head_hidden: int = 2048
    """Hidden width of the localizability head's MLP (published 2048)."""
    head_bottleneck: int = 256
    """Width of the head's L2-normalised output before the prototypes (published 256)."""
    student_temperature: float = 0.1
    """Student softmax temperature tau_s, > 0 (published 0.1)."""
    teacher_temperature: float = 0.04
    """Teacher softmax temperature tau_t (sharpening), > 0 (published 0.04)."""
    center_momentum: float = 0.9
    """EMA momentum of the center subtracted from the teacher's outputs, in [0, 1] (published 0.9)."""
    teacher_momentum: float = 0.996
    """Teacher EMA momentum at the start, raised to 1 on a cosine over the run, in [0, 1] (published 0.996)."""
    granularity_levels: tuple = (0, 1, 2)
    """Curriculum levels g in turn; the anchor's sides are 2^-g of the cube's (published 0, 1, 2)."""
    granularity_steps: tuple = (10, 90, 165)
    """Each level's share of the optimiser steps, relative weights >= 0 (published 10, 90, 165 epochs)."""
    parts: tuple = (2, 2, 1)
    """Parts of the anchor per axis (X, Y, Z) for (de)composability, counts >= 1 (published 2 x 2 in 2D)."""
    global_scale: tuple = (0.8, 1.0)
    """[low, high] fraction of the anchor's volume (area in 2D) in the student's global crop (published 0.8-1)."""
    local_scale_bins: tuple = PUBLISHED_LOCAL_BINS
    """One nested local crop per [low, high] volume-fraction bin of the anchor (published 8: 0.05-0.1 ... 0.7-0.8)."""
    local_size: float = 0.5
    """Local crops' side as a fraction of the patch's, rounded down to a multiple of 8 (published 96 of 224 px)."""
    rotation_deg: float = 10.0
    """Largest in-plane rotation, in degrees, of the student's global and local crops (uniform +-)."""
    jitter_prob: float = 0.8
    """Probability of the grey-level jitter (brightness, then contrast) of each view (published 0.8)."""
    brightness: float = 0.4
    """Brightness jitter: intensities times U(1 - b, 1 + b) (published 0.4)."""
    contrast: float = 0.4
    """Contrast jitter about the view's mean by U(1 - c, 1 + c) (published 0.4)."""
    blur_prob: tuple = (0.1, 1.0, 0.5)
    """Gaussian blur probability of the teacher's anchor, the global and the local views (published 0.1, 1, 0.5)."""
    blur_sigma: tuple = (0.1, 2.0)
    """[low, high] blur sigma in pixels of a 224-pixel image, scaled to the patch (published 0.1-2)."""
    decompose_norm: str = "whole"
    """Decompose head's L2 norm: over its whole output ("whole", published) or each part's slice ("part")."""
    mse: str = "sum"
    """(De)composability distance: "sum" over the embedding (2 - 2 cos), or "mean" over it (MSELoss's default)."""
    export: str = "teacher"
    """The encoder the bundle's backbone.* holds: "teacher" (published) or "student"."""

    def __post_init__(self):
        s = self
        levels, shares = list(s.granularity_levels), list(s.granularity_steps)
        if not levels or len(levels) != len(shares) or any(int(g) < 0 for g in levels) or any(float(w) < 0 for w in shares) \
                or sum(float(w) for w in shares) <= 0:
            raise MedSSLError("granularity_levels and granularity_steps must be lists of the same length "
                              "(levels >= 0, non-negative step shares, not all 0)")
        if len(s.parts) != 3 or any(int(g) < 1 for g in s.parts) or int(np.prod(s.parts[:2])) < 2:
            raise MedSSLError("parts must be three counts >= 1 (X, Y, Z), at least two parts in the plane")
        for name in ("student_temperature", "teacher_temperature"):
            if float(getattr(s, name)) <= 0:
                raise MedSSLError(f"{name} must be > 0")
        for name in ("center_momentum", "teacher_momentum"):
            if not 0.0 <= float(getattr(s, name)) <= 1.0:
                raise MedSSLError(f"{name} must be in [0, 1]")
        lo, hi = (float(v) for v in s.global_scale)
        if not 0 < lo <= hi <= 1:
            raise MedSSLError("global_scale must be [low, high] with 0 < low <= high <= 1")
        for pair in s.local_scale_bins:
            if len(pair) != 2 or not 0 < float(pair[0]) <= float(pair[1]) <= 1:
                raise MedSSLError("local_scale_bins must be [low, high] pairs with 0 < low <= high <= 1")
        if len(s.blur_prob) != 3:
            raise MedSSLError("blur_prob must be three probabilities (teacher's anchor, global, local views)")
        if s.decompose_norm not in ("whole", "part") or s.mse not in ("sum", "mean") \
                or s.export not in ("teacher", "student"):
            raise MedSSLError("decompose_norm must be whole|part, mse sum|mean, export teacher|student")


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
    Settings = AdamSettings
    supports_2d = True
    #: no validation (see the module docstring): the held-out cubes are trained on too
    trains_on_validation_data = True

    def build_modules(self) -> None:
        s = self.settings
        d = self.backbone.bottleneck_channels
        self.n_parts = int(np.prod([int(g) for g in s.parts][: self.spatial_dims]))
        self.head = LocalizabilityHead(d, int(s.out_dim), int(s.head_hidden), int(s.head_bottleneck))
        self.compose_head = mlp([self.n_parts * d, d, d])
        self.decompose_head = mlp([d, d, self.n_parts * d])
        self.teacher = MomentumEncoder(self.backbone, self.head)
        self.register_buffer("center", torch.zeros(1, int(s.out_dim)))
        self.register_buffer("center_ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("teacher_ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.register_buffer("total_steps", torch.zeros((), dtype=torch.long))
        self.teacher_updates = TeacherUpdates(self, lambda: self.teacher.copy_from(self.backbone, self.head),
                                              lambda m: self.teacher.update(self.backbone, self.head, m))

    # ----- schedules ------------------------------------------------------------------------------
    def granularity_at(self, step: int, total: int) -> int:
        """The granularity level of step ``step`` (0-based) of ``total``: the levels in turn, each for its
        share of the steps. Without a known total (0), the first level."""
        levels = [int(g) for g in self.settings.granularity_levels]
        if total <= 0:
            return levels[0]
        shares = np.asarray([float(w) for w in self.settings.granularity_steps])
        # level i from step cum[i-1] / sum * total on; compared multiplied out (exact for whole shares)
        index = int(np.count_nonzero(np.cumsum(shares) * total <= step * shares.sum()))
        return levels[min(index, len(levels) - 1)]

    def input_sizes(self, patch: tuple) -> list[tuple]:
        """The patch and the local crops' size."""
        return [tuple(patch), tuple(local_size(patch, float(self.settings.local_size)))]

    def teacher_momentum_at(self, step: int, total: int) -> float:
        """Teacher momentum for the update after step ``step`` (0-based): cosine from the setting to 1."""
        return scheduled(float(self.settings.teacher_momentum), 1.0, step, total)

    @property
    def level(self) -> int:
        return self.granularity_at(int(self.steps_done), int(self.total_steps))

    # ----- the teacher ----------------------------------------------------------------------------
    def after_step(self, step: int, total_steps: int) -> None:
        self.steps_done.fill_(int(step))
        self.total_steps.fill_(int(total_steps))
        self.teacher_updates.after_optimizer_step(lambda: self.teacher_momentum_at(int(step) - 1, int(total_steps)))

    @torch.no_grad()
    def teacher_embed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled embedding (N, d), head logits (N, out_dim)) of the teacher."""
        embedding = global_pool(self.teacher.encode(x))
        return embedding, self.teacher.head.project(embedding)

    def student_embed(self, x: torch.Tensor) -> torch.Tensor:
        return global_pool(self.backbone.encode(x)[0])

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
        m = float(self.settings.center_momentum) if bool(self.center_ready) else 0.0
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
        max_angle = math.radians(float(s.rotation_deg))
        jitter = lambda v: jitter_intensity(v, float(s.jitter_prob), float(s.brightness), float(s.contrast), generator)  # noqa: E731
        blur_p = [float(p) for p in s.blur_prob]
        sigma = s.blur_sigma

        anchor = gaussian_blur(jitter(sample_boxes(batch, centre, half, patch)), blur_p[0], sigma, generator)
        g_half = centre_crop_half(half, s.global_scale, generator)
        g_angle = uniform(n, -max_angle, max_angle, generator).cpu()
        global_view = gaussian_blur(jitter(sample_boxes(batch, centre, g_half, patch, g_angle)), blur_p[1], sigma, generator)
        size = local_size(patch, float(s.local_size))
        locals_ = []
        for scale in s.local_scale_bins:
            l_half = centre_crop_half(half, scale, generator)
            angle = uniform(n, -max_angle, max_angle, generator).cpu()
            locals_.append(gaussian_blur(jitter(sample_boxes(batch, centre, l_half, size, angle)), blur_p[2], sigma, generator))
        boxes = part_boxes(centre, half, s.parts)
        parts = [sample_boxes(batch, c, h, patch) for c, h in boxes]
        return {"anchor": anchor, "global": global_view, "locals": locals_, "parts": parts, "level": level,
                "anchor_box": (centre, half), "part_boxes": boxes}

    # ----- the loss -------------------------------------------------------------------------------
    def _distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return embedding_distance(a, b, self.settings.mse)

    def teacher_targets(self, teacher_logits: torch.Tensor) -> torch.Tensor:
        """The teacher's centred and sharpened distribution softmax((t - center) / tau_t), (N, out_dim)."""
        return sharpened_targets(teacher_logits, self.center, float(self.settings.teacher_temperature))

    def localizability_loss(self, teacher_logits: torch.Tensor, student_logits: list[torch.Tensor]) -> torch.Tensor:
        """Mean over the student's views of CE(softmax((t - center) / tau_t), log_softmax(s / tau_s))."""
        return dino_loss(self.teacher_targets(teacher_logits), student_logits, float(self.settings.student_temperature))

    def composability_loss(self, part_embeddings: list[torch.Tensor], teacher_whole: torch.Tensor) -> torch.Tensor:
        composed = F.normalize(self.compose_head(torch.cat(part_embeddings, dim=1)), dim=-1)
        return self._distance(composed, F.normalize(teacher_whole.float(), dim=-1))

    def decomposability_loss(self, whole_embedding: torch.Tensor, teacher_parts: list[torch.Tensor]) -> torch.Tensor:
        n, d = whole_embedding.shape[0], whole_embedding.shape[1]
        out = self.decompose_head(whole_embedding)
        if self.settings.decompose_norm == "whole":
            pieces = F.normalize(out, dim=-1).view(n, self.n_parts, d)
        else:
            pieces = F.normalize(out.view(n, self.n_parts, d), dim=-1)
        return torch.stack([self._distance(pieces[:, p], F.normalize(t.float(), dim=-1))
                            for p, t in enumerate(teacher_parts)]).mean()

    def training_loss(self, batch: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        training = self.training and torch.is_grad_enabled()
        if training:
            self.teacher_updates.before_training_step(
                lambda: self.teacher_momentum_at(int(self.steps_done), int(self.total_steps)))
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
        loss = float(s.loc_weight) * loc + float(s.comp_weight) * comp + float(s.decomp_weight) * decomp
        if training:
            self.update_center(t_logits)
            self.teacher_updates.after_training_step()
        entropy = normalised_entropy(self.teacher_targets(t_logits))  # collapse monitor: 1 uniform, 0 one-hot
        return loss, {"loc": float(loc.detach()), "comp": float(comp.detach()), "decomp": float(decomp.detach()),
                      "granularity": float(views["level"]), "teacher_entropy": entropy}

    def validation_batches(self, data: PretrainData, batch_size: int, device, limit: int = 8) -> list:
        """None: see the module docstring (the final weights are kept)."""
        return []

    # ----- the bundle -----------------------------------------------------------------------------
    def transferable_state_dict(self) -> dict:
        """The whole state; with ``export`` "teacher" (after training started) the ``backbone.*`` encoder
        tensors (weights and BatchNorm statistics) are the teacher's."""
        state = dict(self.state_dict())
        if self.settings.export != "teacher" or not bool(self.teacher_ready):
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
        return {**super().describe(), "exported_encoder": self.settings.export if bool(self.teacher_ready) else "student"}
