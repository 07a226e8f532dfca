"""Sparse annotations: a segmentation painted on a few slices, in any view -> a training label map.

The label map is uint8 on the volume's grid: 255 = not annotated (ignored by the loss), 0 = background,
1..254 = the painted classes (segment order). A *painted plane* is a whole slice along one of the volume's
three IJK axes in which the user painted; every voxel of a painted plane holds 0 or a class value, every
voxel outside the painted planes 255. Planes along several axes at once are fine (two axial slices and one
sagittal slice, say).

How the painted planes are found (the rule, :func:`paintedPlanes`):

1. The paint is split into connected components (26-connectivity, all segments together).
2. A component at most :data:`MAX_STROKE_THICKNESS` voxels thick along some axis is a stroke painted in a
   view across that axis (a slice view paints a single voxel layer along its normal; two layers are
   tolerated for views slightly oblique to the volume). Its painting axis is the axis of its smallest
   extent (ties: k, then j, then i, i.e. the acquisition plane first); each slice it occupies along that
   axis is a painted plane.
3. A component thick along all three axes is either strokes painted in different views that cross (an
   axial and a sagittal stroke through the same organ touch), or a volumetric (dense) segmentation. The
   voxels of it that are thin (at most MAX_STROKE_THICKNESS) along an axis vote for their slice along
   that axis; slices where such voxels are at least half of the slice's paint (and at least
   :data:`MIN_PLANE_VOXELS`) are painted planes. If those planes hold (nearly) all of the component, they
   are its planes.
4. Otherwise the component is volumetric (for example a segmentation made by thresholding, another model,
   or "Fill between slices"): every slice it spans along its thinnest axis is a painted plane, i.e. the
   segmentation is trusted as complete on each slice it crosses; slices beyond it stay not annotated.
"""

from __future__ import annotations

import logging

import numpy as np

from MedSSLCommonLib import nodes

NOT_ANNOTATED = 255
"""Label value of voxels outside the painted planes."""

SLICE_AXIS_K = 2
"""ITK index axis 2 (k): the volume's slice axis (axial slices for an axial scan)."""

MAX_STROKE_THICKNESS = 2
"""A painted component at most this many voxels thick along an axis is a stroke painted across that axis."""

MIN_PLANE_VOXELS = 3
"""Fewest thin voxels that make a slice of crossing strokes a painted plane."""

COVERED_FRACTION = 0.95
"""Share of a thick component that the planes found in it must hold for it to count as crossing strokes."""

_AXIS_PREFERENCE = (0, 1, 2)  # numpy axes (k, j, i): ties go to k, then j, then i


def sparseLabels(segmentationNode, volumeNode, sliceAxis=None, segmentIds=None):
    """Training labels for few-shot fine-tuning.

    segmentationNode: the painted segmentation; volumeNode: the image (the labels are on its grid);
    sliceAxis: None (default) finds the painted planes along any of the three axes (see the module
    docstring); an ITK index axis (0 = i, 1 = j, 2 = k) instead marks every slice along that axis that holds
    paint as annotated. segmentIds: the segments to use (default: all that contain paint, in order).

    Returns (labels (nk, nj, ni) uint8, classes ``{"1": {"name", "color"}, ...}`` in the backend's format,
    painted planes ``{ITK axis: [slice indices]}`` with an entry for each of 0, 1, 2). Raises
    ``ValueError`` when nothing is painted or there are more than 254 classes.
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
    classLabels = renumber[painted]
    if sliceAxis is None:
        planes = paintedPlanes(classLabels > 0)
    else:
        planes = _slicesWithPaint(classLabels > 0, int(sliceAxis))
    return keepPlanes(classLabels, planes), classes, planes


def paintedPlanes(mask) -> dict[int, list[int]]:
    """The painted planes of a painted-voxel mask (nk, nj, ni): ``{ITK axis: sorted slice indices}``."""
    from scipy import ndimage

    mask = np.asarray(mask, bool)
    found = {0: set(), 1: set(), 2: set()}  # numpy axes
    components, count = ndimage.label(mask, structure=np.ones((3, 3, 3), bool))
    for number, box in enumerate(ndimage.find_objects(components), start=1):
        if box is None:
            continue
        component = components[box] == number
        extents = [s.stop - s.start for s in box]
        offsets = [s.start for s in box]
        if min(extents) <= MAX_STROKE_THICKNESS:
            axis = min(_AXIS_PREFERENCE, key=lambda a: (extents[a], _AXIS_PREFERENCE.index(a)))
            found[axis].update(range(box[axis].start, box[axis].stop))
            continue
        crossing = _crossingStrokePlanes(component)
        if crossing is not None:
            for axis, local in crossing.items():
                found[axis].update(offsets[axis] + s for s in local)
        else:  # volumetric: every slice it spans along its thinnest axis
            axis = min(_AXIS_PREFERENCE, key=lambda a: (extents[a], _AXIS_PREFERENCE.index(a)))
            found[axis].update(range(box[axis].start, box[axis].stop))
    return {2 - axis: sorted(int(s) for s in slices) for axis, slices in found.items()}


def _thinAlong(mask, axis) -> np.ndarray:
    """Voxels of ``mask`` in a run of at most MAX_STROKE_THICKNESS (= 2) painted voxels along ``axis``."""
    def shifted(step):
        out = np.zeros_like(mask)
        source = [slice(None)] * 3
        target = [slice(None)] * 3
        if step > 0:
            source[axis], target[axis] = slice(0, -step), slice(step, None)
        else:
            source[axis], target[axis] = slice(-step, None), slice(0, step)
        out[tuple(target)] = mask[tuple(source)]
        return out  # out[v] = mask[v - step]

    before1, before2, after1, after2 = shifted(1), shifted(2), shifted(-1), shifted(-2)
    thick = (before1 & after1) | (before1 & before2) | (after1 & after2)
    return mask & ~thick


def _crossingStrokePlanes(component) -> dict[int, list[int]] | None:
    """Planes of strokes painted in different views that touch (numpy axis -> local slices), or None when
    they do not hold (nearly) the whole component (then it is volumetric)."""
    planes = {}
    covered = np.zeros_like(component)
    for axis in range(3):
        thin = _thinAlong(component, axis)
        other = tuple(a for a in range(3) if a != axis)
        votes = thin.sum(axis=other)
        paint = component.sum(axis=other)
        chosen = [int(s) for s in np.flatnonzero((votes >= MIN_PLANE_VOXELS) & (2 * votes >= paint))]
        if chosen:
            planes[axis] = chosen
            index = [slice(None)] * 3
            index[axis] = chosen
            covered[tuple(index)] = True
    held = np.count_nonzero(component & covered)
    if not planes or held < COVERED_FRACTION * np.count_nonzero(component):
        return None
    return planes


def _slicesWithPaint(mask, sliceAxis) -> dict[int, list[int]]:
    """Every slice along ITK axis ``sliceAxis`` that holds paint (the forced-axis rule)."""
    numpyAxis = 2 - sliceAxis
    other = tuple(a for a in range(3) if a != numpyAxis)
    planes = {0: [], 1: [], 2: []}
    planes[sliceAxis] = [int(s) for s in np.flatnonzero(np.any(mask, axis=other))]
    return planes


def keepPlanes(classLabels, planes) -> np.ndarray:
    """uint8 labels: ``classLabels`` on the painted planes (``{ITK axis: slices}``), 255 elsewhere."""
    labels = np.full(classLabels.shape, NOT_ANNOTATED, np.uint8)
    for itkAxis, slices in planes.items():
        if not slices:
            continue
        index = [slice(None)] * 3
        index[2 - int(itkAxis)] = list(slices)
        labels[tuple(index)] = classLabels[tuple(index)]
    return labels


def axisNames(volumeNode) -> dict[int, str]:
    """Anatomical name of the slices across each ITK axis of a volume: "axial", "coronal" or "sagittal"
    (from the axis's direction in RAS; the parent transform is not considered)."""
    matrix = nodes.ijkToRasArray(volumeNode)[:3, :3]
    names = {}
    for axis in range(3):
        dominant = int(np.argmax(np.abs(matrix[:, axis])))
        names[axis] = ("sagittal", "coronal", "axial")[dominant]
    return names


ALIGNED_COSINE = 0.9
"""A slice axis within about 25 degrees of R, A or S counts as aligned with it (sagittal, coronal, axial)."""


def sliceName(volumeNode, axis: int, index: int) -> str:
    """What a clinician calls a slice: "axial 40" (or coronal/sagittal) when the volume's ITK ``axis`` is
    aligned with S (or A/R), else "oblique slice k=40"."""
    direction = nodes.ijkToRasArray(volumeNode)[:3, axis]
    direction = direction / (np.linalg.norm(direction) or 1.0)
    dominant = int(np.argmax(np.abs(direction)))
    if abs(direction[dominant]) >= ALIGNED_COSINE:
        return f"{('sagittal', 'coronal', 'axial')[dominant]} {index}"
    return f"oblique slice {'ijk'[axis]}={index}"


def describePlanes(planes, volumeNode=None) -> str:
    """``"painted planes: axial k=12,20; sagittal i=40"`` (ITK axes, slices across them)."""
    names = axisNames(volumeNode) if volumeNode is not None else {0: "", 1: "", 2: ""}
    parts = []
    for axis in (2, 1, 0):
        slices = planes.get(axis) or []
        if slices:
            label = f"{names[axis]} " if names[axis] else ""
            parts.append(f"{label}{'ijk'[axis]}={','.join(str(s) for s in slices)}")
    return "painted planes: " + ("; ".join(parts) if parts else "none")


def annotatedSliceCount(planes) -> int:
    """How many painted planes there are in all."""
    return sum(len(slices) for slices in planes.values())
