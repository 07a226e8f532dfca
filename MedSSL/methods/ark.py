# One file over 300 lines: the module docstring (40 lines) explains the fusion rule the bundle relies on.
"""Ark (Ma et al., MICCAI 2023, "Foundation Ark: Accruing and Reusing Knowledge"), for segmentation in 3D,
or in 2D when every case of the spec is a one-slice image with a one-slice label map (radiographs).

One model learns from several labelled datasets whose label sets differ (a liver set, a spleen set, an
aorta set...), without unifying their labels:

* shared encoder-decoder: the Genesis U-Net up to its last decoder features F (2w channels);
* one head per dataset: a 1x1x1 convolution (1x1 in 2D) from F to that dataset's background + classes;
* a teacher: an exponential moving average of the whole multi-head model (momentum on a cosine
  ``teacher_momentum`` -> 1.0 over the run), updated after every optimiser step;
* loss on a batch of dataset i: ``(1 - c) * task + c * MSE(F_student, F_teacher)``, where task is
  Dice + cross-entropy of head i on dataset i's own classes with 255 (not annotated) ignored, and c
  follows a cosine from 0 to ``consistency_max`` (0.5) over the run. The student sees the patch with a
  grey-level jitter (brightness/contrast or gamma, probability ``student_jitter_prob``; the published
  limits, or much smaller ones on CT, see :data:`JITTER_RANGES`), the teacher the plain patch; both
  share the geometric augmentation of fine-tuning.
* datasets in turn: step k draws its batch from dataset ``k mod D`` (round robin), class-balanced
  patches as fine-tuning samples them (:class:`~MedSSL.data.sampling.PatchSampler`).
* 2D (``spatial_dims=2``): the same on one-slice cases with the 2D U-Net: patches (X, Y, 1) are cut
  as in 3D and given to the network as (N, 1, X, Y) images with (N, X, Y) targets; the geometric
  augmentation (in-plane rotation and scaling, flips) is the 3D one applied to one-slice patches,
  which only ever moves voxels within the plane.

The bundle is a segmentation bundle. Classes are the union of the datasets' classes by name, numbered
1, 2, ... in spec order (the mapping of each dataset's values is recorded in ``method.datasets``). The
per-dataset heads are folded into one output layer (``out_tr``) over [background + union]:

    fused logit of class g = mean over the heads h that have g of (logit_h(g) - logit_h(background))
    fused logit of background = 0

i.e. each class scores its log-odds against its own head's background. Subtracting a head's background
logit from all of its logits keeps its arg-max, so: a voxel is background when every head calls it
background; a class that only one dataset has wins wherever its head claims it and no other head claims
anything; a class several datasets share (by name) wins wherever all of their heads claim it and no other
head claims anything (its score is the mean of their margins, so where they disagree the mean decides);
where heads claim different classes the largest margin wins. Being linear in F, the rule is
one 1x1x1 convolution, so ``medssl predict`` writes one labelmap with all classes, and ``medssl finetune
--init`` takes the encoder-decoder like any bundle's. The exported network is the teacher's (the
published release is the teacher), ``export`` "student" keeps the student's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from MedSSL.data.labelled import union_classes
from MedSSL.data.labels import IGNORE, LabelMapping, classes_to_json
from MedSSL.data.sampling import PatchSampler, TrainingVolume
from MedSSL.engine.schedule import scheduled
from MedSSL.errors import MedSSLError
from MedSSL.losses.segmentation import MaskedDiceCELoss
from MedSSL.methods.base import PretrainData, SSLMethod, register
from MedSSL.models.heads import fold_heads
from MedSSL.models.momentum import TeacherUpdates, copy_weights, frozen_copy, update_momentum
from MedSSL.transforms.augment import AugmentConfig, augment_batch
from MedSSL.transforms.intensity import JITTER_RANGES, student_jitter

#: the geometric part of fine-tuning's augmentation (intensities untouched), shared by both views
GEOMETRIC = AugmentConfig(contrast=(1.0, 1.0), brightness=0.0, gamma=(1.0, 1.0), noise_std=0.0)

FUSION_RULE = ("fused logit of a class = mean over the heads having it of (class logit - that head's background "
               "logit); fused background logit = 0")


@dataclass(frozen=True)
class ArkSettings:
    """Ark's settings: consistency weight c (cosine 0 -> ``consistency_max``), teacher momentum (cosine ->
    1), the task loss weights, augmentation, the student's grey-level jitter (``auto``: CT limits when
    most cases are CT) and which model the bundle exports."""

    consistency_max: float = 0.5
    """Final consistency weight c, reached on a cosine from 0 over the run, in [0, 1] (published 0.5)."""
    teacher_momentum: float = 0.9
    """Teacher EMA momentum at the start, raised to 1 on a cosine over the run, in [0, 1] (published 0.9)."""
    dice_weight: float = 1.0
    """Weight of Dice in the task loss (published: multi-label BCE instead)."""
    ce_weight: float = 1.0
    """Weight of cross-entropy in the task loss (255 = not annotated, ignored)."""
    augment: bool = True
    """Give student and teacher fine-tuning's geometric augmentation (rotation, scaling, flips; same draw)."""
    student_jitter_prob: float = 0.3
    """Probability of the student's grey-level jitter (brightness/contrast or gamma) per patch."""
    student_jitter: str = "auto"
    """Jitter limits: "published" (+-0.2), "ct" (about 10-20 HU) or "auto" (ct when most cases are CT)."""
    export: str = "teacher"
    """The network the bundle holds: "teacher" (published) or "student"."""

    def __post_init__(self):
        if not 0.0 <= float(self.consistency_max) <= 1.0:
            raise MedSSLError("consistency_max must be in [0, 1]")
        if not 0.0 <= float(self.teacher_momentum) <= 1.0:
            raise MedSSLError("teacher_momentum must be in [0, 1]")
        if self.export not in ("teacher", "student"):
            raise MedSSLError("export must be teacher or student")
        if self.student_jitter not in ("auto", *JITTER_RANGES):
            raise MedSSLError(f"student_jitter must be auto, {' or '.join(JITTER_RANGES)}")


@register
class Ark(SSLMethod):
    name = "ark"
    description = ("Ark: one U-Net accrued from several labelled datasets with different label sets "
                   "(a head per dataset, EMA teacher, consistency); the bundle segments the union of their classes")
    published = (
        "2D chest X-rays (6 public datasets), Swin-B + projector 1376 + one linear head per dataset, multi-label "
        "BCE, L = (1 - c) BCE + c MSE(student, teacher projector features), c cosine 0 -> 0.5, EMA teacher momentum "
        "cosine 0.9 -> 1.0 updated after each dataset pass, datasets one full pass each in turn, SGD 0.3, 200 epochs. "
        "Ours: 3D segmentation on the Genesis U-Net, one 1x1x1 head per dataset on the last decoder features, Dice + "
        "cross-entropy on each dataset's own classes (255 = not annotated ignored), consistency on the decoder "
        "features (no projector), teacher updated every step, datasets in turn one batch each (round robin), "
        "the student's grey-level jitter limited to 10-20 HU on CT (the published +-0.2 would be +-400 HU), "
        "class-balanced patches, the heads folded into one output layer so the bundle segments the union of classes; "
        "one-slice cases (radiographs, as published) train the 2D U-Net with 1x1 heads"
    )
    data_kind = "labelled-datasets"
    supports_2d = True
    Settings = ArkSettings

    def build_modules(self) -> None:
        s = self.settings
        self.jitter = "published" if s.student_jitter == "auto" else s.student_jitter
        self.loss_fn = MaskedDiceCELoss(float(s.dice_weight), float(s.ce_weight))
        self.heads = nn.ModuleList()
        self.teacher = None
        self.dataset_names: list[str] = []
        self.dataset_values: list[list[int]] = []
        self.union: dict[int, dict] = {}
        self.mappings: list[dict[int, int]] = []
        self.register_buffer("teacher_ready", torch.zeros((), dtype=torch.bool))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self.register_buffer("total_steps", torch.zeros((), dtype=torch.long))
        self.register_buffer("batches_drawn", torch.zeros((), dtype=torch.long))
        self.teacher_updates = TeacherUpdates(self, self.copy_teacher, self.momentum_update)

    # ----- the data -------------------------------------------------------------------------------
    def setup(self, data: PretrainData) -> None:
        """One head per dataset (background + its classes) and the teacher (a copy of everything)."""
        datasets = (data.datasets or {}).get("datasets") if isinstance(data.datasets, dict) else data.datasets
        if not datasets:
            raise MedSSLError("ark learns from labelled datasets: give them with --datasets SPEC.json")
        self.configure([d.name for d in datasets], [d.classes for d in datasets])
        self.to(next(self.backbone.parameters()).device)
        if self.settings.student_jitter == "auto":  # CT limits when most cases are CT
            modalities = ((data.datasets or {}).get("summary") or {}).get("modalities") or {}
            self.jitter = "ct" if modalities and max(modalities, key=modalities.get) == "CT" else "published"

    def configure(self, names: list[str], classes: list[dict]) -> None:
        """Build the heads for datasets ``names`` with ``classes`` ({value: {"name", "color"}} each)."""
        self.dataset_names = list(names)
        self.dataset_values = [sorted(int(v) for v in c) for c in classes]
        self.union, own = union_classes([{"classes": c} for c in classes])
        # head channel (1..) -> global value
        self.mappings = [{k + 1: own[i][v] for k, v in enumerate(values)} for i, values in enumerate(self.dataset_values)]
        features = self.backbone.out_tr.final_conv.in_channels
        conv = nn.Conv3d if self.spatial_dims == 3 else nn.Conv2d
        self.heads = nn.ModuleList(conv(features, 1 + len(values), kernel_size=1) for values in self.dataset_values)
        self.teacher = frozen_copy(nn.ModuleDict({"backbone": self.backbone, "heads": self.heads}))

    def _samplers(self, datasets, which: str, patch, rng, shard=None) -> list[PatchSampler | None]:
        samplers = []
        for d, values in zip(datasets, self.dataset_values):
            cases = getattr(d, which)
            if shard is not None and cases:
                cases = [cases[k] for k in shard(len(cases))]
            if not cases:
                samplers.append(None)
                continue
            lut = LabelMapping(values).lut()
            volumes = [TrainingVolume(c.image, lut[np.asarray(c.label)]) for c in cases]
            samplers.append(PatchSampler(volumes, patch, 1 + len(values), rng))
        return samplers

    def _batch(self, sampler: PatchSampler, index: int, batch_size: int, device) -> dict:
        images, targets = sampler.sample(batch_size)
        if self.spatial_dims == 2:  # one-slice patches (N, 1, X, Y, 1) -> 2D images (N, 1, X, Y)
            if images.shape[-1] != 1:
                raise ValueError(f"a 2D method needs one-slice patches, got {tuple(images.shape[2:])}")
            images, targets = images[..., 0], targets[..., 0]
        return {"dataset": index, "image": torch.from_numpy(images.astype(np.float32)).to(device),
                "target": torch.from_numpy(targets.astype(np.int64)).to(device)}

    def batch_source(self, data: PretrainData, batch_size: int, rng: np.random.Generator, device):
        """Round robin: the k-th batch (counted over the run, resumes included) comes from dataset
        ``k mod D``: ``{"dataset": i, "image": (N, 1, X, Y, Z), "target": (N, X, Y, Z) long}``
        (in 2D ``(N, 1, X, Y)`` and ``(N, X, Y)``)."""
        datasets = data.datasets["datasets"]
        samplers = self._samplers(datasets, "cases", data.settings.patch, rng, data.shard)

        def next_batch() -> dict:
            index = int(self.batches_drawn) % len(samplers)
            self.batches_drawn += 1
            return self._batch(samplers[index], index, batch_size, device)

        return next_batch

    def validation_batches(self, data: PretrainData, batch_size: int, device, limit: int = 8) -> list:
        """Fixed batches of the held-out cases (``--val-fraction``), spread over the datasets."""
        datasets = data.datasets["datasets"]
        samplers = self._samplers(datasets, "val_cases", data.settings.patch, np.random.default_rng(data.seed + 1))
        having = [(i, s) for i, s in enumerate(samplers) if s is not None]
        if not having:
            return []
        per = max(1, limit // len(having))
        return [self._batch(s, i, batch_size, device) for i, s in having for _ in range(per)]

    # ----- schedules and the teacher --------------------------------------------------------------
    def consistency_at(self, step: int, total: int) -> float:
        """c of step ``step`` (0-based) of ``total``: cosine from 0 to ``consistency_max``."""
        return scheduled(0.0, float(self.settings.consistency_max), step, total)

    def teacher_momentum_at(self, step: int, total: int) -> float:
        """Momentum of the teacher update after step ``step`` (0-based): cosine from the setting to 1."""
        return scheduled(float(self.settings.teacher_momentum), 1.0, step, total)

    def momentum_update(self, momentum: float) -> None:
        """teacher <- m * teacher + (1 - m) * student, every parameter of the multi-head model."""
        update_momentum([*self.backbone.parameters(), *self.heads.parameters()], self.teacher.parameters(), momentum)

    def copy_teacher(self) -> None:
        copy_weights([self.backbone, self.heads], [self.teacher["backbone"], self.teacher["heads"]])

    def after_step(self, step: int, total_steps: int) -> None:
        self.steps_done.fill_(int(step))
        self.total_steps.fill_(int(total_steps))
        self.teacher_updates.after_optimizer_step(lambda: self.teacher_momentum_at(int(step) - 1, int(total_steps)))

    # ----- the loss -------------------------------------------------------------------------------
    @staticmethod
    def features(backbone: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The last decoder features (N, 2w, X, Y, Z) ((N, 2w, X, Y) for a 2D backbone)."""
        bottleneck, skips = backbone.encode(x)
        return backbone.decode(bottleneck, skips)

    def augment(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The geometric augmentation shared by student and teacher: (N, 1, X, Y, Z) images and
        (N, X, Y, Z) targets, or in 2D (N, 1, X, Y) and (N, X, Y) (augmented as one-slice patches)."""
        return augment_batch(x, y, GEOMETRIC, generator)

    def training_loss(self, batch: dict, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Loss on one batch of :meth:`batch_source` (one dataset's patches, 3D or 2D)."""
        if self.teacher is None:
            raise RuntimeError("ark: setup() was not called with the datasets")
        training = self.training and torch.is_grad_enabled()
        if training:
            self.teacher_updates.before_training_step(
                lambda: self.teacher_momentum_at(int(self.steps_done), int(self.total_steps)))
        index, x, y = int(batch["dataset"]), batch["image"], batch["target"]
        if self.settings.augment:
            x, y = self.augment(x, y, generator)
        student_in = student_jitter(x, float(self.settings.student_jitter_prob), generator, JITTER_RANGES[self.jitter])
        feats = self.features(self.backbone, student_in)
        task, task_parts = self.loss_fn(self.heads[index](feats), y)
        with torch.no_grad():
            target_feats = self.features(self.teacher["backbone"], x)
        consistency = F.mse_loss(feats.float(), target_feats.float())
        c = self.consistency_at(int(self.steps_done), int(self.total_steps))
        loss = (1.0 - c) * task + c * consistency
        if training:
            self.teacher_updates.after_training_step()
        return loss, {"task": float(task.detach()), "consistency": float(consistency.detach()), "c": c,
                      "dataset": float(index), **task_parts}

    @torch.no_grad()
    def validation_loss(self, batch: dict, generator: torch.Generator) -> float:
        """Task loss (Dice + CE) of the model the bundle exports, on its dataset's head."""
        backbone, heads = self.exported()
        logits = heads[int(batch["dataset"])](self.features(backbone, batch["image"]))
        return float(self.loss_fn(logits, batch["target"])[0])

    # ----- the bundle -----------------------------------------------------------------------------
    def exported(self) -> tuple[nn.Module, nn.ModuleList]:
        """(backbone, heads) that go into the bundle: the teacher's once it exists, unless ``export``
        is "student"."""
        if self.settings.export == "teacher" and self.teacher is not None and bool(self.teacher_ready):
            return self.teacher["backbone"], self.teacher["heads"]
        return self.backbone, self.heads

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight (1 + U, 2w), bias) of the fused output layer of the exported heads (2D or 3D alike)."""
        _, heads = self.exported()
        return fold_heads(list(heads), self.mappings, len(self.union))

    def transferable_state_dict(self) -> dict:
        """A plain GenesisUNet state dict (no prefix): the exported encoder-decoder with ``out_tr`` = the
        folded heads, so the bundle loads strictly as a segmentation network of 1 + U outputs (a 2D
        one, ``GenesisUNet(spatial_dims=2)``, for a 2D method)."""
        backbone, _ = self.exported()
        state = {k: v for k, v in backbone.state_dict().items() if not k.startswith("out_tr.")}
        weight, bias = self.folded()
        shape = (weight.shape[0], weight.shape[1]) + (1,) * self.spatial_dims
        state["out_tr.final_conv.weight"] = weight.view(shape).to(backbone.out_tr.final_conv.weight.dtype)
        state["out_tr.final_conv.bias"] = bias.to(backbone.out_tr.final_conv.bias.dtype)
        return state

    def bundle_meta(self) -> dict:
        n = len(self.union)
        return {
            "task": "segment",
            "architecture": {"out_channels": 1 + n},
            "classes": classes_to_json(self.union),
            "channels": list(range(1 + n)),
            "detection": False,
            "inference": {"overlap": 0.5, "blend": "gaussian"},
        }

    def describe(self) -> dict:
        datasets = []
        for name, values, mapping in zip(self.dataset_names, self.dataset_values, self.mappings):
            datasets.append({"name": name,
                             "classes": {str(v): self.union[mapping[k + 1]]["name"] for k, v in enumerate(values)},
                             "global_values": {str(v): mapping[k + 1] for k, v in enumerate(values)}})
        exported = "teacher" if self.exported()[0] is not self.backbone else "student"
        return {**super().describe(), "datasets": datasets, "fusion": FUSION_RULE, "exported": exported,
                "student_jitter_used": self.jitter, "ignore_value": IGNORE}
