"""MRML nodes <-> job files (NRRD volumes, labelmaps, JSON findings).

Needs only ``slicer`` MRML classes and a scene: no ``slicer.app``, no ``slicer.modules``, no Qt, so it runs in
Slicer and under the ``slicer-core`` wheel. Volumes are written and read with SimpleITK (shipped with
Slicer); the IJK->RAS <-> LPS conversion is done in :mod:`.geometry`.

Geometry rules: files are LPS (ITK); nodes are RAS. A node's parent transform is not baked into the files;
output nodes are put under the same parent transform as their input volume instead, so they line up.
"""

from __future__ import annotations

import colorsys
import contextlib
import os

import numpy as np
import vtk

import slicer

from .geometry import ijkToRasFromItk, itkFromIjkToRas, lpsToRas, sameGeometry


# --------------------------------------------------------------------------------------------- scene


def getScene(scene=None):
    """``scene`` or ``slicer.mrmlScene``; a clear error when neither exists (bare slicer-core)."""
    if scene is not None:
        return scene
    scene = getattr(slicer, "mrmlScene", None)
    if scene is None:
        raise RuntimeError("no MRML scene: set slicer.mrmlScene = slicer.vtkMRMLScene() or pass scene=")
    return scene


def ijkToRasArray(volumeNode) -> np.ndarray:
    """4x4 IJK->RAS matrix (mm) of a volume node, as numpy (local coordinates, parent transform ignored)."""
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def setIjkToRas(volumeNode, ijkToRas) -> None:
    """Set a volume node's IJK->RAS matrix from a 4x4 numpy array (mm)."""
    matrix = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            matrix.SetElement(r, c, float(ijkToRas[r][c]))
    volumeNode.SetIJKToRASMatrix(matrix)


def checkStillInScene(node) -> None:
    """Raise ``RuntimeError`` if ``node`` was removed from its scene (e.g. while a job was running)."""
    if node is None or node.GetScene() is None:
        raise RuntimeError(f"the input node '{node.GetName() if node else None}' was removed from the scene")


def uniqueName(scene, name: str) -> str:
    """``name`` made unique among the scene's node names (Slicer appends _1, _2, ...)."""
    return scene.GenerateUniqueName(name)


def placeLike(node, referenceNode) -> None:
    """Put ``node`` in the same subject-hierarchy folder/study and (if transformable) under the same parent
    transform as ``referenceNode``. Creates the subject-hierarchy item when the scene has none for ``node`` (as under
    slicer-core, where items are not created automatically)."""
    if node.IsA("vtkMRMLTransformableNode"):
        node.SetAndObserveTransformNodeID(referenceNode.GetTransformNodeID())
    scene = node.GetScene()
    shNode = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if shNode is None:
        return
    referenceItem = shNode.GetItemByDataNode(referenceNode)
    parentItem = shNode.GetItemParent(referenceItem) if referenceItem else shNode.GetSceneItemID()
    item = shNode.GetItemByDataNode(node)
    if not item:
        shNode.CreateItem(parentItem, node)
    else:
        shNode.SetItemParent(item, parentItem)


# ------------------------------------------------------------------------------------------- volumes


def writeArray(array, ijkToRas, path) -> str:
    """Write a (nk, nj, ni) array placed by a 4x4 IJK->RAS matrix (mm) to ``path`` (NRRD recommended:
    LPS header, full double precision). Returns the path."""
    import SimpleITK as sitk

    array = np.ascontiguousarray(array)
    if array.ndim != 3:
        raise ValueError(f"{path}: only 3D scalar volumes can be written (array shape {array.shape})")
    if array.dtype == np.int64:
        array = array.astype(np.int32)
    image = sitk.GetImageFromArray(array)
    origin, spacing, direction = itkFromIjkToRas(ijkToRas)
    image.SetOrigin(tuple(float(v) for v in origin))
    image.SetSpacing(tuple(float(v) for v in spacing))
    image.SetDirection(tuple(float(v) for v in direction.flatten()))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=False)
    return str(path)


def writeVolume(volumeNode, path) -> str:
    """Write a scalar (or labelmap) volume node to ``path`` with its geometry (LPS header). Returns the path."""
    imageData = volumeNode.GetImageData() if volumeNode else None
    if imageData is None:
        raise ValueError(f"volume '{volumeNode.GetName() if volumeNode else None}' has no image data")
    if imageData.GetNumberOfScalarComponents() != 1:
        raise ValueError(f"volume '{volumeNode.GetName()}' has {imageData.GetNumberOfScalarComponents()} "
                         "components per voxel; only scalar volumes are supported")
    return writeArray(slicer.util.arrayFromVolume(volumeNode), ijkToRasArray(volumeNode), path)


def readArray(path) -> tuple[np.ndarray, np.ndarray]:
    """(array (nk, nj, ni), 4x4 IJK->RAS matrix in mm) of a volume file."""
    import SimpleITK as sitk

    image = sitk.ReadImage(str(path))
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{path}: expected a 3D scalar image")
    ijkToRas = ijkToRasFromItk(image.GetOrigin(), image.GetSpacing(), image.GetDirection())
    return sitk.GetArrayFromImage(image), ijkToRas


def _labelDtype(array) -> np.ndarray:
    """Labels as uint8 when they fit, else uint16 (VTK rejects int64)."""
    array = np.asarray(array)
    if array.size and (array.min() < 0 or array.max() > 65535):
        raise ValueError(f"label values out of range: {array.min()}..{array.max()}")
    return array.astype(np.uint8 if (not array.size or array.max() < 256) else np.uint16, copy=False)


def addVolumeFromArray(array, ijkToRas, name, className="vtkMRMLScalarVolumeNode", scene=None,
                       referenceNode=None):
    """New volume node holding ``array`` (nk, nj, ni) placed by ``ijkToRas`` (4x4, mm).

    When ``referenceNode`` has the same grid (shape and matrix within float rounding), its exact matrix is
    used so that outputs sit bit-for-bit on the input's geometry.
    """
    scene = getScene(scene)
    node = scene.AddNewNodeByClass(className, uniqueName(scene, name))
    if className == "vtkMRMLLabelMapVolumeNode":
        array = _labelDtype(array)
    slicer.util.updateVolumeFromArray(node, array)
    if referenceNode is not None and onSameGrid(referenceNode, array.shape, ijkToRas):
        node.CopyOrientation(referenceNode)
    else:
        setIjkToRas(node, ijkToRas)
    return node


def onSameGrid(volumeNode, shape_kji, ijkToRas, tolerance=1e-6) -> bool:
    """True when a volume node has numpy shape ``shape_kji`` and (nearly) the IJK->RAS matrix ``ijkToRas``."""
    imageData = volumeNode.GetImageData()
    if imageData is None or tuple(imageData.GetDimensions()[::-1]) != tuple(shape_kji):
        return False
    return sameGeometry(ijkToRasArray(volumeNode), ijkToRas, tolerance)


# -------------------------------------------------------------------------------------- segmentations


def defaultColor(value: int) -> tuple[float, float, float]:
    """A distinct, saturated RGB color (0..1) for class ``value`` when the bundle names none."""
    hue = (value * 0.618033988749895) % 1.0
    return colorsys.hsv_to_rgb(hue, 0.75, 0.95)


def normaliseClasses(classes) -> dict[int, dict]:
    """Bundle classes ``{"1": {"name": ..., "color": [r, g, b]}}`` -> ``{1: {"name", "color"}}`` with a
    name and a 0..1 color for every class (missing ones filled in)."""
    result = {}
    for key, info in (classes or {}).items():
        value = int(key)
        if value <= 0:
            continue
        info = info if isinstance(info, dict) else {"name": str(info)}
        color = info.get("color") or defaultColor(value)
        color = [float(c) / 255.0 if max(color) > 1.0 else float(c) for c in color[:3]]
        result[value] = {"name": str(info.get("name") or f"class {value}"), "color": color}
    return dict(sorted(result.items()))


def segmentationFromLabelmap(array, ijkToRas, classes, referenceVolume, name, scene=None):
    """New segmentation node from a labelmap (nk, nj, ni) placed by ``ijkToRas`` (4x4, mm).

    One segment per class of ``classes`` (bundle format, see :func:`normaliseClasses`), in class order,
    named and colored as given; a class absent from the labelmap becomes an empty segment; a label value
    with no class becomes "class N". The reference geometry is ``referenceVolume``'s and the node is placed
    next to it (same study and parent transform).
    """
    scene = getScene(scene if scene is not None else referenceVolume.GetScene())
    classes = normaliseClasses(classes)
    array = _labelDtype(array)
    present = [int(v) for v in np.unique(array) if v > 0]
    for value in present:
        classes.setdefault(value, {"name": f"class {value}", "color": list(defaultColor(value))})
    classes = dict(sorted(classes.items()))
    segmentationNode = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", uniqueName(scene, name))
    segmentationNode.CreateDefaultDisplayNodes()
    # Under the volume's parent transform first: Slicer transforms the reference geometry into the
    # segmentation's coordinate frame when it is set, so setting it before would leave it transformed.
    placeLike(segmentationNode, referenceVolume)
    segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(referenceVolume)
    if present:
        _importLabels(segmentationNode, array, ijkToRas, referenceVolume, max(present))
    _nameAndOrderSegments(segmentationNode.GetSegmentation(), classes)
    return segmentationNode


_TEMPORARY_NAME = "medssl-label-{}"


def _importLabels(segmentationNode, array, ijkToRas, referenceVolume, maxValue) -> None:
    """Import every non-zero value of ``array`` as one segment named ``medssl-label-<value>``."""
    scene = segmentationNode.GetScene()
    with temporaryNodes(scene):
        labelmap = addVolumeFromArray(array, ijkToRas, "MedSSL temporary labels", "vtkMRMLLabelMapVolumeNode",
                                      scene, referenceVolume)
        labelmap.SetAndObserveTransformNodeID(referenceVolume.GetTransformNodeID())  # same local frame
        colors = scene.AddNewNodeByClass("vtkMRMLColorTableNode", uniqueName(scene, "MedSSL temporary colors"))
        colors.SetTypeToUser()
        colors.SetNumberOfColors(maxValue + 1)
        colors.SetColor(0, "background", 0.0, 0.0, 0.0, 0.0)
        for value in range(1, maxValue + 1):
            colors.SetColor(value, _TEMPORARY_NAME.format(value), 0.5, 0.5, 0.5, 1.0)
        display = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeDisplayNode")
        display.SetAndObserveColorNodeID(colors.GetID())
        labelmap.SetAndObserveDisplayNodeID(display.GetID())
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(labelmap, segmentationNode):
            raise RuntimeError(f"importing the labelmap into '{segmentationNode.GetName()}' failed")


ANATOMY = ("Segmentation category and type - 3D Slicer General Anatomy list", "SCT^123037004^Anatomical Structure",
           "Anatomic codes - DICOM master list")
"""Slicer's terminology context, the category of anatomical structures (SNOMED CT), and the anatomic context."""

STANDARD_TERMS = {
    "liver": ("10200004", "Liver"), "spleen": ("78961009", "Spleen"), "pancreas": ("15776009", "Pancreas"),
    "kidney": ("64033007", "Kidney"), "left kidney": ("18639004", "Left kidney"),
    "right kidney": ("9846003", "Right kidney"), "lung": ("39607008", "Lung"), "left lung": ("44029006", "Left lung"),
    "right lung": ("3341006", "Right lung"), "heart": ("80891009", "Heart"), "atrium": ("82471001", "Left atrium"),
    "left atrium": ("82471001", "Left atrium"), "right atrium": ("73829009", "Right atrium"),
    "stomach": ("69695003", "Stomach"), "gallbladder": ("28231008", "Gallbladder"), "aorta": ("15825003", "Aorta"),
    "brain": ("12738006", "Brain"), "prostate": ("41216001", "Prostate"),
    "urinary bladder": ("89837001", "Urinary bladder"), "bladder": ("89837001", "Urinary bladder"),
    "esophagus": ("32849002", "Esophagus"),
}
"""Class names (lower case) with a standard term: SNOMED CT code and meaning, as in Slicer's General Anatomy
terminology (the MSD tasks' structures among them: liver, spleen, pancreas, left atrium, lung, prostate)."""


def terminologyEntry(name: str) -> str | None:
    """Slicer's terminology entry string for a class name with a standard term (None otherwise):
    ``context~category~type~typeModifier~anatomicContext~region~regionModifier``, codes as
    ``scheme^code^meaning``."""
    term = STANDARD_TERMS.get(" ".join(str(name).lower().replace("_", " ").split()))
    if term is None:
        return None
    context, category, anatomic = ANATOMY
    return f"{context}~{category}~SCT^{term[0]}^{term[1]}~^^~{anatomic}~^^~^^"


def _nameAndOrderSegments(segmentation, classes) -> None:
    """Rename/recolor imported ``medssl-label-<value>`` segments after ``classes``, add empty segments for
    absent classes, set the standard terminology where the class name has one (:func:`terminologyEntry`) and
    order all segments by class value."""
    byName = {segmentation.GetNthSegment(i).GetName(): segmentation.GetNthSegmentID(i)
              for i in range(segmentation.GetNumberOfSegments())}
    for index, (value, info) in enumerate(classes.items()):
        segmentId = byName.get(_TEMPORARY_NAME.format(value))
        if segmentId is None:
            segmentId = segmentation.AddEmptySegment("", info["name"], info["color"])
        segment = segmentation.GetSegment(segmentId)
        segment.SetName(info["name"])
        segment.SetColor(*info["color"])
        entry = terminologyEntry(info["name"])
        if entry:
            segment.SetTag(slicer.vtkSegment.GetTerminologyEntryTagName(), entry)
        segmentation.SetSegmentIndex(segmentId, index)


def segmentsLabelmap(segmentationNode, referenceVolume, segmentIds=None) -> tuple[np.ndarray, list[dict]]:
    """Rasterise segments onto ``referenceVolume``'s grid.

    Returns (labels (nk, nj, ni) uint8/uint16 where segment n of ``segmentIds`` (default: all, in
    segmentation order) has value n + 1 and 0 is outside every segment; later segments win where segments
    overlap, and [{"id", "name", "color"} per segment]).
    """
    segmentation = segmentationNode.GetSegmentation()
    if segmentIds is None:
        segmentIds = [segmentation.GetNthSegmentID(i) for i in range(segmentation.GetNumberOfSegments())]
    info = []
    for segmentId in segmentIds:
        segment = segmentation.GetSegment(segmentId)
        if segment is None:
            raise ValueError(f"segmentation '{segmentationNode.GetName()}' has no segment '{segmentId}'")
        info.append({"id": segmentId, "name": segment.GetName(), "color": list(segment.GetColor())})
    shape = tuple(referenceVolume.GetImageData().GetDimensions()[::-1])
    if not segmentIds:
        return np.zeros(shape, np.uint8), info
    return _exportLabels(segmentationNode, segmentIds, referenceVolume, shape), info


def _exportLabels(segmentationNode, segmentIds, referenceVolume, shape) -> np.ndarray:
    """Labels of ``segmentIds`` (value = position + 1) exported onto ``referenceVolume``'s grid."""
    scene = segmentationNode.GetScene()
    labels = np.zeros(shape, np.uint8 if len(segmentIds) < 255 else np.uint16)
    with temporaryNodes(scene):
        labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", uniqueName(scene, "MedSSL temporary"))
        for value, segmentId in enumerate(segmentIds, start=1):
            ids = vtk.vtkStringArray()
            ids.InsertNextValue(segmentId)
            if not slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
                    segmentationNode, ids, labelmap, referenceVolume):
                raise RuntimeError(f"exporting segment '{segmentId}' of '{segmentationNode.GetName()}' failed")
            exported = slicer.util.arrayFromVolume(labelmap)
            if exported.shape != shape:
                raise RuntimeError(f"exported segment '{segmentId}' has shape {exported.shape}, expected {shape}")
            labels[exported > 0] = value
    return labels


def _nodeIds(scene) -> set:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def _removeNodesAddedSince(scene, before) -> None:
    for node in [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]:
        if node.GetID() not in before and not node.GetSingletonTag():
            scene.RemoveNode(node)


@contextlib.contextmanager
def temporaryNodes(scene):
    """Remove every node added to ``scene`` inside the ``with`` block (temporary labelmaps, the display and
    color nodes they bring), leaving the scene as it was."""
    before = _nodeIds(scene)
    try:
        yield
    finally:
        _removeNodesAddedSince(scene, before)


@contextlib.contextmanager
def rollbackOnError(scene):
    """If the ``with`` block raises, remove the nodes it added, so a failed import leaves no half result."""
    before = _nodeIds(scene)
    try:
        yield
    except BaseException:
        _removeNodesAddedSince(scene, before)
        raise


# ------------------------------------------------------------------------------------ detections etc.


DEFAULT_MIN_SCORE = 0.5
DEFAULT_MIN_VOLUME_MM3 = 20.0
DEFAULT_MAX_FINDINGS = 10
"""Which findings are shown by default (the same defaults as the backend's MedSSL.tasks.infer.detect)."""


def selectFindings(detections, minScore=DEFAULT_MIN_SCORE, minVolumeMm3=DEFAULT_MIN_VOLUME_MM3,
                   maxCount=DEFAULT_MAX_FINDINGS) -> list[dict]:
    """The findings to show: score >= ``minScore``, volume >= ``minVolumeMm3`` (findings without a volume
    pass), best score first, at most ``maxCount`` (None: no cap)."""
    def volume(finding):
        value = finding.get("volume_mm3")
        return float("inf") if value is None else float(value)

    ranked = sorted(detections, key=lambda f: (-float(f.get("score", 0)), -volume(f)))
    kept = [f for f in ranked if float(f.get("score", 0)) >= minScore and volume(f) >= minVolumeMm3]
    return kept if maxCount is None else kept[: max(0, int(maxCount))]


def markupsFromDetections(detections, referenceVolume, name, scene=None):
    """New fiducial markups node: one control point per finding at its ``center_mm`` (LPS in the file,
    RAS in the node), labelled "<name> <score>", in the order given (the backend sorts by score).
    The finding's class, score and volume (mm^3) are also kept in the point's description."""
    scene = getScene(scene if scene is not None else referenceVolume.GetScene())
    node = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", uniqueName(scene, name))
    node.CreateDefaultDisplayNodes()
    for finding in detections:
        ras = lpsToRas(finding["center_mm"])
        index = node.AddControlPoint(vtk.vtkVector3d(*ras), f"{finding.get('name', 'finding')} {float(finding.get('score', 0)):.2f}")
        node.SetNthControlPointDescription(index, _findingDescription(finding))
        node.SetNthControlPointLocked(index, True)
    placeLike(node, referenceVolume)
    return node


def _findingDescription(finding) -> str:
    """One-line description of a finding for a control point."""
    text = f"class {finding.get('label', '?')} ({finding.get('name', '')}), score {float(finding.get('score', 0)):.3f}"
    if finding.get("volume_mm3") is not None:
        text += f", volume {float(finding['volume_mm3']):.1f} mm3"
    return text


def tableFromRows(columns, rows, name, referenceNode=None, scene=None):
    """New table node with typed columns.

    columns: [(column name, "string" | "double" | "int")]; rows: list of sequences in column order.
    """
    scene = getScene(scene if scene is not None else (referenceNode.GetScene() if referenceNode else None))
    tableNode = scene.AddNewNodeByClass("vtkMRMLTableNode", uniqueName(scene, name))
    arrays = []
    for columnName, kind in columns:
        array = {"string": vtk.vtkStringArray, "double": vtk.vtkDoubleArray, "int": vtk.vtkIntArray}[kind]()
        array.SetName(columnName)
        arrays.append((array, kind))
    for row in rows:
        for (array, kind), value in zip(arrays, row):
            if kind == "string":
                array.InsertNextValue(str(value))
            else:
                array.InsertNextValue(float(value) if kind == "double" else int(value))
    table = tableNode.GetTable()
    for array, _kind in arrays:
        table.AddColumn(array)
    tableNode.Modified()
    if referenceNode is not None:
        placeLike(tableNode, referenceNode)
    return tableNode


DETECTION_COLUMNS = [("name", "string"), ("label", "int"), ("score", "double"), ("R", "double"),
                     ("A", "double"), ("S", "double"), ("volume_mm3", "double"), ("shown", "int")]
"""Columns of the findings table: class name and value, score, centre in world RAS (mm: through the volume's
parent transforms, where the points are shown), volume (mm^3), and 1 when the finding is one of the points
shown."""


def toWorld(node, ras) -> list[float]:
    """A point (RAS, mm) in ``node``'s own frame -> world RAS, through its parent transforms."""
    local = [float(v) for v in ras]
    if node is None or node.GetParentTransformNode() is None:
        return local
    world = [0.0, 0.0, 0.0]
    node.TransformPointToWorld(local, world)
    return [float(v) for v in world]


def tableFromDetections(detections, referenceVolume, name, scene=None, shown=None):
    """New table node listing findings (see :data:`DETECTION_COLUMNS`) best score first; centres converted
    LPS -> RAS and from the volume's frame to the world (its parent transforms). ``shown``: the findings
    that became points (default: all)."""
    shownIds = {id(f) for f in (detections if shown is None else shown)}
    rows = []
    for finding in sorted(detections, key=lambda f: -float(f.get("score", 0))):
        r, a, s = toWorld(referenceVolume, lpsToRas(finding["center_mm"]))
        rows.append([finding.get("name", ""), int(finding.get("label", 0)), float(finding.get("score", 0)),
                     r, a, s, float(finding.get("volume_mm3") or 0.0), int(id(finding) in shownIds)])
    return tableFromRows(DETECTION_COLUMNS, rows, name, referenceVolume, scene)


def tableFromClassification(result, referenceVolume, name, scene=None):
    """New table node with one row per class: name, probability, and 1 in "predicted" for the winner.
    ``result``: the backend's ``{"probabilities": {name: p}, "label": int, "name": str}``."""
    probabilities = result.get("probabilities") or {}
    winner = result.get("name")
    rows = [[className, float(p), int(className == winner)] for className, p in probabilities.items()]
    rows.sort(key=lambda row: -row[1])
    node = tableFromRows([("class", "string"), ("probability", "double"), ("predicted", "int")], rows, name,
                         referenceVolume, scene)
    node.SetAttribute("MedSSL.predictedClass", str(winner))
    node.SetAttribute("MedSSL.predictedLabel", str(result.get("label")))
    return node
