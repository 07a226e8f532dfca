"""TransVW (Haghighi et al., IEEE TMI 2021): the journal form of Semantic Genesis ("visual words").

Same self-discovery, self-classification and self-restoration as :mod:`.semantic_genesis` (the
released code is near-identical); only defaults differ: multi-resolution visual words (each instance
also cropped at two other in-plane scales, resized) are on.
"""

from __future__ import annotations

from dataclasses import dataclass

from MedSSL.methods.base import register
from MedSSL.methods.semantic_genesis import SelfDiscoveryMethod, SelfDiscoverySettings


@dataclass(frozen=True)
class TransVWSettings(SelfDiscoverySettings):
    """Semantic Genesis' settings with multi-resolution visual words on."""

    resolutions: int = 3


@register
class TransVW(SelfDiscoveryMethod):
    name = "transvw"
    description = ("TransVW: self-discovered multi-resolution visual words, self-classification (0.01 CE) + "
                   "self-restoration (1 MSE)")
    published = (
        "same code as Semantic Genesis: 44 visual words (50 released) x 200 instances x 3 resolutions, YNet3D, "
        "1 MSE + 0.01 CE, Adam 1e-3 batch 64; ours: as our semantic-genesis with 3 resolutions on by default "
        "(in-plane 0.78-1.25 of the cube, shifted up to 0.16 of it, resized), no elastic warp by default"
    )
    Settings = TransVWSettings
