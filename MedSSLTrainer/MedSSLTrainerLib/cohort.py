"""MedSSLCohortLogic: paint a few scans, segment the next ones (the backend's cohort model).

A cohort is a folder (default ``<job folder>/cohorts/default``) that holds a copy of every scan added to it,
its label map, the class table and the current model. Adding a scan (:meth:`MedSSLCohortLogic.addScan`) copies
the volume and its segmentation there and refreshes the model with ``medssl finetune`` on every scan of the
cohort: the first model from ``initModel`` (a pretrained bundle, or none) with the full budget, later ones from
the previous model with a quarter of it (a budget given here is scaled by :data:`REFRESH_FRACTION`; none given:
the backend trains a quarter of the previous model's steps). A scan is either painted on a few planes (the backend completes the
painting with the few-shot engine) or a reviewed, complete segmentation (``complete=True``), such as a
corrected draft. :meth:`segmentNext` drafts the next scan with the model; :meth:`correct` redoes the draft
from the planes the user repainted and a few planes of the draft (``medssl predict --annotation``).

The cohort folder keeps copies of the scans (patient data) so that the model can be refreshed later: it is
the user's to keep or delete (:meth:`MedSSLCohortLogic.forget`). No torch in this process.
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np

from MedSSLCommonLib import backend, nodes
from MedSSLCommonLib.runner import BackendRunner, removesUnstartedJobFolders

from .annotation import NOT_ANNOTATED, sparseLabels

#: a refresh of the cohort model (from the previous one) gets this fraction of a budget given to addScan
REFRESH_FRACTION = 0.25


class MedSSLCohortLogic(BackendRunner):
    """Example (Slicer's Python console)::

        from MedSSLTrainerLib.cohort import MedSSLCohortLogic
        cohort = MedSSLCohortLogic()                       # <job folder>/cohorts/default
        cohort.addScan(getNode("MR1"), getNode("MR1 painting"))   # 5 planes painted
        cohort.addScan(getNode("MR2"), getNode("MR2 painting"))
        draft = cohort.segmentNext(getNode("MR3"))         # a segmentation node to review
        fixed = cohort.correct(getNode("MR3"), getNode("MR3 corrections"))  # a plane or two repainted
        cohort.addScan(getNode("MR3"), fixed, complete=True)
    """

    def __init__(self, cohortDir=None, **kwargs):
        super().__init__(**kwargs)
        self._cohortDir = cohortDir

    @property
    def cohortDir(self) -> str:
        return os.path.abspath(self._cohortDir or os.path.join(self.workDir or backend.workDirectory(), "cohorts",
                                                               "default"))

    def state(self) -> dict:
        """cohort.json: {"scans": [{"image", "label", "annotation"}], "classes": {value: {"name", "color"}},
        "model": folder or None, "round": models trained so far}."""
        path = os.path.join(self.cohortDir, "cohort.json")
        if not os.path.isfile(path):
            return {"scans": [], "classes": {}, "model": None, "round": 0}
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)

    @property
    def model(self):
        """The current cohort model folder, or None before the first scan was added."""
        return self.state()["model"]

    def forget(self) -> None:
        """Delete the cohort folder: the scan copies, labels and models."""
        shutil.rmtree(self.cohortDir, ignore_errors=True)

    @removesUnstartedJobFolders
    def addScan(self, volumeNode, segmentationNode, complete=False, initModel=None, steps=None, maxTime=None,
                width=None, unlabeled=None, blocking=True, onEvent=None):
        """Add a scan and refresh the model on the whole cohort; returns the new model folder (or the job).

        ``segmentationNode``: a few painted planes (the backend completes them), or, with ``complete``, a
        whole reviewed segmentation (every voxel outside its segments is background). Its segments are matched
        to the cohort's classes by name (new names become new classes). ``initModel``: the first model's
        initial weights (a pretrained bundle); later models start from the previous one. ``unlabeled``: scans
        of the same kind without labels (volume nodes, files or folders) for self-training (``finetune
        --unlabeled``: a second round on the model's confident voxels of them; they do not join the cohort).
        The scan joins the cohort only when the refreshed model was written.
        """
        self.checkVolume(volumeNode)
        state = self.state()
        labels, classes = self._labels(volumeNode, segmentationNode, complete)
        labels, merged = _matchClasses(labels, classes, state["classes"])
        index = len(state["scans"]) + 1
        scansDir = os.path.join(self.cohortDir, "scans")
        jobDir = self.newJobDirectory("cohort")
        inputs = os.path.join(jobDir, "inputs")  # the new scan joins the cohort folder once its model is written
        names = {"image": f"scan-{index:03d}.nrrd", "label": f"scan-{index:03d}-label.nrrd"}
        image = nodes.writeVolume(volumeNode, os.path.join(inputs, names["image"]))
        label = nodes.writeArray(labels, nodes.ijkToRasArray(volumeNode), os.path.join(inputs, names["label"]))
        unlabeledPaths = self._unlabeledPaths(unlabeled, inputs)
        scans = state["scans"] + [{**names, "annotation": "reviewed segmentation" if complete else "painted planes"}]
        first = state["model"] is None
        # no budget given: the backend's (a first model: its cohort default; a refresh: a share of the previous
        # model's steps, read from that model)
        budget = backend.budgetArgs(_scaled(steps, first), _scaled(maxTime, first), width if first else None,
                                    self.device)
        outputDir = os.path.join(self.cohortDir, f"model-{state['round'] + 1:03d}")
        classesPath = backend.writeJson(os.path.join(jobDir, "classes.json"), merged)
        args = []
        for scan in state["scans"]:
            args += ["--image", os.path.join(scansDir, scan["image"]), "--label", os.path.join(scansDir, scan["label"])]
        args += ["--image", image, "--label", label]
        init = state["model"] if not first else initModel
        args += ["--classes", classesPath, "--out", outputDir, "--engine", "network"]
        args += ["--init", init if str(init).lower() == "none" else self.checkModel(init)] if init else []
        args += ["--unlabeled", *unlabeledPaths] if unlabeledPaths else []
        args += budget + ["--progress", "json"]

        def onFinished(job):
            os.makedirs(scansDir, exist_ok=True)
            shutil.move(image, os.path.join(scansDir, names["image"]))
            shutil.move(label, os.path.join(scansDir, names["label"]))
            self._save({"scans": scans, "classes": merged, "model": outputDir, "round": state["round"] + 1})
            return outputDir

        return self.run(jobDir, [self.command("finetune", *args)], onFinished, blocking, onEvent, [inputs])

    @removesUnstartedJobFolders
    def segmentNext(self, volumeNode, blocking=True, onEvent=None, name=None):
        """The cohort model's draft of ``volumeNode``: a new segmentation node (or the running job)."""
        return self._predict(volumeNode, None, name or f"{volumeNode.GetName()} draft", blocking, onEvent)

    @removesUnstartedJobFolders
    def correct(self, volumeNode, correctionsNode, blocking=True, onEvent=None, name=None):
        """The draft of ``volumeNode`` corrected with the planes repainted in ``correctionsNode`` (a segmentation
        with one or two whole planes painted, segments named as the cohort's classes): a new segmentation node
        holding the corrected planes exactly, the rest redone by the few-shot engine from them, a few planes
        of the draft and the network's class probabilities (``medssl predict --annotation``)."""
        self.checkVolume(volumeNode)
        labels, classes, _planes = sparseLabels(correctionsNode, volumeNode)
        labels, _ = _matchClasses(labels, classes, self.state()["classes"], allowNew=False)
        return self._predict(volumeNode, labels, name or f"{volumeNode.GetName()} corrected", blocking, onEvent)

    # ------------------------------------------------------------------ internals

    def _labels(self, volumeNode, segmentationNode, complete):
        if segmentationNode is None or not segmentationNode.IsA("vtkMRMLSegmentationNode"):
            raise ValueError("select the segmentation of the scan (painted planes, or a reviewed segmentation)")
        if not complete:
            labels, classes, _planes = sparseLabels(segmentationNode, volumeNode)
            return labels, classes
        array, segments = nodes.segmentsLabelmap(segmentationNode, volumeNode)
        if not np.any(array):
            raise ValueError(f"segmentation '{segmentationNode.GetName()}' is empty")
        classes = {str(i): {"name": s["name"], "color": [float(c) for c in s["color"]]}
                   for i, s in enumerate(segments, start=1)}
        return array.astype(np.uint8), classes

    def _unlabeledPaths(self, unlabeled, inputs) -> list:
        """``--unlabeled`` paths: volume nodes written under ``inputs``, files and folders as given."""
        paths = []
        for i, item in enumerate(unlabeled or []):
            if isinstance(item, (str, os.PathLike)):
                if not os.path.exists(item):
                    raise ValueError(f"unlabelled scan {os.fspath(item)}: no such file or folder")
                paths.append(os.path.abspath(item))  # the backend runs in the job folder
                continue
            self.checkVolume(item)
            paths.append(nodes.writeVolume(item, os.path.join(inputs, f"unlabeled-{i + 1:03d}.nrrd")))
        return paths

    def _predict(self, volumeNode, corrections, name, blocking, onEvent):
        """``medssl predict`` with the cohort model (``corrections``: painted planes as a label array, or None
        for the draft); the result becomes a segmentation node named ``name`` with the cohort's classes."""
        model = self._currentModel()
        self.checkVolume(volumeNode)
        classes = self.state()["classes"]
        jobDir = self.newJobDirectory("cohort-predict")
        inputs = os.path.join(jobDir, "inputs")
        image = nodes.writeVolume(volumeNode, os.path.join(inputs, "image.nrrd"))
        out = os.path.join(jobDir, "prediction.nrrd")
        args = ["--model", model, "--image", image, "--out", out]
        if corrections is not None:
            args += ["--annotation", nodes.writeArray(corrections, nodes.ijkToRasArray(volumeNode),
                                                      os.path.join(inputs, "corrections.nrrd"))]
        args += backend.deviceArgs(self.device) + ["--progress", "json"]

        def onFinished(job):
            nodes.checkStillInScene(volumeNode)
            array, ijkToRas = nodes.readArray(out)
            with nodes.rollbackOnError(self.scene):
                node = nodes.segmentationFromLabelmap(array, ijkToRas, classes, volumeNode, name, self.scene)
            self.lastOutputs = {"segmentation": node}
            return node

        return self.run(jobDir, [self.command("predict", *args)], onFinished, blocking, onEvent, [inputs])

    def _currentModel(self) -> str:
        model = self.model
        if not model or not os.path.isdir(model):
            raise ValueError(f"the cohort in {self.cohortDir} has no model yet: add a painted scan first")
        return model

    def _save(self, state) -> None:
        os.makedirs(self.cohortDir, exist_ok=True)
        backend.writeJson(os.path.join(self.cohortDir, "cohort.json"), state)


def _scaled(value, first: bool):
    """The budget of a refresh: REFRESH_FRACTION of the first model's (None stays None: the backend's)."""
    if value is None or first:
        return value
    return max(1, int(round(float(value) * REFRESH_FRACTION))) if isinstance(value, int) else float(value) * REFRESH_FRACTION


def _matchClasses(labels, classes: dict, known: dict, allowNew: bool = True):
    """(labels renumbered to the cohort's class values, the cohort's class table with new names added).

    labels: uint8 array, values = keys of ``classes`` ({"1": {"name", "color"}}), 0 and 255 kept. Names
    match case-insensitively; with ``allowNew`` False an unknown name is a ValueError."""
    merged = {str(k): dict(v) for k, v in known.items()}
    byName = {v["name"].casefold(): int(k) for k, v in merged.items()}
    lut = np.arange(256, dtype=np.uint8)
    for key, entry in classes.items():
        value = byName.get(entry["name"].casefold())
        if value is None:
            if not allowNew:
                raise ValueError(f"segment '{entry['name']}' is not a class of the cohort "
                                 f"({', '.join(v['name'] for v in merged.values()) or 'none yet'}): name it as one")
            value = max([int(k) for k in merged] + [0]) + 1
            if value >= NOT_ANNOTATED:
                raise ValueError("too many classes in the cohort")
            merged[str(value)] = {"name": entry["name"], "color": list(entry["color"])}
            byName[entry["name"].casefold()] = value
        lut[int(key)] = value
    return lut[labels], merged
