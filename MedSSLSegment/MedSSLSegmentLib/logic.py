"""MedSSLSegmentLogic: apply a model bundle to a volume node (segmentation, detection, classification).

Usable from Slicer's Python console, scripts and tests with only ``slicer.mrmlScene`` set; no Qt, no torch in
this process. Each call writes the volume to a job folder as NRRD, runs ``python -m MedSSL predict`` in a
child process and imports what it wrote.
"""

from __future__ import annotations

import json
import os

from MedSSLCommonLib import backend, nodes
from MedSSLCommonLib.runner import BackendRunner, removesUnstartedJobFolders


class MedSSLSegmentLogic(BackendRunner):
    """Apply MedSSL model bundles to volumes.

    Example (Slicer's Python console)::

        from MedSSLSegmentLib.logic import MedSSLSegmentLogic
        segmentation = MedSSLSegmentLogic().segment(getNode("CTChest"), "/path/to/bundle")

    Every method takes ``blocking``: True waits and returns the new node; False returns a running
    :class:`~MedSSLCommonLib.jobs.Job` to poll (its ``result`` is the node once ``job.status == "done"``).
    Outputs are placed in the volume's subject-hierarchy study and under its parent transform.
    """

    def segment(self, volumeNode, modelDir, blocking=True, onEvent=None, name=None):
        """Segment ``volumeNode`` -> new ``vtkMRMLSegmentationNode`` with the bundle's segment names and colors
        on the volume's geometry."""
        info = self._prepare(volumeNode, modelDir, ("segment", "detect"))
        return self._predict(volumeNode, modelDir, info, "segment", blocking, onEvent, name)

    maxFindings = nodes.DEFAULT_MAX_FINDINGS
    """Detection: at most this many findings become points (best score first; None: no cap)."""
    minScore = nodes.DEFAULT_MIN_SCORE
    """Detection: findings with a lower score (mean probability) are not shown."""
    minVolumeMm3 = nodes.DEFAULT_MIN_VOLUME_MM3
    """Detection: smaller findings (mm^3) are not shown."""
    allFindingsInTable = False
    """Detection: True lists every finding in the table (column "shown" marks the points), False only the
    shown ones."""

    def detect(self, volumeNode, modelDir, blocking=True, onEvent=None, name=None):
        """Detect findings -> new ``vtkMRMLMarkupsFiducialNode`` with one control point per shown finding (the
        best ``maxFindings`` with score >= ``minScore`` and volume >= ``minVolumeMm3``), labelled "<class>
        <score>", positions in RAS, referencing a findings ``vtkMRMLTableNode`` (node reference role
        "MedSSLFindings", also in ``lastOutputs["table"]``; every finding with ``allFindingsInTable``)."""
        info = self._prepare(volumeNode, modelDir, ("detect",))
        return self._predict(volumeNode, modelDir, info, "detect", blocking, onEvent, name)

    def classify(self, volumeNode, modelDir, blocking=True, onEvent=None, name=None):
        """Classify the whole volume -> new ``vtkMRMLTableNode`` (class, probability, predicted)."""
        info = self._prepare(volumeNode, modelDir, ("classify",))
        return self._predict(volumeNode, modelDir, info, "classify", blocking, onEvent, name)

    def apply(self, volumeNode, modelDir, blocking=True, onEvent=None, name=None):
        """Segment, detect or classify, whichever the bundle's task is."""
        task = backend.bundleTask(self.modelInfo(modelDir))
        method = {"segment": self.segment, "detect": self.detect, "classify": self.classify}.get(task)
        if method is None:
            if task == "fewshot":
                raise ValueError(f"{modelDir}: a few-shot model completes the painting it was trained with; use "
                                 "MedSSL Trainer (Fine-tune and segment) on that volume, or fine-tune a network model "
                                 "to apply it to other scans")
            raise ValueError(f"{modelDir}: a '{task}' bundle cannot be applied (pretrained models need fine-tuning)")
        return method(volumeNode, modelDir, blocking=blocking, onEvent=onEvent, name=name)

    @removesUnstartedJobFolders
    def segmentMany(self, volumeNodesOrFolder, modelDir, outputDir=None, blocking=True, onEvent=None):
        """Segment several scans with one model, loaded once (``medssl predict`` on many images).

        volumeNodesOrFolder: volume nodes -> a new segmentation node per volume, returned as a list in the same
        order (each named "<volume> <model>"); or a folder (or list of paths) of scans on disk -> label maps
        written to ``outputDir`` (default ``<job folder>/segmentations/<job name>``) with ``summary.csv``, and
        the summary's path is returned (nothing is loaded into the scene). Progress events come per scan.
        """
        info = self.modelInfo(modelDir)
        if backend.bundleTask(info) not in ("segment", "detect"):
            raise ValueError(f"{modelDir} is a '{backend.bundleTask(info)}' model; segmenting several scans needs a "
                             "segmentation model (a few-shot model completes the painting of its own scan)")
        items = [volumeNodesOrFolder] if isinstance(volumeNodesOrFolder, (str, os.PathLike)) else list(volumeNodesOrFolder)
        if not items:
            raise ValueError("choose at least one volume or folder to segment")
        onDisk = all(isinstance(item, (str, os.PathLike)) for item in items)
        if not onDisk and any(isinstance(item, (str, os.PathLike)) for item in items):
            raise ValueError("give either volume nodes or paths, not both")
        jobDir = self.newJobDirectory("segment-many")
        inputs = os.path.join(jobDir, "inputs")
        if onDisk:
            for item in items:
                if not os.path.exists(item):
                    raise ValueError(f"not found: {item}")
            images = [os.path.abspath(item) for item in items]
            out = os.path.abspath(outputDir or os.path.join(self.workDir or backend.workDirectory(), "segmentations",
                                                            os.path.basename(jobDir)))
        else:
            for node in items:
                self.checkVolume(node)
            images = [nodes.writeVolume(node, os.path.join(inputs, f"scan-{i:03d}.nrrd")) for i, node in enumerate(items)]
            out = os.path.join(jobDir, "segmentations")
        args = ["--model", self.checkModel(modelDir), "--image", *images, "--out", out]
        args += backend.deviceArgs(self.device) + ["--progress", "json"]

        def onFinished(job):
            if onDisk:
                self.lastOutputs = {"summary": os.path.join(out, "summary.csv")}
                return self.lastOutputs["summary"]
            made = []
            with nodes.rollbackOnError(self.scene):
                for i, node in enumerate(items):
                    nodes.checkStillInScene(node)
                    array, ijkToRas = nodes.readArray(os.path.join(out, f"scan-{i:03d}.nii.gz"))
                    made.append(nodes.segmentationFromLabelmap(array, ijkToRas, info.get("classes"), node,
                                                               f"{node.GetName()} {modelName(modelDir, info)}", self.scene))
            self.lastOutputs = {"segmentations": made}
            return made

        return self.run(jobDir, [self.command("predict", *args)], onFinished, blocking, onEvent, [inputs])

    def modelInfo(self, modelDir) -> dict:
        """The bundle's model.json content (task, classes, method, architecture, ...)."""
        return backend.bundleInfo(self.checkModel(modelDir), python=self.python)

    # ------------------------------------------------------------------ internals

    def _prepare(self, volumeNode, modelDir, tasks) -> dict:
        self.checkVolume(volumeNode)
        info = self.modelInfo(modelDir)
        task = backend.bundleTask(info)
        if task not in tasks:
            raise ValueError(f"{modelDir} is a '{task}' model; this needs a {' or '.join(tasks)} model")
        return info

    @removesUnstartedJobFolders
    def _predict(self, volumeNode, modelDir, info, kind, blocking, onEvent, name):
        jobDir = self.newJobDirectory(kind)
        inputs = os.path.join(jobDir, "inputs")
        image = nodes.writeVolume(volumeNode, os.path.join(inputs, "image.nrrd"))
        out = os.path.join(jobDir, "classification.json" if kind == "classify" else "prediction.nrrd")
        detections = os.path.join(jobDir, "detections.json") if kind == "detect" else None
        args = ["--model", self.checkModel(modelDir), "--image", image, "--out", out]
        args += ["--detections", detections] if detections else []
        args += backend.deviceArgs(self.device) + ["--progress", "json"]
        name = name or f"{volumeNode.GetName()} {modelName(modelDir, info)}"
        importer = {"segment": self._importSegmentation, "detect": self._importDetections,
                    "classify": self._importClassification}[kind]
        paths = {"out": out, "detections": detections}
        def onFinished(job):
            nodes.checkStillInScene(volumeNode)
            return importer(volumeNode, info, paths, name)

        return self.run(jobDir, [self.command("predict", *args)], onFinished, blocking, onEvent, [inputs])

    def _importSegmentation(self, volumeNode, info, paths, name):
        array, ijkToRas = nodes.readArray(paths["out"])
        with nodes.rollbackOnError(self.scene):
            node = nodes.segmentationFromLabelmap(array, ijkToRas, info.get("classes"), volumeNode, name, self.scene)
        self.lastOutputs = {"segmentation": node}
        return node

    def _importDetections(self, volumeNode, info, paths, name):
        with open(paths["detections"], encoding="utf-8") as handle:
            detections = json.load(handle)
        shown = nodes.selectFindings(detections, self.minScore, self.minVolumeMm3, self.maxFindings)
        listed = detections if self.allFindingsInTable else shown
        with nodes.rollbackOnError(self.scene):
            markups = nodes.markupsFromDetections(shown, volumeNode, name, self.scene)
            table = nodes.tableFromDetections(listed, volumeNode, f"{name} findings", self.scene, shown)
            markups.SetNodeReferenceID("MedSSLFindings", table.GetID())
            markups.SetAttribute("MedSSL.findings", f"{len(shown)} shown of {len(detections)}")
        self.lastOutputs = {"markups": markups, "table": table, "findingsTotal": len(detections)}
        return markups

    def _importClassification(self, volumeNode, info, paths, name):
        with open(paths["out"], encoding="utf-8") as handle:
            result = json.load(handle)
        with nodes.rollbackOnError(self.scene):
            table = nodes.tableFromClassification(result, volumeNode, name, self.scene)
        self.lastOutputs = {"table": table}
        return table


def modelName(modelDir, info: dict | None = None) -> str:
    """Short display name of a model: model.json "name" if any, else the folder name."""
    if info and info.get("name"):
        return str(info["name"])
    return os.path.basename(os.path.normpath(str(modelDir)))
