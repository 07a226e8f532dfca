"""Correction rounds of few-shot fine-tuning: which earlier few-shot model a new run on a painting may start from.

A few-shot model belongs to one image and one painting. A later run continues it (a correction round) only
when all of these hold, else it starts afresh from the user's initial model:

* the image is the same content: the hash of its voxels and its geometry (IJK->RAS matrix, shape, voxel
  type), :func:`imageContentKey`. Node IDs are not enough: ``vtkMRMLScene::Clear`` resets the ID counters,
  so the next patient's first volume gets the last patient's volume ID again;
* the segmentation is the same node, with the same classes, painted on a superset of the earlier planes
  (more paint, never less);
* the model folder still holds a few-shot model whose recorded image size and painted planes agree.

The memory is forgotten when the scene closes (``StartCloseEvent`` / ``EndCloseEvent`` of every scene it
remembered something in). Qt-free; needs numpy and MRML nodes only.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref

import numpy as np

from MedSSLCommonLib import nodes

AXIS_NAMES = "ijk"  # ITK index axes 0, 1, 2 as the backend's model.json names them


def imageContentKey(volumeNode) -> str:
    """Hex digest (BLAKE2b, 128 bit) of a volume's voxels (bytes, type, shape (k, j, i)) and its IJK->RAS
    matrix (mm, rounded to 1e-6): equal for the same image, whatever the node's ID or name."""
    import slicer.util

    array = np.ascontiguousarray(slicer.util.arrayFromVolume(volumeNode))
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{array.dtype.str}{array.shape}".encode("ascii"))
    digest.update(np.round(nodes.ijkToRasArray(volumeNode), 6).astype("<f8").tobytes())
    digest.update(memoryview(array).cast("B"))
    return digest.hexdigest()


def _isSuperset(planes, earlier) -> bool:
    """True when every earlier painted plane ({ITK axis: [indices]}) is painted now."""
    return all(set(earlier.get(axis, [])) <= set(planes.get(axis, [])) for axis in (0, 1, 2))


def _classNames(classes) -> list[str]:
    return [classes[key]["name"] for key in sorted(classes, key=int)]


class CorrectionRounds:
    """The few-shot model of the last round per (image content, segmentation node).

    ``remember`` after a run; ``choose`` before the next: it answers the model to start from (or None) and
    a one-line account of the round (:attr:`description`, also kept as ``lastChoice``)."""

    def __init__(self):
        self._records = {}  # (image key, segmentation node ID) -> {"bundle", "planes", "classes", "round"}
        self._observed = []  # (weak reference to a scene, observer tags): no cycle scene -> observer -> self

    def __len__(self) -> int:
        return len(self._records)

    def forget(self, *_args) -> None:
        """Forget every round (the scene closes: the next patient's nodes may get the same IDs)."""
        self._records.clear()

    def remember(self, volumeNode, segmentationNode, planes, classes, bundle, roundNumber: int, imageKey=None):
        """Keep ``bundle`` as the model of round ``roundNumber`` on this image and painting."""
        self._watch(volumeNode.GetScene())
        key = (imageKey or imageContentKey(volumeNode), segmentationNode.GetID())
        self._records[key] = {"bundle": bundle, "planes": {a: list(planes.get(a, [])) for a in (0, 1, 2)},
                              "classes": _classNames(classes), "round": int(roundNumber)}

    def choose(self, volumeNode, segmentationNode, planes, classes, imageKey=None) -> tuple[dict | None, str]:
        """(record of the earlier round to continue or None, why): the record has "bundle" and "round"."""
        key = (imageKey or imageContentKey(volumeNode), segmentationNode.GetID())
        record = self._records.get(key)
        if record is None:
            sameNodes = any(k[1] == segmentationNode.GetID() for k in self._records)
            return None, ("the image differs from the one the earlier model was fitted on" if sameNodes
                          else "no earlier round on this image and segmentation")
        if _classNames(classes) != record["classes"]:
            return None, "the painted classes changed since the earlier round"
        if not _isSuperset(planes, record["planes"]):
            return None, "planes painted in the earlier round are no longer painted"
        problem = bundleMismatch(record["bundle"], volumeNode, planes)
        if problem:
            return None, problem
        return record, "continues round {round}".format(**record)

    def _watch(self, scene) -> None:
        """Forget everything when ``scene`` closes (observed once per scene)."""
        if scene is None or any(observed() is scene for observed, _tags in self._observed):
            return
        records = self._records  # the observer holds the records, not self

        def forget(*_args):
            records.clear()

        tags = [scene.AddObserver(event, forget) for event in (scene.StartCloseEvent, scene.EndCloseEvent)]
        self._observed.append((weakref.ref(scene), tags))

    def stopWatching(self) -> None:
        """Remove the scene observers (the logic is going away)."""
        for observed, tags in self._observed:
            scene = observed()
            for tag in tags if scene is not None else ():
                scene.RemoveObserver(tag)
        self._observed = []


def bundleMismatch(bundle, volumeNode, planes) -> str:
    """Why the few-shot model ``bundle`` cannot continue on ``volumeNode`` painted on ``planes`` ({ITK axis:
    [indices]}) ('' when it can): not a few-shot model (any more), fitted on an image of another size, or on
    planes that are not painted now."""
    try:
        with open(os.path.join(bundle, "model.json"), encoding="utf-8") as handle:
            meta = json.load(handle)
    except (OSError, ValueError, TypeError):
        return f"the earlier model {bundle} is gone or unreadable"
    if not isinstance(meta, dict) or meta.get("task") != "fewshot":
        return f"{bundle} is not a few-shot model"
    shapes = (meta.get("data_summary") or {}).get("shapes") or []
    size = list(volumeNode.GetImageData().GetDimensions())  # (i, j, k), as the backend's ITK shape
    if shapes and [int(v) for v in shapes[0]] != size:
        return f"the earlier model {bundle} was fitted on an image of size {shapes[0]}, not {size}"
    recorded = (meta.get("fewshot") or {}).get("painted_planes")
    if isinstance(recorded, dict):
        theirs = {a: [int(v) for v in recorded.get(AXIS_NAMES[a], [])] for a in (0, 1, 2)}
        if not _isSuperset(planes, theirs):
            return f"the earlier model {bundle} was fitted on planes that are not painted now"
    return ""
