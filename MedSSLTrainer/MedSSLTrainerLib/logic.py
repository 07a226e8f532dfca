"""MedSSLTrainerLogic: self-supervised pretraining and few-shot fine-tuning from Slicer nodes.

Usable from Slicer's Python console, scripts and tests with only ``slicer.mrmlScene`` set; no Qt, and torch
only ever runs in the child process (``python -m MedSSL ...``). The job runner, node<->file conversion and
backend discovery come from the shared library ``MedSSLCommonLib`` (hidden MedSSLCommon module).
"""

from __future__ import annotations

import json
import logging
import os
import shutil

from MedSSLCommonLib import backend, geometry, nodes
from MedSSLCommonLib.runner import BackendRunner, removesUnstartedJobFolders

from .annotation import SLICE_AXIS_K, describePlanes, sparseLabels
from .datasets import writeDatasetsSpec
from .rounds import CorrectionRounds, bundleMismatch, imageContentKey


class MedSSLTrainerLogic(BackendRunner):
    """Pretrain on unlabeled volumes, fine-tune on sparsely painted slices, suggest slices to paint next.

    Example (Slicer's Python console)::

        from MedSSLTrainerLib.logic import MedSSLTrainerLogic
        logic = MedSSLTrainerLogic()
        bundle = logic.pretrain(["/data/unlabeled_ct"], steps=2000)
        ark = logic.pretrainOnDatasets([{"name": "livers", "cases": [(getNode("CT1"), getNode("Liver1"))]},
                                        {"name": "spleens", "cases": [(getNode("CT2"), getNode("Spleen2"))]}])
        model = logic.finetune(getNode("CT"), getNode("Segmentation"), initModel=bundle, steps=300)
        logic.lastOutputs["segmentation"]   # the whole volume segmented, for review

    ``blocking=True`` waits and returns the bundle folder; ``blocking=False`` returns a running
    :class:`~MedSSLCommonLib.jobs.Job` to poll from a timer (``job.poll()``), cancel (``job.cancel()``)
    and read (``job.result`` once ``job.status == "done"``). Budgets: ``steps`` (optimizer steps) and/or
    ``maxTime`` (seconds); ``width`` is the network's base width; None leaves the backend's default.
    """

    @property
    def correctionRounds(self) -> CorrectionRounds:
        """The few-shot models of earlier rounds, by image content and painting (see :mod:`.rounds`);
        forgotten when the scene closes."""
        if "_correctionRounds" not in self.__dict__:
            self._correctionRounds = CorrectionRounds()
        return self._correctionRounds

    def previousFewShotModel(self, volumeNode, segmentationNode):
        """The few-shot model folder a fine-tuning of this volume and painting would continue now, or None
        (another image content, fewer painted planes, other classes, a scene closed since)."""
        try:
            labels, classes, planes = sparseLabels(segmentationNode, volumeNode)
        except ValueError:
            return None
        record, _why = self.correctionRounds.choose(volumeNode, segmentationNode, planes, classes)
        return record["bundle"] if record else None

    def availableMethods(self) -> list[dict]:
        """Pretraining methods the backend offers: [{"name", "description"}] (fallback: genesis)."""
        return backend.availableMethods(python=self.python)

    @removesUnstartedJobFolders
    def pretrain(self, volumeNodesOrPaths, method="genesis", outputDir=None, steps=None, maxTime=None, width=None,
                 blocking=True, initModel=None, onEvent=None):
        """Self-supervised pretraining on unlabeled data.

        volumeNodesOrPaths: volume nodes and/or paths (files, folders searched recursively, DICOM folders),
        or a single path. Nodes are written to the job folder as NRRD (deleted when the job ends).
        Returns the bundle folder (``outputDir``, default ``<workDir>/models/<job name>``).
        """
        budget = backend.budgetArgs(steps, maxTime, width, self.device)  # refuses bad budgets before any file is written
        items = [volumeNodesOrPaths] if isinstance(volumeNodesOrPaths, (str, os.PathLike)) else list(volumeNodesOrPaths)
        if not items:
            raise ValueError("choose at least one volume or folder to pretrain on")
        jobDir = self.newJobDirectory("pretrain")
        inputs = os.path.join(jobDir, "inputs")
        data = [self._dataPath(item, inputs, index) for index, item in enumerate(items)]
        outputDir = os.path.abspath(outputDir or self.defaultOutputDirectory(jobDir, "pretrain"))
        cache = os.path.join(jobDir, "cache")  # resampled cubes of the scans: deleted with the inputs
        args = ["--data", *data, "--method", method, "--out", outputDir, "--cache", cache]
        args += ["--init", self.checkModel(initModel)] if initModel else []
        args += budget + ["--progress", "json"]
        return self.run(jobDir, [self.command("pretrain", *args)], lambda job: _bundleOf(job, outputDir),
                        blocking, onEvent, [inputs, cache])

    @removesUnstartedJobFolders
    def pretrainOnDatasets(self, datasets, method="ark", outputDir=None, steps=None, maxTime=None, width=None,
                           blocking=True, initModel=None, onEvent=None):
        """Pretraining on several labelled datasets whose label sets differ (Ark: a head per dataset, an
        EMA teacher; the bundle segments the union of their classes).

        datasets: a SPEC.json path in the backend's format, or ``[{"name": str, "cases": [(volumeNode,
        segmentationNode), ...]}, ...]`` from the scene (see :func:`MedSSLTrainerLib.datasets.writeDatasetsSpec`:
        each dataset's segments are its classes, matched by name; the images and labels are written to the
        job folder and deleted when the job ends). Returns the bundle folder.
        """
        budget = backend.budgetArgs(steps, maxTime, width, self.device)
        if isinstance(datasets, (str, os.PathLike)) and not os.path.isfile(datasets):
            raise ValueError(f"not found: {datasets}")
        jobDir = self.newJobDirectory("pretrain")
        inputs = os.path.join(jobDir, "inputs")
        if isinstance(datasets, (str, os.PathLike)):
            spec = os.path.abspath(datasets)
        else:
            try:
                spec = writeDatasetsSpec(datasets, inputs)
            except Exception:
                shutil.rmtree(jobDir, ignore_errors=True)  # nothing half-written is left behind
                raise
        outputDir = os.path.abspath(outputDir or self.defaultOutputDirectory(jobDir, "pretrain"))
        cache = os.path.join(jobDir, "cache")
        args = ["--datasets", spec, "--method", method, "--out", outputDir, "--cache", cache]
        args += ["--init", self.checkModel(initModel)] if initModel else []
        args += budget + ["--progress", "json"]
        return self.run(jobDir, [self.command("pretrain", *args)], lambda job: _bundleOf(job, outputDir),
                        blocking, onEvent, [inputs, cache])

    @removesUnstartedJobFolders
    def finetune(self, volumeNode, segmentationNode, outputDir=None, initModel=None, steps=None, maxTime=None,
                 width=None, blocking=True, predict=True, sliceAxis=None, onEvent=None, detection=False,
                 cleanup=True, correction=True):
        """Few-shot fine-tuning on the planes painted in ``segmentationNode`` (see :func:`sparseLabels`:
        slices painted in any view, along any of the volume's axes; ``sliceAxis`` forces one ITK axis).
        The planes used are logged, written first in the job's log and kept in ``lastPlanes``.

        initModel: a MedSSL bundle folder, an official Models Genesis ``.pt``, "none", or None (backend
        default). With ``predict`` the new model then segments the whole volume into a new segmentation
        node for review (``lastOutputs["segmentation"]``; on a job: ``job.segmentationNode``); with
        ``cleanup`` that prediction keeps only components connected to the painted structures and the
        painted voxels themselves (the backend's ``--annotation`` few-shot clean-up). ``detection`` marks the
        bundle as a detector (usable with MedSSLSegmentLogic.detect). Returns the new bundle folder.

        Correction rounds: a painting of one volume goes to the backend's few-shot engine, which writes a
        few-shot model. With ``correction`` (default), a later call on the same image content (voxels and
        geometry, not node IDs) and segmentation, painted on the same planes or more, starts from that
        model (``--init`` of the previous round: its appearance model is refined with a quarter of the
        steps, a few seconds) instead of ``initModel`` (see :mod:`.rounds`; closing the scene forgets the
        rounds). ``lastRound`` ({"round", "init", "reason"}, :func:`describeRound`) and ``lastInit`` say which
        round ran and from what; the job's log starts with that line.
        """
        self.checkVolume(volumeNode)
        budget = backend.budgetArgs(steps, maxTime, width, self.device)
        if segmentationNode is None or not segmentationNode.IsA("vtkMRMLSegmentationNode"):
            raise ValueError("select the segmentation painted on the volume")
        labels, classes, planes = sparseLabels(segmentationNode, volumeNode, sliceAxis)
        self.lastPlanes = planes
        planesLine = f"MedSSL: {describePlanes(planes, volumeNode)}"
        logging.info(planesLine)
        jobDir = self.newJobDirectory("finetune")
        _appendLog(jobDir, planesLine)
        inputs = os.path.join(jobDir, "inputs")
        image = nodes.writeVolume(volumeNode, os.path.join(inputs, "image.nrrd"))
        label = nodes.writeArray(labels, nodes.ijkToRasArray(volumeNode), os.path.join(inputs, "label.nrrd"))
        classesPath = backend.writeJson(os.path.join(inputs, "classes.json"), classes)
        outputDir = os.path.abspath(outputDir or self.defaultOutputDirectory(jobDir, "finetune"))
        args = ["--image", image, "--label", label, "--classes", classesPath, "--out", outputDir]
        args += ["--detection"] if detection else []
        imageKey = imageContentKey(volumeNode)
        record, why = (self.correctionRounds.choose(volumeNode, segmentationNode, planes, classes, imageKey)
                       if correction and not detection else (None, "correction rounds are off"))
        if record is None and initModel and _isFewShotModel(initModel):
            problem = bundleMismatch(initModel, volumeNode, planes)
            if problem:
                raise ValueError(f"initial model: {problem}; a few-shot model only continues the painting of its "
                                 "own image: choose a pretrained model or none")
        initModel = record["bundle"] if record else initModel
        roundNumber = record["round"] + 1 if record else 1
        self.lastRound = {"round": roundNumber, "init": initModel, "reason": why}
        self.lastInit = initModel
        roundLine = f"MedSSL: {describeRound(self.lastRound)}"
        logging.info(roundLine)
        _appendLog(jobDir, roundLine)
        args += ["--init", initModel if str(initModel).lower() == "none" else self.checkModel(initModel)] if initModel else []
        args += budget + ["--progress", "json"]
        commands = [self.command("finetune", *args)]
        prediction = os.path.join(jobDir, "prediction.nrrd")
        if predict:
            commands.append(self.command("predict", "--model", outputDir, "--image", image, "--out", prediction,
                                         *(["--annotation", label] if cleanup else []),
                                         *backend.deviceArgs(self.device), "--progress", "json"))

        def onFinished(job):
            bundle = _bundleOf(job, outputDir)
            if _isFewShotModel(bundle) and not detection:
                self.correctionRounds.remember(volumeNode, segmentationNode, planes, classes, bundle, roundNumber,
                                               imageKey)
            if predict:
                nodes.checkStillInScene(volumeNode)
                job.segmentationNode = self._importPrediction(volumeNode, bundle, prediction, roundNumber)
            return bundle

        return self.run(jobDir, commands, onFinished, blocking, onEvent, [inputs])

    @removesUnstartedJobFolders
    def suggestSlices(self, volumeNode, modelDir, count=None, blocking=True, onEvent=None, segmentationNode=None,
                      sliceAxis=SLICE_AXIS_K):
        """Slices worth annotating next, best first: [{"axis", "index", "score", "center_mm" (LPS, the
        volume's own frame), "center_ras" (world RAS, mm, through the volume's parent transforms)}] (axis:
        ITK index axis, 2 = k). With ``segmentationNode`` (the current painting)
        its annotated slices are not suggested again. ``count``: how many (None: the backend's default)."""
        self.checkVolume(volumeNode)
        jobDir = self.newJobDirectory("suggest")
        inputs = os.path.join(jobDir, "inputs")
        image = nodes.writeVolume(volumeNode, os.path.join(inputs, "image.nrrd"))
        out = os.path.join(jobDir, "suggestions.json")
        args = ["--model", self.checkModel(modelDir), "--image", image, "--axis", int(sliceAxis), "--out", out]
        args += ["--count", int(count)] if count is not None else []
        args += backend.deviceArgs(self.device) + ["--progress", "json"]
        labels = _paintedLabelsOrNone(segmentationNode, volumeNode)
        if labels is not None:
            label = nodes.writeArray(labels, nodes.ijkToRasArray(volumeNode), os.path.join(inputs, "label.nrrd"))
            args += ["--label", label]
        return self.run(jobDir, [self.command("suggest", *args)], lambda job: _readSuggestions(out, job, volumeNode),
                        blocking, onEvent, [inputs])

    @staticmethod
    def jumpToSlice(suggestion, scene=None) -> None:
        """Centre every slice view on a suggested slice (``center_ras``, mm). Uses only the scene's slice
        nodes (no ``slicer.app``); without slice views (bare slicer-core scene) it does nothing."""
        scene = nodes.getScene(scene)
        r, a, s = suggestion["center_ras"]
        import slicer

        slicer.vtkMRMLSliceNode.JumpAllSlices(scene, r, a, s, slicer.vtkMRMLSliceNode.CenteredJumpSlice)

    def _importPrediction(self, volumeNode, bundle, prediction, roundNumber=1):
        """New segmentation node from the fine-tuned model's prediction, named by structure and round
        ("spleen round 2"; the model folder is in ``lastOutputs["bundle"]``)."""
        info = backend.bundleInfo(bundle, python=self.python)
        array, ijkToRas = nodes.readArray(prediction)
        structures = ", ".join(c["name"] for c in nodes.normaliseClasses(info.get("classes")).values())
        name = f"{structures or volumeNode.GetName()} round {roundNumber}"
        with nodes.rollbackOnError(self.scene):
            node = nodes.segmentationFromLabelmap(array, ijkToRas, info.get("classes"), volumeNode, name, self.scene)
        self.lastOutputs = {"segmentation": node, "bundle": bundle}
        return node

    def _dataPath(self, item, inputs, index) -> str:
        """A path for ``--data``: existing paths as given, volume nodes written as NRRD."""
        if isinstance(item, (str, os.PathLike)):
            if not os.path.exists(item):
                raise ValueError(f"not found: {item}")
            return os.path.abspath(item)
        self.checkVolume(item)
        return nodes.writeVolume(item, os.path.join(inputs, f"volume-{index:03d}.nrrd"))


def describeRound(roundInfo) -> str:
    """One line on a fine-tuning round, e.g. "round 2 on this painting, from the few-shot model /m/a
    (continues round 1)" or "round 1, from no initial model (no earlier round on this image and
    segmentation)"."""
    init = roundInfo.get("init")
    source = ("no initial model" if not init or str(init).lower() == "none" else
              f"the few-shot model {init}" if roundInfo["round"] > 1 else f"the initial model {init}")
    return f"round {roundInfo['round']} on this painting, from {source} ({roundInfo['reason']})"


def _appendLog(jobDir, line) -> None:
    """A line in the job's log (the module's log view shows it) before the backend writes there."""
    with open(os.path.join(jobDir, "log.txt"), "a", encoding="utf-8") as handle:
        handle.write(line + "\n")


def _paintedLabelsOrNone(segmentationNode, volumeNode):
    """Sparse labels of a segmentation (painted planes along any axis), or None when there is none or
    nothing is painted yet."""
    if segmentationNode is None:
        return None
    try:
        return sparseLabels(segmentationNode, volumeNode)[0]
    except ValueError:
        return None


def _isFewShotModel(bundle) -> bool:
    """True when ``bundle`` holds a few-shot model (model.json ``task: "fewshot"``)."""
    try:
        with open(os.path.join(bundle, "model.json"), encoding="utf-8") as handle:
            return json.load(handle).get("task") == "fewshot"
    except (OSError, ValueError, AttributeError):
        return False


def _bundleOf(job, default) -> str:
    """The bundle folder a training job reported in its "done" event (else ``default``)."""
    for event in reversed(job.events):
        if event.get("event") == "done" and event.get("bundle"):
            return os.path.abspath(os.path.join(job.cwd, event["bundle"]))  # relative: to the child's folder
    return default


def _readSuggestions(path, job, volumeNode=None) -> list[dict]:
    """Suggestions from the backend's JSON file (or, failing that, its stdout), each with ``center_ras``
    (world RAS, mm: through the volume's parent transforms, where the slice views jump) added."""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            answer = json.load(handle)
    else:
        answer = next((o for o in reversed(job.outputs) if isinstance(o, dict) and "slices" in o), {})
    slices = list(answer.get("slices", []))
    for item in slices:
        if item.get("center_mm") is not None:
            local = [float(v) for v in geometry.lpsToRas(item["center_mm"])]
            world = list(local)
            if volumeNode is not None and volumeNode.GetParentTransformNode() is not None:
                volumeNode.TransformPointToWorld(local, world)
            item["center_ras"] = [float(v) for v in world]
    return slices
