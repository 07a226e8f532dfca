"""Paintings completed into dense training labels by the few-shot engine.

A user paints k planes of each training scan; the network of the cohort model needs labels in 3D. The
engine (:func:`MedSSL.tasks.fewshot.engine.segment_painted`) completes each painting on its own scan in
seconds; its per-voxel probability of the chosen class tells how sure it is. Voxels it completed with a
probability below ``confidence`` become 255 (not annotated: the loss ignores them), so the network learns
the painted planes exactly, the confident interior and exterior, and not the engine's doubtful boundary.
"""

from __future__ import annotations

import time

import numpy as np

from MedSSL.data.painted_planes import IGNORE, is_painting
from MedSSL.data.spatial import is_one_slice
from MedSSL.tasks.fewshot.engine import FewShotSettings, segment_painted


def complete_painting(image: np.ndarray, spacing, painted: np.ndarray, confidence: float,
                      settings: FewShotSettings = FewShotSettings()) -> tuple[np.ndarray, dict]:
    """(X, Y, Z) uint8 training label from a painting, and what was done.

    image: (X, Y, Z) intensities; spacing: (3,) mm; painted: (X, Y, Z) uint8 (0 background, class values,
    255 not annotated). Painted voxels keep their values; completed voxels whose probability is below
    ``confidence`` (0..1; 0 keeps every completed voxel) become 255.
    """
    started = time.perf_counter()
    _, result = segment_painted(np.asarray(image, np.float32), spacing, painted, settings)
    label = result.labels.astype(np.uint8)
    doubtful = (painted == IGNORE) & (result.probability < confidence)
    label[doubtful] = IGNORE
    info = {"planes": result.planes.count, "seconds": round(time.perf_counter() - started, 2),
            "ignored_fraction": round(float(doubtful.mean()), 5)}
    return label, info


class PaintingCompleter:
    """The ``complete`` hook of :func:`MedSSL.tasks.finetune.segment_data.load_segmentation_data`: paintings of
    3D images are completed (:func:`complete_painting`), dense labels and one-slice images pass unchanged.
    ``records`` lists what was done per scan (no paths), for the bundle and the log."""

    def __init__(self, confidence: float, seed: int = 0, log=None):
        self.confidence, self.seed, self.log = float(confidence), int(seed), log
        self.records: list[dict] = []

    def __call__(self, image, labels: np.ndarray, index: int) -> np.ndarray:
        if is_one_slice(labels.shape) or not is_painting(labels):
            self.records.append({"scan": index, "label": "dense"})
            return labels
        completed, info = complete_painting(image.array, image.spacing, labels, self.confidence,
                                            FewShotSettings(seed=self.seed))
        self.records.append({"scan": index, "label": "painting completed by the few-shot engine", **info})
        if self.log:
            self.log(f"scan {index + 1}: painting of {info['planes']} plane(s) completed by the few-shot engine in "
                     f"{info['seconds']:.1f} s ({100 * info['ignored_fraction']:.1f} % of voxels left out as doubtful)")
        return completed

    @property
    def completed(self) -> int:
        return sum(1 for r in self.records if "planes" in r)
