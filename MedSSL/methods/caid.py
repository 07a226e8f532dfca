"""CAiD (Taher et al., MIDL 2022): context-aware instance discrimination.

Instance discrimination (MoCo-v2: a momentum encoder, a queue of negatives, InfoNCE) plus context
restoration: the online U-Net restores the un-augmented crop behind its own view. Loss = 1 * InfoNCE +
10 * MSE. The machinery is shared with DiRA (:class:`.contrastive_base.MoCoRestorationMethod`); CAiD is
that method with no extra term. On one-slice images (radiographs, as published) it runs in 2D: the 2D
U-Net, 2D resized crops and the Genesis perturbations of one-slice cubes as views.
"""

from __future__ import annotations

from MedSSL.methods.base import register
from MedSSL.methods.contrastive_base import MoCoRestorationMethod


@register
class CAiD(MoCoRestorationMethod):
    name = "caid"
    description = "CAiD: MoCo-v2 instance discrimination + context restoration of the view (1 NCE + 10 MSE)"
    published = (
        "2D ChestX-ray14, ResNet-50 U-Net, MoCo-v2 (queue 65,536, m 0.999, T 0.2, 128-d MLP head), views = random "
        "resized crops + colour jitter/blur/flip + cut-out/out-paint/patch swaps, 1 NCE + 10 MSE, SGD 0.03 "
        "batch 256 800 epochs; ours: 3D cubes on the Genesis U-Net, 3D resized crops + Genesis perturbations "
        "as views (2D U-Net and 2D crops on one-slice images), key encoder = EMA of the U-Net encoder + head, queue 4096 (small datasets), shuffle-BN "
        "emulated by normalising key sub-batches separately"
    )
    supports_2d = True
