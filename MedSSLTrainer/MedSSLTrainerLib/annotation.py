"""Sparse annotations: a segmentation painted on a few slices -> a training labelmap.

Slices (along the volume's slice axis, ITK axis k by default) that contain any painted segment are
"annotated": their painted voxels get the segment's class value (1, 2, ... in segment order) and every
other voxel of them is background (0). All other slices are "not annotated" (255), which the backend
ignores in the loss.
"""

from __future__ import annotations

import logging

import numpy as np

from MedSSLSegmentLib import nodes

NOT_ANNOTATED = 255
"""Label value of voxels on slices the user did not paint."""

SLICE_AXIS_K = 2
"""ITK index axis 2 (k): the volume's slice axis (axial slices for an axial scan)."""


def sparseLabels(segmentationNode, volumeNode, sliceAxis: int = SLICE_AXIS_K, segmentIds=None):
    """Training labels for few-shot fine-tuning.

    segmentationNode: the painted segmentation; volumeNode: the image (the labels are on its grid);
    sliceAxis: ITK index axis (0 = i, 1 = j, 2 = k) along which slices count as annotated or not;
    segmentIds: the segments to use (default: all that contain paint, in segmentation order).

    Returns (labels (nk, nj, ni) uint8, classes ``{"1": {"name", "color"}, ...}`` in the backend's format,
    sorted list of annotated slice indices along ``sliceAxis``). Raises ``ValueError`` when nothing is
    painted or there are more than 254 classes.
    """
    painted, segments = nodes.segmentsLabelmap(segmentationNode, volumeNode, segmentIds)
    present = sorted(int(v) for v in np.unique(painted) if v > 0)
    if not present:
        raise ValueError(f"segmentation '{segmentationNode.GetName()}' has no painted voxels inside "
                         f"volume '{volumeNode.GetName()}': paint a few slices first")
    if len(present) > NOT_ANNOTATED - 1:
        raise ValueError(f"too many segments ({len(present)}); at most {NOT_ANNOTATED - 1} classes")
    dropped = [segments[v - 1]["name"] for v in range(1, len(segments) + 1) if v not in present]
    if dropped:
        logging.info("MedSSL: segments without paint are not used as classes: %s", ", ".join(dropped))
    renumber = np.zeros(max(present) + 1, np.uint8)
    renumber[present] = np.arange(1, len(present) + 1)
    classes = {str(n): {"name": segments[v - 1]["name"], "color": [float(c) for c in segments[v - 1]["color"]]}
               for n, v in enumerate(present, start=1)}
    labels, slices = _keepPaintedSlices(renumber[painted], sliceAxis)
    return labels, classes, slices


def _keepPaintedSlices(classLabels, sliceAxis):
    """(labels with unpainted slices set to 255, painted slice indices) for ITK axis ``sliceAxis``."""
    numpyAxis = 2 - int(sliceAxis)  # numpy arrays are indexed (k, j, i)
    otherAxes = tuple(a for a in range(3) if a != numpyAxis)
    annotated = np.any(classLabels > 0, axis=otherAxes)
    labels = np.full(classLabels.shape, NOT_ANNOTATED, np.uint8)
    index = [slice(None)] * 3
    index[numpyAxis] = annotated
    labels[tuple(index)] = classLabels[tuple(index)]
    return labels, [int(i) for i in np.flatnonzero(annotated)]
