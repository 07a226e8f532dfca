"""DiRA (Haghighi et al., CVPR 2022): discriminative, restorative and adversarial learning, in 3D
(and in 2D on one-slice images such as radiographs: 2D U-Net, 2D views, 2D PatchGAN).

* Discriminative: MoCo-v2 between two views of a cube (shared with CAiD, :mod:`.contrastive_base`).
* Restorative: the online U-Net restores the un-augmented crop behind view 1 (MSE).
* Adversarial: a small 3D PatchGAN-like discriminator D (:class:`~MedSSL.models.heads.Discriminator`) (2D convolutions for a 2D method) tells
  restorations from originals (least-squares GAN: targets 1 for real, 0 for restored).

Generator loss 1 * InfoNCE + 10 * MSE + 0.001 * MSE(D(restored), 1); discriminator loss
0.5 * [MSE(D(original), 1) + MSE(D(restored), 0)].

Staged warm-up (published: train "DiR" first, then "DiRA" initialised from it): the adversarial terms
are off for the first ``adversarial_warmup`` fraction of the steps (the trainer reports the step and
total through ``after_step``; if it never does, the adversary stays off and the log says so).

One optimiser for everything. The trainer has one optimiser over all parameters, so the game is played
inside one loss whose gradient gives each player only its own objective:

* the discriminator term sees the restoration *detached*, so it moves D only;
* the generator's adversarial term runs D with *detached copies of D's parameters*
  (``torch.func.functional_call``), so it moves the U-Net only and never D.

Summing them, one backward pass gives the U-Net d(L_G)/d(theta) and D d(L_D)/d(phi), exactly the two
gradients of the published alternating scheme (computed on the same batch); one optimiser step then
updates both. Differences from the published separate Adam(2e-4, betas 0.5/0.999) for D: D shares the
trainer's optimiser and learning rate (``discriminator_weight`` scales its loss).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from MedSSL.errors import MedSSLError
from MedSSL.losses.adversarial import discriminator_loss, generator_loss
from MedSSL.methods.base import PretrainData, register
from MedSSL.methods.contrastive_base import MoCoRestorationMethod, MoCoSettings
from MedSSL.models.heads import Discriminator


@dataclass(frozen=True)
class DiRASettings(MoCoSettings):
    """MoCo's settings plus the adversary's (published 0.001 adversarial weight)."""

    adv_weight: float = 0.001
    """Weight of the generator's adversarial term MSE(D(restored), 1) (published 0.001)."""
    discriminator_weight: float = 1.0
    """Weight of the discriminator's loss in the shared loss (published: D has its own Adam 2e-4)."""
    adversarial_warmup: float = 0.5
    """Fraction of the steps, in [0, 1], before the adversarial terms switch on (published: a DiR stage first)."""
    discriminator_width: int | None = None
    """Channels of the discriminator's first convolution (null = twice the backbone's width; published 64)."""

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= float(self.adversarial_warmup) <= 1.0:
            raise MedSSLError("adversarial_warmup must be a fraction of the steps in [0, 1]")


@register
class DiRA(MoCoRestorationMethod):
    name = "dira"
    description = ("DiRA: MoCo-v2 discrimination + restoration + adversarial (3D PatchGAN; 2D on one-slice images), "
                   "1 NCE + 10 MSE + 0.001 adv, adversary after a warm-up")
    published = (
        "2D ChestX-ray14, ResNet-50 U-Net, MoCo-v2 (queue 65,536, m 0.999, T 0.2), 2D PatchGAN, 1 NCE + 10 MSE + "
        "0.001 adv, DiR stage then DiRA stage (batch 16, 400 epochs) from its checkpoint, D on its own Adam 2e-4; "
        "ours: 3D cubes on the Genesis U-Net with a 3D PatchGAN, 3D resized crops + Genesis perturbations as "
        "views (on one-slice images: the 2D U-Net, 2D crops and a 2D PatchGAN as published), one run with the adversary switched on after a warm-up fraction, D trained by the same "
        "optimiser (detach tricks, see dira.py), queue 4096"
    )
    supports_2d = True
    Settings = DiRASettings

    def build_modules(self) -> None:
        super().build_modules()
        warm = float(self.settings.adversarial_warmup)
        d_width = self.settings.discriminator_width or 2 * self.backbone.width
        self.discriminator = Discriminator(self.backbone.in_channels, int(d_width), self.spatial_dims)
        self._adversarial_on = warm <= 0.0
        self._told_total = False
        self._warned = False
        self._training_calls = 0
        self._log = print

    def setup(self, data: PretrainData) -> None:
        self._log = data.log

    def adversarial_active(self, step: int, total_steps: int) -> bool:
        """The adversary is on from step ``ceil(adversarial_warmup * total)`` on."""
        return step >= math.ceil(float(self.settings.adversarial_warmup) * total_steps)

    def after_step(self, step: int, total_steps: int) -> None:
        super().after_step(step, total_steps)
        self._told_total = True
        was = self._adversarial_on
        self._adversarial_on = self.adversarial_active(step, total_steps)
        if self._adversarial_on and not was:
            self._log(f"dira: adversarial stage from step {step} of {total_steps}")

    def extra_loss(self, restored: torch.Tensor, target: torch.Tensor, training: bool):
        s = self.settings
        if training:
            self._training_calls += 1
        if not self._adversarial_on:
            if training and self._training_calls > 1 and not self._told_total and not self._warned:
                self._log("dira: the trainer reports no step count (after_step), so the adversarial stage cannot "
                          "start; training DiR (discriminative + restorative) only")
                self._warned = True
            return None, {"adv_g": 0.0, "adv_d": 0.0, "adv_on": 0.0}
        adv_g = generator_loss(self.discriminator, restored)
        extra = float(s.adv_weight) * adv_g
        parts = {"adv_g": float(adv_g.detach()), "adv_on": 1.0}
        if training:
            adv_d = discriminator_loss(self.discriminator, target, restored)
            extra = extra + float(s.discriminator_weight) * adv_d
            parts["adv_d"] = float(adv_d.detach())
        else:
            parts["adv_d"] = 0.0
        return extra, parts
