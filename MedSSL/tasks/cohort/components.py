"""Which classes a cohort model cleans of stray pieces when it predicts, and how.

A network trained on a few scans often adds islands of a class away from the structure (a vessel that looks
like the atrium, a bowel loop that looks like the spleen). nnU-Net decides per class, on its
cross-validation, whether keeping only the largest component helps; a cohort model has too few scans for
that, so the classes are chosen from the training labels themselves: a class that is one piece in every
training label where it appears (its largest component holds at least :data:`ONE_PIECE_SHARE` of its
voxels). Paintings not completed into 3D labels (``--no-completion``) say nothing about 3D connectivity and
are skipped. For those classes a prediction loses the pieces smaller than :data:`DROP_SHARE` of the class'
largest piece. Not the largest piece only: an undertrained network's largest piece is sometimes the wrong
one (on an abdominal MR draw the right kidney went from 0.44 to 0.00 Dice that way); docs/cohort.md compares
0.1, 0.2, 0.5 and the largest piece only on three draws of two cohorts (0.2: never below no clean-up).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from MedSSL.data.painted_planes import IGNORE

#: share of a class' voxels its largest 6-connected component must hold for the class to count as one piece
ONE_PIECE_SHARE = 0.9
#: at prediction, pieces of a one-piece class smaller than this share of its largest piece are removed
DROP_SHARE = 0.2


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
    ``cohort.postprocess``) lists the classes that were one piece in every label that holds them and the
    share below which their pieces are dropped at prediction."""

    def __init__(self):
        self.seen: dict[int, bool] = {}
        self.record: dict = {"one_piece_classes": [], "drop_pieces_below": DROP_SHARE}

    def add(self, labels: np.ndarray) -> None:
        for value, one in one_piece_classes(labels).items():
            self.seen[value] = self.seen.get(value, True) and one
        self.record["one_piece_classes"][:] = sorted(v for v, one in self.seen.items() if one)
