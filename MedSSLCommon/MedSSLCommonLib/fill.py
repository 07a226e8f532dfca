"""Logic of the "MedSSL fill" Segment Editor effect: MRML/VTK images <-> arrays, and the live session.

Qt-free (MRML and VTK only, no torch): the effect (``SegmentEditorMedSSLFillEffect.py``) hands over the
Segment Editor's images and this class does the rest:

* :meth:`MedSSLFillLogic.launch` / :meth:`~MedSSLFillLogic.start`: the source volume, as the editor aligned
  it to the segmentation's geometry (``vtkOrientedImageData``), is written to a job folder once, the
  session (:class:`.session.FewShotSessionClient`) reads it, and the copy is deleted as soon as it has;
* :meth:`MedSSLFillLogic.update`: the merged labelmap of the visible segments (value n = n-th segment,
  as ``GenerateMergedLabelmapForAllSegments`` writes it) -> the painted planes (along the axis painted on
  the fewest slices; every slice along it that holds paint), only the planes that changed since the last
  update are sent, and the session's changed box is pasted into the result;
* :meth:`MedSSLFillLogic.fillLabelmap`: the result as a ``vtkOrientedImageData`` on the source's extent,
  the effect's preview (segment n = value n).

Arrays here are Slicer's (k, j, i); the session speaks (i, j, k) (transposes).
"""

from __future__ import annotations

import os
import shutil

import numpy as np

from . import backend, nodes
from .session import FewShotSessionClient

NOT_ANNOTATED = 255


def imageArray(image) -> np.ndarray:
    """(k, j, i) numpy view of a ``vtkImageData`` (one component)."""
    from vtk.util import numpy_support

    dims = image.GetDimensions()
    return numpy_support.vtk_to_numpy(image.GetPointData().GetScalars()).reshape(dims[::-1])


def imageToWorld(image) -> np.ndarray:
    """4x4 IJK -> RAS of a ``vtkOrientedImageData`` (IJK of the extent's indices, not of the array)."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    image.GetImageToWorldMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def paintingAxis(mask: np.ndarray) -> int:
    """The ITK axis (0 = i, 1 = j, 2 = k) the paint was drawn across: the one along which the fewest slices
    hold paint (ties: k, then j, then i). ``mask``: (k, j, i) bool."""
    counts = {2 - a: int(mask.any(axis=tuple(b for b in range(3) if b != a)).sum()) for a in range(3)}
    return min((2, 1, 0), key=lambda axis: counts[axis])


def paintedPlanes(labels: np.ndarray, axis: int) -> dict:
    """{slice index: (k, j, i)-order 2D labels} of the slices along ITK ``axis`` that hold paint."""
    numpyAxis = 2 - axis
    other = tuple(b for b in range(3) if b != numpyAxis)
    return {int(s): np.take(labels, int(s), axis=numpyAxis) for s in np.flatnonzero((labels > 0).any(axis=other))}


class MedSSLFillLogic:
    """The effect's logic: one live session per Initialize, closed by Apply, Cancel or :meth:`close`.

    python, device, workDir: the backend's Python, ``--device`` and job folder base (defaults as the modules').
    clientFactory: the session client class (tests pass a double).
    """

    def __init__(self, python=None, device=None, workDir=None, clientFactory=FewShotSessionClient):
        self.python = python
        self.device = device
        self.workDir = workDir
        self.clientFactory = clientFactory
        self.client = None
        self.extent = None      # the source image's extent (i0, i1, j0, j1, k0, k1)
        self.matrix = None      # its IJK -> RAS
        self.sentAxis = None
        self.sent = {}          # {slice: 2D labels} last sent along sentAxis
        self.lastUpdate = None  # the session's last SessionResult
        self.jobDir = None      # the image copy's folder, until the session has read it

    @property
    def running(self) -> bool:
        return self.client is not None and self.client.running

    def start(self, sourceImage, onEvent=None) -> None:
        """Start a session on ``sourceImage`` (a ``vtkOrientedImageData``, the aligned source volume) and wait
        until it has read the image."""
        self.launch(sourceImage, onEvent)
        self.waitReady()

    def launch(self, sourceImage, onEvent=None) -> None:
        """Start a session on ``sourceImage`` without waiting (the effect does this when it is selected, so the
        image is read and torch imported while the user paints); :meth:`waitReady` or :meth:`update` wait."""
        self.close()
        array = np.ascontiguousarray(imageArray(sourceImage))
        if array.ndim != 3 or min(array.shape) < 2:
            raise ValueError("MedSSL fill needs a 3D source volume")
        self.extent = tuple(sourceImage.GetExtent())
        self.matrix = imageToWorld(sourceImage)
        origin = self.matrix @ np.array([self.extent[0], self.extent[2], self.extent[4], 1.0])
        ijkToRas = self.matrix.copy()
        ijkToRas[:3, 3] = origin[:3]
        self.jobDir = backend.newJobDirectory("fill", self.workDir)
        try:
            path = nodes.writeArray(array, ijkToRas, os.path.join(self.jobDir, "image.nrrd"))
            self.client = self.clientFactory(path, python=self.python, device=self.device, onEvent=onEvent).launch()
        except BaseException:
            self._removeImageCopy()
            raise
        self.sentAxis, self.sent = None, {}

    def waitReady(self) -> None:
        """Wait until the session has read the image, then delete the copy (no patient data stays on disk)."""
        try:
            self.client.waitReady()
        finally:
            self._removeImageCopy()

    def _removeImageCopy(self) -> None:
        if self.jobDir:
            shutil.rmtree(self.jobDir, ignore_errors=True)
        self.jobDir = None

    def update(self, mergedImage) -> np.ndarray:
        """Send what changed in the painting (``mergedImage``: the merged labelmap, a ``vtkOrientedImageData``
        on the source's lattice) and return the result, (k, j, i) uint8 on the source's extent."""
        if not self.running:
            raise RuntimeError("MedSSL fill: the session is not running (press Initialize)")
        self.waitReady()
        labels = self.labelsOnSource(mergedImage)
        if not labels.any():
            raise ValueError("MedSSL fill: nothing painted in the visible segments; paint a few slices first")
        if labels.max() >= NOT_ANNOTATED:
            raise ValueError(f"MedSSL fill: at most {NOT_ANNOTATED - 1} visible segments")
        axis = paintingAxis(labels > 0)
        planes = paintedPlanes(labels, axis)
        if axis != self.sentAxis and self.sent:
            self.client.setPlanes(self.sentAxis, {}, clear=list(self.sent))
            self.sent = {}
        changed = {k: p for k, p in planes.items() if k not in self.sent or not np.array_equal(self.sent[k], p)}
        removed = [k for k in self.sent if k not in planes]
        if changed or removed:
            self.client.setPlanes(axis, {k: p.T for k, p in changed.items()}, clear=removed)
        self.sentAxis, self.sent = axis, planes
        self.lastUpdate = self.client.update()
        return self.client.labels.T

    def labelsOnSource(self, mergedImage) -> np.ndarray:
        """The merged labelmap pasted into an array on the source's extent ((k, j, i) uint8, 0 outside)."""
        extent = tuple(mergedImage.GetExtent())
        shape = tuple(self.extent[2 * a + 1] - self.extent[2 * a] + 1 for a in (2, 1, 0))
        labels = np.zeros(shape, np.uint8)
        if extent[0] > extent[1] or extent[2] > extent[3] or extent[4] > extent[5]:
            return labels
        if not np.allclose(imageToWorld(mergedImage)[:3, :3], self.matrix[:3, :3], atol=1e-6):
            raise ValueError("MedSSL fill: the segmentation's geometry differs from the source volume's; "
                             "set the segmentation geometry from the source volume")
        source, target = [], []
        for a in (2, 1, 0):  # numpy axes k, j, i
            lo, hi = max(extent[2 * a], self.extent[2 * a]), min(extent[2 * a + 1], self.extent[2 * a + 1])
            if lo > hi:
                return labels
            source.append(slice(lo - extent[2 * a], hi - extent[2 * a] + 1))
            target.append(slice(lo - self.extent[2 * a], hi - self.extent[2 * a] + 1))
        labels[tuple(target)] = imageArray(mergedImage)[tuple(source)]
        return labels

    def fillLabelmap(self, outputLabelmap, result: np.ndarray) -> None:
        """Write ``result`` ((k, j, i) uint8 on the source's extent) into ``outputLabelmap``
        (a ``vtkOrientedImageData``) with the source's extent and geometry."""
        from vtk.util import numpy_support

        import vtk

        outputLabelmap.SetExtent(*self.extent)
        outputLabelmap.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        flat = np.ascontiguousarray(result, np.uint8).ravel()
        scalars = numpy_support.numpy_to_vtk(flat, deep=True, array_type=vtk.VTK_UNSIGNED_CHAR)
        outputLabelmap.GetPointData().SetScalars(scalars)
        matrix = vtk.vtkMatrix4x4()
        for r in range(4):
            for c in range(4):
                matrix.SetElement(r, c, float(self.matrix[r, c]))
        outputLabelmap.SetImageToWorldMatrix(matrix)

    def describe(self) -> str:
        """One line for the effect's status: the last update's mode and time."""
        if self.lastUpdate is None:
            return "session running" if self.running else "no session"
        update = self.lastUpdate
        return f"last update: {update.mode}, {update.latency:.1f} s"

    def close(self) -> None:
        """End the session (nothing is kept on disk)."""
        if self.client is not None:
            self.client.close()
        self.client = None
        self._removeImageCopy()
        self.sentAxis, self.sent, self.lastUpdate = None, {}, None
