"""Semantic Genesis (Haghighi et al., MICCAI 2020): self-discovery, self-classification, self-restoration.

1. Self-discovery (:mod:`.self_discovery`, run once in :meth:`SemanticGenesis.batch_source` and cached):
   pattern classes = cubes at the same normalised place in the nearest neighbours (by auto-encoder
   features) of a reference volume.
2. Self-classification: a head on the bottleneck (:class:`~MedSSL.models.heads.ClassificationHead`) predicts
   the pattern class; cross-entropy.
3. Self-restoration: the U-Net restores the pattern cube from a perturbed copy (exactly one of local
   shuffling, Bezier intensity, in-painting, out-painting; optional in-plane elastic warp first); MSE.

Loss = ``mse_weight`` * MSE + ``ce_weight`` * CE (published 1 and 0.01). TransVW (:mod:`.transvw`) is
the same method with its own defaults.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from MedSSL.errors import MedSSLError
from MedSSL.losses.restoration import restoration_mse
from MedSSL.methods.base import PretrainData, SSLMethod, register
from MedSSL.methods.self_discovery.discover import discover_patterns
from MedSSL.methods.self_discovery.patterns import PatternSet
from MedSSL.models.heads import ClassificationHead
from MedSSL.transforms.restoration import elastic_inplane, one_of_four

@dataclass(frozen=True)
class SelfDiscoverySettings:
    """Semantic Genesis' settings: the self-discovery (``classes`` ... ``resolution_shift``, see
    :mod:`.self_discovery`) and the training (loss weights, the perturbations and the elastic warp)."""

    # self-discovery
    classes: int = 44
    """Pattern classes to discover, >= 1; fewer may be found (published 44)."""
    instances: int | str = "auto"
    """Nearest training volumes per class, >= 1, or "auto" = min(200, training volumes) (published 200)."""
    val_instances: int = 30
    """Nearest validation volumes per class, at most the validation volumes there are (published 30)."""
    features: str = "autoencoder"
    """Features ranking the neighbours: "autoencoder" (trained here) or "backbone" (its encoder; with --init)."""
    feature_grid: tuple = (64, 64, 32)
    """Grid (X, Y, Z) the volumes are resized to for the features, multiples of 8 (published 128 x 128 x 64)."""
    ae_width: int = 8
    """Width of the feature auto-encoder (a Genesis U-Net with its skips zeroed)."""
    ae_steps: int = 200
    """Adam steps of the feature auto-encoder's training."""
    ae_batch: int = 4
    """Volumes per auto-encoder training step."""
    ae_lr: float = 1e-3
    """Learning rate of the auto-encoder's Adam."""
    min_class_distance: float = 0.05
    """Least distance between class centres, in normalised coordinates (fractions of each axis; published 5 voxels)."""
    max_tries: int = 200
    """Centre draws per reference volume before the next reference is tried."""
    resolutions: int = 1
    """Crops per training instance: the cube plus resolutions - 1 rescaled in-plane crops, >= 1 (published 3)."""
    resolution_size: tuple = (50 / 64, 80 / 64)
    """[low, high] in-plane size of the extra crops, fractions of the cube (published [50, 80) of 64 voxels)."""
    resolution_shift: float = 10 / 64
    """Largest in-plane shift of the extra crops, a fraction of the cube (published 10 of 64 voxels)."""
    # training
    mse_weight: float = 1.0
    """Weight of the self-restoration MSE (published 1)."""
    ce_weight: float = 0.01
    """Weight of the self-classification cross-entropy (published 0.01)."""
    shuffle_blocks: int = 5
    """Blocks of the local pixel shuffling perturbation (published 5)."""
    perturbation_probabilities: tuple = (0.25, 0.25, 0.25, 0.25)
    """Relative odds of the one perturbation: shuffling, Bezier intensity, in-, out-painting (published 0.25 each)."""
    paint_fill: str = "noise"
    """In-/out-painting fill: "noise" (U[0, 1) per voxel) or "constant" (one U[0, 1) value per box / outside)."""
    elastic: bool = False
    """Warp each cube elastically in-plane before the perturbation (published: on)."""
    elastic_alpha: float = 991.0
    """Elastic displacement scale for a 64-voxel plane, scaled with the cube (published 991)."""
    elastic_sigma: float = 8.0
    """Elastic smoothing sigma in voxels of a 64-voxel plane, scaled with the cube (published 8)."""

    def __post_init__(self):
        if int(self.classes) < 1:
            raise MedSSLError("classes must be >= 1")
        if int(self.resolutions) < 1:
            raise MedSSLError("resolutions must be >= 1 (1 = single resolution, 3 = published multi-resolution)")
        if any(int(g) < 8 or int(g) % 8 for g in self.feature_grid) or len(self.feature_grid) != 3:
            raise MedSSLError("feature_grid must be three multiples of 8")
        if self.features not in ("autoencoder", "backbone"):
            raise MedSSLError('features must be "autoencoder" or "backbone"')
        if self.instances != "auto" and int(self.instances) < 1:
            raise MedSSLError('instances must be "auto" or >= 1')


class SelfDiscoveryMethod(SSLMethod):
    """The shared Semantic Genesis / TransVW method; subclasses set name, texts and defaults."""

    Settings = SelfDiscoverySettings

    def build_modules(self) -> None:
        s = self.settings
        channels = self.backbone.bottleneck_channels
        self.clc_out = ClassificationHead(channels, 2 * channels, int(s.classes))
        self.patterns: PatternSet | None = None
        self._log = print

    # ----- data -------------------------------------------------------------------------------------
    def _backbone_features(self, small: np.ndarray) -> np.ndarray:
        device = next(self.backbone.parameters()).device
        was = self.backbone.training
        self.backbone.eval()
        feats = []
        with torch.no_grad():
            for i in range(0, len(small), 4):
                x = torch.from_numpy(np.asarray(small[i:i + 4], dtype=np.float32)).unsqueeze(1).to(device)
                b, _ = self.backbone.encode(x)
                feats.append(b.float().mean(dim=(2, 3, 4)).cpu().numpy())
        self.backbone.train(was)
        return np.concatenate(feats)

    def _backbone_digest(self) -> str:
        h = hashlib.sha256()
        for key, value in self.backbone.state_dict().items():
            h.update(key.encode())
            h.update(value.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def ensure_patterns(self, data: PretrainData, device) -> PatternSet:
        if self.patterns is None:
            self._log = data.log
            digest = self._backbone_digest() if self.settings.features == "backbone" else None
            self.patterns = discover_patterns(data, self.settings, device, self._backbone_features, digest)
            found = self.patterns.info["classes_found"]
            if found < int(self.settings.classes):
                data.log(f"{self.name}: {found} of {self.settings.classes} classes found; the other outputs of "
                         "the classification head stay unused")
        return self.patterns

    def batch_source(self, data: PretrainData, batch_size: int, rng: np.random.Generator, device):
        patterns = self.ensure_patterns(data, device)
        train = patterns.indices(0)
        train = train[data.shard(len(train))] if hasattr(data, "shard") else train

        def next_batch():
            cubes, labels = patterns.get(rng.choice(train, size=batch_size, replace=len(train) < batch_size))
            return (torch.from_numpy(cubes).unsqueeze(1).to(device, non_blocking=True),
                    torch.from_numpy(labels).to(device))

        return next_batch

    def validation_batches(self, data: PretrainData, batch_size: int, device, limit: int = 8) -> list:
        patterns = self.ensure_patterns(data, device)
        idx = patterns.indices(1)
        if len(idx) == 0:
            data.log(f"{self.name}: no separate validation volume: validating on training patterns (optimistic)")
            idx = patterns.indices(0)
        # a fixed spread over the classes: a seeded permutation, the same every check
        idx = np.random.default_rng(12345).permutation(idx)[: batch_size * limit]
        batches = []
        for i in range(0, len(idx), batch_size):
            cubes, labels = patterns.get(idx[i:i + batch_size])
            batches.append((torch.from_numpy(cubes).unsqueeze(1).to(device), torch.from_numpy(labels).to(device)))
        return batches

    # ----- the loss ---------------------------------------------------------------------------------
    def perturb(self, cubes: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The restoration input: optional elastic warp, then exactly one of the four perturbations."""
        s = self.settings
        x = cubes
        if s.elastic:
            x = elastic_inplane(x, generator, float(s.elastic_alpha), float(s.elastic_sigma))
        x, _ = one_of_four(x, generator, int(s.shuffle_blocks), s.perturbation_probabilities, s.paint_fill)
        return x

    def training_loss(self, batch, generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """batch = (cubes (N, 1, X, Y, Z), labels (N,)) -> mse_weight * MSE + ce_weight * CE."""
        cubes, labels = batch
        inputs = self.perturb(cubes, generator)
        logits, bottleneck = self.backbone.forward_with_bottleneck(inputs)
        mse, _ = restoration_mse(logits, cubes)
        scores = self.clc_out(bottleneck).float()
        ce = F.cross_entropy(scores, labels)
        loss = float(self.settings.mse_weight) * mse + float(self.settings.ce_weight) * ce
        acc = (scores.argmax(dim=1) == labels).float().mean()
        return loss, {"mse": float(mse.detach()), "ce": float(ce.detach()), "cls_acc": float(acc)}

    def describe(self) -> dict:
        out = super().describe()
        if self.patterns is not None:
            info = self.patterns.info
            out["discovered"] = {k: info[k] for k in ("classes_found", "instances", "val_instances", "resolutions",
                                                      "train_volumes", "val_volumes", "feature_dim", "train_cubes",
                                                      "val_cubes")}
        return out


@register
class SemanticGenesis(SelfDiscoveryMethod):
    name = "semantic-genesis"
    description = ("Semantic Genesis: self-discovered anatomical pattern classes, self-classification "
                   "(0.01 CE) + self-restoration (1 MSE)")
    published = (
        "YNet3D (Genesis U-Net + 512->1024 conv head) on LUNA16: 44 classes x 200 neighbour patients from a "
        "128x128x64 Keras auto-encoder, 3 resolutions, elastic + one of four perturbations, 1 MSE + 0.01 CE, "
        "Adam 1e-3 batch 64; ours: same losses/head/perturbations, coordinates as fractions of each volume, "
        "auto-encoder = width-8 Genesis U-Net (skips zeroed) 200 steps on 64x64x32, K = min(200, volumes), "
        "single resolution and no elastic warp by default (both settings)"
    )
