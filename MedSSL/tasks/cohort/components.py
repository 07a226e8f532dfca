"""Which classes a cohort model keeps as one connected component when it predicts.

A network trained on a few scans often adds small islands of a class far from the structure (a vessel that
looks like the atrium, a bowel loop that looks like the spleen). nnU-Net decides per class, on its
cross-validation, whether keeping only the largest component helps; a cohort model has too few scans for
that, so the decision is taken from the training labels themselves: a class that is one piece in every
training label where it appears (its largest component holds at least :data:`ONE_PIECE_SHARE` of its
voxels) is kept as one piece in predictions. Paintings not completed into 3D labels (``--no-completion``)
say nothing about 3D connectivity and are skipped. Measured on the cohorts in docs/cohort.md.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from MedSSL.data.painted_planes import IGNORE

#: share of a class' voxels its largest 6-connected component must hold for the class to count as one piece
ONE_PIECE_SHARE = 0.9


def one_piece_classes(labels: np.ndarray) -> dict[int, bool]:
    """{class value: one piece?} for every class in ``labels`` (X, Y, Z) uint8 (0 background, 255 ignored)."""
    out = {}
    for value in np.flatnonzero(np.bincount(labels.reshape(-1), minlength=256)[1:IGNORE]) + 1:
        components, count = ndimage.label(labels == value)
        sizes = np.bincount(components.reshape(-1))[1:]
        out[int(value)] = bool(count and sizes.max() >= ONE_PIECE_SHARE * sizes.sum())
    return out


class ComponentSurvey:
    """Given each 3D training label (dense, or a painting completed by the engine); ``record`` (model.json
    ``cohort.postprocess``) lists the classes that were one piece in every label that holds them."""

    def __init__(self):
        self.seen: dict[int, bool] = {}
        self.record: dict = {"largest_component": []}

    def add(self, labels: np.ndarray) -> None:
        for value, one in one_piece_classes(labels).items():
            self.seen[value] = self.seen.get(value, True) and one
        self.record["largest_component"][:] = sorted(v for v, one in self.seen.items() if one)
